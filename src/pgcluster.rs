//! Local PostgreSQL clusters for `pgweir dev` and for the integration tests.
//!
//! What this module owns:
//! - finding the PostgreSQL server binaries ([`PgBin`]);
//! - creating a cluster with `initdb`, or reusing one that already exists in a
//!   data folder (the persistent `pgweir dev` cluster, whose data survives);
//! - throw-away clusters in temporary folders for tests
//!   ([`LocalCluster::temporary`]), removed again on drop;
//! - starting, stopping, restarting and reloading them with `pg_ctl`, and
//!   stopping them on drop (also while a test panics and unwinds);
//! - handing out free local TCP ports ([`free_port`]).
//!
//! What it must not touch: any cluster or data folder it was not pointed at,
//! system-wide PostgreSQL services, or files outside the data folder, except
//! that when running as root it gives the `postgres` user the right to
//! traverse (execute bit only) the parent folders of the data folder.
//!
//! PostgreSQL refuses to run as root. When the effective uid is 0 every
//! `initdb` / `pg_ctl` command is run as the `postgres` user through
//! `runuser -u postgres -- <program> <args...>` (separate argv entries, no
//! shell), and the data folder is owned by `postgres`. Otherwise the commands
//! run as the current user.
//!
//! The process API is synchronous (`std::process`) so that it can be used in
//! `Drop` and in non-async code; [`LocalCluster::connect`] and
//! [`LocalCluster::execute`] are async helpers on top of `tokio-postgres`.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Seconds `pg_ctl start` waits for the server to accept connections.
const START_TIMEOUT_SECS: u32 = 60;
/// Seconds a fast shutdown may take before we fall back to an immediate one.
const FAST_STOP_TIMEOUT_SECS: u32 = 20;
/// Lines of `postgresql.log` quoted in a start error.
const LOG_TAIL_LINES: usize = 30;
/// Name of the server log inside the data folder.
const LOG_FILE_NAME: &str = "postgresql.log";
/// Prefix of the folders made by [`LocalCluster::temporary`].
const TEMP_PREFIX: &str = "pgweir-test-";
/// Log line the postmaster writes when it handles a reload request.
const RELOAD_LOG_LINE: &str = "received SIGHUP, reloading configuration files";

/// Where the PostgreSQL server binaries (`initdb`, `pg_ctl`, `psql`, ...) live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBin {
    bindir: PathBuf,
}

impl PgBin {
    /// Finds the binaries: `pg_config --bindir` first (if `pg_config` is on
    /// `PATH` and that folder has `initdb` and `pg_ctl`), else the folder of
    /// `initdb` on `PATH` (following a symlink to the real folder if needed).
    /// The error names everything that was tried.
    pub fn locate() -> Result<PgBin> {
        let mut tried = Vec::new();

        match Command::new("pg_config")
            .arg("--bindir")
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if has_server_tools(&dir) {
                    return Ok(PgBin { bindir: dir });
                }
                tried.push(format!(
                    "`pg_config --bindir` gave {} but it lacks initdb or pg_ctl",
                    dir.display()
                ));
            }
            Ok(out) => tried.push(format!(
                "`pg_config --bindir` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => tried.push(format!("`pg_config --bindir` could not run: {e}")),
        }

        match find_on_path("initdb") {
            Some(initdb) => {
                let mut candidates = Vec::new();
                if let Some(dir) = initdb.parent() {
                    candidates.push(dir.to_path_buf());
                }
                if let Some(dir) = fs::canonicalize(&initdb)
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                {
                    candidates.push(dir);
                }
                for dir in candidates {
                    if has_server_tools(&dir) {
                        return Ok(PgBin { bindir: dir });
                    }
                    tried.push(format!(
                        "folder of `initdb` on PATH ({}) lacks pg_ctl",
                        dir.display()
                    ));
                }
            }
            None => tried.push("no `initdb` on PATH".to_string()),
        }

        bail!(
            "cannot find the PostgreSQL server binaries (initdb, pg_ctl); tried: {}",
            tried.join("; ")
        )
    }

