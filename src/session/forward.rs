//! Full-duplex forwarding between a client and its server connection. Each direction reads into one reused
//! buffer, frames by header and writes the original bytes on; memory stays bounded whatever the message sizes.
//!
//! To know whether the server connection is clean (and, in transaction mode, when a transaction ends), the
//! client→server side counts the messages that each end in exactly one ReadyForQuery (Query, Sync, FunctionCall)
//! and notes open extended-protocol batches; the server→client side counts ReadyForQuery and keeps the last
//! transaction status. In transaction mode the client→server side also reads Query and Parse texts for their
//! effect on session state (`crate::sqlscan`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::backend::ServerConn;
use crate::net::{ClientStream, Stream};
use crate::prepared::{self, ClientStatements, Reply, Rewriter};
use crate::sqlscan::{self, Effect};
use crate::wire::frame::{body, header, FrameError, Scanner, Verdict};
use crate::wire::msg::cstr;

/// Read buffer size per direction.
pub const CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward until either side leaves.
    Session,
    /// Also stop after the ReadyForQuery that ends a transaction (status 'I', nothing outstanding).
    Transaction,
    /// A transaction-mode client pinned to its server connection: forward as in session mode (notifications
    /// reach an idle client), read statements for their effects as in transaction mode, and stop after the
    /// ReadyForQuery that ends a transaction once a statement may have released what pinned the client
    /// ([`Effect::Unpin`], [`Effect::DiscardAll`]).
    Pinned,
}

impl Mode {
    /// Statements are read for their session-state effects, and reported parameters collected.
    fn follows_state(self) -> bool {
        self != Mode::Session
    }
}

#[derive(Debug)]
pub enum EndReason {
    /// The client sent Terminate.
    ClientTerminated,
    /// The client's connection closed or failed.
    ClientGone,
    ClientProtocol(FrameError),
    /// The server's connection closed or failed.
    ServerGone,
    ServerProtocol(FrameError),
    /// Transaction mode: the transaction ended and the server is idle and in sync.
    TransactionEnd,
    /// The client stayed idle inside a transaction past `idle_in_transaction_timeout`.
    IdleInTransaction,
    /// The client stayed idle outside a transaction past `client_idle_timeout`.
    ClientIdle,
    /// The server reported a setting the tenant's policy forbids (standard_conforming_strings off, turned by
    /// something pgweir could not see, such as a function): the session ends and the connection is closed.
    PolicyViolation(&'static str),
}

#[derive(Debug)]
pub struct End {
    pub reason: EndReason,
    /// The server connection is between requests and in sync: it can be reset and reused.
    pub server_clean: bool,
    /// The last forwarded server message was complete (an error can be appended for the client).
    pub server_at_boundary: bool,
    /// The last server message was an ErrorResponse (e.g. the FATAL a server sends before it closes).
    pub server_sent_error: bool,
    /// Transaction status of the last ReadyForQuery.
    pub tx_status: u8,
    /// The run had COPY FROM STDIN traffic, whose Syncs pgweir can only count by inference: before the server
    /// connection is reused, a query of pgweir's own must show it in sync (see `txn::in_sync`).
    pub copy_seen: bool,
    /// Transaction and pinned modes: session-state effects of the statements the client sent.
    pub effects: Vec<Effect>,
    /// ParameterStatus values the server reported during the run.
    pub reported: Vec<(String, String)>,
    /// pgweir sent the server a cancel (query timeout): the backend may still act on it late.
    pub cancel_sent: bool,
    /// Requests answered (ReadyForQuery messages) during the run.
    pub answered: u64,
    /// Bytes read from the client, and from the server for the client, during the run.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// When the last ReadyForQuery came, in µs after the run's `started` (0: none came).
    pub last_ready_us: u64,
}

/// Bounds of a forwarding run.
#[derive(Clone, Copy)]
pub struct Limits<'h> {
    pub max_message: usize,
    /// Disconnect a client idle inside a transaction this long.
    pub idle_in_transaction: Option<Duration>,
    /// Disconnect a client idle outside a transaction this long (session mode; transaction mode waits for idle
    /// clients outside forwarding).
    pub client_idle: Option<Duration>,
    /// Cancel a request the server has not answered within this time.
    pub query_timeout: Option<Duration>,
    /// Transaction mode (not pinned): statements that would pin fail with 0A000 instead.
    pub refuse_unmovable: bool,
    /// Where each request's latency is recorded (from reaching the server, or from the answer before it in a
    /// pipeline, to its ReadyForQuery).
    pub query_seconds: Option<&'h crate::telemetry::Latency>,
    /// The tenant's SQL policy and query rate.
    pub policy: Option<Policy<'h>>,
}

/// What forwarding needs of the tenant's policy.
#[derive(Clone, Copy)]
pub struct Policy<'h> {
    pub state: crate::policy::limits::PlanRef<'h>,
    pub classifier: &'h crate::policy::Classifier,
    pub telemetry: &'h crate::telemetry::Telemetry,
    pub tenant: &'h str,
    /// The physical database the session uses.
    pub database: &'h str,
}

impl<'h> Limits<'h> {
    pub fn from_config(
        cfg: &crate::config::ProxyConfig,
        query_seconds: Option<&'h crate::telemetry::Latency>,
    ) -> Limits<'h> {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Limits {
            max_message: cfg.max_message_bytes,
            idle_in_transaction: nonzero(cfg.idle_in_transaction_timeout),
            client_idle: nonzero(cfg.client_idle_timeout),
            query_timeout: nonzero(cfg.query_timeout),
            refuse_unmovable: cfg.unmovable_session_state == crate::config::UnmovableState::Refuse,
            query_seconds,
            policy: None,
        }
    }

    /// With the tenant's policy: its statements are checked, its query rate kept, and the plan's statement
    /// timeout applied (the shorter of it and `proxy.query_timeout`).
    pub fn with_policy(mut self, p: Option<Policy<'h>>) -> Limits<'h> {
        let Some(p) = p else {
            return self;
        };
        if let Some(t) = p.state.with_plan(|plan| plan.statement_timeout) {
            self.query_timeout = Some(self.query_timeout.map_or(t, |q| q.min(t)));
        }
        self.policy = Some(p);
        self
    }
}

/// A client's named prepared statements and the most a server connection keeps: given to [`run`] when the
/// client's statement names must be moved to shared server names (see `crate::prepared`).
pub struct Statements<'a> {
    pub client: &'a mut ClientStatements,
    pub max_per_server: usize,
}

/// How long a Terminate sent right behind unanswered requests waits for their answers (see `client_to_server`).
const TERMINATE_WAIT: Duration = Duration::from_secs(5);

/// Interior mutability for the parts of [`Shared`] that are not plain counters: a `RefCell` that is `Sync`.
///
/// A `Shared` lives in [`run`]'s frame and only the two pumps of that run see it. `race` polls them in turn from
/// the one task that owns the run, so no two threads ever touch a `TaskCell` at once: a task moves to another
/// thread only between polls, and tokio orders those. Hence a `RefCell` suffices where a `Mutex` cost two locked
/// instructions (some 40 cycles on x86) per use, several uses per transaction. A borrow cannot be held across an
/// `.await` (`RefMut` is not `Send`, and the task must be), and a second borrow while one is held panics where a
/// second lock of a `Mutex` would deadlock.
struct TaskCell<T>(std::cell::RefCell<T>);

// SAFETY: a `TaskCell` is only ever reachable through the `Shared` of one `run`, whose references stay inside
// that run's future; a future is polled by one thread at a time (it needs `Pin<&mut>`), and tokio's hand-over of a
// task between threads synchronises (acquire/release on the task state). So the `RefCell` is never used from two
// threads at once, which is all that `Sync` adds to what `RefCell<T: Send>` is. Nothing may hand a `&Shared` or a
// `&TaskCell` to another task or thread (no spawn can borrow it: they need `'static`).
unsafe impl<T: Send> Sync for TaskCell<T> {}

impl<T> TaskCell<T> {
    fn new(v: T) -> Self {
        TaskCell(std::cell::RefCell::new(v))
    }

