//! What the fuzz targets run: pgweir's byte-level code driven the way the session and the backend login drive it,
//! with the invariants the forwarding path relies on checked as assertions (an assertion failure is a crash the
//! fuzzer reports, like a panic in pgweir itself).

use std::cell::Cell;
use std::sync::Once;

use pgweir::wire::frame::{header, FrameError, Scanner, Verdict, HEADER_LEN};
use pgweir::wire::msg::{decode_one, password_message};
use pgweir::wire::startup::{parse_packet, FirstPacket, MAX_STARTUP_PACKET, MAX_STARTUP_PARAMS};
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus};

/// The session's largest message in these targets (the real default is 256 MiB; a small limit reaches the
/// "too large" paths).
const MAX_MESSAGE: usize = 64 * 1024;
/// The login phases' frame limits (`session::auth` and `backend`).
const MAX_AUTH_MESSAGE: usize = 16 * 1024;

thread_local! {
    static DECODING: Cell<bool> = const { Cell::new(false) };
}

/// libFuzzer's panic hook aborts at once, before `catch_unwind` can act. `decode_one` contains decoder panics by
/// design, so while it runs unwinding is let through to its `catch_unwind`; every other panic still aborts.
fn contain_decoder_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !DECODING.with(Cell::get) {
                fuzzer_hook(info)
            }
        }));
    });
}

fn decoding<T>(f: impl FnOnce() -> T) -> T {
    contain_decoder_panics();
    DECODING.with(|d| d.set(true));
    let r = f();
    DECODING.with(|d| d.set(false));
    r
}

/// `parse_packet` on a startup packet body; what it accepts must respect the limits.
pub fn startup_packet(data: &[u8]) {
    if data.len() > MAX_STARTUP_PACKET {
        return; // read_packet never hands over more
    }
    match parse_packet(data) {
        Ok(FirstPacket::Startup(s)) => {
            assert!(s.params.len() + s.protocol_options.len() <= MAX_STARTUP_PARAMS);
            assert!(s.params.iter().all(|(k, _)| !k.is_empty()));
            let mut names: Vec<&str> = s.params.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), s.params.len(), "duplicate parameters accepted");
        }
        Ok(FirstPacket::Cancel { secret, .. }) => assert!((4..=256).contains(&secret.len())),
        Ok(FirstPacket::SslRequest | FirstPacket::GssEncRequest) => assert_eq!(data.len(), 4),
        Err(_) => {}
    }
}

/// What the scanner showed the inspector: the tag, and the whole frame for wanted tags.
type Visit = (u8, Option<Vec<u8>>);

/// The chunk size and the stream, from the fuzzer's input.
fn split(data: &[u8]) -> Option<(usize, &[u8])> {
    let (&first, stream) = data.split_first()?;
    Some((usize::from(first) + 1, stream))
}

/// Feeds `stream` to a scanner in chunks, forwarding what each pass allows as the session does. `visit` is the
/// session's inspector. Returns the visits `(tag, whole frame if wanted)`, the bytes forwarded and how it ended.
fn feed(
    stream: &[u8],
    chunk: usize,
    wants: fn(u8) -> bool,
    mut visit: impl FnMut(u8, Option<&[u8]>) -> Verdict,
) -> (Vec<Visit>, usize, Option<FrameError>) {
    let mut sc = Scanner::new(MAX_MESSAGE);
    let mut buf: Vec<u8> = Vec::new();
    let mut visits = Vec::new();
    let mut forwarded = 0;
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        let scan = sc.scan::<_, _, FrameError>(&buf, wants, |t, f| {
            visits.push((t, f.map(<[u8]>::to_vec)));
            Ok(visit(t, f))
        });
        let scan = match scan {
            Ok(s) => s,
            Err(e) => return (visits, forwarded, Some(e)),
        };
        assert!(scan.forward <= buf.len());
        forwarded += scan.forward;
        buf.drain(..scan.forward);
        if scan.stopped {
            break;
        }
        if !sc.at_boundary() {
            assert!(buf.is_empty(), "bytes held back in the middle of a frame");
        } else if let Ok(Some((tag, total))) = header(&buf, MAX_MESSAGE) {
            assert!(
                wants(tag) && buf.len() < total,
                "a forwardable frame was held back"
            );
        }
    }
    (visits, forwarded, None)
}

