//! Cancel keys: every client gets a BackendKeyData whose secret is pgweir's own; a CancelRequest carrying it is
//! mapped to the real backend key and address of the server connection the client is using. Forged or stale keys
//! cancel nothing.
//!
//! Architecture invariant: knows keys and addresses only — not sessions, not pools.

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use rand::Rng;

/// Where a cancel must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub host: String,
    pub port: u16,
    pub pid: i32,
    pub secret: Bytes,
}

/// Client-visible key → backend key.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    map: DashMap<(i32, i32), CancelTarget>,
}

/// Unregisters its key when dropped.
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry.map.remove(&(self.pid, self.secret));
    }
}

impl CancelRegistry {
    /// Registers `target` under the client-visible `pid` (the server's pid in session mode) and a fresh random
    /// secret.
    pub fn register(self: &Arc<Self>, pid: i32, target: CancelTarget) -> CancelKey {
        let mut rng = rand::thread_rng();
        loop {
            let secret: i32 = rng.gen();
            if let dashmap::mapref::entry::Entry::Vacant(e) = self.map.entry((pid, secret)) {
                e.insert(target);
                return CancelKey {
                    registry: self.clone(),
                    pid,
                    secret,
                };
            }
        }
    }

    /// The target of a CancelRequest, if the key is live.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<CancelTarget> {
        let secret: [u8; 4] = secret.try_into().ok()?;
        self.map
            .get(&(pid, i32::from_be_bytes(secret)))
            .map(|t| t.clone())
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

    #[test]
    fn keys_live_while_held() {
        let reg = Arc::new(CancelRegistry::default());
        let t = CancelTarget {
            host: "h".into(),
            port: 1,
            pid: 42,
            secret: Bytes::from_static(b"abcd"),
        };
        let key = reg.register(42, t.clone());
        assert_eq!(reg.lookup(42, &key.secret.to_be_bytes()), Some(t));
        assert_eq!(
            reg.lookup(42, &key.secret.wrapping_add(1).to_be_bytes()),
            None
        );
        assert_eq!(reg.lookup(43, &key.secret.to_be_bytes()), None);
        assert_eq!(reg.lookup(42, b"abc"), None);
        let secret = key.secret;
        drop(key);
        assert_eq!(reg.lookup(42, &secret.to_be_bytes()), None);
    }
}
