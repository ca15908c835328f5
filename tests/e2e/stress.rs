//! The "wrong rows" stress test: many clients on few shared server connections, each repeatedly running queries
//! whose results identify the client (its own parameter, its own prepared statement, a shared statement text that
//! reads its own schema through its search_path, its own application_name), while disconnects (mid-transaction and
//! mid-query), cancels, errors and pipelines are injected at random. Any row that reaches the wrong client fails
//! the test.
//!
//! Short in the test command; long as a benchmark:
//! `PGWEIR_STRESS_SECS=600 PGWEIR_STRESS_CLIENTS=64 cargo test --release --test e2e stress -- --nocapture`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::harness::*;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Counts {
    checked: AtomicU64,
    errors: AtomicU64,
    cancelled: AtomicU64,
    disconnects: AtomicU64,
}

struct Identity {
    n: usize,
    url: String,
}

impl Identity {
    fn tag(&self) -> String {
        format!("c{}", self.n)
    }

    async fn connect(&self) -> (Client, tokio_postgres::Statement, tokio_postgres::Statement) {
        let (client, conn) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("client {} connect: {e}", self.n));
        tokio::spawn(conn);
        client
            .batch_execute(&format!("SET application_name TO '{}'", self.tag()))
            .await
            .unwrap();
        // Its own statement (its number is in the text), and a text every client prepares alike.
        let own = client
            .prepare(&format!(
                "select '{}'::text, $1::int, current_setting('application_name')",
                self.tag()
            ))
            .await
            .unwrap();
        let shared = client.prepare("select v from t").await.unwrap();
        (client, own, shared)
    }
}

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect()
}

