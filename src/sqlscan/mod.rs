//! Which client statements change *session* state — what transaction pooling must know about every `Query` and
//! `Parse` — found by lexing, without a SQL parser.
//!
//! Owns: a tokenizer that splits SQL exactly as PostgreSQL does with `standard_conforming_strings = on` (`--` and
//! nested `/* */` comments, `'…'` with `''`, `E'…'` with backslash escapes, `U&'…'`, string continuation across
//! newlines, `$tag$…$tag$` versus `$1`, `"quoted"` identifiers, `;` between statements but not inside a
//! `BEGIN ATOMIC … END` routine body); the classification of each statement by its first keyword into an
//! [`Effect`]; and quoting for the `SET` statements a pooler replays.
//!
//! Must not touch: anything outside a `&str` — no I/O, no sockets, no configuration, no logging. Pure functions.
//!
//! Cost: [`has_session_effects`] never allocates and makes one pass over the text; for a statement whose first
//! keyword is not one of the session-changing ones (`SET`, `RESET`, `DISCARD`, `LISTEN`, `UNLISTEN`, `PREPARE`,
//! `DEALLOCATE`, `CLOSE`, `DECLARE`, `CREATE`, `LOAD`) the rest of the statement is only checked, one identifier
//! at a time against a length-keyed table, for the few functions that matter (`pg_advisory_lock` and friends,
//! `set_config`, `dblink_connect`; quoted or `U&"…"`-spelled ones too), for a write to `pg_settings` and, after
//! `SELECT`/`WITH`, for `INTO TEMP`. [`session_effects`] allocates only for what it returns. Both take time linear
//! in the length of the text, whatever it holds: every look-ahead is bounded by a constant number of tokens.
//!
//! What it cannot see: effects hidden in function bodies, `DO` blocks, `EXECUTE` of an earlier `PREPARE` (which pins
//! anyway), or dynamic SQL. A client that sets `standard_conforming_strings = off` (reported as a [`Effect::Set`]
//! like any other) makes later backslashes in `'…'` lex differently from what is assumed here.

mod classify;
mod lexer;
mod quote;
#[cfg(test)]
mod tests;
mod tokens;

use std::ops::ControlFlow;

pub use tokens::{
    called_functions, deallocate_name, fingerprint, fingerprint_and_literals, fingerprint_bytes,
    fingerprint_into, leading_words, name_value, number_shape, shape_prefix_key, statements,
    string_bodies, string_value, tokens, ShapeMatcher, TokenKind,
};

use classify::{Raw, Stmt, VarName};
use lexer::{ident_content, str_content, Kind, Lexer};

/// One statement's effect on session state, as far as pooling is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The session value of a variable changes: `SET [SESSION] name {TO|=} value`, `SET name TO DEFAULT` and
    /// `RESET name` (value `None`: back to the default), `SET TIME ZONE x` (`timezone`), `SET SCHEMA 'x'`
    /// (`search_path`), `SET NAMES 'x'` (`client_encoding`), `SET XML OPTION x` (`xmloption`),
    /// `SET SESSION CHARACTERISTICS AS TRANSACTION …` (`default_transaction_isolation`, `…_read_only`,
    /// `…_deferrable`), and `set_config('name', 'value', false)` with literal arguments.
    ///
    /// `name` is folded to lower case where the SQL left it unquoted and kept as written where it was a quoted
    /// identifier or a string (PostgreSQL itself compares variable names case-insensitively, so should callers).
    /// `value` is SQL text that can be replayed as `SET <quote_ident(name)> = <value>`: for `SET` the source text
    /// after `TO`/`=` up to the end of the statement's last token (e.g. `'UTC'`, `public, "My Schema"`, `5s`); for
    /// `set_config` the value literal as written, except for list variables such as `search_path`, where the list is
    /// re-spelled as identifiers so that `SET` reads it the way `set_config` did.
    Set { name: String, value: Option<String> },
    /// `SET LOCAL …`, `SET TRANSACTION …`, `SET CONSTRAINTS …`, `RESET TRANSACTION ISOLATION LEVEL`, a `SET` of
    /// `transaction_isolation`/`transaction_read_only`/`transaction_deferrable`, and `CREATE TEMP TABLE … ON COMMIT
    /// DROP`: over when the transaction ends, no session effect.
    TransactionScoped,
    /// `RESET ALL`: every variable back to its default (session authorization and role excepted, as in PostgreSQL).
    ResetAll,
    /// `DISCARD ALL`: the whole session state is reset.
    DiscardAll,
    /// The statement creates state bound to the server connection: the client must stay on it.
    Pin(PinReason),
    /// The statement may release what an earlier [`Effect::Pin`] of the same reason held (`UNLISTEN`,
    /// `pg_advisory_unlock[_all|_shared]()`, `DISCARD TEMP`, `DROP …`, `DEALLOCATE`, `CLOSE`, `SET ROLE NONE`,
    /// `RESET ROLE`, `SET SESSION AUTHORIZATION DEFAULT`, …): whether anything is left is for the caller to check
    /// on the server before it releases the connection.
    Unpin(PinReason),
    /// The statement changes session state in a way that cannot be described: a `set_config` whose arguments are
    /// not plain literals (or are more than a few dozen tokens long), `SET x FROM CURRENT`, a malformed
    /// `SET`/`RESET`, `SET TIME ZONE INTERVAL …`, an `UPDATE`/`INSERT`/`MERGE` statement that names `pg_settings`
    /// (whose rules call `set_config`), a call of a `U&"…"` function whose name cannot be decoded, and a
    /// transaction-scoped change (`SET LOCAL`, `set_config(…, true)`) of `standard_conforming_strings` or
    /// `client_encoding`, after which the rest of the transaction may lex differently from what is assumed here.
    /// Callers should treat the session as dirty.
    SessionStateUnknown,
    /// Nothing of interest. Never returned by [`session_effects`], which leaves such statements out.
    None,
}

