//! Plans are data: the limits and the SQL policy of a tier of the product. Built-in defaults for `free`, `pro`,
//! `team` and `enterprise`; the config file's `[plans.<name>]` and the catalog's `pgweir.plans` override them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// SQL the proxy cannot parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unparsable {
    /// Forward it (counted in a metric and the log): Postgres privileges are the first wall.
    #[default]
    Open,
    /// Refuse it with 42601.
    Closed,
}

/// A setting changed in a way pgweir cannot read (`set_config` with a computed name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Computed {
    #[default]
    Allow,
    Refuse,
}

/// What happens to a tenant over its monthly query quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OverQuota {
    /// Refuse queries with 53400.
    #[default]
    Refuse,
    /// Limit the tenant to `throttle_queries_per_second`.
    Throttle,
}

/// A plan's SQL policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub unparsable: Unparsable,
    /// Writes and DDL are refused with 25006.
    pub read_only: bool,
    /// Statement classes refused outright: "read", "write", "ddl", "transaction", "session", "utility",
    /// "unparsed".
    pub deny_classes: Vec<String>,
    /// Isolation rules switched off, by name (see docs/POLICY.md).
    pub disable_rules: Vec<String>,
    /// Extensions `CREATE EXTENSION` may create ("*": any).
    pub allow_extensions: Vec<String>,
    /// Sensitive functions allowed anyway, by name.
    pub allow_functions: Vec<String>,
    /// Settings a client may change (unset: the built-in list; "*": any). Custom `a.b` variables are always allowed.
    pub allow_settings: Option<Vec<String>>,
    /// Upper bound of work_mem, maintenance_work_mem and temp_buffers, in kB.
    pub max_work_mem_kb: Option<u64>,
    /// Upper bound of statement_timeout and idle_in_transaction_session_timeout in ms (0, "no timeout", is
    /// refused when set).
    pub max_timeout_ms: Option<u64>,
    pub computed_settings: Computed,
    /// The fast-path FunctionCall message is allowed.
    pub function_call: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            unparsable: Unparsable::Open,
            read_only: false,
            deny_classes: Vec::new(),
            disable_rules: Vec::new(),
            allow_extensions: DEFAULT_EXTENSIONS.iter().map(|s| s.to_string()).collect(),
            allow_functions: Vec::new(),
            allow_settings: None,
            max_work_mem_kb: None,
            max_timeout_ms: None,
            computed_settings: Computed::Allow,
            function_call: false,
        }
    }
}

impl PolicyConfig {
    pub(super) fn deny_class_bits(&self) -> u16 {
        self.deny_classes
            .iter()
            .filter_map(|c| super::class::by_name(c))
            .fold(0, |a, b| a | b)
    }

    /// Problems with the policy's names, for config and API validation.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.deny_classes {
            if super::class::by_name(c).is_none() {
                out.push(format!("deny_classes: unknown class \"{c}\""));
            }
        }
        for r in &self.disable_rules {
            if !RULES.contains(&r.as_str()) {
                out.push(format!("disable_rules: unknown rule \"{r}\""));
            }
        }
        out
    }
}

/// The rules that can be switched off by name.
pub const RULES: &[&str] = &[
    "alter-system",
    "set-role",
    "copy-program",
    "copy-file",
    "load",
    "alter-role",
    "alter-database",
    "grant-public",
    "grant-database",
    "extension",
    "function",
    "other-database",
    "setting",
    "standard-conforming-strings",
    "function-call",
];

/// Trusted, commonly used extensions.
pub const DEFAULT_EXTENSIONS: &[&str] = &[
    "plpgsql",
    "pgcrypto",
    "uuid-ossp",
    "citext",
    "hstore",
    "pg_trgm",
    "btree_gin",
    "btree_gist",
    "ltree",
    "cube",
    "earthdistance",
    "fuzzystrmatch",
    "intarray",
    "unaccent",
    "tablefunc",
    "tcn",
    "seg",
    "isn",
    "lo",
    "vector",
    "postgis",
];

/// Settings a client may change by default (lower case). Custom `a.b` variables and `enable_*` planner switches
/// are allowed too.
pub const DEFAULT_SETTINGS: &[&str] = &[
    "application_name",
    "search_path",
    "timezone",
    "datestyle",
    "intervalstyle",
    "client_encoding",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "work_mem",
    "maintenance_work_mem",
    "temp_buffers",
    "extra_float_digits",
    "bytea_output",
    "client_min_messages",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "default_transaction_deferrable",
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
    "synchronous_commit",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "default_text_search_config",
    "xmloption",
    "xmlbinary",
    "row_security",
    "check_function_bodies",
    "constraint_exclusion",
    "default_statistics_target",
    "escape_string_warning",
    "standard_conforming_strings",
    "array_nulls",
    "quote_all_identifiers",
    "max_parallel_workers_per_gather",
    "parallel_leader_participation",
    "plan_cache_mode",
    "jit",
    "random_page_cost",
    "seq_page_cost",
    "cpu_tuple_cost",
    "cpu_index_tuple_cost",
    "cpu_operator_cost",
    "effective_cache_size",
    "effective_io_concurrency",
    "join_collapse_limit",
    "from_collapse_limit",
    "geqo",
    "cursor_tuple_fraction",
    "gin_fuzzy_search_limit",
    "default_toast_compression",
    "timezone_abbreviations",
    "vacuum_cost_delay",
    "vacuum_cost_limit",
    "deadlock_timeout",
    "commit_delay",
    "log_statement_stats",
];

