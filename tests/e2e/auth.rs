//! Authentication, routing and TLS, end to end: real clients (psql, tokio-postgres, and a hand-written protocol
//! client for what libpq 15 cannot do) against pgweir in front of a real PostgreSQL 15.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgweir::auth::md5::md5_verifier;
use pgweir::auth::scram::{ScramClient, ScramVerifier};
use pgweir::net::read_frame;
use pgweir::wire::msg;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

const DAVE_PASSWORD: &str = "dave-secret";
const CAROL_PASSWORD: &str = "carol-secret";

/// Longest a single read of the hand-written client waits.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// Two more tenants on the acme databases: `oldapp` (md5 only, user `dave`) and `plain` (cleartext only, user
/// `carol`).
fn md5_and_cleartext_tenants() -> String {
    acme_tenant(
        "oldapp",
        "auth = [\"md5\"]",
        &[user_toml("dave", DAVE_PASSWORD, true)],
    ) + &acme_tenant(
        "plain",
        "auth = [\"password\"]",
        &[user_toml("carol", CAROL_PASSWORD, false)],
    )
}

/// A login refused by the server, as tokio-postgres reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    severity: String,
    code: String,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
}

/// Logs in with tokio-postgres (no TLS); the login must be refused with an ErrorResponse.
fn refusal(env: &Env, conn: &str) -> Refusal {
    block_on(async {
        let e = match env.connect(conn).await {
            Ok(_) => panic!("login unexpectedly succeeded: {conn}"),
            Err(e) => e,
        };
        let db = e
            .as_db_error()
            .unwrap_or_else(|| panic!("{conn}: not an error from the server: {e:?}"));
        Refusal {
            severity: db.severity().to_owned(),
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
            hint: db.hint().map(str::to_owned),
        }
    })
}

