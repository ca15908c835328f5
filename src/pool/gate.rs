//! The traffic gate of one backend database (cluster, database): every checkout of a server connection for that
//! database passes it, and a pause closes it.
//!
//! It is a fair reader–writer lock: each checkout holds a *pass* (a read guard) for as long as it holds its server
//! connection; a pause takes the write side, so it waits for the checkouts in flight to come back (transactions
//! finish) while new checkouts queue behind it, and resuming lets them through in the order they came.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// Held by a checkout while it uses a server connection of the gated database.
pub type GatePass = OwnedRwLockReadGuard<()>;

#[derive(Default)]
pub struct Gate {
    lock: Arc<RwLock<()>>,
    /// The write side while paused, with when the pause began.
    held: Mutex<Option<(OwnedRwLockWriteGuard<()>, Instant)>>,
    /// A pause is being taken or held (a second one is refused).
    pausing: AtomicBool,
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
    pub fn try_pass(&self) -> Option<GatePass> {
        self.lock.clone().try_read_owned().ok()
    }

    /// A pass, waiting while the gate is paused (FIFO); None after `wait`.
    pub async fn pass(&self, wait: Duration) -> Option<GatePass> {
        tokio::time::timeout(wait, self.lock.clone().read_owned())
            .await
            .ok()
    }

    pub fn is_paused(&self) -> bool {
        self.pausing.load(Ordering::Relaxed)
    }

    /// Closes the gate: waits (at most `wait`) until no checkout holds a pass, holding new ones back meanwhile.
    /// Returns how long that took. On a timeout the gate stays open and the held checkouts go on.
    pub async fn pause(&self, wait: Duration) -> Result<Duration, PauseError> {
        if self.pausing.swap(true, Ordering::AcqRel) {
            return Err(PauseError::AlreadyPaused);
        }
        // Cancel-safe: a pause dropped while it waits (its caller went away) leaves the gate open again.
        struct Unpause<'a>(&'a AtomicBool);
        impl Drop for Unpause<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let unpause = Unpause(&self.pausing);
        let started = Instant::now();
        match tokio::time::timeout(wait, self.lock.clone().write_owned()).await {
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
        drop(guard);
        self.pausing.store(false, Ordering::Release);
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
        let waited = pausing.await.unwrap().unwrap();
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
                o.lock().unwrap().push(i);
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            gate.pass(Duration::from_millis(30)).await.is_none(),
            "a held client times out"
        );
        assert!(gate.resume().is_some());
        for h in held {
            h.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
        assert!(gate.resume().is_none());
        assert!(gate.try_pass().is_some());
    }

    #[tokio::test]
    async fn a_pause_dropped_while_waiting_leaves_the_gate_open() {
        let gate = Arc::new(Gate::default());
        let busy = gate.try_pass().unwrap();
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
        let gate = Gate::default();
        let _busy = gate.try_pass().unwrap();
        assert_eq!(
            gate.pause(Duration::from_millis(30)).await,
            Err(PauseError::Timeout(Duration::from_millis(30)))
        );
        assert!(!gate.is_paused());
        assert!(gate.try_pass().is_some(), "checkouts go on");
    }
}