/// A tier of the product: limits and SQL policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Plan {
    /// Client connections per tenant (53300 beyond).
    pub max_connections: Option<u32>,
    /// Transactions (server connections in use) per database of the tenant at once: its pools are no larger.
    /// More wait for one to end (`checkout_timeout`, then 53300).
    pub max_transactions: Option<u32>,
    /// Token bucket: sustained queries per second, and the burst above it.
    pub queries_per_second: Option<u32>,
    pub burst: Option<u32>,
    /// How long a query over the rate waits for a token before it fails with 53400.
    #[serde(with = "humantime_serde")]
    pub rate_wait: Duration,
    /// Queries running longer are cancelled (57014).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Option<Duration>,
    /// Share of a saturated cluster's active transactions (`max_active_transactions`), relative to other plans.
    pub weight: u32,
    /// Above this size of its databases (sampled every `proxy.storage_check_interval`) the tenant is read-only.
    pub storage_bytes: Option<u64>,
    /// Queries per calendar month (UTC); with a catalog counted across instances and restarts.
    pub monthly_queries: Option<u64>,
    /// What happens over the monthly quota.
    pub over_quota: OverQuota,
    /// The query rate over the monthly quota with `over_quota = "throttle"`.
    pub throttle_queries_per_second: u32,
    pub policy: PolicyConfig,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            max_connections: None,
            max_transactions: None,
            queries_per_second: None,
            burst: None,
            rate_wait: Duration::from_secs(1),
            statement_timeout: None,
            weight: 1,
            storage_bytes: None,
            monthly_queries: None,
            over_quota: OverQuota::Refuse,
            throttle_queries_per_second: 1,
            policy: PolicyConfig::default(),
        }
    }
}

impl Plan {
    /// The built-in plan of that name.
    pub fn builtin(name: &str) -> Option<Plan> {
        let base = Plan::default();
        Some(match name {
            "free" => Plan {
                max_transactions: Some(5),
                max_connections: Some(20),
                queries_per_second: Some(100),
                burst: Some(200),
                statement_timeout: Some(Duration::from_secs(60)),
                storage_bytes: Some(100 * MB),
                monthly_queries: Some(10_000_000),
                policy: PolicyConfig {
                    max_work_mem_kb: Some(64 * 1024),
                    max_timeout_ms: Some(60_000),
                    ..PolicyConfig::default()
                },
                ..base
            },
            "pro" => Plan {
                max_transactions: Some(20),
                weight: 2,
                max_connections: Some(200),
                queries_per_second: Some(2000),
                burst: Some(4000),
                storage_bytes: Some(10 * GB),
                policy: PolicyConfig {
                    max_work_mem_kb: Some(256 * 1024),
                    ..PolicyConfig::default()
                },
                ..base
            },
            "team" => Plan {
                max_transactions: Some(50),
                weight: 4,
                max_connections: Some(1000),
                storage_bytes: Some(100 * GB),
                ..base
            },
            "enterprise" => Plan { weight: 8, ..base },
            _ => return None,
        })
    }

    /// The pool settings of a tenant database under this plan: at most `max_transactions` server connections.
    pub fn pool_config(&self, mut cfg: crate::config::PoolConfig) -> crate::config::PoolConfig {
        if let Some(m) = self.max_transactions {
            cfg.max_size = cfg.max_size.min(m.max(1) as usize);
            cfg.min_size = cfg.min_size.min(cfg.max_size);
        }
        cfg
    }

    /// Names of the built-in plans.
    pub const BUILTIN: [&'static str; 4] = ["free", "pro", "team", "enterprise"];

    /// Problems with the plan's values, for config and API validation.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.policy.problems();
        if self.weight == 0 {
            out.push("weight: must be at least 1".into());
        }
        if self.max_transactions == Some(0) {
            out.push("max_transactions: must be at least 1".into());
        }
        if self.queries_per_second == Some(0) {
            out.push("queries_per_second: must be at least 1".into());
        }
        out
    }
}

const MB: u64 = 1024 * 1024;
const GB: u64 = 1024 * MB;

/// A memory setting's value in kB, as PostgreSQL reads it (a bare number is kB).
pub fn parse_memory_kb(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let n: u64 = v[..split].parse().ok()?;
    let unit = v[split..].trim();
    let mult = match unit {
        "" | "kB" => 1,
        "B" => return Some(n / 1024),
        "MB" => 1024,
        "GB" => 1024 * 1024,
        "TB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A time setting's value in ms, as PostgreSQL reads it (a bare number is ms).
pub fn parse_duration_ms(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let n: u64 = v[..split].parse().ok()?;
    let unit = v[split..].trim();
    let mult = match unit {
        "" | "ms" => 1,
        "us" => return Some(n.div_ceil(1000)),
        "s" => 1000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(mult)
}
