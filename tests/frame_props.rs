//! Property tests of the byte-level protocol code: the frame [`Scanner`] forwards exactly the bytes it is given and
//! visits exactly the frames in them, whatever the chunking; and nothing that parses client or server bytes
//! (scanner, startup packets, `decode_one`, password messages) panics on arbitrary input.

use std::cell::Cell;
use std::sync::Once;

use bytes::BytesMut;
use pgweir::wire::frame::{FrameError, Scanner, Verdict, HEADER_LEN};
use pgweir::wire::msg::{self, decode_one, password_message};
use pgweir::wire::startup::{parse_packet, FirstPacket, MAX_STARTUP_PARAMS};
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus};
use proptest::collection::vec;
use proptest::prelude::*;

/// What the scanner showed the inspector: the tag, and the whole frame for wanted tags.
type Visit = (u8, Option<Vec<u8>>);

/// Tags the session inspects, server→client and client→server.
const SERVER_WANTS: &[u8] = b"ZS";
const CLIENT_WANTS: &[u8] = b"X";

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// Outcome of feeding a stream to a scanner the way the session does: append a chunk, scan, forward the prefix the
/// scan allows, keep the rest.
#[derive(Debug, PartialEq, Eq)]
struct Fed {
    forwarded: Vec<u8>,
    visits: Vec<Visit>,
    error: Option<FrameError>,
    stopped: bool,
}

/// Feeds `stream` in chunks of the given sizes (cycled), checking after every pass that the scanner left nothing
/// forwardable behind. `stop_at` makes the inspector stop at that tag.
fn feed(stream: &[u8], chunks: &[usize], wants: &[u8], max_len: usize, stop_at: Option<u8>) -> Fed {
    let mut sc = Scanner::new(max_len);
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = Fed {
        forwarded: Vec::new(),
        visits: Vec::new(),
        error: None,
        stopped: false,
    };
    let mut rest = stream;
    let mut sizes = chunks.iter().copied().cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        let visits = &mut fed.visits;
        let scan = sc.scan::<_, _, FrameError>(
            &buf,
            |t| wants.contains(&t),
            |t, f| {
                visits.push((t, f.map(<[u8]>::to_vec)));
                Ok(if Some(t) == stop_at {
                    Verdict::Stop
                } else {
                    Verdict::Forward
                })
            },
        );
        let scan = match scan {
            Ok(s) => s,
            Err(e) => {
                fed.error = Some(e);
                return fed;
            }
        };
        assert!(scan.forward <= buf.len(), "forward past the buffer");
        fed.forwarded.extend_from_slice(&buf[..scan.forward]);
        buf.drain(..scan.forward);
        if scan.stopped {
            fed.stopped = true;
            return fed;
        }
        // Nothing that could be forwarded is held back: what stays is a partial header or a partial wanted frame.
        if sc.at_boundary() && buf.len() >= HEADER_LEN {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            assert!(
                wants.contains(&buf[0]) && buf.len() < 1 + len,
                "the scanner held back a frame it could forward: {:?}",
                &buf[..HEADER_LEN]
            );
        }
        if !sc.at_boundary() {
            assert!(buf.is_empty(), "mid-frame, everything is forwarded");
        }
    }
    fed
}

/// The visits a correct scanner makes over complete `frames`.
fn expected_visits(frames: &[(u8, Vec<u8>)], wants: &[u8]) -> Vec<Visit> {
    frames
        .iter()
        .map(|(t, b)| (*t, wants.contains(t).then(|| frame(*t, b))))
        .collect()
}

fn concat(frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
    frames.iter().flat_map(|(t, b)| frame(*t, b)).collect()
}

/// Tags that occur in real traffic, the wanted ones included, and now and then any byte.
fn tag() -> impl Strategy<Value = u8> {
    prop_oneof![
        8 => prop::sample::select(b"ZSDTCQPBEXKRNdc".to_vec()),
        1 => any::<u8>(),
    ]
}

