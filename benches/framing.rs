//! The forwarding hot path: scanning buffers of typical traffic with the session's wants and inspectors, in both
//! directions; and parsing a typical startup packet.
//!
//! `cargo bench --bench framing` (add `-- --quick` for a fast run).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgweir::wire::frame::{FrameError, Scanner, Verdict};
use pgweir::wire::startup::parse_packet;

const BUF: usize = 64 * 1024;
/// The session's read size per direction.
const READ: usize = 16 * 1024;

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// A DataRow of `total` bytes (header included): three text columns.
fn data_row(total: usize) -> Vec<u8> {
    let payload = total - 5 - 2 - 3 * 4;
    let widths = [8, payload / 2, payload - 8 - payload / 2];
    let mut body = 3u16.to_be_bytes().to_vec();
    for w in widths {
        body.extend_from_slice(&(w as i32).to_be_bytes());
        body.extend(std::iter::repeat_n(b'x', w));
    }
    let f = frame(b'D', &body);
    assert_eq!(f.len(), total);
    f
}

/// About 64 KiB of a result set: DataRows of `row` bytes, then CommandComplete and ReadyForQuery.
fn result_set(row: usize) -> Vec<u8> {
    let tail = [frame(b'C', b"SELECT 600\0"), frame(b'Z', b"I")].concat();
    let mut v = Vec::with_capacity(BUF);
    let r = data_row(row);
    while v.len() + r.len() + tail.len() <= BUF {
        v.extend_from_slice(&r);
    }
    v.extend_from_slice(&tail);
    v
}

/// About 64 KiB of client requests: extended-protocol Bind/Execute/Sync batches with a simple Query now and then.
fn requests() -> Vec<u8> {
    let mut bind = Vec::new();
    bind.extend_from_slice(b"\0stmt_1\0"); // portal, statement
    bind.extend_from_slice(&1u16.to_be_bytes()); // one format code: binary
    bind.extend_from_slice(&1u16.to_be_bytes());
    bind.extend_from_slice(&2u16.to_be_bytes()); // two parameters
    bind.extend_from_slice(&8i32.to_be_bytes());
    bind.extend_from_slice(&42i64.to_be_bytes());
    bind.extend_from_slice(&16i32.to_be_bytes());
    bind.extend_from_slice(b"some text value!");
    bind.extend_from_slice(&0u16.to_be_bytes()); // result formats
    let batch = [
        frame(b'B', &bind),
        frame(b'E', b"\0\0\0\0\0"),
        frame(b'S', b""),
    ]
    .concat();
    let query = frame(
        b'Q',
        b"select id, name, created_at from items where owner = 42 order by id limit 50\0",
    );
    let mut v = Vec::with_capacity(BUF);
    let mut i = 0;
    while v.len() + batch.len().max(query.len()) <= BUF {
        v.extend_from_slice(if i % 8 == 7 { &query } else { &batch });
        i += 1;
    }
    v
}

/// What the server→client side inspects: ReadyForQuery (counted, status kept) and ParameterStatus.
#[derive(Default)]
struct ServerSide {
    ready: u64,
    status: u8,
    params: u64,
}

/// Scans `stream` as the session does, `read` bytes at a time, carrying the unforwarded rest over.
fn scan_server(stream: &[u8], read: usize, st: &mut ServerSide) -> usize {
    let mut sc = Scanner::new(256 << 20);
    let mut forwarded = 0;
    let mut start = 0;
    let mut end = 0;
    while end < stream.len() {
        end = end.saturating_add(read).min(stream.len());
        let s = sc
            .scan::<_, _, FrameError>(
                &stream[start..end],
                |t| t == b'Z' || t == b'S',
                |t, f| {
                    match (t, f) {
                        (b'Z', Some(f)) => {
                            st.ready += 1;
                            st.status = f.get(5).copied().unwrap_or(b'I');
                        }
                        (b'S', Some(_)) => st.params += 1,
                        _ => {}
                    }
                    Ok(Verdict::Forward)
                },
            )
            .unwrap();
        forwarded += s.forward;
        start += s.forward;
    }
    forwarded
}

/// What the client→server side counts: requests that end in ReadyForQuery, and open batches.
#[derive(Default)]
struct ClientSide {
    requests: u64,
    batch_open: bool,
}

fn scan_client(stream: &[u8], read: usize, st: &mut ClientSide) -> usize {
    let mut sc = Scanner::new(256 << 20);
    let mut forwarded = 0;
    let mut start = 0;
    let mut end = 0;
    while end < stream.len() {
        end = end.saturating_add(read).min(stream.len());
        let s = sc
            .scan::<_, _, FrameError>(
                &stream[start..end],
                |t| t == b'X',
                |t, _| {
                    match t {
                        b'X' => return Ok(Verdict::Stop),
                        b'Q' | b'F' => st.requests += 1,
                        b'S' => {
                            st.requests += 1;
                            st.batch_open = false;
                        }
                        b'P' | b'B' | b'D' | b'E' | b'C' => st.batch_open = true,
                        _ => {}
                    }
                    Ok(Verdict::Forward)
                },
            )
            .unwrap();
        forwarded += s.forward;
        start += s.forward;
    }
    forwarded
}

fn server_to_client(c: &mut Criterion) {
    let mut g = c.benchmark_group("server_to_client");
    for row in [100usize, 1000] {
        let stream = result_set(row);
        assert_eq!(
            scan_server(&stream, READ, &mut ServerSide::default()),
            stream.len()
        );
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function(format!("datarow_{row}B_one_pass"), |b| {
            b.iter(|| {
                let mut st = ServerSide::default();
                black_box(scan_server(black_box(&stream), usize::MAX, &mut st));
                black_box(st.ready + st.params + u64::from(st.status))
            })
        });
        g.bench_function(format!("datarow_{row}B_16k_reads"), |b| {
            b.iter(|| {
                let mut st = ServerSide::default();
                black_box(scan_server(black_box(&stream), READ, &mut st));
                black_box(st.ready + st.params + u64::from(st.status))
            })
        });
    }
    // One large row: the scanner skips through its body without inspecting it.
    let big = result_set(BUF - 64);
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("one_64k_datarow_16k_reads", |b| {
        b.iter(|| {
            let mut st = ServerSide::default();
            black_box(scan_server(black_box(&big), READ, &mut st))
        })
    });
    g.finish();
}

fn client_to_server(c: &mut Criterion) {
    let mut g = c.benchmark_group("client_to_server");
    let stream = requests();
    let mut st = ClientSide::default();
    assert_eq!(scan_client(&stream, READ, &mut st), stream.len());
    assert!(st.requests > 0 && !st.batch_open);
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("bind_execute_sync_query_16k_reads", |b| {
        b.iter(|| {
            let mut st = ClientSide::default();
            black_box(scan_client(black_box(&stream), READ, &mut st));
            black_box(st.requests)
        })
    });
    g.finish();
}

fn startup(c: &mut Criterion) {
    // What psql 15 sends, plus a routing option.
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in [
        ("user", "alice"),
        ("database", "app"),
        ("options", "endpoint=acme -c statement_timeout=5s"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    assert!(parse_packet(&body).is_ok());
    let mut g = c.benchmark_group("startup");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse_packet_psql", |b| {
        b.iter(|| parse_packet(black_box(&body)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, server_to_client, client_to_server, startup);
criterion_main!(benches);
