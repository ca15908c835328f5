//! Statement boundaries and per-statement classification into [`Raw`] findings that borrow from the SQL text.
//!
//! Classification is decided by the statement's first keyword; only the generic path (every statement that is not
//! `SET`, `RESET`, `LISTEN`, … — in particular `SELECT`/`INSERT`/`UPDATE`/`DELETE`) scans the rest of the statement,
//! looking for a handful of function calls, writes to `pg_settings` and `SELECT … INTO TEMP`. Nothing here allocates.
//!
//! Everything is linear in the length of the text: the main scan reads each token once, and every look-ahead is
//! bounded by a constant number of tokens (a `set_config` argument list longer than [`MAX_SET_CONFIG_TOKENS`] is
//! not read to its end but reported as [`Raw::Unknown`]), so no input can make the scan revisit text many times.

use std::ops::ControlFlow::{self, Break, Continue};

use super::lexer::{
    is_closed, is_uescape_char, str_content, unicode_ident_content, Kind, Lexer, StrMode, Token,
};
use super::quote::is_reserved;
use super::PinReason;

/// One finding, borrowing from the SQL text. Every variant becomes an [`super::Effect`] other than `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Raw<'a> {
    TransactionScoped,
    ResetAll,
    DiscardAll,
    Pin(PinReason),
    Unpin(PinReason),
    Unknown,
    /// `SET`/`RESET` of a variable; `value` is replayable SQL text, `None` means "back to the default".
    Set {
        name: VarName<'a>,
        value: Option<&'a str>,
    },
    /// `set_config(name, value, false)` with literal arguments; `value` `None` is a SQL `NULL` (reset).
    SetConfig {
        name: Token,
        value: Option<Token>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VarName<'a> {
    Fixed(&'static str),
    /// The source text of a dotted `var_name`: identifiers, quoted or not, separated by `.`.
    Source(&'a str),
}

/// Where the statement's leading keywords stand on `CREATE [OR REPLACE] {FUNCTION|PROCEDURE}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lead {
    Start,
    Create,
    CreateOr,
    CreateOrReplace,
    Routine,
    Other,
}

/// The tokens of one statement: stops (consuming it) at a `;` that ends the statement. A `;` inside a
/// `BEGIN ATOMIC … END` routine body does not, as in PostgreSQL's grammar.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stmt<'a> {
    lx: Lexer<'a>,
    ended: bool,
    lead: Lead,
    after_begin: bool,
    depth: u32,
}

fn kw_eq(text: &str, kw: &str) -> bool {
    text.eq_ignore_ascii_case(kw)
}

/// `text` lower-cased into `buf` for matching against keywords; empty if it does not fit.
fn lower<'b>(text: &str, buf: &'b mut [u8; 12]) -> &'b [u8] {
    match buf.get_mut(..text.len()) {
        Some(b) => {
            b.copy_from_slice(text.as_bytes());
            b.make_ascii_lowercase();
            b
        }
        None => &[],
    }
}

impl<'a> Stmt<'a> {
    pub fn new(lx: Lexer<'a>) -> Self {
        Stmt {
            lx,
            ended: false,
            lead: Lead::Start,
            after_begin: false,
            depth: 0,
        }
    }

    /// The lexer positioned after this statement (and its `;`).
    pub fn into_lexer(mut self) -> Lexer<'a> {
        while self.next().is_some() {}
        self.lx
    }

    fn sql(&self) -> &'a str {
        self.lx.sql()
    }

    fn text(&self, t: Token) -> &'a str {
        self.lx.text(t)
    }

    fn peek(&self) -> Option<Token> {
        let mut ahead = *self;
        ahead.next()
    }

    fn is_kw(&self, t: Token, kw: &str) -> bool {
        t.kind == Kind::Ident && kw_eq(self.text(t), kw)
    }

    fn peek_is(&self, kind: Kind) -> bool {
        self.peek().is_some_and(|t| t.kind == kind)
    }

    fn peek_kw(&self, kw: &str) -> bool {
        self.peek().is_some_and(|t| self.is_kw(t, kw))
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        let yes = self.peek_kw(kw);
        if yes {
            self.next();
        }
        yes
    }

    fn track(&mut self, t: Token) {
        if t.kind != Kind::Ident {
            self.after_begin = false;
            if self.lead != Lead::Routine {
                self.lead = Lead::Other;
            }
            return;
        }
        let w = self.text(t);
        self.lead = match self.lead {
            Lead::Start if kw_eq(w, "create") => Lead::Create,
            Lead::Create if kw_eq(w, "or") => Lead::CreateOr,
            Lead::CreateOr if kw_eq(w, "replace") => Lead::CreateOrReplace,
            Lead::Create | Lead::CreateOrReplace
                if kw_eq(w, "function") || kw_eq(w, "procedure") =>
            {
                Lead::Routine
            }
            Lead::Routine => Lead::Routine,
            _ => Lead::Other,
        };
        if self.lead == Lead::Routine {
            // BEGIN ATOMIC opens the body; inside it, CASE … END nests.
            if (self.after_begin && kw_eq(w, "atomic")) || (self.depth > 0 && kw_eq(w, "case")) {
                self.depth += 1;
            } else if self.depth > 0 && kw_eq(w, "end") {
                self.depth -= 1;
            }
            self.after_begin = kw_eq(w, "begin");
        }
    }
}

