//! Named prepared statements (protocol-level Parse/Bind/Describe/Close) under transaction pooling.
//!
//! A client's statement names mean nothing to the shared server connections it lands on. pgweir keeps, per client,
//! its names → [`Statement`]s (the Parse body: query text and parameter types), and interns each distinct body per
//! pool under a process-unique id, so clients that prepare the same statement share it on the servers. On a server
//! connection statements live under the name `pgw_<id>`; each connection remembers which ids it has
//! ([`ServerStatements`], bounded, least recently used evicted with a Close).
//!
//! While forwarding, the [`Rewriter`] changes the client's messages:
//! - Parse of a named statement → Parse `pgw_<id>`, or, when the server already has it, a Close of the never-used
//!   name `pgw_0` whose CloseComplete reaches the client as ParseComplete;
//! - Bind and Describe of a named statement → the server name, preceded by a Parse when the server lacks it (its
//!   ParseComplete is not forwarded);
//! - Close of a named statement → a Close of `pgw_0` (the statement may be in use by other clients).
//!
//! So the server always produces exactly the replies the client expects, in order, including when an error in a
//! pipeline makes it skip everything up to Sync. Every Parse/Close sent is queued with the Z (ReadyForQuery) count
//! that ends its batch; ParseComplete/CloseComplete pop the queue, and entries still queued when their batch's Z
//! arrives were skipped or failed and are undone (the client's name and the server's statement were not created).
//!
//! Statement caches never cross pools, and pools never cross tenants.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::wire::msg::cstr;

/// A statement definition: the Parse body after the name (query, parameter count and types).
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    pub body: Bytes,
    /// A server accepted it (ParseComplete): a client's Parse of it can be answered without a server.
    validated: AtomicBool,
}

/// Id 0 is never given out: `pgw_0` is the name pgweir closes when it needs a harmless CloseComplete.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Bytes of statement definitions a pool's registry keeps. Beyond that the least recently used are forgotten: a
/// client holding one keeps it working, a client preparing the same text again gets a new id.
const REGISTRY_BYTES: u64 = 16 << 20;

/// A pool's statements: one id per distinct definition.
pub struct Registry {
    cache: moka::sync::Cache<Bytes, Arc<Statement>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            cache: moka::sync::Cache::builder()
                .max_capacity(REGISTRY_BYTES)
                .weigher(|k: &Bytes, _| u32::try_from(k.len() + 64).unwrap_or(u32::MAX))
                .build(),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("statements", &self.cache.entry_count())
            .finish()
    }
}

impl Registry {
    /// The statement for a Parse body prepared under `search_path`, shared with every client of the pool that
    /// prepared the same. (Postgres re-analyses a prepared statement when the search_path changed since its last
    /// use, so sharing across search_paths would be correct; keeping them apart keeps `validated` exact for the
    /// Parse answers given without a server.)
    pub fn intern(&self, body: &[u8], search_path: &[u8]) -> Arc<Statement> {
        let mut key = BytesMut::with_capacity(4 + search_path.len() + body.len());
        key.put_u32(search_path.len() as u32);
        key.put_slice(search_path);
        key.put_slice(body);
        if let Some(s) = self.cache.get(&key[..]) {
            return s;
        }
        let key = key.freeze();
        self.cache.get_with(key.clone(), || {
            Arc::new(Statement {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                body: key.slice(4 + search_path.len()..),
                validated: AtomicBool::new(false),
            })
        })
    }

