//! Bad input gets a clear message and the promised exit code, and changes nothing.

use crate::common::{text, TestDb};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_names_file_line_and_key() {
    let db = TestDb::new("err_unknown_key").await;
    db.write_plan("max_lag = 5\n");
    let output = db.switchyard(&["plan"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let message = stderr(&output);
    // The plan's [sync] table starts on line 6; the unknown key is on line 8.
    assert!(message.contains("plan.toml:8:1:"), "{message}");
    assert!(message.contains("sync.max_lag"), "{message}");
    assert!(message.contains("unknown field"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_environment_variable_is_named() {
    let db = TestDb::new("err_missing_env").await;
    let plan = db.plan_text("").replace(
        "postgres:switchyard-test-pw@",
        "postgres:${SWITCHYARD_SURELY_UNSET_PW}@",
    );
    std::fs::write(db.plan_path(), plan).unwrap();
    let output = db.switchyard(&["sync"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let message = stderr(&output);
    assert!(message.contains("SWITCHYARD_SURELY_UNSET_PW"), "{message}");
    assert!(message.contains("source.url"), "{message}");
    assert!(message.contains("plan.toml:3:7:"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_without_key_blocks_with_the_fix() {
    let db = TestDb::new("err_no_key").await;
    let source = db.source_client().await;
    source
        .batch_execute(
            "CREATE TABLE keyed (id int PRIMARY KEY);
             CREATE TABLE nokey (a int, b text);
             CREATE TABLE uniq (a int NOT NULL, b text);
             CREATE UNIQUE INDEX uniq_a ON uniq (a);
             CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
             CREATE TABLE docs (id int, body json);
             ALTER TABLE docs REPLICA IDENTITY FULL;",
        )
        .await
        .unwrap();

    let output = db.switchyard(&["plan"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("ALTER TABLE \"public\".\"nokey\" REPLICA IDENTITY FULL;"),
        "{report}"
    );
    assert!(
        report.contains("ALTER TABLE \"public\".\"uniq\" REPLICA IDENTITY USING INDEX uniq_a;"),
        "{report}"
    );
    assert!(
        report.contains("ALTER TABLE \"public\".\"scratch\" SET LOGGED;"),
        "{report}"
    );
    assert!(report.contains("BLOCKED"), "{report}");

    let output = db.switchyard(&["plan", "--json"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("plan JSON");
    assert_eq!(json["blocked"], true);
    let blocking: Vec<(String, String)> = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "block")
        .map(|f| {
            (
                f["check"].as_str().unwrap().to_string(),
                f["subject"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for expected in [
        ("no_replica_identity", "public.nokey"),
        ("no_replica_identity", "public.uniq"),
        ("unlogged_table", "public.scratch"),
        ("identity_full_without_equality", "public.docs"),
    ] {
        assert!(
            blocking.contains(&(expected.0.to_string(), expected.1.to_string())),
            "{expected:?} not in {blocking:?}"
        );
    }
    assert!(
        !blocking
            .iter()
            .any(|(_, subject)| subject == "public.keyed"),
        "{blocking:?}"
    );

    // sync refuses the same way and creates nothing.
    let output = db.switchyard(&["sync"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let publications = source
        .query("SELECT 1 FROM pg_publication", &[])
        .await
        .unwrap();
    assert!(publications.is_empty());
    let target = db.target_client().await;
    let tables = target
        .query("SELECT 1 FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .unwrap();
    assert!(
        tables.is_empty(),
        "sync created tables on the target despite blocking findings"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_connection_error() {
    let db = TestDb::new("err_unreachable").await;
    let port = crate::common::servers::free_port();
    let plan = db.plan_text("").replace(
        &format!("127.0.0.1:{}/", db.target.port),
        &format!("127.0.0.1:{port}/"),
    );
    std::fs::write(db.plan_path(), plan).unwrap();
    let output = db.switchyard(&["plan"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        stderr(&output).contains("cannot connect to the target"),
        "{}",
        text(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_user_that_is_the_coordinator_is_refused() {
    let db = TestDb::new("err_proxy_user").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let plan = db.plan_text("").replace(
        "[sync]\n",
        "[[proxy.users]]\nname = \"postgres\"\npassword_env = \"X\"\n[sync]\n",
    );
    std::fs::write(db.plan_path(), plan).unwrap();
    let output = db.switchyard(&["plan", "--json"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let checks: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["check"].as_str().unwrap())
        .collect();
    assert!(checks.contains(&"proxy_user_is_coordinator"), "{checks:?}");
}
