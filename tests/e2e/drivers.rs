//! Real drivers against transaction pooling: asyncpg, psycopg 3, node-postgres and pgjdbc each run a check
//! program of `tests/drivers` (several clients at once on a pool of two server connections: named prepared
//! statements across transactions, the driver's batching or pipelining, transactions, an error inside one, a
//! query cancelled by the driver, per-client settings; each client checks that every row it gets is its own).
//! Each runs twice: with pgweir's default server-side statement cache, and with one of two statements per server
//! connection, so that statements are evicted and prepared again under the drivers' feet.
//!
//! `.ci/run` installs the drivers and sets `PGWEIR_DRIVERS=required`: there a missing driver fails its test.
//! Elsewhere a test whose driver is not installed says so on stderr and passes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const CLIENTS: usize = 6;
const ROUNDS: usize = 40;

/// Server-side statement caches: pgweir's default, and one so small that the drivers' statements are evicted
/// (Closed on the server) and prepared again all the time.
const STATEMENT_CACHES: [Option<usize>; 2] = [None, Some(2)];

/// Tenant `tx` (transaction pooling, two server connections, `max_prepared_statements` when given) is the
/// default: the drivers connect with a plain host/port/user/password/database.
fn drivers_env(max_prepared: Option<usize>) -> Env {
    let cache = max_prepared.map_or(String::new(), |n| {
        format!("max_prepared_statements = {n}\n")
    });
    let env = Env::with(Setup {
        pool: format!("max_size = 2\n{cache}checkout_timeout = \"30s\"\nconnect_timeout = \"3s\""),
        proxy: "default_tenant = \"tx\"".into(),
        extra_config: acme_tenant(
            "tx",
            "pool_mode = \"transaction\"",
            &[user_toml("alice", ALICE_PASSWORD, false)],
        ),
        ..Setup::default()
    });
    psql_ok(
        &env.alice(),
        "CREATE TABLE IF NOT EXISTS drv_items(driver text, client int, n int)",
    );
    env
}

/// Runs the check program that `cmd` makes once per statement cache of [`STATEMENT_CACHES`], each on a fresh
/// backend, and counts the rows each client of `driver` wrote (`per_client`).
fn check_driver(driver: &str, per_client: usize, cmd: impl Fn() -> Command) {
    for cache in STATEMENT_CACHES {
        let env = drivers_env(cache);
        eprintln!("{driver}, max_prepared_statements {cache:?}:");
        run_check(&env, cmd());
        assert_eq!(
            rows_per_client(&env, driver),
            expected_rows(per_client),
            "{driver}, max_prepared_statements {cache:?}"
        );
    }
}

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Whether `program args` runs and succeeds (a driver or tool is there).
fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// False (and a note on stderr) when the driver is missing and not required; a panic when it is required.
fn available(driver: &str, present: bool, install: &str) -> bool {
    if present {
        return true;
    }
    if std::env::var("PGWEIR_DRIVERS").as_deref() == Ok("required") {
        panic!("driver {driver} is not installed ({install}; .ci/run does)");
    }
    eprintln!("SKIPPED: driver {driver} is not installed ({install}; .ci/run does)");
    false
}

/// Runs a check program with the connection arguments; it must print `ok ...` and succeed within two minutes.
fn run_check(env: &Env, mut cmd: Command) -> String {
    cmd.args([
        "127.0.0.1".to_string(),
        env.addr.port().to_string(),
        "alice".into(),
        ALICE_PASSWORD.into(),
        "app".into(),
        CLIENTS.to_string(),
        ROUNDS.to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the check program");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child
        .try_wait()
        .expect("wait for the check program")
        .is_none()
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "the check program did not finish within 2 minutes:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("collect output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.starts_with("ok "),
        "check program failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", stdout.trim());
    stdout
}

/// Rows each client of `driver` wrote, as seen on the backend through a session-mode login.
fn rows_per_client(env: &Env, driver: &str) -> Vec<String> {
    let out = psql_ok(
        &env.alice(),
        &format!(
            "SELECT client || ':' || count(*) FROM drv_items WHERE driver = '{driver}' GROUP BY client ORDER BY client"
        ),
    );
    out.lines().map(str::to_owned).collect()
}

fn expected_rows(per_client: usize) -> Vec<String> {
    (0..CLIENTS).map(|i| format!("{i}:{per_client}")).collect()
}

#[test]
fn asyncpg_named_statements_and_batches_in_transaction_mode() {
    if !available(
        "asyncpg",
        works("python3", &["-c", "import asyncpg"]),
        "pip install asyncpg",
    ) {
        return;
    }
    check_driver("asyncpg", ROUNDS + 30, || {
        let mut cmd = Command::new("python3");
        cmd.arg(drivers_dir().join("asyncpg_check.py"));
        cmd
    });
}

#[test]
fn psycopg_prepared_statements_and_pipeline_in_transaction_mode() {
    if !available(
        "psycopg",
        works("python3", &["-c", "import psycopg"]),
        "pip install 'psycopg[binary]'",
    ) {
        return;
    }
    check_driver("psycopg", ROUNDS + 30, || {
        let mut cmd = Command::new("python3");
        cmd.arg(drivers_dir().join("psycopg_check.py"));
        cmd
    });
}

#[test]
fn node_postgres_named_statements_in_transaction_mode() {
    let dir = drivers_dir();
    if !available(
        "node-postgres",
        works("node", &["--version"]) && dir.join("node_modules/pg").is_dir(),
        "npm install in tests/drivers",
    ) {
        return;
    }
    check_driver("node-pg", ROUNDS, || {
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("pg_check.js")).current_dir(&dir);
        cmd
    });
}

/// The pgjdbc jar: `PGWEIR_JDBC_JAR`, or Debian's libpostgresql-jdbc-java.
fn jdbc_jar() -> Option<PathBuf> {
    std::env::var_os("PGWEIR_JDBC_JAR")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/share/java/postgresql.jar")))
        .filter(|p| p.is_file())
}

#[test]
fn pgjdbc_server_prepared_statements_and_batches_in_transaction_mode() {
    let jar = jdbc_jar();
    if !available(
        "pgjdbc",
        jar.is_some() && works("javac", &["-version"]) && works("java", &["-version"]),
        "apt-get install libpostgresql-jdbc-java and a JDK",
    ) {
        return;
    }
    let jar = jar.expect("checked above");
    let classes = tempfile::tempdir().expect("temp dir");
    let javac = Command::new("javac")
        .arg("-cp")
        .arg(&jar)
        .arg("-d")
        .arg(classes.path())
        .arg(drivers_dir().join("JdbcCheck.java"))
        .output()
        .expect("run javac");
    assert!(
        javac.status.success(),
        "javac failed: {}",
        String::from_utf8_lossy(&javac.stderr)
    );
    check_driver("jdbc", ROUNDS + 30, || {
        let mut cmd = Command::new("java");
        cmd.arg("-cp")
            .arg(format!("{}:{}", jar.display(), classes.path().display()))
            .arg("JdbcCheck");
        cmd
    });
}
