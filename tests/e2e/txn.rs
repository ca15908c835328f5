//! Transaction pooling: clients share few server connections; settings follow each client; state that cannot
//! move pins; cancels reach only the right query.

use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::harness::*;
use crate::raw::{error_fields, ext, text, within, Frame, Raw};

/// Tenant `tx`: same backend as `acme`, transaction pooling, pool of `size` server connections.
fn tx_env(size: usize) -> Env {
    tx_env_with(size, "10s")
}

fn tx_env_with(size: usize, checkout_timeout: &str) -> Env {
    Env::with(tx_setup(size, checkout_timeout, ""))
}

/// Setup with tenant `tx`, a pool of `size`, and extra `[proxy]` lines.
fn tx_setup(size: usize, checkout_timeout: &str, proxy: &str) -> Setup {
    Setup {
        pool: format!("max_size = {size}\ncheckout_timeout = \"{checkout_timeout}\"\nconnect_timeout = \"3s\""),
        proxy: proxy.into(),
        extra_config: acme_tenant(
            "tx",
            "pool_mode = \"transaction\"",
            &[user_toml("alice", ALICE_PASSWORD, false)],
        ),
        ..Setup::default()
    }
}

fn tx_url(env: &Env, extra: &str) -> String {
    env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        &format!("options=endpoint=tx sslmode=disable {extra}"),
    )
}

async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e} ({:?})", sqlstate(&e)));
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default()
}

#[test]
fn many_clients_share_few_server_connections() {
    let env = tx_env(2);
    runtime().block_on(async {
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(env.connect(&tx_url(&env, "")).await.unwrap());
        }
        // Eight idle clients hold no server connections; all eight can run queries.
        for (i, c) in clients.iter().enumerate() {
            assert_eq!(one(c, &format!("select {i}")).await, i.to_string());
        }
        let pids: std::collections::BTreeSet<String> = {
            let mut s = std::collections::BTreeSet::new();
            for c in &clients {
                s.insert(one(c, "select pg_backend_pid()").await);
            }
            s
        };
        assert!(pids.len() <= 2, "at most 2 server connections: {pids:?}");
        // A transaction keeps its server connection from BEGIN to COMMIT.
        let c = &clients[0];
        c.batch_execute("BEGIN").await.unwrap();
        let p1 = one(c, "select pg_backend_pid()").await;
        for other in &clients[1..4] {
            one(other, "select 1").await;
        }
        let p2 = one(c, "select pg_backend_pid()").await;
        c.batch_execute("COMMIT").await.unwrap();
        assert_eq!(p1, p2);
    });
}

#[test]
fn settings_follow_each_client_across_a_shared_connection() {
    let env = tx_env(1);
    runtime().block_on(async {
        let a = env
            .connect(&env.url(
                "alice",
                ALICE_PASSWORD,
                "app",
                "options='endpoint=tx -c search_path=a_path,public' sslmode=disable",
            ))
            .await
            .unwrap();
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        a.batch_execute("SET TimeZone = 'UTC'; SET statement_timeout = '1234ms'")
            .await
            .unwrap();
        b.batch_execute("SET TimeZone = 'Asia/Tokyo'")
            .await
            .unwrap();
        for _ in 0..20 {
            assert_eq!(one(&a, "show timezone").await, "UTC");
            assert_eq!(one(&b, "show timezone").await, "Asia/Tokyo");
            assert_eq!(one(&a, "show statement_timeout").await, "1234ms");
            assert_eq!(one(&b, "show statement_timeout").await, "0");
            assert_eq!(one(&a, "show search_path").await, "a_path,public");
            assert_eq!(one(&b, "show search_path").await, "\"$user\", public");
        }
        // Both run on the one server connection.
        assert_eq!(
            one(&a, "select pg_backend_pid()").await,
            one(&b, "select pg_backend_pid()").await
        );
        // RESET returns to the client's startup value; RESET ALL to all of them.
        a.batch_execute("SET search_path = other").await.unwrap();
        assert_eq!(one(&a, "show search_path").await, "other");
        one(&b, "select 1").await;
        a.batch_execute("RESET search_path").await.unwrap();
        assert_eq!(one(&a, "show search_path").await, "a_path,public");
        a.batch_execute("RESET ALL").await.unwrap();
        one(&b, "select 1").await;
        assert_eq!(one(&a, "show statement_timeout").await, "0");
        assert_eq!(one(&a, "show search_path").await, "a_path,public");
        // A SET rolled back is not kept; set_config(…, false) is.
        a.batch_execute("BEGIN; SET statement_timeout = 999; ROLLBACK")
            .await
            .unwrap();
        one(&b, "select 1").await;
        assert_eq!(one(&a, "show statement_timeout").await, "0");
        a.simple_query("select set_config('work_mem', '7MB', false)")
            .await
            .unwrap();
        one(&b, "select 1").await;
        assert_eq!(one(&a, "show work_mem").await, "7MB");
        assert_eq!(one(&b, "show work_mem").await, "4MB");
    });
}

