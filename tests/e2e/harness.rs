//! Test harness: a throw-away PostgreSQL 15 cluster with tenant databases and roles, and pgweir running in front of
//! it on its own runtime thread. Everything is stopped when the `Env` is dropped, also when a test panics.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgweir::auth::md5::md5_verifier;
use pgweir::auth::scram::ScramVerifier;
use pgweir::config::Config;
use pgweir::pgcluster::LocalCluster;
pub use pgweir::server::Stop;
use pgweir::server::{Proxy, Server};

pub const OWNER_PASSWORD: &str = "owner-secret";
pub const ALICE_PASSWORD: &str = "alice-secret";
pub const BOB_PASSWORD: &str = "bob-secret";

/// What the default test config contains:
/// - tenant `acme` (database `app`): users `alice` (SCRAM) and `bob` (SCRAM + md5), branch `dev`;
///   backend role `acme_owner`, databases `acme_main` and `acme_dev`;
/// - tenant `beta` (database `app`): user `alice` with `BOB_PASSWORD`, backend database `beta_main`, require_tls;
/// - tenant `legacy` (passthrough): user `app_user` → same-named role and database `app_user`... see `setup_sql`.
pub struct Env {
    /// First, so that pgweir stops before the cluster does.
    pub instance: Instance,
    pub cluster: LocalCluster,
    pub addr: SocketAddr,
    /// The admin HTTP listener.
    pub admin: SocketAddr,
    pub proxy: Arc<Proxy>,
    pub dir: tempfile::TempDir,
    /// The config text pgweir runs with (another instance can start from it).
    config: String,
    _backend_tls_dir: tempfile::TempDir,
}

/// One pgweir process (in-process: its own runtime thread), stopped when dropped.
pub struct Instance {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub proxy: Arc<Proxy>,
    shutdown: Option<tokio::sync::oneshot::Sender<Stop>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Instance {
    pub fn start(text: &str) -> Instance {
        let cfg =
            Config::parse(text).unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{text}"));
        let (tx, rx) = tokio::sync::oneshot::channel::<Stop>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // As `pgweir serve` runs it (one event loop unless the config says otherwise).
            let rt = pgweir::server::runtime(cfg.proxy.worker_threads).unwrap();
            rt.block_on(async move {
                let (directory, control) = pgweir::catalog::control::directory_for(&cfg)
                    .await
                    .expect("the tenant directory");
                let server = Server::bind_with_control(cfg, directory, control)
                    .await
                    .expect("bind pgweir");
                ready_tx
                    .send((server.local_addr(), server.admin_addr(), server.proxy()))
                    .unwrap();
                server.run(async { rx.await.unwrap_or(Stop::Fast) }).await;
            });
            rt.shutdown_timeout(Duration::from_secs(2));
        });
        let (addr, admin, proxy) = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("pgweir started");
        Instance {
            addr,
            admin: admin.expect("the admin listener"),
            proxy,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Instance {
    /// Tells pgweir to stop (as SIGTERM or SIGINT would), without waiting for it.
    pub fn begin_stop(&mut self, how: Stop) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(how);
        }
    }

    /// Waits until pgweir has stopped; false if it has not within `timeout`.
    pub fn wait_stopped(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(Stop::Fast);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Setup {
    /// Extra TOML appended to the default config (e.g. more `[[tenants]]`); `$PORT` is replaced by the cluster's port.
    pub extra_config: String,
    /// Replaces the `[pool]` section body.
    pub pool: String,
    /// Extra lines for the `[proxy]` section.
    pub proxy: String,
    pub tls: bool,
    /// TLS from pgweir to the backend: `Some("require")` or `Some("verify-full")` turns on `ssl` in the cluster
    /// (certificate for `localhost`) and points `[clusters.main]` at it.
    pub backend_tls: Option<&'static str>,
    /// A catalog (control database `control` on the same cluster, key file in the temp folder): the `/v1` API.
    pub catalog: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            extra_config: String::new(),
            pool: "max_size = 5\ncheckout_timeout = \"3s\"\nconnect_timeout = \"3s\"".into(),
            proxy: String::new(),
            tls: true,
            backend_tls: None,
            catalog: false,
        }
    }
}

pub fn scram(password: &str) -> String {
    ScramVerifier::generate(password, 4096).to_string()
}

const SETUP_SQL: &str = "
CREATE ROLE acme_owner LOGIN PASSWORD 'owner-secret';
CREATE DATABASE acme_main OWNER acme_owner;
CREATE DATABASE acme_dev OWNER acme_owner;
CREATE DATABASE beta_main OWNER acme_owner;
CREATE ROLE app_user LOGIN PASSWORD 'app-user-secret';
CREATE DATABASE legacy_db OWNER app_user;
";

impl Env {
    pub fn start() -> Env {
        Env::with(Setup::default())
    }

