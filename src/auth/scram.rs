//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it.
//!
//! - [`ScramVerifier`]: the secret PostgreSQL stores in `pg_authid`
//!   (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`).
//! - [`ScramServer`]: pgweir authenticating a client, with PostgreSQL's rules for the GS2 header
//!   and `tls-server-end-point` channel binding (`SCRAM-SHA-256-PLUS`).
//! - [`ScramClient`]: pgweir logging in to a backend with a known password (no channel binding).
//! - [`salted_password`]: PBKDF2 (`Hi()`) with a small process-wide cache.
//!
//! Passwords are normalised with SASLprep as PostgreSQL does: if SASLprep rejects a password (or
//! maps it to the empty string), its raw UTF-8 bytes are used instead.
//!
//! Every input that comes from the network is parsed without panicking; proofs and signatures
//! are compared in constant time. Each exchange is a small state machine: calling a step out of
//! order, or again after a failure, returns [`ScramError::OutOfOrder`].

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// SASL mechanism name of SCRAM-SHA-256 without channel binding.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// SASL mechanism name of SCRAM-SHA-256 with channel binding.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// PostgreSQL's default iteration count (`scram_iterations`).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Highest iteration count [`ScramClient`] accepts from a server (bounds the work a server can
/// make us do).
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// Prefix of a SCRAM-SHA-256 verifier in PostgreSQL's format.
const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";
/// The only channel binding type PostgreSQL supports.
const CHANNEL_BINDING_TYPE: &[u8] = b"tls-server-end-point";
/// Salt length of generated verifiers (PostgreSQL's `SCRAM_DEFAULT_SALT_LEN`).
const SALT_LEN: usize = 16;
/// Random bytes in a nonce before base64 (PostgreSQL's `SCRAM_RAW_NONCE_LEN`).
const RAW_NONCE_LEN: usize = 18;
/// Length of SHA-256 digests, keys, proofs and signatures.
const KEY_LEN: usize = 32;
/// Entries in the [`salted_password`] cache before it is cleared.
const SALTED_PASSWORD_CACHE_CAPACITY: usize = 1024;

type HmacSha256 = Hmac<Sha256>;

/// Why a SCRAM exchange or verifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// A SCRAM message does not follow the grammar.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// A stored verifier is not in PostgreSQL's SCRAM-SHA-256 format.
    #[error("invalid SCRAM-SHA-256 verifier: {0}")]
    InvalidVerifier(&'static str),
    /// The client selected a mechanism that was not offered.
    #[error("client selected an invalid SASL authentication mechanism")]
    UnsupportedMechanism,
    /// A valid but unsupported SCRAM feature (authorization identity, mandatory extensions,
    /// channel binding types other than `tls-server-end-point`).
    #[error("unsupported SCRAM feature: {0}")]
    Unsupported(&'static str),
    /// The GS2 header contradicts the selected mechanism or what the server offered (this
    /// includes the downgrade attack RFC 5802 section 6 describes).
    #[error("SCRAM channel binding negotiation error: {0}")]
    ChannelBindingNegotiation(&'static str),
    /// The channel binding attribute of client-final-message does not match.
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    /// The nonce does not continue the exchange.
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    /// The client's proof is wrong: wrong password (or unknown user).
    #[error("SCRAM authentication failed: invalid client proof")]
    InvalidProof,
    /// The server's signature is wrong: the server does not know the password's keys.
    #[error("SCRAM authentication failed: invalid server signature")]
    InvalidServerSignature,
    /// The server ended the exchange with `e=<reason>`.
    #[error("SCRAM error from server: {0}")]
    ServerError(String),
    /// A step was called out of order, or after the exchange had finished or failed.
    #[error("SCRAM exchange step called out of order")]
    OutOfOrder,
}

/// A SCRAM-SHA-256 verifier: what PostgreSQL stores instead of the password.
///
/// `Debug` shows the iteration count and salt but redacts the keys.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: Vec<u8>,
    /// `H(HMAC(SaltedPassword, "Client Key"))`.
    pub stored_key: [u8; 32],
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parses PostgreSQL's format
    /// `SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>`.
    pub fn parse(s: &str) -> Result<Self, ScramError> {
        let invalid = ScramError::InvalidVerifier;
        let rest = s
            .strip_prefix(VERIFIER_PREFIX)
            .ok_or(invalid("not a SCRAM-SHA-256 verifier"))?;
        let (parameters, keys) = rest.split_once('$').ok_or(invalid("missing keys"))?;
        let (iterations, salt) = parameters.split_once(':').ok_or(invalid("missing salt"))?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(invalid("missing server key"))?;
        let iterations = parse_iterations(iterations.as_bytes())
            .filter(|&n| n >= 1)
            .ok_or(invalid("bad iteration count"))?;
        let salt = STANDARD
            .decode(salt)
            .ok()
            .filter(|salt| !salt.is_empty())
            .ok_or(invalid("bad salt"))?;
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_key(stored_key.as_bytes()).ok_or(invalid("bad stored key"))?,
            server_key: decode_key(server_key.as_bytes()).ok_or(invalid("bad server key"))?,
        })
    }

    /// A new verifier for `password` with a random 16-byte salt (PostgreSQL uses
    /// [`DEFAULT_ITERATIONS`]).
    pub fn generate(password: &str, iterations: u32) -> Self {
        let mut salt = vec![0; SALT_LEN];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::from_password(password, salt, iterations)
    }

    /// A deterministic fake verifier for a user that does not exist, derived from `user` and a
    /// per-process secret: every attempt for the same user sees the same salt and iteration
    /// count, so a failed login for an unknown user looks like one for a known user. No password
    /// matches it (that would take a SHA-256 preimage).
    pub fn dummy(user: &str, process_secret: &[u8]) -> Self {
        let derive = |label: &[u8]| hmac_sha256(process_secret, &[label, user.as_bytes()]);
        ScramVerifier {
            iterations: DEFAULT_ITERATIONS,
            salt: derive(b"pgweir dummy SCRAM salt\0")[..SALT_LEN].to_vec(),
            stored_key: derive(b"pgweir dummy SCRAM stored key\0"),
            server_key: derive(b"pgweir dummy SCRAM server key\0"),
        }
    }

    /// Checks a cleartext password against the verifier (constant-time comparison), for
    /// cleartext password authentication over TLS. Costs one PBKDF2 run.
    pub fn verify_password(&self, password: &str) -> bool {
        let salted = hi(saslprep(password).as_bytes(), &self.salt, self.iterations);
        let stored_key = sha256(&client_key(&salted));
        stored_key.ct_eq(&self.stored_key).into()
    }

    /// The verifier of `password` with the given salt and iteration count.
    fn from_password(password: &str, salt: Vec<u8>, iterations: u32) -> Self {
        let salted = hi(saslprep(password).as_bytes(), &salt, iterations);
        ScramVerifier {
            iterations,
            salt,
            stored_key: sha256(&client_key(&salted)),
            server_key: server_key(&salted),
        }
    }
}

impl fmt::Display for ScramVerifier {
    /// PostgreSQL's format, as accepted by [`ScramVerifier::parse`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{VERIFIER_PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt", &STANDARD.encode(&self.salt))
            .finish_non_exhaustive()
    }
}

/// Server side of a SCRAM-SHA-256 exchange (pgweir verifying a client), with PostgreSQL's
/// semantics.
pub struct ScramServer {
    verifier: ScramVerifier,
    /// `tls-server-end-point` channel binding data when the client connection uses TLS.
    channel_binding: Option<Vec<u8>>,
    state: ServerState,
}

/// Where a [`ScramServer`] exchange stands.
enum ServerState {
    /// Waiting for SASLInitialResponse.
    AwaitingClientFirst,
    /// server-first-message sent; waiting for client-final-message.
    AwaitingClientFinal(ServerExchange),
    /// Succeeded or failed; no further messages are accepted.
    Finished,
}

/// What the server remembers between the two client messages.
struct ServerExchange {
    /// The expected decoded `c=` attribute: GS2 header followed by channel binding data if used.
    channel_binding_input: Vec<u8>,
    client_first_bare: Vec<u8>,
    server_first: Vec<u8>,
    /// Client nonce followed by server nonce.
    nonce: Vec<u8>,
}