    /// The folder holding the binaries.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Path of one tool in [`bindir`](Self::bindir), e.g. `"psql"` or `"pgbench"`.
    pub fn tool(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }
}

fn has_server_tools(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file()
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// How to create and run a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Name of the bootstrap superuser (`initdb -U`). Default `"postgres"`.
    pub superuser: String,
    /// Its password, used for TCP logins (scram-sha-256). Only applied when
    /// the cluster is created; an empty password means none is set.
    /// Default `"postgres"`.
    pub superuser_password: String,
    /// TCP port. `0` (the default) means "pick one with [`free_port`]".
    pub port: u16,
    /// `listen_addresses`. Default `"127.0.0.1"`.
    pub listen: String,
    /// Extra server settings, passed as `-c name=value` at start (they win
    /// over the built-in ones).
    pub settings: Vec<(String, String)>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            superuser: "postgres".to_string(),
            superuser_password: "postgres".to_string(),
            port: 0,
            listen: "127.0.0.1".to_string(),
            settings: Vec::new(),
        }
    }
}

/// A PostgreSQL cluster in a local data folder, controlled with `pg_ctl`.
///
/// Dropping it stops the server if this value started it. A cluster made
/// by [`LocalCluster::temporary`] also has its folder removed on drop; a
/// persistent one (from [`LocalCluster::init_or_reuse`]) keeps its data.
#[derive(Debug)]
pub struct LocalCluster {
    bin: PgBin,
    runner: Runner,
    data_dir: PathBuf,
    spec: ClusterSpec,
    /// Address clients use to reach `spec.listen`.
    host: String,
    /// For temporary clusters: the folder to remove on drop.
    temp_root: Option<PathBuf>,
    /// `initdb` ran in `init_or_reuse` (as opposed to reusing a cluster).
    initialized: bool,
    /// This value started the server and has not stopped it since.
    started_by_us: bool,
    /// The server has been started at least once (its port is then fixed).
    ever_started: bool,
}

impl LocalCluster {
    /// Runs `initdb` into `data_dir` unless it already holds a cluster
    /// (`PG_VERSION` present), in which case it is reused as it is. Does not
    /// start the server. Missing folders are created; an existing folder that
    /// is neither empty nor a cluster is an error.
    ///
    /// `initdb` flags: `-N -U <superuser> --pwfile <tmp> -E UTF8 --locale=C
    /// --auth-local=trust --auth-host=scram-sha-256`.
    pub fn init_or_reuse(data_dir: &Path, spec: ClusterSpec) -> Result<LocalCluster> {
        Self::init_inner(data_dir, spec, None)
    }

    /// A fresh cluster in a new folder under [`std::env::temp_dir`] (name
    /// prefix `pgweir-test-`), on a free port, superuser `postgres` with
    /// password `postgres`, already started with test-friendly settings
    /// (`fsync=off`, `synchronous_commit=off`, `full_page_writes=off`,
    /// `max_connections=200`). The folder is removed when it is dropped.
    pub fn temporary() -> Result<LocalCluster> {
        Self::temporary_with(&[])
    }

    /// Like [`temporary`](Self::temporary), with extra server settings
    /// (`-c name=value`, applied after and so winning over the defaults).
    pub fn temporary_with(settings: &[(&str, &str)]) -> Result<LocalCluster> {
        let mut cluster = Self::create_temporary(settings)?;
        cluster.start()?;
        Ok(cluster)
    }

    /// Creates (but does not start) a temporary cluster.
    fn create_temporary(settings: &[(&str, &str)]) -> Result<LocalCluster> {
        let root = make_temp_root()?;
        let spec = ClusterSpec {
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..ClusterSpec::default()
        };
        match Self::init_inner(&root.join("data"), spec, Some(root.clone())) {
            Ok(cluster) => Ok(cluster),
            Err(e) => {
                let _ = fs::remove_dir_all(&root);
                Err(e)
            }
        }
    }

