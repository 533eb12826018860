//! The snapshot copy (`[sync] copy = "snapshot"`, the default): one exported snapshot, tables
//! split into page ranges and copied in parallel, indexes after the data, the subscription
//! enabled only once everything is in. Each test can fail: a row lost or doubled at the
//! boundary, a half table, a slot left behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::servers::{Cluster, Flavor};
use crate::common::{self, except_all, text, TestDb};

/// 2 MiB chunks: the tests' tables split into many page ranges.
const SMALL_CHUNKS: &str = "copy_workers = 3\ncopy_chunk_bytes = 2097152\n";

/// `wide`: about 30 MB over ~3,800 pages, so 15 or so chunks of 2 MiB.
const WIDE: &str = "CREATE TABLE wide (id bigint PRIMARY KEY, body text NOT NULL, n int NOT NULL);
     INSERT INTO wide SELECT i, repeat(md5(i::text), 3), 0 FROM generate_series(1, 200000) AS i;
     CREATE INDEX wide_n ON wide (n);
     ANALYZE wide;";

/// `table` holds the same rows on both sides within a few seconds. (The slot's confirmed
/// position can pass a change a moment before the subscriber's commit of it is visible: the
/// subscription runs with `synchronous_commit = off`. The cutover turns it on before it waits.)
async fn converges(source: &tokio_postgres::Client, target: &tokio_postgres::Client, table: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (a, b) = except_all(source, target, table).await;
        if a.is_empty() && b.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{table}: {} rows only on the source, {} only on the target: {:?}",
            a.len(),
            b.len(),
            a.iter().chain(&b).take(3).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn slots_on_source(db: &TestDb) -> Vec<String> {
    db.source_client()
        .await
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .expect("list slots")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Updates and deletes rows all over `wide` (the last pages' rows, copied last, among them)
/// and inserts new ones, until stopped.
async fn write_until(url: String, stop: Arc<AtomicBool>) -> u64 {
    let client = common::connect(&url).await;
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let sql = format!(
            "BEGIN;
             UPDATE wide SET n = n + 1 WHERE id = 200000 - ({n} * 37) % 5000;
             UPDATE wide SET n = n + 1 WHERE id = 1 + ({n} * 7919) % 200000;
             DELETE FROM wide WHERE id = 199000 - {n};
             INSERT INTO wide VALUES (300000 + {n}, 'live', {n});
             COMMIT;"
        );
        client
            .batch_execute(&sql)
            .await
            .expect("writer transaction");
        n += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    n as u64
}

/// The copy under a concurrent writer ends identical, with updates and deletes of rows that
/// are copied late (the boundary): the subscription streams from exactly the slot's snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_under_a_concurrent_writer_ends_identical() {
    let db = TestDb::new("copy_live").await;
    db.load_testdata(500).await;
    let source = db.source_client().await;
    source.batch_execute(WIDE).await.unwrap();
    db.write_plan(SMALL_CHUNKS);

    let output = db.switchyard(&["plan", "--json"]);
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&output)));
    let wide = report["copy"]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "public.wide")
        .unwrap_or_else(|| panic!("no copy plan for wide: {report}"))
        .clone();
    assert!(wide["chunks"].as_u64().unwrap() >= 10, "{wide}");
    assert_eq!(wide["format"], "binary");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(db.source.url(&db.name), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let output = db.switchyard(&["sync", "--wait", "--timeout", "120s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 20, "the writer barely ran ({written})");

    db.wait_caught_up(Duration::from_secs(60)).await;
    let target = db.target_client().await;
    for table in ["wide", "customers", "orders", "order_items", "events"] {
        converges(&source, &target, table).await;
    }
    let output = db.switchyard(&["validate"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    // The index built after the data, valid; the bookkeeping gone; one slot.
    let valid: bool = target
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'wide_n'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(valid);
    let bookkeeping: bool = target
        .query_one("SELECT to_regnamespace('_switchyard_copy') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(bookkeeping, "the copy's bookkeeping schema was left");
    assert_eq!(slots_on_source(&db).await.len(), 1);
    let output = db.switchyard(&["abort", "--drop-target-data"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}

/// Enum arrays and composites go as text beside built-in-only tables in binary; partitions
/// are copied as themselves; foreign keys come back validated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_binary_tables_partitions_and_foreign_keys() {
    let db = TestDb::new("copy_kinds").await;
    let source = db.source_client().await;
    source
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
             CREATE TYPE point3 AS (x float8, y float8, z float8);
             CREATE TABLE people (id int PRIMARY KEY, name text NOT NULL, born date);
             CREATE TABLE feelings (id int PRIMARY KEY, person int NOT NULL REFERENCES people (id),
                                    moods mood[] NOT NULL, at point3, total numeric GENERATED ALWAYS AS (id * 2) STORED);
             CREATE TABLE visits (id int, person int REFERENCES people (id), day date NOT NULL, PRIMARY KEY (id, day))
                 PARTITION BY RANGE (day);
             CREATE TABLE visits_2025 PARTITION OF visits FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
             CREATE TABLE visits_2026 PARTITION OF visits FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
             INSERT INTO people SELECT i, 'p' || i, date '2000-01-01' + i FROM generate_series(1, 3000) AS i;
             INSERT INTO feelings SELECT i, 1 + i % 3000, ARRAY['sad', 'happy']::mood[], ROW(i, -i, 0.5)::point3
               FROM generate_series(1, 20000) AS i;
             INSERT INTO visits SELECT i, 1 + i % 3000, date '2025-06-01' + (i % 400) FROM generate_series(1, 20000) AS i;",
        )
        .await
        .unwrap();
    db.write_plan(SMALL_CHUNKS);
    let output = db.switchyard(&["plan", "--json"]);
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&output)));
    let format = |name: &str| {
        report["copy"]["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["format"].clone())
            .unwrap_or_else(|| panic!("{name} not in {report}"))
    };
    assert_eq!(format("public.feelings"), "text");
    assert_eq!(format("public.people"), "binary");
    assert_eq!(format("public.visits_2025"), "binary");

    let output = db.switchyard(&["sync", "--wait", "--timeout", "120s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    source
        .batch_execute("UPDATE feelings SET moods = ARRAY['ok']::mood[] WHERE id = 7; INSERT INTO visits VALUES (99999, 5, '2026-03-01')")
        .await
        .unwrap();
    db.wait_caught_up(Duration::from_secs(30)).await;
    let target = db.target_client().await;
    for table in ["people", "feelings", "visits_2025", "visits_2026"] {
        converges(&source, &target, table).await;
    }
    let keys: Vec<(String, bool)> = target
        .query(
            "SELECT conrelid::regclass::text, convalidated FROM pg_constraint
              WHERE contype = 'f' AND conparentid = 0 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        keys,
        vec![("feelings".to_string(), true), ("visits".to_string(), true)]
    );
    let output = db.switchyard(&["validate"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let output = db.switchyard(&["abort", "--drop-target-data"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}

/// Waits until `sync` is copying rows of `table` into the target.
async fn until_copying(target: &Cluster, db: &TestDb, table: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((client, connection)) =
            tokio_postgres::connect(&target.url(&db.name), tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            let copying = client
                .query("SELECT 1 FROM pg_stat_progress_copy p JOIN pg_class c ON c.oid = p.relid WHERE c.relname = $1 AND p.tuples_processed > 0", &[&table])
                .await
                .map(|rows| !rows.is_empty())
                .unwrap_or(false);
            if copying {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the copy of {table} never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A target restarted mid-copy: the workers retry their chunks in the same snapshot and the
/// same `sync` finishes, identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_restarted_mid_copy_is_ridden_out_by_chunk_retries() {
    let target: &'static Cluster = Box::leak(Box::new(Cluster::start(Flavor::Target17)));
    let db = TestDb::on("copy_target_restart", common::source(), target).await;
    let source = db.source_client().await;
    source.batch_execute(WIDE).await.unwrap();
    db.write_plan(SMALL_CHUNKS);
    let plan = db.plan_path();
    let child = db
        .command(&[
            "sync",
            plan.to_str().unwrap(),
            "--wait",
            "--timeout",
            "180s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start sync");
    until_copying(target, &db, "wide").await;
    tokio::task::spawn_blocking(move || target.restart())
        .await
        .unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(
        text(&output).contains("in the same snapshot"),
        "no chunk was retried: {}",
        text(&output)
    );
    let (a, b) = except_all(&source, &db.target_client().await, "wide").await;
    assert!(a.is_empty() && b.is_empty(), "{} / {}", a.len(), b.len());
    let output = db.switchyard(&["abort", "--drop-target-data"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}

/// A coordinator killed mid-copy: `abort` then leaves no slot, publication, subscription,
/// bookkeeping or half table; and a coordinator killed mid-copy, then `sync` again, starts
/// over from a new slot and ends identical, with no slot left from the first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_copy_is_aborted_or_started_over_cleanly() {
    let target: &'static Cluster = Box::leak(Box::new(Cluster::start(Flavor::Target17)));
    let db = TestDb::on("copy_killed", common::source(), target).await;
    let source = db.source_client().await;
    source.batch_execute(WIDE).await.unwrap();
    db.write_plan(SMALL_CHUNKS);
    let plan = db.plan_path();
    let target_client = db.target_client().await;

    for then in ["abort", "sync"] {
        let mut child = db
            .command(&["sync", plan.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start sync");
        until_copying(target, &db, "wide").await;
        child.kill().expect("kill sync");
        let _ = child.wait();
        let first_slot: String = source
            .query_one(
                "SELECT restart_lsn::text FROM pg_replication_slots WHERE database = current_database()",
                &[],
            )
            .await
            .expect("the first attempt's slot")
            .get(0);
        let status = db.switchyard(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        // Seen from another process: the chunks under way show (marked before their
        // transaction), with rows and bytes of those that committed.
        let wide = status["copy"]["tables"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["name"] == "public.wide"))
            .unwrap_or_else(|| panic!("{status}"))
            .clone();
        assert_eq!(wide["state"], "copying", "{wide}");
        assert!(wide["chunks"].as_u64() > Some(1), "{wide}");

        if then == "abort" {
            let output = db.switchyard(&["abort"]);
            assert_eq!(output.status.code(), Some(0), "{}", text(&output));
            assert_eq!(slots_on_source(&db).await, Vec::<String>::new());
            let left: i64 = target_client
                .query_one(
                    "SELECT (SELECT count(*) FROM pg_subscription)
                          + (SELECT count(*) FROM pg_class WHERE relname = 'wide')
                          + (SELECT count(*) FROM pg_namespace WHERE nspname = '_switchyard_copy')",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                left, 0,
                "abort left a subscription, a half table or bookkeeping"
            );
            let publications: i64 = source
                .query_one("SELECT count(*) FROM pg_publication", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(publications, 0);
        } else {
            let output = db.switchyard(&["sync", "--wait", "--timeout", "180s"]);
            assert_eq!(output.status.code(), Some(0), "{}", text(&output));
            assert!(text(&output).contains("starts over"), "{}", text(&output));
            let slots: Vec<String> = source
                .query(
                    "SELECT restart_lsn::text FROM pg_replication_slots WHERE database = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert_eq!(slots.len(), 1, "{slots:?}");
            assert_ne!(slots[0], first_slot, "the first attempt's slot was kept");
            let (a, b) = except_all(&source, &target_client, "wide").await;
            assert!(a.is_empty() && b.is_empty(), "{} / {}", a.len(), b.len());
            let output = db.switchyard(&["abort", "--drop-target-data"]);
            assert_eq!(output.status.code(), Some(0), "{}", text(&output));
        }
    }
}

/// A managed service's admin role (a member of `rds_superuser`, no REPLICATION): `plan`
/// blocks the snapshot copy with the statement that grants the right, and passes it with
/// `copy = "native"` (the subscription's own connection then makes the slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_blocks_the_copy_for_a_role_without_replication() {
    let db = TestDb::new("copy_no_replication").await;
    let source = db.source_client().await;
    source
        .batch_execute(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_superuser') THEN
                 CREATE ROLE rds_superuser NOLOGIN;
               END IF;
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'copy_rds_admin') THEN
                 CREATE ROLE copy_rds_admin LOGIN PASSWORD '{password}' IN ROLE rds_superuser;
               END IF;
             END $$;
             CREATE TABLE items (id int PRIMARY KEY);",
            password = crate::common::servers::PASSWORD
        ))
        .await
        .unwrap();
    let as_admin = |extra: &str| {
        let url = db.source.url(&db.name);
        db.plan_text(extra).replacen(
            &url,
            &url.replacen("://postgres:", "://copy_rds_admin:", 1),
            1,
        )
    };
    let blocks = |plan: String| {
        std::fs::write(db.plan_path(), plan).unwrap();
        let output = db.switchyard(&["plan", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", text(&output)));
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["severity"] == "block")
            .map(|f| (f["check"].as_str().unwrap().to_string(), f["fix"].clone()))
            .collect::<Vec<_>>()
    };
    let found = blocks(as_admin(""));
    assert!(!found.is_empty(), "the plan found nothing to block");
    let copy = found
        .iter()
        .find(|(check, _)| check == "copy_needs_replication")
        .unwrap_or_else(|| panic!("{found:?}"));
    assert!(
        copy.1
            .as_str()
            .unwrap()
            .contains("ALTER ROLE \"copy_rds_admin\" REPLICATION"),
        "{copy:?}"
    );
    assert!(!found
        .iter()
        .any(|(check, _)| check == "coordinator_not_superuser"));
    let found = blocks(as_admin("copy = \"native\"\n"));
    assert!(
        !found
            .iter()
            .any(|(check, _)| check == "copy_needs_replication"),
        "{found:?}"
    );
}

/// Creating the copy's slot waits for every transaction that has written on the source's
/// cluster; while it waits, `sync` names them (pid, database, age, statement), and goes on
/// when they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_names_the_transactions_it_waits_for() {
    let db = TestDb::new("copy_slot_wait").await;
    db.source_client()
        .await
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items SELECT generate_series(1, 1000)",
        )
        .await
        .unwrap();
    db.write_plan("");
    let (pid, ends) = common::hold_a_writer_until_waited_on(
        db.source_client().await,
        db.source_client().await,
        Duration::from_secs(5),
    )
    .await;
    let output = db.switchyard(&["sync", "--wait", "--timeout", "60s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    ends.await
        .expect("the committer")
        .expect("the slot waited for the open transaction");
    let said = text(&output);
    let named = format!(
        "source: creating the slot waits for the transactions that have written to end, the oldest: pid {pid} in database \"{}\"",
        db.name
    );
    assert!(said.contains(&named), "{named:?} not in: {said}");
    for line in said
        .lines()
        .filter(|l| l.contains("creating the slot waits"))
    {
        eprintln!("{line}");
    }
    assert!(said.contains("pg_terminate_backend"), "{said}");
    let (a, b) = except_all(
        &db.source_client().await,
        &db.target_client().await,
        "items",
    )
    .await;
    assert!(a.is_empty() && b.is_empty(), "{a:?} {b:?}");
}