/// Chunking must not change what is visited or how the stream ends.
fn check_against_one_pass(
    stream: &[u8],
    chunk: usize,
    wants: fn(u8) -> bool,
    stop: fn(u8) -> bool,
) -> Vec<Visit> {
    let verdict = |t: u8, _: Option<&[u8]>| {
        if stop(t) {
            Verdict::Stop
        } else {
            Verdict::Forward
        }
    };
    let (visits, forwarded, error) = feed(stream, chunk, wants, verdict);
    let (v1, f1, e1) = feed(stream, usize::MAX, wants, verdict);
    assert_eq!(visits, v1, "chunking changed the visited frames");
    assert_eq!(error, e1, "chunking changed the framing error");
    if error.is_none() {
        assert_eq!(forwarded, f1, "chunking changed how much is forwarded");
    }
    for (tag, frame) in &visits {
        if let Some(f) = frame {
            assert_eq!(f[0], *tag);
            assert_eq!(header(f, MAX_MESSAGE), Ok(Some((*tag, f.len()))));
        }
    }
    visits
}

/// Complete frames at the start of `stream`, as `read_frame` cuts them with `max`.
fn frames(mut stream: &[u8], max: usize) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (_, total) = header(stream, max).ok()??;
        let f = stream.get(..total)?;
        stream = &stream[total..];
        Some(f)
    })
}

/// Client → server: the login-phase password messages, then the forwarding scanner.
pub fn frontend_framing(data: &[u8]) {
    let Some((chunk, stream)) = split(data) else {
        return;
    };
    for f in frames(stream, MAX_AUTH_MESSAGE) {
        if f[0] == b'p' {
            if let Some((mech, d)) = password_message::sasl_initial(f) {
                assert_eq!(HEADER_LEN + mech.len() + 1 + 4 + d.len(), f.len());
            }
            if let Some(d) = password_message::sasl_response(f) {
                assert_eq!(d.len() + HEADER_LEN, f.len());
            }
            if let Some(pw) = password_message::password(f) {
                assert_eq!(pw.len() + HEADER_LEN + 1, f.len());
            }
        }
    }
    // forward::client_to_server inspects Terminate whole and stops before it; the rest only by tag.
    check_against_one_pass(stream, chunk, |t| t == b'X', |t| t == b'X');
}

/// Server → client: the forwarding scanner with the session's inspection of ReadyForQuery and ParameterStatus,
/// and the backend login's decoders on every complete frame.
pub fn backend_framing(data: &[u8]) {
    let Some((chunk, stream)) = split(data) else {
        return;
    };
    let visits = check_against_one_pass(stream, chunk, |t| t == b'Z' || t == b'S', |_| false);
    // forward::server_to_client: ParameterStatus updates the connection's parameters.
    let mut params = Vec::new();
    for (tag, frame) in &visits {
        if let (b'S', Some(f)) = (tag, frame) {
            decoding(|| pgweir::backend::record_parameter_status(&mut params, f));
        }
    }
    for f in frames(stream, MAX_AUTH_MESSAGE) {
        decoding(|| {
            if let Ok(Authentication::MD5Password(salt)) =
                decode_one::<Authentication>(f, "Authentication")
            {
                let _ = <[u8; 4]>::try_from(salt.as_slice());
            }
            let _ = decode_one::<ParameterStatus>(f, "ParameterStatus");
            if let Ok(k) = decode_one::<BackendKeyData>(f, "BackendKeyData") {
                let _ = k.secret_key.to_bytes();
            }
            if let Ok(e) = decode_one::<ErrorResponse>(f, "ErrorResponse") {
                let _ = e.fields.iter().find(|(k, _)| *k == b'C');
            }
        });
    }
}