    #[inline]
    fn lock(&self) -> std::cell::RefMut<'_, T> {
        self.0.borrow_mut()
    }

    fn into_inner(self) -> T {
        self.0.into_inner()
    }
}

/// State shared by the two directions. Both run in one task; the atomics (relaxed loads and stores, see [`add`])
/// and [`TaskCell`]s are there only because the task must be `Send`.
struct Shared<'a> {
    mode: Mode,
    limits: Limits<'a>,
    /// [`crate::clock::now_us`] when the run's timings start.
    started_us: u64,
    /// `now_us` of the last ReadyForQuery.
    last_ready_us: AtomicU64,
    /// Milliseconds after `started` (+1) since when every request is answered and the client has sent nothing;
    /// 0 while something is outstanding.
    idle_since_ms: AtomicU64,
    /// Messages sent that each end in one ReadyForQuery.
    requests: AtomicU64,
    /// ReadyForQuery messages received.
    ready: AtomicU64,
    /// Parse/Bind/Describe/Execute/Close sent since the last Sync.
    batch_open: AtomicBool,
    /// A client message is partly written to the server.
    writing: AtomicBool,
    /// The client side has consumed part of a message that is not forwarded yet.
    client_mid_frame: AtomicBool,
    tx_status: AtomicU8,
    /// Tag of the last message that started towards the client.
    last_server_tag: AtomicU8,
    /// The server is in COPY FROM STDIN: it ignores Sync and Flush until CopyDone/CopyFail.
    copy_in: AtomicBool,
    /// CopyDone/CopyFail messages the client sent before the server's CopyInResponse came (a client may send the
    /// COPY statement, its data and CopyDone at once, as asyncpg does): a COPY they end is over when it starts.
    /// Each holds the Syncs sent between the start of the statement and that CopyDone (the server ignores them if
    /// the statement turns out to be a COPY), and the ReadyForQuery by which the statement's CopyInResponse would
    /// have come: once that is in, the CopyDone was a stray one (the server ignores those) and is dropped.
    copy_ends_early: TaskCell<std::collections::VecDeque<(u64, u64)>>,
    /// The number of the ReadyForQuery before which the last Query or Execute sent would start its COPY: the
    /// Query's own, or the one of the Sync after the Execute.
    start_deadline: AtomicU64,
    /// CopyInResponse came, or the client sent CopyDone/CopyFail.
    copy_seen: AtomicBool,
    /// More ReadyForQuery messages came than requests were counted: pgweir's count is wrong, so the end of a
    /// transaction cannot be told; the client keeps its server connection, which is closed when it leaves.
    lost_count: AtomicBool,
    /// Syncs sent since the last Execute or Query: if that one starts a COPY FROM STDIN, the server ignores them.
    syncs_since_start: AtomicU64,
    effects: TaskCell<Vec<Effect>>,
    /// Pinned mode: a statement may have released what pinned the client.
    may_unpin: AtomicBool,
    /// Named prepared statements are rewritten (transaction pooling).
    rewriter: Option<TaskCell<Rewriter<'a>>>,
    /// Signalled after each ReadyForQuery while rewriting: a message waiting for an earlier batch to settle
    /// (`Rewriter::must_wait`) looks again.
    settled: tokio::sync::Notify,
    /// The client side waits on `settled` (a notification nobody waits for is not sent: it costs a locked
    /// instruction per ReadyForQuery).
    settle_wanted: AtomicBool,
    /// Microseconds after `started` (+1) since when a request has been waiting for its answer; 0 when none.
    busy_since_us: AtomicU64,
    /// The query timeout cancelled the current request: its 57014 is reworded for the client.
    timed_out: AtomicBool,
    /// A cancel was sent to the server during the run.
    cancel_sent: AtomicBool,
    /// Where that cancel goes (only with a query timeout).
    cancel: Option<Arc<crate::cancel::CancelTarget>>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Refused statements whose stand-in has gone to the server: (number of the ReadyForQuery that ends the
    /// request, the error the client gets instead of the stand-in's).
    refusals: TaskCell<Fifo<(u64, bytes::Bytes)>>,
    refusals_pending: AtomicBool,
    /// Statement statistics: (request number, statement facts, µs since `started` when it went to the server).
    stmt_pending: TaskCell<Fifo<(u64, Arc<crate::policy::Facts>, u64)>>,
    /// Rows reported by CommandComplete since the last ReadyForQuery.
    rows: AtomicU64,
}

/// Named statements remembered per session for statistics when there is no rewriter (beyond: not attributed).
const MAX_NAMED_STATS: usize = 1000;

/// The text of the stand-in for a refused statement: not SQL, so the server answers it with a syntax error at
/// once (before any statement runs, whatever the transaction state), which the server→client side recognises by
/// this process's random marker and replaces with the refusal. The server handles the error as its own — aborted
/// transaction, rest of the pipeline skipped until Sync — and if it is already skipping, the stand-in is skipped
/// as the refused message would have been.
fn refusal_marker() -> &'static str {
    static MARKER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MARKER.get_or_init(|| format!("pgweir_refused_{:016x}", rand::random::<u64>()))
}

/// `Shared` belongs to one task (both pumps run in it, polled in turn, never at once), so its counters change by
/// a load and a store: the same result as `fetch_add`/`swap`, without a locked instruction (each of those costs
/// about 20 cycles on x86, several of them per transaction). The atomics are there only so that the task is `Send`.
#[inline]
fn add(a: &AtomicU64, n: u64) -> u64 {
    let v = a.load(Ordering::Relaxed).wrapping_add(n);
    a.store(v, Ordering::Relaxed);
    v
}

/// Subtracts `n` from a counter of `Shared` (see [`add`]).
#[inline]
fn sub(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_sub(n), Ordering::Relaxed);
}

/// Sets a counter of `Shared` to 0 and returns what it held (see [`add`]).
#[inline]
fn take(a: &AtomicU64) -> u64 {
    let v = a.load(Ordering::Relaxed);
    a.store(0, Ordering::Relaxed);
    v
}

/// Sets a flag of `Shared` and returns what it held (see [`add`]).
#[inline]
fn replace(a: &AtomicBool, v: bool) -> bool {
    let old = a.load(Ordering::Relaxed);
    a.store(v, Ordering::Relaxed);
    old
}

impl<'r> Shared<'r> {
    /// Microseconds since `started`, plus 1 (so that 0 can mean "not set").
    fn now_us(&self) -> u64 {
        crate::clock::now_us().saturating_sub(self.started_us) + 1
    }

    /// `now_us` for the start of request `seq`. The first request of a transaction (it was read before the
    /// transaction started) counts from `started`: no clock read for it.
    fn request_start_us(&self, seq: u64) -> u64 {
        if seq == 1 && self.mode == Mode::Transaction {
            1
        } else {
            self.now_us()
        }
    }

    /// Records the session-state effects of `sql`. With `refuse_unmovable`, a statement that would pin is not
    /// recorded but returned: the caller replaces it with one that fails.
    fn record_effects(&self, sql: &[u8]) -> Option<sqlscan::PinReason> {
        if !sqlscan::may_have_effects(sql) {
            return None;
        }
        let Ok(sql) = std::str::from_utf8(sql) else {
            // Not UTF-8: pgweir cannot tell what it does; treat it as moving session state it cannot follow.
            self.push(Effect::SessionStateUnknown);
            return None;
        };
        let found = sqlscan::session_effects(sql);
        if found.is_empty() {
            return None;
        }
        if self.mode == Mode::Pinned
            && found
                .iter()
                .any(|e| matches!(e, Effect::Unpin(_) | Effect::DiscardAll))
        {
            self.may_unpin.store(true, Ordering::Relaxed);
        }
        if self.limits.refuse_unmovable && self.mode == Mode::Transaction {
            if let Some(reason) = found.iter().find_map(|e| match e {
                Effect::Pin(r) => Some(*r),
                _ => None,
            }) {
                return Some(reason);
            }
        }
        self.effects.lock().extend(found);
        None
    }

