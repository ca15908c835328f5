//! Server connections: connecting and logging in to a backend Postgres (TLS as configured; SCRAM, md5, cleartext
//! or trust as the server asks), and the state pgweir keeps about each open server connection.
//!
//! Architecture invariant: a `ServerConn` knows nothing of clients; the pool decides who uses it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::md5::md5_client_response;
use crate::auth::scram::ScramClient;
use crate::net::{read_frame, ServerStream, Stream};
use crate::tenant::BackendTarget;
use crate::wire::error::sqlstate;
use crate::wire::msg::{self, decode_one};
use crate::wire::PgError;

/// Startup parameters a server connection was opened with (sorted by name). Connections are only reused for
/// clients that asked for exactly these, so `RESET` behaves as on a direct connection.
pub type StartupParams = Arc<[(String, String)]>;

/// Largest message accepted from a backend during login (Postgres' own limit for these is far smaller).
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// An open, logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    pub stream: ServerStream,
    /// The backend's process id (its cancel secret is in the cancel target, never shown to clients as such).
    pub pid: i32,
    /// ParameterStatus values as the server reported them, in the order it sent them.
    pub params: Vec<(String, String)>,
    pub startup: StartupParams,
    /// Transaction mode: the connection is shared between clients, which move their settings onto it.
    pub shared: bool,
    /// Session settings pgweir applied for the client now (or last) using a shared connection, by name.
    pub applied: Vec<(String, String)>,
    /// The cluster it is connected to (where cancel requests for it go).
    pub cluster: Arc<crate::tenant::Cluster>,
    /// Where a cancel request for it goes (shared: a client's cancel slot is linked to it every transaction).
    cancel: Arc<crate::cancel::CancelTarget>,
    /// Transaction mode: the named statements pgweir prepared on this connection.
    pub prepared: crate::prepared::ServerStatements,
    pub created: Instant,
    pub idle_since: Instant,
    /// Bytes read from the server and not yet handled.
    pub buf: BytesMut,
    /// NotificationResponse messages that arrived during pgweir's own queries, for the client using the
    /// connection (a LISTENing client pinned to it).
    pub notifications: BytesMut,
}

impl ServerConn {
    /// Where a cancel request for this connection must go.
    pub fn cancel_target(&self) -> Arc<crate::cancel::CancelTarget> {
        self.cancel.clone()
    }

    /// Records the ParameterStatus in `frame` (a complete 'S' frame).
    pub fn observe_parameter_status(&mut self, frame: &[u8]) {
        record_parameter_status(&mut self.params, frame);
    }
}

/// Records the ParameterStatus in `frame` (a complete 'S' frame) in `params`; malformed ones are ignored.
pub fn record_parameter_status(params: &mut Vec<(String, String)>, frame: &[u8]) {
    let Ok(ps) = decode_one::<ParameterStatus>(frame, "ParameterStatus") else {
        return;
    };
    match params.iter_mut().find(|(k, _)| *k == ps.name) {
        Some((_, v)) => *v = ps.value,
        None => params.push((ps.name, ps.value)),
    }
}

/// Why a server connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to {0}")]
    Timeout(String),
    #[error("TLS to the backend failed: {0}")]
    Tls(String),
    #[error("backend login failed: {0}")]
    Auth(String),
    /// The server refused the connection with an ErrorResponse that the client may see as it is (e.g. an invalid
    /// startup parameter, too many connections, database does not exist).
    #[error("backend refused the connection: {code} {message}")]
    Server {
        code: String,
        message: String,
        frame: Bytes,
    },
    #[error("backend protocol error: {0}")]
    Protocol(String),
    #[error("backend closed the connection during login")]
    Closed,
}

impl BackendError {
    /// What the client is told. Internal details (addresses, backend credentials) stay in the log.
    pub fn client_error(&self) -> ClientVisible {
        match self {
            BackendError::Server { frame, .. } => ClientVisible::Raw(frame.clone()),
            BackendError::Auth(_) => ClientVisible::Error(PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                "pgweir could not log in to the database server",
            )),
            _ => ClientVisible::Error(PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                "could not connect to the database server",
            )),
        }
    }
}

/// An error as the client gets it.
#[derive(Debug, Clone)]
pub enum ClientVisible {
    Error(PgError),
    /// The server's own ErrorResponse frame, forwarded unchanged.
    Raw(Bytes),
}

