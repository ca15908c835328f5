//! The proxy process: shared state ([`Proxy`]), the client listener with its connection cap, and signal handling.
//!
//! Architecture invariant: the accept loop only accepts, caps and spawns; everything about a connection happens in
//! [`crate::session`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{error, info, warn};

use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::pool::Pools;
use crate::telemetry::Telemetry;
use crate::tenant::TenantDirectory;
use crate::tls::TlsServer;
use crate::wire::error::sqlstate;
use crate::wire::PgError;

/// State shared by every connection of the process.
pub struct Proxy {
    pub cfg: Config,
    pub directory: Arc<dyn TenantDirectory>,
    pub pools: Pools,
    pub cancels: Arc<CancelRegistry>,
    pub tls: Option<TlsServer>,
    /// Process secret for deterministic dummy verifiers (unknown users).
    pub secret: [u8; 32],
    pub telemetry: Telemetry,
    /// One permit per connected client (`max_client_connections`).
    pub client_slots: Arc<Semaphore>,
    /// The client listener is accepting connections (`/readyz`).
    pub ready: AtomicBool,
    /// The control plane (`[catalog]`), if this instance has one.
    pub control: Option<Arc<crate::catalog::control::Control>>,
    /// Shutdown phases the sessions follow.
    pub lifecycle: Lifecycle,
    /// The config file a reload reads.
    config_path: std::sync::OnceLock<std::path::PathBuf>,
    /// Statement classification and its cache (shared by all tenants).
    pub classifier: crate::policy::Classifier,
    /// Per-tenant limits state (connections, query rate) and the plan in force.
    pub tenant_states: crate::policy::limits::Tenants,
}

/// How pgweir stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: stop accepting, tell idle clients 57P01, let transactions finish (`proxy.shutdown_timeout`), then
    /// tell the rest 57P01.
    Graceful,
    /// SIGINT (and a unit shutdown future): every client is told 57P01 at once.
    Fast,
}

impl From<()> for Stop {
    fn from(_: ()) -> Stop {
        Stop::Fast
    }
}

/// The shutdown phases: *draining* (idle transaction-mode clients leave; others at the end of their transaction)
/// and *terminating* (everyone leaves now). Sessions wait on these without a task or allocation of their own.
#[derive(Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    drain: tokio::sync::Notify,
    terminating: AtomicBool,
    terminate: tokio::sync::Notify,
    /// The sessions' [`Watch`]es, woken at each phase.
    watches: std::sync::Mutex<Watches>,
}

impl Lifecycle {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Resolves once draining has begun.
    pub async fn drained(&self) {
        wait_flag(&self.draining, &self.drain).await
    }

    /// Resolves once terminating has begun.
    pub async fn terminated(&self) {
        wait_flag(&self.terminating, &self.terminate).await
    }

    /// Runs `work` to its end, unless terminating begins first (None: `work` was dropped).
    pub async fn unless_terminated<F: Future>(&self, work: F) -> Option<F::Output> {
        match crate::race(std::pin::pin!(work), std::pin::pin!(self.terminated())).await {
            crate::First::A(out) => Some(out),
            crate::First::B(()) => None,
        }
    }

    fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.drain.notify_waiters();
        self.wake_watches();
    }

    fn start_terminating(&self) {
        self.start_draining();
        self.terminating.store(true, Ordering::SeqCst);
        self.terminate.notify_waiters();
        self.wake_watches();
    }

    fn wake_watches(&self) {
        let w = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        for waker in w.slots.iter().flatten() {
            waker.wake_by_ref();
        }
    }

    /// A watch for one session's task (see [`Watch`]).
    pub fn watch(&self) -> Watch<'_> {
        Watch {
            lifecycle: self,
            registered: None,
        }
    }
}

/// The tasks [`Watch`]es registered: their wakers, and the free slots.
#[derive(Default)]
struct Watches {
    slots: Vec<Option<std::task::Waker>>,
    free: Vec<usize>,
}

/// A session's view of the [`Lifecycle`]: its task's waker is registered with the lifecycle once (at the first
/// wait), and each wait after that is a flag read. The `Notify` waits of [`Lifecycle::drained`] and
/// [`Lifecycle::terminated`] take the notifier's lock at every poll: on a transaction's hot path, that is a lock
/// per wakeup.
pub struct Watch<'a> {
    lifecycle: &'a Lifecycle,
    /// The slot and the waker registered in it.
    registered: Option<(usize, std::task::Waker)>,
}