    fn lock_stmts(&self) -> std::cell::RefMut<'_, Fifo<(u64, Arc<crate::policy::Facts>, u64)>> {
        self.stmt_pending.lock()
    }

    fn lock_copy_ends(&self) -> std::cell::RefMut<'_, std::collections::VecDeque<(u64, u64)>> {
        self.copy_ends_early.lock()
    }

    fn rewriter(&self) -> Option<std::cell::RefMut<'_, Rewriter<'r>>> {
        self.rewriter.as_ref().map(|m| m.lock())
    }

    fn push(&self, e: Effect) {
        self.effects.lock().push(e);
    }
}

/// A first-in first-out queue that holds its first element inline: most requests have one statement pending, and
/// a queue per request should not cost an allocation.
#[derive(Debug)]
pub struct Fifo<T> {
    first: Option<T>,
    /// Only made once a second element is queued: an unused one costs nothing to drop either.
    rest: Option<std::collections::VecDeque<T>>,
}

impl<T> Default for Fifo<T> {
    fn default() -> Self {
        Fifo {
            first: None,
            rest: None,
        }
    }
}

impl<T> Fifo<T> {
    pub fn push_back(&mut self, v: T) {
        if self.first.is_none() {
            self.first = Some(v);
        } else {
            self.rest.get_or_insert_default().push_back(v);
        }
    }

    pub fn front(&self) -> Option<&T> {
        self.first.as_ref()
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let v = self.first.take();
        self.first = self.rest.as_mut().and_then(|r| r.pop_front());
        v
    }
}

/// Forwards between `client` and `conn` until one side leaves, or (transaction mode) a transaction ends.
/// `client_buf` holds client bytes read but not yet forwarded; it is scanned before anything is read.
///
/// `started_us` ([`crate::clock::now_us`]) is the time the run's timings count from (the caller's start of the
/// transaction, or now).
pub async fn run(
    client: &mut ClientStream,
    client_buf: &mut BytesMut,
    conn: &mut ServerConn,
    limits: Limits<'_>,
    mode: Mode,
    statements: Option<Statements<'_>>,
    started_us: u64,
) -> End {
    let max_message = limits.max_message;
    let cancel = limits.query_timeout.map(|_| conn.cancel_target());
    let ServerConn {
        stream: server,
        buf: server_buf,
        params,
        prepared,
        ..
    } = conn;
    let rewriter =
        statements.map(|s| TaskCell::new(Rewriter::new(s.client, prepared, s.max_per_server)));
    let shared = Shared {
        mode,
        limits,
        started_us,
        last_ready_us: AtomicU64::new(0),
        idle_since_ms: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        ready: AtomicU64::new(0),
        batch_open: AtomicBool::new(false),
        writing: AtomicBool::new(false),
        client_mid_frame: AtomicBool::new(false),
        tx_status: AtomicU8::new(b'I'),
        last_server_tag: AtomicU8::new(0),
        copy_in: AtomicBool::new(false),
        copy_ends_early: TaskCell::new(Default::default()),
        start_deadline: AtomicU64::new(0),
        copy_seen: AtomicBool::new(false),
        lost_count: AtomicBool::new(false),
        syncs_since_start: AtomicU64::new(0),
        effects: TaskCell::new(Vec::new()),
        may_unpin: AtomicBool::new(false),
        rewriter,
        settled: tokio::sync::Notify::new(),
        settle_wanted: AtomicBool::new(false),
        busy_since_us: AtomicU64::new(0),
        timed_out: AtomicBool::new(false),
        cancel_sent: AtomicBool::new(false),
        cancel,
        // Client bytes consumed: those already read count, those left over at the end do not.
        bytes_in: AtomicU64::new(client_buf.len() as u64),
        bytes_out: AtomicU64::new(0),
        refusals: TaskCell::new(Default::default()),
        refusals_pending: AtomicBool::new(false),
        stmt_pending: TaskCell::new(Default::default()),
        rows: AtomicU64::new(0),
    };
    let mut c_scan = Scanner::new(max_message);
    let mut s_scan = Scanner::new(max_message);
    let mut reported = Vec::new();
    let mut pumps = Pumps {
        client_buf,
        server_buf,
        c_scan: &mut c_scan,
        s_scan: &mut s_scan,
        params,
        reported: &mut reported,
        shared: &shared,
    };
    // Plain TCP on both sides splits without a lock; TLS needs tokio's shared split.
    let reason = match (client, server) {
        (Stream::Plain(c), Stream::Plain(s)) => {
            let (mut cr, mut cw) = c.split();
            let (mut sr, mut sw) = s.split();
            pumps.run(&mut cr, &mut cw, &mut sr, &mut sw).await
        }
        (client, server) => {
            let (mut cr, mut cw) = tokio::io::split(client);
            let (mut sr, mut sw) = tokio::io::split(server);
            pumps.run(&mut cr, &mut cw, &mut sr, &mut sw).await
        }
    };
    let pumps_client_left = pumps.client_buf.len();
    let requests = shared.requests.load(Ordering::Relaxed);
    let ready = shared.ready.load(Ordering::Relaxed);
    let server_clean = matches!(
        reason,
        EndReason::ClientTerminated
            | EndReason::ClientGone
            | EndReason::TransactionEnd
            | EndReason::IdleInTransaction
            | EndReason::ClientIdle
    ) && requests == ready
        && !shared.batch_open.load(Ordering::Relaxed)
        && !shared.copy_in.load(Ordering::Relaxed)
        && !shared.lost_count.load(Ordering::Relaxed)
        && !shared.writing.load(Ordering::Relaxed)
        && s_scan.at_boundary()
        && c_scan.at_boundary();
    End {
        reason,
        server_clean,
        server_at_boundary: s_scan.at_boundary(),
        server_sent_error: shared.last_server_tag.load(Ordering::Relaxed) == b'E',
        tx_status: shared.tx_status.load(Ordering::Relaxed),
        copy_seen: shared.copy_seen.load(Ordering::Relaxed),
        effects: shared.effects.into_inner(),
        reported,
        cancel_sent: shared.cancel_sent.load(Ordering::Relaxed),
        answered: ready,
        bytes_in: shared
            .bytes_in
            .load(Ordering::Relaxed)
            .saturating_sub(pumps_client_left as u64),
        bytes_out: shared.bytes_out.load(Ordering::Relaxed),
        last_ready_us: shared.last_ready_us.load(Ordering::Relaxed),
    }
}

struct Pumps<'a, 'r> {
    client_buf: &'a mut BytesMut,
    server_buf: &'a mut BytesMut,
    c_scan: &'a mut Scanner,
    s_scan: &'a mut Scanner,
    params: &'a mut Vec<(String, String)>,
    reported: &'a mut Vec<(String, String)>,
    shared: &'a Shared<'r>,
}

impl Pumps<'_, '_> {
    async fn run<CR, CW, SR, SW>(
        &mut self,
        cr: &mut CR,
        cw: &mut CW,
        sr: &mut SR,
        sw: &mut SW,
    ) -> EndReason
    where
        CR: AsyncRead + Unpin,
        CW: crate::net::WriteNow,
        SR: AsyncRead + Unpin,
        SW: crate::net::WriteNow,
    {
        // Both pumps are polled on every wakeup, in a fixed order (`race`: no random draw). Neither starves the
        // other: each returns only at the end of the run, and tokio's cooperative budget makes a busy one yield.
        // The server's pump first: most wakeups during a run are the server's answer, and the one that ends a
        // transaction then ends the run without a look at the client's socket (a client's bytes left unread wait
        // for the next transaction).
        let s2c = std::pin::pin!(server_to_client(
            sr,
            cw,
            self.server_buf,
            self.s_scan,
            self.params,
            self.reported,
            self.shared,
        ));
        let c2s = std::pin::pin!(client_to_server(
            cr,
            sw,
            self.client_buf,
            self.c_scan,
            self.shared
        ));
        match crate::race(s2c, c2s).await {
            crate::First::A(r) | crate::First::B(r) => r,
        }
    }
}