/// Opens and logs in a server connection to `target` with the given startup parameters.
pub async fn connect(
    target: &BackendTarget,
    startup: StartupParams,
    tls: Option<&Arc<ClientConfig>>,
    timeout: Duration,
) -> Result<ServerConn, BackendError> {
    let addr = format!("{}:{}", target.cluster.host, target.cluster.port);
    match tokio::time::timeout(timeout, connect_inner(target, startup, tls, &addr)).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::Timeout(addr)),
    }
}

async fn connect_inner(
    target: &BackendTarget,
    startup: StartupParams,
    tls: Option<&Arc<ClientConfig>>,
    addr: &str,
) -> Result<ServerConn, BackendError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| BackendError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let mut stream: ServerStream = match tls {
        None => Stream::Plain(tcp),
        Some(cfg) => Stream::Tls(Box::new(start_tls(tcp, cfg, &target.cluster.host).await?)),
    };

    let mut out = BytesMut::with_capacity(256);
    let params = [
        ("user", target.user.as_str()),
        ("database", target.database.as_str()),
    ]
    .into_iter()
    .chain(startup.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    msg::startup(params, &mut out);
    write(&mut stream, &mut out).await?;

    let mut buf = BytesMut::with_capacity(8192);
    let mut scram: Option<ScramClient> = None;
    // Authentication.
    loop {
        let frame = next(&mut stream, &mut buf).await?;
        match frame[0] {
            b'R' => {}
            b'E' => return Err(server_error(frame)),
            b'v' | b'N' => continue, // NegotiateProtocolVersion, NoticeResponse
            t => {
                return Err(BackendError::Protocol(format!(
                    "unexpected message '{}' during login",
                    t as char
                )))
            }
        }
        let auth: Authentication = decode_one(&frame, "Authentication")
            .map_err(|e| BackendError::Protocol(e.to_string()))?;
        let password = || {
            target.password.as_deref().ok_or_else(|| {
                BackendError::Auth("the server asks for a password but none is configured".into())
            })
        };
        match auth {
            Authentication::Ok => break,
            Authentication::CleartextPassword => msg::password(password()?, &mut out),
            Authentication::MD5Password(salt) => {
                let salt: [u8; 4] = salt
                    .as_slice()
                    .try_into()
                    .map_err(|_| BackendError::Protocol("bad md5 salt".into()))?;
                msg::password(
                    &md5_client_response(password()?, &target.user, salt),
                    &mut out,
                )
            }
            Authentication::SASL(mechs) => {
                let client = ScramClient::new(password()?);
                if !mechs.iter().any(|m| m == client.mechanism()) {
                    return Err(BackendError::Auth(format!(
                        "server offers SASL mechanisms {mechs:?}, none supported"
                    )));
                }
                msg::sasl_initial_response(client.mechanism(), client.client_first(), &mut out);
                scram = Some(client);
            }
            Authentication::SASLContinue(data) => {
                let c = scram
                    .as_mut()
                    .ok_or_else(|| BackendError::Protocol("SASLContinue before SASL".into()))?;
                let reply = c
                    .server_first(&data)
                    .map_err(|e| BackendError::Auth(e.to_string()))?;
                msg::sasl_response(reply, &mut out);
            }
            Authentication::SASLFinal(data) => {
                let c = scram
                    .as_mut()
                    .ok_or_else(|| BackendError::Protocol("SASLFinal before SASL".into()))?;
                c.server_final(&data)
                    .map_err(|e| BackendError::Auth(e.to_string()))?;
                continue;
            }
            _ => {
                return Err(BackendError::Auth(
                    "the server asks for an authentication method pgweir does not support".into(),
                ))
            }
        }
        write(&mut stream, &mut out).await?;
    }

    // Parameters and the cancel key, up to ReadyForQuery.
    let mut conn_params = Vec::new();
    let mut key = None;
    loop {
        let frame = next(&mut stream, &mut buf).await?;
        match frame[0] {
            b'S' => {
                let ps: ParameterStatus = decode_one(&frame, "ParameterStatus")
                    .map_err(|e| BackendError::Protocol(e.to_string()))?;
                conn_params.push((ps.name, ps.value));
            }
            b'K' => {
                let k: BackendKeyData = decode_one(&frame, "BackendKeyData")
                    .map_err(|e| BackendError::Protocol(e.to_string()))?;
                key = Some((k.pid, k.secret_key.to_bytes()));
            }
            b'Z' => break,
            b'N' => {}
            b'E' => return Err(server_error(frame)),
            t => {
                return Err(BackendError::Protocol(format!(
                    "unexpected message '{}' after login",
                    t as char
                )))
            }
        }
    }
    let (pid, secret) = key.ok_or_else(|| BackendError::Protocol("no BackendKeyData".into()))?;
    let now = Instant::now();
    Ok(ServerConn {
        stream,
        cancel: Arc::new(crate::cancel::CancelTarget {
            host: target.cluster.host.clone(),
            port: target.cluster.port,
            pid,
            secret,
        }),
        cluster: target.cluster.clone(),
        pid,
        params: conn_params,
        startup,
        shared: false,
        applied: Vec::new(),
        prepared: Default::default(),
        created: now,
        idle_since: now,
        buf,
        notifications: BytesMut::new(),
    })
}