#[test]
fn listen_pins_and_prepared_statements_keep_working() {
    let env = tx_env(2);
    runtime().block_on(async {
        let a = env.connect(&tx_url(&env, "")).await.unwrap();
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        // Named prepared statements (tokio-postgres prepares every query) do not pin; LISTEN does.
        let stmt = a.prepare("select $1::int + 1").await.unwrap();
        a.batch_execute("LISTEN tx_channel").await.unwrap();
        for i in 0..20 {
            let row = a.query_one(&stmt, &[&i]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), i + 1);
        }
        let pinned_pid = a
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0);
        // b still gets the other server connection, again and again.
        for _ in 0..5 {
            let pid: String = one(&b, "select pg_backend_pid()").await;
            assert_ne!(pid, pinned_pid.to_string());
        }
        let again = a
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0);
        assert_eq!(pinned_pid, again);
        // The pin is visible in the pool's stats, and gone when the client leaves.
        let pinned = |env: &Env| {
            env.proxy
                .pools
                .stats()
                .iter()
                .map(|p| p.server_pinned)
                .sum::<usize>()
        };
        assert_eq!(pinned(&env), 1);
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(10);
        while pinned(&env) != 0 {
            assert!(Instant::now() < deadline, "pin released");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn cancels_reach_only_the_right_query() {
    let env = tx_env(1);
    runtime().block_on(async {
        let a = env.connect(&tx_url(&env, "")).await.unwrap();
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        // A cancel of an idle client does nothing, even while another client runs on the same server connection.
        let a_token = a.cancel_token();
        let running = tokio::spawn(async move {
            let started = Instant::now();
            b.simple_query("select pg_sleep(1.5)")
                .await
                .map(|_| (started.elapsed(), b))
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        a_token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let (elapsed, b) = running.await.unwrap().expect("b's query is not cancelled");
        assert!(elapsed >= Duration::from_millis(1400), "{elapsed:?}");

        // A cancel of a running query cancels it.
        let b_token = b.cancel_token();
        let running =
            tokio::spawn(async move { b.simple_query("select pg_sleep(30)").await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        b_token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let err = running.await.unwrap().unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));

        // A cancel while the query waits for a server connection is not lost.
        a.batch_execute("BEGIN").await.unwrap(); // a holds the only server connection
        let c = env.connect(&tx_url(&env, "")).await.unwrap();
        let c_token = c.cancel_token();
        let waiting =
            tokio::spawn(async move { (c.simple_query("select 42").await.map(|_| ()), c) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        c_token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let (res, c) = waiting.await.unwrap();
        let err = res.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
        a.batch_execute("COMMIT").await.unwrap();
        assert_eq!(one(&c, "select 7").await, "7");
    });
}

#[test]
fn disconnect_mid_transaction_rolls_back() {
    let env = tx_env(1);
    runtime().block_on(async {
        let setup = env.connect(&tx_url(&env, "")).await.unwrap();
        setup
            .batch_execute("CREATE TABLE IF NOT EXISTS tx_t(v int)")
            .await
            .unwrap();
        let a = env.connect(&tx_url(&env, "")).await.unwrap();
        a.batch_execute("BEGIN; INSERT INTO tx_t VALUES (1)")
            .await
            .unwrap();
        drop(a);
        // The server connection comes back rolled back and usable.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = one(&setup, "select count(*) from tx_t").await;
            if n == "0" {
                break;
            }
            assert!(Instant::now() < deadline, "insert still visible: {n}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(one(&setup, "select 1").await, "1");
    });
}

#[test]
fn pgbench_all_protocols_with_more_clients_than_server_connections() {
    let env = tx_env(2);
    let pgbench = pgweir::pgcluster::PgBin::locate().unwrap().tool("pgbench");
    let url = tx_url(&env, "");
    pgbench_init(&url, 1);
    for mode in ["simple", "extended", "prepared"] {
        let out = std::process::Command::new(&pgbench)
            .args(["-n", "-c", "8", "-j", "2", "-t", "100", "-M", mode, &url])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("number of transactions actually processed: 800/800"),
            "{mode}: {stdout}"
        );
    }
}

#[test]
fn client_can_ask_for_session_mode() {
    let env = tx_env_with(1, "1s");
    let session_url = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "options='endpoint=tx pool_mode=session' sslmode=disable",
    );
    runtime().block_on(async {
        // A session-mode client keeps its server connection while idle: the pool of one is taken.
        let s = env.connect(&session_url).await.unwrap();
        assert_eq!(one(&s, "select 1").await, "1");
        let err = env.connect(&tx_url(&env, "")).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
        drop(s);
        // Once it leaves, a transaction-mode client gets the connection; idle, it does not hold it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let t = loop {
            match env.connect(&tx_url(&env, "")).await {
                Ok(t) => break t,
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let t2 = env.connect(&tx_url(&env, "")).await.unwrap();
        assert_eq!(one(&t, "select 2").await, "2");
        assert_eq!(one(&t2, "select 3").await, "3");
    });
    let bad = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "options='endpoint=tx pool_mode=statement' sslmode=disable",
    );
    let err = psql_err(&bad, "select 1");
    assert!(err.contains("invalid pool mode"), "{err}");
}

#[test]
fn failed_resets_do_not_leak_settings_to_the_next_client() {
    let env = tx_env(1);
    runtime().block_on(async {
        let a = env.connect(&tx_url(&env, "")).await.unwrap();
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        a.batch_execute("SET statement_timeout = '1s'; SET app.user_id = '42'")
            .await
            .unwrap();
        // A RESET rolled back with its failing implicit transaction, and a DISCARD ALL that fails inside one.
        assert!(a
            .batch_execute("RESET statement_timeout; SELECT 1/0")
            .await
            .is_err());
        assert!(a.batch_execute("SELECT 1; DISCARD ALL").await.is_err());
        assert_eq!(one(&a, "show statement_timeout").await, "1s");
        assert_eq!(one(&a, "select current_setting('app.user_id')").await, "42");
        // b runs on the same server connection and sees none of it.
        assert_eq!(one(&b, "show statement_timeout").await, "0");
        assert_eq!(
            one(
                &b,
                "select coalesce(current_setting('app.user_id', true), '')"
            )
            .await,
            ""
        );
        // A RESET that works returns a to the default; b is still clean.
        a.batch_execute("RESET statement_timeout").await.unwrap();
        assert_eq!(one(&a, "show statement_timeout").await, "0");
        assert_eq!(one(&b, "show statement_timeout").await, "0");
    });
}

#[test]
fn pipelined_queries_keep_pooling() {
    let env = tx_env(1);
    runtime().block_on(async {
        let a = env.connect(&tx_url(&env, "")).await.unwrap();
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        // tokio-postgres pipelines concurrent queries of one client on its connection.
        // Concurrent simple queries of one client are pipelined on its connection (tokio-postgres' prepared
        // statements would pin the client, so simple queries keep it in transaction pooling).
        for round in 0..50 {
            let (s1, s2) = (format!("select {round}"), format!("select {round} + 1000"));
            let (r1, r2) = tokio::join!(one(&a, &s1), one(&a, &s2));
            assert_eq!(r1, round.to_string());
            assert_eq!(r2, (round + 1000).to_string());
        }
        // The one server connection went back to the pool after the pipeline: b can use it while a is idle.
        let b_query = tokio::time::timeout(Duration::from_secs(5), one(&b, "select 3"));
        assert_eq!(b_query.await.expect("b is not blocked by a"), "3");
    });
}

/// Tenant `tx` with one server connection and the given `[proxy]` timeout lines.
fn tx_env_timeouts(proxy: &str) -> Env {
    Env::with(tx_setup(1, "10s", proxy))
}

async fn wait_closed(c: &tokio_postgres::Client, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if c.is_closed() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.is_closed()
}

#[test]
fn idle_in_transaction_timeout_rolls_back_and_frees_the_server() {
    let env = tx_env_timeouts("idle_in_transaction_timeout = \"1s\"");
    runtime().block_on(async {
        let setup = env.connect(&tx_url(&env, "")).await.unwrap();
        setup
            .batch_execute("CREATE TABLE IF NOT EXISTS iit(v int)")
            .await
            .unwrap();
        let a = env.connect(&tx_url(&env, "")).await.unwrap();
        a.batch_execute("BEGIN; INSERT INTO iit VALUES (1)")
            .await
            .unwrap();
        // a idles inside its transaction, holding the only server connection: pgweir ends it.
        assert!(
            wait_closed(&a, Duration::from_secs(10)).await,
            "a was disconnected"
        );
        // The transaction was rolled back and the server connection is free for others.
        assert_eq!(one(&setup, "select count(*) from iit").await, "0");
        // A client idle *between* transactions is not affected.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(one(&setup, "select 1").await, "1");
    });
}

#[test]
fn client_idle_timeout_disconnects_idle_clients() {
    let env = tx_env_timeouts("client_idle_timeout = \"1s\"");
    runtime().block_on(async {
        let a = env.connect(&tx_url(&env, "")).await.unwrap();
        assert_eq!(one(&a, "select 1").await, "1");
        let started = Instant::now();
        assert!(
            wait_closed(&a, Duration::from_secs(10)).await,
            "a was disconnected"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
        // Session mode too.
        let session = env
            .connect(&env.url(
                "alice",
                ALICE_PASSWORD,
                "app",
                "options='endpoint=tx pool_mode=session' sslmode=disable",
            ))
            .await
            .unwrap();
        assert_eq!(one(&session, "select 2").await, "2");
        assert!(
            wait_closed(&session, Duration::from_secs(10)).await,
            "session client was disconnected"
        );
        // New clients still work.
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        assert_eq!(one(&b, "select 3").await, "3");
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Named prepared statements
// ---------------------------------------------------------------------------------------------------------------

fn pinned(env: &Env) -> usize {
    env.proxy
        .pools
        .stats()
        .iter()
        .map(|p| p.server_pinned)
        .sum::<usize>()
}

/// A reply as a comparable line; ParameterStatus and notices are left out.
fn summarize(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .filter(|(tag, _)| !matches!(tag, b'S' | b'N'))
        .map(|(tag, body)| match tag {
            b'E' => format!("E {}", error_fields(body).code),
            b'D' => format!("D {:?}", crate::raw::data_row(body)),
            b'C' => format!("C {}", text(body.strip_suffix(&[0]).unwrap_or(body))),
            b't' | b'T' => format!(
                "{} {}",
                *tag as char,
                u16::from_be_bytes([body[0], body[1]])
            ),
            b'Z' => format!("Z {}", body[0] as char),
            t => (*t as char).to_string(),
        })
        .collect()
}

/// Sends `out` and reads the replies up to the `syncs`-th ReadyForQuery.
async fn exchange(raw: &mut Raw, out: &BytesMut, syncs: usize) -> Vec<String> {
    raw.send(out).await;
    let mut frames = Vec::new();
    for _ in 0..syncs {
        frames.extend(raw.until_ready().await);
    }
    summarize(&frames)
}

/// Pipelines of named statements with errors in the middle, closes and re-prepares: every reply, in order,
/// exactly as Postgres gives it to a direct connection.
#[test]
fn named_statement_pipelines_reply_exactly_as_postgres() {
    let env = tx_env(2);
    runtime().block_on(async {
        let script: Vec<(usize, BytesMut)> = {
            let mut v = Vec::new();
            let mut b = BytesMut::new();
            // 1. A good statement, a broken one in the middle: the rest of the batch is skipped.
            ext::parse("s1", "select $1::int * 2", &mut b);
            ext::describe(b'S', "s1", &mut b);
            ext::bind("", "s1", &[Some("21")], &mut b);
            ext::execute("", &mut b);
            ext::parse("s2", "selec broken", &mut b);
            ext::parse("s3", "select 3", &mut b);
            ext::bind("", "s1", &[Some("1")], &mut b);
            ext::execute("", &mut b);
            ext::sync(&mut b);
            v.push((1, b.split()));
            // 2. The skipped and the failed statement do not exist.
            ext::bind("", "s3", &[], &mut b);
            ext::execute("", &mut b);
            ext::sync(&mut b);
            ext::describe(b'S', "s2", &mut b);
            ext::sync(&mut b);
            v.push((2, b.split()));
            // 3. Use, close, use again (fails), in one batch; then the name is free for a new definition.
            ext::bind("", "s1", &[Some("5")], &mut b);
            ext::execute("", &mut b);
            ext::close(b'S', "s1", &mut b);
            ext::bind("", "s1", &[Some("6")], &mut b);
            ext::execute("", &mut b);
            ext::sync(&mut b);
            ext::parse("s1", "select $1::text || 'x'", &mut b);
            ext::bind("", "s1", &[Some("a")], &mut b);
            ext::execute("", &mut b);
            ext::sync(&mut b);
            v.push((2, b.split()));
            // 4. Closing a statement that does not exist is not an error; a Close skipped after an error keeps
            //    the statement.
            ext::close(b'S', "nope", &mut b);
            ext::sync(&mut b);
            ext::parse("bad", "select 1/0", &mut b);
            ext::bind("", "bad", &[], &mut b);
            ext::execute("", &mut b);
            ext::close(b'S', "s1", &mut b);
            ext::sync(&mut b);
            ext::bind("", "s1", &[Some("b")], &mut b);
            ext::execute("", &mut b);
            ext::sync(&mut b);
            v.push((3, b.split()));
            // 5. Flush instead of Sync: the ParseComplete arrives without a Sync.
            ext::parse("s9", "select 9", &mut b);
            ext::describe(b'S', "s9", &mut b);
            ext::flush(&mut b);
            v.push((0, b.split()));
            ext::bind("", "s9", &[], &mut b);
            ext::execute("", &mut b);
            ext::sync(&mut b);
            v.push((1, b.split()));
            // 6. The same statement text under two names, and the unnamed statement next to named ones.
            ext::parse("t1", "select 7", &mut b);
            ext::parse("t2", "select 7", &mut b);
            ext::parse("", "select 8", &mut b);
            ext::bind("", "t2", &[], &mut b);
            ext::execute("", &mut b);
            ext::close(b'S', "t1", &mut b);
            ext::bind("", "t2", &[], &mut b);
            ext::execute("", &mut b);
            ext::sync(&mut b);
            v.push((1, b.split()));
            // 7. A Parse of a name in use fails with 42P05 and the statement stays as it was; in a batch of Parses
            //    only, too.
            ext::parse("t2", "select 70", &mut b);
            ext::bind("", "t2", &[], &mut b);
            ext::execute("", &mut b);
            ext::sync(&mut b);
            ext::parse("t2", "select 71", &mut b);
            ext::sync(&mut b);
            ext::bind("", "t2", &[], &mut b);
            ext::execute("", &mut b);
            ext::sync(&mut b);
            v.push((3, b.split()));
            v
        };
        let mut direct = Raw::connect_direct(&env).await;
        let mut proxied = Raw::connect_to(&env, "tx").await;
        let mut step = 0;
        for (syncs, out) in &script {
            step += 1;
            let (want, got) = if *syncs == 0 {
                // Flush: read what a direct connection sends (ParseComplete, ParameterDescription, RowDescription).
                direct.send(out).await;
                proxied.send(out).await;
                let mut w = Vec::new();
                let mut g = Vec::new();
                for _ in 0..3 {
                    w.push(within(10, "flush reply", direct.frame()).await.unwrap());
                    g.push(within(10, "flush reply", proxied.frame()).await.unwrap());
                }
                (summarize(&w), summarize(&g))
            } else {
                (
                    exchange(&mut direct, out, *syncs).await,
                    exchange(&mut proxied, out, *syncs).await,
                )
            };
            assert_eq!(got, want, "step {step}");
            if step == 8 {
                assert_eq!(
                    want,
                    [
                        "E 42P05",
                        "Z I",
                        "E 42P05",
                        "Z I",
                        "2",
                        "D [Some(\"7\")]",
                        "C SELECT 1",
                        "Z I"
                    ]
                );
            }
            if step == 1 {
                assert_eq!(
                    want,
                    [
                        "1",
                        "t 1",
                        "T 1",
                        "2",
                        "D [Some(\"42\")]",
                        "C SELECT 1",
                        "E 42601",
                        "Z I"
                    ]
                );
            }
        }
        assert_eq!(pinned(&env), 0, "named statements do not pin");
    });
}

/// The unnamed statement stays its client's: a client may bind it in a later transaction without parsing it again
/// (the protocol allows it), after another client parsed its own on the same, only server connection; and a client
/// that never parsed one gets 26000, as from Postgres.
#[test]
fn the_unnamed_statement_is_each_clients_own() {
    let env = tx_env(1);
    runtime().block_on(async {
        let mut a = Raw::connect_to(&env, "tx").await;
        let mut b = Raw::connect_to(&env, "tx").await;
        let mut c = Raw::connect_to(&env, "tx").await;
        let mut m = BytesMut::new();
        ext::parse("", "select 'a:' || $1::text", &mut m);
        ext::sync(&mut m);
        assert_eq!(exchange(&mut a, &m.split(), 1).await, ["1", "Z I"]);
        ext::parse("", "select 'b:' || $1::text, 2", &mut m);
        ext::bind("", "", &[Some("1")], &mut m);
        ext::execute("", &mut m);
        ext::sync(&mut m);
        assert_eq!(
            exchange(&mut b, &m.split(), 1).await,
            [
                "1",
                "2",
                "D [Some(\"b:1\"), Some(\"2\")]",
                "C SELECT 1",
                "Z I"
            ]
        );
        // a's own statement, not b's (the last one parsed on the server connection).
        ext::bind("", "", &[Some("2")], &mut m);
        ext::execute("", &mut m);
        ext::sync(&mut m);
        assert_eq!(
            exchange(&mut a, &m.split(), 1).await,
            ["2", "D [Some(\"a:2\")]", "C SELECT 1", "Z I"]
        );
        ext::describe(b'S', "", &mut m);
        ext::sync(&mut m);
        assert_eq!(exchange(&mut b, &m.split(), 1).await, ["t 1", "T 2", "Z I"]);
        // c has none: the server's (b's) is not bound.
        let mut none = BytesMut::new();
        ext::bind("", "", &[], &mut none);
        ext::execute("", &mut none);
        ext::sync(&mut none);
        assert_eq!(exchange(&mut c, &none, 1).await, ["E 26000", "Z I"]);
        let mut direct = Raw::connect_direct(&env).await;
        assert_eq!(exchange(&mut direct, &none, 1).await, ["E 26000", "Z I"]);
        // b's is still there for b, in its next transaction.
        ext::bind("", "", &[Some("3")], &mut m);
        ext::execute("", &mut m);
        ext::sync(&mut m);
        assert_eq!(
            exchange(&mut b, &m.split(), 1).await,
            ["2", "D [Some(\"b:3\"), Some(\"2\")]", "C SELECT 1", "Z I"]
        );
    });
}

/// SQL `DEALLOCATE` of a statement prepared over the protocol (ActiveRecord drops its statements so) between
/// transactions: answered as Postgres answers it, and the name is free again; the same statement text prepared by
/// another client keeps working.
#[test]
fn sql_deallocate_drops_a_protocol_statement() {
    let env = tx_env(1);
    runtime().block_on(async {
        let mut m = BytesMut::new();
        ext::parse("a1", "select $1::int + 1", &mut m);
        ext::sync(&mut m);
        let prepare = m.split();
        ext::query("DEALLOCATE a1", &mut m);
        let deallocate = m.split();
        ext::parse("a1", "select $1::int + 2", &mut m);
        ext::bind("", "a1", &[Some("40")], &mut m);
        ext::execute("", &mut m);
        ext::sync(&mut m);
        let again = m.split();
        let mut direct = Raw::connect_direct(&env).await;
        let mut proxied = Raw::connect_to(&env, "tx").await;
        let mut other = Raw::connect_to(&env, "tx").await;
        for raw in [&mut direct, &mut proxied, &mut other] {
            assert_eq!(exchange(raw, &prepare, 1).await, ["1", "Z I"]);
        }
        for raw in [&mut direct, &mut proxied] {
            assert_eq!(exchange(raw, &deallocate, 1).await, ["C DEALLOCATE", "Z I"]);
            assert_eq!(
                exchange(raw, &again, 1).await,
                ["1", "2", "D [Some(\"42\")]", "C SELECT 1", "Z I"]
            );
            // Gone: a second DEALLOCATE fails as on Postgres.
            ext::query("DEALLOCATE a1_gone", &mut m);
            assert_eq!(exchange(raw, &m.split(), 1).await, ["E 26000", "Z I"]);
        }
        ext::bind("", "a1", &[Some("40")], &mut m);
        ext::execute("", &mut m);
        ext::sync(&mut m);
        assert_eq!(
            exchange(&mut other, &m.split(), 1).await,
            ["2", "D [Some(\"41\")]", "C SELECT 1", "Z I"]
        );
    });
}

/// A statement prepared on one server connection, then described and executed on another.
#[test]
fn statements_move_to_other_server_connections() {
    let env = tx_env(2);
    runtime().block_on(async {
        let x = env.connect(&tx_url(&env, "")).await.unwrap();
        let y = env.connect(&tx_url(&env, "")).await.unwrap();
        let mut raw = Raw::connect_to(&env, "tx").await;
        let pid_sql = "select pg_backend_pid()::text";

        // x holds one server connection: raw prepares on the other one.
        x.batch_execute("BEGIN").await.unwrap();
        let x_pid = one(&x, pid_sql).await;
        let mut b = BytesMut::new();
        ext::parse("s1", "select $1::int * 3 as tripled", &mut b);
        ext::parse("", pid_sql, &mut b);
        ext::bind("", "", &[], &mut b);
        ext::execute("", &mut b);
        ext::sync(&mut b);
        let r = exchange(&mut raw, &b.split(), 1).await;
        assert_eq!(r[0], "1");
        let first_pid = r[3].clone();
        assert!(!first_pid.contains(&x_pid), "{r:?} vs {x_pid}");

        // y takes that connection, x gives its own back: raw's next batch lands where s1 was never prepared.
        y.batch_execute("BEGIN").await.unwrap();
        let y_pid = one(&y, pid_sql).await;
        assert!(first_pid.contains(&y_pid), "{first_pid} vs {y_pid}");
        x.batch_execute("COMMIT").await.unwrap();
        ext::describe(b'S', "s1", &mut b);
        ext::bind("", "s1", &[Some("14")], &mut b);
        ext::execute("", &mut b);
        ext::parse("", pid_sql, &mut b);
        ext::bind("", "", &[], &mut b);
        ext::execute("", &mut b);
        ext::sync(&mut b);
        let r = exchange(&mut raw, &b.split(), 1).await;
        assert_eq!(
            r,
            [
                "t 1".to_string(),
                "T 1".into(),
                "2".into(),
                "D [Some(\"42\")]".into(),
                "C SELECT 1".into(),
                "1".into(),
                "2".into(),
                format!("D [Some(\"{x_pid}\")]"),
                "C SELECT 1".into(),
                "Z I".into()
            ]
        );
        y.batch_execute("COMMIT").await.unwrap();
        assert_eq!(pinned(&env), 0);
    });
}

/// Many tokio-postgres clients, each with its own and shared prepared statements, on two server connections:
/// every result is the client's own; statements are closed and prepared again; nothing pins; the servers keep one
/// copy of each distinct statement.
#[test]
fn prepared_statements_across_many_clients_and_transactions() {
    let env = tx_env(2);
    runtime().block_on(async {
        let mut tasks = Vec::new();
        for c in 0..8i32 {
            let url = tx_url(&env, "");
            let connect = env.connect(&url);
            let mut client = connect.await.unwrap();
            tasks.push(tokio::spawn(async move {
                // Shared by all clients: one server statement.
                let shared = client.prepare("select $1::int + 1000").await.unwrap();
                // The client's own: its number is in the text.
                let own = client
                    .prepare(&format!("select $1::int * 0 + {c}"))
                    .await
                    .unwrap();
                for i in 0..40i32 {
                    let r: i32 = client.query_one(&shared, &[&i]).await.unwrap().get(0);
                    assert_eq!(r, i + 1000);
                    let r: i32 = client.query_one(&own, &[&i]).await.unwrap().get(0);
                    assert_eq!(r, c, "client {c} got another client's statement");
                    if i % 10 == 9 {
                        // Inside a transaction, and a statement dropped (Close) and prepared again.
                        let tx = client.transaction().await.unwrap();
                        let again = tx.prepare("select $1::int - 1").await.unwrap();
                        let r: i32 = tx.query_one(&again, &[&i]).await.unwrap().get(0);
                        assert_eq!(r, i - 1);
                        drop(again);
                        tx.commit().await.unwrap();
                    }
                }
                client
            }));
        }
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await.unwrap());
        }
        assert_eq!(pinned(&env), 0, "named statements do not pin");
        // Each server connection holds at most the 8 + 2 distinct statements (and pgweir's, nothing else).
        for _ in 0..4 {
            let n: i64 = clients[0]
                .query_one(
                    "select count(*) from pg_prepared_statements where name like 'pgw\\_%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert!(
                (1..=11).contains(&n),
                "{n} statements on a server connection"
            );
        }
    });
}

/// SQL-level DEALLOCATE ALL and DISCARD ALL drop the client's protocol-level statements, as on Postgres, and
/// leave the shared server connection consistent for everyone else.
#[test]
fn deallocate_all_forgets_statements_everywhere_it_should() {
    let env = tx_env(1);
    runtime().block_on(async {
        let other = env.connect(&tx_url(&env, "")).await.unwrap();
        let shared = other.prepare("select $1::int + 5").await.unwrap();
        let mut raw = Raw::connect_to(&env, "tx").await;
        let mut b = BytesMut::new();
        ext::parse("p", "select $1::int + 5", &mut b);
        ext::sync(&mut b);
        assert_eq!(exchange(&mut raw, &b.split(), 1).await, ["1", "Z I"]);
        let r = raw.query("DEALLOCATE ALL").await;
        assert!(r.error.is_none(), "{:?}", r.error);
        ext::bind("", "p", &[Some("1")], &mut b);
        ext::execute("", &mut b);
        ext::sync(&mut b);
        assert_eq!(exchange(&mut raw, &b.split(), 1).await, ["E 26000", "Z I"]);
        // The other client's statement is prepared again where needed.
        let r: i32 = other.query_one(&shared, &[&1]).await.unwrap().get(0);
        assert_eq!(r, 6);
        ext::parse("p", "select $1::int + 5", &mut b);
        ext::bind("", "p", &[Some("2")], &mut b);
        ext::execute("", &mut b);
        ext::sync(&mut b);
        assert_eq!(
            exchange(&mut raw, &b.split(), 1).await,
            ["1", "2", "D [Some(\"7\")]", "C SELECT 1", "Z I"]
        );
        let r = raw.query("DISCARD ALL").await;
        assert!(r.error.is_none(), "{:?}", r.error);
        let r: i32 = other.query_one(&shared, &[&2]).await.unwrap().get(0);
        assert_eq!(r, 7);
    });
}

/// Two clients with different search_paths prepare the same text on one shared server connection: each reads its
/// own schema's table, as on its own connection.
#[test]
fn same_statement_text_under_different_search_paths() {
    let env = tx_env(1);
    runtime().block_on(async {
        let admin = env.connect(&tx_url(&env, "")).await.unwrap();
        admin
            .batch_execute(
                "DROP SCHEMA IF EXISTS sa CASCADE; DROP SCHEMA IF EXISTS sb CASCADE;
                 CREATE SCHEMA sa; CREATE SCHEMA sb;
                 CREATE TABLE sa.t(v text); CREATE TABLE sb.t(v text);
                 INSERT INTO sa.t VALUES ('from sa'); INSERT INTO sb.t VALUES ('from sb');",
            )
            .await
            .unwrap();
        let a = env
            .connect(&env.url(
                "alice",
                ALICE_PASSWORD,
                "app",
                "options='endpoint=tx -c search_path=sa' sslmode=disable",
            ))
            .await
            .unwrap();
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        b.batch_execute("SET search_path TO sb").await.unwrap();
        for _ in 0..3 {
            let sa = a.prepare("select v from t").await.unwrap();
            let sb = b.prepare("select v from t").await.unwrap();
            let va: String = a.query_one(&sa, &[]).await.unwrap().get(0);
            let vb: String = b.query_one(&sb, &[]).await.unwrap().get(0);
            assert_eq!((va.as_str(), vb.as_str()), ("from sa", "from sb"));
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Pins, refusals, timeouts, disconnects
// ---------------------------------------------------------------------------------------------------------------

/// A session advisory lock pins the client to its server connection; the lock is gone once the client leaves.
#[test]
fn advisory_lock_pins_until_the_client_leaves() {
    let env = tx_env(2);
    runtime().block_on(async {
        let a = env.connect(&tx_url(&env, "")).await.unwrap();
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        assert_eq!(one(&a, "select pg_advisory_lock(4242)::text").await, "");
        let a_pid = one(&a, "select pg_backend_pid()").await;
        assert_eq!(pinned(&env), 1);
        for _ in 0..5 {
            // a keeps its server connection (the lock lives there); b cannot take the lock.
            assert_eq!(one(&a, "select pg_backend_pid()").await, a_pid);
            assert_eq!(one(&b, "select pg_try_advisory_lock(4242)").await, "f");
        }
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if one(&b, "select pg_try_advisory_lock(4242)").await == "t" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the lock was released with its client"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Now b holds the lock, and is pinned in turn; a's pin is gone.
        assert_eq!(pinned(&env), 1);
    });
}

/// Waits (up to 10 s) until `n` server connections are pinned: the count changes just after the client got its
/// answer.
async fn wait_pinned(env: &Env, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pinned(env) != n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} pinned, not {n}",
            pinned(env)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pin lasts until the server says the state is gone: statements that release part of it keep the pin (and the
/// server connection), a release that is rolled back does not count, the last release ends it — and the other
/// client, waiting for the only server connection, gets it.
#[test]
fn pins_end_when_the_state_is_released() {
    let env = tx_env(1);
    runtime().block_on(async {
        let a = env.connect(&tx_url(&env, "")).await.unwrap();
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        // (what pins, what releases part of it, what releases the rest)
        let cases: &[(&str, &[&str], &str)] = &[
            (
                "select pg_advisory_lock(1), pg_advisory_lock_shared(2)",
                &["select pg_advisory_unlock(1)", "select pg_advisory_unlock(7)"],
                "select pg_advisory_unlock_shared(2)",
            ),
            (
                "LISTEN c1; LISTEN c2",
                &["UNLISTEN c1", "BEGIN; UNLISTEN *; ROLLBACK"],
                "UNLISTEN c2",
            ),
            (
                "CREATE TEMP TABLE pin_t1 (a int); CREATE TEMP TABLE pin_t2 (a int); CREATE TABLE pin_perm (a int)",
                &["DROP TABLE pin_perm", "DROP TABLE pin_t1", "BEGIN; DISCARD TEMP; ROLLBACK"],
                "DISCARD TEMP",
            ),
            (
                "BEGIN; DECLARE c1 CURSOR WITH HOLD FOR SELECT 1; DECLARE c2 CURSOR WITH HOLD FOR SELECT 2; COMMIT",
                &["CLOSE c1"],
                "CLOSE c2",
            ),
            (
                "PREPARE p1 AS SELECT 1; PREPARE p2 AS SELECT 2",
                &["DEALLOCATE p1"],
                "DEALLOCATE ALL",
            ),
            // Two reasons: releasing one keeps the pin.
            (
                "LISTEN c3; SELECT pg_advisory_lock(3)",
                &["UNLISTEN *"],
                "SELECT pg_advisory_unlock_all()",
            ),
            // State pgweir cannot follow: only DISCARD ALL ends it.
            (
                "SELECT set_config('pin.x', current_setting('search_path'), false)",
                &["UNLISTEN *", "select pg_advisory_unlock_all()"],
                "DISCARD ALL",
            ),
        ];
        for (pin, partial, release) in cases {
            a.batch_execute(pin).await.unwrap();
            wait_pinned(&env, 1, pin).await;
            let pid = one(&a, "select pg_backend_pid()").await;
            for p in *partial {
                a.batch_execute(p).await.unwrap();
                one(&a, "select 1").await;
                assert_eq!(pinned(&env), 1, "{pin} / {p}: still pinned");
                assert_eq!(one(&a, "select pg_backend_pid()").await, pid);
            }
            // b waits for the only server connection until a lets it go.
            let waiting = {
                let b = &b;
                async move { one(b, "select 'b ran'").await }
            };
            let releasing = async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                a.batch_execute(release).await.unwrap();
            };
            let (got, ()) = within(20, release, async { tokio::join!(waiting, releasing) }).await;
            assert_eq!(got, "b ran", "{pin} / {release}");
            wait_pinned(&env, 0, release).await;
        }
        // Settings changed while pinned move with the client after the pin ends.
        let zone = one(&b, "show TimeZone").await;
        assert_ne!(zone, "Asia/Tokyo");
        a.batch_execute("select pg_advisory_lock(9); SET TimeZone = 'Asia/Tokyo'")
            .await
            .unwrap();
        wait_pinned(&env, 1, "lock").await;
        a.batch_execute("select pg_advisory_unlock(9)").await.unwrap();
        wait_pinned(&env, 0, "unlock").await;
        assert_eq!(one(&b, "show TimeZone").await, zone);
        assert_eq!(one(&a, "show TimeZone").await, "Asia/Tokyo");
        assert_eq!(one(&b, "show TimeZone").await, zone);
    });
}

/// A client pinned by LISTEN gets notifications while it is idle, as on a direct connection.
#[test]
fn pinned_listeners_get_notifications_while_idle() {
    let env = tx_env(2);
    runtime().block_on(async {
        let mut a = Raw::connect_to(&env, "tx").await;
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        assert!(a.query("LISTEN pin_news").await.error.is_none());
        wait_pinned(&env, 1, "listen").await;
        b.batch_execute("NOTIFY pin_news, 'first'").await.unwrap();
        let (tag, body) = within(10, "notification", a.frame()).await.unwrap();
        assert_eq!(tag, b'A');
        assert!(
            text(&body[4..]).starts_with("pin_news"),
            "{:?}",
            text(&body)
        );
        assert!(a.query("UNLISTEN pin_news").await.error.is_none());
        wait_pinned(&env, 0, "unlisten").await;
        b.batch_execute("NOTIFY pin_news, 'second'").await.unwrap();
        // Not listening any more: the next thing a reads is its own query's answer.
        assert_eq!(a.value("select 'after'").await.as_deref(), Some("after"));
    });
}

/// `unmovable_session_state = "refuse"`: statements that would pin fail with 0A000, as failing statements do
/// (a transaction around them is aborted), and nothing pins.
#[test]
fn refused_session_state_fails_the_statement() {
    let env = Env::with(tx_setup(1, "10s", "unmovable_session_state = \"refuse\""));
    runtime().block_on(async {
        let a = env.connect(&tx_url(&env, "")).await.unwrap();
        for sql in [
            "LISTEN some_channel",
            "select pg_advisory_lock(1)",
            "create temp table tt(v int)",
            "prepare p as select 1",
        ] {
            let e = a.simple_query(sql).await.unwrap_err();
            assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{sql}: {e}");
            let msg = e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_default();
            assert!(msg.contains("transaction pooling"), "{msg}");
            assert_eq!(one(&a, "select 1").await, "1");
        }
        // Extended protocol: the refusal comes at Parse (the statement does not exist), and inside a transaction.
        let e = a
            .query("select pg_advisory_lock(7)", &[])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
        let e = a.prepare("select pg_advisory_lock($1)").await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "prepare fails: {e}");
        assert_eq!(one(&a, "select 2").await, "2");
        a.batch_execute("BEGIN").await.unwrap();
        let e = a.simple_query("LISTEN x").await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
        let e = a.simple_query("select 1").await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("25P02"), "{e}");
        a.batch_execute("ROLLBACK").await.unwrap();
        // Transaction-scoped forms work.
        a.batch_execute("BEGIN; select pg_advisory_xact_lock(1); COMMIT")
            .await
            .unwrap();
        assert_eq!(pinned(&env), 0);
    });
}

/// `query_timeout`: a request past it is cancelled with 57014 naming the timeout; the session goes on, in both
/// pool modes, and a transaction around it is aborted as Postgres aborts it.
#[test]
fn query_timeout_cancels_with_a_clear_error() {
    let env = Env::with(tx_setup(2, "10s", "query_timeout = \"2s\""));
    runtime().block_on(async {
        let session_url = env.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            "options='endpoint=tx pool_mode=session' sslmode=disable",
        );
        for url in [tx_url(&env, ""), session_url] {
            let c = env.connect(&url).await.unwrap();
            let started = Instant::now();
            let e = c.simple_query("select pg_sleep(30)").await.unwrap_err();
            assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
            let msg = e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_default();
            assert!(msg.contains("query_timeout"), "{msg}");
            // Cancelled, not finished (wide margins: a loaded machine is slow, not wrong).
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{:?}",
                started.elapsed()
            );
            assert_eq!(one(&c, "select 1").await, "1");
            // Quick statements are never touched, however many.
            for _ in 0..20 {
                assert_eq!(one(&c, "select pg_sleep(0.01)::text").await, "");
            }
            c.batch_execute("BEGIN").await.unwrap();
            let e = c.query("select pg_sleep(30)", &[]).await.unwrap_err();
            assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
            let e = c.simple_query("select 1").await.unwrap_err();
            assert_eq!(sqlstate(&e).as_deref(), Some("25P02"), "{e}");
            c.batch_execute("ROLLBACK").await.unwrap();
            assert_eq!(one(&c, "select 2").await, "2");
        }
    });
}

/// A client that leaves in the middle of COPY FROM STDIN, or of a pipeline without Sync: nothing it sent is
/// committed, and the pool keeps serving everyone else.
#[test]
fn disconnect_mid_copy_and_mid_pipeline() {
    let env = tx_env(1);
    runtime().block_on(async {
        let other = env.connect(&tx_url(&env, "")).await.unwrap();
        other
            .batch_execute("DROP TABLE IF EXISTS tx_copy; CREATE TABLE tx_copy(v int)")
            .await
            .unwrap();
        // Mid-COPY.
        let mut raw = Raw::connect_to(&env, "tx").await;
        raw.send_query("COPY tx_copy FROM STDIN").await;
        let (tag, _) = within(10, "CopyInResponse", raw.frame()).await.unwrap();
        assert_eq!(tag, b'G');
        let mut b = BytesMut::new();
        b.extend_from_slice(b"d\0\0\0\x0a1\n2\n3\n");
        raw.send(&b).await;
        drop(raw);
        // Mid-pipeline: an INSERT executed, no Sync.
        let mut raw = Raw::connect_to(&env, "tx").await;
        let mut b = BytesMut::new();
        ext::parse("", "insert into tx_copy values (99)", &mut b);
        ext::bind("", "", &[], &mut b);
        ext::execute("", &mut b);
        ext::flush(&mut b);
        raw.send(&b).await;
        let (tag, _) = within(10, "ParseComplete", raw.frame()).await.unwrap();
        assert_eq!(tag, b'1');
        drop(raw);
        // With a pool of one, the next queries need that very server connection back, clean.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match other.simple_query("select count(*) from tx_copy").await {
                Ok(r) => {
                    let n = r.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                        _ => None,
                    });
                    assert_eq!(
                        n.as_deref(),
                        Some("0"),
                        "nothing of the abandoned COPY/pipeline is committed"
                    );
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            }
        }
        assert_eq!(one(&other, "select 5").await, "5");
    });
}

/// Fairness: a tenant that saturates its pool does not delay another tenant's checkouts, and the clients waiting
/// for one pool are served in the order they came.
#[test]
fn saturated_tenant_does_not_delay_others_and_waiters_are_served_in_order() {
    let mut setup = tx_setup(1, "30s", "");
    setup.extra_config.push_str(&format!(
        r#"
[[tenants]]
id = "other"
database = "app"
cluster = "main"
backend_database = "beta_main"
backend_user = "acme_owner"
backend_password = "{OWNER_PASSWORD}"
pool_mode = "transaction"
{}"#,
        user_toml("alice", ALICE_PASSWORD, false)
    ));
    let env = Env::with(setup);
    runtime().block_on(async {
        let holder = env.connect(&tx_url(&env, "")).await.unwrap();
        holder.batch_execute("BEGIN").await.unwrap(); // tx's only server connection is taken
        let other_url = env.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            "options=endpoint=other sslmode=disable",
        );
        let other = env.connect(&other_url).await.unwrap();
        let started = Instant::now();
        for _ in 0..10 {
            assert_eq!(one(&other, "select 1").await, "1");
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );

        // Five clients queue for tx's pool, 100 ms apart; they must finish in that order.
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let c = env.connect(&tx_url(&env, "")).await.unwrap();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                // When the server ran it: the order of service, whatever the order the test tasks wake up in.
                let at = one(&c, "select to_char(clock_timestamp(), 'HH24MISSUS')").await;
                order.lock().unwrap().push((at, i));
            }));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        holder.batch_execute("COMMIT").await.unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let mut served = order.lock().unwrap().clone();
        served.sort();
        let served: Vec<i32> = served.into_iter().map(|(_, i)| i).collect();
        assert_eq!(served, vec![0, 1, 2, 3, 4]);
    });
}