/// Transaction mode: every request got its ReadyForQuery (`ready` of them so far), no extended-protocol batch is
/// open and nothing of the client's is half forwarded.
#[inline]
fn transaction_finished(shared: &Shared<'_>, ready: u64) -> bool {
    (shared.mode == Mode::Transaction
        || (shared.mode == Mode::Pinned && shared.may_unpin.load(Ordering::Relaxed)))
        && shared.tx_status.load(Ordering::Relaxed) == b'I'
        && ready == shared.requests.load(Ordering::Relaxed)
        && !shared.batch_open.load(Ordering::Relaxed)
        && !shared.writing.load(Ordering::Relaxed)
        && !shared.client_mid_frame.load(Ordering::Relaxed)
        && !shared.lost_count.load(Ordering::Relaxed)
}

/// Makes room for the next read.
#[inline]
fn make_room(buf: &mut BytesMut) {
    // Grows geometrically up to CHUNK: an idle-ish client costs little, a streaming one reads CHUNK at a time.
    if buf.capacity() - buf.len() < 256 {
        buf.reserve(buf.capacity().clamp(1024, CHUNK));
    }
}

async fn client_to_server<R, W>(
    r: &mut R,
    w: &mut W,
    buf: &mut BytesMut,
    scanner: &mut Scanner,
    shared: &Shared<'_>,
) -> EndReason
where
    R: AsyncRead + Unpin,
    W: crate::net::WriteNow,
{
    let txn = shared.mode.follows_state();
    let rewrite = shared.rewriter.is_some();
    // Rewritten messages, and the bytes around them, are assembled here and written at once.
    let mut out = BytesMut::new();
    let mut rewritten = BytesMut::new();
    let policy = shared.limits.policy;
    // Query rate: a request over the rate waits here (`rate_wait`) and then goes on (`rate_granted`) or is refused.
    let mut rate_granted = false;
    let mut rate_refused = false;
    // The statement of the extended-protocol batch being sent (its Parse, or the named statement its Bind uses).
    let mut batch_stmt: Option<Arc<crate::policy::Facts>> = None;
    // The batch has an Execute (only executed statements count in the statistics).
    let mut batch_exec = false;
    // Without the rewriter (session mode), the client's named statements by name, for the statistics of the
    // Binds that use them.
    let named_stats = policy.is_some() && !rewrite;
    // Made at the first named Parse (a map and its hasher's seed are not free, and most runs have none).
    let mut named: Option<
        std::collections::HashMap<
            Vec<u8>,
            Arc<crate::policy::Facts>,
            foldhash::quality::RandomState,
        >,
    > = None;
    loop {
        let mut replaced = false;
        let mut wait = false;
        // `now_us` when a statement of this scan was stamped (0: none was): the request's start too.
        let mut stamp = 0;
        let mut rate_wait: Option<(Duration, bool)> = None;
        let scan = scanner.scan(
            buf,
            |tag| {
                tag == b'X'
                    || (txn && (tag == b'Q' || tag == b'P'))
                    || (rewrite && matches!(tag, b'P' | b'B' | b'D' | b'C'))
                    || (policy.is_some() && matches!(tag, b'Q' | b'P' | b'F' | b'E'))
                    || (named_stats && matches!(tag, b'B' | b'C'))
            },
            |tag, frame| -> Result<Verdict, FrameError> {
                // The policy's facts of this Query or Parse say its text cannot change session state.
                let mut no_effects = false;
                // One lock of the rewriter per statement message, held for both of its uses below.
                let mut rw = match (rewrite, frame, tag) {
                    (true, Some(_), b'P' | b'B' | b'D' | b'C') => shared.rewriter(),
                    _ => None,
                };
                // P/B/D/C do not change `requests`: the same number before and after the accounting.
                let seq = shared.requests.load(Ordering::Relaxed) + 1;
                if let (Some(rw), Some(f)) = (&rw, frame) {
                    // Before any accounting: a waiting message is scanned again later.
                    if rw.must_wait(tag, f, seq) {
                        wait = true;
                        return Ok(Verdict::Stop);
                    }
                }
                if let (Some(p), Some(f), b'Q' | b'P' | b'F' | b'E') = (policy, frame, tag) {
                    let rate = match (
                        std::mem::take(&mut rate_granted),
                        std::mem::take(&mut rate_refused),
                    ) {
                        (_, true) => RateState::Refused,
                        (true, _) => RateState::Granted,
                        _ => RateState::Ask,
                    };
                    match admit(p, tag, f, rate) {
                        Admission::Wait(d, granted) => {
                            rate_wait = Some((d, granted));
                            return Ok(Verdict::Stop);
                        }
                        Admission::Refuse(r) => {
                            refuse(shared, p, &r, tag, seq, &mut rewritten);
                            replaced = true;
                            return Ok(Verdict::Stop);
                        }
                        Admission::Go(Some(facts)) if tag == b'Q' => {
                            no_effects = !facts.may_have_effects;
                            stamp = shared.request_start_us(seq);
                            shared.lock_stmts().push_back((seq, facts, stamp))
                        }
                        Admission::Go(facts @ Some(_)) if tag == b'P' => {
                            no_effects = facts.as_ref().is_some_and(|f| !f.may_have_effects);
                            if let (true, Some((name, _)), Some(facts)) =
                                (named_stats, cstr(body(f)), &facts)
                            {
                                let named = named.get_or_insert_with(Default::default);
                                if !name.is_empty()
                                    && (named.len() < MAX_NAMED_STATS || named.contains_key(name))
                                {
                                    named.insert(name.to_vec(), facts.clone());
                                }
                            }
                            batch_stmt = facts;
                        }
                        Admission::Go(_) => {}
                    }
                }
                // A Parse of a named statement the client has: Postgres answers 42P05 and keeps the statement.
                if let (Some(rw), Some(f), b'P') = (&rw, frame, tag) {
                    if let Some((name, _)) = cstr(body(f)).filter(|(n, _)| !n.is_empty()) {
                        if rw.client_has(name) {
                            let e = crate::wire::PgError::error(
                                crate::wire::error::sqlstate::DUPLICATE_PREPARED_STATEMENT,
                                format!(
                                    "prepared statement \"{}\" already exists",
                                    String::from_utf8_lossy(name)
                                ),
                            );
                            fail_parse(shared, e, seq, &mut rewritten);
                            replaced = true;
                            return Ok(Verdict::Stop);
                        }
                    }
                }
                if let (Some(p), Some(rw), Some(f), b'B') = (policy, &rw, frame, tag) {
                    if let Some(text) = rw.bound_text(body(f)) {
                        batch_stmt = Some(p.classifier.parsed_facts(text));
                    }
                }
                if let (true, Some(f)) = (named_stats, frame) {
                    match tag {
                        // Bind: portal name, then statement name.
                        b'B' => {
                            if let Some((_, rest)) = cstr(body(f)) {
                                if let Some((name, _)) = cstr(rest).filter(|(n, _)| !n.is_empty()) {
                                    if let Some(facts) = named.as_ref().and_then(|m| m.get(name)) {
                                        batch_stmt = Some(facts.clone());
                                    }
                                }
                            }
                        }
                        // Close of a statement ('S'), not of a portal.
                        b'C' if body(f).first() == Some(&b'S') => {
                            if let (Some((name, _)), Some(m)) = (cstr(&body(f)[1..]), &mut named) {
                                m.remove(name);
                            }
                        }
                        _ => {}
                    }
                }
                match tag {
                    b'E' => batch_exec = true,
                    b'S' => {
                        if let (Some(facts), true) =
                            (batch_stmt.take(), std::mem::take(&mut batch_exec))
                        {
                            stamp = shared.request_start_us(seq);
                            shared.lock_stmts().push_back((seq, facts, stamp));
                        }
                    }
                    _ => {}
                }
                match tag {
                    b'X' => return Ok(Verdict::Stop),
                    b'Q' => {
                        let n = add(&shared.requests, 1);
                        shared.start_deadline.store(n, Ordering::Relaxed);
                        shared.syncs_since_start.store(0, Ordering::Relaxed);
                        if let (Some(f), false) = (frame, no_effects) {
                            let sql = body(f);
                            if let Some(reason) =
                                shared.record_effects(sql.strip_suffix(&[0]).unwrap_or(sql))
                            {
                                queue_refusal(shared, unmovable_refusal(reason), seq);
                                crate::wire::msg::query(refusal_marker(), &mut rewritten);
                                replaced = true;
                                return Ok(Verdict::Stop);
                            }
                        }
                    }
                    b'F' => {
                        add(&shared.requests, 1);
                    }
                    // During COPY FROM STDIN the server ignores Sync.
                    b'S' if shared.copy_in.load(Ordering::Relaxed) => {}
                    b'S' => {
                        add(&shared.requests, 1);
                        add(&shared.syncs_since_start, 1);
                        shared.batch_open.store(false, Ordering::Relaxed);
                    }
                    b'E' => {
                        shared.batch_open.store(true, Ordering::Relaxed);
                        let n = shared.requests.load(Ordering::Relaxed) + 1;
                        shared.start_deadline.store(n, Ordering::Relaxed);
                        shared.syncs_since_start.store(0, Ordering::Relaxed);
                    }
                    b'c' | b'f' => {
                        shared.copy_seen.store(true, Ordering::Relaxed);
                        if !replace(&shared.copy_in, false) {
                            let syncs = shared.syncs_since_start.load(Ordering::Relaxed);
                            let deadline = shared.start_deadline.load(Ordering::Relaxed);
                            // Unless the statement is answered already (then this one is stray).
                            if deadline > shared.ready.load(Ordering::Relaxed) {
                                shared.lock_copy_ends().push_back((syncs, deadline));
                            }
                        }
                    }
                    b'P' => {
                        shared.batch_open.store(true, Ordering::Relaxed);
                        if let (true, Some(f)) = (txn, frame) {
                            match cstr(body(f)) {
                                Some((name, rest)) => {
                                    // Without rewriting, a named statement exists on this server only.
                                    if !name.is_empty() && !rewrite {
                                        shared.push(Effect::Pin(sqlscan::PinReason::Other));
                                    }
                                    // The text is looked for only when its facts did not already say.
                                    if let Some((sql, _)) =
                                        (!no_effects).then(|| cstr(rest)).flatten()
                                    {
                                        if let Some(reason) = shared.record_effects(sql) {
                                            // Refused at Parse, as Postgres fails a Parse: the statement does
                                            // not exist (the rewriter never learns of it).
                                            fail_parse(
                                                shared,
                                                unmovable_refusal(reason),
                                                seq,
                                                &mut rewritten,
                                            );
                                            replaced = true;
                                            return Ok(Verdict::Stop);
                                        }
                                    }
                                }
                                None => shared.push(Effect::SessionStateUnknown),
                            }
                        }
                    }
                    b'B' | b'D' | b'C' => shared.batch_open.store(true, Ordering::Relaxed),
                    // Flush and COPY data: forwarded as they are.
                    b'H' | b'd' => {}
                    // Anything else would make the server end the connection behind pgweir's back.
                    tag => return Err(FrameError::UnexpectedTag { tag }),
                }
                if let (Some(rw), Some(f)) = (&mut rw, frame) {
                    if rw.client_message(tag, f, seq, &mut rewritten) {
                        replaced = true;
                        return Ok(Verdict::Stop);
                    }
                }
                Ok(Verdict::Forward)
            },
        );
        let scan = match scan {
            Ok(s) => s,
            Err(e) => return EndReason::ClientProtocol(e),
        };
        if replaced {
            // The frame at `forward` is whole (it was inspected) and replaced by `rewritten`.
            let Ok(Some((_, total))) = header(&buf[scan.forward..], usize::MAX) else {
                return EndReason::ClientProtocol(FrameError::BadLength { tag: 0, len: 0 });
            };
            // Room for the rest of the client's bytes too (the messages after a rewritten one mostly follow it).
            out.reserve(buf.len() + rewritten.len());
            out.extend_from_slice(&buf[..scan.forward]);
            out.extend_from_slice(&rewritten);
            rewritten.clear();
            buf.advance(scan.forward + total);
            continue;
        }
        shared
            .client_mid_frame
            .store(!scanner.at_boundary(), Ordering::Relaxed);
        if scan.forward > 0 || !out.is_empty() {
            shared.writing.store(true, Ordering::Relaxed);
            let bytes = if out.is_empty() {
                &buf[..scan.forward]
            } else {
                out.extend_from_slice(&buf[..scan.forward]);
                &out[..]
            };
            if crate::net::write_out(w, bytes).await.is_err() {
                return EndReason::ServerGone;
            }
            out.clear();
            shared.writing.store(false, Ordering::Relaxed);
            buf.advance(scan.forward);
            if shared.requests.load(Ordering::Relaxed) > shared.ready.load(Ordering::Relaxed)
                && shared.busy_since_us.load(Ordering::Relaxed) == 0
            {
                let now = match stamp {
                    0 => shared.request_start_us(shared.ready.load(Ordering::Relaxed) + 1),
                    s => s,
                };
                shared.busy_since_us.store(now, Ordering::Relaxed);
            }
        }
        if let Some((d, granted)) = rate_wait {
            // Everything before the request over the rate is with the server; it waits here.
            tokio::time::sleep(d).await;
            if granted {
                rate_granted = true;
            } else {
                rate_refused = true;
            }
            continue;
        }
        if wait {
            // Everything before the waiting message is with the server; its replies settle the earlier batch.
            shared.settle_wanted.store(true, Ordering::Relaxed);
            shared.settled.notified().await;
            continue;
        }
        if scan.stopped {
            // A Terminate, left in `buf` (the session sees it after the run). When it came right behind requests
            // the server has not answered yet (drivers may send their last request and Terminate at once), the
            // answers are awaited first, as Postgres would run those requests before it reads the Terminate: the
            // run then ends with the transaction and the server connection is kept, not closed mid-request. Not
            // while the server waits for the client (a batch without its Sync, COPY FROM STDIN), nor pinned, and
            // for a bounded time (a long query, or a count pgweir got wrong, ends in the close as before).
            if shared.mode == Mode::Transaction
                && !shared.batch_open.load(Ordering::Relaxed)
                && !shared.copy_in.load(Ordering::Relaxed)
            {
                // No waker of its own: `race` polls this pump after the server's on every wakeup, and it is the
                // server's answers (or the timer) that end the wait. The server's pump ends the run itself at a
                // ReadyForQuery 'I'; this one ends it when the last answer leaves a transaction open, when the
                // server turns to COPY (it would wait for the client's data), or when the time is up.
                let answered = std::future::poll_fn(|_| {
                    if shared.ready.load(Ordering::Relaxed)
                        >= shared.requests.load(Ordering::Relaxed)
                        || shared.copy_in.load(Ordering::Relaxed)
                        || shared.lost_count.load(Ordering::Relaxed)
                    {
                        std::task::Poll::Ready(())
                    } else {
                        std::task::Poll::Pending
                    }
                });
                let bound = shared
                    .limits
                    .query_timeout
                    .map_or(TERMINATE_WAIT, |t| t.min(TERMINATE_WAIT));
                let _ = tokio::time::timeout(bound, answered).await;
            }
            return EndReason::ClientTerminated;
        }
        make_room(buf);
        match read_client(r, buf, shared).await {
            Ok(()) => shared.idle_since_ms.store(0, Ordering::Relaxed),
            Err(reason) => return reason,
        }
    }
}

