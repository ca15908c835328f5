//! Zero-downtime restart: a new pgweir process takes over the listening sockets of the running one.
//!
//! With `proxy.handover_socket` set, a running pgweir listens on that Unix socket. A new process started with the
//! same config connects to it at startup and receives the running process's client (and admin) listening sockets
//! (`SCM_RIGHTS`): the very same kernel sockets, so not one queued or arriving connection is refused or reset.
//! The old process then drains as on SIGTERM (idle clients 57P01, transactions finish, bounded by
//! `proxy.shutdown_timeout`), while the new one accepts. When nothing answers on the socket, the new process binds
//! its addresses itself.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// What a takeover request is answered with: the number of sockets that follow.
const REQUEST: &[u8] = b"pgweir-takeover-1\n";

/// Listening sockets received from a running process: the client listener, and the admin listener if it had one.
pub struct Inherited {
    pub client: std::net::TcpListener,
    pub admin: Option<std::net::TcpListener>,
}

/// Asks the process listening on `path` for its listening sockets. `Ok(None)` when no process answers there.
pub fn take_over(path: &Path) -> io::Result<Option<Inherited>> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    io::Write::write_all(&mut stream, REQUEST)?;
    let fds = recv_fds(&stream)?;
    let mut fds = fds.into_iter();
    let client = fds
        .next()
        .ok_or_else(|| io::Error::other("the running pgweir sent no listening socket"))?;
    Ok(Some(Inherited {
        client: std::net::TcpListener::from(client),
        admin: fds.next().map(std::net::TcpListener::from),
    }))
}

/// Answers one takeover request on `stream` with `sockets`; Ok(true) when they were sent.
pub fn answer(stream: &UnixStream, sockets: &[RawFd]) -> io::Result<bool> {
    let mut buf = [0u8; REQUEST.len()];
    let mut s = stream;
    io::Read::read_exact(&mut s, &mut buf)?;
    if buf != REQUEST {
        return Ok(false);
    }
    send_fds(stream, sockets)?;
    Ok(true)
}

/// At most this many descriptors are passed.
const MAX_FDS: usize = 4;

fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    assert!(!fds.is_empty() && fds.len() <= MAX_FDS);
    let mut byte = [fds.len() as u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so the first header and its data fit.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr(),
            libc::CMSG_DATA(cmsg).cast::<RawFd>(),
            fds.len(),
        );
    }
    // SAFETY: msg points at live buffers; the socket is open.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv_fds(stream: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: as in send_fds.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live buffers; MSG_CMSG_CLOEXEC keeps the received descriptors from leaking into children.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::Error::other(
            "the running pgweir closed the handover socket",
        ));
    }
    let mut out = Vec::new();
    // SAFETY: the kernel filled msg; CMSG_FIRSTHDR/NXTHDR walk only within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    out.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if out.len() != byte[0] as usize {
        return Err(io::Error::other(format!(
            "expected {} sockets from the running pgweir, got {}",
            byte[0],
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_pass_between_processes_intact() {
        let dir = tempfile::tempdir().expect("temporary directory for the handover socket");
        let path = dir.path().join("handover.sock");
        assert!(
            take_over(&path)
                .expect("asking with nobody listening is not an error")
                .is_none(),
            "nobody answers yet"
        );
        let listener =
            std::os::unix::net::UnixListener::bind(&path).expect("bind the handover socket");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind a TCP listener on an ephemeral port");
        let addr = tcp.local_addr().expect("local address of the TCP listener");
        let raw = tcp.as_raw_fd();
        let server = std::thread::spawn(move || {
            let (s, _) = listener
                .accept()
                .expect("accept the taker on the handover socket");
            assert!(answer(&s, &[raw]).expect("answer sends the listening socket"));
            tcp // kept open until the other side has its copy
        });
        let got = take_over(&path)
            .expect("take over through the handover socket")
            .expect("an answer");
        let _old = server.join().expect("answering thread does not panic");
        assert_eq!(
            got.client
                .local_addr()
                .expect("local address of the received socket"),
            addr,
            "the same socket"
        );
        assert!(got.admin.is_none());
        // A connection made now can be accepted through the received socket.
        let _c = std::net::TcpStream::connect(addr).expect("connect to the handed-over address");
        let (_a, _) = got.client.accept().expect("accept on the received socket");
    }
}
