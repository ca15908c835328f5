use super::lexer::{self, Kind, Lexer, StrMode};
use super::*;
use proptest::prelude::*;
use Effect::{
    DiscardAll, Pin, ResetAll, SessionStateUnknown as Unknown, TransactionScoped as Tx, Unpin,
};
use PinReason::*;

fn set(name: &str, value: &str) -> Effect {
    Effect::Set {
        name: name.to_owned(),
        value: Some(value.to_owned()),
    }
}

fn reset(name: &str) -> Effect {
    Effect::Set {
        name: name.to_owned(),
        value: None,
    }
}

fn check(sql: &str, expected: &[Effect]) {
    assert_eq!(session_effects(sql), expected, "session_effects({sql:?})");
    assert_eq!(
        has_session_effects(sql),
        !expected.is_empty(),
        "has_session_effects({sql:?})"
    );
}

fn check_all(cases: &[(&str, &[Effect])]) {
    for (sql, expected) in cases {
        check(sql, expected);
    }
}

/// The kinds and texts of the tokens of `sql`.
fn tokens(sql: &str) -> Vec<(Kind, &str)> {
    let lx = Lexer::new(sql);
    lx.map(|t| (t.kind, lx.text(t))).collect()
}

#[test]
fn ordinary_statements_have_no_effect() {
    for sql in [
        "",
        "   ",
        ";",
        ";;",
        " ; ; ",
        "-- only a comment",
        "/* only a comment */",
        "SELECT 1",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
        "INSERT INTO temp VALUES (1)",
        "WITH x AS (SELECT 1) INSERT INTO temp SELECT * FROM x",
        "MERGE INTO temp t USING s ON t.a = s.a WHEN MATCHED THEN DELETE",
        "DELETE FROM t WHERE a IN (SELECT b FROM u)",
        "BEGIN",
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
        "START TRANSACTION READ ONLY",
        "COMMIT",
        "END",
        "ROLLBACK",
        "ABORT",
        "COMMIT PREPARED 'x'",
        "PREPARE TRANSACTION 'gid'",
        "VALUES (1), (2)",
        "TABLE t",
        "COPY t FROM STDIN",
        "COPY (SELECT * FROM t) TO STDOUT",
        "SHOW search_path",
        "SELECT 1 INTO t",
        "SELECT 1 INTO temp FROM pg_class",
        "SELECT * INTO UNLOGGED t FROM u",
        "SELECT pg_advisory_xact_lock(1)",
        "SELECT pg_try_advisory_xact_lock(1)",
        "SELECT my_pg_advisory_lock(1)",
        "SELECT pg_advisory_lock_x(1)",
        "SELECT pg_advisory_lock",
        "SELECT \"PG_ADVISORY_LOCK\"(1)",
        "select 'pg_advisory_lock(1)'",
        "select \"pg_advisory_lock(\"",
        "select $$pg_advisory_lock(1)$$",
        "select 1 -- pg_advisory_lock(1)",
        "select 1 /* pg_advisory_lock(1) */",
        "SELECT set_config('a.b', '1', true)",
        "SELECT set_config('a.b', '1', 't')",
        "SELECT set_config('a.b', x, 'true')",
        "SELECT current_setting('search_path')",
        "NOTIFY ch, 'payload'",
        "DISCARD PLANS",
        "DISCARD SEQUENCES",
        "DECLARE c CURSOR FOR SELECT 1",
        "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
        "CREATE TABLE t (a int)",
        "CREATE UNLOGGED TABLE t (a int)",
        "CREATE TABLE t AS SELECT 1 AS temp",
        "CREATE VIEW v AS SELECT temp FROM t",
        "CREATE INDEX ON t (a)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT pg_advisory_lock(1); LISTEN x $$",
        "CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC SELECT pg_advisory_lock(1); SELECT 2; END",
        "ALTER ROLE r SET search_path = a",
        "ALTER SYSTEM SET work_mem = '1GB'",
        "ALTER DATABASE d RESET ALL",
        "SET CATALOG 'x'",
        "VACUUM ANALYZE t",
        "EXPLAIN SELECT 1",
        "DO $$ BEGIN PERFORM 1; END $$",
    ] {
        check(sql, &[]);
    }
}

#[test]
fn lexing_hides_semicolons_and_keywords() {
    check_all(&[
        ("SELECT ';SET x=1'", &[]),
        ("SELECT ';SET x=1'; SET y = 2", &[set("y", "2")]),
        ("SELECT 'it''s; LISTEN a'", &[]),
        ("SELECT $$ ; LISTEN a $$", &[]),
        ("SELECT $a$ $$ $a$; LISTEN z", &[Pin(Listen)]),
        ("SELECT $a$ $$; LISTEN z $a$", &[]),
        ("SELECT $a$ $b$; LISTEN z $b$ $a$", &[]),
        ("SELECT $a$ $A$; LISTEN z $A$", &[]),
        ("SELECT $_x1$;LISTEN y$_x1$", &[]),
        ("SELECT $1;LISTEN a", &[Pin(Listen)]),
        ("SELECT $1$;LISTEN a", &[Pin(Listen)]),
        ("SELECT 1 AS a$$b, 2; LISTEN c", &[Pin(Listen)]),
        ("SELECT 1$$;LISTEN x$$", &[]),
        ("SELECT $ab;LISTEN x", &[Pin(Listen)]),
        ("SELECT E'\\';LISTEN x'", &[]),
        ("SELECT E'\\';LISTEN x'; LISTEN y", &[Pin(Listen)]),
        ("SELECT e'\\\\'; LISTEN y", &[Pin(Listen)]),
        ("SELECT E'it''s; LISTEN a'", &[]),
        ("SELECT '\\'; LISTEN x", &[Pin(Listen)]),
        ("SELECT name'\\'; LISTEN x", &[Pin(Listen)]),
        ("SELECT U&'\\0041'; LISTEN x", &[Pin(Listen)]),
        ("SELECT U&'d\\0061t''a;LISTEN x' UESCAPE '!'", &[]),
        ("SELECT 1 AS U&\"a;b\"; LISTEN x", &[Pin(Listen)]),
        ("SELECT B'01'; LISTEN x", &[Pin(Listen)]),
        ("SELECT X'1F;' ; LISTEN x", &[Pin(Listen)]),
        ("SELECT N'a;b'; LISTEN x", &[Pin(Listen)]),
        ("SELECT 1 AS \"a;LISTEN b\"", &[]),
        ("SELECT 1 AS \"a\"\";LISTEN b\"", &[]),
        ("SELECT 1 -- ; LISTEN a\n; LISTEN b", &[Pin(Listen)]),
        ("SELECT 1 -- ; LISTEN a\r LISTEN b", &[]),
        ("SELECT 1 /* ; LISTEN a */", &[]),
        ("SELECT 1 /* /* ; */ LISTEN a */", &[]),
        ("SELECT 1 /* /* */ ; LISTEN a */; LISTEN b", &[Pin(Listen)]),
        ("SELECT 1 /*/ LISTEN a */", &[]),
        ("SELECT 1 +/* ; */ 2; SELECT 3 --", &[]),
        ("SELECT 1 */ ; LISTEN a", &[Pin(Listen)]),
        ("SELECT 1; /* LISTEN a */ LISTEN b", &[Pin(Listen)]),
        // SQL-standard string continuation keeps the E'' mode, so `\'` still escapes.
        ("SELECT E'a'\n'\\';LISTEN x'", &[]),
        ("SELECT E'a' -- note\n  '\\';LISTEN x'", &[]),
        // Without a newline it is not a continuation: the second literal is a standard one.
        ("SELECT E'a' '\\';LISTEN x'", &[Pin(Listen)]),
        ("SELECT E'a' /* c */\n'\\';LISTEN x'", &[Pin(Listen)]),
        ("select 'a' -- it's\n'b'; listen x", &[Pin(Listen)]),
        // Keywords are case-insensitive; quoted identifiers are not keywords.
        ("listen x", &[Pin(Listen)]),
        ("LiStEn x", &[Pin(Listen)]),
        ("\"LISTEN\" x", &[]),
        ("\"listen\" x", &[]),
        ("/* c */ LISTEN x", &[Pin(Listen)]),
        ("-- c\nLISTEN x", &[Pin(Listen)]),
        ("\t\n LISTEN\tx\n", &[Pin(Listen)]),
    ]);
}