/// A driver may send its last request and Terminate at once (asyncpg's close does): the request runs, as on
/// Postgres, and the server connection is kept for the next client instead of being closed mid-request — also
/// when the request leaves a transaction open (then it is rolled back).
#[test]
fn terminate_right_behind_a_request_keeps_the_server_connection() {
    let env = tx_env(1);
    psql_ok(
        &env.alice(),
        "CREATE TABLE term_pids(pid int); CREATE SEQUENCE term_seq",
    );
    runtime().block_on(async {
        // Autocommit: the insert is kept.
        let mut a = Raw::connect_to(&env, "tx").await;
        let mut m = BytesMut::new();
        ext::query("INSERT INTO term_pids SELECT pg_backend_pid()", &mut m);
        m.extend_from_slice(&[b'X', 0, 0, 0, 4]);
        a.send(&m.split()).await;
        drop(a);
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        let mut inserted = String::new();
        assert!(
            within(10, "the request before Terminate", async {
                loop {
                    inserted = one(&b, "SELECT coalesce(max(pid), 0) FROM term_pids").await;
                    if inserted != "0" {
                        break true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
        );
        assert_eq!(
            one(&b, "SELECT pg_backend_pid()").await,
            inserted,
            "the one server connection of the pool was kept"
        );
        // A request that leaves a transaction open: rolled back, and the connection still kept.
        let mut a = Raw::connect_to(&env, "tx").await;
        ext::query(
            "BEGIN; SELECT setval('term_seq', pg_backend_pid()); INSERT INTO term_pids VALUES (-1)",
            &mut m,
        );
        m.extend_from_slice(&[b'X', 0, 0, 0, 4]);
        a.send(&m.split()).await;
        drop(a);
        let mut seq = String::new();
        assert!(
            within(10, "the transaction before Terminate", async {
                loop {
                    seq = one(
                        &b,
                        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM term_seq",
                    )
                    .await;
                    if seq != "0" {
                        break true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
        );
        assert_eq!(one(&b, "SELECT pg_backend_pid()").await, seq);
        assert_eq!(
            one(&b, "SELECT count(*) FROM term_pids WHERE pid = -1").await,
            "0",
            "the open transaction was rolled back"
        );
    });
}

/// A client may send a COPY FROM STDIN statement, its data and CopyDone at once, without waiting for the server's
/// CopyInResponse — asyncpg's `copy_records_to_table` does, right after a Parse/Describe/Flush that it never
/// closes with a Sync. pgweir must see that COPY as over: if it took the server for still in COPY mode, it would
/// take the client's later Syncs for ignored ones, and the client would hold the server connection to the end.
#[test]
fn copy_sent_in_one_go_does_not_hold_the_server_connection() {
    let env = tx_env(1);
    psql_ok(&env.alice(), "CREATE TABLE copy_once(v text)");
    runtime().block_on(async {
        let mut a = Raw::connect_to(&env, "tx").await;
        let mut m = BytesMut::new();
        // asyncpg's look at the table's columns: a batch left open (Flush, no Sync).
        ext::parse("intro", "SELECT v FROM copy_once LIMIT 1", &mut m);
        ext::describe(b'S', "intro", &mut m);
        ext::flush(&mut m);
        a.send(&m.split()).await;
        let mut got = Vec::new();
        for _ in 0..3 {
            let f = within(10, "the Describe's answer", a.frame())
                .await
                .expect("a frame");
            got.push(char::from(f.0));
        }
        assert_eq!(got, ['1', 't', 'T']);
        // The COPY, its data and its end at once.
        ext::query("COPY copy_once FROM STDIN", &mut m);
        m.extend_from_slice(&[b'd', 0, 0, 0, 6, b'x', b'\n', b'c', 0, 0, 0, 4]);
        a.send(&m.split()).await;
        let copied: Vec<char> = a
            .until_ready()
            .await
            .iter()
            .map(|f| char::from(f.0))
            .collect();
        assert_eq!(copied, ['G', 'C', 'Z']);
        // The next request ends with a Sync (it also closes the open batch).
        ext::bind("", "intro", &[], &mut m);
        ext::execute("", &mut m);
        ext::sync(&mut m);
        a.send(&m.split()).await;
        let rows = a.until_ready().await;
        assert!(
            rows.iter()
                .any(|f| f.0 == b'D' && crate::raw::data_row(&f.1) == [Some("x".to_owned())]),
            "the copied row"
        );
        // The transaction is over: another client gets the pool's only server connection while a stays.
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        assert_eq!(
            within(5, "another client's query", one(&b, "SELECT 'b'")).await,
            "b"
        );
        assert_eq!(a.value("SELECT 'a'").await.as_deref(), Some("a"));
    });
}

/// A COPY started by an Execute whose batch is still open (no Sync yet) while an earlier query's answer comes:
/// that answer leaves every counted request answered, but the COPY is still to start, and the CopyDone the client
/// already sent ends it. pgweir must not forget that CopyDone (it would then take the COPY for a running one, the
/// client's Sync for an ignored one, and lose count of the server's answers: a later pipeline could end early and
/// its answers reach the next client).
#[test]
fn copy_ended_ahead_of_an_open_batch_keeps_the_count() {
    let env = tx_env(1);
    psql_ok(&env.alice(), "CREATE TABLE copy_batch(v text)");
    runtime().block_on(async {
        let mut a = Raw::connect_to(&env, "tx").await;
        let mut m = BytesMut::new();
        ext::query("SELECT 1", &mut m);
        ext::parse("", "COPY copy_batch FROM STDIN", &mut m);
        ext::bind("", "", &[], &mut m);
        ext::execute("", &mut m);
        m.extend_from_slice(&[b'd', 0, 0, 0, 6, b'x', b'\n', b'c', 0, 0, 0, 4]);
        ext::flush(&mut m);
        a.send(&m.split()).await;
        let first: Vec<char> = a
            .until_ready()
            .await
            .iter()
            .map(|f| char::from(f.0))
            .collect();
        assert_eq!(first, ['T', 'D', 'C', 'Z']);
        let mut copy = Vec::new();
        for _ in 0..4 {
            let f = within(10, "the COPY's answers", a.frame())
                .await
                .expect("a frame");
            copy.push(char::from(f.0));
        }
        assert_eq!(copy, ['1', '2', 'G', 'C']);
        ext::sync(&mut m);
        a.send(&m.split()).await;
        let synced: Vec<char> = a
            .until_ready()
            .await
            .iter()
            .map(|f| char::from(f.0))
            .collect();
        assert_eq!(synced, ['Z']);
        // Two queries at once: both answers reach this client, in order.
        ext::query("SELECT 'a1'", &mut m);
        ext::query("SELECT pg_sleep(0.2), 'a2'", &mut m);
        a.send(&m.split()).await;
        let one_ = a.results().await;
        let two = a.results().await;
        assert_eq!(one_.rows, [[Some("a1".to_owned())]]);
        assert_eq!(two.rows, [[Some(String::new()), Some("a2".to_owned())]]);
        // The transaction is over: another client gets the pool's only server connection, with its own answers.
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        assert_eq!(
            within(10, "another client's query", one(&b, "SELECT 'b'")).await,
            "b"
        );
        assert_eq!(a.value("SELECT 'a3'").await.as_deref(), Some("a3"));
        assert_eq!(
            one(&b, "SELECT count(*) FROM copy_batch").await,
            "1",
            "the copied row"
        );
    });
}

/// A Terminate behind a request is waited for only while the wait can end: not through a COPY the server starts
/// (it would wait for data that never comes), and not past a bound for a long request. Either way the server
/// connection is closed and the pool's only slot is free again for the next client.
#[test]
fn terminate_behind_a_copy_or_a_long_request_frees_the_slot() {
    let env = tx_env(1);
    psql_ok(&env.alice(), "CREATE TABLE copy_term(v text)");
    runtime().block_on(async {
        for (what, sql) in [
            ("a COPY", "COPY copy_term FROM STDIN"),
            ("a long request", "SELECT pg_sleep(120)"),
        ] {
            let mut a = Raw::connect_to(&env, "tx").await;
            let mut m = BytesMut::new();
            ext::query(sql, &mut m);
            m.extend_from_slice(&[b'X', 0, 0, 0, 4]);
            a.send(&m.split()).await;
            drop(a);
            let b = env.connect(&tx_url(&env, "")).await.unwrap();
            assert_eq!(
                within(30, what, one(&b, "SELECT 'b'")).await,
                "b",
                "the next client after {what} and Terminate"
            );
        }
    });
}

/// A COPY FROM STDIN that fails while the client still sends data (a bad row early in a long stream): the server
/// answers ErrorResponse and ReadyForQuery before the client's CopyDone. The transaction is over there; the
/// client's CopyDone that follows is a stray one. The session goes on and the connection is reused.
#[test]
fn copy_failing_mid_stream_in_transaction_mode_keeps_the_session() {
    let env = tx_env(1);
    psql_ok(&env.alice(), "CREATE TABLE copy_mid(v int)");
    runtime().block_on(async {
        let mut a = Raw::connect_to(&env, "tx").await;
        let mut m = BytesMut::new();
        ext::query("COPY copy_mid FROM STDIN", &mut m);
        a.send(&m.split()).await;
        let g = within(10, "CopyInResponse", a.frame())
            .await
            .expect("a frame");
        assert_eq!(g.0, b'G');
        m.extend_from_slice(&[b'd', 0, 0, 0, 8, b'b', b'a', b'd', b'\n']);
        a.send(&m.split()).await;
        let failed = a.until_ready().await;
        let e = failed.iter().find(|f| f.0 == b'E').expect("an error");
        assert_eq!(crate::raw::error_fields(&e.1).code, "22P02");
        // The client learns of the failure only now; its CopyDone and more data come after it.
        m.extend_from_slice(&[b'd', 0, 0, 0, 6, b'1', b'\n', b'c', 0, 0, 0, 4]);
        a.send(&m.split()).await;
        assert_eq!(a.value("SELECT 'a'").await.as_deref(), Some("a"));
        let b = env.connect(&tx_url(&env, "")).await.unwrap();
        assert_eq!(
            within(
                10,
                "another client's query",
                one(&b, "SELECT count(*) FROM copy_mid")
            )
            .await,
            "0"
        );
        assert_eq!(a.value("SELECT 'a2'").await.as_deref(), Some("a2"));
    });
}
