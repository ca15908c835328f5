//! SQL policy and plan limits, through pgweir as clients see them: refusals with their SQLSTATE over the simple
//! and the extended protocol (prepared statements, multi-statement queries, inside transactions), read-only mode,
//! the `closed` policy for SQL the proxy cannot parse, the query-rate token bucket and the connection cap.

use std::time::{Duration, Instant};

use crate::harness::*;
use serde_json::json;

/// Tenants on the acme backend with plans of their own: `strict` (transaction mode, closed policy, DDL refused),
/// `ro` (read-only), `rate` (1 query per second, burst 5, 300 ms wait), `capped` (2 connections).
fn setup() -> Env {
    let alice = |_: ()| user_toml("alice", ALICE_PASSWORD, false);
    let mut extra = String::new();
    for (id, plan) in [
        ("strict", "strict"),
        ("ro", "ro"),
        ("rate", "rate"),
        ("capped", "capped"),
    ] {
        extra.push_str(&acme_tenant(
            id,
            &format!("plan = \"{plan}\"\npool_mode = \"transaction\""),
            &[alice(())],
        ));
    }
    extra.push_str(
        r#"
[plans.strict]
[plans.strict.policy]
unparsable = "closed"
deny_classes = ["ddl"]
max_work_mem_kb = 65536

[plans.ro]
[plans.ro.policy]
read_only = true

[plans.rate]
queries_per_second = 1
burst = 5
rate_wait = "300ms"

[plans.capped]
max_connections = 2
max_transactions = 1
"#,
    );
    Env::with(Setup {
        extra_config: extra,
        ..Setup::default()
    })
}

fn url(env: &Env, tenant: &str) -> String {
    env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        &format!("options=endpoint={tenant} sslmode=disable"),
    )
}

/// The server's (or pgweir's) error message of a tokio-postgres error.
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

