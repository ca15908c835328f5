//! Transaction pooling: the client holds a server connection from the first message of a transaction until the
//! ReadyForQuery that ends it (status 'I', nothing outstanding), then gives it back.
//!
//! The client's session settings (its startup parameters, and what it changes with `SET`, `RESET`, `set_config`
//! or reported parameters) are kept here and moved onto whichever server connection it lands on; every shared
//! server connection remembers what was applied to it (`ServerConn::applied`). Session state that cannot move
//! (see `sqlscan::PinReason`) pins the client to its server connection until the server says it is gone (asked
//! after a statement that may release it, such as `UNLISTEN` or `pg_advisory_unlock_all()`) or the client leaves.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::backend::{ServerConn, StartupParams};
use crate::cancel::{CancelKey, SlotState};
use crate::net::{read_frame, ClientStream, Stream};
use crate::pool::{Checkout, Pool, PoolClient};
use crate::prepared::ClientStatements;
use crate::routing;
use crate::server::Proxy;
use crate::sqlscan::{self, Effect, PinReason};
use crate::wire::error::sqlstate;
use crate::wire::msg;
use crate::wire::PgError;

use super::forward::{self, EndReason, Mode, Statements};
use super::{count_run, finish, idle_timeout_error, report_checkout_error, send_error, Session};

/// Reported parameters a client cannot set: never moved between server connections.
const READ_ONLY_REPORTED: &[&str] = &[
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "session_authorization",
    "in_hot_standby",
];

/// The client's session settings: name (lowercase) → value, as `set_config` takes them.
type Settings = Vec<(String, String)>;

fn set(settings: &mut Settings, name: &str, value: &str) {
    match settings.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => *v = value.to_owned(),
        None => settings.push((name.to_owned(), value.to_owned())),
    }
}

fn get<'a>(settings: &'a Settings, name: &str) -> Option<&'a str> {
    settings
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// An application_name the server reports back unchanged: printable ASCII, shorter than NAMEDATALEN.
fn plain_application_name(v: &str) -> bool {
    v.len() < 64 && v.bytes().all(|b| (b' '..=b'~').contains(&b))
}

/// The client's startup parameters as settings (`options=-c …` included).
fn startup_settings(startup: &StartupParams) -> Result<Settings, PgError> {
    let mut out = Settings::new();
    for (k, v) in startup.iter() {
        if k == "options" {
            for s in routing::option_settings(&routing::split_options(v)) {
                match s {
                    Ok((name, value)) => set(&mut out, &name.to_ascii_lowercase(), &value),
                    Err(token) => {
                        return Err(PgError::fatal(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            format!("option \"{token}\" is not supported in transaction pooling mode: use -c name=value"),
                        ))
                    }
                }
            }
        } else {
            set(&mut out, &k.to_ascii_lowercase(), v);
        }
    }
    // Kept for the whole session: no spare capacity.
    out.shrink_to_fit();
    Ok(out)
}

/// A logged-in transaction-mode client between transactions: everything its session keeps (small on purpose:
/// idle clients are most clients).
struct Client {
    tenant: String,
    pool: PoolClient,
    key: CancelKey,
    /// The client's startup settings (what `RESET` returns to).
    startup: Settings,
    /// Its settings now, moved onto every server connection it uses.
    desired: Settings,
    statements: ClientStatements,
    /// Counts against the tenant's `max_connections`; its state gives the plan in force.
    slot: crate::policy::limits::ConnectionSlot,
}

/// What comes after a transaction.
enum Next {
    Idle,
    Stop,
}

