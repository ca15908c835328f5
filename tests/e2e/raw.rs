//! A raw protocol client for tests that need exact control of the messages: pipelines, named statements, cancel
//! keys, half-sent messages.

use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pgweir::auth::scram::ScramClient;
use pgweir::net::read_frame;
use pgweir::wire::msg;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::*;

/// Awaits `f`, failing the test if it takes longer than `secs`.
pub async fn within<T>(secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing within {secs} s"),
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[derive(Debug, Clone, Default)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn error_fields(body: &[u8]) -> ErrorFields {
    let mut e = ErrorFields::default();
    let mut rest = body;
    while let Some((&t, r)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let end = r.iter().position(|&b| b == 0).unwrap_or(r.len());
        let v = text(&r[..end]);
        match t {
            b'S' => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            _ => {}
        }
        rest = &r[(end + 1).min(r.len())..];
    }
    e
}

pub fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut p = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body[p..p + 4].try_into().unwrap());
        p += 4;
        if len < 0 {
            out.push(None);
        } else {
            let l = len as usize;
            out.push(Some(text(&body[p..p + l])));
            p += l;
        }
    }
    out
}

#[derive(Debug)]
pub struct QueryResult {
    pub rows: Vec<Vec<Option<String>>>,
    pub error: Option<ErrorFields>,
    /// Transaction status of the ReadyForQuery that ended the query.
    pub status: u8,
}

pub struct Raw {
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub pid: i32,
    pub secret: i32,
}

pub type Frame = (u8, Bytes);

pub async fn next_frame<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
) -> Option<Frame> {
    let f = read_frame(stream, buf, 1 << 30).await.ok()?;
    let f = f.freeze();
    Some((f[0], f.slice(5..)))
}

impl Raw {
    /// Logs in as alice on acme (SCRAM, no TLS), up to the first ReadyForQuery.
    pub async fn connect(env: &Env) -> Raw {
        Raw::connect_to(env, "acme").await
    }

    /// Logs in as alice on `endpoint` (SCRAM, no TLS), up to the first ReadyForQuery.
    pub async fn connect_to(env: &Env, endpoint: &str) -> Raw {
        let options = format!("endpoint={endpoint}");
        let params = [
            // The same startup parameters as tokio-postgres: both share pooled connections.
            ("client_encoding", "UTF8"),
            ("user", "alice"),
            ("database", "app"),
            ("options", options.as_str()),
        ];
        Raw::login(env.addr, &params, ALICE_PASSWORD).await
    }

