//! Tenants from the catalog, as the data plane reads them: an in-memory snapshot that logins read without I/O.
//!
//! - At start every routable tenant is loaded.
//! - A `LISTEN pgweir_tenants` connection reloads the tenant a notification names (any instance's change reaches
//!   every instance within a round trip); when that connection is lost it is re-established and everything is
//!   reloaded, since notifications may have been missed meanwhile. A periodic full reload is the backstop.
//! - A login for a tenant the snapshot lacks loads that one tenant (bounded by `fetch_timeout`), so a tenant
//!   created a moment ago is not refused while its notification is on its way. Misses are remembered for a moment
//!   so that unknown names cannot turn into a query each.
//! - When the control database is unreachable, the snapshot keeps serving the tenants it has.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tracing::{info, warn};

use super::secret::SecretKey;
use super::TENANT_CHANNEL;
use crate::auth::scram::ScramVerifier;
use crate::config::{AuthMethod, BackendTls, PoolConfig, PoolMode};
use crate::tenant::{Cluster, Lookup, Tenant, TenantDirectory, User};

/// How long a name the catalog did not know is answered from memory.
const MISS_TTL: Duration = Duration::from_secs(1);
/// At most this many recent misses are remembered; beyond it, unknown names are not looked up.
const MAX_MISSES: usize = 10_000;

/// Could `id` be a tenant id (what the API accepts)?
fn possible_tenant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 40
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Full reload period (a backstop for lost notifications).
const RESYNC_EVERY: Duration = Duration::from_secs(60);

/// The catalog as a [`TenantDirectory`].
pub struct CatalogDirectory {
    db: tokio_postgres::Config,
    key: Arc<SecretKey>,
    pool_defaults: PoolConfig,
    fetch_timeout: Duration,
    tenants: DashMap<String, Arc<Tenant>>,
    misses: DashMap<String, Instant>,
    /// The connection used for loads; replaced when it fails.
    client: tokio::sync::Mutex<Option<Client>>,
    /// True while changes are followed (LISTEN established and everything reloaded since).
    following: AtomicBool,
}

const TENANT_SQL: &str = "
SELECT t.id, t.database, t.backend_database, t.backend_role, t.backend_password_enc,
       c.name, c.host, c.port, c.tls, p.pool_size, t.plan, p.spec, t.read_only, c.max_active_transactions
  FROM pgweir.tenants t
  JOIN pgweir.clusters c ON c.name = t.cluster
  JOIN pgweir.plans p ON p.name = t.plan
 WHERE t.state IN ('ready', 'paused') AND ($1::text IS NULL OR t.id = $1)";
const USERS_SQL: &str =
    "SELECT tenant, name, scram FROM pgweir.tenant_users WHERE $1::text IS NULL OR tenant = $1";
const BRANCHES_SQL: &str = "SELECT tenant, name, backend_database FROM pgweir.branches
      WHERE state IN ('ready', 'resetting') AND ($1::text IS NULL OR tenant = $1)";

impl CatalogDirectory {
    /// Connects, loads every tenant and starts following changes. Fails when the control database cannot be read
    /// at start (a directory that starts empty would refuse every client).
    pub async fn start(
        db: tokio_postgres::Config,
        key: Arc<SecretKey>,
        pool_defaults: PoolConfig,
        fetch_timeout: Duration,
    ) -> anyhow::Result<Arc<CatalogDirectory>> {
        let dir = Arc::new(CatalogDirectory {
            db,
            key,
            pool_defaults,
            fetch_timeout,
            tenants: DashMap::new(),
            misses: DashMap::new(),
            client: tokio::sync::Mutex::new(None),
            following: AtomicBool::new(false),
        });
        let n = dir.reload_all().await?;
        info!(tenants = n, "catalog loaded");
        tokio::spawn(follow(Arc::downgrade(&dir)));
        Ok(dir)
    }

    /// Whether catalog changes reach this instance now (false while the control database is unreachable).
    pub fn following(&self) -> bool {
        self.following.load(Ordering::Relaxed)
    }

