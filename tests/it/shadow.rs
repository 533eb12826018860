//! `[proxy.shadow]`: reads through the proxy replayed on the other server and compared,
//! against a real PostgreSQL 15 source and 17 target. Each case can fail: a divergence the
//! comparison misses, or noise (order, lag, time) it reports as one.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::common::{text, TestDb};
use crate::cutover::coordinator;
use crate::proxy::{app_role, Proxy, TOKEN};

/// Every eligible read replayed; small thresholds so that a test's few reads are enough.
const SHADOW: &str =
    "[proxy.shadow]\nfraction = 1.0\nmin_samples = 20\nmax_p95_ratio = 2.0\nmax_in_flight = 64\n";

/// The same schema and the application's role on both servers, without replication: what
/// each server answers is then what the test put there.
async fn both_servers(db: &TestDb, schema: &str) -> (Client, Client) {
    let source = db.source_client().await;
    let target = db.target_client().await;
    for client in [&source, &target] {
        client.batch_execute(schema).await.expect("schema");
        app_role(db, client).await;
    }
    (source, target)
}

async fn window(proxy: &Proxy) -> Value {
    let (status, body) = proxy.admin("GET", "/shadow", None, "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/shadow JSON")
}

/// Waits until the proxy's window holds `samples` replays (and `more` of the other counts
/// of its window).
async fn wait_for(proxy: &Proxy, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = window(proxy).await;
        if done(&report) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "the shadow window did not get there: {report:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fingerprint<'a>(report: &'a Value, query_starts: &str) -> &'a Value {
    report["fingerprints"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|f| f["query"].as_str().unwrap_or("").starts_with(query_starts))
        })
        .unwrap_or_else(|| panic!("no fingerprint for {query_starts:?} in {report:#}"))
}

/// `count` lookups of one row of `t` each, every one answered.
async fn lookups(client: &Client, count: u32) {
    for i in 0..count {
        let sql = format!("SELECT id FROM t WHERE id = {}", i % 10 + 1);
        assert_eq!(simple(client, &sql).await.unwrap().len(), 1);
    }
}

