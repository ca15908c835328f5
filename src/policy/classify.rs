//! What a client's SQL text does, as far as policy is concerned: its statement classes and the findings the rules
//! look at. A PostgreSQL-exact lexer pass (`crate::sqlscan`) splits statements and finds what must be seen even in
//! SQL that `sqlparser` cannot parse (leading keywords, called functions, `set_config`, COPY targets, GRANTs); the
//! `sqlparser` AST then refines the classes (data-modifying CTEs, `SELECT … INTO`, `FOR UPDATE`) and finds
//! references to other databases. The result is small and independent of the tenant, so it is cached by text.

use std::ops::ControlFlow;

use sqlparser::ast::{Statement, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::sqlscan::{self, TokenKind};

/// Statement classes, one bit each.
pub mod class {
    pub const READ: u16 = 1;
    pub const WRITE: u16 = 2;
    pub const DDL: u16 = 4;
    pub const TRANSACTION: u16 = 8;
    pub const SESSION: u16 = 16;
    pub const UTILITY: u16 = 32;
    /// `sqlparser` could not parse a statement (or the text is not UTF-8). Such a statement also counts as
    /// WRITE, DDL and SESSION: the most cautious reading.
    pub const UNPARSED: u16 = 64;

    pub const NAMES: [(u16, &str); 7] = [
        (READ, "read"),
        (WRITE, "write"),
        (DDL, "ddl"),
        (TRANSACTION, "transaction"),
        (SESSION, "session"),
        (UTILITY, "utility"),
        (UNPARSED, "unparsed"),
    ];

    /// The bit of a class name (as in plans' `deny_classes`).
    pub fn by_name(name: &str) -> Option<u16> {
        NAMES.iter().find(|(_, n)| *n == name).map(|(b, _)| *b)
    }
}

/// Something a statement does that a rule looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    AlterSystem,
    /// `SET ROLE`, `SET SESSION AUTHORIZATION`, or `set_config('role' | 'session_authorization', …)`.
    SetRole,
    CopyProgram,
    /// `COPY … TO/FROM '<file>'` on the server.
    CopyFile,
    Load,
    /// Any `ALTER ROLE`/`ALTER USER`/`ALTER GROUP` (settings, password, rename).
    AlterRole,
    /// Any `ALTER DATABASE` (settings, connection limit, rename, owner).
    AlterDatabase,
    /// `GRANT … TO PUBLIC` (also in `ALTER DEFAULT PRIVILEGES`).
    GrantPublic,
    /// `GRANT … ON DATABASE` (CONNECT, TEMP, CREATE).
    GrantDatabase,
    CreateExtension(Box<str>),
    /// A call of a function on the sensitive list (see [`sensitive_function`]).
    Function(Box<str>),
    /// A setting changed by `SET [SESSION|LOCAL]`, `RESET` (value `None`) or `set_config` with literal arguments;
    /// `value` is the literal's content (strings unquoted).
    Setting {
        name: Box<str>,
        value: Option<Box<str>>,
    },
    /// A setting changed in a way whose name or value cannot be read (`set_config` with computed arguments,
    /// writes to `pg_settings`).
    ComputedSetting,
    /// A three-part relation name: `<database>.schema.table`.
    OtherDatabase(Box<str>),
}

/// The verdict material of one Query or Parse text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// Union of the statements' [`class`] bits.
    pub classes: u16,
    pub statements: u32,
    pub findings: Box<[Finding]>,
    /// The text with literals removed (what statistics and logs show).
    pub fingerprint: std::sync::Arc<str>,
    /// [`fingerprint_hash`] of `fingerprint`, computed once (statistics are kept by fingerprint per request).
    pub fingerprint_hash: u64,
    /// The verdict material is the same for every text with this fingerprint: no setting, role, file or body
    /// whose literal content matters, nothing unparsed. Such facts are cached by fingerprint, so a query repeated
    /// with other literal values is not parsed again.
    pub literal_independent: bool,
    /// [`sqlscan::may_have_effects`] of the text analyzed. False means that no text with these facts can change
    /// session state: the non-literal tokens, where every effect is named, are the same for all texts that share
    /// a fingerprint (case aside), so the session need not scan each one again.
    pub may_have_effects: bool,
}

