//! The proxy's limits and timeouts against real servers: too many clients, idle server
//! connections closed, and serving with the other server down.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::common::servers::free_port;
use crate::common::TestDb;
use crate::proxy::Proxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_max_client_connections_gets_53300_and_the_others_go_on() {
    let db = TestDb::new("proxy_max_clients").await;
    let proxy = Proxy::start(&db, "transaction", 2, "max_client_connections = 2").await;
    let (first, second) = (proxy.client().await, proxy.client().await);
    let refused = tokio_postgres::connect(&proxy.url(), NoTls)
        .await
        .err()
        .expect("a third client is refused");
    assert_eq!(
        refused.code(),
        Some(&SqlState::TOO_MANY_CONNECTIONS),
        "{refused}"
    );
    for client in [&first, &second] {
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    }
    // A place freed is a place taken.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    let third = loop {
        match tokio_postgres::connect(&proxy.url(), NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                break client;
            }
            Err(e) => assert!(Instant::now() < deadline, "no place freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    third.batch_execute("SELECT 1").await.unwrap();
}

/// The proxy's server connections for its user, as the source sees them (the test's
/// clients log in as that user only through the proxy).
async fn server_connections(db: &TestDb, proxy: &Proxy) -> i64 {
    db.source_client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE usename = $1 AND backend_type = 'client backend'",
            &[&proxy.user],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connections_close_after_server_idle_timeout() {
    let db = TestDb::new("proxy_idle").await;
    let proxy = Proxy::start(&db, "transaction", 4, "server_idle_timeout = \"1s\"").await;
    let clients = [proxy.client().await, proxy.client().await];
    // Two transactions at once: two server connections.
    let (a, b) = (&clients[0], &clients[1]);
    tokio::try_join!(
        a.batch_execute("SELECT pg_sleep(0.3)"),
        b.batch_execute("SELECT pg_sleep(0.3)")
    )
    .unwrap();
    assert!(server_connections(&db, &proxy).await >= 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server_connections(&db, &proxy).await > 0 {
        assert!(
            Instant::now() < deadline,
            "idle server connections outlived server_idle_timeout"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The clients never noticed: their next transaction gets a new connection.
    let one: i32 = a.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_serves_with_the_other_server_down() {
    let db = TestDb::new("proxy_other_down").await;
    let nobody = format!("postgres://postgres@127.0.0.1:{}/{}", free_port(), db.name);
    let plan = db.plan_text("").replace(&db.target.url(&db.name), &nobody);
    assert!(plan.contains(&nobody), "the target URL was replaced");
    let source = db.source_client().await;
    let proxy = Proxy::start_with(&db, &source, &plan, "transaction", 2, "").await;
    let client = proxy.client().await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let status = proxy.status().await;
    assert_eq!(status["backend"], "source", "{status}");
}

/// `pool_size` is the user's, not each worker's: with two workers sharing a pool of two, the
/// clients of the worker whose connection sits in another client's open transaction are
/// served on the other worker's connection, in turn with that worker's own clients, instead
/// of waiting out `query_wait_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_borrows_a_connection_another_worker_has_idle() {
    let db = TestDb::new("proxy_borrow").await;
    let proxy = Proxy::start(
        &db,
        "transaction",
        2,
        "workers = 2\nquery_wait_timeout = \"3s\"",
    )
    .await;
    let holder = proxy.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // New clients go to the worker with the fewest: some of these land on the holder's, and
    // their logins need a connection too. A wait past query_wait_timeout fails the test.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(proxy.client().await);
    }
    let workers = proxy.status().await["workers"].clone();
    assert_eq!(workers.as_array().map(Vec::len), Some(2), "{workers}");
    // All at once on the one free connection: a session woken for it must get it, not see
    // a client of that connection's own worker take it first, again and again.
    let rounds = clients.iter().enumerate().map(|(i, client)| async move {
        for round in 0..20i32 {
            let tag = i as i32 * 1000 + round;
            let got: i32 = client
                .query_one("SELECT $1::int", &[&tag])
                .await
                .unwrap_or_else(|e| panic!("client {i}, round {round}: {e}"))
                .get(0);
            assert_eq!(got, tag);
        }
    });
    futures_util::future::join_all(rounds).await;
    assert!(
        server_connections(&db, &proxy).await <= 2,
        "more server connections than pool_size"
    );
    // The held connection is still the holder's, and goes back when its transaction ends.
    holder.batch_execute("COMMIT").await.unwrap();
    let one: i32 = clients[0].query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// Clients per worker, as `/status` reports them.
async fn clients_per_worker(proxy: &Proxy) -> Vec<u64> {
    proxy.status().await["workers"]
        .as_array()
        .expect("workers in /status")
        .iter()
        .map(|w| w["clients"].as_u64().unwrap_or_default())
        .collect()
}

/// A session of one worker queued at another worker's full pool is served there when that
/// pool gets room back (a connection broke): bb8 would make a connection only for a session
/// waiting on it, and this one waits on its own worker's pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_borrower_gets_the_connection_made_for_room_a_broken_one_left() {
    let db = TestDb::new("proxy_borrow_room").await;
    let proxy = Proxy::start(
        &db,
        "transaction",
        2,
        "workers = 2\nquery_wait_timeout = \"10s\"",
    )
    .await;
    // No session left from the start-up probe: placement by fewest clients is then known.
    let deadline = Instant::now() + Duration::from_secs(10);
    while clients_per_worker(&proxy).await != [0, 0] {
        assert!(Instant::now() < deadline, "sessions did not settle");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each worker's only connection is held in a transaction.
    let holder = proxy.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let neighbour = proxy.client().await;
    let neighbour_pid = hold_a_transaction(&neighbour).await;
    assert_eq!(clients_per_worker(&proxy).await, [1, 1]);
    // The third client goes to the first worker; its login waits for a connection, and
    // after a moment is queued at the second worker's pool too.
    let url = proxy.url();
    let borrower = tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&url, NoTls).await?;
        tokio::spawn(connection);
        client
            .query_one("SELECT 1", &[])
            .await
            .map(|row| row.get::<_, i32>(0))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!borrower.is_finished(), "every connection is held");
    // The neighbour's connection breaks: the second worker's pool has room again.
    let (answer, waited) = answer_once_broken(&db, neighbour_pid, borrower).await;
    let one = answer.expect("the borrower is served");
    assert_eq!(one, 1);
    assert!(
        waited < Duration::from_secs(5),
        "the borrower waited for its own worker's connection: {waited:?}"
    );
    holder.batch_execute("COMMIT").await.unwrap();
}

/// Starts a client whose one query waits for the pool's only connection, held by `holder` in
/// a transaction; returns it and the holder's backend PID.
async fn queue_behind_a_holder(
    proxy: &Proxy,
    holder: &tokio_postgres::Client,
) -> (
    tokio::task::JoinHandle<Result<i32, tokio_postgres::Error>>,
    i32,
) {
    // Logged in first: a login also takes a server connection.
    let waiter = proxy.client().await;
    let holder_pid = hold_a_transaction(holder).await;
    let query = tokio::spawn(async move {
        waiter
            .query_one("SELECT 1", &[])
            .await
            .map(|row| row.get::<_, i32>(0))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!query.is_finished(), "the only connection is held");
    (query, holder_pid)
}

/// A session queued at a full pool (its wait is the pool's queue alone, not bb8's) is served
/// by the connection made for the room a broken one left, not left to wait out
/// `query_wait_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_waiting_at_a_full_pool_gets_the_connection_made_for_a_broken_ones_room() {
    let db = TestDb::new("proxy_wait_room").await;
    let proxy = Proxy::start(&db, "transaction", 1, "query_wait_timeout = \"10s\"").await;
    let holder = proxy.client().await;
    let (query, holder_pid) = queue_behind_a_holder(&proxy, &holder).await;
    let (answer, waited) = answer_once_broken(&db, holder_pid, query).await;
    let one = answer.expect("the waiting session is served");
    assert_eq!(one, 1);
    assert!(
        waited < Duration::from_secs(5),
        "the session waited out query_wait_timeout: {waited:?}"
    );
}

/// The same wait ends at once, with the server's reason, when the server refuses the login
/// of the connection made for it (the role was fenced), instead of after `query_wait_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_waiting_at_a_full_pool_hears_the_servers_login_refusal() {
    let db = TestDb::new("proxy_wait_refused").await;
    let proxy = Proxy::start(&db, "transaction", 1, "query_wait_timeout = \"10s\"").await;
    let holder = proxy.client().await;
    let (query, holder_pid) = queue_behind_a_holder(&proxy, &holder).await;
    db.source_client()
        .await
        .batch_execute(&format!("ALTER ROLE \"{}\" NOLOGIN", proxy.user))
        .await
        .unwrap();
    let (answer, waited) = answer_once_broken(&db, holder_pid, query).await;
    let err = answer.expect_err("no connection can be made");
    assert!(
        waited < Duration::from_secs(5),
        "the session waited out query_wait_timeout: {waited:?}"
    );
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
}

/// Ends the server backend `pid`, then waits for the answer of `query` (a client queued
/// behind that backend's connection): the answer, and how long it took after the break.
async fn answer_once_broken<T>(
    db: &TestDb,
    pid: i32,
    query: tokio::task::JoinHandle<T>,
) -> (T, Duration) {
    terminate_backend(db, pid).await;
    let started = Instant::now();
    let answer = query.await.unwrap();
    (answer, started.elapsed())
}

/// Opens a transaction on `client`'s server connection and returns that backend's PID.
async fn hold_a_transaction(client: &tokio_postgres::Client) -> i32 {
    client.batch_execute("BEGIN").await.unwrap();
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Ends a server backend as an administrator would: the proxy's connection to it breaks.
async fn terminate_backend(db: &TestDb, pid: i32) {
    db.source_client()
        .await
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
}
