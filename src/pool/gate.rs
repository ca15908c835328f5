//! The traffic gate of one backend database (cluster, database): every checkout of a server connection for that
//! database passes it, and a pause closes it.
//!
//! It is a fair reader–writer lock: each checkout holds a *pass* (a read guard) for as long as it holds its server
//! connection; a pause takes the write side, so it waits for the checkouts in flight to come back (transactions
//! finish) while new checkouts queue behind it, and resuming lets them through in the order they came.
//!
//! While no pause is pending, a pass is only a count (two atomic operations per checkout instead of the lock's
//! semaphore and its mutex): a pause first takes the write side, which turns new checkouts to the lock's queue,
//! then waits for the counted passes to come back as well.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// Held by a checkout while it uses a server connection of the gated database.
pub enum GatePass {
    /// Taken while no pause was pending: counted in `Gate::counted`.
    Counted(Arc<Gate>),
    /// Taken from the lock (after a pause, or while one was being resolved).
    Locked { _guard: OwnedRwLockReadGuard<()> },
}

impl Drop for GatePass {
    fn drop(&mut self) {
        if let GatePass::Counted(gate) = self {
            gate.give_back();
        }
    }
}

#[derive(Default)]
pub struct Gate {
    lock: Arc<RwLock<()>>,
    /// The write side while paused, with when the pause began.
    held: Mutex<Option<(OwnedRwLockWriteGuard<()>, Instant)>>,
    /// A pause is being taken or held (a second one is refused). Set before a pause waits: from then on no pass
    /// is counted, every new one comes from the lock.
    pausing: AtomicBool,
    /// Counted passes out.
    counted: AtomicUsize,
    /// Woken when the last counted pass comes back while a pause waits for it.
    drained: Notify,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    #[error("already paused")]
    AlreadyPaused,
    #[error("transactions in flight did not finish within {0:?}")]
    Timeout(Duration),
}

impl Gate {
    /// A pass at once, unless the gate is paused or a pause is waiting.
    pub fn try_pass(self: &Arc<Self>) -> Option<GatePass> {
        // Counted, then checked (both sequentially consistent, as the pause's flag and its read of the count):
        // either the pause sees this pass, or this sees the pause.
        self.counted.fetch_add(1, Ordering::SeqCst);
        if !self.pausing.load(Ordering::SeqCst) {
            return Some(GatePass::Counted(self.clone()));
        }
        self.give_back();
        None
    }

    fn give_back(&self) {
        if self.counted.fetch_sub(1, Ordering::SeqCst) == 1 && self.pausing.load(Ordering::SeqCst) {
            self.drained.notify_waiters();
        }
    }

    /// A pass, waiting while the gate is paused (FIFO); None after `wait`.
    pub async fn pass(self: &Arc<Self>, wait: Duration) -> Option<GatePass> {
        if let Some(pass) = self.try_pass() {
            return Some(pass);
        }
        tokio::time::timeout(wait, self.lock.clone().read_owned())
            .await
            .ok()
            .map(|g| GatePass::Locked { _guard: g })
    }

    pub fn is_paused(&self) -> bool {
        self.pausing.load(Ordering::Relaxed)
    }

