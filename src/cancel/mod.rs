//! Cancel keys: every client gets a BackendKeyData whose secret is pgweir's own; a CancelRequest carrying it is
//! mapped to the server connection the client is using *at that moment*. Forged or stale keys cancel nothing.
//!
//! In session mode a client's slot points at one server for the whole session. In transaction mode the session
//! links the slot to a server for each transaction and unlinks it before giving the server back; a cancel that is
//! being forwarded holds the slot, so the server cannot go to another client until the cancel has been delivered
//! (a late cancel can never hit someone else's query). A cancel for a client that waits for a server is remembered
//! and answered by the session itself.
//!
//! Architecture invariant: knows keys, slots and addresses only — not sessions, not pools.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use rand::Rng;
use tokio::sync::Notify;

/// Where a cancel must go (cheap to clone: a slot is linked to one for every transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub host: Arc<str>,
    pub port: u16,
    pub pid: i32,
    pub secret: Bytes,
}

/// What a client's cancel key currently refers to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SlotState {
    /// Between transactions: a cancel does nothing.
    #[default]
    Idle,
    /// A request waits for a server connection; `cancelled` once a cancel arrived.
    Waiting { cancelled: bool },
    /// A server is running the client's requests.
    Linked(Arc<CancelTarget>),
}

/// The per-client cancel slot.
#[derive(Debug, Default)]
pub struct CancelSlot {
    inner: std::sync::Mutex<Inner>,
    /// Woken when a cancel arrives for a waiting request, and when a cancel being forwarded has been delivered.
    /// Waiters re-check the state: a wakeup may be stale.
    wake: Notify,
    /// A cancel was forwarded to the linked server (see `take_forwarded`).
    forwarded: AtomicBool,
}

#[derive(Debug, Default)]
struct Inner {
    state: SlotState,
    /// A cancel for the linked server is being forwarded: the state may not change until it is delivered.
    forwarding: bool,
}

impl CancelSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the state whole: a panic elsewhere cannot leave it half-written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the state now, unless a cancel is being forwarded (then `f` is given back).
    #[inline]
    fn try_update<R, F: FnOnce(&mut SlotState) -> R>(&self, f: F) -> Result<R, F> {
        let mut g = self.lock();
        if g.forwarding {
            return Err(f);
        }
        Ok(f(&mut g.state))
    }

    /// Applies `f` to the state: at once in the usual case, else once the cancel being forwarded is delivered
    /// (that wait is a boxed future of its own, so the usual case's future stays small).
    async fn update<R>(&self, f: impl FnOnce(&mut SlotState) -> R) -> R {
        match self.try_update(f) {
            Ok(r) => r,
            Err(f) => Box::pin(self.update_after_forwarding(f)).await,
        }
    }

    /// Applies `f` to the state once the cancel being forwarded is delivered (for what
    /// [`CancelSlot::try_update`] gave back).
    async fn update_after_forwarding<R>(&self, f: impl FnOnce(&mut SlotState) -> R) -> R {
        let mut f = f;
        loop {
            // Registered before the flag is read again: the end of the forwarding is not missed.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            f = match self.try_update(f) {
                Ok(r) => return r,
                Err(f) => f,
            };
            woken.await;
        }
    }

    /// Sets the slot. Waits while a cancel for the previous state is being forwarded.
    pub async fn set(&self, state: SlotState) {
        self.update(|s| *s = state).await
    }

    /// Marks a request as waiting for a server (from now on a cancel is remembered for it), keeping a cancel
    /// already remembered.
    pub async fn mark_waiting(&self) {
        let mark = |s: &mut SlotState| {
            if !matches!(s, SlotState::Waiting { .. }) {
                *s = SlotState::Waiting { cancelled: false };
            }
        };
        self.update(mark).await
    }

    /// Links the slot to `target` unless a cancel arrived while waiting (then the flag is reset and false returned),
    /// in one step, so that no cancel falls between the check and the link.
    pub async fn link_unless_cancelled(&self, target: Arc<CancelTarget>) -> bool {
        let link = |s: &mut SlotState| {
            if let SlotState::Waiting { cancelled: true } = s {
                *s = SlotState::Waiting { cancelled: false };
                return false;
            }
            *s = SlotState::Linked(target);
            true
        };
        self.update(link).await
    }

    /// Completes when a cancel may have arrived for the waiting request (see [`CancelSlot::take_cancelled`]).
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// True if a cancel was forwarded to a server since the last call. The backend may act on a cancel late (it
    /// only marks it pending while busy): such a server must run a query of pgweir's own before it serves anyone
    /// else, so the pending cancel lands there.
    pub fn take_forwarded(&self) -> bool {
        // A load first: the flag is almost never set, and a swap is a locked instruction per transaction.
        self.forwarded.load(Ordering::Relaxed) && self.forwarded.swap(false, Ordering::Relaxed)
    }

    /// True if a cancel arrived while waiting; resets the flag.
    pub async fn take_cancelled(&self) -> bool {
        let take = |s: &mut SlotState| match s {
            SlotState::Waiting { cancelled } => std::mem::take(cancelled),
            _ => false,
        };
        self.update(take).await
    }
}

/// While alive, a cancel is being forwarded for its slot; dropped, it lets the slot change again.
struct Forwarding<'a>(&'a CancelSlot);

impl Drop for Forwarding<'_> {
    fn drop(&mut self) {
        self.0.lock().forwarding = false;
        self.0.wake.notify_waiters();
    }
}

/// Client-visible key → slot.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    map: DashMap<(i32, i32), Arc<CancelSlot>, foldhash::fast::RandomState>,
}