    /// Reloads every tenant; returns how many are routable.
    pub async fn reload_all(&self) -> anyhow::Result<usize> {
        let loaded = self.load(None).await?;
        self.tenants.retain(|id, _| loaded.contains_key(id));
        let n = loaded.len();
        for (id, t) in loaded {
            self.tenants.insert(id, t);
        }
        self.misses.clear();
        Ok(n)
    }

    /// Reloads one tenant (gone from the snapshot when the catalog no longer routes it).
    pub async fn reload(&self, id: &str) -> anyhow::Result<Option<Arc<Tenant>>> {
        let mut loaded = self.load(Some(id)).await?;
        let t = loaded.remove(id);
        match &t {
            Some(t) => {
                self.tenants.insert(id.to_owned(), t.clone());
                self.misses.remove(id);
            }
            None => {
                self.tenants.remove(id);
                self.misses.insert(id.to_owned(), Instant::now());
            }
        }
        Ok(t)
    }

    async fn load(&self, id: Option<&str>) -> anyhow::Result<HashMap<String, Arc<Tenant>>> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(super::connect(&self.db).await?);
        }
        let client = guard.as_ref().expect("connected above");
        let result = self.load_with(client, id).await;
        if result.is_err() {
            *guard = None;
        }
        result
    }

    async fn load_with(
        &self,
        client: &Client,
        id: Option<&str>,
    ) -> anyhow::Result<HashMap<String, Arc<Tenant>>> {
        let tenant_rows = client.query(TENANT_SQL, &[&id]).await?;
        let user_rows = client.query(USERS_SQL, &[&id]).await?;
        let branch_rows = client.query(BRANCHES_SQL, &[&id]).await?;
        let mut users: HashMap<String, HashMap<String, User>> = HashMap::new();
        for r in &user_rows {
            let tenant: String = r.get(0);
            let name: String = r.get(1);
            let scram: String = r.get(2);
            let Ok(scram) = ScramVerifier::parse(&scram) else {
                warn!(%tenant, user = %name, "unreadable SCRAM verifier in the catalog; user skipped");
                continue;
            };
            users.entry(tenant).or_default().insert(
                name.clone(),
                User {
                    name,
                    scram,
                    md5: None,
                    backend_password: None,
                    pool_mode: None,
                },
            );
        }
        let mut branches: HashMap<String, HashMap<String, String>> = HashMap::new();
        for r in &branch_rows {
            branches
                .entry(r.get(0))
                .or_default()
                .insert(r.get(1), r.get(2));
        }
        let mut out = HashMap::new();
        for r in &tenant_rows {
            let id: String = r.get(0);
            let sealed: Vec<u8> = r.get(4);
            let password = match self.key.open(&format!("tenant:{id}"), &sealed) {
                Ok(p) => p,
                Err(e) => {
                    warn!(tenant = %id, error = %e, "cannot open the tenant's backend password; tenant skipped");
                    continue;
                }
            };
            let tls = match r.get::<_, String>(8).as_str() {
                "require" => BackendTls::Require,
                "verify-full" => BackendTls::VerifyFull,
                _ => BackendTls::Disable,
            };
            let pool_size: i32 = r.get(9);
            let port: i32 = r.get(7);
            let tenant = Tenant {
                database: r.get(1),
                cluster: Arc::new(Cluster {
                    name: r.get(5),
                    host: r.get::<_, String>(6).into(),
                    port: u16::try_from(port).unwrap_or(5432),
                    tls,
                    ca_file: None,
                    max_active_transactions: usize::try_from(r.get::<_, i32>(13)).unwrap_or(0),
                }),
                backend_database: Some(r.get(2)),
                backend_user: Some(r.get(3)),
                backend_password: Some(password),
                passthrough: false,
                require_tls: false,
                auth: vec![AuthMethod::ScramSha256],
                pool: PoolConfig {
                    max_size: usize::try_from(pool_size).unwrap_or(1).max(1),
                    ..self.pool_defaults
                },
                pool_mode: PoolMode::Transaction,
                users: users.remove(&id).unwrap_or_default(),
                branches: branches.remove(&id).unwrap_or_default(),
                id: id.clone(),
                plan: plan_for(&r.get::<_, String>(10), r.get(11)),
                read_only: r.get(12),
            };
            out.insert(id, Arc::new(tenant));
        }
        Ok(out)
    }
}

