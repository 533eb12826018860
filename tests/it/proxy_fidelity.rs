//! A client gets through `switchyard proxy` what it gets from PostgreSQL itself. Each test runs
//! the same client steps twice: directly against the source server, logged in as the same
//! application role, and through a proxy in front of it (in both pool modes where the behaviour
//! applies), and compares what the client saw. The direct run is checked against what
//! PostgreSQL is known to answer first, so that a difference always points at the proxy.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, Config, NoTls, SimpleQueryMessage};

use crate::common::wire::{End, Msgs, Replies, Wire};
use crate::common::TestDb;
use crate::proxy::Proxy;

/// Where a client connects, as the application role: the source server itself, or a proxy in
/// front of it.
#[derive(Clone)]
struct Endpoint {
    label: String,
    port: u16,
    user: String,
    password: String,
    database: String,
}

impl Endpoint {
    /// The source server, as the application role that [`Proxy::start`] creates (created here
    /// too, with the same grants, so the direct run can go first).
    async fn direct(db: &TestDb) -> Endpoint {
        let (user, password) = crate::proxy::app_role(db, &db.source_client().await).await;
        Endpoint {
            label: "directly".into(),
            port: db.source.port,
            user,
            password,
            database: db.name.clone(),
        }
    }

    fn proxy(proxy: &Proxy, mode: &str) -> Endpoint {
        Endpoint {
            label: format!("through the proxy ({mode} mode)"),
            port: proxy.port,
            user: proxy.user.clone(),
            password: proxy.password.clone(),
            database: proxy.database.clone(),
        }
    }

    async fn wire(&self) -> Wire {
        self.wire_with(&[]).await
    }

    async fn wire_with(&self, extra: &[(&str, &str)]) -> Wire {
        Wire::connect(
            &self.label,
            self.port,
            &self.user,
            &self.password,
            &self.database,
            extra,
        )
        .await
    }

    fn config(&self) -> Config {
        let mut config = Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(&self.database);
        config
    }

    async fn client(&self) -> Client {
        self.client_from(self.config()).await
    }

    async fn client_from(&self, config: Config) -> Client {
        let what = format!("{}: connect", self.label);
        let (client, connection) = bounded(&what, config.connect(NoTls))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        tokio::spawn(connection);
        client
    }
}

/// `future`, or a panic naming `what` if it hangs.
async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 15s (a hang)"))
}

/// A simple query's outcome as text: `ok [rows]` or `error SQLSTATE: message`.
async fn run(client: &Client, sql: &str) -> String {
    match bounded(sql, client.simple_query(sql)).await {
        Ok(messages) => {
            let rows: Vec<String> = messages
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => Some(
                        (0..row.len())
                            .map(|i| row.get(i).unwrap_or("NULL"))
                            .collect::<Vec<_>>()
                            .join("|"),
                    ),
                    _ => None,
                })
                .collect();
            format!("{sql} → ok {rows:?}")
        }
        Err(e) => format!("{sql} → {}", error_text(&e)),
    }
}

fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("error {}: {}", db.code().code(), db.message()),
        None => format!("error (not from a server): {e}"),
    }
}

/// Where the proxy and PostgreSQL differ, collected over a test's modes and steps so that
/// one run reports all of them.
#[derive(Default)]
struct Differences(Vec<String>);

impl Differences {
    fn compare<T: PartialEq + Debug>(&mut self, what: &str, proxied: &T, direct: &T) {
        if proxied != direct {
            self.0.push(format!(
                "{what}:\n    through the proxy: {proxied:?}\n    directly:          {direct:?}"
            ));
        }
    }

    fn check(&mut self, what: &str, ok: bool, detail: impl Debug) {
        if !ok {
            self.0.push(format!("{what}: {detail:?}"));
        }
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "the proxy differs from PostgreSQL:\n{}",
            self.0.join("\n")
        );
    }
}

/// `steps` through a fresh proxy in each pool mode (`pool_size` connections, one worker),
/// compared step by step with what PostgreSQL answered directly.
async fn through_both_modes(
    db: &TestDb,
    pool_size: u32,
    list: &[Msgs],
    direct: &[Vec<String>],
) -> Differences {
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(db, mode, pool_size, "workers = 1").await;
        let mut wire = Endpoint::proxy(&proxy, mode).wire().await;
        let got = steps(&mut wire, list).await;
        for (i, (got, want)) in got.iter().zip(direct).enumerate() {
            differences.compare(&format!("{mode} mode, step {}", i + 1), got, want);
        }
    }
    differences
}

/// The kinds of each step's replies (each step sent in one write).
async fn steps(wire: &mut Wire, steps: &[Msgs]) -> Vec<Vec<String>> {
    let mut seen = Vec::new();
    for step in steps {
        seen.push(wire.step(step.clone()).await.kinds());
    }
    seen
}