    /// Distinct statements remembered.
    pub fn len(&self) -> usize {
        self.cache.run_pending_tasks();
        self.cache.entry_count() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A client's statements by name; the map is allocated with the first one (most idle clients have none, and the
/// session's future stays smaller).
#[derive(Debug, Default)]
struct NameMap(Option<Box<Names>>);

/// foldhash's quality hasher (keyed per process): the names are the client's, and SipHash cost more per Bind than
/// the rest of its rewriting.
type Names = HashMap<Box<[u8]>, Arc<Statement>, foldhash::quality::RandomState>;

impl NameMap {
    fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.0.as_ref()?.get(name)
    }

    fn insert(&mut self, name: Box<[u8]>, stmt: Arc<Statement>) -> Option<Arc<Statement>> {
        self.0
            .get_or_insert_with(Default::default)
            .insert(name, stmt)
    }

    /// Inserts unless the name is taken.
    fn insert_new(&mut self, name: Box<[u8]>, stmt: Arc<Statement>) {
        self.0
            .get_or_insert_with(Default::default)
            .entry(name)
            .or_insert(stmt);
    }

    fn remove(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        self.0.as_mut()?.remove(name)
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

/// One client's named statements.
#[derive(Debug)]
pub struct ClientStatements {
    registry: Arc<Registry>,
    by_name: NameMap,
    /// The client's search_path (empty: the server's default), part of what identifies a statement.
    search_path: Vec<u8>,
    /// The Parse body (text and parameter types) of the client's unnamed statement, if it has one: a Bind of it
    /// in a later transaction may land on a server connection whose unnamed statement is another client's. The
    /// buffer is kept between statements.
    unnamed: Vec<u8>,
    has_unnamed: bool,
}

impl ClientStatements {
    pub fn new(registry: Arc<Registry>) -> Self {
        ClientStatements {
            registry,
            by_name: NameMap::default(),
            search_path: Vec::new(),
            unnamed: Vec::new(),
            has_unnamed: false,
        }
    }

    /// The client's search_path for the statements it prepares from now on.
    pub fn set_search_path(&mut self, search_path: Option<&str>) {
        let sp = search_path.unwrap_or("").as_bytes();
        if self.search_path != sp {
            self.search_path = sp.to_vec();
        }
    }

    /// Has the client a statement of this name?
    pub fn has(&self, name: &[u8]) -> bool {
        self.by_name.get(name).is_some()
    }

    /// Answers a batch of named Parse messages and a Sync at the start of `buf` without a server connection, when
    /// every statement in it was already accepted by a server: ParseComplete for each and ReadyForQuery ('I') go
    /// to `out`. Returns how many bytes of `buf` it answered; None (and nothing changed) otherwise.
    ///
    /// A client outside a transaction that only prepares (libpq's `PQprepare`, pgbench `-M prepared`) thus never
    /// waits for a server connection, which other clients of the same application thread may be holding.
    pub fn answer_parse_batch(&mut self, buf: &[u8], out: &mut BytesMut) -> Option<usize> {
        let mut pos = 0;
        let mut found = Vec::new();
        loop {
            let (tag, total) = crate::wire::frame::header(&buf[pos..], usize::MAX).ok()??;
            let frame = buf.get(pos..pos + total)?;
            match tag {
                b'P' => {
                    let (name, rest) = cstr(&frame[5..])?;
                    // Unnamed, or a name in use (the server must answer: 42P05).
                    if name.is_empty() || self.has(name) {
                        return None;
                    }
                    let stmt = self.registry.intern(rest, &self.search_path);
                    if !stmt.validated.load(Ordering::Relaxed) {
                        return None;
                    }
                    found.push((name, stmt));
                }
                b'S' if !found.is_empty() => {
                    pos += total;
                    break;
                }
                _ => return None,
            }
            pos += total;
        }
        for (name, stmt) in found {
            self.by_name.insert(name.into(), stmt);
            out.put_slice(&PARSE_COMPLETE);
        }
        out.put_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        Some(pos)
    }

    /// Answers a Query that is only `DEALLOCATE name` of one of the client's protocol statements, at the start of
    /// `buf`, without a server connection: the server knows the statement under pgweir's name, which other clients
    /// may share, so the client's name is dropped here, as Postgres would drop it. CommandComplete and
    /// ReadyForQuery ('I') go to `out`; returns the bytes of `buf` answered, None (and nothing changed) otherwise.
    /// Only between transactions (inside one, the server answers: 26000).
    pub fn answer_deallocate(&mut self, buf: &[u8], out: &mut BytesMut) -> Option<usize> {
        if self.is_empty() {
            // Nothing of the client's to drop: the server answers (26000 for an unknown name).
            return None;
        }
        let (tag, total) = crate::wire::frame::header(buf, usize::MAX).ok()??;
        if tag != b'Q' {
            return None;
        }
        let sql = buf.get(5..total)?.strip_suffix(&[0])?;
        // Cheap tests first: most Queries are not this (the first byte of the usual one already says so).
        let sql = sql.trim_ascii_start();
        if !matches!(sql.first(), Some(b'd' | b'D'))
            || !sql.get(..10)?.eq_ignore_ascii_case(b"deallocate")
        {
            return None;
        }
        let name = crate::sqlscan::deallocate_name(std::str::from_utf8(sql).ok()?)?;
        self.by_name.remove(name.as_bytes())?;
        out.put_u8(b'C');
        out.put_u32(4 + 11);
        out.put_slice(b"DEALLOCATE\0");
        out.put_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        Some(total)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.len() == 0
    }
}

/// The statements a server connection has prepared (by id), with a use counter for LRU eviction.
#[derive(Debug, Default)]
pub struct ServerStatements {
    /// Keyed by pgweir's own statement ids.
    used: HashMap<u64, u64, foldhash::fast::RandomState>,
    tick: u64,
    /// The reply queue of the runs on this connection, kept between them (empty): a run over the extended protocol
    /// then queues without allocating.
    queue: VecDeque<Pending>,
}

impl ServerStatements {
    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// The server lost all its prepared statements (`DISCARD ALL`, `DEALLOCATE ALL`).
    pub fn clear(&mut self) {
        self.used.clear();
    }

    fn touch(&mut self, id: u64) -> bool {
        self.tick += 1;
        match self.used.get_mut(&id) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, id: u64) {
        self.tick += 1;
        self.used.insert(id, self.tick);
    }
}

/// What happens to a ParseComplete/CloseComplete from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Forward,
    /// It answers a message pgweir added: the client never sees it.
    Drop,
    /// A CloseComplete that stands for the client's ParseComplete.
    AsParseComplete,
}

/// ParseComplete.
pub const PARSE_COMPLETE: [u8; 5] = [b'1', 0, 0, 0, 4];

/// What to take back if a queued Parse/Close never succeeds.
#[derive(Debug)]
enum Undo {
    Nothing,
    /// pgweir's Parse of this id.
    ServerParse(u64),
    /// The client's Parse of `name` (now `id`; `prev` before), and pgweir's Parse of `server` if it sent one.
    ClientParse {
        name: Box<[u8]>,
        id: u64,
        prev: Option<Arc<Statement>>,
        server: Option<u64>,
    },
    /// The client's Close of `name`.
    ClientClose {
        name: Box<[u8]>,
        prev: Option<Arc<Statement>>,
    },
    /// pgweir's eviction of `id` (last used at `tick`).
    Evict {
        id: u64,
        tick: u64,
    },
    /// A Parse or Close of the unnamed statement (the client's or pgweir's), the `gen`-th of the run: if it got
    /// no reply, the server's unnamed statement is not known to be the client's, and the client has one if `had`
    /// (a failed Parse leaves none; a skipped Close leaves it).
    Unnamed {
        gen: u64,
        had: bool,
    },
}

#[derive(Debug)]
struct Pending {
    /// The ReadyForQuery count that ends this message's batch.
    seq: u64,
    reply: Reply,
    undo: Undo,
    /// A Parse of this statement: its ParseComplete validates it.
    parses: Option<Arc<Statement>>,
}

/// Rewrites one forwarding run's messages (see the module header).
#[derive(Debug)]
pub struct Rewriter<'a> {
    client: &'a mut ClientStatements,
    server: &'a mut ServerStatements,
    /// Most statements kept on the server connection (more only while all are in use by the current run).
    cap: usize,
    /// Statements used at or after this tick are in use by this run: not evicted.
    run_start: u64,
    pending: VecDeque<Pending>,
    /// The server's unnamed statement is the client's (or both have none): set by the client's Parse or Close of
    /// it in this run, or by pgweir's. Until then the server's may be another client's.
    unnamed_in_sync: bool,
    /// Parses and Closes of the unnamed statement queued in this run: only the last one's undo applies.
    unnamed_gen: u64,
}

/// Largest reply queue a server connection keeps for its next run.
const KEPT_QUEUE: usize = 64;

impl Drop for Rewriter<'_> {
    fn drop(&mut self) {
        if self.pending.capacity() == 0 {
            // Nothing was ever queued on this connection: nothing to keep or free.
            return;
        }
        let mut queue = std::mem::take(&mut self.pending);
        if queue.capacity() <= KEPT_QUEUE {
            queue.clear();
            self.server.queue = queue;
        }
    }
}

