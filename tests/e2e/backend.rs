//! How pgweir logs in to backends: every auth method the server may ask for, and TLS to the backend.

use crate::harness::*;

/// A tenant whose backend role `role` logs in with `password` (None: trust).
fn tenant(id: &str, role: &str, password: Option<&str>, cluster: &str) -> String {
    let pw = password
        .map(|p| format!("backend_password = \"{p}\""))
        .unwrap_or_default();
    format!(
        r#"
[[tenants]]
id = "{id}"
database = "app"
cluster = "{cluster}"
backend_database = "acme_main"
backend_user = "{role}"
{pw}
[[tenants.users]]
name = "alice"
password = "{verifier}"
"#,
        verifier = scram(ALICE_PASSWORD)
    )
}

fn login(env: &Env, endpoint: &str) -> String {
    env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        &format!("options=endpoint={endpoint} sslmode=disable"),
    )
}

#[test]
fn backend_auth_methods_scram_md5_cleartext_trust() {
    let extra = [
        tenant("bscram", "acme_owner", Some(OWNER_PASSWORD), "main"),
        tenant("bmd5", "md5_role", Some("md5-pw"), "main"),
        tenant("bplain", "plain_role", Some("plain-pw"), "main"),
        tenant("btrust", "trust_role", None, "main"),
        tenant("bwrong", "acme_owner", Some("not-the-password"), "main"),
    ]
    .concat();
    let env = Env::with(Setup {
        extra_config: extra,
        ..Setup::default()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for sql in [
            "SET password_encryption = 'md5'; CREATE ROLE md5_role LOGIN PASSWORD 'md5-pw'",
            "CREATE ROLE plain_role LOGIN PASSWORD 'plain-pw'",
            "CREATE ROLE trust_role LOGIN",
            "GRANT CONNECT ON DATABASE acme_main TO md5_role, plain_role, trust_role",
        ] {
            env.cluster.execute("postgres", sql).await.unwrap();
        }
    });
    env.cluster
        .prepend_hba("host all md5_role 127.0.0.1/32 md5")
        .unwrap();
    env.cluster
        .prepend_hba("host all plain_role 127.0.0.1/32 password")
        .unwrap();
    env.cluster
        .prepend_hba("host all trust_role 127.0.0.1/32 trust")
        .unwrap();

    for (endpoint, role) in [
        ("bscram", "acme_owner"),
        ("bmd5", "md5_role"),
        ("bplain", "plain_role"),
        ("btrust", "trust_role"),
    ] {
        assert_eq!(
            psql_ok(&login(&env, endpoint), "select current_user"),
            role,
            "{endpoint}"
        );
    }
    // pgweir's own backend credentials are wrong: the client learns that pgweir could not log in, not the
    // backend role's name or why.
    let err = psql_err(&login(&env, "bwrong"), "select 1");
    assert!(
        err.contains("could not log in to the database server"),
        "{err}"
    );
    assert!(!err.contains("acme_owner"), "{err}");
}

#[test]
fn backend_tls_verify_full_and_require() {
    for mode in ["verify-full", "require"] {
        let env = Env::with(Setup {
            backend_tls: Some(mode),
            ..Setup::default()
        });
        let out = psql_ok(
            &env.alice(),
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        );
        assert_eq!(out, "t", "backend connection is TLS in mode {mode}");
    }
}

#[test]
fn backend_tls_verify_full_refuses_an_unknown_certificate() {
    let other = tempfile::tempdir().unwrap();
    let ca = other.path().join("other.crt");
    pgweir::tls::ensure_self_signed(&ca, &other.path().join("other.key"), &["localhost"]).unwrap();
    let env = Env::with(Setup {
        backend_tls: Some("verify-full"),
        extra_config: format!(
            "[clusters.wrongca]\nhost = \"localhost\"\nport = $PORT\ntls = \"verify-full\"\nca_file = {ca:?}\n{}",
            tenant("wrongca", "acme_owner", Some(OWNER_PASSWORD), "wrongca")
        ),
        ..Setup::default()
    });
    // Same server, two cluster entries: the one with the right CA works, the other is refused.
    assert_eq!(psql_ok(&env.alice(), "select 1"), "1");
    let err = psql_err(&login(&env, "wrongca"), "select 1");
    assert!(
        err.contains("could not connect to the database server"),
        "{err}"
    );
}