/// Serves a logged-in client in transaction mode, from AuthenticationOk on.
///
/// Between transactions the session is this loop's small state, [`Client`] and an empty buffer: the login, the
/// wait for bytes and each transaction run in boxed futures that exist only while they run.
///
/// True when the session ended because the client left (Terminate, or its connection closed while idle).
pub(super) async fn run(
    proxy: &Arc<Proxy>,
    stream: &mut ClientStream,
    mut s: Box<Session>,
    peer: &SocketAddr,
) -> bool {
    // A request the client sent before the login was answered starts the loop.
    let mut buf = std::mem::take(&mut s.early);
    let Some(mut c) = crate::boxed(|| attach(proxy, stream, super::unbox(s), *peer)).await else {
        return false;
    };
    let mut watch = proxy.lifecycle.watch();
    loop {
        // Idle: no server connection until the client sends something.
        if buf.is_empty() {
            let read = match proxy.cfg.proxy.client_idle_timeout {
                // Small enough to live in this future: no allocation per idle wait.
                t if t.is_zero() => read_idle(stream, &mut buf, &mut watch).await,
                t => Box::pin(read_idle_within(stream, &mut buf, t, &mut watch)).await,
            };
            match read {
                IdleRead::Data => {}
                IdleRead::Closed => return true,
                IdleRead::Stopping => {
                    Box::pin(send_error(stream, &super::shutdown_error())).await;
                    return false;
                }
                IdleRead::TimedOut => {
                    Box::pin(send_error(
                        stream,
                        &idle_timeout_error(&EndReason::ClientIdle),
                    ))
                    .await;
                    return false;
                }
            }
        }
        if buf[0] == b'X' {
            return true;
        }
        let next = match crate::boxed(|| c.acquire(proxy, stream, &mut buf)).await {
            Ok(checkout) => {
                crate::boxed(|| c.transaction(proxy, stream, &mut buf, &mut watch, checkout)).await
            }
            Err(next) => next,
        };
        match next {
            Next::Idle => {}
            Next::Stop => return false,
        }
        if buf.is_empty() && proxy.lifecycle.is_draining() {
            // Shutting down: the transaction is over, the session ends.
            Box::pin(send_error(stream, &super::shutdown_error())).await;
            return false;
        }
        if buf.is_empty() {
            buf = BytesMut::new();
        }
    }
}

/// Sets up the session: pool, cancel key, the parameters the client sees; None if the client cannot be served
/// (it has been told why).
async fn attach(
    proxy: &Arc<Proxy>,
    stream: &mut ClientStream,
    s: Session,
    peer: SocketAddr,
) -> Option<Client> {
    // AuthenticationOk waits in `out` to go with the parameters in one write (one packet, one wakeup of the
    // client); a refusal goes out right after it, and before a wait for a server connection it goes alone.
    // Room for the usual login answer (some 15 ParameterStatus messages): it does not grow and copy on the way.
    let mut out = BytesMut::with_capacity(1024);
    msg::auth_ok(&mut out);
    let startup = match startup_settings(&s.startup) {
        Ok(v) => v,
        Err(e) => {
            refuse_after(stream, out, &e).await;
            return None;
        }
    };
    let pool = match s.pool(proxy) {
        Ok(p) => p.attach(),
        Err(e) => {
            warn!(tenant = %s.tenant, error = %e, "could not set up the pool");
            let e = PgError::fatal(
                sqlstate::INTERNAL_ERROR,
                "pgweir could not set up the backend pool",
            );
            refuse_after(stream, out, &e).await;
            return None;
        }
    };
    let desired = startup.clone();
    let fake_pid = rand::random::<i32>() & 0x3fff_ffff;
    let key = proxy.cancels.register(fake_pid.max(1), SlotState::Idle);

    // Login: the parameters the client sees are a server's, with its settings applied. A server connection tells
    // them, unless a client with the same settings logged in recently. A plain application_name (often unique per
    // connection) is not part of that key: the server would report it back as it is.
    let app_name = get(&desired, "application_name").filter(|v| plain_application_name(v));
    let skip = app_name.map(|_| "application_name");
    let params = match pool.login_params(&desired, skip) {
        Some(p) => p,
        None => {
            // The client learns it is in before it waits for a server connection.
            write_flush(stream, &out).await.ok()?;
            out.clear();
            let mut first = checkout_shared(&pool, stream, &s.tenant).await?;
            if let Err(e) = Box::pin(sync(first.conn(), &desired)).await {
                // A startup parameter the server refuses: as on a direct connection, the login fails.
                send_error(stream, &e).await;
                return None;
            }
            let mut encoded = BytesMut::new();
            for (k, v) in &first.conn_ref().params {
                if Some(k.as_str()) != skip {
                    msg::parameter_status(k, v, &mut encoded);
                }
            }
            first.release_idle();
            let encoded = encoded.freeze();
            pool.remember_login_params(&desired, skip, encoded.clone());
            encoded
        }
    };
    out.extend_from_slice(&params);
    if let Some(app) = app_name {
        msg::parameter_status("application_name", app, &mut out);
    }
    msg::backend_key_data(key.pid, key.secret, &mut out);
    msg::ready_for_query(b'I', &mut out);
    write_flush(stream, &out).await.ok()?;
    pool.usage
        .connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    info!(%peer, tenant = %s.tenant, user = %s.user, mode = "transaction", "client attached");
    let mut statements = ClientStatements::new(pool.statements().clone());
    statements.set_search_path(get(&desired, "search_path"));
    Some(Client {
        statements,
        tenant: s.tenant,
        pool,
        key,
        startup,
        desired,
        slot: s.slot,
    })
}