/// Why a message could not be rewritten: it is malformed (the server will say so; it is forwarded as it is).
type Malformed = ();

impl<'a> Rewriter<'a> {
    pub fn new(
        client: &'a mut ClientStatements,
        server: &'a mut ServerStatements,
        cap: usize,
    ) -> Self {
        let run_start = server.tick + 1;
        let pending = std::mem::take(&mut server.queue);
        Rewriter {
            client,
            server,
            cap: cap.max(1),
            run_start,
            pending,
            unnamed_in_sync: false,
            unnamed_gen: 0,
        }
    }

    /// Has the client a statement of this name? (A Parse of it fails with 42P05, as on Postgres.)
    pub fn client_has(&self, name: &[u8]) -> bool {
        self.client.has(name)
    }

    /// The statement text of the client's named statement that a Bind body names (for statistics).
    pub fn bound_text(&self, bind_body: &[u8]) -> Option<&[u8]> {
        let (_portal, rest) = crate::wire::msg::cstr(bind_body)?;
        let (name, _) = crate::wire::msg::cstr(rest)?;
        let st = self.client.by_name.get(name)?;
        crate::wire::msg::cstr(&st.body).map(|(sql, _)| sql)
    }

    /// A whole client message with tag P, B, D or C, to be followed by the ReadyForQuery number `seq`. Returns
    /// true when it was rewritten into `out` (the original is not to be forwarded), false to forward it as is.
    pub fn client_message(&mut self, tag: u8, frame: &[u8], seq: u64, out: &mut BytesMut) -> bool {
        let body = frame.get(5..).unwrap_or(&[]);
        let done = match tag {
            b'P' => self.parse(body, seq, out),
            b'B' => self.bind(body, seq, out),
            b'D' => self.describe(body, seq, out),
            b'C' => self.close(body, seq, out),
            _ => Ok(false),
        };
        match done {
            Ok(done) => done,
            Err(()) => {
                if matches!(tag, b'P' | b'C') {
                    self.queue(seq, Reply::Forward, Undo::Nothing);
                }
                false
            }
        }
    }

