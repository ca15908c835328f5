//! What provisioning does on a backend cluster: a tenant's owner role and database, created and dropped with
//! statements that are each safe to repeat, so that a retry after a crash or a failure finishes (or cleans up) what
//! an earlier attempt started.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::sqlscan::{quote_ident, quote_literal};

/// A cluster pgweir provisions on, with the login it provisions as.
#[derive(Debug, Clone)]
pub struct ClusterAdmin {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
}

/// A new physical database name: `pgweir_db_` and 16 random hex digits. Every role on a cluster can list
/// `pg_database`, `pg_roles` and `pg_stat_activity`, so physical names say nothing about the tenant or branch they
/// serve; the catalog records which is which (`tenants.backend_database`, `branches.backend_database`).
pub fn new_database_name() -> String {
    format!("pgweir_db_{}", random_hex())
}

/// A new physical role name: `pgweir_role_` and 16 random hex digits (see [`new_database_name`]).
pub fn new_role_name() -> String {
    format!("pgweir_role_{}", random_hex())
}

fn random_hex() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

impl ClusterAdmin {
    /// Connects to the cluster's `postgres` database.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname("postgres")
            .application_name("pgweir-provisioning")
            .connect_timeout(Duration::from_secs(5));
        if let Some(p) = &self.password {
            cfg.password(p);
        }
        let (client, conn) = cfg.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

/// Creates or updates the owner role (login, no superuser/createdb/createrole/replication, `connection_limit`,
/// `password`), then creates its database if missing, and closes the database to everyone else.
pub async fn create_tenant(
    client: &Client,
    database: &str,
    role: &str,
    password: &str,
    connection_limit: i32,
) -> Result<(), tokio_postgres::Error> {
    let role_q = quote_ident(role);
    let role_exists = !client
        .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await?
        .is_empty();
    // The cluster gets a SCRAM verifier, never the password itself (statements can end up in its logs).
    let verifier = crate::auth::scram::ScramVerifier::generate(password, 4096).to_string();
    let attrs = format!(
        "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT {connection_limit} PASSWORD {}",
        quote_literal(&verifier)
    );
    if role_exists {
        client
            .batch_execute(&format!("ALTER ROLE {role_q} WITH {attrs}"))
            .await?;
    } else {
        client
            .batch_execute(&format!("CREATE ROLE {role_q} WITH {attrs}"))
            .await?;
    }
    let db_exists = !client
        .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
        .await?
        .is_empty();
    let db_q = quote_ident(database);
    if !db_exists {
        client
            .batch_execute(&format!("CREATE DATABASE {db_q} OWNER {role_q}"))
            .await?;
    }
    client
        .batch_execute(&format!(
            "REVOKE ALL ON DATABASE {db_q} FROM PUBLIC; GRANT ALL ON DATABASE {db_q} TO {role_q}"
        ))
        .await?;
    Ok(())
}

/// Sets the owner role's connection limit (a plan change).
pub async fn set_connection_limit(
    client: &Client,
    role: &str,
    limit: i32,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "ALTER ROLE {} CONNECTION LIMIT {limit}",
            quote_ident(role)
        ))
        .await
}

/// Drops the tenant's databases (sessions on them are ended) and its owner role; missing objects are fine.
pub async fn drop_tenant(
    client: &Client,
    databases: &[String],
    role: &str,
) -> Result<(), tokio_postgres::Error> {
    for db in databases {
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(db)
            ))
            .await?;
    }
    client
        .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(role)))
        .await?;
    Ok(())
}
