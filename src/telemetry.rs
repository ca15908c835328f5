//! Process metrics in Prometheus form, served by the admin listener (`/metrics`).
//!
//! Every proxy has its own recorder (not a process-global one: tests run several proxies in one process). Handles
//! are registered once and kept, so the data path pays an atomic add per event and never a registry lookup; hot
//! loops count locally and add once per transaction. Pool gauges are read from the pools when scraped, and the
//! request, transaction and byte totals are the sums of the tenants' usage counters (`pool::Usage`), counted once.

use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::policy::limits::TenantState;
use crate::pool::{PoolStats, UsageDelta};

/// Bucket bounds (seconds) of the latency histograms: 100 µs … 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The proxy's metrics: a recorder and the handles the data path uses.
pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Client connections accepted (before login).
    pub clients_accepted: Counter,
    /// Client connections refused at the `max_client_connections` cap.
    pub clients_refused: Counter,
    pub logins_ok: Counter,
    pub logins_failed: Counter,
    /// Transaction-mode transactions, from the checkout to the ReadyForQuery that ends them.
    pub transaction_seconds: Histogram,
    pub query_seconds: Histogram,
    /// How long databases stayed paused (pause/resume and branch operations).
    pub pause_seconds: Histogram,
    /// Checkouts that had to wait for a server connection (a free idle connection is taken at once and not
    /// recorded), from the request to the connection.
    pub checkout_wait_seconds: Histogram,
    /// Opening and logging in a server connection.
    pub backend_connect_seconds: Histogram,
    /// Statements sqlparser could not parse that were forwarded (policy `open`).
    pub policy_unparsed: Counter,
}