/// The row count of a CommandComplete tag (`SELECT 5`, `INSERT 0 5`, `UPDATE 3`, …); 0 for tags without one.
fn command_rows(f: &[u8]) -> u64 {
    // The body is the tag and its NUL; the count is the tag's last word, read from the end.
    let Some(tag) = body(f).strip_suffix(&[0]) else {
        return 0;
    };
    let digits = tag.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let start = tag.len() - digits;
    if digits == 0 || (start > 0 && tag[start - 1] != b' ') {
        return 0;
    }
    tag[start..]
        .iter()
        .try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .unwrap_or(0)
}

/// A ParameterStatus saying `standard_conforming_strings` is off: the lexers of the policy assume it is on.
fn conforming_strings_off(f: &[u8]) -> bool {
    match cstr(body(f)) {
        Some((name, rest)) if name.eq_ignore_ascii_case(b"standard_conforming_strings") => {
            cstr(rest).is_some_and(|(v, _)| !v.eq_ignore_ascii_case(b"on"))
        }
        _ => false,
    }
}

/// Where a request stands with the query rate: not asked yet, or asked and waited for (granted or not).
#[derive(Clone, Copy)]
enum RateState {
    Ask,
    Granted,
    Refused,
}

/// What happens to a Query, Parse, FunctionCall or Execute under the tenant's plan.
enum Admission {
    /// Forward it (with the statement's facts, for a Query or Parse).
    Go(Option<Arc<crate::policy::Facts>>),
    /// Over the query rate: wait this long, then go on (`true`) or refuse it (`false`).
    Wait(Duration, bool),
    Refuse(crate::policy::Refusal),
}