impl Facts {
    /// Facts of text that is not UTF-8: nothing can be read from it.
    pub fn not_utf8() -> Facts {
        Facts {
            classes: UNCLASSIFIED,
            statements: 1,
            findings: Box::new([]),
            fingerprint: "(not UTF-8)".into(),
            fingerprint_hash: fingerprint_hash("(not UTF-8)"),
            literal_independent: false,
            may_have_effects: true,
        }
    }

    /// Bytes this value holds (for the cache's weigher).
    pub fn weight(&self) -> usize {
        std::mem::size_of::<Facts>()
            + self.fingerprint.len()
            + self
                .findings
                .iter()
                .map(|f| {
                    std::mem::size_of::<Finding>()
                        + match f {
                            Finding::CreateExtension(s)
                            | Finding::Function(s)
                            | Finding::OtherDatabase(s) => s.len(),
                            Finding::Setting { name, value } => {
                                name.len() + value.as_ref().map_or(0, |v| v.len())
                            }
                            _ => 0,
                        }
                })
                .sum::<usize>()
    }
}

/// The classes of a statement that cannot be parsed.
pub const UNCLASSIFIED: u16 = class::UNPARSED | class::WRITE | class::DDL | class::SESSION;

/// Longest fingerprint kept (bytes).
const FINGERPRINT_MAX: usize = 500;

/// How deep `sqlparser` may recurse: its default (50) rejects legitimate nested ORM queries.
const RECURSION_LIMIT: usize = 300;

/// Analyzes a Query or Parse text.
pub fn analyze(sql: &str) -> Facts {
    let mut classes = 0;
    let mut findings = Vec::new();
    let mut bodies = false;
    let statements = sqlscan::statements(sql);
    for stmt in &statements {
        classes |= statement(stmt, &mut findings, &mut bodies);
    }
    findings.dedup();
    let literal_independent = !bodies
        && classes & (class::SESSION | class::UNPARSED) == 0
        && findings
            .iter()
            .all(|f| matches!(f, Finding::Function(_) | Finding::OtherDatabase(_)));
    let fingerprint = sqlscan::fingerprint(sql, FINGERPRINT_MAX);
    Facts {
        classes,
        statements: statements.len() as u32,
        findings: findings.into_boxed_slice(),
        fingerprint_hash: fingerprint_hash(&fingerprint),
        fingerprint: fingerprint.into(),
        literal_independent,
        may_have_effects: sqlscan::may_have_effects(sql.as_bytes()),
    }
}

/// The hash statement statistics are kept under: the same for equal texts, in every thread and session.
pub fn fingerprint_hash(fingerprint: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x7765_6972).hash_one(fingerprint)
}

/// Classes and findings of one statement.
fn statement(stmt: &str, out: &mut Vec<Finding>, bodies: &mut bool) -> u16 {
    let words = sqlscan::leading_words(stmt, 4);
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let mut classes = lexical_class(&words, stmt);
    lexical_findings(stmt, &words, out);
    let mut body_functions = false;
    match w(0) {
        "do" => body_functions = true,
        "create" if words.iter().any(|x| x == "function" || x == "procedure") => {
            body_functions = true
        }
        _ => {}
    }
    let found_functions = |text: &str, out: &mut Vec<Finding>, classes: &mut u16| {
        sqlscan::called_functions(text, |name| {
            if WRITING_FUNCTIONS.contains(&name) {
                *classes |= class::WRITE;
            }
            if sensitive_function(name).is_some() {
                out.push(Finding::Function(name.into()));
            }
        });
    };
    found_functions(stmt, out, &mut classes);
    if body_functions {
        *bodies = true;
        sqlscan::string_bodies(stmt, |body| found_functions(body, out, &mut classes));
    }
    set_config_calls(stmt, out);
    match Parser::new(&PostgreSqlDialect {})
        .with_recursion_limit(RECURSION_LIMIT)
        .try_with_sql(stmt)
        .and_then(|mut p| p.parse_statements())
    {
        Ok(parsed) if !parsed.is_empty() => {
            let mut v = AstVisitor {
                classes: 0,
                findings: out,
            };
            for s in &parsed {
                let _ = s.visit(&mut v);
            }
            classes |= v.classes;
        }
        _ => classes |= UNCLASSIFIED,
    }
    classes
}

