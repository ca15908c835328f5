//! One client connection, from its first byte to its last: TLS negotiation, startup, routing, authentication,
//! attaching a server connection and forwarding in both directions.
//!
//! Architecture invariant: the session decodes only the startup-phase packets and the authentication exchange.
//! After that it forwards the original bytes, framed by header; it inspects just the tags it must count to know
//! whether the server connection is clean when the client leaves.

mod auth;
mod forward;
mod txn;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::backend::{ClientVisible, StartupParams};
use crate::cancel::{CancelOutcome, SlotState};
use crate::config::{PoolMode, DENIED_STARTUP_PARAMETERS};
use crate::net::{ClientStream, Stream};
use crate::pool::{Checkout, CheckoutError, Pool};
use crate::routing::{self, RouteInput};
use crate::server::Proxy;
use crate::wire::error::sqlstate;
use crate::wire::msg;
use crate::wire::startup::{parse_packet, read_packet, FirstPacket, StartupMessage};
use crate::wire::PgError;

/// What TLS told us about the client connection.
#[derive(Debug, Default, Clone)]
pub struct TlsInfo {
    pub sni: Option<String>,
    pub channel_binding: Option<Vec<u8>>,
}

/// Serves one client connection until it ends. Never panics on client input; every error the client can act on
/// is sent to it as an ErrorResponse.
/// `slot` is the client's place under `max_client_connections`, given back when the session ends.
pub async fn serve(
    proxy: Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    // Every phase is boxed and exists only while it runs: the spawned task itself stays a few hundred bytes, which
    // is what an idle client costs besides its session state.
    let Some((mut stream, session)) = crate::boxed(|| login_or_fail(&proxy, tcp, peer)).await
    else {
        return;
    };
    // The session moves straight into the boxed future of its mode (nothing of it stays in this one).
    let client_left = match session.mode {
        PoolMode::Transaction => {
            crate::boxed(|| txn::run(&proxy, &mut stream, session, &peer)).await
        }
        PoolMode::Session => {
            crate::boxed(|| session_mode(&proxy, &mut stream, unbox(session), peer)).await
        }
    };
    if client_left {
        Box::pin(crate::net::quiet_close(&mut stream)).await;
    } else {
        Box::pin(crate::net::linger_close(&mut stream)).await;
    }
    drop(slot);
}

/// The value of a box, the box freed now. (`*b` on a variable of an async fn leaves the allocation alive until the
/// function ends: a session's whole life.)
#[allow(clippy::boxed_local)] // the point: the box is taken and freed here
fn unbox<T>(b: Box<T>) -> T {
    *b
}

/// Logs in under the login timeout; on failure tells the client why (if it can be told) and returns None.
async fn login_or_fail(
    proxy: &Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(ClientStream, Box<Session>)> {
    let login = tokio::time::timeout(
        proxy.cfg.proxy.login_timeout,
        crate::boxed(|| login(proxy, tcp)),
    );
    let t = &proxy.telemetry;
    match login.await {
        Ok(Ok(Some((stream, session)))) => {
            t.logins_ok.increment(1);
            Some((stream, Box::new(session)))
        }
        Ok(Ok(None)) => None,
        Ok(Err((Some(mut stream), err))) => {
            t.logins_failed.increment(1);
            t.error_sent(err.code);
            debug!(%peer, error = %err, "login failed");
            send_error(&mut stream, &err).await;
            crate::net::linger_close(&mut stream).await;
            None
        }
        Ok(Err((None, err))) => {
            t.logins_failed.increment(1);
            debug!(%peer, error = %err, "connection refused before startup");
            None
        }
        Err(_) => {
            t.logins_failed.increment(1);
            debug!(%peer, "login timeout");
            None
        }
    }
}

/// A client that has logged in.
struct Session {
    tenant: String,
    user: String,
    target: crate::tenant::BackendTarget,
    pool_cfg: crate::config::PoolConfig,
    startup: StartupParams,
    mode: PoolMode,
    /// Counts against the tenant's `max_connections`; its state gives the plan in force.
    slot: crate::policy::limits::ConnectionSlot,
    /// What the client sent after its login messages without waiting for the answer (normally nothing): the start
    /// of its first request.
    early: BytesMut,
}

impl Session {
    /// The pool of the session's backend target, sized and weighted by the tenant's plan.
    fn pool(&self, proxy: &Proxy) -> anyhow::Result<Arc<crate::pool::Pool>> {
        let (cfg, weight) = self
            .slot
            .tenant()
            .with_plan(|p| (p.pool_config(self.pool_cfg), p.weight));
        proxy.pools.get(&self.tenant, &self.target, cfg, weight)
    }
}

/// The bounds of a forwarding run for a client of `tenant` on `database`: the proxy's, with the tenant's policy
/// (unless `proxy.sql_policy` is off).
fn run_limits<'a>(
    proxy: &'a Proxy,
    slot: &'a crate::policy::limits::ConnectionSlot,
    tenant: &'a str,
    database: &'a str,
) -> forward::Limits<'a> {
    forward::Limits::from_config(&proxy.cfg.proxy, Some(&proxy.telemetry.query_seconds))
        .with_policy(proxy.cfg.proxy.sql_policy.then_some(forward::Policy {
            state: slot.plan_ref(),
            classifier: &proxy.classifier,
            telemetry: &proxy.telemetry,
            tenant,
            database,
        }))
}