/// A simple query's rows as text, or its error.
pub(crate) async fn simple(
    client: &Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    Ok(client
        .simple_query(sql)
        .await?
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergences_are_reported_with_their_rows_and_noise_is_not() {
    let db = TestDb::new("shadow_divergences").await;
    let schema = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
                  CREATE SCHEMA a; CREATE SCHEMA b;
                  CREATE TABLE a.t (v text); CREATE TABLE b.t (v text);
                  INSERT INTO a.t VALUES ('in a'); INSERT INTO b.t VALUES ('in b');
                  CREATE FUNCTION touch() RETURNS int LANGUAGE sql
                      AS 'UPDATE items SET name = name WHERE id = 1 RETURNING 1';";
    let (source, target) = both_servers(&db, schema).await;
    let (user, _) = app_role(&db, &source).await;
    for client in [&source, &target] {
        client
            .batch_execute(&format!(
                "GRANT USAGE ON SCHEMA a, b TO {user}; GRANT SELECT ON a.t, b.t TO {user}"
            ))
            .await
            .unwrap();
    }
    // The same rows, stored in opposite orders; one row changed on the target behind
    // replication's back.
    source
        .batch_execute("INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 40) i")
        .await
        .unwrap();
    target
        .batch_execute(
            "INSERT INTO items SELECT i, 'item ' || i FROM generate_series(40, 1, -1) i;
             UPDATE items SET name = 'changed on the target' WHERE id = 7",
        )
        .await
        .unwrap();
    let proxy = Proxy::start(&db, "transaction", 4, SHADOW).await;
    let client = proxy.client().await;

    // PostgreSQL 15 refuses 'infinity'::interval; 17 accepts it.
    let refused = simple(&client, "SELECT 'infinity'::interval AS forever").await;
    assert!(refused.is_err(), "PostgreSQL 15 answered {refused:?}");
    // tokio-postgres returns the error before the ReadyForQuery that follows it: a query sent
    // at once reaches the proxy inside the same turn, and is not sampled. One that waits for
    // its ReadyForQuery first, so that the next read starts a turn of its own.
    client.batch_execute("RESET search_path").await.unwrap();
    // Rows in another order, no ORDER BY: equal.
    let rows = simple(&client, "SELECT id, name FROM items WHERE id <> 7")
        .await
        .unwrap();
    assert_eq!(rows.len(), 39);
    // The changed row, through a named prepared statement (tokio-postgres prepares one).
    let row = client
        .query_one("SELECT id, name FROM items WHERE id = $1", &[&7i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(1), "item 7");
    // Through the unnamed statement.
    let typed = client
        .query_typed(
            "SELECT name FROM items WHERE id = $1 ORDER BY name",
            &[(&8i32, tokio_postgres::types::Type::INT4)],
        )
        .await
        .unwrap();
    assert_eq!(typed.len(), 1);
    // Not determined by the data.
    simple(&client, "SELECT now() AS at").await.unwrap();
    // The client's search_path follows it to the shadow server.
    let b = simple(&client, "SET search_path = b; SELECT v FROM t")
        .await
        .unwrap();
    assert_eq!(b, [[Some("in b".to_string())]]);
    client.batch_execute("SET search_path = b").await.unwrap();
    let b = simple(&client, "SELECT v FROM t").await.unwrap();
    assert_eq!(b, [[Some("in b".to_string())]]);
    // A write is never replayed; a SELECT that writes (refused under read-only on the
    // shadow side) and two statements in one query are not reads.
    client.batch_execute("RESET search_path").await.unwrap();
    client
        .batch_execute("UPDATE items SET name = name WHERE id = 1")
        .await
        .unwrap();
    simple(&client, "SELECT touch()").await.unwrap();
    simple(&client, "SELECT 1 AS one; SELECT 2 AS two")
        .await
        .unwrap();

    let report = wait_for(&proxy, |r| {
        let explained = r["fingerprints"].as_array().is_some_and(|all| {
            all.iter()
                .filter(|f| f["divergences"].as_u64() > Some(0))
                .all(|f| f["plans"].is_object())
        });
        r["window"]["samples"].as_u64() >= Some(6)
            && r["window"]["divergences"].as_u64() >= Some(2)
            && r["window"]["not_a_read"].as_u64() >= Some(2)
            && explained
    })
    .await;
    assert_eq!(report["verdict"], "diverged", "{report:#}");

    let infinity = fingerprint(&report, "SELECT $1::interval");
    assert_eq!(infinity["divergences"], 1, "{infinity:#}");
    let example = &infinity["example"];
    assert_eq!(example["old"]["error"]["code"], "22007", "{example:#}");
    assert_eq!(
        example["new"]["rows"],
        serde_json::json!([["infinity"]]),
        "{example:#}"
    );
    assert_eq!(example["new"]["columns"][0]["type_name"], "interval");
    assert!(
        infinity["plans"]["new"]
            .as_str()
            .unwrap_or("")
            .contains("Result"),
        "{infinity:#}"
    );

    let changed = fingerprint(&report, "SELECT id, name FROM items WHERE id = $1");
    assert_eq!(changed["divergences"], 1, "{changed:#}");
    // tokio-postgres sends and asks for int4 in binary.
    assert_eq!(
        changed["example"]["parameters"],
        serde_json::json!(["\\x00000007"]),
        "{changed:#}"
    );
    assert_eq!(
        changed["example"]["only_old"],
        serde_json::json!([["\\x00000007", "item 7"]]),
        "{changed:#}"
    );
    assert_eq!(
        changed["example"]["only_new"],
        serde_json::json!([["\\x00000007", "changed on the target"]]),
        "{changed:#}"
    );

    for equal in [
        "SELECT id, name FROM items WHERE id <> $1",
        "SELECT name FROM items WHERE id = $1 ORDER BY",
        "SELECT v FROM t",
    ] {
        let f = fingerprint(&report, equal);
        assert_eq!(f["divergences"], 0, "{equal}: {f:#}");
        assert!(f["calls"].as_u64() >= Some(1), "{f:#}");
    }
    let now = fingerprint(&report, "SELECT now()");
    assert_eq!(now["not_comparable"], 1, "{now:#}");
    assert_eq!(now["divergences"], 0, "{now:#}");
    assert_eq!(
        report["window"]["not_a_read"], 2,
        "touch(), two statements: {report:#}"
    );

    // The CLI: the fleet's report, JSON and HTML, exit 1 for a divergence.
    let out_dir = db.dir.path().join("reports");
    let output = db
        .command(&["shadow", proxy.plan.to_str().unwrap(), "--json", "--report"])
        .arg(&out_dir)
        .output()
        .expect("run switchyard shadow");
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let json: Value = serde_json::from_slice(&output.stdout).expect("--json");
    for key in ["verdict", "thresholds", "window", "fingerprints", "proxies"] {
        assert!(json.get(key).is_some(), "{key} missing: {json:#}");
    }
    for key in [
        "start",
        "samples",
        "dropped",
        "not_comparable",
        "not_a_read",
    ] {
        assert!(
            json["window"].get(key).is_some(),
            "window.{key} missing: {json:#}"
        );
    }
    let f = &json["fingerprints"][0];
    for key in [
        "fingerprint",
        "query",
        "calls",
        "divergences",
        "in_flight",
        "unstable",
        "regressed",
        "latency",
        "example",
        "plans",
    ] {
        assert!(f.get(key).is_some(), "fingerprints[].{key} missing: {f:#}");
    }
    for key in ["p50", "p95", "p99"] {
        assert!(
            f["latency"]["old"][key].is_number() && f["latency"]["new"][key].is_number(),
            "{f:#}"
        );
    }
    let html = out_dir.join("shadow.html");
    let dom = crate::common::chromium::dump_dom(&html);
    assert!(dom.contains("class=\"fingerprints\""), "{dom}");
    assert!(
        dom.contains("changed on the target"),
        "the differing row is shown"
    );
    assert!(
        dom.contains("differs"),
        "the differing rows are highlighted"
    );

    let human = db
        .command(&["shadow", proxy.plan.to_str().unwrap()])
        .output()
        .unwrap();
    let shown = text(&human);
    assert!(shown.contains("verdict: diverged"), "{shown}");
    assert!(shown.contains("only on the new server"), "{shown}");

    // --reset: a new, empty window.
    let reset = db
        .command(&["shadow", proxy.plan.to_str().unwrap(), "--reset"])
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_eq!(reset.status.code(), Some(1), "{}", text(&reset));
    let after = window(&proxy).await;
    assert_eq!(after["window"]["samples"], 0, "{after:#}");
    assert_eq!(after["verdict"], "insufficient");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_server_down_or_slow_never_reaches_the_clients() {
    let db = TestDb::new("shadow_down").await;
    let (source, target) = both_servers(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10);",
    )
    .await;
    drop(source);

    // Slow: the target's table is locked; every replay waits for its statement_timeout,
    // max_in_flight replays at once, the rest dropped.
    target.batch_execute("BEGIN").await.unwrap();
    target
        .batch_execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let slow = Proxy::start(
        &db,
        "transaction",
        4,
        "[proxy.shadow]\nfraction = 1.0\nmax_in_flight = 2\nstatement_timeout = \"2s\"\n",
    )
    .await;
    let client = slow.client().await;
    let started = Instant::now();
    lookups(&client, 100).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "100 reads took {took:?} while the shadow server was stuck"
    );
    let report = wait_for(&slow, |r| r["window"]["failed"].as_u64() >= Some(2)).await;
    assert!(
        report["window"]["dropped"].as_u64() >= Some(90),
        "{report:#}"
    );
    target.batch_execute("ROLLBACK").await.unwrap();

    // Down: the plan's target is a port nobody listens on.
    let dead = crate::common::servers::free_port();
    let plan = db
        .plan_text("")
        .replace(&format!(":{}/", db.target.port), &format!(":{dead}/"));
    assert_ne!(plan, db.plan_text(""), "the target's port was replaced");
    let source = db.source_client().await;
    let down = Proxy::start_with(
        &db,
        &source,
        &plan,
        "transaction",
        4,
        "[proxy.shadow]\nfraction = 1.0\n",
    )
    .await;
    let client = down.client().await;
    lookups(&client, 50).await;
    let report = wait_for(&down, |r| r["window"]["failed"].as_u64() >= Some(1)).await;
    assert_eq!(report["window"]["divergences"], 0, "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_missing_on_the_target_is_a_regression_with_both_plans() {
    let db = TestDb::new("shadow_regression").await;
    // A million rows: the target's sequential scan (~100 ms) stays well over twice the
    // source's p95 even when other tests load the machine and the source's indexed lookups
    // reach tens of ms (with 200,000 rows CI measured 55.8 ms against 98.8: a ratio of 1.77).
    let schema = "CREATE TABLE events (id bigint PRIMARY KEY, account int NOT NULL, body text);
                  INSERT INTO events SELECT i, i % 250000, repeat('x', 40) FROM generate_series(1, 1000000) i;
                  ANALYZE events;";
    let (source, _target) = both_servers(&db, schema).await;
    source
        .batch_execute("CREATE INDEX events_account ON events (account); ANALYZE events")
        .await
        .unwrap();
    let proxy = Proxy::start(&db, "transaction", 4, SHADOW).await;
    let client = proxy.client().await;
    let lookup = client
        .prepare("SELECT id, body FROM events WHERE account = $1 ORDER BY id")
        .await
        .unwrap();
    for account in 0..40i32 {
        let rows = client.query(&lookup, &[&(account * 97)]).await.unwrap();
        assert_eq!(rows.len(), 4);
    }
    let report = wait_for(&proxy, |r| r["window"]["samples"].as_u64() >= Some(40)).await;
    assert_eq!(report["verdict"], "regressed", "{report:#}");
    let f = fingerprint(&report, "SELECT id, body FROM events WHERE account = $1");
    assert_eq!(f["regressed"], true, "{f:#}");
    assert_eq!(f["divergences"], 0, "{f:#}");
    assert!(f["latency"]["p95_ratio"].as_f64() > Some(2.0), "{f:#}");
    let wait_plans = wait_for(&proxy, |r| {
        fingerprint(r, "SELECT id, body FROM events WHERE account = $1")["plans"].is_object()
    })
    .await;
    let plans = &fingerprint(
        &wait_plans,
        "SELECT id, body FROM events WHERE account = $1",
    )["plans"];
    assert!(
        plans["old"].as_str().unwrap().contains("Index"),
        "{plans:#}"
    );
    assert!(
        plans["new"].as_str().unwrap().contains("Seq Scan"),
        "{plans:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_not_yet_applied_is_in_flight_the_gate_refuses_a_thin_window_and_after_the_cutover_the_source_is_shadowed(
) {
    let db = TestDb::new("shadow_in_flight").await;
    let source = db.source_client().await;
    source
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL);
             INSERT INTO orders SELECT i, i * 10 FROM generate_series(1, 100) i;",
        )
        .await
        .unwrap();
    let proxy = Proxy::start_with(
        &db,
        &source,
        &db.plan_text(crate::cutover::CUTOVER),
        "transaction",
        4,
        &format!("{}\n{SHADOW}", crate::cutover::PROXY),
    )
    .await;
    let output = coordinator(&db, &proxy.plan, &["sync", "--wait", "--timeout", "120s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let target = db.target_client().await;
    app_role(&db, &target).await;

    // Replication held back: a row written on the source is not on the target yet when
    // the shadow replays the read that saw it.
    let subscription = format!("switchyard_{}", db.name);
    target
        .batch_execute(&format!("ALTER SUBSCRIPTION {subscription} DISABLE"))
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO orders VALUES (101, 1010)")
        .await
        .unwrap();
    let client = proxy.client().await;
    let rows = simple(&client, "SELECT total FROM orders WHERE id = 101")
        .await
        .unwrap();
    assert_eq!(rows, [[Some("1010".to_string())]]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    target
        .batch_execute(&format!("ALTER SUBSCRIPTION {subscription} ENABLE"))
        .await
        .unwrap();
    let report = wait_for(&proxy, |r| r["window"]["samples"].as_u64() >= Some(1)).await;
    assert_eq!(report["window"]["in_flight"], 1, "{report:#}");
    assert_eq!(report["window"]["divergences"], 0, "{report:#}");
    assert_eq!(
        fingerprint(&report, "SELECT total FROM orders")["in_flight"],
        1
    );

    // The cutover gate: one compared read is not the thousand it asks for.
    let gated = db.dir.path().join("gated.toml");
    let plan = std::fs::read_to_string(&proxy.plan).unwrap();
    let gate = "[cutover]\nshadow = { min_samples = 1000, max_divergences = 0 }\n";
    std::fs::write(&gated, plan.replacen("[cutover]\n", gate, 1)).unwrap();
    let output = coordinator(&db, &gated, &["cutover", "--yes"]);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("shadow reads meet [cutover] shadow"),
        "{said}"
    );
    assert!(said.contains("fewer than the 1000"), "{said}");
    assert_eq!(
        proxy.status().await["backend"],
        "source",
        "nothing switched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_transaction_is_replayed_whole_and_nothing_else_is() {
    let db = TestDb::new("shadow_transactions").await;
    // `other.kv` is what `SET LOCAL search_path` makes a transaction's `kv` on both servers.
    let schema = "CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL);
                  INSERT INTO kv SELECT i, 'v' || i FROM generate_series(1, 10) i;
                  CREATE SCHEMA other; GRANT USAGE ON SCHEMA other TO PUBLIC;
                  CREATE TABLE other.kv (k int PRIMARY KEY, v text NOT NULL);
                  GRANT SELECT ON other.kv TO PUBLIC;
                  INSERT INTO other.kv VALUES (1, 'in other');";
    let (_source, target) = both_servers(&db, schema).await;
    target
        .batch_execute("UPDATE kv SET v = 'changed on the target' WHERE k = 3")
        .await
        .unwrap();
    let proxy = Proxy::start(&db, "transaction", 4, SHADOW).await;
    let mut client = proxy.client().await;
    let by_key = client
        .prepare("SELECT k, v FROM kv WHERE k = $1")
        .await
        .unwrap();

    // BEGIN READ ONLY, a simple query, a named statement's Bind, an unnamed statement, COMMIT.
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    let count = simple(&client, "SELECT count(*) AS n FROM kv")
        .await
        .unwrap();
    assert_eq!(count, [[Some("10".to_string())]]);
    let row = client.query_one(&by_key, &[&3i32]).await.unwrap();
    assert_eq!(row.get::<_, String>(1), "v3");
    let typed = client
        .query_typed(
            "SELECT v FROM kv WHERE k > $1 ORDER BY k",
            &[(&8i32, tokio_postgres::types::Type::INT4)],
        )
        .await
        .unwrap();
    assert_eq!(typed.len(), 2);
    client.batch_execute("COMMIT").await.unwrap();
    // tokio-postgres' own read-only transaction: START TRANSACTION ... READ ONLY.
    let transaction = client
        .build_transaction()
        .read_only(true)
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    let max = transaction
        .simple_query("SELECT max(k) AS top FROM kv")
        .await
        .unwrap();
    assert!(
        matches!(&max[1], SimpleQueryMessage::Row(row) if row.get(0) == Some("10")),
        "{max:?}"
    );
    // A setting for this transaction only, and a SHOW: replayed in their place, so the read
    // after them finds `other.kv` on the shadow side too (without the SET it would read
    // `public.kv` there, 'v1', and diverge).
    transaction
        .batch_execute("SET LOCAL search_path = other, public; SHOW search_path")
        .await
        .unwrap();
    transaction
        .batch_execute("SET LOCAL work_mem = '8MB'")
        .await
        .unwrap();
    let other = transaction
        .simple_query("SELECT upper(v) FROM kv WHERE k = 1")
        .await
        .unwrap();
    assert!(
        matches!(&other[1], SimpleQueryMessage::Row(row) if row.get(0) == Some("IN OTHER")),
        "{other:?}"
    );
    transaction.rollback().await.unwrap();

    // Not replayed: a transaction not opened READ ONLY, and one made able to write again.
    client
        .batch_execute("BEGIN; SELECT k FROM kv WHERE v = 'v1'; COMMIT")
        .await
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    simple(&client, "SELECT k FROM kv WHERE v = 'v1'")
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    for make_writable in [
        "SET TRANSACTION READ WRITE",
        "SET LOCAL transaction_read_only = off",
    ] {
        client.batch_execute("BEGIN READ ONLY").await.unwrap();
        client.batch_execute(make_writable).await.unwrap();
        client
            .batch_execute("UPDATE kv SET v = 'written through the proxy' WHERE k = 5")
            .await
            .unwrap();
        client.batch_execute("COMMIT").await.unwrap();
    }

    // Eight clients at once: the replays share their shadow connections' writes.
    let mut readers = Vec::new();
    for _ in 0..8 {
        let reader = proxy.client().await;
        readers.push(tokio::spawn(async move { lookups_kv(&reader, 25).await }));
    }
    for reader in readers {
        reader.await.unwrap();
    }

    let report = wait_for(&proxy, |r| {
        let w = &r["window"];
        w["samples"].as_u64().unwrap_or(0) + w["dropped"].as_u64().unwrap_or(0) >= 205
            && w["divergences"].as_u64() >= Some(1)
            && w["not_a_read"].as_u64() >= Some(2)
    })
    .await;
    let changed = fingerprint(&report, "SELECT k, v FROM kv WHERE k = $1");
    assert_eq!(changed["divergences"], 1, "{changed:#}");
    assert_eq!(
        changed["example"]["only_new"],
        serde_json::json!([["\\x00000003", "changed on the target"]]),
        "{changed:#}"
    );
    for equal in [
        "SELECT count(*) AS n FROM kv",
        "SELECT v FROM kv WHERE k > $1 ORDER BY k",
        "SELECT max(k) AS top FROM kv",
        "SELECT upper(v) FROM kv WHERE k = $1",
    ] {
        let f = fingerprint(&report, equal);
        assert_eq!(f["calls"], 1, "{equal}: {f:#}");
        assert_eq!(f["divergences"], 0, "{equal}: {f:#}");
    }
    let many = fingerprint(&report, "SELECT v FROM kv WHERE k = $1");
    assert_eq!(many["divergences"], 0, "{many:#}");
    assert!(
        many["latency"]["new"]["p95"].as_f64() > Some(0.0),
        "pipelined replays are timed: {many:#}"
    );
    assert!(
        report["fingerprints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| !f["query"].as_str().unwrap().contains("WHERE v =")),
        "a read in a transaction not opened READ ONLY was replayed: {report:#}"
    );
    assert_eq!(report["window"]["not_a_read"], 2, "{report:#}");
    let on_target = simple(&target, "SELECT v FROM kv WHERE k = 5")
        .await
        .unwrap();
    assert_eq!(
        on_target,
        [[Some("v5".to_string())]],
        "a write was replayed"
    );
}

/// `count` lookups of one of the rows of `kv` neither changed on the target nor written.
async fn lookups_kv(client: &Client, count: u32) {
    for i in 0..count {
        let sql = format!("SELECT v FROM kv WHERE k = {}", i % 5 + 6);
        assert_eq!(simple(client, &sql).await.unwrap().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replay_does_not_hold_up_the_others() {
    let db = TestDb::new("shadow_slow_one").await;
    let schema = "CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL);
                  INSERT INTO kv SELECT i, 'v' || i FROM generate_series(1, 10) i;";
    both_servers(&db, schema).await;
    let proxy = Proxy::start(&db, "transaction", 4, SHADOW).await;
    let (slow, fast) = (proxy.client().await, proxy.client().await);
    simple(&slow, "SELECT pg_sleep(1.5)").await.unwrap();
    // Its replay now sleeps as long on the target: the lookups' replays go past it.
    let answered = Instant::now();
    lookups_kv(&fast, 20).await;
    let report = wait_for(&proxy, |r| r["window"]["samples"].as_u64() >= Some(20)).await;
    assert!(
        answered.elapsed() < Duration::from_millis(1200),
        "the lookups were replayed only after the slow read: {:?}, {report:#}",
        answered.elapsed()
    );
    let slow_one = wait_for(&proxy, |r| r["window"]["samples"].as_u64() >= Some(21)).await;
    assert_eq!(fingerprint(&slow_one, "SELECT pg_sleep")["calls"], 1);
}
