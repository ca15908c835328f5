//! Server connection pools, one per (cluster, physical database, backend role): bounded size, FIFO waiting with a
//! timeout, health checks on checkout, reset before reuse, idle timeout and maximum lifetime.
//!
//! Architecture invariant: the pool never sees a client socket or SQL from clients. A connection leaves the pool
//! as a [`Checkout`] guard; dropping the guard closes the connection, [`Checkout::release`] resets it and returns
//! it. An idle connection that has anything to read (data or EOF) is closed, never handed out.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

pub mod fair;
pub mod gate;
use fair::{FairPermit, FairShare};
use gate::{Gate, GatePass};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dashmap::DashMap;
use rustls::ClientConfig;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::{self, BackendError, ServerConn, StartupParams};
use crate::config::PoolConfig;
use crate::net::read_frame;
use crate::tenant::BackendTarget;
use crate::tls::backend_client_config;
use crate::wire::msg;

/// Identity of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    pub cluster: String,
    pub database: String,
    pub user: String,
}

/// A pool key's parts as borrowed strings: a login looks its pool up without copying them into a [`PoolKey`].
trait KeyParts {
    fn parts(&self) -> (&str, &str, &str);
}

impl KeyParts for PoolKey {
    fn parts(&self) -> (&str, &str, &str) {
        (&self.cluster, &self.database, &self.user)
    }
}

impl KeyParts for (&str, &str, &str) {
    fn parts(&self) -> (&str, &str, &str) {
        *self
    }
}

// PoolKey hashes as its parts do, so that the map finds a key by its borrowed parts.
impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.parts().hash(h)
    }
}

impl std::hash::Hash for dyn KeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.parts().hash(h)
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for PoolKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.cluster, self.database, self.user)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no server connection available within {0:?}")]
    Timeout(Duration),
    #[error("the database is paused, and was not resumed within {0:?}")]
    Paused(Duration),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Counters of one pool, in the vocabulary of PgBouncer's `SHOW POOLS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub key: String,
    /// The tenant whose client created the pool.
    pub tenant: String,
    pub server_total: usize,
    pub server_idle: usize,
    pub server_active: usize,
    /// Client sessions of the pool that are not waiting for a server connection (PgBouncer's `cl_active`).
    pub clients_active: usize,
    pub clients_waiting: usize,
    pub max_wait_us: u64,
    /// Checkouts so far, and their wait (pool and cluster share) at the 50th and 99th percentile (µs, upper
    /// bucket bounds: powers of two).
    pub checkouts: u64,
    pub wait_p50_us: u64,
    pub wait_p99_us: u64,
    /// Transaction mode: server connections held by a client for the rest of its session, because of session
    /// state that cannot move (LISTEN, advisory locks, temp tables, named prepared statements, …).
    pub server_pinned: usize,
}

pub struct Pool {
    key: PoolKey,
    tenant: String,
    /// What the tenant's clients did, for its usage report (shared by the tenant's pools, also by a pool that
    /// replaces this one; taken by the catalog's usage flush).
    pub usage: Arc<Usage>,
    metrics: PoolMetrics,
    target: BackendTarget,
    cfg: PoolConfig,
    tls: Option<Arc<ClientConfig>>,
    /// One permit per checked-out connection: bounds active connections and queues waiters in FIFO order.
    slots: Arc<Semaphore>,
    idle: Mutex<VecDeque<Box<ServerConn>>>,
    /// Open connections: idle + checked out + being opened.
    total: AtomicUsize,
    waiting: AtomicUsize,
    /// Wakes the pool's waiters now and then to look at their checkout timeout ([`wait_ticker`]): one timer per
    /// pool while anyone waits, not one per wait.
    wait_tick: tokio::sync::Notify,
    /// A [`wait_ticker`] task runs.
    ticking: AtomicBool,
    max_wait_us: AtomicU64,
    pinned: AtomicUsize,
    /// Client sessions using the pool (each holds a [`PoolClient`]).
    clients: AtomicUsize,
    /// The traffic gate of the pool's database (shared by every pool of that database).
    gate: Arc<Gate>,
    /// The cluster's weighted fair share of active transactions (when the cluster limits them).
    fair: Option<Arc<FairShare>>,
    /// The tenant's plan weight in that share.
    weight: std::sync::atomic::AtomicU32,
    /// Every checkout's wait.
    waits: WaitHistogram,
    /// Transaction mode: the ParameterStatus values a server reports once a client's startup settings are applied,
    /// by those settings — so a login needs no server connection when another client logged in alike recently.
    /// Keyed by a hash of the settings; the settings are kept to tell collisions apart. The value is the encoded
    /// ParameterStatus messages, ready to send.
    login_params: Mutex<HashMap<u64, LoginAnswer>>,
    /// Transaction mode: the named prepared statements of this pool's clients, one id per distinct definition.
    statements: Arc<crate::prepared::Registry>,
    no_params: StartupParams,
}

/// Counters of a tenant's client activity: monotonic (for `/metrics`), with the part already written to the
/// catalog remembered (for usage reports).
#[derive(Debug, Default)]
pub struct Usage {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub transactions: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    flushed: Mutex<UsageDelta>,
}