impl Client {
    /// The server connection for the request at the start of `buf`, linked to the client's cancel key; or what
    /// comes next when the request needs none (answered by pgweir, cancelled while it waited) or cannot get one.
    ///
    /// A future of its own, apart from [`Client::transaction`]'s: a client waiting for a connection holds only
    /// this small one, and the large forwarding state exists only for transactions that run. With many more
    /// clients than server connections, that keeps the memory the running transactions touch small (and in the
    /// CPU's caches) instead of spread over every waiting client's copy of it. (One box for both would save an
    /// allocation per transaction, but every waiting client would hold the large one.)
    async fn acquire(
        &mut self,
        proxy: &Arc<Proxy>,
        stream: &mut ClientStream,
        buf: &mut BytesMut,
    ) -> Result<Checkout, Next> {
        let c = self;
        let per_server = c.pool.config().max_prepared_statements;
        let max = proxy.cfg.proxy.max_message_bytes;
        if per_server > 0 {
            // Preparing statements a server already accepted, or deallocating one, needs no server connection
            // (a batch of Parses, or a Query: the first byte says which to look for).
            let mut out = BytesMut::new();
            let answered = match buf.first() {
                Some(b'P') => c.statements.answer_parse_batch(buf, &mut out),
                Some(b'Q') => c.statements.answer_deallocate(buf, &mut out),
                _ => None,
            };
            if let Some(n) = answered {
                if write_flush(stream, &out).await.is_err() {
                    return Err(Next::Stop);
                }
                buf.advance(n);
                return Err(Next::Idle);
            }
        }
        let got = wait_for_server(&c.pool, &c.key).await;
        let mut checkout = match got {
            Some(Ok(co)) => co,
            Some(Err(e)) => {
                report_checkout_error(stream, &c.pool, &c.tenant, e).await;
                return Err(Next::Stop);
            }
            None => {
                return Err(match drop_cancelled(&c.key, stream, buf, max).await {
                    true => Next::Idle,
                    false => Next::Stop,
                });
            }
        };
        // Before linking: a cancel that comes while pgweir moves the settings must not cancel pgweir's own query
        // (the slot says `Waiting`, so it is answered as a cancel of a request that reached no server; one that
        // came while the request waited for the connection is kept).
        if checkout.conn_ref().applied != c.desired {
            c.key.slot.mark_waiting().await;
            if let Err(e) = Box::pin(sync(checkout.conn(), &c.desired)).await {
                warn!(tenant = %c.tenant, error = %e, "could not move session settings to a server connection");
                send_error(stream, &e).await;
                return Err(Next::Stop);
            }
        }
        // Linking and a cancel that arrived meanwhile exclude each other.
        if !c
            .key
            .slot
            .link_unless_cancelled(checkout.conn_ref().cancel_target())
            .await
        {
            checkout.release_idle();
            return Err(match drop_cancelled(&c.key, stream, buf, max).await {
                true => Next::Idle,
                false => Next::Stop,
            });
        }
        Ok(checkout)
    }