async fn simple_err(c: &tokio_postgres::Client, sql: &str) -> (String, String) {
    let e = c
        .simple_query(sql)
        .await
        .expect_err(&format!("{sql} should be refused"));
    let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

#[test]
fn isolation_rules_hold_over_simple_and_extended_protocol() {
    let env = setup();
    let rt = runtime();
    rt.block_on(async {
        for tenant in ["acme", "strict"] {
            let c = env.connect(&url(&env, tenant)).await.unwrap();
            for (sql, rule) in [
                ("ALTER SYSTEM SET work_mem = '1GB'", "alter-system"),
                ("SET ROLE postgres", "set-role"),
                ("SELECT set_config('role', 'postgres', false)", "set-role"),
                ("COPY (SELECT 1) TO PROGRAM 'cat'", "copy-program"),
                ("COPY (SELECT 1) TO '/tmp/pgweir-x'", "copy-file"),
                ("LOAD 'auto_explain'", "load"),
                ("ALTER ROLE acme_owner SET work_mem = '1GB'", "alter-role"),
                ("ALTER ROLE acme_owner PASSWORD 'x'", "alter-role"),
                (
                    "ALTER DATABASE acme_main CONNECTION LIMIT 1",
                    "alter-database",
                ),
                (
                    "GRANT SELECT ON ALL TABLES IN SCHEMA public TO PUBLIC",
                    "grant-public",
                ),
                (
                    "GRANT CONNECT ON DATABASE acme_main TO acme_owner",
                    "grant-database",
                ),
                ("CREATE EXTENSION IF NOT EXISTS file_fdw", "extension"),
                ("SELECT pg_read_file('/etc/passwd')", "function"),
                ("SELECT 1; SELECT pg_ls_dir('.')", "function"),
                (
                    "SET standard_conforming_strings = off",
                    "standard-conforming-strings",
                ),
                ("SET shared_buffers = '1GB'", "setting"),
            ] {
                let (code, message) = simple_err(&c, sql).await;
                assert_eq!(code, "42501", "{tenant}: {sql}: {message}");
                assert!(
                    message.contains(&format!("rule \"{rule}\"")),
                    "{sql}: {message}"
                );
            }
            // Extended protocol: the Parse is refused, the statement does not exist, the connection goes on.
            let e = c.prepare("SELECT pg_read_file($1)").await.unwrap_err();
            assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}");
            let e = c.query("SELECT pg_ls_dir($1)", &[&"."]).await.unwrap_err();
            assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}");
            // Inside a transaction the refusal aborts it, as any error would.
            c.batch_execute("BEGIN").await.unwrap();
            let (code, _) = simple_err(&c, "SELECT pg_read_file('x')").await;
            assert_eq!(code, "42501");
            let (code, _) = simple_err(&c, "SELECT 1").await;
            assert_eq!(code, "25P02", "the transaction is aborted after a refusal");
            c.batch_execute("ROLLBACK").await.unwrap();
            let row = c.query_one("SELECT $1::int + 1", &[&41i32]).await.unwrap();
            assert_eq!(
                row.get::<_, i32>(0),
                42,
                "{tenant}: the session works after refusals"
            );
        }
        // The strict plan: DDL refused, work_mem bounded, SQL the proxy cannot parse refused with 42601.
        let c = env.connect(&url(&env, "strict")).await.unwrap();
        let (code, message) = simple_err(&c, "CREATE TABLE strict_t (a int)").await;
        assert_eq!(
            (code.as_str(), message.contains("statement-class")),
            ("42501", true),
            "{message}"
        );
        let (code, _) = simple_err(&c, "SET work_mem = '1GB'").await;
        assert_eq!(code, "42501");
        c.batch_execute("SET work_mem = '32MB'").await.unwrap();
        let (code, message) = simple_err(&c, "DO $$BEGIN PERFORM 1; END$$").await;
        assert_eq!(code, "42601", "{message}");
        assert!(message.contains("could not parse"), "{message}");
        // The open (default) policy forwards it.
        let open = env.connect(&url(&env, "acme")).await.unwrap();
        open.batch_execute("DO $$BEGIN PERFORM 1; END$$")
            .await
            .unwrap();
        // Counted: by rule for the process, by tenant and rule per tenant.
        let m = crate::admin::scrape(&env).await;
        let v = |series: &str| crate::admin::value(&m, series);
        assert_eq!(
            v("pgweir_policy_refusals_total{rule=\"alter-system\"}"),
            2.0
        );
        assert_eq!(
            v("pgweir_tenant_policy_refusals_total{tenant=\"strict\",rule=\"alter-system\"}"),
            1.0
        );
        assert_eq!(
            v("pgweir_tenant_policy_refusals_total{tenant=\"acme\",rule=\"function\"}"),
            5.0,
            "two simple, two extended, one in a transaction"
        );
        assert_eq!(
            v("pgweir_tenant_policy_unparsed_total{tenant=\"acme\"}"),
            1.0
        );
    });
    // psql shows the rule; startup options are checked too.
    let err = psql_err(&url(&env, "acme"), "COPY (SELECT 1) TO PROGRAM 'cat'");
    assert!(err.contains("rule \"copy-program\""), "{err}");
    let err = psql_err(
        &env.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            "options='endpoint=acme -c standard_conforming_strings=off' sslmode=disable",
        ),
        "SELECT 1",
    );
    assert!(err.contains("standard_conforming_strings"), "{err}");
}

#[test]
fn read_only_plans_refuse_writes_and_serve_reads() {
    let env = setup();
    let rt = runtime();
    rt.block_on(async {
        let owner = env.connect(&url(&env, "acme")).await.unwrap();
        owner
            .batch_execute("CREATE TABLE IF NOT EXISTS ro_t (a int); INSERT INTO ro_t VALUES (1)")
            .await
            .unwrap();
        let c = env.connect(&url(&env, "ro")).await.unwrap();
        let rows = c.query("SELECT count(*) FROM ro_t", &[]).await.unwrap();
        assert_eq!(rows[0].get::<_, i64>(0), 1);
        for sql in [
            "INSERT INTO ro_t VALUES (2)",
            "UPDATE ro_t SET a = 3",
            "CREATE TABLE ro_x (a int)",
            "WITH d AS (DELETE FROM ro_t RETURNING *) SELECT * FROM d",
        ] {
            let (code, message) = simple_err(&c, sql).await;
            assert_eq!(code, "25006", "{sql}: {message}");
        }
        let e = c
            .execute("INSERT INTO ro_t VALUES ($1)", &[&5i32])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("25006"), "{e}");
        let rows = owner.query("SELECT count(*) FROM ro_t", &[]).await.unwrap();
        assert_eq!(rows[0].get::<_, i64>(0), 1, "nothing was written");
    });
}