/// A taken set of [`Usage`] counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UsageDelta {
    pub connections: u64,
    pub requests: u64,
    pub transactions: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Usage {
    /// What was counted since the last `take` (which counts as written from now on).
    pub fn take(&self) -> UsageDelta {
        let mut flushed = self.flushed.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.totals();
        let delta = now.minus(&flushed);
        *flushed = now;
        delta
    }

    /// What was counted and not taken yet.
    pub fn peek(&self) -> UsageDelta {
        let flushed = *self.flushed.lock().unwrap_or_else(|p| p.into_inner());
        self.totals().minus(&flushed)
    }

    /// Everything counted since the process started.
    pub fn totals(&self) -> UsageDelta {
        UsageDelta {
            connections: self.connections.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }
}

impl UsageDelta {
    fn minus(&self, o: &UsageDelta) -> UsageDelta {
        UsageDelta {
            connections: self.connections.saturating_sub(o.connections),
            requests: self.requests.saturating_sub(o.requests),
            transactions: self.transactions.saturating_sub(o.transactions),
            bytes_in: self.bytes_in.saturating_sub(o.bytes_in),
            bytes_out: self.bytes_out.saturating_sub(o.bytes_out),
        }
    }

    pub fn add(&mut self, o: &UsageDelta) {
        self.connections += o.connections;
        self.requests += o.requests;
        self.transactions += o.transactions;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
    }

    pub fn is_zero(&self) -> bool {
        *self == UsageDelta::default()
    }
}

/// Name/value pairs: session settings or ParameterStatus values.
type Settings = Vec<(String, String)>;

/// A remembered login answer (see [`Pool::login_params`]).
struct LoginAnswer {
    settings: Settings,
    at: Instant,
    encoded: bytes::Bytes,
}

/// The login-cache key of some settings.
fn login_hash<'a>(settings: impl Iterator<Item = &'a (String, String)>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (k, v) in settings {
        k.hash(&mut h);
        v.hash(&mut h);
    }
    h.finish()
}

/// Checkout waits in power-of-two microsecond buckets (bucket 0: under 2 µs, bucket i: [2^i, 2^(i+1)) µs): one
/// atomic add per checkout.
#[derive(Default)]
struct WaitHistogram {
    buckets: [AtomicU64; 32],
}

impl WaitHistogram {
    fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = (63 - us.max(1).leading_zeros() as usize).min(31);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The upper bound (µs) of the bucket that holds quantile `q`; 0 without checkouts.
    fn quantile_us(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return 1u64 << (i + 1);
            }
        }
        1u64 << 32
    }
}

/// How long a remembered login answer is used.
const LOGIN_PARAMS_TTL: Duration = Duration::from_secs(60);
const LOGIN_PARAMS_MAX: usize = 1024;

/// What a new pool shares with others: histograms, the tenant's usage counters, the database's gate and the
/// cluster's fair share (with the tenant's weight in it).
struct Shared {
    metrics: PoolMetrics,
    usage: Arc<Usage>,
    gate: Arc<Gate>,
    fair: Option<Arc<FairShare>>,
    weight: u32,
}

impl Pool {
    fn new(
        key: PoolKey,
        tenant: &str,
        target: BackendTarget,
        cfg: PoolConfig,
        shared: Shared,
    ) -> anyhow::Result<Arc<Pool>> {
        let Shared {
            metrics,
            usage,
            gate,
            fair,
            weight,
        } = shared;
        let tls = backend_client_config(target.cluster.tls, target.cluster.ca_file.as_deref())?;
        let pool = Arc::new(Pool {
            key,
            tenant: tenant.to_owned(),
            usage,
            metrics,
            target,
            cfg,
            tls,
            slots: Arc::new(Semaphore::new(cfg.max_size)),
            idle: Mutex::new(VecDeque::new()),
            total: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            wait_tick: tokio::sync::Notify::new(),
            ticking: AtomicBool::new(false),
            max_wait_us: AtomicU64::new(0),
            pinned: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
            gate,
            fair,
            weight: std::sync::atomic::AtomicU32::new(weight),
            waits: WaitHistogram::default(),
            login_params: Mutex::new(HashMap::new()),
            statements: Arc::default(),
            no_params: Arc::from(Vec::new()),
        });
        tokio::spawn(maintain(Arc::downgrade(&pool)));
        Ok(pool)
    }

    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// The startup parameters of shared (transaction-mode) connections: none.
    pub fn no_params(&self) -> &StartupParams {
        &self.no_params
    }

    /// The registry of named prepared statements shared by this pool's clients.
    pub fn statements(&self) -> &Arc<crate::prepared::Registry> {
        &self.statements
    }

    /// The remembered ParameterStatus messages (encoded) for a login with `settings` except those `skip` names,
    /// if fresh. Allocates nothing but the returned reference count.
    pub fn login_params(
        &self,
        settings: &[(String, String)],
        skip: Option<&str>,
    ) -> Option<bytes::Bytes> {
        let kept = || settings.iter().filter(|(k, _)| Some(k.as_str()) != skip);
        let cache = self.login_params.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(&login_hash(kept())) {
            Some(a) if a.at.elapsed() < LOGIN_PARAMS_TTL && kept().eq(a.settings.iter()) => {
                Some(a.encoded.clone())
            }
            _ => None,
        }
    }