    /// True when a named-statement message must wait before it is rewritten: an earlier batch (its Sync already
    /// sent) changed statements in ways the server may still skip after an error, and this message's meaning
    /// depends on what actually happened. It waits until that batch's replies settle it (see `server_ready`).
    pub fn must_wait(&self, tag: u8, frame: &[u8], seq: u64) -> bool {
        let uncertain = self
            .pending
            .iter()
            .take_while(|p| p.seq < seq)
            .any(|p| !matches!(p.undo, Undo::Nothing));
        if !uncertain {
            return false;
        }
        let body = frame.get(5..).unwrap_or(&[]);
        let name = match tag {
            b'P' => cstr(body).map(|(n, _)| n),
            b'B' => cstr(body).and_then(|(_, r)| cstr(r)).map(|(n, _)| n),
            b'D' | b'C' => match body.split_first() {
                Some((b'S', r)) => cstr(r).map(|(n, _)| n),
                _ => None,
            },
            _ => None,
        };
        // A Bind or Describe of the unnamed statement waits too: an earlier Parse or Close of it may be skipped,
        // and then the server's is not the client's.
        name.is_some_and(|n| !n.is_empty() || matches!(tag, b'B' | b'D'))
    }

    fn parse(&mut self, body: &[u8], seq: u64, out: &mut BytesMut) -> Result<bool, Malformed> {
        let (name, rest) = cstr(body).ok_or(())?;
        if name.is_empty() {
            self.client.unnamed.clear();
            self.client.unnamed.extend_from_slice(rest);
            self.client.has_unnamed = true;
            self.unnamed_in_sync = true;
            self.unnamed_gen += 1;
            let undo = Undo::Unnamed {
                gen: self.unnamed_gen,
                had: false,
            };
            self.queue(seq, Reply::Forward, undo);
            return Ok(false);
        }
        let stmt = self.client.registry.intern(rest, &self.client.search_path);
        let id = stmt.id;
        let name: Box<[u8]> = name.into();
        let prev = self.client.by_name.insert(name.clone(), stmt.clone());
        if self.server.touch(id) {
            close_message(b'S', ServerName(0), out);
            let undo = Undo::ClientParse {
                name,
                id,
                prev,
                server: None,
            };
            self.queue(seq, Reply::AsParseComplete, undo);
        } else {
            self.make_room(seq, out);
            self.server.insert(id);
            parse_message(ServerName(id), rest, out);
            let undo = Undo::ClientParse {
                name,
                id,
                prev,
                server: Some(id),
            };
            self.queue(seq, Reply::Forward, undo);
            if let Some(p) = self.pending.back_mut() {
                p.parses = Some(stmt);
            }
        }
        Ok(true)
    }

    fn bind(&mut self, body: &[u8], seq: u64, out: &mut BytesMut) -> Result<bool, Malformed> {
        let (portal, rest) = cstr(body).ok_or(())?;
        let (name, params) = cstr(rest).ok_or(())?;
        if name.is_empty() {
            return Ok(self.ensure_unnamed(b'B', body, seq, out));
        }
        let Some(id) = self.ensure(name, seq, out) else {
            return Ok(false);
        };
        let server = ServerName(id);
        start_message(
            out,
            b'B',
            4 + portal.len() + 1 + server.len() + 1 + params.len(),
        );
        out.put_slice(portal);
        out.put_u8(0);
        server.put(out);
        out.put_slice(params);
        Ok(true)
    }

    fn describe(&mut self, body: &[u8], seq: u64, out: &mut BytesMut) -> Result<bool, Malformed> {
        let (&kind, rest) = body.split_first().ok_or(())?;
        if kind != b'S' {
            return Ok(false);
        }
        let (name, _) = cstr(rest).ok_or(())?;
        if name.is_empty() {
            return Ok(self.ensure_unnamed(b'D', body, seq, out));
        }
        let Some(id) = self.ensure(name, seq, out) else {
            return Ok(false);
        };
        let server = ServerName(id);
        start_message(out, b'D', 4 + 1 + server.len() + 1);
        out.put_u8(b'S');
        server.put(out);
        Ok(true)
    }

    fn close(&mut self, body: &[u8], seq: u64, out: &mut BytesMut) -> Result<bool, Malformed> {
        let (&kind, rest) = body.split_first().ok_or(())?;
        let (name, _) = cstr(rest).ok_or(())?;
        if kind == b'S' && name.is_empty() {
            self.unnamed_gen += 1;
            let undo = Undo::Unnamed {
                gen: self.unnamed_gen,
                had: self.client.has_unnamed,
            };
            self.client.has_unnamed = false;
            self.unnamed_in_sync = true;
            self.queue(seq, Reply::Forward, undo);
            return Ok(false);
        }
        if kind != b'S' || name.is_empty() {
            self.queue(seq, Reply::Forward, Undo::Nothing);
            return Ok(false);
        }
        // Other clients may use the statement: it stays on the server until evicted.
        let prev = self.client.by_name.remove(name);
        close_message(b'S', ServerName(0), out);
        let undo = Undo::ClientClose {
            name: name.into(),
            prev,
        };
        self.queue(seq, Reply::Forward, undo);
        Ok(true)
    }