type LoginError = (Option<ClientStream>, PgError);

/// Negotiates TLS, reads the startup packet, routes and authenticates. `Ok(None)`: the connection ended without
/// anything to answer (a cancel request, or a client that hung up).
async fn login(
    proxy: &Proxy,
    tcp: TcpStream,
) -> Result<Option<(ClientStream, Session)>, LoginError> {
    // The login's messages are read through one small buffer; what is left in it at the end goes to the session.
    let mut buf = BytesMut::new();
    let Some((mut stream, startup, tls)) = negotiate(proxy, tcp, &mut buf).await? else {
        return Ok(None);
    };
    macro_rules! fail {
        ($e:expr) => {
            return Err((Some(stream), $e))
        };
    }
    if startup.minor_version > 0 || !startup.protocol_options.is_empty() {
        let mut out = BytesMut::new();
        msg::negotiate_protocol_version(startup.protocol_options.clone(), &mut out);
        if stream.write_all(&out).await.is_err() {
            return Ok(None);
        }
    }
    if startup
        .get("replication")
        .is_some_and(|v| v != "false" && v != "0" && v != "off")
    {
        fail!(PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported through pgweir"
        ));
    }
    let Some(client_user) = startup.get("user").map(str::to_owned) else {
        fail!(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet"
        ));
    };
    let routed = match routing::route(
        RouteInput {
            sni: tls.sni.as_deref(),
            user: &client_user,
            options: startup.get("options"),
            base_domain: proxy.cfg.proxy.base_domain.as_deref(),
            default_tenant: proxy.cfg.proxy.default_tenant.as_deref(),
        },
        |t| proxy.directory.get(t).is_some(),
    ) {
        Ok(r) => r,
        Err(e) => fail!(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            e.to_string()
        )),
    };
    let startup_params = match backend_startup_params(proxy, &startup, &routed.options) {
        Ok(p) => p,
        Err(e) => fail!(e),
    };

    let tenant = match proxy.directory.get(&routed.endpoint.tenant) {
        Some(t) => Some(t),
        None => proxy.directory.lookup(&routed.endpoint.tenant).await,
    };
    let user = tenant.as_ref().and_then(|t| t.users.get(&routed.user));
    let authenticated = match auth::authenticate(
        proxy,
        &mut stream,
        &mut buf,
        &tls,
        tenant.as_deref(),
        user,
        &routed.user,
    )
    .await
    {
        Ok(ok) => ok,
        Err(auth::AuthFailure::Gone) => return Ok(None),
        Err(auth::AuthFailure::Error(e)) => fail!(e),
    };
    let (Some(tenant), Some(user), true) = (tenant.as_deref(), user, authenticated) else {
        fail!(PgError::auth_failed(&client_user));
    };
    if tenant.require_tls && !stream.is_tls() {
        fail!(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            format!("endpoint \"{}\" requires TLS", routed.endpoint)
        )
        .with_hint("connect with sslmode=require"));
    }
    let mode = match &routed.pool_mode {
        Some(m) => match m.parse::<PoolMode>() {
            Ok(m) => m,
            Err(e) => fail!(PgError::fatal(sqlstate::INVALID_PARAMETER_VALUE, e)),
        },
        None => user.pool_mode.unwrap_or(tenant.pool_mode),
    };
    let database = startup
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&routed.user);
    // The plan's settings policy holds for startup parameters and `options=-c …` too.
    let options = routing::option_settings(&routed.options);
    let settings = startup
        .params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | "options" | "replication"))
        .chain(options.iter().flatten());
    let state = proxy
        .tenant_states
        .state(&tenant.id, &tenant.plan, tenant.read_only);
    for (k, v) in settings {
        if let Some(r) = tenant.plan.policy.setting(k, Some(v)) {
            proxy.telemetry.policy_refused(r.rule);
            state.refused(r.rule, format!("(startup parameter {k})"));
            fail!(PgError::fatal(r.code, r.message));
        }
    }
    let slot = match state.connect() {
        Some(s) => s,
        None => {
            proxy.telemetry.policy_refused("max-connections");
            state.refused("max-connections", "(connection)".into());
            fail!(PgError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "too many connections for this database: its plan allows {}",
                    tenant.plan.max_connections.unwrap_or_default()
                )
            ))
        }
    };
    // A monthly quota counts what every instance saw this month: read it before the first query here.
    if tenant.plan.monthly_queries.is_some() && !slot.tenant().month_known() {
        // Bounded: a catalog that does not answer must not hold logins up (the next flush reads it then).
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            proxy.refresh_month_quotas(Some(&tenant.id)),
        )
        .await;
    }
    let target = match tenant.target(user, database, routed.endpoint.branch.as_deref()) {
        Ok(t) => t,
        Err(e) => fail!(PgError::fatal(
            sqlstate::INVALID_CATALOG_NAME,
            e.to_string()
        )),
    };
    Ok(Some((
        stream,
        Session {
            tenant: tenant.id.clone(),
            user: routed.user,
            target,
            pool_cfg: tenant.pool,
            startup: startup_params,
            mode,
            slot,
            // Only pipelined bytes; an empty buffer's capacity is not kept (it would stay with an idle client).
            early: if buf.is_empty() { BytesMut::new() } else { buf },
        },
    )))
}

