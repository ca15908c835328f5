//! A tokenizer that puts token boundaries exactly where PostgreSQL's own scanner (`scan.l`) does, with
//! `standard_conforming_strings = on`. It does not build values: a token is a kind and a byte range, and the few
//! callers that need a literal's contents ask [`str_content`] / [`ident_content`].
//!
//! Every token boundary falls on an ASCII byte or the end of input, so slicing the source `&str` with a token's
//! range never splits a UTF-8 character.

use std::borrow::Cow;

/// How backslashes behave inside a string literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StrMode {
    /// `'…'` (also the body of `B'…'`, `X'…'`, `N'…'`, whose prefix is lexed as an identifier): `''` escapes a quote.
    Standard,
    /// `E'…'`: backslash escapes as well as `''`.
    Escape,
    /// `U&'…'`: like standard; a backslash starts a Unicode escape (not decoded here).
    Unicode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Unquoted identifier or keyword (may contain `$` after the first character, and any byte ≥ 0x80).
    Ident,
    /// `"…"` or `U&"…"`.
    QuotedIdent,
    /// A string literal, including SQL-standard continuations (`'a'` newline `'b'`).
    Str(StrMode),
    /// `$tag$…$tag$`.
    Dollar,
    /// A numeric literal (loosely: the digits and any letters, `_` or `.` glued to them).
    Number,
    /// `$1`.
    Param,
    /// Any other single ASCII byte: punctuation, operator characters, stray control bytes.
    Punct(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Token {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Lexer<'a> {
    sql: &'a str,
    pos: usize,
}

/// Byte classes, one bit each (a table lookup per byte in the scanning loops).
const SPACE: u8 = 1;
const IDENT_START: u8 = 2;
const IDENT_CONT: u8 = 4;
/// What a numeric literal runs on with: letters, digits, `_` and `.`.
const NUMBER_CONT: u8 = 8;

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let start = c.is_ascii_alphabetic() || c == b'_' || c >= 0x80;
        if matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            t[b] |= SPACE;
        }
        if start {
            t[b] |= IDENT_START;
        }
        if start || c.is_ascii_digit() || c == b'$' {
            t[b] |= IDENT_CONT;
        }
        if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' {
            t[b] |= NUMBER_CONT;
        }
        b += 1;
    }
    t
};

fn is_space(b: u8) -> bool {
    CLASS[b as usize] & SPACE != 0
}

fn is_ident_start(b: u8) -> bool {
    CLASS[b as usize] & IDENT_START != 0
}

fn is_ident_cont(b: u8) -> bool {
    CLASS[b as usize] & IDENT_CONT != 0
}

/// Characters of a dollar-quote tag after the first: like an identifier, but no `$`.
fn is_tag_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit()
}

