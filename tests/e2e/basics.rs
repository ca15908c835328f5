use crate::harness::*;

#[test]
fn psql_through_pgweir_reaches_the_tenant_database() {
    let env = Env::start();
    let out = psql_ok(&env.alice(), "select current_database(), current_user");
    assert_eq!(out, "acme_main|acme_owner");
}

#[test]
fn routing_by_each_source() {
    let env = Env::start();
    // options
    assert_eq!(
        psql_ok(&env.alice(), "select current_database()"),
        "acme_main"
    );
    // user suffix
    let url = env.url("alice.acme", ALICE_PASSWORD, "app", "sslmode=disable");
    assert_eq!(psql_ok(&url, "select current_database()"), "acme_main");
    // branch via user suffix and via options
    let url = env.url("alice.acme--dev", ALICE_PASSWORD, "app", "sslmode=disable");
    assert_eq!(psql_ok(&url, "select name from branch_marker"), "dev");
    let url = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "options=endpoint=acme--dev sslmode=disable",
    );
    assert_eq!(psql_ok(&url, "select current_database()"), "acme_dev");
    // SNI
    let url = env.url(
        "alice",
        ALICE_PASSWORD,
        "app",
        "host=acme.db.test hostaddr=127.0.0.1 sslmode=require",
    );
    assert_eq!(psql_ok(&url, "select current_database()"), "acme_main");
    // conflict
    let url = env.url(
        "alice.beta",
        ALICE_PASSWORD,
        "app",
        "options=endpoint=acme sslmode=disable",
    );
    let err = psql_err(&url, "select 1");
    assert!(err.contains("conflicting endpoints"), "{err}");
}