/// Logs in with tokio-postgres (no TLS) and returns the first column of the first row of `sql`.
fn tpg_value(env: &Env, conn: &str, sql: &str) -> String {
    block_on(async {
        let client = env
            .connect(conn)
            .await
            .unwrap_or_else(|e| panic!("{conn}: {e:?}"));
        let row = client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        row.get::<_, String>(0)
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------------------------
// A hand-written protocol client, for direct TLS, GSSENCRequest and stalled logins.

fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec(); // protocol 3.0
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// SSLRequest / GSSENCRequest / any other 8-byte request.
fn request_packet(code: u32) -> Vec<u8> {
    let mut p = 8u32.to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    p
}

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;

/// The fields of an ErrorResponse body, as (field type, value).
fn error_fields(body: &[u8]) -> Vec<(char, String)> {
    body.split(|&b| b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0] as char, String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

fn error_field(body: &[u8], field: char) -> Option<String> {
    error_fields(body)
        .into_iter()
        .find(|(t, _)| *t == field)
        .map(|(_, v)| v)
}

struct Raw<S> {
    s: S,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    fn new(s: S) -> Self {
        Raw {
            s,
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(IO_TIMEOUT, async {
            self.s.write_all(bytes).await?;
            self.s.flush().await
        })
        .await
        .expect("write timed out")
        .expect("write");
    }

    /// One byte (the answer to an SSLRequest or GSSENCRequest).
    async fn recv_byte(&mut self) -> u8 {
        assert!(self.buf.is_empty());
        let mut b = [0u8; 1];
        tokio::time::timeout(IO_TIMEOUT, self.s.read_exact(&mut b))
            .await
            .expect("read timed out")
            .expect("read one byte");
        b[0]
    }

    /// One message: its tag and body.
    async fn recv(&mut self) -> (u8, Vec<u8>) {
        let frame =
            tokio::time::timeout(IO_TIMEOUT, read_frame(&mut self.s, &mut self.buf, 1 << 20))
                .await
                .expect("read timed out")
                .expect("read a message");
        (frame[0], frame[5..].to_vec())
    }

    /// One message that must not be an ErrorResponse.
    async fn recv_ok(&mut self) -> (u8, Vec<u8>) {
        let (tag, body) = self.recv().await;
        assert_ne!(tag, b'E', "server error: {:?}", error_fields(&body));
        (tag, body)
    }

    /// An Authentication message: its code and the rest of its body.
    async fn auth_request(&mut self) -> (i32, Vec<u8>) {
        let (tag, body) = self.recv_ok().await;
        assert_eq!(tag, b'R', "expected an Authentication message");
        let code = i32::from_be_bytes(body[..4].try_into().unwrap());
        (code, body[4..].to_vec())
    }

    /// Expects AuthenticationSASL; returns the offered mechanisms.
    async fn sasl_mechanisms(&mut self) -> Vec<String> {
        let (code, data) = self.auth_request().await;
        assert_eq!(code, 10, "expected AuthenticationSASL");
        data.split(|&b| b == 0)
            .filter(|m| !m.is_empty())
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect()
    }

    /// Sends SASLInitialResponse (SCRAM-SHA-256, no channel binding); returns the server-first-message.
    async fn scram_first(&mut self, client: &ScramClient) -> Vec<u8> {
        let mut out = BytesMut::new();
        msg::sasl_initial_response(client.mechanism(), client.client_first(), &mut out);
        self.send(&out).await;
        let (code, server_first) = self.auth_request().await;
        assert_eq!(code, 11, "expected AuthenticationSASLContinue");
        server_first
    }

    /// After AuthenticationSASL: the whole SCRAM exchange up to ReadyForQuery.
    async fn scram_login(&mut self, password: &str) {
        let mut client = ScramClient::new(password);
        let server_first = self.scram_first(&client).await;
        let client_final = client.server_first(&server_first).expect("server-first");
        let mut out = BytesMut::new();
        msg::sasl_response(client_final, &mut out);
        self.send(&out).await;
        let (code, server_final) = self.auth_request().await;
        assert_eq!(code, 12, "expected AuthenticationSASLFinal");
        client
            .server_final(&server_final)
            .expect("server signature");
        assert_eq!(self.auth_request().await.0, 0, "expected AuthenticationOk");
        self.until_ready().await;
    }

    async fn until_ready(&mut self) {
        loop {
            if self.recv_ok().await.0 == b'Z' {
                return;
            }
        }
    }

    /// Simple query; the text of each row's first column.
    async fn query_first_column(&mut self, sql: &str) -> Vec<String> {
        let mut out = BytesMut::new();
        msg::query(sql, &mut out);
        self.send(&out).await;
        let mut rows = Vec::new();
        loop {
            let (tag, body) = self.recv_ok().await;
            match tag {
                b'D' => {
                    let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                    assert!(len >= 0, "NULL in the first column");
                    rows.push(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
                }
                b'Z' => return rows,
                _ => {}
            }
        }
    }

    /// Waits until the server closes the connection; it must send nothing more.
    async fn expect_closed(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes buffered: {:?}",
            self.buf
        );
        let mut b = [0u8; 512];
        match tokio::time::timeout(IO_TIMEOUT, self.s.read(&mut b)).await {
            Err(_) => panic!("the server kept the connection open for {IO_TIMEOUT:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!(
                "expected the server to close the connection, got {n} bytes: {:?}",
                &b[..n]
            ),
        }
    }
}

async fn raw_tcp(env: &Env) -> Raw<TcpStream> {
    Raw::new(
        TcpStream::connect(env.addr)
            .await
            .expect("connect to pgweir"),
    )
}

/// A TLS client trusting the test certificate, offering `alpn` (if any).
fn tls_connector(env: &Env, alpn: Option<&[u8]>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(env.cert_path()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// The server-first-message salt and iteration count pgweir offers to `user` on `endpoint`.
async fn scram_challenge(env: &Env, user: &str, endpoint: &str) -> String {
    let mut raw = raw_tcp(env).await;
    let options = format!("endpoint={endpoint}");
    raw.send(&startup_packet(&[
        ("user", user),
        ("database", "app"),
        ("options", &options),
    ]))
    .await;
    assert_eq!(raw.sasl_mechanisms().await, ["SCRAM-SHA-256"]);
    let first = raw.scram_first(&ScramClient::new("whatever")).await;
    let first = String::from_utf8(first).unwrap();
    // r=<nonce>,s=<salt>,i=<iterations>: keep s and i.
    first.split(',').skip(1).collect::<Vec<_>>().join(",")
}

// ---------------------------------------------------------------------------------------------------------------
// 1. SCRAM

#[test]
fn scram_login_with_psql_and_tokio_postgres() {
    let env = Env::start();
    assert_eq!(
        psql_ok(&env.alice(), "select current_database(), current_user"),
        "acme_main|acme_owner"
    );
    assert_eq!(
        tpg_value(&env, &env.alice(), "select current_database()::text"),
        "acme_main"
    );
    // bob has both a SCRAM verifier and an md5 hash; acme only offers SCRAM.
    let bob = env.url(
        "bob",
        BOB_PASSWORD,
        "app",
        "options=endpoint=acme sslmode=disable",
    );
    assert_eq!(tpg_value(&env, &bob, "select 'bob in'"), "bob in");

    // A client that sends its first query with its last login message, without waiting for AuthenticationOk,
    // gets it answered after the login, in either pool mode.
    for options in ["endpoint=acme", "endpoint=acme pool_mode=session"] {
        block_on(async {
            let mut raw = raw_tcp(&env).await;
            raw.send(&startup_packet(&[
                ("user", "alice"),
                ("database", "app"),
                ("options", options),
            ]))
            .await;
            assert_eq!(raw.sasl_mechanisms().await, ["SCRAM-SHA-256"]);
            let mut client = ScramClient::new(ALICE_PASSWORD);
            let server_first = raw.scram_first(&client).await;
            let client_final = client.server_first(&server_first).expect("server-first");
            let mut out = BytesMut::new();
            msg::sasl_response(client_final, &mut out);
            msg::query("select 'sent early: ' || current_database()", &mut out);
            raw.send(&out).await;
            assert_eq!(
                raw.auth_request().await.0,
                12,
                "{options}: expected SASLFinal"
            );
            assert_eq!(
                raw.auth_request().await.0,
                0,
                "{options}: expected AuthenticationOk"
            );
            raw.until_ready().await;
            let mut rows = Vec::new();
            loop {
                let (tag, body) = raw.recv_ok().await;
                match tag {
                    b'D' => rows.push(String::from_utf8_lossy(&body[6..]).into_owned()),
                    b'Z' => break,
                    _ => {}
                }
            }
            assert_eq!(rows, ["sent early: acme_main"], "{options}");
            assert_eq!(
                raw.query_first_column("select 'and then'").await,
                ["and then"],
                "{options}"
            );
        });
    }
}

#[test]
fn failed_logins_never_tell_whether_tenant_or_user_exists() {
    let env = Env::start();
    let wrong_password = env.url(
        "alice",
        "not-her-password",
        "app",
        "options=endpoint=acme sslmode=disable",
    );
    let expected = Refusal {
        severity: "FATAL".into(),
        code: "28P01".into(),
        message: "password authentication failed for user \"alice\"".into(),
        detail: None,
        hint: None,
    };
    assert_eq!(refusal(&env, &wrong_password), expected);

    // Unknown tenant (with alice's real password on acme): exactly the same answer.
    let unknown_tenant = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "options=endpoint=nosuch sslmode=disable",
    );
    assert_eq!(refusal(&env, &unknown_tenant), expected);
    // Unknown branch of an unknown tenant, too.
    let unknown_tenant_branch = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "options=endpoint=nosuch--dev sslmode=disable",
    );
    assert_eq!(refusal(&env, &unknown_tenant_branch), expected);

    // Unknown user on a known tenant: the same shape with that user's name.
    let unknown_user = env.url(
        "mallory",
        ALICE_PASSWORD,
        "app",
        "options=endpoint=acme sslmode=disable",
    );
    assert_eq!(
        refusal(&env, &unknown_user),
        Refusal {
            message: "password authentication failed for user \"mallory\"".into(),
            ..expected.clone()
        }
    );

    // psql sees byte-identical errors for a wrong password and an unknown tenant (via options and via SNI).
    let psql_wrong = psql_err(&wrong_password, "select 1");
    assert!(
        psql_wrong.contains("FATAL:  password authentication failed for user \"alice\""),
        "{psql_wrong}"
    );
    assert_eq!(psql_err(&unknown_tenant, "select 1"), psql_wrong);
    let wrong_password_sni = env.url(
        "alice",
        "not-her-password",
        "app",
        "host=acme.db.test hostaddr=127.0.0.1 sslmode=require",
    );
    let unknown_tenant_sni = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "host=nosuch.db.test hostaddr=127.0.0.1 sslmode=require",
    );
    let sni_wrong = psql_err(&wrong_password_sni, "select 1");
    assert!(sni_wrong.contains("password authentication failed for user \"alice\""));
    assert_eq!(
        psql_err(&unknown_tenant_sni, "select 1").replace("nosuch.db.test", "acme.db.test"),
        sni_wrong
    );

    // The SCRAM challenge of a user that does not exist is as stable as that of one that does: the same salt and
    // iteration count on every attempt.
    block_on(async {
        for (user, endpoint) in [("alice", "acme"), ("mallory", "acme"), ("alice", "nosuch")] {
            let a = scram_challenge(&env, user, endpoint).await;
            let b = scram_challenge(&env, user, endpoint).await;
            assert_eq!(a, b, "{user} on {endpoint}");
            assert!(a.starts_with("s=") && a.ends_with(",i=4096"), "{a}");
        }
        assert_ne!(
            scram_challenge(&env, "mallory", "acme").await,
            scram_challenge(&env, "alice", "acme").await
        );
    });
}

#[test]
fn unknown_database_or_branch_after_correct_password() {
    let env = Env::start();
    let r = refusal(
        &env,
        &env.url(
            "alice",
            ALICE_PASSWORD,
            "nosuch",
            "options=endpoint=acme sslmode=disable",
        ),
    );
    assert_eq!(
        (r.severity.as_str(), r.code.as_str(), r.message.as_str()),
        ("FATAL", "3D000", "database \"nosuch\" does not exist")
    );
    let r = refusal(
        &env,
        &env.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            "options=endpoint=acme--nope sslmode=disable",
        ),
    );
    assert_eq!(r.code, "3D000", "{r:?}");
    assert!(r.message.contains("\"nope\""), "{r:?}");
    // Without the right password neither the database nor the branch is looked at.
    for (db, endpoint) in [("nosuch", "acme"), ("app", "acme--nope")] {
        let r = refusal(
            &env,
            &env.url(
                "alice",
                "wrong",
                db,
                &format!("options=endpoint={endpoint} sslmode=disable"),
            ),
        );
        assert_eq!(r.code, "28P01", "{db} on {endpoint}: {r:?}");
    }
    // An empty database name means the user name, as in Postgres (and "alice" is no database of acme).
    let r = refusal(
        &env,
        &format!(
            "host=127.0.0.1 port={} user=alice password={ALICE_PASSWORD} options=endpoint=acme sslmode=disable",
            env.addr.port()
        ),
    );
    assert_eq!(
        (r.code.as_str(), r.message.as_str()),
        ("3D000", "database \"alice\" does not exist")
    );
}

// ---------------------------------------------------------------------------------------------------------------
// 2. md5 and cleartext

#[test]
fn md5_tenant() {
    let env = Env::with(Setup {
        extra_config: md5_and_cleartext_tenants(),
        ..Default::default()
    });
    let ok = env.url(
        "dave",
        DAVE_PASSWORD,
        "app",
        "options=endpoint=oldapp sslmode=disable",
    );
    assert_eq!(
        psql_ok(&ok, "select current_database(), current_user"),
        "acme_main|acme_owner"
    );
    assert_eq!(tpg_value(&env, &ok, "select 'md5 ok'"), "md5 ok");

    // The server asks for md5 (code 5), not SCRAM.
    block_on(async {
        let mut raw = raw_tcp(&env).await;
        raw.send(&startup_packet(&[
            ("user", "dave"),
            ("database", "app"),
            ("options", "endpoint=oldapp"),
        ]))
        .await;
        let (code, salt) = raw.auth_request().await;
        assert_eq!(
            (code, salt.len()),
            (5, 4),
            "expected AuthenticationMD5Password"
        );
    });

    let wrong = env.url(
        "dave",
        "wrong",
        "app",
        "options=endpoint=oldapp sslmode=disable",
    );
    let err = psql_err(&wrong, "select 1");
    assert!(
        err.contains("FATAL:  password authentication failed for user \"dave\""),
        "{err}"
    );
    let r = refusal(&env, &wrong);
    assert_eq!(
        (r.code.as_str(), r.message.as_str()),
        ("28P01", "password authentication failed for user \"dave\"")
    );
    // A user without an md5 hash / an unknown user: the same answer.
    let unknown = env.url(
        "mallory",
        DAVE_PASSWORD,
        "app",
        "options=endpoint=oldapp sslmode=disable",
    );
    assert_eq!(
        refusal(&env, &unknown),
        Refusal {
            message: "password authentication failed for user \"mallory\"".into(),
            ..r
        }
    );
}

#[test]
fn cleartext_password_only_over_tls() {
    let env = Env::with(Setup {
        extra_config: md5_and_cleartext_tenants(),
        ..Default::default()
    });
    let plain = env.url(
        "carol",
        CAROL_PASSWORD,
        "app",
        "options=endpoint=plain sslmode=disable",
    );
    let r = refusal(&env, &plain);
    assert_eq!((r.severity.as_str(), r.code.as_str()), ("FATAL", "28000"));
    assert!(r.message.contains("requires TLS"), "{r:?}");
    assert!(r.hint.as_deref().unwrap_or("").contains("sslmode"), "{r:?}");
    let err = psql_err(&plain, "select 1");
    assert!(err.contains("requires TLS"), "{err}");

    // Without TLS the password is never asked for: the very first answer is the error.
    block_on(async {
        let mut raw = raw_tcp(&env).await;
        raw.send(&startup_packet(&[
            ("user", "carol"),
            ("database", "app"),
            ("options", "endpoint=plain"),
        ]))
        .await;
        let (tag, body) = raw.recv().await;
        assert_eq!(
            tag, b'E',
            "expected an ErrorResponse, not a password request"
        );
        assert_eq!(error_field(&body, 'C').as_deref(), Some("28000"));
        raw.expect_closed().await;
    });

    let tls = env.url(
        "carol",
        CAROL_PASSWORD,
        "app",
        "options=endpoint=plain sslmode=require",
    );
    assert_eq!(
        psql_ok(&tls, "select current_database(), current_user"),
        "acme_main|acme_owner"
    );
    let wrong = env.url(
        "carol",
        "wrong",
        "app",
        "options=endpoint=plain sslmode=require",
    );
    let err = psql_err(&wrong, "select 1");
    assert!(
        err.contains("FATAL:  password authentication failed for user \"carol\""),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// 3. TLS

#[test]
fn tls_require_and_verify_full() {
    let env = Env::start();
    let require = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "options=endpoint=acme sslmode=require",
    );
    assert_eq!(psql_ok(&require, "select 1"), "1");
    let info = psql_ok(&require, "\\conninfo");
    assert!(info.contains("SSL connection"), "{info}");
    // And a plain connection is not reported as SSL (so the check above means something).
    let info = psql_ok(&env.alice(), "\\conninfo");
    assert!(
        info.contains("You are connected") && !info.contains("SSL"),
        "{info}"
    );

    let cert = env.cert_path();
    let cert = cert.to_str().unwrap();
    let verify = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        &format!(
            "host=localhost hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={cert} options=endpoint=acme"
        ),
    );
    assert_eq!(psql_ok(&verify, "select current_database()"), "acme_main");
    let info = psql_ok(&verify, "\\conninfo");
    assert!(info.contains("SSL connection"), "{info}");
    // verify-full really verifies: a host name the certificate does not cover is refused by the client.
    let wrong_host = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        &format!(
            "host=wrong.example hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={cert} options=endpoint=acme"
        ),
    );
    let err = psql_err(&wrong_host, "select 1");
    assert!(err.contains("does not match host name"), "{err}");
    // verify-full with SNI routing (the certificate covers *.db.test).
    let sni = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        &format!(
            "host=acme--dev.db.test hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={cert}"
        ),
    );
    assert_eq!(psql_ok(&sni, "select name from branch_marker"), "dev");
}

#[test]
fn scram_channel_binding_over_tls() {
    let env = Env::start();
    let url = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "options=endpoint=acme sslmode=require channel_binding=require",
    );
    assert_eq!(psql_ok(&url, "select current_user"), "acme_owner");
    let wrong = env.url(
        "alice",
        "wrong",
        "app",
        "options=endpoint=acme sslmode=require channel_binding=require",
    );
    let err = psql_err(&wrong, "select 1");
    assert!(
        err.contains("password authentication failed for user \"alice\""),
        "{err}"
    );
    // The PLUS mechanism is what made channel_binding=require possible: offered over TLS, never over plain TCP.
    block_on(async {
        let mut raw = raw_tcp(&env).await;
        raw.send(&startup_packet(&[
            ("user", "alice"),
            ("database", "app"),
            ("options", "endpoint=acme"),
        ]))
        .await;
        assert_eq!(raw.sasl_mechanisms().await, ["SCRAM-SHA-256"]);

        let mut tcp = TcpStream::connect(env.addr).await.unwrap();
        tcp.write_all(&request_packet(SSL_REQUEST)).await.unwrap();
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer[0], b'S');
        let tls = tls_connector(&env, None)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake after SSLRequest");
        let mut raw = Raw::new(tls);
        raw.send(&startup_packet(&[
            ("user", "alice"),
            ("database", "app"),
            ("options", "endpoint=acme"),
        ]))
        .await;
        let mechanisms = raw.sasl_mechanisms().await;
        assert!(
            mechanisms.iter().any(|m| m == "SCRAM-SHA-256-PLUS")
                && mechanisms.iter().any(|m| m == "SCRAM-SHA-256"),
            "{mechanisms:?}"
        );

        // Bytes sent after an SSLRequest, before its answer, would pass as if they came over TLS: refused, as
        // Postgres refuses them.
        let mut raw = raw_tcp(&env).await;
        let mut early = request_packet(SSL_REQUEST);
        early.extend_from_slice(&startup_packet(&[("user", "alice"), ("database", "app")]));
        raw.send(&early).await;
        let (tag, body) = raw.recv().await;
        assert_eq!(
            tag, b'E',
            "expected an ErrorResponse, not an answer to the SSLRequest"
        );
        assert_eq!(
            (error_field(&body, 'C'), error_field(&body, 'M')),
            (
                Some("08P01".to_owned()),
                Some("received unencrypted data after SSL request".to_owned())
            )
        );
        raw.expect_closed().await;
    });
}

