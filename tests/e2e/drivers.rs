//! Real drivers against transaction pooling: asyncpg, psycopg 3, node-postgres and pgjdbc each run a check
//! program of `tests/drivers`: six clients at once on a pool of two server connections, with named prepared
//! statements across transactions (one name and text in every client resolved through each client's own
//! search_path; node-postgres: one name with a different text in each client), transactions, an error inside one
//! (its insert rolled back), per-client settings, and except for node-postgres (whose `pg` package alone has none
//! of these) the driver's batching or pipelining, COPY FROM STDIN, a cursor read a few rows at a time and a query
//! cancelled by the driver (it must end at once). Each client checks that every row it gets is its own; the test
//! then counts and sums the rows each client wrote. Each runs twice: with pgweir's default server-side statement
//! cache, and with two statements per server connection, so that statements are evicted and prepared again under
//! the drivers' feet (the programs check that no server connection holds more).
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
    let mut setup = String::from("CREATE TABLE drv_items(driver text, client int, n int);");
    // Schema s<i> holds a table `who` with the value i: client i puts s<i> first in its search_path.
    for i in 0..CLIENTS {
        setup.push_str(&format!(
            "CREATE SCHEMA s{i}; CREATE TABLE s{i}.who(v int); INSERT INTO s{i}.who VALUES ({i});"
        ));
    }
    psql_ok(&env.alice(), &setup);
    env
}

/// Runs the check program that `cmd` makes once per statement cache of [`STATEMENT_CACHES`], each on a fresh
/// backend, and checks the rows each client of `driver` wrote: `rows` rows of each round (n = the round) and
/// `extra` more (a batch of 20, n = 10000.., and COPY of 10, n = 20000..). With a small cache the program also
/// checks that no server connection holds more statements than the cache, or than `per_transaction` (the most
/// named statements one transaction of the program uses) if that is more (`PGWEIR_CHECK_MAX_PREPARED`).
fn check_driver(driver: &str, extra: bool, per_transaction: usize, cmd: impl Fn() -> Command) {
    for cache in STATEMENT_CACHES {
        let env = drivers_env(cache);
        eprintln!("{driver}, max_prepared_statements {cache:?}:");
        let mut c = cmd();
        if let Some(n) = cache {
            // A transaction keeps every statement it uses on its server connection, over the cache's size if it
            // needs more; the surplus is closed at that connection's next prepare.
            c.env(
                "PGWEIR_CHECK_MAX_PREPARED",
                n.max(per_transaction).to_string(),
            );
        }
        let out = run_check(&env, c);
        // Every client ran on the pool's server connections: two at most (one if the clients never overlapped).
        let servers: usize = out
            .trim()
            .rsplit_once("servers=")
            .and_then(|(_, n)| n.parse().ok())
            .unwrap_or_else(|| panic!("no servers=N in {out:?}"));
        assert!(
            (1..=2).contains(&servers),
            "{driver}: {servers} server connections"
        );
        assert_eq!(
            rows_per_client(&env, driver),
            expected_rows(extra),
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
/// Its output goes to files (a pipe nobody reads while it runs could fill and stall it).
fn run_check(env: &Env, mut cmd: Command) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.args([
        "127.0.0.1".to_string(),
        env.addr.port().to_string(),
        "alice".into(),
        ALICE_PASSWORD.into(),
        "app".into(),
        CLIENTS.to_string(),
        ROUNDS.to_string(),
    ])
    .stdout(std::fs::File::create(&out_path).expect("stdout file"))
    .stderr(std::fs::File::create(&err_path).expect("stderr file"));
    let mut child = cmd.spawn().expect("start the check program");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the check program") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let Some(status) = status else {
        panic!("the check program did not finish within 2 minutes:\n{stdout}\n{stderr}");
    };
    assert!(
        status.success() && stdout.starts_with("ok "),
        "check program failed ({status}):\nstdout: {stdout}\nstderr: {stderr}"
    );
    eprintln!("{}", stdout.trim());
    stdout
}

/// Rows each client of `driver` wrote (`client:count:sum of n`), as seen on the backend through a session-mode
/// login.
fn rows_per_client(env: &Env, driver: &str) -> Vec<String> {
    let out = psql_ok(
        &env.alice(),
        &format!(
            "SELECT client || ':' || count(*) || ':' || sum(n) FROM drv_items WHERE driver = '{driver}' \
             GROUP BY client ORDER BY client"
        ),
    );
    out.lines().map(str::to_owned).collect()
}

/// What [`rows_per_client`] must find: a row per round (n = 0..ROUNDS; none of the rolled-back n = -1), and with
/// `extra` a batch of 20 (n = 10000..10020) and a COPY of 10 (n = 20000..20010).
fn expected_rows(extra: bool) -> Vec<String> {
    let (mut count, mut sum) = (ROUNDS, ROUNDS * (ROUNDS - 1) / 2);
    if extra {
        count += 30;
        sum += (10000..10020).sum::<usize>() + (20000..20010).sum::<usize>();
    }
    (0..CLIENTS).map(|i| format!("{i}:{count}:{sum}")).collect()
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
    check_driver("asyncpg", true, 0, || {
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
    check_driver("psycopg", true, 2, || {
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
    check_driver("node-pg", false, 2, || {
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
    // pgjdbc prepares BEGIN, COMMIT and ROLLBACK too: BEGIN, an insert, a division and ROLLBACK.
    check_driver("jdbc", true, 4, || {
        let mut cmd = Command::new("java");
        cmd.arg("-cp")
            .arg(format!("{}:{}", jar.display(), classes.path().display()))
            .arg("JdbcCheck");
        cmd
    });
}