    pub fn with(setup: Setup) -> Env {
        // PGWEIR_TEST_LOG=debug (an EnvFilter) shows pgweir's logs in the test output.
        if let Ok(filter) = std::env::var("PGWEIR_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let backend_tls_dir = tempfile::Builder::new()
            .prefix("pgweir-backend-tls-")
            .tempdir()
            .unwrap();
        let mut cluster_settings: Vec<(String, String)> = Vec::new();
        let mut cluster_lines = String::from("host = \"127.0.0.1\"");
        if let Some(mode) = setup.backend_tls {
            let (cert, key) = backend_certificate(backend_tls_dir.path());
            cluster_settings.push(("ssl".into(), "on".into()));
            cluster_settings.push(("ssl_cert_file".into(), cert.display().to_string()));
            cluster_settings.push(("ssl_key_file".into(), key.display().to_string()));
            cluster_lines = format!("host = \"localhost\"\ntls = \"{mode}\"\nca_file = {cert:?}");
        }
        let settings: Vec<(&str, &str)> = cluster_settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let cluster =
            LocalCluster::temporary_with(&settings).expect("start a temporary PostgreSQL cluster");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for stmt in SETUP_SQL.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                cluster.execute("postgres", stmt).await.expect(stmt);
            }
            cluster
                .execute("acme_dev", "CREATE TABLE branch_marker(name text); INSERT INTO branch_marker VALUES ('dev'); ALTER TABLE branch_marker OWNER TO acme_owner")
                .await
                .unwrap();
        });
        drop(rt);
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("server.crt");
        let key = dir.path().join("server.key");
        pgweir::tls::ensure_self_signed(&cert, &key, &["localhost", "*.db.test", "127.0.0.1"])
            .unwrap();
        let catalog = if setup.catalog {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(cluster.execute("postgres", "CREATE DATABASE control"))
                .expect("create the control database");
            let key_file = dir.path().join("catalog.key");
            std::fs::write(
                &key_file,
                pgweir::catalog::secret::SecretKey::generate_base64(),
            )
            .unwrap();
            format!(
                "[catalog]\nurl = {:?}\nkey_file = {:?}\npublic_host = \"127.0.0.1\"\nusage_flush_interval = \"1s\"\n",
                cluster.superuser_dsn("control"),
                key_file
            )
        } else {
            String::new()
        };
        let tls = if setup.tls {
            format!("[tls]\ncert = {:?}\nkey = {:?}\n", cert, key)
        } else {
            String::new()
        };
        let text = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
base_domain = "db.test"
{login_timeout}
{proxy}

{tls}

[admin]
listen = "127.0.0.1:0"

{catalog}

[pool]
{pool}

[clusters.main]
{cluster_lines}
port = {port}

[[tenants]]
id = "acme"
database = "app"
cluster = "main"
backend_database = "acme_main"
backend_user = "acme_owner"
backend_password = "{OWNER_PASSWORD}"
auth = ["scram-sha-256"]
pool_mode = "session"
[[tenants.users]]
name = "alice"
password = "{alice}"
[[tenants.users]]
name = "bob"
password = "{bob}"
md5 = "{bob_md5}"
[[tenants.branches]]
name = "dev"
backend_database = "acme_dev"

[[tenants]]
id = "beta"
database = "app"
cluster = "main"
backend_database = "beta_main"
backend_user = "acme_owner"
backend_password = "{OWNER_PASSWORD}"
require_tls = true
pool_mode = "session"
[[tenants.users]]
name = "alice"
password = "{beta_alice}"

[[tenants]]
id = "legacy"
cluster = "main"
passthrough = true
pool_mode = "session"
[[tenants.users]]
name = "app_user"
password = "{app_user}"
backend_password = "app-user-secret"

