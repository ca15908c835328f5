//! Framing of regular (post-startup) messages: a 1-byte tag, a 4-byte big-endian length that counts itself, the
//! body. The [`Scanner`] walks a stream buffer, hands complete frames of the tags its caller must inspect to a
//! closure, and reports how many bytes can be forwarded as they are. Frames it need not inspect may be larger than
//! the buffer: their bodies are forwarded in pieces, so memory stays bounded whatever the message size.

/// Tag + length.
pub const HEADER_LEN: usize = 5;

/// A framing error: the peer broke the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} for message type '{}'", char::from(*tag))]
    BadLength { tag: u8, len: u32 },
    #[error("message of type '{}' is {len} bytes long, over the limit of {max} bytes", char::from(*tag))]
    TooLarge { tag: u8, len: usize, max: usize },
    #[error("invalid frontend message type {tag}")]
    UnexpectedTag { tag: u8 },
}

/// Reads the header at the start of `buf`: `(tag, total frame length including the tag)`.
/// `Ok(None)` when fewer than [`HEADER_LEN`] bytes are buffered.
#[inline]
pub fn header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength { tag, len });
    }
    let total = 1 + len as usize;
    if total > max_len {
        return Err(FrameError::TooLarge {
            tag,
            len: total,
            max: max_len,
        });
    }
    Ok(Some((tag, total)))
}

/// What the inspector decided about a complete frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it and go on.
    Forward,
    /// Stop before this frame: it is not forwarded and stays at the front of the unforwarded bytes.
    Stop,
    /// Forward this frame and stop after it (only for whole, inspected frames; treated as `Forward` otherwise).
    Last,
}

/// Result of one [`Scanner::scan`] pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scan {
    /// Bytes at the front of the buffer that can be forwarded now.
    pub forward: usize,
    /// The visitor ended the pass: `Stop` (the frame at `forward` is not forwarded) or `Last` (the frame ending at
    /// `forward` is the last one forwarded).
    pub stopped: bool,
    /// The tag of the last frame whose header the pass moved past (0: none, the pass only continued a frame).
    pub last_tag: u8,
}

/// Incremental frame walker for one direction of a connection.
#[derive(Clone, Debug)]
pub struct Scanner {
    /// Body bytes of an uninspected frame still to pass through before the next header.
    skip: usize,
    max_len: usize,
}

impl Scanner {
    pub fn new(max_len: usize) -> Self {
        Scanner { skip: 0, max_len }
    }

    /// True when the scanner is between frames (nothing of a started frame is still in transit).
    #[inline]
    pub fn at_boundary(&self) -> bool {
        self.skip == 0
    }

    /// Walks `buf` (the unforwarded bytes of the stream, starting where the previous pass's `forward` ended).
    /// `wants(tag)` says which frames must be complete to be inspected. `visit` is called once per frame, when
    /// the scan moves past its header: with the whole frame (header included) for wanted tags, with `None` for
    /// the others.
    #[inline]
    pub fn scan<W, V, E>(&mut self, buf: &[u8], wants: W, visit: V) -> Result<Scan, E>
    where
        W: Fn(u8) -> bool,
        V: FnMut(u8, Option<&[u8]>) -> Result<Verdict, E>,
        E: From<FrameError>,
    {
        self.walk::<true, _, _, _>(buf, wants, visit)
    }

    /// [`Scanner::scan`] that calls `visit` for the wanted frames only (always whole): the others pass without a
    /// call. For a stream whose most frames need no look (a server's rows), and a visitor that is not small.
    #[inline]
    pub fn scan_wanted<W, V, E>(&mut self, buf: &[u8], wants: W, visit: V) -> Result<Scan, E>
    where
        W: Fn(u8) -> bool,
        V: FnMut(u8, Option<&[u8]>) -> Result<Verdict, E>,
        E: From<FrameError>,
    {
        self.walk::<false, _, _, _>(buf, wants, visit)
    }

