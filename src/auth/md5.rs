//! PostgreSQL `md5` password authentication.
//!
//! PostgreSQL stores an md5 verifier as `"md5" + hex(md5(password ‖ user))` in `pg_authid`. For
//! `AuthenticationMD5Password` the server sends a 4-byte salt and the client answers with
//! `"md5" + hex(md5(hex(md5(password ‖ user)) ‖ salt))`, so a proxy that only knows the stored
//! verifier can check a client's answer — and log in to a backend with it, too.
//!
//! The password is used as raw bytes: unlike SCRAM, PostgreSQL does not SASLprep it for md5.

use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

/// Prefix of md5 verifiers and responses.
const PREFIX: &str = "md5";
/// Length of the hex digest that follows the prefix.
const HEX_LEN: usize = 32;

/// The verifier PostgreSQL stores in `pg_authid` for md5 authentication:
/// `"md5" + hex(md5(password ‖ user))`.
pub fn md5_verifier(password: &str, user: &str) -> String {
    md5_hex(&[password.as_bytes(), user.as_bytes()])
}

/// What a client sends in reply to `AuthenticationMD5Password`, computed from a stored verifier:
/// `"md5" + hex(md5(hex_part_of_verifier ‖ salt))`.
///
/// Returns `None` if `verifier` is not an md5 verifier (`"md5"` followed by 32 lowercase hex
/// digits, the same test PostgreSQL applies).
pub fn md5_response_from_verifier(verifier: &str, salt: [u8; 4]) -> Option<String> {
    let hex = verifier.strip_prefix(PREFIX)?;
    let well_formed = hex.len() == HEX_LEN
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    well_formed.then(|| md5_hex(&[hex.as_bytes(), &salt]))
}

/// The reply to `AuthenticationMD5Password` for `user` logging in with `password` (used when pgweir
/// logs in to a backend).
pub fn md5_client_response(password: &str, user: &str, salt: [u8; 4]) -> String {
    let verifier = md5_verifier(password, user);
    md5_hex(&[&verifier.as_bytes()[PREFIX.len()..], &salt])
}

/// Checks a client's md5 response (the password message contents, without the trailing NUL)
/// against a stored verifier, in constant time. A malformed verifier never matches.
pub fn md5_check(verifier: &str, salt: [u8; 4], client_response: &[u8]) -> bool {
    match md5_response_from_verifier(verifier, salt) {
        Some(expected) => expected.as_bytes().ct_eq(client_response).into(),
        None => false,
    }
}

/// `"md5" + hex(md5(parts concatenated))`, lowercase hex as PostgreSQL writes it.
fn md5_hex(parts: &[&[u8]]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut out = String::with_capacity(PREFIX.len() + HEX_LEN);
    out.push_str(PREFIX);
    for byte in digest {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `md5("foobar")`: what PostgreSQL 15 stores for `CREATE ROLE bar PASSWORD 'foo'` under
    /// `password_encryption = md5`.
    const FOO_BAR: &str = "md53858f62230ac3c915f300c664312c63f";
    /// Stored by PostgreSQL 15 for `CREATE ROLE md5u PASSWORD 'secret'`.
    const SECRET_MD5U: &str = "md5ad16ab8cb9f9946be08171afa599199d";

    #[test]
    fn verifier_known_answers() {
        assert_eq!(md5_verifier("foo", "bar"), FOO_BAR);
        assert_eq!(md5_verifier("secret", "md5u"), SECRET_MD5U);
        // md5("") — the empty password with the empty user name.
        assert_eq!(md5_verifier("", ""), "md5d41d8cd98f00b204e9800998ecf8427e");
    }

    #[test]
    fn verifier_uses_raw_bytes_without_saslprep() {
        // U+2168 would become "IX" under SASLprep; md5 must hash the UTF-8 bytes as they are.
        assert_ne!(md5_verifier("\u{2168}", "u"), md5_verifier("IX", "u"));
    }

    #[test]
    fn response_known_answers() {
        // Cross-checked with Python's hashlib.
        assert_eq!(
            md5_response_from_verifier(FOO_BAR, [1, 2, 3, 4]).as_deref(),
            Some("md56e4f0b50f7277feb74acbf2a7734c9cb")
        );
        assert_eq!(
            md5_response_from_verifier(SECRET_MD5U, [0xde, 0xad, 0xbe, 0xef]).as_deref(),
            Some("md51b70f2fb6b58445dee3a2435febe5d7a")
        );
        assert_eq!(
            md5_client_response("secret", "md5u", [0xde, 0xad, 0xbe, 0xef]),
            "md51b70f2fb6b58445dee3a2435febe5d7a"
        );
    }

    #[test]
    fn client_response_matches_response_from_verifier() {
        for salt in [[0, 0, 0, 0], [0xff; 4], [7, 0, 0xa5, 42]] {
            let verifier = md5_verifier("pässwörd", "üser");
            assert_eq!(
                Some(md5_client_response("pässwörd", "üser", salt)),
                md5_response_from_verifier(&verifier, salt)
            );
        }
    }

    #[test]
    fn malformed_verifiers_are_rejected() {
        let malformed = [
            "",
            "md5",
            "3858f62230ac3c915f300c664312c63f",
            "md53858f62230ac3c915f300c664312c63",
            "md53858f62230ac3c915f300c664312c63f0",
            "md53858F62230AC3C915F300C664312C63F",
            "md53858f62230ac3c915f300c664312c63g",
            "MD53858f62230ac3c915f300c664312c63f",
            "md5 858f62230ac3c915f300c664312c63f",
            "md53858f62230ac3c915f300c664312c6é",
            "SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5",
        ];
        for verifier in malformed {
            assert_eq!(
                md5_response_from_verifier(verifier, [1, 2, 3, 4]),
                None,
                "{verifier:?}"
            );
            assert!(!md5_check(verifier, [1, 2, 3, 4], b""), "{verifier:?}");
        }
    }

    #[test]
    fn check_accepts_right_and_rejects_wrong_responses() {
        let salt = [9, 8, 7, 6];
        let good = md5_client_response("foo", "bar", salt);
        assert!(md5_check(FOO_BAR, salt, good.as_bytes()));

        let wrong_password = md5_client_response("fo0", "bar", salt);
        let wrong_salt = md5_client_response("foo", "bar", [9, 8, 7, 7]);
        let upper = good.to_uppercase();
        let mut with_nul = good.clone().into_bytes();
        with_nul.push(0);
        let rejected: [&[u8]; 7] = [
            wrong_password.as_bytes(),
            wrong_salt.as_bytes(),
            &with_nul,
            &good.as_bytes()[..good.len() - 1],
            upper.as_bytes(),
            FOO_BAR.as_bytes(),
            b"",
        ];
        for response in rejected {
            assert!(!md5_check(FOO_BAR, salt, response), "{response:?}");
        }
    }
}
