//! `switchyard validate` on real servers: no false alarms on tricky types, exactly the
//! injected differences, nothing false while a writer writes, and scattered differences in a
//! large table all found.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::common::{self, text, TestDb};

/// Sync the testdata and wait until the target has everything.
async fn synced(name: &str, rows: u32) -> TestDb {
    let db = TestDb::new(name).await;
    db.load_testdata(rows).await;
    db.write_plan("");
    let output = db.switchyard(&["sync", "--wait", "--timeout", "120s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    db.wait_caught_up(Duration::from_secs(60)).await;
    db
}

/// Runs the same SQL on source and target (a table both hold without replication).
async fn on_both_servers(db: &TestDb, sql: &str) {
    let (source, target) = (db.source_client().await, db.target_client().await);
    let (a, b) = tokio::join!(source.batch_execute(sql), target.batch_execute(sql));
    a.expect("on the source");
    b.expect("on the target");
}

fn validate(db: &TestDb, args: &[&str]) -> (Option<i32>, Value, String) {
    let mut all = vec!["validate", "--json"];
    all.extend_from_slice(args);
    let output = db.switchyard(&all);
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&output)));
    (output.status.code(), report, text(&output))
}

/// (table, key as JSON, kind, columns) of every difference.
fn differences(report: &Value) -> BTreeSet<(String, String, String, String)> {
    report["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| {
            (
                d["table"].as_str().unwrap_or_default().to_string(),
                d["key"].to_string(),
                d["kind"].as_str().unwrap_or_default().to_string(),
                d["columns"]
                    .as_array()
                    .map(|c| {
                        c.iter()
                            .filter_map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default(),
            )
        })
        .collect()
}

fn diff(table: &str, key: &str, kind: &str, columns: &str) -> (String, String, String, String) {
    (table.into(), key.into(), kind.into(), columns.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_finds_nothing_after_sync_then_exactly_the_injected_differences() {
    let db = synced("validate_exact", 400).await;
    let (code, report, out) = validate(&db, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(report["verdict"], "identical", "{out}");
    let tables: BTreeSet<&str> = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for expected in [
        "public.customers",
        "public.orders",
        "public.order_items",
        "public.events",
        "public.measurements_2025",
    ] {
        assert!(tables.contains(expected), "{expected} not validated: {out}");
    }
    for t in report["tables"].as_array().unwrap() {
        assert_eq!(t["rows_source"], t["rows_target"], "{out}");
    }
    // Enums and composites are hashed from their text; the report says so.
    let customers = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "public.customers")
        .unwrap();
    let mode = |column: &str| {
        customers["columns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == column)
            .map(|c| c["mode"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(mode("mood").as_deref(), Some("text"));
    assert_eq!(mode("prefs").as_deref(), Some("typed"));
    assert_eq!(mode("created_at").as_deref(), Some("typed"));

    let target = db.target_client().await;
    target
        .batch_execute(
            "UPDATE customers SET name = name || '!' WHERE id = 3;
             UPDATE customers SET created_at = created_at + interval '1 microsecond' WHERE id = 7;
             UPDATE customers SET email = '' WHERE id = 8;  -- NULL on the source
             UPDATE orders SET score = score + score * 2.3e-16 WHERE id = 5;  -- the last bit
             DELETE FROM order_items WHERE order_id = 5 AND line = 2;
             INSERT INTO order_items (order_id, line, sku, qty) VALUES (99999, 1, 'extra', 1);
             INSERT INTO events SELECT * FROM events WHERE kind = 'click' ORDER BY at LIMIT 1;",
        )
        .await
        .expect("inject differences");
    let email: Option<String> = db
        .source_client()
        .await
        .query_one("SELECT email FROM customers WHERE id = 8", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        email, None,
        "the testdata changed: customer 8 must have no email"
    );

    let reports = db.dir.path().join("reports");
    let reports_arg = reports.to_str().unwrap().to_string();
    let (code, report, out) = validate(&db, &["--report", &reports_arg]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(report["verdict"], "different");
    let found = differences(&report);
    let duplicated = found
        .iter()
        .find(|d| d.0 == "public.events")
        .cloned()
        .unwrap_or_else(|| panic!("the duplicated event was not found: {out}"));
    let expected: BTreeSet<_> = [
        diff("public.customers", r#"{"id":"3"}"#, "changed", "name"),
        diff("public.customers", r#"{"id":"7"}"#, "changed", "created_at"),
        diff("public.customers", r#"{"id":"8"}"#, "changed", "email"),
        diff("public.orders", r#"{"id":"5"}"#, "changed", "score"),
        diff(
            "public.order_items",
            r#"{"order_id":"5","line":"2"}"#,
            "missing",
            "",
        ),
        diff(
            "public.order_items",
            r#"{"order_id":"99999","line":"1"}"#,
            "extra",
            "",
        ),
        duplicated.clone(),
    ]
    .into_iter()
    .collect();
    assert_eq!(found, expected, "{out}");
    assert_eq!(duplicated.2, "extra", "{out}");
    assert!(duplicated.1.contains("\"kind\":\"click\""), "{out}");
    let counts = |name: &str| {
        let t = report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()
            .clone();
        (
            t["missing"].clone(),
            t["extra"].clone(),
            t["changed"].clone(),
        )
    };
    assert_eq!(counts("public.events"), (0.into(), 1.into(), 0.into()));
    assert_eq!(counts("public.customers"), (0.into(), 0.into(), 3.into()));

    // The HTML report stands alone and shows the differing rows side by side.
    let page = std::fs::read_dir(&reports)
        .expect("report directory")
        .next()
        .expect("a report")
        .expect("entry")
        .path();
    let html = std::fs::read_to_string(page).unwrap();
    assert!(html.contains("DIFFERENT") && html.contains("class=\"diff\""));
    assert!(!html.contains("http://") && !html.contains("https://"));

    // The state remembers the verdict for the cutover.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(db.state_path()).unwrap()).unwrap();
    assert_eq!(state["last_validation"]["verdict"], "different");

    // Strict mode compares text forms: the same three customers differ, no others.
    let (code, report, out) = validate(&db, &["--strict", "--tables", "public.customers"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(report["tables"].as_array().unwrap().len(), 1);
    assert_eq!(differences(&report).len(), 3, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_while_the_source_is_written_reports_no_false_difference() {
    let db = synced("validate_live", 300).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let url = db.source.url(&db.name);
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = common::connect(&url).await;
            let mut n: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let sql = format!(
                    "BEGIN;
                     INSERT INTO customers (name, email) VALUES ('live {n}', 'l{n}@x');
                     UPDATE orders SET amount = amount + 1, note = 'n{n}' WHERE id = 1 + ({n} * 7) % 500;
                     DELETE FROM order_items WHERE order_id = 1 + {n} % 300 AND line = 1 + {n} % 3;
                     INSERT INTO events (at, kind) VALUES (now(), 'live');
                     COMMIT;"
                );
                client.batch_execute(&sql).await.expect("writer");
                n += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, report, out) = {
        let db = &db;
        tokio::task::block_in_place(|| validate(db, &[]))
    };
    stop.store(true, Ordering::Relaxed);
    let transactions = writer.await.unwrap();
    assert!(transactions > 20, "the writer only wrote {transactions}");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(report["verdict"], "identical", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_scattered_differences_in_a_million_rows_are_all_found() {
    let db = TestDb::new("validate_big").await;
    let create = "CREATE TABLE big (id int8 PRIMARY KEY, qty int4, label text, price numeric(12, 2), at timestamptz);
                  INSERT INTO big SELECT i, i % 1000, 'item ' || i, (i % 100000) / 100.0,
                                         timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second'
                    FROM generate_series(1, 1000000) AS i;
                  ANALYZE big;";
    on_both_servers(&db, create).await;
    let target = db.target_client().await;
    let changed: BTreeSet<i64> = (1..=100).map(|k| 1 + (k * 9_973) % 1_000_000).collect();
    assert_eq!(changed.len(), 100);
    let list = changed
        .iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    target
        .batch_execute(&format!(
            "UPDATE big SET price = price + 0.01 WHERE id IN ({list});
             DELETE FROM big WHERE id = 2;
             INSERT INTO big VALUES (-5, 1, 'below every key', 1, now()),
                                    (5000000000, 1, 'above every key', 1, now())"
        ))
        .await
        .expect("inject");
    assert!(!changed.contains(&2));
    db.write_plan("");
    // Short chunks, so that the million rows are cut into many whatever this machine's speed.
    let (code, report, out) = validate(&db, &["--tables", "public.big", "--chunk-time", "40ms"]);
    assert_eq!(code, Some(1), "{out}");
    let table = &report["tables"][0];
    assert_eq!(table["rows_source"], 1_000_000, "{out}");
    assert_eq!(table["changed"], 100, "{out}");
    // Keys beyond the sampled ones land in buckets of their own, and are found too.
    assert_eq!(
        (table["missing"].clone(), table["extra"].clone()),
        (1.into(), 2.into()),
        "{out}"
    );
    let key_of =
        |d: &serde_json::Value| -> i64 { d["key"]["id"].as_str().unwrap().parse().unwrap() };
    let differences = report["differences"].as_array().unwrap();
    let odd: BTreeSet<(String, i64)> = differences
        .iter()
        .filter(|d| d["kind"] != "changed")
        .map(|d| (d["kind"].as_str().unwrap().to_string(), key_of(d)))
        .collect();
    let expected_odd: BTreeSet<(String, i64)> =
        [("missing", 2), ("extra", -5), ("extra", 5_000_000_000)]
            .into_iter()
            .map(|(kind, id)| (kind.to_string(), id))
            .collect();
    assert_eq!(odd, expected_odd);
    let found: BTreeSet<i64> = differences
        .iter()
        .filter(|d| d["kind"] == "changed")
        .map(|d| {
            assert_eq!(d["columns"], serde_json::json!(["price"]));
            d["key"]["id"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(found, changed);
    assert!(
        table["chunks"].as_u64().unwrap() > 1,
        "a million rows should be cut into chunks: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_policy_equal_values_are_equal_and_strict_mode_compares_text() {
    let db = TestDb::new("validate_policy").await;
    // A composite is hashed from its text: the numerics and floats inside keep the policy.
    let create = "CREATE TYPE measure AS (n numeric, f float8);
                  CREATE TABLE policy (id int PRIMARY KEY, f float8, n numeric, i interval, j json, jb jsonb, t timestamptz, s text,
                                       m measure, ms measure[])";
    on_both_servers(&db, create).await;
    let (source, target) = (db.source_client().await, db.target_client().await);
    source
        .batch_execute(
            r#"INSERT INTO policy VALUES
                 (1, '-0', 1.0, '1 day', '{"a": 1}', '{"a": 1, "b": 2}', '2024-01-01 12:00:00+02', 'x', '(1.0,-0)', '{"(1.0,-0)",NULL}'),
                 (2, 'NaN', 'NaN', '0', '[]', '[]', 'infinity', 'x', '(,)', '{}'),
                 (3, 1, 1, '1 hour', '{"a": 1, "b": 2}', '{}', '2024-01-01 00:00:00+00', 'x', NULL, NULL),
                 (4, 1, 1, '1 hour', '{}', '{}', '2024-01-01 00:00:00+00', NULL, '(2,NaN)', '{"(,)"}')"#,
        )
        .await
        .unwrap();
    target
        .batch_execute(
            r#"INSERT INTO policy VALUES
                 (1, '0', 1.00, '24 hours', '{"a": 1}', '{"b": 2, "a": 1}', '2024-01-01 10:00:00+00', 'x', '(1.00,0)', '{"(1.00,0)",NULL}'),
                 (2, 'NaN', 'NaN', '0', '[]', '[]', 'infinity', 'x', NULL, '{}'),
                 (3, 1, 1, '1 hour', '{"b": 2, "a": 1}', '{}', '2024-01-01 00:00:00+00', 'x', NULL, NULL),
                 (4, 1, 1, '1 hour', '{}', '{}', '2024-01-01 00:00:00+00', '', '(2.0,NaN)', '{NULL}')"#,
        )
        .await
        .unwrap();
    db.write_plan("");
    let (code, report, out) = validate(&db, &["--tables", "public.policy"]);
    assert_eq!(code, Some(1), "{out}");
    // A composite of NULL fields is not a NULL composite, nor an array of one an array of NULL.
    let expected: BTreeSet<_> = [
        diff("public.policy", r#"{"id":"2"}"#, "changed", "m"),
        diff("public.policy", r#"{"id":"3"}"#, "changed", "j"),
        diff("public.policy", r#"{"id":"4"}"#, "changed", "s,ms"),
    ]
    .into_iter()
    .collect();
    assert_eq!(differences(&report), expected, "{out}");

    let (code, report, out) = validate(&db, &["--tables", "public.policy", "--strict"]);
    assert_eq!(code, Some(1), "{out}");
    let expected: BTreeSet<_> = [
        diff("public.policy", r#"{"id":"1"}"#, "changed", "f,n,i,m,ms"),
        diff("public.policy", r#"{"id":"2"}"#, "changed", "m"),
        diff("public.policy", r#"{"id":"3"}"#, "changed", "j"),
        diff("public.policy", r#"{"id":"4"}"#, "changed", "s,m,ms"),
    ]
    .into_iter()
    .collect();
    assert_eq!(differences(&report), expected, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_missing_on_the_target_makes_the_run_incomplete() {
    let db = TestDb::new("validate_incomplete").await;
    let source = db.source_client().await;
    source
        .batch_execute(
            "CREATE TABLE only_here (id int PRIMARY KEY); INSERT INTO only_here VALUES (1)",
        )
        .await
        .unwrap();
    db.write_plan("");
    let (code, report, out) = validate(&db, &["--tables", "public.only_here"]);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(report["verdict"], "incomplete", "{out}");
    let error = report["tables"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("only_here"),
        "the error names the table: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_slows_the_run_down() {
    let db = TestDb::new("validate_rate").await;
    let create = "CREATE TABLE paced (id int PRIMARY KEY, v text);
                  INSERT INTO paced SELECT i, 'v' || i FROM generate_series(1, 10000) i; ANALYZE paced;";
    on_both_servers(&db, create).await;
    db.write_plan("");
    // 20,000 rows over both servers at 10,000 rows/s: at least two seconds.
    let (code, report, out) = validate(&db, &["--tables", "public.paced", "--max-rate", "10000"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(report["duration_ms"].as_u64().unwrap() >= 1900, "{out}");
    assert_eq!(report["settings"]["max_rate"], 10000);
}

/// Keys crowded into part of their range get quantile bounds from a sample rather than
/// buckets of equal width (which would put half the rows in a few buckets); differences are
/// found either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_keys_are_bucketed_by_sampled_bounds() {
    let db = TestDb::new("validate_skew").await;
    let create = "CREATE TABLE skew (id int8 PRIMARY KEY, v int4);
                  INSERT INTO skew SELECT CASE WHEN i <= 150000 THEN i ELSE 1000000000 + i * 1000 END, i
                    FROM generate_series(1, 300000) AS i;
                  ANALYZE skew;";
    on_both_servers(&db, create).await;
    db.target_client()
        .await
        .batch_execute(
            "UPDATE skew SET v = v + 1 WHERE id IN (77, 149999, 1200000000);
             DELETE FROM skew WHERE id = 5000;",
        )
        .await
        .expect("inject");
    db.write_plan("");
    let (code, report, out) = validate(&db, &["--tables", "public.skew", "--chunk-time", "10ms"]);
    assert_eq!(code, Some(1), "{out}");
    let table = &report["tables"][0];
    assert!(table["chunks"].as_u64().unwrap() > 1, "{out}");
    assert_eq!(
        (
            table["changed"].clone(),
            table["missing"].clone(),
            table["extra"].clone()
        ),
        (3.into(), 1.into(), 0.into()),
        "{out}"
    );
    let keys: BTreeSet<String> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"]["id"].as_str().unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = ["77", "149999", "1200000000", "5000"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(keys, expected);
}

/// Text keys are ordered by bytes (`COLLATE "C"`) on both servers, so a text-keyed table is
/// cut into chunks and buckets like an integer-keyed one whatever the key's collation: the
/// database default, or an ICU collation that sorts unlike bytes (with a different ICU
/// library on each server's build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_keys_are_chunked_in_byte_order_and_differences_found_exactly() {
    let db = TestDb::new("validate_text_keys").await;
    let create = r#"CREATE TABLE by_default (k text PRIMARY KEY, v int4 NOT NULL, note text);
                  CREATE TABLE by_icu (k varchar(40) COLLATE "en-x-icu" PRIMARY KEY, v int4 NOT NULL, note text);
                  INSERT INTO by_default
                    SELECT CASE WHEN i % 2 = 0 THEN upper(md5(i::text)) ELSE md5(i::text) END
                           || CASE WHEN i % 7 = 0 THEN ' é' ELSE '' END, i, 'note ' || i
                      FROM generate_series(1, 60000) AS i;
                  INSERT INTO by_icu SELECT * FROM by_default;
                  ANALYZE by_default, by_icu;"#;
    on_both_servers(&db, create).await;
    let source = db.source_client().await;
    let key_of = |v: i32| {
        let source = &source;
        async move {
            let row = source
                .query_one("SELECT k FROM by_default WHERE v = $1", &[&v])
                .await
                .expect("a key");
            row.get::<_, String>(0)
        }
    };
    let json = |key: &str| serde_json::json!({ "k": key }).to_string();
    let (missing, changed) = (key_of(100).await, key_of(30_001).await);
    let target = db.target_client().await;
    let mut expected = BTreeSet::new();
    for table in ["by_default", "by_icu"] {
        target
            .batch_execute(&format!(
                "DELETE FROM {table} WHERE v = 100;
                 UPDATE {table} SET note = 'changed' WHERE v = 30001;
                 INSERT INTO {table} VALUES ('!before', -1, NULL), ('Mixed Extra', -2, NULL), ('~after', -3, NULL);"
            ))
            .await
            .expect("inject");
        let name = format!("public.{table}");
        expected.extend([
            diff(&name, &json(&missing), "missing", ""),
            diff(&name, &json(&changed), "changed", "note"),
            diff(&name, r#"{"k":"!before"}"#, "extra", ""),
            diff(&name, r#"{"k":"Mixed Extra"}"#, "extra", ""),
            diff(&name, r#"{"k":"~after"}"#, "extra", ""),
        ]);
    }
    db.write_plan("");
    // Short chunks, so that 60,000 rows are cut into several whatever this machine's speed.
    let (code, report, out) = validate(
        &db,
        &[
            "--tables",
            "public.by_default,public.by_icu",
            "--chunk-time",
            "5ms",
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(differences(&report), expected, "{out}");
    for table in report["tables"].as_array().expect("tables") {
        assert_eq!(table["rows_source"], 60_000, "{out}");
        assert_eq!(table["rows_target"], 60_002, "{out}");
        assert!(
            table["chunks"].as_u64().unwrap_or_default() > 1,
            "a text-keyed table is cut into chunks: {out}"
        );
    }

    // One difference alone, in a bucket whose bounds ICU orders the other way round (an
    // upper-case key, then a lower-case one): the bucket is opened by its range in bytes too.
    target
        .execute("DELETE FROM by_icu WHERE v < 0 AND k <> 'Mixed Extra'", &[])
        .await
        .expect("repair");
    target
        .execute(
            "INSERT INTO by_icu VALUES ($1, 100, 'note 100')",
            &[&missing],
        )
        .await
        .expect("repair");
    target
        .execute("UPDATE by_icu SET note = 'note 30001' WHERE v = 30001", &[])
        .await
        .expect("repair");
    let (code, report, out) = validate(&db, &["--tables", "public.by_icu", "--chunk-time", "5ms"]);
    assert_eq!(code, Some(1), "{out}");
    let expected: BTreeSet<_> = [diff("public.by_icu", r#"{"k":"Mixed Extra"}"#, "extra", "")]
        .into_iter()
        .collect();
    assert_eq!(differences(&report), expected, "{out}");
}

/// Exit 2 means "could not validate", and the report says why: no table selected, or the
/// HTML report that cannot be written (found before the run, not after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_cannot_validate_exits_2_and_says_why() {
    let db = TestDb::new("validate_cannot").await;
    on_both_servers(&db, "CREATE TABLE here (id int PRIMARY KEY)").await;
    db.write_plan("");
    let (code, report, out) = validate(&db, &["--tables", "public.nosuch"]);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(report["verdict"], "incomplete", "{out}");
    let problems = report["problems"].to_string();
    assert!(problems.contains("no table to validate"), "{out}");
    let output = db.switchyard(&["validate", "--tables", "public.nosuch"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("Could not validate: no table to validate"),
        "{}",
        text(&output)
    );

    // A directory that cannot be made: under a plain file.
    let file = db.dir.path().join("a-file");
    std::fs::write(&file, "").expect("a file");
    let under_file = file.join("reports");
    let (code, report, out) = validate(&db, &["--report", under_file.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(report["verdict"], "incomplete", "{out}");
    assert!(
        report["problems"]
            .to_string()
            .contains("cannot write the report"),
        "{out}"
    );
}

/// The verdict goes into the state for the cutover: a command holding the state's lock for a
/// moment is waited for; one that keeps it makes the run exit 2, saying the verdict is not
/// recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verdict_waits_for_the_state_lock_and_exits_2_when_not_recorded() {
    use switchyard::state::{FileStore, StateStore};
    let db = TestDb::new("validate_locked").await;
    on_both_servers(
        &db,
        "CREATE TABLE here (id int PRIMARY KEY); INSERT INTO here VALUES (1)",
    )
    .await;
    db.write_plan("");
    let recorded = || -> Value {
        std::fs::read_to_string(db.state_path())
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .map(|state| state["last_validation"]["verdict"].clone())
            .unwrap_or(Value::Null)
    };
    let store = FileStore::new(db.state_path());
    let held = store
        .lock("a test holding the lock")
        .expect("take the lock");
    let (code, report, out) = validate(&db, &[]);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(report["verdict"], "incomplete", "{out}");
    let problems = report["problems"].to_string();
    assert!(
        problems.contains("(identical) is not recorded in the state")
            && problems.contains("a test holding the lock"),
        "{out}"
    );
    assert_eq!(recorded(), Value::Null, "{out}");

    // Let go of while the run is under way (or waiting): the verdict is recorded.
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        drop(held);
    });
    let (code, report, out) = validate(&db, &[]);
    releaser.join().expect("the releaser");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(report["verdict"], "identical", "{out}");
    assert_eq!(recorded(), "identical", "{out}");
}
