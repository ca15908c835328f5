//! Process metrics in Prometheus form, served by the admin listener (`/metrics`).
//!
//! Every proxy has its own recorder (not a process-global one: tests run several proxies in one process). Handles
//! are registered once and kept, so the data path pays an atomic add per event and never a registry lookup; hot
//! loops count locally and add once per transaction. Pool gauges are read from the pools when scraped, and the
//! request, transaction and byte totals are the sums of the tenants' usage counters (`pool::Usage`), counted once.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, Counter};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::policy::limits::TenantState;
use crate::pool::{PoolStats, UsageDelta};

/// Bucket bounds (microseconds) of the latency histograms: 100 µs … 30 s.
const LATENCY_BUCKETS_US: [u64; 17] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// A latency histogram with fixed buckets ([`LATENCY_BUCKETS_US`]), rendered by [`Telemetry::render`]. Recording
/// is two relaxed atomic adds: the exporter's own histograms keep each sample (with a clock read and an epoch pin)
/// until a scrape folds them, which the data path would pay twice per transaction.
#[derive(Debug)]
pub struct Latency {
    name: &'static str,
    help: &'static str,
    /// Per bucket, not cumulative; the last one is +Inf.
    counts: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Latency {
    pub fn new(name: &'static str, help: &'static str) -> Latency {
        Latency {
            name,
            help,
            counts: Default::default(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records a duration in microseconds.
    #[inline]
    pub fn record_us(&self, us: u64) {
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Records a duration.
    pub fn record(&self, d: Duration) {
        self.record_us(d.as_micros().try_into().unwrap_or(u64::MAX));
    }

    /// The Prometheus text of the histogram (cumulative buckets, sum in seconds, count).
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let name = self.name;
        let _ = writeln!(out, "# HELP {name} {}", self.help);
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut total = 0;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Relaxed);
            match LATENCY_BUCKETS_US.get(i) {
                Some(b) => {
                    let le = *b as f64 / 1e6;
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {total}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
                }
            }
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {total}");
        out.push('\n');
    }
}

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
    pub transaction_seconds: Latency,
    pub query_seconds: Latency,
    /// How long databases stayed paused (pause/resume and branch operations).
    pub pause_seconds: Latency,
    /// Checkouts that had to wait for a server connection (a free idle connection is taken at once and not
    /// recorded), from the request to the connection.
    pub checkout_wait_seconds: Arc<Latency>,
    /// Opening and logging in a server connection.
    pub backend_connect_seconds: Arc<Latency>,
    /// Statements sqlparser could not parse that were forwarded (policy `open`).
    pub policy_unparsed: Counter,
}

/// The HELP text of every metric.
fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
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
    describe_gauge!("pgweir_paused_databases", "Databases paused now.");
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
        let c = |name: &'static str| metrics::with_local_recorder(r, || counter!(name));
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
            transaction_seconds: Latency::new(
                "pgweir_transaction_seconds",
                "Transaction-mode transactions, checkout to end.",
            ),
            query_seconds: Latency::new(
                "pgweir_query_seconds",
                "Request latency: from a Query, Sync or FunctionCall reaching the server (or the previous answer of a pipeline) to its ReadyForQuery.",
            ),
            pause_seconds: Latency::new(
                "pgweir_pause_seconds",
                "How long a database stayed paused (pause/resume, branch operations).",
            ),
            checkout_wait_seconds: Arc::new(Latency::new(
                "pgweir_checkout_wait_seconds",
                "Waits for a server connection (checkouts that waited).",
            )),
            backend_connect_seconds: Arc::new(Latency::new(
                "pgweir_backend_connect_seconds",
                "Opening and logging in a server connection.",
            )),
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
        let mut out = self.handle.render();
        for h in [
            &self.transaction_seconds,
            &self.query_seconds,
            &self.pause_seconds,
            &self.checkout_wait_seconds,
            &self.backend_connect_seconds,
        ] {
            h.render(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Latency;

    #[test]
    fn latency_buckets_are_cumulative_with_sum_and_count() {
        let h = Latency::new("x_seconds", "Help.");
        h.record_us(50);
        h.record_us(100);
        h.record_us(300);
        h.record(std::time::Duration::from_secs(40));
        let mut out = String::new();
        h.render(&mut out);
        let value = |series: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{series} missing in {out}"))
                .parse()
                .expect("series value is a number")
        };
        assert!(out.starts_with("# HELP x_seconds Help.\n# TYPE x_seconds histogram\n"));
        // A value on a bound belongs to that bucket (le: less or equal).
        assert_eq!(value("x_seconds_bucket{le=\"0.0001\"}"), 2.0);
        assert_eq!(value("x_seconds_bucket{le=\"0.00025\"}"), 2.0);
        assert_eq!(value("x_seconds_bucket{le=\"0.0005\"}"), 3.0);
        assert_eq!(value("x_seconds_bucket{le=\"30\"}"), 3.0);
        assert_eq!(value("x_seconds_bucket{le=\"+Inf\"}"), 4.0);
        assert_eq!(value("x_seconds_count"), 4.0);
        assert!((value("x_seconds_sum") - 40.00045).abs() < 1e-9);
    }
}