    /// One request or transaction on `checkout` (linked by [`Client::acquire`]): `buf` starts with the client's
    /// first message of it.
    async fn transaction(
        &mut self,
        proxy: &Arc<Proxy>,
        stream: &mut ClientStream,
        buf: &mut BytesMut,
        watch: &mut crate::server::Watch<'_>,
        mut checkout: Checkout,
    ) -> Next {
        let c = self;
        let per_server = c.pool.config().max_prepared_statements;
        let telemetry = &proxy.telemetry;
        c.pool
            .usage
            .transactions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = crate::clock::now_us();
        c.slot.refresh_plan();
        let limits = super::run_limits(proxy, &c.slot, &c.tenant, &c.pool.key().database);
        let mut mode = Mode::Transaction;
        let mut pins = Pins::default();
        let mut counted_pin = None;
        let mut cancel_forwarded = false;
        // Until the last ReadyForQuery of the transaction (the runs count from `started`).
        let mut duration_us = 0;
        loop {
            // Not boxed on its own: this future is (it exists only during a transaction). Pinned in place: the
            // race against shutdown (`unless_terminated`) holds a reference, not a second copy of the future.
            let end = {
                let run = forward::run(
                    stream,
                    buf,
                    checkout.conn(),
                    limits,
                    mode,
                    statements_for(&mut c.statements, per_server),
                    started,
                );
                tokio::pin!(run);
                watch.unless_terminated(run.as_mut()).await
            };
            let Some(end) = end else {
                // Shutdown ran out of time: the server connection is closed (the backend rolls the transaction
                // back) and the client is told.
                c.key.slot.set(SlotState::Idle).await;
                drop(checkout);
                send_error(stream, &super::shutdown_error()).await;
                return Next::Stop;
            };
            count_run(&c.pool, &end);
            duration_us = duration_us.max(end.last_ready_us);
            // Unlinked while pgweir runs its own queries on the connection.
            c.key.slot.set(SlotState::Idle).await;
            cancel_forwarded |= c.key.slot.take_forwarded() | end.cancel_sent;

            for (name, value) in &end.reported {
                let name = name.to_ascii_lowercase();
                if !READ_ONLY_REPORTED.contains(&name.as_str()) {
                    set(&mut c.desired, &name, value);
                    set(&mut checkout.conn().applied, &name, value);
                }
            }
            if !matches!(end.reason, EndReason::TransactionEnd) || !end.server_clean {
                Box::pin(finish(stream, &c.tenant, &end, checkout)).await;
                return Next::Stop;
            }
            // First of all pgweir's own queries on the connection: answers still in flight must not be taken
            // for theirs.
            if end.copy_seen && !in_sync(checkout.conn(), end.tx_status).await {
                warn!(tenant = %c.tenant, "server connection out of sync after COPY; closing it");
                drop(checkout);
                return Next::Idle;
            }
            let released = pins.apply(&end.effects);
            if !pins.unknown() && !end.effects.is_empty() {
                match Box::pin(follow_effects(
                    checkout.conn(),
                    &end.effects,
                    &c.startup,
                    &mut c.desired,
                ))
                .await
                {
                    Ok(true) => pins.set_unknown(),
                    Ok(false) => {}
                    Err(e) => {
                        warn!(tenant = %c.tenant, error = %e, "could not read back session settings");
                        send_error(stream, &e).await;
                        return Next::Stop;
                    }
                }
            }
            if !end.reported.is_empty() || !end.effects.is_empty() {
                // The settings may have changed: the statements follow the search_path.
                c.statements.set_search_path(get(&c.desired, "search_path"));
            }
            if released {
                // Statements that may have released what pinned the client: ask the server what is left.
                match Box::pin(remaining_pins(checkout.conn(), c.pool.backend_user())).await {
                    Ok(left) => pins.verified(left),
                    Err(_) => {
                        let e = InternalError::Lost.to_client();
                        send_error(stream, &e).await;
                        return Next::Stop;
                    }
                }
            }
            let notifications = std::mem::take(&mut checkout.conn().notifications);
            if !notifications.is_empty() && write_flush(stream, &notifications).await.is_err() {
                return Next::Stop;
            }
            if pins.is_empty() {
                if mode == Mode::Pinned {
                    debug!(tenant = %c.tenant, "session state released: unpinned");
                }
                break;
            }
            if mode == Mode::Transaction {
                debug!(tenant = %c.tenant, ?pins, "session state that cannot move: pinned to its server connection");
                counted_pin = Some(c.pool.pin());
                mode = Mode::Pinned;
            }
            link(&c.key, checkout.conn_ref()).await;
        }
        drop(counted_pin);
        telemetry.transaction_seconds.record_us(duration_us);
        if cancel_forwarded {
            // The backend may hold the cancel pending and act on the next query it runs: let that be pgweir's own
            // (it may fail with 57014; that is the point), not another client's.
            if let Err(InternalError::Lost) =
                Box::pin(run_internal(checkout.conn(), "SELECT 1", |_| {})).await
            {
                drop(checkout);
                return Next::Idle;
            }
        }
        // Idle since the last ReadyForQuery: no clock read for it.
        checkout.release_idle_since(crate::clock::instant(started + duration_us));
        Next::Idle
    }
}

/// What keeps a client on its server connection: a bit per [`PinReason`], and one for session state pgweir could
/// not follow (released only by `DISCARD ALL`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Pins(u16);

impl Pins {
    const UNKNOWN: u16 = 1 << 15;
    /// Reasons the server can be asked about (see [`remaining_pins`]).
    const VERIFIABLE: [PinReason; 6] = [
        PinReason::Listen,
        PinReason::AdvisoryLock,
        PinReason::TempTable,
        PinReason::WithHoldCursor,
        PinReason::SqlPrepare,
        PinReason::SessionAuthorization,
    ];

