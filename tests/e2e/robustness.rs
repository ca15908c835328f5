//! Malformed and hostile input over raw TCP: every case ends with a visible answer (an ErrorResponse with the right
//! SQLSTATE, then a clean close) or a clean close — never a hang (every read has a timeout) — and the process keeps
//! serving everyone else afterwards.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use pgweir::auth::md5::md5_client_response;
use rand::{Rng, SeedableRng};

use crate::harness::*;

/// Longest a test waits for any answer: far above what a healthy proxy needs, far below a test runner timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const CAROL_PASSWORD: &str = "carol-secret";
const PROTOCOL_3_0: u32 = 196608;

/// A tenant whose only login method is md5, so that tests can log in by hand.
fn md5_tenant() -> String {
    acme_tenant(
        "plain",
        "auth = [\"md5\"]",
        &[user_toml("carol", CAROL_PASSWORD, true)],
    )
}

fn env_with(proxy: &str) -> Env {
    Env::with(Setup {
        extra_config: md5_tenant(),
        proxy: proxy.to_owned(),
        ..Setup::default()
    })
}

/// A regular client (psql, SCRAM) still gets served.
fn assert_serving(env: &Env, after: &str) {
    let out = psql(&env.alice(), "select 1");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "1",
        "after {after}: a regular client is no longer served: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn connect(env: &Env) -> TcpStream {
    let s = TcpStream::connect(env.addr).expect("connect to pgweir");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// A message from pgweir: tag and body.
#[derive(Debug)]
struct Msg {
    tag: u8,
    body: Vec<u8>,
}

/// How the connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Orderly close (FIN).
    Eof,
    /// Reset by the peer.
    Reset,
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Reads one message. `None` when the connection ended exactly at a message boundary.
fn read_msg(s: &mut TcpStream) -> Option<Msg> {
    let mut header = [0u8; 5];
    let mut got = 0;
    while got < header.len() {
        match s.read(&mut header[got..]) {
            Ok(0) if got == 0 => return None,
            Ok(0) => panic!("connection closed inside a message header"),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => panic!("no answer within {IO_TIMEOUT:?}: pgweir hangs"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset && got == 0 => return None,
            Err(e) => panic!("read failed: {e}"),
        }
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    assert!(
        (4..1 << 20).contains(&len),
        "pgweir sent a message with length {len}"
    );
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).unwrap_or_else(|e| {
        if is_timeout(&e) {
            panic!("no answer within {IO_TIMEOUT:?}: pgweir hangs inside a message")
        }
        panic!("connection ended inside a message: {e}")
    });
    Some(Msg {
        tag: header[0],
        body,
    })
}

/// Reads everything until the connection ends; panics if it does not end within the timeout.
fn read_until_close(s: &mut TcpStream) -> (Vec<Msg>, End) {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        assert!(
            Instant::now() < deadline,
            "pgweir did not close the connection within {IO_TIMEOUT:?}"
        );
        match s.read(&mut chunk) {
            Ok(0) => break End::Eof,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break End::Reset,
            Err(e) if is_timeout(&e) => {
                panic!("pgweir neither answered nor closed within {IO_TIMEOUT:?}: it hangs")
            }
            Err(e) => panic!("read failed: {e}"),
        }
    };
    let mut msgs = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        assert!(rest.len() >= 5, "trailing partial header: {rest:?}");
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        assert!(
            len >= 4 && rest.len() > len,
            "trailing partial message: {rest:?}"
        );
        msgs.push(Msg {
            tag: rest[0],
            body: rest[5..1 + len].to_vec(),
        });
        rest = &rest[1 + len..];
    }
    (msgs, end)
}

/// The fields of an ErrorResponse body, by field code.
fn error_fields(body: &[u8]) -> HashMap<u8, String> {
    let mut fields = HashMap::new();
    let mut rest = body;
    while let Some((&code, after)) = rest.split_first() {
        if code == 0 {
            assert!(after.is_empty(), "bytes after the ErrorResponse terminator");
            return fields;
        }
        let nul = after
            .iter()
            .position(|&b| b == 0)
            .expect("unterminated ErrorResponse field");
        fields.insert(code, String::from_utf8_lossy(&after[..nul]).into_owned());
        rest = &after[nul + 1..];
    }
    panic!("ErrorResponse without its terminator: {body:?}");
}

