//! The control plane of one pgweir instance: the catalog (migrated at start), the tenants it routes from it, and
//! the admin API's tokens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;
use tracing::info;

use super::directory::CatalogDirectory;
use super::secret::SecretKey;
use super::store::{token_hash, Catalog, TokenInfo};
use crate::config::{CatalogConfig, PoolConfig};
use crate::pool::{Pools, UsageDelta};
use crate::tenant::{Layered, StaticDirectory, TenantDirectory};

/// The environment variable whose value, when set, is stored as the admin token named `bootstrap` at start.
pub const ADMIN_TOKEN_ENV: &str = "PGWEIR_ADMIN_TOKEN";

/// How often the token list is re-read at most.
const TOKENS_FRESH: Duration = Duration::from_secs(2);

/// Usage counters by tenant, as one flush writes them.
type UsageRows = Vec<(String, UsageDelta)>;

pub struct Control {
    pub catalog: Catalog,
    pub directory: Arc<CatalogDirectory>,
    /// Where clients reach pgweir, for connection strings (the port is the bound one when the config says 0).
    pub public_host: String,
    pub public_port: std::sync::atomic::AtomicU16,
    tokens: tokio::sync::Mutex<(Option<Instant>, Vec<TokenInfo>)>,
    /// This instance's name in the usage table.
    pub instance: String,
    /// One create/delete/plan change per tenant at a time (in this instance).
    tenant_locks: dashmap::DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// The number of this instance's next usage flush.
    usage_seq: AtomicU64,
    /// A usage flush that failed, retried as it is (same number) before anything new is taken.
    pending_usage: tokio::sync::Mutex<Option<(u64, UsageRows)>>,
}

/// The tenant directory for `cfg`: the config file's tenants, and with `[catalog]` the catalog's after them
/// (with the control plane that serves the admin API).
pub async fn directory_for(
    cfg: &crate::config::Config,
) -> anyhow::Result<(Arc<dyn TenantDirectory>, Option<Arc<Control>>)> {
    let file: Arc<dyn TenantDirectory> = Arc::new(StaticDirectory::from_config(cfg));
    let Some(catalog) = &cfg.catalog else {
        return Ok((file, None));
    };
    let listen = cfg.proxy.listen;
    let host = catalog
        .public_host
        .clone()
        .unwrap_or_else(|| listen.ip().to_string());
    let control = Control::start(catalog, cfg.pool, (host, listen.port())).await?;
    let layered: Arc<dyn TenantDirectory> =
        Arc::new(Layered(vec![file, control.directory.clone()]));
    Ok((layered, Some(control)))
}

impl Control {
    /// Opens the catalog, applies its migrations, stores the bootstrap token (if `PGWEIR_ADMIN_TOKEN` is set) and
    /// loads the tenants.
    pub async fn start(
        cfg: &CatalogConfig,
        pool_defaults: PoolConfig,
        public: (String, u16),
    ) -> anyhow::Result<Arc<Control>> {
        let key = Arc::new(SecretKey::load(cfg.key_file.as_deref())?);
        let mut db: tokio_postgres::Config = cfg
            .url
            .parse()
            .map_err(|e| anyhow::anyhow!("catalog.url: {e}"))?;
        if db.get_connect_timeout().is_none() {
            db.connect_timeout(Duration::from_secs(5));
        }
        let catalog = Catalog::new(db.clone(), key.clone());
        let applied = catalog.migrate().await?;
        if !applied.is_empty() {
            info!(?applied, "catalog migrations applied");
        }
        if let Ok(token) = std::env::var(ADMIN_TOKEN_ENV) {
            if !token.is_empty() {
                // A bootstrap token revoked through the API stays revoked while the environment still holds it;
                // a new value replaces it.
                catalog
                    .put_token("bootstrap", &token, "admin", false)
                    .await?;
            }
        }
        let directory = CatalogDirectory::start(db, key, pool_defaults, cfg.fetch_timeout).await?;
        Ok(Arc::new(Control {
            catalog,
            directory,
            public_host: public.0,
            public_port: std::sync::atomic::AtomicU16::new(public.1),
            tokens: tokio::sync::Mutex::new((None, Vec::new())),
            tenant_locks: dashmap::DashMap::new(),
            usage_seq: AtomicU64::new(1),
            pending_usage: tokio::sync::Mutex::new(None),
            instance: format!(
                "{}-{}",
                std::process::id(),
                super::tenants::random_password()
                    .to_lowercase()
                    .get(..8)
                    .unwrap_or("x")
            ),
        }))
    }

    /// Serializes changes of one tenant in this instance (held for a whole create, delete or plan change).
    pub async fn lock_tenant(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self.tenant_locks.entry(id.to_owned()).or_default().clone();
        m.lock_owned().await
    }

    /// Moves the pools' usage counters into the catalog (the current minute of each tenant), exactly once: a
    /// flush that failed is retried with the same number and the same counters before anything new is taken, so
    /// a flush whose commit went through but whose answer was lost is not counted twice.
    pub async fn flush_usage(&self, pools: &Pools) {
        let mut pending = self.pending_usage.lock().await;
        if let Some((seq, rows)) = pending.as_ref() {
            if let Err(e) = self.catalog.add_usage(&self.instance, *seq, rows).await {
                tracing::warn!(error = %e, "could not record usage; keeping it for the next flush");
                return;
            }
            *pending = None;
        }
        let rows: UsageRows = pools
            .usage()
            .into_iter()
            .map(|(tenant, u)| (tenant, u.take()))
            .filter(|(_, d)| !d.is_zero())
            .collect();
        if rows.is_empty() {
            return;
        }
        let seq = self.usage_seq.fetch_add(1, Ordering::Relaxed);
        // Pending until written: a flush cancelled midway (shutdown) keeps what it took.
        let (seq, rows) = pending.insert((seq, rows));
        let written = self.catalog.add_usage(&self.instance, *seq, rows).await;
        match written {
            Ok(()) => *pending = None,
            Err(e) => {
                tracing::warn!(error = %e, "could not record usage; keeping it for the next flush")
            }
        }
    }

    /// The usage of `tenant` this instance has counted but not written yet.
    pub async fn unflushed_usage(&self, pools: &Pools, tenant: &str) -> UsageDelta {
        let mut d = pools
            .tenant_usage(tenant)
            .map(|u| u.peek())
            .unwrap_or_default();
        if let Some((_, rows)) = self.pending_usage.lock().await.as_ref() {
            for (t, p) in rows {
                if t == tenant {
                    d.add(p);
                }
            }
        }
        d
    }

    /// Forgets the cached token list (after a token was created or revoked).
    pub async fn forget_tokens(&self) {
        self.tokens.lock().await.0 = None;
    }

    /// The token `bearer` stands for, if it is a valid one. Hashes are compared in constant time; the list is
    /// re-read from the catalog when it is older than a moment.
    pub async fn authorize(&self, bearer: &str) -> Option<TokenInfo> {
        let hash = token_hash(bearer);
        let mut cache = self.tokens.lock().await;
        if cache.0.is_none_or(|at| at.elapsed() >= TOKENS_FRESH) {
            if let Ok(list) = self.catalog.tokens().await {
                *cache = (Some(Instant::now()), list);
            }
        }
        let mut found = None;
        for t in &cache.1 {
            if bool::from(t.hash.ct_eq(&hash)) {
                found = Some(t.clone());
            }
        }
        found
    }
}