    fn bit(r: PinReason) -> u16 {
        1 << (r as u16)
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn unknown(self) -> bool {
        self.0 & Self::UNKNOWN != 0
    }

    fn set_unknown(&mut self) {
        self.0 |= Self::UNKNOWN;
    }

    /// Takes the effects of a transaction in order; true when one of them may have released a reason that held
    /// (the server must then be asked, [`Pins::verified`]).
    fn apply(&mut self, effects: &[Effect]) -> bool {
        let mut released = false;
        for e in effects {
            match e {
                Effect::Pin(r) => self.0 |= Self::bit(*r),
                Effect::SessionStateUnknown => self.0 |= Self::UNKNOWN,
                Effect::Unpin(r) if self.0 & Self::bit(*r) != 0 => {
                    released = true;
                    self.0 &= !Self::bit(*r);
                }
                // Everything but `LOAD`ed libraries and dblink connections.
                Effect::DiscardAll => {
                    let other = Self::bit(PinReason::Other);
                    released |= self.0 & !other != 0;
                    self.0 &= other;
                }
                _ => {}
            }
        }
        released
    }

    /// The server said which verifiable reasons still hold (`left`): those replace what was believed.
    fn verified(&mut self, left: Pins) {
        let verifiable = Self::VERIFIABLE
            .iter()
            .fold(0, |acc, r| acc | Self::bit(*r));
        self.0 = (self.0 & !verifiable) | (left.0 & verifiable);
    }
}

/// Which verifiable pin reasons hold on the server connection now (it is idle).
async fn remaining_pins(conn: &mut ServerConn, login_role: &str) -> Result<Pins, InternalError> {
    // In the order of `Pins::VERIFIABLE`.
    let sql = format!(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_listening_channels()), \
         EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()), \
         EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()), \
         EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable), \
         EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql), \
         current_user <> session_user OR session_user <> {}",
        sqlscan::quote_literal(login_role)
    );
    let mut row = Vec::new();
    run_internal(conn, &sql, |r| row = r).await?;
    if row.len() != Pins::VERIFIABLE.len() {
        return Err(InternalError::Lost);
    }
    let mut left = Pins::default();
    for (r, v) in Pins::VERIFIABLE.iter().zip(row) {
        if v.as_deref() != Some("f") {
            left.0 |= Pins::bit(*r);
        }
    }
    Ok(left)
}

fn statements_for(statements: &mut ClientStatements, per_server: usize) -> Option<Statements<'_>> {
    (per_server > 0).then_some(Statements {
        client: statements,
        max_per_server: per_server,
    })
}

/// What the wait of an idle client ended with.
/// How long an idle client may still send a request once a shutdown has begun.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

enum IdleRead {
    Data,
    Closed,
    TimedOut,
    Stopping,
}

/// Waits for an idle client's next bytes (no buffer is held while nothing arrives on a plain connection).
async fn read_idle(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    watch: &mut crate::server::Watch<'_>,
) -> IdleRead {
    // A shutdown ends an idle session (the client is told 57P01) — after a moment in which a request already on
    // its way (a client that has just logged in, or was about to send) is still served. Reads are cancel-safe
    // (plain and TLS), so a read cut short by the shutdown loses nothing.
    {
        let read = std::pin::pin!(read_some(stream, buf));
        if let crate::First::A(r) = crate::race(read, std::pin::pin!(watch.drained())).await {
            return r;
        }
    }
    match Box::pin(tokio::time::timeout(DRAIN_GRACE, read_some(stream, buf))).await {
        Ok(r) => r,
        Err(_) => IdleRead::Stopping,
    }
}

/// The first read buffer of a request.
const READ_BUFFER: usize = 1024;

/// The next bytes of a client (a plain connection holds no buffer until it is readable).
async fn read_some(stream: &mut ClientStream, buf: &mut BytesMut) -> IdleRead {
    let read = match stream {
        // Readable, then read at once (the readiness is known: no second poll of the socket).
        Stream::Plain(_) => loop {
            stream.readable().await;
            // Not 512: the allocator's 512-byte pages hold every idle session's future, and a short-lived buffer
            // among them would keep those pages from being returned after a burst. An empty buffer is made
            // anew (`reserve` on it takes BytesMut's general path).
            if buf.capacity() == 0 {
                *buf = BytesMut::with_capacity(READ_BUFFER);
            } else {
                buf.reserve(READ_BUFFER);
            }
            match stream.read_now(buf) {
                Ok(Some(n)) => break Ok(n),
                Err(e) => break Err(e),
                // The readiness was stale: wait again, without the buffer.
                Ok(None) => {
                    if buf.is_empty() {
                        *buf = BytesMut::new();
                    }
                }
            }
        },
        Stream::Tls(_) => {
            buf.reserve(READ_BUFFER);
            stream.read_buf(buf).await
        }
    };
    match read {
        Ok(0) | Err(_) => IdleRead::Closed,
        Ok(_) => IdleRead::Data,
    }
}