    /// Remembers the answer to a login with `settings` except `skip`: `encoded` ParameterStatus messages.
    pub fn remember_login_params(
        &self,
        settings: &[(String, String)],
        skip: Option<&str>,
        encoded: bytes::Bytes,
    ) {
        let settings: Settings = settings
            .iter()
            .filter(|(k, _)| Some(k.as_str()) != skip)
            .cloned()
            .collect();
        let mut cache = self.login_params.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= LOGIN_PARAMS_MAX {
            cache.clear();
        }
        let answer = LoginAnswer {
            at: Instant::now(),
            encoded,
            settings,
        };
        cache.insert(login_hash(answer.settings.iter()), answer);
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Box<ServerConn>>> {
        // A panic while holding this lock cannot leave the deque inconsistent: keep going.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (FIFO, bounded by the checkout timeout) for a server connection: a dedicated one opened with `startup`
    /// (session mode), or a `shared` one (transaction mode; opened without client parameters).
    ///
    /// When a slot and a matching idle connection are free (nobody waits), the connection is taken at once;
    /// otherwise the returned future is boxed: its connect and TLS state is large and would otherwise be part of
    /// every session's (idle) state.
    pub fn checkout<'a>(
        self: &'a Arc<Self>,
        startup: &'a StartupParams,
        shared: bool,
    ) -> CheckoutFuture<'a> {
        let Some(pass) = self.gate.try_pass() else {
            return CheckoutFuture::Wait(crate::boxed(|| self.checkout_paused(startup, shared)));
        };
        // Free permits exist only while nobody waits (released permits go to waiters first): FIFO holds.
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let fair = match self.fair_limit() {
                    Some(f) => {
                        match f.try_acquire(&self.tenant, self.weight.load(Ordering::Relaxed)) {
                            Some(p) => Some(p),
                            None => {
                                // The cluster is saturated: wait for this tenant's fair share.
                                return CheckoutFuture::Wait(crate::boxed(|| {
                                    self.checkout_fair(
                                        startup,
                                        shared,
                                        permit,
                                        pass,
                                        Instant::now(),
                                        Duration::ZERO,
                                    )
                                }));
                            }
                        }
                    }
                    _ => None,
                };
                let slot = Slot {
                    _permit: permit,
                    _pass: pass,
                    _fair: fair,
                };
                match self.take_with(slot, startup, shared, Duration::ZERO) {
                    Ok(c) => CheckoutFuture::Ready(Some(c)),
                    Err(slot) => {
                        CheckoutFuture::Wait(crate::boxed(|| self.open(slot, startup, shared)))
                    }
                }
            }
            Err(_) => {
                CheckoutFuture::Wait(crate::boxed(|| self.checkout_inner(startup, shared, pass)))
            }
        }
    }

    /// A checkout while the database is paused: waits (counted as waiting) for the pause to end, at most
    /// `pause_wait_timeout`.
    async fn checkout_paused(
        self: &Arc<Self>,
        startup: &StartupParams,
        shared: bool,
    ) -> Result<Checkout, CheckoutError> {
        let waiting = Counted::new(&self.waiting);
        let pass = self.gate.pass(self.cfg.pause_wait_timeout).await;
        drop(waiting);
        let pass = pass.ok_or(CheckoutError::Paused(self.cfg.pause_wait_timeout))?;
        self.checkout_inner(startup, shared, pass).await
    }

    /// The most recently used idle connection that matches and has nothing to read (others are closed).
    fn take_quiet(&self, startup: &StartupParams, shared: bool) -> Option<Box<ServerConn>> {
        while let Some(mut conn) = self.take_idle(startup, shared) {
            if is_quiet(&mut conn) {
                return Some(conn);
            }
            tracing::debug!(pool = %self.key, server_pid = conn.pid, "idle server connection had something to read; closing it");
            self.close(conn);
        }
        None
    }

    async fn checkout_inner(
        self: &Arc<Self>,
        startup: &StartupParams,
        shared: bool,
        pass: GatePass,
    ) -> Result<Checkout, CheckoutError> {
        let started = Instant::now();
        let timeout = self.cfg.checkout_timeout;
        let waiting = Counted::new(&self.waiting);
        self.ensure_wait_ticker();
        // The timeout is looked at on the pool's tick (a timer of its own per wait costs several hundred
        // instructions to set and cancel, and nearly every wait ends long before it).
        let acquire = self.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        let permit = loop {
            match crate::race(acquire.as_mut(), std::pin::pin!(self.wait_tick.notified())).await {
                crate::First::A(p) => break p.ok(),
                crate::First::B(()) => {
                    if started.elapsed() >= timeout {
                        break None;
                    }
                }
            }
        };
        drop(waiting);
        let waited = started.elapsed();
        self.metrics.checkout_wait.record(waited);
        let Some(permit) = permit else {
            return Err(CheckoutError::Timeout(timeout));
        };
        self.max_wait_us
            .fetch_max(waited.as_micros() as u64, Ordering::Relaxed);
        if self.fair_limit().is_none() {
            // No fair share to wait for: no further future.
            let slot = Slot {
                _permit: permit,
                _pass: pass,
                _fair: None,
            };
            return match self.take_with(slot, startup, shared, waited) {
                Ok(c) => Ok(c),
                Err(slot) => self.open(slot, startup, shared).await,
            };
        }
        self.checkout_fair(startup, shared, permit, pass, started, waited)
            .await
    }

    /// The cluster's fair share, when it limits active transactions now (a capacity of 0 is no limit).
    fn fair_limit(&self) -> Option<&Arc<FairShare>> {
        self.fair.as_ref().filter(|f| f.capacity() > 0)
    }

    /// An idle connection for a checkout that holds its `slot` (its wait, `waited`, is recorded), or the slot back
    /// when none fits (a connection is to be opened).
    fn take_with(
        self: &Arc<Self>,
        slot: Slot,
        startup: &StartupParams,
        shared: bool,
        waited: Duration,
    ) -> Result<Checkout, Slot> {
        self.waits.record(waited);
        match self.take_quiet(startup, shared) {
            Some(conn) => Ok(self.guard(conn, slot)),
            None => Err(slot),
        }
    }

    /// Starts [`wait_ticker`] unless it runs. Called by a waiter already counted in `waiting`.
    fn ensure_wait_ticker(self: &Arc<Self>) {
        if self.claim_ticker() {
            tokio::spawn(wait_ticker(Arc::downgrade(self)));
        }
    }

    /// Sets `ticking`; true when it was clear (the caller is, or goes on as, the one ticker).
    fn claim_ticker(&self) -> bool {
        // Under load the ticker runs already: a read, not a locked write, per wait.
        !self.ticking.load(Ordering::SeqCst)
            && self
                .ticking
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }

    /// The rest of a checkout that holds its pool slot: the cluster's fair share (when the cluster limits active
    /// transactions), then an idle connection or a new one. `waited` is the wait so far (since `started`).
    async fn checkout_fair(
        self: &Arc<Self>,
        startup: &StartupParams,
        shared: bool,
        permit: OwnedSemaphorePermit,
        pass: GatePass,
        started: Instant,
        mut waited: Duration,
    ) -> Result<Checkout, CheckoutError> {
        let fair = match self.fair_limit() {
            Some(f) => {
                let left = self.cfg.checkout_timeout.saturating_sub(waited);
                let waiting = Counted::new(&self.waiting);
                let weight = self.weight.load(Ordering::Relaxed);
                let got = tokio::time::timeout(left, f.acquire(&self.tenant, weight)).await;
                drop(waiting);
                match got {
                    Ok(Some(p)) => {
                        waited = started.elapsed();
                        self.max_wait_us
                            .fetch_max(waited.as_micros() as u64, Ordering::Relaxed);
                        Some(p)
                    }
                    _ => return Err(CheckoutError::Timeout(self.cfg.checkout_timeout)),
                }
            }
            _ => None,
        };
        let slot = Slot {
            _permit: permit,
            _pass: pass,
            _fair: fair,
        };
        match self.take_with(slot, startup, shared, waited) {
            Ok(c) => Ok(c),
            Err(slot) => self.open(slot, startup, shared).await,
        }
    }

    /// Opens a server connection for a checkout that holds its slot.
    async fn open(
        self: &Arc<Self>,
        permit: Slot,
        startup: &StartupParams,
        shared: bool,
    ) -> Result<Checkout, CheckoutError> {
        tracing::debug!(pool = %self.key, shared, "opening a server connection");
        // Open a new connection; at the size limit, an idle one opened with other parameters makes room.
        {
            let mut idle = self.idle();
            if self.total.load(Ordering::Relaxed) >= self.cfg.max_size {
                if let Some(old) = idle.pop_front() {
                    drop(idle);
                    self.close(old);
                }
            }
            self.total.fetch_add(1, Ordering::Relaxed);
        }
        // Counted from here: if this future is dropped while connecting (the client left, or a cancel answered
        // its request), the count must come down again.
        let opening = Opening(self);
        let started = Instant::now();
        let conn = backend::connect(
            &self.target,
            startup.clone(),
            self.tls.as_ref(),
            self.cfg.connect_timeout,
        )
        .await;
        self.metrics.connect.record(started.elapsed());
        std::mem::forget(opening);
        match conn {
            Ok(mut conn) => {
                conn.shared = shared;
                Ok(self.guard(Box::new(conn), permit))
            }
            Err(e) => {
                self.total.fetch_sub(1, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }

    fn take_idle(&self, startup: &StartupParams, shared: bool) -> Option<Box<ServerConn>> {
        let mut idle = self.idle();
        let fits = |c: &ServerConn| c.shared == shared && c.startup == *startup;
        // Most recently used first: its caches are warm. That is the last one in the usual case, taken by
        // `pop_back` (callgrind, pgbench -S: ~35 instructions per transaction less than `rposition` + `remove`).
        if fits(idle.back()?) {
            return idle.pop_back();
        }
        let i = idle.iter().rposition(|c| fits(c))?;
        idle.remove(i)
    }

    fn guard(self: &Arc<Self>, conn: Box<ServerConn>, permit: Slot) -> Checkout {
        Checkout {
            conn: Some(conn),
            pool: self.clone(),
            permit: Some(permit),
        }
    }

    fn close(&self, conn: Box<ServerConn>) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut conn = conn;
            let mut out = BytesMut::new();
            msg::terminate(&mut out);
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.stream.write_all(&out)).await;
        });
    }

    fn put_idle(&self, mut conn: Box<ServerConn>, now: Instant) {
        // Unread bytes on a connection about to idle mean it is not where pgweir thinks it is: never reuse it.
        if !conn.buf.is_empty() {
            tracing::debug!(pool = %self.key, server_pid = conn.pid, unread = conn.buf.len(), "server connection released with unread bytes; closing it");
            self.close(conn);
            return;
        }
        if conn
            .created
            .checked_add(self.cfg.max_lifetime)
            .is_some_and(|end| now >= end)
        {
            tracing::debug!(pool = %self.key, server_pid = conn.pid, "server connection past its max_lifetime; closing it");
            self.close(conn);
            return;
        }
        conn.idle_since = now;
        self.idle().push_back(conn);
    }

    pub fn stats(&self) -> PoolStats {
        let idle = self.idle().len();
        let total = self.total.load(Ordering::Relaxed);
        let waiting = self.waiting.load(Ordering::Relaxed);
        let clients = self.clients.load(Ordering::Relaxed);
        PoolStats {
            key: self.key.to_string(),
            tenant: self.tenant.clone(),
            server_total: total,
            server_idle: idle,
            server_active: total.saturating_sub(idle),
            clients_active: clients.saturating_sub(waiting),
            clients_waiting: waiting,
            max_wait_us: self.max_wait_us.load(Ordering::Relaxed),
            checkouts: self.waits.count(),
            wait_p50_us: self.waits.quantile_us(0.5),
            wait_p99_us: self.waits.quantile_us(0.99),
            server_pinned: self.pinned.load(Ordering::Relaxed),
        }
    }

    /// The role its server connections log in as.
    pub fn backend_user(&self) -> &str {
        &self.target.user
    }

    /// The pool as used by one client session: the client is counted in the pool's stats while it lives.
    pub fn attach(self: &Arc<Self>) -> PoolClient {
        self.clients.fetch_add(1, Ordering::Relaxed);
        PoolClient(self.clone())
    }

    /// Counts a pinned server connection while the returned guard lives.
    pub fn pin(&self) -> PinGuard<'_> {
        PinGuard {
            _counted: Counted::new(&self.pinned),
        }
    }

    /// Closes idle connections past the idle timeout (keeping `min_size`) or past their lifetime, and opens
    /// connections (with no extra startup parameters) up to `min_size`.
    async fn maintain_once(self: &Arc<Self>) {
        let expired: Vec<Box<ServerConn>> = {
            let mut idle = self.idle();
            let mut keep = VecDeque::with_capacity(idle.len());
            let mut expired = Vec::new();
            let mut total = self.total.load(Ordering::Relaxed);
            while let Some(c) = idle.pop_front() {
                let too_old = c.created.elapsed() >= self.cfg.max_lifetime;
                let too_idle =
                    c.idle_since.elapsed() >= self.cfg.idle_timeout && total > self.cfg.min_size;
                if too_old || too_idle {
                    total -= 1;
                    expired.push(c);
                } else {
                    keep.push_back(c);
                }
            }
            *idle = keep;
            expired
        };
        for c in expired {
            self.close(c);
        }
        let empty: StartupParams = Arc::from(Vec::new());
        while self.total.load(Ordering::Relaxed) < self.cfg.min_size {
            // Nothing is opened while the database is paused.
            let Some(_pass) = self.gate.try_pass() else {
                break;
            };
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                break;
            };
            self.total.fetch_add(1, Ordering::Relaxed);
            match backend::connect(
                &self.target,
                empty.clone(),
                self.tls.as_ref(),
                self.cfg.connect_timeout,
            )
            .await
            {
                Ok(conn) => self.put_idle(Box::new(conn), Instant::now()),
                Err(e) => {
                    self.total.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!(pool = %self.key, error = %e, "could not open a min_size connection");
                    break;
                }
            }
            drop(permit);
        }
    }
}