#[test]
fn unterminated_tokens_run_to_the_end() {
    check_all(&[
        ("SELECT 'abc; LISTEN x", &[]),
        ("SELECT E'abc\\'; LISTEN x", &[]),
        ("SELECT \"abc; LISTEN x", &[]),
        ("SELECT $$abc; LISTEN x", &[]),
        ("SELECT $q$abc; LISTEN x $$", &[]),
        ("SELECT 1 /* abc; LISTEN x", &[]),
        ("SELECT 1 /* /* */ abc; LISTEN x", &[]),
        ("SELECT 1 -- abc; LISTEN x", &[]),
        ("SELECT E'", &[]),
        ("SELECT E'\\", &[]),
        ("SELECT U&'", &[]),
        ("SELECT U&\"", &[]),
        ("SELECT $", &[]),
        ("SELECT $a", &[]),
        ("SELECT $a$", &[]),
        ("'", &[]),
        ("\"", &[]),
        ("/*", &[]),
        ("-", &[]),
        ("/", &[]),
        ("SET x = 'abc", &[Unknown]),
        ("SET x = \"abc", &[Unknown]),
        ("SET x = $$abc", &[Unknown]),
        ("SET x = 1 /* unterminated comment", &[set("x", "1")]),
        ("SET \"x = 1", &[Unknown]),
        ("SELECT set_config('a', 'b", &[Unknown]),
        ("SELECT set_config('a', 'b', false", &[Unknown]),
        ("LISTEN", &[Pin(Listen)]),
    ]);
}

#[test]
fn set_statements() {
    check_all(&[
        ("SET x = 1", &[set("x", "1")]),
        ("SET x=1", &[set("x", "1")]),
        ("SET x TO 1", &[set("x", "1")]),
        ("set x to 1", &[set("x", "1")]),
        ("SET SESSION x = 1", &[set("x", "1")]),
        ("SET Work_Mem = '64MB'", &[set("work_mem", "'64MB'")]),
        ("SET \"Work_Mem\" = '64MB'", &[set("Work_Mem", "'64MB'")]),
        ("SET statement_timeout TO 5s", &[set("statement_timeout", "5s")]),
        ("SET statement_timeout = -1", &[set("statement_timeout", "-1")]),
        ("SET statement_timeout = 5000;", &[set("statement_timeout", "5000")]),
        ("SET search_path TO \"A\", b", &[set("search_path", "\"A\", b")]),
        ("SET search_path = public, \"My Schema\"  ", &[set("search_path", "public, \"My Schema\"")]),
        ("SET search_path = a /* c */ , b -- trailing\n", &[set("search_path", "a /* c */ , b")]),
        ("SET application_name = 'it''s; mine'", &[set("application_name", "'it''s; mine'")]),
        ("SET application_name = E'a\\'b'", &[set("application_name", "E'a\\'b'")]),
        ("SET application_name = $$x$$", &[set("application_name", "$$x$$")]),
        ("SET x = 'DEFAULT'", &[set("x", "'DEFAULT'")]),
        ("SET x TO DEFAULT", &[reset("x")]),
        ("SET x = default", &[reset("x")]),
        ("SET x = default, 1", &[set("x", "default, 1")]),
        ("SET myapp.user_id = 42", &[set("myapp.user_id", "42")]),
        ("SET MyApp . \"User_Id\" TO '42'", &[set("myapp.User_Id", "'42'")]),
        ("SET \"my\"\"app\".x = 1", &[set("my\"app.x", "1")]),
        ("SET a.b.c = 1", &[set("a.b.c", "1")]),
        // The first keyword after SET can itself be a variable name.
        ("SET local = 5", &[set("local", "5")]),
        ("SET session TO 5", &[set("session", "5")]),
        ("SET time = 1", &[set("time", "1")]),
        ("SET local.x = 1", &[set("local.x", "1")]),
        ("SET SESSION local = 1", &[set("local", "1")]),
        ("set  Time  Zone 'UTC'", &[set("timezone", "'UTC'")]),
        ("SET TIME ZONE 'America/New_York'", &[set("timezone", "'America/New_York'")]),
        ("SET TIME ZONE -7", &[set("timezone", "-7")]),
        ("SET TIME ZONE UTC", &[set("timezone", "UTC")]),
        ("SET TIME ZONE LOCAL", &[reset("timezone")]),
        ("SET TIME ZONE DEFAULT", &[reset("timezone")]),
        ("SET SESSION TIME ZONE 'UTC'", &[set("timezone", "'UTC'")]),
        ("SET TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE", &[Unknown]),
        ("SET TIME ZONE", &[Unknown]),
        ("SET timezone = 'UTC'", &[set("timezone", "'UTC'")]),
        ("SET SCHEMA 'app'", &[set("search_path", "'app'")]),
        ("SET NAMES 'UTF8'", &[set("client_encoding", "'UTF8'")]),
        ("SET NAMES DEFAULT", &[reset("client_encoding")]),
        ("SET NAMES", &[reset("client_encoding")]),
        ("SET XML OPTION DOCUMENT", &[set("xmloption", "DOCUMENT")]),
        ("SET x FROM CURRENT", &[Unknown]),
        // Transaction-scoped forms.
        ("SET LOCAL x = 1", &[Tx]),
        ("SET LOCAL search_path TO a", &[Tx]),
        ("set local time zone 'UTC'", &[Tx]),
        ("SET LOCAL ROLE r", &[Tx]),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", &[Tx]),
        ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", &[Tx]),
        ("SET SESSION TRANSACTION READ ONLY", &[Tx]),
        ("SET CONSTRAINTS ALL DEFERRED", &[Tx]),
        ("SET transaction_isolation = 'serializable'", &[Tx]),
        ("SET transaction_read_only TO on", &[Tx]),
        // SESSION CHARACTERISTICS sets the session's defaults.
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            &[set("default_transaction_isolation", "'serializable'")],
        ),
        (
            "set session characteristics as transaction read only, isolation level repeatable read not deferrable",
            &[
                set("default_transaction_isolation", "'repeatable read'"),
                set("default_transaction_read_only", "on"),
                set("default_transaction_deferrable", "off"),
            ],
        ),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED, READ WRITE, DEFERRABLE",
            &[
                set("default_transaction_isolation", "'read committed'"),
                set("default_transaction_read_only", "off"),
                set("default_transaction_deferrable", "on"),
            ],
        ),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ UNCOMMITTED",
            &[set("default_transaction_isolation", "'read uncommitted'")],
        ),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION", &[Unknown]),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SOMETIMES", &[Unknown]),
        ("SET LOCAL SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", &[Tx]),
        // Role and session authorization pin; going back to the login role unpins.
        ("SET ROLE admin", &[Pin(SessionAuthorization)]),
        ("SET ROLE 'admin'", &[Pin(SessionAuthorization)]),
        ("SET SESSION ROLE admin", &[Pin(SessionAuthorization)]),
        ("SET ROLE NONE", &[Unpin(SessionAuthorization)]),
        ("SET ROLE 'none'", &[Unpin(SessionAuthorization)]),
        ("SET ROLE \"none\"", &[Unpin(SessionAuthorization)]),
        ("SET role = 'admin'", &[Pin(SessionAuthorization)]),
        ("SET role TO DEFAULT", &[Unpin(SessionAuthorization)]),
        ("SET role = none", &[Unpin(SessionAuthorization)]),
        ("SET \"Role\" = 'admin'", &[Pin(SessionAuthorization)]),
        ("SET SESSION AUTHORIZATION alice", &[Pin(SessionAuthorization)]),
        ("SET SESSION AUTHORIZATION 'alice'", &[Pin(SessionAuthorization)]),
        ("SET SESSION SESSION AUTHORIZATION alice", &[Pin(SessionAuthorization)]),
        ("SET SESSION AUTHORIZATION DEFAULT", &[Unpin(SessionAuthorization)]),
        ("SET session_authorization = 'alice'", &[Pin(SessionAuthorization)]),
        ("SET ROLE", &[Unknown]),
        // Malformed.
        ("SET", &[Unknown]),
        ("SET x", &[Unknown]),
        ("SET x =", &[Unknown]),
        ("SET x TO", &[Unknown]),
        ("SET 1 = 2", &[Unknown]),
        ("SET x.= 1", &[Unknown]),
        ("SET SESSION", &[Unknown]),
        ("SET SESSION AUTHORIZATION", &[Unknown]),
        ("SET U&\"\\0061\" = 1", &[Unknown]),
        ("SET U&\"a\" = 1", &[set("a", "1")]),
    ]);
}

