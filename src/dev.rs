//! `pgweir dev`: a PostgreSQL cluster in a data folder, pgweir in front of it and a demo tenant — one command to a
//! working connection string. Running it again reuses the folder: data, passwords and the certificate persist.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rand::distributions::Alphanumeric;
use rand::Rng;

use crate::auth::scram::ScramVerifier;
use crate::config::Config;
use crate::pgcluster::{free_port, ClusterSpec, LocalCluster};
use crate::server::Server;
use crate::tenant::StaticDirectory;

/// Options of `pgweir dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub data_dir: PathBuf,
    pub listen: std::net::SocketAddr,
    /// Address of the admin HTTP listener (health, readiness, metrics).
    pub admin_listen: std::net::SocketAddr,
}

/// Secrets generated on the first run, kept in `<data_dir>/dev-secrets` (mode 0600).
struct Secrets {
    superuser: String,
    backend: String,
    demo: String,
}

fn random_password() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

fn load_or_create_secrets(path: &Path) -> anyhow::Result<Secrets> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let lines: Vec<&str> = text.lines().collect();
        if let [superuser, backend, demo, ..] = lines.as_slice() {
            return Ok(Secrets {
                superuser: superuser.to_string(),
                backend: backend.to_string(),
                demo: demo.to_string(),
            });
        }
    }
    let s = Secrets {
        superuser: random_password(),
        backend: random_password(),
        demo: random_password(),
    };
    std::fs::write(
        path,
        format!("{}\n{}\n{}\n", s.superuser, s.backend, s.demo),
    )?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(s)
}

/// The demo tenant's names.
pub const DEMO_TENANT: &str = "demo";
pub const DEMO_USER: &str = "demo";
pub const DEMO_DATABASE: &str = "demo";
const DEMO_BACKEND_DB: &str = "tenant_demo_main";
const DEMO_BACKEND_ROLE: &str = "tenant_demo_owner";

/// Runs dev mode until SIGINT/SIGTERM.
pub async fn run(opts: DevOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating {}", opts.data_dir.display()))?;
    let data_dir = opts.data_dir.canonicalize()?;
    let secrets = load_or_create_secrets(&data_dir.join("dev-secrets"))?;

    let pg_dir = data_dir.join("postgres");
    let spec = ClusterSpec {
        superuser: "postgres".into(),
        superuser_password: secrets.superuser.clone(),
        port: free_port(),
        ..ClusterSpec::default()
    };
    let mut cluster = tokio::task::block_in_place(|| -> anyhow::Result<LocalCluster> {
        let mut c = LocalCluster::init_or_reuse(&pg_dir, spec)?;
        c.start()?;
        Ok(c)
    })?;
    tracing::info!(port = cluster.port(), data = %pg_dir.display(), "PostgreSQL is running");

    provision_demo(&cluster, &secrets).await?;

    let cert = data_dir.join("server.crt");
    let key = data_dir.join("server.key");
    crate::tls::ensure_self_signed(&cert, &key, &["localhost", "*.localhost", "127.0.0.1"])?;

    let verifier = ScramVerifier::generate(&secrets.demo, 4096);
    let config_text = format!(
        r#"# Written by `pgweir dev` on every start; edit a copy and run it with `pgweir serve --config`.
[proxy]
listen = "{listen}"
base_domain = "localhost"
default_tenant = "{DEMO_TENANT}"

[tls]
cert = "{cert}"
key = "{key}"

[admin]
listen = "{admin_listen}"

[pool]
max_size = 20

[clusters.local]
host = "127.0.0.1"
port = {port}

[[tenants]]
id = "{DEMO_TENANT}"
database = "{DEMO_DATABASE}"
cluster = "local"
backend_database = "{DEMO_BACKEND_DB}"
backend_user = "{DEMO_BACKEND_ROLE}"
backend_password = "{backend}"

[[tenants.users]]
name = "{DEMO_USER}"
password = "{verifier}"
"#,
        listen = opts.listen,
        admin_listen = opts.admin_listen,
        cert = cert.display(),
        key = key.display(),
        port = cluster.port(),
        backend = secrets.backend,
    );
    let config_path = data_dir.join("pgweir.toml");
    std::fs::write(&config_path, &config_text)?;
    let cfg = Config::parse(&config_text)
        .map_err(|e| anyhow::anyhow!("generated config is invalid:\n{e}"))?;
    let directory = Arc::new(StaticDirectory::from_config(&cfg));
    let server = Server::bind(cfg, directory).await?;
    let addr = server.local_addr();

    eprintln!(
        "pgweir dev: PostgreSQL {} on port {}, pgweir on {addr}",
        pg_dir.display(),
        cluster.port()
    );
    if let Some(admin) = server.admin_addr() {
        eprintln!("pgweir dev: admin API on http://{admin} (/healthz, /readyz, /metrics)");
    }
    eprintln!("pgweir dev: config written to {}", config_path.display());
    eprintln!(
        "pgweir dev: connect with psql \"<the line below>\"; Ctrl-C stops pgweir and PostgreSQL"
    );
    println!(
        "postgres://{DEMO_USER}:{}@{}:{}/{DEMO_DATABASE}",
        secrets.demo,
        addr.ip(),
        addr.port()
    );

    server.run(crate::server::shutdown_signal()).await;
    tokio::task::block_in_place(|| cluster.stop())?;
    eprintln!("pgweir dev: stopped");
    Ok(())
}

/// Creates (idempotently) the demo tenant's backend role and database, as the platform's provisioning would.
async fn provision_demo(cluster: &LocalCluster, secrets: &Secrets) -> anyhow::Result<()> {
    let client = cluster.connect("postgres").await?;
    let role_exists = !client
        .query(
            "SELECT 1 FROM pg_roles WHERE rolname = $1",
            &[&DEMO_BACKEND_ROLE],
        )
        .await?
        .is_empty();
    let password = secrets.backend.replace('\'', "''");
    if role_exists {
        client
            .batch_execute(&format!(
                "ALTER ROLE {DEMO_BACKEND_ROLE} WITH LOGIN PASSWORD '{password}'"
            ))
            .await?;
    } else {
        client
            .batch_execute(&format!(
                "CREATE ROLE {DEMO_BACKEND_ROLE} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{password}'"
            ))
            .await?;
    }
    let db_exists = !client
        .query(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&DEMO_BACKEND_DB],
        )
        .await?
        .is_empty();
    if !db_exists {
        client
            .batch_execute(&format!(
                "CREATE DATABASE {DEMO_BACKEND_DB} OWNER {DEMO_BACKEND_ROLE}"
            ))
            .await?;
        client
            .batch_execute(&format!(
                "REVOKE CONNECT ON DATABASE {DEMO_BACKEND_DB} FROM PUBLIC"
            ))
            .await?;
    }
    Ok(())
}