    fn init_inner(
        data_dir: &Path,
        mut spec: ClusterSpec,
        temp_root: Option<PathBuf>,
    ) -> Result<LocalCluster> {
        if spec.superuser.is_empty() {
            bail!("the cluster superuser name must not be empty");
        }
        let bin = PgBin::locate()?;
        let runner = Runner::detect()?;
        let data_dir = absolute_dir(data_dir)?;
        check_shell_safe(&data_dir)?;
        if spec.port == 0 {
            spec.port = free_port();
        }
        let host = connect_host(&spec.listen);

        let initialized = if data_dir.join("PG_VERSION").exists() {
            if let Some(pg) = &runner.postgres {
                let meta = fs::metadata(&data_dir)
                    .with_context(|| format!("cannot stat {}", data_dir.display()))?;
                if meta.uid() != pg.uid {
                    bail!(
                        "{} holds a cluster but is owned by uid {}, not by the `postgres` \
                         user (uid {}) that runs the server; fix its ownership or use another folder",
                        data_dir.display(),
                        meta.uid(),
                        pg.uid
                    );
                }
                ensure_traversable(&data_dir, pg)?;
            }
            false
        } else {
            let mut entries = fs::read_dir(&data_dir)
                .with_context(|| format!("cannot read {}", data_dir.display()))?;
            if entries.next().is_some() {
                bail!(
                    "{} is not empty and holds no PostgreSQL cluster (no PG_VERSION); \
                     refusing to initdb into it",
                    data_dir.display()
                );
            }
            fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot chmod {}", data_dir.display()))?;
            if let Some(pg) = &runner.postgres {
                std::os::unix::fs::chown(&data_dir, Some(pg.uid), Some(pg.gid)).with_context(
                    || format!("cannot chown {} to the postgres user", data_dir.display()),
                )?;
                ensure_traversable(&data_dir, pg)?;
            }
            run_initdb(&bin, &runner, &data_dir, &spec)?;
            true
        };

        Ok(LocalCluster {
            bin,
            runner,
            data_dir,
            spec,
            host,
            temp_root,
            initialized,
            started_by_us: false,
            ever_started: false,
        })
    }