/// [`read_idle`] for at most `timeout` (a future of its own: the timer is not part of every idle session).
async fn read_idle_within(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    timeout: std::time::Duration,
    watch: &mut crate::server::Watch<'_>,
) -> IdleRead {
    tokio::time::timeout(timeout, read_idle(stream, buf, watch))
        .await
        .unwrap_or(IdleRead::TimedOut)
}

/// Sends what `out` holds (AuthenticationOk) and then the error `e`, in one write.
async fn refuse_after(stream: &mut ClientStream, mut out: BytesMut, e: &PgError) {
    out.extend_from_slice(&e.to_bytes());
    let _ = write_flush(stream, &out).await;
}

async fn write_flush(stream: &mut ClientStream, out: &[u8]) -> std::io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await
}

/// Waits for a server connection, unless the request is cancelled first (None; a wake-up left over from an
/// earlier cancel is checked against the slot and ignored).
async fn wait_for_server(
    pool: &Arc<Pool>,
    key: &CancelKey,
) -> Option<Result<Checkout, crate::pool::CheckoutError>> {
    let mut wait = pool.checkout(pool.no_params(), true);
    if let Some(c) = wait.take_ready() {
        // No wait: the slot goes from idle straight to linked. A cancel before the link finds the client between
        // transactions, as one that came just before its request was read does.
        return Some(Ok(c));
    }
    // From here until the link, a cancel is remembered and answers the request (57014).
    key.slot.mark_waiting().await;
    loop {
        // Both futures of the race are gone before the cancel is looked at.
        let first = crate::race(
            std::pin::Pin::new(&mut wait),
            std::pin::pin!(key.slot.woken()),
        )
        .await;
        match first {
            crate::First::A(c) => break Some(c),
            crate::First::B(()) => {
                if key.slot.take_cancelled().await {
                    break None;
                }
            }
        }
    }
}

async fn link(key: &CancelKey, conn: &ServerConn) {
    key.slot.set(SlotState::Linked(conn.cancel_target())).await;
}

/// Checks out a shared server connection; on failure tells the client and returns None.
async fn checkout_shared(
    pool: &Arc<Pool>,
    stream: &mut ClientStream,
    tenant: &str,
) -> Option<Checkout> {
    match pool.checkout(pool.no_params(), true).await {
        Ok(c) => Some(c),
        Err(e) => {
            report_checkout_error(stream, pool, tenant, e).await;
            None
        }
    }
}

/// Unlinks the slot and answers the cancelled request; false when the client is gone.
async fn drop_cancelled(
    key: &CancelKey,
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    max: usize,
) -> bool {
    key.slot.set(SlotState::Idle).await;
    answer_cancelled(stream, buf, max).await.is_ok()
}