    /// The id of the client's statement `name`, prepared on the server (a Parse is added to `out` if needed).
    /// None for the unnamed statement and for names the client never prepared (the server will say they do not
    /// exist, with the client's own name).
    fn ensure(&mut self, name: &[u8], seq: u64, out: &mut BytesMut) -> Option<u64> {
        if name.is_empty() {
            return None;
        }
        let stmt = self.client.by_name.get(name)?.clone();
        if !self.server.touch(stmt.id) {
            self.make_room(seq, out);
            self.server.insert(stmt.id);
            parse_message(ServerName(stmt.id), &stmt.body, out);
            self.queue(seq, Reply::Drop, Undo::ServerParse(stmt.id));
            if let Some(p) = self.pending.back_mut() {
                p.parses = Some(stmt.clone());
            }
        }
        Some(stmt.id)
    }

    /// Before a Bind or Describe of the unnamed statement (message `tag` with `body`): unless the server's unnamed
    /// statement is known to be the client's in this run, the client's is prepared again (or, if it has none, the
    /// server's is closed, so that the server answers 26000 as Postgres would). Returns true when the message was
    /// written to `out` after that, false when it is to be forwarded as it is.
    fn ensure_unnamed(&mut self, tag: u8, body: &[u8], seq: u64, out: &mut BytesMut) -> bool {
        if self.unnamed_in_sync {
            return false;
        }
        self.unnamed_in_sync = true;
        if self.client.has_unnamed {
            start_message(out, b'P', 4 + 1 + self.client.unnamed.len());
            out.put_u8(0);
            out.put_slice(&self.client.unnamed);
        } else {
            out.put_slice(&[b'C', 0, 0, 0, 6, b'S', 0]);
        }
        self.unnamed_gen += 1;
        let undo = Undo::Unnamed {
            gen: self.unnamed_gen,
            had: self.client.has_unnamed,
        };
        self.queue(seq, Reply::Drop, undo);
        start_message(out, tag, 4 + body.len());
        out.put_slice(body);
        true
    }

    /// Evicts least recently used statements (not used by this run) until one more fits.
    fn make_room(&mut self, seq: u64, out: &mut BytesMut) {
        while self.server.used.len() >= self.cap {
            let Some((&id, &tick)) = self.server.used.iter().min_by_key(|(_, &t)| t) else {
                return;
            };
            if tick >= self.run_start {
                return;
            }
            self.server.used.remove(&id);
            close_message(b'S', ServerName(id), out);
            self.queue(seq, Reply::Drop, Undo::Evict { id, tick });
        }
    }

    fn queue(&mut self, seq: u64, reply: Reply, undo: Undo) {
        self.pending.push_back(Pending {
            seq,
            reply,
            undo,
            parses: None,
        });
    }

    /// A ParseComplete or CloseComplete from the server: it answers the oldest queued Parse/Close (those of
    /// finished batches were settled by `server_ready`).
    pub fn server_reply(&mut self) -> Reply {
        match self.pending.pop_front() {
            Some(p) => {
                if let Some(stmt) = p.parses {
                    stmt.validated.store(true, Ordering::Relaxed);
                }
                p.reply
            }
            None => Reply::Forward,
        }
    }

    /// The server's `ready`-th ReadyForQuery: Parse/Close messages of finished batches that got no reply were
    /// skipped after an error (or failed themselves); what they would have done is undone.
    pub fn server_ready(&mut self, ready: u64) {
        while self.pending.front().is_some_and(|p| p.seq <= ready) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            self.undo(p.undo);
        }
    }

    fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::Nothing => {}
            Undo::ServerParse(id) => {
                self.server.used.remove(&id);
            }
            Undo::ClientParse {
                name,
                id,
                prev,
                server,
            } => {
                if self.client.by_name.get(&name).is_some_and(|s| s.id == id) {
                    match prev {
                        Some(p) => {
                            self.client.by_name.insert(name, p);
                        }
                        None => {
                            self.client.by_name.remove(&name);
                        }
                    }
                }
                if let Some(id) = server {
                    self.server.used.remove(&id);
                }
            }
            Undo::ClientClose { name, prev } => {
                if let Some(p) = prev {
                    self.client.by_name.insert_new(name, p);
                }
            }
            Undo::Evict { id, tick } => {
                self.server.used.entry(id).or_insert(tick);
            }
            Undo::Unnamed { gen, had } => {
                if gen == self.unnamed_gen {
                    self.unnamed_in_sync = false;
                    self.client.has_unnamed = had;
                }
            }
        }
    }

    /// The server reported `DISCARD ALL` or `DEALLOCATE ALL`: its statements are gone, and so are the client's.
    pub fn all_deallocated(&mut self) {
        self.server.clear();
        self.client.by_name.clear();
    }
}

