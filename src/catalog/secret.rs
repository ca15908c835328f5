//! Secrets pgweir keeps in the catalog (backend role passwords it generated, cluster admin passwords) are sealed
//! with AES-256-GCM under a key that never enters the catalog: from `PGWEIR_CATALOG_KEY` (base64 of 32 bytes) or a
//! key file holding the same. A sealed value is `nonce (12 bytes) || ciphertext || tag`; the tenant or cluster it
//! belongs to is bound in as associated data, so a value copied to another row does not open.

use base64::Engine as _;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// The environment variable that holds the catalog key (base64 of 32 random bytes).
pub const KEY_ENV: &str = "PGWEIR_CATALOG_KEY";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the catalog key must be 32 bytes, base64-encoded (e.g. `openssl rand -base64 32`)")]
    BadKey,
    #[error("cannot read the catalog key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("no catalog key: set {KEY_ENV} or catalog.key_file")]
    NoKey,
    #[error("a sealed secret does not open with this key (wrong key, or the value was moved or damaged)")]
    Open,
}

/// The key that seals and opens catalog secrets.
pub struct SecretKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A key from its base64 text (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<SecretKey, SecretError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| SecretError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SecretError::BadKey);
        }
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| SecretError::BadKey)?;
        Ok(SecretKey {
            key: LessSafeKey::new(unbound),
        })
    }

    /// The key from `PGWEIR_CATALOG_KEY`, else from `key_file`.
    pub fn load(key_file: Option<&std::path::Path>) -> Result<SecretKey, SecretError> {
        if let Ok(text) = std::env::var(KEY_ENV) {
            return SecretKey::from_base64(&text);
        }
        let path = key_file.ok_or(SecretError::NoKey)?;
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::KeyFile {
            path: path.display().to_string(),
            source,
        })?;
        SecretKey::from_base64(&text)
    }

    /// A new random key, as base64 text (for a key file).
    pub fn generate_base64() -> String {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system random source works");
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// Seals `plain`, bound to `context` (e.g. `tenant:acme`).
    pub fn seal(&self, context: &str, plain: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut data = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .expect("AES-GCM sealing of a short value cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        out
    }

    /// Opens what [`SecretKey::seal`] sealed with the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<String, SecretError> {
        if sealed.len() < NONCE_LEN + aead::AES_256_GCM.tag_len() {
            return Err(SecretError::Open);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Open)?;
        let mut data = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut data)
            .map_err(|_| SecretError::Open)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SecretError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let key = SecretKey::from_base64(&SecretKey::generate_base64())
            .expect("a freshly generated key decodes");
        let sealed = key.seal("tenant:acme", "s3cret");
        assert!(!sealed.windows(6).any(|w| w == b"s3cret"));
        assert_eq!(
            key.open("tenant:acme", &sealed)
                .expect("the sealing key opens its own seal in the same context"),
            "s3cret"
        );
        assert!(key.open("tenant:other", &sealed).is_err());
        let other = SecretKey::from_base64(&SecretKey::generate_base64())
            .expect("a second freshly generated key decodes");
        assert!(other.open("tenant:acme", &sealed).is_err());
        let mut damaged = sealed.clone();
        damaged[NONCE_LEN] ^= 1;
        assert!(key.open("tenant:acme", &damaged).is_err());
        assert!(key.open("tenant:acme", &sealed[..10]).is_err());
        // Two seals of one value differ (fresh nonces).
        assert_ne!(key.seal("tenant:acme", "s3cret"), sealed);
        assert!(SecretKey::from_base64("c2hvcnQ=").is_err());
        assert!(SecretKey::from_base64("not base64!").is_err());
    }
}