fn frames(max_body: usize) -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    vec((tag(), vec(any::<u8>(), 0..max_body)), 0..24)
}

fn chunks() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![1]),
        vec(1usize..8, 1..16),
        vec(1usize..700, 1..16),
        Just(vec![usize::MAX]),
    ]
}

thread_local! {
    static DECODING: Cell<bool> = const { Cell::new(false) };
}

/// `decode_one` contains decoder panics with `catch_unwind`; keep the default hook's report of those quiet (and only
/// of those: any other panic is reported as usual).
fn quiet_contained_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !DECODING.with(Cell::get) {
                default(info)
            }
        }));
    });
}

/// Every decoder pgweir applies to a frame, on `frame`; none may panic.
fn decode_all(frame: &[u8]) {
    quiet_contained_panics();
    DECODING.with(|d| d.set(true));
    let _ = decode_one::<Authentication>(frame, "Authentication");
    let _ = decode_one::<ParameterStatus>(frame, "ParameterStatus");
    let _ = decode_one::<BackendKeyData>(frame, "BackendKeyData");
    let _ = decode_one::<ErrorResponse>(frame, "ErrorResponse");
    DECODING.with(|d| d.set(false));
    let _ = password_message::sasl_initial(frame);
    let _ = password_message::sasl_response(frame);
    let _ = password_message::password(frame);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Well-formed frames in any chunking: everything is forwarded, in order, and each frame is visited exactly
    /// once, whole for wanted tags — in both of the session's directions.
    #[test]
    fn scanner_forwards_exactly_and_visits_every_frame(
        frames in frames(300),
        chunks in chunks(),
        server_side in any::<bool>(),
    ) {
        let wants = if server_side { SERVER_WANTS } else { CLIENT_WANTS };
        let stream = concat(&frames);
        let fed = feed(&stream, &chunks, wants, 1 << 20, None);
        prop_assert_eq!(fed.error, None);
        prop_assert!(!fed.stopped);
        prop_assert_eq!(&fed.forwarded, &stream);
        prop_assert_eq!(fed.visits, expected_visits(&frames, wants));
    }

    /// A Stop verdict (the client's Terminate) forwards exactly the bytes before that frame.
    #[test]
    fn scanner_stops_before_the_stop_frame(
        before in frames(200),
        after in frames(50),
        chunks in chunks(),
    ) {
        let before: Vec<_> = before.into_iter().filter(|(t, _)| *t != b'X').collect();
        let mut all = before.clone();
        all.push((b'X', Vec::new()));
        all.extend(after);
        let stream = concat(&all);
        let fed = feed(&stream, &chunks, CLIENT_WANTS, 1 << 20, Some(b'X'));
        prop_assert!(fed.stopped);
        prop_assert_eq!(fed.error, None);
        prop_assert_eq!(fed.forwarded, concat(&before));
        let mut visits = expected_visits(&before, CLIENT_WANTS);
        visits.push((b'X', Some(frame(b'X', &[]))));
        prop_assert_eq!(fed.visits, visits);
    }

    /// A frame over the limit is refused when its header arrives, wanted or not; the frames before it are visited
    /// and nothing after it is.
    #[test]
    fn scanner_refuses_the_first_oversized_frame(
        frames in frames(400),
        chunks in chunks(),
        max_len in 5usize..300,
        server_side in any::<bool>(),
    ) {
        let wants = if server_side { SERVER_WANTS } else { CLIENT_WANTS };
        let stream = concat(&frames);
        let fed = feed(&stream, &chunks, wants, max_len, None);
        match frames.iter().position(|(_, b)| 5 + b.len() > max_len) {
            Some(i) => {
                let (t, b) = &frames[i];
                prop_assert_eq!(
                    fed.error,
                    Some(FrameError::TooLarge { tag: *t, len: 5 + b.len(), max: max_len })
                );
                prop_assert_eq!(fed.visits, expected_visits(&frames[..i], wants));
                prop_assert!(stream[..fed.forwarded.len()] == fed.forwarded[..]);
                prop_assert!(fed.forwarded.len() <= concat(&frames[..i]).len());
            }
            None => {
                prop_assert_eq!(fed.error, None);
                prop_assert_eq!(fed.forwarded, stream);
            }
        }
    }

    /// Arbitrary bytes: no panic, only a prefix of the input is forwarded, and the chunking does not change which
    /// frames are visited or which error ends the stream.
    #[test]
    fn scanner_on_arbitrary_bytes(
        bytes in vec(any::<u8>(), 0..2048),
        chunks in chunks(),
        max_len in prop_oneof![Just(1usize << 20), 5usize..600],
        server_side in any::<bool>(),
    ) {
        let wants = if server_side { SERVER_WANTS } else { CLIENT_WANTS };
        let chunked = feed(&bytes, &chunks, wants, max_len, None);
        let whole = feed(&bytes, &[usize::MAX], wants, max_len, None);
        prop_assert!(bytes.starts_with(&chunked.forwarded));
        prop_assert_eq!(&chunked.visits, &whole.visits);
        prop_assert_eq!(chunked.error, whole.error);
        if chunked.error.is_none() {
            prop_assert_eq!(chunked.forwarded.len(), whole.forwarded.len());
        }
        for f in chunked.visits.iter().filter_map(|(_, f)| f.as_deref()) {
            decode_all(f);
        }
    }

    /// Arbitrary startup packet bodies: no panic; whatever parses respects the limits.
    #[test]
    fn parse_packet_on_arbitrary_bytes(body in vec(any::<u8>(), 0..600)) {
        if let Ok(FirstPacket::Startup(s)) = parse_packet(&body) {
            prop_assert!(s.params.len() + s.protocol_options.len() <= MAX_STARTUP_PARAMS);
            prop_assert!(s.params.iter().all(|(k, _)| !k.is_empty()));
        }
    }

    /// Startup packets that look almost right (protocol 3.x, NUL-separated strings), to get past the code check.
    #[test]
    fn parse_packet_on_plausible_startup_packets(
        minor in prop_oneof![Just(0u16), any::<u16>()],
        strings in vec(vec(prop_oneof![4 => 1u8..128, 1 => any::<u8>()], 0..12), 0..140),
        terminate in any::<bool>(),
    ) {
        let mut body = ((3u32 << 16) | u32::from(minor)).to_be_bytes().to_vec();
        for s in &strings {
            body.extend_from_slice(s);
            body.push(0);
        }
        if terminate {
            body.push(0);
        }
        if let Ok(p) = parse_packet(&body) {
            let FirstPacket::Startup(s) = p else {
                return Err(TestCaseError::fail("protocol 3.x parsed as another packet"));
            };
            prop_assert_eq!(s.minor_version, minor);
            prop_assert!(s.params.len() + s.protocol_options.len() <= MAX_STARTUP_PARAMS);
        }
    }

    /// Arbitrary bytes, and frames with a correct header but arbitrary bodies, through every decoder.
    #[test]
    fn decoders_on_arbitrary_frames(
        raw in vec(any::<u8>(), 0..300),
        tag in prop::sample::select(b"RSKEpZ".to_vec()),
        body in vec(any::<u8>(), 0..300),
    ) {
        decode_all(&raw);
        decode_all(&frame(tag, &body));
    }

    /// ParameterStatus frames pgweir writes decode to what was written.
    #[test]
    fn parameter_status_round_trips(name in "[^\u{0}]{1,40}", value in "[^\u{0}]{0,80}") {
        let mut out = BytesMut::new();
        msg::parameter_status(&name, &value, &mut out);
        let ps: ParameterStatus = decode_one(&out, "ParameterStatus").unwrap();
        prop_assert_eq!(ps.name, name);
        prop_assert_eq!(ps.value, value);
    }
}
