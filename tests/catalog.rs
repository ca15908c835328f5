//! The control-plane catalog against a real PostgreSQL 15: migrations apply once (also when instances start
//! together), a newer catalog is refused, constraints hold, and tenant changes are announced.

use std::time::Duration;

use futures_util::StreamExt;
use pgweir::catalog::{self, CatalogError, SCHEMA_VERSION, TENANT_CHANNEL};
use pgweir::pgcluster::LocalCluster;

async fn control_db(cluster: &LocalCluster) -> tokio_postgres::Client {
    cluster
        .execute("postgres", "CREATE DATABASE control")
        .await
        .unwrap();
    cluster.connect("control").await.unwrap()
}

#[tokio::test]
async fn migrations_apply_once_and_a_newer_catalog_is_refused() {
    let cluster = LocalCluster::temporary().expect("temporary cluster");
    let mut a = control_db(&cluster).await;
    let mut b = cluster.connect("control").await.unwrap();
    assert_eq!(catalog::version(&a).await.unwrap(), 0);

    // Two instances starting together: each migration is applied exactly once.
    let (ra, rb) = tokio::join!(catalog::migrate(&mut a), catalog::migrate(&mut b));
    let mut applied = ra.unwrap();
    applied.extend(rb.unwrap());
    assert_eq!(applied, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    assert_eq!(catalog::version(&a).await.unwrap(), SCHEMA_VERSION);
    assert!(catalog::migrate(&mut a).await.unwrap().is_empty());

    // The default plans are there; the constraints refuse bad rows.
    let plans: Vec<String> = a
        .query("SELECT name FROM pgweir.plans ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(plans, ["enterprise", "free", "pro", "team"]);
    // The tiers: free is one database of 100 MB, pro ten databases of 10 GB, team unlimited databases of 100 GB.
    let tiers: Vec<(String, i32, Option<i64>)> = a
        .query(
            "SELECT name, max_branches, (spec->>'storage_bytes')::bigint FROM pgweir.plans ORDER BY name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        tiers,
        [
            ("enterprise".into(), i32::MAX, None),
            ("free".into(), 0, Some(100 << 20)),
            ("pro".into(), 9, Some(10 << 30)),
            ("team".into(), i32::MAX, Some(100 << 30)),
        ]
    );
    a.batch_execute(
        "INSERT INTO pgweir.clusters (name, host, port, admin_user) VALUES ('c1', '127.0.0.1', 5432, 'postgres')",
    )
    .await
    .unwrap();
    for bad in ["Bad_Id", "a--b", "-a", ""] {
        let err = a
            .execute(
                "INSERT INTO pgweir.tenants (id, state, cluster, plan, database, backend_database, backend_role, \
                 backend_password_enc, spec) VALUES ($1, 'ready', 'c1', 'free', 'app', 'd', 'r', '\\x00', '{}')",
                &[&bad],
            )
            .await
            .expect_err(bad);
        assert_eq!(err.code().unwrap().code(), "23514", "{bad}: {err}");
    }

    // A catalog newer than the binary is refused, with a message that says what to do.
    a.execute(
        "INSERT INTO pgweir.schema_version (version) VALUES ($1)",
        &[&(SCHEMA_VERSION + 1)],
    )
    .await
    .unwrap();
    let err = catalog::migrate(&mut a).await.unwrap_err();
    assert!(
        matches!(err, CatalogError::NewerSchema { found, supported } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade pgweir"), "{err}");
}

#[tokio::test]
async fn tenant_changes_are_announced() {
    let cluster = LocalCluster::temporary().expect("temporary cluster");
    let mut admin = control_db(&cluster).await;
    catalog::migrate(&mut admin).await.unwrap();

    // A listener of its own, as every pgweir instance has.
    let (listener, mut connection) = cluster
        .superuser_config("control")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN {TENANT_CHANNEL}"))
        .await
        .unwrap();

    // Each statement its own transaction (Postgres folds identical notifications of one transaction into one).
    for sql in [
        "INSERT INTO pgweir.clusters (name, host, port, admin_user) VALUES ('c1', '127.0.0.1', 5432, 'postgres')",
        "INSERT INTO pgweir.tenants (id, state, cluster, plan, database, backend_database, backend_role, \
         backend_password_enc, spec) VALUES ('acme', 'ready', 'c1', 'free', 'app', 'd', 'r', '\\x00', '{}')",
        "INSERT INTO pgweir.tenant_users (tenant, name, scram) VALUES ('acme', 'alice', 'x')",
        "UPDATE pgweir.tenants SET plan = 'pro' WHERE id = 'acme'",
        "DELETE FROM pgweir.tenants WHERE id = 'acme'",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    // The cluster insert reloads everything ("*"); tenant insert, user insert, update, delete each name the
    // tenant.
    let mut got = Vec::new();
    while got.len() < 5 {
        let n = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a notification")
            .expect("the listener is alive");
        got.push(n);
    }
    assert!(got.iter().all(|(channel, _)| channel == TENANT_CHANNEL));
    let payloads: Vec<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(payloads, ["*", "acme", "acme", "acme", "acme"]);
}

/// Usage flushes are written exactly once (a retry of a flush whose commit answer was lost adds nothing), and a
/// revoked bootstrap token is not revived by a restart that still has it in the environment.
#[tokio::test]
async fn usage_is_written_once_and_revoked_tokens_stay_revoked() {
    use pgweir::catalog::secret::SecretKey;
    use pgweir::catalog::store::Catalog;
    use pgweir::pool::UsageDelta;
    use std::sync::Arc;

    let cluster = LocalCluster::temporary().expect("temporary cluster");
    let _ = control_db(&cluster).await;
    let key = SecretKey::from_base64(&SecretKey::generate_base64()).unwrap();
    let cat = Catalog::new(
        cluster.superuser_dsn("control").parse().unwrap(),
        Arc::new(key),
    );
    cat.migrate().await.unwrap();

    let d = UsageDelta {
        connections: 1,
        requests: 10,
        transactions: 5,
        bytes_in: 100,
        bytes_out: 1000,
    };
    let rows = vec![("t1".to_owned(), d)];
    cat.add_usage("i1", 1, &rows).await.unwrap();
    cat.add_usage("i1", 1, &rows).await.unwrap(); // the retry of flush 1
    cat.add_usage("i2", 1, &rows).await.unwrap(); // another instance's flush 1
    cat.add_usage("i1", 2, &rows).await.unwrap();
    let total = cat.usage("t1", None).await.unwrap();
    assert_eq!(total.requests, 30, "three distinct flushes: {total:?}");
    assert_eq!(total.bytes_out, 3000);

    async fn names(c: &Catalog) -> Vec<String> {
        let mut v: Vec<String> = c
            .tokens()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        v.sort();
        v
    }
    cat.put_token("bootstrap", "first-value", "admin", false)
        .await
        .unwrap();
    assert_eq!(names(&cat).await, ["bootstrap"]);
    assert!(cat.revoke_token("bootstrap").await.unwrap());
    cat.put_token("bootstrap", "first-value", "admin", false)
        .await
        .unwrap();
    assert!(
        names(&cat).await.is_empty(),
        "a revoked bootstrap token stays revoked"
    );
    cat.put_token("bootstrap", "second-value", "admin", false)
        .await
        .unwrap();
    assert_eq!(
        names(&cat).await,
        ["bootstrap"],
        "a new value is a new token"
    );
    cat.revoke_token("bootstrap").await.unwrap();
    cat.put_token("bootstrap", "second-value", "admin", true)
        .await
        .unwrap();
    assert_eq!(
        names(&cat).await,
        ["bootstrap"],
        "the API's put replaces a revoked token"
    );
}