    /// Logs in to the backend cluster directly, as the acme tenant's backend role: the reference to compare with.
    pub async fn connect_direct(env: &Env) -> Raw {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], env.cluster.port()));
        let params = [
            ("client_encoding", "UTF8"),
            ("user", "acme_owner"),
            ("database", "acme_main"),
        ];
        Raw::login(addr, &params, OWNER_PASSWORD).await
    }

    async fn login(addr: std::net::SocketAddr, params: &[(&str, &str)], password: &str) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
            pid: 0,
            secret: 0,
        };
        let mut out = BytesMut::new();
        msg::startup(params.iter().copied(), &mut out);
        raw.send(&out).await;
        let mut scram = ScramClient::new(password);
        let mut got_key = false;
        loop {
            let (tag, body) = raw.frame().await.expect("pgweir closed during login");
            match tag {
                b'R' => {
                    let code = i32::from_be_bytes(body[..4].try_into().unwrap());
                    let data = &body[4..];
                    out.clear();
                    match code {
                        0 => {}
                        10 => msg::sasl_initial_response(
                            scram.mechanism(),
                            scram.client_first(),
                            &mut out,
                        ),
                        11 => msg::sasl_response(scram.server_first(data).unwrap(), &mut out),
                        12 => scram.server_final(data).unwrap(),
                        c => panic!("unexpected authentication request {c}"),
                    }
                    if !out.is_empty() {
                        raw.send(&out).await;
                    }
                }
                b'K' => {
                    raw.pid = i32::from_be_bytes(body[..4].try_into().unwrap());
                    raw.secret = i32::from_be_bytes(body[4..8].try_into().unwrap());
                    got_key = true;
                }
                b'S' | b'N' => {}
                b'Z' => break,
                b'E' => panic!("login failed: {:?}", error_fields(&body)),
                t => panic!("unexpected message {:?} during login", t as char),
            }
        }
        assert!(got_key, "no BackendKeyData before ReadyForQuery");
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    pub async fn frame(&mut self) -> Option<Frame> {
        next_frame(&mut self.stream, &mut self.buf).await
    }

    pub async fn send_query(&mut self, sql: &str) {
        let mut out = BytesMut::new();
        msg::query(sql, &mut out);
        self.send(&out).await;
    }

    /// Reads up to ReadyForQuery.
    pub async fn results(&mut self) -> QueryResult {
        let mut r = QueryResult {
            rows: Vec::new(),
            error: None,
            status: 0,
        };
        loop {
            let (tag, body) = self.frame().await.expect("connection closed mid-query");
            match tag {
                b'D' => r.rows.push(data_row(&body)),
                b'E' => r.error = Some(error_fields(&body)),
                b'Z' => {
                    r.status = body[0];
                    return r;
                }
                _ => {}
            }
        }
    }

    pub async fn query(&mut self, sql: &str) -> QueryResult {
        self.send_query(sql).await;
        within(30, sql, self.results()).await
    }

    /// The single value of a query that must succeed.
    pub async fn value(&mut self, sql: &str) -> Option<String> {
        let r = self.query(sql).await;
        assert!(r.error.is_none(), "{sql}: {:?}", r.error);
        r.rows[0][0].clone()
    }

    /// Reads messages up to and including the next ReadyForQuery: (tag, body) each.
    pub async fn until_ready(&mut self) -> Vec<Frame> {
        let mut v = Vec::new();
        loop {
            let f = within(30, "ReadyForQuery", self.frame())
                .await
                .expect("connection closed before ReadyForQuery");
            let done = f.0 == b'Z';
            v.push(f);
            if done {
                return v;
            }
        }
    }
}

/// Extended-protocol messages, for pipelines written by hand.
pub mod ext {
    use bytes::{BufMut, BytesMut};

    fn frame(tag: u8, body: &[u8], out: &mut BytesMut) {
        out.put_u8(tag);
        out.put_u32(body.len() as u32 + 4);
        out.put_slice(body);
    }

    fn cstr(s: &str, b: &mut Vec<u8>) {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }

    pub fn parse(name: &str, sql: &str, out: &mut BytesMut) {
        let mut b = Vec::new();
        cstr(name, &mut b);
        cstr(sql, &mut b);
        b.extend_from_slice(&0u16.to_be_bytes());
        frame(b'P', &b, out);
    }

    /// Bind with text parameters, text results.
    pub fn bind(portal: &str, stmt: &str, params: &[Option<&str>], out: &mut BytesMut) {
        let mut b = Vec::new();
        cstr(portal, &mut b);
        cstr(stmt, &mut b);
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&(params.len() as u16).to_be_bytes());
        for p in params {
            match p {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&0u16.to_be_bytes());
        frame(b'B', &b, out);
    }

    pub fn describe(kind: u8, name: &str, out: &mut BytesMut) {
        let mut b = vec![kind];
        cstr(name, &mut b);
        frame(b'D', &b, out);
    }

    pub fn execute(portal: &str, out: &mut BytesMut) {
        let mut b = Vec::new();
        cstr(portal, &mut b);
        b.extend_from_slice(&0i32.to_be_bytes());
        frame(b'E', &b, out);
    }

    pub fn close(kind: u8, name: &str, out: &mut BytesMut) {
        let mut b = vec![kind];
        cstr(name, &mut b);
        frame(b'C', &b, out);
    }

    pub fn sync(out: &mut BytesMut) {
        frame(b'S', &[], out);
    }

    /// A simple Query.
    pub fn query(sql: &str, out: &mut BytesMut) {
        let mut b = Vec::new();
        cstr(sql, &mut b);
        frame(b'Q', &b, out);
    }

    pub fn flush(out: &mut BytesMut) {
        frame(b'H', &[], out);
    }
}