/// The plan's verdict on one message, under one read of the plan in force: monthly quota and query rate (requests:
/// Query, FunctionCall, Execute), then the SQL policy (Query and Parse texts) and the fast-path rule.
fn admit(p: Policy<'_>, tag: u8, f: &[u8], rate: RateState) -> Admission {
    use crate::policy::limits::Rate;
    p.state.with_plan(|plan| {
        if tag != b'P' {
            match rate {
                RateState::Refused => return Admission::Refuse(rate_refusal(p, plan)),
                RateState::Granted => {}
                RateState::Ask => {
                    if !p.state.count_query(plan)
                        && plan.over_quota == crate::policy::plan::OverQuota::Refuse
                    {
                        return Admission::Refuse(quota_refusal(p, plan));
                    }
                    match p.state.rate(plan, 1, Instant::now) {
                        Rate::Now => {}
                        Rate::After(d) => return Admission::Wait(d, true),
                        Rate::Refuse(d) => return Admission::Wait(d, false),
                    }
                }
            }
        }
        let sql = match tag {
            b'Q' => {
                let b = body(f);
                b.strip_suffix(&[0]).unwrap_or(b)
            }
            b'P' => match cstr(body(f)).and_then(|(_, rest)| cstr(rest)) {
                Some((sql, _)) => sql,
                None => return Admission::Go(None),
            },
            b'F' if !plan.policy.function_call => {
                return Admission::Refuse(crate::policy::Refusal {
                    rule: "function-call",
                    code: crate::wire::error::sqlstate::INSUFFICIENT_PRIVILEGE,
                    message: "pgweir: the fast-path function call protocol is not allowed (rule \"function-call\")"
                        .into(),
                    hint: Some("call the function in a SELECT".into()),
                })
            }
            _ => return Admission::Go(None),
        };
        let facts = match tag {
            b'P' => p.classifier.parsed_facts(sql),
            _ => p.classifier.facts(sql),
        };
        let ctx = crate::policy::Context {
            database: p.database,
            read_only: p.state.read_only(plan),
        };
        match plan.policy.check(&facts, &ctx) {
            Some(r) => {
                let fingerprint = facts.fingerprint.to_string();
                tracing::info!(tenant = %p.tenant, rule = r.rule, %fingerprint, "statement refused by policy");
                p.state.refused(r.rule, fingerprint);
                Admission::Refuse(r)
            }
            None => {
                if facts.classes & crate::policy::class::UNPARSED != 0 {
                    p.telemetry.policy_unparsed.increment(1);
                    p.state.count_unparsed();
                    tracing::debug!(
                        tenant = %p.tenant,
                        fingerprint = %facts.fingerprint,
                        "statement sqlparser cannot parse forwarded (policy open)"
                    );
                }
                Admission::Go(Some(facts))
            }
        }
    })
}

/// The refusal of a request over the tenant's monthly query quota.
fn quota_refusal(p: Policy<'_>, plan: &crate::policy::Plan) -> crate::policy::Refusal {
    let quota = plan.monthly_queries.unwrap_or_default();
    p.state.refused("monthly-quota", String::new());
    crate::policy::Refusal {
        rule: "monthly-quota",
        code: crate::wire::error::sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
        message: format!(
            "pgweir: monthly query quota exceeded: this database's plan allows {quota} queries per month"
        ),
        hint: Some("the quota starts again next month, or move to a larger plan".into()),
    }
}

/// The refusal of a request over the tenant's query rate.
fn rate_refusal(p: Policy<'_>, plan: &crate::policy::Plan) -> crate::policy::Refusal {
    let (qps, wait) = (plan.queries_per_second.unwrap_or_default(), plan.rate_wait);
    tracing::info!(tenant = %p.tenant, qps, "query refused: over the plan's query rate");
    p.state.refused("rate", String::new());
    crate::policy::Refusal {
        rule: "rate",
        code: crate::wire::error::sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
        message: format!(
            "pgweir: query rate limit exceeded: this database's plan allows {qps} queries per second \
             (waited {} ms)",
            wait.as_millis()
        ),
        hint: Some("retry later, or move to a plan with a higher rate".into()),
    }
}

/// Queues the error the stand-in of a refused message (request `seq`) is answered with.
fn queue_refusal(shared: &Shared<'_>, err: crate::wire::PgError, seq: u64) {
    shared
        .refusals
        .lock()
        .push_back((seq, err.to_bytes().freeze()));
    shared.refusals_pending.store(true, Ordering::Relaxed);
}

/// Sends the stand-in of a refused message (see [`refusal_marker`]) and queues the error its answer becomes.
/// A Query or FunctionCall becomes a Query (one ReadyForQuery, like the original); a Parse or Execute becomes a
/// Parse of a statement that cannot be parsed (the server skips the rest of the batch until Sync).
fn refuse(
    shared: &Shared<'_>,
    p: Policy<'_>,
    r: &crate::policy::Refusal,
    tag: u8,
    seq: u64,
    out: &mut BytesMut,
) {
    p.telemetry.policy_refused(r.rule);
    match tag {
        b'Q' | b'F' => {
            queue_refusal(shared, r.to_error(), seq);
            let n = add(&shared.requests, 1);
            shared.start_deadline.store(n, Ordering::Relaxed);
            shared.syncs_since_start.store(0, Ordering::Relaxed);
            crate::wire::msg::query(refusal_marker(), out);
        }
        _ => fail_parse(shared, r.to_error(), seq, out),
    }
}

/// Fails an extended-protocol message with `error` as Postgres fails a Parse: a stand-in Parse the server rejects
/// at once (it then skips the batch until Sync, and no statement is made), whose error becomes `error`.
fn fail_parse(shared: &Shared<'_>, error: crate::wire::PgError, seq: u64, out: &mut BytesMut) {
    queue_refusal(shared, error, seq);
    shared.batch_open.store(true, Ordering::Relaxed);
    refused_parse(b"pgweir_refused", refusal_marker(), &[0, 0], out);
}

/// The error for a statement that would pin the client under `unmovable_session_state = "refuse"`.
fn unmovable_refusal(reason: sqlscan::PinReason) -> crate::wire::PgError {
    use sqlscan::PinReason::*;
    let what = match reason {
        Listen => "LISTEN",
        AdvisoryLock => "session-level advisory locks",
        TempTable => "temporary tables",
        WithHoldCursor => "cursors WITH HOLD",
        SqlPrepare => "SQL-level PREPARE",
        SessionAuthorization => "SET ROLE and SET SESSION AUTHORIZATION",
        Other => "statements that keep state on the server connection (LOAD, dblink_connect)",
    };
    crate::wire::PgError::error(
        crate::wire::error::sqlstate::FEATURE_NOT_SUPPORTED,
        format!("{what} cannot be used in transaction pooling mode"),
    )
    .with_hint(
        "Connect with options=pool_mode=session for session state, or use the transaction-scoped form \
         (e.g. pg_advisory_xact_lock, ON COMMIT DROP).",
    )
}

