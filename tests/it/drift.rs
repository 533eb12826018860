//! DDL on the source after the schema copy shows up as blocking drift, with the fix.

use std::time::Duration;

use tokio_postgres::Client;

use crate::common::{except_all, text, TestDb};

/// Runs a drift fix as an operator would: each statement on the side its comment names (the
/// target when it names none), one at a time, since `REFRESH PUBLICATION` refuses to run in a
/// transaction block.
async fn run_fix(source: &Client, target: &Client, fix: &str) {
    for line in fix.lines() {
        let (statement, comment) = line.split_once("--").unwrap_or((line, ""));
        let server = if comment.trim_start().starts_with("on the source") {
            source
        } else {
            target
        };
        server
            .batch_execute(statement)
            .await
            .unwrap_or_else(|e| panic!("fix {line:?} failed: {e:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_added_on_source_is_drift() {
    let db = TestDb::new("drift_column").await;
    db.load_testdata(200).await;
    let output = db.switchyard(&["sync", "--wait", "--timeout", "60s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));

    let output = db.switchyard(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("status JSON");
    assert_eq!(
        status["drift"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );

    let source = db.source_client().await;
    source
        .batch_execute(
            "ALTER TABLE customers ADD COLUMN loyalty integer NOT NULL DEFAULT 0;
             CREATE TABLE coupons (code text PRIMARY KEY);
             CREATE TABLE measurements_2027 PARTITION OF measurements FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');",
        )
        .await
        .unwrap();
    // A row with the new column stops the apply on the target: status must say why.
    source
        .batch_execute("INSERT INTO customers (name, loyalty) VALUES ('after ddl', 5)")
        .await
        .unwrap();

    let output = db.switchyard(&["status", "--json"]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "drift blocks: {}",
        text(&output)
    );
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("status JSON");
    assert!(
        !status["blocking"].as_array().unwrap().is_empty(),
        "{status}"
    );
    let drift = status["drift"].as_array().expect("drift array");
    let column = drift
        .iter()
        .find(|d| d["kind"] == "missing_column")
        .unwrap_or_else(|| panic!("no missing_column in {status}"));
    assert_eq!(column["table"], "public.customers");
    assert_eq!(column["column"], "loyalty");
    assert_eq!(
        column["fix"],
        "ALTER TABLE \"public\".\"customers\" ADD COLUMN \"loyalty\" integer NOT NULL DEFAULT 0;"
    );
    assert!(
        drift
            .iter()
            .any(|d| d["kind"] == "missing_table" && d["table"] == "public.coupons"),
        "{status}"
    );
    let partition = drift
        .iter()
        .find(|d| d["table"] == "public.measurements_2027")
        .unwrap_or_else(|| panic!("no drift for the new partition: {status}"));
    let fix = partition["fix"].as_str().unwrap();
    assert!(fix.starts_with("CREATE TABLE \"public\".\"measurements_2027\" PARTITION OF \"public\".\"measurements\" FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');"), "{fix}");

    // sync refuses to carry on while the schema has drifted, and says why.
    let output = db.switchyard(&["sync"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("schema_drift"),
        "{}",
        text(&output)
    );

    // The apply fails on the missing column; status reports the error from the target's log.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let output = db.switchyard(&["status", "--json"]);
        let status: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("status JSON");
        if let Some(error) = status["last_error"].as_str() {
            assert!(
                error.contains("loyalty") || error.contains("missing"),
                "{error}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no apply error reported: {status}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let output = db.switchyard(&["status"]);
    let human = String::from_utf8_lossy(&output.stdout);
    assert!(human.contains("Schema drift"), "{human}");

    // Every suggested fix, run where it says, clears the drift and lets the apply carry on.
    let target = db.target_client().await;
    for fix in drift.iter().filter_map(|d| d["fix"].as_str()) {
        run_fix(&source, &target, fix).await;
    }
    // Rows in the new table and the new partition must arrive too.
    source
        .batch_execute(
            "INSERT INTO coupons VALUES ('WELCOME');
             INSERT INTO measurements VALUES (1, '2027-06-01', 1.5);",
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let output = db.switchyard(&["status", "--json"]);
        let status: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("status JSON");
        let arrived = target
            .query_opt(
                "SELECT loyalty FROM customers WHERE name = 'after ddl'",
                &[],
            )
            .await
            .expect("read the new row")
            .map(|r| r.get::<_, i32>(0));
        if status["drift"].as_array().is_some_and(Vec::is_empty) && arrived == Some(5) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "drift did not clear or the row did not arrive ({arrived:?}): {status}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    db.wait_caught_up(Duration::from_secs(30)).await;
    // A table added by a fix is copied by a table-sync worker of its own, which the main
    // slot's position does not wait for: its rows may land a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for table in ["customers", "coupons", "measurements"] {
        loop {
            let (only_source, only_target) = except_all(&source, &target, table).await;
            if only_source.is_empty() && only_target.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{table}: only on source {only_source:?}, only on target {only_target:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let output = db.switchyard(&["abort"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}