/// The data-plane plan of a catalog tenant: its plan row's `spec` (limits and SQL policy; defaults for what it
/// leaves out).
fn plan_for(name: &str, spec: serde_json::Value) -> Arc<crate::policy::Plan> {
    match serde_json::from_value::<crate::policy::Plan>(spec) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            warn!(plan = %name, error = %e, "unreadable plan spec in the catalog; the default plan applies");
            Arc::default()
        }
    }
}

impl TenantDirectory for CatalogDirectory {
    fn get(&self, id: &str) -> Option<Arc<Tenant>> {
        self.tenants.get(id).map(|t| t.clone())
    }

    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        Box::pin(async move {
            if let Some(t) = self.get(id) {
                return Some(t);
            }
            // Anything a client can send lands here before it authenticates: only names that can be tenant ids
            // are looked up, and each at most once per MISS_TTL.
            if !possible_tenant_id(id)
                || self
                    .misses
                    .get(id)
                    .is_some_and(|at| at.elapsed() < MISS_TTL)
            {
                return None;
            }
            if self.misses.len() >= MAX_MISSES {
                self.misses.retain(|_, at| at.elapsed() < MISS_TTL);
                if self.misses.len() >= MAX_MISSES {
                    // Flooded with unknown names: answer from the snapshot only until the flood passes.
                    return None;
                }
            }
            self.misses.insert(id.to_owned(), Instant::now());
            match tokio::time::timeout(self.fetch_timeout, self.reload(id)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    warn!(tenant = %id, error = %e, "catalog lookup failed");
                    None
                }
                Err(_) => {
                    warn!(tenant = %id, "catalog lookup timed out");
                    None
                }
            }
        })
    }
}

/// Follows catalog changes while the directory lives: LISTEN, reload what notifications name, reconnect (and
/// reload everything) after a loss, and reload everything now and then.
async fn follow(dir: std::sync::Weak<CatalogDirectory>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(d) = dir.upgrade() else { return };
        let db = d.db.clone();
        drop(d);
        let (client, mut conn) = match db.connect(NoTls).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot reach the control database to follow catalog changes; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        let pump = tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        if let Err(e) = client
            .batch_execute(&format!("LISTEN {TENANT_CHANNEL}"))
            .await
        {
            warn!(error = %e, "LISTEN on the control database failed; retrying");
            pump.abort();
            tokio::time::sleep(backoff).await;
            continue;
        }
        // Changes made while nobody listened are picked up now; until that worked, changes are not followed.
        if let Some(d) = dir.upgrade() {
            if let Err(e) = d.reload_all().await {
                warn!(error = %e, "catalog reload failed; retrying");
                pump.abort();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            d.following.store(true, Ordering::Relaxed);
        }
        backoff = Duration::from_millis(100);
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.tick().await;
        loop {
            tokio::select! {
                id = rx.recv() => {
                    let Some(id) = id else { break };
                    let Some(d) = dir.upgrade() else { pump.abort(); return };
                    if id == "*" {
                        // A plan changed: every tenant may be affected.
                        if let Err(e) = d.reload_all().await {
                            warn!(error = %e, "catalog reload failed; tenants keep their last known state");
                        }
                        continue;
                    }
                    if let Err(e) = d.reload(&id).await {
                        warn!(tenant = %id, error = %e, "catalog reload failed; the tenant keeps its last known state");
                    }
                }
                _ = resync.tick() => {
                    let Some(d) = dir.upgrade() else { pump.abort(); return };
                    if let Err(e) = d.reload_all().await {
                        warn!(error = %e, "catalog reload failed; tenants keep their last known state");
                    }
                }
            }
        }
        pump.abort();
        if let Some(d) = dir.upgrade() {
            d.following.store(false, Ordering::Relaxed);
        }
        warn!("lost the control database connection that follows catalog changes; reconnecting");
    }
}