impl Iterator for Stmt<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        if self.ended {
            return None;
        }
        match self.lx.next() {
            Some(t) if t.kind == Kind::Punct(b';') && self.depth == 0 => {
                self.ended = true;
                None
            }
            Some(t) => {
                self.track(t);
                Some(t)
            }
            None => {
                self.ended = true;
                None
            }
        }
    }
}

impl PinReason {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The sink for one statement's findings: drops repeated pins/unpins of the same reason and repeated unknowns.
struct Out<'f, F> {
    f: &'f mut F,
    pinned: u8,
    unpinned: u8,
    unknown: bool,
}

impl<'a, F: FnMut(Raw<'a>) -> ControlFlow<()>> Out<'_, F> {
    fn emit(&mut self, r: Raw<'a>) -> ControlFlow<()> {
        let (seen, bit) = match r {
            Raw::Pin(p) => (&mut self.pinned, p.bit()),
            Raw::Unpin(p) => (&mut self.unpinned, p.bit()),
            Raw::Unknown if self.unknown => return Continue(()),
            Raw::Unknown => {
                self.unknown = true;
                return (self.f)(r);
            }
            _ => return (self.f)(r),
        };
        if *seen & bit != 0 {
            return Continue(());
        }
        *seen |= bit;
        (self.f)(r)
    }
}

/// Classify the statement `st` is at, passing each finding to `f`; `Break` from `f` stops at once.
pub(super) fn statement<'a, F>(st: &mut Stmt<'a>, f: &mut F) -> ControlFlow<()>
where
    F: FnMut(Raw<'a>) -> ControlFlow<()>,
{
    let mut out = Out {
        f,
        pinned: 0,
        unpinned: 0,
        unknown: false,
    };
    let Some(mut first) = st.next() else {
        return Continue(());
    };
    // EXPLAIN [ANALYZE] [VERBOSE] / EXPLAIN (options): classify the explained statement (conservatively, even when it
    // is only planned). A loop, not recursion: `EXPLAIN EXPLAIN …` must not grow the stack.
    while st.is_kw(first, "explain") {
        if st.peek_is(Kind::Punct(b'(')) {
            skip_parens(st);
        }
        while st.eat_kw("analyze") || st.eat_kw("analyse") || st.eat_kw("verbose") {}
        match st.next() {
            Some(t) => first = t,
            None => return Continue(()),
        }
    }
    if first.kind == Kind::Punct(b'(') {
        return finished(body(st, &mut out, Scan::SELECT));
    }
    if first.kind != Kind::Ident {
        return finished(body(st, &mut out, Scan::PLAIN));
    }
    let mut buf = [0u8; 12];
    match lower(st.text(first), &mut buf) {
        b"select" | b"with" => finished(body(st, &mut out, Scan::SELECT)),
        b"update" | b"insert" | b"merge" => finished(body(st, &mut out, Scan::WRITE)),
        b"set" => set_stmt(st, &mut out),
        b"reset" => reset_stmt(st, &mut out),
        b"discard" => {
            if st.eat_kw("all") {
                out.emit(Raw::DiscardAll)
            } else if st.eat_kw("temp") || st.eat_kw("temporary") {
                out.emit(Raw::Unpin(PinReason::TempTable))
            } else {
                Continue(())
            }
        }
        b"listen" => out.emit(Raw::Pin(PinReason::Listen)),
        // Each of these may release what pinned a client (the caller checks the server before it believes so).
        b"unlisten" => out.emit(Raw::Unpin(PinReason::Listen)),
        b"prepare" => {
            let mut ahead = *st;
            match ahead.next() {
                // PREPARE TRANSACTION 'gid' is two-phase commit, not a prepared statement.
                Some(t)
                    if st.is_kw(t, "transaction")
                        && ahead.peek().is_some_and(|n| matches!(n.kind, Kind::Str(_))) =>
                {
                    Continue(())
                }
                Some(_) => out.emit(Raw::Pin(PinReason::SqlPrepare)),
                None => Continue(()),
            }
        }
        b"deallocate" => out.emit(Raw::Unpin(PinReason::SqlPrepare)),
        b"close" => out.emit(Raw::Unpin(PinReason::WithHoldCursor)),
        b"drop" => out.emit(Raw::Unpin(PinReason::TempTable)),
        b"declare" => {
            let mut hold = false;
            while let Some(t) = st.next() {
                if st.is_kw(t, "for") {
                    break;
                }
                hold |= st.is_kw(t, "with") && st.peek_kw("hold");
            }
            if hold {
                out.emit(Raw::Pin(PinReason::WithHoldCursor))?;
            }
            finished(body(st, &mut out, Scan::PLAIN))
        }
        b"create" => create_stmt(st, &mut out),
        b"load" => out.emit(Raw::Pin(PinReason::Other)),
        _ => finished(body(st, &mut out, Scan::PLAIN)),
    }
}

/// A body scan's outcome when the caller has no use for its facts.
fn finished(flow: ControlFlow<(), Facts>) -> ControlFlow<()> {
    match flow {
        Continue(_) => Continue(()),
        Break(()) => Break(()),
    }
}

/// Skip a parenthesised group starting at the next token.
fn skip_parens(st: &mut Stmt<'_>) {
    let mut depth = 0u32;
    for t in st.by_ref() {
        match t.kind {
            Kind::Punct(b'(') => depth += 1,
            Kind::Punct(b')') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return;
                }
            }
            _ => {}
        }
    }
}

