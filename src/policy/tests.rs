use super::*;

fn check(sql: &str) -> Option<&'static str> {
    check_with(&PolicyConfig::default(), sql, false)
}

fn check_with(p: &PolicyConfig, sql: &str, read_only: bool) -> Option<&'static str> {
    let read_only = read_only.then_some("test");
    let facts = classify::analyze(sql);
    let ctx = Context {
        database: "tenant_a",
        read_only,
    };
    p.check(&facts, &ctx).map(|r| r.rule)
}

#[test]
fn classes_of_common_statements() {
    use class::*;
    let c = |s: &str| classify::analyze(s).classes;
    assert_eq!(
        c("SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
        READ
    );
    assert_eq!(c("UPDATE t SET a = 1"), WRITE);
    assert_eq!(
        c("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x") & WRITE,
        WRITE
    );
    assert_eq!(c("SELECT * FROM t FOR UPDATE") & WRITE, WRITE);
    assert_eq!(c("SELECT nextval('s')") & WRITE, WRITE);
    assert_eq!(c("SELECT 1 INTO t2") & DDL, DDL);
    assert_eq!(c("CREATE TABLE t (a int)"), DDL);
    assert_eq!(c("BEGIN"), TRANSACTION);
    assert_eq!(c("SET search_path = app"), SESSION);
    assert_eq!(c("COPY t TO STDOUT"), READ);
    assert_eq!(c("COPY t FROM STDIN"), WRITE);
    assert_eq!(c("EXPLAIN ANALYZE DELETE FROM t") & WRITE, WRITE);
    assert_eq!(c("EXPLAIN SELECT 1"), READ);
    assert_eq!(c("DO $$BEGIN END$$") & UNPARSED, UNPARSED);
    assert_eq!(c("SELECT 1; DROP TABLE t") & DDL, DDL);
    assert_eq!(classify::analyze("SELECT 1; SELECT 2;").statements, 2);
}

#[test]
fn isolation_rules_refuse_what_they_name() {
    let cases = [
        ("ALTER SYSTEM SET work_mem = '1GB'", "alter-system"),
        ("SET ROLE postgres", "set-role"),
        ("set local role postgres", "set-role"),
        ("SET SESSION AUTHORIZATION postgres", "set-role"),
        ("SELECT set_config('role', 'postgres', false)", "set-role"),
        ("COPY t TO PROGRAM 'cat > /tmp/x'", "copy-program"),
        ("COPY t FROM '/etc/passwd'", "copy-file"),
        ("LOAD 'auto_explain'", "load"),
        ("ALTER ROLE current_user SET search_path = x", "alter-role"),
        ("ALTER USER me PASSWORD 'x'", "alter-role"),
        ("ALTER DATABASE d CONNECTION LIMIT 1", "alter-database"),
        ("GRANT SELECT ON t TO PUBLIC", "grant-public"),
        (
            "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO public",
            "grant-public",
        ),
        ("GRANT CONNECT ON DATABASE d TO other", "grant-database"),
        ("CREATE EXTENSION IF NOT EXISTS file_fdw", "extension"),
        ("SELECT pg_read_file('/etc/passwd')", "function"),
        ("SELECT pg_catalog.pg_ls_dir('.')", "function"),
        (
            "SELECT * FROM dblink('host=x', 'select 1') AS t(a int)",
            "function",
        ),
        ("SELECT pg_terminate_backend(123)", "function"),
        ("DO $$BEGIN PERFORM pg_read_file('x'); END$$", "function"),
        (
            "SELECT query_to_xml('drop table t', true, true, '')",
            "function",
        ),
        ("SELECT * FROM otherdb.public.t", "other-database"),
        (
            "SET standard_conforming_strings = off",
            "standard-conforming-strings",
        ),
        (
            "SET LOCAL standard_conforming_strings TO 'off'",
            "standard-conforming-strings",
        ),
        (
            "SELECT set_config('standard_conforming_strings', 'off', true)",
            "standard-conforming-strings",
        ),
        ("SET shared_buffers = '1GB'", "setting"),
        ("SELECT 1; SELECT pg_read_file('x')", "function"),
    ];
    for (sql, rule) in cases {
        assert_eq!(check(sql), Some(rule), "{sql}");
    }
}

#[test]
fn ordinary_sql_passes() {
    for sql in [
        "SELECT * FROM t WHERE a = $1",
        "INSERT INTO t VALUES (1, 'pg_read_file(')",
        "SET search_path = app, public",
        "SET TIME ZONE 'UTC'",
        "SET application_name TO 'x'",
        "SELECT set_config('request.jwt.claims', $1, true)",
        "SET standard_conforming_strings = on",
        "CREATE EXTENSION IF NOT EXISTS pgcrypto",
        "COPY t FROM STDIN WITH (FORMAT csv)",
        "COPY (SELECT * FROM t) TO STDOUT",
        "GRANT SELECT ON t TO app_reader",
        "SELECT * FROM tenant_a.public.t",
        "BEGIN; UPDATE t SET a = a + 1; COMMIT",
        "DO $$BEGIN RAISE NOTICE 'hi'; END$$",
        "SET enable_seqscan = off",
        "SET myapp.tenant = '42'",
    ] {
        assert_eq!(check(sql), None, "{sql}");
    }
}

#[test]
fn plans_bound_settings_and_classes() {
    let p = PolicyConfig {
        max_work_mem_kb: Some(65536),
        max_timeout_ms: Some(60_000),
        deny_classes: vec!["ddl".into()],
        unparsable: Unparsable::Closed,
        ..PolicyConfig::default()
    };
    assert_eq!(check_with(&p, "SET work_mem = '64MB'", false), None);
    assert_eq!(
        check_with(&p, "SET work_mem = '1GB'", false),
        Some("setting")
    );
    assert_eq!(
        check_with(&p, "SET statement_timeout = 0", false),
        Some("setting")
    );
    assert_eq!(check_with(&p, "SET statement_timeout = '30s'", false), None);
    assert_eq!(
        check_with(
            &p,
            "SELECT set_config('idle_in_transaction_session_timeout', '0', false)",
            false
        ),
        Some("setting")
    );
    assert_eq!(
        check_with(&p, "CREATE TABLE t (a int)", false),
        Some("statement-class")
    );
    assert_eq!(
        check_with(&p, "DO $$BEGIN END$$", false),
        Some("unparsable")
    );
    assert_eq!(
        check_with(&PolicyConfig::default(), "INSERT INTO t VALUES (1)", true),
        Some("read-only")
    );
    assert_eq!(check_with(&PolicyConfig::default(), "SELECT 1", true), None);
}

/// Setting names are compared in lowercase whatever their case (a startup parameter's name is as the client
/// wrote it; lowercase names are not copied for that).
#[test]
fn setting_names_bind_in_any_case() {
    let p = PolicyConfig {
        max_work_mem_kb: Some(65536),
        ..PolicyConfig::default()
    };
    for name in ["work_mem", "Work_Mem", "WORK_MEM"] {
        assert_eq!(
            p.setting(name, Some("64MB")).map(|r| r.rule),
            None,
            "{name}"
        );
        assert_eq!(
            p.setting(name, Some("1GB")).map(|r| r.rule),
            Some("setting"),
            "{name}"
        );
    }
    for name in ["role", "ROLE", "Session_Authorization"] {
        assert_eq!(
            p.setting(name, Some("x")).map(|r| r.rule),
            Some("set-role"),
            "{name}"
        );
    }
    assert!(matches!(
        crate::ascii_lowercase("timezone"),
        std::borrow::Cow::Borrowed("timezone")
    ));
    assert_eq!(crate::ascii_lowercase("TimeZone"), "timezone");
}

#[test]
fn refusals_become_errors_with_their_sqlstate_message_and_hint() {
    let r = Refusal::privilege("copy-file", "COPY to or from a server file").hint("use STDIN");
    let bytes = r.to_error().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("C42501"), "{text}");
    assert!(
        text.contains("Mpgweir: COPY to or from a server file is not allowed (rule \"copy-file\")"),
        "{text}"
    );
    assert!(text.contains("Huse STDIN"), "{text}");
}

