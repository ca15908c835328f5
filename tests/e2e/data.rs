//! The data path and session pooling, end to end: COPY in both directions, large results with bounded memory,
//! notices, errors, LISTEN/NOTIFY, cancel keys, backends that die or are down, pool exhaustion, session reset,
//! pgbench, and full-duplex forwarding. Every assertion is on what a client can observe.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{pin_mut, SinkExt, StreamExt, TryStreamExt};
use pgweir::pgcluster::PgBin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

use crate::harness::*;
use crate::raw::*;

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

/// Polls `f` until it holds, failing the test after `timeout`.
async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Idle server connections over all pools of this pgweir.
fn idle_servers(env: &Env) -> usize {
    env.proxy.pools.stats().iter().map(|s| s.server_idle).sum()
}

/// psql (`-X -A -t -q`, no ON_ERROR_STOP unless given in `args`) with `stdin` piped in.
fn psql_stdin(conn: &str, args: &[&str], stdin: &[u8]) -> Output {
    let bin = PgBin::locate().unwrap().tool("psql");
    let mut child = Command::new(bin)
        .args(["-X", "-A", "-t", "-q", "-d", conn])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
        // dropping `input` closes psql's stdin
    });
    let out = child.wait_with_output().expect("wait for psql");
    writer.join().unwrap();
    out
}

/// One value from a simple query.
async fn scalar(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    let msgs = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    msgs.into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    scalar(client, "select pg_backend_pid()")
        .await
        .unwrap()
        .parse()
        .unwrap()
}

/// Waits until backend `pid` is running a query containing `needle` (seen from a superuser connection).
async fn wait_active(admin: &tokio_postgres::Client, pid: i32, needle: &str) {
    let pattern = format!("%{needle}%");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = admin
            .query_opt(
                "select 1 from pg_stat_activity where pid = $1 and state = 'active' and query like $2",
                &[&pid, &pattern],
            )
            .await
            .unwrap();
        if row.is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} never ran {needle:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn terminate_backend(env: &Env, pid: i32) {
    let admin = env.cluster.connect("postgres").await.unwrap();
    let row = admin
        .query_one("select pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "pg_terminate_backend({pid}) failed");
}

/// Sends a raw CancelRequest (length 16, code 80877102) to `addr` and waits until it is handled (the receiver
/// closes the connection without answering).
async fn cancel_request(addr: SocketAddr, pid: i32, secret: i32) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = Vec::with_capacity(16);
    req.extend_from_slice(&16u32.to_be_bytes());
    req.extend_from_slice(&80877102u32.to_be_bytes());
    req.extend_from_slice(&pid.to_be_bytes());
    req.extend_from_slice(&secret.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut answer = [0u8; 64];
    let r = within(
        10,
        "pgweir closing a cancel connection",
        s.read(&mut answer),
    )
    .await;
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "a CancelRequest must get no answer, got {r:?}"
    );
}

/// SQLSTATE and message of a server error, else the error itself.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {} {:?}", d.severity(), d.code().code(), d.message()),
        None => e.to_string(),
    }
}

fn vm_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

// ---------------------------------------------------------------------------------------------------------------
// A raw protocol client: sees BackendKeyData, ReadyForQuery status bytes and every ErrorResponse as sent.
// ---------------------------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------------------------
// 1. COPY
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn copy_from_stdin_via_psql_100k_rows() {
    let env = Env::start();
    psql_ok(
        &env.alice(),
        "create table copy_psql(id int primary key, name text not null)",
    );
    let mut input = Vec::new();
    for i in 1..=100_000 {
        writeln!(input, "{i}\tname-{i}").unwrap();
    }
    let out = psql_stdin(
        &env.alice(),
        &["-v", "ON_ERROR_STOP=1", "-c", "COPY copy_psql FROM STDIN"],
        &input,
    );
    assert!(
        out.status.success(),
        "COPY FROM STDIN failed: {}",
        text(&out.stderr)
    );
    assert_eq!(
        psql_ok(
            &env.alice(),
            "select count(*), sum(id), max(name) filter (where id = 99999) from copy_psql"
        ),
        "100000|5000050000|name-99999"
    );
}

#[test]
fn copy_to_stdout_via_psql_200k_lines() {
    let env = Env::start();
    let out = psql_ok(
        &env.alice(),
        "COPY (select generate_series(1, 200000)) TO STDOUT",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 200_000);
    assert_eq!(lines[0], "1");
    assert_eq!(lines[199_999], "200000");
    let sum: u64 = lines.iter().map(|l| l.parse::<u64>().unwrap()).sum();
    assert_eq!(sum, 200_000 * 200_001 / 2);
}