    /// Starts the server: `pg_ctl -w -t 60 start -l <data_dir>/postgresql.log
    /// -o "-p <port> -c listen_addresses=<listen> -c unix_socket_directories=''
    /// [test settings] -c <settings...>"`. Test settings (temporary clusters
    /// only): `fsync=off synchronous_commit=off full_page_writes=off
    /// max_connections=200`.
    ///
    /// A no-op if this value already started it. An error if the server is
    /// already running from elsewhere. On failure the error holds the last
    /// lines of the server log. If the port is taken, a temporary cluster
    /// that has never run picks a new free port and retries; otherwise the
    /// same port is retried a few times.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            if self.started_by_us {
                return Ok(());
            }
            bail!(
                "the cluster in {} is already running (postmaster pid {}), started elsewhere",
                self.data_dir.display(),
                self.postmaster_pid().unwrap_or(0)
            );
        }
        let may_move_port = self.temp_root.is_some() && !self.ever_started;
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let log_offset = self.log_len();
            let mut cmd = self.runner.command(&self.bin.tool("pg_ctl"));
            cmd.arg("start")
                .arg("-w")
                .arg("-t")
                .arg(START_TIMEOUT_SECS.to_string())
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(self.log_path())
                .arg("-o")
                .arg(self.server_options());
            let out = cmd
                .output()
                .with_context(|| format!("cannot run {}", self.bin.tool("pg_ctl").display()))?;
            if out.status.success() {
                self.started_by_us = true;
                self.ever_started = true;
                return Ok(());
            }
            let tail = self.log_tail_since(log_offset);
            if self.is_running() {
                // pg_ctl gave up waiting but the server lives on: own it so
                // that drop stops it.
                self.started_by_us = true;
            }
            let port_taken = tail.contains("Address already in use")
                || tail.contains("could not create any TCP/IP sockets");
            if port_taken && attempt < ATTEMPTS && !self.started_by_us {
                if may_move_port {
                    let old = self.spec.port;
                    self.spec.port = free_port();
                    tracing::warn!(old, new = self.spec.port, "port taken; retrying on another");
                } else {
                    tracing::warn!(port = self.spec.port, attempt, "port taken; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                continue;
            }
            bail!(
                "pg_ctl start failed for {} on port {} ({}): {}\n--- last lines of {} ---\n{}",
                self.data_dir.display(),
                self.spec.port,
                out.status,
                output_text(&out),
                self.log_path().display(),
                tail
            );
        }
        unreachable!("the start loop returns or bails on its last attempt")
    }

    /// Stops the server with a fast shutdown (`pg_ctl -m fast -w stop`),
    /// falling back to an immediate one if that does not finish in ~20 s.
    /// A no-op if it is not running.
    pub fn stop(&mut self) -> Result<()> {
        if !self.is_running() {
            self.started_by_us = false;
            return Ok(());
        }
        match self.pg_ctl_stop("fast", FAST_STOP_TIMEOUT_SECS) {
            Ok(()) => {
                self.started_by_us = false;
                Ok(())
            }
            Err(fast_err) => {
                tracing::warn!(error = %fast_err, "fast shutdown failed; trying immediate");
                self.stop_immediate()
                    .with_context(|| format!("after fast shutdown failed: {fast_err:#}"))
            }
        }
    }

    /// Stops the server with an immediate shutdown (`pg_ctl -m immediate -w
    /// stop`): no checkpoint, crash recovery on the next start. Useful to
    /// simulate a backend crash. A no-op if it is not running.
    ///
    /// Note: temporary clusters run with `synchronous_commit=off`, so commits
    /// from the last fraction of a second before an immediate stop may be
    /// lost; pass `("synchronous_commit", "on")` to
    /// [`temporary_with`](Self::temporary_with) when a test needs them.
    pub fn stop_immediate(&mut self) -> Result<()> {
        if !self.is_running() {
            self.started_by_us = false;
            return Ok(());
        }
        self.pg_ctl_stop("immediate", FAST_STOP_TIMEOUT_SECS)?;
        self.started_by_us = false;
        Ok(())
    }

    /// Stops (fast) and starts the server again, on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    /// Makes the running server re-read its configuration files
    /// (`pg_ctl reload`) and waits (up to ~5 s) until it has done so. Fails if
    /// the server reports that `pg_hba.conf` could not be loaded. A no-op if
    /// the server is not running (the files are read at the next start).
    pub fn reload(&self) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let log_offset = self.log_len();
        let mut cmd = self.runner.command(&self.bin.tool("pg_ctl"));
        cmd.arg("reload").arg("-D").arg(&self.data_dir);
        let out = cmd.output().context("cannot run pg_ctl reload")?;
        if !out.status.success() {
            bail!(
                "pg_ctl reload failed ({}): {}",
                out.status,
                output_text(&out)
            );
        }
        // pg_ctl only sends SIGHUP; wait until the postmaster logs that it
        // handled it, then give it a moment to finish loading pg_hba.conf.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.log_since(log_offset).contains(RELOAD_LOG_LINE) {
                std::thread::sleep(Duration::from_millis(100));
                let text = self.log_since(log_offset);
                if text.contains("was not reloaded") {
                    bail!(
                        "the server rejected the new configuration:\n{}",
                        last_lines(&text, LOG_TAIL_LINES)
                    );
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(
            "reload of {} not confirmed in the server log within 5 s",
            self.data_dir.display()
        );
        Ok(())
    }

    /// Whether a postmaster is running for this data folder (per its
    /// `postmaster.pid`), whoever started it.
    pub fn is_running(&self) -> bool {
        let Some(pid) = self.postmaster_pid() else {
            return false;
        };
        process_alive(pid)
    }

    /// The TCP port the server listens (or will listen) on.
    pub fn port(&self) -> u16 {
        self.spec.port
    }

    /// The host clients connect to (`127.0.0.1` when listening on all addresses).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The (absolute) data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Path of the server log, `<data_dir>/postgresql.log`.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE_NAME)
    }

    /// The superuser's name.
    pub fn superuser(&self) -> &str {
        &self.spec.superuser
    }

    /// The superuser's password (as given when the cluster was created).
    pub fn superuser_password(&self) -> &str {
        &self.spec.superuser_password
    }

    /// The binaries this cluster uses.
    pub fn bin(&self) -> &PgBin {
        &self.bin
    }

    /// True if [`init_or_reuse`](Self::init_or_reuse) (or
    /// [`temporary`](Self::temporary)) ran `initdb`, false if it reused an
    /// existing cluster.
    pub fn was_initialized(&self) -> bool {
        self.initialized
    }

    /// Inserts `line` into `pg_hba.conf` before the existing rules (so it
    /// wins) and reloads the server if it is running. Example:
    /// `"host all md5user 127.0.0.1/32 md5"`.
    pub fn prepend_hba(&self, line: &str) -> Result<()> {
        let line = line.trim();
        if line.is_empty() || line.contains('\n') || line.contains('\r') {
            bail!("prepend_hba takes one non-empty line, got {line:?}");
        }
        let path = self.data_dir.join("pg_hba.conf");
        let old =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut new = String::with_capacity(old.len() + line.len() + 1);
        let mut inserted = false;
        for existing in old.split_inclusive('\n') {
            let trimmed = existing.trim();
            if !inserted && !trimmed.is_empty() && !trimmed.starts_with('#') {
                new.push_str(line);
                new.push('\n');
                inserted = true;
            }
            new.push_str(existing);
        }
        if !inserted {
            if !new.is_empty() && !new.ends_with('\n') {
                new.push('\n');
            }
            new.push_str(line);
            new.push('\n');
        }
        // Writing in place keeps the file's owner and mode.
        fs::write(&path, new).with_context(|| format!("cannot write {}", path.display()))?;
        self.reload()
    }

    /// A `tokio-postgres` connection string for the superuser over TCP:
    /// `host=.. port=.. user=.. password=.. dbname=..` (values quoted as needed).
    pub fn superuser_dsn(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={} password={} dbname={}",
            dsn_quote(&self.host),
            self.spec.port,
            dsn_quote(&self.spec.superuser),
            dsn_quote(&self.spec.superuser_password),
            dsn_quote(dbname)
        )
    }

    /// The same as [`superuser_dsn`](Self::superuser_dsn), as a
    /// `tokio_postgres::Config` (with a 10 s connect timeout).
    pub fn superuser_config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.spec.port)
            .user(&self.spec.superuser)
            .password(&self.spec.superuser_password)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// Connects as the superuser (no TLS), spawns the connection task on the
    /// current tokio runtime and returns the client.
    pub async fn connect(&self, dbname: &str) -> Result<tokio_postgres::Client> {
        let (client, connection) = self
            .superuser_config(dbname)
            .connect(tokio_postgres::NoTls)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to {}:{} as {} (database {dbname})",
                    self.host, self.spec.port, self.spec.superuser
                )
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "test cluster connection ended with an error");
            }
        });
        Ok(client)
    }

    /// Runs `sql` (one or more statements) as the superuser on `dbname`.
    pub async fn execute(&self, dbname: &str, sql: &str) -> Result<()> {
        let client = self.connect(dbname).await?;
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("SQL failed on database {dbname}: {sql}"))
    }

    /// The `-o` string for `pg_ctl start`. pg_ctl hands it to `/bin/sh`, so
    /// every word is single-quoted.
    fn server_options(&self) -> String {
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), self.spec.listen.clone()),
            ("unix_socket_directories".into(), String::new()),
            // Prepared transactions outlive the session (and the pooled connection) that made them, holding
            // locks; no tenant gets them (the PostgreSQL default, stated).
            ("max_prepared_transactions".into(), "0".into()),
        ];
        if self.temp_root.is_some() {
            for (k, v) in [
                ("fsync", "off"),
                ("synchronous_commit", "off"),
                ("full_page_writes", "off"),
                ("max_connections", "200"),
            ] {
                settings.push((k.into(), v.into()));
            }
        }
        settings.extend(self.spec.settings.iter().cloned());
        let mut words = vec!["-p".to_string(), self.spec.port.to_string()];
        for (name, value) in settings {
            words.push("-c".to_string());
            words.push(format!("{name}={value}"));
        }
        words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn pg_ctl_stop(&self, mode: &str, timeout_secs: u32) -> Result<()> {
        let mut cmd = self.runner.command(&self.bin.tool("pg_ctl"));
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-m")
            .arg(mode)
            .arg("-w")
            .arg("-t")
            .arg(timeout_secs.to_string());
        let out = cmd.output().context("cannot run pg_ctl stop")?;
        if out.status.success() {
            return Ok(());
        }
        if !self.is_running() {
            // Stopped meanwhile (e.g. by someone else): that is what we wanted.
            return Ok(());
        }
        bail!(
            "pg_ctl stop -m {mode} failed for {} ({}): {}",
            self.data_dir.display(),
            out.status,
            output_text(&out)
        )
    }

    /// Last resort: signal the postmaster directly (SIGQUIT, then SIGKILL).
    fn kill_postmaster(&self) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        for (signal, wait) in [(libc::SIGQUIT, 5), (libc::SIGKILL, 5)] {
            if !process_alive(pid) {
                return;
            }
            // SAFETY: plain kill(2) on a pid read from postmaster.pid.
            unsafe {
                libc::kill(pid, signal);
            }
            let deadline = Instant::now() + Duration::from_secs(wait);
            while process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        (pid > 0).then_some(pid)
    }

    fn log_len(&self) -> u64 {
        fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0)
    }

    fn log_since(&self, offset: u64) -> String {
        let Ok(mut file) = fs::File::open(self.log_path()) else {
            return String::new();
        };
        let mut bytes = Vec::new();
        if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut bytes).is_err() {
            return String::new();
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn log_tail_since(&self, offset: u64) -> String {
        let text = self.log_since(offset);
        if text.trim().is_empty() {
            "(nothing new in the log)".to_string()
        } else {
            last_lines(&text, LOG_TAIL_LINES)
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.started_by_us && self.is_running() {
            if let Err(e) = self.stop() {
                tracing::warn!(error = %format!("{e:#}"), "could not stop cluster on drop");
            }
            if self.is_running() {
                self.kill_postmaster();
            }
        }
        if let Some(root) = self.temp_root.take() {
            if self.is_running() {
                self.kill_postmaster();
            }
            if let Err(e) = fs::remove_dir_all(&root) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(error = %e, dir = %root.display(), "could not remove temporary cluster");
                }
            }
        }
    }
}

