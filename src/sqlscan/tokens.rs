//! The lexer's view of statements for callers outside this module (the SQL policy): statement boundaries exactly
//! as PostgreSQL draws them, the tokens of a statement, the functions it calls, and a fingerprint with literals
//! removed.

use super::classify::Stmt;
use super::lexer::{ident_content, str_content, unicode_ident_content, Kind, Lexer, Token};

/// A token's kind, as callers outside the lexer need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An unquoted identifier or keyword.
    Word,
    /// `"…"` or `U&"…"`.
    QuotedWord,
    /// Any string literal: `'…'`, `E'…'`, `U&'…'`, `$tag$…$tag$`.
    String,
    Number,
    /// `$1`.
    Param,
    Punct(u8),
}

impl From<Kind> for TokenKind {
    fn from(k: Kind) -> TokenKind {
        match k {
            Kind::Ident => TokenKind::Word,
            Kind::QuotedIdent => TokenKind::QuotedWord,
            Kind::Str(_) | Kind::Dollar => TokenKind::String,
            Kind::Number => TokenKind::Number,
            Kind::Param => TokenKind::Param,
            Kind::Punct(b) => TokenKind::Punct(b),
        }
    }
}

/// The statements of a (possibly multi-statement) SQL text: each from its first token to its last, without the
/// `;` (a `;` inside a `BEGIN ATOMIC … END` routine body does not end a statement). Empty statements are left out.
pub fn statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut lx = Lexer::new(sql);
    while !lx.at_end() {
        let mut st = Stmt::new(lx);
        let mut range: Option<(usize, usize)> = None;
        for t in st.by_ref() {
            range = Some((range.map_or(t.start, |r| r.0), t.end));
        }
        if let Some((a, b)) = range {
            out.push(&sql[a..b]);
        }
        lx = st.into_lexer();
    }
    out
}

/// The tokens of `sql` (comments and whitespace skipped), with their source text.
pub fn tokens(sql: &str) -> impl Iterator<Item = (TokenKind, &str)> + '_ {
    Lexer::new(sql).map(move |t| (t.kind.into(), &sql[t.start..t.end]))
}

/// The leading words of a statement, lower-cased, up to `n` of them (stops at the first token that is not an
/// unquoted word).
pub fn leading_words(sql: &str, n: usize) -> Vec<String> {
    tokens(sql)
        .take(n)
        .take_while(|(k, _)| *k == TokenKind::Word)
        .map(|(_, w)| w.to_ascii_lowercase())
        .collect()
}

/// The name a word or quoted word stands for (unquoted folded to lower case); `None` for other tokens or names that
/// cannot be decoded.
fn name_of(sql: &str, t: Token) -> Option<String> {
    match t.kind {
        Kind::Ident => Some(sql[t.start..t.end].to_ascii_lowercase()),
        Kind::QuotedIdent if sql[t.start..].starts_with('"') => {
            ident_content(sql, t).map(|c| c.into_owned())
        }
        Kind::QuotedIdent => {
            let mut buf = [0u8; 32];
            unicode_ident_content(sql, t, b'\\', &mut buf).map(str::to_owned)
        }
        _ => None,
    }
}

/// The statement name when `sql` is exactly one `DEALLOCATE [PREPARE] name` (a `;` may follow): what a client that
/// prepared `name` over the protocol may send to drop it (SQL and protocol statements share one namespace).
/// `DEALLOCATE ALL` and anything else: None.
pub fn deallocate_name(sql: &str) -> Option<String> {
    let mut lx = Lexer::new(sql);
    let is_kw =
        |t: Token, w: &str| t.kind == Kind::Ident && sql[t.start..t.end].eq_ignore_ascii_case(w);
    if !is_kw(lx.next()?, "deallocate") {
        return None;
    }
    let mut t = lx.next()?;
    if is_kw(t, "prepare") {
        t = lx.next()?;
    }
    if is_kw(t, "all") {
        return None;
    }
    let name = name_of(sql, t)?;
    match lx.next() {
        None => Some(name),
        Some(p) if p.kind == Kind::Punct(b';') && lx.next().is_none() => Some(name),
        Some(_) => None,
    }
}