impl Watch<'_> {
    /// Resolves once draining has begun.
    pub async fn drained(&mut self) {
        std::future::poll_fn(|cx| self.poll_flag(cx, |l| &l.draining)).await
    }

    /// Resolves once terminating has begun.
    pub async fn terminated(&mut self) {
        std::future::poll_fn(|cx| self.poll_flag(cx, |l| &l.terminating)).await
    }

    /// Runs `work` to its end, unless terminating begins first (None: `work` was dropped).
    pub async fn unless_terminated<F: Future>(&mut self, work: F) -> Option<F::Output> {
        match crate::race(std::pin::pin!(work), std::pin::pin!(self.terminated())).await {
            crate::First::A(out) => Some(out),
            crate::First::B(()) => None,
        }
    }

    fn poll_flag(
        &mut self,
        cx: &mut std::task::Context<'_>,
        flag: impl Fn(&Lifecycle) -> &AtomicBool,
    ) -> std::task::Poll<()> {
        if flag(self.lifecycle).load(Ordering::SeqCst) {
            return std::task::Poll::Ready(());
        }
        if !matches!(&self.registered, Some((_, w)) if w.will_wake(cx.waker())) {
            self.register(cx.waker());
            // Registered before the flag is read again: a phase that began in between is seen here.
            if flag(self.lifecycle).load(Ordering::SeqCst) {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    }

    fn register(&mut self, waker: &std::task::Waker) {
        let mut w = self
            .lifecycle
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let slot = match &self.registered {
            Some((slot, _)) => *slot,
            None => match w.free.pop() {
                Some(slot) => slot,
                None => {
                    w.slots.push(None);
                    w.slots.len() - 1
                }
            },
        };
        w.slots[slot] = Some(waker.clone());
        self.registered = Some((slot, waker.clone()));
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if let Some((slot, _)) = self.registered.take() {
            let mut w = self
                .lifecycle
                .watches
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            w.slots[slot] = None;
            w.free.push(slot);
        }
    }
}

/// TCP_DEFER_ACCEPT on the client listener (Linux): a connection is accepted when its first bytes arrive (a
/// Postgres client always speaks first), so accepting and reading the first packet are one wakeup instead of two.
/// A client that sends nothing is accepted once `wait` is over (then `login_timeout` applies). Zero: off.
/// `wait` is rounded up to whole seconds.
fn defer_accept(listener: &TcpListener, wait: std::time::Duration) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // Whole seconds, a part of one rounded up (a short wait stays a wait rather than turning it off).
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let secs = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
        // SAFETY: the listener's fd is open for the call, and the option value is a c_int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&secs as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            warn!(error = %std::io::Error::last_os_error(), "could not set TCP_DEFER_ACCEPT on the listener");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (listener, wait);
}

/// The runtime for `workers` session threads (`proxy.worker_threads`): 1 is a single event loop on the thread that
/// runs it, 0 one worker per CPU.
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if workers > 1 {
        b.worker_threads(workers);
    }
    b.enable_all().build()
}

async fn wait_flag(flag: &AtomicBool, notify: &tokio::sync::Notify) {
    let notified = notify.notified();
    tokio::pin!(notified);
    // Registered before the flag is read: a notification between the two is not lost.
    notified.as_mut().enable();
    if flag.load(Ordering::SeqCst) {
        return;
    }
    notified.await
}

impl Proxy {
    /// Client connections open now (logging in or logged in).
    pub fn clients_connected(&self) -> usize {
        self.cfg
            .proxy
            .max_client_connections
            .saturating_sub(self.client_slots.available_permits())
    }
}

