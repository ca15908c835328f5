//! Per-tenant runtime state shared by all of a tenant's sessions on this instance: the plan in force (replaced when
//! the tenant's definition changes, so running sessions follow it), the client connection count and the query
//! rate token bucket.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::Plan;

/// One tenant's state.
pub struct TenantState {
    plan: RwLock<Arc<Plan>>,
    /// Bumped after each change of `plan`: a [`ConnectionSlot`]'s copy of the plan is good while this is unchanged
    /// (one plain load per statement instead of the read lock's two locked instructions).
    plan_gen: AtomicU64,
    connections: AtomicU32,
    bucket: Mutex<Bucket>,
    /// An operator switched the tenant to read-only (config `read_only`, or the admin API).
    operator_read_only: AtomicBool,
    /// The last sampled size of the tenant's databases is over the plan's `storage_bytes`.
    storage_over: AtomicBool,
    /// The last sampled size of the tenant's databases (bytes; 0 until sampled).
    pub storage_bytes: AtomicU64,
    /// Monthly query quota: the month's count from the catalog when last read, and queries counted here since.
    month_base: AtomicU64,
    month_local: AtomicU64,
    /// The month (`YYYYMM`) `month_base` belongs to.
    month: AtomicU32,
    /// A login asked the catalog for the month's total.
    month_asked: AtomicBool,
    /// Refusals by rule, and the latest few (for the admin API).
    refusals: Mutex<RefusalLog>,
    /// Unparsable statements forwarded (policy `open`).
    unparsed: AtomicU64,
    /// Per-statement statistics by [`crate::policy::classify::fingerprint_hash`]: a request is counted without
    /// hashing its text again, and the text is compared by pointer first (the facts of a repeated statement share
    /// their fingerprint).
    statements: Mutex<
        std::collections::HashMap<u64, (Arc<str>, StatementStats), foldhash::fast::RandomState>,
    >,
}

/// Calls, time and rows of one statement fingerprint (like pg_stat_statements, across the proxy).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct StatementStats {
    pub calls: u64,
    /// From the request reaching the server to its ReadyForQuery, in µs.
    pub total_us: u64,
    pub rows: u64,
}

/// Fingerprints kept per tenant; others are counted under [`OTHER_STATEMENTS`].
const MAX_STATEMENTS: usize = 1000;
const OTHER_STATEMENTS: &str = "(other statements)";

/// What the admin API shows of a tenant's refusals.
#[derive(Default, Clone, serde::Serialize)]
pub struct RefusalLog {
    pub by_rule: std::collections::BTreeMap<&'static str, u64>,
    /// The latest refusals, newest last: (unix seconds, rule, statement fingerprint).
    pub recent: std::collections::VecDeque<(u64, &'static str, String)>,
}

/// Refusals kept in `RefusalLog::recent`.
const RECENT_REFUSALS: usize = 20;

/// A token bucket kept as the time at which it is full again minus what has been reserved ("virtual time"):
/// taking a token moves `tat` by one interval.
struct Bucket {
    /// Theoretical arrival time of the next request (GCRA).
    tat: Option<Instant>,
}

/// Outcome of asking the bucket for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Go on now.
    Now,
    /// A token is reserved: go on after this wait.
    After(Duration),
    /// Over the rate even after the plan's `rate_wait`: wait that long, then fail.
    Refuse(Duration),
}

impl TenantState {
    fn new(plan: Arc<Plan>) -> TenantState {
        TenantState {
            plan: RwLock::new(plan),
            plan_gen: AtomicU64::new(0),
            connections: AtomicU32::new(0),
            bucket: Mutex::new(Bucket { tat: None }),
            operator_read_only: AtomicBool::new(false),
            storage_over: AtomicBool::new(false),
            storage_bytes: AtomicU64::new(0),
            month_base: AtomicU64::new(0),
            month_local: AtomicU64::new(0),
            month: AtomicU32::new(0),
            month_asked: AtomicBool::new(false),
            refusals: Mutex::new(RefusalLog::default()),
            unparsed: AtomicU64::new(0),
            statements: Mutex::new(Default::default()),
        }
    }