/// While a pool has waiters, wakes them every eighth of the checkout timeout (5 ms to 1 s) to look at their
/// deadline: a checkout times out at most one tick late. Ends when nobody waits (a new waiter starts it again).
async fn wait_ticker(pool: Weak<Pool>) {
    let Some(tick) = period(&pool, |cfg| {
        (cfg.checkout_timeout / 8).clamp(Duration::from_millis(5), Duration::from_secs(1))
    }) else {
        return;
    };
    loop {
        tokio::time::sleep(tick).await;
        let Some(p) = pool.upgrade() else {
            return;
        };
        p.wait_tick.notify_waiters();
        if p.waiting.load(Ordering::SeqCst) == 0 {
            p.ticking.store(false, Ordering::SeqCst);
            // A waiter that came after the load above saw `ticking` still set and counts on this task.
            if p.waiting.load(Ordering::SeqCst) == 0 || !p.claim_ticker() {
                return;
            }
        }
    }
}

/// The period of a pool's background task, from its configuration (None: the pool is gone).
fn period(pool: &Weak<Pool>, of: impl FnOnce(&PoolConfig) -> Duration) -> Option<Duration> {
    pool.upgrade().map(|p| of(&p.cfg))
}

async fn maintain(pool: Weak<Pool>) {
    let Some(interval) = period(&pool, |cfg| {
        (cfg.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(15))
    }) else {
        return;
    };
    loop {
        match pool.upgrade() {
            Some(p) => p.maintain_once().await,
            None => return,
        }
        tokio::time::sleep(interval).await;
    }
}