/// Index of the first `\n` or `\r` at or after `i`, or the end.
fn line_end(s: &[u8], i: usize) -> usize {
    s.get(i..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n' || b == b'\r'))
        .map_or(s.len(), |p| i + p)
}

/// End of a (nestable) block comment starting with the `/*` at `start`.
fn block_comment_end(s: &[u8], start: usize) -> usize {
    let mut depth = 0usize;
    let mut i = start;
    while i < s.len() {
        match (s[i], s.get(i + 1)) {
            (b'/', Some(b'*')) => {
                depth += 1;
                i += 2;
            }
            (b'*', Some(b'/')) => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    s.len()
}

/// After a closing quote at `i - 1`: if what follows is PostgreSQL's string continuation (horizontal space and `--`
/// comments, at least one newline, then any whitespace and `--` comments, then a quote), the index of that quote.
/// Block comments are not allowed there.
pub(super) fn continuation(s: &[u8], mut i: usize) -> Option<usize> {
    loop {
        match s.get(i) {
            Some(b' ' | b'\t' | 0x0b | 0x0c) => i += 1,
            Some(b'-') if s.get(i + 1) == Some(&b'-') => i = line_end(s, i + 2),
            _ => break,
        }
    }
    if !matches!(s.get(i), Some(b'\n' | b'\r')) {
        return None;
    }
    i += 1;
    loop {
        match s.get(i) {
            Some(&b) if is_space(b) => i += 1,
            Some(b'-') if s.get(i + 1) == Some(&b'-') => i = line_end(s, i + 2),
            _ => break,
        }
    }
    (s.get(i) == Some(&b'\'')).then_some(i)
}

/// Scan a string literal whose opening quote is at `quote` (continuations included): its end, and whether it was
/// closed (an unterminated literal runs to the end of input).
fn scan_string(s: &[u8], mut quote: usize, mode: StrMode) -> (usize, bool) {
    loop {
        let mut i = quote + 1;
        loop {
            match s.get(i) {
                None => return (s.len(), false),
                Some(b'\'') if s.get(i + 1) == Some(&b'\'') => i += 2,
                Some(b'\'') => {
                    i += 1;
                    break;
                }
                Some(b'\\') if mode == StrMode::Escape => i += 2,
                Some(_) => i += 1,
            }
        }
        match continuation(s, i) {
            Some(q) => quote = q,
            None => return (i, true),
        }
    }
}

fn string_end(s: &[u8], quote: usize, mode: StrMode) -> usize {
    scan_string(s, quote, mode).0
}

/// Scan a quoted identifier whose body starts at `i` (just after the opening `"`): its end, and whether it was
/// closed.
fn scan_quoted(s: &[u8], mut i: usize) -> (usize, bool) {
    loop {
        match s.get(i) {
            None => return (s.len(), false),
            Some(b'"') if s.get(i + 1) == Some(&b'"') => i += 2,
            Some(b'"') => return (i + 1, true),
            Some(_) => i += 1,
        }
    }
}

fn quoted_end(s: &[u8], i: usize) -> usize {
    scan_quoted(s, i).0
}

/// First occurrence of a dollar-quote tag `needle` (`$`, tag characters, `$`) in `s` at or after `from`.
///
/// Linear: a candidate starts at a `$`, and its comparison stops at the first mismatch, which comes no later than the
/// next `$` of `s` (the tag's inner characters are never `$`); the next candidate is searched from there.
fn find(s: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let hay = s.get(from..)?;
    let (&first, rest) = needle.split_first()?;
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        i += hay[i..].iter().position(|&b| b == first)?;
        let matched = hay[i + 1..]
            .iter()
            .zip(rest)
            .take_while(|(a, b)| a == b)
            .count();
        if matched == rest.len() {
            return Some(from + i);
        }
        i += 1 + matched.min(rest.len().saturating_sub(1));
    }
    None
}

impl<'a> Lexer<'a> {
    pub fn new(sql: &'a str) -> Self {
        Lexer { sql, pos: 0 }
    }

    /// Whether only the end of input is left (whitespace and comments may remain before it).
    pub fn at_end(&self) -> bool {
        self.pos >= self.sql.len()
    }

    pub fn sql(&self) -> &'a str {
        self.sql
    }

    pub fn text(&self, t: Token) -> &'a str {
        &self.sql[t.start..t.end]
    }

    /// Lex a dollar-quoted string or parameter at `start` (a `$`); `None` if the `$` stands alone.
    fn dollar(&self, start: usize) -> Option<(Kind, usize)> {
        let s = self.sql.as_bytes();
        let first = *s.get(start + 1)?;
        if first.is_ascii_digit() {
            let digits = s[start + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            return Some((Kind::Param, start + 1 + digits));
        }
        let tag_end = if first == b'$' {
            start + 2
        } else if is_ident_start(first) {
            let len = s[start + 1..]
                .iter()
                .take_while(|&&b| is_tag_cont(b))
                .count();
            if s.get(start + 1 + len) != Some(&b'$') {
                return None;
            }
            start + len + 2
        } else {
            return None;
        };
        let tag = &s[start..tag_end];
        let end = find(s, tag_end, tag).map_or(s.len(), |p| p + tag.len());
        Some((Kind::Dollar, end))
    }
}

impl Iterator for Lexer<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        let s = self.sql.as_bytes();
        loop {
            // Whitespace: a table lookup per byte.
            let mut start = self.pos;
            while s.get(start).is_some_and(|&b| is_space(b)) {
                start += 1;
            }
            self.pos = start;
            let c = *s.get(start)?;
            let n1 = s.get(start + 1).copied();
            let (kind, end) = match c {
                _ if is_space(c) => {
                    self.pos += 1;
                    continue;
                }
                b'-' if n1 == Some(b'-') => {
                    self.pos = line_end(s, start + 2);
                    continue;
                }
                b'/' if n1 == Some(b'*') => {
                    self.pos = block_comment_end(s, start);
                    continue;
                }
                b'\'' => (
                    Kind::Str(StrMode::Standard),
                    string_end(s, start, StrMode::Standard),
                ),
                b'"' => (Kind::QuotedIdent, quoted_end(s, start + 1)),
                b'e' | b'E' if n1 == Some(b'\'') => (
                    Kind::Str(StrMode::Escape),
                    string_end(s, start + 1, StrMode::Escape),
                ),
                b'u' | b'U' if n1 == Some(b'&') && s.get(start + 2) == Some(&b'\'') => (
                    Kind::Str(StrMode::Unicode),
                    string_end(s, start + 2, StrMode::Unicode),
                ),
                b'u' | b'U' if n1 == Some(b'&') && s.get(start + 2) == Some(&b'"') => {
                    (Kind::QuotedIdent, quoted_end(s, start + 3))
                }
                b'$' => self.dollar(start).unwrap_or((Kind::Punct(b'$'), start + 1)),
                _ if is_ident_start(c) => {
                    let mut end = start + 1;
                    while s.get(end).is_some_and(|&b| is_ident_cont(b)) {
                        end += 1;
                    }
                    (Kind::Ident, end)
                }
                _ if c.is_ascii_digit()
                    || (c == b'.' && n1.is_some_and(|d| d.is_ascii_digit())) =>
                {
                    let len = s[start + 1..]
                        .iter()
                        .take_while(|&&b| CLASS[b as usize] & NUMBER_CONT != 0)
                        .count();
                    (Kind::Number, start + 1 + len)
                }
                _ => (Kind::Punct(c), start + 1),
            };
            self.pos = end;
            return Some(Token { kind, start, end });
        }
    }
}

