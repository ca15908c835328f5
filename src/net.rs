//! Byte streams: a TCP connection that may have been upgraded to TLS, and reading whole frames during the
//! handshake phases (before pgweir switches to streaming).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::wire::frame::{header, FrameError, HEADER_LEN};

/// A TCP stream, plain or wrapped in TLS (`T` is the client- or server-side TLS stream type).
#[derive(Debug)]
pub enum Stream<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

impl<T> Stream<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Waits until a plain connection has something to read (data, EOF or an error) without holding a buffer; for
    /// TLS (which may have decrypted bytes buffered) returns at once.
    pub async fn readable(&self) {
        if let Stream::Plain(s) = self {
            // poll_read_ready keeps the waker in the socket's own registration: no waiter node in this future.
            let _ = std::future::poll_fn(|cx| s.poll_read_ready(cx)).await;
        }
    }
}

impl<T: AsyncRead + Unpin> Stream<T> {
    /// Reads what has arrived, without waiting: `Some(n)` bytes were read (0: the peer closed), `None`: nothing
    /// to read now. A plain connection is asked its readiness first (no waker is registered, and there is no
    /// system call while nothing arrived); TLS is polled once.
    pub fn read_now(&mut self, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        use futures_util::FutureExt;
        match self {
            Stream::Plain(s) => {
                // A read that leaves room in the buffer emptied the socket: its readiness is cleared as tokio's
                // own poll_read does (with edge-triggered epoll, data arriving later is a new event). Without
                // this the next wait for the client would find stale readiness and cost a read that fails
                // with EAGAIN.
                let room = buf.capacity() - buf.len();
                let mut got = None;
                let r = s.try_io(tokio::io::Interest::READABLE, || {
                    let n = s.try_read_buf(buf)?;
                    got = Some(n);
                    if 0 < n && n < room {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(())
                });
                // Bytes read count whatever the closure answered; without any, WouldBlock is "nothing now".
                match (got, r) {
                    (Some(n), _) => Ok(Some(n)),
                    (None, Err(e)) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
                    (None, _) => Ok(None),
                }
            }
            Stream::Tls(_) => self.read_buf(buf).now_or_never().transpose(),
        }
    }
}

/// A writer that may take bytes at once, without a future: a plain TCP write half does (one `send`, or nothing
/// when the socket is known to be full); a TLS half does not (rustls buffers and needs flushing).
pub trait WriteNow: AsyncWrite + Unpin {
    /// What the socket took now; `None` when this writer has no such write.
    fn write_now(&mut self, _bytes: &[u8]) -> Option<io::Result<usize>> {
        None
    }
}

impl WriteNow for tokio::net::tcp::WriteHalf<'_> {
    fn write_now(&mut self, bytes: &[u8]) -> Option<io::Result<usize>> {
        Some(self.as_ref().try_write(bytes))
    }
}

impl<T: AsyncWrite> WriteNow for tokio::io::WriteHalf<T> {}

/// How much of `bytes` the writer takes now: 0 when the socket takes nothing now, or the writer has no such write.
pub fn write_some_now<W: WriteNow>(w: &mut W, bytes: &[u8]) -> io::Result<usize> {
    match w.write_now(bytes) {
        Some(Ok(n)) => Ok(n),
        Some(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
        _ => Ok(0),
    }
}

/// Writes all of `bytes` and flushes: at once when the socket takes them (the usual case for a plain connection:
/// no write future and no flush), else the rest through `write_all`.
pub async fn write_out<W: WriteNow>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    let n = write_some_now(w, bytes)?;
    if n == bytes.len() {
        return Ok(());
    }
    write_rest(w, &bytes[n..]).await
}

/// Writes all of `bytes` through the write future and flushes: for bytes the socket did not take at once (no
/// second try of the at-once write, which would only fail again).
pub async fn write_rest<W: WriteNow>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