/// A pinned server connection, counted in the pool's stats while this lives.
pub struct PinGuard<'a> {
    _counted: Counted<'a>,
}

/// Counts itself in an `AtomicUsize` while it lives (also when its future is dropped).
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        // SeqCst: `wait_ticker` and a new waiter each write one variable and read the other (a locked add on x86
        // either way).
        c.fetch_add(1, Ordering::SeqCst);
        Counted(c)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client session's handle on its pool (see [`Pool::attach`]).
pub struct PoolClient(Arc<Pool>);

impl std::ops::Deref for PoolClient {
    type Target = Arc<Pool>;
    fn deref(&self) -> &Arc<Pool> {
        &self.0
    }
}

impl Drop for PoolClient {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection being opened: counted in `total` until it exists or has failed.
struct Opening<'a>(&'a Pool);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// True when the idle connection has nothing to read: no stray message, no EOF, no error.
fn is_quiet(conn: &mut ServerConn) -> bool {
    if !conn.buf.is_empty() {
        return false;
    }
    conn.buf.reserve(64);
    matches!(conn.stream.read_now(&mut conn.buf), Ok(None))
}

/// The future of [`Pool::checkout`]: ready at once, or a boxed wait.
pub enum CheckoutFuture<'a> {
    Ready(Option<Checkout>),
    Wait(std::pin::Pin<Box<dyn Future<Output = Result<Checkout, CheckoutError>> + Send + 'a>>),
}