impl ScramServer {
    /// Starts an exchange against `verifier`. `channel_binding` is `Some(hash)` when the client
    /// connection uses TLS: the `tls-server-end-point` binding data (the SHA-256 hash of the
    /// server certificate, computed by the caller). `None` on plain TCP.
    pub fn new(verifier: ScramVerifier, channel_binding: Option<Vec<u8>>) -> Self {
        ScramServer {
            verifier,
            channel_binding,
            state: ServerState::AwaitingClientFirst,
        }
    }

    /// Mechanisms to advertise in AuthenticationSASL: `SCRAM-SHA-256-PLUS` first when channel
    /// binding is available.
    pub fn mechanisms(&self) -> Vec<&'static str> {
        if self.channel_binding.is_some() {
            vec![SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        } else {
            vec![SCRAM_SHA_256]
        }
    }

    /// Handles SASLInitialResponse: the selected `mechanism` and the client-first-message.
    /// Returns the server-first-message.
    ///
    /// The GS2 header must agree with the mechanism and with what was offered: `p=` only with
    /// `SCRAM-SHA-256-PLUS` and only `tls-server-end-point`; `y` (client supports channel binding
    /// but thinks the server does not) is rejected when the server does support it, since that
    /// is a downgrade attack. The user name in `n=` is ignored, as PostgreSQL uses the startup
    /// packet's user; authorization identities and mandatory extensions are rejected.
    pub fn client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let mut raw_nonce = [0; RAW_NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut raw_nonce);
        self.client_first_with_nonce(mechanism, data, STANDARD.encode(raw_nonce).as_bytes())
    }

    /// [`Self::client_first`] with a given server nonce part.
    fn client_first_with_nonce(
        &mut self,
        mechanism: &str,
        data: &[u8],
        server_nonce: &[u8],
    ) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, ServerState::AwaitingClientFirst) {
            return Err(ScramError::OutOfOrder);
        }
        // Whatever happens below, this exchange cannot be restarted.
        self.state = ServerState::Finished;

        let offered_binding = self.channel_binding.as_deref();
        let binding = match mechanism {
            SCRAM_SHA_256 => None,
            SCRAM_SHA_256_PLUS => Some(offered_binding.ok_or(ScramError::UnsupportedMechanism)?),
            _ => return Err(ScramError::UnsupportedMechanism),
        };

        let mut gs2 = data.splitn(3, |&b| b == b',');
        let flag = gs2.next().unwrap_or_default();
        let authzid = gs2
            .next()
            .ok_or(ScramError::Malformed("incomplete GS2 header"))?;
        let bare = gs2
            .next()
            .ok_or(ScramError::Malformed("incomplete GS2 header"))?;
        let gs2_header = &data[..data.len() - bare.len()];

        let binding_data: &[u8] = match (flag, binding) {
            (b"n" | b"y", Some(_)) => {
                return Err(ScramError::ChannelBindingNegotiation(
                    "the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not \
                     include channel binding data",
                ))
            }
            (b"y", None) if offered_binding.is_some() => {
                return Err(ScramError::ChannelBindingNegotiation(
                    "the client supports SCRAM channel binding but thinks the server does not; \
                     however, this server does support channel binding",
                ))
            }
            (b"n" | b"y", None) => &[],
            ([b'p', b'=', ..], None) => {
                return Err(ScramError::ChannelBindingNegotiation(
                    "the client selected SCRAM-SHA-256 without channel binding, but the SCRAM \
                     message includes channel binding data",
                ))
            }
            ([b'p', b'=', cb_type @ ..], Some(binding)) => {
                if cb_type != CHANNEL_BINDING_TYPE {
                    return Err(ScramError::Unsupported("channel binding type"));
                }
                binding
            }
            _ => return Err(ScramError::Malformed("unexpected channel binding flag")),
        };
        match authzid {
            b"" => {}
            [b'a', b'=', ..] => return Err(ScramError::Unsupported("authorization identity")),
            _ => return Err(ScramError::Malformed("unexpected authorization identity")),
        }

        let mut attrs = bare.split(|&b| b == b',');
        match attrs.next() {
            Some([b'm', b'=', ..]) => return Err(ScramError::Unsupported("mandatory extension")),
            // The user name is ignored: PostgreSQL authenticates the startup packet's user.
            Some([b'n', b'=', ..]) => {}
            _ => return Err(ScramError::Malformed("expected user name attribute")),
        }
        let client_nonce = expect_attr(attrs.next(), b'r', "expected nonce attribute")?;
        if !is_printable(client_nonce) {
            return Err(ScramError::Malformed("invalid client nonce"));
        }
        skip_extensions(attrs)?;

        let nonce = [client_nonce, server_nonce].concat();
        let mut server_first = Vec::with_capacity(nonce.len() + 64);
        server_first.extend_from_slice(b"r=");
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(b",s=");
        server_first.extend_from_slice(STANDARD.encode(&self.verifier.salt).as_bytes());
        server_first.extend_from_slice(format!(",i={}", self.verifier.iterations).as_bytes());

        self.state = ServerState::AwaitingClientFinal(ServerExchange {
            channel_binding_input: [gs2_header, binding_data].concat(),
            client_first_bare: bare.to_vec(),
            server_first: server_first.clone(),
            nonce,
        });
        Ok(server_first)
    }

    /// Handles SASLResponse with the client-final-message: checks the channel binding attribute
    /// (base64 of the GS2 header plus channel binding data), the nonce and the proof (constant
    /// time). Returns the server-final-message (`v=...`) on success and
    /// [`ScramError::InvalidProof`] when the password is wrong.
    pub fn client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let exchange = match std::mem::replace(&mut self.state, ServerState::Finished) {
            ServerState::AwaitingClientFinal(exchange) => exchange,
            _ => return Err(ScramError::OutOfOrder),
        };

        let (without_proof, proof) = split_proof(data)?;
        let mut attrs = without_proof.split(|&b| b == b',');
        let channel_binding = expect_attr(attrs.next(), b'c', "expected channel binding")?;
        let channel_binding = STANDARD
            .decode(channel_binding)
            .map_err(|_| ScramError::Malformed("invalid channel binding encoding"))?;
        if channel_binding != exchange.channel_binding_input {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if expect_attr(attrs.next(), b'r', "expected nonce attribute")? != exchange.nonce {
            return Err(ScramError::NonceMismatch);
        }
        skip_extensions(attrs)?;
        let proof = decode_key(proof).ok_or(ScramError::Malformed("invalid proof"))?;

        let auth_message = [
            &exchange.client_first_bare[..],
            b",",
            &exchange.server_first,
            b",",
            without_proof,
        ]
        .concat();
        let client_signature = hmac_sha256(&self.verifier.stored_key, &[&auth_message]);
        let client_key = xor(&proof, &client_signature);
        if !bool::from(sha256(&client_key).ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac_sha256(&self.verifier.server_key, &[&auth_message]);
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ServerState::AwaitingClientFirst => "AwaitingClientFirst",
            ServerState::AwaitingClientFinal(_) => "AwaitingClientFinal",
            ServerState::Finished => "Finished",
        };
        f.debug_struct("ScramServer")
            .field("channel_binding", &self.channel_binding.is_some())
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

/// Client side of a SCRAM-SHA-256 exchange (pgweir logging in to a backend), without channel
/// binding.
pub struct ScramClient {
    /// Client nonce (printable base64).
    nonce: String,
    state: ClientState,
}

/// Where a [`ScramClient`] exchange stands.
enum ClientState {
    /// Waiting for server-first-message; holds the SASLprepped password.
    AwaitingServerFirst { password: Vec<u8> },
    /// client-final-message sent; holds the expected server signature.
    AwaitingServerFinal { server_signature: [u8; KEY_LEN] },
    /// Succeeded or failed; no further messages are accepted.
    Finished,
}

impl ScramClient {
    /// Starts an exchange for `password` with a random nonce and no channel binding (GS2 header
    /// `n,,`).
    pub fn new(password: &str) -> Self {
        let mut raw_nonce = [0; RAW_NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut raw_nonce);
        Self::with_nonce(password, STANDARD.encode(raw_nonce))
    }

    /// [`Self::new`] with a given nonce.
    fn with_nonce(password: &str, nonce: String) -> Self {
        ScramClient {
            nonce,
            state: ClientState::AwaitingServerFirst {
                password: saslprep(password).as_bytes().to_vec(),
            },
        }
    }

    /// The SASL mechanism this client uses: [`SCRAM_SHA_256`].
    pub fn mechanism(&self) -> &'static str {
        SCRAM_SHA_256
    }

    /// The client-first-message, `n,,n=,r=<nonce>` (PostgreSQL ignores the user name here).
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare()).into_bytes()
    }

    /// Parses the server-first-message (`r=`, `s=`, `i=`; the nonce must extend ours, the
    /// iteration count must be in `1..=MAX_ITERATIONS`) and returns the client-final-message.
    pub fn server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let password = match std::mem::replace(&mut self.state, ClientState::Finished) {
            ClientState::AwaitingServerFirst { password } => password,
            _ => return Err(ScramError::OutOfOrder),
        };

        let mut attrs = data.split(|&b| b == b',');
        let nonce = match attrs.next() {
            Some([b'm', b'=', ..]) => return Err(ScramError::Unsupported("mandatory extension")),
            item => expect_attr(item, b'r', "expected nonce attribute")?,
        };
        if !is_printable(nonce) {
            return Err(ScramError::Malformed("invalid server nonce"));
        }
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(self.nonce.as_bytes()) {
            return Err(ScramError::NonceMismatch);
        }
        let salt = expect_attr(attrs.next(), b's', "expected salt attribute")?;
        let salt = STANDARD
            .decode(salt)
            .ok()
            .filter(|salt| !salt.is_empty())
            .ok_or(ScramError::Malformed("invalid salt"))?;
        let iterations = expect_attr(attrs.next(), b'i', "expected iteration count")?;
        let iterations = parse_iterations(iterations)
            .filter(|n| (1..=MAX_ITERATIONS).contains(n))
            .ok_or(ScramError::Malformed("invalid iteration count"))?;
        if attrs.next().is_some() {
            return Err(ScramError::Malformed(
                "garbage at end of server-first-message",
            ));
        }

        let salted = salted_password(&password, &salt, iterations);
        let client_key = client_key(&salted);
        let stored_key = sha256(&client_key);
        let mut client_final = b"c=biws,r=".to_vec();
        client_final.extend_from_slice(nonce);
        let auth_message = [
            self.client_first_bare().as_bytes(),
            b",",
            data,
            b",",
            &client_final,
        ]
        .concat();
        let proof = xor(&client_key, &hmac_sha256(&stored_key, &[&auth_message]));
        client_final.extend_from_slice(b",p=");
        client_final.extend_from_slice(STANDARD.encode(proof).as_bytes());

        self.state = ClientState::AwaitingServerFinal {
            server_signature: hmac_sha256(&server_key(&salted), &[&auth_message]),
        };
        Ok(client_final)
    }

    /// Verifies the server-final-message's `v=` signature (constant time). Fails on a mismatch
    /// or when the server reports an error with `e=`.
    pub fn server_final(&mut self, data: &[u8]) -> Result<(), ScramError> {
        let expected = match std::mem::replace(&mut self.state, ClientState::Finished) {
            ClientState::AwaitingServerFinal { server_signature } => server_signature,
            _ => return Err(ScramError::OutOfOrder),
        };
        if let Some(reason) = data.strip_prefix(b"e=") {
            return Err(ScramError::ServerError(
                String::from_utf8_lossy(reason).into_owned(),
            ));
        }
        let signature = data
            .strip_prefix(b"v=")
            .ok_or(ScramError::Malformed("expected server signature"))?;
        let signature =
            decode_key(signature).ok_or(ScramError::Malformed("invalid server signature"))?;
        if bool::from(signature.ct_eq(&expected)) {
            Ok(())
        } else {
            Err(ScramError::InvalidServerSignature)
        }
    }

    /// client-first-message-bare: empty user name and our nonce.
    fn client_first_bare(&self) -> String {
        format!("n=,r={}", self.nonce)
    }
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ClientState::AwaitingServerFirst { .. } => "AwaitingServerFirst",
            ClientState::AwaitingServerFinal { .. } => "AwaitingServerFinal",
            ClientState::Finished => "Finished",
        };
        f.debug_struct("ScramClient")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