#[test]
fn reset_and_discard() {
    check_all(&[
        ("RESET work_mem", &[reset("work_mem")]),
        ("reset Search_Path", &[reset("search_path")]),
        ("RESET \"MyApp\".x", &[reset("MyApp.x")]),
        ("RESET myapp.user_id;", &[reset("myapp.user_id")]),
        ("RESET TIME ZONE", &[reset("timezone")]),
        ("RESET time", &[reset("time")]),
        ("RESET ALL", &[ResetAll]),
        ("reset all;", &[ResetAll]),
        ("RESET \"all\"", &[reset("all")]),
        ("RESET ROLE", &[Unpin(SessionAuthorization)]),
        (
            "RESET SESSION AUTHORIZATION",
            &[Unpin(SessionAuthorization)],
        ),
        (
            "RESET session_authorization",
            &[Unpin(SessionAuthorization)],
        ),
        ("RESET TRANSACTION ISOLATION LEVEL", &[Tx]),
        ("RESET transaction_isolation", &[Tx]),
        ("RESET", &[Unknown]),
        ("RESET x y", &[Unknown]),
        ("RESET 'x'", &[Unknown]),
        ("DISCARD ALL", &[DiscardAll]),
        ("discard all;", &[DiscardAll]),
        ("DISCARD TEMP", &[Unpin(TempTable)]),
        ("DISCARD TEMPORARY", &[Unpin(TempTable)]),
    ]);
}

#[test]
fn pins_and_unpins() {
    check_all(&[
        ("LISTEN channel", &[Pin(Listen)]),
        ("LISTEN \"Channel\"", &[Pin(Listen)]),
        ("UNLISTEN *", &[Unpin(Listen)]),
        ("unlisten  * ;", &[Unpin(Listen)]),
        ("SELECT pg_advisory_lock(1)", &[Pin(AdvisoryLock)]),
        ("SELECT PG_ADVISORY_LOCK (1, 2)", &[Pin(AdvisoryLock)]),
        ("SELECT pg_advisory_lock_shared(1)", &[Pin(AdvisoryLock)]),
        ("SELECT pg_try_advisory_lock(1)", &[Pin(AdvisoryLock)]),
        (
            "SELECT pg_try_advisory_lock_shared(1)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "SELECT pg_catalog.pg_advisory_lock(1)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "SELECT \"pg_catalog\".\"pg_advisory_lock\"(1)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "SELECT pg_advisory_lock /* why */ (1)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "SELECT * FROM t WHERE pg_try_advisory_lock(t.id)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "SELECT pg_advisory_lock(1), pg_advisory_lock(2)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "UPDATE t SET a = 1 WHERE pg_try_advisory_lock(id)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "INSERT INTO t VALUES (pg_advisory_lock(1)::text)",
            &[Pin(AdvisoryLock)],
        ),
        ("CALL p(pg_advisory_lock(1))", &[Pin(AdvisoryLock)]),
        ("SELECT pg_advisory_unlock_all()", &[Unpin(AdvisoryLock)]),
        (
            "SELECT pg_advisory_lock(1), pg_advisory_unlock_all()",
            &[Pin(AdvisoryLock), Unpin(AdvisoryLock)],
        ),
        (
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            &[Pin(WithHoldCursor)],
        ),
        (
            "declare c binary insensitive no scroll cursor with hold for select 1",
            &[Pin(WithHoldCursor)],
        ),
        (
            "DECLARE c CURSOR WITH HOLD FOR SELECT pg_advisory_lock(1)",
            &[Pin(WithHoldCursor), Pin(AdvisoryLock)],
        ),
        (
            "DECLARE c CURSOR FOR WITH hold AS (SELECT 1) SELECT * FROM hold",
            &[],
        ),
        ("CLOSE ALL", &[Unpin(WithHoldCursor)]),
        ("PREPARE p AS SELECT 1", &[Pin(SqlPrepare)]),
        (
            "PREPARE p (int, text) AS INSERT INTO t VALUES ($1, $2)",
            &[Pin(SqlPrepare)],
        ),
        (
            "PREPARE p AS SELECT pg_advisory_lock(1)",
            &[Pin(SqlPrepare)],
        ),
        ("PREPARE transaction AS SELECT 1", &[Pin(SqlPrepare)]),
        ("DEALLOCATE ALL", &[Unpin(SqlPrepare)]),
        ("DEALLOCATE PREPARE ALL", &[Unpin(SqlPrepare)]),
        ("deallocate all;", &[Unpin(SqlPrepare)]),
        ("DEALLOCATE \"all\"", &[Unpin(SqlPrepare)]),
        ("DEALLOCATE p", &[Unpin(SqlPrepare)]),
        ("DEALLOCATE PREPARE p", &[Unpin(SqlPrepare)]),
        ("UNLISTEN ch", &[Unpin(Listen)]),
        ("CLOSE c", &[Unpin(WithHoldCursor)]),
        ("SELECT pg_advisory_unlock(1)", &[Unpin(AdvisoryLock)]),
        (
            "SELECT pg_advisory_unlock_shared(1, 2)",
            &[Unpin(AdvisoryLock)],
        ),
        ("DROP TABLE t", &[Unpin(TempTable)]),
        ("drop view if exists v", &[Unpin(TempTable)]),
        ("LOAD 'auto_explain'", &[Pin(Other)]),
        ("SELECT dblink_connect('c', 'dbname=x')", &[Pin(Other)]),
        ("SELECT dblink_connect_u('dbname=x')", &[Pin(Other)]),
        (
            "EXPLAIN ANALYZE SELECT pg_advisory_lock(1)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "EXPLAIN (ANALYZE, BUFFERS) CREATE TEMP TABLE t AS SELECT 1",
            &[Pin(TempTable)],
        ),
        (
            "EXPLAIN ANALYZE VERBOSE SELECT 1 INTO TEMP t",
            &[Pin(TempTable)],
        ),
        ("EXPLAIN EXPLAIN", &[]),
    ]);
}

#[test]
fn temporary_objects() {
    check_all(&[
        ("CREATE TEMP TABLE t (a int)", &[Pin(TempTable)]),
        ("CREATE TEMPORARY TABLE t (a int)", &[Pin(TempTable)]),
        ("create global temporary table t (a int)", &[Pin(TempTable)]),
        ("CREATE LOCAL TEMP TABLE t (a int)", &[Pin(TempTable)]),
        (
            "CREATE TEMP TABLE IF NOT EXISTS t AS SELECT 1",
            &[Pin(TempTable)],
        ),
        ("CREATE TEMP VIEW v AS SELECT 1", &[Pin(TempTable)]),
        (
            "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
            &[Pin(TempTable)],
        ),
        (
            "CREATE TEMP RECURSIVE VIEW v (n) AS SELECT 1",
            &[Pin(TempTable)],
        ),
        ("CREATE TEMP SEQUENCE s", &[Pin(TempTable)]),
        ("CREATE TABLE pg_temp.t (a int)", &[Pin(TempTable)]),
        ("CREATE TABLE \"pg_temp\".t (a int)", &[Pin(TempTable)]),
        (
            "CREATE VIEW v AS SELECT * FROM pg_temp.t",
            &[Pin(TempTable)],
        ),
        ("CREATE TABLE pg_temp_3.t (a int)", &[Pin(TempTable)]),
        ("CREATE TABLE pg_temporary.t (a int)", &[]),
        ("CREATE TABLE \"PG_TEMP\".t (a int)", &[]),
        ("CREATE TABLE temp (a int)", &[]),
        ("CREATE TABLE t (temp int)", &[]),
        ("CREATE TEMP TABLE t (a int) ON COMMIT DROP", &[Tx]),
        ("CREATE TEMP TABLE t ON COMMIT DROP AS SELECT 1", &[Tx]),
        (
            "CREATE TEMP TABLE t (a int) ON COMMIT DELETE ROWS",
            &[Pin(TempTable)],
        ),
        (
            "CREATE TEMP TABLE t (a int) ON COMMIT PRESERVE ROWS",
            &[Pin(TempTable)],
        ),
        (
            "CREATE TEMP TABLE t AS SELECT pg_advisory_lock(1)",
            &[Pin(AdvisoryLock), Pin(TempTable)],
        ),
        ("SELECT 1 INTO TEMP t", &[Pin(TempTable)]),
        ("SELECT * INTO TEMPORARY TABLE t FROM u", &[Pin(TempTable)]),
        ("select * into local temp t from u", &[Pin(TempTable)]),
        ("SELECT * INTO GLOBAL TEMPORARY t FROM u", &[Pin(TempTable)]),
        ("SELECT * INTO TEMP \"T\" FROM u", &[Pin(TempTable)]),
        (
            "WITH x AS (SELECT 1) SELECT * INTO TEMP t FROM x",
            &[Pin(TempTable)],
        ),
        ("(SELECT 1) INTO TEMP t", &[Pin(TempTable)]),
        ("SELECT 1 INTO temp FROM u", &[]),
        ("SELECT 1 INTO temp", &[]),
        ("SELECT 1 INTO temp.t", &[]),
        ("SELECT 1 INTO local FROM u", &[]),
        ("SELECT 'INTO TEMP t'", &[]),
        ("UPDATE t SET a = 1 -- INTO TEMP x\n", &[]),
    ]);
}