/// A Parse of `name` with `sql` instead of the client's text (parameter types kept, so its Bind still fits).
fn refused_parse(name: &[u8], sql: &str, types: &[u8], out: &mut BytesMut) {
    use bytes::BufMut;
    out.put_u8(b'P');
    out.put_u32((4 + name.len() + 1 + sql.len() + 1 + types.len()) as u32);
    out.put_slice(name);
    out.put_u8(0);
    out.put_slice(sql.as_bytes());
    out.put_u8(0);
    out.put_slice(types);
}

/// Cancels the request in progress on the server if it has run past the query timeout (once per request).
fn check_query_timeout(shared: &Shared<'_>) {
    let Some(limit) = shared.limits.query_timeout else {
        return;
    };
    let since = shared.busy_since_us.load(Ordering::Relaxed);
    if since == 0 || shared.timed_out.load(Ordering::Relaxed) {
        return;
    }
    // Both count from the run's start, plus 1.
    let busy = Duration::from_micros(shared.now_us().saturating_sub(since));
    if busy < limit {
        return;
    }
    let Some(t) = shared.cancel.clone() else {
        return;
    };
    // Once per request: `timed_out` stays set until the request's ReadyForQuery (checked above). Nothing else
    // runs between those reads and here (`Shared` belongs to this task), so the request is still the one timed.
    shared.timed_out.store(true, Ordering::Relaxed);
    shared.cancel_sent.store(true, Ordering::Relaxed);
    tokio::spawn(async move {
        if let Err(e) = crate::backend::send_cancel(&t.host, t.port, t.pid, &t.secret).await {
            tracing::warn!(error = %e, "could not cancel a request past the query timeout");
        }
    });
}

/// Reads from the client; with idle timeouts configured, wakes up now and then to check how long the client has
/// been idle (the state changes as the server answers, so one fixed deadline would not do).
async fn read_client<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    shared: &Shared<'_>,
) -> Result<(), EndReason> {
    let limits = shared.limits;
    let client_idle = limits
        .client_idle
        .filter(|_| shared.mode != Mode::Transaction);
    let shortest = limits
        .idle_in_transaction
        .into_iter()
        .chain(client_idle)
        .chain(limits.query_timeout)
        .min();
    let Some(shortest) = shortest else {
        return match r.read_buf(buf).await {
            Ok(0) | Err(_) => Err(EndReason::ClientGone),
            Ok(n) => {
                add(&shared.bytes_in, n as u64);
                Ok(())
            }
        };
    };
    let tick = (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        match tokio::time::timeout(tick, r.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(EndReason::ClientGone),
            Ok(Ok(n)) => {
                add(&shared.bytes_in, n as u64);
                return Ok(());
            }
            Err(_) => {
                check_query_timeout(shared);
                let since = shared.idle_since_ms.load(Ordering::Relaxed);
                if since == 0 {
                    continue;
                }
                let idle = Duration::from_micros(shared.now_us() - 1)
                    .saturating_sub(Duration::from_millis(since - 1));
                let in_transaction =
                    matches!(shared.tx_status.load(Ordering::Relaxed), b'T' | b'E');
                match (in_transaction, limits.idle_in_transaction, client_idle) {
                    (true, Some(t), _) if idle >= t => return Err(EndReason::IdleInTransaction),
                    (false, _, Some(t)) if idle >= t => return Err(EndReason::ClientIdle),
                    _ => {}
                }
            }
        }
    }
}