/// The connection must end with exactly one FATAL ErrorResponse of SQLSTATE `code` and a clean close; returns the
/// error message.
fn expect_fatal(s: &mut TcpStream, code: &str, case: &str) -> String {
    let (msgs, end) = read_until_close(s);
    assert_eq!(
        end,
        End::Eof,
        "{case}: the connection was reset after {msgs:?}"
    );
    assert_eq!(
        msgs.len(),
        1,
        "{case}: expected one ErrorResponse, got {msgs:?}"
    );
    assert_eq!(msgs[0].tag, b'E', "{case}: expected an ErrorResponse");
    let f = error_fields(&msgs[0].body);
    assert_eq!(
        f.get(&b'C').map(String::as_str),
        Some(code),
        "{case}: {f:?}"
    );
    assert_eq!(
        f.get(&b'S').map(String::as_str),
        Some("FATAL"),
        "{case}: {f:?}"
    );
    f.get(&b'M').cloned().unwrap_or_default()
}

/// A startup-phase packet: length (counting itself) and body.
fn packet(body: &[u8]) -> Vec<u8> {
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(body);
    p
}

/// A StartupMessage body for protocol `code` with raw parameter bytes.
fn startup_body(code: u32, params: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut b = code.to_be_bytes().to_vec();
    for (k, v) in params {
        b.extend_from_slice(k);
        b.push(0);
        b.extend_from_slice(v);
        b.push(0);
    }
    b.push(0);
    b
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn carol_startup() -> Vec<u8> {
    packet(&startup_body(
        PROTOCOL_3_0,
        &[
            (b"user", b"carol"),
            (b"database", b"app"),
            (b"options", b"endpoint=plain"),
        ],
    ))
}

/// Sends carol's StartupMessage and reads the md5 challenge: the salt.
fn start_md5_login(s: &mut TcpStream) -> Result<[u8; 4], HashMap<u8, String>> {
    s.write_all(&carol_startup()).unwrap();
    let m = read_msg(s).expect("an answer to the startup packet");
    match m.tag {
        b'R' => {
            assert_eq!(m.body.len(), 8, "AuthenticationMD5Password: {m:?}");
            assert_eq!(m.body[..4], 5i32.to_be_bytes(), "md5 is requested: {m:?}");
            Ok(m.body[4..8].try_into().unwrap())
        }
        b'E' => Err(error_fields(&m.body)),
        _ => panic!("unexpected answer to the startup packet: {m:?}"),
    }
}

/// Logs carol in with md5, by hand, up to ReadyForQuery. `Err` with the error fields if pgweir refused.
fn try_login(env: &Env) -> Result<TcpStream, HashMap<u8, String>> {
    let mut s = connect(env);
    let salt = start_md5_login(&mut s)?;
    let mut pw = md5_client_response(CAROL_PASSWORD, "carol", salt).into_bytes();
    pw.push(0);
    s.write_all(&frame(b'p', &pw)).unwrap();
    loop {
        let m = read_msg(&mut s).expect("the login continues");
        match m.tag {
            b'R' => assert_eq!(m.body, 0i32.to_be_bytes(), "AuthenticationOk"),
            b'S' | b'K' => {}
            b'Z' => return Ok(s),
            b'E' => return Err(error_fields(&m.body)),
            _ => panic!("unexpected message during login: {m:?}"),
        }
    }
}

fn login(env: &Env) -> TcpStream {
    try_login(env).unwrap_or_else(|e| panic!("md5 login failed: {e:?}"))
}

/// Runs a simple query on a logged-in raw connection; returns the first column of the first row.
fn simple_query(s: &mut TcpStream, sql: &str) -> String {
    let mut q = sql.as_bytes().to_vec();
    q.push(0);
    s.write_all(&frame(b'Q', &q)).unwrap();
    let mut value = None;
    loop {
        let m = read_msg(s).expect("a query result");
        match m.tag {
            b'D' if value.is_none() => {
                let len = i32::from_be_bytes(m.body[2..6].try_into().unwrap()) as usize;
                value = Some(String::from_utf8_lossy(&m.body[6..6 + len]).into_owned());
            }
            b'E' => panic!("query {sql:?} failed: {:?}", error_fields(&m.body)),
            b'Z' => return value.unwrap_or_default(),
            _ => {}
        }
    }
}

#[test]
fn malformed_startup_packets_get_an_error_and_a_close() {
    let env = env_with("");
    let many: Vec<(Vec<u8>, Vec<u8>)> = (0..100)
        .map(|i| (format!("p{i}").into_bytes(), b"v".to_vec()))
        .collect();
    let many: Vec<(&[u8], &[u8])> = many.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let mut ssl_with_payload = 80877103u32.to_be_bytes().to_vec();
    ssl_with_payload.push(1);
    let mut short_cancel = 80877102u32.to_be_bytes().to_vec();
    short_cancel.extend_from_slice(&[0, 0, 0, 1]);

    // (case, bytes sent, expected SQLSTATE, expected part of the message)
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "length 0",
            0u32.to_be_bytes().to_vec(),
            "08P01",
            "invalid length of startup packet",
        ),
        (
            "length 7",
            vec![0, 0, 0, 7, 0, 3, 0],
            "08P01",
            "invalid length of startup packet",
        ),
        (
            "length 10001",
            10_001u32.to_be_bytes().to_vec(),
            "08P01",
            "invalid length of startup packet",
        ),
        (
            "length u32::MAX",
            u32::MAX.to_be_bytes().to_vec(),
            "08P01",
            "invalid length of startup packet",
        ),
        (
            "garbage code",
            packet(&0xdead_beef_u32.to_be_bytes()),
            "0A000",
            "unsupported frontend protocol",
        ),
        (
            "protocol 2.0",
            packet(&startup_body(2 << 16, &[(b"user", b"alice")])),
            "0A000",
            "unsupported frontend protocol 2.0",
        ),
        (
            "SSLRequest with a payload",
            packet(&ssl_with_payload),
            "08P01",
            "invalid length",
        ),
        (
            "short CancelRequest",
            packet(&short_cancel),
            "08P01",
            "invalid length",
        ),
        (
            "non-UTF-8 parameter value",
            packet(&startup_body(PROTOCOL_3_0, &[(b"user", b"\xff\xfe")])),
            "08P01",
            "UTF-8",
        ),
        (
            "non-UTF-8 parameter name",
            packet(&startup_body(PROTOCOL_3_0, &[(b"us\xc3er", b"alice")])),
            "08P01",
            "UTF-8",
        ),
        (
            "missing terminator",
            packet(&{
                let mut b = startup_body(PROTOCOL_3_0, &[(b"user", b"alice")]);
                b.pop();
                b
            }),
            "08P01",
            "terminator",
        ),
        (
            "parameter without a value",
            packet(&{
                let mut b = PROTOCOL_3_0.to_be_bytes().to_vec();
                b.extend_from_slice(b"user\0alice");
                b
            }),
            "08P01",
            "startup parameter",
        ),
        (
            "100 parameters",
            packet(&startup_body(PROTOCOL_3_0, &many)),
            "08P01",
            "too many startup parameters",
        ),
        (
            "duplicate parameter",
            packet(&startup_body(
                PROTOCOL_3_0,
                &[(b"user", b"a"), (b"user", b"b")],
            )),
            "08P01",
            "duplicate",
        ),
        (
            "a regular message instead of a startup packet",
            frame(b'Q', b"select 1\0"),
            "08P01",
            "invalid length of startup packet",
        ),
    ];
    for (case, bytes, code, text) in cases {
        let mut s = connect(&env);
        s.write_all(&bytes).unwrap();
        let message = expect_fatal(&mut s, code, case);
        assert!(message.contains(text), "{case}: message {message:?}");
        assert_serving(&env, case);
    }

    // The length says 100, 20 bytes follow, then the client closes its side.
    let mut s = connect(&env);
    let mut lie = 100u32.to_be_bytes().to_vec();
    lie.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    lie.extend_from_slice(&[b'x'; 12]);
    assert_eq!(lie.len(), 20);
    s.write_all(&lie).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let message = expect_fatal(&mut s, "08P01", "length lies, then close");
    assert!(message.contains("incomplete startup packet"), "{message}");
    assert_serving(&env, "length lies, then close");

    // The same lie from a client that stays connected: the login timeout (5 s in the harness) ends it.
    let mut s = connect(&env);
    s.write_all(&lie).unwrap();
    let started = Instant::now();
    let (msgs, end) = read_until_close(&mut s);
    assert!(
        msgs.is_empty(),
        "a client that stalls gets no answer: {msgs:?}"
    );
    assert_eq!(end, End::Eof);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "closed before the login timeout: {:?}",
        started.elapsed()
    );
    assert_serving(&env, "a stalled startup packet");

    // A client that closes before sending anything, or in the middle of the length: a clean close, no answer.
    for sent in [&[][..], &[0, 0][..]] {
        let mut s = connect(&env);
        s.write_all(sent).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (msgs, end) = read_until_close(&mut s);
        assert!(msgs.is_empty(), "{sent:?}: {msgs:?}");
        assert_eq!(end, End::Eof, "{sent:?}");
    }
    assert_serving(&env, "early closes");
}