/// The class of a statement from its leading keywords.
fn lexical_class(words: &[String], stmt: &str) -> u16 {
    use class::*;
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    match w(0) {
        "select" | "values" | "table" | "with" | "show" | "fetch" | "move" => READ,
        "explain" => {
            if words.iter().any(|x| x == "analyze" || x == "analyse") {
                // EXPLAIN ANALYZE runs its statement: classify that.
                let inner = stmt
                    .find(|c: char| c == '(' || c.is_whitespace())
                    .map_or("", |i| &stmt[i..]);
                let inner_words = sqlscan::leading_words(inner, 6);
                let rest: Vec<String> = inner_words
                    .into_iter()
                    .skip_while(|x| matches!(x.as_str(), "analyze" | "analyse" | "verbose"))
                    .collect();
                if rest.is_empty() {
                    WRITE
                } else {
                    lexical_class(&rest, "") | READ
                }
            } else {
                READ
            }
        }
        "insert" | "update" | "delete" | "merge" | "truncate" | "call" | "notify" | "refresh"
        | "execute" => WRITE,
        "copy" => {
            if sqlscan::tokens(stmt)
                .any(|(k, t)| k == TokenKind::Word && t.eq_ignore_ascii_case("from"))
                && !copy_is_to(stmt)
            {
                WRITE
            } else {
                READ
            }
        }
        "create" | "alter" | "drop" | "comment" | "grant" | "revoke" | "security" | "reassign"
        | "import" => DDL,
        "begin" | "start" | "commit" | "end" | "rollback" | "abort" | "savepoint" | "release" => {
            TRANSACTION
        }
        "prepare" if w(1) == "transaction" => TRANSACTION | WRITE,
        "set" if matches!(w(1), "transaction" | "constraints") => TRANSACTION,
        "set" | "reset" | "discard" | "listen" | "unlisten" | "prepare" | "deallocate"
        | "declare" | "close" | "load" => SESSION,
        "vacuum" | "analyze" | "analyse" | "cluster" | "reindex" | "checkpoint" | "lock" => UTILITY,
        "do" => UNCLASSIFIED,
        _ => UNCLASSIFIED,
    }
}

/// `COPY … TO …` (as opposed to FROM): the first top-level `TO`/`FROM` word after the table or query.
fn copy_is_to(stmt: &str) -> bool {
    let mut depth = 0i32;
    for (k, t) in sqlscan::tokens(stmt) {
        match k {
            TokenKind::Punct(b'(') => depth += 1,
            TokenKind::Punct(b')') => depth -= 1,
            TokenKind::Word if depth == 0 && t.eq_ignore_ascii_case("to") => return true,
            TokenKind::Word if depth == 0 && t.eq_ignore_ascii_case("from") => return false,
            _ => {}
        }
    }
    false
}