/// The value of a string-like token, if it can be had without interpreting escapes: standard strings (with their
/// continuations), dollar-quoted strings, and `E'…'`/`U&'…'` strings that contain no backslash. `None` for anything
/// else, including unterminated literals.
pub(super) fn str_content(sql: &str, t: Token) -> Option<Cow<'_, str>> {
    let text = &sql[t.start..t.end];
    let bytes = text.as_bytes();
    match t.kind {
        Kind::Dollar => {
            let tag_len = bytes[1..].iter().position(|&b| b == b'$')? + 2;
            let body_len = text.len().checked_sub(2 * tag_len)?;
            // The lexer stops at the first closing tag, so a terminated literal is one that ends with its tag.
            text.ends_with(&text[..tag_len])
                .then(|| Cow::Borrowed(&text[tag_len..tag_len + body_len]))
        }
        Kind::Str(mode) => {
            if mode != StrMode::Standard && text.contains('\\') {
                return None;
            }
            let mut quote = text.find('\'')?;
            let mut out: Option<String> = None;
            loop {
                // One segment: from just after `quote` to its closing quote.
                let body_start = quote + 1;
                let mut i = body_start;
                let mut seg_doubles = false;
                let close = loop {
                    match bytes.get(i) {
                        None => return None,
                        Some(b'\'') if bytes.get(i + 1) == Some(&b'\'') => {
                            seg_doubles = true;
                            i += 2;
                        }
                        Some(b'\'') => break i,
                        Some(_) => i += 1,
                    }
                };
                let seg = &text[body_start..close];
                let next = continuation(bytes, close + 1);
                if out.is_none() && next.is_none() && !seg_doubles {
                    return Some(Cow::Borrowed(seg));
                }
                let buf = out.get_or_insert_with(String::new);
                buf.push_str(&seg.replace("''", "'"));
                match next {
                    Some(q) => quote = q,
                    None => return out.map(Cow::Owned),
                }
            }
        }
        _ => None,
    }
}