fn code(e: &tokio_postgres::Error) -> String {
    sqlstate(e).unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

/// One client's loop until `deadline`.
async fn client_loop(id: Identity, seed: u64, deadline: Instant, counts: Arc<Counts>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let tag = id.tag();
    let mine = format!("from {tag}");
    let (mut client, mut own, mut shared) = id.connect().await;
    while Instant::now() < deadline {
        let op = rng.gen_range(0..100);
        match op {
            // Its own parameter, through a one-off statement.
            0..=19 => {
                let v: String = client
                    .query_one("select $1::text", &[&tag])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(v, tag, "one-off statement");
            }
            // Its own prepared statement.
            20..=39 => {
                let k: i32 = rng.gen();
                let r = client.query_one(&own, &[&k]).await.unwrap();
                let (who, n, app): (String, i32, String) = (r.get(0), r.get(1), r.get(2));
                assert_eq!(
                    (who.as_str(), n, app.as_str()),
                    (tag.as_str(), k, tag.as_str())
                );
            }
            // The shared statement text reads the client's own schema.
            40..=54 => {
                let v: String = client.query_one(&shared, &[]).await.unwrap().get(0);
                assert_eq!(v, mine, "shared statement under the client's search_path");
            }
            // Simple protocol, with its settings.
            55..=64 => {
                let r = client
                    .simple_query("select v from t; select current_setting('application_name')")
                    .await
                    .unwrap();
                assert_eq!(rows(&r), [mine.clone(), tag.clone()], "simple query");
            }
            // A transaction with several statements, committed or rolled back.
            65..=74 => {
                let tx = client.transaction().await.unwrap();
                for _ in 0..rng.gen_range(1..4) {
                    let v: String = tx.query_one(&shared, &[]).await.unwrap().get(0);
                    assert_eq!(v, mine, "in a transaction");
                }
                if rng.gen_bool(0.5) {
                    tx.commit().await.unwrap();
                } else {
                    tx.rollback().await.unwrap();
                }
            }
            // Pipelined: three queries in flight on one connection.
            75..=81 => {
                let k: i32 = rng.gen();
                let own_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&k];
                let tag_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&tag];
                let (a, b, c) = tokio::join!(
                    client.query_one(&own, &own_params),
                    client.query_one(&shared, &[]),
                    client.query_one("select $1::text", &tag_params),
                );
                assert_eq!(a.unwrap().get::<_, String>(0), tag, "pipelined own");
                assert_eq!(b.unwrap().get::<_, String>(0), mine, "pipelined shared");
                assert_eq!(c.unwrap().get::<_, String>(0), tag, "pipelined one-off");
            }
            // Errors: a failing statement, simple and prepared; the session goes on.
            82..=87 => {
                let e = if rng.gen_bool(0.5) {
                    client.simple_query("select 1/0").await.unwrap_err()
                } else {
                    client
                        .query_one("select 1/$1::int", &[&0i32])
                        .await
                        .unwrap_err()
                };
                assert_eq!(code(&e), "22012");
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
            // A cancel that lands while the query runs, or after it finished, or before it reached a server.
            88..=93 => {
                let token = client.cancel_token();
                let delay = Duration::from_millis(rng.gen_range(0..40));
                let canceller = tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = token.cancel_query(NoTls).await;
                });
                match client
                    .query_one("select $1::text from pg_sleep(0.02)", &[&tag])
                    .await
                {
                    Ok(r) => assert_eq!(r.get::<_, String>(0), tag, "query that was not cancelled"),
                    Err(e) => {
                        assert_eq!(code(&e), "57014", "{e}");
                        counts.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                canceller.await.unwrap();
                // tokio-postgres does not wait for the cancel to be handled: as on a direct connection, it may
                // still land on this client's next query (never on another client's). The one after that runs.
                for attempt in 0.. {
                    match client.query_one("select $1::text", &[&tag]).await {
                        Ok(r) => {
                            assert_eq!(r.get::<_, String>(0), tag);
                            break;
                        }
                        Err(e) if attempt == 0 && code(&e) == "57014" => {}
                        Err(e) => panic!("after a cancel: {e}"),
                    }
                }
            }
            // Leave abruptly: mid-transaction, or with a query running; then come back.
            _ => {
                if rng.gen_bool(0.5) {
                    client
                        .batch_execute("BEGIN; INSERT INTO scratch VALUES (1)")
                        .await
                        .unwrap();
                } else {
                    let c = client;
                    let q = tokio::spawn(async move {
                        let _ = c.simple_query("select pg_sleep(0.05)").await;
                        drop(c);
                    });
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..20))).await;
                    q.abort();
                    let _ = q.await;
                    counts.disconnects.fetch_add(1, Ordering::Relaxed);
                    (client, own, shared) = id.connect().await;
                    continue;
                }
                drop(client);
                counts.disconnects.fetch_add(1, Ordering::Relaxed);
                (client, own, shared) = id.connect().await;
            }
        }
        counts.checked.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn no_client_ever_sees_another_clients_rows() {
    let secs = env_number("PGWEIR_STRESS_SECS", 8);
    let clients = env_number("PGWEIR_STRESS_CLIENTS", 16) as usize;
    let seed = env_number("PGWEIR_STRESS_SEED", 0x5eed);
    let env = Env::with(Setup {
        pool: "max_size = 3\ncheckout_timeout = \"30s\"\nconnect_timeout = \"3s\"".into(),
        extra_config: acme_tenant(
            "tx",
            "pool_mode = \"transaction\"",
            &[user_toml("alice", ALICE_PASSWORD, false)],
        ),
        ..Setup::default()
    });
    let base = env.url("alice", ALICE_PASSWORD, "app", "sslmode=disable");
    runtime().block_on(async {
        let admin = env
            .connect(&format!("{base} options=endpoint=tx"))
            .await
            .unwrap();
        let mut sql = String::from("CREATE TABLE IF NOT EXISTS public.scratch(v int);");
        for n in 0..clients {
            sql.push_str(&format!(
                "DROP SCHEMA IF EXISTS s{n} CASCADE; CREATE SCHEMA s{n};
                 CREATE TABLE s{n}.t(v text); INSERT INTO s{n}.t VALUES ('from c{n}');
                 CREATE VIEW s{n}.scratch AS SELECT * FROM public.scratch;"
            ));
        }
        admin.batch_execute(&sql).await.unwrap();
        let counts = Arc::new(Counts::default());
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for n in 0..clients {
            let id = Identity {
                n,
                url: format!("{base} options='endpoint=tx -c search_path=s{n}'"),
            };
            tasks.push(tokio::spawn(client_loop(
                id,
                seed.wrapping_add(n as u64),
                deadline,
                counts.clone(),
            )));
        }
        for t in tasks {
            t.await.expect("a client saw something wrong (see above)");
        }
        let checked = counts.checked.load(Ordering::Relaxed);
        println!(
            "stress: {clients} clients, {secs} s: {checked} checked operations, {} errors, {} cancelled, {} disconnects",
            counts.errors.load(Ordering::Relaxed),
            counts.cancelled.load(Ordering::Relaxed),
            counts.disconnects.load(Ordering::Relaxed),
        );
        assert!(checked > clients as u64 * 10, "too little work done: {checked}");
        assert!(counts.disconnects.load(Ordering::Relaxed) > 0);
        // Nothing was left behind: no pins, every server connection idle and usable.
        let stats = env.proxy.pools.stats();
        assert_eq!(stats.iter().map(|p| p.server_pinned).sum::<usize>(), 0);
        let n: i64 = admin
            .query_one("select count(*) from public.scratch", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "rows of abandoned transactions were rolled back");
    });
}
