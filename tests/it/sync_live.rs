//! Sync while a writer changes the source; afterwards every table matches row for row.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{self, except_all, text, TestDb};

const TABLES: &[&str] = &[
    "customers",
    "orders",
    "order_items",
    "events",
    "measurements",
];

/// Inserts, updates and deletes on every table until told to stop; returns the number of
/// transactions it committed.
async fn write_until(db_url: String, stop: Arc<AtomicBool>) -> u64 {
    let client = common::connect(&db_url).await;
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let i = n as i64;
        let sql = format!(
            "BEGIN;
             INSERT INTO customers (name, email, prefs, tags) VALUES ('live {i}', 'l{i}@x', '{{\"live\": {i}}}', ARRAY['a', NULL]);
             INSERT INTO orders (customer_id, amount, score, note) VALUES ((SELECT max(id) FROM customers), {i} % 1000, 'NaN', 'live');
             UPDATE orders SET amount = amount + 1, score = '-0' WHERE id = 1 + ({i} * 7) % 400;
             DELETE FROM order_items WHERE order_id = 1 + {i} % 200 AND line = 1 + {i} % 3;
             INSERT INTO order_items (order_id, line, sku, qty) VALUES (100000 + {i}, 1, 'live', 1);
             UPDATE events SET kind = 'changed' WHERE ctid = (SELECT ctid FROM events WHERE kind <> 'changed' LIMIT 1);
             DELETE FROM events WHERE ctid = (SELECT ctid FROM events WHERE kind = 'view' LIMIT 1);
             INSERT INTO measurements (id, taken, value) VALUES (1000000 + {i}, date '2026-03-01', 'Infinity');
             UPDATE measurements SET taken = date '2026-06-01' WHERE id = 1 + {i} % 300;
             COMMIT;"
        );
        client
            .batch_execute(&sql)
            .await
            .expect("writer transaction");
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_under_concurrent_writes_matches_row_for_row() {
    let db = TestDb::new("sync_live").await;
    db.load_testdata(2000).await;
    // The coordinator's password comes from PGPASSWORD, not the URL: the subscription must
    // still carry it, because the target cannot see the coordinator's environment.
    let plan = db
        .plan_text("")
        .replace(
            &db.source.url(&db.name),
            &db.source.url_without_password(&db.name),
        )
        .replace(
            &db.target.url(&db.name),
            &db.target.url_without_password(&db.name),
        );
    std::fs::write(db.plan_path(), plan).expect("write plan");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(db.source.url(&db.name), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let plan_path = db.plan_path();
    let mut command = db.command(&[
        "sync",
        plan_path.to_str().unwrap(),
        "--wait",
        "--timeout",
        "120s",
    ]);
    command.env("PGPASSWORD", common::servers::PASSWORD);
    let output = tokio::task::spawn_blocking(move || command.output().expect("run sync"))
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("Synced"),
        "{}",
        text(&output)
    );

    // Keep writing a little while streaming, then stop and let the target catch up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let transactions = writer.await.unwrap();
    assert!(
        transactions > 10,
        "the writer only committed {transactions} transactions"
    );

    let source = db.source_client().await;
    let target = db.target_client().await;
    db.wait_caught_up(Duration::from_secs(60)).await;
    for table in TABLES {
        let (only_source, only_target) = except_all(&source, &target, table).await;
        assert!(
            only_source.is_empty() && only_target.is_empty(),
            "{table}: {} rows only on the source (e.g. {:?}), {} only on the target (e.g. {:?})",
            only_source.len(),
            only_source.first(),
            only_target.len(),
            only_target.first()
        );
    }

    // Sequences are not replicated; `sync --sequences` copies them.
    db.write_plan("");
    let output = db.switchyard(&["sync", "--sequences"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    for sequence in ["customers_id_seq", "orders_id_seq"] {
        let sql = format!("SELECT last_value FROM {sequence}");
        let on_source: i64 = source.query_one(&sql, &[]).await.unwrap().get(0);
        let on_target: i64 = target.query_one(&sql, &[]).await.unwrap().get(0);
        assert_eq!(on_source, on_target, "{sequence}");
        assert!(
            on_source > 2000,
            "{sequence} was not advanced by the writer"
        );
    }

    // status --json has the documented keys (this plan carries the password in its URLs).
    db.write_plan("");
    let output = db.switchyard(&["status", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("status JSON");
    assert_eq!(status["phase"], "synced");
    assert!(status["lag_bytes"].is_i64());
    let states: Vec<&str> = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert!(
        !states.is_empty() && states.iter().all(|s| *s == "streaming"),
        "{states:?}"
    );

    let output = db.switchyard(&["abort"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}
