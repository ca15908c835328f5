//! Full-duplex forwarding between a client and its server connection. Each direction reads into one reused
//! buffer, frames by header and writes the original bytes on; memory stays bounded whatever the message sizes.
//!
//! To know whether the server connection is clean when the client leaves, the client→server side counts the
//! messages that each end in exactly one ReadyForQuery (Query, Sync, FunctionCall) and notes open extended-protocol
//! batches; the server→client side counts ReadyForQuery and keeps the last transaction status.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::backend::ServerConn;
use crate::net::{ClientStream, Stream};
use crate::wire::frame::{FrameError, Scanner, Verdict};

/// Read buffer size per direction.
const CHUNK: usize = 16 * 1024;

#[derive(Debug)]
pub enum EndReason {
    /// The client sent Terminate.
    ClientTerminated,
    /// The client's connection closed or failed.
    ClientGone,
    ClientProtocol(FrameError),
    /// The server's connection closed or failed.
    ServerGone,
    ServerProtocol(FrameError),
}

#[derive(Debug)]
pub struct End {
    pub reason: EndReason,
    /// The server connection is between requests and in sync: it can be reset and reused.
    pub server_clean: bool,
    /// The last forwarded server message was complete (an error can be appended for the client).
    pub server_at_boundary: bool,
    /// The last server message was an ErrorResponse (e.g. the FATAL a server sends before it closes).
    pub server_sent_error: bool,
    /// Transaction status of the last ReadyForQuery.
    pub tx_status: u8,
}

/// State shared by the two directions (atomics: both run in one task, but the task must be `Send`).
struct Shared {
    /// Messages sent that each end in one ReadyForQuery.
    requests: AtomicU64,
    /// ReadyForQuery messages received.
    ready: AtomicU64,
    /// Parse/Bind/Describe/Execute/Close sent since the last Sync.
    batch_open: AtomicBool,
    /// A client message is partly written to the server.
    writing: AtomicBool,
    tx_status: AtomicU8,
    /// Tag of the last message that started towards the client.
    last_server_tag: AtomicU8,
}

pub async fn run(client: &mut ClientStream, conn: &mut ServerConn, max_message: usize) -> End {
    let shared = Shared {
        requests: AtomicU64::new(0),
        ready: AtomicU64::new(0),
        batch_open: AtomicBool::new(false),
        writing: AtomicBool::new(false),
        tx_status: AtomicU8::new(b'I'),
        last_server_tag: AtomicU8::new(0),
    };
    let mut client_buf = BytesMut::with_capacity(CHUNK);
    let mut c_scan = Scanner::new(max_message);
    let mut s_scan = Scanner::new(max_message);
    let ServerConn {
        stream: server,
        buf: server_buf,
        params,
        ..
    } = conn;
    let mut pumps = Pumps {
        client_buf: &mut client_buf,
        server_buf,
        c_scan: &mut c_scan,
        s_scan: &mut s_scan,
        params,
        shared: &shared,
    };
    // Plain TCP on both sides splits without a lock; TLS needs tokio's shared split.
    let reason = match (client, server) {
        (Stream::Plain(c), Stream::Plain(s)) => {
            let (mut cr, mut cw) = c.split();
            let (mut sr, mut sw) = s.split();
            pumps.run(&mut cr, &mut cw, &mut sr, &mut sw).await
        }
        (client, server) => {
            let (mut cr, mut cw) = tokio::io::split(client);
            let (mut sr, mut sw) = tokio::io::split(server);
            pumps.run(&mut cr, &mut cw, &mut sr, &mut sw).await
        }
    };
    let requests = shared.requests.load(Ordering::Relaxed);
    let ready = shared.ready.load(Ordering::Relaxed);
    let server_clean = matches!(reason, EndReason::ClientTerminated | EndReason::ClientGone)
        && requests == ready
        && !shared.batch_open.load(Ordering::Relaxed)
        && !shared.writing.load(Ordering::Relaxed)
        && s_scan.at_boundary()
        && c_scan.at_boundary();
    End {
        reason,
        server_clean,
        server_at_boundary: s_scan.at_boundary(),
        server_sent_error: shared.last_server_tag.load(Ordering::Relaxed) == b'E',
        tx_status: shared.tx_status.load(Ordering::Relaxed),
    }
}