/// The startup parameters the backend gets: the client's own, minus those pgweir owns (`user`, `database`,
/// `endpoint=` in `options`), refusing the deny-listed ones.
fn backend_startup_params(
    proxy: &Proxy,
    startup: &StartupMessage,
    options: &[String],
) -> Result<StartupParams, PgError> {
    let denied = |name: &str, value: &str| -> Option<PgError> {
        let lname = crate::ascii_lowercase(name);
        let listed = DENIED_STARTUP_PARAMETERS.contains(&&*lname)
            || proxy
                .cfg
                .proxy
                .deny_startup_parameters
                .iter()
                .any(|d| d.eq_ignore_ascii_case(name));
        // standard_conforming_strings=on is harmless; only turning it off is refused.
        let harmless = lname == "standard_conforming_strings" && value.eq_ignore_ascii_case("on");
        (listed && !harmless).then(|| {
            PgError::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!("parameter \"{name}\" cannot be set through pgweir"),
            )
        })
    };
    let mut params: Vec<(String, String)> = Vec::with_capacity(startup.params.len());
    for (k, v) in &startup.params {
        match k.as_str() {
            "user" | "database" | "options" | "replication" => continue,
            _ => {}
        }
        if let Some(e) = denied(k, v) {
            return Err(e);
        }
        params.push((k.clone(), v.clone()));
    }
    for s in routing::option_settings(options).into_iter().flatten() {
        if let Some(e) = denied(&s.0, &s.1) {
            return Err(e);
        }
    }
    if !options.is_empty() {
        params.push(("options".to_owned(), routing::join_options(options)));
    }
    params.sort();
    Ok(Arc::from(params))
}

