//! `abort` removes every slot, publication and subscription, even mid-copy.

use crate::common::{text, TestDb};

async fn leftovers(db: &TestDb, sub_oid: u32) -> Vec<String> {
    let source = db.source_client().await;
    let target = db.target_client().await;
    let mut found: Vec<String> = source
        .query(
            "SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE slot_name = $1 OR slot_name LIKE $2
             UNION ALL SELECT 'publication ' || pubname FROM pg_publication",
            &[&format!("switchyard_{}", db.name), &format!("pg\\_{sub_oid}\\_sync\\_%")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    found.extend(target.query("SELECT 'subscription ' || subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())", &[]).await.unwrap().iter().map(|r| r.get::<_, String>(0)));
    found
}

fn subscription_oid(db: &TestDb) -> u32 {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(db.state_path()).expect("state file"))
            .expect("state JSON");
    state["created"]["subscription"]["oid"]
        .as_u64()
        .expect("subscription oid in state") as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_mid_copy_leaves_nothing_behind() {
    let db = TestDb::new("abort_mid_copy").await;
    db.load_testdata(20000).await;

    // Without --wait, sync returns as soon as the subscription exists: tables are still copying.
    let output = db.switchyard(&["sync"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let oid = subscription_oid(&db);
    assert!(!leftovers(&db, oid).await.is_empty());

    let output = db.switchyard(&["abort"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(leftovers(&db, oid).await, Vec::<String>::new());

    // The copied schema stays, so sync from the planned phase refuses to copy into it…
    let output = db.switchyard(&["plan"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("exists_on_target"),
        "{}",
        text(&output)
    );

    // …until abort --drop-target-data removes it; then a new sync runs to the end.
    let output = db.switchyard(&["abort", "--drop-target-data"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let target = db.target_client().await;
    let left: i64 = target.query_one("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'", &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "objects left in the target's public schema");
    let types: i64 = target.query_one("SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = 'public'", &[]).await.unwrap().get(0);
    assert_eq!(types, 0, "types left in the target's public schema");

    let output = db.switchyard(&["sync", "--wait", "--timeout", "120s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let oid = subscription_oid(&db);
    let output = db.switchyard(&["abort", "--drop-target-data"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(leftovers(&db, oid).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_without_state_cleans_up_by_name() {
    let db = TestDb::new("abort_no_state").await;
    db.load_testdata(100).await;
    let output = db.switchyard(&["sync", "--wait", "--timeout", "60s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let oid = subscription_oid(&db);
    // The state file is lost (a coordinator on another machine, a wiped directory).
    std::fs::remove_file(db.state_path()).unwrap();
    let output = db.switchyard(&["abort"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(leftovers(&db, oid).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_while_sync_waits() {
    let db = TestDb::new("abort_during_wait").await;
    // The native copy's wait: sync lets go of the lock while the table sync copies. (The
    // snapshot copy holds it until its subscription streams: see initial_copy.)
    db.write_plan("copy = \"native\"\n");
    let source = db.source_client().await;
    source
        .batch_execute("CREATE TABLE wide (id bigint PRIMARY KEY, payload text); INSERT INTO wide SELECT i, repeat('x', 200) FROM generate_series(1, 400000) AS i")
        .await
        .unwrap();
    let plan_path = db.plan_path();
    let child = db
        .command(&["sync", plan_path.to_str().unwrap(), "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start sync");
    // Abort as soon as the subscription exists: sync is waiting for the copy by then.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(db.state_path())
        .unwrap_or_default()
        .contains("\"oid\"")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "sync never created the subscription"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let oid = subscription_oid(&db);
    let output = db.switchyard(&["abort"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("abort"),
        "{}",
        text(&output)
    );
    assert_eq!(leftovers(&db, oid).await, Vec::<String>::new());
}