struct Pumps<'a> {
    client_buf: &'a mut BytesMut,
    server_buf: &'a mut BytesMut,
    c_scan: &'a mut Scanner,
    s_scan: &'a mut Scanner,
    params: &'a mut Vec<(String, String)>,
    shared: &'a Shared,
}

impl Pumps<'_> {
    async fn run<CR, CW, SR, SW>(
        &mut self,
        cr: &mut CR,
        cw: &mut CW,
        sr: &mut SR,
        sw: &mut SW,
    ) -> EndReason
    where
        CR: AsyncRead + Unpin,
        CW: AsyncWrite + Unpin,
        SR: AsyncRead + Unpin,
        SW: AsyncWrite + Unpin,
    {
        tokio::select! {
            r = client_to_server(cr, sw, self.client_buf, self.c_scan, self.shared) => r,
            r = server_to_client(sr, cw, self.server_buf, self.s_scan, self.params, self.shared) => r,
        }
    }
}

async fn client_to_server<R, W>(
    r: &mut R,
    w: &mut W,
    buf: &mut BytesMut,
    scanner: &mut Scanner,
    shared: &Shared,
) -> EndReason
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if buf.capacity() - buf.len() < CHUNK / 4 {
            buf.reserve(CHUNK);
        }
        match r.read_buf(buf).await {
            Ok(0) | Err(_) => return EndReason::ClientGone,
            Ok(_) => {}
        }
        let scan = scanner.scan(
            buf,
            |tag| tag == b'X',
            |tag, _| -> Result<Verdict, FrameError> {
                match tag {
                    b'X' => return Ok(Verdict::Stop),
                    b'Q' | b'F' => {
                        shared.requests.fetch_add(1, Ordering::Relaxed);
                    }
                    b'S' => {
                        shared.requests.fetch_add(1, Ordering::Relaxed);
                        shared.batch_open.store(false, Ordering::Relaxed);
                    }
                    b'P' | b'B' | b'D' | b'E' | b'C' => {
                        shared.batch_open.store(true, Ordering::Relaxed)
                    }
                    _ => {}
                }
                Ok(Verdict::Forward)
            },
        );
        let scan = match scan {
            Ok(s) => s,
            Err(e) => return EndReason::ClientProtocol(e),
        };
        if scan.forward > 0 {
            shared.writing.store(true, Ordering::Relaxed);
            if w.write_all(&buf[..scan.forward]).await.is_err() || w.flush().await.is_err() {
                return EndReason::ServerGone;
            }
            shared.writing.store(false, Ordering::Relaxed);
            buf.advance(scan.forward);
        }
        if scan.stopped {
            return EndReason::ClientTerminated;
        }
    }
}

async fn server_to_client<R, W>(
    r: &mut R,
    w: &mut W,
    buf: &mut BytesMut,
    scanner: &mut Scanner,
    params: &mut Vec<(String, String)>,
    shared: &Shared,
) -> EndReason
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        // Bytes may already be buffered (read while the connection was logging in or idle).
        let scan = scanner.scan(
            buf,
            |tag| tag == b'Z' || tag == b'S',
            |tag, frame| -> Result<Verdict, FrameError> {
                shared.last_server_tag.store(tag, Ordering::Relaxed);
                match (tag, frame) {
                    (b'Z', Some(f)) => {
                        shared.ready.fetch_add(1, Ordering::Relaxed);
                        shared
                            .tx_status
                            .store(f.get(5).copied().unwrap_or(b'I'), Ordering::Relaxed);
                    }
                    (b'S', Some(f)) => crate::backend::record_parameter_status(params, f),
                    _ => {}
                }
                Ok(Verdict::Forward)
            },
        );
        let scan = match scan {
            Ok(s) => s,
            Err(e) => return EndReason::ServerProtocol(e),
        };
        if scan.forward > 0 {
            if w.write_all(&buf[..scan.forward]).await.is_err() || w.flush().await.is_err() {
                return EndReason::ClientGone;
            }
            buf.advance(scan.forward);
        }
        if buf.capacity() - buf.len() < CHUNK / 4 {
            buf.reserve(CHUNK);
        }
        match r.read_buf(buf).await {
            Ok(0) | Err(_) => return EndReason::ServerGone,
            Ok(_) => {}
        }
    }
}