#[test]
fn require_tls_tenant() {
    let env = Env::start();
    let plain = env.url(
        "alice",
        BOB_PASSWORD,
        "app",
        "options=endpoint=beta sslmode=disable",
    );
    let r = refusal(&env, &plain);
    assert_eq!((r.severity.as_str(), r.code.as_str()), ("FATAL", "28000"));
    assert!(r.message.contains("requires TLS"), "{r:?}");
    assert!(r.hint.as_deref().unwrap_or("").contains("sslmode"), "{r:?}");
    let err = psql_err(&plain, "select 1");
    assert!(err.contains("requires TLS"), "{err}");

    let tls = env.url(
        "alice",
        BOB_PASSWORD,
        "app",
        "options=endpoint=beta sslmode=require",
    );
    assert_eq!(
        psql_ok(&tls, "select current_database(), current_user"),
        "beta_main|acme_owner"
    );
    // alice's acme password is not her beta password.
    let err = psql_err(
        &env.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            "options=endpoint=beta sslmode=require",
        ),
        "select 1",
    );
    assert!(
        err.contains("password authentication failed for user \"alice\""),
        "{err}"
    );
}

#[test]
fn without_tls_configured_ssl_is_declined_cleanly() {
    let env = Env::with(Setup {
        tls: false,
        ..Default::default()
    });
    let require = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "options=endpoint=acme sslmode=require",
    );
    let err = psql_err(&require, "select 1");
    assert!(
        err.contains("server does not support SSL, but SSL was required"),
        "{err}"
    );
    let prefer = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "options=endpoint=acme sslmode=prefer",
    );
    assert_eq!(psql_ok(&prefer, "select current_database()"), "acme_main");
    let info = psql_ok(&prefer, "\\conninfo");
    assert!(
        info.contains("You are connected") && !info.contains("SSL"),
        "{info}"
    );

    block_on(async {
        // SSLRequest → 'N', then the startup continues on the same connection.
        let mut raw = raw_tcp(&env).await;
        raw.send(&request_packet(SSL_REQUEST)).await;
        assert_eq!(raw.recv_byte().await, b'N');
        raw.send(&startup_packet(&[
            ("user", "alice"),
            ("database", "app"),
            ("options", "endpoint=acme"),
        ]))
        .await;
        assert_eq!(raw.sasl_mechanisms().await, ["SCRAM-SHA-256"]);
        raw.scram_login(ALICE_PASSWORD).await;
        assert_eq!(
            raw.query_first_column("select current_database()").await,
            ["acme_main"]
        );

        // Direct TLS to a server without TLS: no handshake, no answer.
        let tcp = TcpStream::connect(env.addr).await.unwrap();
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            IO_TIMEOUT,
            tls_connector(&env, Some(b"postgresql"))
                .connect(ServerName::try_from("localhost").unwrap(), tcp),
        )
        .await
        .expect("the server neither answered nor closed");
        assert!(r.is_err(), "direct TLS handshake succeeded without TLS");
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Direct TLS (PG17 style)

#[test]
fn direct_tls_with_alpn() {
    let env = Env::start();
    block_on(async {
        let tcp = TcpStream::connect(env.addr).await.unwrap();
        let tls = tls_connector(&env, Some(b"postgresql"))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("direct TLS handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
        let mut raw = Raw::new(tls);
        raw.send(&startup_packet(&[
            ("user", "alice"),
            ("database", "app"),
            ("options", "endpoint=acme"),
        ]))
        .await;
        let mechanisms = raw.sasl_mechanisms().await;
        assert!(
            mechanisms.iter().any(|m| m == "SCRAM-SHA-256-PLUS"),
            "{mechanisms:?}"
        );
        raw.scram_login(ALICE_PASSWORD).await;
        assert_eq!(
            raw.query_first_column("select current_database()").await,
            ["acme_main"]
        );

        // SNI routing works with direct TLS as well.
        let tcp = TcpStream::connect(env.addr).await.unwrap();
        let tls = tls_connector(&env, Some(b"postgresql"))
            .connect(ServerName::try_from("acme--dev.db.test").unwrap(), tcp)
            .await
            .expect("direct TLS handshake with SNI");
        let mut raw = Raw::new(tls);
        raw.send(&startup_packet(&[("user", "alice"), ("database", "app")]))
            .await;
        raw.sasl_mechanisms().await;
        raw.scram_login(ALICE_PASSWORD).await;
        assert_eq!(
            raw.query_first_column("select name from branch_marker")
                .await,
            ["dev"]
        );

        // An SSLRequest inside direct TLS is a protocol violation.
        let tcp = TcpStream::connect(env.addr).await.unwrap();
        let tls = tls_connector(&env, Some(b"postgresql"))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut raw = Raw::new(tls);
        raw.send(&request_packet(SSL_REQUEST)).await;
        let (tag, body) = raw.recv().await;
        assert_eq!(tag, b'E');
        assert_eq!(error_field(&body, 'C').as_deref(), Some("08P01"));
    });
}

#[test]
fn direct_tls_without_alpn_is_closed() {
    let env = Env::start();
    block_on(async {
        let t0 = Instant::now();
        let tcp = TcpStream::connect(env.addr).await.unwrap();
        // The handshake itself completes (the server learns of the missing ALPN only from it) ...
        let tls = tls_connector(&env, None)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake without ALPN");
        assert_eq!(tls.get_ref().1.alpn_protocol(), None);
        // ... then the server hangs up. The write may already fail; either way no answer may come.
        let mut raw = Raw::new(tls);
        let packet = startup_packet(&[
            ("user", "alice"),
            ("database", "app"),
            ("options", "endpoint=acme"),
        ]);
        let _ = raw.s.write_all(&packet).await;
        let _ = raw.s.flush().await;
        raw.expect_closed().await;
        // Closed at once, not by the 5 s login timeout.
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    });
    // The server is still fine.
    assert_eq!(psql_ok(&env.alice(), "select 1"), "1");
}

// ---------------------------------------------------------------------------------------------------------------
// 5. GSSENCRequest

#[test]
fn gssenc_request_is_declined_and_startup_continues() {
    let env = Env::start();
    block_on(async {
        let mut raw = raw_tcp(&env).await;
        raw.send(&request_packet(GSSENC_REQUEST)).await;
        assert_eq!(raw.recv_byte().await, b'N');
        raw.send(&startup_packet(&[
            ("user", "alice"),
            ("database", "app"),
            ("options", "endpoint=acme"),
        ]))
        .await;
        assert_eq!(raw.sasl_mechanisms().await, ["SCRAM-SHA-256"]);
        raw.scram_login(ALICE_PASSWORD).await;
        assert_eq!(
            raw.query_first_column("select current_user").await,
            ["acme_owner"]
        );

        // GSSENCRequest declined, then an SSLRequest on the same connection (what libpq does with gssencmode=prefer).
        let mut raw = raw_tcp(&env).await;
        raw.send(&request_packet(GSSENC_REQUEST)).await;
        assert_eq!(raw.recv_byte().await, b'N');
        raw.send(&request_packet(SSL_REQUEST)).await;
        assert_eq!(raw.recv_byte().await, b'S');
        let tls = tls_connector(&env, None)
            .connect(ServerName::try_from("localhost").unwrap(), raw.s)
            .await
            .expect("TLS after GSSENCRequest and SSLRequest");
        let mut raw = Raw::new(tls);
        raw.send(&startup_packet(&[
            ("user", "alice"),
            ("database", "app"),
            ("options", "endpoint=acme"),
        ]))
        .await;
        raw.sasl_mechanisms().await;
        raw.scram_login(ALICE_PASSWORD).await;
        assert_eq!(raw.query_first_column("select 42").await, ["42"]);
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 6. Routing

#[test]
fn routing_sources_branches_and_conflicts() {
    let env = Env::start();
    let db_of = |user: &str, extra: &str| {
        psql_ok(
            &env.url(user, ALICE_PASSWORD, "app", extra),
            "select current_database()",
        )
    };
    // Each source, main branch and dev branch.
    assert_eq!(
        db_of("alice", "options=endpoint=acme sslmode=disable"),
        "acme_main"
    );
    assert_eq!(
        db_of("alice", "options=endpoint=acme--dev sslmode=disable"),
        "acme_dev"
    );
    assert_eq!(db_of("alice.acme", "sslmode=disable"), "acme_main");
    assert_eq!(db_of("alice.acme--dev", "sslmode=disable"), "acme_dev");
    assert_eq!(
        db_of(
            "alice",
            "host=acme.db.test hostaddr=127.0.0.1 sslmode=require"
        ),
        "acme_main"
    );
    assert_eq!(
        db_of(
            "alice",
            "host=acme--dev.db.test hostaddr=127.0.0.1 sslmode=require"
        ),
        "acme_dev"
    );
    // "main" names the main branch explicitly.
    assert_eq!(db_of("alice.acme--main", "sslmode=disable"), "acme_main");
    // Sources that agree are fine.
    assert_eq!(
        db_of(
            "alice.acme--dev",
            "host=acme--dev.db.test hostaddr=127.0.0.1 sslmode=require options=endpoint=acme--dev"
        ),
        "acme_dev"
    );
    // The user name reaches the tenant without its routing suffix.
    assert_eq!(
        tpg_value(
            &env,
            &env.url("alice.acme", ALICE_PASSWORD, "app", "sslmode=disable"),
            "select current_user::text"
        ),
        "acme_owner"
    );

    // Conflicts between any two sources.
    for (user, extra) in [
        (
            "alice",
            "host=beta.db.test hostaddr=127.0.0.1 sslmode=require options=endpoint=acme",
        ),
        (
            "alice.beta",
            "host=acme.db.test hostaddr=127.0.0.1 sslmode=require",
        ),
        ("alice.beta", "options=endpoint=acme sslmode=disable"),
        ("alice.acme", "options=endpoint=acme--dev sslmode=disable"),
        (
            "alice",
            "host=acme--dev.db.test hostaddr=127.0.0.1 sslmode=require options=endpoint=acme",
        ),
    ] {
        let err = psql_err(&env.url(user, ALICE_PASSWORD, "app", extra), "select 1");
        assert!(
            err.contains("conflicting endpoints"),
            "{user} {extra}: {err}"
        );
    }
    let r = refusal(
        &env,
        &env.url(
            "alice.beta",
            ALICE_PASSWORD,
            "app",
            "options=endpoint=acme sslmode=disable",
        ),
    );
    assert_eq!((r.severity.as_str(), r.code.as_str()), ("FATAL", "28000"));
    assert!(r.message.contains("conflicting endpoints"), "{r:?}");

    // No endpoint at all, and no default tenant.
    let r = refusal(
        &env,
        &env.url("alice", ALICE_PASSWORD, "app", "sslmode=disable"),
    );
    assert_eq!(r.code, "28000", "{r:?}");
    assert!(r.message.contains("no endpoint"), "{r:?}");
    let err = psql_err(
        &env.url("alice", ALICE_PASSWORD, "app", "sslmode=disable"),
        "select 1",
    );
    assert!(err.contains("no endpoint"), "{err}");
    // A host name outside the base domain is no endpoint either.
    let err = psql_err(
        &env.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            "host=localhost hostaddr=127.0.0.1 sslmode=require",
        ),
        "select 1",
    );
    assert!(err.contains("no endpoint"), "{err}");
    // A malformed endpoint.
    let r = refusal(
        &env,
        &env.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            "options=endpoint=Bad_Name sslmode=disable",
        ),
    );
    assert_eq!(r.code, "28000", "{r:?}");
    assert!(r.message.contains("invalid endpoint"), "{r:?}");
}

#[test]
fn default_tenant_routes_plain_user_names() {
    let env = Env::with(Setup {
        proxy: "default_tenant = \"acme\"".into(),
        ..Default::default()
    });
    let plain = env.url("alice", ALICE_PASSWORD, "app", "sslmode=disable");
    assert_eq!(
        psql_ok(&plain, "select current_database(), current_user"),
        "acme_main|acme_owner"
    );
    // An explicit endpoint wins over the default (no conflict).
    assert_eq!(
        psql_ok(
            &env.url("alice.beta", BOB_PASSWORD, "app", "sslmode=require"),
            "select current_database()"
        ),
        "beta_main"
    );
    assert_eq!(
        psql_ok(
            &env.url(
                "alice",
                ALICE_PASSWORD,
                "app",
                "options=endpoint=acme--dev sslmode=disable"
            ),
            "select current_database()"
        ),
        "acme_dev"
    );
    // Unknown users of the default tenant get the usual failure, not a routing error.
    let r = refusal(
        &env,
        &env.url("nobody", ALICE_PASSWORD, "app", "sslmode=disable"),
    );
    assert_eq!(
        (r.code.as_str(), r.message.as_str()),
        (
            "28P01",
            "password authentication failed for user \"nobody\""
        )
    );
}

// ---------------------------------------------------------------------------------------------------------------
// 7. Passthrough

#[test]
fn passthrough_tenant() {
    let env = Env::start();
    let url = env.url(
        "app_user",
        "app-user-pw",
        "legacy_db",
        "options=endpoint=legacy sslmode=disable",
    );
    assert_eq!(
        psql_ok(&url, "select current_database(), current_user"),
        "legacy_db|app_user"
    );
    assert_eq!(
        tpg_value(&env, &url, "select current_user::text"),
        "app_user"
    );
    // Routed by user suffix, the backend role is still the bare name.
    let suffix = env.url(
        "app_user.legacy",
        "app-user-pw",
        "legacy_db",
        "sslmode=disable",
    );
    assert_eq!(
        psql_ok(&suffix, "select current_database(), current_user"),
        "legacy_db|app_user"
    );
    // The client's password is pgweir's, not the backend role's.
    let r = refusal(
        &env,
        &env.url(
            "app_user",
            "app-user-secret",
            "legacy_db",
            "options=endpoint=legacy sslmode=disable",
        ),
    );
    assert_eq!(
        (r.code.as_str(), r.message.as_str()),
        (
            "28P01",
            "password authentication failed for user \"app_user\""
        )
    );
    // Passthrough tenants have no branches.
    let r = refusal(
        &env,
        &env.url(
            "app_user",
            "app-user-pw",
            "legacy_db",
            "options=endpoint=legacy--dev sslmode=disable",
        ),
    );
    assert_eq!(r.code, "3D000", "{r:?}");
    // A database that does not exist on the cluster: Postgres' own answer comes through.
    let r = refusal(
        &env,
        &env.url(
            "app_user",
            "app-user-pw",
            "no_such_db",
            "options=endpoint=legacy sslmode=disable",
        ),
    );
    assert_eq!(r.code, "3D000", "{r:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// 8. Startup parameters

#[test]
fn startup_parameters_reach_the_backend() {
    let env = Env::start();
    let url = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "options='-c search_path=foo,public endpoint=acme -c statement_timeout=1234' application_name=xyz sslmode=disable",
    );
    let shows = [
        "-c",
        "SHOW search_path",
        "-c",
        "SHOW statement_timeout",
        "-c",
        "SHOW application_name",
        "-c",
        "SET search_path = bar",
        "-c",
        "SHOW search_path",
        "-c",
        "RESET search_path",
        "-c",
        "SHOW search_path",
    ];
    let out = psql_args(&url, &shows);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    // Postgres keeps a startup value verbatim ("foo,public"; only SET normalises it to "foo, public"), and RESET
    // returns to the startup value: proof that it arrived as a startup parameter, not as a SET.
    assert_eq!(
        lines,
        ["foo,public", "1234ms", "xyz", "bar", "foo,public"],
        "{}",
        stderr(&out)
    );
    // The same as on a direct connection with the same startup parameters.
    let direct = format!(
        "{} options='-c search_path=foo,public -c statement_timeout=1234' application_name=xyz sslmode=disable",
        env.cluster.superuser_dsn("acme_main")
    );
    let out = psql_args(&direct, &shows);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        lines,
        "pgweir differs from a direct connection"
    );

    // tokio-postgres sets them the same way.
    assert_eq!(tpg_value(&env, &url, "SHOW search_path"), "foo,public");
    // A later client without those parameters does not inherit them from a pooled server connection.
    assert_eq!(
        psql_ok(
            &env.alice(),
            "SHOW search_path; SHOW statement_timeout; SHOW application_name"
        )
        .lines()
        .collect::<Vec<_>>(),
        ["\"$user\", public", "0", "psql"]
    );
    // An options value with an escaped space survives the trip (conninfo quoting eats one backslash, so the
    // options value is `-c pgweir.probe=a\ b`), as on a direct connection.
    let escaped = r"options='endpoint=acme -c pgweir.probe=a\\ b' sslmode=disable";
    assert_eq!(
        psql_ok(
            &env.url("alice", ALICE_PASSWORD, "app", escaped),
            "SHOW pgweir.probe"
        ),
        "a b"
    );
    let direct = format!(
        r"{} options='-c pgweir.probe=a\\ b' sslmode=disable",
        env.cluster.superuser_dsn("acme_main")
    );
    assert_eq!(psql_ok(&direct, "SHOW pgweir.probe"), "a b");
}

#[test]
fn denied_startup_parameters() {
    let env = Env::start();
    let with_options = |options: &str| {
        env.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            &format!("options='endpoint=acme {options}' sslmode=disable"),
        )
    };
    for (options, name) in [
        ("-c session_authorization=postgres", "session_authorization"),
        ("-c role=postgres", "role"),
        ("-crole=postgres", "role"),
        ("--session-authorization=postgres", "session_authorization"),
        ("-c ROLE=postgres", "ROLE"),
        ("-c is_superuser=on", "is_superuser"),
        (
            "-c standard_conforming_strings=off",
            "standard_conforming_strings",
        ),
    ] {
        let r = refusal(&env, &with_options(options));
        assert_eq!(
            (r.severity.as_str(), r.code.as_str()),
            ("FATAL", "42501"),
            "{options}: {r:?}"
        );
        assert!(
            r.message.contains(name) && r.message.contains("cannot be set"),
            "{options}: {r:?}"
        );
    }
    let err = psql_err(&with_options("-c role=postgres"), "select 1");
    assert!(
        err.contains("FATAL:  parameter \"role\" cannot be set"),
        "{err}"
    );
    assert_eq!(
        psql_ok(
            &with_options("-c standard_conforming_strings=on"),
            "SHOW standard_conforming_strings"
        ),
        "on"
    );

    // As plain startup parameters (libpq cannot send those; a hand-written client can).
    block_on(async {
        for (name, value) in [
            ("role", "postgres"),
            ("session_authorization", "postgres"),
            ("standard_conforming_strings", "off"),
        ] {
            let mut raw = raw_tcp(&env).await;
            raw.send(&startup_packet(&[
                ("user", "alice"),
                ("database", "app"),
                ("options", "endpoint=acme"),
                (name, value),
            ]))
            .await;
            let (tag, body) = raw.recv().await;
            assert_eq!(tag, b'E', "{name}={value} was not refused");
            assert_eq!(
                error_field(&body, 'C').as_deref(),
                Some("42501"),
                "{name}: {:?}",
                error_fields(&body)
            );
        }
        let mut raw = raw_tcp(&env).await;
        raw.send(&startup_packet(&[
            ("user", "alice"),
            ("database", "app"),
            ("options", "endpoint=acme"),
            ("standard_conforming_strings", "on"),
        ]))
        .await;
        raw.sasl_mechanisms().await;
        raw.scram_login(ALICE_PASSWORD).await;
        assert_eq!(
            raw.query_first_column("SHOW standard_conforming_strings")
                .await,
            ["on"]
        );
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 9. Login timeout

#[test]
fn login_timeout_disconnects_stalled_clients() {
    let env = Env::with(Setup {
        proxy: "login_timeout = \"1s\"".into(),
        ..Default::default()
    });
    let timeout = Duration::from_secs(1);
    let bounds = |what: &str, t: Duration| {
        assert!(
            t >= timeout.mul_f32(0.8) && t < Duration::from_secs(5),
            "{what}: disconnected after {t:?}, login_timeout is {timeout:?}"
        );
    };
    let url = env.alice();
    block_on(async {
        // The silent client reaches pgweir after tcp_defer_accept (1s by default), then has the login timeout.
        let silent = async {
            let t0 = Instant::now();
            let mut raw = raw_tcp(&env).await;
            raw.expect_closed().await;
            t0.elapsed()
        };
        let stalled_sasl = async {
            let t0 = Instant::now();
            let mut raw = raw_tcp(&env).await;
            raw.send(&startup_packet(&[
                ("user", "alice"),
                ("database", "app"),
                ("options", "endpoint=acme"),
            ]))
            .await;
            raw.sasl_mechanisms().await;
            raw.scram_first(&ScramClient::new(ALICE_PASSWORD)).await;
            // ... and never sends the client-final-message.
            raw.expect_closed().await;
            t0.elapsed()
        };
        let stalled_tls = async {
            let t0 = Instant::now();
            let mut raw = raw_tcp(&env).await;
            raw.send(&request_packet(SSL_REQUEST)).await;
            assert_eq!(raw.recv_byte().await, b'S');
            // ... and never starts the TLS handshake.
            raw.expect_closed().await;
            t0.elapsed()
        };
        // Meanwhile a normal client logs in, and its session outlives the login timeout.
        let normal =
            tokio::task::spawn_blocking(move || psql(&url, "select 'alive' from pg_sleep(1.5)"));
        let (silent, stalled_sasl, stalled_tls, normal) =
            tokio::join!(silent, stalled_sasl, stalled_tls, normal);
        bounds("silent client", silent);
        bounds("client stalled in SASL", stalled_sasl);
        bounds("client stalled before TLS", stalled_tls);
        let normal = normal.unwrap();
        assert!(normal.status.success(), "{}", stderr(&normal));
        assert_eq!(stdout(&normal).trim(), "alive");
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 10. CLI

fn pgweir_cli(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write as _;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgweir"));
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("run pgweir");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

#[test]
fn cli_hash_password() {
    let out = pgweir_cli(&["hash-password", "pw"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let line = text.lines().next().unwrap_or_default();
    assert!(line.starts_with("SCRAM-SHA-256$4096:"), "{text}");
    let v = ScramVerifier::parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
    assert!(v.verify_password("pw"));
    assert!(!v.verify_password("pw "));
    assert!(!v.verify_password("other"));
    // Random salt: two runs differ.
    let again = stdout(&pgweir_cli(&["hash-password", "pw"], None));
    assert_ne!(again.lines().next(), Some(line));

    // With an md5 user and an iteration count.
    let out = pgweir_cli(
        &[
            "hash-password",
            "pw",
            "--md5-user",
            "alice",
            "--iterations",
            "5000",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let v = ScramVerifier::parse(lines[0]).unwrap();
    assert_eq!(v.iterations, 5000);
    assert!(v.verify_password("pw"));
    assert_eq!(lines[1], md5_verifier("pw", "alice"));

    // From stdin, without the line break.
    let out = pgweir_cli(&["hash-password"], Some("from stdin\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    let v = ScramVerifier::parse(stdout(&out).trim()).unwrap();
    assert!(v.verify_password("from stdin"));

    // An empty password is refused.
    let out = pgweir_cli(&["hash-password"], Some("\n"));
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn cli_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "good.toml",
        &format!(
            r#"
[proxy]
listen = "127.0.0.1:6432"
[clusters.main]
host = "127.0.0.1"
[[tenants]]
id = "acme"
cluster = "main"
backend_database = "acme_main"
backend_user = "acme_owner"
[[tenants.users]]
name = "alice"
password = "{}"
"#,
            scram("pw")
        ),
    );
    let out = pgweir_cli(&["check-config", &good], None);
    assert!(
        out.status.success(),
        "valid config refused: {}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("OK"), "{}", stdout(&out));

    let bad = write(
        dir.path(),
        "bad.toml",
        r#"
[proxy]
max_client_connections = 0
default_tenant = "ghost"
[pool]
max_size = 0
[clusters.main]
host = ""
[[tenants]]
id = "Bad_Id"
cluster = "nowhere"
[[tenants.users]]
name = "alice"
password = "plaintext"
"#,
    );
    let out = pgweir_cli(&["check-config", &bad], None);
    assert!(!out.status.success(), "invalid config accepted");
    let err = stderr(&out);
    let problems: Vec<&str> = err.lines().filter(|l| l.starts_with("  - ")).collect();
    let needles = [
        "max_client_connections",
        "default_tenant",
        "pool.max_size",
        "clusters.main.host",
        "DNS label",
        "unknown cluster",
        "backend_database is required",
        "backend_user is required",
        "SCRAM-SHA-256 verifier",
    ];
    for needle in needles {
        let hits = problems.iter().filter(|l| l.contains(needle)).count();
        assert!(hits >= 1, "problem {needle:?} not listed:\n{err}");
    }
    // One problem per line: no line carries two of them.
    for line in &problems {
        let n = needles.iter().filter(|n| line.contains(**n)).count();
        assert!(n <= 1, "several problems on one line: {line}");
    }
    assert!(problems.len() >= needles.len(), "{err}");
    assert!(
        err.contains(&format!("{} problem(s)", problems.len())),
        "{err}"
    );

    // A syntax-level problem (unknown key) is reported too, naming the key.
    let unknown_key = write(dir.path(), "typo.toml", "[proxy]\nlisten_port = 1\n");
    let out = pgweir_cli(&["check-config", &unknown_key], None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("listen_port"), "{}", stderr(&out));
    // A missing file.
    let missing = dir.path().join("missing.toml");
    let out = pgweir_cli(&["check-config", missing.to_str().unwrap()], None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("missing.toml"), "{}", stderr(&out));
}

#[test]
fn tls_certificate_is_reloaded_on_sighup() {
    let env = Env::start();
    let cert = env.cert_path();
    let key = env.dir.path().join("server.key");
    let url = |host: &str| {
        env.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            &format!(
                "options=endpoint=acme host={host} hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={}",
                cert.display()
            ),
        )
    };
    // The first certificate does not name reloaded.test.
    let err = psql_err(&url("reloaded.test"), "select 1");
    assert!(
        err.contains("certificate") || err.contains("does not match"),
        "{err}"
    );
    // A new certificate in the same files, then SIGHUP (as an operator would after renewing it).
    std::fs::remove_file(&cert).unwrap();
    std::fs::remove_file(&key).unwrap();
    pgweir::tls::ensure_self_signed(&cert, &key, &["reloaded.test"]).unwrap();
    unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    let ok = wait_until(std::time::Duration::from_secs(10), || {
        psql(&url("reloaded.test"), "select 1").status.success()
    });
    assert!(ok, "the reloaded certificate is served");
    // The old name is no longer in the certificate.
    let err = psql_err(&url("localhost"), "select 1");
    assert!(
        err.contains("certificate") || err.contains("does not match"),
        "{err}"
    );
}
