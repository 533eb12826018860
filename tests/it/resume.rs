//! Killing `sync --wait` mid-copy and restarting the target mid-copy: a second run completes
//! with the same result as an undisturbed one.

use std::time::{Duration, Instant};

use crate::common::servers::{Cluster, Flavor};
use crate::common::{self, except_all, text, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_target_restart_mid_copy_then_resume() {
    // A target of its own: restarting the shared one would disturb the other tests.
    let target: &'static Cluster = Box::leak(Box::new(Cluster::start(Flavor::Target17)));
    let db = TestDb::on("resume_mid_copy", common::source(), target).await;
    db.load_testdata(1000).await;
    let source = db.source_client().await;
    source
        .batch_execute(
            "CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL, n numeric);
             INSERT INTO big SELECT i, repeat(md5(i::text), 4), i / 7.0 FROM generate_series(1, 1500000) AS i;
             ANALYZE big;",
        )
        .await
        .unwrap();

    let plan_path = db.plan_path();
    let mut child = db
        .command(&["sync", plan_path.to_str().unwrap(), "--wait"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sync");

    // Wait until the big table is being copied.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let copying = match tokio_postgres::connect(&target.url(&db.name), tokio_postgres::NoTls)
            .await
        {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                client
                    .query("SELECT 1 FROM pg_stat_progress_copy p JOIN pg_class c ON c.oid = p.relid WHERE c.relname = 'big' AND p.tuples_processed > 0", &[])
                    .await
                    .map(|rows| !rows.is_empty())
                    .unwrap_or(false)
            }
            Err(_) => false,
        };
        if copying {
            break;
        }
        assert!(Instant::now() < deadline, "the copy of big never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    child.kill().expect("kill sync");
    let _ = child.wait();
    tokio::task::spawn_blocking(move || target.restart())
        .await
        .unwrap();

    let target_client = db.target_client().await;
    let copied: i64 = target_client
        .query_one("SELECT count(*) FROM big", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        copied < 1_500_000,
        "the copy had already finished ({copied} rows): nothing was interrupted"
    );

    let output = db.switchyard(&["sync", "--wait", "--timeout", "300s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));

    db.wait_caught_up(Duration::from_secs(60)).await;
    for table in [
        "big",
        "customers",
        "orders",
        "order_items",
        "events",
        "measurements",
    ] {
        let (only_source, only_target) = except_all(&source, &target_client, table).await;
        assert!(
            only_source.is_empty() && only_target.is_empty(),
            "{table}: {} only on source, {} only on target",
            only_source.len(),
            only_target.len()
        );
    }
    let output = db.switchyard(&["abort"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_that_committed_before_the_crash_is_not_repeated() {
    let db = TestDb::new("resume_after_restore").await;
    // The native copy restores the schema once and trusts it; the snapshot copy restores its
    // own in its snapshot (see sync_live's interrupted-copy test).
    db.write_plan("copy = \"native\"\n");
    let source = db.source_client().await;
    source.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text); CREATE TYPE tint AS ENUM ('red', 'blue'); CREATE TABLE tagged (id int PRIMARY KEY, t tint)").await.unwrap();
    let output = db.switchyard(&["sync", "--wait", "--timeout", "60s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let output = db.switchyard(&["abort"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));

    // Make the state look like a run that died right after pg_restore committed: the schema
    // is on the target (empty tables), the record says the restore had begun.
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(db.state_path()).unwrap()).unwrap();
    state["phase"] = "syncing".into();
    state["created"]["schema"]["restored"] = false.into();
    state["log"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"at": "2026-01-01T00:00:00Z", "event": "begin schema"}));
    std::fs::write(db.state_path(), serde_json::to_vec(&state).unwrap()).unwrap();

    let output = db.switchyard(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["interrupted_step"], "schema", "{status}");

    source.batch_execute("INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 1000) AS i; INSERT INTO tagged VALUES (1, 'red'), (2, 'blue')").await.unwrap();
    let output = db.switchyard(&["sync", "--wait", "--timeout", "60s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let target = db.target_client().await;
    db.wait_caught_up(Duration::from_secs(30)).await;
    for table in ["items", "tagged"] {
        let (a, b) = except_all(&source, &target, table).await;
        assert!(a.is_empty() && b.is_empty(), "{table}");
    }
    let output = db.switchyard(&["abort", "--drop-target-data"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}

/// PostgreSQL drops a table-sync slot a moment before it records the copy as done; a target
/// that stops in between leaves the table stuck in "finished copy" for good. `sync --wait`
/// notices and copies the table again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_stuck_without_its_sync_slot_is_copied_again() {
    let db = TestDb::new("resume_lost_sync_slot").await;
    db.load_testdata(500).await;
    let output = db.switchyard(&["sync", "--wait", "--timeout", "60s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));

    // Put order_items back into the state the race leaves: copy finished, slot gone.
    let target = db.target_client().await;
    target
        .batch_execute(
            "UPDATE pg_subscription_rel SET srsubstate = 'f'
              WHERE srrelid = 'public.order_items'::regclass",
        )
        .await
        .unwrap();
    let source = db.source_client().await;
    source.batch_execute("INSERT INTO order_items VALUES (900001, 1, 'while stuck', 1); DELETE FROM order_items WHERE order_id = 1").await.unwrap();

    let output = db.switchyard(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let stuck = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "public.order_items")
        .unwrap()
        .clone();
    assert_eq!(stuck["state"], "error", "{status}");
    assert!(
        stuck["problem"]
            .as_str()
            .unwrap()
            .contains("copies the table again"),
        "{stuck}"
    );

    let output = db.switchyard(&["sync", "--wait", "--timeout", "90s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    db.wait_caught_up(Duration::from_secs(30)).await;
    for table in ["order_items", "orders", "customers"] {
        let (a, b) = except_all(&source, &target, table).await;
        assert!(
            a.is_empty() && b.is_empty(),
            "{table}: {} only on source, {} only on target",
            a.len(),
            b.len()
        );
    }
    let output = db.switchyard(&["abort", "--drop-target-data"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}