/// TLS and startup negotiation up to the StartupMessage. Reads through `buf`: what the client sent after its
/// StartupMessage (normally nothing: it waits for the answer) stays there.
async fn negotiate(
    proxy: &Proxy,
    tcp: TcpStream,
    buf: &mut BytesMut,
) -> Result<Option<(ClientStream, StartupMessage, TlsInfo)>, LoginError> {
    let mut tls = TlsInfo::default();
    // PG17 direct TLS: the connection starts with a TLS ClientHello.
    let mut first = [0u8; 1];
    let mut stream = match tcp.peek(&mut first).await {
        Ok(1) if first[0] == 0x16 => match start_tls(proxy, tcp, &mut tls, true).await {
            Some(s) => s,
            None => return Ok(None),
        },
        Ok(_) => Stream::Plain(tcp),
        Err(_) => return Ok(None),
    };
    loop {
        let body = match read_packet(&mut stream, buf).await {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(None),
            Err(e) => return Err((Some(stream), e)),
        };
        let packet = match parse_packet(&body) {
            Ok(p) => p,
            Err(e) => return Err((Some(stream), e)),
        };
        match packet {
            FirstPacket::SslRequest | FirstPacket::GssEncRequest if stream.is_tls() => {
                return Err((
                    Some(stream),
                    PgError::protocol_violation(
                        "encryption negotiation inside an encrypted connection",
                    ),
                ))
            }
            FirstPacket::SslRequest => {
                let Stream::Plain(mut tcp) = stream else {
                    return Ok(None);
                };
                if proxy.tls.is_some() && !buf.is_empty() {
                    // Bytes sent before the TLS handshake would pass as if they came over TLS (as Postgres,
                    // CVE-2021-23214): a client must wait for the answer.
                    return Err((
                        Some(Stream::Plain(tcp)),
                        PgError::protocol_violation("received unencrypted data after SSL request"),
                    ));
                }
                if proxy.tls.is_none() {
                    if tcp.write_all(&[msg::SSL_REFUSED]).await.is_err() {
                        return Ok(None);
                    }
                    stream = Stream::Plain(tcp);
                    continue;
                }
                if tcp.write_all(&[msg::SSL_ALLOWED]).await.is_err() {
                    return Ok(None);
                }
                stream = match start_tls(proxy, tcp, &mut tls, false).await {
                    Some(s) => s,
                    None => return Ok(None),
                };
            }
            FirstPacket::GssEncRequest => {
                if stream.write_all(&[msg::SSL_REFUSED]).await.is_err() {
                    return Ok(None);
                }
            }
            FirstPacket::Cancel { pid, secret } => {
                handle_cancel(proxy, pid, &secret).await;
                return Ok(None);
            }
            FirstPacket::Startup(s) => return Ok(Some((stream, s, tls))),
        }
    }
}

async fn start_tls(
    proxy: &Proxy,
    tcp: TcpStream,
    info: &mut TlsInfo,
    direct: bool,
) -> Option<ClientStream> {
    let snapshot = proxy.tls.as_ref()?.current();
    let tls = match snapshot.acceptor.accept(tcp).await {
        Ok(t) => t,
        Err(e) => {
            debug!(error = %e, "TLS handshake failed");
            return None;
        }
    };
    let (_, conn) = tls.get_ref();
    if direct && conn.alpn_protocol() != Some(crate::tls::ALPN_POSTGRESQL) {
        debug!("direct TLS without the postgresql ALPN protocol");
        return None;
    }
    info.sni = conn.server_name().map(str::to_owned);
    info.channel_binding = snapshot.channel_binding.clone();
    Some(Stream::Tls(Box::new(tls)))
}

async fn handle_cancel(proxy: &Proxy, pid: i32, secret: &[u8]) {
    let outcome = proxy
        .cancels
        .cancel(pid, secret, |t| async move {
            crate::backend::send_cancel(&t.host, t.port, t.pid, &t.secret).await
        })
        .await;
    match outcome {
        CancelOutcome::ForwardFailed(e) => warn!(error = %e, "could not forward a cancel request"),
        CancelOutcome::UnknownKey => debug!(pid, "cancel request with an unknown key ignored"),
        o => debug!(pid, outcome = ?o, "cancel request handled"),
    }
}

async fn send_error<W: AsyncWrite + Unpin>(stream: &mut W, err: &PgError) {
    let bytes = err.to_bytes();
    let _ = stream.write_all(&bytes).await;
    let _ = stream.flush().await;
}

