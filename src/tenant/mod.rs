//! Tenants as the data plane sees them, behind the [`TenantDirectory`] boundary. The config file is one source
//! ([`StaticDirectory`]); the control plane's catalog will be another.
//!
//! Architecture invariant: a `Tenant` is immutable once built; a change replaces the whole `Arc<Tenant>`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::auth::scram::ScramVerifier;
use crate::config::{AuthMethod, BackendTls, Config, PoolConfig, PoolMode};

/// A backend Postgres cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    /// Shared with the cancel target of every server connection to it.
    pub host: Arc<str>,
    pub port: u16,
    pub tls: BackendTls,
    pub ca_file: Option<PathBuf>,
    /// Transactions its tenants may run at once (0: no limit); when saturated, shared by plan weight.
    pub max_active_transactions: usize,
}

/// A client login of a tenant.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub scram: ScramVerifier,
    pub md5: Option<String>,
    /// Passthrough tenants: password of the same-named backend role.
    pub backend_password: Option<String>,
    /// Overrides the tenant's pool mode.
    pub pool_mode: Option<PoolMode>,
}

#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    /// Logical database name clients use.
    pub database: String,
    pub cluster: Arc<Cluster>,
    /// Physical database of the main branch (None for passthrough).
    pub backend_database: Option<String>,
    pub backend_user: Option<String>,
    pub backend_password: Option<String>,
    pub passthrough: bool,
    pub require_tls: bool,
    pub auth: Vec<AuthMethod>,
    pub pool: PoolConfig,
    pub pool_mode: PoolMode,
    pub users: HashMap<String, User>,
    /// Branch name → physical database.
    pub branches: HashMap<String, String>,
    /// Limits and SQL policy.
    pub plan: Arc<crate::policy::Plan>,
    /// An operator switched the tenant to read-only (writes and DDL get 25006).
    pub read_only: bool,
}

/// Where a connection lands on the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTarget {
    pub cluster: Arc<Cluster>,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
}

/// Why a logged-in client cannot be served by its tenant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("database \"{0}\" does not exist")]
    NoSuchDatabase(String),
    #[error("branch \"{branch}\" of \"{tenant}\" does not exist")]
    NoSuchBranch { tenant: String, branch: String },
}

impl Tenant {
    /// The backend target for `user` asking for `database` on `branch` (None = main). Only called after the
    /// client has authenticated.
    pub fn target(
        &self,
        user: &User,
        database: &str,
        branch: Option<&str>,
    ) -> Result<BackendTarget, TargetError> {
        if self.passthrough {
            if branch.is_some() {
                return Err(TargetError::NoSuchBranch {
                    tenant: self.id.clone(),
                    branch: branch.unwrap_or_default().to_owned(),
                });
            }
            return Ok(BackendTarget {
                cluster: self.cluster.clone(),
                database: database.to_owned(),
                user: user.name.clone(),
                password: user.backend_password.clone(),
            });
        }
        if database != self.database {
            return Err(TargetError::NoSuchDatabase(database.to_owned()));
        }
        let physical = self.physical_database(branch)?;
        Ok(BackendTarget {
            cluster: self.cluster.clone(),
            database: physical,
            user: self.backend_user.clone().unwrap_or_default(),
            password: self.backend_password.clone(),
        })
    }

    /// The physical database of `branch` (None or `main`: the tenant's own) of a tenant pgweir provisions for.
    pub fn physical_database(&self, branch: Option<&str>) -> Result<String, TargetError> {
        let no_branch = |b: &str| TargetError::NoSuchBranch {
            tenant: self.id.clone(),
            branch: b.to_owned(),
        };
        match branch {
            _ if self.passthrough => Err(no_branch(branch.unwrap_or("main"))),
            None | Some("main") => Ok(self.backend_database.clone().unwrap_or_default()),
            Some(b) => self.branches.get(b).cloned().ok_or_else(|| no_branch(b)),
        }
    }
}

/// A boxed future of a tenant lookup.
pub type Lookup<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<Arc<Tenant>>> + Send + 'a>>;

