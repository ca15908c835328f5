//! Messages pgweir writes itself, encoded with `pgwire`, and [`decode_one`]: the only way pgweir decodes a
//! frame into a typed message — exactly one frame, nothing left over, and a decoder panic contained.

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::response::{ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, Password,
    SASLInitialResponse, SASLResponse, SecretKey, Startup,
};
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};

use super::frame::HEADER_LEN;

/// A frame could not be decoded as the message it must be.
#[derive(Debug, thiserror::Error)]
#[error("malformed {what} message")]
pub struct DecodeError {
    pub what: &'static str,
}

/// Decodes exactly one complete frame (header included) as `M`. Fails if the decoder errors, panics, needs more
/// bytes than the frame holds or leaves bytes of the frame unread.
pub fn decode_one<M: Message>(frame: &[u8], what: &'static str) -> Result<M, DecodeError> {
    let err = DecodeError { what };
    let mut buf = BytesMut::from(frame);
    let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
    let result = catch_unwind(AssertUnwindSafe(|| M::decode(&mut buf, &ctx)));
    match result {
        Ok(Ok(Some(m))) if buf.is_empty() => Ok(m),
        _ => Err(err),
    }
}

fn encode<M: Message>(m: &M, out: &mut BytesMut) {
    // pgwire only fails to encode past its own per-type length limits, which pgweir's messages never reach.
    if let Err(e) = m.encode(out) {
        tracing::error!(error = %e, "could not encode a protocol message");
    }
}

pub fn auth_ok(out: &mut BytesMut) {
    encode(&Authentication::Ok, out);
}

pub fn auth_cleartext(out: &mut BytesMut) {
    encode(&Authentication::CleartextPassword, out);
}

pub fn auth_md5(salt: [u8; 4], out: &mut BytesMut) {
    encode(&Authentication::MD5Password(salt.to_vec()), out);
}

pub fn auth_sasl(mechanisms: &[&str], out: &mut BytesMut) {
    let m = mechanisms.iter().map(|s| s.to_string()).collect();
    encode(&Authentication::SASL(m), out);
}

pub fn auth_sasl_continue(data: Vec<u8>, out: &mut BytesMut) {
    encode(&Authentication::SASLContinue(Bytes::from(data)), out);
}

pub fn auth_sasl_final(data: Vec<u8>, out: &mut BytesMut) {
    encode(&Authentication::SASLFinal(Bytes::from(data)), out);
}

pub fn parameter_status(name: &str, value: &str, out: &mut BytesMut) {
    encode(
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
        out,
    );
}

pub fn backend_key_data(pid: i32, secret: i32, out: &mut BytesMut) {
    encode(&BackendKeyData::new(pid, SecretKey::I32(secret)), out);
}

pub fn ready_for_query(status: u8, out: &mut BytesMut) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    encode(&ReadyForQuery::new(status), out);
}

/// NegotiateProtocolVersion: pgweir speaks protocol 3.0 and lists the `_pq_.` options it does not know.
pub fn negotiate_protocol_version(unsupported: Vec<String>, out: &mut BytesMut) {
    encode(&NegotiateProtocolVersion::new(0, unsupported), out);
}

/// StartupMessage (protocol 3.0) for a backend connection.
pub fn startup<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>, out: &mut BytesMut) {
    let mut s = Startup::new();
    for (k, v) in params {
        s.parameters.insert(k.to_owned(), v.to_owned());
    }
    encode(&s, out);
}

pub fn password(password: &str, out: &mut BytesMut) {
    encode(&Password::new(password.to_owned()), out);
}

pub fn sasl_initial_response(mechanism: &str, data: Vec<u8>, out: &mut BytesMut) {
    encode(
        &SASLInitialResponse::new(mechanism.to_owned(), Some(Bytes::from(data))),
        out,
    );
}

pub fn sasl_response(data: Vec<u8>, out: &mut BytesMut) {
    encode(&SASLResponse::new(Bytes::from(data)), out);
}

/// Simple Query.
pub fn query(sql: &str, out: &mut BytesMut) {
    out.put_u8(b'Q');
    out.put_u32((4 + sql.len() + 1) as u32);
    out.put_slice(sql.as_bytes());
    out.put_u8(0);
}

pub fn terminate(out: &mut BytesMut) {
    out.put_slice(&[b'X', 0, 0, 0, 4]);
}