#[test]
fn the_cache_answers_repeats() {
    let c = Classifier::default();
    let a = c.facts(b"SELECT 1");
    let b = c.facts(b"SELECT 1");
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(
        c.facts(&[0xff, 0xfe]).classes & class::UNPARSED,
        class::UNPARSED
    );
}

/// The facts pass a policy that caps `work_mem` at 64 MB.
fn within_64mb_work_mem(facts: &Facts) -> bool {
    let p = PolicyConfig {
        max_work_mem_kb: Some(65536),
        ..PolicyConfig::default()
    };
    let ctx = Context {
        database: "d",
        read_only: None,
    };
    p.check(facts, &ctx).is_none()
}

#[test]
fn literal_variants_share_cached_facts_when_literals_do_not_matter() {
    let c = Classifier::default();
    let a = c.facts(b"SELECT abalance FROM pgbench_accounts WHERE aid = 17");
    let b = c.facts(b"select abalance from pgbench_accounts where aid = 4242");
    assert!(a.literal_independent);
    assert!(Arc::ptr_eq(&a, &b), "the second is a cache hit");
    // Settings depend on their literal: never shared.
    let ok = c.facts(b"SET work_mem = '64MB'");
    let big = c.facts(b"SET work_mem = '64GB'");
    assert!(!ok.literal_independent);
    assert!(!Arc::ptr_eq(&ok, &big));
    assert!(within_64mb_work_mem(&ok));
    assert!(!within_64mb_work_mem(&big));
    // Bodies and role names too.
    for (x, y) in [
        (
            "DO $$BEGIN PERFORM 1; END$$",
            "DO $$BEGIN PERFORM pg_read_file('x'); END$$",
        ),
        (
            "SELECT set_config('app.x', 'v', false)",
            "SELECT set_config('role', 'v', false)",
        ),
        ("COPY t FROM STDIN", "COPY t FROM '/etc/passwd'"),
    ] {
        let fx = c.facts(x.as_bytes());
        let fy = c.facts(y.as_bytes());
        assert!(!Arc::ptr_eq(&fx, &fy), "{x} / {y}");
        assert_ne!(fx.findings, fy.findings, "{x} / {y}");
    }
}

