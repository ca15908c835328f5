//! Per-tenant runtime state shared by all of a tenant's sessions on this instance: the plan in force (replaced when
//! the tenant's definition changes, so running sessions follow it), the client connection count and the query
//! rate token bucket.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::Plan;

/// One tenant's state.
pub struct TenantState {
    plan: RwLock<Arc<Plan>>,
    connections: AtomicU32,
    bucket: Mutex<Bucket>,
}

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
            connections: AtomicU32::new(0),
            bucket: Mutex::new(Bucket { tat: None }),
        }
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
        let mut cur = self.plan.write().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&cur, plan) && **cur != **plan {
            *cur = plan.clone();
        }
    }

    /// Takes a client connection slot unless the plan's `max_connections` are in use.
    pub fn connect(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let max = self.with_plan(|p| p.max_connections).unwrap_or(u32::MAX);
        let taken = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| ConnectionSlot(self.clone()))
    }

    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Asks for `n` query tokens (a request may hold several queries).
    pub fn rate(&self, n: u32, now: Instant) -> Rate {
        let (qps, burst, wait) = self.with_plan(|p| {
            (
                p.queries_per_second,
                p.burst.or(p.queries_per_second).unwrap_or(1).max(1),
                p.rate_wait,
            )
        });
        let Some(qps) = qps.filter(|q| *q > 0) else {
            return Rate::Now;
        };
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
pub struct ConnectionSlot(Arc<TenantState>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionSlot {
    pub fn tenant(&self) -> &Arc<TenantState> {
        &self.0
    }
}

/// The states of the tenants with sessions on this instance.
#[derive(Default)]
pub struct Tenants {
    map: DashMap<String, Arc<TenantState>>,
}

impl Tenants {
    /// The state of tenant `id`, created with `plan`, or updated to it.
    pub fn state(&self, id: &str, plan: &Arc<Plan>) -> Arc<TenantState> {
        if let Some(s) = self.map.get(id) {
            s.set_plan(plan);
            return s.clone();
        }
        self.map
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(TenantState::new(plan.clone())))
            .clone()
    }

    /// Brings every state's plan up to date (`plan_of` gives a tenant's current plan, None if it is gone) and
    /// forgets tenants that are gone and have no session left.
    pub fn refresh(&self, plan_of: impl Fn(&str) -> Option<Arc<Plan>>) {
        self.map.retain(|id, s| match plan_of(id) {
            Some(p) => {
                s.set_plan(&p);
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

    #[test]
    fn the_burst_passes_then_queries_wait_then_fail() {
        let t = with_rate(10, 5, 250);
        let now = Instant::now();
        for _ in 0..5 {
            assert_eq!(t.rate(1, now), Rate::Now);
        }
        // 100 ms apart after the burst: the next two wait 100 and 200 ms, the one after would wait 300 > 250.
        assert_eq!(t.rate(1, now), Rate::After(Duration::from_millis(100)));
        assert_eq!(t.rate(1, now), Rate::After(Duration::from_millis(200)));
        assert_eq!(t.rate(1, now), Rate::Refuse(Duration::from_millis(250)));
        // Time refills the bucket.
        let later = now + Duration::from_secs(2);
        assert_eq!(t.rate(1, later), Rate::Now);
    }

    #[test]
    fn connections_are_capped_and_given_back() {
        let t = Arc::new(TenantState::new(Arc::new(Plan {
            max_connections: Some(2),
            ..Plan::default()
        })));
        let a = t.connect().unwrap();
        let _b = t.connect().unwrap();
        assert!(t.connect().is_none());
        drop(a);
        assert!(t.connect().is_some());
    }
}