/// `pgw_<id>` as a C string, written without allocating.
#[derive(Clone, Copy)]
struct ServerName(u64);

impl ServerName {
    fn len(self) -> usize {
        let digits = if self.0 == 0 {
            1
        } else {
            (64 - self.0.leading_zeros()).div_ceil(4) as usize
        };
        4 + digits
    }

    /// Writes the name and its NUL (`pgw_` and the id in lowercase hex, without a formatter: once per Bind).
    fn put(self, out: &mut BytesMut) {
        let mut name = [0u8; 4 + 16 + 1];
        name[..4].copy_from_slice(b"pgw_");
        let len = self.len();
        for (i, b) in name[4..len].iter_mut().rev().enumerate() {
            *b = b"0123456789abcdef"[((self.0 >> (4 * i)) & 0xf) as usize];
        }
        out.put_slice(&name[..len + 1]);
    }
}

/// Starts a message of `len` bytes (its length field included) in `out`, with room for all of it: one
/// allocation for a rewritten message, not a growth step per part.
fn start_message(out: &mut BytesMut, tag: u8, len: usize) {
    out.reserve(1 + len);
    out.put_u8(tag);
    out.put_u32(len as u32);
}

fn parse_message(name: ServerName, body: &[u8], out: &mut BytesMut) {
    start_message(out, b'P', 4 + name.len() + 1 + body.len());
    name.put(out);
    out.put_slice(body);
}

fn close_message(kind: u8, name: ServerName, out: &mut BytesMut) {
    start_message(out, b'C', 4 + 1 + name.len() + 1);
    out.put_u8(kind);
    name.put(out);
}