/// Why a client must stay on its server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PinReason {
    /// `LISTEN`.
    Listen,
    /// A session-level advisory lock (`pg_advisory_lock`, `pg_try_advisory_lock` and their `_shared` forms; the
    /// `_xact_` ones are transaction-scoped and do not pin).
    AdvisoryLock,
    /// A temporary object: `CREATE TEMP TABLE/VIEW/SEQUENCE`, anything created in `pg_temp`,
    /// `SELECT … INTO TEMP`.
    TempTable,
    /// `DECLARE … CURSOR WITH HOLD`.
    WithHoldCursor,
    /// A SQL-level `PREPARE name AS …`.
    SqlPrepare,
    /// `SET ROLE` / `SET SESSION AUTHORIZATION` (or a `SET`/`set_config` of `role`/`session_authorization`).
    SessionAuthorization,
    /// Other per-connection state: `LOAD`, `dblink_connect`.
    Other,
}

/// Run the classifier over every statement of `sql`, stopping when `f` breaks.
fn scan<'a>(sql: &'a str, mut f: impl FnMut(Raw<'a>) -> ControlFlow<()>) {
    let mut lx = Lexer::new(sql);
    while !lx.at_end() {
        let mut st = Stmt::new(lx);
        if classify::statement(&mut st, &mut f).is_break() {
            return;
        }
        lx = st.into_lexer();
    }
}

/// Effects of every statement of a (possibly multi-statement) SQL string, in statement order. Statements with no
/// effect are omitted; a statement may contribute more than one (`SELECT pg_advisory_lock(1), set_config(…)`;
/// `SET SESSION CHARACTERISTICS` with several modes), and a repeated pin, unpin or unknown within one statement is
/// reported once. Returns an empty `Vec` — no allocation — when nothing is of interest.
pub fn session_effects(sql: &str) -> Vec<Effect> {
    let mut out = Vec::new();
    scan(sql, |raw| {
        out.push(to_effect(sql, raw));
        ControlFlow::Continue(())
    });
    out
}

/// True iff [`session_effects`] would return something. Never allocates; cheap for the common case (see the module
/// documentation): `has_session_effects("SELECT abalance FROM pgbench_accounts WHERE aid = $1")` is one pass over
/// eight tokens.
pub fn has_session_effects(sql: &str) -> bool {
    if !may_have_effects(sql.as_bytes()) {
        return false;
    }
    let mut found = false;
    scan(sql, |_| {
        found = true;
        ControlFlow::Break(())
    });
    found
}

/// Words (lower case) one of which appears, as bytes, in every statement the classifier finds an effect in: the
/// statements' first keywords (`SET`, `RESET`, `DISCARD`, `LISTEN`/`UNLISTEN`, `PREPARE`, `DEALLOCATE`, `CLOSE`,
/// `DECLARE`, `CREATE`, `LOAD`, `DROP`, and `EXPLAIN` before them), the functions it looks for (`set_config`, `pg_*advisory*`,
/// `dblink_connect*`), `pg_settings`, `INTO TEMP`/`pg_temp` (`temp`), and `U&` (an escaped identifier can spell
/// any name).
const TRIGGERS: &[&[u8]] = &[
    b"set",
    b"reset",
    b"discard",
    b"listen",
    b"unlisten",
    b"prepare",
    b"deallocate",
    b"close",
    b"declare",
    b"create",
    b"load",
    b"drop",
    // The statement it explains may be any of these.
    b"explain",
    b"set_config",
    b"pg_settings",
    b"temp",
    b"advisory",
    b"dblink",
    b"u&",
];