/// A free TCP port on 127.0.0.1 (bind to port 0, read it, close). Never
/// hands out the same port twice in one process.
///
/// # Panics
/// If no port on 127.0.0.1 can be bound at all.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..1000 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("cannot bind a TCP port on 127.0.0.1");
        let port = listener
            .local_addr()
            .expect("bound socket has an address")
            .port();
        drop(listener);
        let mut set = handed_out.lock().unwrap_or_else(|p| p.into_inner());
        if set.insert(port) {
            return port;
        }
    }
    panic!("no unused free TCP port found on 127.0.0.1 after 1000 tries")
}

/// The `postgres` OS user that runs the server when we are root.
#[derive(Debug, Clone, Copy)]
struct PgUser {
    uid: u32,
    gid: u32,
}

/// Runs cluster commands, through `runuser` when we are root.
#[derive(Debug, Clone)]
struct Runner {
    /// Set when running as root: commands go through `runuser`.
    postgres: Option<PgUser>,
    runuser: PathBuf,
}

impl Runner {
    fn detect() -> Result<Runner> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(Runner {
                postgres: None,
                runuser: PathBuf::new(),
            });
        }
        let user = lookup_user("postgres")?.ok_or_else(|| {
            anyhow!(
                "running as root, but there is no `postgres` OS user to run PostgreSQL \
                 (it refuses to run as root)"
            )
        })?;
        let runuser = ["/usr/sbin/runuser", "/sbin/runuser"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .or_else(|| find_on_path("runuser"))
            .ok_or_else(|| {
                anyhow!(
                    "running as root, but `runuser` is not at /usr/sbin/runuser, \
                     /sbin/runuser or on PATH; it is needed to run PostgreSQL as `postgres`"
                )
            })?;
        Ok(Runner {
            postgres: Some(user),
            runuser,
        })
    }

    /// A command running `program` as the right user, in `/` (the caller's
    /// working folder may be closed to `postgres`), with stdin closed.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = match self.postgres {
            Some(_) => {
                let mut cmd = Command::new(&self.runuser);
                cmd.args(["-u", "postgres", "--"]).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.current_dir("/").stdin(Stdio::null());
        cmd
    }
}

