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

fn start_dev(data_dir: &std::path::Path, port: u16, admin: u16) -> (DevProcess, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgweir"))
        .args(["dev", "--data-dir"])
        .arg(data_dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .env("PGWEIR_ADMIN_TOKEN", DEV_TOKEN)
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

const DEV_TOKEN: &str = "dev-mode-test-token";

/// One request to the admin listener: (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the admin listener");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nAuthorization: Bearer {DEV_TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// The body of a GET on the admin listener (which must answer 200).
fn http_get(port: u16, path: &str) -> String {
    let (status, body) = http(port, "GET", path, "");
    assert_eq!(status, 200, "{path}: {body}");
    body
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
    let admin = free_port();

    let (proc, url) = start_dev(&data_dir, port, admin);
    assert!(psql(&url, "select current_database()").starts_with("pgweir_db_"));
    assert_eq!(http_get(admin, "/healthz"), "ok\n");
    assert!(http_get(admin, "/metrics").contains("pgweir_client_logins_total{result=\"ok\"} "));
    // The README's session: a tenant created with the token, reached with the connection string it returns.
    let (status, body) = http(admin, "PUT", "/v1/tenants/my-app", r#"{"plan": "team"}"#);
    assert_eq!(status, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).unwrap();
    let app_url = created["connection_string"].as_str().unwrap();
    let (_, body) = http(admin, "GET", "/v1/tenants/my-app", "");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        psql(app_url, "select current_database()"),
        view["backend"]["database"].as_str().unwrap()
    );
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

    let (proc, url2) = start_dev(&data_dir, port, admin);
    assert_eq!(
        url, url2,
        "the second run prints the same connection string"
    );
    assert_eq!(psql(&url2, "select body from notes"), "kept");
    stop(proc);
}