    /// Closes the gate: waits (at most `wait`) until no checkout holds a pass, holding new ones back meanwhile.
    /// Returns how long that took. On a timeout the gate stays open and the held checkouts go on.
    pub async fn pause(&self, wait: Duration) -> Result<Duration, PauseError> {
        if self.pausing.swap(true, Ordering::SeqCst) {
            return Err(PauseError::AlreadyPaused);
        }
        // Cancel-safe: a pause dropped while it waits (its caller went away) leaves the gate open again.
        struct Unpause<'a>(&'a AtomicBool);
        impl Drop for Unpause<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let unpause = Unpause(&self.pausing);
        let started = Instant::now();
        let closed = async {
            // The write side first: passes from the lock come back, and new ones queue behind it.
            let guard = self.lock.clone().write_owned().await;
            // Then the counted ones (none is counted any more: `pausing` is set).
            loop {
                let drained = self.drained.notified();
                tokio::pin!(drained);
                drained.as_mut().enable();
                if self.counted.load(Ordering::SeqCst) == 0 {
                    return guard;
                }
                drained.await;
            }
        };
        match tokio::time::timeout(wait, closed).await {
            Ok(guard) => {
                *self.held.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((guard, Instant::now()));
                std::mem::forget(unpause);
                Ok(started.elapsed())
            }
            Err(_) => Err(PauseError::Timeout(wait)),
        }
    }

    /// Opens the gate again; returns how long it was paused (None if it was not).
    pub fn resume(&self) -> Option<Duration> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (guard, since) = held?;
        // Those held behind the pause get their passes first, in order.
        drop(guard);
        self.pausing.store(false, Ordering::SeqCst);
        Some(since.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pause_waits_for_passes_and_holds_new_ones_in_order() {
        let gate = Arc::new(Gate::default());
        let first = gate.try_pass().expect("open gate");
        let g = gate.clone();
        let pausing = tokio::spawn(async move { g.pause(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            gate.try_pass().is_none(),
            "new checkouts wait behind a pending pause"
        );
        assert!(
            !pausing.is_finished(),
            "the pause waits for the pass in flight"
        );
        drop(first);
        let waited = pausing
            .await
            .expect("pause task does not panic")
            .expect("the pause succeeds once the pass in flight is dropped");
        assert!(waited >= Duration::from_millis(20));
        assert_eq!(
            gate.pause(Duration::from_secs(1)).await,
            Err(PauseError::AlreadyPaused)
        );
        // Held clients, released in order.
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut held = Vec::new();
        for i in 0..5 {
            let (g, o) = (gate.clone(), order.clone());
            held.push(tokio::spawn(async move {
                let _p = g
                    .pass(Duration::from_secs(5))
                    .await
                    .expect("released by resume");
                o.lock().expect("order lock not poisoned").push(i);
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            gate.pass(Duration::from_millis(30)).await.is_none(),
            "a held client times out"
        );
        assert!(gate.resume().is_some());
        for h in held {
            h.await.expect("held client task does not panic");
        }
        assert_eq!(
            *order.lock().expect("order lock not poisoned"),
            [0, 1, 2, 3, 4]
        );
        assert!(gate.resume().is_none());
        assert!(gate.try_pass().is_some());
    }

    #[tokio::test]
    async fn a_pause_waits_for_counted_and_locked_passes_alike(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let gate = Arc::new(Gate::default());
        let counted = gate.try_pass().expect("open gate");
        assert!(matches!(counted, GatePass::Counted(_)));
        // A pass from the lock: taken while a pause was pending, then let through by its timeout.
        let g = gate.clone();
        let pausing = tokio::spawn(async move { g.pause(Duration::from_millis(50)).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let locked = gate
            .pass(Duration::from_secs(5))
            .await
            .expect("pass after the pause gave up");
        assert!(matches!(locked, GatePass::Locked { .. }));
        assert!(pausing.await?.is_err());
        drop(counted);
        let g = gate.clone();
        let pausing = tokio::spawn(async move { g.pause(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!pausing.is_finished(), "the locked pass is still out");
        drop(locked);
        assert!(pausing.await?.is_ok());
        assert!(gate.try_pass().is_none());
        gate.resume();
        assert!(gate.try_pass().is_some());
        Ok(())
    }

    /// Many checkouts on several threads against repeated pauses: while a pause holds, no pass is out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_pass_is_out_while_paused() -> Result<(), Box<dyn std::error::Error>> {
        use std::sync::atomic::AtomicUsize;
        let gate = Arc::new(Gate::default());
        let out = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for _ in 0..6 {
            let (gate, out, stop) = (gate.clone(), out.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                let mut passes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Some(pass) = gate.pass(Duration::from_secs(5)).await else {
                        panic!("a pass waited more than 5 s");
                    };
                    out.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    out.fetch_sub(1, Ordering::SeqCst);
                    drop(pass);
                    passes += 1;
                }
                passes
            }));
        }
        for _ in 0..50 {
            gate.pause(Duration::from_secs(5)).await.expect("pause");
            assert_eq!(out.load(Ordering::SeqCst), 0, "a pass is out while paused");
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert_eq!(out.load(Ordering::SeqCst), 0, "a pass got out while paused");
            gate.resume().expect("was paused");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for w in workers {
            total += w.await?;
        }
        assert!(
            total > 50,
            "the workers got passes between pauses ({total})"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_pause_dropped_while_waiting_leaves_the_gate_open() {
        let gate = Arc::new(Gate::default());
        let busy = gate.try_pass().expect("open gate");
        let g = gate.clone();
        let pausing = tokio::spawn(async move { g.pause(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        pausing.abort();
        let _ = pausing.await;
        drop(busy);
        assert!(!gate.is_paused());
        assert!(gate.try_pass().is_some());
        assert!(
            gate.pause(Duration::from_secs(1)).await.is_ok(),
            "a later pause works"
        );
    }

    #[tokio::test]
    async fn a_pause_that_times_out_leaves_the_gate_open() {
        let gate = Arc::new(Gate::default());
        let _busy = gate.try_pass().expect("open gate");
        assert_eq!(
            gate.pause(Duration::from_millis(30)).await,
            Err(PauseError::Timeout(Duration::from_millis(30)))
        );
        assert!(!gate.is_paused());
        assert!(gate.try_pass().is_some(), "checkouts go on");
    }
}