fn lookup_user(name: &str) -> Result<Option<PgUser>> {
    let cname = CString::new(name)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: getpwnam_r writes into `pwd` and `buf` (whose length we
        // pass) and sets `result` to null or to `&pwd`.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            bail!(
                "getpwnam_r({name}) failed: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some(PgUser {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }));
    }
}

/// Gives `user` the execute (traverse) bit it lacks on each parent of `dir`.
fn ensure_traversable(dir: &Path, user: &PgUser) -> Result<()> {
    for parent in dir.ancestors().skip(1) {
        if parent.as_os_str().is_empty() {
            continue;
        }
        let meta =
            fs::metadata(parent).with_context(|| format!("cannot stat {}", parent.display()))?;
        let mode = meta.permissions().mode();
        let needed = if meta.uid() == user.uid {
            0o100
        } else if meta.gid() == user.gid {
            0o010
        } else {
            0o001
        };
        if mode & needed == 0 {
            tracing::warn!(
                dir = %parent.display(),
                "adding the execute bit so that the postgres user can reach the data folder"
            );
            fs::set_permissions(parent, fs::Permissions::from_mode((mode | needed) & 0o7777))
                .with_context(|| {
                    format!(
                        "cannot let the postgres user traverse {} (chmod)",
                        parent.display()
                    )
                })?;
        }
    }
    Ok(())
}

