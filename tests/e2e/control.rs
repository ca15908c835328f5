//! The control plane through its HTTP API, as an operator drives it: tokens, clusters, tenants provisioned on a
//! real cluster and used with a real client, idempotency, conflicts, validation, failure and retry, deletion.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

pub const ADMIN: &str = "admin-token-for-tests";
pub const READER: &str = "read-token-for-tests";

/// One HTTP/1.1 request: (status, JSON body or Null).
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let (status, body) = http(addr, method, path, token, body).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

pub fn control_env() -> Env {
    Env::with(Setup {
        catalog: true,
        ..Setup::default()
    })
}

pub async fn add_tokens(env: &Env) {
    let control = env.proxy.control.as_ref().expect("a control plane");
    control
        .catalog
        .put_token("ops", ADMIN, "admin", true)
        .await
        .unwrap();
    control
        .catalog
        .put_token("viewer", READER, "read", true)
        .await
        .unwrap();
}

pub async fn register_cluster(env: &Env, name: &str, port: u16) -> (u16, Value) {
    let body = json!({
        "host": "127.0.0.1",
        "port": port,
        "admin_user": "postgres",
        "admin_password": env.cluster.superuser_password(),
    })
    .to_string();
    call(
        env.admin,
        "PUT",
        &format!("/v1/clusters/{name}"),
        Some(ADMIN),
        Some(&body),
    )
    .await
}