/// The name a single word or quoted word token's text stands for (unquoted folded to lower case); `None` if `text`
/// is not exactly one such token or cannot be decoded.
pub fn name_value(text: &str) -> Option<String> {
    let t = Lexer::new(text).next()?;
    if t.start != 0 || t.end != text.len() {
        return None;
    }
    name_of(text, t)
}

/// The content of a single string literal token's text, if it can be had without interpreting escapes (standard
/// and dollar-quoted strings, `E'…'` without backslashes); `None` otherwise.
pub fn string_value(text: &str) -> Option<String> {
    let t = Lexer::new(text).next()?;
    if t.start != 0 || t.end != text.len() || !matches!(t.kind, Kind::Str(_) | Kind::Dollar) {
        return None;
    }
    str_content(text, t).map(|c| c.into_owned())
}

/// Calls `f` with the name of every function `sql` calls: a word or quoted word directly followed by `(`, the last
/// part of a qualified name (`pg_catalog.pg_read_file(` gives `pg_read_file`). Keywords followed by `(` (`IN (`,
/// `VALUES (`) are reported too; callers look names up in their own lists. A name that cannot be decoded (a
/// `U&"…"` spelling with unusual escapes) is reported as `"?"`.
pub fn called_functions(sql: &str, mut f: impl FnMut(&str)) {
    let mut prev: Option<Token> = None;
    for t in Lexer::new(sql) {
        if t.kind == Kind::Punct(b'(') {
            if let Some(p) = prev.filter(|p| matches!(p.kind, Kind::Ident | Kind::QuotedIdent)) {
                match name_of(sql, p) {
                    Some(n) => f(&n),
                    None => f("?"),
                }
            }
        }
        prev = Some(t);
    }
}

/// Calls `f` with the contents of every string literal of `sql` that can be read without interpreting escapes
/// (standard and dollar-quoted strings): the bodies of `DO` blocks and routines.
pub fn string_bodies(sql: &str, mut f: impl FnMut(&str)) {
    for t in Lexer::new(sql) {
        if matches!(t.kind, Kind::Str(_) | Kind::Dollar) {
            if let Some(body) = str_content(sql, t) {
                f(&body);
            }
        }
    }
}

/// The statement with every literal replaced by `?` (strings, numbers, parameters; a list of them in parentheses
/// becomes one `?`), words lower-cased, tokens separated by one space, at most `max` bytes (then `…`): what logs
/// and statistics may show of a client's SQL. Two statements with the same fingerprint (untruncated) differ only in
/// literal values and spacing, comments and keyword case. One allocation.
pub fn fingerprint(sql: &str, max: usize) -> String {
    fingerprint_and_literals(sql, max).0
}

/// [`fingerprint`], and whether the statement has literals other than parameters (`$1`): a text without them is
/// what drivers send again and again verbatim.
pub fn fingerprint_and_literals(sql: &str, max: usize) -> (String, bool) {
    let mut out = String::with_capacity(sql.len().min(max) + 4);
    let literals = fingerprint_into(sql, max, &mut out);
    (out, literals)
}

/// [`fingerprint_and_literals`], appending the fingerprint to `out` (whatever it holds already stays in front).
pub fn fingerprint_into(sql: &str, max: usize, out: &mut String) -> bool {
    let mut bytes = std::mem::take(out).into_bytes();
    let literals = fingerprint_bytes(sql, max, &mut bytes);
    // Valid: whole tokens of `sql` (they end on ASCII bytes), ASCII and `…`.
    *out = String::from_utf8(bytes)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    literals
}