    /// Records one executed request of a statement fingerprint (`hash`: its
    /// [`crate::policy::classify::fingerprint_hash`]).
    pub fn record_statement(&self, fingerprint: &Arc<str>, hash: u64, micros: u64, rows: u64) {
        let mut m = self.statements.lock().unwrap_or_else(|p| p.into_inner());
        // The usual case, a statement already counted: one lookup.
        let e = match m.get_mut(&hash) {
            Some((text, e)) if Arc::ptr_eq(text, fingerprint) || **text == **fingerprint => e,
            found => {
                // Another text with the same 64-bit hash (not expected to happen) counts with the rest.
                let (text, hash) = if found.is_none() && m.len() < MAX_STATEMENTS {
                    (fingerprint.clone(), hash)
                } else {
                    (
                        Arc::from(OTHER_STATEMENTS),
                        crate::policy::classify::fingerprint_hash(OTHER_STATEMENTS),
                    )
                };
                &mut m
                    .entry(hash)
                    .or_insert_with(|| (text, Default::default()))
                    .1
            }
        };
        e.calls += 1;
        e.total_us += micros;
        e.rows += rows;
    }

    /// The `n` statements with the most total time.
    pub fn top_statements(&self, n: usize) -> Vec<(Arc<str>, StatementStats)> {
        let m = self.statements.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(Arc<str>, StatementStats)> =
            m.values().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort_by_key(|(_, st)| std::cmp::Reverse(st.total_us));
        v.truncate(n);
        v
    }