/// What the generic scan looks for besides function calls.
#[derive(Debug, Clone, Copy)]
struct Scan {
    /// `SELECT … INTO [GLOBAL|LOCAL] TEMP[ORARY] …`.
    select_into: bool,
    /// `pg_temp.` qualified names and `ON COMMIT DROP` (for `CREATE`).
    create: bool,
    /// The statement's (consumed) first keyword was `UPDATE`, `INSERT` or `MERGE`.
    write: bool,
}

impl Scan {
    const PLAIN: Scan = Scan {
        select_into: false,
        create: false,
        write: false,
    };
    const SELECT: Scan = Scan {
        select_into: true,
        ..Scan::PLAIN
    };
    const CREATE: Scan = Scan {
        create: true,
        ..Scan::PLAIN
    };
    const WRITE: Scan = Scan {
        write: true,
        ..Scan::PLAIN
    };
}

#[derive(Debug, Default, Clone, Copy)]
struct Facts {
    temp_schema: bool,
    on_commit_drop: bool,
}

/// Functions whose call has a session effect.
#[derive(Debug, Clone, Copy)]
enum Call {
    Effect(Raw<'static>),
    SetConfig,
}

fn call_kind(name: &str, quoted: bool) -> Option<Call> {
    const LOCK: Call = Call::Effect(Raw::Pin(PinReason::AdvisoryLock));
    const UNLOCK: Call = Call::Effect(Raw::Unpin(PinReason::AdvisoryLock));
    let candidates: &[(&str, Call)] = match name.len() {
        10 => &[("set_config", Call::SetConfig)],
        14 => &[("dblink_connect", Call::Effect(Raw::Pin(PinReason::Other)))],
        16 => &[
            ("pg_advisory_lock", LOCK),
            ("dblink_connect_u", Call::Effect(Raw::Pin(PinReason::Other))),
        ],
        18 => &[("pg_advisory_unlock", UNLOCK)],
        20 => &[("pg_try_advisory_lock", LOCK)],
        22 => &[("pg_advisory_unlock_all", UNLOCK)],
        23 => &[("pg_advisory_lock_shared", LOCK)],
        25 => &[("pg_advisory_unlock_shared", UNLOCK)],
        27 => &[("pg_try_advisory_lock_shared", LOCK)],
        _ => return None,
    };
    candidates
        .iter()
        .find(|(n, _)| if quoted { name == *n } else { kw_eq(name, n) })
        .map(|&(_, c)| c)
}

/// `pg_temp` or a backend's own `pg_temp_N`.
fn is_temp_schema(name: &str, quoted: bool) -> bool {
    let Some(rest) = name.get(..7).filter(|p| {
        if quoted {
            *p == "pg_temp"
        } else {
            kw_eq(p, "pg_temp")
        }
    }) else {
        return false;
    };
    let suffix = &name[rest.len()..];
    suffix.is_empty()
        || suffix
            .strip_prefix('_')
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// `pg_settings`, the view whose update rule calls `set_config`.
fn is_pg_settings(name: &str, quoted: bool) -> bool {
    name.len() == 11
        && if quoted {
            name == "pg_settings"
        } else {
            kw_eq(name, "pg_settings")
        }
}

/// `UPDATE`, `INSERT` or `MERGE`.
fn is_write_kw(name: &str) -> bool {
    matches!(name.len(), 5 | 6)
        && (kw_eq(name, "update") || kw_eq(name, "insert") || kw_eq(name, "merge"))
}

/// The `U&"…"` identifier `t`, decoded into `buf`; consumes its `UESCAPE 'c'` clause if it has one. `None` if it
/// cannot be decoded (see [`unicode_ident_content`]), which callers must take as "could be any name".
fn unicode_ident<'b>(st: &mut Stmt<'_>, t: Token, buf: &'b mut [u8; 32]) -> Option<&'b str> {
    let mut esc = Some(b'\\');
    if st.peek_kw("uescape") {
        let mut ahead = *st;
        ahead.next();
        if let Some(lit) = ahead.peek().filter(|l| matches!(l.kind, Kind::Str(_))) {
            ahead.next();
            *st = ahead;
            // Only the plain `'c'` spelling is decoded; others (E'…', continuations) are left undecoded.
            esc = match (lit.kind, st.text(lit).as_bytes()) {
                (Kind::Str(StrMode::Standard), &[b'\'', c, b'\'']) if is_uescape_char(c) => Some(c),
                _ => None,
            };
        }
    }
    unicode_ident_content(st.sql(), t, esc?, buf)
}

/// Scan the rest of a statement for session-affecting function calls (and what `scan` asks for).
fn body<'a, F>(st: &mut Stmt<'a>, out: &mut Out<'_, F>, scan: Scan) -> ControlFlow<(), Facts>
where
    F: FnMut(Raw<'a>) -> ControlFlow<()>,
{
    let mut facts = Facts::default();
    let mut prev: Option<Token> = None;
    // An `UPDATE`/`INSERT`/`MERGE` anywhere in a statement that names `pg_settings`: the view's rules call
    // `set_config`, with whatever values the statement computes. Conservatively reported as unknown.
    let mut writes = scan.write;
    let mut settings = false;
    let mut settings_reported = false;
    let mut buf = [0u8; 32];
    while let Some(t) = st.next() {
        let name = match t.kind {
            Kind::Ident => Some((st.text(t), false)),
            // A plain `"…"` spells one of the names we look for only as the name itself (no `""` inside).
            Kind::QuotedIdent if st.text(t).starts_with('"') => {
                let text = st.text(t);
                text.strip_prefix('"')
                    .and_then(|s| s.strip_suffix('"'))
                    .map(|inner| (inner, true))
            }
            Kind::QuotedIdent => match unicode_ident(st, t, &mut buf) {
                Some(decoded) => Some((decoded, true)),
                None => {
                    // Undecodable: it could be any name, so a call of it could be any function.
                    settings = true;
                    if st.peek_is(Kind::Punct(b'(')) {
                        out.emit(Raw::Unknown)?;
                    }
                    None
                }
            },
            _ => None,
        };
        if let Some((name, quoted)) = name {
            if let Some(call) = call_kind(name, quoted) {
                if st.peek_is(Kind::Punct(b'(')) {
                    match call {
                        Call::Effect(raw) => out.emit(raw)?,
                        Call::SetConfig => set_config(*st, out)?,
                    }
                }
            } else if is_pg_settings(name, quoted) {
                settings = true;
            } else if !quoted
                && is_write_kw(name)
                // `SELECT … FOR [NO KEY] UPDATE` only locks rows.
                && !prev.is_some_and(|p| st.is_kw(p, "for") || st.is_kw(p, "key"))
            {
                writes = true;
            } else if scan.select_into
                && !quoted
                && kw_eq(name, "into")
                && !prev.is_some_and(|p| st.is_kw(p, "insert") || st.is_kw(p, "merge"))
                && into_temp(*st)
            {
                out.emit(Raw::Pin(PinReason::TempTable))?;
            } else if scan.create {
                if is_temp_schema(name, quoted) && st.peek_is(Kind::Punct(b'.')) {
                    facts.temp_schema = true;
                } else if !quoted && kw_eq(name, "on") {
                    let mut ahead = *st;
                    if ahead.eat_kw("commit") && ahead.eat_kw("drop") {
                        facts.on_commit_drop = true;
                    }
                }
            }
        }
        if writes && settings && !settings_reported {
            settings_reported = true;
            out.emit(Raw::Unknown)?;
        }
        prev = Some(t);
    }
    Continue(facts)
}

/// After `INTO` in a SELECT: is this `[GLOBAL|LOCAL] {TEMP|TEMPORARY} [TABLE] name` (rather than a table that
/// happens to be called `temp`, as in `SELECT 1 INTO temp FROM t`)?
fn into_temp(mut st: Stmt<'_>) -> bool {
    let Some(mut t) = st.next() else { return false };
    if st.is_kw(t, "global") || st.is_kw(t, "local") {
        match st.next() {
            Some(n) => t = n,
            None => return false,
        }
    }
    if !(st.is_kw(t, "temp") || st.is_kw(t, "temporary")) {
        return false;
    }
    match st.next() {
        Some(n) if n.kind == Kind::QuotedIdent => true,
        Some(n) if n.kind == Kind::Ident => st.is_kw(n, "table") || !is_reserved(st.text(n)),
        _ => false,
    }
}

#[derive(Debug, Clone, Copy)]
enum Arg {
    Empty,
    One(Token),
    Many,
}

/// How many tokens of a `set_config` argument list are read, at most: `('name', 'value', false)` takes 6, and a
/// longer list can only be `is_local = true` with computed arguments (or unknown). Reading further is what would
/// make the scan quadratic (`set_config(set_config(set_config(…`), so a longer list is reported as unknown.
pub(super) const MAX_SET_CONFIG_TOKENS: usize = 64;

/// `set_config(` … with `st` just before the `(`. Reads a copy of the statement, so calls inside the arguments are
/// still seen by the main scan.
fn set_config<'a, F>(mut st: Stmt<'a>, out: &mut Out<'_, F>) -> ControlFlow<()>
where
    F: FnMut(Raw<'a>) -> ControlFlow<()>,
{
    st.next();
    let mut args = [Arg::Empty; 3];
    let mut n = 0usize;
    let mut cur = Arg::Empty;
    let mut depth = 0u32;
    let mut budget = MAX_SET_CONFIG_TOKENS;
    loop {
        let Some(t) = st.next() else {
            return out.emit(Raw::Unknown);
        };
        if budget == 0 {
            return out.emit(Raw::Unknown);
        }
        budget -= 1;
        let end_arg = match t.kind {
            Kind::Punct(b'(' | b'[') => {
                depth += 1;
                cur = Arg::Many;
                false
            }
            Kind::Punct(b')' | b']') if depth > 0 => {
                depth -= 1;
                cur = Arg::Many;
                false
            }
            Kind::Punct(b')') => true,
            Kind::Punct(b',') if depth == 0 => true,
            _ => {
                cur = match cur {
                    Arg::Empty => Arg::One(t),
                    _ => Arg::Many,
                };
                false
            }
        };
        if end_arg {
            if let Some(slot) = args.get_mut(n) {
                *slot = cur;
            }
            n += 1;
            cur = Arg::Empty;
            if t.kind == Kind::Punct(b')') {
                break;
            }
        }
    }
    if n != 3 {
        return out.emit(Raw::Unknown);
    }
    let sql = st.sql();
    let is_string = |t: Token| matches!(t.kind, Kind::Str(_) | Kind::Dollar) && is_closed(sql, t);
    let is_local = match args[2] {
        Arg::One(t) => literal_bool(sql, t),
        _ => None,
    };
    match is_local {
        // A transaction-scoped change of how later statements lex still hides them from this scanner; a name that
        // is a literal but not a plain one is taken to be such a change.
        Some(true) => match args[0] {
            Arg::One(t) if is_string(t) && plain_str(sql, t).is_none_or(is_lexing_var) => {
                out.emit(Raw::Unknown)
            }
            _ => Continue(()),
        },
        None => out.emit(Raw::Unknown),
        Some(false) => {
            let name = match args[0] {
                Arg::One(t) if is_string(t) => t,
                _ => return out.emit(Raw::Unknown),
            };
            let value = match args[1] {
                Arg::One(t) if is_string(t) => Some(t),
                Arg::One(t) if st.is_kw(t, "null") => None,
                _ => return out.emit(Raw::Unknown),
            };
            out.emit(Raw::SetConfig { name, value })
        }
    }
}

/// A literal `set_config` accepts as its `is_local` argument, as a boolean (`NULL` counts as false there).
fn literal_bool(sql: &str, t: Token) -> Option<bool> {
    let text = &sql[t.start..t.end];
    match t.kind {
        Kind::Ident if kw_eq(text, "true") => Some(true),
        Kind::Ident if kw_eq(text, "false") || kw_eq(text, "null") => Some(false),
        Kind::Number if text == "1" => Some(true),
        Kind::Number if text == "0" => Some(false),
        Kind::Str(_) | Kind::Dollar => parse_bool(&str_content(sql, t)?),
        _ => None,
    }
}

/// PostgreSQL's boolean input syntax: unique prefixes of true/false/yes/no, on/off, 1/0, any case, trimmed.
fn parse_bool(s: &str) -> Option<bool> {
    let s = s.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c'));
    let prefix_of = |word: &str, min: usize| {
        s.len() >= min && s.len() <= word.len() && kw_eq(s, &word[..s.len()])
    };
    if prefix_of("true", 1) || prefix_of("yes", 1) || prefix_of("on", 2) || s == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || s == "0" {
        Some(false)
    } else {
        None
    }
}

/// The value part of a `SET`.
enum Value<'a> {
    Missing,
    Default,
    Text(&'a str),
}

/// Everything up to the end of the statement as a value: `DEFAULT` alone, or the source text from the first token
/// to the end of the last (so a trailing comment is not part of it). `None` if the last token is unterminated.
fn rest_value<'a>(st: &mut Stmt<'a>) -> Option<Value<'a>> {
    let Some(first) = st.next() else {
        return Some(Value::Missing);
    };
    let mut last = first;
    for t in st.by_ref() {
        last = t;
    }
    if !is_closed(st.sql(), last) {
        return None;
    }
    if first == last && st.is_kw(first, "default") {
        return Some(Value::Default);
    }
    Some(Value::Text(&st.sql()[first.start..last.end]))
}

/// `name[.name…]` at the next token: its source span.
fn var_name(st: &mut Stmt<'_>) -> Option<(usize, usize)> {
    let is_name = |t: &Token| matches!(t.kind, Kind::Ident | Kind::QuotedIdent);
    let first = st.next().filter(is_name)?;
    let mut end = first.end;
    while st.peek_is(Kind::Punct(b'.')) {
        st.next();
        end = st.next().filter(is_name)?.end;
    }
    Some((first.start, end))
}

/// `name {TO|=} value` / `name FROM CURRENT` at the next token; `st` is left alone if it is not that.
fn generic_set<'a>(st: &mut Stmt<'a>) -> Option<Raw<'a>> {
    let mut ahead = *st;
    let (start, end) = var_name(&mut ahead)?;
    let op = ahead.next()?;
    let from = ahead.is_kw(op, "from");
    if !(op.kind == Kind::Punct(b'=') || ahead.is_kw(op, "to") || from) {
        return None;
    }
    *st = ahead;
    if from {
        // SET x FROM CURRENT copies the current value, which may be a SET LOCAL one, into the session.
        return Some(Raw::Unknown);
    }
    let name = VarName::Source(&st.sql()[start..end]);
    Some(match rest_value(st) {
        Some(Value::Default) => Raw::Set { name, value: None },
        Some(Value::Text(v)) => Raw::Set {
            name,
            value: Some(v),
        },
        Some(Value::Missing) | None => Raw::Unknown,
    })
}