/// The HELP text of every metric.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "pgweir_client_connections_total",
        "Client connections accepted."
    );
    describe_counter!(
        "pgweir_client_connections_refused_total",
        "Client connections refused, by reason."
    );
    describe_counter!("pgweir_client_logins_total", "Client logins, by result.");
    describe_counter!(
        "pgweir_policy_refusals_total",
        "Statements and connections refused by a tenant's SQL policy or limits, by rule."
    );
    describe_counter!(
        "pgweir_policy_unparsed_total",
        "Statements sqlparser could not parse that were forwarded (policy \"open\")."
    );
    describe_counter!(
        "pgweir_tenant_policy_refusals_total",
        "Refusals by SQL policy or limits of one tenant, by rule (while tenants are within max_pool_series)."
    );
    describe_counter!(
        "pgweir_tenant_policy_unparsed_total",
        "Unparsable statements forwarded for one tenant (while tenants are within max_pool_series)."
    );
    describe_counter!(
        "pgweir_policy_cache_total",
        "Statement classification cache lookups, by result (hit, miss)."
    );
    describe_counter!(
        "pgweir_requests_total",
        "Requests answered by a server (Query, Sync, FunctionCall)."
    );
    describe_counter!(
        "pgweir_transactions_total",
        "Transaction-mode transactions (server checkouts)."
    );
    describe_counter!(
        "pgweir_client_bytes_received_total",
        Unit::Bytes,
        "Bytes received from clients while forwarding."
    );
    describe_counter!(
        "pgweir_client_bytes_sent_total",
        Unit::Bytes,
        "Bytes forwarded from servers to clients."
    );
    describe_counter!(
        "pgweir_errors_sent_total",
        "Errors pgweir itself sent clients, by SQLSTATE class."
    );
    describe_histogram!(
        "pgweir_transaction_seconds",
        Unit::Seconds,
        "Transaction-mode transactions, checkout to end."
    );
    describe_histogram!(
        "pgweir_query_seconds",
        Unit::Seconds,
        "Request latency: from a Query, Sync or FunctionCall reaching the server (or the previous answer of a pipeline) to its ReadyForQuery."
    );
    describe_histogram!(
        "pgweir_pause_seconds",
        Unit::Seconds,
        "How long a database stayed paused (pause/resume, branch operations)."
    );
    describe_gauge!("pgweir_paused_databases", "Databases paused now.");
    describe_histogram!(
        "pgweir_checkout_wait_seconds",
        Unit::Seconds,
        "Waits for a server connection (checkouts that waited)."
    );
    describe_histogram!(
        "pgweir_backend_connect_seconds",
        Unit::Seconds,
        "Opening and logging in a server connection."
    );
    describe_gauge!("pgweir_client_connections", "Client connections open now.");
    describe_gauge!(
        "pgweir_server_connections",
        "Server connections by state (idle, active, pinned)."
    );
    describe_gauge!(
        "pgweir_clients_waiting",
        "Clients waiting for a server connection."
    );
    describe_gauge!("pgweir_pools", "Backend pools.");
    describe_gauge!(
        "pgweir_pool_server_connections",
        "Server connections of a pool by state."
    );
    describe_gauge!(
        "pgweir_pool_client_connections",
        "Client sessions of a pool: active (not waiting) or waiting for a server connection."
    );
    describe_gauge!(
        "pgweir_pool_max_wait_seconds",
        Unit::Seconds,
        "Longest checkout wait of a pool so far."
    );
    describe_counter!(
        "pgweir_tenant_connections_total",
        "Client logins of a tenant."
    );
    describe_counter!(
        "pgweir_tenant_requests_total",
        "Requests of a tenant's clients."
    );
    describe_counter!(
        "pgweir_tenant_transactions_total",
        "Transaction-mode transactions of a tenant's clients."
    );
    describe_counter!(
        "pgweir_tenant_bytes_received_total",
        Unit::Bytes,
        "Bytes received from a tenant's clients."
    );
    describe_counter!(
        "pgweir_tenant_bytes_sent_total",
        Unit::Bytes,
        "Bytes sent to a tenant's clients."
    );
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("the bucket list is not empty")
            // Gauges are all set at each scrape from live state: one not set for a while belongs to a pool that
            // is gone, and leaves the output.
            .idle_timeout(
                metrics_util::MetricKindMask::GAUGE,
                Some(Duration::from_secs(1)),
            )
            .build_recorder();
        let handle = recorder.handle();
        let r = &recorder;
        metrics::with_local_recorder(r, describe);
        let (c, h) = (
            |name: &'static str| metrics::with_local_recorder(r, || counter!(name)),
            |name: &'static str| metrics::with_local_recorder(r, || histogram!(name)),
        );
        Telemetry {
            clients_accepted: c("pgweir_client_connections_total"),
            clients_refused: metrics::with_local_recorder(
                r,
                || counter!("pgweir_client_connections_refused_total", "reason" => "max_client_connections"),
            ),
            logins_ok: metrics::with_local_recorder(
                r,
                || counter!("pgweir_client_logins_total", "result" => "ok"),
            ),
            logins_failed: metrics::with_local_recorder(
                r,
                || counter!("pgweir_client_logins_total", "result" => "failed"),
            ),
            transaction_seconds: h("pgweir_transaction_seconds"),
            query_seconds: h("pgweir_query_seconds"),
            pause_seconds: h("pgweir_pause_seconds"),
            checkout_wait_seconds: h("pgweir_checkout_wait_seconds"),
            backend_connect_seconds: h("pgweir_backend_connect_seconds"),
            policy_unparsed: c("pgweir_policy_unparsed_total"),
            handle,
            recorder,
        }
    }

    /// Counts a statement or connection refused by SQL policy or a limit, by rule (a fixed set: bounded
    /// cardinality). Per-tenant counts come from the tenants' states at each scrape (see [`Telemetry::render`]).
    pub fn policy_refused(&self, rule: &'static str) {
        metrics::with_local_recorder(&self.recorder, || {
            counter!("pgweir_policy_refusals_total", "rule" => rule).increment(1)
        });
    }

    /// Folds the histograms' recorded samples into their buckets. Samples are kept one by one until then (about
    /// 16 bytes each): without this, a process nobody scrapes would grow with every query.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Counters of the classification cache: hits and misses.
    pub fn classifier_counters(&self) -> (Counter, Counter) {
        metrics::with_local_recorder(&self.recorder, || {
            (
                counter!("pgweir_policy_cache_total", "result" => "hit"),
                counter!("pgweir_policy_cache_total", "result" => "miss"),
            )
        })
    }

    /// Counts an error pgweir itself sent a client, by SQLSTATE class (the first two characters).
    pub fn error_sent(&self, sqlstate: &str) {
        let class = sqlstate.get(..2).unwrap_or("XX").to_owned();
        metrics::with_local_recorder(&self.recorder, || {
            counter!("pgweir_errors_sent_total", "class" => class).increment(1)
        });
    }

    /// The Prometheus text: the counters and histograms, plus gauges read now from the pools (one series per
    /// pool up to `max_pool_series` pools, totals always) and the number of connected clients.
    pub fn render(
        &self,
        pools: &[PoolStats],
        tenants: &[(String, UsageDelta)],
        policy: &[(String, std::sync::Arc<TenantState>)],
        clients: usize,
        paused: usize,
        max_series: usize,
    ) -> String {
        metrics::with_local_recorder(&self.recorder, || {
            // The process totals are the sums of the tenants' counters (counted once, on the data path).
            let mut all = UsageDelta::default();
            for (_, u) in tenants {
                all.add(u);
            }
            counter!("pgweir_requests_total").absolute(all.requests);
            counter!("pgweir_transactions_total").absolute(all.transactions);
            counter!("pgweir_client_bytes_received_total").absolute(all.bytes_in);
            counter!("pgweir_client_bytes_sent_total").absolute(all.bytes_out);
            // Per tenant, while there are few enough of them for Prometheus.
            if tenants.len() <= max_series {
                for (tenant, u) in tenants {
                    let t = || ("tenant", tenant.clone());
                    counter!("pgweir_tenant_connections_total", &[t()]).absolute(u.connections);
                    counter!("pgweir_tenant_requests_total", &[t()]).absolute(u.requests);
                    counter!("pgweir_tenant_transactions_total", &[t()]).absolute(u.transactions);
                    counter!("pgweir_tenant_bytes_received_total", &[t()]).absolute(u.bytes_in);
                    counter!("pgweir_tenant_bytes_sent_total", &[t()]).absolute(u.bytes_out);
                }
            }
            if policy.len() <= max_series {
                for (tenant, state) in policy {
                    let (by_rule, unparsed) = state.refusal_counts();
                    for (rule, n) in by_rule {
                        counter!("pgweir_tenant_policy_refusals_total", "tenant" => tenant.clone(), "rule" => rule)
                            .absolute(n);
                    }
                    if unparsed > 0 {
                        counter!("pgweir_tenant_policy_unparsed_total", "tenant" => tenant.clone())
                            .absolute(unparsed);
                    }
                }
            }
            gauge!("pgweir_client_connections").set(clients as f64);
            let per_pool = pools.len() <= max_series;
            let mut totals = [0usize; 5];
            for p in pools {
                let values = [
                    ("idle", p.server_idle),
                    ("active", p.server_active),
                    ("pinned", p.server_pinned),
                ];
                totals[0] += p.server_idle;
                totals[1] += p.server_active;
                totals[2] += p.server_pinned;
                totals[3] += p.clients_waiting;
                totals[4] = totals[4].max(p.max_wait_us as usize);
                if !per_pool {
                    continue;
                }
                let labels = [("tenant", p.tenant.clone()), ("pool", p.key.clone())];
                for (state, v) in values {
                    let mut l = labels.to_vec();
                    l.push(("state", state.to_owned()));
                    gauge!("pgweir_pool_server_connections", &l).set(v as f64);
                }
                for (state, v) in [("active", p.clients_active), ("waiting", p.clients_waiting)] {
                    let mut l = labels.to_vec();
                    l.push(("state", state.to_owned()));
                    gauge!("pgweir_pool_client_connections", &l).set(v as f64);
                }
                gauge!("pgweir_pool_max_wait_seconds", &labels)
                    .set(Duration::from_micros(p.max_wait_us).as_secs_f64());
            }
            for (i, state) in ["idle", "active", "pinned"].iter().enumerate() {
                gauge!("pgweir_server_connections", "state" => *state).set(totals[i] as f64);
            }
            gauge!("pgweir_clients_waiting").set(totals[3] as f64);
            gauge!("pgweir_pools").set(pools.len() as f64);
            gauge!("pgweir_paused_databases").set(paused as f64);
        });
        self.handle.run_upkeep();
        self.handle.render()
    }
}