#[test]
fn set_config_calls() {
    check_all(&[
        ("select set_config('a.b','1',false)", &[set("a.b", "'1'")]),
        ("SELECT SET_CONFIG('a.b', '1', FALSE)", &[set("a.b", "'1'")]),
        (
            "SELECT pg_catalog.set_config('search_path', '', false)",
            &[set("search_path", "''")],
        ),
        ("SELECT set_config('A.B', '1', false)", &[set("A.B", "'1'")]),
        (
            "SELECT set_config('work_mem', '64MB', 'f')",
            &[set("work_mem", "'64MB'")],
        ),
        (
            "SELECT set_config('work_mem', '64MB', 'false')",
            &[set("work_mem", "'64MB'")],
        ),
        (
            "SELECT set_config('work_mem', '64MB', ' Off ')",
            &[set("work_mem", "'64MB'")],
        ),
        (
            "SELECT set_config('work_mem', '64MB', 'fa')",
            &[set("work_mem", "'64MB'")],
        ),
        (
            "SELECT set_config('work_mem', '64MB', 'no')",
            &[set("work_mem", "'64MB'")],
        ),
        (
            "SELECT set_config('work_mem', '64MB', 0)",
            &[set("work_mem", "'64MB'")],
        ),
        (
            "SELECT set_config('work_mem', '64MB', NULL)",
            &[set("work_mem", "'64MB'")],
        ),
        (
            "SELECT set_config('work_mem', '64MB', $$false$$)",
            &[set("work_mem", "'64MB'")],
        ),
        ("SELECT set_config('work_mem', '64MB', 1)", &[]),
        ("SELECT set_config('work_mem', '64MB', 'on')", &[]),
        ("SELECT set_config('work_mem', '64MB', 'yes')", &[]),
        ("SELECT set_config('work_mem', '64MB', 'o')", &[Unknown]),
        ("SELECT set_config('work_mem', '64MB', 'maybe')", &[Unknown]),
        ("SELECT set_config('work_mem', '64MB', $1)", &[Unknown]),
        (
            "SELECT set_config('work_mem', '64MB', is_local)",
            &[Unknown],
        ),
        (
            "SELECT set_config('work_mem', '64MB', false::boolean)",
            &[Unknown],
        ),
        (
            "SELECT set_config('work_mem', NULL, false)",
            &[reset("work_mem")],
        ),
        (
            "SELECT set_config('application_name', E'a\\'b', false)",
            &[set("application_name", "E'a\\'b'")],
        ),
        (
            "SELECT set_config('application_name', $x$a'b$x$, false)",
            &[set("application_name", "$x$a'b$x$")],
        ),
        (
            "SELECT set_config('my''app.x', '1', false)",
            &[set("my'app.x", "'1'")],
        ),
        (
            "SELECT set_config('my' \n 'app.x', '1', false)",
            &[set("myapp.x", "'1'")],
        ),
        (
            "SELECT set_config($$a.b$$, '1', false)",
            &[set("a.b", "'1'")],
        ),
        (
            "SELECT set_config(E'a.b', '1', false)",
            &[set("a.b", "'1'")],
        ),
        ("SELECT set_config(E'a\\x2eb', '1', false)", &[Unknown]),
        ("SELECT set_config($1, $2, false)", &[Unknown]),
        ("SELECT set_config('a.b', $1, false)", &[Unknown]),
        ("SELECT set_config(name, value, false) FROM t", &[Unknown]),
        ("SELECT set_config('a.b', 'x' || 'y', false)", &[Unknown]),
        ("SELECT set_config('a.b', 1, false)", &[Unknown]),
        ("SELECT set_config('a.b', '1')", &[Unknown]),
        ("SELECT set_config('a.b', '1', false, 1)", &[Unknown]),
        ("SELECT set_config('a.b', lower('X'), false)", &[Unknown]),
        ("SELECT set_config('a.b', lower('X'), true)", &[]),
        ("SELECT set_config", &[]),
        ("SELECT 'set_config(''a'', ''b'', false)'", &[]),
        (
            "SELECT set_config('a.b', '1', false), set_config('c.d', '2', false)",
            &[set("a.b", "'1'"), set("c.d", "'2'")],
        ),
        (
            "SELECT set_config('role', 'admin', false)",
            &[Pin(SessionAuthorization)],
        ),
        (
            "SELECT set_config('role', 'none', false)",
            &[Unpin(SessionAuthorization)],
        ),
        (
            "SELECT set_config('transaction_isolation', 'serializable', false)",
            &[Tx],
        ),
        // List variables are re-spelled so that SET reads them as set_config did.
        (
            "SELECT set_config('search_path', 'a, b', false)",
            &[set("search_path", "a, b")],
        ),
        (
            "SELECT set_config('search_path', 'MySchema,\"My Schema\" , \"$user\",public', false)",
            &[set(
                "search_path",
                "myschema, \"My Schema\", \"$user\", public",
            )],
        ),
        (
            "SELECT set_config('search_path', '$user, user', false)",
            &[set("search_path", "\"$user\", \"user\"")],
        ),
        (
            "SELECT set_config('Search_Path', '\"\"', false)",
            &[set("Search_Path", "''")],
        ),
        (
            "SELECT set_config('search_path', 'a,,b', false)",
            &[Unknown],
        ),
        ("SELECT set_config('search_path', 'a b', false)", &[Unknown]),
        ("SELECT set_config('search_path', '\"a', false)", &[Unknown]),
        (
            "SELECT set_config('search_path', NULL, false)",
            &[reset("search_path")],
        ),
        (
            "SELECT set_config('temp_tablespaces', 'ts1, ts2', false)",
            &[set("temp_tablespaces", "ts1, ts2")],
        ),
        (
            "SELECT set_config('datestyle', 'ISO, MDY', false)",
            &[set("datestyle", "'ISO, MDY'")],
        ),
    ]);
}

#[test]
fn multi_statement_strings() {
    check_all(&[
        (
            "BEGIN; SET LOCAL x = 1; SET y = 2; SELECT pg_advisory_lock(3); COMMIT",
            &[Tx, set("y", "2"), Pin(AdvisoryLock)],
        ),
        ("SET a = 1; SET a = 2;", &[set("a", "1"), set("a", "2")]),
        ("SET a = 1;;; RESET a", &[set("a", "1"), reset("a")]),
        ("LISTEN a; UNLISTEN *; LISTEN b", &[Pin(Listen), Unpin(Listen), Pin(Listen)]),
        ("SELECT 1; SELECT 2; DISCARD ALL", &[DiscardAll]),
        ("DISCARD ALL; SET x = 1", &[DiscardAll, set("x", "1")]),
        ("SET x = 1\n;\nSET y = 2", &[set("x", "1"), set("y", "2")]),
        // A BEGIN ATOMIC body holds its own semicolons.
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; LISTEN x; END; LISTEN y",
            &[Pin(Listen)],
        ),
        (
            "CREATE OR REPLACE PROCEDURE p() BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SET x = 1; END; SET y = 2",
            &[set("y", "2")],
        ),
        // `begin` as a parameter name is not a routine body.
        ("CREATE FUNCTION f(begin int) RETURNS int LANGUAGE sql RETURN begin; LISTEN x", &[Pin(Listen)]),
        ("CREATE TABLE begin (atomic int); LISTEN x", &[Pin(Listen)]),
    ]);
}

#[test]
fn tokens_match_postgres_boundaries() {
    use Kind::*;
    let s = Str(StrMode::Standard);
    assert_eq!(
        tokens("a$b$c $1 $$x$$"),
        [(Ident, "a$b$c"), (Param, "$1"), (Dollar, "$$x$$")]
    );
    assert_eq!(tokens("x'a'"), [(Ident, "x"), (s, "'a'")]);
    assert_eq!(
        tokens("e'a' E'b' ee'c'"),
        [
            (Str(StrMode::Escape), "e'a'"),
            (Str(StrMode::Escape), "E'b'"),
            (Ident, "ee"),
            (s, "'c'")
        ]
    );
    assert_eq!(
        tokens("u&'a' U&\"b\" u & 'c'"),
        [
            (Str(StrMode::Unicode), "u&'a'"),
            (QuotedIdent, "U&\"b\""),
            (Ident, "u"),
            (Punct(b'&'), "&"),
            (s, "'c'")
        ]
    );
    assert_eq!(tokens("'a'\n  'b' 'c'"), [(s, "'a'\n  'b'"), (s, "'c'")]);
    assert_eq!(
        tokens("1.5e3 .5 3"),
        [(Number, "1.5e3"), (Number, ".5"), (Number, "3")]
    );
    assert_eq!(
        tokens("$ab $ab$x$ab$ $ $1a"),
        [
            (Punct(b'$'), "$"),
            (Ident, "ab"),
            (Dollar, "$ab$x$ab$"),
            (Punct(b'$'), "$"),
            (Param, "$1"),
            (Ident, "a")
        ]
    );
    assert_eq!(tokens("$a$ $b$a$"), [(Dollar, "$a$ $b$a$")]);
    assert_eq!(tokens("$$ $a$$"), [(Dollar, "$$ $a$$")]);
    assert_eq!(tokens("*/*x*/-"), [(Punct(b'*'), "*"), (Punct(b'-'), "-")]);
    assert_eq!(tokens("élan ü$1"), [(Ident, "élan"), (Ident, "ü$1")]);
    assert_eq!(tokens("$é$ x $é$"), [(Dollar, "$é$ x $é$")]);
    assert_eq!(tokens("a\x0bb"), [(Ident, "a"), (Ident, "b")]);
}