/// Makes `dir` (and missing parents) and returns its canonical path.
fn absolute_dir(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))
}

/// pg_ctl pastes the data folder into a `/bin/sh` command line inside double
/// quotes; refuse paths that would break out of them.
fn check_shell_safe(path: &Path) -> Result<()> {
    let text = path
        .to_str()
        .ok_or_else(|| anyhow!("data folder {} is not valid UTF-8", path.display()))?;
    if text.contains(['"', '$', '`', '\\', '\n']) {
        bail!("data folder {text:?} contains characters pg_ctl cannot quote");
    }
    Ok(())
}

fn make_temp_root() -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let name = format!(
            "{TEMP_PREFIX}{}-{}-{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let root = base.join(name);
        match fs::create_dir(&root) {
            Ok(()) => {
                // Reachable by `postgres` whatever the umask.
                fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
                    .with_context(|| format!("cannot chmod {}", root.display()))?;
                return Ok(root);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create a folder in {}", base.display()))
            }
        }
    }
    bail!(
        "cannot find an unused temporary folder name in {}",
        base.display()
    )
}

/// A file holding the superuser password for `initdb --pwfile`, removed on drop.
struct PasswordFile {
    path: PathBuf,
}

impl PasswordFile {
    fn create(password: &str, owner: Option<&PgUser>) -> Result<PasswordFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "pgweir-pwfile-{}-{}-{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let guard = PasswordFile { path };
        writeln!(file, "{password}").context("cannot write the password file")?;
        if let Some(pg) = owner {
            std::os::unix::fs::chown(&guard.path, Some(pg.uid), Some(pg.gid))
                .context("cannot chown the password file to postgres")?;
        }
        Ok(guard)
    }
}