/// The first [`TRIGGERS`] are first keywords: they count only where a statement can start (so `UPDATE … SET`,
/// `created_at` or `closed` do not).
const FIRST_KEYWORDS: usize = 13;

/// Could a statement start at byte `i`? Only whitespace (and comments) may separate it from the start of the
/// text or the `;` before it. Conservative: after a line break (a `--` comment may end there) or a `/` (the end of
/// a `/* */` comment) the answer is yes.
fn statement_start(sql: &[u8], i: usize) -> bool {
    let mut j = i;
    while j > 0 {
        match sql[j - 1] {
            b'\n' | b'\r' => return true,
            b' ' | b'\t' | 0x0b | 0x0c => j -= 1,
            b';' | b'/' => return true,
            _ => return false,
        }
    }
    true
}

/// A conservative byte-level filter in front of the lexer: false only when no trigger word appears anywhere in
/// `sql` (case-insensitively), so the statement cannot have an effect. Plain DML — most of what a proxy sees —
/// costs one pass over its bytes instead of a full lex.
///
/// It works on bytes in any ASCII-compatible encoding: callers may use it before they know the text is UTF-8.
pub fn may_have_effects(sql: &[u8]) -> bool {
    for (i, pair) in sql.windows(2).enumerate() {
        // Most byte pairs start no trigger word: one bit test each (a first byte alone matched too often: plain
        // DML is full of `s`, `e`, `c`, `a`, …).
        let (first, second) = (pair[0] | 0x20, pair[1] | 0x20);
        if !starts_trigger(first, second) {
            continue;
        }
        let mut words = FIRST_BYTE[first as usize];
        while words != 0 {
            let k = words.trailing_zeros() as usize;
            let w = TRIGGERS[k];
            words &= words - 1;
            if w[1] != second {
                continue;
            }
            if let Some(rest) = sql.get(i + 1..i + w.len()) {
                if rest.eq_ignore_ascii_case(&w[1..])
                    && (k >= FIRST_KEYWORDS || statement_start(sql, i))
                {
                    return true;
                }
            }
        }
    }
    false
}

/// Whether a trigger word starts with the two bytes `first`, `second` (each with the ASCII lower-case bit set).
#[inline]
fn starts_trigger(first: u8, second: u8) -> bool {
    let pair = (first as usize) << 8 | second as usize;
    TRIGGER_PAIRS[pair / 64] & (1 << (pair % 64)) != 0
}

/// One bit per pair of bytes (with the ASCII lower-case bit set) that starts one of the [`TRIGGERS`].
static TRIGGER_PAIRS: [u64; 1024] = {
    let mut table = [0u64; 1024];
    let mut i = 0;
    while i < TRIGGERS.len() {
        let (first, second) = (TRIGGERS[i][0], TRIGGERS[i][1]);
        // Looked up with the lower-case bit set: a trigger's first two bytes must already have it.
        assert!(first | 0x20 == first && second | 0x20 == second);
        let pair = (first as usize) << 8 | second as usize;
        table[pair / 64] |= 1 << (pair % 64);
        i += 1;
    }
    table
};

/// For each byte (with the ASCII lower-case bit set): the [`TRIGGERS`] that start with it, one bit each.
static FIRST_BYTE: [u32; 256] = {
    assert!(TRIGGERS.len() <= 32);
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < TRIGGERS.len() {
        table[TRIGGERS[i][0] as usize] |= 1 << i;
        i += 1;
    }
    table
};

/// `v` as a SQL string literal for `SET name = <literal>`: single quotes doubled, no `E` prefix (so it assumes
/// `standard_conforming_strings = on`, under which backslashes are ordinary characters). NUL characters, which no
/// PostgreSQL text value can contain, are dropped.
pub fn quote_literal(v: &str) -> String {
    quote::quote_literal(v)
}

/// A variable or other name for SQL: each `.`-separated part is left bare when PostgreSQL would read it back
/// unchanged (lower-case ASCII letters, digits and `_`, not starting with a digit, not a keyword that needs quoting)
/// and double-quoted (with `"` doubled) otherwise — `myapp.user_id` stays as it is, `myapp.user` becomes
/// `myapp."user"`, `MyApp.x` becomes `"MyApp".x`. Splitting on `.` is exact for variable names, which PostgreSQL
/// joins with `.` whether or not the parts were quoted. NUL characters are dropped.
pub fn quote_ident(name: &str) -> String {
    quote::quote_ident(name)
}