/// A bound, not yet running proxy.
pub struct Server {
    proxy: Arc<Proxy>,
    listener: TcpListener,
    /// The admin HTTP listener (`[admin]`).
    admin: Option<TcpListener>,
    /// SIGHUP, registered at bind time so that a reload signal is never the default (fatal) action.
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Server {
    pub async fn bind(cfg: Config, directory: Arc<dyn TenantDirectory>) -> anyhow::Result<Server> {
        Server::bind_with_control(cfg, directory, None).await
    }

    /// [`Server::bind`] with a control plane (catalog, admin `/v1` API).
    pub async fn bind_with_control(
        cfg: Config,
        directory: Arc<dyn TenantDirectory>,
        control: Option<Arc<crate::catalog::control::Control>>,
    ) -> anyhow::Result<Server> {
        let tls = match &cfg.tls {
            Some(t) => Some(TlsServer::load(t)?),
            None => None,
        };
        // A running pgweir hands over its listening sockets (zero-downtime restart); otherwise they are bound here.
        let inherited = match cfg.proxy.handover_socket.clone() {
            Some(path) => tokio::task::spawn_blocking(move || crate::handover::take_over(&path))
                .await?
                .map_err(|e| anyhow::anyhow!("taking over from the running pgweir: {e}"))?,
            None => None,
        };
        let (inherited_client, inherited_admin) = match inherited {
            Some(i) => {
                info!("took over the listening sockets of the running pgweir");
                (Some(i.client), i.admin)
            }
            None => (None, None),
        };
        let listener = match inherited_client {
            Some(l) => {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)?
            }
            None => TcpListener::bind(cfg.proxy.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.proxy.listen))?,
        };
        let admin = match (&cfg.admin, inherited_admin) {
            (Some(_), Some(l)) => {
                l.set_nonblocking(true)?;
                Some(TcpListener::from_std(l)?)
            }
            (Some(a), None) => Some(
                TcpListener::bind(a.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {} (admin): {e}", a.listen))?,
            ),
            (None, _) => None,
        };
        defer_accept(&listener, cfg.proxy.tcp_defer_accept);
        if let (Some(c), Ok(addr)) = (&control, listener.local_addr()) {
            // Connection strings name the port actually bound (the config may say 0).
            let _ = c.public_port.compare_exchange(
                0,
                addr.port(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        let telemetry = Telemetry::new();
        let pools = Pools::new(
            telemetry.checkout_wait_seconds.clone(),
            telemetry.backend_connect_seconds.clone(),
        );
        let (hits, misses) = telemetry.classifier_counters();
        let proxy = Arc::new(Proxy {
            classifier: crate::policy::Classifier::new(hits, misses),
            tenant_states: Default::default(),
            client_slots: Arc::new(Semaphore::new(cfg.proxy.max_client_connections)),
            cfg,
            directory,
            pools,
            cancels: Arc::new(CancelRegistry::default()),
            tls,
            secret: rand::random(),
            telemetry,
            ready: AtomicBool::new(false),
            lifecycle: Lifecycle::default(),
            config_path: std::sync::OnceLock::new(),
            control,
        });
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        Ok(Server {
            proxy,
            listener,
            admin,
            hangup,
        })
    }

    /// Where the admin HTTP listener is, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has a local address")
    }

    pub fn proxy(&self) -> Arc<Proxy> {
        self.proxy.clone()
    }

    /// Accepts clients until `shutdown` completes.
    /// Serves until `shutdown` resolves (to a [`Stop`], or `()` for a fast stop), then stops as it says.
    pub async fn run<O: Into<Stop>>(self, shutdown: impl Future<Output = O>) {
        let Server {
            proxy,
            listener,
            admin,
            hangup,
        } = self;
        let slots = proxy.client_slots.clone();
        // Takeover requests of a newer process: answered with these sockets, then this one drains.
        let handed_over = Arc::new(tokio::sync::Notify::new());
        // Duplicates owned by the handover task: valid however the listeners here are closed meanwhile.
        let handover = match proxy.cfg.proxy.handover_socket.clone() {
            Some(path) => {
                use std::os::fd::AsFd;
                let dups: std::io::Result<Vec<std::os::fd::OwnedFd>> =
                    std::iter::once(listener.as_fd().try_clone_to_owned())
                        .chain(admin.as_ref().map(|a| a.as_fd().try_clone_to_owned()))
                        .collect();
                match dups {
                    Ok(sockets) => Some(tokio::spawn(serve_handover(
                        path,
                        sockets,
                        handed_over.clone(),
                    ))),
                    Err(e) => {
                        error!(error = %e, "cannot offer the listening sockets for a takeover");
                        None
                    }
                }
            }
            None => None,
        };
        // The client listener is bound (connections queue in its backlog) and accepted from just below.
        proxy.ready.store(true, Ordering::Relaxed);
        let admin = admin.map(|l| {
            info!(listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin API listening");
            tokio::spawn(crate::admin::serve(l, proxy.clone()))
        });
        // Plans changed by a reload or in the catalog reach running sessions within a second.
        let plans = {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    proxy.tenant_states.refresh(|id| {
                        proxy.directory.get(id).map(|t| {
                            proxy.pools.follow_cluster(&t.cluster);
                            (t.plan.clone(), t.read_only)
                        })
                    });
                }
            })
        };
        let storage = {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(proxy.cfg.proxy.storage_check_interval);
                loop {
                    tick.tick().await;
                    proxy.sample_storage().await;
                }
            })
        };
        let usage = proxy.control.clone().map(|control| {
            let proxy = proxy.clone();
            let every = proxy
                .cfg
                .catalog
                .as_ref()
                .map_or(Duration::from_secs(60), |c| c.usage_flush_interval);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    control.flush_usage(&proxy.pools).await;
                    proxy.refresh_month_quotas(None).await;
                    proxy
                        .pools
                        .retain_tenants(|t| proxy.directory.get(t).is_some());
                }
            })
        });
        // Branch operations: interrupted ones finished, expired branches deleted.
        let housekeeping = proxy.control.clone().map(|control| {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    crate::catalog::branches::housekeeping(
                        &control,
                        &proxy.pools,
                        &proxy.telemetry.pause_seconds,
                    )
                    .await;
                }
            })
        });
        info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "pgweir is accepting connections");
        let reload = tokio::spawn(reload_on_sighup(proxy.clone(), hangup));
        tokio::pin!(shutdown);
        let stop = loop {
            let accepted = tokio::select! {
                how = &mut shutdown => break how.into(),
                _ = handed_over.notified() => {
                    info!("a new pgweir took over the listening sockets; draining");
                    // The new process answers on the shared admin socket from now on.
                    if let Some(a) = &admin {
                        a.abort();
                    }
                    break Stop::Graceful;
                }
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE/ENFILE: back off instead of spinning.
                    error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            proxy.telemetry.clients_accepted.increment(1);
            match slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    let proxy = proxy.clone();
                    // The session's future is the task (no wrapper around it: every byte of the task stays as
                    // long as the client does).
                    tokio::spawn(crate::session::serve(proxy, tcp, peer, permit));
                }
                Err(_) => {
                    proxy.telemetry.clients_refused.increment(1);
                    proxy.telemetry.error_sent(sqlstate::TOO_MANY_CONNECTIONS);
                    warn!(%peer, "client connection limit reached");
                    tokio::spawn(async move {
                        let mut tcp = tcp;
                        let e = PgError::fatal(
                            sqlstate::TOO_MANY_CONNECTIONS,
                            "sorry, too many clients already",
                        );
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            tcp.write_all(&e.to_bytes()),
                        )
                        .await;
                        crate::net::linger_close(&mut tcp).await;
                    });
                }
            }
        };
        proxy.ready.store(false, Ordering::Relaxed);
        // No takeover of sockets this process no longer serves.
        if let Some(h) = &handover {
            h.abort();
        }
        drop(listener);
        stop_sessions(&proxy, stop).await;
        reload.abort();
        plans.abort();
        storage.abort();
        if let Some(a) = admin {
            a.abort();
        }
        if let Some(u) = usage {
            u.abort();
        }
        if let Some(h) = housekeeping {
            h.abort();
        }
        if let Some(control) = &proxy.control {
            // What was counted since the last flush.
            let _ = tokio::time::timeout(Duration::from_secs(2), control.flush_usage(&proxy.pools))
                .await;
        }
        info!("pgweir stopped accepting connections");
    }
}