async fn send_visible<W: AsyncWrite + Unpin>(stream: &mut W, err: &ClientVisible) {
    match err {
        ClientVisible::Error(e) => send_error(stream, e).await,
        ClientVisible::Raw(frame) => {
            let _ = stream.write_all(frame).await;
            let _ = stream.flush().await;
        }
    }
}

/// The end of a session in either pool mode (the cancel slot already unlinked): tells the client what pgweir has
/// to say about why it ended, and gives the server connection back (reset) only if it is clean — otherwise
/// dropping the checkout closes it.
async fn finish(
    stream: &mut ClientStream,
    tenant: &str,
    end: &forward::End,
    mut checkout: Checkout,
) {
    use forward::EndReason;
    match &end.reason {
        EndReason::ServerGone if end.server_at_boundary && !end.server_sent_error => {
            let e = PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                "server closed the connection unexpectedly",
            );
            send_error(stream, &e).await;
        }
        EndReason::ClientProtocol(e) => {
            send_error(stream, &PgError::protocol_violation(e.to_string())).await;
        }
        EndReason::IdleInTransaction | EndReason::ClientIdle => {
            send_error(stream, &idle_timeout_error(&end.reason)).await;
        }
        EndReason::PolicyViolation(why) => {
            warn!(%tenant, %why, "session ended by policy");
            if end.server_at_boundary {
                send_error(
                    stream,
                    &PgError::fatal(sqlstate::INSUFFICIENT_PRIVILEGE, format!("pgweir: {why}")),
                )
                .await;
            }
        }
        EndReason::ServerProtocol(_) | EndReason::TransactionEnd => {
            let why = match &end.reason {
                EndReason::ServerProtocol(e) => e.to_string(),
                _ => "a transaction ended with requests outstanding".to_owned(),
            };
            warn!(%tenant, %why, "server connection out of sync; closing it");
            if end.server_at_boundary {
                let e = PgError::fatal(sqlstate::CONNECTION_FAILURE, "server connection lost");
                send_error(stream, &e).await;
            }
        }
        EndReason::ServerGone => {}
        EndReason::ClientTerminated | EndReason::ClientGone => {
            if !end.server_clean {
                debug!(%tenant, reason = ?end.reason, tx_status = %char::from(end.tx_status), "client left with a request outstanding; closing its server connection");
            }
        }
    }
    if end.server_clean {
        if end.copy_seen && !txn::in_sync(checkout.conn(), end.tx_status).await {
            warn!(%tenant, "server connection out of sync after COPY; closing it");
            return;
        }
        checkout.release(end.tx_status);
    }
}

/// Adds what a forwarding run did to the process counters.
/// (`/metrics` derives the process totals from these per-tenant counters.)
fn count_run(pool: &Pool, end: &forward::End) {
    let u = &pool.usage;
    u.requests.fetch_add(end.answered, Ordering::Relaxed);
    u.bytes_in.fetch_add(end.bytes_in, Ordering::Relaxed);
    u.bytes_out.fetch_add(end.bytes_out, Ordering::Relaxed);
}

/// The FATAL a client gets when pgweir shuts down (Postgres's words for a server shutdown).
pub(super) fn shutdown_error() -> PgError {
    PgError::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        "terminating connection due to administrator command",
    )
}

/// The FATAL for a client disconnected for idling (as Postgres words its own idle timeouts).
fn idle_timeout_error(reason: &forward::EndReason) -> PgError {
    match reason {
        forward::EndReason::IdleInTransaction => PgError::fatal(
            sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
            "terminating connection due to idle-in-transaction timeout",
        ),
        _ => PgError::fatal(
            sqlstate::IDLE_SESSION_TIMEOUT,
            "terminating connection due to idle-session timeout",
        ),
    }
}

/// Tells the client why it got no server connection.
async fn report_checkout_error(
    stream: &mut ClientStream,
    pool: &Pool,
    tenant: &str,
    e: CheckoutError,
) {
    match e {
        CheckoutError::Timeout(d) => {
            warn!(%tenant, pool = %pool.key(), "pool exhausted");
            let e = PgError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "no server connection available within {}s: the pool is exhausted",
                    d.as_secs_f32()
                ),
            );
            send_error(stream, &e).await;
        }
        CheckoutError::Paused(d) => {
            warn!(%tenant, pool = %pool.key(), "paused database not resumed in time");
            let e = PgError::fatal(
                sqlstate::CANNOT_CONNECT_NOW,
                format!(
                    "the database is paused and was not resumed within {}s; try again",
                    d.as_secs_f32()
                ),
            );
            send_error(stream, &e).await;
        }
        CheckoutError::Backend(e) => {
            warn!(%tenant, pool = %pool.key(), error = %e, "backend connection failed");
            send_visible(stream, &e.client_error()).await;
        }
    }
}