#[test]
fn literal_and_identifier_contents() {
    use super::lexer::{ident_content, str_content};
    let one = |sql: &str| Lexer::new(sql).next().expect("input holds one token");
    let content = |sql: &str| str_content(sql, one(sql)).map(|c| c.into_owned());
    assert_eq!(content("'it''s'").as_deref(), Some("it's"));
    assert_eq!(content("'a' -- x'\n 'b'").as_deref(), Some("ab"));
    assert_eq!(content("$t$a$$b$t$").as_deref(), Some("a$$b"));
    assert_eq!(content("E'ab'").as_deref(), Some("ab"));
    assert_eq!(content("E'a\\nb'"), None);
    assert_eq!(content("U&'ab'").as_deref(), Some("ab"));
    assert_eq!(content("'abc"), None);
    assert_eq!(content("'abc''"), None);
    assert_eq!(content("$a$abc"), None);
    let ident = |sql: &str| ident_content(sql, one(sql)).map(|c| c.into_owned());
    assert_eq!(ident("FoO").as_deref(), Some("foo"));
    assert_eq!(ident("\"FoO\"").as_deref(), Some("FoO"));
    assert_eq!(ident("\"a\"\"b\"").as_deref(), Some("a\"b"));
    assert_eq!(ident("\"a\"\"").as_deref(), None);
    // Only ASCII letters fold, as in PostgreSQL with a multi-byte encoding.
    assert_eq!(ident("ÉTÉ").as_deref(), Some("ÉtÉ"));
}

#[test]
fn quoting() {
    assert_eq!(quote_literal("UTC"), "'UTC'");
    assert_eq!(quote_literal("it's"), "'it''s'");
    assert_eq!(quote_literal("a\\b"), "'a\\b'");
    assert_eq!(quote_literal(""), "''");
    assert_eq!(quote_literal("a\0b"), "'ab'");
    assert_eq!(quote_ident("search_path"), "search_path");
    assert_eq!(quote_ident("myapp.user_id"), "myapp.user_id");
    assert_eq!(quote_ident("myapp.user"), "myapp.\"user\"");
    assert_eq!(quote_ident("MyApp.x"), "\"MyApp\".x");
    assert_eq!(quote_ident("my app"), "\"my app\"");
    assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    assert_eq!(quote_ident("1abc"), "\"1abc\"");
    assert_eq!(quote_ident("_x1"), "_x1");
    assert_eq!(quote_ident("a$"), "\"a$\"");
    assert_eq!(quote_ident("été"), "\"été\"");
    assert_eq!(quote_ident("select"), "\"select\"");
    assert_eq!(quote_ident("time"), "\"time\"");
    assert_eq!(quote_ident("none"), "\"none\"");
    assert_eq!(quote_ident("role"), "role");
    assert_eq!(quote_ident("local"), "local");
    assert_eq!(quote_ident("x\0y"), "\"xy\"");
    assert_eq!(quote_ident(""), "\"\"");
}

/// What a replayed `SET` reads back as: the effects of `SET <quote_ident(name)> = <value>` are the original ones.
#[test]
fn set_effects_replay_to_themselves() {
    for sql in [
        "SET search_path TO \"A\", b",
        "SET \"MyApp\".\"user\" = 'x'",
        "SET myapp.user_id = 42",
        "set time zone 'UTC'",
        "SET SCHEMA 'app'",
        "SELECT set_config('search_path', 'Foo, \"Bar\"', false)",
        "SELECT set_config('myapp.select', E'it''s', false)",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    ] {
        for effect in session_effects(sql) {
            let Effect::Set {
                name,
                value: Some(value),
            } = &effect
            else {
                panic!("{sql}: {effect:?}");
            };
            let replay = format!("SET {} = {}", quote_ident(name), value);
            assert_eq!(
                session_effects(&replay),
                std::slice::from_ref(&effect),
                "{sql} → {replay}"
            );
        }
    }
}

#[test]
fn unicode_identifiers() {
    check_all(&[
        ("SELECT U&\"pg_advisory_lock\"(42)", &[Pin(AdvisoryLock)]),
        (
            "SELECT u&\"pg\\005fadvisory\\005flock\" (42)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "SELECT U&\"pg\\+00005fadvisory_lock\"(42)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "SELECT U&\"pg!005fadvisory!005flock\" UESCAPE '!' (42)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "SELECT U&\"pg_catalog\".U&\"pg_try_advisory_lock\"(1)",
            &[Pin(AdvisoryLock)],
        ),
        (
            "SELECT U&\"set_config\"('search_path','evil',false)",
            &[set("search_path", "evil")],
        ),
        (
            "SELECT U&\"set\\005fconfig\"('a.b', '1', false)",
            &[set("a.b", "'1'")],
        ),
        ("SELECT U&\"set_config\"('a.b', '1', true)", &[]),
        ("SELECT U&\"set_config\"('a.b', $1, false)", &[Unknown]),
        (
            "CREATE TABLE U&\"pg\\005ftemp\".t (a int)",
            &[Pin(TempTable)],
        ),
        // Names that decode to something uninteresting, or are no call.
        ("SELECT U&\"lower\"('X')", &[]),
        ("SELECT U&\"a\"\"b\"(1)", &[]),
        ("SELECT U&\"pg_advisory_lock\"", &[]),
        ("SELECT U&\"pg_advisory_lock\" UESCAPE", &[]),
        ("SELECT U&\"pg_advisory_lock\"(", &[Pin(AdvisoryLock)]),
        ("SELECT U&\"pg_advisory_lock(1)", &[]),
        ("SELECT * FROM U&\"t\\00e9\"", &[]),
        // Quoted names are case-sensitive: these are other (nonexistent) functions.
        ("SELECT U&\"PG_ADVISORY_LOCK\"(1)", &[]),
        ("SELECT \"PG_ADVISORY_LOCK\"(1)", &[]),
        ("SELECT \"Set_Config\"('a.b', '1', false)", &[]),
        // Names that cannot be decoded might be anything.
        ("SELECT U&\"\\00e9t\\00e9\"(1)", &[Unknown]),
        ("SELECT U&\"bad\\zzzz\"(1)", &[Unknown]),
        ("SELECT U&\"x\\0000\"(1)", &[Unknown]),
        ("SELECT U&\"pg_advisory_lock\" UESCAPE E'!' (1)", &[Unknown]),
        ("SELECT U&\"pg_advisory_lock\" UESCAPE '+' (1)", &[Unknown]),
        (
            "SELECT U&\"a_very_long_function_name_of_forty_bytes\"(1)",
            &[Unknown],
        ),
        ("SELECT U&\"\\00e9\"(1), U&\"\\00e8\"(2)", &[Unknown]),
    ]);
}

#[test]
fn unicode_identifier_decoding() {
    let decode = |sql: &str, esc: u8| {
        let t = Lexer::new(sql).next().expect("input holds one token");
        let mut buf = [0u8; 32];
        lexer::unicode_ident_content(sql, t, esc, &mut buf).map(str::to_owned)
    };
    assert_eq!(decode("U&\"abc\"", b'\\').as_deref(), Some("abc"));
    assert_eq!(decode("U&\"a\\0062c\"", b'\\').as_deref(), Some("abc"));
    assert_eq!(decode("U&\"a\\+000062c\"", b'\\').as_deref(), Some("abc"));
    assert_eq!(decode("U&\"a\\\\b\"", b'\\').as_deref(), Some("a\\b"));
    assert_eq!(decode("U&\"a!!b!0063\"", b'!').as_deref(), Some("a!bc"));
    assert_eq!(decode("U&\"a\\b\"", b'!').as_deref(), Some("a\\b"));
    assert_eq!(decode("U&\"a\"\"b\"", b'\\').as_deref(), Some("a\"b"));
    assert_eq!(decode("U&\"\"", b'\\').as_deref(), Some(""));
    for bad in [
        "U&\"a\\006\"",
        "U&\"a\\+0061\"",
        "U&\"a\\x\"",
        "U&\"\\0000\"",
        "U&\"\\00e9\"",
        "U&\"é\"",
        "U&\"abc",
        "U&\"abc\"\"",
        "U&\"0123456789012345678901234567890123\"",
    ] {
        assert_eq!(decode(bad, b'\\'), None, "{bad}");
    }
}