async fn reload_on_sighup(proxy: Arc<Proxy>, hangup: Option<tokio::signal::unix::Signal>) {
    let Some(mut hup) = hangup else {
        return;
    };
    while hup.recv().await.is_some() {
        let _ = proxy.reload();
    }
}

/// What a reload did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Reloaded {
    /// The TLS certificate and key were read again.
    pub tls: bool,
    /// Tenants now served from the config file (None: no config file to read).
    pub config_tenants: Option<usize>,
    /// Config sections that changed in the file but take effect only after a restart.
    pub needs_restart: Vec<String>,
}

impl Proxy {
    /// Sets the config file a reload reads (once).
    /// Reads this month's query counts from the catalog for the tenants with a monthly quota (all of them here,
    /// or `only` that one). Without a catalog, quotas count what this instance saw since it started.
    pub async fn refresh_month_quotas(&self, only: Option<&str>) {
        let Some(control) = &self.control else {
            return;
        };
        let states: Vec<_> = self
            .tenant_states
            .all()
            .into_iter()
            .filter(|(id, s)| {
                only.is_none_or(|o| o == id) && s.with_plan(|p| p.monthly_queries.is_some())
            })
            .collect();
        if states.is_empty() {
            return;
        }
        let ids = states.iter().map(|(id, _)| id.clone()).collect();
        match control.catalog.month_queries(ids).await {
            Ok((month, totals)) => {
                for (id, total) in totals {
                    if let Some((_, s)) = states.iter().find(|(i, _)| *i == id) {
                        s.month_total(month, total.max(0) as u64);
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "could not read the monthly query counts; quotas use what is known")
            }
        }
    }

    /// Samples the size of every active tenant with a storage quota (its main and branch databases, asked as its
    /// own backend role) and switches it to read-only above the quota, back below it.
    pub async fn sample_storage(&self) {
        for (id, state) in self.tenant_states.all() {
            if state.with_plan(|p| p.storage_bytes.is_none()) {
                continue;
            }
            let Some(t) = self.directory.get(&id) else {
                continue;
            };
            let (Some(db), Some(user)) = (&t.backend_database, &t.backend_user) else {
                continue;
            };
            let mut databases: Vec<String> = t.branches.values().cloned().collect();
            databases.push(db.clone());
            let mut cfg = tokio_postgres::Config::new();
            cfg.host(&*t.cluster.host)
                .port(t.cluster.port)
                .user(user)
                .dbname(db)
                .application_name("pgweir storage quota")
                .connect_timeout(Duration::from_secs(5));
            if let Some(pw) = &t.backend_password {
                cfg.password(pw);
            }
            let tls = match crate::tls::postgres_connector(
                &mut cfg,
                t.cluster.tls,
                t.cluster.ca_file.as_deref(),
            ) {
                Ok(tls) => tls,
                Err(e) => {
                    warn!(tenant = %id, error = %e, "storage quota: no TLS setup for the cluster");
                    continue;
                }
            };
            let size = async {
                let (client, conn) = cfg.connect(tls).await?;
                let conn = tokio::spawn(conn);
                let row = client
                    .query_one(
                        "SELECT coalesce(sum(pg_database_size(datname)), 0)::bigint FROM pg_database \
                         WHERE datname = ANY($1)",
                        &[&databases],
                    )
                    .await;
                drop(client);
                let _ = conn.await;
                row.map(|r| r.get::<_, i64>(0))
            };
            match tokio::time::timeout(Duration::from_secs(10), size).await {
                Ok(Ok(bytes)) => {
                    if state.storage_sampled(bytes.max(0) as u64) {
                        let quota = state.with_plan(|p| p.storage_bytes).unwrap_or_default();
                        match state.with_plan(|p| state.read_only(p)) {
                            Some(_) => {
                                warn!(tenant = %id, bytes, quota, "storage over quota: tenant is read-only")
                            }
                            None => {
                                info!(tenant = %id, bytes, quota, "storage under quota again: tenant is writable")
                            }
                        }
                    }
                }
                Ok(Err(e)) => {
                    warn!(tenant = %id, error = %e, "storage quota: could not sample the tenant's size")
                }
                Err(_) => warn!(tenant = %id, "storage quota: sampling timed out"),
            }
        }
    }

    pub fn set_config_path(&self, path: std::path::PathBuf) {
        let _ = self.config_path.set(path);
    }

    /// Reloads without dropping a connection (SIGHUP, `POST /v1/reload`): the TLS certificate, and the config
    /// file's tenants and clusters; changes of other sections are named in the log as needing a restart. A file
    /// that does not validate changes nothing.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let mut done = Reloaded::default();
        if let Some(path) = self.config_path.get() {
            let new = Config::load(path).map_err(|e| {
                let msg = format!("{}: invalid config, nothing reloaded:\n{e}", path.display());
                error!("{msg}");
                msg
            })?;
            let old = &self.cfg;
            let sections: [(&str, String, String); 5] = [
                (
                    "proxy",
                    format!("{:?}", old.proxy),
                    format!("{:?}", new.proxy),
                ),
                ("pool", format!("{:?}", old.pool), format!("{:?}", new.pool)),
                ("tls", format!("{:?}", old.tls), format!("{:?}", new.tls)),
                (
                    "admin",
                    format!("{:?}", old.admin),
                    format!("{:?}", new.admin),
                ),
                (
                    "catalog",
                    format!("{:?}", old.catalog),
                    format!("{:?}", new.catalog),
                ),
            ];
            for (name, a, b) in sections {
                if a != b {
                    warn!(
                        section = name,
                        "[{name}] changed in the config file; it takes effect after a restart"
                    );
                    done.needs_restart.push(name.to_owned());
                }
            }
            done.config_tenants = self.directory.reload_from(&new);
            info!(tenants = ?done.config_tenants, "config file tenants and clusters reloaded");
        }
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => {
                    info!("TLS certificate reloaded");
                    done.tls = true;
                }
                Err(e) => error!(error = %e, "TLS certificate reload failed; keeping the old one"),
            }
        }
        Ok(done)
    }
}

