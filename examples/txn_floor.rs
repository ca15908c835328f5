//! A measuring stick, not a product: the least a transaction pooler on tokio can do per transaction.
//!
//! It accepts clients without authentication, answers their login with fixed parameters, and for each request
//! takes one of `BENCH_POOL_SIZE` server connections (opened at start with md5 or no password), forwards the
//! client's frames until a Query or Sync, and the server's answer until ReadyForQuery `I`, and puts the
//! connection back. No policy, no cancel keys, no settings, no prepared-statement moves, no timeouts, no
//! statistics. What pgweir spends above it is pgweir's own work, not tokio's.
//!
//! Run it as an extra target of `../shared/bench/peers.sh` with `benches/floor-bench-target.sh` (it reads the
//! harness's `BENCH_*` variables), for `pgbench -S` (simple or extended) and TPC-B; `-M prepared` needs named
//! statements to move between connections, which it does not do.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::{Buf, BufMut, BytesMut};
use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The length of the complete frame (type byte + length) at the start of `buf`, if it is all there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let len = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?) as usize + 1;
    (buf.len() >= len).then_some(len)
}

fn put_frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_u32(4 + body.len() as u32);
    out.put_slice(body);
}

/// Opens and logs in one server connection (md5 or trust).
async fn open(addr: &str, user: &str, password: &str, db: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let body = format!("user\0{user}\0database\0{db}\0\0");
    let mut m = BytesMut::new();
    m.put_u32(8 + body.len() as u32);
    m.put_u32(196_608);
    m.put_slice(body.as_bytes());
    s.write_all(&m).await?;
    let mut buf = BytesMut::new();
    loop {
        let Some(n) = frame_len(&buf) else {
            if s.read_buf(&mut buf).await? == 0 {
                return Err("server closed the connection during login".into());
            }
            continue;
        };
        let msg = buf.split_to(n);
        match (msg[0], msg.get(5..9)) {
            (b'R', Some([0, 0, 0, 5])) => {
                let inner = hex(&Md5::digest(format!("{password}{user}")));
                let mut h = Md5::new();
                h.update(inner.as_bytes());
                h.update(msg.get(9..13).ok_or("short md5 request")?);
                let mut out = BytesMut::new();
                put_frame(
                    &mut out,
                    b'p',
                    format!("md5{}\0", hex(&h.finalize())).as_bytes(),
                );
                s.write_all(&out).await?;
            }
            (b'R', Some([0, 0, 0, 0])) => {}
            (b'R', _) => return Err("only md5 or trust logins are supported".into()),
            (b'E', _) => return Err("the server refused the login".into()),
            (b'Z', _) => return Ok(s),
            _ => {}
        }
    }
}

struct Pool {
    idle: RefCell<Vec<TcpStream>>,
    returned: tokio::sync::Notify,
}

impl Pool {
    async fn take(&self) -> TcpStream {
        loop {
            if let Some(s) = self.idle.borrow_mut().pop() {
                return s;
            }
            self.returned.notified().await;
        }
    }

    fn put(&self, s: TcpStream) {
        self.idle.borrow_mut().push(s);
        self.returned.notify_one();
    }
}

async fn client(mut c: TcpStream, pool: Rc<Pool>) -> Result<()> {
    c.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(1024);
    // Startup, after an SSLRequest answered with N.
    loop {
        while buf.len() < 8 {
            if c.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        while buf.len() < len {
            if c.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        buf.advance(len);
        if code != 80_877_103 {
            break;
        }
        c.write_all(b"N").await?;
    }
    let mut out = BytesMut::new();
    put_frame(&mut out, b'R', &[0, 0, 0, 0]);
    for (k, v) in [
        ("server_version", "15.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("standard_conforming_strings", "on"),
        ("integer_datetimes", "on"),
        ("DateStyle", "ISO, MDY"),
    ] {
        put_frame(&mut out, b'S', format!("{k}\0{v}\0").as_bytes());
    }
    put_frame(&mut out, b'K', &[0, 0, 0, 1, 0, 0, 0, 2]);
    put_frame(&mut out, b'Z', b"I");
    c.write_all(&out).await?;
    let mut reply = BytesMut::with_capacity(8192);
    // Held from a request until a ReadyForQuery that says idle (through a transaction block).
    let mut server: Option<TcpStream> = None;
    loop {
        // The client's frames up to a Query or Sync.
        loop {
            while frame_len(&buf).is_none() {
                if c.read_buf(&mut buf).await? == 0 {
                    return Ok(());
                }
            }
            if buf[0] == b'X' {
                return Ok(());
            }
            let s = match &mut server {
                Some(s) => s,
                None => server.insert(pool.take().await),
            };
            let mut end = 0;
            let mut request_done = false;
            while let Some(n) = frame_len(&buf[end..]) {
                request_done |= matches!(buf[end], b'Q' | b'S');
                end += n;
            }
            s.write_all(&buf[..end]).await?;
            buf.advance(end);
            if request_done {
                break;
            }
        }
        let Some(s) = &mut server else { continue };
        // The server's answer up to its ReadyForQuery.
        let mut status = None;
        while status.is_none() {
            if s.read_buf(&mut reply).await? == 0 {
                return Err("server closed the connection".into());
            }
            let mut end = 0;
            while let Some(n) = frame_len(&reply[end..]) {
                if reply[end] == b'Z' {
                    status = reply.get(end + 5).copied();
                }
                end += n;
            }
            c.write_all(&reply[..end]).await?;
            reply.advance(end);
        }
        if status == Some(b'I') {
            if let Some(s) = server.take() {
                pool.put(s);
            }
        }
    }
}

fn main() -> Result<()> {
    let addr = format!(
        "{}:{}",
        env("BENCH_PG_HOST", "127.0.0.1"),
        env("BENCH_PG_PORT", "5432")
    );
    let user = env("BENCH_PG_USER", "postgres");
    let password = env("BENCH_PG_PASSWORD", "");
    let db = env("BENCH_PG_DB", "postgres");
    let size: usize = env("BENCH_POOL_SIZE", "20").parse()?;
    let listen = format!("127.0.0.1:{}", env("BENCH_LISTEN_PORT", "6433"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let pool = Rc::new(Pool {
            idle: RefCell::new(Vec::new()),
            returned: tokio::sync::Notify::new(),
        });
        for _ in 0..size {
            pool.put(open(&addr, &user, &password, &db).await?);
        }
        let listener = TcpListener::bind(&listen).await?;
        eprintln!("txn_floor: listening on {listen}, {size} server connections to {addr}");
        loop {
            let (c, _) = listener.accept().await?;
            let pool = pool.clone();
            tokio::task::spawn_local(async move {
                if let Err(e) = client(c, pool).await {
                    eprintln!("txn_floor: {e}");
                }
            });
        }
    })
}