/// Connects with a `postgres://` string the API returned (no TLS: the test's pgweir has it, the URL does not ask).
pub async fn connect_url(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&format!("{url}?sslmode=disable"), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[test]
fn tokens_are_required_and_scoped() {
    let env = control_env();
    runtime().block_on(async {
        add_tokens(&env).await;
        let (s, body) = call(env.admin, "GET", "/v1/tenants", None, None).await;
        assert_eq!((s, body["code"].as_str()), (401, Some("unauthorized")));
        let (s, _) = call(env.admin, "GET", "/v1/tenants", Some("not-a-token"), None).await;
        assert_eq!(s, 401);
        let (s, body) = call(env.admin, "GET", "/v1/tenants", Some(READER), None).await;
        assert_eq!(s, 200, "{body}");
        let (s, body) = call(env.admin, "PUT", "/v1/tenants/x", Some(READER), Some("{}")).await;
        assert_eq!((s, body["code"].as_str()), (403, Some("forbidden")));
        // Tokens made through the API: shown once, scoped, revocable.
        let (s, made) = call(
            env.admin,
            "PUT",
            "/v1/tokens/ci",
            Some(ADMIN),
            Some(r#"{"scope": "read"}"#),
        )
        .await;
        assert_eq!(s, 201, "{made}");
        let ci = made["token"].as_str().unwrap().to_owned();
        assert!(ci.len() >= 32);
        let (s, _) = call(env.admin, "GET", "/v1/tenants", Some(&ci), None).await;
        assert_eq!(s, 200);
        let (s, _) = call(env.admin, "PUT", "/v1/tenants/x", Some(&ci), Some("{}")).await;
        assert_eq!(s, 403);
        let (s, _) = call(
            env.admin,
            "PUT",
            "/v1/tokens/more",
            Some(&ci),
            Some(r#"{"scope": "admin"}"#),
        )
        .await;
        assert_eq!(s, 403, "a read token cannot make tokens");
        let (s, bad) = call(
            env.admin,
            "PUT",
            "/v1/tokens/ci",
            Some(ADMIN),
            Some(r#"{"scope": "root"}"#),
        )
        .await;
        assert_eq!(
            (s, bad["details"][0]["field"].as_str()),
            (400, Some("scope"))
        );
        let (s, _) = call(env.admin, "DELETE", "/v1/tokens/ci", Some(ADMIN), None).await;
        assert_eq!(s, 204);
        let (s, _) = call(env.admin, "GET", "/v1/tenants", Some(&ci), None).await;
        assert_eq!(s, 401, "a revoked token is refused");
        let (s, _) = call(env.admin, "DELETE", "/v1/tokens/ci", Some(ADMIN), None).await;
        assert_eq!(s, 404);

        // Every route of the OpenAPI document exists (not 404/405), and the document lists what the API has.
        let (s, doc) = call(env.admin, "GET", "/v1/openapi.json", None, None).await;
        assert_eq!(s, 200);
        let paths = doc["paths"].as_object().unwrap();
        for (method, path, _) in pgweir::admin::v1::ROUTES {
            assert!(
                paths[*path][*method].is_object(),
                "{method} {path} in the document"
            );
            let concrete = path.replace("{name}", "nothing").replace("{id}", "nothing");
            let (s, body) = call(
                env.admin,
                &method.to_uppercase(),
                &concrete,
                Some(READER),
                None,
            )
            .await;
            assert_ne!(s, 405, "{method} {path}");
            assert_ne!(body["message"], "no such route", "{method} {path}");
        }
    });
}

#[test]
fn tenants_are_provisioned_used_and_deleted() {
    let env = control_env();
    runtime().block_on(async {
        add_tokens(&env).await;
        let (s, body) = call(env.admin, "PUT", "/v1/tenants/shop", Some(ADMIN), Some("{}")).await;
        assert_eq!((s, body["code"].as_str()), (409, Some("no_cluster")), "{body}");
        let (s, body) = register_cluster(&env, "local", env.cluster.port()).await;
        assert_eq!(s, 200, "{body}");

        // Bad input: every problem listed, nothing created.
        let (s, body) = call(
            env.admin,
            "PUT",
            "/v1/tenants/Bad--Id",
            Some(ADMIN),
            Some(r#"{"plan": 5, "database": "Not A Name", "colour": "blue"}"#),
        )
        .await;
        assert_eq!(s, 400, "{body}");
        let fields: Vec<&str> = body["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["field"].as_str().unwrap())
            .collect();
        for f in ["id", "plan", "database", "colour"] {
            assert!(fields.contains(&f), "{f} in {body}");
        }
        let (s, body) = call(env.admin, "PUT", "/v1/tenants/shop", Some(ADMIN), Some("{nope")).await;
        assert_eq!((s, body["code"].as_str()), (400, Some("invalid_json")));

        // Create: the connection string works with a real client.
        let started = Instant::now();
        let (s, created) = call(env.admin, "PUT", "/v1/tenants/shop", Some(ADMIN), Some("{}")).await;
        eprintln!("provisioning took {:?}", started.elapsed());
        assert_eq!(s, 201, "{created}");
        assert_eq!(created["state"], "ready");
        let url = created["connection_string"].as_str().unwrap().to_owned();
        assert!(url.starts_with("postgres://owner.shop:"), "{url}");
        let client = connect_url(&url).await.expect("the new tenant accepts its owner");
        let db: String = client
            .query_one("select current_database()", &[])
            .await
            .unwrap()
            .get(0);
        // Physical names are opaque: nothing in pg_database or pg_roles tells which tenant they serve.
        let (pdb, prole) = (
            created["backend"]["database"].as_str().unwrap().to_owned(),
            created["backend"]["role"].as_str().unwrap().to_owned(),
        );
        assert_eq!(db, pdb);
        assert!(pdb.starts_with("pgweir_db_") && !pdb.contains("shop"), "{pdb}");
        assert!(prole.starts_with("pgweir_role_") && !prole.contains("shop"), "{prole}");
        let user: String = client.query_one("select current_user", &[]).await.unwrap().get(0);
        assert_eq!(user, prole);
        client
            .batch_execute("create table orders(id int); insert into orders values (1)")
            .await
            .unwrap();

        // The same request again: the same tenant, no password shown again. Another request: a conflict.
        let (s, again) = call(env.admin, "PUT", "/v1/tenants/shop", Some(ADMIN), Some("{}")).await;
        assert_eq!(s, 200, "{again}");
        assert_eq!(again["created_at"], created["created_at"]);
        assert_eq!(again["connection_string"], "postgres://owner.shop@".to_owned() + url.split('@').nth(1).unwrap());
        let (s, body) = call(env.admin, "PUT", "/v1/tenants/shop", Some(ADMIN), Some(r#"{"plan":"pro"}"#)).await;
        assert_eq!((s, body["code"].as_str()), (409, Some("conflict")));

        // Users: add one (password generated, shown once), rotate the owner's (open sessions keep working, the old
        // password stops working for new ones), remove one.
        let (s, added) = call(env.admin, "PUT", "/v1/tenants/shop/users/reader", Some(ADMIN), Some("{}")).await;
        assert_eq!(s, 201, "{added}");
        let reader_url = added["connection_string"].as_str().unwrap().to_owned();
        assert!(reader_url.starts_with("postgres://reader.shop:"), "{reader_url}");
        connect_url(&reader_url).await.expect("the new user logs in");
        let (s, rotated) = call(
            env.admin,
            "PUT",
            "/v1/tenants/shop/users/owner",
            Some(ADMIN),
            Some(r#"{"password": "a-new-password-42"}"#),
        )
        .await;
        assert_eq!(s, 200, "{rotated}");
        let rotated_url = rotated["connection_string"].as_str().unwrap().to_owned();
        assert!(!rotated_url.contains("a-new-password-42"), "a password the caller chose is not echoed");
        let err = connect_url(&url).await.expect_err("the old password no longer logs in");
        assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
        let new_url = rotated_url.replace("owner.shop@", "owner.shop:a-new-password-42@");
        connect_url(&new_url).await.expect("the new password logs in");
        let n: i32 = client.query_one("select count(*)::int from orders", &[]).await.unwrap().get(0);
        assert_eq!(n, 1, "a session opened before the rotation keeps working");
        let (s, _) = call(env.admin, "DELETE", "/v1/tenants/shop/users/reader", Some(ADMIN), None).await;
        assert_eq!(s, 204);
        assert!(connect_url(&reader_url).await.is_err(), "a removed user cannot log in");
        let (s, users) = call(env.admin, "GET", "/v1/tenants/shop/users", Some(READER), None).await;
        assert_eq!(s, 200);
        assert_eq!(users["users"].as_array().unwrap().len(), 1, "{users}");
        assert_eq!(users["users"][0]["name"], "owner");
        let (s, bad) = call(env.admin, "PUT", "/v1/tenants/shop/users/Bad", Some(ADMIN), Some(r#"{"password": "short"}"#)).await;
        assert_eq!(s, 400);
        assert_eq!(bad["details"].as_array().unwrap().len(), 2, "{bad}");

        // This instance's pools of the tenant, in SHOW POOLS terms.
        let (s, pools) = call(env.admin, "GET", "/v1/tenants/shop/pools", Some(READER), None).await;
        assert_eq!(s, 200);
        let pool = &pools["pools"][0];
        assert_eq!(pool["pool"], format!("local/{pdb}@{prole}"), "{pools}");
        assert!(pool["sv_total"].as_u64().unwrap() >= 1, "{pools}");
        assert!(pool["cl_active"].as_u64().unwrap() >= 1, "the open session counts: {pools}");
        assert_eq!(pool["cl_waiting"], 0, "{pools}");

        let (s, one) = call(env.admin, "GET", "/v1/tenants/shop", Some(READER), None).await;
        assert_eq!((s, one["state"].as_str()), (200, Some("ready")));
        let (s, list) = call(env.admin, "GET", "/v1/tenants?limit=10", Some(READER), None).await;
        assert_eq!(s, 200);
        assert!(list["tenants"].as_array().unwrap().iter().any(|t| t["id"] == "shop"));

        // The backend: no superuser powers, and the database is closed to other roles.
        let su = env.cluster.connect("postgres").await.unwrap();
        let row = su
            .query_one(
                "select rolsuper, rolcreatedb, rolcreaterole, rolconnlimit from pg_roles where rolname = $1",
                &[&prole],
            )
            .await
            .unwrap();
        assert_eq!((row.get::<_, bool>(0), row.get::<_, bool>(1), row.get::<_, bool>(2)), (false, false, false));
        assert_eq!(row.get::<_, i32>(3), 20, "the free plan's connection limit");
        let public_connect: bool = su
            .query_one("select has_database_privilege('public', $1, 'CONNECT')", &[&pdb])
            .await
            .unwrap()
            .get(0);
        assert!(!public_connect);

        // A plan change: the role's connection limit follows; bad plans are refused.
        let (s, changed) = call(env.admin, "PATCH", "/v1/tenants/shop", Some(ADMIN), Some(r#"{"plan": "pro"}"#)).await;
        assert_eq!((s, changed["plan"].as_str()), (200, Some("pro")), "{changed}");
        let limit: i32 = su
            .query_one("select rolconnlimit from pg_roles where rolname = $1", &[&prole])
            .await
            .unwrap()
            .get(0);
        assert_eq!(limit, 200, "the pro plan's connection limit");
        let (s, _) = call(env.admin, "PATCH", "/v1/tenants/shop", Some(ADMIN), Some(r#"{"plan": "gold"}"#)).await;
        assert_eq!(s, 400);
        let (s, _) = call(env.admin, "PATCH", "/v1/tenants/shop", Some(ADMIN), Some("{}")).await;
        assert_eq!(s, 400);
        connect_url(&new_url).await.expect("the tenant keeps working on its new plan");

        // Usage for billing: what this test did, written to the catalog by the periodic flush, and the storage.
        let (s, usage) = call(env.admin, "GET", "/v1/tenants/shop/usage?since=2000-01-01T00:00:00Z", Some(READER), None).await;
        assert_eq!(s, 200, "{usage}");
        assert!(usage["connections"].as_u64().unwrap() >= 3, "{usage}");
        assert!(usage["queries"].as_u64().unwrap() >= 3, "{usage}");
        assert!(usage["transactions"].as_u64().unwrap() >= 3, "{usage}");
        assert!(usage["bytes_in"].as_u64().unwrap() > 100, "{usage}");
        assert!(usage["bytes_out"].as_u64().unwrap() > 100, "{usage}");
        assert!(usage["storage_bytes"].as_i64().unwrap() > 1_000_000, "{usage}");
        let (s, _) = call(env.admin, "GET", "/v1/tenants/shop/usage?since=yesterday", Some(READER), None).await;
        assert_eq!(s, 400);
        let control_db = env.cluster.connect("control").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let flushed: i64 = control_db
                .query_one("select coalesce(sum(queries), 0)::bigint from pgweir.usage where tenant = 'shop'", &[])
                .await
                .unwrap()
                .get(0);
            if flushed >= 3 {
                break;
            }
            assert!(Instant::now() < deadline, "usage is written to the catalog");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Delete: the tenant is gone from routing, the cluster and the catalog; it was audited.
        drop(client);
        let (s, _) = call(env.admin, "DELETE", "/v1/tenants/shop", Some(ADMIN), None).await;
        assert_eq!(s, 204);
        let err = connect_url(&url).await.expect_err("a deleted tenant refuses logins");
        assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
        let dbs: i64 = su
            .query_one("select count(*) from pg_database where datname = $1", &[&pdb])
            .await
            .unwrap()
            .get(0);
        assert_eq!(dbs, 0);
        let (s, _) = call(env.admin, "GET", "/v1/tenants/shop", Some(READER), None).await;
        assert_eq!(s, 404);
        let control = env.cluster.connect("control").await.unwrap();
        let audited: i64 = control
            .query_one(
                "select count(*) from pgweir.audit_log where target = 'shop' and actor = 'ops' and result = 'ok'
                   and action in ('tenant.create', 'tenant.delete')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(audited, 2, "create and delete of the tenant");
        // Its pools leave this instance, and their series leave /metrics.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, metrics) = http(env.admin, "GET", "/metrics", None, None).await;
            assert_eq!(s, 200);
            if !metrics.contains(&pdb) && env.proxy.pools.stats().iter().all(|p| p.tenant != "shop") {
                break;
            }
            assert!(Instant::now() < deadline, "pools of a deleted tenant are dropped:\n{metrics}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let user_changes: i64 = control
            .query_one(
                "select count(*) from pgweir.audit_log where target like 'shop/%' and result = 'ok'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(user_changes, 3, "user add, rotation, removal");
        let plan_changes: i64 = control
            .query_one("select count(*) from pgweir.audit_log where action = 'tenant.plan' and result = 'ok'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(plan_changes, 1);
    });
}

#[test]
fn a_failed_provisioning_is_completed_by_a_retry_and_seen_by_other_instances() {
    let env = control_env();
    runtime().block_on(async {
        add_tokens(&env).await;
        // A cluster that does not answer: the tenant is recorded as failed, with the reason.
        let closed = pgweir::pgcluster::free_port();
        let (s, _) = register_cluster(&env, "flaky", closed).await;
        assert_eq!(s, 200);
        let body = r#"{"cluster": "flaky"}"#;
        let (s, failed) = call(
            env.admin,
            "PUT",
            "/v1/tenants/later",
            Some(ADMIN),
            Some(body),
        )
        .await;
        assert_eq!(s, 502, "{failed}");
        assert_eq!(failed["state"], "failed");
        assert!(
            failed["failure"].as_str().unwrap().contains("flaky"),
            "{failed}"
        );

        // A second pgweir instance sharing the control database.
        let other = env.another_instance();
        let via_other = |url: &str| {
            url.replace(
                &format!(":{}/", env.addr.port()),
                &format!(":{}/", other.addr.port()),
            )
        };

        // The cluster comes back (here: its registration is fixed); the same request completes the tenant.
        let (s, _) = register_cluster(&env, "flaky", env.cluster.port()).await;
        assert_eq!(s, 200);
        let (s, done) = call(
            env.admin,
            "PUT",
            "/v1/tenants/later",
            Some(ADMIN),
            Some(body),
        )
        .await;
        assert_eq!(s, 200, "{done}");
        assert_eq!(done["state"], "ready");
        let url = done["connection_string"].as_str().unwrap().to_owned();
        let userinfo = url
            .strip_prefix("postgres://")
            .unwrap()
            .split('@')
            .next()
            .unwrap();
        assert!(
            userinfo.starts_with("owner.later:") && userinfo.len() > 20,
            "the password, once: {url}"
        );
        let client = connect_url(&url)
            .await
            .expect("the completed tenant accepts its owner");
        client.simple_query("select 1").await.unwrap();

        // The other instance routes it too, and follows changes made through the first one within a second.
        let other_url = via_other(&url);
        assert_ne!(other_url, url);
        let on_other = connect_url(&other_url)
            .await
            .expect("the other instance routes the new tenant");
        on_other.simple_query("select 1").await.unwrap();
        let (s, _) = call(
            env.admin,
            "PUT",
            "/v1/tenants/later/users/owner",
            Some(ADMIN),
            Some(r#"{"password": "rotated-password-77"}"#),
        )
        .await;
        assert_eq!(s, 200);
        let rotated = other_url.replace(userinfo, "owner.later:rotated-password-77");
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match connect_url(&rotated).await {
                Ok(_) => break,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "the other instance takes the rotated password within 1 s: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            connect_url(&other_url).await.is_err(),
            "the old password is refused by the other instance"
        );

        // Both instances keep serving the tenants they know while the control database is unreachable.
        let su = env.cluster.connect("postgres").await.unwrap();
        su.batch_execute(
            "ALTER DATABASE control ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'control'",
        )
        .await
        .unwrap();
        for (name, u) in [
            (
                "first",
                rotated.replace(
                    &format!(":{}/", other.addr.port()),
                    &format!(":{}/", env.addr.port()),
                ),
            ),
            ("other", rotated.clone()),
        ] {
            let c = connect_url(&u).await.unwrap_or_else(|e| {
                panic!("{name} instance serves a known tenant without its catalog: {e}")
            });
            let one: i32 = c.query_one("select 1", &[]).await.unwrap().get(0);
            assert_eq!(one, 1);
        }
        su.batch_execute("ALTER DATABASE control ALLOW_CONNECTIONS true")
            .await
            .unwrap();
        // Both follow the catalog again once it is back (readiness says so).
        for admin in [env.admin, other.admin] {
            let deadline = Instant::now() + Duration::from_secs(15);
            while call(admin, "GET", "/readyz", None, None).await.0 != 200 {
                assert!(
                    Instant::now() < deadline,
                    "ready again once the control database is back"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        // Deleted through the first instance: the other one stops routing it within a second.
        let (s, _) = call(env.admin, "DELETE", "/v1/tenants/later", Some(ADMIN), None).await;
        assert_eq!(s, 204);
        let deadline = Instant::now() + Duration::from_secs(1);
        while connect_url(&rotated).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "the other instance stops routing a deleted tenant within 1 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(other);
    });
}

/// Provisioning that stopped between steps (here: a cluster that did not answer, and objects an interrupted
/// attempt left on the cluster) is finished by the same request again, or removed completely by a delete. Clusters
/// show their health, and a draining cluster takes no new tenants.
#[test]
fn interrupted_provisioning_is_finished_or_cleaned_up_and_clusters_drain() {
    let env = control_env();
    runtime().block_on(async {
        add_tokens(&env).await;
        let closed = pgweir::pgcluster::free_port();
        register_cluster(&env, "local", closed).await;
        let (s, clusters) = call(env.admin, "GET", "/v1/clusters", Some(READER), None).await;
        assert_eq!(s, 200);
        assert_eq!(clusters["clusters"][0]["healthy"], false, "{clusters}");
        let mut names = std::collections::HashMap::new();
        for id in ["half", "gone"] {
            let (s, body) = call(env.admin, "PUT", &format!("/v1/tenants/{id}"), Some(ADMIN), Some("{}")).await;
            assert_eq!((s, body["state"].as_str()), (502, Some("failed")), "{body}");
            let backend = |k: &str| body["backend"][k].as_str().unwrap().to_owned();
            names.insert(id, (backend("database"), backend("role")));
        }
        // What an attempt interrupted after its first steps leaves behind on the cluster.
        let su = env.cluster.connect("postgres").await.unwrap();
        for sql in [
            format!("CREATE ROLE {} LOGIN PASSWORD 'stale'", names["half"].1),
            format!("CREATE ROLE {} LOGIN PASSWORD 'stale'", names["gone"].1),
            format!("CREATE DATABASE {} OWNER {}", names["gone"].0, names["gone"].1),
        ] {
            su.batch_execute(&sql).await.unwrap();
        }
        register_cluster(&env, "local", env.cluster.port()).await;
        let (_, clusters) = call(env.admin, "GET", "/v1/clusters", Some(READER), None).await;
        assert_eq!(clusters["clusters"][0]["healthy"], true, "{clusters}");
        assert_eq!(clusters["clusters"][0]["tenants"], 2, "{clusters}");

        // The same request finishes "half" (the role gets its real password, the database is created).
        let (s, half) = call(env.admin, "PUT", "/v1/tenants/half", Some(ADMIN), Some("{}")).await;
        assert_eq!((s, half["state"].as_str()), (200, Some("ready")), "{half}");
        let client = connect_url(half["connection_string"].as_str().unwrap())
            .await
            .expect("the finished tenant accepts its owner");
        let db: String = client.query_one("select current_database()", &[]).await.unwrap().get(0);
        assert_eq!(db, names["half"].0);
        // Deleting "gone" removes what the interrupted attempt left.
        let (s, _) = call(env.admin, "DELETE", "/v1/tenants/gone", Some(ADMIN), None).await;
        assert_eq!(s, 204);
        let left: Vec<String> = su
            .query(
                "select rolname::text from pg_roles where rolname like 'pgweir\\_%'
                 union all select datname::text from pg_database where datname like 'pgweir\\_%' order by 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut want = vec![names["half"].0.clone(), names["half"].1.clone()];
        want.sort();
        assert_eq!(left, want, "nothing orphaned");

        // A draining cluster takes no new tenants; undoing the drain lets them in again.
        let (s, _) = call(env.admin, "POST", "/v1/clusters/local/drain", Some(ADMIN), Some("{}")).await;
        assert_eq!(s, 200);
        let (s, body) = call(env.admin, "PUT", "/v1/tenants/next", Some(ADMIN), Some("{}")).await;
        assert_eq!((s, body["code"].as_str()), (409, Some("no_cluster")), "{body}");
        let (s, _) = call(env.admin, "POST", "/v1/clusters/local/drain", Some(ADMIN), Some(r#"{"draining": false}"#)).await;
        assert_eq!(s, 200);
        let (s, body) = call(env.admin, "PUT", "/v1/tenants/next", Some(ADMIN), Some("{}")).await;
        assert_eq!(s, 201, "{body}");

        // Two creates of one tenant at once: one creates it, the other finds it; it ends ready.
        let (a, b) = tokio::join!(
            call(env.admin, "PUT", "/v1/tenants/twin", Some(ADMIN), Some("{}")),
            call(env.admin, "PUT", "/v1/tenants/twin", Some(ADMIN), Some("{}")),
        );
        let mut statuses = [a.0, b.0];
        statuses.sort();
        assert_eq!(statuses, [200, 201], "{} / {}", a.1, b.1);
        let (s, twin) = call(env.admin, "GET", "/v1/tenants/twin", Some(READER), None).await;
        assert_eq!((s, twin["state"].as_str()), (200, Some("ready")));
    });
}