/// Findings that the leading keywords and tokens show.
fn lexical_findings(stmt: &str, words: &[String], out: &mut Vec<Finding>) {
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let tokens: Vec<(TokenKind, &str)> = match w(0) {
        "copy" | "grant" | "alter" | "set" | "reset" | "create" | "update" | "insert" => {
            sqlscan::tokens(stmt).collect()
        }
        _ => Vec::new(),
    };
    let is_word = |i: usize, kw: &str| {
        tokens
            .get(i)
            .is_some_and(|(k, t)| *k == TokenKind::Word && t.eq_ignore_ascii_case(kw))
    };
    match (w(0), w(1)) {
        ("alter", "system") => out.push(Finding::AlterSystem),
        ("load", _) => out.push(Finding::Load),
        ("alter", "database") => out.push(Finding::AlterDatabase),
        ("alter", "role" | "user" | "group") => out.push(Finding::AlterRole),
        ("create", "extension") => {
            let mut i = 2;
            if is_word(2, "if") {
                i = 5;
            }
            let name = tokens
                .get(i)
                .and_then(|(_, t)| sqlscan::name_value(t))
                .unwrap_or_else(|| "?".to_owned());
            out.push(Finding::CreateExtension(name.into()));
        }
        ("copy", _) => {
            let mut depth = 0i32;
            for (i, (k, t)) in tokens.iter().enumerate() {
                match k {
                    TokenKind::Punct(b'(') => depth += 1,
                    TokenKind::Punct(b')') => depth -= 1,
                    TokenKind::Word if depth == 0 && t.eq_ignore_ascii_case("program") => {
                        out.push(Finding::CopyProgram)
                    }
                    TokenKind::Word
                        if depth == 0
                            && (t.eq_ignore_ascii_case("to") || t.eq_ignore_ascii_case("from"))
                            && tokens
                                .get(i + 1)
                                .is_some_and(|(k, _)| *k == TokenKind::String) =>
                    {
                        out.push(Finding::CopyFile)
                    }
                    _ => {}
                }
            }
        }
        ("grant", _) | ("alter", "default") => {
            let mut after_to = false;
            for (i, (k, t)) in tokens.iter().enumerate() {
                if *k != TokenKind::Word {
                    continue;
                }
                if t.eq_ignore_ascii_case("to") {
                    after_to = true;
                } else if after_to && t.eq_ignore_ascii_case("public") {
                    out.push(Finding::GrantPublic);
                } else if t.eq_ignore_ascii_case("on") && is_word(i + 1, "database") {
                    out.push(Finding::GrantDatabase);
                }
            }
        }
        ("set" | "reset", _) => set_statement(&tokens, out),
        ("update" | "insert", _)
            if tokens
                .iter()
                .any(|(k, t)| *k == TokenKind::Word && t.eq_ignore_ascii_case("pg_settings")) =>
        {
            out.push(Finding::ComputedSetting)
        }
        _ => {}
    }
}