#[test]
fn writes_to_pg_settings() {
    check_all(&[
        (
            "UPDATE pg_settings SET setting = 'evil' WHERE name = 'search_path'",
            &[Unknown],
        ),
        (
            "update pg_catalog.pg_settings set setting = '1' where name = 'x'",
            &[Unknown],
        ),
        (
            "UPDATE \"pg_settings\" SET setting = '1' WHERE name = 'x'",
            &[Unknown],
        ),
        (
            "UPDATE U&\"pg\\005fsettings\" SET setting = '1' WHERE name = 'x'",
            &[Unknown],
        ),
        (
            "UPDATE U&\"\\00e9\" SET setting = '1' WHERE name = 'x'",
            &[Unknown],
        ),
        (
            "UPDATE ONLY PG_SETTINGS AS s SET setting = '1' WHERE s.name = 'x'",
            &[Unknown],
        ),
        (
            "INSERT INTO pg_settings (name, setting) VALUES ('a', 'b')",
            &[Unknown],
        ),
        (
            "MERGE INTO pg_settings s USING (VALUES ('search_path', 'evil')) v (n, x) ON s.name = v.n \
             WHEN MATCHED THEN UPDATE SET setting = v.x",
            &[Unknown],
        ),
        (
            "WITH u AS (UPDATE pg_settings SET setting = 'x' WHERE name = 'y' RETURNING *) SELECT * FROM u",
            &[Unknown],
        ),
        (
            "EXPLAIN ANALYZE UPDATE pg_settings SET setting = 'x' WHERE name = 'y'",
            &[Unknown],
        ),
        (
            "COPY (UPDATE pg_settings SET setting = 'x' WHERE name = 'y' RETURNING 1) TO STDOUT",
            &[Unknown],
        ),
        (
            "UPDATE pg_settings SET setting = set_config('a.b', '1', false) WHERE name = 'x'",
            &[Unknown, set("a.b", "'1'")],
        ),
        (
            "UPDATE pg_settings SET setting = '1' WHERE name = 'x'; UPDATE pg_settings SET setting = '2' WHERE name = 'y'",
            &[Unknown, Unknown],
        ),
        // Reading pg_settings, or writing elsewhere, is harmless.
        ("SELECT * FROM pg_settings", &[]),
        ("SELECT setting FROM pg_catalog.pg_settings WHERE name = 'x'", &[]),
        ("SELECT * FROM pg_settings FOR UPDATE", &[]),
        ("SELECT * FROM pg_settings FOR NO KEY UPDATE", &[]),
        ("UPDATE t SET a = 'pg_settings'", &[]),
        ("UPDATE \"PG_SETTINGS\" SET a = 1", &[]),
        ("UPDATE t SET a = 1 -- pg_settings\n", &[]),
    ]);
}

/// Variables that change how later statements lex are ordinary session `Set`s (the caller pins on them); set for the
/// transaction only they still hide what follows in it, so they are unknown.
#[test]
fn lexing_variables() {
    check_all(&[
        (
            "SET standard_conforming_strings = off",
            &[set("standard_conforming_strings", "off")],
        ),
        (
            "SET standard_conforming_strings TO 'on'",
            &[set("standard_conforming_strings", "'on'")],
        ),
        (
            "SET SESSION standard_conforming_strings = off",
            &[set("standard_conforming_strings", "off")],
        ),
        (
            "SET Standard_Conforming_Strings = off",
            &[set("standard_conforming_strings", "off")],
        ),
        (
            "RESET standard_conforming_strings",
            &[reset("standard_conforming_strings")],
        ),
        (
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            &[set("standard_conforming_strings", "'off'")],
        ),
        (
            "SET client_encoding = 'LATIN1'",
            &[set("client_encoding", "'LATIN1'")],
        ),
        (
            "SET client_encoding TO DEFAULT",
            &[reset("client_encoding")],
        ),
        ("SET NAMES 'SJIS'", &[set("client_encoding", "'SJIS'")]),
        ("SET NAMES DEFAULT", &[reset("client_encoding")]),
        ("RESET client_encoding", &[reset("client_encoding")]),
        (
            "SELECT set_config('client_encoding', 'SJIS', false)",
            &[set("client_encoding", "'SJIS'")],
        ),
        ("SET LOCAL standard_conforming_strings = off", &[Unknown]),
        ("SET LOCAL \"Client_Encoding\" = 'SJIS'", &[Unknown]),
        ("SET LOCAL U&\"client\\005fencoding\" = 'SJIS'", &[Unknown]),
        ("SET LOCAL U&\"\\00e9\" = 'SJIS'", &[Unknown]),
        ("SET LOCAL NAMES 'SJIS'", &[Unknown]),
        ("SET LOCAL work_mem = '1MB'", &[Tx]),
        ("SET LOCAL \"names\" = 1", &[Tx]),
        (
            "SELECT set_config('standard_conforming_strings', 'off', true)",
            &[Unknown],
        ),
        (
            "SELECT set_config($$CLIENT_ENCODING$$, 'SJIS', true)",
            &[Unknown],
        ),
        (
            "SELECT set_config('client_' \n 'encoding', 'SJIS', true)",
            &[Unknown],
        ),
        (
            "SELECT set_config(U&'client\\005fencoding', 'SJIS', true)",
            &[Unknown],
        ),
        ("SELECT set_config('work_mem', '1MB', true)", &[]),
        ("SELECT set_config('request.jwt.claims', $1, true)", &[]),
    ]);
}

