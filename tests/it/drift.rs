//! DDL on the source after the schema copy shows up as blocking drift, with the fix.

use std::time::Duration;

use crate::common::{text, TestDb};

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
        "ALTER TABLE \"public\".\"customers\" ADD COLUMN \"loyalty\" integer NOT NULL;"
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

    let output = db.switchyard(&["abort"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}