impl CheckoutFuture<'_> {
    /// The connection, when the checkout needed no wait.
    pub fn take_ready(&mut self) -> Option<Checkout> {
        match self {
            CheckoutFuture::Ready(c) => c.take(),
            CheckoutFuture::Wait(_) => None,
        }
    }
}

impl Future for CheckoutFuture<'_> {
    type Output = Result<Checkout, CheckoutError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            CheckoutFuture::Ready(c) => {
                std::task::Poll::Ready(Ok(c.take().expect("a ready checkout is polled once")))
            }
            CheckoutFuture::Wait(f) => f.as_mut().poll(cx),
        }
    }
}

/// A checked-out server connection. Dropping it closes the connection; [`Checkout::release`] returns it.
pub struct Checkout {
    /// Boxed: a checkout and an idle connection move by pointer.
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    permit: Option<Slot>,
}

/// What a checkout holds besides its connection: its place in the pool's size limit and its pass through the
/// database's gate (both given back when the connection is).
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _pass: GatePass,
    _fair: Option<FairPermit>,
}

impl Checkout {
    pub fn conn(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("a Checkout holds its connection until released or dropped")
    }

    pub fn conn_ref(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .expect("a Checkout holds its connection until released or dropped")
    }

    /// Returns a connection that is idle ('I') and in protocol sync to the pool as it is (transaction mode: the
    /// settings pgweir applied stay, recorded in `applied`).
    pub fn release_idle(self) {
        self.release_idle_since(Instant::now());
    }

    /// [`Checkout::release_idle`] of a connection idle since `at` (a time the caller already read: no clock read
    /// per transaction for it).
    pub fn release_idle_since(mut self, at: Instant) {
        if let (Some(conn), Some(permit)) = (self.conn.take(), self.permit.take()) {
            self.pool.put_idle(conn, at);
            drop(permit);
        }
    }

    /// Returns the connection to the pool after resetting it (`ROLLBACK` when `tx_status` is not idle, then
    /// `DISCARD ALL`) in the background. If the reset fails, the connection is closed.
    pub fn release(mut self, tx_status: u8) {
        let (Some(mut conn), Some(permit)) = (self.conn.take(), self.permit.take()) else {
            return;
        };
        let pool = self.pool.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(5), reset(&mut conn, tx_status)).await {
                Ok(Ok(())) => pool.put_idle(conn, Instant::now()),
                Ok(Err(e)) => {
                    tracing::debug!(pool = %pool.key, error = %e, "server reset failed; closing the connection");
                    pool.close(conn)
                }
                Err(_) => {
                    tracing::debug!(pool = %pool.key, "server reset timed out; closing the connection");
                    pool.close(conn)
                }
            }
            drop(permit);
        });
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            tracing::debug!(pool = %self.pool.key, server_pid = conn.pid, "server connection dropped by its user; closing it");
            self.pool.close(conn);
        }
    }
}