#[test]
fn the_query_rate_bucket_lets_the_burst_pass_then_waits_and_fails() {
    let env = setup();
    let rt = runtime();
    rt.block_on(async {
        let c = env.connect(&url(&env, "rate")).await.unwrap();
        for i in 0..5 {
            c.simple_query("SELECT 1")
                .await
                .unwrap_or_else(|e| panic!("query {i} of the burst: {e}"));
        }
        // The sixth needs a token 1 s away: more than the 300 ms it may wait.
        let started = Instant::now();
        let (code, message) = simple_err(&c, "SELECT 1").await;
        assert_eq!(code, "53400", "{message}");
        assert!(message.contains("1 queries per second"), "{message}");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "it waited first"
        );
        // The extended protocol counts too.
        let e = c.query("SELECT $1::int", &[&1i32]).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("53400"), "{e}");
        // Later, tokens are back and the session works.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let row = c.query_one("SELECT $1::int", &[&7i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 7);
    });
}

#[test]
fn the_plan_caps_client_connections() {
    let env = setup();
    let rt = runtime();
    rt.block_on(async {
        let a = env.connect(&url(&env, "capped")).await.unwrap();
        let b = env.connect(&url(&env, "capped")).await.unwrap();
        let e = env.connect(&url(&env, "capped")).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
        // One transaction at a time (max_transactions = 1): the second waits for the first to end.
        a.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let second =
            tokio::time::timeout(Duration::from_millis(500), b.simple_query("SELECT 2")).await;
        assert!(
            second.is_err(),
            "the second transaction waits while the first is open"
        );
        a.batch_execute("COMMIT").await.unwrap();
        b.simple_query("SELECT 3").await.expect("then it runs");
        // Other tenants are not affected; a slot comes back when a client leaves.
        env.connect(&url(&env, "acme")).await.unwrap();
        drop(a);
        assert!(
            wait_until_async(Duration::from_secs(5), || async {
                env.connect(&url(&env, "capped")).await.is_ok()
            })
            .await
        );
    });
}

async fn wait_until_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A plan changed by a reload reaches sessions that are already connected (within the 1 s refresh).
#[test]
fn plan_changes_reach_running_sessions() {
    let env = setup();
    let path = env.dir.path().join("pgweir.toml");
    std::fs::write(&path, env.config_text()).unwrap();
    env.proxy.set_config_path(path.clone());
    let rt = runtime();
    rt.block_on(async {
        let owner = env.connect(&url(&env, "acme")).await.unwrap();
        owner
            .batch_execute("CREATE TABLE IF NOT EXISTS live_t (a int)")
            .await
            .unwrap();
        let c = env.connect(&url(&env, "strict")).await.unwrap();
        c.execute("INSERT INTO live_t VALUES ($1)", &[&1i32])
            .await
            .unwrap();
        let text = env.config_text().replace(
            "[plans.strict.policy]\n",
            "[plans.strict.policy]\nread_only = true\n",
        );
        assert_ne!(text, env.config_text());
        std::fs::write(&path, text).unwrap();
        env.proxy.reload().expect("reload");
        let refused = wait_until_async(Duration::from_secs(5), || async {
            matches!(
                c.execute("INSERT INTO live_t VALUES ($1)", &[&2i32]).await,
                Err(e) if sqlstate(&e).as_deref() == Some("25006")
            )
        })
        .await;
        assert!(refused, "the running session follows the new plan");
        let rows = c.query("SELECT count(*) FROM live_t", &[]).await.unwrap();
        assert!(rows[0].get::<_, i64>(0) >= 1, "reads keep working");
    });
}

