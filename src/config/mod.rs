//! Configuration: a TOML file turned into a validated [`Config`]. Every problem is reported at once
//! (`pgweir check-config`). Durations are written as `"5s"`, `"10m"`, `"1h"`.
//!
//! Architecture invariant: the config *describes* tenants; it does not serve them. Routing reads tenants through
//! [`crate::tenant::TenantDirectory`], of which the config file is one source.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::scram::ScramVerifier;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The client-facing listener and its limits.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// TLS towards clients. Without it, clients that ask for TLS are told 'N' (no TLS).
    pub tls: Option<TlsConfig>,
    /// Defaults for every backend pool; a tenant may override them.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Backend Postgres clusters by name.
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
    /// Tenants served from this file.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// The operators' HTTP listener (`/healthz`, `/readyz`, `/metrics`, and with a catalog the `/v1` API).
    /// Without this section there is none.
    pub admin: Option<AdminConfig>,
    /// The control database: tenants created through the admin API live there.
    pub catalog: Option<CatalogConfig>,
    /// Plans (limits and SQL policy) by name; they override the built-in `free`, `pro`, `team` and
    /// `enterprise`.
    #[serde(default)]
    pub plans: BTreeMap<String, crate::policy::Plan>,
}

impl Config {
    /// The plan of that name: the config file's, else the built-in one.
    pub fn plan(&self, name: &str) -> Option<crate::policy::Plan> {
        self.plans
            .get(name)
            .cloned()
            .or_else(|| crate::policy::Plan::builtin(name))
    }
}

/// The control database (catalog).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// A PostgreSQL connection string (URI or key=value) of the control database.
    pub url: String,
    /// A file with the catalog key (base64 of 32 bytes) that seals the passwords pgweir generates. The environment
    /// variable `PGWEIR_CATALOG_KEY` takes precedence.
    pub key_file: Option<PathBuf>,
    /// A login for a tenant that is not loaded yet waits at most this long for the catalog.
    #[serde(default = "default_fetch_timeout", with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// The host name clients use to reach pgweir, for the connection strings the API returns (default: the
    /// listen address's IP).
    pub public_host: Option<String>,
    /// How often this instance writes its tenants' usage counters to the catalog.
    #[serde(default = "default_usage_flush", with = "humantime_serde")]
    pub usage_flush_interval: Duration,
}

fn default_usage_flush() -> Duration {
    Duration::from_secs(60)
}

fn default_fetch_timeout() -> Duration {
    Duration::from_secs(2)
}

