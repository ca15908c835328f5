//! Traffic control: pausing a tenant holds its transactions without failing them, and resuming lets them go on.

use std::time::{Duration, Instant};

use crate::control::{add_tokens, call, connect_url, register_cluster, ADMIN, READER};
use crate::harness::*;

/// A catalog environment whose held clients give up after 2 s.
fn traffic_env() -> Env {
    Env::with(Setup {
        catalog: true,
        pool: "max_size = 5\ncheckout_timeout = \"3s\"\nconnect_timeout = \"3s\"\npause_wait_timeout = \"2s\"".into(),
        ..Setup::default()
    })
}

/// A tenant created through the API; its connection string.
pub async fn new_tenant(env: &Env, id: &str) -> String {
    add_tokens(env).await;
    register_cluster(env, "local", env.cluster.port()).await;
    // These tests put a tenant under pgbench load: the free plan's query rate (100/s, tests/e2e/policy.rs tests it)
    // would throttle that load, so the plan keeps only its provisioning limits here.
    let (s, body) = call(
        env.admin,
        "PUT",
        "/v1/plans/free",
        Some(ADMIN),
        Some(r#"{"spec": {}}"#),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let (s, created) = call(
        env.admin,
        "PUT",
        &format!("/v1/tenants/{id}"),
        Some(ADMIN),
        Some("{}"),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    created["connection_string"].as_str().unwrap().to_owned()
}

/// pgbench (TPC-B-like, 8 clients) runs while its tenant is paused and resumed again and again: no transaction
/// fails, and the pauses really hold traffic (clients wait while paused). A client held past the pause wait
/// timeout gets 57P03; wrong requests are refused with the error shape.
#[test]
fn pause_and_resume_fail_no_transaction() {
    let env = traffic_env();
    let rt = runtime();
    let url = rt.block_on(new_tenant(&env, "steady"));
    let libpq = format!("{url}?sslmode=disable");
    pgbench_init(&libpq, 1);
    let run = pgbench_spawn(&["-n", "-c", "8", "-j", "2", "-T", "8"], &libpq);
    rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let mut held_seen = false;
        let mut pauses = 0;
        let deadline = Instant::now() + Duration::from_secs(6);
        while Instant::now() < deadline {
            let (s, body) = call(
                env.admin,
                "POST",
                "/v1/tenants/steady/pause",
                Some(ADMIN),
                Some(r#"{"timeout_ms": 5000}"#),
            )
            .await;
            assert_eq!(s, 200, "{body}");
            assert_eq!(body["paused"], true);
            pauses += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (_, pools) = call(
                env.admin,
                "GET",
                "/v1/tenants/steady/pools",
                Some(READER),
                None,
            )
            .await;
            let waiting: u64 = pools["pools"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["cl_waiting"].as_u64().unwrap())
                .sum();
            let busy: u64 = pools["pools"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["sv_active"].as_u64().unwrap())
                .sum();
            held_seen |= waiting > 0;
            assert_eq!(busy, 0, "no server connection works while paused: {pools}");
            let (s, body) = call(
                env.admin,
                "POST",
                "/v1/tenants/steady/resume",
                Some(ADMIN),
                Some("{}"),
            )
            .await;
            assert_eq!(s, 200, "{body}");
            assert!(body["paused_ms"].as_u64().unwrap() >= 300, "{body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(pauses >= 5);
        assert!(held_seen, "clients were held while paused");
    });
    let processed = pgbench_no_failures(run);
    assert!(processed > 100, "processed {processed}");

    rt.block_on(async {
        // Refused requests, with every problem listed.
        let (s, body) = call(
            env.admin,
            "POST",
            "/v1/tenants/steady/pause",
            Some(ADMIN),
            Some(r#"{"timeout_ms": 0, "x": 1}"#),
        )
        .await;
        assert_eq!(s, 400, "{body}");
        assert_eq!(body["details"].as_array().unwrap().len(), 2, "{body}");
        let (s, _) = call(
            env.admin,
            "POST",
            "/v1/tenants/steady/pause",
            Some(READER),
            Some("{}"),
        )
        .await;
        assert_eq!(s, 403);
        let (s, body) = call(
            env.admin,
            "POST",
            "/v1/tenants/steady/resume",
            Some(ADMIN),
            Some("{}"),
        )
        .await;
        assert_eq!(
            (s, body["code"].as_str()),
            (409, Some("not_paused")),
            "{body}"
        );
        let (s, _) = call(
            env.admin,
            "POST",
            "/v1/tenants/steady/pause",
            Some(ADMIN),
            Some(r#"{"branch": "nope"}"#),
        )
        .await;
        assert_eq!(s, 404);

        // A transaction in flight longer than the pause may wait: the pause fails, traffic goes on.
        let long = connect_url(&url).await.unwrap();
        long.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let (s, body) = call(
            env.admin,
            "POST",
            "/v1/tenants/steady/pause",
            Some(ADMIN),
            Some(r#"{"timeout_ms": 200}"#),
        )
        .await;
        assert_eq!(
            (s, body["code"].as_str()),
            (409, Some("pause_timeout")),
            "{body}"
        );
        long.batch_execute("COMMIT").await.unwrap();

        // Held past pause_wait_timeout: a clear error, not a hang.
        let (s, _) = call(
            env.admin,
            "POST",
            "/v1/tenants/steady/pause",
            Some(ADMIN),
            Some("{}"),
        )
        .await;
        assert_eq!(s, 200);
        let started = Instant::now();
        let err = long
            .simple_query("select 1")
            .await
            .expect_err("held past the wait timeout");
        assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");
        assert!(started.elapsed() >= Duration::from_secs(2));
        let (s, _) = call(
            env.admin,
            "POST",
            "/v1/tenants/steady/resume",
            Some(ADMIN),
            Some("{}"),
        )
        .await;
        assert_eq!(s, 200);
        let fresh = connect_url(&url).await.unwrap();
        fresh
            .simple_query("select 1")
            .await
            .expect("traffic goes on after resume");
    });
}

/// SIGTERM: new connections are refused, an idle client is told 57P01 at once, a transaction in flight finishes
/// (its client is told 57P01 right after), and one still open when `shutdown_timeout` runs out is rolled back and
/// its client told 57P01. Then pgweir stops.
#[test]
fn graceful_shutdown_lets_transactions_finish() {
    use crate::raw::{error_fields, within, Raw};
    let mut env = Env::with(Setup {
        proxy: "shutdown_timeout = \"3s\"".into(),
        extra_config: acme_tenant(
            "tx",
            "pool_mode = \"transaction\"",
            &[user_toml("alice", ALICE_PASSWORD, false)],
        ),
        ..Setup::default()
    });
    let rt = runtime();
    let (mut idle, mut busy, mut stuck) = rt.block_on(async {
        let mut idle = Raw::connect_to(&env, "tx").await;
        let mut busy = Raw::connect_to(&env, "tx").await;
        let mut stuck = Raw::connect_to(&env, "tx").await;
        assert!(idle
            .query("CREATE TABLE drain_t (v int)")
            .await
            .error
            .is_none());
        for (c, v) in [(&mut busy, 1), (&mut stuck, 2)] {
            let r = c
                .query(&format!("BEGIN; INSERT INTO drain_t VALUES ({v})"))
                .await;
            assert!(r.error.is_none(), "{:?}", r.error);
            assert_eq!(r.status, b'T');
        }
        (idle, busy, stuck)
    });
    let started = Instant::now();
    env.instance.begin_stop(Stop::Graceful);
    rt.block_on(async {
        let (tag, body) = within(2, "the idle client is told", idle.frame())
            .await
            .expect("a FATAL");
        assert_eq!((tag, error_fields(&body).code.as_str()), (b'E', "57P01"));
        assert!(idle.frame().await.is_none(), "then the connection closes");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            tokio::net::TcpStream::connect(env.addr).await.is_err(),
            "no new connections while shutting down"
        );
        // The transaction in flight goes on and commits; then its client is told.
        let r = busy.query("INSERT INTO drain_t VALUES (3); COMMIT").await;
        assert!(r.error.is_none(), "{:?}", r.error);
        let (tag, body) = within(2, "told after its transaction", busy.frame())
            .await
            .expect("a FATAL");
        assert_eq!((tag, error_fields(&body).code.as_str()), (b'E', "57P01"));
        // The one that never finishes is ended when the shutdown timeout runs out.
        let (tag, body) = within(10, "the open transaction is ended", stuck.frame())
            .await
            .expect("a FATAL");
        assert_eq!((tag, error_fields(&body).code.as_str()), (b'E', "57P01"));
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    });
    assert!(
        env.instance.wait_stopped(Duration::from_secs(10)),
        "pgweir stopped"
    );
    rt.block_on(async {
        let direct = env.cluster.connect("acme_main").await.unwrap();
        let rows: Vec<i32> = direct
            .query("select v from drain_t order by v", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            rows,
            [1, 3],
            "the finished transaction committed, the cut one rolled back"
        );
    });
}

/// A rolling restart: a new instance takes over the listening socket of the running one (`handover_socket`), the
/// old one drains. `pgbench` TPC-B with 8 clients and `-C` (a new connection per transaction) runs across it: no
/// connection attempt and no transaction fails, and afterwards the new instance serves alone.
#[test]
fn rolling_restart_refuses_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("handover.sock");
    let mut env = Env::with(Setup {
        proxy: format!("shutdown_timeout = \"5s\"\nhandover_socket = {sock:?}"),
        extra_config: acme_tenant(
            "tx",
            "pool_mode = \"transaction\"",
            &[user_toml("alice", ALICE_PASSWORD, false)],
        ),
        ..Setup::default()
    });
    let url = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "options=endpoint=tx sslmode=disable",
    );
    pgbench_init(&url, 1);
    let run = pgbench_spawn(&["-n", "-C", "-c", "8", "-j", "2", "-T", "6"], &url);
    std::thread::sleep(Duration::from_secs(2));
    let new = env.another_instance();
    assert_eq!(new.addr, env.addr, "the same listening socket");
    assert!(
        env.instance.wait_stopped(Duration::from_secs(15)),
        "the old instance drains and stops"
    );
    let processed = pgbench_no_failures(run);
    assert!(processed > 50, "processed {processed}");
    // The new instance served part of it, and serves now.
    let served = new
        .proxy
        .pools
        .usage()
        .iter()
        .map(|(_, u)| u.totals().connections)
        .sum::<u64>();
    assert!(served > 0, "the new instance took connections");
    let out = psql(&url, "select 1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(new);
}

/// A reload (`POST /v1/reload`, what SIGHUP does) takes new config-file tenants without dropping a connection,
/// names the sections that need a restart, and leaves everything as it was when the file is invalid.
#[test]
fn reload_takes_new_tenants_without_dropping_connections() {
    let env = Env::with(Setup {
        catalog: true,
        ..Setup::default()
    });
    let path = env.dir.path().join("pgweir.toml");
    std::fs::write(&path, env.config_text()).unwrap();
    env.proxy.set_config_path(path.clone());
    let rt = runtime();
    rt.block_on(async {
        crate::control::add_tokens(&env).await;
        let open = env.connect(&env.alice()).await.unwrap();
        let fresh_url = env.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            "options=endpoint=fresh sslmode=disable",
        );
        assert!(env.connect(&fresh_url).await.is_err(), "not a tenant yet");

        let text = env
            .config_text()
            .replace("login_timeout = \"5s\"", "login_timeout = \"6s\"")
            + &acme_tenant("fresh", "", &[user_toml("alice", ALICE_PASSWORD, false)]);
        std::fs::write(&path, text).unwrap();
        let (s, v) = call(env.admin, "POST", "/v1/reload", Some(ADMIN), Some("{}")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["config_tenants"], 4, "{v}");
        assert_eq!(v["needs_restart"], serde_json::json!(["proxy"]), "{v}");
        let fresh = env
            .connect(&fresh_url)
            .await
            .expect("the new tenant is routed");
        fresh.simple_query("select 1").await.unwrap();
        open.simple_query("select 1")
            .await
            .expect("the open session goes on");

        std::fs::write(&path, "[proxy]\nnot_a_key = 1\n").unwrap();
        let (s, v) = call(env.admin, "POST", "/v1/reload", Some(ADMIN), Some("{}")).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (422, Some("invalid_config")),
            "{v}"
        );
        assert!(v["message"].as_str().unwrap().contains("not_a_key"), "{v}");
        env.connect(&fresh_url)
            .await
            .expect("an invalid file changes nothing");
        let (s, _) = call(env.admin, "POST", "/v1/reload", Some(READER), Some("{}")).await;
        assert_eq!(s, 403);
    });
}