#[test]
fn copy_in_and_out_with_tokio_postgres_round_trip() {
    let env = Env::start();
    let rt = runtime();
    rt.block_on(async {
        let client = env.connect(&env.alice()).await.unwrap();
        client
            .batch_execute("create table copy_tp(id int primary key, body text)")
            .await
            .unwrap();
        let mut input = Vec::new();
        for i in 1..=100_000 {
            writeln!(input, "{i}\trow {i} with a tab-free body").unwrap();
        }
        let sink = client
            .copy_in::<_, Bytes>("COPY copy_tp FROM STDIN")
            .await
            .unwrap();
        pin_mut!(sink);
        for chunk in input.chunks(64 * 1024) {
            sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        let n = within(60, "copy_in finish", sink.as_mut().finish())
            .await
            .unwrap();
        assert_eq!(n, 100_000);

        let stream = client
            .copy_out("COPY (select * from copy_tp order by id) TO STDOUT")
            .await
            .unwrap();
        pin_mut!(stream);
        let mut output = Vec::with_capacity(input.len());
        let mut chunks = 0;
        while let Some(chunk) = within(30, "copy_out chunk", stream.try_next())
            .await
            .unwrap()
        {
            output.extend_from_slice(&chunk);
            chunks += 1;
        }
        assert_eq!(chunks, 100_000, "one CopyData per row");
        assert!(output == input, "COPY TO STDOUT returned other bytes");
        // The connection is still in sync.
        assert_eq!(scalar(&client, "select 7").await.as_deref(), Some("7"));
    });
}

#[test]
fn copy_from_with_bad_row_returns_22p02_and_session_stays_usable() {
    let env = Env::start();
    psql_ok(&env.alice(), "create table copy_bad(a int)");

    // psql: the server's error (verbose: with the SQLSTATE), then the next command on the same connection runs.
    let out = psql_stdin(
        &env.alice(),
        &[
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "COPY copy_bad FROM STDIN",
            "-c",
            "select count(*) from copy_bad",
        ],
        b"1\n2\nnot_a_number\n4\n",
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("ERROR:  22P02: invalid input syntax for type integer: \"not_a_number\""),
        "{stderr}"
    );
    assert_eq!(text(&out.stdout).trim(), "0", "stderr: {stderr}");

    let rt = runtime();
    rt.block_on(async {
        let client = env.connect(&env.alice()).await.unwrap();
        let sink = client
            .copy_in::<_, Bytes>("COPY copy_bad FROM STDIN")
            .await
            .unwrap();
        pin_mut!(sink);
        sink.send(Bytes::from_static(b"1\n2\nnot_a_number\n4\n"))
            .await
            .unwrap();
        let err = within(30, "copy_in finish", sink.as_mut().finish())
            .await
            .expect_err("a bad row must fail the COPY");
        assert_eq!(sqlstate(&err).as_deref(), Some("22P02"), "{err:?}");
        let db = err.as_db_error().unwrap();
        assert!(
            db.message()
                .contains("invalid input syntax for type integer"),
            "{}",
            db.message()
        );
        assert_eq!(
            scalar(&client, "select count(*) from copy_bad")
                .await
                .as_deref(),
            Some("0")
        );
        // And a good COPY works afterwards on the same session.
        let sink = client
            .copy_in::<_, Bytes>("COPY copy_bad FROM STDIN")
            .await
            .unwrap();
        pin_mut!(sink);
        sink.send(Bytes::from_static(b"1\n2\n3\n")).await.unwrap();
        assert_eq!(sink.as_mut().finish().await.unwrap(), 3);
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Large result, bounded memory
// ---------------------------------------------------------------------------------------------------------------

/// Streams `rows` rows of 1000 bytes, pausing once (so that pgweir must apply backpressure) after `pause_at`.
async fn stream_rows(
    client: &tokio_postgres::Client,
    rows: u64,
    pause_at: Option<u64>,
) -> (u64, u64) {
    let sql = format!("select repeat('x', 1000) from generate_series(1, {rows})");
    let stream = client
        .query_raw(sql.as_str(), Vec::<i32>::new())
        .await
        .unwrap();
    pin_mut!(stream);
    let (mut n, mut bytes) = (0u64, 0u64);
    while let Some(row) = stream.try_next().await.unwrap() {
        let v: &str = row.get(0);
        bytes += v.len() as u64;
        n += 1;
        if Some(n) == pause_at {
            // Deliberate: the client stops reading while the server keeps producing.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
    (n, bytes)
}

#[test]
fn large_result_streams_with_bounded_memory() {
    let env = Env::start();
    let rt = runtime();
    rt.block_on(async {
        let client = env.connect(&env.alice()).await.unwrap();
        // Warm up buffers and allocator arenas on both sides.
        assert_eq!(stream_rows(&client, 20_000, None).await.0, 20_000);

        let base = vm_rss_kb();
        let peak = Arc::new(AtomicU64::new(base));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(vm_rss_kb(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let started = Instant::now();
        let (rows, bytes) = within(
            120,
            "streaming 300 MB",
            stream_rows(&client, 300_000, Some(100_000)),
        )
        .await;
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        sampler.join().unwrap();
        peak.fetch_max(vm_rss_kb(), Ordering::Relaxed);
        let peak = peak.load(Ordering::Relaxed);
        let growth_kb = peak.saturating_sub(base);
        println!(
            "large result: {rows} rows, {} MB of values in {:.2?} (incl. 1.5 s pause); \
             test process VmRSS base {} MB, peak {} MB, growth {:.1} MB",
            bytes / 1_000_000,
            elapsed,
            base / 1024,
            peak / 1024,
            growth_kb as f64 / 1024.0
        );
        assert_eq!(rows, 300_000);
        assert_eq!(bytes, 300_000_000);
        assert!(
            growth_kb < 50 * 1024,
            "RSS grew by {growth_kb} kB while streaming 300 MB"
        );
        // The session is in sync afterwards.
        assert_eq!(
            scalar(&client, "select 'after'").await.as_deref(),
            Some("after")
        );
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 3. NOTICE and errors
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn notice_reaches_psql_and_errors_keep_the_session() {
    let env = Env::start();
    let out = psql_stdin(
        &env.alice(),
        &[
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$",
            "-c",
            "select 1/0",
            "-c",
            "select 'still here'",
        ],
        b"",
    );
    let stderr = text(&out.stderr);
    assert!(stderr.contains("NOTICE:  00000: hello 42"), "{stderr}");
    assert!(
        stderr.contains("ERROR:  22012: division by zero"),
        "{stderr}"
    );
    assert_eq!(text(&out.stdout).trim(), "still here", "stderr: {stderr}");

    let rt = runtime();
    rt.block_on(async {
        let client = env.connect(&env.alice()).await.unwrap();
        let err = client.simple_query("select 1/0").await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("22012"));
        let db = err.as_db_error().unwrap();
        assert_eq!(db.message(), "division by zero");
        assert_eq!(db.severity(), "ERROR");
        // Extended protocol too.
        let err = client
            .query("select 1/$1::int", &[&0i32])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("22012"));
        let row = client
            .query_one("select $1::int + 1", &[&41i32])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 4. LISTEN / NOTIFY
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn listen_notify_between_two_clients() {
    let env = Env::start();
    let rt = runtime();
    rt.block_on(async {
        let (a, mut conn) = tokio_postgres::connect(&env.alice(), NoTls).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = tx.send(n);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        a.batch_execute("LISTEN data_chan").await.unwrap();

        let b = env.connect(&env.alice()).await.unwrap();
        let b_pid = backend_pid(&b).await;
        b.batch_execute("NOTIFY data_chan, 'payload from b'")
            .await
            .unwrap();
        let n = within(10, "notification", rx.recv()).await.unwrap();
        assert_eq!(n.channel(), "data_chan");
        assert_eq!(n.payload(), "payload from b");
        assert_eq!(n.process_id(), b_pid);

        // A large payload, sent with pg_notify, arrives whole.
        let big = "p".repeat(7000);
        b.execute("select pg_notify('data_chan', $1)", &[&big])
            .await
            .unwrap();
        let n = within(10, "second notification", rx.recv()).await.unwrap();
        assert_eq!(n.payload(), big);
        assert_eq!(n.process_id(), b_pid);
        // A is still usable.
        assert_eq!(
            scalar(&a, "select count(*) from pg_listening_channels()")
                .await
                .as_deref(),
            Some("1")
        );
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 5. pg_backend_pid and the client-visible key
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn backend_pid_matches_key_and_terminate_ends_only_that_session() {
    let env = Env::start();
    let rt = runtime();
    rt.block_on(async {
        let mut raw = Raw::connect(&env).await;
        let pid = raw.value("select pg_backend_pid()").await;
        assert_eq!(
            pid.as_deref(),
            Some(raw.pid.to_string().as_str()),
            "BackendKeyData pid vs pg_backend_pid()"
        );

        let other = env.connect(&env.alice()).await.unwrap();
        let x = env.connect(&env.alice()).await.unwrap();
        let x_pid = backend_pid(&x).await;
        assert_ne!(x_pid, raw.pid);

        // Terminate the raw client's backend while it is idle: the server's FATAL reaches it, then the end.
        terminate_backend(&env, raw.pid).await;
        let (tag, body) = within(10, "FATAL after pg_terminate_backend", raw.frame())
            .await
            .expect("an ErrorResponse before the connection closes");
        assert_eq!(tag, b'E');
        let e = error_fields(&body);
        assert_eq!(
            (e.severity.as_str(), e.code.as_str()),
            ("FATAL", "57P01"),
            "{e:?}"
        );
        // Nothing but errors follows, then the connection closes.
        while let Some((tag, body)) = within(10, "pgweir closing", raw.frame()).await {
            assert_eq!(tag, b'E', "unexpected {:?} after FATAL", tag as char);
            let e = error_fields(&body);
            assert_eq!(e.severity, "FATAL", "{e:?}");
        }

        // tokio-postgres client whose backend is terminated.
        terminate_backend(&env, x_pid).await;
        eventually(
            "x to see its connection closed",
            Duration::from_secs(10),
            || x.is_closed(),
        )
        .await;
        let err = x.simple_query("select 1").await.unwrap_err();
        assert!(err.is_closed(), "{err:?}");

        // Others are unaffected.
        assert_eq!(scalar(&other, "select 1").await.as_deref(), Some("1"));
        let fresh = env.connect(&env.alice()).await.unwrap();
        assert_eq!(scalar(&fresh, "select 2").await.as_deref(), Some("2"));
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 6. Cancel
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn cancel_token_cancels_the_running_query() {
    let env = Env::start();
    let rt = runtime();
    rt.block_on(async {
        let admin = env.cluster.connect("acme_main").await.unwrap();
        let client = Arc::new(env.connect(&env.alice()).await.unwrap());
        let pid = backend_pid(&client).await;
        let token = client.cancel_token();
        let running = {
            let client = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = client.simple_query("select pg_sleep(30)").await;
                (r, started.elapsed())
            })
        };
        wait_active(&admin, pid, "pg_sleep(30)").await;
        let cancelled_at = Instant::now();
        token.cancel_query(NoTls).await.unwrap();
        let (r, elapsed) = within(10, "cancelled query", running).await.unwrap();
        let err = r.expect_err("the query must be cancelled");
        assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err:?}");
        println!(
            "cancel: query ended {:.2?} after the cancel request ({:.2?} in total)",
            cancelled_at.elapsed(),
            elapsed
        );
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
        assert_eq!(scalar(&client, "select 1").await.as_deref(), Some("1"));
    });
}

#[test]
fn forged_cancel_request_cancels_nothing() {
    let env = Env::start();
    let rt = runtime();
    rt.block_on(async {
        let admin = env.cluster.connect("acme_main").await.unwrap();
        let client = Arc::new(env.connect(&env.alice()).await.unwrap());
        let pid = backend_pid(&client).await;
        let running = {
            let client = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = client.simple_query("select pg_sleep(1.5)").await;
                (r, started.elapsed())
            })
        };
        wait_active(&admin, pid, "pg_sleep(1.5)").await;
        // The right pid (the client sees the server's pid) with secrets that are not the client's.
        for secret in [0, -1, 1, 0x1234_5678, rand::random::<i32>()] {
            cancel_request(env.addr, pid, secret).await;
        }
        let (r, elapsed) = within(20, "query with forged cancels", running)
            .await
            .unwrap();
        r.expect("forged cancel requests must not cancel the query");
        assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
    });
}

#[test]
fn raw_cancel_request_needs_the_key_from_backend_key_data() {
    let env = Env::start();
    let rt = runtime();
    rt.block_on(async {
        let admin = env.cluster.connect("acme_main").await.unwrap();
        let mut raw = Raw::connect(&env).await;
        raw.send_query("select pg_sleep(30)").await;
        wait_active(&admin, raw.pid, "pg_sleep(30)").await;
        // Wrong secret: handled (connection closed) and nothing happens.
        cancel_request(env.addr, raw.pid, raw.secret.wrapping_add(1)).await;
        // The backend has had the cancel request (if any) in hand since before pgweir closed the socket; the
        // query is still running.
        let still = admin
            .query_one(
                "select state, query from pg_stat_activity where pid = $1",
                &[&raw.pid],
            )
            .await
            .unwrap();
        assert_eq!(still.get::<_, &str>(0), "active");
        // Right key: cancelled.
        let t = Instant::now();
        cancel_request(env.addr, raw.pid, raw.secret).await;
        let r = within(10, "cancelled query", raw.results()).await;
        let e = r.error.expect("cancelled");
        assert_eq!(e.code, "57014", "{e:?}");
        assert_eq!(e.message, "canceling statement due to user request");
        assert_eq!(r.status, b'I');
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(raw.value("select 5").await.as_deref(), Some("5"));
    });
}

#[test]
fn psql_ctrl_c_cancels_through_pgweir() {
    let env = Env::start();
    let rt = runtime();
    let conn = format!("{} application_name=pgweir_psql_cancel", env.alice());
    let bin = PgBin::locate().unwrap().tool("psql");
    let child = Command::new(bin)
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", &conn])
        .args(["-c", "select pg_sleep(30)"])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    rt.block_on(async {
        let admin = env.cluster.connect("acme_main").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let row = admin
                .query_opt(
                    "select 1 from pg_stat_activity where application_name = 'pgweir_psql_cancel' \
                     and state = 'active' and query like '%pg_sleep(30)%'",
                    &[],
                )
                .await
                .unwrap();
            if row.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "psql's query never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let t = Instant::now();
    // SAFETY: sends SIGINT to our own child process.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0);
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

// ---------------------------------------------------------------------------------------------------------------
// 7. Backend killed mid-query; cluster restart
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn backend_killed_mid_query_fails_promptly_and_others_work() {
    let env = Env::start();
    let rt = runtime();
    rt.block_on(async {
        let admin = env.cluster.connect("acme_main").await.unwrap();
        let other = env.connect(&env.alice()).await.unwrap();
        let victim = Arc::new(env.connect(&env.alice()).await.unwrap());
        let pid = backend_pid(&victim).await;
        let running = {
            let victim = victim.clone();
            tokio::spawn(async move { victim.simple_query("select pg_sleep(10)").await })
        };
        wait_active(&admin, pid, "pg_sleep(10)").await;
        let killed_at = Instant::now();
        terminate_backend(&env, pid).await;
        let r = within(5, "the killed query", running).await.unwrap();
        let err = r.expect_err("the query's backend was terminated");
        let took = killed_at.elapsed();
        println!(
            "killed mid-query: client saw {} after {took:.2?}",
            describe(&err)
        );
        match sqlstate(&err) {
            Some(code) => assert!(code == "57P01" || code == "08006", "{err:?}"),
            None => panic!("expected the server's 57P01, got {err:?}"),
        }
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(scalar(&other, "select 1").await.as_deref(), Some("1"));
        let fresh = env.connect(&env.alice()).await.unwrap();
        assert_eq!(scalar(&fresh, "select 2").await.as_deref(), Some("2"));
    });
}

#[test]
fn pool_recovers_after_cluster_restart() {
    let mut env = Env::start();
    let rt = runtime();
    let (before_pid, active) = rt.block_on(async {
        // A session that stays attached during the restart...
        let active = env.connect(&env.alice()).await.unwrap();
        let active_pid = backend_pid(&active).await;
        // ...and a pooled idle connection.
        let c = env.connect(&env.alice()).await.unwrap();
        let pid = backend_pid(&c).await;
        assert_ne!(pid, active_pid);
        drop(c);
        eventually(
            "the connection to be pooled",
            Duration::from_secs(10),
            || idle_servers(&env) == 1,
        )
        .await;
        (pid, active)
    });
    env.cluster.restart().unwrap();
    rt.block_on(async {
        // The attached session learns that its server is gone.
        let err = within(10, "query on a session whose server restarted", async {
            active.simple_query("select 1").await
        })
        .await
        .expect_err("its server connection died");
        println!("attached session after restart: {}", describe(&err));
        // The dead idle connection is not handed out: the first new session works.
        let t = Instant::now();
        let c = env
            .connect(&env.alice())
            .await
            .expect("first connection after the restart");
        let pid = backend_pid(&c).await;
        assert_ne!(pid, before_pid);
        assert_eq!(scalar(&c, "select 'ok'").await.as_deref(), Some("ok"));
        println!("first session after restart ready in {:.2?}", t.elapsed());
        drop(c);
        // And the pool keeps working.
        for _ in 0..3 {
            let c = env.connect(&env.alice()).await.unwrap();
            assert_eq!(scalar(&c, "select 1").await.as_deref(), Some("1"));
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 8. Backend down
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn backend_down_gives_08006_quickly_then_recovers() {
    let mut env = Env::start();
    let rt = runtime();
    rt.block_on(async {
        let c = env.connect(&env.alice()).await.unwrap();
        assert_eq!(scalar(&c, "select 1").await.as_deref(), Some("1"));
    });
    env.cluster.stop().unwrap();
    rt.block_on(async {
        let t = Instant::now();
        let err = within(
            10,
            "connect while the cluster is down",
            env.connect(&env.alice()),
        )
        .await
        .expect_err("the cluster is down");
        let took = t.elapsed();
        println!("backend down: {} after {took:.2?}", describe(&err));
        assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err:?}");
        assert!(
            err.as_db_error()
                .unwrap()
                .message()
                .contains("could not connect"),
            "{err:?}"
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
    });
    let err = psql_err(&env.alice(), "select 1");
    assert!(
        err.contains("could not connect to the database server"),
        "{err}"
    );
    env.cluster.start().unwrap();
    rt.block_on(async {
        let c = env
            .connect(&env.alice())
            .await
            .expect("connect after the cluster is back");
        assert_eq!(scalar(&c, "select 1").await.as_deref(), Some("1"));
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 9. Pool exhaustion
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn pool_exhaustion_gives_53300_after_checkout_timeout() {
    let env = Env::with(Setup {
        pool: "max_size = 2\ncheckout_timeout = \"1s\"".into(),
        ..Setup::default()
    });
    let rt = runtime();
    rt.block_on(async {
        let c1 = env.connect(&env.alice()).await.unwrap();
        let c2 = env.connect(&env.alice()).await.unwrap();
        assert_eq!(scalar(&c1, "select 1").await.as_deref(), Some("1"));
        assert_eq!(scalar(&c2, "select 2").await.as_deref(), Some("2"));

        let t = Instant::now();
        let err = within(10, "a third client", env.connect(&env.alice()))
            .await
            .expect_err("the pool is exhausted");
        let took = t.elapsed();
        println!("pool exhausted: {} after {took:.2?}", describe(&err));
        assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err:?}");
        assert_eq!(err.as_db_error().unwrap().severity(), "FATAL");
        assert!(
            took >= Duration::from_millis(950) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // Timeouts are looked at on a tick of the pool's that runs only while someone waits: after a pause with
        // no waiter (it has stopped), the next waiter starts it again and times out as the first did.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let t = Instant::now();
        let err = within(10, "a fourth client", env.connect(&env.alice()))
            .await
            .expect_err("the pool is still exhausted");
        let took = t.elapsed();
        assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err:?}");
        assert!(
            took >= Duration::from_millis(950) && took < Duration::from_secs(3),
            "{took:?}"
        );

        // Both holders still work; after one leaves, a new client gets its connection.
        assert_eq!(scalar(&c2, "select 3").await.as_deref(), Some("3"));
        let c1_pid = backend_pid(&c1).await;
        drop(c1);
        eventually(
            "c1's connection back in the pool",
            Duration::from_secs(10),
            || idle_servers(&env) == 1,
        )
        .await;
        let c3 = env.connect(&env.alice()).await.unwrap();
        assert_eq!(backend_pid(&c3).await, c1_pid);

        // A waiter is served when a connection is released within the checkout timeout.
        let c2_pid = backend_pid(&c2).await;
        let waiter = {
            let url = env.alice();
            tokio::spawn(async move {
                let (c, conn) = tokio_postgres::connect(&url, NoTls).await?;
                tokio::spawn(conn);
                Ok::<_, tokio_postgres::Error>(backend_pid(&c).await)
            })
        };
        eventually("the waiter to queue", Duration::from_secs(10), || {
            env.proxy
                .pools
                .stats()
                .iter()
                .any(|s| s.clients_waiting == 1)
        })
        .await;
        drop(c2);
        let got = within(10, "the waiting client", waiter)
            .await
            .unwrap()
            .expect("the waiter gets the released connection");
        assert_eq!(got, c2_pid);
        drop(c3);
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 10. Session reset
// ---------------------------------------------------------------------------------------------------------------

fn single_connection_pool() -> Env {
    Env::with(Setup {
        pool: "max_size = 1\ncheckout_timeout = \"5s\"".into(),
        ..Setup::default()
    })
}

#[test]
fn session_state_is_reset_between_clients() {
    let env = single_connection_pool();
    let rt = runtime();
    rt.block_on(async {
        let s1 = env.connect(&env.alice()).await.unwrap();
        let pid1 = backend_pid(&s1).await;
        s1.batch_execute(
            "SET statement_timeout = 777; CREATE TEMP TABLE tmp_x(a int); \
             PREPARE p AS SELECT 1; LISTEN chan; SET application_name = 'dirty'",
        )
        .await
        .unwrap();
        assert_eq!(
            scalar(&s1, "show statement_timeout").await.as_deref(),
            Some("777ms")
        );
        drop(s1);
        eventually(
            "s1's connection back in the pool",
            Duration::from_secs(10),
            || idle_servers(&env) == 1,
        )
        .await;

        let s2 = env.connect(&env.alice()).await.unwrap();
        assert_eq!(backend_pid(&s2).await, pid1, "the same server connection");
        assert_eq!(
            scalar(&s2, "show statement_timeout").await.as_deref(),
            Some("0")
        );
        assert_eq!(scalar(&s2, "select to_regclass('tmp_x')::text").await, None);
        assert_eq!(
            scalar(&s2, "select count(*) from pg_prepared_statements")
                .await
                .as_deref(),
            Some("0")
        );
        assert_eq!(
            scalar(&s2, "select count(*) from pg_listening_channels()")
                .await
                .as_deref(),
            Some("0")
        );
        assert_eq!(
            scalar(&s2, "show application_name").await.as_deref(),
            Some("")
        );
        // The name p is free again.
        s2.batch_execute("PREPARE p AS SELECT 2; DEALLOCATE p")
            .await
            .unwrap();
    });
}

#[test]
fn client_leaving_mid_transaction_is_rolled_back() {
    let env = single_connection_pool();
    psql_ok(&env.alice(), "create table tx_t(a int)");
    let rt = runtime();
    rt.block_on(async {
        eventually("the connection pooled", Duration::from_secs(10), || {
            idle_servers(&env) == 1
        })
        .await;
        // tokio-postgres: BEGIN; INSERT; then the client goes away (Terminate).
        let c = env.connect(&env.alice()).await.unwrap();
        let pid = backend_pid(&c).await;
        c.batch_execute("BEGIN; INSERT INTO tx_t VALUES (1)")
            .await
            .unwrap();
        drop(c);
        eventually(
            "the connection back in the pool",
            Duration::from_secs(10),
            || idle_servers(&env) == 1,
        )
        .await;

        // Raw client: its ReadyForQuery shows the connection idle, not in a transaction.
        let mut raw = Raw::connect(&env).await;
        assert_eq!(raw.pid, pid, "the same server connection");
        let r = raw.query("select count(*) from tx_t").await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.rows[0][0].as_deref(), Some("0"));
        assert_eq!(r.status, b'I');
        assert_eq!(
            raw.value("select pg_current_xact_id_if_assigned()::text")
                .await,
            None
        );

        // Raw client: BEGIN; INSERT; then the TCP connection just drops (no Terminate).
        let r = raw.query("BEGIN; INSERT INTO tx_t VALUES (2)").await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.status, b'T');
        drop(raw);
        eventually(
            "the connection back in the pool",
            Duration::from_secs(10),
            || idle_servers(&env) == 1,
        )
        .await;
        let mut raw = Raw::connect(&env).await;
        assert_eq!(raw.pid, pid, "the same server connection");
        let r = raw.query("select count(*) from tx_t").await;
        assert_eq!(r.rows[0][0].as_deref(), Some("0"));
        assert_eq!(r.status, b'I');
        // The same connection takes new transactions normally.
        let r = raw
            .query("BEGIN; INSERT INTO tx_t VALUES (3); COMMIT")
            .await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.status, b'I');
        assert_eq!(
            raw.value("select string_agg(a::text, ',') from tx_t")
                .await
                .as_deref(),
            Some("3")
        );
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 11. pgbench
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn pgbench_through_pgweir() {
    let env = Env::start();
    let pgbench = PgBin::locate().unwrap().tool("pgbench");
    let conn = env.alice();
    let run = |args: &[&str]| -> Output {
        Command::new(&pgbench)
            .args(args)
            .arg(&conn)
            .env_remove("PGPASSWORD")
            .env_remove("PGSSLMODE")
            .output()
            .expect("run pgbench")
    };
    // Initialization through pgweir (DDL, COPY of 100k accounts, VACUUM, primary keys).
    let t = Instant::now();
    let init = run(&["-i", "-s", "1", "-q"]);
    assert!(
        init.status.success(),
        "pgbench -i failed:\n{}\n{}",
        text(&init.stdout),
        text(&init.stderr)
    );
    println!("pgbench -i -s 1 through pgweir: {:.2?}", t.elapsed());
    assert_eq!(
        psql_ok(&conn, "select count(*) from pgbench_accounts"),
        "100000"
    );

    let t = Instant::now();
    let out = run(&["-c", "4", "-j", "2", "-t", "200"]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    println!(
        "pgbench -c 4 -j 2 -t 200 through pgweir ({:.2?}):\n{stdout}",
        t.elapsed()
    );
    assert!(out.status.success(), "pgbench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("number of transactions actually processed: 800/800"),
        "{stdout}"
    );
    if stdout.contains("number of failed transactions") {
        assert!(
            stdout.contains("number of failed transactions: 0 (0.000%)"),
            "{stdout}"
        );
    }
    // Every tpcb-like transaction inserted one history row and moved money consistently.
    assert_eq!(
        psql_ok(&conn, "select count(*) from pgbench_history"),
        "800"
    );
    assert_eq!(
        psql_ok(
            &conn,
            "select (select sum(abalance) from pgbench_accounts) = (select sum(bbalance) from pgbench_branches) \
             and (select sum(tbalance) from pgbench_tellers) = (select sum(delta) from pgbench_history)"
        ),
        "t"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// 12. Full duplex
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn copy_in_error_arrives_while_the_client_is_still_streaming() {
    let env = Env::start();
    psql_ok(
        &env.alice(),
        "create table duplex_t(a int not null check (a > 0))",
    );
    let rt = runtime();
    rt.block_on(async {
        let mut raw = Raw::connect(&env).await;
        raw.send_query("COPY duplex_t FROM STDIN").await;
        let (tag, _) = raw.frame().await.unwrap();
        assert_eq!(tag, b'G', "CopyInResponse");

        const LIMIT: u64 = 2 << 30;
        let Raw {
            stream, mut buf, ..
        } = raw;
        let (mut rd, mut wr) = stream.into_split();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, sent) = (stop.clone(), sent.clone());
            tokio::spawn(async move {
                let copy_data = |rows: &[u8]| {
                    let mut m = BytesMut::with_capacity(rows.len() + 5);
                    m.put_u8(b'd');
                    m.put_u32(rows.len() as u32 + 4);
                    m.put_slice(rows);
                    m.freeze()
                };
                // The second row violates the check constraint; then an endless stream of good rows.
                let first = copy_data(b"1\n-1\n");
                wr.write_all(&first).await.unwrap();
                sent.fetch_add(first.len() as u64, Ordering::Relaxed);
                let chunk = copy_data(&b"7\n".repeat(32 * 1024));
                while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < LIMIT {
                    if wr.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                wr.write_all(&[b'c', 0, 0, 0, 4]).await.unwrap(); // CopyDone, ignored by now
                wr
            })
        };
        let mut error = None;
        let mut sent_at_error = 0;
        let t = Instant::now();
        let status = within(60, "the server's error while streaming", async {
            loop {
                let (tag, body) = next_frame(&mut rd, &mut buf)
                    .await
                    .expect("connection closed");
                match tag {
                    b'E' => {
                        sent_at_error = sent.load(Ordering::Relaxed);
                        stop.store(true, Ordering::Relaxed);
                        error = Some(error_fields(&body));
                    }
                    b'Z' => return body[0],
                    _ => {}
                }
            }
        })
        .await;
        let e = error.expect("an ErrorResponse");
        println!(
            "full duplex: {} {:?} after {:.2?}, with {} kB of COPY data sent",
            e.code,
            e.message,
            t.elapsed(),
            sent_at_error / 1024
        );
        assert_eq!(e.code, "23514", "{e:?}");
        assert!(
            sent_at_error < LIMIT,
            "the error only came after all data was sent"
        );
        assert_eq!(status, b'I');
        let wr = within(60, "the writer to stop", writer).await.unwrap();
        let stream = rd.reunite(wr).unwrap();
        let mut raw = Raw {
            stream,
            buf,
            pid: 0,
            secret: 0,
        };
        assert_eq!(
            raw.value("select count(*) from duplex_t").await.as_deref(),
            Some("0")
        );
    });

    // tokio-postgres: the sink's finish reports the server's error instead of hanging.
    rt.block_on(async {
        let client = env.connect(&env.alice()).await.unwrap();
        let sink = client
            .copy_in::<_, Bytes>("COPY duplex_t FROM STDIN")
            .await
            .unwrap();
        pin_mut!(sink);
        let err = within(60, "copy_in with an early bad row", async {
            sink.send(Bytes::from_static(b"1\n-1\n")).await?;
            let chunk = Bytes::from(b"7\n".repeat(32 * 1024));
            for _ in 0..320 {
                sink.send(chunk.clone()).await?;
            }
            sink.as_mut().finish().await
        })
        .await
        .expect_err("the check constraint is violated");
        assert_eq!(sqlstate(&err).as_deref(), Some("23514"), "{err:?}");
        assert_eq!(
            scalar(&client, "select count(*) from duplex_t")
                .await
                .as_deref(),
            Some("0")
        );
    });
}
