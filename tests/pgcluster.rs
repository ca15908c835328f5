//! Integration tests for `pgweir::pgcluster`: real PostgreSQL clusters,
//! started and stopped through `initdb` / `pg_ctl`. Every test uses its own
//! folder and port, so they run in parallel.

use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use pgweir::pgcluster::{free_port, ClusterSpec, LocalCluster, PgBin};

fn accepts_connections(port: u16) -> bool {
    TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(500),
    )
    .is_ok()
}

async fn select_one(cluster: &LocalCluster) -> i32 {
    let client = cluster.connect("postgres").await.expect("connect");
    client
        .query_one("select 1", &[])
        .await
        .expect("select 1")
        .get(0)
}

#[test]
fn locate_finds_server_tools() {
    let bin = PgBin::locate().expect("locate");
    assert!(bin.tool("initdb").is_file());
    assert!(bin.tool("pg_ctl").is_file());
    assert!(bin.tool("psql").is_file());
}

#[tokio::test]
async fn temporary_cluster_answers_select_one() {
    let started = Instant::now();
    let cluster = LocalCluster::temporary().expect("temporary cluster");
    eprintln!("temporary cluster init+start took {:?}", started.elapsed());

    assert!(cluster.is_running());
    assert!(cluster.was_initialized());
    assert_eq!(cluster.host(), "127.0.0.1");
    assert_eq!(cluster.superuser(), "postgres");
    assert_eq!(cluster.superuser_password(), "postgres");
    assert!(cluster
        .data_dir()
        .to_string_lossy()
        .contains("pgweir-test-"));
    assert_eq!(select_one(&cluster).await, 1);

    // Test settings are in force.
    let client = cluster.connect("postgres").await.unwrap();
    let fsync: String = client.query_one("show fsync", &[]).await.unwrap().get(0);
    assert_eq!(fsync, "off");
    let max: String = client
        .query_one("show max_connections", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(max, "200");

    // The DSN works too.
    let (client, conn) =
        tokio_postgres::connect(&cluster.superuser_dsn("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect via dsn");
    tokio::spawn(conn);
    let user: String = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "postgres");
}

#[tokio::test]
async fn extra_settings_win() {
    let cluster =
        LocalCluster::temporary_with(&[("max_connections", "37"), ("application_name", "it's me")])
            .expect("temporary cluster");
    let client = cluster.connect("postgres").await.unwrap();
    let max: String = client
        .query_one("show max_connections", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(max, "37");
}

#[tokio::test]
async fn persistent_cluster_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    // A folder that does not exist yet, below a 0700 temp folder.
    let data_dir = dir.path().join("dev").join("pgdata");
    let spec = ClusterSpec {
        port: free_port(),
        superuser: "weir_admin".to_string(),
        superuser_password: "s3cret pass".to_string(),
        ..ClusterSpec::default()
    };

    let mut cluster = LocalCluster::init_or_reuse(&data_dir, spec.clone()).expect("initdb");
    assert!(cluster.was_initialized());
    assert!(!cluster.is_running());
    cluster.start().expect("start");
    let client = cluster.connect("postgres").await.unwrap();
    let fsync: String = client.query_one("show fsync", &[]).await.unwrap().get(0);
    assert_eq!(fsync, "on", "persistent clusters keep fsync on");
    cluster
        .execute(
            "postgres",
            "create table kept (id int primary key, note text); \
             insert into kept values (1, 'survives');",
        )
        .await
        .unwrap();
    drop(client);
    cluster.stop().expect("stop");
    assert!(!cluster.is_running());
    drop(cluster);
    assert!(
        data_dir.join("PG_VERSION").exists(),
        "persistent data is not deleted"
    );

    let mut cluster = LocalCluster::init_or_reuse(&data_dir, spec).expect("reuse");
    assert!(!cluster.was_initialized());
    cluster.start().expect("start again");
    let client = cluster.connect("postgres").await.unwrap();
    let note: String = client
        .query_one("select note from kept where id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(note, "survives");
    let port = cluster.port();
    drop(client);
    drop(cluster);
    assert!(
        !accepts_connections(port),
        "drop stops the persistent cluster"
    );
    assert!(data_dir.join("PG_VERSION").exists());
}

#[test]
fn refuses_non_empty_folder_without_cluster() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stray.txt"), "x").unwrap();
    let err = LocalCluster::init_or_reuse(dir.path(), ClusterSpec::default()).unwrap_err();
    assert!(format!("{err:#}").contains("not empty"), "{err:#}");
}

#[tokio::test]
async fn restart_keeps_port_and_data() {
    let mut cluster = LocalCluster::temporary().expect("temporary cluster");
    let port = cluster.port();
    cluster
        .execute(
            "postgres",
            "create table t (x int); insert into t values (42);",
        )
        .await
        .unwrap();

    let started = Instant::now();
    cluster.restart().expect("restart");
    eprintln!("restart took {:?}", started.elapsed());
    assert_eq!(cluster.port(), port);
    let client = cluster.connect("postgres").await.unwrap();
    let x: i32 = client
        .query_one("select x from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 42);
}

#[tokio::test]
async fn immediate_stop_breaks_connections_and_recovers() {
    // synchronous_commit=off (a temporary-cluster default) may lose the last
    // commits in a crash; turn it back on so the row must survive.
    let mut cluster =
        LocalCluster::temporary_with(&[("synchronous_commit", "on")]).expect("temporary cluster");
    cluster
        .execute(
            "postgres",
            "create table t (x int); insert into t values (7);",
        )
        .await
        .unwrap();
    let client = cluster.connect("postgres").await.unwrap();

    cluster.stop_immediate().expect("immediate stop");
    assert!(!cluster.is_running());
    assert!(client.query_one("select 1", &[]).await.is_err());

    cluster.start().expect("start after crash");
    let client = cluster.connect("postgres").await.unwrap();
    let x: i32 = client
        .query_one("select x from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 7);
}

#[tokio::test]
async fn prepend_hba_rules_win() {
    let cluster = LocalCluster::temporary().expect("temporary cluster");
    cluster
        .execute(
            "postgres",
            "set password_encryption = 'md5'; \
             create role md5user login password 'md5pass'; \
             create role blocked login password 'blockedpass';",
        )
        .await
        .unwrap();
    cluster
        .prepend_hba("host all md5user 127.0.0.1/32 md5")
        .unwrap();
    cluster
        .prepend_hba("host all blocked 127.0.0.1/32 reject")
        .unwrap();

    let connect_as = |user: &str, password: &str| {
        let mut config = cluster.superuser_config("postgres");
        config.user(user).password(password);
        config
    };
    let (client, conn) = connect_as("md5user", "md5pass")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("md5user logs in with md5");
    tokio::spawn(conn);
    let user: String = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "md5user");

    let err = connect_as("blocked", "blockedpass")
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("the prepended reject rule wins over scram-sha-256");
    let message = err.as_db_error().map(|e| e.message().to_string());
    assert!(
        message.as_deref().unwrap_or("").contains("pg_hba.conf"),
        "{err:?}"
    );

    // A broken line is reported, and the server keeps the old rules.
    assert!(cluster
        .prepend_hba("host all nobody 127.0.0.1/32 no-such-method")
        .is_err());
    assert_eq!(select_one(&cluster).await, 1);
}

#[tokio::test]
async fn drop_stops_server_and_removes_folder() {
    let cluster = LocalCluster::temporary().expect("temporary cluster");
    let port = cluster.port();
    let data_dir = cluster.data_dir().to_path_buf();
    assert!(accepts_connections(port));
    assert_eq!(select_one(&cluster).await, 1);

    let started = Instant::now();
    drop(cluster);
    eprintln!("drop took {:?}", started.elapsed());
    assert!(
        !accepts_connections(port),
        "port {port} still open after drop"
    );
    assert!(!data_dir.exists(), "temporary folder not removed");
}

#[test]
fn drop_during_panic_stops_server() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let cluster = LocalCluster::temporary().expect("temporary cluster");
        tx.send((cluster.port(), cluster.data_dir().to_path_buf()))
            .unwrap();
        panic!("simulated test failure");
    });
    assert!(result.is_err());
    let (port, data_dir) = rx.recv().unwrap();
    assert!(
        !accepts_connections(port),
        "port {port} still open after panic"
    );
    assert!(!data_dir.exists());
}

#[test]
fn port_in_use_error_quotes_the_log() {
    let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = squatter.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let spec = ClusterSpec {
        port,
        ..ClusterSpec::default()
    };
    let mut cluster = LocalCluster::init_or_reuse(&dir.path().join("pgdata"), spec).unwrap();
    let err = cluster.start().unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("Address already in use"), "{text}");
    assert!(!cluster.is_running());
    drop(squatter);
}