/// Answers takeover requests on the Unix socket `path` with `sockets` (see [`crate::handover`]); after the first
/// answered one, `handed_over` is notified.
async fn serve_handover(
    path: std::path::PathBuf,
    sockets: Vec<std::os::fd::OwnedFd>,
    handed_over: Arc<tokio::sync::Notify>,
) {
    use std::os::fd::AsRawFd;
    let sockets: Arc<Vec<std::os::fd::OwnedFd>> = Arc::new(sockets);
    // A file left by an earlier process (or the socket of the process just taken over) is replaced.
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            error!(path = %path.display(), error = %e, "cannot listen for takeovers");
            return;
        }
    };
    // Only this user (the owner of the socket) may take the sockets over.
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
            error!(path = %path.display(), error = %e, "cannot restrict the handover socket; not offering takeovers");
            return;
        }
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    info!(path = %path.display(), "handover socket ready");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == me => {}
            other => {
                warn!(peer = ?other.map(|c| c.uid()), "takeover request from another user; refused");
                continue;
            }
        }
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let sockets = sockets.clone();
        let answered = tokio::task::spawn_blocking(move || {
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let raw: Vec<std::os::fd::RawFd> = sockets.iter().map(|f| f.as_raw_fd()).collect();
            crate::handover::answer(&stream, &raw)
        })
        .await;
        match answered {
            Ok(Ok(true)) => {
                handed_over.notify_one();
                return;
            }
            Ok(Ok(false)) => warn!("a handover request that was not one; ignored"),
            Ok(Err(e)) => warn!(error = %e, "handover failed; still serving"),
            Err(_) => {}
        }
    }
}