#[test]
fn malformed_messages_during_md5_login() {
    let env = env_with("");
    // Not a password message.
    let mut s = connect(&env);
    start_md5_login(&mut s).unwrap();
    s.write_all(&frame(b'Q', b"select 1\0")).unwrap();
    let m = expect_fatal(&mut s, "08P01", "query instead of a password");
    assert!(m.contains("expected a password response"), "{m}");
    assert_serving(&env, "query instead of a password");

    // A password message without its NUL.
    let mut s = connect(&env);
    start_md5_login(&mut s).unwrap();
    s.write_all(&frame(b'p', b"md5abc")).unwrap();
    let m = expect_fatal(&mut s, "08P01", "password without NUL");
    assert!(m.contains("malformed password message"), "{m}");

    // A length field below 4.
    let mut s = connect(&env);
    start_md5_login(&mut s).unwrap();
    s.write_all(&[b'p', 0, 0, 0, 2]).unwrap();
    expect_fatal(&mut s, "08P01", "password message with length 2");

    // Larger than any password message may be.
    let mut s = connect(&env);
    start_md5_login(&mut s).unwrap();
    s.write_all(&[b'p', 0, 1, 0, 0]).unwrap();
    expect_fatal(&mut s, "08P01", "password message of 64 KiB");

    // A wrong password.
    let mut s = connect(&env);
    start_md5_login(&mut s).unwrap();
    s.write_all(&frame(b'p', b"md500000000000000000000000000000000\0"))
        .unwrap();
    expect_fatal(&mut s, "28P01", "wrong password");
    assert_serving(&env, "malformed login messages");

    // And the right one works.
    let mut s = login(&env);
    assert_eq!(
        simple_query(&mut s, "select current_database()"),
        "acme_main"
    );
}

