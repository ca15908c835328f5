//! Startup-phase packets: they have no tag, only a length and a 32-bit code. Bounded in size and in the number of
//! parameters; anything malformed is a protocol violation.

use bytes::{Buf, BytesMut};
use tokio::io::AsyncRead;

use super::msg::cstr;
use super::PgError;

pub const CANCEL_REQUEST_CODE: u32 = 80877102;
pub const SSL_REQUEST_CODE: u32 = 80877103;
pub const GSSENC_REQUEST_CODE: u32 = 80877104;

/// Postgres' own bound for startup-phase packets (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// At most this many startup parameters.
pub const MAX_STARTUP_PARAMS: usize = 64;

/// The first packet(s) a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: Vec<u8> },
    Startup(StartupMessage),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartupMessage {
    /// Requested minor protocol version (the major is always 3).
    pub minor_version: u16,
    /// Parameters in the order the client sent them (`_pq_.*` protocol options excluded).
    pub params: Vec<(String, String)>,
    /// `_pq_.*` protocol extension options the client asked for; pgweir supports none.
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one startup-phase packet (length-prefixed, no tag) through `buf` ([`crate::net::fill`]): returns its
/// body (everything after the length); bytes after it stay in `buf`. `Ok(None)`: the peer closed before a whole
/// length arrived.
///
/// Buffered: a packet usually arrives in one read (a client sends it whole and then waits for the answer), and a
/// read that leaves room clears the socket's readiness, so the wait for the next packet starts without a read
/// that fails.
pub async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<BytesMut>, PgError> {
    match crate::net::fill(r, buf, 4).await {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(e) => return Err(PgError::protocol_violation(format!("read error: {e}"))),
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(PgError::protocol_violation(format!(
            "invalid length of startup packet: {len}"
        )));
    }
    match crate::net::fill(r, buf, len).await {
        Ok(true) => {
            let mut body = buf.split_to(len);
            body.advance(4);
            Ok(Some(body))
        }
        Ok(false) | Err(_) => Err(PgError::protocol_violation("incomplete startup packet")),
    }
}

/// Parses a startup-phase packet body (everything after the length).
pub fn parse_packet(body: &[u8]) -> Result<FirstPacket, PgError> {
    let bad = |m: &str| PgError::protocol_violation(m.to_owned());
    let code = u32::from_be_bytes(
        body.get(..4)
            .and_then(|c| c.try_into().ok())
            .ok_or_else(|| bad("startup packet too short"))?,
    );
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE if rest.is_empty() => Ok(FirstPacket::SslRequest),
        GSSENC_REQUEST_CODE if rest.is_empty() => Ok(FirstPacket::GssEncRequest),
        CANCEL_REQUEST_CODE if (8..=4 + 256).contains(&rest.len()) => {
            let pid = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            Ok(FirstPacket::Cancel {
                pid,
                secret: rest[4..].to_vec(),
            })
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            Err(bad("invalid length of startup packet"))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(PgError::fatal(
                    super::error::sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
                    ),
                ));
            }
            parse_params(rest, minor).map(FirstPacket::Startup)
        }
    }
}

fn parse_params(mut rest: &[u8], minor_version: u16) -> Result<StartupMessage, PgError> {
    let bad = |m: &str| PgError::protocol_violation(m.to_owned());
    let mut msg = StartupMessage {
        minor_version,
        ..Default::default()
    };
    loop {
        match rest {
            [0] => break,
            [] => return Err(bad("startup packet is missing its terminator")),
            _ => {}
        }
        let (name, after) = cstr(rest).ok_or_else(|| bad("unterminated startup parameter"))?;
        let (value, after) = cstr(after).ok_or_else(|| bad("startup parameter without a value"))?;
        rest = after;
        let name = std::str::from_utf8(name)
            .map_err(|_| bad("startup parameter name is not valid UTF-8"))?;
        let value = std::str::from_utf8(value)
            .map_err(|_| bad("startup parameter value is not valid UTF-8"))?;
        if name.is_empty() {
            return Err(bad("empty startup parameter name"));
        }
        if msg.params.len() + msg.protocol_options.len() >= MAX_STARTUP_PARAMS {
            return Err(bad("too many startup parameters"));
        }
        if name.starts_with("_pq_.") {
            msg.protocol_options.push(name.to_owned());
        } else if msg.params.iter().any(|(k, _)| k == name) {
            return Err(bad("duplicate startup parameter"));
        } else {
            msg.params.push((name.to_owned(), value.to_owned()));
        }
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut b = 196608u32.to_be_bytes().to_vec();
        for (k, v) in params {
            b.extend_from_slice(k.as_bytes());
            b.push(0);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn parses_packets() {
        let p = parse_packet(&startup(&[("user", "alice"), ("database", "app")]))
            .expect("a well-formed startup packet parses");
        let FirstPacket::Startup(s) = p else { panic!() };
        assert_eq!(s.get("user"), Some("alice"));
        assert_eq!(s.get("database"), Some("app"));
        assert_eq!(
            parse_packet(&SSL_REQUEST_CODE.to_be_bytes()).expect("an SSL request parses"),
            FirstPacket::SslRequest
        );
        let mut c = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        c.extend_from_slice(&7i32.to_be_bytes());
        c.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(
            parse_packet(&c).expect("a cancel request parses"),
            FirstPacket::Cancel {
                pid: 7,
                secret: 9i32.to_be_bytes().to_vec()
            }
        );
    }

    #[test]
    fn rejects_malformed() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0, 3, 0, 0],                      // no terminator
            vec![0, 3, 0, 0, b'u', 0],             // name without value
            vec![0, 3, 0, 0, 0xff, 0, b'x', 0, 0], // not UTF-8
            vec![0, 2, 0, 0, 0],                   // protocol 2
            startup(&[("user", "a"), ("user", "b")]),
            SSL_REQUEST_CODE
                .to_be_bytes()
                .iter()
                .chain(&[1])
                .copied()
                .collect(),
        ];
        for c in cases {
            assert!(parse_packet(&c).is_err(), "{c:?}");
        }
        let many: Vec<(String, String)> = (0..100).map(|i| (format!("p{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert!(parse_packet(&startup(&many)).is_err());
    }

    #[test]
    fn protocol_options_are_separated() {
        let p = parse_packet(&startup(&[("user", "a"), ("_pq_.x", "1")]))
            .expect("a startup packet with a protocol option parses");
        let FirstPacket::Startup(s) = p else { panic!() };
        assert_eq!(s.protocol_options, vec!["_pq_.x".to_string()]);
        assert_eq!(s.params.len(), 1);
    }
}