/// The admin HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener (loopback by default: it is for operators, not clients).
    pub listen: SocketAddr,
    /// `/metrics` reports each pool as its own series (labels tenant, cluster, database, role) up to this many
    /// pools; above it only totals, so that a large fleet does not explode Prometheus cardinality.
    pub max_pool_series: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9930)),
            max_pool_series: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address clients connect to.
    pub listen: SocketAddr,
    /// Upper bound on simultaneously open client connections; past it new ones get 53300.
    pub max_client_connections: usize,
    /// A client must finish startup and authentication within this time.
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
    /// Linux: a new client connection is handed to pgweir when its first bytes arrive (TCP_DEFER_ACCEPT), saving
    /// a wakeup per connection; one that sends nothing is handed over after this wait (rounded up to whole
    /// seconds; "0s": off).
    #[serde(with = "humantime_serde")]
    pub tcp_defer_accept: Duration,
    /// Largest single protocol message accepted from a client or a server (bytes).
    pub max_message_bytes: usize,
    /// SNI routing: clients connecting to `<endpoint>.<base_domain>` are routed to that endpoint.
    pub base_domain: Option<String>,
    /// Tenant for connections that name none (single-tenant deployments).
    pub default_tenant: Option<String>,
    /// Startup parameters that clients may not set (on top of the built-in deny-list).
    pub deny_startup_parameters: Vec<String>,
    /// A client idle inside a transaction (status 'T' or 'E') this long is disconnected with 25P03 and its
    /// transaction rolled back; "0s" turns it off.
    #[serde(with = "humantime_serde")]
    pub idle_in_transaction_timeout: Duration,
    /// A client idle outside a transaction this long is disconnected with 57P05; "0s" turns it off.
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// A request (query, or extended-protocol batch up to Sync) that has not been answered this long is cancelled on
    /// the server; the client gets 57014 naming the timeout and keeps its session. "0s" turns it off. Unlike the
    /// client's own `statement_timeout`, the client cannot change it.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// Transaction mode: what a statement that creates session state pgweir cannot move (LISTEN, session advisory
    /// locks, temp tables, WITH HOLD cursors, SQL PREPARE, SET ROLE, LOAD) does: "pin" (default) keeps the client
    /// on its server connection for the rest of its session; "refuse" fails the statement with 0A000.
    pub unmovable_session_state: UnmovableState,
    /// Statement checks of the SQL policy and the per-statement limits (classification, isolation rules,
    /// read-only mode, query rate, monthly quota, plan statement timeout, top statements). Connection and
    /// transaction caps and fair sharing stay on. Off only for measuring what the checks cost.
    pub sql_policy: bool,
    /// How often the size of tenants with a storage quota is sampled (over it, a tenant is read-only).
    #[serde(with = "humantime_serde")]
    pub storage_check_interval: Duration,
    /// On SIGTERM: how long transactions in flight (and session-mode sessions) may go on after pgweir stops
    /// accepting; idle clients are told 57P01 at once, the rest when their transaction ends or this runs out.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Zero-downtime restart: a running pgweir answers on this Unix socket with its listening sockets; a new one
    /// started with the same config takes them over, and the old one drains (see `docs/OPERATIONS.md`).
    pub handover_socket: Option<PathBuf>,
    /// Threads that run the sessions. 1 (the default): one event loop, as PgBouncer runs; the least CPU per
    /// transaction, which is what a pooler that shares its cores with Postgres should spend. N > 1: a
    /// multi-threaded runtime with N workers, for a host where pgweir has cores of its own. 0: one worker per CPU.
    pub worker_threads: usize,
}

/// See [`ProxyConfig::unmovable_session_state`].
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UnmovableState {
    #[default]
    Pin,
    Refuse,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            max_client_connections: 10_000,
            login_timeout: Duration::from_secs(15),
            tcp_defer_accept: Duration::from_secs(1),
            max_message_bytes: 256 << 20,
            base_domain: None,
            default_tenant: None,
            deny_startup_parameters: Vec::new(),
            idle_in_transaction_timeout: Duration::ZERO,
            client_idle_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            unmovable_session_state: UnmovableState::Pin,
            sql_policy: true,
            storage_check_interval: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            handover_socket: None,
            worker_threads: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Server connections kept open even when idle.
    pub min_size: usize,
    /// At most this many server connections per pool (cluster, database, role).
    pub max_size: usize,
    /// Time allowed to connect and log in to a backend.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// An idle server connection is closed after this long (down to `min_size`).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A server connection is closed once it is this old (when it next becomes idle).
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// A client waits at most this long for a server connection; then it gets 53300.
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// While a tenant (or branch) is paused, a client waits at most this long for it to resume; then it gets 57P03.
    #[serde(with = "humantime_serde")]
    pub pause_wait_timeout: Duration,
    /// Transaction mode: named prepared statements kept per server connection (least recently used are closed;
    /// a transaction that uses more at once keeps them all, and the surplus is closed at that connection's next
    /// prepare). 0 turns the support off: a client that prepares a named statement is pinned to its server
    /// connection.
    pub max_prepared_statements: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_size: 0,
            max_size: 20,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            checkout_timeout: Duration::from_secs(10),
            pause_wait_timeout: Duration::from_secs(60),
            max_prepared_statements: 200,
        }
    }
}

/// Partial pool settings of a tenant; unset fields come from `[pool]`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolOverride {
    pub min_size: Option<usize>,
    pub max_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub checkout_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub pause_wait_timeout: Option<Duration>,
    pub max_prepared_statements: Option<usize>,
}

