//! The proxy's own login to the server with the methods besides SCRAM that PostgreSQL may ask
//! for (md5, cleartext password, trust), and a server that refuses the proxy's password.
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
    let loaded_before = conf_load_time(&admin).await;
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
        if conf_load_time(&fresh).await != loaded_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not reload pg_hba.conf"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When the server connected to last loaded its configuration files.
async fn conf_load_time(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT pg_conf_load_time()::text", &[])
        .await
        .expect("pg_conf_load_time")
        .get(0)
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

/// The server takes the proxy's password for one user no more: that user's clients get the
/// server's own refusal (28P01) at once, not a timeout; another user's clients go on; and
/// once the password is right again, so is the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refusing_the_proxy_password_fails_that_user_only() {
    let db = TestDb::new("proxy_srvauth_wrong").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE hits (client int, n int)")
        .await
        .expect("create table");
    let (good, victim) = (format!("{}_good", db.name), format!("{}_victim", db.name));
    create_role(&db, &good, Some("good-secret"), "scram-sha-256").await;
    create_role(&db, &victim, Some("victim-secret"), "scram-sha-256").await;
    // Long enough that a client left to wait for a connection is told apart from one told
    // of the refusal; short idle timeout so that the pool must log in again.
    let proxy = Proxy::start_for(
        &db,
        &db.plan_text(""),
        "transaction",
        1,
        "query_wait_timeout = \"15s\"\nserver_idle_timeout = \"1s\"",
        &[
            (good.as_str(), "good-secret"),
            (victim.as_str(), "victim-secret"),
        ],
    )
    .await;
    works_through_the_proxy(&proxy, &victim, "victim-secret", "hits").await;
    let good_client = connect_as(&proxy, &good, "good-secret").await;
    // Logged in to the proxy while the server still took the password.
    let victim_client = connect_as(&proxy, &victim, "victim-secret").await;

    db.source_client()
        .await
        .batch_execute(&format!(
            "ALTER ROLE {victim} PASSWORD 'changed-behind-its-back'"
        ))
        .await
        .expect("change the password");
    // The victim's pooled connection, logged in with the old password, closes when idle.
    wait_no_server_connections(&proxy, &victim).await;

    let started = Instant::now();
    let refused = tokio_postgres::connect(&proxy.url_as(&victim, "victim-secret"), NoTls)
        .await
        .err()
        .expect("the proxy cannot log in to the server for this user");
    let waited = started.elapsed();
    let db_error = refused
        .as_db_error()
        .unwrap_or_else(|| panic!("an error from the proxy, not a broken socket: {refused}"));
    assert_eq!(db_error.code().code(), "28P01", "{db_error:?}");
    assert!(
        db_error
            .message()
            .contains("password authentication failed"),
        "the server's reason reaches the client: {db_error:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "the client waited {waited:?} for a login the server had refused"
    );

    // A client logged in before: its next transaction fails with the same reason, as an
    // ERROR that leaves its session to try again later.
    let started = Instant::now();
    let failed = victim_client
        .simple_query("SELECT 1")
        .await
        .expect_err("no server connection for this user");
    let db_error = failed
        .as_db_error()
        .unwrap_or_else(|| panic!("an error from the proxy: {failed}"));
    assert_eq!(db_error.code().code(), "28P01", "{db_error:?}");
    assert_eq!(db_error.severity(), "ERROR", "{db_error:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The other user, logged in before and after, is served as usual.
    for n in 0..3 {
        let row = good_client
            .query_one("SELECT current_user::text, $1::int4 + 1", &[&n])
            .await
            .expect("the other user's client still works");
        assert_eq!(row.get::<_, String>(0), good);
        assert_eq!(row.get::<_, i32>(1), n + 1);
    }
    let fresh = connect_as(&proxy, &good, "good-secret").await;
    fresh
        .batch_execute("BEGIN; SELECT 1; COMMIT")
        .await
        .expect("a new client of the other user works");
    assert!(
        proxy.status().await["clients"].as_u64().unwrap_or(0) >= 2,
        "the proxy still serves its clients"
    );

    db.source_client()
        .await
        .batch_execute(&format!("ALTER ROLE {victim} PASSWORD 'victim-secret'"))
        .await
        .expect("restore the password");
    db.source_client()
        .await
        .batch_execute("TRUNCATE hits")
        .await
        .expect("truncate");
    works_through_the_proxy(&proxy, &victim, "victim-secret", "hits").await;
    let who: String = victim_client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("the client refused before is served again")
        .get(0);
    assert_eq!(who, victim);
}

/// Waits until the proxy holds no server connection for `user`.
async fn wait_no_server_connections(proxy: &Proxy, user: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = proxy.status().await;
        let open = status["pools"]
            .as_array()
            .and_then(|pools| pools.iter().find(|p| p["user"] == user))
            .and_then(|p| p["server_connections"].as_u64());
        if open == Some(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "server connections of {user} stayed open: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