/// [`fingerprint_into`] on bytes (the fingerprint is UTF-8): what the classification cache keys are built with.
pub fn fingerprint_bytes(sql: &str, max: usize, out: &mut Vec<u8>) -> bool {
    let base = out.len();
    let mut prev_placeholder = false;
    let mut literals = false;
    out.reserve(sql.len().min(max) + 8);
    for t in Lexer::new(sql) {
        let placeholder = matches!(
            t.kind,
            Kind::Str(_) | Kind::Dollar | Kind::Number | Kind::Param
        );
        literals |= placeholder && t.kind != Kind::Param;
        let piece: &[u8] = if placeholder {
            b"?"
        } else {
            &sql.as_bytes()[t.start..t.end]
        };
        let written = &out[base..];
        // `IN (1, 2, 3)` and `IN (4, 5)` share a fingerprint.
        if placeholder && prev_placeholder && written.ends_with(b"?,") {
            out.pop();
            continue;
        }
        // Written as people write SQL: `t.a`, `x::int`, `f(a, b)`.
        let space = !(written.is_empty()
            || matches!(t.kind, Kind::Punct(b',' | b')' | b'.' | b':'))
            || matches!(written.last(), Some(b'(' | b'.'))
            || written.ends_with(b"::"));
        if written.len() + usize::from(space) + piece.len() > max {
            out.extend_from_slice("…".as_bytes());
            break;
        }
        if space {
            out.push(b' ');
        }
        match t.kind {
            Kind::Ident => {
                let at = out.len();
                out.extend_from_slice(piece);
                out[at..].make_ascii_lowercase();
            }
            Kind::Punct(c) => out.push(c),
            _ => out.extend_from_slice(piece),
        }
        if placeholder {
            prev_placeholder = true;
        } else if t.kind != Kind::Punct(b',') {
            prev_placeholder = false;
        }
    }
    literals
}

/// Byte classes of [`number_shape`].
const SHAPE_BAD: u8 = 0;
const SHAPE_IDENT: u8 = 1;
const SHAPE_DIGIT: u8 = 2;
const SHAPE_OTHER: u8 = 3;
/// `-` and `/`: plain unless they start a comment.
const SHAPE_COMMENT: u8 = 4;

const SHAPE_CLASS: [u8; 256] = {
    let mut t = [SHAPE_BAD; 256];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = match c {
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => SHAPE_IDENT,
            b'0'..=b'9' => SHAPE_DIGIT,
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b'.' | b'(' | b')' | b'[' | b']' | b';'
            | b':' | b'=' | b'<' | b'>' | b'+' | b'*' | b'%' | b'^' | b'|' | b'&' | b'!' | b'~'
            | b'@' | b'#' | b'?' => SHAPE_OTHER,
            b'-' | b'/' => SHAPE_COMMENT,
            // Quotes, dollars, backslashes, braces, control bytes: not plain.
            _ => SHAPE_BAD,
        };
        b += 1;
    }
    t
};

/// The byte that stands for a number in a shape (no plain text contains it).
const SHAPE_NUMBER: u8 = 1;

/// The text's *shape*: the same for texts that differ only in the values of their number literals, without
/// lexing. Only plain texts have one (false otherwise): ASCII, without quotes, dollar signs, backslashes or
/// comments. In such a text, a run of digits after a byte that cannot continue an identifier (a letter, a digit,
/// `_`) always starts a number literal, however long it is and whatever its digits (an unquoted identifier never
/// starts with a digit); each such run is written as one 0x01 byte, every other byte as it is. So texts with the
/// same shape lex to the same tokens but for the values of numbers: they have the same fingerprint, and the same
/// facts where facts do not depend on literal values. Digits inside words (`t1`) are kept; a number followed by
/// a letter (`1e5`, `0x1F`) makes the text not plain.
pub fn number_shape(sql: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    out.reserve(sql.len());
    // Bytes are copied a stretch at a time, up to each number.
    let mut copied = 0;
    let mut i = 0;
    loop {
        // Letters, spaces and punctuation (most of a text) pass as they are: skipped eight at a time while none
        // of the eight needs a look, then one at a time up to the one that does.
        // (Written out: one bounds check per eight bytes, each byte a load and an `or`; callgrind counted the
        // iterator form at twice the instructions.)
        while let Some(w) = sql.get(i..).and_then(|r| r.first_chunk::<8>()) {
            let stop = |k: usize| SHAPE_STOP[w[k] as usize];
            if stop(0) | stop(1) | stop(2) | stop(3) | stop(4) | stop(5) | stop(6) | stop(7) != 0 {
                break;
            }
            i += 8;
        }
        while sql.get(i).is_some_and(|&b| SHAPE_STOP[b as usize] == 0) {
            i += 1;
        }
        let Some(&b) = sql.get(i) else { break };
        match SHAPE_CLASS[b as usize] {
            // After a letter, a digit or `_`, a digit continues a name (a number's digits are taken whole below,
            // and a letter right after them ends the shape).
            SHAPE_DIGIT
                if i > 0
                    && matches!(SHAPE_CLASS[sql[i - 1] as usize], SHAPE_IDENT | SHAPE_DIGIT) => {}
            SHAPE_DIGIT => {
                out.extend_from_slice(&sql[copied..i]);
                out.push(SHAPE_NUMBER);
                while sql.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                // A letter right after the digits (`1e5`, `0x1F`, `1_000`, `12abc`) may make them part of
                // another kind of token, depending on the digits: such texts have no shape.
                if sql
                    .get(i + 1)
                    .is_some_and(|&n| SHAPE_CLASS[n as usize] == SHAPE_IDENT)
                {
                    return false;
                }
                copied = i + 1;
            }
            SHAPE_COMMENT => {
                // `--` and `/*` start comments.
                let second = if b == b'-' { b'-' } else { b'*' };
                if sql.get(i + 1) == Some(&second) {
                    return false;
                }
            }
            _ => return false,
        }
        i += 1;
    }
    out.extend_from_slice(&sql[copied..]);
    true
}