/// `SaltedPassword = Hi(password, salt, iterations)` (PBKDF2-HMAC-SHA-256), cached process-wide
/// so repeated backend logins with the same password, salt and iteration count skip the work.
///
/// `password` must already be normalised (SASLprep). The cache keeps at most about 1024 entries
/// and is cleared when full; entries are keyed by a SHA-256 digest of the inputs.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let cache = salted_password_cache();
    let key = sha256_parts(&[
        &(password.len() as u64).to_be_bytes(),
        password,
        &(salt.len() as u64).to_be_bytes(),
        salt,
        &iterations.to_be_bytes(),
    ]);
    if let Some(hit) = cache.get(&key) {
        return *hit;
    }
    let salted = hi(password, salt, iterations);
    if cache.len() >= SALTED_PASSWORD_CACHE_CAPACITY {
        cache.clear();
    }
    cache.insert(key, salted);
    salted
}

/// The cache behind [`salted_password`].
fn salted_password_cache() -> &'static DashMap<[u8; 32], [u8; 32]> {
    static CACHE: OnceLock<DashMap<[u8; 32], [u8; 32]>> = OnceLock::new();
    CACHE.get_or_init(DashMap::new)
}

/// SASLprep as PostgreSQL applies it: fall back to the raw password when SASLprep fails or
/// leaves nothing.
fn saslprep(password: &str) -> Cow<'_, str> {
    match stringprep::saslprep(password) {
        Ok(prepared) if !prepared.is_empty() => prepared,
        _ => Cow::Borrowed(password),
    }
}

/// `Hi()` of RFC 5802, uncached.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; KEY_LEN] {
    pbkdf2::pbkdf2_hmac_array::<Sha256, KEY_LEN>(password, salt, iterations)
}

/// `ClientKey = HMAC(SaltedPassword, "Client Key")`.
fn client_key(salted_password: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    hmac_sha256(salted_password, &[b"Client Key"])
}

/// `ServerKey = HMAC(SaltedPassword, "Server Key")`.
fn server_key(salted_password: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    hmac_sha256(salted_password, &[b"Server Key"])
}

/// HMAC-SHA-256 of the concatenation of `parts`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; KEY_LEN] {
    Sha256::digest(data).into()
}

/// SHA-256 of the concatenation of `parts`.
fn sha256_parts(parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Byte-wise XOR of two keys.
fn xor(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// Decodes a base64 key, proof or signature of exactly 32 bytes.
fn decode_key(encoded: &[u8]) -> Option<[u8; KEY_LEN]> {
    STANDARD.decode(encoded).ok()?.try_into().ok()
}

/// Parses a decimal iteration count (digits only: no sign, no spaces).
fn parse_iterations(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The value of `item` if it is the attribute `name=value`.
fn expect_attr<'a>(
    item: Option<&'a [u8]>,
    name: u8,
    missing: &'static str,
) -> Result<&'a [u8], ScramError> {
    match item {
        Some([n, b'=', value @ ..]) if *n == name => Ok(value),
        _ => Err(ScramError::Malformed(missing)),
    }
}

/// Accepts and ignores optional extensions (`x=value` with a letter `x`), as PostgreSQL does.
fn skip_extensions<'a>(mut attrs: impl Iterator<Item = &'a [u8]>) -> Result<(), ScramError> {
    if attrs.all(|item| matches!(item, [n, b'=', ..] if n.is_ascii_alphabetic())) {
        Ok(())
    } else {
        Err(ScramError::Malformed("invalid attribute"))
    }
}

/// Splits client-final-message into client-final-message-without-proof and the base64 proof.
/// The proof is the first `p=` attribute and must be the last one.
fn split_proof(data: &[u8]) -> Result<(&[u8], &[u8]), ScramError> {
    let mut start = 0;
    for item in data.split(|&b| b == b',') {
        if let [b'p', b'=', proof @ ..] = item {
            if start == 0 {
                return Err(ScramError::Malformed("expected channel binding"));
            }
            if start + item.len() != data.len() {
                return Err(ScramError::Malformed("garbage after proof"));
            }
            return Ok((&data[..start - 1], proof));
        }
        start += item.len() + 1;
    }
    Err(ScramError::Malformed("missing proof"))
}

