//! Session state through the proxy: what one client does to a server connection (DEALLOCATE,
//! SET among other statements, temporary tables) reaches no other client, and session-mode
//! sessions are held by a pause between their transactions.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;
use switchyard::proxy::pool::{ServerConn, ServerTarget};

use crate::common::{show, TestDb};
use crate::proxy::{Proxy, TOKEN};

/// A client speaking the protocol message by message (tokio-postgres picks its own statement
/// names): the proxy's own server-side connection code, logged in to the proxy.
async fn raw_client(proxy: &Proxy) -> ServerConn {
    let target = ServerTarget {
        host: "127.0.0.1".into(),
        port: proxy.port,
        database: proxy.database.clone(),
        user: proxy.user.clone(),
        password: proxy.password.clone(),
        tls: None,
        pids: Default::default(),
        max_prepared_statements: 200,
        replication: None,
    };
    ServerConn::connect(&target, Duration::from_secs(10))
        .await
        .expect("log in to the proxy")
}

/// Sends the messages, returns every answer (type, body) up to the `readies`-th
/// ReadyForQuery.
async fn exchange(conn: &mut ServerConn, messages: BytesMut, readies: usize) -> Vec<(u8, Bytes)> {
    conn.send(messages.freeze()).await.expect("send");
    let mut answers = Vec::new();
    let mut seen = 0;
    while seen < readies {
        // A read may hold several messages.
        let mut chunk = conn.recv().await.expect("an answer");
        while chunk.len() >= 5 {
            let len = u32::from_be_bytes([chunk[1], chunk[2], chunk[3], chunk[4]]) as usize;
            let message = chunk.split_to(1 + len);
            seen += usize::from(message[0] == b'Z');
            answers.push((message[0], message.slice(5..)));
        }
    }
    answers
}

fn parse(buf: &mut BytesMut, name: &str, query: &str) {
    frontend::parse(name, query, [], buf).unwrap();
}

/// Bind of the statement to the unnamed portal (no parameters, text results) and Execute.
fn execute(buf: &mut BytesMut, statement: &str) {
    let no_parameters = std::iter::empty::<()>();
    frontend::bind(
        "",
        statement,
        [],
        no_parameters,
        |(), _| Ok(postgres_protocol::IsNull::No),
        [0],
        buf,
    )
    .map_err(|_| "bind")
    .unwrap();
    frontend::execute("", 0, buf).unwrap();
}

fn query(buf: &mut BytesMut, text: &str) {
    frontend::query(text, buf).unwrap();
}

/// The SQLSTATE of the first ErrorResponse among the answers.
fn error_code(answers: &[(u8, Bytes)]) -> Option<String> {
    let (_, body) = answers.iter().find(|(tag, _)| *tag == b'E')?;
    let mut fields = body.split(|b| *b == 0);
    fields
        .find(|field| field.first() == Some(&b'C'))
        .map(|field| String::from_utf8_lossy(&field[1..]).into_owned())
}

/// The first column of each DataRow, as text.
fn values(answers: &[(u8, Bytes)]) -> Vec<String> {
    answers
        .iter()
        .filter(|(tag, _)| *tag == b'D')
        .map(|(_, body)| {
            let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
            String::from_utf8_lossy(&body[6..6 + len]).into_owned()
        })
        .collect()
}

fn command_tags(answers: &[(u8, Bytes)]) -> Vec<String> {
    answers
        .iter()
        .filter(|(tag, _)| *tag == b'C')
        .map(|(_, body)| String::from_utf8_lossy(&body[..body.len() - 1]).into_owned())
        .collect()
}