#[test]
fn malformed_messages_after_login_get_08p01_and_a_close() {
    let env = env_with("max_message_bytes = 65536");

    // A length field below 4.
    for len in [0u32, 3] {
        let mut s = login(&env);
        let mut bad = vec![b'Q'];
        bad.extend_from_slice(&len.to_be_bytes());
        s.write_all(&bad).unwrap();
        let m = expect_fatal(&mut s, "08P01", &format!("length {len}"));
        assert!(m.contains("invalid message length"), "{m}");
        assert_serving(&env, "a message length below 4");
    }

    // Just under the limit passes; over it is refused as soon as the header arrives.
    let mut s = login(&env);
    let big = format!("select length('{}')", "x".repeat(65_000));
    assert_eq!(simple_query(&mut s, &big), "65000");
    let mut over = vec![b'Q'];
    over.extend_from_slice(&65_536u32.to_be_bytes());
    s.write_all(&over).unwrap();
    let m = expect_fatal(&mut s, "08P01", "a message over max_message_bytes");
    assert!(m.contains("over the limit of 65536 bytes"), "{m}");
    assert_serving(&env, "a message over max_message_bytes");

    // A result row over the limit is the server breaking it: the client is told and the session ends.
    let mut s = login(&env);
    s.write_all(&frame(b'Q', b"select repeat('x', 70000)\0"))
        .unwrap();
    let (msgs, _) = read_until_close(&mut s);
    let last = msgs.last().expect("an answer");
    assert_eq!(last.tag, b'E', "{msgs:?}");
    assert_eq!(
        error_fields(&last.body).get(&b'C').map(String::as_str),
        Some("08006")
    );
    assert_serving(&env, "a result row over max_message_bytes");

    // A password message when none is expected: the server refuses it (FATAL 08P01) and the session ends.
    let mut s = login(&env);
    s.write_all(&frame(b'p', b"secret\0")).unwrap();
    let (msgs, end) = read_until_close(&mut s);
    assert_eq!(end, End::Eof);
    let first = msgs.first().expect("an ErrorResponse");
    assert_eq!(first.tag, b'E', "{msgs:?}");
    let f = error_fields(&first.body);
    assert_eq!(f.get(&b'C').map(String::as_str), Some("08P01"), "{f:?}");
    assert_eq!(f.get(&b'S').map(String::as_str), Some("FATAL"), "{f:?}");
    assert!(
        msgs.iter().all(|m| m.tag == b'E'),
        "only errors follow: {msgs:?}"
    );
    assert_serving(&env, "an unexpected password message");

    // Random bytes: the first header is garbage and is refused.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9e37_79b9);
    for round in 0..8 {
        let mut s = login(&env);
        let n = rng.gen_range(5..2048);
        let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        s.write_all(&junk).unwrap();
        let m = expect_fatal(&mut s, "08P01", &format!("random bytes, round {round}"));
        assert!(
            m.contains("message length") || m.contains("over the limit"),
            "round {round}: {m}"
        );
    }
    assert_serving(&env, "random bytes");
}