/// Inputs built to make a scanner revisit text: every one must take time linear in its length.
#[test]
fn adversarial_inputs_take_linear_time() {
    const MB: usize = 1 << 20;
    fn repeat(head: &str, unit: &str, tail: &str) -> String {
        let mut s = String::with_capacity(MB + 64);
        s.push_str(head);
        while s.len() + unit.len() <= MB {
            s.push_str(unit);
        }
        s.push_str(tail);
        s
    }
    let tag = "a".repeat(MB / 2);
    let inputs = [
        repeat("SELECT ", "set_config(", ""),
        repeat("SELECT ", "set_config (", ")"),
        repeat("SELECT ", "pg_catalog.set_config(1,", ""),
        repeat("SELECT ", "set_config('a','b',false),", "1"),
        repeat("SELECT ", "set_config('a','b',true),", "1"),
        repeat("SELECT ", "pg_advisory_lock(", ""),
        repeat("SELECT ", "U&\"set_config\"(", ""),
        repeat("SELECT ", "U&\"x\" UESCAPE '!' (", ""),
        repeat("SELECT ", "U&\"\\00e9\"(", ""),
        repeat("SELECT ", "(", ""),
        repeat("SELECT set_config", "(", ""),
        repeat("EXPLAIN ", "(", ""),
        repeat("EXPLAIN ", "EXPLAIN ", ""),
        repeat("", ";", ""),
        repeat("", "SELECT 1 INTO TEMP t;", ""),
        repeat("SELECT ", "into ", ""),
        repeat("UPDATE ", "pg_settings ", ""),
        repeat("INSERT INTO t SELECT ", "pg_settings, ", "1"),
        repeat("SET ", "a.", "b = 1"),
        repeat("SET LOCAL ", "a.", "b = 1"),
        repeat("RESET ", "a.", "b"),
        repeat("DECLARE c ", "with ", ""),
        repeat("CREATE FUNCTION f() BEGIN ATOMIC ", "CASE ", ""),
        repeat("CREATE TABLE ", "pg_temp.", "t"),
        repeat(
            "SET SESSION CHARACTERISTICS AS TRANSACTION ",
            "READ ONLY, ",
            "READ WRITE",
        ),
        repeat("SELECT ", "/*", ""),
        repeat("SELECT ", "'a'\n", ""),
        repeat("SELECT ", "E'\\'", ""),
        repeat("SELECT ", "$a", ""),
        format!("SELECT ${tag}$ {}", "$".repeat(MB / 2)),
        format!("SELECT ${tag}$ {}", format!("${}", &tag[1..]).repeat(2)),
    ];
    let limit = if cfg!(debug_assertions) { 60.0 } else { 2.0 };
    for sql in &inputs {
        let start = std::time::Instant::now();
        let effects = session_effects(sql);
        assert_eq!(has_session_effects(sql), !effects.is_empty());
        let elapsed = start.elapsed().as_secs_f64();
        assert!(
            elapsed < limit,
            "{elapsed:.2} s for {:?}…",
            &sql[..sql.len().min(40)]
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_strings_never_panic(sql in any::<String>()) {
        let effects = session_effects(&sql);
        prop_assert_eq!(has_session_effects(&sql), !effects.is_empty());
        prop_assert!(!effects.contains(&Effect::None));
        let _ = quote_literal(&sql);
        let _ = quote_ident(&sql);
    }

    /// Strings built from the pieces the lexer cares about, to reach its corners far more often than random text.
    #[test]
    fn sql_like_strings_never_panic(parts in prop::collection::vec(prop::sample::select(vec![
        "'", "''", "E'", "e'", "U&'", "U&\"", "\"", "\"\"", "$", "$$", "$a$", "$1", "a$", "--", "/*", "*/", "\\",
        "\n", " ", ";", "(", ")", ",", ".", "=", "*", "SET", "set", "LOCAL", "SESSION", "TIME", "ZONE", "TO",
        "DEFAULT", "RESET", "ALL", "LISTEN", "UNLISTEN", "SELECT", "INTO", "TEMP", "CREATE", "TABLE", "FUNCTION",
        "BEGIN", "ATOMIC", "CASE", "END", "ON", "COMMIT", "DROP", "pg_temp", "set_config", "pg_advisory_lock",
        "false", "NULL", "x", "1", "é", "EXPLAIN", "ROLE", "NONE", "DECLARE", "WITH", "HOLD", "FOR",
    ]), 0..40)) {
        let sql = parts.join("");
        let effects = session_effects(&sql);
        prop_assert_eq!(has_session_effects(&sql), !effects.is_empty());
        let spaced = parts.join(" ");
        let effects = session_effects(&spaced);
        prop_assert_eq!(has_session_effects(&spaced), !effects.is_empty());
    }

    /// The session reads "cannot change session state" off the facts cached for a fingerprint, which the prefilter
    /// found for the first text with it: any text with the same fingerprint (other literals, spacing, comments,
    /// keyword case) must then have no effect either.
    #[test]
    fn texts_sharing_a_fingerprint_share_the_prefilter_verdict(
        parts in prop::collection::vec((0usize..WORDS.len(), 0usize..LITERALS.len(), 0usize..LITERALS.len(), any::<bool>(), 0usize..SEPARATORS.len()), 0..30)
    ) {
        let (mut a, mut b) = (String::new(), String::new());
        for (word, lit_a, lit_b, is_literal, sep) in parts {
            if is_literal {
                a.push_str(LITERALS[lit_a]);
                b.push_str(LITERALS[lit_b]);
            } else {
                a.push_str(WORDS[word]);
                b.push_str(&WORDS[word].to_uppercase());
            }
            a.push(' ');
            b.push_str(SEPARATORS[sep]);
        }
        if fingerprint(&a, usize::MAX) == fingerprint(&b, usize::MAX) && !super::may_have_effects(a.as_bytes()) {
            prop_assert!(session_effects(&b).is_empty(), "{a} / {b}");
        }
    }

    /// The word-at-a-time scan gives the shape a byte-at-a-time scan gives, on texts of names, numbers,
    /// punctuation and bytes that end a shape, at every offset of the eight-byte words.
    #[test]
    fn shapes_match_a_bytewise_scan(sql in "[a-zA-Z_ 0-9=,.;()'$/*\\\\-]{0,40}|[a-z_ ]{0,20}[0-9é\n\t{\"]{0,3}[a-z_ 0-9]{0,30}") {
        let mut fast = Vec::new();
        let got = number_shape(sql.as_bytes(), &mut fast).then_some(fast);
        prop_assert_eq!(got, bytewise_shape(sql.as_bytes()), "{:?}", sql);
    }

    /// Texts with the same shape are the same statement but for number values: the same fingerprint (the
    /// classifier gives a shape the facts cached for an earlier text with it).
    #[test]
    fn texts_sharing_a_shape_share_the_fingerprint(
        parts in prop::collection::vec((prop::sample::select(SHAPE_PIECES.to_vec()), any::<u32>()), 0..30)
    ) {
        let a: String = parts.iter().map(|(p, _)| *p).collect();
        let b = with_other_digits(&parts);
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        if number_shape(a.as_bytes(), &mut sa) && number_shape(b.as_bytes(), &mut sb) && sa == sb {
            prop_assert_eq!(fingerprint(&a, usize::MAX), fingerprint(&b, usize::MAX), "{} / {}", a, b);
        }
    }

    /// A text matches a shape exactly when it has that shape, and texts of one shape share their prefix key: on
    /// texts made of the same pieces with other digits (most of them share the shape) and of other pieces (most
    /// do not).
    #[test]
    fn matching_a_shape_is_having_it(
        parts in prop::collection::vec((prop::sample::select(plain_pieces()), any::<u32>()), 0..30),
        other in prop::collection::vec(prop::sample::select(SHAPE_PIECES.to_vec()), 0..30),
        edit in (any::<prop::sample::Index>(), prop::sample::select(b"019 a_;\x01-'".to_vec()), 0..3u8),
    ) {
        let a: String = parts.iter().map(|(p, _)| *p).collect();
        let b = with_other_digits(&parts);
        let c: String = other.concat();
        // `b` with one byte replaced, inserted or removed.
        let mut d = b.clone().into_bytes();
        let (at, byte, how) = edit;
        match how {
            0 if !d.is_empty() => {
                let i = at.index(d.len());
                d[i] = byte;
            }
            1 => {
                let i = at.index(d.len() + 1);
                d.insert(i, byte);
            }
            _ if !d.is_empty() => {
                let i = at.index(d.len());
                d.remove(i);
            }
            _ => {}
        }
        let d = String::from_utf8_lossy(&d).into_owned();
        let mut sa = Vec::new();
        if number_shape(a.as_bytes(), &mut sa) {
            prop_assert!(ShapeMatcher::new(&sa).matches(a.as_bytes()), "{:?}", a);
            for t in [&b, &c, &d] {
                let mut st = Vec::new();
                let same = number_shape(t.as_bytes(), &mut st) && st == sa;
                prop_assert_eq!(ShapeMatcher::new(&sa).matches(t.as_bytes()), same, "{:?} / {:?}", a, t);
                if same {
                    prop_assert_eq!(shape_prefix_key(t.as_bytes()), shape_prefix_key(a.as_bytes()), "{:?} / {:?}", a, t);
                }
            }
        }
    }

    /// Token ranges tile the input exactly, apart from whitespace and comments, and fall on character boundaries.
    #[test]
    fn tokens_cover_the_input_in_order(sql in any::<String>()) {
        let mut last = 0;
        for t in Lexer::new(&sql) {
            prop_assert!(t.start >= last && t.end > t.start && t.end <= sql.len());
            prop_assert!(sql.is_char_boundary(t.start) && sql.is_char_boundary(t.end));
            last = t.end;
        }
    }
}

/// Whole non-literal tokens for [`texts_sharing_a_fingerprint_share_the_prefilter_verdict`].
const WORDS: &[&str] = &[
    ";",
    "(",
    ")",
    ",",
    ".",
    "=",
    "*",
    "SET",
    "LOCAL",
    "SESSION",
    "TIME",
    "ZONE",
    "TO",
    "DEFAULT",
    "RESET",
    "ALL",
    "LISTEN",
    "UNLISTEN",
    "SELECT",
    "INTO",
    "TEMP",
    "CREATE",
    "TABLE",
    "FUNCTION",
    "BEGIN",
    "ATOMIC",
    "CASE",
    "END",
    "ON",
    "COMMIT",
    "DROP",
    "pg_temp",
    "set_config",
    "pg_advisory_lock",
    "false",
    "NULL",
    "x",
    "EXPLAIN",
    "ROLE",
    "DECLARE",
    "WITH",
    "HOLD",
    "FOR",
    "update",
    "t",
    "where",
    "offset",
    "DISCARD",
    "PREPARE",
    "DEALLOCATE",
    "LOAD",
    "U&\"\\0073et_config\"",
    "pg_settings",
    "dblink_connect",
    "CLOSE",
];
/// Literals, some holding trigger words, for the same test.
const LITERALS: &[&str] = &[
    "'a'",
    "'set x = 1'",
    "'set_config'",
    "42",
    "1.5e3",
    "$$ listen x $$",
    "$1",
    "E'temp'",
    "U&'advisory'",
    "$q$ pg_settings $q$",
];
/// What separates tokens in the second text of that test.
const SEPARATORS: &[&str] = &[" ", "\n", "\t", " /* set */ ", " -- reset\n", "\r\n"];

/// The byte-level prefilter lets common DML through without a lex: first keywords count only where a statement can
/// start, and column names that merely contain a trigger word do not count.
#[test]
fn prefilter_passes_plain_dml() {
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;",
        "UPDATE pgbench_accounts SET abalance = abalance + -12 WHERE aid = 4711;",
        "UPDATE pgbench_tellers SET tbalance = tbalance + 3 WHERE tid = 7;",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP);",
        "SELECT id, created_at, closed_at, loaded FROM orders WHERE status = $1 OFFSET 10",
        "BEGIN;",
        "END;",
    ] {
        assert!(!super::may_have_effects(sql.as_bytes()), "{sql}");
    }
    for sql in [
        "SET x = 1",
        "select 1;set x = 1",
        "select 1; \t RESET x",
        "select 1 -- c\nset x = 1",
        "/* c */SET x = 1",
        "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
        "UPDATE t SET a = set_config('x', 'y', false)",
        "UPDATE pg_catalog.pg_settings SET setting = 1",
        "SELECT 1 INTO TEMP t",
    ] {
        assert!(super::may_have_effects(sql.as_bytes()), "{sql}");
    }
}