impl PoolOverride {
    pub fn apply(&self, base: PoolConfig) -> PoolConfig {
        PoolConfig {
            min_size: self.min_size.unwrap_or(base.min_size),
            max_size: self.max_size.unwrap_or(base.max_size),
            connect_timeout: self.connect_timeout.unwrap_or(base.connect_timeout),
            idle_timeout: self.idle_timeout.unwrap_or(base.idle_timeout),
            max_lifetime: self.max_lifetime.unwrap_or(base.max_lifetime),
            checkout_timeout: self.checkout_timeout.unwrap_or(base.checkout_timeout),
            pause_wait_timeout: self.pause_wait_timeout.unwrap_or(base.pause_wait_timeout),
            max_prepared_statements: self
                .max_prepared_statements
                .unwrap_or(base.max_prepared_statements),
        }
    }
}

/// How pgweir talks TLS to a backend cluster.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTls {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS, certificate not verified.
    Require,
    /// TLS, certificate verified against `ca_file` and the host name.
    VerifyFull,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    #[serde(default)]
    pub tls: BackendTls,
    /// CA bundle (PEM) for `tls = "verify-full"`.
    pub ca_file: Option<PathBuf>,
    /// Transactions all tenants on this cluster may run at once (unset: no limit). When saturated, waiting
    /// checkouts are served by weighted fair queueing: each tenant in proportion to its plan's `weight`.
    pub max_active_transactions: Option<usize>,
}

fn default_pg_port() -> u16 {
    5432
}

/// How long a client keeps its server connection.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// For the whole client session; the connection is reset (`DISCARD ALL`) when the client leaves.
    Session,
    /// For one transaction (the default); session settings and named prepared statements follow the client from
    /// server to server. Session state that cannot move (LISTEN, session advisory locks, temp tables, WITH HOLD
    /// cursors, SQL PREPARE) pins the client to its server connection for the rest of the session.
    #[default]
    Transaction,
}

impl std::str::FromStr for PoolMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "session" => Ok(PoolMode::Session),
            "transaction" => Ok(PoolMode::Transaction),
            _ => Err(format!(
                "invalid pool mode \"{s}\": expected session or transaction"
            )),
        }
    }
}

/// Client authentication methods a tenant accepts.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    /// Cleartext password, checked against the SCRAM verifier; only ever offered over TLS.
    Password,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// DNS label: `[a-z0-9-]`, no `--` (that separates a branch).
    pub id: String,
    /// The database name clients ask for. Ignored for passthrough tenants.
    #[serde(default = "default_database")]
    pub database: String,
    /// Name of the backend cluster (a key of `[clusters]`).
    pub cluster: String,
    /// Physical database on the cluster (main branch). Not used by passthrough tenants.
    pub backend_database: Option<String>,
    /// Backend role pgweir logs in as. Not used by passthrough tenants.
    pub backend_user: Option<String>,
    /// That role's password (omit for `trust`).
    pub backend_password: Option<String>,
    /// Passthrough: any database name maps to the same-named database on the cluster and each user logs in to the
    /// backend as the same-named role, with the user's `backend_password`.
    #[serde(default)]
    pub passthrough: bool,
    /// Refuse clients that do not use TLS.
    #[serde(default)]
    pub require_tls: bool,
    /// Accepted client auth methods, in order of preference. Default: SCRAM only.
    #[serde(default = "default_auth")]
    pub auth: Vec<AuthMethod>,
    /// Pool settings for this tenant.
    #[serde(default)]
    pub pool: PoolOverride,
    /// Pool mode of the tenant's clients (a user or the client itself may override it: `options=pool_mode=session`).
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// The tenant's plan (limits and SQL policy): a key of `[plans]` or a built-in plan. Without one, the default
    /// SQL policy applies and there are no limits.
    pub plan: Option<String>,
    /// Read-only mode: writes and DDL are refused with 25006, reads keep working.
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub branches: Vec<BranchConfig>,
}

fn default_database() -> String {
    "postgres".to_owned()
}