/// A `SET` of a fixed variable from the special syntaxes (`SET TIME ZONE`, `SET SCHEMA`, …): one of
/// `default_words` alone (or nothing at all, if `empty_is_default`) means the default.
fn fixed_set<'a>(
    st: &mut Stmt<'a>,
    name: &'static str,
    default_words: &[&str],
    empty_is_default: bool,
) -> Raw<'a> {
    let name = VarName::Fixed(name);
    let mut ahead = *st;
    match (ahead.next(), ahead.next()) {
        (None, _) if empty_is_default => return Raw::Set { name, value: None },
        (Some(t), None) if default_words.iter().any(|w| st.is_kw(t, w)) => {
            return Raw::Set { name, value: None }
        }
        _ => {}
    }
    match rest_value(st) {
        Some(Value::Text(v)) => Raw::Set {
            name,
            value: Some(v),
        },
        _ => Raw::Unknown,
    }
}

fn set_stmt<'a, F>(st: &mut Stmt<'a>, out: &mut Out<'_, F>) -> ControlFlow<()>
where
    F: FnMut(Raw<'a>) -> ControlFlow<()>,
{
    // A generic `SET name = …` comes first: `SET local = 5` sets a variable called "local".
    if let Some(raw) = generic_set(st) {
        return out.emit(raw);
    }
    if st.peek_kw("local") {
        let mut ahead = *st;
        ahead.next();
        // A transaction-scoped change of how later statements lex still hides them from this scanner.
        let raw = match ahead.next() {
            Some(t) if changes_lexing(&mut ahead, t) => Raw::Unknown,
            _ => Raw::TransactionScoped,
        };
        return out.emit(raw);
    }
    if st.peek_kw("session") {
        let mut ahead = *st;
        ahead.next();
        if !(ahead.peek_kw("authorization") || ahead.peek_kw("characteristics")) {
            *st = ahead;
            if let Some(raw) = generic_set(st) {
                return out.emit(raw);
            }
        }
    }
    let Some(t) = st.next() else {
        return out.emit(Raw::Unknown);
    };
    let mut buf = [0u8; 12];
    let word = if t.kind == Kind::Ident {
        lower(st.text(t), &mut buf)
    } else {
        &[]
    };
    let raw = match word {
        b"transaction" | b"constraints" => Raw::TransactionScoped,
        b"session" if st.eat_kw("authorization") => match rest_value(st) {
            Some(Value::Default) => Raw::Unpin(PinReason::SessionAuthorization),
            Some(Value::Text(_)) => Raw::Pin(PinReason::SessionAuthorization),
            Some(Value::Missing) | None => Raw::Unknown,
        },
        b"session" if st.eat_kw("characteristics") => return characteristics(st, out),
        b"role" => match rest_value(st) {
            Some(Value::Text(v)) if is_none_value(v) => Raw::Unpin(PinReason::SessionAuthorization),
            Some(Value::Text(_)) => Raw::Pin(PinReason::SessionAuthorization),
            _ => Raw::Unknown,
        },
        b"time" if st.eat_kw("zone") => {
            // `SET TIME ZONE INTERVAL '…' HOUR TO MINUTE` has no `SET timezone = …` spelling.
            if st.peek_kw("interval") {
                Raw::Unknown
            } else {
                fixed_set(st, "timezone", &["local", "default"], false)
            }
        }
        b"schema" => fixed_set(st, "search_path", &[], false),
        b"names" => fixed_set(st, "client_encoding", &["default"], true),
        b"xml" if st.eat_kw("option") => fixed_set(st, "xmloption", &[], false),
        // SET CATALOG always fails ("current database cannot be changed").
        b"catalog" => return Continue(()),
        _ => Raw::Unknown,
    };
    out.emit(raw)
}

/// Variables that change how PostgreSQL reads later statements — which this module cannot follow, since it assumes
/// `standard_conforming_strings = on` and reads the text as UTF-8.
const LEXING_VARS: [&str; 2] = ["standard_conforming_strings", "client_encoding"];

fn is_lexing_var(name: &str) -> bool {
    LEXING_VARS.iter().any(|v| kw_eq(name, v))
}

/// Whether the variable named at `t` (the token after `SET LOCAL`) is one of [`LEXING_VARS`] (or `NAMES`, which sets
/// `client_encoding`), or might be. Variable names are case-insensitive even when quoted.
fn changes_lexing(st: &mut Stmt<'_>, t: Token) -> bool {
    let text = st.text(t);
    match t.kind {
        Kind::Ident => kw_eq(text, "names") || is_lexing_var(text),
        Kind::QuotedIdent if text.starts_with('"') => text
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .is_some_and(is_lexing_var),
        Kind::QuotedIdent => {
            let mut buf = [0u8; 32];
            unicode_ident(st, t, &mut buf).is_none_or(is_lexing_var)
        }
        _ => false,
    }
}

/// The contents of a string literal token when they can be had without allocating: `None` for a literal with
/// `''`, a continuation, or an escape.
fn plain_str(sql: &str, t: Token) -> Option<&str> {
    let text = &sql[t.start..t.end];
    match t.kind {
        Kind::Dollar => str_content(sql, t).and_then(|c| match c {
            std::borrow::Cow::Borrowed(b) => Some(b),
            std::borrow::Cow::Owned(_) => None,
        }),
        Kind::Str(mode) => {
            let open = text.find('\'')?;
            let inner = text[open + 1..].strip_suffix('\'')?;
            let plain =
                !inner.contains('\'') && (mode == StrMode::Standard || !inner.contains('\\'));
            plain.then_some(inner)
        }
        _ => None,
    }
}

/// Whether a replayable value is the single word `none` (as `SET ROLE NONE` / `SET ROLE 'none'` spell it).
pub(super) fn is_none_value(v: &str) -> bool {
    let mut lx = Lexer::new(v);
    let (Some(t), None) = (lx.next(), lx.next()) else {
        return false;
    };
    match t.kind {
        Kind::Ident => kw_eq(v, "none"),
        Kind::Str(_) | Kind::Dollar => str_content(v, t).is_some_and(|c| c == "none"),
        Kind::QuotedIdent => v == "\"none\"",
        _ => false,
    }
}

/// `SET SESSION CHARACTERISTICS AS TRANSACTION modes`: changes the session's transaction defaults.
fn characteristics<'a, F>(st: &mut Stmt<'a>, out: &mut Out<'_, F>) -> ControlFlow<()>
where
    F: FnMut(Raw<'a>) -> ControlFlow<()>,
{
    if !(st.eat_kw("as") && st.eat_kw("transaction")) {
        return out.emit(Raw::Unknown);
    }
    let mut isolation = None;
    let mut read_only = None;
    let mut deferrable = None;
    let mut any = false;
    while let Some(t) = st.next() {
        if any && t.kind == Kind::Punct(b',') {
            continue;
        }
        let ok = if st.is_kw(t, "isolation") && st.eat_kw("level") {
            isolation = if st.eat_kw("serializable") {
                Some("'serializable'")
            } else if st.eat_kw("repeatable") && st.eat_kw("read") {
                Some("'repeatable read'")
            } else if st.eat_kw("read") {
                if st.eat_kw("committed") {
                    Some("'read committed'")
                } else if st.eat_kw("uncommitted") {
                    Some("'read uncommitted'")
                } else {
                    None
                }
            } else {
                None
            };
            isolation.is_some()
        } else if st.is_kw(t, "read") {
            read_only = if st.eat_kw("only") {
                Some("on")
            } else if st.eat_kw("write") {
                Some("off")
            } else {
                None
            };
            read_only.is_some()
        } else if st.is_kw(t, "deferrable") {
            deferrable = Some("on");
            true
        } else if st.is_kw(t, "not") && st.eat_kw("deferrable") {
            deferrable = Some("off");
            true
        } else {
            false
        };
        if !ok {
            return out.emit(Raw::Unknown);
        }
        any = true;
    }
    if !any {
        return out.emit(Raw::Unknown);
    }
    for (name, value) in [
        ("default_transaction_isolation", isolation),
        ("default_transaction_read_only", read_only),
        ("default_transaction_deferrable", deferrable),
    ] {
        if let Some(value) = value {
            out.emit(Raw::Set {
                name: VarName::Fixed(name),
                value: Some(value),
            })?;
        }
    }
    Continue(())
}

fn reset_stmt<'a, F>(st: &mut Stmt<'a>, out: &mut Out<'_, F>) -> ControlFlow<()>
where
    F: FnMut(Raw<'a>) -> ControlFlow<()>,
{
    let mut ahead = *st;
    let raw = match (ahead.next(), ahead.next()) {
        (Some(a), _) if st.is_kw(a, "all") => Raw::ResetAll,
        (Some(a), Some(b)) if st.is_kw(a, "time") && st.is_kw(b, "zone") => Raw::Set {
            name: VarName::Fixed("timezone"),
            value: None,
        },
        (Some(a), Some(b)) if st.is_kw(a, "session") && st.is_kw(b, "authorization") => {
            Raw::Unpin(PinReason::SessionAuthorization)
        }
        (Some(a), Some(b)) if st.is_kw(a, "transaction") && st.is_kw(b, "isolation") => {
            Raw::TransactionScoped
        }
        _ => match var_name(st) {
            Some((start, end)) if st.peek().is_none() => Raw::Set {
                name: VarName::Source(&st.sql()[start..end]),
                value: None,
            },
            _ => Raw::Unknown,
        },
    };
    out.emit(raw)
}

fn create_stmt<'a, F>(st: &mut Stmt<'a>, out: &mut Out<'_, F>) -> ControlFlow<()>
where
    F: FnMut(Raw<'a>) -> ControlFlow<()>,
{
    let mut temp = false;
    let mut buf = [0u8; 12];
    let kind = loop {
        let Some(t) = st.next() else {
            return Continue(());
        };
        if t.kind != Kind::Ident {
            break t;
        }
        match lower(st.text(t), &mut buf) {
            b"or" | b"replace" | b"global" | b"local" | b"unlogged" | b"recursive" => {}
            b"temp" | b"temporary" => temp = true,
            _ => break t,
        }
    };
    // A routine's body is not executed by CREATE (and may be a BEGIN ATOMIC block full of statements).
    if st.is_kw(kind, "function") || st.is_kw(kind, "procedure") {
        return Continue(());
    }
    let facts = match body(st, out, Scan::CREATE) {
        Continue(facts) => facts,
        Break(()) => return Break(()),
    };
    if temp || facts.temp_schema {
        // ON COMMIT DROP: gone when the transaction ends.
        let raw = if st.is_kw(kind, "table") && facts.on_commit_drop {
            Raw::TransactionScoped
        } else {
            Raw::Pin(PinReason::TempTable)
        };
        out.emit(raw)?;
    }
    Continue(())
}
