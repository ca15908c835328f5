//! `pgweir dev` as a user runs it: the binary, its printed connection string, psql, SIGTERM, and a second run that
//! finds the data of the first.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgweir::pgcluster::{free_port, PgBin};

/// Kills the dev process if the test fails before stopping it.
struct DevProcess(Child);

impl Drop for DevProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SIGTERM first so that it stops its cluster; SIGKILL if it does not exit.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn start_dev(data_dir: &std::path::Path, port: u16) -> (DevProcess, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgweir"))
        .args(["dev", "--data-dir"])
        .arg(data_dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start pgweir dev");
    let stdout = child.stdout.take().unwrap();
    let proc = DevProcess(child);
    let mut lines = BufReader::new(stdout).lines();
    let first = lines
        .next()
        .expect("pgweir dev printed a line")
        .expect("read stdout");
    assert!(first.starts_with("postgres://"), "first line: {first}");
    (proc, first)
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new(PgBin::locate().unwrap().tool("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            url,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {url} -c {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn stop(mut p: DevProcess) {
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = p.0.try_wait() {
            assert!(status.success(), "pgweir dev exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pgweir dev did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dev_mode_serves_psql_and_keeps_data_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("dev");
    let port = free_port();

    let (proc, url) = start_dev(&data_dir, port);
    assert_eq!(psql(&url, "select current_database()"), "tenant_demo_main");
    assert_eq!(
        psql(&format!("{url}?sslmode=require"), "select 'tls'"),
        "tls"
    );
    psql(
        &format!("{url}?sslmode=disable"),
        "create table notes(body text); insert into notes values ('kept')",
    );
    stop(proc);
    // pgweir and its cluster are gone.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());

    let (proc, url2) = start_dev(&data_dir, port);
    assert_eq!(
        url, url2,
        "the second run prints the same connection string"
    );
    assert_eq!(psql(&url2, "select body from notes"), "kept");
    stop(proc);
}