/// RFC 5802 `printable`: a non-empty run of ASCII 0x21..=0x7E other than `,`.
fn is_printable(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // RFC 7677 section 3 example exchange (user "user", password "pencil").
    const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                    p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
    const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    /// The RFC 7677 credentials in PostgreSQL's format (also in PostgreSQL's regression tests).
    const RFC_VERIFIER: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
                                WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:\
                                wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
    /// SaltedPassword of the RFC 7677 exchange (computed with Python's hashlib).
    const RFC_SALTED_PASSWORD: &str =
        "c4a49510323ab4f952cac1fa99441939e78ea74d6be81ddf7096e87513dc615d";

    /// The RFC 7677 exchange as [`ScramClient`] sends it, with an empty user name (computed with
    /// Python's hashlib/hmac).
    const CLIENT_KAT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                    p=qvT2SWdEH5Q06albL+hjSYuUhCG7VndFyzIb7CK4n9k=";
    const CLIENT_KAT_SERVER_FINAL: &str = "v=3HO6Qt1M4MKJrmlKaoOqLAI0/0TV0HZe7J9H3MBtSOg=";

    /// An exchange with `tls-server-end-point` channel binding, binding data
    /// SHA-256("certificate") (computed with Python's hashlib/hmac).
    const CB_CLIENT_FIRST: &str = "p=tls-server-end-point,,n=,r=clientnonce123";
    const CB_SERVER_NONCE: &str = "servernonce456";
    const CB_SERVER_FIRST: &str =
        "r=clientnonce123servernonce456,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CB_CLIENT_FINAL: &str = "c=cD10bHMtc2VydmVyLWVuZC1wb2ludCwsA9Zt0Ig1wco/EozOrNHzGslBYwlr\
                                   IPRFroQoW8CDLXI=,r=clientnonce123servernonce456,\
                                   p=rf95dMvlwxffV82hjFM5DocTpj1ODyMh3kR9r4LZ0Ds=";
    const CB_SERVER_FINAL: &str = "v=zeBNI+0+nXkZ9uLdi9yYxvErwaKKT/t/lTgq5dSWtKI=";

    /// Verifiers produced by PostgreSQL 15.18 (`password_encryption = scram-sha-256`) for
    /// `CREATE ROLE ... PASSWORD <password>`; the passwords exercise SASLprep.
    const PG15_VERIFIERS: &[(&str, &str)] = &[
        (
            "pencil",
            "SCRAM-SHA-256$4096:ahdh0X0BQDqbYQ8+UZlqDw==$++6j/nFH7YE5/Efe/5WK1m3PO5DKg0r7R/y0VOx/wOs=:QnbzlNEAQZ4GqoHut8r/qS7fKO+biTKfuGz4B9TYwqk=",
        ),
        (
            "a b",
            "SCRAM-SHA-256$4096:SL9K5lpIvZCfzZ6iEBy/TA==$9DfDrw8x2aHr5sm4Bh9yncJdZgHgDHiGbyVYMfyfX3c=:ymsRabQSMF4GJ6KICRhc/DGkMFETL9b2rePlx4+/Czo=",
        ),
        // Soft hyphen is mapped to nothing.
        (
            "I\u{AD}X",
            "SCRAM-SHA-256$4096:a3xCuhUlAUhjCVU6g1dUHw==$NqDGQTNx1BUG3Xwaknh8latOHv86j+rE6HWvB3GqNZ8=:fW95cBh34e2Gbkr9TsbiJqloNiRaoxWudA6yzucTRTM=",
        ),
        // ROMAN NUMERAL NINE becomes "IX" under NFKC.
        (
            "\u{2168}",
            "SCRAM-SHA-256$4096:z0x3KKDCuaYSPR5Rs6C/aA==$aFbGvXYugupXS0rGP69EuQBbNJodq8qIY8ZXoibgh54=:6ATGRMLBeAX7EcOnxaGS0sDDlGV70Pp3Q7qiVs4Gop4=",
        ),
        // NO-BREAK SPACE becomes a space.
        (
            "a\u{A0}b",
            "SCRAM-SHA-256$4096:ITXmcivxq8hM9zmdAZW5Gw==$UevwbtEj/8TwBh3vBXiKtwunL5SpwiUsgVYWDe/Y3Gk=:20vp880DP8MnSA7EuJEcEbgn0ZaDMjcQO6aq0ORZwEM=",
        ),
        // Combining diaeresis is composed under NFKC.
        (
            "pa\u{308}ss",
            "SCRAM-SHA-256$4096:X+NedXawkkCuWoAkQyjgrg==$lno3x66/Lx9TYHY6/uAZvKptzO8FpOCaP9cFbWAYbP0=:bohAq5bINoGl11O7VfCIH/+mHAbw0pmWxrDJ8c62HlM=",
        ),
        // ASCII control character: SASLprep fails (or PostgreSQL's ASCII fast path): raw bytes.
        (
            "a\u{7}b",
            "SCRAM-SHA-256$4096:XGBzftgpX9UEWzzT4Lnavw==$1twqKxoP9VVJa4fdLMxvLT7uc5Ab+cShl41BqCUYbPE=:hOG5Oi542gruXsnpmeBF+L9u7dxWRKCvoHmwbUfqgGw=",
        ),
        // Prohibited character after non-ASCII: SASLprep fails, raw bytes are used.
        (
            "\u{E9}\u{7}",
            "SCRAM-SHA-256$4096:vMS2lK+au0mMJjCfEdtrFQ==$p9fGrVs8elD1hoZNeL5ecztAiWzuQWC+e+qJHuqRrY4=:CrEivPm6QsMYuE7l/WR1wt0Q1yadcWuoopmxNvzGTDU=",
        ),
        // Mapped to the empty string: PostgreSQL uses the raw bytes.
        (
            "\u{AD}",
            "SCRAM-SHA-256$4096:pfgSCXGUZEyyhROZDrb76Q==$o/J5BSsZNxI1YUTOEt6iDq7LZnQS4i1iBLHsON9Sh50=:s+05BTf27E1Z/x3EGK9tYGbMbWwDCVPzQ1nBURXz4xA=",
        ),
    ];

    /// Asserts that `result` failed with the same variant as `expected` (the messages inside
    /// are for humans and not compared).
    #[track_caller]
    fn assert_variant<T: fmt::Debug>(
        result: Result<T, ScramError>,
        expected: &ScramError,
        context: &str,
    ) {
        match result {
            Err(error) if std::mem::discriminant(&error) == std::mem::discriminant(expected) => {}
            other => panic!("{context}: expected {expected:?}, got {other:?}"),
        }
    }

    fn rfc_verifier() -> ScramVerifier {
        ScramVerifier::parse(RFC_VERIFIER).expect("valid verifier")
    }

    fn server_after_first(
        channel_binding: Option<Vec<u8>>,
        mechanism: &str,
        client_first: &str,
    ) -> ScramServer {
        let mut server = ScramServer::new(rfc_verifier(), channel_binding);
        server
            .client_first_with_nonce(mechanism, client_first.as_bytes(), b"srv")
            .expect("client-first accepted");
        server
    }

    fn cb_data() -> Vec<u8> {
        sha256(b"certificate").to_vec()
    }

    /// Runs a whole exchange between [`ScramClient`] and [`ScramServer`].
    fn login(password: &str, verifier: ScramVerifier) -> Result<(), ScramError> {
        let mut client = ScramClient::new(password);
        let mut server = ScramServer::new(verifier, None);
        let server_first = server.client_first(client.mechanism(), &client.client_first())?;
        let client_final = client.server_first(&server_first)?;
        let server_final = server.client_final(&client_final)?;
        client.server_final(&server_final)
    }

    // ---- verifier ----

    #[test]
    fn verifier_from_rfc_credentials_matches_postgres_format() {
        let salt = STANDARD.decode(RFC_SALT).expect("base64");
        let verifier = ScramVerifier::from_password("pencil", salt, 4096);
        assert_eq!(verifier.to_string(), RFC_VERIFIER);
        assert_eq!(verifier, rfc_verifier());
    }

    #[test]
    fn postgres_verifiers_parse_roundtrip_and_verify() {
        for (password, encoded) in PG15_VERIFIERS {
            let verifier = ScramVerifier::parse(encoded).expect("valid verifier");
            assert_eq!(verifier.iterations, 4096);
            assert_eq!(verifier.salt.len(), 16);
            assert_eq!(&verifier.to_string(), encoded);
            assert!(verifier.verify_password(password), "{password:?}");
            assert!(
                !verifier.verify_password(&format!("{password}x")),
                "{password:?}"
            );
        }
    }

    #[test]
    fn saslprep_equivalent_passwords_verify() {
        let verifier = |password: &str| {
            let (_, encoded) = PG15_VERIFIERS
                .iter()
                .find(|(p, _)| *p == password)
                .expect("known password");
            ScramVerifier::parse(encoded).expect("valid verifier")
        };
        assert!(verifier("I\u{AD}X").verify_password("IX"));
        assert!(verifier("\u{2168}").verify_password("IX"));
        assert!(verifier("a\u{A0}b").verify_password("a b"));
        assert!(verifier("a b").verify_password("a\u{2003}b"));
        assert!(verifier("pa\u{308}ss").verify_password("p\u{E4}ss"));
        // Raw fallbacks: nothing else is equivalent.
        assert!(!verifier("\u{AD}").verify_password(""));
        assert!(!verifier("a\u{7}b").verify_password("ab"));
    }

    #[test]
    fn verifier_parse_rejects_malformed_input() {
        let key = STANDARD.encode([7u8; 32]);
        let short_key = STANDARD.encode([7u8; 31]);
        let long_key = STANDARD.encode([7u8; 33]);
        let cases = [
            String::new(),
            "md53858f62230ac3c915f300c664312c63f".into(),
            format!("SCRAM-SHA-1$4096:c2FsdA==${key}:{key}"),
            format!("scram-sha-256$4096:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}$"),
            format!("SCRAM-SHA-256$4096${key}:{key}"),
            "SCRAM-SHA-256$4096:c2FsdA==".into(),
            format!("SCRAM-SHA-256$0:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$-1:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$+4096:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$ 4096:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$4096x:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$99999999999:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$4096:${key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA=${key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2F sdA==${key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${short_key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{long_key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==$!!!:{key}"),
        ];
        for case in cases {
            assert!(
                matches!(
                    ScramVerifier::parse(&case),
                    Err(ScramError::InvalidVerifier(_))
                ),
                "{case:?}"
            );
        }
    }

    #[test]
    fn generate_uses_random_salt_and_verifies() {
        let a = ScramVerifier::generate("correct horse", 64);
        let b = ScramVerifier::generate("correct horse", 64);
        assert_eq!(a.iterations, 64);
        assert_eq!(a.salt.len(), SALT_LEN);
        assert_ne!(a.salt, b.salt);
        assert_ne!(a.stored_key, b.stored_key);
        assert!(a.verify_password("correct horse"));
        assert!(!a.verify_password("correct horse "));
        assert!(!a.verify_password(""));
        assert_eq!(ScramVerifier::parse(&a.to_string()), Ok(a));
        // SASLprep applies when generating, too.
        assert!(ScramVerifier::generate("\u{2168}", 16).verify_password("IX"));
    }

    #[test]
    fn dummy_verifier_is_deterministic_per_user_and_secret() {
        let a = ScramVerifier::dummy("alice", b"process secret");
        assert_eq!(a, ScramVerifier::dummy("alice", b"process secret"));
        assert_ne!(a.salt, ScramVerifier::dummy("bob", b"process secret").salt);
        assert_ne!(a.salt, ScramVerifier::dummy("alice", b"other secret").salt);
        assert_eq!(a.iterations, DEFAULT_ITERATIONS);
        assert_eq!(a.salt.len(), SALT_LEN);
        assert_ne!(a.stored_key, a.server_key);
        assert_eq!(ScramVerifier::parse(&a.to_string()), Ok(a.clone()));
        assert!(!a.verify_password(""));
        assert!(!a.verify_password("alice"));
        // An exchange fails only at the proof, like a wrong password for a real user.
        assert_eq!(login("anything", a), Err(ScramError::InvalidProof));
    }

    #[test]
    fn debug_redacts_keys() {
        let verifier = rfc_verifier();
        let debug = format!("{verifier:?}");
        assert!(
            debug.contains("4096") && debug.contains(RFC_SALT),
            "{debug}"
        );
        assert!(
            !debug.contains(&STANDARD.encode(verifier.stored_key)),
            "{debug}"
        );
        assert!(
            !debug.contains(&STANDARD.encode(verifier.server_key)),
            "{debug}"
        );
        assert!(
            !debug.contains(&format!("{:?}", verifier.stored_key)),
            "{debug}"
        );
    }

    // ---- salted password ----

    #[test]
    fn salted_password_known_answer_and_cache() {
        let salt = STANDARD.decode(RFC_SALT).expect("base64");
        let expected: Vec<u8> = (0..RFC_SALTED_PASSWORD.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&RFC_SALTED_PASSWORD[i..i + 2], 16).expect("hex"))
            .collect();
        assert_eq!(hi(b"pencil", &salt, 4096).to_vec(), expected);
        assert_eq!(salted_password(b"pencil", &salt, 4096).to_vec(), expected);
        // Served from the cache the second time, same answer.
        assert_eq!(salted_password(b"pencil", &salt, 4096).to_vec(), expected);
        assert_ne!(salted_password(b"pencil", &salt, 4095).to_vec(), expected);
    }

    #[test]
    fn salted_password_cache_keys_are_unambiguous() {
        assert_eq!(salted_password(b"ab", b"c", 1), hi(b"ab", b"c", 1));
        assert_eq!(salted_password(b"a", b"bc", 1), hi(b"a", b"bc", 1));
        assert_ne!(
            salted_password(b"ab", b"c", 1),
            salted_password(b"a", b"bc", 1)
        );
    }

    #[test]
    fn salted_password_cache_is_bounded() {
        for i in 0..(2 * SALTED_PASSWORD_CACHE_CAPACITY as u32 + 10) {
            let password = i.to_be_bytes();
            assert_eq!(
                salted_password(&password, b"bounded", 1),
                hi(&password, b"bounded", 1)
            );
        }
        // Other tests may insert concurrently, so allow a little slack.
        assert!(salted_password_cache().len() <= SALTED_PASSWORD_CACHE_CAPACITY + 64);
    }

    // ---- server ----

    #[test]
    fn server_rfc7677_exchange() {
        let mut server = ScramServer::new(rfc_verifier(), None);
        let server_first = server
            .client_first_with_nonce(
                SCRAM_SHA_256,
                RFC_CLIENT_FIRST.as_bytes(),
                RFC_SERVER_NONCE.as_bytes(),
            )
            .expect("client-first accepted");
        assert_eq!(server_first, RFC_SERVER_FIRST.as_bytes());
        let server_final = server
            .client_final(RFC_CLIENT_FINAL.as_bytes())
            .expect("proof accepted");
        assert_eq!(server_final, RFC_SERVER_FINAL.as_bytes());
        // Finished: nothing more is accepted.
        assert_eq!(
            server.client_final(RFC_CLIENT_FINAL.as_bytes()),
            Err(ScramError::OutOfOrder)
        );
    }

    #[test]
    fn server_rejects_wrong_proof() {
        let proof = STANDARD
            .decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .expect("base64");
        for bit in [0, 7, 100, 255] {
            let mut tampered = proof.clone();
            tampered[bit / 8] ^= 1 << (bit % 8);
            let client_final = format!(
                "c=biws,r={RFC_CLIENT_NONCE}{RFC_SERVER_NONCE},p={}",
                STANDARD.encode(&tampered)
            );
            let mut server = ScramServer::new(rfc_verifier(), None);
            server
                .client_first_with_nonce(
                    SCRAM_SHA_256,
                    RFC_CLIENT_FIRST.as_bytes(),
                    RFC_SERVER_NONCE.as_bytes(),
                )
                .expect("client-first accepted");
            assert_eq!(
                server.client_final(client_final.as_bytes()),
                Err(ScramError::InvalidProof)
            );
        }
    }

    #[test]
    fn server_rejects_wrong_password_from_real_client() {
        assert_eq!(login("pencil", rfc_verifier()), Ok(()));
        assert_eq!(
            login("pencil ", rfc_verifier()),
            Err(ScramError::InvalidProof)
        );
        assert_eq!(login("", rfc_verifier()), Err(ScramError::InvalidProof));
    }

    #[test]
    fn server_auth_message_uses_client_user_name_bytes() {
        // The user name is ignored for authentication, but it is part of AuthMessage: the
        // RFC client proof must not verify once the name is changed.
        let mut server = ScramServer::new(rfc_verifier(), None);
        server
            .client_first_with_nonce(
                SCRAM_SHA_256,
                b"n,,n=someone,r=rOprNGfwEbeRWgbNEkqO",
                RFC_SERVER_NONCE.as_bytes(),
            )
            .expect("client-first accepted");
        assert_eq!(
            server.client_final(RFC_CLIENT_FINAL.as_bytes()),
            Err(ScramError::InvalidProof)
        );
    }

    #[test]
    fn server_channel_binding_exchange() {
        let mut server = ScramServer::new(rfc_verifier(), Some(cb_data()));
        let server_first = server
            .client_first_with_nonce(
                SCRAM_SHA_256_PLUS,
                CB_CLIENT_FIRST.as_bytes(),
                CB_SERVER_NONCE.as_bytes(),
            )
            .expect("client-first accepted");
        assert_eq!(server_first, CB_SERVER_FIRST.as_bytes());
        assert_eq!(
            server.client_final(CB_CLIENT_FINAL.as_bytes()),
            Ok(CB_SERVER_FINAL.as_bytes().to_vec())
        );
    }

    #[test]
    fn server_rejects_wrong_channel_binding_data() {
        // Same client messages, but the server's certificate hash differs (e.g. a MITM).
        let mut server = ScramServer::new(rfc_verifier(), Some(sha256(b"other").to_vec()));
        server
            .client_first_with_nonce(
                SCRAM_SHA_256_PLUS,
                CB_CLIENT_FIRST.as_bytes(),
                CB_SERVER_NONCE.as_bytes(),
            )
            .expect("client-first accepted");
        assert_eq!(
            server.client_final(CB_CLIENT_FINAL.as_bytes()),
            Err(ScramError::ChannelBindingMismatch)
        );

        // c= must carry the GS2 header actually sent, plus the binding data for "p".
        let nonce = "clientnonce123srv";
        let plus_header_only = STANDARD.encode("p=tls-server-end-point,,");
        let plus = |c: &str| format!("c={c},r={nonce},p={}", STANDARD.encode([0u8; 32]));
        for c in ["biws", "eSws", plus_header_only.as_str()] {
            let mut server =
                server_after_first(Some(cb_data()), SCRAM_SHA_256_PLUS, CB_CLIENT_FIRST);
            assert_eq!(
                server.client_final(plus(c).as_bytes()),
                Err(ScramError::ChannelBindingMismatch),
                "{c}"
            );
        }
        for (client_first, c) in [("n,,n=,r=abc", "eSws"), ("y,,n=,r=abc", "biws")] {
            let mut server = server_after_first(None, SCRAM_SHA_256, client_first);
            let client_final = format!("c={c},r=abcsrv,p={}", STANDARD.encode([0u8; 32]));
            assert_eq!(
                server.client_final(client_final.as_bytes()),
                Err(ScramError::ChannelBindingMismatch),
                "{client_first}"
            );
        }
    }

    #[test]
    fn server_mechanisms() {
        let plain = ScramServer::new(rfc_verifier(), None);
        assert_eq!(plain.mechanisms(), vec![SCRAM_SHA_256]);
        let tls = ScramServer::new(rfc_verifier(), Some(cb_data()));
        assert_eq!(tls.mechanisms(), vec![SCRAM_SHA_256_PLUS, SCRAM_SHA_256]);
    }

    #[test]
    fn server_gs2_header_negotiation() {
        use ScramError::{ChannelBindingNegotiation, Unsupported, UnsupportedMechanism};
        const CB: &str = "p=tls-server-end-point,,n=,r=abc";
        let negotiation = Some(ChannelBindingNegotiation(""));
        // (TLS?, mechanism, client-first, expected error)
        let cases = [
            // Plain TCP.
            (false, SCRAM_SHA_256, "n,,n=,r=abc", None),
            (false, SCRAM_SHA_256, "y,,n=,r=abc", None),
            (false, SCRAM_SHA_256, CB, negotiation.clone()),
            (false, SCRAM_SHA_256_PLUS, CB, Some(UnsupportedMechanism)),
            (
                false,
                SCRAM_SHA_256_PLUS,
                "n,,n=,r=abc",
                Some(UnsupportedMechanism),
            ),
            // TLS: the client may decline channel binding, but must not claim we lack it.
            (true, SCRAM_SHA_256, "n,,n=,r=abc", None),
            (true, SCRAM_SHA_256, "y,,n=,r=abc", negotiation.clone()),
            (true, SCRAM_SHA_256, CB, negotiation.clone()),
            (true, SCRAM_SHA_256_PLUS, CB, None),
            (true, SCRAM_SHA_256_PLUS, "n,,n=,r=abc", negotiation.clone()),
            (true, SCRAM_SHA_256_PLUS, "y,,n=,r=abc", negotiation.clone()),
            (
                true,
                SCRAM_SHA_256_PLUS,
                "p=tls-unique,,n=,r=abc",
                Some(Unsupported("")),
            ),
            (
                true,
                SCRAM_SHA_256_PLUS,
                "p=,,n=,r=abc",
                Some(Unsupported("")),
            ),
            // Other mechanisms.
            (
                true,
                "SCRAM-SHA-1",
                "n,,n=,r=abc",
                Some(UnsupportedMechanism),
            ),
            (
                false,
                "scram-sha-256",
                "n,,n=,r=abc",
                Some(UnsupportedMechanism),
            ),
            (false, "", "n,,n=,r=abc", Some(UnsupportedMechanism)),
        ];
        for (tls, mechanism, client_first, expected) in cases {
            let mut server = ScramServer::new(rfc_verifier(), tls.then(cb_data));
            let result = server.client_first(mechanism, client_first.as_bytes());
            let context = format!("tls={tls} {mechanism} {client_first}");
            match expected {
                None => assert!(result.is_ok(), "{context}: {result:?}"),
                Some(expected) => assert_variant(result, &expected, &context),
            }
        }
    }

    #[test]
    fn server_rejects_malformed_client_first() {
        let malformed = ScramError::Malformed("");
        let unsupported = ScramError::Unsupported("");
        let cases: [(&[u8], &ScramError); 21] = [
            (b"", &malformed),
            (b"n", &malformed),
            (b"n,", &malformed),
            (b"n,,", &malformed),
            (b"x,,n=,r=abc", &malformed),
            (b"nn,,n=,r=abc", &malformed),
            (b"n,a=admin,n=,r=abc", &unsupported),
            (b"n,x,n=,r=abc", &malformed),
            (b"n,,m=ext,n=,r=abc", &unsupported),
            (b"n,,r=abc", &malformed),
            (b"n,,n=", &malformed),
            (b"n,,n=,", &malformed),
            (b"n,,n=,r=", &malformed),
            (b"n,,n=,r=a b", &malformed),
            (b"n,,n=,r=ab\x7f", &malformed),
            (b"n,,n=,r=ab\xc3\xa9", &malformed),
            (b"n,,n=,r=ab\0", &malformed),
            (b"n,,n=,s=abc", &malformed),
            (b"n,,n=,r=abc,", &malformed),
            (b"n,,n=,r=abc,x", &malformed),
            (b"n,,n=,r=abc,1=x", &malformed),
        ];
        for (client_first, expected) in cases {
            let mut server = ScramServer::new(rfc_verifier(), None);
            let result = server.client_first(SCRAM_SHA_256, client_first);
            assert_variant(result, expected, &String::from_utf8_lossy(client_first));
        }
    }

    #[test]
    fn server_accepts_user_names_and_extensions() {
        for client_first in [
            &b"n,,n=,r=abc"[..],
            b"n,,n=user,r=abc",
            b"n,,n=*,r=abc",
            b"n,,n=us=3Der,r=abc",
            b"n,,n=\xff\xfe,r=abc",
            b"n,,n=,r=abc,x=ext,Y=",
        ] {
            let mut server = ScramServer::new(rfc_verifier(), None);
            let server_first = server
                .client_first(SCRAM_SHA_256, client_first)
                .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(client_first)));
            assert!(server_first.starts_with(b"r=abc"));
        }
    }

    #[test]
    fn server_nonce_is_random_and_printable() {
        let mut nonces = Vec::new();
        for _ in 0..2 {
            let mut server = ScramServer::new(rfc_verifier(), None);
            let server_first = server
                .client_first(SCRAM_SHA_256, b"n,,n=,r=clientnonce")
                .expect("client-first accepted");
            let server_first = String::from_utf8(server_first).expect("ASCII");
            let (nonce, rest) = server_first.split_once(',').expect("three attributes");
            assert_eq!(rest, format!("s={RFC_SALT},i=4096"));
            let nonce = nonce
                .strip_prefix("r=clientnonce")
                .expect("client nonce first");
            assert_eq!(nonce.len(), 24);
            assert!(is_printable(nonce.as_bytes()));
            nonces.push(nonce.to_owned());
        }
        assert_ne!(nonces[0], nonces[1]);
    }

    #[test]
    fn server_rejects_malformed_client_final() {
        let nonce = format!("{RFC_CLIENT_NONCE}{RFC_SERVER_NONCE}");
        let proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let short_proof = STANDARD.encode([1u8; 31]);
        let cases: Vec<(String, ScramError)> = vec![
            (String::new(), ScramError::Malformed("")),
            ("p=".into(), ScramError::Malformed("")),
            (format!("p={proof}"), ScramError::Malformed("")),
            (format!("c=biws,r={nonce}"), ScramError::Malformed("")),
            (format!("c=biws,r={nonce},p="), ScramError::Malformed("")),
            (
                format!("c=biws,r={nonce},p={short_proof}"),
                ScramError::Malformed(""),
            ),
            (
                format!("c=biws,r={nonce},p=!!!!"),
                ScramError::Malformed(""),
            ),
            (
                format!("c=biws,r={nonce},p={proof},"),
                ScramError::Malformed(""),
            ),
            (
                format!("c=biws,r={nonce},p={proof},x=y"),
                ScramError::Malformed(""),
            ),
            (
                format!("c=biws,r={nonce},p={proof},p={proof}"),
                ScramError::Malformed(""),
            ),
            (
                format!("r={nonce},c=biws,p={proof}"),
                ScramError::Malformed(""),
            ),
            (format!("c=biws,p={proof}"), ScramError::Malformed("")),
            (
                format!("c=bi,r={nonce},p={proof}"),
                ScramError::Malformed(""),
            ),
            (
                format!("c=biws,r={nonce},x,p={proof}"),
                ScramError::Malformed(""),
            ),
            (
                format!("c=eSws,r={nonce},p={proof}"),
                ScramError::ChannelBindingMismatch,
            ),
            (
                format!("c=,r={nonce},p={proof}"),
                ScramError::ChannelBindingMismatch,
            ),
            (
                format!("c=biws,r={RFC_CLIENT_NONCE},p={proof}"),
                ScramError::NonceMismatch,
            ),
            (
                format!("c=biws,r={nonce}x,p={proof}"),
                ScramError::NonceMismatch,
            ),
            (format!("c=biws,r=,p={proof}"), ScramError::NonceMismatch),
        ];
        for (client_final, expected) in cases {
            let mut server = ScramServer::new(rfc_verifier(), None);
            server
                .client_first_with_nonce(
                    SCRAM_SHA_256,
                    RFC_CLIENT_FIRST.as_bytes(),
                    RFC_SERVER_NONCE.as_bytes(),
                )
                .expect("client-first accepted");
            let result = server.client_final(client_final.as_bytes());
            assert_variant(result, &expected, &client_final);
            // A failed exchange stays failed.
            assert_eq!(
                server.client_final(RFC_CLIENT_FINAL.as_bytes()),
                Err(ScramError::OutOfOrder)
            );
        }
    }

    #[test]
    fn server_accepts_extensions_before_proof() {
        // Extensions are part of client-final-message-without-proof, so only a real proof
        // computed over them would verify; the parser must get as far as the proof check.
        let nonce = format!("{RFC_CLIENT_NONCE}{RFC_SERVER_NONCE}");
        let client_final = format!("c=biws,r={nonce},x=ext,p={}", STANDARD.encode([0u8; 32]));
        let mut server = ScramServer::new(rfc_verifier(), None);
        server
            .client_first_with_nonce(
                SCRAM_SHA_256,
                RFC_CLIENT_FIRST.as_bytes(),
                RFC_SERVER_NONCE.as_bytes(),
            )
            .expect("client-first accepted");
        assert_eq!(
            server.client_final(client_final.as_bytes()),
            Err(ScramError::InvalidProof)
        );
    }

    #[test]
    fn server_steps_out_of_order() {
        let mut server = ScramServer::new(rfc_verifier(), None);
        assert_eq!(
            server.client_final(RFC_CLIENT_FINAL.as_bytes()),
            Err(ScramError::OutOfOrder)
        );

        let mut server = ScramServer::new(rfc_verifier(), None);
        server
            .client_first(SCRAM_SHA_256, RFC_CLIENT_FIRST.as_bytes())
            .expect("client-first accepted");
        assert_eq!(
            server.client_first(SCRAM_SHA_256, RFC_CLIENT_FIRST.as_bytes()),
            Err(ScramError::OutOfOrder)
        );

        // A rejected client-first cannot be retried.
        let mut server = ScramServer::new(rfc_verifier(), None);
        assert!(server.client_first(SCRAM_SHA_256, b"garbage").is_err());
        assert_eq!(
            server.client_first(SCRAM_SHA_256, RFC_CLIENT_FIRST.as_bytes()),
            Err(ScramError::OutOfOrder)
        );
        assert_eq!(
            server.client_final(RFC_CLIENT_FINAL.as_bytes()),
            Err(ScramError::OutOfOrder)
        );
        assert!(format!("{server:?}").contains("Finished"));
    }

    // ---- client ----

    #[test]
    fn client_known_answer_exchange() {
        let mut client = ScramClient::with_nonce("pencil", RFC_CLIENT_NONCE.to_owned());
        assert_eq!(client.mechanism(), SCRAM_SHA_256);
        assert_eq!(client.client_first(), b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
        let client_final = client
            .server_first(RFC_SERVER_FIRST.as_bytes())
            .expect("server-first accepted");
        assert_eq!(client_final, CLIENT_KAT_FINAL.as_bytes());
        assert_eq!(
            client.server_final(CLIENT_KAT_SERVER_FINAL.as_bytes()),
            Ok(())
        );
        assert_eq!(
            client.server_final(CLIENT_KAT_SERVER_FINAL.as_bytes()),
            Err(ScramError::OutOfOrder)
        );
    }

    #[test]
    fn client_and_server_agree_on_postgres_verifiers() {
        for (password, encoded) in PG15_VERIFIERS {
            let verifier = ScramVerifier::parse(encoded).expect("valid verifier");
            assert_eq!(login(password, verifier.clone()), Ok(()), "{password:?}");
            assert_eq!(
                login(&format!("{password}!"), verifier),
                Err(ScramError::InvalidProof),
                "{password:?}"
            );
        }
        // The client SASLpreps, too.
        let verifier = ScramVerifier::generate("IX", 16);
        assert_eq!(login("\u{2168}", verifier), Ok(()));
    }

    #[test]
    fn client_first_message_format() {
        let a = ScramClient::new("pw");
        let b = ScramClient::new("pw");
        let first = String::from_utf8(a.client_first()).expect("ASCII");
        let nonce = first
            .strip_prefix("n,,n=,r=")
            .expect("GS2 header and empty user");
        assert_eq!(nonce.len(), 24);
        assert!(is_printable(nonce.as_bytes()));
        // Stable for one client, random across clients.
        assert_eq!(a.client_first(), a.client_first());
        assert_ne!(a.client_first(), b.client_first());
        assert!(format!("{a:?}").contains("AwaitingServerFirst"));
        assert!(!format!("{a:?}").contains("pw"));
    }

    #[test]
    fn client_rejects_bad_server_first() {
        let salt = format!("s={RFC_SALT}");
        let r = format!("r={RFC_CLIENT_NONCE}srv");
        let cases: Vec<(String, ScramError)> = vec![
            (String::new(), ScramError::Malformed("")),
            (
                format!("m=ext,{r},{salt},i=4096"),
                ScramError::Unsupported(""),
            ),
            (format!("{salt},{r},i=4096"), ScramError::Malformed("")),
            (format!("r=other,{salt},i=4096"), ScramError::NonceMismatch),
            (
                format!("r={RFC_CLIENT_NONCE},{salt},i=4096"),
                ScramError::NonceMismatch,
            ),
            (
                format!("r=x{RFC_CLIENT_NONCE}srv,{salt},i=4096"),
                ScramError::NonceMismatch,
            ),
            (
                format!("r={RFC_CLIENT_NONCE}s v,{salt},i=4096"),
                ScramError::Malformed(""),
            ),
            (format!("{r},i=4096"), ScramError::Malformed("")),
            (format!("{r},s=,i=4096"), ScramError::Malformed("")),
            (format!("{r},s=!!!,i=4096"), ScramError::Malformed("")),
            (format!("{r},{salt}"), ScramError::Malformed("")),
            (format!("{r},{salt},i="), ScramError::Malformed("")),
            (format!("{r},{salt},i=0"), ScramError::Malformed("")),
            (format!("{r},{salt},i=-1"), ScramError::Malformed("")),
            (format!("{r},{salt},i=+4096"), ScramError::Malformed("")),
            (format!("{r},{salt},i=4096 "), ScramError::Malformed("")),
            (format!("{r},{salt},i=0x10"), ScramError::Malformed("")),
            (format!("{r},{salt},i=10000001"), ScramError::Malformed("")),
            (
                format!("{r},{salt},i=4294967296"),
                ScramError::Malformed(""),
            ),
            (format!("{r},{salt},i=4096,"), ScramError::Malformed("")),
            (
                format!("{r},{salt},i=4096,x=ext"),
                ScramError::Malformed(""),
            ),
        ];
        for (server_first, expected) in cases {
            let mut client = ScramClient::with_nonce("pencil", RFC_CLIENT_NONCE.to_owned());
            let result = client.server_first(server_first.as_bytes());
            assert_variant(result, &expected, &server_first);
            // A failed exchange stays failed.
            assert_eq!(
                client.server_first(RFC_SERVER_FIRST.as_bytes()),
                Err(ScramError::OutOfOrder)
            );
        }
    }

    #[test]
    fn client_accepts_a_single_iteration() {
        let mut client = ScramClient::with_nonce("pencil", "abc".to_owned());
        assert!(client.server_first(b"r=abcd,s=c2FsdA==,i=1").is_ok());
    }

    #[test]
    fn client_rejects_bad_server_final() {
        let cases: Vec<(&str, ScramError)> = vec![
            (
                "v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                ScramError::InvalidServerSignature,
            ),
            (RFC_SERVER_FINAL, ScramError::InvalidServerSignature),
            (
                "e=invalid-proof",
                ScramError::ServerError("invalid-proof".into()),
            ),
            ("", ScramError::Malformed("")),
            ("v=", ScramError::Malformed("")),
            ("v=!!!", ScramError::Malformed("")),
            (
                "v=3HO6Qt1M4MKJrmlKaoOqLAI0/0TV0HZe7J9H3MBtSOg",
                ScramError::Malformed(""),
            ),
            (
                "v=3HO6Qt1M4MKJrmlKaoOqLAI0/0TV0HZe7J9H3MBtSOg=,x=y",
                ScramError::Malformed(""),
            ),
            (
                "x=3HO6Qt1M4MKJrmlKaoOqLAI0/0TV0HZe7J9H3MBtSOg=",
                ScramError::Malformed(""),
            ),
        ];
        for (server_final, expected) in cases {
            let mut client = ScramClient::with_nonce("pencil", RFC_CLIENT_NONCE.to_owned());
            client
                .server_first(RFC_SERVER_FIRST.as_bytes())
                .expect("server-first accepted");
            let result = client.server_final(server_final.as_bytes());
            if let ScramError::ServerError(_) = expected {
                assert_eq!(result, Err(expected));
            } else {
                assert_variant(result, &expected, server_final);
            }
            assert_eq!(
                client.server_final(CLIENT_KAT_SERVER_FINAL.as_bytes()),
                Err(ScramError::OutOfOrder)
            );
        }
    }

    #[test]
    fn client_steps_out_of_order() {
        let mut client = ScramClient::new("pencil");
        assert_eq!(
            client.server_final(RFC_SERVER_FINAL.as_bytes()),
            Err(ScramError::OutOfOrder)
        );
        // The failed call above ended the exchange.
        assert_eq!(
            client.server_first(RFC_SERVER_FIRST.as_bytes()),
            Err(ScramError::OutOfOrder)
        );

        let mut client = ScramClient::with_nonce("pencil", RFC_CLIENT_NONCE.to_owned());
        client
            .server_first(RFC_SERVER_FIRST.as_bytes())
            .expect("server-first accepted");
        assert_eq!(
            client.server_first(RFC_SERVER_FIRST.as_bytes()),
            Err(ScramError::OutOfOrder)
        );
    }

    // ---- robustness ----

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn server_never_panics_on_client_first(
            data in proptest::collection::vec(any::<u8>(), 0..64),
            plus in any::<bool>(),
        ) {
            let mut server = ScramServer::new(rfc_verifier(), Some(cb_data()));
            let mechanism = if plus { SCRAM_SHA_256_PLUS } else { SCRAM_SHA_256 };
            let _ = server.client_first(mechanism, &data);
        }

        #[test]
        fn server_never_panics_on_client_final(
            data in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut server = ScramServer::new(rfc_verifier(), None);
            server
                .client_first_with_nonce(
                    SCRAM_SHA_256,
                    RFC_CLIENT_FIRST.as_bytes(),
                    RFC_SERVER_NONCE.as_bytes(),
                )
                .expect("client-first accepted");
            prop_assert!(server.client_final(&data).is_err());
        }

        #[test]
        fn server_never_panics_on_structured_client_final(
            c in "[a-zA-Z0-9+/=]{0,12}",
            r in "[ -~]{0,8}",
            p in "[a-zA-Z0-9+/=,]{0,50}",
        ) {
            let mut server = ScramServer::new(rfc_verifier(), None);
            server
                .client_first_with_nonce(SCRAM_SHA_256, b"n,,n=,r=a", b"b")
                .expect("client-first accepted");
            let client_final = format!("c={c},r={r},p={p}");
            prop_assert!(server.client_final(client_final.as_bytes()).is_err());
        }

        #[test]
        fn client_never_panics(
            first in proptest::collection::vec(any::<u8>(), 0..64),
            last in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut client = ScramClient::with_nonce("pencil", "n".to_owned());
            let _ = client.server_first(&first);
            let _ = client.server_final(&last);
        }

        #[test]
        fn mutated_messages_never_panic(index in 0usize..200, byte in any::<u8>()) {
            let mutate = |message: &str| {
                let mut bytes = message.as_bytes().to_vec();
                if let Some(b) = bytes.get_mut(index % message.len()) {
                    *b = byte;
                }
                bytes
            };
            let mut server = ScramServer::new(rfc_verifier(), None);
            if server
                .client_first_with_nonce(
                    SCRAM_SHA_256,
                    &mutate(RFC_CLIENT_FIRST),
                    RFC_SERVER_NONCE.as_bytes(),
                )
                .is_ok()
            {
                let _ = server.client_final(&mutate(RFC_CLIENT_FINAL));
            }
            let mut client = ScramClient::with_nonce("pencil", RFC_CLIENT_NONCE.to_owned());
            if client.server_first(&mutate(RFC_SERVER_FIRST)).is_ok() {
                let _ = client.server_final(&mutate(CLIENT_KAT_SERVER_FINAL));
            }
        }
    }
}
