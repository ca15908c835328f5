//! Branches through the admin API while a TPC-B load runs against the tenant: creates, resets and deletes pause
//! the parent instead of failing anything; every branch is a consistent copy; interrupted operations are finished;
//! expired branches go.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::control::{call, connect_url, ADMIN, READER};
use crate::harness::*;
use crate::traffic::new_tenant;

/// Polls an operation until it has ended; its JSON.
async fn wait_op(env: &Env, op: &Value) -> Value {
    let href = op["href"].as_str().expect("an operation href").to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (s, v) = call(env.admin, "GET", &href, Some(READER), None).await;
        assert_eq!(s, 200, "{v}");
        if v["status"] != "running" {
            return v;
        }
        assert!(Instant::now() < deadline, "operation still running: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// TPC-B keeps the sums of account, teller and branch balances equal to the sum of history deltas: a copy cut
/// between transactions has them equal; a torn copy would not. Returns (history rows, sum).
async fn tpcb_consistent(url: &str) -> (i64, i64) {
    let c = connect_url(url)
        .await
        .expect("the branch accepts the tenant's user");
    let row = c
        .query_one(
            "select (select count(*) from pgbench_history),
                    (select coalesce(sum(delta), 0) from pgbench_history)::bigint,
                    (select sum(abalance) from pgbench_accounts)::bigint,
                    (select sum(tbalance) from pgbench_tellers)::bigint,
                    (select sum(bbalance) from pgbench_branches)::bigint",
            &[],
        )
        .await
        .unwrap();
    let (n, h, a, t, b): (i64, i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!((a, t, b), (h, h, h), "a consistent cut: {url}");
    (n, h)
}

/// Row counts, sums and a hash of the whole history: equal only for identical pgbench data.
async fn fingerprint(c: &tokio_postgres::Client) -> (i64, i64, i64, String) {
    let r = c
        .query_one(
            "select (select count(*) from pgbench_history),
                    (select coalesce(sum(delta), 0) from pgbench_history)::bigint,
                    (select sum(abalance) from pgbench_accounts)::bigint,
                    (select coalesce(md5(string_agg(concat_ws(':', tid, bid, aid, delta, mtime), ','
                                         order by mtime, tid, aid, delta)), '')
                       from pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

fn with_endpoint(url: &str, endpoint: &str) -> String {
    // postgres://owner.shop:pw@host:port/db → postgres://owner.<endpoint>:pw@host:port/db
    let (scheme, after) = url.split_once("://").unwrap();
    let (userinfo, host) = after.split_once('@').unwrap();
    let (_, password) = userinfo.split_once(':').unwrap();
    format!("{scheme}://owner.{endpoint}:{password}@{host}")
}

#[test]
fn branches_are_cut_reset_and_deleted_under_load_without_failures() {
    let env = Env::with(Setup {
        catalog: true,
        pool: "max_size = 5\ncheckout_timeout = \"30s\"\nconnect_timeout = \"3s\"".into(),
        ..Setup::default()
    });
    let rt = runtime();
    let url = rt.block_on(new_tenant(&env, "shop"));
    let libpq = format!("{url}?sslmode=disable");
    pgbench_init(&libpq, 1);
    let run = pgbench_spawn(&["-n", "-c", "8", "-j", "2", "-T", "20"], &libpq);
    rt.block_on(async {
        // The free plan is one database: no branch. This test's free plan allows 3.
        let (s, v) = call(
            env.admin,
            "POST",
            "/v1/tenants/shop/branches",
            Some(ADMIN),
            Some(r#"{"name": "b0"}"#),
        )
        .await;
        assert_eq!(s, 409, "{v}");
        assert!(
            v["message"].as_str().unwrap().contains("allows 1 database"),
            "{v}"
        );
        let (s, v) = call(
            env.admin,
            "PUT",
            "/v1/plans/free",
            Some(ADMIN),
            Some(r#"{"max_branches": 3}"#),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Create two branches under load.
        let mut cuts = Vec::new();
        for name in ["b0", "b1"] {
            let (s, v) = call(
                env.admin,
                "POST",
                "/v1/tenants/shop/branches",
                Some(ADMIN),
                Some(&json!({"name": name}).to_string()),
            )
            .await;
            assert_eq!(s, 202, "{v}");
            assert_eq!(v["branch"]["state"], "creating", "{v}");
            assert_eq!(v["branch"]["endpoint"], format!("shop--{name}"));
            if name == "b0" {
                // One operation per tenant at a time.
                let (s2, v2) = call(
                    env.admin,
                    "POST",
                    "/v1/tenants/shop/branches",
                    Some(ADMIN),
                    Some(r#"{"name": "other"}"#),
                )
                .await;
                let (_, first) = call(
                    env.admin,
                    "GET",
                    v["operation"]["href"].as_str().unwrap(),
                    Some(READER),
                    None,
                )
                .await;
                if first["status"] == "running" {
                    assert_eq!(
                        (s2, v2["code"].as_str()),
                        (409, Some("operation_running")),
                        "{v2}"
                    );
                }
                // The same request again is the same operation (or, once done, the branch).
                let (s3, v3) = call(
                    env.admin,
                    "POST",
                    "/v1/tenants/shop/branches",
                    Some(ADMIN),
                    Some(r#"{"name": "b0"}"#),
                )
                .await;
                assert!(
                    s3 == 202 && v3["operation"]["id"] == v["operation"]["id"] || s3 == 200,
                    "{s3} {v3}"
                );
                let (s4, v4) = call(
                    env.admin,
                    "POST",
                    "/v1/tenants/shop/branches",
                    Some(ADMIN),
                    Some(r#"{"name": "b0", "parent": "b1"}"#),
                )
                .await;
                assert_eq!(s4, 409, "another parent is a conflict: {v4}");
            }
            let done = wait_op(&env, &v["operation"]).await;
            assert_eq!(done["status"], "succeeded", "{done}");
            let r = &done["result"];
            assert!(
                r["pause_ms"].as_u64().is_some() && r["copy_ms"].as_u64().is_some(),
                "{done}"
            );
            cuts.push(tpcb_consistent(&with_endpoint(&url, &format!("shop--{name}"))).await);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            cuts[0].0 > 0 && cuts[1].0 > cuts[0].0,
            "later cuts hold more history: {cuts:?}"
        );

        // A branch of a branch; its parent cannot be deleted while it exists.
        let (s, v) = call(
            env.admin,
            "POST",
            "/v1/tenants/shop/branches",
            Some(ADMIN),
            Some(r#"{"name": "b1-child", "parent": "b1"}"#),
        )
        .await;
        assert_eq!(s, 202, "{v}");
        assert_eq!(wait_op(&env, &v["operation"]).await["status"], "succeeded");
        let child = tpcb_consistent(&with_endpoint(&url, "shop--b1-child")).await;
        assert_eq!(
            child, cuts[1],
            "a branch of a quiet branch is an exact copy"
        );
        let (s, v) = call(
            env.admin,
            "DELETE",
            "/v1/tenants/shop/branches/b1",
            Some(ADMIN),
            None,
        )
        .await;
        assert_eq!(s, 409, "{v}");
        let (s, _) = call(
            env.admin,
            "DELETE",
            "/v1/tenants/shop/branches/main",
            Some(ADMIN),
            None,
        )
        .await;
        assert_eq!(s, 409);

        // Reset b0 under load: a newer consistent copy.
        let (s, v) = call(
            env.admin,
            "POST",
            "/v1/tenants/shop/branches/b0/reset",
            Some(ADMIN),
            Some("{}"),
        )
        .await;
        assert_eq!(s, 202, "{v}");
        let done = wait_op(&env, &v["operation"]).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let again = tpcb_consistent(&with_endpoint(&url, "shop--b0")).await;
        assert!(
            again.0 > cuts[1].0,
            "the reset copy is newer: {again:?} vs {cuts:?}"
        );

        // A cut inside an operator's pause: the branch is exactly the parent as it was then (checked on the
        // parent directly while nothing can write to it).
        let (s, v) = call(
            env.admin,
            "POST",
            "/v1/tenants/shop/pause",
            Some(ADMIN),
            Some("{}"),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let at_cut = {
            let (_, t) = call(env.admin, "GET", "/v1/tenants/shop", Some(READER), None).await;
            let direct = env
                .cluster
                .connect(t["backend"]["database"].as_str().unwrap())
                .await
                .unwrap();
            fingerprint(&direct).await
        };
        let (s, v) = call(
            env.admin,
            "POST",
            "/v1/tenants/shop/branches",
            Some(ADMIN),
            Some(r#"{"name": "exact"}"#),
        )
        .await;
        assert_eq!(s, 409, "the free plan allows 3 branches: {v}");
        assert!(v["message"].as_str().unwrap().contains("allows 3"), "{v}");
        let (s, v) = call(
            env.admin,
            "PATCH",
            "/v1/tenants/shop",
            Some(ADMIN),
            Some(r#"{"plan": "pro"}"#),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = call(
            env.admin,
            "POST",
            "/v1/tenants/shop/branches",
            Some(ADMIN),
            Some(r#"{"name": "exact"}"#),
        )
        .await;
        assert_eq!(s, 202, "{v}");
        let (s, early) = call(
            env.admin,
            "POST",
            "/v1/tenants/shop/resume",
            Some(ADMIN),
            Some("{}"),
        )
        .await;
        let resumed_early = s == 200;
        if !resumed_early {
            assert_eq!(
                (s, early["code"].as_str()),
                (409, Some("operation_running")),
                "{early}"
            );
        }
        let done = wait_op(&env, &v["operation"]).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        if !resumed_early {
            let (s, v) = call(
                env.admin,
                "POST",
                "/v1/tenants/shop/resume",
                Some(ADMIN),
                Some("{}"),
            )
            .await;
            assert_eq!(s, 200, "the operator resumes: {v}");
            let copy = connect_url(&with_endpoint(&url, "shop--exact"))
                .await
                .unwrap();
            assert_eq!(
                fingerprint(&copy).await,
                at_cut,
                "the branch is the parent at the cut"
            );
        }

        // The list: names, parents, sizes.
        let (s, list) = call(
            env.admin,
            "GET",
            "/v1/tenants/shop/branches",
            Some(READER),
            None,
        )
        .await;
        assert_eq!(s, 200);
        let items = list["branches"].as_array().unwrap();
        let names: Vec<&str> = items.iter().map(|b| b["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["b0", "b1", "b1-child", "exact"], "{list}");
        assert_eq!(items[2]["parent"], "b1");
        assert!(
            items
                .iter()
                .all(|b| b["size_bytes"].as_i64().unwrap() > 1_000_000),
            "{list}"
        );

        // Delete the child, then its parent, under load.
        for name in ["b1-child", "b1"] {
            let (s, v) = call(
                env.admin,
                "DELETE",
                &format!("/v1/tenants/shop/branches/{name}"),
                Some(ADMIN),
                None,
            )
            .await;
            assert_eq!(s, 202, "{v}");
            assert_eq!(wait_op(&env, &v["operation"]).await["status"], "succeeded");
        }
        assert!(
            connect_url(&with_endpoint(&url, "shop--b1")).await.is_err(),
            "a deleted branch is not routed"
        );
    });
    pgbench_no_failures(run);

    rt.block_on(async {
        // Bad requests: every problem listed.
        let (s, v) = call(env.admin, "POST", "/v1/tenants/shop/branches", Some(ADMIN), Some(r#"{"name": "Bad_Name", "expires_at": "soon", "x": 1}"#)).await;
        assert_eq!(s, 400, "{v}");
        assert_eq!(v["details"].as_array().unwrap().len(), 3, "{v}");
        let (s, _) = call(env.admin, "POST", "/v1/tenants/shop/branches", Some(READER), Some(r#"{"name": "r"}"#)).await;
        assert_eq!(s, 403);

        // An operation whose instance died (its heartbeat stopped) is finished by housekeeping: nothing is left.
        let su = env.cluster.connect("postgres").await.unwrap();
        su.batch_execute("CREATE DATABASE pgweir_db_0000000000000001").await.unwrap();
        let control = env.cluster.connect("control").await.unwrap();
        control
            .batch_execute(
                "INSERT INTO pgweir.branches (tenant, name, backend_database, state) VALUES ('shop', 'ghost', 'pgweir_db_0000000000000001', 'creating');
                 INSERT INTO pgweir.operations (id, tenant, kind, branch, request, status, instance, heartbeat_at)
                 VALUES ('op_ghost', 'shop', 'branch.create', 'ghost', '{\"name\": \"ghost\", \"parent\": \"main\"}', 'running', 'gone', now() - interval '1 minute')",
            )
            .await
            .unwrap();
        let done = wait_op(&env, &json!({"href": "/v1/operations/op_ghost"})).await;
        assert_eq!(done["status"], "failed", "{done}");
        assert!(done["error"].as_str().unwrap().contains("interrupted"), "{done}");
        let left: i64 = su
            .query_one("select count(*) from pg_database where datname = 'pgweir_db_0000000000000001'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "the half-made database is dropped");
        let (s, _) = call(env.admin, "GET", "/v1/tenants/shop/branches/ghost", Some(READER), None).await;
        assert_eq!(s, 404);

        // A branch with an expiry is deleted by pgweir itself.
        let (s, v) = call(env.admin, "POST", "/v1/tenants/shop/branches", Some(ADMIN), Some(r#"{"name": "brief", "expires_at": "2000-01-01T00:00:00Z"}"#)).await;
        assert_eq!(s, 202, "{v}");
        assert_eq!(wait_op(&env, &v["operation"]).await["status"], "succeeded");
        let deadline = Instant::now() + Duration::from_secs(30);
        while call(env.admin, "GET", "/v1/tenants/shop/branches/brief", Some(READER), None).await.0 != 404 {
            assert!(Instant::now() < deadline, "the expired branch is deleted");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}