/// A shape ([`number_shape`]) with the places of its numbers, to tell whether a text has it without writing
/// the text's shape: the texts that have a shape are the shape's bytes with each number byte (0x01) replaced by a
/// run of digits. (In a shape, the byte before a number byte cannot continue a name, and the byte after it is
/// neither a digit, a letter nor `_`: so a run of digits in such a place starts a number, and ends where the
/// shape goes on, or the text does not have the shape.)
#[derive(Debug, Default, Clone)]
pub struct ShapeMatcher {
    shape: Vec<u8>,
    /// Where the shape's number bytes are.
    numbers: Vec<usize>,
}

impl ShapeMatcher {
    /// The matcher of `shape`, which [`number_shape`] wrote.
    pub fn new(shape: &[u8]) -> ShapeMatcher {
        let mut m = ShapeMatcher::default();
        m.set(shape);
        m
    }

    /// Makes this the matcher of `shape` (keeping its buffers).
    pub fn set(&mut self, shape: &[u8]) {
        self.shape.clear();
        self.shape.extend_from_slice(shape);
        self.numbers.clear();
        self.numbers.extend(
            shape
                .iter()
                .enumerate()
                .filter(|(_, &b)| b == SHAPE_NUMBER)
                .map(|(i, _)| i),
        );
    }

    /// True when `sql` has this shape: `number_shape(sql)` would write it. Compares the stretches between numbers
    /// eight bytes at a time, and skips each number's digits.
    pub fn matches(&self, sql: &[u8]) -> bool {
        let mut i = 0;
        let mut from = 0;
        for &at in &self.numbers {
            let part = &self.shape[from..at];
            let Some(text) = sql.get(i..i + part.len()) else {
                return false;
            };
            if !same(text, part) {
                return false;
            }
            i += part.len();
            // One digit at least, then all that follow.
            if !sql.get(i).is_some_and(u8::is_ascii_digit) {
                return false;
            }
            i += 1 + digit_run(&sql[i + 1..]);
            from = at + 1;
        }
        let part = &self.shape[from..];
        sql.len() - i == part.len() && same(&sql[i..], part)
    }
}

/// `a == b`, for slices of one length, compared eight bytes at a time (the last word overlaps the one before).
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n < 8 || b.len() != n {
        return a == b;
    }
    let mut k = 0;
    while k + 8 < n {
        if word_at(a, k) != word_at(b, k) {
            return false;
        }
        k += 8;
    }
    word_at(a, n - 8) == word_at(b, n - 8)
}

/// How many digits `s` starts with, found eight bytes at a time.
#[inline]
fn digit_run(s: &[u8]) -> usize {
    let mut k = 0;
    while k + 8 <= s.len() {
        let not_digit = not_digit_bits(word_at(s, k));
        if not_digit != 0 {
            return k + (not_digit.trailing_zeros() / 8) as usize;
        }
        k += 8;
    }
    while s.get(k).is_some_and(u8::is_ascii_digit) {
        k += 1;
    }
    k
}

/// A byte of each of the eight bytes of a word.
const LOW: u64 = 0x0101_0101_0101_0101;

/// The high bit of each byte of `w` that is not an ASCII digit ('0'..='9' xor '0' is below 10; a byte with its
/// high bit set is no digit).
#[inline(always)]
fn not_digit_bits(w: u64) -> u64 {
    let t = w ^ (0x30 * LOW);
    (((t & (0x7f * LOW)) + (0x76 * LOW)) | t) & (0x80 * LOW)
}

