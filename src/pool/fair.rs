//! Weighted fair sharing of a cluster's active transactions between tenants. A cluster with
//! `max_active_transactions` admits that many checkouts at once, over all of its tenants' pools; when it is
//! saturated, waiting checkouts are served by start-time fair queueing: each tenant has a virtual finish tag that
//! a grant advances by `1 / weight`, and the next grant goes to the tenant whose next start tag is smallest. A tenant
//! with weight 2 gets twice the share of one with weight 1 while both wait; a tenant that waited little is served
//! before one that flooded; within a tenant, waiters are served in order.
//!
//! A permit is held for as long as the checkout holds its server connection (one transaction in transaction mode),
//! and given to the next waiter when dropped. Cancel-safe: a waiter that gives up (timeout, client gone) before
//! its grant arrives hands the grant on.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// One cluster's share of active transactions.
pub struct FairShare {
    /// Active transactions at once; 0: no limit (checkouts take no permit).
    capacity: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    in_use: usize,
    /// Virtual time: the start tag of the last grant.
    vtime: f64,
    tenants: HashMap<String, Queue, foldhash::fast::RandomState>,
    /// Waiters over all tenants.
    waiting: usize,
}

#[derive(Default)]
struct Queue {
    /// Finish tag of the tenant's last grant.
    finish: f64,
    waiters: VecDeque<(u32, oneshot::Sender<FairPermit>)>,
}

/// Admission to the cluster: given back when dropped.
pub struct FairPermit {
    share: Option<Arc<FairShare>>,
}

impl Drop for FairPermit {
    fn drop(&mut self) {
        if let Some(s) = self.share.take() {
            s.release();
        }
    }
}

impl FairShare {
    pub fn new(capacity: usize) -> Arc<FairShare> {
        Arc::new(FairShare {
            capacity: AtomicUsize::new(capacity),
            state: Mutex::new(State::default()),
        })
    }

    /// The limit (0: none).
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Changes the limit: checkouts in flight keep their permits, and a larger limit (or none) admits waiters at
    /// once. (Checkouts made while there was no limit hold no permit and are not counted against a new one.)
    pub fn set_capacity(self: &Arc<Self>, capacity: usize) {
        if self.capacity() == capacity {
            return;
        }
        let mut st = self.lock();
        if self.capacity.swap(capacity, Ordering::Relaxed) != capacity {
            self.dispatch(&mut st);
        }
    }

