//! SQL-aware tenant policy: every simple Query and every Parse is classified (`classify`), the verdict material
//! cached by statement text, and the tenant's plan decides (`Policy::check`) whether it may run. A refused
//! statement is answered with a Postgres error naming the rule (the session forwards a statement that fails on the
//! server in its place, so the transaction and pipeline around it behave as for any failing statement).
//!
//! Owns: statement classification and its cache, the isolation rules, read-only mode, the settings allow-list and
//! plan bounds, plans (`plan`), per-tenant limits and counters (`limits`).
//!
//! Must not touch: sockets and the wire (the session turns a [`Refusal`] into messages).
//!
//! Defence in depth: Postgres privileges of the tenant's own backend role are the first wall. `sqlparser` cannot
//! parse some valid SQL (`DO`, `ALTER SYSTEM`, `ALTER DATABASE`, …): the lexer pass still sees those statements'
//! leading keywords and called functions, and an unparsed statement counts as write, DDL and session-changing; a
//! plan with `unparsable = "closed"` refuses it. Nothing here can see SQL built at run time inside functions
//! (`EXECUTE` in PL/pgSQL); such functions run with the backend role's privileges only.

pub mod classify;
pub mod limits;
pub mod plan;

use std::sync::Arc;

pub use classify::{class, Facts, Finding};
pub use plan::{Plan, PolicyConfig, Unparsable};

use crate::wire::error::sqlstate;

/// A classification cache key: a statement's text, or NUL and its fingerprint.
type Key = Box<[u8]>;

/// Bytes of statement text and verdicts the classification cache may hold.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// Slots of the seen table (8 bytes each).
const SEEN_SLOTS: usize = 16 * 1024;
/// Longer texts are classified every time rather than cached (they are rarely repeated verbatim).
const CACHE_MAX_TEXT: usize = 64 * 1024;

/// Set in the classifier id of the front-cache entries keyed by a text's shape ([`crate::sqlscan::number_shape`]).
const SHAPES: u64 = 1 << 63;
/// Slots of each thread's front cache (two-way set-associative: two statements an application alternates
/// between do not evict each other when their hashes meet).
const LOCAL_SLOTS: usize = 256;
/// Longer keys are not kept in the front cache.
const LOCAL_MAX_KEY: usize = 2048;

/// One entry of a thread's front cache: a key of the shared cache and its facts.
struct LocalEntry {
    classifier: u64,
    hash: u64,
    key: Box<[u8]>,
    facts: Arc<Facts>,
}

impl LocalEntry {
    fn is(&self, classifier: u64, h: u64, key: &[u8]) -> bool {
        self.hash == h && self.classifier == classifier && *self.key == *key
    }
}