/// Runs the named statement in a sync group of its own.
async fn run(conn: &mut ServerConn, statement: &str) -> Vec<(u8, Bytes)> {
    let mut buf = BytesMut::new();
    execute(&mut buf, statement);
    frontend::sync(&mut buf);
    exchange(conn, buf, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_drops_only_the_named_statement() {
    let db = TestDb::new("proxy_deallocate").await;
    let proxy = Proxy::start(&db, "transaction", 1, "").await;
    let mut conn = raw_client(&proxy).await;
    let mut buf = BytesMut::new();
    parse(&mut buf, "one", "SELECT 1");
    parse(&mut buf, "two", "SELECT 2");
    parse(&mut buf, "never_run", "SELECT 3");
    frontend::sync(&mut buf);
    exchange(&mut conn, buf, 1).await;
    assert_eq!(values(&run(&mut conn, "one").await), ["1"]);

    // Prepared on the server connection, and not yet: both answer as PostgreSQL does, with
    // the server's own tag.
    for text in ["DEALLOCATE one", "DEALLOCATE PREPARE never_run"] {
        let mut buf = BytesMut::new();
        query(&mut buf, text);
        let answers = exchange(&mut conn, buf, 1).await;
        assert_eq!(error_code(&answers), None, "{text}");
        assert_eq!(command_tags(&answers), ["DEALLOCATE"], "{text}");
    }
    assert_eq!(values(&run(&mut conn, "two").await), ["2"]);
    assert_eq!(
        error_code(&run(&mut conn, "one").await).as_deref(),
        Some("26000")
    );
    assert_eq!(
        error_code(&run(&mut conn, "never_run").await).as_deref(),
        Some("26000")
    );

    // A name the client never prepared: the server's error.
    let mut buf = BytesMut::new();
    query(&mut buf, "DEALLOCATE nosuch");
    assert_eq!(
        error_code(&exchange(&mut conn, buf, 1).await).as_deref(),
        Some("26000")
    );
    // Among other statements: refused whole, nothing run.
    let mut buf = BytesMut::new();
    query(&mut buf, "DEALLOCATE two; SELECT 1");
    assert_eq!(
        error_code(&exchange(&mut conn, buf, 1).await).as_deref(),
        Some("0A000")
    );
    assert_eq!(values(&run(&mut conn, "two").await), ["2"]);

    let mut buf = BytesMut::new();
    query(&mut buf, "DEALLOCATE ALL");
    assert_eq!(
        command_tags(&exchange(&mut conn, buf, 1).await),
        ["DEALLOCATE ALL"]
    );
    assert_eq!(
        error_code(&run(&mut conn, "two").await).as_deref(),
        Some("26000")
    );
    // The name is free again.
    let mut buf = BytesMut::new();
    parse(&mut buf, "one", "SELECT 11");
    execute(&mut buf, "one");
    frontend::sync(&mut buf);
    assert_eq!(values(&exchange(&mut conn, buf, 1).await), ["11"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sync_groups_get_their_own_answers_in_order() {
    let db = TestDb::new("proxy_pipeline").await;
    // Two clients sharing one server connection: the pipeline must not lose its place when
    // the connection changes hands between sync groups.
    let proxy = Proxy::start(&db, "transaction", 1, "").await;
    let mut conn = raw_client(&proxy).await;
    let other = proxy.client().await;
    let mut buf = BytesMut::new();
    // Group 1: several Parse/Bind/Execute before one Sync.
    parse(&mut buf, "a", "SELECT 'a'");
    parse(&mut buf, "b", "SELECT 'b'");
    execute(&mut buf, "a");
    execute(&mut buf, "b");
    frontend::sync(&mut buf);
    // Group 2 fails in its middle: the rest of it is skipped, not group 3.
    execute(&mut buf, "b");
    parse(&mut buf, "", "SELECT 1/0");
    execute(&mut buf, "");
    execute(&mut buf, "a");
    frontend::sync(&mut buf);
    // Group 3: the statements of group 1 still exist.
    execute(&mut buf, "a");
    frontend::sync(&mut buf);
    let answers = exchange(&mut conn, buf, 3).await;
    assert_eq!(values(&answers), ["a", "b", "b", "a"], "{answers:?}");
    assert_eq!(error_code(&answers).as_deref(), Some("22012"));
    let readies = answers.iter().filter(|(tag, _)| *tag == b'Z').count();
    assert_eq!(readies, 3);

    assert_eq!(show(&other, "server_version_num").await.len(), 6);
    assert_eq!(values(&run(&mut conn, "b").await), ["b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_among_several_statements_follows_its_client_only() {
    let db = TestDb::new("proxy_multi_set").await;
    let default_work_mem = show(&db.source_client().await, "work_mem").await;
    // One server connection: every client's transaction runs on it.
    let proxy = Proxy::start(&db, "transaction", 1, "").await;
    let setter = proxy.client().await;
    let other = proxy.client().await;

    setter
        .batch_execute("SELECT 1; SET work_mem = '77MB'; SELECT 2")
        .await
        .unwrap();
    assert_eq!(show(&other, "work_mem").await, default_work_mem);
    assert_eq!(show(&setter, "work_mem").await, "77MB");
    assert_eq!(show(&other, "work_mem").await, default_work_mem);
    setter
        .batch_execute("SELECT 1; RESET work_mem")
        .await
        .unwrap();
    assert_eq!(show(&setter, "work_mem").await, default_work_mem);

    // A SET the proxy cannot follow (here: text it does not split) never reaches another
    // client: that server connection is closed instead of reused.
    setter
        .batch_execute("SELECT $$;$$; SET statement_timeout = '17s'")
        .await
        .unwrap();
    assert_ne!(show(&other, "statement_timeout").await, "17s");
    setter
        .batch_execute(&format!("SELECT 1; SET ROLE {}", proxy.user))
        .await
        .unwrap();
    let role: String = other
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(role, proxy.user);
    assert_eq!(show(&other, "role").await, "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_resets_connections_and_pause_holds_between_transactions() {
    let db = TestDb::new("proxy_session").await;
    let default_work_mem = show(&db.source_client().await, "work_mem").await;
    let proxy = Proxy::start(&db, "session", 1, "max_pause = \"20s\"").await;
    {
        let first = proxy.client().await;
        first
            .batch_execute(
                "SET work_mem = '77MB'; CREATE TEMP TABLE mine (x int); PREPARE p AS SELECT 1",
            )
            .await
            .unwrap();
    }
    // The same (only) server connection, reset by DISCARD ALL.
    let client = proxy.client().await;
    assert_eq!(show(&client, "work_mem").await, default_work_mem);
    let temp: Option<String> = client
        .query_one("SELECT to_regclass('mine')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(temp, None, "a temporary table outlived its session");
    let prepared: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(prepared, 0);

    // An idle session does not keep a pause waiting; its next transaction is held.
    let (status, body) = proxy
        .admin("POST", "/pause", Some(TOKEN), "{\"timeout_ms\": 2000}")
        .await;
    assert_eq!(status, 200, "{body}");
    let paused: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(paused["idle"], true, "{paused}");
    assert_eq!(paused["running"], serde_json::json!([]), "{paused}");
    let held = tokio::spawn(async move {
        let answer = client
            .query_one("SELECT 5::int", &[])
            .await
            .map(|r| r.get::<_, i32>(0));
        (client, answer)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!held.is_finished(), "a transaction ran while paused");
    let (status, _) = proxy.admin("POST", "/resume", Some(TOKEN), "").await;
    assert_eq!(status, 200);
    let (client, answer) = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held transaction runs after resume")
        .unwrap();
    assert_eq!(answer.unwrap(), 5);

    // A session inside a transaction is waited for, and named.
    client.batch_execute("BEGIN").await.unwrap();
    proxy.pause_waits_for_and_names(&client).await;

    // Transactions are counted one by one, not once per session.
    let before = transactions(&proxy).await;
    for _ in 0..3 {
        client.batch_execute("SELECT 1").await.unwrap();
    }
    // Counted once the ReadyForQuery is on its way to the client: a moment after it arrives.
    let deadline = Instant::now() + Duration::from_secs(5);
    while transactions(&proxy).await - before < 3.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(transactions(&proxy).await - before, 3.0);
}

async fn transactions(proxy: &Proxy) -> f64 {
    proxy.metric("switchyard_transactions_total").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_transaction_frees_its_server_connection() {
    let db = TestDb::new("proxy_vanish").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE marks (n int)")
        .await
        .unwrap();
    // One server connection: if the vanished client's were leaked, nobody could run.
    let proxy = Proxy::start(&db, "transaction", 1, "query_wait_timeout = \"5s\"").await;
    for round in 0..3 {
        let mut conn = raw_client(&proxy).await;
        let mut buf = BytesMut::new();
        query(&mut buf, "BEGIN; INSERT INTO marks VALUES (1)");
        assert_eq!(error_code(&exchange(&mut conn, buf, 1).await), None);
        // Gone without a Terminate: the socket just closes.
        drop(conn);
        let client = proxy.client().await;
        let marks: i64 = client
            .query_one("SELECT count(*) FROM marks", &[])
            .await
            .unwrap_or_else(|e| panic!("round {round}: the server connection was not freed: {e}"))
            .get(0);
        assert_eq!(
            marks, 0,
            "the vanished client's transaction was rolled back"
        );
    }
}