/// The eight bytes of `s` at `at` (which the caller knows are there), as a little-endian word.
#[inline(always)]
fn word_at(s: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&s[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A key of the texts of one shape, read without scanning the text: its bytes before the first digit (at most
/// 32), which every text of a shape and the shape itself share (digits are where the texts of a shape may
/// differ; before the first one they are the shape's bytes). Texts of different shapes may share it: it picks
/// a place to look, [`ShapeMatcher`] decides.
pub fn shape_prefix_key(sql: &[u8]) -> u64 {
    let mut key = 0;
    let mut at = 0;
    while at < 32 {
        let (w, n) = if at + 8 <= sql.len() {
            (word_at(sql, at), 8)
        } else {
            // The last bytes, short of a word.
            let rest = sql.get(at..).unwrap_or_default();
            let mut word = [0u8; 8];
            for (d, s) in word.iter_mut().zip(rest) {
                *d = *s;
            }
            (u64::from_le_bytes(word), rest.len())
        };
        // Bytes past the end count as digits, so the key stops there too.
        let past_end = if n == 8 { 0 } else { u64::MAX << (n * 8) };
        let digits = (!not_digit_bits(w) | past_end) & (0x80 * LOW);
        if digits != 0 {
            let keep = digits.trailing_zeros() / 8;
            let kept = if keep == 0 {
                0
            } else {
                w & (u64::MAX >> (64 - keep * 8))
            };
            key = mix(key, kept);
            return mix(key, u64::from(keep) + at as u64);
        }
        key = mix(key, w);
        at += 8;
    }
    key
}

fn mix(key: u64, w: u64) -> u64 {
    (key ^ w)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(29)
}

/// 1 for the bytes [`number_shape`] must look at (digits, comment starts, bytes that make a text not plain), 0 for
/// those copied as they are (letters, `_`, spaces, punctuation).
const SHAPE_STOP: [u8; 256] = {
    let mut t = [1; 256];
    let mut b = 0;
    while b < 256 {
        if matches!(SHAPE_CLASS[b], SHAPE_IDENT | SHAPE_OTHER) {
            t[b] = 0;
        }
        b += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_as_postgres_does() {
        assert_eq!(
            statements("SELECT 1; -- c\n SELECT ';' ;; CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; x"),
            vec![
                "SELECT 1",
                "SELECT ';'",
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END",
                "x"
            ]
        );
        assert!(statements(" ; -- only a comment\n").is_empty());
    }

    #[test]
    fn functions_are_found_however_spelled() {
        let mut found = Vec::new();
        called_functions(
            r#"SELECT pg_catalog.PG_READ_FILE('x'), "lo_import" ('y'), U&"\0070g_ls_dir"('.'), f ('pg_ls_dir(')"#,
            |n| found.push(n.to_owned()),
        );
        assert_eq!(found, ["pg_read_file", "lo_import", "pg_ls_dir", "f"]);
    }

    #[test]
    fn deallocate_names_are_read_as_postgres_does() {
        assert_eq!(deallocate_name("DEALLOCATE s1").as_deref(), Some("s1"));
        assert_eq!(
            deallocate_name("deallocate prepare \"S 1\" ;").as_deref(),
            Some("S 1")
        );
        assert_eq!(
            deallocate_name(" DeAllocate  MyStmt -- c\n").as_deref(),
            Some("mystmt")
        );
        assert_eq!(deallocate_name("DEALLOCATE ALL"), None);
        assert_eq!(deallocate_name("DEALLOCATE PREPARE ALL"), None);
        assert_eq!(deallocate_name("DEALLOCATE s1; SELECT 1"), None);
        assert_eq!(deallocate_name("DEALLOCATE"), None);
        assert_eq!(deallocate_name("SELECT 1"), None);
    }

    #[test]
    fn fingerprints_drop_literals() {
        assert_eq!(
            fingerprint(
                "SELECT * FROM t WHERE a = 'secret' AND b IN (1, 2, 3) AND c = $1",
                200
            ),
            "select * from t where a = ? and b in (?) and c = ?"
        );
        assert_eq!(fingerprint("select aaa bbb", 10), "select aaa…");
        assert_eq!(
            fingerprint("SELECT t.a::int, $1 :: text FROM s.t", 100),
            "select t.a::int, ?::text from s.t"
        );
    }
}