    /// Why the tenant is read-only now under `plan` (the plan in force), if it is: the plan, an operator, or its
    /// storage quota.
    pub fn read_only(&self, plan: &Plan) -> Option<&'static str> {
        if plan.policy.read_only {
            Some("the plan is read-only")
        } else if self.operator_read_only.load(Ordering::Relaxed) {
            Some("an operator switched it to read-only")
        } else if self.storage_over.load(Ordering::Relaxed) {
            Some("its storage is over the plan's quota")
        } else {
            None
        }
    }

    pub fn set_operator_read_only(&self, on: bool) {
        self.operator_read_only.store(on, Ordering::Relaxed);
    }

    /// Records a storage sample against the plan's quota; true when the read-only state changed.
    pub fn storage_sampled(&self, bytes: u64) -> bool {
        self.storage_bytes.store(bytes, Ordering::Relaxed);
        let over = self
            .with_plan(|p| p.storage_bytes)
            .is_some_and(|quota| bytes > quota);
        self.storage_over.swap(over, Ordering::Relaxed) != over
    }

    /// Records a refusal (for the admin API).
    pub fn refused(&self, rule: &'static str, fingerprint: String) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut log = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        *log.by_rule.entry(rule).or_default() += 1;
        if log.recent.len() == RECENT_REFUSALS {
            log.recent.pop_front();
        }
        log.recent.push_back((now, rule, fingerprint));
    }

    /// Counts an unparsable statement forwarded under the `open` policy.
    pub fn count_unparsed(&self) {
        self.unparsed.fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals by rule and unparsable statements forwarded, for `/metrics`.
    pub fn refusal_counts(&self) -> (Vec<(&'static str, u64)>, u64) {
        let log = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        (
            log.by_rule.iter().map(|(r, n)| (*r, *n)).collect(),
            self.unparsed.load(Ordering::Relaxed),
        )
    }

    pub fn refusal_log(&self) -> RefusalLog {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts one query against `plan`'s monthly quota; false when the quota is used up (the query is over it).
    pub fn count_query(&self, plan: &Plan) -> bool {
        let local = self.month_local.fetch_add(1, Ordering::Relaxed) + 1;
        match plan.monthly_queries {
            Some(quota) => self.month_base.load(Ordering::Relaxed) + local <= quota,
            None => true,
        }
    }

    /// The month's total has been read from the catalog at least once, or a login is reading it now (or tried
    /// and failed: then the next usage flush reads it; logins do not wait for the catalog again).
    pub fn month_known(&self) -> bool {
        self.month.load(Ordering::Relaxed) != 0 || self.month_asked.swap(true, Ordering::Relaxed)
    }

    /// Queries of the month so far, as this instance knows them.
    pub fn month_queries(&self) -> u64 {
        self.month_base.load(Ordering::Relaxed) + self.month_local.load(Ordering::Relaxed)
    }

    /// The month's total from the catalog (every instance's flushed counts, this one's included): local counts
    /// before now are in it or will be in the next total. A new month starts from zero.
    pub fn month_total(&self, month: u32, total: u64) {
        self.month.store(month, Ordering::Relaxed);
        self.month_base.store(total, Ordering::Relaxed);
        self.month_local.store(0, Ordering::Relaxed);
    }

    /// The plan in force.
    pub fn plan(&self) -> Arc<Plan> {
        self.plan.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `f` with the plan in force, without cloning it.
    pub fn with_plan<R>(&self, f: impl FnOnce(&Plan) -> R) -> R {
        f(&self.plan.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn set_plan(&self, plan: &Arc<Plan>) {
        // Logins of a tenant call this: the write lock only when the plan really changed.
        let same = {
            let cur = self.plan.read().unwrap_or_else(|p| p.into_inner());
            Arc::ptr_eq(&cur, plan) || **cur == **plan
        };
        if !same {
            *self.plan.write().unwrap_or_else(|p| p.into_inner()) = plan.clone();
            self.plan_gen.fetch_add(1, Ordering::Release);
        }
    }

    /// Takes a client connection slot unless the plan's `max_connections` are in use.
    pub fn connect(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let plan = self.snapshot();
        let max = plan.plan.max_connections.unwrap_or(u32::MAX);
        let taken = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| ConnectionSlot {
            state: self.clone(),
            plan,
        })
    }

    /// The plan in force now, with the generation it belongs to.
    fn snapshot(&self) -> PlanSnapshot {
        // The generation first: if the plan changes in between, the snapshot is older than it says and is taken
        // again at the next check (never the other way round).
        let gen = self.plan_gen.load(Ordering::Acquire);
        PlanSnapshot {
            gen,
            plan: self.plan.read().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Asks for `n` query tokens (a request may hold several queries) under `plan`; `now` is read only when the
    /// plan limits the rate.
    pub fn rate(&self, plan: &Plan, n: u32, now: impl FnOnce() -> Instant) -> Rate {
        let throttled = plan.over_quota == super::plan::OverQuota::Throttle
            && plan
                .monthly_queries
                .is_some_and(|q| self.month_queries() > q);
        let (qps, burst, wait) = if throttled {
            // Throttled: the plan's throttle rate, no burst.
            (
                Some(plan.throttle_queries_per_second.max(1)),
                1,
                plan.rate_wait,
            )
        } else {
            (
                plan.queries_per_second,
                plan.burst.or(plan.queries_per_second).unwrap_or(1).max(1),
                plan.rate_wait,
            )
        };
        let Some(qps) = qps.filter(|q| *q > 0) else {
            return Rate::Now;
        };
        let now = now();
        let interval = Duration::from_secs(1) / qps;
        let tolerance = interval * (burst - 1);
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let tat = b.tat.map_or(now, |t| t.max(now));
        let new_tat = tat + interval * n;
        // Allowed when the new virtual time is at most `tolerance + interval` ahead of now.
        let allowed_at = new_tat.checked_sub(tolerance + interval).unwrap_or(now);
        if allowed_at <= now {
            b.tat = Some(new_tat);
            Rate::Now
        } else if allowed_at - now <= wait {
            b.tat = Some(new_tat);
            Rate::After(allowed_at - now)
        } else {
            Rate::Refuse(wait)
        }
    }
}

/// A client connection counted against its tenant's `max_connections` until dropped.
pub struct ConnectionSlot {
    state: Arc<TenantState>,
    plan: PlanSnapshot,
}

/// A copy of a tenant's plan and the generation it belongs to (see [`TenantState::plan_gen`]).
pub struct PlanSnapshot {
    gen: u64,
    plan: Arc<Plan>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.state.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionSlot {
    pub fn tenant(&self) -> &Arc<TenantState> {
        &self.state
    }

    /// Takes the tenant's plan again if it changed since the last look (one plain load when it did not).
    pub fn refresh_plan(&mut self) {
        if self.state.plan_gen.load(Ordering::Acquire) != self.plan.gen {
            self.plan = self.state.snapshot();
        }
    }

    /// The tenant's state with this connection's copy of its plan.
    pub fn plan_ref(&self) -> PlanRef<'_> {
        PlanRef {
            state: &self.state,
            snapshot: &self.plan,
        }
    }
}

/// A tenant's state and a connection's copy of its plan: [`PlanRef::with_plan`] is [`TenantState::with_plan`]
/// without a lock while the copy is current.
#[derive(Clone, Copy)]
pub struct PlanRef<'a> {
    state: &'a TenantState,
    snapshot: &'a PlanSnapshot,
}

impl PlanRef<'_> {
    /// Runs `f` with the plan in force: the copy while it is current, else the tenant's (under its lock).
    #[inline]
    pub fn with_plan<R>(&self, f: impl FnOnce(&Plan) -> R) -> R {
        if self.state.plan_gen.load(Ordering::Acquire) == self.snapshot.gen {
            f(&self.snapshot.plan)
        } else {
            self.state.with_plan(f)
        }
    }
}

impl std::ops::Deref for PlanRef<'_> {
    type Target = TenantState;

    fn deref(&self) -> &TenantState {
        self.state
    }
}

/// The states of the tenants with sessions on this instance.
#[derive(Default)]
pub struct Tenants {
    map: DashMap<String, Arc<TenantState>, foldhash::fast::RandomState>,
}

impl Tenants {
    /// The state of tenant `id`, created with `plan`, or updated to it (and to the operator's read-only switch).
    pub fn state(&self, id: &str, plan: &Arc<Plan>, read_only: bool) -> Arc<TenantState> {
        let s = match self.map.get(id) {
            Some(s) => {
                s.set_plan(plan);
                s.clone()
            }
            None => self
                .map
                .entry(id.to_owned())
                .or_insert_with(|| Arc::new(TenantState::new(plan.clone())))
                .clone(),
        };
        s.set_operator_read_only(read_only);
        s
    }

    /// The state of tenant `id` if it has one on this instance.
    pub fn get(&self, id: &str) -> Option<Arc<TenantState>> {
        self.map.get(id).map(|s| s.clone())
    }

    /// Every tenant with a state here.
    pub fn all(&self) -> Vec<(String, Arc<TenantState>)> {
        self.map
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    /// Brings every state up to date (`current` gives a tenant's plan and operator read-only switch, None if it
    /// is gone) and forgets tenants that are gone and have no session left.
    pub fn refresh(&self, current: impl Fn(&str) -> Option<(Arc<Plan>, bool)>) {
        self.map.retain(|id, s| match current(id) {
            Some((p, read_only)) => {
                s.set_plan(&p);
                s.set_operator_read_only(read_only);
                true
            }
            None => Arc::strong_count(s) > 1,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_rate(qps: u32, burst: u32, wait_ms: u64) -> Arc<TenantState> {
        Arc::new(TenantState::new(Arc::new(Plan {
            queries_per_second: Some(qps),
            burst: Some(burst),
            rate_wait: Duration::from_millis(wait_ms),
            ..Plan::default()
        })))
    }

    /// A connection's copy of the plan is used while current; a plan change shows at once (the tenant's plan is
    /// read under its lock until the copy is taken again).
    #[test]
    fn a_connection_sees_a_plan_change_before_and_after_it_refreshes_its_copy() {
        let tenants = Tenants::default();
        let free = Arc::new(Plan {
            max_connections: Some(5),
            ..Plan::default()
        });
        let state = tenants.state("t", &free, false);
        let mut slot = state.connect().expect("a slot");
        assert_eq!(slot.plan_ref().with_plan(|p| p.max_connections), Some(5));
        // The same plan again (a login) changes nothing.
        tenants.state("t", &free, false);
        assert_eq!(slot.plan.gen, state.plan_gen.load(Ordering::Relaxed));
        let pro = Arc::new(Plan {
            max_connections: Some(50),
            ..Plan::default()
        });
        tenants.refresh(|_| Some((pro.clone(), false)));
        assert_ne!(slot.plan.gen, state.plan_gen.load(Ordering::Relaxed));
        assert_eq!(slot.plan_ref().with_plan(|p| p.max_connections), Some(50));
        slot.refresh_plan();
        assert!(Arc::ptr_eq(&slot.plan.plan, &pro));
        assert_eq!(slot.plan_ref().with_plan(|p| p.max_connections), Some(50));
    }

    #[test]
    fn the_burst_passes_then_queries_wait_then_fail() {
        let t = with_rate(10, 5, 250);
        let now = Instant::now();
        for _ in 0..5 {
            assert_eq!(t.with_plan(|p| t.rate(p, 1, || now)), Rate::Now);
        }
        // 100 ms apart after the burst: the next two wait 100 and 200 ms, the one after would wait 300 > 250.
        assert_eq!(
            t.with_plan(|p| t.rate(p, 1, || now)),
            Rate::After(Duration::from_millis(100))
        );
        assert_eq!(
            t.with_plan(|p| t.rate(p, 1, || now)),
            Rate::After(Duration::from_millis(200))
        );
        assert_eq!(
            t.with_plan(|p| t.rate(p, 1, || now)),
            Rate::Refuse(Duration::from_millis(250))
        );
        // Time refills the bucket.
        let later = now + Duration::from_secs(2);
        assert_eq!(t.with_plan(|p| t.rate(p, 1, || later)), Rate::Now);
    }

    #[test]
    fn connections_are_capped_and_given_back() {
        let t = Arc::new(TenantState::new(Arc::new(Plan {
            max_connections: Some(2),
            ..Plan::default()
        })));
        let a = t.connect().expect("first connection is under the cap of 2");
        let _b = t
            .connect()
            .expect("second connection is under the cap of 2");
        assert!(t.connect().is_none());
        drop(a);
        assert!(t.connect().is_some());
    }

    #[test]
    fn statements_count_by_text_and_overflow_into_one_row() {
        use crate::policy::classify::fingerprint_hash;
        let t = TenantState::new(Arc::new(Plan::default()));
        let record = |text: &str, us| {
            // A new Arc each time: equal texts from other sessions' facts count together.
            let text: Arc<str> = text.into();
            t.record_statement(&text, fingerprint_hash(&text), us, 1);
        };
        record("SELECT ?", 10);
        record("SELECT ?", 30);
        record("UPDATE t SET a = ?", 5);
        let top = t.top_statements(5);
        assert_eq!(top.len(), 2);
        assert_eq!(&*top[0].0, "SELECT ?");
        assert_eq!(
            (top[0].1.calls, top[0].1.total_us, top[0].1.rows),
            (2, 40, 2)
        );
        assert_eq!((top[1].1.calls, top[1].1.total_us), (1, 5));
        for i in 0..MAX_STATEMENTS {
            record(&format!("SELECT {i}"), 1);
        }
        record("SELECT ?", 1);
        let all = t.top_statements(usize::MAX);
        assert_eq!(all.len(), MAX_STATEMENTS + 1);
        let other = all.iter().find(|(k, _)| &**k == OTHER_STATEMENTS);
        // 2 + 998 texts fill the map; the last two new ones count as one row beyond it.
        assert_eq!(other.map(|(_, s)| s.calls), Some(2));
        let select = all.iter().find(|(k, _)| &**k == "SELECT ?");
        assert_eq!(select.map(|(_, s)| s.calls), Some(3));
    }
}