/// SSLRequest / GSSENCRequest answers are one byte.
pub const SSL_ALLOWED: u8 = b'S';
pub const SSL_REFUSED: u8 = b'N';

/// Reads a NUL-terminated string at the start of `buf`: (string bytes, rest after the NUL).
pub fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = find_nul(buf)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

/// The index of the first NUL byte. Names are often empty (a NUL first); texts (a Parse's SQL) are looked at eight
/// bytes at a time.
#[inline]
fn find_nul(buf: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    if *buf.first()? == 0 {
        return Some(0);
    }
    let mut i = 0;
    while let Some(Ok(word)) = buf.get(i..i + 8).map(<[u8; 8]>::try_from) {
        let w = u64::from_le_bytes(word);
        // The high bit of each zero byte is set (and maybe of bytes after one, through the borrow): the lowest
        // set bit is the first zero byte.
        let zeros = w.wrapping_sub(ONES) & !w & HIGH;
        if zeros != 0 {
            return Some(i + (zeros.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    buf[i..].iter().position(|&b| b == 0).map(|p| i + p)
}

/// The client's password-family message ('p') body as the message the auth step expects.
pub mod password_message {
    use super::*;

    /// SASLInitialResponse: mechanism and initial data.
    pub fn sasl_initial(frame: &[u8]) -> Option<(&str, &[u8])> {
        let body = frame.get(HEADER_LEN..)?;
        let (mech, rest) = cstr(body)?;
        let mech = std::str::from_utf8(mech).ok()?;
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        let data = &rest[4..];
        if len < 0 || len as usize != data.len() {
            return None;
        }
        Some((mech, data))
    }

    /// SASLResponse: the raw data.
    pub fn sasl_response(frame: &[u8]) -> Option<&[u8]> {
        frame.get(HEADER_LEN..)
    }

    /// PasswordMessage (cleartext or md5): the NUL-terminated string, which must end the frame.
    pub fn password(frame: &[u8]) -> Option<&[u8]> {
        let body = frame.get(HEADER_LEN..)?;
        match cstr(body)? {
            (pw, []) => Some(pw),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire::messages::response::ErrorResponse;
    use proptest::prelude::Just;

    #[test]
    fn decode_one_rejects_leftovers_and_contains_panics() {
        let mut out = BytesMut::new();
        parameter_status("TimeZone", "UTC", &mut out);
        let ps: ParameterStatus =
            decode_one(&out, "ParameterStatus").expect("an encoded ParameterStatus decodes");
        assert_eq!((ps.name.as_str(), ps.value.as_str()), ("TimeZone", "UTC"));

        // Authentication without its code panics inside pgwire: it must come back as an error.
        assert!(decode_one::<Authentication>(&[b'R', 0, 0, 0, 4], "Authentication").is_err());
        // An ErrorResponse without its final NUL.
        let bad = [b'E', 0, 0, 0, 8, b'S', b'X', 0, b'C'];
        assert!(decode_one::<ErrorResponse>(&bad, "ErrorResponse").is_err());
    }

    proptest::proptest! {
        /// The word-at-a-time search finds the first NUL wherever it is (or none), as a byte loop does.
        #[test]
        fn cstr_finds_the_first_nul(
            bytes in proptest::collection::vec(proptest::prop_oneof![Just(0u8), 1u8..=255, Just(0x80u8), Just(1u8)], 0..40),
        ) {
            let naive = bytes.iter().position(|&b| b == 0);
            proptest::prop_assert_eq!(find_nul(&bytes), naive);
            proptest::prop_assert_eq!(
                cstr(&bytes),
                naive.map(|n| (&bytes[..n], &bytes[n + 1..]))
            );
        }
    }

    #[test]
    fn password_messages() {
        let mut out = BytesMut::new();
        sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc".to_vec(), &mut out);
        assert_eq!(
            password_message::sasl_initial(&out),
            Some(("SCRAM-SHA-256", &b"n,,n=,r=abc"[..]))
        );
        let mut out = BytesMut::new();
        password("secret", &mut out);
        assert_eq!(password_message::password(&out), Some(&b"secret"[..]));
        assert_eq!(password_message::sasl_initial(&[b'p', 0, 0, 0, 4]), None);
    }
}