    fn has_room(&self, st: &State) -> bool {
        let cap = self.capacity();
        cap == 0 || st.in_use < cap
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Advances `tenant`'s tags for a grant.
    fn charge(st: &mut State, tenant: &str, weight: u32) {
        let vtime = st.vtime;
        let q = st.tenants.entry(tenant.to_owned()).or_default();
        let start = q.finish.max(vtime);
        q.finish = start + 1.0 / f64::from(weight.max(1));
        st.vtime = start;
    }

    /// A permit now, if the cluster has room and nobody waits.
    pub fn try_acquire(self: &Arc<Self>, tenant: &str, weight: u32) -> Option<FairPermit> {
        self.grant_now(&mut self.lock(), tenant, weight)
    }

    /// Grants a permit under the lock if the cluster has room and nobody waits (FIFO within tenants holds).
    fn grant_now(
        self: &Arc<Self>,
        st: &mut State,
        tenant: &str,
        weight: u32,
    ) -> Option<FairPermit> {
        if !self.has_room(st) || st.waiting > 0 {
            return None;
        }
        st.in_use += 1;
        Self::charge(st, tenant, weight);
        Some(FairPermit {
            share: Some(self.clone()),
        })
    }

    /// Waits for a permit (the caller bounds the wait).
    pub async fn acquire(self: &Arc<Self>, tenant: &str, weight: u32) -> Option<FairPermit> {
        let rx = {
            let mut st = self.lock();
            if let Some(p) = self.grant_now(&mut st, tenant, weight) {
                return Some(p);
            }
            let (tx, rx) = oneshot::channel();
            st.tenants
                .entry(tenant.to_owned())
                .or_default()
                .waiters
                .push_back((weight, tx));
            st.waiting += 1;
            rx
        };
        rx.await.ok()
    }

    /// A permit came back: grant it to the fairest waiter, or free it.
    fn release(self: &Arc<Self>) {
        let mut st = self.lock();
        st.in_use -= 1;
        self.dispatch(&mut st);
    }

    /// Grants permits to the fairest waiters while there is room.
    fn dispatch(self: &Arc<Self>, st: &mut State) {
        while self.has_room(st) {
            let vtime = st.vtime;
            // The tenant whose next grant would start first.
            let next = st
                .tenants
                .iter()
                .filter(|(_, q)| !q.waiters.is_empty())
                .map(|(t, q)| (q.finish.max(vtime), t.clone()))
                .min_by(|a, b| a.0.total_cmp(&b.0));
            let Some((_, tenant)) = next else {
                // Forget idle tenants' tags once nobody waits (they would only grow the map).
                if st.waiting == 0 && st.in_use == 0 {
                    st.tenants.clear();
                    st.vtime = 0.0;
                }
                return;
            };
            // Found above, under the same lock.
            let Some((weight, tx)) = st
                .tenants
                .get_mut(&tenant)
                .and_then(|q| q.waiters.pop_front())
            else {
                continue;
            };
            st.waiting -= 1;
            st.in_use += 1;
            Self::charge(st, &tenant, weight);
            let permit = FairPermit {
                share: Some(self.clone()),
            };
            if let Err(mut p) = tx.send(permit) {
                // The waiter gave up: its permit must not release (we hold the lock); take the grant back.
                p.share = None;
                st.in_use -= 1;
            }
        }
    }

    /// (in use, waiting) now.
    pub fn load(&self) -> (usize, usize) {
        let st = self.lock();
        (st.in_use, st.waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_limit_admits_waiters_and_zero_lifts_it() {
        let share = FairShare::new(1);
        let held = share
            .try_acquire("a", 1)
            .expect("the first grant is under the limit of 1");
        let waiter = {
            let s = share.clone();
            tokio::spawn(async move { s.acquire("b", 1).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(share.load(), (1, 1));
        share.set_capacity(2);
        let second = waiter
            .await
            .expect("waiter task does not panic")
            .expect("admitted by the larger limit");
        assert_eq!(share.load(), (2, 0));
        assert!(share.try_acquire("c", 1).is_none(), "the limit is 2");
        share.set_capacity(0);
        assert!(share.try_acquire("c", 1).is_some(), "no limit");
        drop((held, second));
        assert_eq!(share.load(), (0, 0));
    }

    #[tokio::test]
    async fn waiters_are_served_by_weight_and_a_small_tenant_is_not_starved() {
        let share = FairShare::new(1);
        let held = share
            .try_acquire("big", 1)
            .expect("the first grant is under the limit of 1");
        // The big tenant queues 6 waiters, then the small one 2.
        let mut order = Vec::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (tenant, n) in [("big", 6), ("small", 2)] {
            for i in 0..n {
                let (s, tx) = (share.clone(), tx.clone());
                tokio::spawn(async move {
                    let p = s
                        .acquire(tenant, 1)
                        .await
                        .expect("a waiter is admitted once the holder lets go");
                    tx.send(format!("{tenant}{i}"))
                        .expect("the test still receives the order");
                    drop(p);
                });
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for _ in 0..8 {
            order.push(
                rx.recv()
                    .await
                    .expect("each of the 8 waiters reports its turn"),
            );
        }
        // Alternating while both wait; FIFO would have put the small tenant last.
        let small_at: Vec<usize> = order
            .iter()
            .enumerate()
            .filter(|(_, n)| n.starts_with("small"))
            .map(|(i, _)| i)
            .collect();
        assert!(small_at[1] <= 3, "{order:?}");
        assert_eq!(share.load(), (0, 0));
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_hands_its_grant_on() {
        let share = FairShare::new(1);
        let held = share
            .try_acquire("a", 1)
            .expect("the first grant is under the limit of 1");
        let gone = {
            let s = share.clone();
            tokio::spawn(async move { s.acquire("a", 1).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        let next = {
            let s = share.clone();
            tokio::spawn(async move { s.acquire("b", 1).await.is_some() })
        };
        tokio::task::yield_now().await;
        drop(held);
        assert!(next.await.expect("next waiter task does not panic"));
        assert_eq!(share.load(), (0, 0));
    }
}