thread_local! {
    /// The front cache of this thread: the keys it looked up last, two per set, the more recent first. A hit
    /// costs a slot read or two and a comparison, no shared-cache bookkeeping (moka records each read and reads
    /// the clock). Entries are copies of shared-cache entries, whose facts never change (they are a function of
    /// the key).
    static LOCAL: std::cell::RefCell<Vec<Option<LocalEntry>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The first slot of the set of hash `h` (the callers' hashes have their lowest bit set: it is not used).
fn local_set(h: u64) -> usize {
    ((h >> 1) as usize % (LOCAL_SLOTS / 2)) * 2
}

/// Looks `key` (hash `h`) up in this thread's front cache.
fn local_get(classifier: u64, h: u64, key: &[u8]) -> Option<Arc<Facts>> {
    LOCAL.with_borrow_mut(|slots| {
        let set = local_set(h);
        let pair = slots.get_mut(set..set + 2)?;
        if let Some(e) = pair[0].as_ref().filter(|e| e.is(classifier, h, key)) {
            return Some(e.facts.clone());
        }
        let found = pair[1]
            .as_ref()
            .filter(|e| e.is(classifier, h, key))?
            .facts
            .clone();
        // Now the more recent of the two.
        pair.swap(0, 1);
        Some(found)
    })
}

/// Keeps `key` → `facts` in this thread's front cache, as the more recent entry of its set (the older one goes).
fn local_put(classifier: u64, h: u64, key: &[u8], facts: &Arc<Facts>) {
    if key.len() > LOCAL_MAX_KEY {
        return;
    }
    LOCAL.with_borrow_mut(|slots| {
        if slots.is_empty() {
            slots.resize_with(LOCAL_SLOTS, || None);
        }
        let set = local_set(h);
        let entry = Some(LocalEntry {
            classifier,
            hash: h,
            key: key.into(),
            facts: facts.clone(),
        });
        if slots[set]
            .as_ref()
            .is_some_and(|e| e.is(classifier, h, key))
        {
            slots[set] = entry;
        } else {
            slots[set + 1] = std::mem::replace(&mut slots[set], entry);
        }
    })
}

/// Slots of each thread's table of recent shapes (direct-mapped by [`crate::sqlscan::shape_prefix_key`]).
const RECENT_SLOTS: usize = 64;

/// A shape whose facts were found or made recently on this thread, with those facts.
struct RecentShape {
    classifier: u64,
    key: u64,
    shape: crate::sqlscan::ShapeMatcher,
    facts: Arc<Facts>,
}

thread_local! {
    /// In front of the front cache: the shapes this thread saw last, by a key of the text's first bytes. A text
    /// is compared with the shape in its slot ([`crate::sqlscan::ShapeMatcher`]) instead of having its shape
    /// written and hashed: for the texts an application sends again with other numbers, most of the cost of
    /// classifying them.
    static RECENT: std::cell::RefCell<Vec<Option<RecentShape>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The facts of the recent shape `sql` has, if the slot of `key` holds it.
fn recent_get(classifier: u64, key: u64, sql: &[u8]) -> Option<Arc<Facts>> {
    RECENT.with_borrow(|slots| {
        let e = slots.get(key as usize % RECENT_SLOTS)?.as_ref()?;
        (e.key == key && e.classifier == classifier && e.shape.matches(sql))
            .then(|| e.facts.clone())
    })
}

/// Keeps `shape` → `facts` in the slot of `key` (the shape it held goes).
fn recent_put(classifier: u64, key: u64, shape: &[u8], facts: &Arc<Facts>) {
    RECENT.with_borrow_mut(|slots| {
        if slots.is_empty() {
            slots.resize_with(RECENT_SLOTS, || None);
        }
        let slot = &mut slots[key as usize % RECENT_SLOTS];
        match slot {
            // The same shape, or another whose buffer can take it.
            Some(e) => {
                e.classifier = classifier;
                e.key = key;
                e.shape.set(shape);
                e.facts = facts.clone();
            }
            None => {
                *slot = Some(RecentShape {
                    classifier,
                    key,
                    shape: crate::sqlscan::ShapeMatcher::new(shape),
                    facts: facts.clone(),
                })
            }
        }
    })
}

/// The statement cache: text → [`Facts`], shared by all tenants (facts do not depend on the tenant).
///
/// In front of it, each thread keeps the entries it used last ([`LOCAL_SLOTS`], two-way): a hot statement
/// (the few shapes an application sends again and again) is found there.
pub struct Classifier {
    /// Tells this classifier's entries in the threads' front caches from another's (tests make several).
    id: u64,
    cache: moka::sync::Cache<Key, Arc<Facts>, foldhash::quality::RandomState>,
    /// Hashes of recent texts, direct-mapped: the last text seen in each slot. A text whose slot holds its hash may
    /// be cached as it is (its exact entry is looked up); a text with literals seen a second time is kept as it is
    /// in the thread's front cache. A collision only affects what is looked up and cached, never a verdict.
    seen: Box<[std::sync::atomic::AtomicU64]>,
    hasher: foldhash::quality::RandomState,
    pub hits: metrics::Counter,
    pub misses: metrics::Counter,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier::new(metrics::Counter::noop(), metrics::Counter::noop())
    }
}

impl Classifier {
    pub fn new(hits: metrics::Counter, misses: metrics::Counter) -> Classifier {
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Classifier {
            id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            cache: moka::sync::Cache::builder()
                .max_capacity(CACHE_BYTES)
                .weigher(|k: &Key, v: &Arc<Facts>| {
                    (k.len() + v.weight() + 64).try_into().unwrap_or(u32::MAX)
                })
                .build_with_hasher(Default::default()),
            seen: (0..SEEN_SLOTS).map(|_| Default::default()).collect(),
            hasher: Default::default(),
            hits,
            misses,
        }
    }

    /// The facts of a Query or Parse text (without its terminating NUL).
    ///
    /// Two keys: the exact text (for facts that depend on literal values, such as a `SET`), and the text's
    /// fingerprint (literals removed, PostgreSQL-exact tokens) behind a NUL byte, which no client text contains,
    /// for facts that do not ([`Facts::literal_independent`]): a query repeated with other literal values is
    /// lexed again but not parsed again.
    ///
    /// A text is looked up as it is only when its slot of the seen table holds its hash: the one-off texts of
    /// queries built with their values (most texts, under such a load) cost one cache lookup, by fingerprint.
    pub fn facts(&self, sql: &[u8]) -> Arc<Facts> {
        self.facts_from(sql, None)
    }

    /// [`Classifier::facts`] of the text of a Parse (or of the statement a Bind names): such texts carry `$n`
    /// parameters rather than literals and come again as they are, so the exact text is looked up first.
    pub fn parsed_facts(&self, sql: &[u8]) -> Arc<Facts> {
        // A text that does not start with NUL cannot be taken for a fingerprint key; one found was cached, so it
        // has no NUL at all.
        if sql.first().is_some_and(|&b| b != 0) {
            return match self.exact_local(sql) {
                Ok(f) => f,
                Err(h) => self.facts_from(sql, Some(h)),
            };
        }
        self.facts_from(sql, None)
    }

    /// The thread's front-cache facts of the exact text, or the text's hash when they are not there.
    fn exact_local(&self, sql: &[u8]) -> Result<Arc<Facts>, u64> {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(sql) | 1;
        let f = local_get(self.id, h, sql).ok_or(h)?;
        self.hits.increment(1);
        Ok(f)
    }

    /// [`Classifier::facts`], where `exact_missed` is the hash of a text known not to be in the front cache.
    fn facts_from(&self, sql: &[u8], exact_missed: Option<u64>) -> Arc<Facts> {
        use std::hash::BuildHasher;
        // First a plain text by its shape (number values masked, no lexing), under which the facts of an earlier
        // text with that shape are kept when they do not depend on literal values: one lookup for most texts of
        // an application. A plain text has no NUL.
        thread_local! {
            static SHAPE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let recent =
            (sql.len() <= 4 * LOCAL_MAX_KEY).then(|| crate::sqlscan::shape_prefix_key(sql));
        if let Some(f) = recent.and_then(|key| recent_get(self.id, key, sql)) {
            self.hits.increment(1);
            return f;
        }
        let shape = SHAPE.with_borrow_mut(|shape| {
            if sql.len() > 4 * LOCAL_MAX_KEY
                || !crate::sqlscan::number_shape(sql, shape)
                || shape.len() > LOCAL_MAX_KEY
            {
                // A buffer that grew large is not kept.
                if shape.capacity() > LOCAL_MAX_KEY {
                    *shape = Vec::new();
                }
                return None;
            }
            let sh = self.hasher.hash_one(&shape[..]) | 1;
            let found = local_get(self.id | SHAPES, sh, shape);
            if let (Some(f), Some(key)) = (&found, recent) {
                recent_put(self.id, key, shape, f);
            }
            Some((sh, found))
        });
        let shape = match shape {
            Some((_, Some(f))) => {
                self.hits.increment(1);
                return f;
            }
            Some((sh, None)) => Some(sh),
            // A text with a NUL inside (the server rejects such a message) is never cached: an exact-text key
            // must not look like a fingerprint key (NUL and the fingerprint).
            None if sql.contains(&0) => {
                self.misses.increment(1);
                return Arc::new(match std::str::from_utf8(sql) {
                    Ok(text) => classify::analyze(text),
                    Err(_) => Facts::not_utf8(),
                });
            }
            None => None,
        };
        // Then the exact text (facts that depend on literal values, texts that are not plain).
        let h = match exact_missed {
            Some(h) => h,
            None => match self.exact_local(sql) {
                Ok(f) => return f,
                Err(h) => h,
            },
        };
        let facts = self.facts_of_text(sql, h);
        if let Some(sh) = shape.filter(|_| facts.literal_independent) {
            SHAPE.with_borrow(|shape| {
                local_put(self.id | SHAPES, sh, shape, &facts);
                if let Some(key) = recent {
                    recent_put(self.id, key, shape, &facts);
                }
            });
        }
        facts
    }

    /// [`Classifier::facts`] of a text without NUL (hash `h`) not in the front cache: by the text and by its
    /// fingerprint.
    fn facts_of_text(&self, sql: &[u8], h: u64) -> Arc<Facts> {
        use std::hash::BuildHasher;
        use std::sync::atomic::Ordering::Relaxed;
        let slot = &self.seen[(h as usize) % self.seen.len()];
        if slot.load(Relaxed) == h {
            if let Some(f) = self.cache.get(sql) {
                self.hits.increment(1);
                local_put(self.id, h, sql, &f);
                return f;
            }
        }
        let Ok(text) = std::str::from_utf8(sql) else {
            self.misses.increment(1);
            return Arc::new(Facts::not_utf8());
        };
        // The fingerprint key is built in a buffer of the thread's: no allocation when it is found.
        thread_local! {
            static KEY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (cached, literals, key) = KEY.with_borrow_mut(|key| {
            key.clear();
            key.push(0);
            let literals = crate::sqlscan::fingerprint_bytes(text, usize::MAX, key);
            let kh = self.hasher.hash_one(&key[..]) | 1;
            let cached = local_get(self.id, kh, &key[..])
                .filter(|f| f.literal_independent)
                .or_else(|| {
                    let f = self.cache.get(&key[..]).filter(|f| f.literal_independent)?;
                    local_put(self.id, kh, &key[..], &f);
                    Some(f)
                });
            // Kept for the miss below only (rare); a buffer that grew large is not kept.
            let owned: Option<(u64, Key)> = cached.is_none().then(|| (kh, key[..].into()));
            if key.capacity() > CACHE_MAX_TEXT {
                *key = Vec::new();
            }
            (cached, literals, owned)
        });
        let facts = match cached {
            Some(f) => {
                self.hits.increment(1);
                f
            }
            None => {
                self.misses.increment(1);
                let facts = Arc::new(classify::analyze(text));
                if let (true, true, Some((kh, key))) =
                    (facts.literal_independent, sql.len() <= CACHE_MAX_TEXT, key)
                {
                    local_put(self.id, kh, &key, &facts);
                    self.cache.insert(key, facts.clone());
                }
                facts
            }
        };
        // The exact text too when its facts depend on its literals, or when it has none (a driver's statement,
        // sent verbatim again and again); and in this thread's front cache when it comes a second time (constant
        // literals: the fingerprint would give the same facts, the front cache saves the lexing). Not the one-off
        // texts of queries built with their values, which would only crowd the cache: a text with random values
        // comes a second time now and then too, and a shared-cache insert costs more than the lexing it saves.
        let seen_before = slot.swap(h, Relaxed) == h;
        let shared = !facts.literal_independent || !literals;
        if (shared || seen_before) && sql.len() <= CACHE_MAX_TEXT {
            local_put(self.id, h, sql, &facts);
            if shared {
                self.cache.insert(sql.into(), facts.clone());
            }
        }
        facts
    }
}

/// Why a statement is refused: the rule's name (for metrics and logs), the SQLSTATE and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: &'static str,
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl Refusal {
    fn new(rule: &'static str, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            rule,
            code,
            message: message.into(),
            hint: None,
        }
    }

    fn privilege(rule: &'static str, what: impl std::fmt::Display) -> Refusal {
        Refusal::new(
            rule,
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("pgweir: {what} is not allowed (rule \"{rule}\")"),
        )
    }

    fn hint(mut self, h: impl Into<String>) -> Refusal {
        self.hint = Some(h.into());
        self
    }

    /// The error the client gets.
    pub fn to_error(&self) -> crate::wire::PgError {
        let err = crate::wire::PgError::error(self.code, self.message.clone());
        match &self.hint {
            Some(h) => err.with_hint(h.clone()),
            None => err,
        }
    }
}

/// What a check needs to know about the session besides the statement.
pub struct Context<'a> {
    /// The physical database the session is connected to.
    pub database: &'a str,
    /// Why the tenant is read-only now (operator switch or storage quota), if it is.
    pub read_only: Option<&'a str>,
}

impl PolicyConfig {
    /// The first rule `facts` break, if any: a named rule first, then the unparsable policy, the denied classes
    /// and read-only mode.
    pub fn check(&self, facts: &Facts, ctx: &Context<'_>) -> Option<Refusal> {
        for f in facts.findings.iter() {
            if let Some(r) = self.finding(f, ctx) {
                return Some(r);
            }
        }
        if facts.classes & class::UNPARSED != 0 && self.unparsable == Unparsable::Closed {
            return Some(
                Refusal::new(
                    "unparsable",
                    sqlstate::SYNTAX_ERROR,
                    "pgweir: the proxy could not parse this statement, and this database's policy refuses \
                     statements it cannot parse",
                )
                .hint("policy \"unparsable\" is \"closed\" for this plan"),
            );
        }
        if let Some((_, name)) = class::NAMES
            .iter()
            .find(|(bit, _)| facts.classes & bit & self.deny_class_bits() != 0)
        {
            return Some(Refusal::privilege(
                "statement-class",
                format_args!("a {name} statement"),
            ));
        }
        let read_only = ctx
            .read_only
            .or(self.read_only.then_some("the plan is read-only"));
        if let (Some(why), true) = (read_only, facts.classes & (class::WRITE | class::DDL) != 0) {
            return Some(
                Refusal::new(
                    "read-only",
                    sqlstate::READ_ONLY_SQL_TRANSACTION,
                    format!(
                        "pgweir: cannot change data: this database is in read-only mode ({why})"
                    ),
                )
                .hint("reads keep working"),
            );
        }
        None
    }

    fn rule_on(&self, rule: &str) -> bool {
        !self.disable_rules.iter().any(|r| r == rule)
    }

    fn finding(&self, f: &Finding, ctx: &Context<'_>) -> Option<Refusal> {
        let refuse = |rule: &'static str, what: &str| {
            self.rule_on(rule)
                .then(|| Refusal::privilege(rule, what.to_owned()))
        };
        match f {
            Finding::AlterSystem => refuse("alter-system", "ALTER SYSTEM"),
            Finding::SetRole => refuse("set-role", "SET ROLE or SET SESSION AUTHORIZATION"),
            Finding::CopyProgram => refuse("copy-program", "COPY to or from a program"),
            Finding::CopyFile => refuse("copy-file", "COPY to or from a server file")
                .map(|r| r.hint("use COPY … FROM STDIN / TO STDOUT (psql's \\copy)")),
            Finding::Load => refuse("load", "LOAD"),
            Finding::AlterRole => refuse("alter-role", "ALTER ROLE")
                .map(|r| r.hint("passwords and role settings are managed through the platform")),
            Finding::AlterDatabase => refuse("alter-database", "ALTER DATABASE"),
            Finding::GrantPublic => refuse("grant-public", "GRANT … TO PUBLIC"),
            Finding::GrantDatabase => refuse("grant-database", "GRANT … ON DATABASE"),
            Finding::CreateExtension(name) => {
                let allowed = self
                    .allow_extensions
                    .iter()
                    .any(|e| e == "*" || e.eq_ignore_ascii_case(name));
                (!allowed && self.rule_on("extension")).then(|| {
                    Refusal::privilege("extension", format_args!("extension \"{name}\"")).hint(
                        format!("allowed extensions: {}", self.allow_extensions.join(", ")),
                    )
                })
            }
            Finding::Function(name) => {
                let allowed = self.allow_functions.iter().any(|a| a == &**name);
                let what = classify::sensitive_function(name).unwrap_or("this function");
                (!allowed && self.rule_on("function"))
                    .then(|| Refusal::privilege("function", format_args!("{name}() ({what})")))
            }
            Finding::OtherDatabase(db) if db.as_ref() != ctx.database => refuse(
                "other-database",
                &format!("a reference to database \"{db}\""),
            ),
            Finding::OtherDatabase(_) => None,
            Finding::ComputedSetting => (self.computed_settings == plan::Computed::Refuse
                && self.rule_on("setting"))
            .then(|| {
                Refusal::privilege(
                    "setting",
                    "changing a setting whose name pgweir cannot read",
                )
                .hint("use set_config with a literal name")
            }),
            Finding::Setting { name, value } => self.setting(name, value.as_deref()),
        }
    }

    /// Checks one setting change (`value` None: back to the default). Also used for startup parameters.
    pub fn setting(&self, name: &str, value: Option<&str>) -> Option<Refusal> {
        let lname = crate::ascii_lowercase(name);
        if lname == "standard_conforming_strings" {
            // Only pgweir can enforce this: the lexers here assume it is on.
            return match value {
                Some(v)
                    if !v.eq_ignore_ascii_case("on")
                        && !v.eq_ignore_ascii_case("true")
                        && v != "1" =>
                {
                    Some(Refusal::privilege(
                        "standard-conforming-strings",
                        "turning standard_conforming_strings off",
                    ))
                }
                _ => None,
            };
        }
        if lname == "role" || lname == "session_authorization" {
            return (value.is_some() && self.rule_on("set-role"))
                .then(|| Refusal::privilege("set-role", "SET ROLE or SET SESSION AUTHORIZATION"));
        }
        if !self.rule_on("setting") {
            return None;
        }
        if !self.setting_allowed(&lname) {
            return Some(
                Refusal::privilege("setting", format_args!("setting \"{name}\""))
                    .hint("the plan's settings allow-list does not include it"),
            );
        }
        let value = value?;
        let bound = match &*lname {
            "work_mem" | "maintenance_work_mem" | "temp_buffers" => self
                .max_work_mem_kb
                .map(|m| (m, plan::parse_memory_kb(value), false)),
            "statement_timeout" | "idle_in_transaction_session_timeout" => self
                .max_timeout_ms
                .map(|m| (m, plan::parse_duration_ms(value), true)),
            _ => None,
        };
        let (max, parsed, zero_is_unlimited) = bound?;
        // A value pgweir cannot read is refused where the plan sets a bound.
        let ok = parsed.is_some_and(|v| v <= max && !(zero_is_unlimited && v == 0));
        (!ok).then(|| {
            Refusal::privilege("setting", format_args!("{name} = '{value}'"))
                .hint("the value is beyond what the plan allows")
        })
    }

    fn setting_allowed(&self, lname: &str) -> bool {
        if lname.contains('.') {
            // Custom (placeholder) variables such as app.user_id or request.jwt.claims.
            return true;
        }
        match &self.allow_settings {
            Some(list) => list
                .iter()
                .any(|s| s == "*" || s.eq_ignore_ascii_case(lname)),
            None => plan::DEFAULT_SETTINGS.contains(&lname) || lname.starts_with("enable_"),
        }
    }
}

#[cfg(test)]
mod tests;