impl Drop for PasswordFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn run_initdb(bin: &PgBin, runner: &Runner, data_dir: &Path, spec: &ClusterSpec) -> Result<()> {
    if spec.superuser_password.contains(['\n', '\r']) {
        bail!("the superuser password must be a single line");
    }
    let pwfile = if spec.superuser_password.is_empty() {
        None
    } else {
        Some(PasswordFile::create(
            &spec.superuser_password,
            runner.postgres.as_ref(),
        )?)
    };
    let mut cmd = runner.command(&bin.tool("initdb"));
    cmd.arg("-D")
        .arg(data_dir)
        .arg("-N")
        .arg("-U")
        .arg(&spec.superuser)
        .args(["-E", "UTF8", "--locale=C"])
        .args(["--auth-local=trust", "--auth-host=scram-sha-256"]);
    if let Some(pw) = &pwfile {
        cmd.arg(OsStr::new("--pwfile")).arg(&pw.path);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", bin.tool("initdb").display()))?;
    if !out.status.success() {
        bail!(
            "initdb into {} failed ({}): {}",
            data_dir.display(),
            out.status,
            output_text(&out)
        );
    }
    Ok(())
}

/// Whether `pid` is a live process that looks like a PostgreSQL server.
fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return false;
    }
    // Guard against a stale postmaster.pid whose pid was reused; a zombie
    // (already exited, not yet reaped) does not count either.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let comm_ok = stat.contains("(postgres)") || stat.contains("(postmaster)");
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            comm_ok && state != Some("Z")
        }
        Err(_) => true,
    }
}

fn connect_host(listen: &str) -> String {
    let first = listen.split(',').next().unwrap_or("").trim();
    match first {
        "" | "*" | "0.0.0.0" | "localhost" => "127.0.0.1".to_string(),
        "::" => "::1".to_string(),
        other => other.to_string(),
    }
}

/// Quotes a word for `/bin/sh`.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Quotes a value for a libpq-style `key=value` connection string.
fn dsn_quote(value: &str) -> String {
    if !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        return value.to_string();
    }
    format!("'{}'", value.replace('\\', r"\\").replace('\'', r"\'"))
}

fn output_text(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stderr.trim());
    }
    text
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a=b"), "'a=b'");
        assert_eq!(shell_quote("x='y'"), r"'x='\''y'\'''");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(dsn_quote("plain"), "plain");
        assert_eq!(dsn_quote(""), "''");
        assert_eq!(dsn_quote(r"a b'c\"), r"'a b\'c\\'");
    }

    #[test]
    fn connect_hosts() {
        assert_eq!(connect_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(connect_host("*"), "127.0.0.1");
        assert_eq!(connect_host("10.0.0.1, 127.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
        assert!(!ports.contains(&0));
    }

    #[test]
    fn temporary_cluster_moves_off_a_taken_port() {
        let mut cluster = LocalCluster::create_temporary(&[]).expect("initdb");
        let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, cluster.port())).expect("bind");
        let taken = cluster.port();
        cluster.start().expect("start on another port");
        assert_ne!(cluster.port(), taken);
        assert!(cluster.is_running());
        drop(squatter);
    }
}