fn default_auth() -> Vec<AuthMethod> {
    vec![AuthMethod::ScramSha256]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// `SCRAM-SHA-256$…` verifier (`pgweir hash-password`).
    pub password: String,
    /// `md5…` hash of password‖name, for tenants that allow md5.
    pub md5: Option<String>,
    /// Passthrough tenants: password of the same-named backend role.
    pub backend_password: Option<String>,
    /// Pool mode for this user (default: the tenant's).
    pub pool_mode: Option<PoolMode>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchConfig {
    /// DNS label, no `--`.
    pub name: String,
    /// Physical database of the branch on the tenant's cluster.
    pub backend_database: String,
}

/// Everything wrong with a config, one line each.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

/// Built-in deny-list: startup parameters a client may never set.
pub const DENIED_STARTUP_PARAMETERS: &[&str] = &[
    "replication",
    "role",
    "session_authorization",
    "is_superuser",
    "standard_conforming_strings",
];

/// `[a-z0-9-]`, 1..=63 chars, not starting or ending with `-`, no `--`.
pub fn is_valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        let errors = cfg.problems();
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Every semantic problem of an already parsed config.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.proxy.worker_threads > 1024 {
            p.push("proxy.worker_threads must be at most 1024 (0: one per CPU)".into());
        }
        if self.proxy.max_client_connections == 0 {
            p.push("proxy.max_client_connections must be at least 1".into());
        }
        if self.proxy.max_message_bytes < 1024 {
            p.push("proxy.max_message_bytes must be at least 1024".into());
        }
        if self.proxy.storage_check_interval.is_zero() {
            p.push("proxy.storage_check_interval must be positive".into());
        }
        if self.proxy.login_timeout.is_zero() {
            p.push("proxy.login_timeout must be positive".into());
        }
        if let Some(d) = &self.proxy.base_domain {
            if d.is_empty() || d.starts_with('.') || d.ends_with('.') {
                p.push(format!(
                    "proxy.base_domain {d:?} must be a domain name like \"db.example.com\""
                ));
            }
        }
        if let Some(tls) = &self.tls {
            for (what, path) in [("cert", &tls.cert), ("key", &tls.key)] {
                if !path.is_file() {
                    p.push(format!(
                        "tls.{what}: file {} does not exist",
                        path.display()
                    ));
                }
            }
        }
        pool_problems("pool", &self.pool, &mut p);
        for (name, plan) in &self.plans {
            for problem in plan.problems() {
                p.push(format!("plans.{name}.{problem}"));
            }
        }
        for t in &self.tenants {
            if let Some(plan) = &t.plan {
                if self.plan(plan).is_none() {
                    p.push(format!("tenant {}: plan \"{plan}\" is not defined", t.id));
                }
            }
        }
        for (name, c) in &self.clusters {
            if c.host.is_empty() {
                p.push(format!("clusters.{name}.host is empty"));
            }
            if c.port == 0 {
                p.push(format!("clusters.{name}.port must not be 0"));
            }
            match (c.tls, &c.ca_file) {
                (BackendTls::VerifyFull, None) => p.push(format!(
                    "clusters.{name}: tls = \"verify-full\" needs ca_file"
                )),
                (_, Some(f)) if !f.is_file() => p.push(format!(
                    "clusters.{name}.ca_file: file {} does not exist",
                    f.display()
                )),
                _ => {}
            }
        }
        let mut ids = HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let at = format!("tenants[{i}] ({})", t.id);
            if !is_valid_label(&t.id) {
                p.push(format!(
                    "{at}: id must be a DNS label of [a-z0-9-] without \"--\""
                ));
            }
            if !ids.insert(t.id.as_str()) {
                p.push(format!("{at}: duplicate tenant id"));
            }
            if !self.clusters.contains_key(&t.cluster) {
                p.push(format!("{at}: unknown cluster {:?}", t.cluster));
            }
            if t.passthrough {
                for u in &t.users {
                    if u.backend_password.is_none() {
                        p.push(format!(
                            "{at}: passthrough user {:?} needs backend_password",
                            u.name
                        ));
                    }
                }
                if !t.branches.is_empty() {
                    p.push(format!("{at}: passthrough tenants have no branches"));
                }
            } else {
                if t.backend_database.is_none() {
                    p.push(format!("{at}: backend_database is required"));
                }
                if t.backend_user.is_none() {
                    p.push(format!("{at}: backend_user is required"));
                }
            }
            if t.auth.is_empty() {
                p.push(format!("{at}: auth must list at least one method"));
            }
            pool_problems(&format!("{at}.pool"), &t.pool.apply(self.pool), &mut p);
            let mut users = HashSet::new();
            for u in &t.users {
                if u.name.is_empty() || u.name.contains('\0') {
                    p.push(format!("{at}: user name {:?} is invalid", u.name));
                }
                if !users.insert(u.name.as_str()) {
                    p.push(format!("{at}: duplicate user {:?}", u.name));
                }
                if let Err(e) = ScramVerifier::parse(&u.password) {
                    p.push(format!(
                        "{at}: user {:?}: password must be a SCRAM-SHA-256 verifier (pgweir hash-password): {e}",
                        u.name
                    ));
                }
                match &u.md5 {
                    Some(m) if m.len() != 35 || !m.starts_with("md5") => p.push(format!(
                        "{at}: user {:?}: md5 must be \"md5\" followed by 32 hex digits",
                        u.name
                    )),
                    None if t.auth.contains(&AuthMethod::Md5) && t.auth.len() == 1 => {
                        p.push(format!(
                        "{at}: user {:?} has no md5 hash but md5 is the tenant's only auth method",
                        u.name
                    ))
                    }
                    _ => {}
                }
            }
            let mut branches = HashSet::new();
            for b in &t.branches {
                if !is_valid_label(&b.name) || b.name == "main" {
                    p.push(format!(
                        "{at}: branch {:?} must be a DNS label without \"--\" (and not \"main\")",
                        b.name
                    ));
                }
                if !branches.insert(b.name.as_str()) {
                    p.push(format!("{at}: duplicate branch {:?}", b.name));
                }
            }
        }
        // With a catalog the default tenant may live there.
        if let (Some(d), None) = (&self.proxy.default_tenant, &self.catalog) {
            if !self.tenants.iter().any(|t| &t.id == d) {
                p.push(format!(
                    "proxy.default_tenant {d:?} is not a tenant of this file"
                ));
            }
        }
        p
    }
}

