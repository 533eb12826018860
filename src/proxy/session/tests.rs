//! The session against scripted servers in this process ([`crate::proxy::harness`]): where
//! transactions go, what the statement registry makes the server prepare and close, and how
//! settings follow a client between server connections. No PostgreSQL needed.

use crate::pg::Side;
use crate::proxy::harness::InProcess;
use crate::state::Switch;

async fn text_of(client: &tokio_postgres::Client, query: &str) -> String {
    let rows = client.query(query, &[]).await.expect("query");
    rows[0].get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_go_to_the_current_primary_and_follow_a_switch() {
    let proxy = InProcess::start("routing", "pool_mode = \"transaction\"").await;
    let client = proxy.client().await;
    assert_eq!(text_of(&client, "SELECT 1").await, "source: SELECT 1");
    proxy
        .shared
        .backend
        .switch(Switch {
            backend: Side::Target,
            epoch: 1,
        })
        .expect("switch");
    // The same client, its next transaction: the route is decided per transaction.
    assert_eq!(text_of(&client, "SELECT 1").await, "target: SELECT 1");
    assert!(!proxy.target.seen_starting("Parse").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_the_client_closes_is_closed_on_the_server() {
    let proxy = InProcess::start("close", "pool_mode = \"transaction\"\npool_size = 1").await;
    let client = proxy.client().await;
    let statement = client.prepare("SELECT 42").await.expect("prepare");
    let parsed = proxy.source.seen_starting("Parse switchyard_");
    let server_name = parsed
        .iter()
        .find(|p| p.ends_with("SELECT 42"))
        .and_then(|p| p.split_whitespace().nth(1))
        .expect("the statement prepared under its server name")
        .to_string();
    drop(statement);
    // The Close goes with the client's next messages.
    text_of(&client, "SELECT 1").await;
    let closes = proxy.source.seen_starting("Close S ");
    assert!(
        closes.contains(&format!("Close S {server_name}")),
        "{closes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_prepared_statements_the_least_recently_used_is_closed() {
    let proxy = InProcess::start(
        "lru",
        "pool_mode = \"transaction\"\npool_size = 1\nmax_prepared_statements = 2",
    )
    .await;
    let client = proxy.client().await;
    let mut held = Vec::new();
    for n in 1..=3 {
        let statement = client
            .prepare(&format!("SELECT {n}00"))
            .await
            .expect("prepare");
        let rows = client.query(&statement, &[]).await.expect("run");
        assert_eq!(rows[0].get::<_, String>(0), format!("source: SELECT {n}00"));
        held.push(statement);
    }
    let first = proxy
        .source
        .seen_starting("Parse switchyard_")
        .into_iter()
        .find(|p| p.ends_with("SELECT 100"))
        .and_then(|p| p.split_whitespace().nth(1).map(str::to_string))
        .expect("the first statement's server name");
    assert!(
        proxy
            .source
            .seen_starting("Close S ")
            .contains(&format!("Close S {first}")),
        "the oldest statement stayed: {:?}",
        proxy.source.seen()
    );
    // Still the client's: used again, it is prepared again.
    let rows = client.query(&held[0], &[]).await.expect("run again");
    assert_eq!(rows[0].get::<_, String>(0), "source: SELECT 100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_follows_its_client_and_not_the_next_one() {
    let proxy = InProcess::start("settings", "pool_mode = \"transaction\"\npool_size = 1").await;
    let a = proxy.client().await;
    let b = proxy.client().await;
    a.batch_execute("SET statement_timeout = '5s'")
        .await
        .expect("set");
    // B gets the one connection next: A's setting is taken off it first.
    text_of(&b, "SELECT 1").await;
    // A again: its setting is put back.
    text_of(&a, "SELECT 1").await;
    let settings: Vec<String> = proxy
        .source
        .seen_starting("Query ")
        .into_iter()
        .filter(|q| q.contains("statement_timeout"))
        .collect();
    // A's SET, taken off before B, put back before A; and again for each later message of
    // either client (tokio-postgres closes its statements as it drops them): always
    // alternating, never twice the same in a row.
    let resets: Vec<bool> = settings.iter().map(|q| q.contains("RESET")).collect();
    assert!(settings.len() >= 3, "{settings:?}");
    assert_eq!(resets[..3], [false, true, false], "{settings:?}");
    assert!(resets.windows(2).all(|w| w[0] != w[1]), "{settings:?}");
}

/// The settings statements the source received, in order.
fn settings_seen(proxy: &InProcess, name: &str) -> Vec<String> {
    proxy
        .source
        .seen_starting("Query ")
        .into_iter()
        .filter(|q| q.contains(name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_in_the_startup_options_reach_every_transaction() {
    let proxy = InProcess::start("options", "pool_mode = \"transaction\"\npool_size = 1").await;
    let client = proxy
        .client_with(|config| {
            config.options("-c lock_timeout=1234");
        })
        .await;
    text_of(&client, "SELECT 1").await;
    let seen = settings_seen(&proxy, "lock_timeout");
    assert!(
        seen.iter().any(|q| q.contains("SET") && q.contains("1234")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_rolled_back_does_not_follow_the_client() {
    let proxy = InProcess::start("rollback", "pool_mode = \"transaction\"\npool_size = 1").await;
    let a = proxy.client().await;
    let b = proxy.client().await;
    a.batch_execute("BEGIN; SET lock_timeout = '7s'; ROLLBACK")
        .await
        .expect("rolled back");
    text_of(&b, "SELECT 1").await;
    text_of(&a, "SELECT 1").await;
    // Only A's own statement: nothing taken off before B, nothing put back for A.
    assert_eq!(
        settings_seen(&proxy, "lock_timeout"),
        ["Query BEGIN; SET lock_timeout = '7s'; ROLLBACK"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_unnamed_queries_each_get_their_own_answer() {
    // tokio-postgres pipelines concurrent queries on one connection: Parse, Bind, Describe,
    // Execute and Sync of each, many in one write. Mid-transaction the Bind, Describe,
    // Execute and Sync go through session/in_place.rs, and the rows and ReadyForQuery come
    // back through it: each query must still get its own rows, in order.
    let proxy = InProcess::start("pipeline", "pool_mode = \"transaction\"\npool_size = 1").await;
    let client = proxy.client().await;
    let queries: Vec<String> = (0..20).map(|n| format!("SELECT {n}")).collect();
    let answers = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        futures_util::future::join_all(
            queries
                .iter()
                .map(|query| client.query_typed(query.as_str(), &[])),
        ),
    )
    .await
    .expect("every query answered within 10 s (a miscounted Sync hangs the pipeline)");
    for (query, rows) in queries.iter().zip(answers) {
        let rows = rows.expect("query");
        assert_eq!(rows.len(), 1, "{query}");
        assert_eq!(rows[0].get::<_, String>(0), format!("source: {query}"));
    }
    let executes = proxy.source.seen_starting("Execute");
    assert_eq!(executes.len(), 20, "{executes:?}");
    assert_eq!(proxy.source.seen_starting("Sync").len(), 20);
}