#[test]
fn number_shapes_mask_numbers_and_nothing_else() {
    let shape = |sql: &str| {
        let mut out = Vec::new();
        number_shape(sql.as_bytes(), &mut out).then_some(out)
    };
    let a = shape("SELECT abalance FROM pgbench_accounts WHERE aid = 17;")
        .expect("a query with a number has a number shape");
    assert_eq!(
        a,
        shape("SELECT abalance FROM pgbench_accounts WHERE aid = 424242;")
            .expect("a query with a number has a number shape")
    );
    assert_eq!(
        a,
        b"SELECT abalance FROM pgbench_accounts WHERE aid = \x01;"
    );
    assert_eq!(
        shape("SELECT 1.5, -2, a/3").expect("a query with numbers has a number shape"),
        b"SELECT \x01.\x01, -\x01, a/\x01"
    );
    // Digits in names are names.
    assert_ne!(shape("SELECT * FROM t1"), shape("SELECT * FROM t2"));
    assert_ne!(shape("SELECT a.b1 FROM t"), shape("SELECT a.b2 FROM t"));
    // Not plain: quotes, dollars, comments, backslashes, other bytes, numbers that run into letters.
    for sql in [
        "SELECT 'a1'",
        "SELECT \"1\"",
        "SELECT $1",
        "SELECT $$1$$",
        "SELECT 1 -- 2",
        "SELECT 1 /* 2 */",
        "SELECT E\\1",
        "SELECT 1\0",
        "SELECT é1",
        "SELECT 1e5",
        "SELECT 0x1F",
        "SELECT 1_000",
        "SELECT 12abc",
        "SELECT {1}",
    ] {
        assert_eq!(shape(sql), None, "{sql}");
    }
}

/// [`number_shape`] one byte at a time, as first written: the reference of its faster scan.
fn bytewise_shape(sql: &[u8]) -> Option<Vec<u8>> {
    let ident_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let other = |b: u8| b" \t\n\r,.()[];:=<>+*%^|&!~@#?".contains(&b);
    let mut out = Vec::new();
    let mut ident = false;
    let mut i = 0;
    while i < sql.len() {
        let b = sql[i];
        if b.is_ascii_digit() && !ident {
            out.push(1);
            while sql.get(i + 1).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if sql
                .get(i + 1)
                .is_some_and(|&n| ident_byte(n) && !n.is_ascii_digit())
            {
                return None;
            }
        } else if ident_byte(b) || other(b) {
            out.push(b);
            ident = ident_byte(b);
        } else if b == b'-' || b == b'/' {
            let second = if b == b'-' { b'-' } else { b'*' };
            if sql.get(i + 1) == Some(&second) {
                return None;
            }
            out.push(b);
            ident = false;
        } else {
            return None;
        }
        i += 1;
    }
    Some(out)
}

/// Pieces of texts for the shape tests: names, numbers, punctuation, and bytes that make a text not plain.
const SHAPE_PIECES: &[&str] = &[
    "SELECT",
    "t1",
    "x",
    "e",
    "E",
    "_",
    "abc",
    "0",
    "1",
    "23",
    "007",
    "0x",
    "1e",
    ".",
    ",",
    "(",
    ")",
    "=",
    "-",
    "/",
    "*",
    "+",
    " ",
    "\n",
    ";",
    "::",
    "[",
    "]",
    "<>",
    "'",
    "$",
    "$1",
    "--",
    "/*",
    "\"",
    "é",
    "abcdefghijklmnopqrstuvwxyz",
];

/// The pieces of [`SHAPE_PIECES`] that have a shape on their own (most texts made of them have one).
fn plain_pieces() -> Vec<&'static str> {
    SHAPE_PIECES
        .iter()
        .copied()
        .filter(|p| number_shape(p.as_bytes(), &mut Vec::new()))
        .collect()
}

/// The text of `parts` with every digit replaced (and some digits doubled), by the number that goes with each part.
fn with_other_digits(parts: &[(&str, u32)]) -> String {
    parts
        .iter()
        .map(|(p, r)| {
            p.chars()
                .enumerate()
                .map(|(i, c)| match c.to_digit(10) {
                    Some(_) => {
                        let d = char::from_digit((r >> (i % 16)) % 10, 10).unwrap_or('0');
                        if (r >> 20) % 3 == 0 {
                            format!("{d}9")
                        } else {
                            d.to_string()
                        }
                    }
                    None => c.to_string(),
                })
                .collect::<String>()
        })
        .collect()
}

#[test]
fn texts_match_the_shapes_they_have() {
    let shape = |sql: &str| {
        let mut out = Vec::new();
        number_shape(sql.as_bytes(), &mut out).then_some(out)
    };
    let pgbench =
        shape("SELECT abalance FROM pgbench_accounts WHERE aid = 17;").unwrap_or_default();
    for (sql, matches) in [
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 17;",
            true,
        ),
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 4242424242424242;",
            true,
        ),
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 1;", true),
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 17",
            false,
        ),
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 17; ",
            false,
        ),
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 17x;",
            false,
        ),
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = '17';",
            false,
        ),
        ("SELECT abalance FROM pgbench_accounts WHERE aid = ;", false),
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1.7;",
            false,
        ),
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = \x01;",
            false,
        ),
        (
            "select abalance FROM pgbench_accounts WHERE aid = 17;",
            false,
        ),
        ("", false),
    ] {
        assert_eq!(
            ShapeMatcher::new(&pgbench).matches(sql.as_bytes()),
            matches,
            "{sql}"
        );
    }
    // Digits in names are names; short texts.
    let t1 = shape("SELECT * FROM t1 LIMIT 5").unwrap_or_default();
    let t1 = ShapeMatcher::new(&t1);
    assert!(t1.matches(b"SELECT * FROM t1 LIMIT 500"));
    assert!(!t1.matches(b"SELECT * FROM t2 LIMIT 5"));
    assert!(!t1.matches(b"SELECT * FROM t12 LIMIT 5"));
    assert!(ShapeMatcher::new(b"").matches(b""));
    assert!(ShapeMatcher::new(&[1]).matches(b"7"));
    assert!(ShapeMatcher::new(&[1]).matches(b"0123456789012345678"));
    assert!(!ShapeMatcher::new(&[1]).matches(b"0123456789012345678 "));
    assert!(!ShapeMatcher::new(&[1]).matches(b"\x01"));
    assert!(!ShapeMatcher::new(b"").matches(b"7"));
    // The prefix key: the bytes before the first digit (at most 32).
    let key = |s: &str| shape_prefix_key(s.as_bytes());
    assert_eq!(key("SELECT 1"), key("SELECT 22"));
    assert_ne!(key("SELECT 1"), key("SELECT  1"));
    assert_eq!(key("BEGIN;"), key("BEGIN;"));
    assert_ne!(key("BEGIN;"), key("BEGIN"));
    assert_eq!(
        key("SELECT abalance FROM pgbench_accounts WHERE aid = 1;"),
        key("SELECT abalance FROM pgbench_accounts WHERE bid = 2;")
    );
    assert_ne!(
        key("SELECT abalance FROM pgbench_accounts WHERE aid = 1;"),
        key("SELECT abalance FROM pgbench_tellers WHERE tid = 2;")
    );
}
