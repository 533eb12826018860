//! The proxy's own login to the server with the methods besides SCRAM that PostgreSQL may ask
//! for (md5, cleartext password, trust).
//!
//! The shared source cluster is made with `initdb -A scram-sha-256`; these tests prepend
//! pg_hba.conf rules for roles of their own, so no other test's logins change.

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::common::TestDb;
use crate::proxy::Proxy;

/// Serialises the edits of the shared source's pg_hba.conf (read, prepend, write, reload).
static HBA_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Prepends `rules` to the source's pg_hba.conf and waits until new connections are judged by
/// them. The file keeps its owner and mode (it is the postgres user's; the tests run as root).
async fn prepend_hba_rules(rules: &[String]) {
    let _guard = HBA_LOCK.lock().await;
    let path = crate::common::source().dir.join("data").join("pg_hba.conf");
    let old = std::fs::read_to_string(&path).expect("read pg_hba.conf");
    let new = format!("{}\n{old}", rules.join("\n"));
    // Written in place (not replaced), so owner and permissions stay as they were.
    std::fs::write(&path, new).expect("write pg_hba.conf");
    let admin = crate::common::connect(&crate::common::source().url("postgres")).await;
    let loaded_before: String = admin
        .query_one("SELECT pg_conf_load_time()::text", &[])
        .await
        .expect("pg_conf_load_time")
        .get(0);
    let errors: Vec<String> = admin
        .query(
            "SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL",
            &[],
        )
        .await
        .expect("read pg_hba_file_rules")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(errors.is_empty(), "pg_hba.conf does not parse: {errors:?}");
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    // The postmaster reloads on SIGHUP, in its own time; a backend it forks afterwards
    // inherits the new load time, so a fresh connection shows when the rules are in force.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fresh = crate::common::connect(&crate::common::source().url("postgres")).await;
        let loaded: String = fresh
            .query_one("SELECT pg_conf_load_time()::text", &[])
            .await
            .expect("pg_conf_load_time")
            .get(0);
        if loaded != loaded_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not reload pg_hba.conf"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates `role` with `password` (or none), stored with `encryption` (`md5` or
/// `scram-sha-256`), and lets it use the test's tables.
async fn create_role(db: &TestDb, role: &str, password: Option<&str>, encryption: &str) {
    let source = db.source_client().await;
    let password = password
        .map(|p| format!("PASSWORD '{p}'"))
        .unwrap_or_default();
    source
        .batch_execute(&format!(
            "SET password_encryption = '{encryption}';
             CREATE ROLE {role} LOGIN {password};
             GRANT ALL ON SCHEMA public TO {role};
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};"
        ))
        .await
        .unwrap_or_else(|e| panic!("create role {role}: {e}"));
}

/// The secret the server stores for `role` (NULL: none).
async fn stored_secret(db: &TestDb, role: &str) -> Option<String> {
    db.source_client()
        .await
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .expect("read pg_authid")
        .get(0)
}

async fn connect_as(proxy: &Proxy, user: &str, password: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&proxy.url_as(user, password), NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect through the proxy as {user}: {e}"));
    tokio::spawn(connection);
    client
}

/// Two clients of `user`, taking turns on one server connection (pool_size 1) over several
/// transactions each, see the server's `current_user` and each other's writes.
async fn works_through_the_proxy(proxy: &Proxy, user: &str, password: &str, table: &str) {
    let clients = [
        connect_as(proxy, user, password).await,
        connect_as(proxy, user, password).await,
    ];
    for round in 0..5i32 {
        for (c, client) in clients.iter().enumerate() {
            let c = c as i32;
            client.batch_execute("BEGIN").await.expect("BEGIN");
            let who: String = client
                .query_one("SELECT current_user::text", &[])
                .await
                .expect("current_user")
                .get(0);
            assert_eq!(
                who, user,
                "the server connection logs in as the client's role"
            );
            client
                .execute(
                    &format!("INSERT INTO {table} VALUES ($1, $2)"),
                    &[&c, &round],
                )
                .await
                .expect("insert");
            client.batch_execute("COMMIT").await.expect("COMMIT");
        }
    }
    let count: i64 = clients[1]
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 10, "every transaction of both clients committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_logs_in_to_the_server_with_md5_cleartext_and_trust() {
    let db = TestDb::new("proxy_srvauth").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE md5_hits (client int, n int); CREATE TABLE pw_hits (client int, n int); CREATE TABLE trust_hits (client int, n int)")
        .await
        .expect("create tables");
    let (md5_role, pw_role, trust_role) = (
        format!("{}_md5", db.name),
        format!("{}_pw", db.name),
        format!("{}_trust", db.name),
    );
    create_role(&db, &md5_role, Some("md5-secret"), "md5").await;
    // A SCRAM secret: the `password` method takes the password in clear and checks it
    // against whatever is stored.
    create_role(&db, &pw_role, Some("clear-secret"), "scram-sha-256").await;
    // No password at all on the server: only trust lets it in.
    create_role(&db, &trust_role, None, "scram-sha-256").await;
    let md5_secret = stored_secret(&db, &md5_role).await.unwrap_or_default();
    assert!(
        md5_secret.starts_with("md5"),
        "an md5 rule with a SCRAM secret would ask for SCRAM: {md5_secret}"
    );
    assert_eq!(stored_secret(&db, &trust_role).await, None);
    prepend_hba_rules(&[
        format!("host all {md5_role} 127.0.0.1/32 md5"),
        format!("host all {pw_role} 127.0.0.1/32 password"),
        format!("host all {trust_role} 127.0.0.1/32 trust"),
    ])
    .await;
    for mode in ["transaction", "session"] {
        // Session mode gives each client a connection of its own: room for both.
        let pool_size = if mode == "session" { 2 } else { 1 };
        let proxy = Proxy::start_for(
            &db,
            &db.plan_text(""),
            mode,
            pool_size,
            "",
            &[
                (md5_role.as_str(), "md5-secret"),
                (pw_role.as_str(), "clear-secret"),
                // The proxy's clients still log in with SCRAM, so the trusted role needs a
                // password in the plan; the server never asks for it.
                (trust_role.as_str(), "trust-proxy-secret"),
            ],
        )
        .await;
        for (role, password, table) in [
            (&md5_role, "md5-secret", "md5_hits"),
            (&pw_role, "clear-secret", "pw_hits"),
            (&trust_role, "trust-proxy-secret", "trust_hits"),
        ] {
            db.source_client()
                .await
                .batch_execute(&format!("TRUNCATE {table}"))
                .await
                .expect("truncate");
            works_through_the_proxy(&proxy, role, password, table).await;
        }
    }
}