    #[inline]
    fn walk<const ALL: bool, W, V, E>(
        &mut self,
        buf: &[u8],
        wants: W,
        mut visit: V,
    ) -> Result<Scan, E>
    where
        W: Fn(u8) -> bool,
        V: FnMut(u8, Option<&[u8]>) -> Result<Verdict, E>,
        E: From<FrameError>,
    {
        let mut pos = self.skip.min(buf.len());
        self.skip -= pos;
        let mut last_tag = 0;
        if self.skip > 0 {
            return Ok(Scan {
                forward: pos,
                stopped: false,
                last_tag,
            });
        }
        while let Some((tag, total)) = header(&buf[pos..], self.max_len)? {
            let whole = buf.len() - pos >= total;
            let wanted = wants(tag);
            if wanted && !whole {
                break;
            }
            last_tag = tag;
            let verdict = if wanted {
                visit(tag, Some(&buf[pos..pos + total]))?
            } else if ALL {
                visit(tag, None)?
            } else {
                Verdict::Forward
            };
            if verdict == Verdict::Stop {
                return Ok(Scan {
                    forward: pos,
                    stopped: true,
                    last_tag,
                });
            }
            if whole {
                pos += total;
                if verdict == Verdict::Last {
                    return Ok(Scan {
                        forward: pos,
                        stopped: true,
                        last_tag,
                    });
                }
            } else {
                self.skip = total - (buf.len() - pos);
                pos = buf.len();
                break;
            }
        }
        Ok(Scan {
            forward: pos,
            stopped: false,
            last_tag,
        })
    }
}

/// The body of a complete frame (after tag and length).
#[inline]
pub fn body(frame: &[u8]) -> &[u8] {
    frame.get(HEADER_LEN..).unwrap_or(&[])
}

/// A whole frame (tag, length, body), for tests.
#[cfg(test)]
pub(crate) fn test_frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_frame as frame;

    /// Feeds `stream` in chunks of `chunk` bytes and returns (forwarded bytes, inspected frames).
    fn run(stream: &[u8], chunk: usize, wants: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut sc = Scanner::new(1 << 20);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut seen = Vec::new();
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            let s = sc
                .scan::<_, _, FrameError>(
                    &buf,
                    |t| wants.contains(&t),
                    |_, f| {
                        if let Some(f) = f {
                            seen.push(f.to_vec());
                        }
                        Ok(Verdict::Forward)
                    },
                )
                .expect("well-formed frames scan without error");
            out.extend_from_slice(&buf[..s.forward]);
            buf.drain(..s.forward);
        }
        (out, seen)
    }

    #[test]
    fn forwards_everything_in_any_chunking() {
        let mut stream = frame(b'T', b"abc");
        stream.extend(frame(b'D', &[7u8; 1000]));
        stream.extend(frame(b'Z', b"I"));
        for chunk in [1, 2, 3, 5, 7, 64, 4096] {
            let (out, seen) = run(&stream, chunk, b"Z");
            assert_eq!(out, stream, "chunk {chunk}");
            assert_eq!(seen, vec![frame(b'Z', b"I")], "chunk {chunk}");
        }
    }

    #[test]
    fn rejects_bad_and_oversized_lengths() {
        let mut sc = Scanner::new(100);
        let bad = [b'Q', 0, 0, 0, 3];
        let e = sc
            .scan::<_, _, FrameError>(&bad, |_| false, |_, _| Ok(Verdict::Forward))
            .unwrap_err();
        assert_eq!(e, FrameError::BadLength { tag: b'Q', len: 3 });
        let big = [b'Q', 0, 0, 1, 0];
        let e = sc
            .scan::<_, _, FrameError>(&big, |_| false, |_, _| Ok(Verdict::Forward))
            .unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }));
    }

    #[test]
    fn stop_leaves_the_frame_unforwarded() {
        let mut stream = frame(b'Q', b"select 1\0");
        stream.extend(frame(b'X', b""));
        let mut sc = Scanner::new(1 << 20);
        let s = sc
            .scan::<_, _, FrameError>(
                &stream,
                |t| t == b'X',
                |t, _| {
                    Ok(if t == b'X' {
                        Verdict::Stop
                    } else {
                        Verdict::Forward
                    })
                },
            )
            .expect("well-formed frames scan without error");
        assert!(s.stopped);
        assert_eq!(s.forward, stream.len() - 5);
    }
}