/// Ends the sessions as `stop` says: graceful draining (bounded by `proxy.shutdown_timeout`), then 57P01 for the
/// rest, who get a moment to be told.
async fn stop_sessions(proxy: &Proxy, stop: Stop) {
    let started = std::time::Instant::now();
    let clients = proxy.clients_connected();
    if stop == Stop::Graceful {
        info!(clients, timeout = ?proxy.cfg.proxy.shutdown_timeout, "shutting down: draining clients");
        proxy.lifecycle.start_draining();
        let deadline = tokio::time::Instant::now() + proxy.cfg.proxy.shutdown_timeout;
        while proxy.clients_connected() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let left = proxy.clients_connected();
    if left > 0 {
        info!(clients = left, "terminating the remaining clients");
    }
    proxy.lifecycle.start_terminating();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while proxy.clients_connected() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    info!(clients, elapsed = ?started.elapsed(), "clients stopped");
}

/// Resolves on SIGINT (fast stop) or SIGTERM (graceful stop).
pub async fn shutdown_signal() -> Stop {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Stop::Fast,
        _ = term => Stop::Graceful,
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The listener's TCP_DEFER_ACCEPT as the kernel reports it (seconds; 0: off).
    fn deferred(l: &TcpListener) -> std::io::Result<libc::c_int> {
        use std::os::fd::AsRawFd;
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the fd is open, and `v`/`len` are a c_int and its size.
        let rc = unsafe {
            libc::getsockopt(
                l.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(v)
    }

    /// A sub-second wait is a wait (rounded up), zero turns the option off.
    #[tokio::test]
    async fn defer_accept_rounds_up_and_zero_is_off() -> std::io::Result<()> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        defer_accept(&l, std::time::Duration::from_millis(500));
        assert!(deferred(&l)? >= 1, "500ms must defer");
        defer_accept(&l, std::time::Duration::from_secs(3));
        assert!(deferred(&l)? >= 3, "3s");
        defer_accept(&l, std::time::Duration::ZERO);
        assert_eq!(deferred(&l)?, 0, "0s is off");
        Ok(())
    }
}