fn to_effect(sql: &str, raw: Raw<'_>) -> Effect {
    match raw {
        Raw::TransactionScoped => Effect::TransactionScoped,
        Raw::ResetAll => Effect::ResetAll,
        Raw::DiscardAll => Effect::DiscardAll,
        Raw::Pin(r) => Effect::Pin(r),
        Raw::Unpin(r) => Effect::Unpin(r),
        Raw::Unknown => Effect::SessionStateUnknown,
        Raw::Set { name, value } => {
            let name = match name {
                VarName::Fixed(n) => Some(n.to_owned()),
                VarName::Source(text) => dotted_name(text),
            };
            match name {
                Some(name) => var_effect(name, value.map(str::to_owned)),
                None => Effect::SessionStateUnknown,
            }
        }
        Raw::SetConfig { name, value } => {
            let Some(name) = str_content(sql, name) else {
                return Effect::SessionStateUnknown;
            };
            let value = match value {
                None => None,
                Some(t) if is_list_quote(&name) => {
                    match str_content(sql, t).and_then(|v| list_as_identifiers(&v)) {
                        Some(v) => Some(v),
                        None => return Effect::SessionStateUnknown,
                    }
                }
                Some(t) => Some(sql[t.start..t.end].to_owned()),
            };
            var_effect(name.into_owned(), value)
        }
    }
}

/// The variable name a dotted `var_name` source text stands for.
fn dotted_name(text: &str) -> Option<String> {
    let mut name = String::with_capacity(text.len());
    for t in Lexer::new(text) {
        match t.kind {
            Kind::Punct(b'.') => name.push('.'),
            _ => name.push_str(&ident_content(text, t)?),
        }
    }
    Some(name)
}

/// The effect of setting variable `name`; a few variables are not ordinary settings.
fn var_effect(name: String, value: Option<String>) -> Effect {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    if is("role") {
        match value.as_deref() {
            Some(v) if !classify::is_none_value(v) => Effect::Pin(PinReason::SessionAuthorization),
            _ => Effect::Unpin(PinReason::SessionAuthorization),
        }
    } else if is("session_authorization") {
        match value {
            Some(_) => Effect::Pin(PinReason::SessionAuthorization),
            None => Effect::Unpin(PinReason::SessionAuthorization),
        }
    } else if is("transaction_isolation")
        || is("transaction_read_only")
        || is("transaction_deferrable")
    {
        Effect::TransactionScoped
    } else {
        Effect::Set { name, value }
    }
}

/// Variables whose `SET` value list is quoted element by element (PostgreSQL's `GUC_LIST_QUOTE`): `SET` of the
/// string `'a, b'` means one element called `a, b`, while `set_config` of the same string means two.
fn is_list_quote(name: &str) -> bool {
    [
        "search_path",
        "temp_tablespaces",
        "local_preload_libraries",
        "session_preload_libraries",
        "shared_preload_libraries",
        "unix_socket_directories",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

/// A list variable's text value (as `set_config` takes it) re-spelled for `SET name = …`: split as PostgreSQL's
/// `SplitIdentifierString` does (commas; `"…"` elements kept as written, others folded to lower case), each element
/// quoted as an identifier. `None` if PostgreSQL would reject the list.
fn list_as_identifiers(v: &str) -> Option<String> {
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c');
    let mut rest = v.trim_start_matches(is_space);
    if rest.is_empty() {
        return Some("''".to_owned());
    }
    let mut out = String::new();
    loop {
        let element;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut elem = String::new();
            let mut tail = quoted;
            loop {
                let close = tail.find('"')?;
                elem.push_str(&tail[..close]);
                tail = &tail[close + 1..];
                match tail.strip_prefix('"') {
                    Some(t) => {
                        elem.push('"');
                        tail = t;
                    }
                    None => break,
                }
            }
            element = elem;
            rest = tail;
        } else {
            let end = rest
                .find(|c: char| c == ',' || is_space(c))
                .unwrap_or(rest.len());
            if end == 0 {
                return None;
            }
            element = rest[..end].to_ascii_lowercase();
            rest = &rest[end..];
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        if element.is_empty() {
            // `""` is not a valid identifier in SQL; the string '' reads back as the same empty element.
            out.push_str("''");
        } else {
            out.push_str(&quote::quote_ident_part(&element));
        }
        rest = rest.trim_start_matches(is_space);
        if rest.is_empty() {
            return Some(out);
        }
        rest = rest.strip_prefix(',')?.trim_start_matches(is_space);
    }
}