/// The data plane's view of tenants.
pub trait TenantDirectory: Send + Sync + 'static {
    /// The tenant as the directory knows it now; never waits on I/O.
    fn get(&self, id: &str) -> Option<Arc<Tenant>>;

    /// Like [`TenantDirectory::get`], but a directory backed by a database may load a tenant it does not have yet
    /// (bounded in time). Used once per login.
    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        let t = self.get(id);
        Box::pin(async move { t })
    }

    /// Takes the tenants of a reloaded config file; the number it now serves (None: not a config-file
    /// directory).
    fn reload_from(&self, _cfg: &Config) -> Option<usize> {
        None
    }
}

/// Directories asked in order (e.g. the config file's tenants, then the catalog's).
pub struct Layered(pub Vec<Arc<dyn TenantDirectory>>);

impl TenantDirectory for Layered {
    fn get(&self, id: &str) -> Option<Arc<Tenant>> {
        self.0.iter().find_map(|d| d.get(id))
    }

    fn reload_from(&self, cfg: &Config) -> Option<usize> {
        self.0
            .iter()
            .filter_map(|d| d.reload_from(cfg))
            .reduce(|a, b| a + b)
    }

    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        Box::pin(async move {
            if let Some(t) = self.get(id) {
                return Some(t);
            }
            for d in &self.0 {
                if let Some(t) = d.lookup(id).await {
                    return Some(t);
                }
            }
            None
        })
    }
}

/// Tenants from the config file.
#[derive(Debug, Default)]
pub struct StaticDirectory {
    /// Replaced as a whole on a reload (SIGHUP or the admin API).
    tenants: std::sync::RwLock<Arc<HashMap<String, Arc<Tenant>>>>,
}

impl StaticDirectory {
    /// Builds the directory from a validated config (invalid entries were already refused by validation and are
    /// skipped here).
    pub fn from_config(cfg: &Config) -> Self {
        StaticDirectory {
            tenants: std::sync::RwLock::new(Arc::new(Self::tenants_of(cfg))),
        }
    }

    fn tenants_of(cfg: &Config) -> HashMap<String, Arc<Tenant>> {
        let clusters: HashMap<&str, Arc<Cluster>> = cfg
            .clusters
            .iter()
            .map(|(name, c)| {
                (
                    name.as_str(),
                    Arc::new(Cluster {
                        name: name.clone(),
                        host: c.host.as_str().into(),
                        port: c.port,
                        tls: c.tls,
                        ca_file: c.ca_file.clone(),
                        max_active_transactions: c.max_active_transactions.unwrap_or(0),
                    }),
                )
            })
            .collect();
        let mut tenants = HashMap::new();
        for t in &cfg.tenants {
            let Some(cluster) = clusters.get(t.cluster.as_str()) else {
                continue;
            };
            let users = t
                .users
                .iter()
                .filter_map(|u| {
                    let scram = ScramVerifier::parse(&u.password).ok()?;
                    Some((
                        u.name.clone(),
                        User {
                            name: u.name.clone(),
                            scram,
                            md5: u.md5.clone(),
                            backend_password: u.backend_password.clone(),
                            pool_mode: u.pool_mode,
                        },
                    ))
                })
                .collect();
            let tenant = Tenant {
                id: t.id.clone(),
                database: t.database.clone(),
                cluster: cluster.clone(),
                backend_database: t.backend_database.clone(),
                backend_user: t.backend_user.clone(),
                backend_password: t.backend_password.clone(),
                passthrough: t.passthrough,
                require_tls: t.require_tls,
                auth: t.auth.clone(),
                pool: t.pool.apply(cfg.pool),
                pool_mode: t.pool_mode,
                users,
                branches: t
                    .branches
                    .iter()
                    .map(|b| (b.name.clone(), b.backend_database.clone()))
                    .collect(),
                plan: Arc::new(
                    t.plan
                        .as_deref()
                        .and_then(|p| cfg.plan(p))
                        .unwrap_or_default(),
                ),
                read_only: t.read_only,
            };
            tenants.insert(t.id.clone(), Arc::new(tenant));
        }
        tenants
    }
}

impl TenantDirectory for StaticDirectory {
    fn get(&self, id: &str) -> Option<Arc<Tenant>> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn reload_from(&self, cfg: &Config) -> Option<usize> {
        let new = Arc::new(Self::tenants_of(cfg));
        let n = new.len();
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = new;
        Some(n)
    }
}