{extra}
"#,
            // A `login_timeout` in `setup.proxy` replaces the default (TOML refuses duplicate keys).
            login_timeout = if setup.proxy.contains("login_timeout") {
                ""
            } else {
                "login_timeout = \"5s\""
            },
            proxy = setup.proxy,
            pool = setup.pool,
            port = cluster.port(),
            alice = scram(ALICE_PASSWORD),
            bob = scram(BOB_PASSWORD),
            bob_md5 = md5_verifier(BOB_PASSWORD, "bob"),
            beta_alice = scram(BOB_PASSWORD),
            app_user = scram("app-user-pw"),
            extra = setup
                .extra_config
                .replace("$PORT", &cluster.port().to_string()),
        );
        let instance = Instance::start(&text);
        Env {
            cluster,
            addr: instance.addr,
            admin: instance.admin,
            proxy: instance.proxy.clone(),
            dir,
            config: text,
            instance,
            _backend_tls_dir: backend_tls_dir,
        }
    }

    /// The config text pgweir runs with.
    pub fn config_text(&self) -> &str {
        &self.config
    }

    /// Another pgweir instance with the same config (same clusters, same catalog), on ports of its own.
    pub fn another_instance(&self) -> Instance {
        Instance::start(&self.config)
    }

    /// A libpq connection string to pgweir.
    pub fn url(&self, user: &str, password: &str, db: &str, extra: &str) -> String {
        let mut s = format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db} connect_timeout=10",
            self.addr.port()
        );
        if !extra.is_empty() {
            s.push(' ');
            s.push_str(extra);
        }
        s
    }

    /// The usual login: alice on acme, routed by the options parameter, no TLS.
    pub fn alice(&self) -> String {
        self.url(
            "alice",
            ALICE_PASSWORD,
            "app",
            "options=endpoint=acme sslmode=disable",
        )
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    /// tokio-postgres connection (no TLS) with the connection task spawned on the current runtime.
    pub async fn connect(
        &self,
        conn_str: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

/// Runs psql with `-X -A -t -q` and ON_ERROR_STOP.
pub fn psql(conn: &str, sql: &str) -> Output {
    psql_args(conn, &["-c", sql])
}

pub fn psql_args(conn: &str, args: &[&str]) -> Output {
    let bin = pgweir::pgcluster::PgBin::locate().unwrap().tool("psql");
    Command::new(bin)
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", conn])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .output()
        .expect("run psql")
}

/// psql output that must have succeeded: stdout, trimmed.
pub fn psql_ok(conn: &str, sql: &str) -> String {
    let out = psql(conn, sql);
    assert!(
        out.status.success(),
        "psql failed for {sql:?}:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// psql that must fail: stderr.
pub fn psql_err(conn: &str, sql: &str) -> String {
    let out = psql(conn, sql);
    assert!(
        !out.status.success(),
        "psql unexpectedly succeeded for {sql:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits until `f` returns true, polling every 50 ms, for at most `timeout`.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// The SQLSTATE of a tokio-postgres error (from the server's ErrorResponse).
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

/// A certificate for `localhost` that the cluster's postgres user can read (key mode 0600, owned by postgres when
/// we are root, as Postgres demands).
fn backend_certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let cert = dir.join("backend.crt");
    let key = dir.join("backend.key");
    pgweir::tls::ensure_self_signed(&cert, &key, &["localhost"]).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o644)).unwrap();
    if unsafe { libc::geteuid() } == 0 {
        let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
        assert!(!pw.is_null(), "user postgres exists");
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        std::os::unix::fs::chown(&key, Some(uid), Some(gid)).unwrap();
        std::os::unix::fs::chown(&cert, Some(uid), Some(gid)).unwrap();
    }
    (cert, key)
}

/// A multi-threaded runtime for a test's async part (pgweir itself runs on its own thread).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A `[[tenants]]` entry on the acme backend (database `app` → `acme_main` as `acme_owner`), with extra lines
/// (e.g. `auth = ["md5"]`) and users (see [`user_toml`]).
pub fn acme_tenant(id: &str, lines: &str, users: &[String]) -> String {
    format!(
        r#"
[[tenants]]
id = "{id}"
database = "app"
cluster = "main"
backend_database = "acme_main"
backend_user = "acme_owner"
backend_password = "{OWNER_PASSWORD}"
{mode}
{lines}
{}"#,
        users.concat(),
        // The data-plane tests expect session pooling unless they ask for another mode.
        mode = if lines.contains("pool_mode") {
            ""
        } else {
            "pool_mode = \"session\""
        },
    )
}

/// A `[[tenants.users]]` entry with a SCRAM verifier of `password`, and its md5 hash when `md5`.
pub fn user_toml(name: &str, password: &str, md5: bool) -> String {
    let md5 = if md5 {
        format!("md5 = \"{}\"\n", md5_verifier(password, name))
    } else {
        String::new()
    };
    format!(
        "[[tenants.users]]\nname = \"{name}\"\npassword = \"{}\"\n{md5}",
        scram(password)
    )
}

/// One HTTP/1.1 request to the admin listener: (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut raw))
        .await
        .expect("the admin listener answers")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// `pgbench -i -q -s <scale>` against `conn`; panics with pgbench's output when it fails.
pub fn pgbench_init(conn: &str, scale: u32) {
    let pgbench = pgweir::pgcluster::PgBin::locate().unwrap().tool("pgbench");
    let init = Command::new(pgbench)
        .args(["-i", "-q", "-s", &scale.to_string(), conn])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
}

/// A pgbench run in the background (`args` then `conn`), to be checked with [`pgbench_no_failures`].
pub fn pgbench_spawn(args: &[&str], conn: &str) -> std::process::Child {
    let pgbench = pgweir::pgcluster::PgBin::locate().unwrap().tool("pgbench");
    Command::new(pgbench)
        .args(args)
        .arg(conn)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a background pgbench: it succeeded with zero failed transactions. Returns how many it processed.
pub fn pgbench_no_failures(run: std::process::Child) -> u64 {
    let out = run.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a transaction count")
}