/// Tells a client that logged in so.
pub(super) async fn auth_ok(stream: &mut ClientStream) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(16);
    msg::auth_ok(&mut out);
    stream.write_all(&out).await
}

/// Session mode: AuthenticationOk, a server connection for the whole session, its parameters, a cancel key, then
/// forwarding.
/// Serves a logged-in client in session mode; true when the session ended because the client left (Terminate or
/// a closed connection), false when pgweir ended it (the client may have an error still to read).
async fn session_mode(
    proxy: &Arc<Proxy>,
    stream: &mut ClientStream,
    s: Session,
    peer: SocketAddr,
) -> bool {
    if auth_ok(stream).await.is_err() {
        return false;
    }
    let mut out = BytesMut::with_capacity(512);
    let pool = match s.pool(proxy) {
        Ok(p) => p.attach(),
        Err(e) => {
            warn!(tenant = %s.tenant, error = %e, "could not set up the pool");
            send_error(
                stream,
                &PgError::fatal(
                    sqlstate::INTERNAL_ERROR,
                    "pgweir could not set up the backend pool",
                ),
            )
            .await;
            return false;
        }
    };
    let mut checkout = match pool.checkout(&s.startup, false).await {
        Ok(c) => c,
        Err(e) => {
            report_checkout_error(stream, &pool, &s.tenant, e).await;
            return false;
        }
    };
    let conn = checkout.conn();
    for (k, v) in &conn.params {
        msg::parameter_status(k, v, &mut out);
    }
    let key = proxy
        .cancels
        .register(conn.pid, SlotState::Linked(conn.cancel_target()));
    msg::backend_key_data(key.pid, key.secret, &mut out);
    msg::ready_for_query(b'I', &mut out);
    if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
        return false; // dropping the checkout closes the server connection: it is clean, but the client never used it
    }
    drop(out);
    pool.usage.connections.fetch_add(1, Ordering::Relaxed);
    info!(%peer, tenant = %s.tenant, user = %s.user, server_pid = conn.pid, "client attached");

    let mut client_buf = BytesMut::with_capacity(forward::CHUNK);
    client_buf.extend_from_slice(&s.early);
    let run = Box::pin(forward::run(
        stream,
        &mut client_buf,
        checkout.conn(),
        run_limits(proxy, &s.slot, &s.tenant, &s.target.database),
        forward::Mode::Session,
        None,
        crate::clock::now_us(),
    ));
    let end = proxy.lifecycle.unless_terminated(run).await;
    let Some(end) = end else {
        // Shutdown: the server connection is closed (the backend rolls back what is open), the client told.
        key.slot.set(SlotState::Idle).await;
        drop(checkout);
        send_error(stream, &shutdown_error()).await;
        return false;
    };
    count_run(&pool, &end);
    // Unlink before the server can go to another client: waits for a cancel that is being delivered.
    key.slot.set(SlotState::Idle).await;
    drop(key);
    debug!(%peer, tenant = %s.tenant, outcome = ?end.reason, "session ended");
    let client_left = matches!(
        end.reason,
        forward::EndReason::ClientTerminated | forward::EndReason::ClientGone
    );
    finish(stream, &s.tenant, &end, checkout).await;
    client_left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, F: std::future::Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// What an idle transaction-mode client keeps in its task: the session's future and the transaction loop's
    /// (boxed) future. A regression guard for the idle-memory target (at most 2 KB per idle client, with the
    /// task, the socket registration and the session state).
    #[test]
    fn idle_session_futures_stay_small() {
        let serve = future_size(serve);
        let run = future_size(txn::run);
        eprintln!("serve future: {serve} B, txn::run future: {run} B");
        assert!(serve <= 512, "{serve}");
        assert!(run <= 768, "{run}");
    }
}