/// standard_conforming_strings turned off in a way no lexer can see (a computed set_config name) ends the session
/// when the server reports it: the policy's lexers assume it is on.
#[test]
fn conforming_strings_turned_off_behind_the_lexer_ends_the_session() {
    let env = setup();
    let rt = runtime();
    rt.block_on(async {
        let c = env.connect(&url(&env, "acme")).await.unwrap();
        let e = c
            .simple_query("SELECT set_config('standard' || '_conforming_strings', 'off', false)")
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            sqlstate(&e).as_deref() == Some("42501") || c.is_closed(),
            "{text}"
        );
        assert!(
            c.simple_query("SELECT 1").await.is_err(),
            "the session is over"
        );
        // Others are served as before.
        let d = env.connect(&url(&env, "acme")).await.unwrap();
        let rows = d
            .simple_query("SHOW standard_conforming_strings")
            .await
            .unwrap();
        let on = rows.iter().any(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0) == Some("on"),
            _ => false,
        });
        assert!(
            on,
            "the server connection with the setting off was not reused"
        );
    });
}

/// Plans in the catalog are data: listed and edited through the API, and a changed spec reaches the running
/// sessions of the plan's tenants (the plan trigger makes every instance reload).
#[test]
fn catalog_plans_are_edited_through_the_api_and_followed_by_running_sessions() {
    use crate::control::{add_tokens, call, connect_url, register_cluster, ADMIN, READER};
    let env = crate::control::control_env();
    runtime().block_on(async {
        add_tokens(&env).await;
        let (s, body) = register_cluster(&env, "local", env.cluster.port()).await;
        assert_eq!(s, 200, "{body}");
        let (s, plans) = call(env.admin, "GET", "/v1/plans", Some(READER), None).await;
        assert_eq!(s, 200, "{plans}");
        let names: Vec<&str> = plans["plans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["enterprise", "free", "pro", "team"]);
        let (_, free) = call(env.admin, "GET", "/v1/plans/free", Some(READER), None).await;
        assert_eq!(free["spec"]["queries_per_second"], 100, "{free}");

        // A plan of our own, for a tenant.
        let (s, body) = call(
            env.admin,
            "PUT",
            "/v1/plans/lab",
            Some(ADMIN),
            Some(r#"{"max_connections": 50, "pool_size": 5, "spec": {"policy": {"deny_classes": ["ddl"]}}}"#),
        )
        .await;
        assert_eq!(s, 201, "{body}");
        let (s, body) = call(
            env.admin,
            "PUT",
            "/v1/plans/lab",
            Some(ADMIN),
            Some(r#"{"spec": {"policy": {"read_onl": true}}, "colour": 1}"#),
        )
        .await;
        assert_eq!(s, 400, "a misspelt policy field is refused: {body}");
        let (s, body) = call(env.admin, "PUT", "/v1/plans/lab", Some(READER), Some("{}")).await;
        assert_eq!(s, 403, "{body}");

        let (s, created) = call(
            env.admin,
            "PUT",
            "/v1/tenants/lab1",
            Some(ADMIN),
            Some(r#"{"plan": "lab"}"#),
        )
        .await;
        assert_eq!(s, 201, "{created}");
        let c = connect_url(created["connection_string"].as_str().unwrap())
            .await
            .unwrap();
        let e = c.batch_execute("CREATE TABLE t (a int)").await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}");
        let rows = c.query("SELECT 1 + $1::int", &[&1i32]).await.unwrap();
        assert_eq!(rows[0].get::<_, i32>(0), 2);
        // Session mode (asked for by this client): a named statement prepared once, executed in later requests.
        let session = env
            .connect(&format!(
                "{}?sslmode=disable&options=pool_mode%3Dsession",
                created["connection_string"].as_str().unwrap()
            ))
            .await
            .unwrap();
        let twice = session.prepare("SELECT 2 * $1::int").await.unwrap();
        for i in 0..3 {
            let row = session.query_one(&twice, &[&i]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), 2 * i);
        }

        // Read-only from now on: the open session follows.
        let (s, body) = call(
            env.admin,
            "PUT",
            "/v1/plans/lab",
            Some(ADMIN),
            Some(r#"{"spec": {"policy": {"read_only": true}}}"#),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let refused = wait_until_async(Duration::from_secs(10), || async {
            matches!(
                c.batch_execute("CREATE TEMP TABLE x (a int) ON COMMIT DROP").await,
                Err(e) if sqlstate(&e).as_deref() == Some("25006")
            )
        })
        .await;
        assert!(refused, "the open session follows the plan's new spec");
        c.query("SELECT 1", &[]).await.expect("reads keep working");

        // The operator's switch, on a plan that allows writes.
        let (s, body) = call(env.admin, "PUT", "/v1/plans/lab", Some(ADMIN), Some(r#"{"spec": {}}"#)).await;
        assert_eq!(s, 200, "{body}");
        let writable = wait_until_async(Duration::from_secs(10), || async {
            c.batch_execute("CREATE TEMP TABLE x (a int) ON COMMIT DROP").await.is_ok()
        })
        .await;
        assert!(writable, "writes work again");
        let (s, body) = call(
            env.admin,
            "POST",
            "/v1/tenants/lab1/read-only",
            Some(ADMIN),
            Some(r#"{"read_only": true}"#),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let refused = wait_until_async(Duration::from_secs(10), || async {
            matches!(
                c.batch_execute("CREATE TEMP TABLE x (a int) ON COMMIT DROP").await,
                Err(e) if sqlstate(&e).as_deref() == Some("25006") && message(&e).contains("operator")
            )
        })
        .await;
        assert!(refused, "the operator's read-only switch reaches the open session");
        let (s, view) = call(env.admin, "GET", "/v1/tenants/lab1/policy", Some(READER), None).await;
        assert_eq!(s, 200, "{view}");
        assert!(view["read_only"].as_str().unwrap_or("").contains("operator"), "{view}");
        assert!(view["refusals"]["read-only"].as_u64().unwrap_or(0) >= 1, "{view}");
        assert!(view["refusals"]["statement-class"].as_u64().unwrap_or(0) >= 1, "{view}");
        let recent = view["recent_refusals"].to_string();
        assert!(recent.contains("create temp table x"), "fingerprints are shown: {view}");
        // Top statements: the prepared statement executed above, counted once per execution, with its rows.
        let top = view["top_statements"].as_array().expect("top statements");
        let sum = top
            .iter()
            .find(|t| t["statement"].as_str().unwrap_or("").starts_with("select ? + ?"))
            .unwrap_or_else(|| panic!("the prepared statement is listed: {view}"));
        assert_eq!(sum["calls"], 1, "{sum}");
        assert_eq!(sum["rows"], 1, "{sum}");
        let named = top
            .iter()
            .find(|t| t["statement"].as_str().unwrap_or("").starts_with("select ? * ?"))
            .unwrap_or_else(|| panic!("the session-mode named statement is listed: {view}"));
        assert_eq!((named["calls"].as_u64(), named["rows"].as_u64()), (Some(3), Some(3)), "{named}");
        let selects = top
            .iter()
            .find(|t| t["statement"] == "select ?")
            .unwrap_or_else(|| panic!("SELECT 1 is listed: {view}"));
        assert!(selects["calls"].as_u64().unwrap() >= 1, "{selects}");
        let (s, _) = call(
            env.admin,
            "POST",
            "/v1/tenants/lab1/read-only",
            Some(ADMIN),
            Some(r#"{"read_only": false}"#),
        )
        .await;
        assert_eq!(s, 200);
        let writable = wait_until_async(Duration::from_secs(10), || async {
            c.batch_execute("CREATE TEMP TABLE x (a int) ON COMMIT DROP").await.is_ok()
        })
        .await;
        assert!(writable, "writes work again after the switch is off");
    });
}

/// The monthly query quota is counted in the catalog: a restarted (or another) instance knows what was used.
#[test]
fn the_monthly_quota_survives_a_restart() {
    use crate::control::{add_tokens, call, connect_url, register_cluster, ADMIN};
    let env = crate::control::control_env();
    runtime().block_on(async {
        add_tokens(&env).await;
        register_cluster(&env, "local", env.cluster.port()).await;
        let (s, body) = call(
            env.admin,
            "PUT",
            "/v1/plans/metered",
            Some(ADMIN),
            Some(r#"{"spec": {"monthly_queries": 30}}"#),
        )
        .await;
        assert_eq!(s, 201, "{body}");
        let (s, created) = call(
            env.admin,
            "PUT",
            "/v1/tenants/meter",
            Some(ADMIN),
            Some(r#"{"plan": "metered"}"#),
        )
        .await;
        assert_eq!(s, 201, "{created}");
        let url = created["connection_string"].as_str().unwrap().to_owned();
        let c = connect_url(&url).await.unwrap();
        let mut ok = 0;
        let mut refused = 0;
        for _ in 0..40 {
            match c.simple_query("SELECT 1").await {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert_eq!(sqlstate(&e).as_deref(), Some("53400"), "{e}");
                    assert!(message(&e).contains("monthly"), "{e}");
                    refused += 1;
                }
            }
        }
        assert_eq!((ok, refused), (30, 10));
        // The usage flush (every second in tests) writes the counts; a new instance reads them.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let other = env.another_instance();
        let other_url = url.replace(
            &format!(":{}/", env.addr.port()),
            &format!(":{}/", other.addr.port()),
        );
        assert_ne!(other_url, url);
        let d = connect_url(&other_url).await.unwrap();
        let e = d.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("53400"),
            "the other instance knows the month's count: {e}"
        );
        // A larger quota lets the tenant go on.
        let (s, _) = call(
            env.admin,
            "PUT",
            "/v1/plans/metered",
            Some(ADMIN),
            Some(r#"{"spec": {"monthly_queries": 1000}}"#),
        )
        .await;
        assert_eq!(s, 200);
        let back = wait_until_async(Duration::from_secs(10), || async {
            d.simple_query("SELECT 1").await.is_ok()
        })
        .await;
        assert!(back, "a larger quota applies without a restart");
    });
}

/// Over its storage quota a tenant is read-only (reads keep working); back under it, writable again. The cluster
/// is reached over TLS (verify-full): the sampler connects the way the data path does.
#[test]
fn a_tenant_over_its_storage_quota_is_read_only() {
    let alice = user_toml("alice", ALICE_PASSWORD, false);
    let env = Env::with(Setup {
        backend_tls: Some("verify-full"),
        proxy: "storage_check_interval = \"200ms\"".into(),
        extra_config: acme_tenant(
            "small",
            "plan = \"small\"\npool_mode = \"transaction\"",
            &[alice],
        ) + "\n[plans.small]\nstorage_bytes = 1000\n",
        ..Setup::default()
    });
    let path = env.dir.path().join("pgweir.toml");
    std::fs::write(&path, env.config_text()).unwrap();
    env.proxy.set_config_path(path.clone());
    runtime().block_on(async {
        let c = env.connect(&url(&env, "small")).await.unwrap();
        let refused = wait_until_async(Duration::from_secs(10), || async {
            matches!(
                c.batch_execute("CREATE TEMP TABLE q (a int) ON COMMIT DROP").await,
                Err(e) if sqlstate(&e).as_deref() == Some("25006") && message(&e).contains("storage")
            )
        })
        .await;
        assert!(refused, "a database of several MB is over a 1000-byte quota");
        c.query("SELECT 1", &[]).await.expect("reads keep working");
        let text = env
            .config_text()
            .replace("storage_bytes = 1000", "storage_bytes = 100000000000");
        std::fs::write(&path, text).unwrap();
        env.proxy.reload().expect("reload");
        let writable = wait_until_async(Duration::from_secs(10), || async {
            c.batch_execute("CREATE TEMP TABLE q (a int) ON COMMIT DROP").await.is_ok()
        })
        .await;
        assert!(writable, "under the new quota the tenant is writable again");
    });
}

/// Fairness under overload: a cluster that runs at most 4 transactions at once, one tenant flooding it with 200
/// pgbench clients, another running 4 clients. Weighted fair queueing of checkouts keeps the small tenant's p99
/// checkout wait low while the big one queues.
#[test]
fn a_flooding_tenant_does_not_starve_a_small_one() {
    let alice = user_toml("alice", ALICE_PASSWORD, false);
    let tenant = |id: &str, db: &str, pool: usize| {
        format!(
            r#"
[[tenants]]
id = "{id}"
database = "app"
cluster = "shared"
backend_database = "{db}"
backend_user = "acme_owner"
backend_password = "{OWNER_PASSWORD}"
pool_mode = "transaction"
pool = {{ max_size = {pool}, checkout_timeout = "60s" }}
{alice}"#
        )
    };
    let env = Env::with(Setup {
        extra_config: format!(
            "{}{}\n[clusters.shared]\nhost = \"127.0.0.1\"\nport = $PORT\nmax_active_transactions = 4\n",
            tenant("big", "acme_main", 100),
            tenant("small", "beta_main", 4)
        ),
        ..Setup::default()
    });
    let big = url(&env, "big");
    pgbench_init(&big, 1);
    let run = pgbench_spawn(&["-n", "-S", "-c", "200", "-j", "2", "-T", "8"], &big);
    std::thread::sleep(Duration::from_secs(2));
    let rt = runtime();
    let small_queries = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let c = env.connect(&url(&env, "small")).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(4);
                let mut n = 0u64;
                while Instant::now() < until {
                    c.query_one("SELECT 1", &[]).await.unwrap();
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    });
    let stats = env.proxy.pools.stats();
    let pool = |tenant: &str| {
        stats
            .iter()
            .find(|p| p.tenant == tenant)
            .cloned()
            .unwrap_or_else(|| panic!("a pool of {tenant}"))
    };
    let (b, s) = (pool("big"), pool("small"));
    let processed = pgbench_no_failures(run);
    eprintln!(
        "fairness: big {processed} transactions, {} checkouts, wait p50 {} µs p99 {} µs; \
         small {small_queries} queries, {} checkouts, wait p50 {} µs p99 {} µs",
        b.checkouts, b.wait_p50_us, b.wait_p99_us, s.checkouts, s.wait_p50_us, s.wait_p99_us
    );
    assert!(small_queries > 100, "the small tenant made progress");
    // The cluster really was saturated: the big tenant queued.
    assert!(b.wait_p99_us >= 4096, "big tenant waited: {b:?}");
    // Bound chosen for a loaded 2-core machine: the bucket up to 32.8 ms.
    assert!(
        s.wait_p99_us <= 32_768,
        "small tenant's p99 checkout wait: {s:?}"
    );
    assert!(
        s.wait_p99_us * 4 <= b.wait_p99_us,
        "small {s:?} vs big {b:?}"
    );
}

/// The first wall, with the proxy out of the way: connected straight to Postgres as a tenant's own backend role,
/// the dangerous things the policy refuses also fail on the server (privileges), and another tenant's database
/// is closed to it.
#[test]
fn the_tenant_role_itself_cannot_do_what_the_policy_refuses() {
    use crate::control::{add_tokens, call, register_cluster, ADMIN};
    let env = crate::control::control_env();
    runtime().block_on(async {
        add_tokens(&env).await;
        register_cluster(&env, "local", env.cluster.port()).await;
        let mut urls = Vec::new();
        for id in ["one", "two"] {
            let (s, body) = call(env.admin, "PUT", &format!("/v1/tenants/{id}"), Some(ADMIN), Some("{}")).await;
            assert_eq!(s, 201, "{body}");
            urls.push(body["connection_string"].as_str().unwrap().to_owned());
        }
        let tenant = |id: &str| {
            let t = env.proxy.directory.get(id).expect("the tenant is known");
            (
                t.backend_user.clone().unwrap(),
                t.backend_password.clone().unwrap(),
                t.backend_database.clone().unwrap(),
            )
        };
        let (user, password, db) = tenant("one");
        let (_, _, other_db) = tenant("two");
        let direct = |db: &str| {
            format!(
                "host=127.0.0.1 port={} user={user} password={password} dbname={db} sslmode=disable",
                env.cluster.port()
            )
        };
        let c = env.connect(&direct(&db)).await.expect("the tenant role logs in to its database");
        for sql in [
            "ALTER SYSTEM SET work_mem = '1GB'",
            "COPY (SELECT 1) TO PROGRAM 'true'",
            "COPY (SELECT 1) TO '/tmp/pgweir-direct'",
            "SELECT pg_read_file('/etc/passwd')",
            "SELECT pg_ls_dir('.')",
            "LOAD 'auto_explain'",
            "SET ROLE postgres",
            "SET SESSION AUTHORIZATION postgres",
            "ALTER ROLE postgres PASSWORD 'x'",
            "CREATE ROLE intruder",
            "CREATE DATABASE another",
            "SELECT lo_import('/etc/passwd')",
        ] {
            let e = c.batch_execute(sql).await.expect_err(sql);
            assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}: {}", message(&e));
        }
        // A superuser's backend (pgweir's own catalog connections) cannot be signalled. (Other roles' backend
        // types are hidden; only client backends have a user.)
        let e = c
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE usesysid = 10",
            )
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{}", message(&e));
        // No prepared transactions (they would outlive the session and hold locks on a pooled server).
        let e = c.batch_execute("BEGIN; PREPARE TRANSACTION 'held'").await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{}", message(&e));
        c.batch_execute("ROLLBACK").await.unwrap();
        // Another tenant's database is closed to it.
        let e = env.connect(&direct(&other_db)).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}");
        // What every role can list names no tenant: physical names are opaque.
        let names: Vec<String> = c
            .query(
                "select datname::text from pg_database union all select rolname::text from pg_roles",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(names.contains(&other_db), "{names:?}");
        assert!(names.iter().all(|n| !n.contains("one") && !n.contains("two")), "{names:?}");

        // A catalog cluster's cap on active transactions, set through the API, reaches the data plane.
        let cap = |n: u32| {
            json!({
                "host": "127.0.0.1", "port": env.cluster.port(), "admin_user": "postgres",
                "max_active_transactions": n,
            })
            .to_string()
        };
        let (s, body) = call(env.admin, "PUT", "/v1/clusters/local", Some(ADMIN), Some(&cap(1))).await;
        assert_eq!(s, 200, "{body}");
        let (_, list) = call(env.admin, "GET", "/v1/clusters", Some(ADMIN), None).await;
        assert_eq!(list["clusters"][0]["max_active_transactions"], 1, "{list}");
        let capped = |n: usize| env.proxy.directory.get("two").is_some_and(|t| t.cluster.max_active_transactions == n);
        assert!(wait_until_async(Duration::from_secs(10), || async { capped(1) }).await);
        let (a, b) = (
            crate::control::connect_url(&urls[0]).await.unwrap(),
            crate::control::connect_url(&urls[1]).await.unwrap(),
        );
        a.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(500), b.simple_query("SELECT 2")).await;
        assert!(waited.is_err(), "another tenant's transaction waits while the cluster's one slot is taken");
        a.batch_execute("COMMIT").await.unwrap();
        b.simple_query("SELECT 3").await.expect("then it runs");
        let (s, body) = call(env.admin, "PUT", "/v1/clusters/local", Some(ADMIN), Some(&cap(0))).await;
        assert_eq!(s, 200, "{body}");
        assert!(wait_until_async(Duration::from_secs(10), || async { capped(0) }).await);
        a.batch_execute("BEGIN; SELECT 1").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), b.batch_execute("BEGIN; SELECT 2; COMMIT"))
            .await
            .expect("no cap: both run at once")
            .unwrap();
        a.batch_execute("COMMIT").await.unwrap();
    });
}