/// A text with a NUL inside is not cached: it could otherwise stand, in the cache, for the fingerprint key of
/// another statement (a NUL and the fingerprint) and give that statement its facts.
#[test]
fn texts_with_nul_plant_nothing_in_the_cache() {
    let c = Classifier::default();
    let planted = c.facts(b"\0set role x");
    let real = c.facts(b"SET ROLE x");
    assert!(!Arc::ptr_eq(&planted, &real));
    assert!(real.may_have_effects);
    assert!(!real.literal_independent);
}

/// Plain texts that differ only in number values share facts by shape, without lexing; names with digits, and
/// settings whose value is a number, do not.
#[test]
fn shapes_share_facts_only_where_numbers_do_not_matter() {
    let c = Classifier::default();
    let a = c.facts(b"SELECT * FROM t1 WHERE a = 1");
    let b = c.facts(b"SELECT * FROM t1 WHERE a = 22");
    assert!(Arc::ptr_eq(&a, &b), "the second is found by shape");
    let other = c.facts(b"SELECT * FROM t2 WHERE a = 3");
    assert!(!Arc::ptr_eq(&a, &other));
    assert_eq!(&*other.fingerprint, "select * from t2 where a = ?");
    let small = c.facts(b"SET work_mem = 1024");
    let big = c.facts(b"SET work_mem = 999999999");
    assert!(!Arc::ptr_eq(&small, &big));
    assert!(within_64mb_work_mem(&small));
    assert!(!within_64mb_work_mem(&big));
}