/// `SET [SESSION|LOCAL] name {TO|=} value`, `SET … TIME ZONE`, `SET … ROLE`, `SET SESSION AUTHORIZATION`,
/// `RESET name`.
fn set_statement(tokens: &[(TokenKind, &str)], out: &mut Vec<Finding>) {
    let word = |i: usize| {
        tokens
            .get(i)
            .filter(|(k, _)| *k == TokenKind::Word)
            .map(|(_, t)| t.to_ascii_lowercase())
    };
    let reset = word(0).as_deref() == Some("reset");
    let mut i = 1;
    if !reset && matches!(word(1).as_deref(), Some("session" | "local")) {
        if word(1).as_deref() == Some("session") && word(2).as_deref() == Some("authorization") {
            out.push(Finding::SetRole);
            return;
        }
        i = 2;
    }
    match word(i).as_deref() {
        Some("role") if !reset => {
            out.push(Finding::SetRole);
            return;
        }
        Some("session") if !reset && word(i + 1).as_deref() == Some("authorization") => {
            out.push(Finding::SetRole);
            return;
        }
        Some("transaction" | "constraints" | "all") => return,
        _ => {}
    }
    // Spellings of a setting without its name: `SET TIME ZONE x`, `SET NAMES x`, `SET SCHEMA x`.
    let alias = match word(i).as_deref() {
        Some("time") if word(i + 1).as_deref() == Some("zone") => Some(("timezone", i + 2)),
        Some("names") if !reset => Some(("client_encoding", i + 1)),
        Some("schema") if !reset => Some(("search_path", i + 1)),
        _ => None,
    };
    if let Some((name, at)) = alias {
        let value = (!reset).then(|| {
            tokens
                .get(at)
                .and_then(|(k, t)| literal_value(*k, t))
                .unwrap_or_else(|| "?".to_owned())
        });
        out.push(Finding::Setting {
            name: name.into(),
            value: value.map(Into::into),
        });
        return;
    }
    // A (possibly dotted) variable name.
    let mut name = String::new();
    let mut j = i;
    while let Some((k, t)) = tokens.get(j) {
        match k {
            TokenKind::Word | TokenKind::QuotedWord => match sqlscan::name_value(t) {
                Some(n) => name.push_str(&n),
                None => {
                    out.push(Finding::ComputedSetting);
                    return;
                }
            },
            TokenKind::Punct(b'.') => name.push('.'),
            _ => break,
        }
        j += 1;
        if !matches!(tokens.get(j), Some((TokenKind::Punct(b'.'), _))) {
            break;
        }
    }
    if name.is_empty() {
        out.push(Finding::ComputedSetting);
        return;
    }
    let value = if reset {
        None
    } else {
        // After TO or =: one literal, or DEFAULT; lists (search_path) keep their first element's spelling.
        let v = match tokens.get(j) {
            Some((TokenKind::Word, t)) if t.eq_ignore_ascii_case("to") => tokens.get(j + 1),
            Some((TokenKind::Punct(b'='), _)) => tokens.get(j + 1),
            _ => None,
        };
        match v {
            Some((TokenKind::Word, t)) if t.eq_ignore_ascii_case("default") => None,
            Some((k, t)) => Some(literal_value(*k, t).unwrap_or_else(|| "?".to_owned())),
            None => Some("?".to_owned()),
        }
    };
    out.push(Finding::Setting {
        name: name.into(),
        value: value.map(Into::into),
    });
}

/// The value of a literal token (string content, number, or word).
fn literal_value(k: TokenKind, t: &str) -> Option<String> {
    match k {
        TokenKind::String => sqlscan::string_value(t),
        TokenKind::Number => Some(t.to_owned()),
        TokenKind::Word | TokenKind::QuotedWord => sqlscan::name_value(t),
        _ => None,
    }
}

/// `set_config(name, value, is_local)` calls: a finding per call, with literal arguments read.
fn set_config_calls(stmt: &str, out: &mut Vec<Finding>) {
    if !stmt
        .as_bytes()
        .windows(10)
        .any(|w| w.eq_ignore_ascii_case(b"set_config"))
    {
        return;
    }
    let tokens: Vec<(TokenKind, &str)> = sqlscan::tokens(stmt).collect();
    for (i, (k, t)) in tokens.iter().enumerate() {
        let is_call = matches!(k, TokenKind::Word | TokenKind::QuotedWord)
            && sqlscan::name_value(t).is_some_and(|n| n == "set_config")
            && matches!(tokens.get(i + 1), Some((TokenKind::Punct(b'('), _)));
        if !is_call {
            continue;
        }
        let arg = |n: usize| tokens.get(i + 2 + 2 * n);
        let sep_ok =
            |n: usize| matches!(tokens.get(i + 3 + 2 * n), Some((TokenKind::Punct(b','), _)));
        let name = match arg(0) {
            Some((TokenKind::String, t)) if sep_ok(0) => sqlscan::string_value(t),
            _ => None,
        };
        let Some(name) = name else {
            out.push(Finding::ComputedSetting);
            continue;
        };
        let value = match arg(1) {
            Some((TokenKind::String, t)) if sep_ok(1) => sqlscan::string_value(t),
            _ => None,
        };
        if name.eq_ignore_ascii_case("role") || name.eq_ignore_ascii_case("session_authorization") {
            out.push(Finding::SetRole);
        } else {
            // A computed value ("?") for a named setting: the name still decides (standard_conforming_strings).
            out.push(Finding::Setting {
                name: name.to_ascii_lowercase().into(),
                value: Some(value.unwrap_or_else(|| "?".to_owned()).into()),
            });
        }
    }
}