pub type ClientStream = Stream<tokio_rustls::server::TlsStream<TcpStream>>;
pub type ServerStream = Stream<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T: AsyncRead + Unpin> AsyncRead for Stream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one complete frame (header included) from `r`, buffering in `buf` (bytes past the frame stay there).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<BytesMut, ReadFrameError> {
    loop {
        if let Some((_, total)) = header(buf, max_len)? {
            if !fill(r, buf, total).await? {
                return Err(ReadFrameError::Closed);
            }
            return Ok(buf.split_to(total));
        }
        if !fill(r, buf, HEADER_LEN).await? {
            return Err(ReadFrameError::Closed);
        }
    }
}

/// Reads into `buf` until it holds at least `n` bytes; false if the peer closed first. Each read has room for
/// at least 512 more bytes, so a message that came whole is one read. Small: logins read a few short messages,
/// and large transient buffers fragment the heap that the long-lived state of idle sessions lives in.
pub async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    n: usize,
) -> io::Result<bool> {
    while buf.len() < n {
        buf.reserve((n - buf.len()).max(512));
        if r.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Ends a connection on which pgweir has had its last word (typically a FATAL ErrorResponse): sends FIN after it,
/// then reads and discards whatever the peer still sends until it closes (at most 1 s and 64 KiB). Closing a
/// socket with unread input makes the kernel answer with a RST, which can destroy the error before the client has
/// read it.
/// Ends a connection the client closed (or sent Terminate on): nothing is left to protect, so no lingering; a TLS
/// connection still gets its close_notify.
pub async fn quiet_close(s: &mut ClientStream) {
    if s.is_tls() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), s.shutdown()).await;
    }
}

pub async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
    const MAX_DISCARD: usize = 64 * 1024;
    let drain = async {
        let _ = s.shutdown().await;
        let mut scratch = [0u8; 512];
        let mut discarded = 0;
        while discarded < MAX_DISCARD {
            match s.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short read clears the socket's readiness; bytes that arrive afterwards still wake the reader, also
    /// when they arrive while nothing waits.
    #[tokio::test]
    async fn short_read_then_more_bytes_are_seen() -> io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut peer = TcpStream::connect(listener.local_addr()?).await?;
        let mut s: ClientStream = Stream::Plain(listener.accept().await?.0);
        let mut buf = BytesMut::with_capacity(1024);
        for round in 0..3u8 {
            peer.write_all(&[round; 5]).await?;
            if round == 2 {
                // Arrived before anyone waits.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let got = loop {
                s.readable().await;
                if let Some(n) = s.read_now(&mut buf)? {
                    break n;
                }
            };
            assert_eq!(got, 5);
            assert_eq!(&buf[..], &[round; 5]);
            buf.clear();
            assert!(s.read_now(&mut buf)?.is_none());
        }
        // More than the buffer's room: the full read leaves the readiness, and the rest is read without a
        // new event.
        peer.write_all(&[7; 1500]).await?;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut total = 0;
        while total < 1500 {
            buf.clear();
            buf.reserve(1024);
            let wait = tokio::time::timeout(std::time::Duration::from_secs(5), s.readable());
            wait.await
                .expect("bytes left in the socket must keep it readable");
            total += s.read_now(&mut buf)?.unwrap_or(0);
        }
        assert_eq!(total, 1500);
        drop(peer);
        s.readable().await;
        assert_eq!(s.read_now(&mut buf)?, Some(0));
        Ok(())
    }

    /// More than the socket takes at once: the part written at once and the rest written by the future arrive
    /// whole and in order.
    #[tokio::test]
    async fn write_out_sends_what_the_socket_did_not_take_at_once() -> io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut peer = TcpStream::connect(listener.local_addr()?).await?;
        let mut s = listener.accept().await?.0;
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.map(|_| got)
        });
        {
            let (_, mut w) = s.split();
            // A first write the socket takes whole, then one far larger than its buffers.
            write_out(&mut w, &data[..100]).await?;
            assert!(write_some_now(&mut w, &[]).is_ok());
            write_out(&mut w, &data[100..]).await?;
        }
        s.shutdown().await?;
        let got = reader.await.map_err(io::Error::other)??;
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes arrived changed or out of order");
        Ok(())
    }
}