/// True for a CommandComplete frame that says the session's prepared statements are gone.
pub fn deallocates_all(frame: &[u8]) -> bool {
    let tag = frame.get(5..).unwrap_or(&[]);
    tag == b"DISCARD ALL\0" || tag == b"DEALLOCATE ALL\0"
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::wire::frame::test_frame as frame;

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(sql.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        frame(b'P', &b)
    }

    fn bind(stmt: &str) -> Vec<u8> {
        let mut b = vec![0];
        b.extend_from_slice(stmt.as_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        frame(b'B', &b)
    }

    fn close(stmt: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        b.extend_from_slice(stmt.as_bytes());
        b.push(0);
        frame(b'C', &b)
    }

    /// The messages in `out`: (tag, name field as text).
    fn messages(out: &[u8]) -> Vec<(char, String)> {
        let mut v = Vec::new();
        let mut b = out;
        while b.len() >= 5 {
            let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
            let body = &b[5..1 + len];
            let name = match b[0] {
                b'P' => {
                    cstr(body)
                        .expect("Parse body starts with a NUL-terminated statement name")
                        .0
                }
                b'B' => {
                    cstr(
                        cstr(body)
                            .expect("Bind body starts with a NUL-terminated portal name")
                            .1,
                    )
                    .expect("Bind body has a NUL-terminated statement name after the portal")
                    .0
                }
                b'C' | b'D' => {
                    cstr(&body[1..])
                        .expect("Close/Describe body has a NUL-terminated name after its kind byte")
                        .0
                }
                _ => &[][..],
            };
            v.push((b[0] as char, String::from_utf8_lossy(name).into_owned()));
            b = &b[1 + len..];
        }
        assert!(b.is_empty(), "{out:?}");
        v
    }

    fn setup() -> (Arc<Registry>, ClientStatements, ServerStatements) {
        let reg = Arc::new(Registry::default());
        let c = ClientStatements::new(reg.clone());
        (reg, c, ServerStatements::default())
    }

    #[test]
    fn server_names_are_well_formed() {
        for id in [0u64, 1, 15, 16, 255, 256, 0xdead_beef, 1 << 60, u64::MAX] {
            let mut out = BytesMut::new();
            ServerName(id).put(&mut out);
            assert_eq!(out.len(), ServerName(id).len() + 1, "{id}");
            assert_eq!(&out[..], format!("pgw_{id:x}\0").as_bytes());
        }
    }

    #[test]
    fn parse_then_bind_uses_one_server_statement() {
        let (reg, mut c, mut s) = setup();
        let mut rw = Rewriter::new(&mut c, &mut s, 10);
        let mut out = BytesMut::new();
        assert!(rw.client_message(b'P', &parse("s1", "SELECT 1"), 1, &mut out));
        assert!(rw.client_message(b'B', &bind("s1"), 1, &mut out));
        let m = messages(&out);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].0, 'P');
        assert!(m[0].1.starts_with("pgw_"));
        assert_eq!(m[1], ('B', m[0].1.clone()));
        assert_eq!(rw.server_reply(), Reply::Forward);
        rw.server_ready(1);
        assert_eq!(reg.len(), 1);
        // Unknown names pass as they are.
        assert!(!rw.client_message(b'B', &bind("nope"), 2, &mut out));
    }

    /// The unnamed statement: within a run, after the client's Parse of it, Binds pass as they are; in a later run
    /// (maybe another client's server connection) it is prepared again first, and a client without one has the
    /// server's closed first (Postgres then answers 26000, as to that client directly).
    #[test]
    fn the_unnamed_statement_follows_its_client() {
        let (_reg, mut c, mut s) = setup();
        let mut out = BytesMut::new();
        {
            let mut rw = Rewriter::new(&mut c, &mut s, 10);
            // No unnamed statement yet: the server's is closed before the Bind.
            assert!(rw.client_message(b'B', &bind(""), 1, &mut out));
            let m = messages(&out.split());
            assert_eq!(m, [('C', String::new()), ('B', String::new())]);
            assert_eq!(rw.server_reply(), Reply::Drop);
            assert!(!rw.client_message(b'P', &parse("", "SELECT 7"), 1, &mut out));
            assert!(!rw.client_message(b'B', &bind(""), 1, &mut out));
            assert!(out.is_empty());
            assert_eq!(rw.server_reply(), Reply::Forward);
            rw.server_ready(1);
        }
        let mut other = ServerStatements::default();
        let mut rw = Rewriter::new(&mut c, &mut other, 10);
        assert!(rw.client_message(b'B', &bind(""), 2, &mut out));
        let m = messages(&out.split());
        assert_eq!(m, [('P', String::new()), ('B', String::new())]);
        assert_eq!(rw.server_reply(), Reply::Drop);
        // Once prepared in this run, the next Bind passes as it is.
        assert!(!rw.client_message(b'B', &bind(""), 2, &mut out));
        // A Parse of it that gets no reply (skipped after an error, or failed): a Bind in a later batch waits for
        // that batch's end, and then the server's is not taken for the client's.
        let mut out2 = BytesMut::new();
        assert!(!rw.client_message(b'P', &parse("", "SELECT 8"), 3, &mut out2));
        assert!(rw.must_wait(b'B', &bind(""), 4));
        rw.server_ready(3);
        assert!(!rw.must_wait(b'B', &bind(""), 4));
        assert!(rw.client_message(b'B', &bind(""), 4, &mut out2));
        assert_eq!(
            messages(&out2.split()),
            [('C', String::new()), ('B', String::new())]
        );
        assert_eq!(rw.server_reply(), Reply::Drop);
        assert!(!rw.client_message(b'P', &parse("", "SELECT 9"), 4, &mut out2));
        assert_eq!(rw.server_reply(), Reply::Forward);
        // The client closes it: the server's is gone too.
        assert!(!rw.client_message(b'C', &[b'C', 0, 0, 0, 6, b'S', 0], 2, &mut out));
        assert!(!rw.client_message(b'B', &bind(""), 2, &mut out));
    }

    #[test]
    fn second_client_reuses_the_server_statement() {
        let (reg, mut c1, mut s) = setup();
        let mut c2 = ClientStatements::new(reg.clone());
        {
            let mut rw = Rewriter::new(&mut c1, &mut s, 10);
            let mut out = BytesMut::new();
            rw.client_message(b'P', &parse("a", "SELECT 1"), 1, &mut out);
            rw.server_reply();
            rw.server_ready(1);
        }
        let mut rw = Rewriter::new(&mut c2, &mut s, 10);
        let mut out = BytesMut::new();
        assert!(rw.client_message(b'P', &parse("b", "SELECT 1"), 1, &mut out));
        // The server has it: a harmless Close stands in, and its CloseComplete becomes ParseComplete.
        assert_eq!(messages(&out), vec![('C', "pgw_0".to_string())]);
        assert_eq!(rw.server_reply(), Reply::AsParseComplete);
        rw.server_ready(1);
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn bind_on_another_server_prepares_first() {
        let (_reg, mut c, mut s1) = setup();
        let mut s2 = ServerStatements::default();
        {
            let mut rw = Rewriter::new(&mut c, &mut s1, 10);
            rw.client_message(b'P', &parse("a", "SELECT 1"), 1, &mut BytesMut::new());
            rw.server_reply();
            rw.server_ready(1);
        }
        let mut rw = Rewriter::new(&mut c, &mut s2, 10);
        let mut out = BytesMut::new();
        assert!(rw.client_message(b'B', &bind("a"), 1, &mut out));
        let m = messages(&out);
        assert_eq!(m[0].0, 'P');
        assert_eq!(m[1], ('B', m[0].1.clone()));
        assert_eq!(rw.server_reply(), Reply::Drop);
        rw.server_ready(1);
        drop(rw);
        assert_eq!(s2.len(), 1);
        // The run's reply queue stays with the connection, empty, for the next run.
        assert!(s2.queue.is_empty() && s2.queue.capacity() > 0);
    }

    #[test]
    fn skipped_parse_is_undone() {
        let (_reg, mut c, mut s) = setup();
        let mut rw = Rewriter::new(&mut c, &mut s, 10);
        let mut out = BytesMut::new();
        rw.client_message(b'P', &parse("a", "SELEC 1"), 1, &mut out);
        // The server answered with an error and then ReadyForQuery.
        rw.server_ready(1);
        drop(rw);
        assert!(c.is_empty());
        assert!(s.is_empty());
    }

    #[test]
    fn skipped_close_is_undone() {
        let (_reg, mut c, mut s) = setup();
        let mut rw = Rewriter::new(&mut c, &mut s, 10);
        rw.client_message(b'P', &parse("a", "SELECT 1"), 1, &mut BytesMut::new());
        rw.server_reply();
        rw.server_ready(1);
        rw.client_message(b'C', &close("a"), 2, &mut BytesMut::new());
        rw.server_ready(2);
        drop(rw);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn eviction_closes_the_least_recently_used_not_in_use() {
        let (_reg, mut c, mut s) = setup();
        {
            let mut rw = Rewriter::new(&mut c, &mut s, 2);
            for (i, n) in ["a", "b"].iter().enumerate() {
                rw.client_message(
                    b'P',
                    &parse(n, &format!("SELECT {i}")),
                    1,
                    &mut BytesMut::new(),
                );
                rw.server_reply();
            }
            rw.server_ready(1);
        }
        let mut rw = Rewriter::new(&mut c, &mut s, 2);
        let mut out = BytesMut::new();
        rw.client_message(b'B', &bind("a"), 1, &mut out);
        rw.client_message(b'P', &parse("c", "SELECT 2"), 1, &mut out);
        let m = messages(&out);
        // "a" is in use by this run: "b" is evicted.
        assert_eq!(m[0].0, 'B');
        assert_eq!(m[1].0, 'C');
        assert_eq!(m[2].0, 'P');
        assert_eq!(rw.server_reply(), Reply::Drop);
        assert_eq!(rw.server_reply(), Reply::Forward);
        rw.server_ready(1);
        // All in use: the cache grows past its bound rather than closing a statement this run needs.
        let mut out = BytesMut::new();
        rw.client_message(b'B', &bind("b"), 2, &mut out);
        assert_eq!(messages(&out)[0].0, 'P');
        drop(rw);
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn malformed_messages_pass() {
        let (_reg, mut c, mut s) = setup();
        let mut rw = Rewriter::new(&mut c, &mut s, 2);
        let mut out = BytesMut::new();
        assert!(!rw.client_message(b'P', &frame(b'P', b"abc"), 1, &mut out));
        assert!(!rw.client_message(b'B', &frame(b'B', b""), 1, &mut out));
        assert!(!rw.client_message(b'D', &frame(b'D', b""), 1, &mut out));
        assert!(!rw.client_message(b'C', &frame(b'C', b"S"), 1, &mut out));
        assert!(out.is_empty());
        assert_eq!(rw.pending.len(), 2);
    }

    #[test]
    fn command_tags() {
        assert!(deallocates_all(&frame(b'C', b"DISCARD ALL\0")));
        assert!(deallocates_all(&frame(b'C', b"DEALLOCATE ALL\0")));
        assert!(!deallocates_all(&frame(b'C', b"DEALLOCATE\0")));
    }

    #[test]
    fn parse_batches_of_validated_statements_are_answered_locally() {
        let reg = Arc::new(Registry::default());
        let mut c = ClientStatements::new(reg.clone());
        let mut batch = parse("a", "select 1");
        batch.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        let mut out = BytesMut::new();
        // Never accepted by a server yet: goes to one.
        assert_eq!(c.answer_parse_batch(&batch, &mut out), None);
        reg.intern(&batch[7..batch.len() - 5], b"")
            .validated
            .store(true, Ordering::Relaxed);
        assert_eq!(c.answer_parse_batch(&batch, &mut out), Some(batch.len()));
        assert_eq!(&out[..], b"1\0\0\0\x04Z\0\0\0\x05I");
        assert_eq!(c.len(), 1);
        // Under another search_path it is another statement.
        c.set_search_path(Some("other"));
        assert_eq!(c.answer_parse_batch(&batch, &mut BytesMut::new()), None);
        // Incomplete batches and other messages go to a server.
        c.set_search_path(None);
        assert_eq!(
            c.answer_parse_batch(&batch[..batch.len() - 1], &mut BytesMut::new()),
            None
        );
        assert_eq!(
            c.answer_parse_batch(&[b'S', 0, 0, 0, 4], &mut BytesMut::new()),
            None
        );
    }
}
