//! The control plane's catalog: clusters, plans, tenants and their users and branches, admin API tokens, the audit
//! log and usage — in a real Postgres database (the *control database*) under the schema `pgweir`, so that several
//! pgweir instances can share it.
//!
//! The schema is created and upgraded by versioned migrations ([`migrate`]), applied at start in one transaction
//! under an advisory lock (instances starting together apply each migration once). A catalog newer than this
//! binary understands is refused with a clear message instead of being used half-understood.
//!
//! Changes of a tenant (its row, users or branches) are announced with `NOTIFY pgweir_tenants, '<tenant id>'` by
//! triggers, whoever makes them.

use tokio_postgres::Client;

pub mod branches;
pub mod control;
pub mod directory;
pub mod provision;
pub mod secret;
pub mod store;
pub mod tenants;

/// Migrations in order: (version, SQL). A released migration is never edited; a change is a new one.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_catalog.sql")),
    (2, include_str!("migrations/0002_usage_flushes.sql")),
    (3, include_str!("migrations/0003_branches.sql")),
    (4, include_str!("migrations/0004_plan_specs.sql")),
    (5, include_str!("migrations/0005_read_only.sql")),
    (6, include_str!("migrations/0006_plan_tiers.sql")),
];

/// The catalog version this binary reads and writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The channel of tenant change announcements (the payload is the tenant id).
pub const TENANT_CHANNEL: &str = "pgweir_tenants";

/// Why the catalog cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("the catalog is at version {found}, newer than this pgweir understands (up to {supported}): upgrade pgweir")]
    NewerSchema { found: i32, supported: i32 },
    #[error("catalog migration {version} failed: {source}")]
    Migration {
        version: i32,
        source: tokio_postgres::Error,
    },
    #[error("control database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Connects to the control database; the connection is driven by a task of its own.
pub(crate) async fn connect(db: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = db.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "catalog connection ended");
        }
    });
    Ok(client)
}

/// Brings the catalog schema to [`SCHEMA_VERSION`]; returns the versions it applied (none when it was current).
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, CatalogError> {
    let tx = client.transaction().await?;
    // One instance at a time; the lock ends with the transaction.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         SELECT pg_advisory_xact_lock(hashtext('pgweir.catalog.migrate'));
         CREATE SCHEMA IF NOT EXISTS pgweir;
         CREATE TABLE IF NOT EXISTS pgweir.schema_version (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await?;
    let current: i32 = tx
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM pgweir.schema_version",
            &[],
        )
        .await?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(CatalogError::NewerSchema {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    let mut applied = Vec::new();
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql)
            .await
            .map_err(|source| CatalogError::Migration { version, source })?;
        tx.execute(
            "INSERT INTO pgweir.schema_version (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        applied.push(version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// The catalog version of the control database (0 when it has none).
pub async fn version(client: &Client) -> Result<i32, CatalogError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('pgweir.schema_version') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM pgweir.schema_version",
            &[],
        )
        .await?
        .get(0))
}