/// Brings a server connection back to a pristine session: no transaction, no session state.
async fn reset(conn: &mut ServerConn, tx_status: u8) -> Result<(), String> {
    if !conn.buf.is_empty() {
        return Err("unread server bytes before the reset".into());
    }
    let mut out = BytesMut::with_capacity(64);
    let mut expected = 1;
    if tx_status != b'I' {
        msg::query("ROLLBACK", &mut out);
        expected += 1;
    }
    msg::query("DISCARD ALL", &mut out);
    conn.stream
        .write_all(&out)
        .await
        .map_err(|e| e.to_string())?;
    conn.stream.flush().await.map_err(|e| e.to_string())?;
    let mut status = 0;
    while expected > 0 {
        let frame = read_frame(&mut conn.stream, &mut conn.buf, 1 << 20)
            .await
            .map_err(|e| e.to_string())?;
        match frame[0] {
            b'Z' => {
                expected -= 1;
                status = frame.get(5).copied().unwrap_or(0);
            }
            b'S' => conn.observe_parameter_status(&frame),
            b'E' => return Err("the server refused the reset".into()),
            _ => {}
        }
    }
    if status != b'I' {
        return Err(format!(
            "server still in transaction state '{}'",
            status as char
        ));
    }
    conn.applied.clear();
    conn.prepared.clear();
    Ok(())
}

/// The hasher of the pool maps, looked up at every login (keys are the operator's names, not clients' input).
type Hasher = foldhash::fast::RandomState;

/// All pools of this process.
pub struct Pools {
    map: DashMap<PoolKey, Arc<Pool>, Hasher>,
    metrics: PoolMetrics,
    /// Usage counters by tenant.
    usage: DashMap<String, Arc<Usage>, Hasher>,
    /// Traffic gates by (cluster, database).
    gates: DashMap<(String, String), Arc<Gate>, Hasher>,
    /// Fair shares of active transactions by cluster (for clusters that limit them).
    fair: DashMap<String, Arc<FairShare>, Hasher>,
    /// Pools replaced by newer ones (a password or plan change) while clients still used them: a pause must
    /// close their idle connections too.
    retired: Mutex<Vec<Weak<Pool>>>,
}

/// Histograms every pool records into.
#[derive(Clone)]
pub struct PoolMetrics {
    checkout_wait: Arc<crate::telemetry::Latency>,
    connect: Arc<crate::telemetry::Latency>,
}

impl Pools {
    /// Pools that record checkout waits and connect times into these histograms.
    pub fn new(
        checkout_wait: Arc<crate::telemetry::Latency>,
        connect: Arc<crate::telemetry::Latency>,
    ) -> Pools {
        Pools {
            map: DashMap::default(),
            usage: DashMap::default(),
            gates: DashMap::default(),
            fair: DashMap::default(),
            retired: Mutex::new(Vec::new()),
            metrics: PoolMetrics {
                checkout_wait,
                connect,
            },
        }
    }

    /// The pool for `target`, created with `cfg` on first use (by a client of `tenant`, whose plan has `weight` in
    /// its cluster's fair share).
    pub fn get(
        &self,
        tenant: &str,
        target: &BackendTarget,
        cfg: PoolConfig,
        weight: u32,
    ) -> anyhow::Result<Arc<Pool>> {
        // The usual case, a pool that exists and is current: found by the borrowed key, nothing copied.
        let parts = (
            target.cluster.name.as_str(),
            target.database.as_str(),
            target.user.as_str(),
        );
        // The pool for the target and limits as they are now, with the tenant's weight brought up to date.
        let current = |p: &Arc<Pool>| {
            (p.target == *target && p.cfg == cfg).then(|| {
                p.weight.store(weight, Ordering::Relaxed);
                p.clone()
            })
        };
        if let Some(p) = self
            .map
            .get(&parts as &dyn KeyParts)
            .and_then(|p| current(&p))
        {
            return Ok(p);
        }
        let key = PoolKey {
            cluster: target.cluster.name.clone(),
            database: target.database.clone(),
            user: target.user.clone(),
        };
        use dashmap::mapref::entry::Entry;
        // The tenant's usage counters are looked up only when a pool is made (not on every login).
        let usage = || self.usage.entry(tenant.to_owned()).or_default().clone();
        match self.map.entry(key) {
            Entry::Occupied(mut e) => {
                // Made meanwhile by another login.
                if let Some(p) = current(e.get()) {
                    return Ok(p);
                }
                // The tenant's backend or limits changed (a new password, another plan): new connections use a
                // new pool; clients of the old one keep it until they leave, and its idle connections are closed
                // when the last of them does.
                let pool = self.new_pool(e.key(), tenant, target, cfg, usage(), weight)?;
                let old = e.insert(pool.clone());
                let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
                retired.retain(|w| w.strong_count() > 0);
                retired.push(Arc::downgrade(&old));
                Ok(pool)
            }
            Entry::Vacant(e) => {
                let pool = self.new_pool(e.key(), tenant, target, cfg, usage(), weight)?;
                e.insert(pool.clone());
                Ok(pool)
            }
        }
    }