/// Unregisters its key when dropped.
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry.map.remove(&(self.pid, self.secret));
    }
}

/// What a cancel request led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    UnknownKey,
    /// The client was between transactions.
    Idle,
    /// The waiting request was marked cancelled.
    MarkedWaiting,
    Forwarded,
    ForwardFailed(String),
}

impl CancelRegistry {
    /// Registers a new slot under the client-visible `pid` (the server's pid in session mode, a random one in
    /// transaction mode) and a fresh random secret.
    pub fn register(self: &Arc<Self>, pid: i32, state: SlotState) -> CancelKey {
        let mut rng = rand::thread_rng();
        let slot = Arc::new(CancelSlot {
            inner: std::sync::Mutex::new(Inner {
                state,
                forwarding: false,
            }),
            wake: Notify::new(),
            forwarded: AtomicBool::new(false),
        });
        loop {
            let secret: i32 = rng.gen();
            if let dashmap::mapref::entry::Entry::Vacant(e) = self.map.entry((pid, secret)) {
                e.insert(slot.clone());
                return CancelKey {
                    registry: self.clone(),
                    pid,
                    secret,
                    slot,
                };
            }
        }
    }

    fn lookup(&self, pid: i32, secret: &[u8]) -> Option<Arc<CancelSlot>> {
        let secret: [u8; 4] = secret.try_into().ok()?;
        self.map
            .get(&(pid, i32::from_be_bytes(secret)))
            .map(|s| s.clone())
    }

    /// Handles a CancelRequest. While the request is forwarded the slot stays locked, so the session cannot unlink
    /// (and give its server to someone else) until the server has received the cancel.
    pub async fn cancel<F, Fut>(&self, pid: i32, secret: &[u8], forward: F) -> CancelOutcome
    where
        F: FnOnce(Arc<CancelTarget>) -> Fut,
        Fut: std::future::Future<Output = std::io::Result<()>>,
    {
        let Some(slot) = self.lookup(pid, secret) else {
            return CancelOutcome::UnknownKey;
        };
        let target = {
            let mut g = slot.lock();
            if g.forwarding {
                // Another cancel for the same request is on its way: this one adds nothing.
                return CancelOutcome::Forwarded;
            }
            match &mut g.state {
                SlotState::Idle => return CancelOutcome::Idle,
                SlotState::Waiting { cancelled } => {
                    *cancelled = true;
                    drop(g);
                    slot.wake.notify_one();
                    return CancelOutcome::MarkedWaiting;
                }
                SlotState::Linked(target) => {
                    let target = target.clone();
                    g.forwarding = true;
                    target
                }
            }
        };
        // Ends the forwarding however this future ends (delivered, failed, or dropped).
        let _forwarding = Forwarding(&slot);
        slot.forwarded.store(true, Ordering::Relaxed);
        match forward(target).await {
            Ok(()) => CancelOutcome::Forwarded,
            Err(e) => CancelOutcome::ForwardFailed(e.to_string()),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> CancelTarget {
        CancelTarget {
            host: "h".into(),
            port: 1,
            pid: 42,
            secret: Bytes::from_static(b"abcd"),
        }
    }

    #[tokio::test]
    async fn keys_live_while_held_and_follow_the_slot() {
        let reg = Arc::new(CancelRegistry::default());
        let key = reg.register(42, SlotState::Linked(Arc::new(target())));
        let secret = key.secret.to_be_bytes();
        let ok = |_t: Arc<CancelTarget>| async { Ok(()) };
        assert_eq!(reg.cancel(42, &secret, ok).await, CancelOutcome::Forwarded);
        let wrong = key.secret.wrapping_add(1).to_be_bytes();
        assert_eq!(reg.cancel(42, &wrong, ok).await, CancelOutcome::UnknownKey);
        assert_eq!(reg.cancel(43, &secret, ok).await, CancelOutcome::UnknownKey);
        assert_eq!(reg.cancel(42, b"abc", ok).await, CancelOutcome::UnknownKey);

        key.slot.set(SlotState::Idle).await;
        assert_eq!(reg.cancel(42, &secret, ok).await, CancelOutcome::Idle);
        key.slot.set(SlotState::Waiting { cancelled: false }).await;
        assert_eq!(
            reg.cancel(42, &secret, ok).await,
            CancelOutcome::MarkedWaiting
        );
        assert!(key.slot.take_cancelled().await);
        assert!(!key.slot.take_cancelled().await);

        drop(key);
        assert_eq!(reg.cancel(42, &secret, ok).await, CancelOutcome::UnknownKey);
        assert!(reg.is_empty());
    }

    #[tokio::test]
    async fn unlinking_waits_for_a_cancel_in_flight() {
        let reg = Arc::new(CancelRegistry::default());
        let key = reg.register(7, SlotState::Linked(Arc::new(target())));
        let secret = key.secret.to_be_bytes();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let reg2 = reg.clone();
        let cancel = tokio::spawn(async move {
            reg2.cancel(7, &secret, |_t| async move {
                let _ = rx.await;
                Ok(())
            })
            .await
        });
        // Let the cancel take the slot.
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let slot = key.slot.clone();
        let unlink = tokio::spawn(async move { slot.set(SlotState::Idle).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            !unlink.is_finished(),
            "unlink must wait for the cancel in flight"
        );
        tx.send(())
            .expect("the cancel's forwarder still waits for the signal");
        assert_eq!(
            cancel.await.expect("cancel task does not panic"),
            CancelOutcome::Forwarded
        );
        unlink.await.expect("unlink task does not panic");
    }
}
