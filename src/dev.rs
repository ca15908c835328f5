//! `pgweir dev`: a PostgreSQL cluster in a data folder, pgweir in front of it and a demo tenant — one command to a
//! working connection string. Running it again reuses the folder: data, passwords and the certificate persist.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rand::distributions::Alphanumeric;
use rand::Rng;

use crate::catalog::control::ADMIN_TOKEN_ENV;
use crate::catalog::provision::ClusterAdmin;
use crate::catalog::secret::SecretKey;
use crate::catalog::tenants::{self, Created, NewTenant};
use crate::config::Config;
use crate::pgcluster::{free_port, ClusterSpec, LocalCluster};
use crate::server::Server;

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
    /// No longer used (the catalog generates backend passwords); kept so that old folders read the same.
    #[allow(dead_code)]
    backend: String,
    demo: String,
    /// The admin API token (unless `PGWEIR_ADMIN_TOKEN` is set).
    admin_token: String,
}

fn random_password() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

fn load_or_create_secrets(path: &Path) -> anyhow::Result<Secrets> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let kept = |i: usize| {
        lines
            .get(i)
            .map(|s| s.to_string())
            .unwrap_or_else(random_password)
    };
    let s = Secrets {
        superuser: kept(0),
        backend: kept(1),
        demo: kept(2),
        admin_token: kept(3),
    };
    if lines.len() >= 4 {
        return Ok(s);
    }
    std::fs::write(
        path,
        format!(
            "{}\n{}\n{}\n{}\n",
            s.superuser, s.backend, s.demo, s.admin_token
        ),
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
const CONTROL_DB: &str = "pgweir_control";

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

    // The catalog lives in the same cluster; its key and the demo's secrets stay in the data folder.
    if cluster
        .connect("postgres")
        .await?
        .query(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&CONTROL_DB],
        )
        .await?
        .is_empty()
    {
        cluster
            .execute("postgres", &format!("CREATE DATABASE {CONTROL_DB}"))
            .await?;
    }
    let key_file = data_dir.join("catalog.key");
    if !key_file.exists() {
        std::fs::write(&key_file, SecretKey::generate_base64())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
        }
    }

    let cert = data_dir.join("server.crt");
    let key = data_dir.join("server.key");
    crate::tls::ensure_self_signed(&cert, &key, &["localhost", "*.localhost", "127.0.0.1"])?;

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

[catalog]
url = {control_url:?}
key_file = {key_file:?}
public_host = "{public_host}"

[pool]
max_size = 20
"#,
        listen = opts.listen,
        admin_listen = opts.admin_listen,
        cert = cert.display(),
        key = key.display(),
        control_url = cluster.superuser_dsn(CONTROL_DB),
        public_host = opts.listen.ip(),
    );
    let config_path = data_dir.join("pgweir.toml");
    std::fs::write(&config_path, &config_text)?;
    let cfg = Config::parse(&config_text)
        .map_err(|e| anyhow::anyhow!("generated config is invalid:\n{e}"))?;
    let (directory, control) = crate::catalog::control::directory_for(&cfg).await?;
    let control = control.expect("the generated config has a catalog");

    // The local cluster, the admin token and the demo tenant, through the same code as the admin API.
    control
        .catalog
        .put_cluster(
            &ClusterAdmin {
                name: "local".into(),
                host: "127.0.0.1".into(),
                port: cluster.port(),
                user: "postgres".into(),
                password: Some(secrets.superuser.clone()),
            },
            100,
            None,
        )
        .await?;
    // PGWEIR_ADMIN_TOKEN was stored at start (as `bootstrap`); otherwise the folder's own token is.
    let admin_token = match std::env::var(ADMIN_TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty())
    {
        Some(t) => t,
        None => {
            control
                .catalog
                .put_token("dev", &secrets.admin_token, "admin", true)
                .await?;
            secrets.admin_token.clone()
        }
    };
    let spec = serde_json::json!({"plan": "pro", "cluster": "local", "database": DEMO_DATABASE, "user": DEMO_USER});
    let demo = NewTenant {
        plan: "pro".into(),
        cluster: Some("local".into()),
        database: DEMO_DATABASE.into(),
        user: DEMO_USER.into(),
        password: Some(secrets.demo.clone()),
    };
    match tenants::create(&control, "dev", DEMO_TENANT, &spec, &demo).await {
        Ok(Created::Ready { .. } | Created::Existing(_)) => {}
        Ok(Created::Failed { reason, .. }) => {
            anyhow::bail!("creating the demo tenant failed: {reason}")
        }
        Err(e) => anyhow::bail!("creating the demo tenant failed: {e}"),
    }

    let server = Server::bind_with_control(cfg, directory, Some(control)).await?;
    let addr = server.local_addr();

    eprintln!(
        "pgweir dev: PostgreSQL {} on port {}, pgweir on {addr}",
        pg_dir.display(),
        cluster.port()
    );
    if let Some(admin) = server.admin_addr() {
        eprintln!("pgweir dev: admin API on http://{admin} (token: {admin_token})");
        eprintln!(
            "pgweir dev:   curl -H 'Authorization: Bearer {admin_token}' -X PUT -d '{{}}' http://{admin}/v1/tenants/my-app"
        );
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