#[test]
fn parse_texts_are_found_by_their_exact_text_first_with_the_same_facts() {
    let c = Classifier::default();
    let fresh = Classifier::default();
    for sql in [
        &b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"[..],
        b"SET work_mem = 1024",
        b"SET work_mem = 999999999",
        b"SELECT * FROM t1 WHERE a = 7",
        b"SELECT 1\0; DROP TABLE t",
        b"\0SELECT 1",
        b"",
    ] {
        // Found again (exact text first, or shape, or neither for texts with NUL): the facts of a first look.
        for _ in 0..2 {
            let got = c.parsed_facts(sql);
            let want = fresh.facts(sql);
            assert_eq!(got.fingerprint, want.fingerprint, "{sql:?}");
            assert_eq!(got.literal_independent, want.literal_independent, "{sql:?}");
            assert_eq!(got.may_have_effects, want.may_have_effects, "{sql:?}");
        }
    }
    let a = c.parsed_facts(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1");
    let b = c.facts(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1");
    assert!(
        Arc::ptr_eq(&a, &b),
        "a Parse text and a Query text share the entry"
    );
    assert!(!within_64mb_work_mem(
        &c.parsed_facts(b"SET work_mem = 999999999")
    ));
    assert!(within_64mb_work_mem(
        &c.parsed_facts(b"SET work_mem = 1024")
    ));
}

#[test]
fn the_front_cache_keeps_two_statements_whose_hashes_meet() {
    let facts = |sql: &str| Arc::new(classify::analyze(sql));
    let (a, b, c) = (
        facts("SELECT 1"),
        facts("UPDATE t SET a = 1"),
        facts("BEGIN"),
    );
    // Three hashes of one set (their lowest bit is set, as the callers' are).
    let step = (LOCAL_SLOTS as u64 / 2) << 1;
    let (ha, hb, hc) = (0x51, 0x51 + step, 0x51 + 2 * step);
    assert_eq!(local_set(ha), local_set(hb));
    assert_eq!(local_set(ha), local_set(hc));
    let id = 0x7e57_0001;
    local_put(id, ha, b"a", &a);
    local_put(id, hb, b"b", &b);
    let got = |h, k: &[u8]| local_get(id, h, k).map(|f| f.classes);
    assert_eq!(
        got(ha, b"a"),
        Some(a.classes),
        "alternating statements both stay"
    );
    assert_eq!(got(hb, b"b"), Some(b.classes));
    // `b` was used last: a third statement of the set evicts `a`.
    assert_eq!(got(ha, b"a"), Some(a.classes));
    assert_eq!(got(hb, b"b"), Some(b.classes));
    local_put(id, hc, b"c", &c);
    assert_eq!(got(ha, b"a"), None);
    assert_eq!(got(hb, b"b"), Some(b.classes));
    assert_eq!(got(hc, b"c"), Some(c.classes));
    // The key is compared, not only the hash; another classifier's entries are not this one's.
    assert_eq!(got(hc, b"x"), None);
    assert_eq!(local_get(id + 1, hc, b"c").map(|f| f.classes), None);
}

/// Texts whose first 32 bytes meet in a slot of the recent shapes: each gets the facts of its own shape, and a
/// text with more after a recent shape's text (here a setting whose value matters) is not taken for it.
#[test]
fn recent_shapes_sharing_a_slot_keep_their_own_facts() {
    let c = Classifier::default();
    let a = "SELECT abalance FROM pgbench_accounts WHERE aid = 1";
    let b = "SELECT abalance FROM pgbench_accounts WHERE bid = 2";
    assert_eq!(
        crate::sqlscan::shape_prefix_key(a.as_bytes()),
        crate::sqlscan::shape_prefix_key(b.as_bytes())
    );
    for round in 0..3 {
        let fa = c.facts(format!("{a}{round}").as_bytes());
        assert_eq!(
            &*fa.fingerprint,
            "select abalance from pgbench_accounts where aid = ?"
        );
        assert!(Arc::ptr_eq(
            &fa,
            &c.facts(format!("{a}7{round}").as_bytes())
        ));
        let fb = c.facts(format!("{b}{round}").as_bytes());
        assert_eq!(
            &*fb.fingerprint,
            "select abalance from pgbench_accounts where bid = ?"
        );
        let more = c.facts(format!("{a}{round}; SET work_mem = 999999999").as_bytes());
        assert!(!within_64mb_work_mem(&more));
        assert!(within_64mb_work_mem(
            &c.facts(format!("{a}{round}").as_bytes())
        ));
    }
}