/// Answers a request that was cancelled while it waited for a server connection, as Postgres would: the request
/// (a Query, or extended-protocol messages up to their Sync) is dropped and the client gets 57014 and
/// ReadyForQuery.
async fn answer_cancelled(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    max: usize,
) -> std::io::Result<()> {
    loop {
        let frame = match read_frame(stream, buf, max).await {
            Ok(f) => f,
            Err(_) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
        };
        if matches!(frame[0], b'Q' | b'S' | b'F') {
            break;
        }
        if frame[0] == b'X' {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    let mut out = BytesMut::new();
    PgError::error(
        sqlstate::QUERY_CANCELED,
        "canceling statement due to user request",
    )
    .encode(&mut out);
    msg::ready_for_query(b'I', &mut out);
    stream.write_all(&out).await?;
    stream.flush().await
}

/// Makes the server connection's session settings equal `desired` (set_config for differences, RESET for
/// settings the previous user had and this client has not). The server's answers stay with pgweir.
async fn sync(conn: &mut ServerConn, desired: &Settings) -> Result<(), PgError> {
    let mut sets = Vec::new();
    // client_encoding last: the server reads the rest of this SQL in the encoding in force when it arrives.
    let ordered = desired
        .iter()
        .filter(|(k, _)| k != "client_encoding")
        .chain(desired.iter().filter(|(k, _)| k == "client_encoding"));
    for (k, v) in ordered {
        if get(&conn.applied, k) != Some(v.as_str()) {
            sets.push(format!(
                "set_config({}, {}, false)",
                sqlscan::quote_literal(k),
                sqlscan::quote_literal(v)
            ));
        }
    }
    let mut sql = String::new();
    for (k, _) in &conn.applied {
        if get(desired, k).is_none() {
            sql.push_str("RESET ");
            sql.push_str(&sqlscan::quote_ident(k));
            sql.push_str("; ");
        }
    }
    if !sets.is_empty() {
        sql.push_str("SELECT ");
        sql.push_str(&sets.join(", "));
    }
    if sql.is_empty() {
        return Ok(());
    }
    // The previous user's client_encoding would garble non-ASCII values: switch to UTF8 in a message of its own.
    let encoding = conn
        .params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("client_encoding"))
        .map(|(_, v)| v.as_str());
    if !sql.is_ascii() && encoding != Some("UTF8") {
        run_internal(conn, "SET client_encoding TO 'UTF8'", |_| {})
            .await
            .map_err(|e| e.to_client())?;
        set(&mut conn.applied, "client_encoding", "UTF8");
    }
    run_internal(conn, &sql, |_| {})
        .await
        .map_err(|e| e.to_client())?;
    conn.applied = desired.clone();
    Ok(())
}

/// Settings whose changes pin the client instead of being moved: they change how the server reads pgweir's own
/// `sync` SQL (`standard_conforming_strings`, `client_encoding`), or cannot be read back (`seed`).
const PIN_ON_SET: &[&str] = &["standard_conforming_strings", "client_encoding", "seed"];

/// After a transaction that changed session settings: read back from the server what they are now (so a SET or
/// RESET that failed or was rolled back is not taken), record that as the truth of the connection and as the
/// client's settings (a RESET that took effect returns to the client's startup value, as on a direct connection),
/// and make the connection match. Returns true when the client must be pinned instead.
async fn follow_effects(
    conn: &mut ServerConn,
    effects: &[Effect],
    startup: &Settings,
    desired: &mut Settings,
) -> Result<bool, PgError> {
    // Per name: the last thing the client did to it (true = SET, false = RESET).
    let mut touched: Vec<(String, bool)> = Vec::new();
    let mut reset_all = false;
    for e in effects {
        match e {
            Effect::Set { name, value } => {
                let name = name.to_ascii_lowercase();
                if PIN_ON_SET.contains(&name.as_str()) {
                    return Ok(true);
                }
                match touched.iter_mut().find(|(k, _)| *k == name) {
                    Some((_, v)) => *v = value.is_some(),
                    None => touched.push((name, value.is_some())),
                }
            }
            Effect::ResetAll | Effect::DiscardAll => {
                reset_all = true;
                touched.iter_mut().for_each(|(_, s)| *s = false);
            }
            _ => {}
        }
    }
    if reset_all {
        for (name, _) in desired
            .iter()
            .chain(conn.applied.iter())
            .chain(startup.iter())
        {
            if !touched.iter().any(|(k, _)| k == name) {
                touched.push((name.clone(), false));
            }
        }
    }
    touched.retain(|(name, _)| name != "seed");
    if touched.is_empty() {
        return Ok(false);
    }
    let cols: Vec<String> = touched
        .iter()
        .map(|(n, _)| format!("current_setting({}, true)", sqlscan::quote_literal(n)))
        .collect();
    let mut values: Vec<Option<String>> = Vec::new();
    run_internal(conn, &format!("SELECT {}", cols.join(", ")), |row| {
        values = row
    })
    .await
    .map_err(|e| e.to_client())?;
    if values.len() != touched.len() {
        return Err(InternalError::Lost.to_client());
    }
    for ((name, is_set), value) in touched.iter().zip(values) {
        let Some(now) = value else {
            // The setting does not exist (any more).
            desired.retain(|(k, _)| k != name);
            conn.applied.retain(|(k, _)| k != name);
            continue;
        };
        set(&mut conn.applied, name, &now);
        if *is_set {
            set(desired, name, &now);
        } else if get(desired, name) != Some(now.as_str()) {
            // The RESET took effect: the client expects its startup value back.
            let value = get(startup, name).unwrap_or(&now).to_owned();
            set(desired, name, &value);
        }
    }
    if get(desired, "search_path").is_some_and(|p| p.contains("pg_temp")) {
        // Tables created through pg_temp are temporary whatever the statement says.
        return Ok(true);
    }
    sync(conn, desired).await.map(|()| false)
}

/// Why pgweir's own query on a server connection failed.
#[derive(Debug)]
enum InternalError {
    Lost,
    Refused { code: String, message: String },
}

impl InternalError {
    fn to_client(&self) -> PgError {
        match self {
            InternalError::Lost => {
                PgError::fatal(sqlstate::CONNECTION_FAILURE, "server connection lost")
            }
            InternalError::Refused { code, message } => PgError::fatal(
                sqlstate::INVALID_PARAMETER_VALUE,
                format!("session setting refused by the server: {message} ({code})"),
            ),
        }
    }
}

/// Runs pgweir's own simple query on a server connection and consumes the answer up to ReadyForQuery.
/// `on_row` sees each DataRow's columns.
async fn run_internal(
    conn: &mut ServerConn,
    sql: &str,
    mut on_row: impl FnMut(Vec<Option<String>>),
) -> Result<(), InternalError> {
    let lost = |_| InternalError::Lost;
    let mut out = BytesMut::with_capacity(sql.len() + 8);
    msg::query(sql, &mut out);
    conn.stream.write_all(&out).await.map_err(lost)?;
    conn.stream.flush().await.map_err(lost)?;
    let mut error: Option<InternalError> = None;
    loop {
        let frame = read_frame(&mut conn.stream, &mut conn.buf, 1 << 20)
            .await
            .map_err(|_| InternalError::Lost)?;
        match frame[0] {
            b'Z' => break,
            b'S' => conn.observe_parameter_status(&frame),
            b'D' => on_row(data_row(&frame)),
            b'A' => conn.notifications.extend_from_slice(&frame),
            b'E' => {
                let (code, message) = crate::backend::error_fields(&frame);
                error = Some(InternalError::Refused { code, message });
            }
            _ => {}
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Whether a server connection is where pgweir thinks it is: between requests, with no answer to anything the
/// client sent still to come. Asked after a run with COPY FROM STDIN, where pgweir infers which of the client's
/// Syncs the server ignored (a wrong guess would end a transaction early and hand the connection on with answers
/// in flight). A query of pgweir's own, with a marker the client cannot guess, must be the very next thing the
/// server answers, and nothing may follow its ReadyForQuery.
pub(super) async fn in_sync(conn: &mut ServerConn, tx_status: u8) -> bool {
    if !conn.buf.is_empty() {
        return false;
    }
    let marker = format!("pgweir-{:016x}", rand::random::<u64>());
    let check = async {
        let mut out = BytesMut::with_capacity(64);
        msg::query(&format!("SELECT '{marker}'"), &mut out);
        conn.stream.write_all(&out).await.ok()?;
        conn.stream.flush().await.ok()?;
        // Expected: RowDescription, the marker's DataRow, CommandComplete, ReadyForQuery.
        let mut step = 0;
        loop {
            let frame = read_frame(&mut conn.stream, &mut conn.buf, 1 << 20)
                .await
                .ok()?;
            match (step, frame[0]) {
                (_, b'S') => conn.observe_parameter_status(&frame),
                (_, b'N') => {}
                (_, b'A') => conn.notifications.extend_from_slice(&frame),
                (0, b'T') => step = 1,
                (1, b'D') if data_row(&frame) == [Some(marker.clone())] => step = 2,
                (2, b'C') => step = 3,
                (3, b'Z') => return Some(frame.get(5) == Some(&tx_status) && conn.buf.is_empty()),
                _ => return Some(false),
            }
        }
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(5), check).await,
        Ok(Some(true))
    )
}

/// Text columns of a DataRow frame.
fn data_row(frame: &[u8]) -> Vec<Option<String>> {
    let mut b = &frame[5.min(frame.len())..];
    let mut cols = Vec::new();
    if b.len() < 2 {
        return cols;
    }
    let n = b.get_i16();
    for _ in 0..n {
        if b.len() < 4 {
            break;
        }
        let len = b.get_i32();
        if len < 0 {
            cols.push(None);
        } else if b.len() >= len as usize {
            cols.push(Some(
                String::from_utf8_lossy(&b[..len as usize]).into_owned(),
            ));
            b.advance(len as usize);
        } else {
            break;
        }
    }
    cols
}