/// Functions that change data (a read-only tenant may not call them, even in a SELECT).
const WRITING_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "lo_create",
    "lo_creat",
    "lo_unlink",
    "lo_import",
    "lo_from_bytea",
    "lo_put",
    "lo_truncate",
    "pg_notify",
];

/// Functions the isolation rules refuse unless a plan allows them by name, with what they are (for the message).
pub fn sensitive_function(name: &str) -> Option<&'static str> {
    const FILES: &[&str] = &[
        "pg_read_file",
        "pg_read_binary_file",
        "pg_ls_dir",
        "pg_ls_logdir",
        "pg_ls_waldir",
        "pg_ls_tmpdir",
        "pg_ls_archive_statusdir",
        "pg_ls_logicalsnapdir",
        "pg_ls_logicalmapdir",
        "pg_ls_replslotdir",
        "pg_stat_file",
        "pg_file_write",
        "pg_file_rename",
        "pg_file_unlink",
        "pg_logdir_ls",
    ];
    const LARGE_OBJECT_FILES: &[&str] = &["lo_import", "lo_export"];
    const SIGNALS: &[&str] = &["pg_terminate_backend", "pg_cancel_backend"];
    const ADMIN: &[&str] = &[
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_promote",
        "pg_switch_wal",
        "pg_create_restore_point",
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_drop_replication_slot",
        "pg_replication_origin_create",
        "pg_replication_origin_drop",
    ];
    // They run a query given as text, which no proxy can classify.
    const DYNAMIC: &[&str] = &[
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "ts_stat",
    ];
    if FILES.contains(&name) {
        Some("server file access")
    } else if LARGE_OBJECT_FILES.contains(&name) {
        Some("server file access through large objects")
    } else if SIGNALS.contains(&name) {
        Some("signalling other backends")
    } else if ADMIN.contains(&name) {
        Some("server administration")
    } else if DYNAMIC.contains(&name) {
        Some("running SQL given as text")
    } else if name.starts_with("dblink") {
        Some("connections to other databases (dblink)")
    } else if name.starts_with("pg_logical_slot_") || name.starts_with("pg_replication_slot_") {
        Some("replication")
    } else if name == "?" {
        Some("a function whose name pgweir cannot read")
    } else {
        None
    }
}

struct AstVisitor<'o> {
    classes: u16,
    findings: &'o mut Vec<Finding>,
}

impl Visitor for AstVisitor<'_> {
    type Break = ();

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        // Statements nested in others: data-modifying CTEs, EXPLAIN ANALYZE's statement, a PREPAREd one.
        match s {
            Statement::Insert(_)
            | Statement::Update(_)
            | Statement::Delete(_)
            | Statement::Merge(_) => self.classes |= class::WRITE,
            Statement::Copy { to: false, .. } => self.classes |= class::WRITE,
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &sqlparser::ast::Query) -> ControlFlow<()> {
        if !q.locks.is_empty() {
            self.classes |= class::WRITE;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, s: &sqlparser::ast::Select) -> ControlFlow<()> {
        if s.into.is_some() {
            self.classes |= class::WRITE | class::DDL;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, r: &sqlparser::ast::ObjectName) -> ControlFlow<()> {
        if r.0.len() >= 3 {
            let db = match &r.0[0] {
                sqlparser::ast::ObjectNamePart::Identifier(id) if id.quote_style.is_none() => {
                    id.value.to_ascii_lowercase()
                }
                sqlparser::ast::ObjectNamePart::Identifier(id) => id.value.clone(),
                other => other.to_string(),
            };
            self.findings.push(Finding::OtherDatabase(db.into()));
        }
        ControlFlow::Continue(())
    }
}