#[test]
fn client_connection_limit() {
    let env = env_with("max_client_connections = 3");
    let mut held: Vec<TcpStream> = (0..3).map(|_| login(&env)).collect();

    // A fourth client, raw: FATAL 53300 and a close.
    let mut s = connect(&env);
    s.write_all(&carol_startup()).unwrap();
    let m = expect_fatal(&mut s, "53300", "the fourth client");
    assert!(m.contains("too many clients"), "{m}");
    // And psql sees the same.
    let err = psql_err(&env.alice(), "select 1");
    assert!(err.contains("too many clients"), "{err}");

    // The held clients are unaffected.
    for s in &mut held {
        assert_eq!(simple_query(s, "select 42"), "42");
    }

    // One leaves: a new client gets its slot (as soon as the leaving session has ended).
    drop(held.pop());
    let mut replacement = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            match try_login(&env) {
                Ok(s) => {
                    replacement = Some(s);
                    true
                }
                Err(f) => {
                    assert_eq!(f.get(&b'C').map(String::as_str), Some("53300"), "{f:?}");
                    false
                }
            }
        }),
        "no client was accepted after one left"
    );
    held.push(replacement.unwrap());
    let err = try_login(&env).expect_err("the limit still holds");
    assert_eq!(err.get(&b'C').map(String::as_str), Some("53300"));

    // Everyone leaves: regular clients are served again.
    drop(held);
    assert!(wait_until(Duration::from_secs(10), || psql(
        &env.alice(),
        "select 1"
    )
    .status
    .success()));
}

#[test]
fn silent_connections_take_no_client_slot() {
    // TCP_DEFER_ACCEPT: a connection that sends nothing (a port scan, a load balancer's TCP check) is not handed
    // to pgweir within tcp_defer_accept, so it holds none of the client slots.
    let env = env_with("max_client_connections = 3\ntcp_defer_accept = \"30s\"");
    let silent: Vec<TcpStream> = (0..4).map(|_| connect(&env)).collect();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..3 {
        let out = psql(&env.alice(), "select 'served'");
        assert!(
            out.status.success(),
            "login {i} beside {} silent connections: {}",
            silent.len(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A client that speaks is served as soon as it does.
    // (The others stay open: a closed one would be handed over at its FIN.)
    let mut silent = silent;
    let late = &mut silent[0];
    late.write_all(&carol_startup()).unwrap();
    let mut b = [0u8; 512];
    let n = late.read(&mut b).unwrap();
    assert_eq!(
        b[0],
        b'R',
        "the late client is asked to authenticate: {}",
        String::from_utf8_lossy(&b[..n])
    );
}

#[test]
fn clients_that_leave_at_once_leak_nothing() {
    let env = env_with("");
    for i in 0..200 {
        match i % 5 {
            // Connect and close.
            0 => drop(connect(&env)),
            // Half a length.
            1 => {
                let mut s = connect(&env);
                s.write_all(&[0, 0]).unwrap();
            }
            // A startup packet, then gone before authenticating.
            2 => {
                let mut s = connect(&env);
                s.write_all(&carol_startup()).unwrap();
            }
            // Logged in, then gone without a Terminate.
            3 => drop(login(&env)),
            // Logged in, a query sent, gone before its result.
            _ => {
                let mut s = login(&env);
                s.write_all(&frame(b'Q', b"select pg_sleep(0.01)\0"))
                    .unwrap();
            }
        }
    }
    assert!(
        wait_until(Duration::from_secs(20), || env.proxy.cancels.is_empty()),
        "cancel keys leaked: {}",
        env.proxy.cancels.len()
    );
    let settled = || {
        env.proxy
            .pools
            .stats()
            .iter()
            .all(|p| p.server_active == 0 && p.clients_waiting == 0)
    };
    assert!(
        wait_until(Duration::from_secs(20), settled),
        "server connections still active: {:?}",
        env.proxy.pools.stats()
    );
    let stats = env.proxy.pools.stats();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert!(stats[0].server_total <= 5, "{stats:?}");
    // Postgres sees no more connections than the pool holds.
    let dsn = env.cluster.superuser_dsn("postgres");
    let open = || -> usize {
        psql_ok(
            &dsn,
            "select count(*) from pg_stat_activity where usename = 'acme_owner'",
        )
        .parse()
        .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(10), || open()
            == env.proxy.pools.stats()[0].server_total),
        "backend connections {} vs pool {:?}",
        open(),
        env.proxy.pools.stats()
    );
    assert_serving(&env, "200 clients that left at once");
    let mut s = login(&env);
    assert_eq!(simple_query(&mut s, "select 1"), "1");
}