async fn start_tls(
    mut tcp: TcpStream,
    cfg: &Arc<ClientConfig>,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BackendError> {
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&8u32.to_be_bytes());
    req[4..].copy_from_slice(&crate::wire::startup::SSL_REQUEST_CODE.to_be_bytes());
    let io = |e: std::io::Error| BackendError::Tls(e.to_string());
    tcp.write_all(&req).await.map_err(io)?;
    let answer = tcp.read_u8().await.map_err(io)?;
    if answer != msg::SSL_ALLOWED {
        return Err(BackendError::Tls("the server does not accept TLS".into()));
    }
    let name =
        ServerName::try_from(host.to_owned()).map_err(|e| BackendError::Tls(e.to_string()))?;
    tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .map_err(io)
}

async fn write(stream: &mut ServerStream, out: &mut BytesMut) -> Result<(), BackendError> {
    let r = async {
        stream.write_all(out).await?;
        stream.flush().await
    }
    .await;
    out.clear();
    r.map_err(|_| BackendError::Closed)
}

async fn next(stream: &mut ServerStream, buf: &mut BytesMut) -> Result<BytesMut, BackendError> {
    read_frame(stream, buf, MAX_LOGIN_MESSAGE)
        .await
        .map_err(|e| match e {
            crate::net::ReadFrameError::Closed | crate::net::ReadFrameError::Io(_) => {
                BackendError::Closed
            }
            crate::net::ReadFrameError::Frame(f) => BackendError::Protocol(f.to_string()),
        })
}

/// SQLSTATE and message of an ErrorResponse frame.
pub fn error_fields(frame: &[u8]) -> (String, String) {
    match decode_one::<ErrorResponse>(frame, "ErrorResponse") {
        Ok(e) => {
            let get = |t: u8| {
                e.fields
                    .iter()
                    .find(|(k, _)| *k == t)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            (get(b'C'), get(b'M'))
        }
        Err(_) => (String::new(), "malformed error".to_owned()),
    }
}

fn server_error(frame: BytesMut) -> BackendError {
    let (code, message) = error_fields(&frame);
    if code.starts_with("28") {
        return BackendError::Auth(format!("{code} {message}"));
    }
    BackendError::Server {
        code,
        message,
        frame: frame.freeze(),
    }
}

/// Sends a CancelRequest for (`pid`, `secret`) to the server at `host:port`.
pub async fn send_cancel(host: &str, port: u16, pid: i32, secret: &[u8]) -> std::io::Result<()> {
    // Bounded: the caller holds the client's cancel slot meanwhile.
    match tokio::time::timeout(
        Duration::from_secs(5),
        send_cancel_inner(host, port, pid, secret),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn send_cancel_inner(host: &str, port: u16, pid: i32, secret: &[u8]) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect((host, port)).await?;
    let mut req = Vec::with_capacity(12 + secret.len());
    req.extend_from_slice(&((12 + secret.len()) as u32).to_be_bytes());
    req.extend_from_slice(&crate::wire::startup::CANCEL_REQUEST_CODE.to_be_bytes());
    req.extend_from_slice(&pid.to_be_bytes());
    req.extend_from_slice(secret);
    tcp.write_all(&req).await?;
    // The server closes the connection without answering once it has handled the request.
    let mut sink = [0u8; 1];
    let _ = tcp.read(&mut sink).await;
    Ok(())
}