fn strs(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------
// A. COPY in a pipeline.

/// Client A: a COPY and, in the same write, an extended-protocol query; then client B's query.
async fn copy_then_query_in_one_write(at: &Endpoint) -> (Replies, Replies) {
    let mut b = at.wire().await;
    let mut a = at.wire().await;
    let a_replies = a
        .step(
            Msgs::new()
                .query("COPY c FROM STDIN")
                .copy_data(b"A\t1\tx\n")
                .copy_done()
                .parse("", "SELECT 'secret-of-A'")
                .bind("", "")
                .execute("")
                .sync(),
        )
        .await;
    let b_replies = b.simple("SELECT 'B'").await;
    (a_replies, b_replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_pipelined_with_a_query_in_one_write_keeps_the_pool_in_step() {
    let db = TestDb::new("fidelity_copy_pipelined").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE c (a text, b int, x text)")
        .await
        .unwrap();
    let direct = Endpoint::direct(&db).await;
    let (direct_a, direct_b) = copy_then_query_in_one_write(&direct).await;
    assert_eq!(
        direct_a.kinds(),
        strs(&[
            "CopyInResponse",
            "CommandComplete(COPY 1)",
            "ReadyForQuery(I)",
            "ParseComplete",
            "BindComplete",
            "DataRow[secret-of-A]",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
        ]),
        "directly, client A"
    );
    assert_eq!(
        direct_b.kinds(),
        strs(&[
            "RowDescription",
            "DataRow[B]",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)"
        ]),
        "directly, client B"
    );
    let mut differences = Differences::default();
    // One server connection in transaction mode: B's query runs where A's did.
    for (mode, pool_size) in [("transaction", 1), ("session", 2)] {
        let proxy = Proxy::start(&db, mode, pool_size, "workers = 1").await;
        let (a, b) = copy_then_query_in_one_write(&Endpoint::proxy(&proxy, mode)).await;
        differences.compare(
            &format!("{mode} mode, client A (COPY, then Parse/Bind/Execute/Sync, in one write)"),
            &a.kinds(),
            &direct_a.kinds(),
        );
        differences.compare(
            &format!("{mode} mode, client B (Query \"SELECT 'B'\") after A"),
            &b.kinds(),
            &direct_b.kinds(),
        );
    }
    differences.assert_none();
}

/// Client A: COPY through the extended protocol as libpq sends it (Parse, Bind, Describe,
/// Execute, Sync; the data once CopyInResponse came, then CopyDone and Sync); then client B's
/// query, then A's next.
async fn extended_copy_as_libpq(at: &Endpoint) -> Vec<Vec<String>> {
    let mut b = at.wire().await;
    let mut a = at.wire().await;
    a.send(
        Msgs::new()
            .parse("", "COPY c FROM STDIN")
            .bind("", "")
            .describe(b'P', "")
            .execute("")
            .sync(),
    )
    .await;
    let start = a.until_tag(b'G').await;
    a.send(Msgs::new().copy_data(b"L\t2\ty\n").copy_done().sync())
        .await;
    let finish = a.until_ready(1).await;
    let other = b.simple("SELECT 'B'").await;
    let again = a.simple("SELECT 'A again'").await;
    vec![start.kinds(), finish.kinds(), other.kinds(), again.kinds()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_protocol_copy_as_libpq_sends_it_keeps_the_pool_in_step() {
    let db = TestDb::new("fidelity_copy_extended").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE c (a text, b int, x text)")
        .await
        .unwrap();
    let direct = Endpoint::direct(&db).await;
    let want = extended_copy_as_libpq(&direct).await;
    assert_eq!(
        want,
        vec![
            strs(&["ParseComplete", "BindComplete", "NoData", "CopyInResponse"]),
            strs(&["CommandComplete(COPY 1)", "ReadyForQuery(I)"]),
            strs(&[
                "RowDescription",
                "DataRow[B]",
                "CommandComplete(SELECT 1)",
                "ReadyForQuery(I)"
            ]),
            strs(&[
                "RowDescription",
                "DataRow[A again]",
                "CommandComplete(SELECT 1)",
                "ReadyForQuery(I)"
            ]),
        ],
        "directly"
    );
    let mut differences = Differences::default();
    for (mode, pool_size) in [("transaction", 1), ("session", 2)] {
        let proxy = Proxy::start(&db, mode, pool_size, "workers = 1").await;
        let got = extended_copy_as_libpq(&Endpoint::proxy(&proxy, mode)).await;
        differences.compare(
            &format!("{mode} mode: A's COPY start, A's COPY end, B's query, A's next query"),
            &got,
            &want,
        );
    }
    differences.assert_none();
}

// ---------------------------------------------------------------------------------------
// B. A SET the server refused.

async fn refused_set(at: &Endpoint) -> Vec<String> {
    let first = at.client().await;
    let other = at.client().await;
    vec![
        run(&first, "SET statement_timeout = 'bogus'").await,
        run(&other, "BEGIN; SELECT 2; COMMIT").await,
        run(&first, "SELECT 1").await,
        run(&first, "SHOW statement_timeout").await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_the_server_refused_is_never_applied_again() {
    let db = TestDb::new("fidelity_refused_set").await;
    let direct = refused_set(&Endpoint::direct(&db).await).await;
    assert!(direct[0].contains("error 22023"), "directly: {}", direct[0]);
    assert!(direct[2].ends_with("ok [\"1\"]"), "directly: {}", direct[2]);
    let mut differences = Differences::default();
    // Transaction mode: one server connection, which the other client's transaction resets
    // in between.
    for (mode, pool_size) in [("transaction", 1), ("session", 2)] {
        let proxy = Proxy::start(&db, mode, pool_size, "workers = 1").await;
        let got = refused_set(&Endpoint::proxy(&proxy, mode)).await;
        eprintln!("{mode}: {got:?} vs {direct:?}");
        differences.compare(&format!("{mode} mode"), &got, &direct);
    }
    differences.assert_none();
}

// ---------------------------------------------------------------------------------------
// C. A SET undone by a rollback.

/// `setup` on `client`'s server connection, then `checks` on another one: `first` holds one
/// connection while `setup` runs, `second` takes the one `setup` used, and `first` lets its
/// go. With two server connections in transaction mode, the checks can only run on the
/// other one. (In session mode, and directly, every client has its own.)
async fn then_elsewhere(
    first: &Client,
    second: &Client,
    client: &Client,
    setup: &[&str],
    checks: &[&str],
) -> Vec<String> {
    let mut seen = Vec::new();
    run(first, "BEGIN").await;
    for sql in setup {
        seen.push(run(client, sql).await);
    }
    run(second, "BEGIN").await;
    run(first, "COMMIT").await;
    for sql in checks {
        seen.push(run(client, sql).await);
    }
    run(second, "COMMIT").await;
    seen
}

async fn rolled_back_settings(at: &Endpoint) -> Vec<String> {
    let (first, second) = (at.client().await, at.client().await);
    let mut seen = Vec::new();
    let client = at.client().await;
    seen.extend(
        then_elsewhere(
            &first,
            &second,
            &client,
            &["BEGIN", "SET statement_timeout = '1ms'", "ROLLBACK"],
            &["SELECT pg_sleep(0.1)", "SHOW statement_timeout"],
        )
        .await,
    );
    drop(client);
    let client = at.client().await;
    seen.extend(
        then_elsewhere(
            &first,
            &second,
            &client,
            &["SET search_path = nosuchschema; SELECT 1/0"],
            &["SHOW search_path"],
        )
        .await,
    );
    drop(client);
    let client = at.client().await;
    seen.extend(
        then_elsewhere(
            &first,
            &second,
            &client,
            &["BEGIN", "SET LOCAL statement_timeout = '1ms'", "COMMIT"],
            &["SELECT pg_sleep(0.1)", "SHOW statement_timeout"],
        )
        .await,
    );
    // The ROLLBACK's CommandComplete comes after rows, in one run of server messages.
    drop(client);
    let client = at.client().await;
    seen.extend(
        then_elsewhere(
            &first,
            &second,
            &client,
            &["BEGIN", "SET work_mem = '1234kB'", "SELECT 1; ROLLBACK"],
            &["SHOW work_mem"],
        )
        .await,
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_undone_by_a_rollback_does_not_stay_with_the_session() {
    let db = TestDb::new("fidelity_rolled_back_set").await;
    let direct = rolled_back_settings(&Endpoint::direct(&db).await).await;
    let expected = [
        "BEGIN → ok []",
        "SET statement_timeout = '1ms' → ok []",
        "ROLLBACK → ok []",
        "SELECT pg_sleep(0.1) → ok [\"\"]",
        "SHOW statement_timeout → ok [\"0\"]",
        "SET search_path = nosuchschema; SELECT 1/0 → error 22012: division by zero",
        "SHOW search_path → ok [\"\\\"$user\\\", public\"]",
        "BEGIN → ok []",
        "SET LOCAL statement_timeout = '1ms' → ok []",
        "COMMIT → ok []",
        "SELECT pg_sleep(0.1) → ok [\"\"]",
        "SHOW statement_timeout → ok [\"0\"]",
        "BEGIN → ok []",
        "SET work_mem = '1234kB' → ok []",
        "SELECT 1; ROLLBACK → ok [\"1\"]",
        "SHOW work_mem → ok [\"4MB\"]",
    ];
    assert_eq!(direct, strs(&expected), "directly");
    let mut differences = Differences::default();
    // Transaction mode: exactly two server connections (see then_elsewhere); session mode:
    // one per client.
    for (mode, pool_size) in [("transaction", 2), ("session", 6)] {
        let proxy = Proxy::start(&db, mode, pool_size, "workers = 1").await;
        let got = rolled_back_settings(&Endpoint::proxy(&proxy, mode)).await;
        eprintln!("{mode}: {got:?} vs {direct:?}");
        differences.compare(&format!("{mode} mode"), &got, &direct);
    }
    differences.assert_none();
}

// ---------------------------------------------------------------------------------------
// D. Parse errors where PostgreSQL reports them.

fn parse_error_steps() -> Vec<Msgs> {
    vec![
        Msgs::new().parse("s1", "SELECT 1").sync(),
        // Another statement under the same name.
        Msgs::new().parse("s1", "SELECT 2").sync(),
        // The same statement again under the same name.
        Msgs::new().parse("s1", "SELECT 1").sync(),
        // A syntax error.
        Msgs::new().parse("s2", "SELEC bad").sync(),
        // s1 is still the first statement; s2 does not exist.
        Msgs::new().bind("", "s1").execute("").sync(),
        Msgs::new().bind("", "s2").execute("").sync(),
        // Inside a transaction too.
        Msgs::new().query("BEGIN"),
        Msgs::new().parse("s1", "SELECT 3").sync(),
        Msgs::new().query("ROLLBACK"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_or_invalid_named_parse_fails_at_the_parse_as_on_the_server() {
    let db = TestDb::new("fidelity_parse_errors").await;
    let direct_at = Endpoint::direct(&db).await;
    let direct = steps(&mut direct_at.wire().await, &parse_error_steps()).await;
    let expected = vec![
        strs(&["ParseComplete", "ReadyForQuery(I)"]),
        strs(&["ErrorResponse(42P05)", "ReadyForQuery(I)"]),
        strs(&["ErrorResponse(42P05)", "ReadyForQuery(I)"]),
        strs(&["ErrorResponse(42601)", "ReadyForQuery(I)"]),
        strs(&[
            "BindComplete",
            "DataRow[1]",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
        ]),
        strs(&["ErrorResponse(26000)", "ReadyForQuery(I)"]),
        strs(&["CommandComplete(BEGIN)", "ReadyForQuery(T)"]),
        strs(&["ErrorResponse(42P05)", "ReadyForQuery(E)"]),
        strs(&["CommandComplete(ROLLBACK)", "ReadyForQuery(I)"]),
    ];
    assert_eq!(direct, expected, "directly");
    through_both_modes(&db, 2, &parse_error_steps(), &direct)
        .await
        .assert_none();
}

// ---------------------------------------------------------------------------------------
// E. Replies in the order of the messages.

fn reply_order_steps() -> Vec<Msgs> {
    vec![
        Msgs::new().parse("s1", "SELECT 1").sync(),
        Msgs::new().query("BEGIN"),
        // Portal p2 exists until the transaction ends.
        Msgs::new().bind("p2", "s1").sync(),
        // The client's Close, then a Parse (before which the proxy may add a Close of its own).
        Msgs::new()
            .close(b'P', "p2")
            .parse("s3", "SELECT 3")
            .bind("", "s3")
            .execute("")
            .sync(),
        Msgs::new().bind("p2", "s1").sync(),
        // The same with a query between them: the CloseComplete that reaches the client must
        // be the first one, before that query's rows.
        Msgs::new()
            .close(b'P', "p2")
            .bind("", "s1")
            .execute("")
            .parse("s4", "SELECT 4")
            .bind("", "s4")
            .execute("")
            .sync(),
        Msgs::new()
            .close(b'S', "s1")
            .parse("s1", "SELECT 11")
            .bind("", "s1")
            .execute("")
            .sync(),
        Msgs::new().query("COMMIT"),
        // Between transactions: s5 is prepared on a server connection only when it is used.
        Msgs::new().parse("s5", "SELECT 5").sync(),
        // The client's ParseComplete comes first, before the rows of its statement.
        Msgs::new()
            .parse("", "SELECT 6")
            .bind("", "")
            .execute("")
            .bind("", "s5")
            .execute("")
            .sync(),
        Msgs::new()
            .parse("s6", "SELECT 6")
            .close(b'P', "nosuch")
            .bind("", "s6")
            .execute("")
            .sync(),
        Msgs::new()
            .close(b'S', "s3")
            .parse("s7", "SELECT 7")
            .describe(b'S', "s7")
            .close(b'S', "s6")
            .sync(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_to_close_parse_bind_and_execute_come_in_the_order_sent() {
    let db = TestDb::new("fidelity_reply_order").await;
    let direct_at = Endpoint::direct(&db).await;
    let direct = steps(&mut direct_at.wire().await, &reply_order_steps()).await;
    assert_eq!(
        direct[3],
        strs(&[
            "CloseComplete",
            "ParseComplete",
            "BindComplete",
            "DataRow[3]",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(T)",
        ]),
        "directly: {direct:?}"
    );
    assert_eq!(
        direct[5],
        strs(&[
            "CloseComplete",
            "BindComplete",
            "DataRow[1]",
            "CommandComplete(SELECT 1)",
            "ParseComplete",
            "BindComplete",
            "DataRow[4]",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(T)",
        ]),
        "directly: {direct:?}"
    );
    assert_eq!(
        direct[9],
        strs(&[
            "ParseComplete",
            "BindComplete",
            "DataRow[6]",
            "CommandComplete(SELECT 1)",
            "BindComplete",
            "DataRow[5]",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
        ]),
        "directly: {direct:?}"
    );
    assert!(
        direct.iter().flatten().all(|k| !k.starts_with("Error")),
        "directly: {direct:?}"
    );
    through_both_modes(&db, 2, &reply_order_steps(), &direct)
        .await
        .assert_none();
}

// ---------------------------------------------------------------------------------------
// F2. An unnamed Parse the server skipped leaves the client no unnamed statement, whatever
// the connection's last client left there (the fuzzer once saw another client's rows).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_unnamed_parse_never_binds_another_clients_statement() {
    let db = TestDb::new("fidelity_unnamed_skipped").await;
    // A leaves an unnamed statement on the connection; B's Parse is skipped after an error
    // earlier in its group; B's next Bind of the unnamed statement must find none.
    let leave = Msgs::new().parse("", "SELECT 'secret-of-A'").sync();
    let skipped = Msgs::new()
        .execute("nosuch")
        .parse("", "SELECT 'B'")
        .bind("", "")
        .execute("")
        .sync();
    let bind = Msgs::new().bind("", "").execute("").sync();
    let direct_at = Endpoint::direct(&db).await;
    let mut b = direct_at.wire().await;
    let direct = steps(&mut b, &[skipped.clone(), bind.clone()]).await;
    assert_eq!(
        direct[1],
        strs(&["ErrorResponse(26000)", "ReadyForQuery(I)"]),
        "directly: {direct:?}"
    );
    let mut differences = Differences::default();
    // One server connection: B's transactions run where A's statement is.
    let proxy = Proxy::start(&db, "transaction", 1, "workers = 1").await;
    let at = Endpoint::proxy(&proxy, "transaction");
    let mut a = at.wire().await;
    a.step(leave).await;
    let mut b = at.wire().await;
    let got = steps(&mut b, &[skipped, bind]).await;
    differences.compare("transaction mode", &got, &direct);
    differences.assert_none();
}

// F. The unnamed statement and a simple Query.

fn unnamed_statement_steps() -> Vec<Msgs> {
    vec![
        Msgs::new()
            .parse("", "SELECT 1")
            .bind("", "")
            .execute("")
            .sync(),
        Msgs::new().query("SELECT 2"),
        Msgs::new().bind("", "").execute("").sync(),
        Msgs::new().parse("", "SELECT 3").sync(),
        Msgs::new().query("SELECT 4"),
        Msgs::new().describe(b'S', "").sync(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simple_query_destroys_the_unnamed_statement_as_on_the_server() {
    let db = TestDb::new("fidelity_unnamed").await;
    let direct_at = Endpoint::direct(&db).await;
    let direct = steps(&mut direct_at.wire().await, &unnamed_statement_steps()).await;
    assert_eq!(
        direct[2],
        strs(&["ErrorResponse(26000)", "ReadyForQuery(I)"]),
        "directly: {direct:?}"
    );
    assert_eq!(
        direct[5],
        strs(&["ErrorResponse(26000)", "ReadyForQuery(I)"]),
        "directly: {direct:?}"
    );
    through_both_modes(&db, 1, &unnamed_statement_steps(), &direct)
        .await
        .assert_none();
}

/// Statements named in a group that failed before them, found by the fuzzer: a Close of the
/// unnamed statement the server skipped (the statement stays), a Describe that made the proxy
/// prepare a statement the server then skipped (the client's statement stays usable), and a
/// multi-statement query whose ROLLBACK ends its implicit transaction (a SET after it holds).
fn skipped_in_a_failed_group_steps() -> Vec<Msgs> {
    vec![
        Msgs::new().parse("", "SELECT 1").sync(),
        Msgs::new().bind("", "nosuch").close(b'S', "").sync(),
        Msgs::new().bind("", "").execute("").sync(),
        Msgs::new().parse("s1", "SELECT 2").sync(),
        Msgs::new().parse("s1", "SELECT 3").sync(),
        Msgs::new().bind("", "nosuch").describe(b'S', "s1").sync(),
        Msgs::new()
            .describe(b'S', "s1")
            .bind("", "s1")
            .execute("")
            .sync(),
        // The duplicate Parse leaves the connection unfit for reuse: the next group starts
        // on one without s2, and the proxy prepares it there after the group has failed.
        Msgs::new().parse("s2", "SELECT 5").sync(),
        Msgs::new().parse("s2", "SELECT 6").sync(),
        Msgs::new().execute("nosuch").flush(),
        Msgs::new().describe(b'S', "s2").sync(),
        Msgs::new()
            .describe(b'S', "s2")
            .bind("", "s2")
            .execute("")
            .sync(),
        Msgs::new()
            .query("SET statement_timeout = 0; ROLLBACK; SELECT 1; SET statement_timeout = '5s'"),
        Msgs::new().query("SHOW statement_timeout"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_and_settings_after_a_failed_group_are_what_the_server_kept() {
    let db = TestDb::new("fidelity_failed_group").await;
    let direct_at = Endpoint::direct(&db).await;
    let direct = steps(
        &mut direct_at.wire().await,
        &skipped_in_a_failed_group_steps(),
    )
    .await;
    assert_eq!(
        direct[2],
        strs(&[
            "BindComplete",
            "DataRow[1]",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)"
        ]),
        "directly: {direct:?}"
    );
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        // Two connections and two clients taking turns, so that a step may find a connection
        // the client's last step did not use.
        let proxy = Proxy::start(&db, mode, 2, "workers = 1").await;
        let at = Endpoint::proxy(&proxy, mode);
        let mut wire = at.wire().await;
        let mut other = at.wire().await;
        let mut got = Vec::new();
        for step in skipped_in_a_failed_group_steps() {
            got.push(wire.step(step).await.kinds());
            other.step(Msgs::new().query("SELECT 1")).await;
        }
        for (i, (got, want)) in got.iter().zip(&direct).enumerate() {
            differences.compare(&format!("{mode} mode, step {}", i + 1), got, want);
        }
    }
    differences.assert_none();
}

/// Found by the fuzzer (seed 2648068669521031386): in a failed transaction, the proxy
/// prepares the client's statement again in a group the server refuses (25P02), and the
/// client closes it in the next group, sent before that refusal came and skipped after an
/// error of its own. The statement is still the client's; the connection does not have it.
/// The proxy once listed it again and bound it unprepared: 26000 where PostgreSQL says
/// 25P02.
fn close_skipped_after_a_failed_prepare_steps() -> Vec<Msgs> {
    vec![
        // The duplicate fails its group; the Bind after it made the proxy prepare s1 again
        // (its first Parse was not answered yet), and the failure leaves it unlisted.
        Msgs::new()
            .parse("s1", "SELECT 1")
            .sync()
            .parse("s1", "SELECT 2")
            .bind("", "s1")
            .execute("")
            .sync(),
        Msgs::new().query("BEGIN").query("SELECT 1/0"),
        Msgs::new()
            .bind("", "s1")
            .sync()
            .describe(b'P', "nosuch")
            .close(b'S', "s1")
            .sync(),
        Msgs::new().bind("", "s1").sync(),
        Msgs::new().query("ROLLBACK"),
        Msgs::new().bind("", "s1").execute("").sync(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_skipped_after_a_refused_prepare_leaves_the_statement_the_clients() {
    let db = TestDb::new("fidelity_skipped_close").await;
    let list = close_skipped_after_a_failed_prepare_steps();
    let direct = steps(&mut Endpoint::direct(&db).await.wire().await, &list).await;
    assert_eq!(
        direct[3],
        strs(&["ErrorResponse(25P02)", "ReadyForQuery(E)"]),
        "directly: {direct:?}"
    );
    through_both_modes(&db, 1, &list, &direct)
        .await
        .assert_none();
}

/// Found by the fuzzer (seed 6438839821127133085): a duplicate Parse leaves a placeholder
/// under the client's name on the connection; the client closes its statement, and in a
/// group that fails before it, names it again. The proxy's Close of the placeholder was
/// skipped with the rest of the group, and the proxy forgot it: the next Bind found the
/// placeholder (08P01, wrong parameter count) where PostgreSQL says the statement does not
/// exist (26000).
fn placeholder_closed_in_a_failed_group_steps() -> Vec<Msgs> {
    vec![
        Msgs::new().parse("s1", "SELECT $1::int + 1").sync(),
        Msgs::new().parse("s1", "SELECT 2").sync(),
        Msgs::new()
            .close(b'S', "s1")
            .bind_params("", "nosuch", &["19"])
            .describe(b'S', "s1")
            .sync(),
        Msgs::new().bind_params("", "s1", &["39"]).sync(),
        Msgs::new().describe(b'S', "s1").sync(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placeholder_closed_in_a_failed_group_is_closed_again() {
    let db = TestDb::new("fidelity_placeholder").await;
    let list = placeholder_closed_in_a_failed_group_steps();
    let direct = steps(&mut Endpoint::direct(&db).await.wire().await, &list).await;
    assert_eq!(
        direct[3],
        strs(&["ErrorResponse(26000)", "ReadyForQuery(I)"]),
        "directly: {direct:?}"
    );
    through_both_modes(&db, 1, &list, &direct)
        .await
        .assert_none();
}

/// Found by psycopg's suite (`test_socket_closed`): a client that sends Terminate while its
/// query runs gets the query's answer and then the end of the connection, as PostgreSQL reads
/// the Terminate only once the query is answered. The proxy once closed the client's socket
/// at once, 1 ms after the Terminate.
async fn terminate_during_a_query(at: &Endpoint) -> Vec<String> {
    let mut wire = at.wire().await;
    let replies = wire
        .step(
            Msgs::new()
                .query("SELECT 'answered' FROM pg_sleep(0.3)")
                .terminate(),
        )
        .await;
    let mut seen = replies.kinds();
    let after = wire.unsolicited(std::time::Duration::from_secs(2)).await;
    seen.extend(after.kinds());
    seen.push(format!("closed afterwards: {}", wire.is_closed()));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_during_a_query_ends_the_connection_after_its_answer() {
    let db = TestDb::new("fidelity_terminate").await;
    let direct = terminate_during_a_query(&Endpoint::direct(&db).await).await;
    assert_eq!(
        direct,
        strs(&[
            "RowDescription",
            "DataRow[answered]",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
            "<connection closed>",
            "closed afterwards: true"
        ]),
        "directly: {direct:?}"
    );
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&db, mode, 1, "workers = 1").await;
        let got = terminate_during_a_query(&Endpoint::proxy(&proxy, mode)).await;
        differences.compare(&format!("{mode} mode"), &got, &direct);
    }
    differences.assert_none();
}

// ---------------------------------------------------------------------------------------
// 1. The login's ParameterStatus messages.

/// Client A changes reported settings and leaves; what client B is told at login and reads.
async fn login_after_another_session(at: &Endpoint) -> Vec<String> {
    let mut a = at.wire().await;
    let mut seen = vec![
        format!("A: {:?}", a.simple("SET client_encoding TO 'LATIN1'").await),
        format!(
            "A: {:?}",
            a.simple("SET standard_conforming_strings = off").await
        ),
    ];
    a.terminate().await;
    let mut b = at.wire().await;
    for name in ["client_encoding", "standard_conforming_strings"] {
        seen.push(format!("B's login: {name} = {:?}", b.login_param(name)));
    }
    seen.push(format!("B: {:?}", b.simple("SELECT chr(233)").await));
    seen.push(format!("B: {:?}", b.simple("SHOW client_encoding").await));
    seen.push(format!(
        "B: {:?}",
        b.simple("SHOW standard_conforming_strings").await
    ));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_reports_the_clients_own_session_not_the_last_clients() {
    let db = TestDb::new("fidelity_login_params").await;
    let direct = login_after_another_session(&Endpoint::direct(&db).await).await;
    assert_eq!(
        direct[2..5].to_vec(),
        strs(&[
            "B's login: client_encoding = Some(\"UTF8\")",
            "B's login: standard_conforming_strings = Some(\"on\")",
            "B: [\"RowDescription\", \"DataRow[é]\", \"CommandComplete(SELECT 1)\", \"ReadyForQuery(I)\"]",
        ]),
        "directly: {direct:#?}"
    );
    let mut differences = Differences::default();
    // One server connection: B gets the one A changed.
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&db, mode, 1, "workers = 1").await;
        let got = login_after_another_session(&Endpoint::proxy(&proxy, mode)).await;
        for (got, want) in got.iter().zip(&direct) {
            differences.compare(&format!("{mode} mode"), got, want);
        }
    }
    differences.assert_none();
}

// ---------------------------------------------------------------------------------------
// 2. Prepared statements left on server connections.

/// How many statements a wire's server connection has prepared.
async fn prepared_count(wire: &mut Wire) -> i64 {
    let replies = wire
        .simple("SELECT count(*) FROM pg_prepared_statements")
        .await;
    replies
        .value()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{}: count: {replies:?}", wire.label))
}

/// Prepares, runs and closes (protocol-level Close) `n` distinct named statements; returns
/// the first reply that differs from what is expected, if any.
async fn prepare_run_and_close(wire: &mut Wire, n: usize) -> Option<String> {
    for i in 0..n {
        let name = format!("closed_{i}");
        let ran = wire
            .step(
                Msgs::new()
                    .parse(&name, &format!("SELECT {i}"))
                    .bind("", &name)
                    .execute("")
                    .sync(),
            )
            .await;
        if ran.value() != Some(i.to_string()) {
            return Some(format!("running {name}: {ran:?}"));
        }
        let closed = wire.step(Msgs::new().close(b'S', &name).sync()).await;
        if closed.kinds() != ["CloseComplete", "ReadyForQuery(I)"] {
            return Some(format!("closing {name}: {closed:?}"));
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_closed_by_the_client_do_not_stay_prepared_on_server_connections() {
    const N: usize = 50;
    /// What may stay: the proxy's own, a few kept for reuse.
    const HANDFUL: i64 = 5;
    let db = TestDb::new("fidelity_closed_statements").await;
    let direct_at = Endpoint::direct(&db).await;
    let mut direct = direct_at.wire().await;
    assert_eq!(
        prepare_run_and_close(&mut direct, N).await,
        None,
        "directly"
    );
    assert_eq!(prepared_count(&mut direct).await, 0, "directly");
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        // One server connection: the next client gets the one the first used.
        let proxy = Proxy::start(&db, mode, 1, "workers = 1").await;
        let at = Endpoint::proxy(&proxy, mode);
        let mut wire = at.wire().await;
        let problem = prepare_run_and_close(&mut wire, N).await;
        differences.compare(&format!("{mode} mode, replies"), &problem, &None);
        let left = prepared_count(&mut wire).await;
        differences.check(
            &format!(
                "{mode} mode: {N} statements prepared and closed, at most {HANDFUL} may stay \
                 prepared on the client's server connection"
            ),
            left <= HANDFUL,
            format!("{left} stayed"),
        );
        if mode == "transaction" {
            let next = at.client().await;
            let seen = run(&next, "SELECT count(*) FROM pg_prepared_statements").await;
            let left: i64 = seen
                .rsplit('"')
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(i64::MAX);
            differences.check(
                &format!("{mode} mode: the next client's connection holds at most {HANDFUL}"),
                left <= HANDFUL,
                seen,
            );
        }
    }
    differences.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_max_prepared_statements_stay_prepared_and_all_keep_working() {
    const N: usize = 100;
    const MAX: i64 = 10;
    let db = TestDb::new("fidelity_max_prepared").await;
    let direct_at = Endpoint::direct(&db).await;
    let mut differences = Differences::default();
    for mode in ["direct", "transaction", "session"] {
        let proxy;
        let at = if mode == "direct" {
            direct_at.clone()
        } else {
            proxy = Proxy::start(
                &db,
                mode,
                1,
                &format!("workers = 1\nmax_prepared_statements = {MAX}"),
            )
            .await;
            Endpoint::proxy(&proxy, mode)
        };
        let mut wire = at.wire().await;
        let mut wrong = Vec::new();
        for i in 0..N {
            let name = format!("kept_{i}");
            let ran = wire
                .step(
                    Msgs::new()
                        .parse(&name, &format!("SELECT {i}"))
                        .bind("", &name)
                        .execute("")
                        .sync(),
                )
                .await;
            if ran.value() != Some(i.to_string()) {
                wrong.push(format!("first run of {name}: {ran:?}"));
            }
        }
        let left = prepared_count(&mut wire).await;
        // Every statement again, in the order that evicts most.
        for i in 0..N {
            let name = format!("kept_{i}");
            let ran = wire
                .step(Msgs::new().bind("", &name).execute("").sync())
                .await;
            if ran.value() != Some(i.to_string()) {
                wrong.push(format!("second run of {name}: {ran:?}"));
            }
        }
        if mode == "direct" {
            assert_eq!(wrong, Vec::<String>::new(), "directly");
            assert_eq!(left, N as i64, "directly, every statement stays");
            continue;
        }
        wrong.truncate(5);
        differences.compare(
            &format!("{mode} mode, statements that did not run as on the server (first 5)"),
            &wrong,
            &Vec::new(),
        );
        differences.check(
            &format!(
                "{mode} mode: {N} statements prepared, at most max_prepared_statements = {MAX} \
                 stay on the server connection"
            ),
            left <= MAX,
            format!("{left} stayed"),
        );
    }
    differences.assert_none();
}

// ---------------------------------------------------------------------------------------
// 3. The options startup parameter.

async fn options_settings(at: &Endpoint) -> Vec<String> {
    let mut config = at.config();
    config.options("-c search_path=myschema -c statement_timeout=1234");
    let client = at.client_from(config).await;
    let other = at.client().await;
    let mut seen = Vec::new();
    for (who, c) in [("client", &client), ("other", &other), ("client", &client)] {
        for sql in ["SHOW search_path", "SHOW statement_timeout"] {
            seen.push(format!("{who}: {}", run(c, sql).await));
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_in_the_options_startup_parameter_apply_to_every_transaction() {
    let db = TestDb::new("fidelity_options").await;
    let direct = options_settings(&Endpoint::direct(&db).await).await;
    assert_eq!(
        direct,
        strs(&[
            "client: SHOW search_path → ok [\"myschema\"]",
            "client: SHOW statement_timeout → ok [\"1234ms\"]",
            "other: SHOW search_path → ok [\"\\\"$user\\\", public\"]",
            "other: SHOW statement_timeout → ok [\"0\"]",
            "client: SHOW search_path → ok [\"myschema\"]",
            "client: SHOW statement_timeout → ok [\"1234ms\"]",
        ]),
        "directly"
    );
    let mut differences = Differences::default();
    // Transaction mode: one server connection, used by the other client in between.
    for (mode, pool_size) in [("transaction", 1), ("session", 2)] {
        let proxy = Proxy::start(&db, mode, pool_size, "workers = 1").await;
        let got = options_settings(&Endpoint::proxy(&proxy, mode)).await;
        eprintln!("{mode}: {got:?} vs {direct:?}");
        differences.compare(&format!("{mode} mode"), &got, &direct);
    }
    differences.assert_none();
}

// ---------------------------------------------------------------------------------------
// 4. application_name.

/// The application_name pg_stat_activity shows the superuser for the backend that runs a
/// transaction of `wire`'s.
async fn activity_seen_by(superuser: &Client, wire: &mut Wire) -> String {
    wire.simple("BEGIN").await;
    let pid: i32 = wire
        .simple("SELECT pg_backend_pid()")
        .await
        .value()
        .and_then(|v| v.parse().ok())
        .expect("the backend's pid");
    let name: Option<String> = superuser
        .query_opt(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .map(|row| row.get(0));
    wire.simple("COMMIT").await;
    format!("pg_stat_activity seen by the superuser: {name:?}")
}

/// What the client and the server's pg_stat_activity (read by the superuser, for the backend
/// running the client's transaction) say the client's application_name is.
async fn application_names(at: &Endpoint, superuser: &Client) -> Vec<String> {
    let mut wire = at.wire_with(&[("application_name", "app-x")]).await;
    let mut seen = vec![format!(
        "login: application_name = {:?}",
        wire.login_param("application_name")
    )];
    for sql in [
        "SHOW application_name",
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    ] {
        seen.push(format!("{sql}: {:?}", wire.simple(sql).await));
    }
    seen.push(activity_seen_by(superuser, &mut wire).await);
    for sql in [
        "SET application_name = 'y'",
        "SHOW application_name",
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    ] {
        seen.push(format!("{sql}: {:?}", wire.simple(sql).await));
    }
    seen.push(activity_seen_by(superuser, &mut wire).await);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_application_name_is_what_show_and_the_server_see() {
    let db = TestDb::new("fidelity_application_name").await;
    let superuser = db.source_client().await;
    let direct = application_names(&Endpoint::direct(&db).await, &superuser).await;
    let row = |v: &str| {
        format!("[\"RowDescription\", \"DataRow[{v}]\", \"CommandComplete(SELECT 1)\", \"ReadyForQuery(I)\"]")
    };
    let show = |v: &str| {
        format!("[\"RowDescription\", \"DataRow[{v}]\", \"CommandComplete(SHOW)\", \"ReadyForQuery(I)\"]")
    };
    assert_eq!(
        direct,
        vec![
            "login: application_name = Some(\"app-x\")".to_string(),
            format!("SHOW application_name: {}", show("app-x")),
            format!("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid(): {}", row("app-x")),
            "pg_stat_activity seen by the superuser: Some(\"app-x\")".to_string(),
            "SET application_name = 'y': [\"CommandComplete(SET)\", \"ParameterStatus(application_name=y)\", \"ReadyForQuery(I)\"]".to_string(),
            format!("SHOW application_name: {}", show("y")),
            format!("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid(): {}", row("y")),
            "pg_stat_activity seen by the superuser: Some(\"y\")".to_string(),
        ],
        "directly"
    );
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&db, mode, 2, "workers = 1").await;
        let got = application_names(&Endpoint::proxy(&proxy, mode), &superuser).await;
        for (got, want) in got.iter().zip(&direct) {
            differences.compare(&format!("{mode} mode"), got, want);
        }
    }
    differences.assert_none();
}

// ---------------------------------------------------------------------------------------
// 5. The server's own error when it ends a connection.

/// Waits until backend `pid` is gone from pg_stat_activity.
async fn wait_gone(superuser: &Client, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = superuser
            .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap();
        if row.is_none() {
            return;
        }
        assert!(Instant::now() < deadline, "backend {pid} did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first error a raw client sees once its server connection has ended without it: what
/// arrived by itself, or the answer to its next query.
async fn first_error_after_the_end(wire: &mut Wire) -> Option<(String, String)> {
    let mut replies = wire.unsolicited(Duration::from_millis(300)).await;
    if replies.first_error().is_none()
        && replies.end == End::Done
        && wire.try_send(Msgs::new().query("SELECT 1")).await.is_ok()
    {
        replies = wire.until_ready(1).await;
    }
    replies.first_error()
}

async fn terminated_connection(at: &Endpoint, superuser: &Client) -> Vec<String> {
    let mut seen = Vec::new();
    // A query running when its backend is terminated.
    let client = at.client().await;
    run(&client, "BEGIN").await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let sleeping = bounded("pg_sleep", client.simple_query("SELECT pg_sleep(10)"));
    let terminate = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while superuser
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
                &[&pid],
            )
            .await
            .unwrap()
            .is_none()
        {
            assert!(Instant::now() < deadline, "pg_sleep did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        superuser
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
    };
    let (result, ()) = tokio::join!(sleeping, terminate);
    seen.push(format!(
        "running: {}",
        result.map_or_else(|e| error_text(&e), |_| "ok".into())
    ));

    // An idle transaction whose backend is terminated.
    let mut wire = at.wire().await;
    wire.simple("BEGIN").await;
    let pid: i32 = wire
        .simple("SELECT pg_backend_pid()")
        .await
        .value()
        .and_then(|v| v.parse().ok())
        .expect("the backend's pid");
    superuser
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    wait_gone(superuser, pid).await;
    seen.push(format!(
        "idle in a transaction: {:?}",
        first_error_after_the_end(&mut wire).await
    ));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_server_connection_gives_the_client_the_servers_error() {
    let db = TestDb::new("fidelity_terminated").await;
    let superuser = db.source_client().await;
    let direct = terminated_connection(&Endpoint::direct(&db).await, &superuser).await;
    assert_eq!(
        direct,
        strs(&[
            "running: error 57P01: terminating connection due to administrator command",
            "idle in a transaction: Some((\"57P01\", \"terminating connection due to administrator command\"))",
        ]),
        "directly"
    );
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&db, mode, 2, "workers = 1").await;
        let got = terminated_connection(&Endpoint::proxy(&proxy, mode), &superuser).await;
        eprintln!("{mode}: {got:?} vs {direct:?}");
        differences.compare(&format!("{mode} mode"), &got, &direct);
    }
    differences.assert_none();
}

async fn idle_timeout(at: &Endpoint) -> Option<(String, String)> {
    let mut wire = at.wire().await;
    let begun = wire.simple("BEGIN").await;
    assert_eq!(
        begun.kinds(),
        ["CommandComplete(BEGIN)", "ReadyForQuery(T)"],
        "{}",
        at.label
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    first_error_after_the_end(&mut wire).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_in_transaction_timeout_gives_the_client_the_servers_error() {
    let db = TestDb::new("fidelity_idle_timeout").await;
    let direct_at = Endpoint::direct(&db).await;
    // For the role: every server connection the proxies open from now on has it.
    db.source_client()
        .await
        .batch_execute(&format!(
            "ALTER ROLE {} SET idle_in_transaction_session_timeout = '300ms'",
            direct_at.user
        ))
        .await
        .unwrap();
    let direct = idle_timeout(&direct_at).await;
    assert_eq!(
        direct,
        Some((
            "25P03".to_string(),
            "terminating connection due to idle-in-transaction timeout".to_string()
        )),
        "directly"
    );
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&db, mode, 2, "workers = 1").await;
        let got = idle_timeout(&Endpoint::proxy(&proxy, mode)).await;
        eprintln!("{mode}: {got:?} vs {direct:?}");
        differences.compare(&format!("{mode} mode"), &got, &direct);
    }
    differences.assert_none();
}

// ---------------------------------------------------------------------------------------
// 6. client_encoding as the server spells it.

async fn reported_encodings(at: &Endpoint) -> Vec<String> {
    let mut seen = Vec::new();
    for asked in ["utf8", "Unicode", "latin1"] {
        let wire = at.wire_with(&[("client_encoding", asked)]).await;
        seen.push(format!(
            "asked for {asked}: {:?}",
            wire.login_param("client_encoding")
        ));
        wire.terminate().await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_encoding_is_reported_as_the_server_spells_it() {
    let db = TestDb::new("fidelity_encoding_name").await;
    let direct = reported_encodings(&Endpoint::direct(&db).await).await;
    assert_eq!(
        direct,
        strs(&[
            "asked for utf8: Some(\"UTF8\")",
            "asked for Unicode: Some(\"UTF8\")",
            "asked for latin1: Some(\"LATIN1\")",
        ]),
        "directly"
    );
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&db, mode, 2, "workers = 1").await;
        let got = reported_encodings(&Endpoint::proxy(&proxy, mode)).await;
        eprintln!("{mode}: {got:?} vs {direct:?}");
        differences.compare(&format!("{mode} mode"), &got, &direct);
    }
    differences.assert_none();
}

// ---------------------------------------------------------------------------------------
// 7. Temporary tables.

/// Each client uses its temporary table within one transaction: in transaction mode the next
/// transaction may run on another server connection, where the table is not (a limit every
/// transaction pooler has, which the README documents). What must hold is that no other
/// client ever sees it.
async fn temporary_tables(at: &Endpoint) -> Vec<String> {
    let mut seen = Vec::new();
    let a = at.client().await;
    for sql in [
        "BEGIN",
        CREATE_TRACE,
        "INSERT INTO trace VALUES (1)",
        "COMMIT",
    ] {
        seen.push(format!("A: {}", run(&a, sql).await));
    }
    drop(a);
    // A has left; B has a session of its own. Then B stays, idle, and C has one too.
    let b = at.client().await;
    for sql in [
        "BEGIN",
        CREATE_TRACE,
        "SELECT count(*) FROM trace",
        "COMMIT",
    ] {
        seen.push(format!("B: {}", run(&b, sql).await));
    }
    let c = at.client().await;
    for sql in [
        "BEGIN",
        CREATE_TRACE,
        "SELECT count(*) FROM trace",
        "COMMIT",
    ] {
        seen.push(format!("C: {}", run(&c, sql).await));
    }
    seen
}

const CREATE_TRACE: &str = "CREATE TEMP TABLE trace (x int)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_tables_do_not_leak_to_the_next_client_in_transaction_mode() {
    let db = TestDb::new("fidelity_temp_tables").await;
    let direct = temporary_tables(&Endpoint::direct(&db).await).await;
    assert_eq!(
        direct,
        strs(&[
            "A: BEGIN → ok []",
            "A: CREATE TEMP TABLE trace (x int) → ok []",
            "A: INSERT INTO trace VALUES (1) → ok []",
            "A: COMMIT → ok []",
            "B: BEGIN → ok []",
            "B: CREATE TEMP TABLE trace (x int) → ok []",
            "B: SELECT count(*) FROM trace → ok [\"0\"]",
            "B: COMMIT → ok []",
            "C: BEGIN → ok []",
            "C: CREATE TEMP TABLE trace (x int) → ok []",
            "C: SELECT count(*) FROM trace → ok [\"0\"]",
            "C: COMMIT → ok []",
        ]),
        "directly"
    );
    let mut differences = Differences::default();
    // One server connection in transaction mode; in session mode B and C each hold one while
    // A's is reset.
    for (mode, pool_size) in [("transaction", 1), ("session", 2)] {
        let proxy = Proxy::start(
            &db,
            mode,
            pool_size,
            "workers = 1\nquery_wait_timeout = \"5s\"",
        )
        .await;
        let got = temporary_tables(&Endpoint::proxy(&proxy, mode)).await;
        eprintln!("{mode}: {got:?} vs {direct:?}");
        differences.compare(&format!("{mode} mode"), &got, &direct);
    }
    differences.assert_none();
}

/// A SET sent in a group whose error the client has already read (the server skips it): the
/// fuzzer saw the proxy follow it, and the session's next COPY fail on another connection.
/// `other`, if given, holds a server connection in a transaction during the last step, so
/// that in transaction mode the SHOW runs on another connection than the SET did.
async fn set_after_the_group_failed(
    wire: &mut Wire,
    mut other: Option<&mut Wire>,
) -> Vec<Vec<String>> {
    wire.send(Msgs::new().bind("", "nosuch").flush()).await;
    let mut seen = vec![wire.read_until(|m| m.tag == b'E').await.kinds()];
    let set = Msgs::new()
        .parse("", "SET search_path = ''")
        .bind("p1", "")
        .execute("p1")
        .sync();
    seen.push(wire.step(set).await.kinds());
    if let Some(other) = other.as_deref_mut() {
        other.simple("BEGIN").await;
    }
    seen.push(wire.simple("SHOW search_path").await.kinds());
    if let Some(other) = other {
        other.simple("COMMIT").await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_the_server_skipped_after_an_error_is_not_followed() {
    let db = TestDb::new("fidelity_skipped_set").await;
    let direct_at = Endpoint::direct(&db).await;
    let direct = set_after_the_group_failed(&mut direct_at.wire().await, None).await;
    assert_eq!(
        direct[1],
        strs(&["ReadyForQuery(I)"]),
        "directly: {direct:?}"
    );
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&db, mode, 2, "workers = 1").await;
        let at = Endpoint::proxy(&proxy, mode);
        let (mut wire, mut other) = (at.wire().await, at.wire().await);
        let got = set_after_the_group_failed(&mut wire, Some(&mut other)).await;
        differences.compare(&format!("{mode} mode"), &got, &direct);
    }
    differences.assert_none();
}

/// The client's unnamed statement, put on a fresh connection by the proxy in a group that
/// fails before it (the server skips it), must be put there again for the next group sent
/// in the same write (the fuzzer saw a 26000 where PostgreSQL binds it). The duplicate Parse
/// makes the first connection unfit for reuse, so the second write starts on another one.
async fn replayed_unnamed_steps(wire: &mut Wire) -> Vec<Vec<String>> {
    let mut seen = Vec::new();
    wire.send(Msgs::new().parse("s3", "SELECT 3")).await;
    seen.push(
        wire.exchange(
            Msgs::new()
                .parse("s3", "SELECT 33")
                .sync()
                .parse("", "SELECT 'unnamed'")
                .bind("", "")
                .sync(),
            2,
        )
        .await
        .kinds(),
    );
    seen.push(
        wire.exchange(
            Msgs::new()
                .describe(b'P', "p2")
                .bind("", "s1")
                .describe(b'S', "")
                .sync()
                .bind("", "")
                .execute("")
                .sync(),
            2,
        )
        .await
        .kinds(),
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_statement_replayed_in_a_failed_group_is_replayed_again() {
    let db = TestDb::new("fidelity_unnamed_replayed").await;
    let direct_at = Endpoint::direct(&db).await;
    let direct = replayed_unnamed_steps(&mut direct_at.wire().await).await;
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&db, mode, 2, "workers = 1").await;
        let mut wire = Endpoint::proxy(&proxy, mode).wire().await;
        let got = replayed_unnamed_steps(&mut wire).await;
        for (i, (got, want)) in got.iter().zip(&direct).enumerate() {
            differences.compare(&format!("{mode} mode, step {}", i + 1), got, want);
        }
    }
    differences.assert_none();
}

/// A Bind of the unnamed statement pipelined after a group whose unnamed Parse the server
/// skips (an error before it): PostgreSQL binds the statement from before that Parse. The
/// proxy must wait for that group's answer to know which one, and put it on a connection
/// that lacks it (the duplicate Parse makes the first connection unfit for reuse).
async fn skipped_unnamed_then_bind_steps(wire: &mut Wire) -> Vec<Vec<String>> {
    let mut seen = Vec::new();
    seen.push(
        wire.step(Msgs::new().parse("s1", "SELECT 1").sync())
            .await
            .kinds(),
    );
    seen.push(
        wire.step(
            Msgs::new()
                .parse("", "SELECT 'first'")
                .parse("s1", "SELECT 2")
                .sync(),
        )
        .await
        .kinds(),
    );
    seen.push(
        wire.step(
            Msgs::new()
                .bind("", "nosuch")
                .parse("", "SELECT 'second'")
                .sync()
                .bind("", "")
                .execute("")
                .sync(),
        )
        .await
        .kinds(),
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_after_a_skipped_unnamed_parse_binds_the_statement_before_it() {
    let db = TestDb::new("fidelity_unnamed_pipelined").await;
    let direct_at = Endpoint::direct(&db).await;
    let direct = skipped_unnamed_then_bind_steps(&mut direct_at.wire().await).await;
    assert!(
        direct[2].contains(&"DataRow[first]".to_string()),
        "directly: {direct:?}"
    );
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&db, mode, 2, "workers = 1").await;
        let mut wire = Endpoint::proxy(&proxy, mode).wire().await;
        let got = skipped_unnamed_then_bind_steps(&mut wire).await;
        for (i, (got, want)) in got.iter().zip(&direct).enumerate() {
            differences.compare(&format!("{mode} mode, step {}", i + 1), got, want);
        }
    }
    differences.assert_none();
}

/// A portal bound to a SET in a pipeline, before the answer to an earlier query of the same
/// write came, and executed after it: the SET is the session's (the fuzzer saw the proxy
/// forget it, once the earlier query's ReadyForQuery cleared the transaction's portals).
/// `other` holds a server connection during the SHOW, so that in transaction mode it runs on
/// another connection than the SET did.
async fn set_through_a_pipelined_portal(
    wire: &mut Wire,
    other: Option<&mut Wire>,
) -> Vec<Vec<String>> {
    wire.send(
        Msgs::new()
            .query("SELECT pg_sleep(0.2)")
            .parse("", "SET search_path = pg_catalog, public")
            .bind("p2", ""),
    )
    .await;
    let mut seen = vec![wire.until_ready(1).await.kinds()];
    seen.push(wire.step(Msgs::new().execute("p2").sync()).await.kinds());
    let other = match other {
        Some(other) => {
            other.simple("BEGIN").await;
            Some(other)
        }
        None => None,
    };
    seen.push(wire.simple("SHOW search_path").await.kinds());
    if let Some(other) = other {
        other.simple("COMMIT").await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_executed_through_a_portal_bound_earlier_in_a_pipeline_is_followed() {
    let db = TestDb::new("fidelity_pipelined_portal").await;
    let direct_at = Endpoint::direct(&db).await;
    let direct = set_through_a_pipelined_portal(&mut direct_at.wire().await, None).await;
    assert!(
        direct[2].contains(&"DataRow[pg_catalog, public]".to_string()),
        "directly: {direct:?}"
    );
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&db, mode, 2, "workers = 1").await;
        let at = Endpoint::proxy(&proxy, mode);
        let (mut wire, mut other) = (at.wire().await, at.wire().await);
        let got = set_through_a_pipelined_portal(&mut wire, Some(&mut other)).await;
        differences.compare(&format!("{mode} mode"), &got, &direct);
    }
    differences.assert_none();
}

/// A Close of a named statement that the server skipped (an error earlier in its group): the
/// statement is still the client's and still on the connection, so it is not prepared again,
/// which after a `SET search_path` would resolve its tables anew (the fuzzer saw a 42P01
/// where PostgreSQL, binding the statement it has, checks the parameters first: 08P01).
fn skipped_close_steps() -> Vec<Msgs> {
    vec![
        Msgs::new()
            .parse(
                "s2",
                "SELECT count(*) FROM fidelity_close WHERE $1::int > 0",
            )
            .sync(),
        Msgs::new().execute("nosuch").close(b'S', "s2").sync(),
        Msgs::new().query("SET search_path = ''"),
        Msgs::new().bind("", "s2").sync(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_the_server_skipped_leaves_the_statement_where_it_was() {
    let db = TestDb::new("fidelity_skipped_close").await;
    let direct_at = Endpoint::direct(&db).await;
    db.source_client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE public.fidelity_close (n int); GRANT SELECT ON public.fidelity_close TO {}",
            direct_at.user
        ))
        .await
        .expect("a table");
    let direct = steps(&mut direct_at.wire().await, &skipped_close_steps()).await;
    assert_eq!(
        direct[3],
        strs(&["ErrorResponse(08P01)", "ReadyForQuery(I)"]),
        "directly: {direct:?}"
    );
    // One server connection: the statement stays where it was prepared.
    through_both_modes(&db, 1, &skipped_close_steps(), &direct)
        .await
        .assert_none();
}

/// The same on a connection that never had the statement (the duplicate Parse makes the first
/// one unfit for reuse): it must not be listed there afterwards.
fn skipped_close_elsewhere_steps() -> Vec<Msgs> {
    vec![
        Msgs::new().parse("s3", "SELECT 1").sync(),
        Msgs::new()
            .parse("s1", "SELECT 2")
            .parse("s1", "SELECT 3")
            .sync(),
        Msgs::new()
            .execute("nosuch")
            .close(b'S', "s3")
            .bind("", "s3")
            .sync(),
        Msgs::new().bind("", "s3").execute("").sync(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_close_on_a_connection_without_the_statement_lists_nothing() {
    let db = TestDb::new("fidelity_skipped_close_elsewhere").await;
    let direct_at = Endpoint::direct(&db).await;
    let direct = steps(
        &mut direct_at.wire().await,
        &skipped_close_elsewhere_steps(),
    )
    .await;
    assert_eq!(
        direct[3],
        strs(&[
            "BindComplete",
            "DataRow[1]",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)"
        ]),
        "directly: {direct:?}"
    );
    through_both_modes(&db, 2, &skipped_close_elsewhere_steps(), &direct)
        .await
        .assert_none();
}

/// Two client names for one text share one server statement: the first's Close skipped after
/// an error, the second's run in the next group of the same write. The first is still the
/// client's, and the connection no longer has the shared statement: it is prepared again
/// (the fuzzer saw a 26000 once the skipped Close listed it again).
fn same_text_closes_steps() -> Vec<Msgs> {
    vec![
        Msgs::new()
            .parse("s1", "SELECT 7")
            .bind("", "nosuch")
            .close(b'S', "s1")
            .sync()
            .parse("s3", "SELECT 7")
            .close(b'S', "s3")
            .sync(),
        Msgs::new().bind("", "s1").execute("").sync(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_close_does_not_undo_a_later_close_of_the_same_text() {
    let db = TestDb::new("fidelity_same_text_closes").await;
    let direct_at = Endpoint::direct(&db).await;
    let mut direct_wire = direct_at.wire().await;
    let mut direct = Vec::new();
    for step in same_text_closes_steps() {
        let n = step.ready_count();
        direct.push(direct_wire.exchange(step, n).await.kinds());
    }
    assert_eq!(
        direct[1],
        strs(&[
            "BindComplete",
            "DataRow[7]",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)"
        ]),
        "directly: {direct:?}"
    );
    let mut differences = Differences::default();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&db, mode, 1, "workers = 1").await;
        let mut wire = Endpoint::proxy(&proxy, mode).wire().await;
        let mut got = Vec::new();
        for step in same_text_closes_steps() {
            let n = step.ready_count();
            got.push(wire.exchange(step, n).await.kinds());
        }
        for (i, (got, want)) in got.iter().zip(&direct).enumerate() {
            differences.compare(&format!("{mode} mode, step {}", i + 1), got, want);
        }
    }
    differences.assert_none();
}