async fn server_to_client<R, W>(
    r: &mut R,
    w: &mut W,
    buf: &mut BytesMut,
    scanner: &mut Scanner,
    params: &mut Vec<(String, String)>,
    reported: &mut Vec<(String, String)>,
    shared: &Shared<'_>,
) -> EndReason
where
    R: AsyncRead + Unpin,
    W: crate::net::WriteNow,
{
    let rewrite = shared.rewriter.is_some();
    let timeouts = shared.limits.query_timeout.is_some();
    // Statement statistics (with a policy): rows from CommandComplete, time to ReadyForQuery.
    let stats = shared.limits.policy.is_some();
    // Server messages with edits (a dropped or changed reply), and the bytes around them, are assembled here.
    let mut out = BytesMut::new();
    loop {
        let mut edit = None;
        let mut reword = false;
        let mut replacement: Option<bytes::Bytes> = None;
        let mut violation = false;
        // Bytes may already be buffered (read while the connection was logging in or idle).
        // Only the frames looked at are visited (a server's rows pass without a call).
        let scan = scanner.scan_wanted(
            buf,
            |tag| {
                tag == b'Z'
                    || tag == b'S'
                    || tag == b'G'
                    || (rewrite && matches!(tag, b'1' | b'3' | b'C'))
                    || ((timeouts || shared.refusals_pending.load(Ordering::Relaxed))
                        && tag == b'E')
                    || (stats && tag == b'C')
            },
            |tag, frame| -> Result<Verdict, FrameError> {
                match (tag, frame) {
                    (b'E', Some(f))
                        if shared.refusals_pending.load(Ordering::Relaxed)
                            && f.windows(refusal_marker().len())
                                .any(|w| w == refusal_marker().as_bytes()) =>
                    {
                        let mut q = shared.refusals.lock();
                        if let Some((_, err)) = q.pop_front() {
                            replacement = Some(err);
                        }
                        shared
                            .refusals_pending
                            .store(!q.is_empty(), Ordering::Relaxed);
                        return Ok(Verdict::Stop);
                    }
                    (b'1' | b'3', _) if rewrite => {
                        let reply = shared
                            .rewriter()
                            .map_or(Reply::Forward, |mut rw| rw.server_reply());
                        if reply != Reply::Forward {
                            edit = Some(reply);
                            return Ok(Verdict::Stop);
                        }
                    }
                    (b'E', Some(f))
                        if shared.timed_out.load(Ordering::Relaxed)
                            && crate::backend::error_fields(f).0
                                == crate::wire::error::sqlstate::QUERY_CANCELED =>
                    {
                        reword = true;
                        return Ok(Verdict::Stop);
                    }
                    (b'C', Some(f)) => {
                        if stats {
                            add(&shared.rows, command_rows(f));
                        }
                        if rewrite && prepared::deallocates_all(f) {
                            if let Some(mut rw) = shared.rewriter() {
                                rw.all_deallocated();
                            }
                        }
                    }
                    (b'Z', Some(f)) => {
                        let ready = add(&shared.ready, 1);
                        if shared.refusals_pending.load(Ordering::Relaxed) {
                            // Stand-ins the server skipped (an earlier error in their batch) got no error.
                            let mut q = shared.refusals.lock();
                            while q.front().is_some_and(|(seq, _)| *seq <= ready) {
                                q.pop_front();
                            }
                            shared
                                .refusals_pending
                                .store(!q.is_empty(), Ordering::Relaxed);
                        }
                        if let Some(mut rw) = shared.rewriter() {
                            rw.server_ready(ready);
                            if replace(&shared.settle_wanted, false) {
                                shared.settled.notify_one();
                            }
                        }
                        let status = f.get(5).copied().unwrap_or(b'I');
                        shared.tx_status.store(status, Ordering::Relaxed);
                        let now_us = shared.now_us();
                        shared.last_ready_us.store(now_us, Ordering::Relaxed);
                        if let Some(p) = shared.limits.policy {
                            let rows = take(&shared.rows);
                            let mut q = shared.lock_stmts();
                            while q.front().is_some_and(|(seq, _, _)| *seq < ready) {
                                q.pop_front();
                            }
                            if q.front().is_some_and(|(seq, _, _)| *seq == ready) {
                                if let Some((_, facts, start)) = q.pop_front() {
                                    drop(q);
                                    p.state.record_statement(
                                        &facts.fingerprint,
                                        facts.fingerprint_hash,
                                        now_us.saturating_sub(start),
                                        rows,
                                    );
                                }
                            }
                        }
                        let since = shared.busy_since_us.load(Ordering::Relaxed);
                        if let (Some(h), true) = (shared.limits.query_seconds, since != 0) {
                            h.record_us(now_us.saturating_sub(since));
                        }
                        // A ReadyForQuery is never sent in COPY mode: a COPY that failed while the client still
                        // sends data is over (the client's CopyDone or CopyFail to come is a stray one).
                        shared.copy_in.store(false, Ordering::Relaxed);
                        let requests = shared.requests.load(Ordering::Relaxed);
                        if ready > requests {
                            shared.lost_count.store(true, Ordering::Relaxed);
                        }
                        if shared.copy_seen.load(Ordering::Relaxed) {
                            // CopyDones whose statement is answered without a CopyInResponse were stray ones.
                            let mut ends = shared.lock_copy_ends();
                            while ends.front().is_some_and(|&(_, d)| d <= ready) {
                                ends.pop_front();
                            }
                        }
                        if ready == requests {
                            // Every request is answered. Unless a batch is still open (its Execute may start a
                            // COPY), no COPY is pending: a CopyDone or CopyFail seen so far was a stray one (the
                            // server ignores those).
                            if shared.copy_seen.load(Ordering::Relaxed)
                                && !shared.batch_open.load(Ordering::Relaxed)
                            {
                                shared.lock_copy_ends().clear();
                            }
                            shared
                                .idle_since_ms
                                .store(now_us / 1000 + 1, Ordering::Relaxed);
                            shared.busy_since_us.store(0, Ordering::Relaxed);
                        } else {
                            // The next request's time starts now.
                            shared.busy_since_us.store(now_us, Ordering::Relaxed);
                        }
                        shared.timed_out.store(false, Ordering::Relaxed);
                        if status == b'I' && transaction_finished(shared, ready) {
                            return Ok(Verdict::Last);
                        }
                    }
                    (b'G', _) => {
                        // CopyInResponse. If the client already ended this COPY (it sent CopyDone or CopyFail
                        // without waiting for this message), the server leaves COPY mode when it reads that, and
                        // later Syncs count: the COPY is not entered here. (Were it entered, the client's next
                        // Syncs would be taken for ignored ones, every later ReadyForQuery would be one no request
                        // accounts for, and a transaction could seem finished while a request is still with the
                        // server.)
                        shared.copy_seen.store(true, Ordering::Relaxed);
                        let ended = shared.lock_copy_ends().pop_front();
                        if let Some((ignored, _)) = ended {
                            // The Syncs between the statement and its CopyDone came during the COPY: ignored.
                            sub(&shared.requests, ignored);
                        } else {
                            // Syncs the client sent after the statement that started the COPY are ignored by the
                            // server, so they get no ReadyForQuery.
                            shared.copy_in.store(true, Ordering::Relaxed);
                            let ignored = take(&shared.syncs_since_start);
                            sub(&shared.requests, ignored);
                        }
                    }
                    (b'S', Some(f))
                        if shared.limits.policy.is_some() && conforming_strings_off(f) =>
                    {
                        violation = true;
                        return Ok(Verdict::Stop);
                    }
                    (b'S', Some(f)) => {
                        crate::backend::record_parameter_status(params, f);
                        if shared.mode.follows_state() {
                            crate::backend::record_parameter_status(reported, f);
                        }
                    }
                    _ => {}
                }
                Ok(Verdict::Forward)
            },
        );
        let mut scan = match scan {
            Ok(s) => s,
            Err(e) => return EndReason::ServerProtocol(e),
        };
        if scan.last_tag != 0 {
            shared
                .last_server_tag
                .store(scan.last_tag, Ordering::Relaxed);
        }
        if violation {
            return EndReason::PolicyViolation(
                "standard_conforming_strings was turned off on the server; pgweir ends the session",
            );
        }
        if let Some(err) = replacement {
            // A refused statement's stand-in failed as planned: the client gets the refusal.
            let Ok(Some((_, total))) = header(&buf[scan.forward..], usize::MAX) else {
                return EndReason::ServerProtocol(FrameError::BadLength { tag: 0, len: 0 });
            };
            out.extend_from_slice(&buf[..scan.forward]);
            out.extend_from_slice(&err);
            buf.advance(scan.forward + total);
            continue;
        }
        if reword {
            // The cancel was pgweir's query timeout: say so instead of "due to user request".
            let Ok(Some((_, total))) = header(&buf[scan.forward..], usize::MAX) else {
                return EndReason::ServerProtocol(FrameError::BadLength { tag: 0, len: 0 });
            };
            out.extend_from_slice(&buf[..scan.forward]);
            let secs = shared
                .limits
                .query_timeout
                .unwrap_or_default()
                .as_secs_f64();
            crate::wire::PgError::error(
                crate::wire::error::sqlstate::QUERY_CANCELED,
                format!(
                    "canceling statement due to the connection pooler's query_timeout ({secs}s)"
                ),
            )
            .encode(&mut out);
            buf.advance(scan.forward + total);
            // `timed_out` stays set until the ReadyForQuery: a check between this error and it must not send a
            // second cancel (it would hit the client's next statement).
            continue;
        }
        if let Some(edit) = edit {
            // The reply at `forward` is whole (it was inspected): drop it, or pass it on as ParseComplete.
            let Ok(Some((_, total))) = header(&buf[scan.forward..], usize::MAX) else {
                return EndReason::ServerProtocol(FrameError::BadLength { tag: 0, len: 0 });
            };
            out.extend_from_slice(&buf[..scan.forward]);
            if edit == Reply::AsParseComplete {
                out.extend_from_slice(&prepared::PARSE_COMPLETE);
            }
            buf.advance(scan.forward + total);
            continue;
        }
        let tried_now = out.is_empty() && scan.forward > 0;
        if tried_now {
            // The usual case: the socket takes the scanned bytes at once (no await: nothing can be left half
            // done), and they leave the buffer without a split.
            let Ok(n) = crate::net::write_some_now(w, &buf[..scan.forward]) else {
                return EndReason::ClientGone;
            };
            buf.advance(n);
            scan.forward -= n;
        }
        if scan.forward > 0 || !out.is_empty() {
            // Take the scanned bytes out of the server connection's buffer before writing: if the write fails or
            // this future is dropped, bytes that were already counted must not stay behind on a connection that
            // looks clean (the next user would read them as its own answers).
            let scanned = buf.split_to(scan.forward);
            let bytes = if out.is_empty() {
                &scanned[..]
            } else {
                out.extend_from_slice(&scanned);
                &out[..]
            };
            // What the socket did not take just now goes through the write future at once.
            let sent = if tried_now {
                crate::net::write_rest(w, bytes).await
            } else {
                crate::net::write_out(w, bytes).await
            };
            if sent.is_err() {
                return EndReason::ClientGone;
            }
            out.clear();
        }
        // The transaction looked finished when its ReadyForQuery was scanned; while it was being written, the
        // client may have sent more (pipelining). Only stop if it is still finished.
        if scan.stopped && transaction_finished(shared, shared.ready.load(Ordering::Relaxed)) {
            return EndReason::TransactionEnd;
        }
        make_room(buf);
        match r.read_buf(buf).await {
            Ok(0) | Err(_) => return EndReason::ServerGone,
            Ok(n) => {
                add(&shared.bytes_out, n as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::command_rows;
    use crate::wire::frame::test_frame;

    #[test]
    fn command_tags_give_their_row_counts() {
        for (tag, rows) in [
            (&b"SELECT 5\0"[..], 5),
            (b"INSERT 0 17\0", 17),
            (b"UPDATE 0\0", 0),
            (b"COPY 1234567\0", 1_234_567),
            (b"BEGIN\0", 0),
            (b"CREATE TABLE\0", 0),
            (b"FETCH 3\0", 3),
            (b"SELECT x5\0", 0),
            (b"SELECT 5", 0),
            (b"SELECT 99999999999999999999999\0", 0),
            (b"\0", 0),
        ] {
            assert_eq!(command_rows(&test_frame(b'C', tag)), rows, "{tag:?}");
        }
    }
}
