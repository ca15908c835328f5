//! The admin HTTP listener: health, readiness, the error shape, and `/metrics` as Prometheus text whose counters and
//! gauges follow what clients do.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A plain HTTP/1.1 GET: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, None, None).await
}

/// Parses Prometheus text exposition: `name{labels}` → value. Every line must be a comment or a sample.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty() || line.starts_with("# TYPE ") || line.starts_with("# HELP "),
                "comment line: {line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample line: series value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("a number: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "labels: {line}");
        }
        out.insert(series.to_owned(), value);
    }
    out
}

pub async fn scrape(env: &Env) -> BTreeMap<String, f64> {
    let (status, body) = get(env.admin, "/metrics").await;
    assert_eq!(status, 200);
    parse_metrics(&body)
}

pub fn value(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

fn tx_env() -> Env {
    Env::with(Setup {
        pool: "max_size = 2\ncheckout_timeout = \"5s\"\nconnect_timeout = \"3s\"".into(),
        extra_config: acme_tenant(
            "tx",
            "pool_mode = \"transaction\"",
            &[user_toml("alice", ALICE_PASSWORD, false)],
        ),
        ..Setup::default()
    })
}

#[test]
fn health_readiness_and_unknown_routes() {
    let env = Env::start();
    runtime().block_on(async {
        assert_eq!(get(env.admin, "/healthz").await, (200, "ok\n".into()));
        assert_eq!(get(env.admin, "/readyz").await, (200, "ready\n".into()));
        let (status, body) = get(env.admin, "/v1/nothing-here").await;
        assert_eq!(status, 404);
        assert!(
            body.contains("\"code\":\"not_found\"") && body.contains("\"message\":"),
            "{body}"
        );
    });
}

#[test]
fn metrics_follow_what_clients_do() {
    let env = tx_env();
    runtime().block_on(async {
        let url = env.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            "options=endpoint=tx sslmode=disable",
        );
        let before = scrape(&env).await;
        let client = env.connect(&url).await.unwrap();
        for i in 0..10 {
            let row = client.query_one("select $1::int", &[&i]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), i);
        }
        let bad = env.url("alice", "wrong", "app", "options=endpoint=tx sslmode=disable");
        assert!(env.connect(&bad).await.is_err());
        let after = scrape(&env).await;
        let grew = |series: &str| value(&after, series) - value(&before, series);
        assert!(grew("pgweir_transactions_total") >= 10.0, "{after:?}");
        assert!(grew("pgweir_requests_total") >= 10.0);
        assert!(grew("pgweir_client_logins_total{result=\"ok\"}") >= 1.0);
        assert!(grew("pgweir_client_logins_total{result=\"failed\"}") >= 1.0);
        assert!(grew("pgweir_errors_sent_total{class=\"28\"}") >= 1.0);
        assert!(grew("pgweir_client_connections_total") >= 2.0);
        // Each Parse/Bind/Execute/Sync of tokio-postgres is well over 20 bytes.
        assert!(grew("pgweir_client_bytes_received_total") >= 200.0);
        assert!(grew("pgweir_client_bytes_sent_total") > 0.0);
        assert!(grew("pgweir_transaction_seconds_count") >= 10.0);
        assert!(grew("pgweir_query_seconds_count") >= 10.0, "{after:?}");
        assert!(grew("pgweir_query_seconds_sum") > 0.0);
        let active = "pgweir_pool_client_connections{tenant=\"tx\",pool=\"main/acme_main@acme_owner\",state=\"active\"}";
        assert_eq!(value(&after, active), 1.0, "the one open session: {after:?}");
        // Per tenant (few tenants here, so the series are on).
        assert!(grew("pgweir_tenant_transactions_total{tenant=\"tx\"}") >= 10.0, "{after:?}");
        assert!(grew("pgweir_tenant_requests_total{tenant=\"tx\"}") >= 10.0);
        assert!(grew("pgweir_tenant_connections_total{tenant=\"tx\"}") >= 1.0);
        assert!(value(&after, "pgweir_client_connections") >= 1.0);
        assert!(value(&after, "pgweir_pools") >= 1.0);

        // A pinned server connection shows, per pool and in total, and goes when the pin ends.
        client.batch_execute("LISTEN metrics_channel").await.unwrap();
        let pinned_series = "pgweir_pool_server_connections{tenant=\"tx\",pool=\"main/acme_main@acme_owner\",state=\"pinned\"}";
        let env = &env;
        let wait_for = |want: f64| async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let m = scrape(env).await;
                if value(&m, "pgweir_server_connections{state=\"pinned\"}") == want
                    && value(&m, pinned_series) == want
                {
                    return;
                }
                assert!(Instant::now() < deadline, "pinned = {want}: {m:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        wait_for(1.0).await;
        client.batch_execute("UNLISTEN *").await.unwrap();
        wait_for(0.0).await;
    });
}