    /// Forgets the pools of tenants that no longer exist (`known` says which do) once no client uses them (their
    /// idle connections close), and the usage counters of such tenants once everything counted was taken.
    pub fn retain_tenants(&self, known: impl Fn(&str) -> bool) {
        self.map
            .retain(|_, p| known(&p.tenant) || p.clients.load(Ordering::Relaxed) > 0);
        self.usage.retain(|tenant, u| {
            known(tenant) || !u.peek().is_zero() || self.map.iter().any(|p| p.tenant == *tenant)
        });
    }

    fn new_pool(
        &self,
        key: &PoolKey,
        tenant: &str,
        target: &BackendTarget,
        cfg: PoolConfig,
        usage: Arc<Usage>,
        weight: u32,
    ) -> anyhow::Result<Arc<Pool>> {
        Pool::new(
            key.clone(),
            tenant,
            target.clone(),
            cfg,
            Shared {
                metrics: self.metrics.clone(),
                usage,
                gate: self.gate(&key.cluster, &key.database),
                fair: self.fair_share(&target.cluster),
                weight,
            },
        )
    }

    /// The fair share of a cluster's active transactions, with the cluster's current limit (0: none). Every pool
    /// of the cluster uses the same share, so a changed limit reaches them all.
    fn fair_share(&self, cluster: &crate::tenant::Cluster) -> Option<Arc<FairShare>> {
        let share = self
            .fair
            .entry(cluster.name.clone())
            .or_insert_with(|| FairShare::new(cluster.max_active_transactions))
            .clone();
        share.set_capacity(cluster.max_active_transactions);
        Some(share)
    }

    /// Brings a cluster's limit of active transactions up to date (a reload or a catalog change), for the pools
    /// that exist already.
    pub fn follow_cluster(&self, cluster: &crate::tenant::Cluster) {
        if let Some(share) = self.fair.get(&cluster.name) {
            share.set_capacity(cluster.max_active_transactions);
        }
    }

    /// The traffic gate of a backend database.
    pub fn gate(&self, cluster: &str, database: &str) -> Arc<Gate> {
        self.gates
            .entry((cluster.to_owned(), database.to_owned()))
            .or_default()
            .clone()
    }

    /// Pauses a backend database: waits (at most `wait`) for the transactions in flight, holds new ones, then
    /// closes the idle server connections to it. Returns how long the wait took.
    pub async fn pause(
        &self,
        cluster: &str,
        database: &str,
        wait: Duration,
    ) -> Result<Duration, gate::PauseError> {
        let waited = self.gate(cluster, database).pause(wait).await?;
        self.close_idle(cluster, database);
        Ok(waited)
    }

    /// Resumes a paused database; how long it was paused (None if it was not).
    pub fn resume(&self, cluster: &str, database: &str) -> Option<Duration> {
        self.gate(cluster, database).resume()
    }

    /// Closes the idle server connections of every pool of a database (also of replaced pools still in use).
    pub fn close_idle(&self, cluster: &str, database: &str) {
        let retired: Vec<Arc<Pool>> = self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let live: Vec<Arc<Pool>> = self.map.iter().map(|p| p.value().clone()).collect();
        for p in live.iter().chain(&retired) {
            if p.key.cluster == cluster && p.key.database == database {
                let idle: Vec<_> = p.idle().drain(..).collect();
                for c in idle {
                    p.close(c);
                }
            }
        }
    }

    /// Databases paused now.
    pub fn paused(&self) -> usize {
        self.gates.iter().filter(|g| g.is_paused()).count()
    }

    /// The usage counters of every tenant that has had a pool.
    pub fn usage(&self) -> Vec<(String, Arc<Usage>)> {
        self.usage
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    /// The usage counters of `tenant`, if it has had a pool.
    pub fn tenant_usage(&self, tenant: &str) -> Option<Arc<Usage>> {
        self.usage.get(tenant).map(|u| u.clone())
    }

    pub fn stats(&self) -> Vec<PoolStats> {
        let mut v: Vec<PoolStats> = self.map.iter().map(|p| p.stats()).collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool is found by its key's borrowed parts (the login path), and only by its own.
    #[test]
    fn pool_keys_are_found_by_borrowed_parts() {
        let map: DashMap<PoolKey, u32, Hasher> = DashMap::default();
        for (i, (c, d, u)) in [("c1", "db", "u"), ("c1", "db", "v"), ("c2", "db", "u")]
            .into_iter()
            .enumerate()
        {
            let key = PoolKey {
                cluster: c.into(),
                database: d.into(),
                user: u.into(),
            };
            map.insert(key, i as u32);
        }
        let get = |c, d, u| {
            let parts: (&str, &str, &str) = (c, d, u);
            map.get(&parts as &dyn KeyParts).map(|v| *v)
        };
        assert_eq!(get("c1", "db", "u"), Some(0));
        assert_eq!(get("c1", "db", "v"), Some(1));
        assert_eq!(get("c2", "db", "u"), Some(2));
        assert_eq!(get("c2", "db", "v"), None);
        // The parts' boundaries count: "c1"+"db" is not "c1d"+"b".
        assert_eq!(get("c1d", "b", "u"), None);
    }
}