/// The name an identifier token stands for: unquoted ones folded to lower case (ASCII only, as PostgreSQL does for
/// multi-byte encodings), quoted ones with `""` collapsed. `None` for an unterminated quoted identifier or a `U&"…"`
/// one with escapes.
pub(super) fn ident_content(sql: &str, t: Token) -> Option<Cow<'_, str>> {
    let text = &sql[t.start..t.end];
    match t.kind {
        Kind::Ident => Some(if text.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(text.to_ascii_lowercase())
        } else {
            Cow::Borrowed(text)
        }),
        Kind::QuotedIdent => {
            let open = text.find('"')?;
            if open > 0 && text.contains('\\') {
                return None;
            }
            let b = text.as_bytes();
            let mut i = open + 1;
            let mut doubles = false;
            loop {
                match b.get(i) {
                    None => return None,
                    Some(b'"') if b.get(i + 1) == Some(&b'"') => {
                        doubles = true;
                        i += 2;
                    }
                    Some(b'"') => break,
                    Some(_) => i += 1,
                }
            }
            let body = &text[open + 1..i];
            Some(if doubles {
                Cow::Owned(body.replace("\"\"", "\""))
            } else {
                Cow::Borrowed(body)
            })
        }
        _ => None,
    }
}

/// Whether a token is complete: quoted tokens have their closing quote (only the last token of the input can lack
/// it); every other kind is always complete.
pub(super) fn is_closed(sql: &str, t: Token) -> bool {
    let s = &sql.as_bytes()[t.start..t.end];
    match t.kind {
        Kind::Str(mode) => s
            .iter()
            .position(|&b| b == b'\'')
            .is_some_and(|q| scan_string(s, q, mode).1),
        Kind::QuotedIdent => s
            .iter()
            .position(|&b| b == b'"')
            .is_some_and(|q| scan_quoted(s, q + 1).1),
        Kind::Dollar => str_content(sql, t).is_some(),
        _ => true,
    }
}

/// The name a `U&"…"` identifier token stands for, decoded into `buf`, with `esc` as the escape character (`\`
/// unless a `UESCAPE` clause says otherwise): `esc esc` is `esc`, `esc XXXX` and `esc + XXXXXX` are code points in
/// hex, `""` is `"`. `None` if that is not a valid spelling (PostgreSQL rejects it), if the token is unterminated, or
/// if the name is not short ASCII — so `None` says "not decoded", never "not interesting".
pub(super) fn unicode_ident_content<'b>(
    sql: &str,
    t: Token,
    esc: u8,
    buf: &'b mut [u8; 32],
) -> Option<&'b str> {
    let text = &sql[t.start..t.end];
    let body = text.get(3..)?.strip_suffix('"')?.as_bytes();
    let hex = |digits: &[u8]| -> Option<u8> {
        let mut cp = 0u32;
        for &d in digits {
            cp = cp * 16 + char::from(d).to_digit(16)?;
        }
        // A NUL is rejected by PostgreSQL; anything past ASCII cannot spell a name this module looks for.
        u8::try_from(cp).ok().filter(|c| (1..0x80).contains(c))
    };
    let mut n = 0;
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        let (byte, len) = if c == b'"' {
            // Inside a terminated token a `"` is always doubled.
            (body.get(i + 1).filter(|&&q| q == b'"').copied()?, 2)
        } else if c == esc {
            match body.get(i + 1) {
                Some(&e) if e == esc => (esc, 2),
                Some(b'+') => (hex(body.get(i + 2..i + 8)?)?, 8),
                _ => (hex(body.get(i + 1..i + 5)?)?, 5),
            }
        } else if c.is_ascii() {
            (c, 1)
        } else {
            return None;
        };
        *buf.get_mut(n)? = byte;
        n += 1;
        i += len;
    }
    std::str::from_utf8(&buf[..n]).ok()
}

/// Whether `c` may follow `UESCAPE` as the escape character of a Unicode literal, as PostgreSQL checks it.
pub(super) fn is_uescape_char(c: u8) -> bool {
    !(c.is_ascii_hexdigit() || matches!(c, b'+' | b'\'' | b'"') || is_space(c))
}