fn pool_problems(at: &str, pool: &PoolConfig, p: &mut Vec<String>) {
    if pool.max_size == 0 {
        p.push(format!("{at}.max_size must be at least 1"));
    }
    if pool.min_size > pool.max_size {
        p.push(format!("{at}.min_size must not exceed max_size"));
    }
    for (name, d) in [
        ("connect_timeout", pool.connect_timeout),
        ("checkout_timeout", pool.checkout_timeout),
        ("pause_wait_timeout", pool.pause_wait_timeout),
        ("idle_timeout", pool.idle_timeout),
        ("max_lifetime", pool.max_lifetime),
    ] {
        if d.is_zero() {
            p.push(format!("{at}.{name} must be positive"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["acme", "a1", "my-app", "x"] {
            assert!(is_valid_label(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a--b",
            "Acme",
            "a.b",
            "a_b",
            &"a".repeat(64),
        ] {
            assert!(!is_valid_label(bad), "{bad}");
        }
    }

    #[test]
    fn reports_every_problem() {
        let text = r#"
            [proxy]
            max_client_connections = 0
            default_tenant = "nope"
            [pool]
            max_size = 0
            [[tenants]]
            id = "Bad--id"
            cluster = "missing"
            [[tenants.users]]
            name = "alice"
            password = "plain"
        "#;
        let errs = Config::parse(text).unwrap_err().0;
        let joined = errs.join("\n");
        for needle in [
            "max_client_connections",
            "default_tenant",
            "pool.max_size",
            "DNS label",
            "unknown cluster",
            "backend_database is required",
            "SCRAM-SHA-256 verifier",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in:\n{joined}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = Config::parse("[proxy]\nlisten_port = 1\n").unwrap_err();
        assert!(e.to_string().contains("listen_port"), "{e}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pgweir.example.toml");
        let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.tenants.len(), 2);
    }
}
