//! The crash matrix: for every step of `sync`, `cutover`, `rollback` and `finalize`, the
//! coordinator dies right after it (a crash point: SIGKILL once the state recorded the step),
//! and the same command, run again, finishes or undoes it. Applications write through a proxy
//! the whole time; the proxy is never left paused past its `max_pause`; no acknowledged write
//! is lost or doubled; `validate` finds both sides equal; after `abort` (or `finalize`) no
//! slot, publication or subscription is left. On both backends.
//!
//! The runs are chained: the run that crashes at step N+1 is the one that recovered from the
//! crash at step N, so each step's recovery is checked by the run after it, and the matrix
//! costs one run per step.

use std::time::{Duration, Instant};

use crate::common::{text, TestDb};
use crate::cutover::{assert_holds_exactly, Load};
use crate::proxy::{Proxy, TOKEN};
use crate::shared_state::{behind_a_proxy, migration_with_lease, state_show, was_killed, Backend};

const SYNC: &[&str] = &[
    "begin roles",
    "done roles",
    "begin extensions",
    "done extensions",
    "begin publication",
    "done publication",
    "begin copy",
    "begin schema",
    "done schema",
    "begin subscription",
    "done subscription",
    "done copy",
    "begin analyze",
    "done analyze",
    "phase syncing -> synced",
];
const CUTOVER_STEPS: &[&str] = &[
    "begin cutover",
    "reverse replication recorded",
    "fence the source",
    "switch to the target",
    "done cutover",
];
const ROLLBACK: &[&str] = &[
    "begin rollback",
    "fence the target",
    "switch to the source",
    "done rollback",
];
/// (Its phase and its "done" are one save: one crash point.)
const FINALIZE: &[&str] = &["begin finalize", "phase switched -> finished"];

/// The proxies resume by themselves this long after a pause whose coordinator died.
const MAX_PAUSE: Duration = Duration::from_secs(5);

struct Matrix {
    backend: Backend,
    rows: Vec<[String; 3]>,
}

impl Matrix {
    fn print(&self) {
        println!(
            "crash matrix ({:?} backend): step × what the next run did",
            self.backend
        );
        println!("{:<10} {:<32} outcome", "command", "killed right after");
        for [command, point, outcome] in &self.rows {
            println!("{command:<10} {point:<32} {outcome}");
        }
    }
}

fn run(
    db: &TestDb,
    plan: &std::path::Path,
    args: &[&str],
    crash_after: Option<&str>,
) -> std::process::Output {
    let mut all = vec![args[0], plan.to_str().expect("utf-8 path")];
    all.extend_from_slice(&args[1..]);
    let mut command = db.command(&all);
    command
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .env("TEST_APP_PASSWORD", "app-secret");
    if let Some(point) = crash_after {
        command
            .env("SWITCHYARD_FAULTS", "on")
            .env("SWITCHYARD_CRASH_AFTER", point);
    }
    command.output().expect("run switchyard")
}

/// What the state says the next run must do, in words.
fn pending(shown: &serde_json::Value, command: &str) -> String {
    let committed = match command {
        "cutover" => "switched",
        "rollback" => "rolled_back",
        _ => "",
    };
    let end = match command {
        "sync" => "synced",
        "finalize" => "finished",
        _ => committed,
    };
    match shown["interrupted"].as_str() {
        None if shown["phase"] == end => "nothing left: the command had finished".into(),
        None => "nothing to redo: went on with the next step".into(),
        Some(step) if command == "sync" => format!("resumed `{step}` and went on"),
        Some(_) if shown["phase"] == committed => {
            "finished the switch (past its commit point)".into()
        }
        Some(_) if command == "finalize" => "finished the finalize".into(),
        Some(_) => "undid the switch (before its commit point), then ran again".into(),
    }
}

/// Runs `args` once per crash point, each run killed right after its point, then once to the
/// end; every row of the matrix says what the run after the crash had to do.
async fn chain(db: &TestDb, proxy: &Proxy, args: &[&str], points: &[&str], matrix: &mut Matrix) {
    let command = args[0];
    for point in points {
        let output = run(db, &proxy.plan, args, Some(point));
        assert!(
            was_killed(&output),
            "{command}: the crash point {point:?} was not reached: {}",
            text(&output)
        );
        let killed_at = Instant::now();
        while proxy.status().await["paused"] == true {
            assert!(
                killed_at.elapsed() < MAX_PAUSE + Duration::from_secs(2),
                "{command} killed after {point:?}: the proxy stayed paused past max_pause"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let shown = state_show(db, &proxy.plan);
        matrix
            .rows
            .push([command.into(), point.to_string(), pending(&shown, command)]);
    }
    let output = run(db, &proxy.plan, args, None);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{command}, run again after its last crash point: {}",
        text(&output)
    );
    assert!(state_show(db, &proxy.plan)["interrupted"].is_null());
}

async fn nothing_left(db: &TestDb) {
    for client in [db.source_client().await, db.target_client().await] {
        let left: i64 = client
            .query_one(
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database())
                      + (SELECT count(*) FROM pg_publication)
                      + (SELECT count(*) FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()))",
                &[],
            )
            .await
            .expect("look for replication objects")
            .get(0);
        assert_eq!(left, 0, "replication objects left behind on {}", db.name);
    }
}

async fn ready(name: &str, backend: Backend) -> (TestDb, Proxy) {
    // Each run after a kill waits out the dead holder's lease: a short one here.
    let db = migration_with_lease(name, backend, "2s").await;
    // An extension, so that sync's extensions step has something to do (and crash in).
    let proxy = behind_a_proxy(
        &db,
        ";CREATE EXTENSION citext; CREATE TABLE tags (id int PRIMARY KEY, name citext)",
    )
    .await;
    (db, proxy)
}

/// sync, cutover and rollback crashed after every step; then abort leaves nothing.
async fn sync_cutover_rollback(backend: Backend, name: &str) {
    let (db, proxy) = ready(name, backend).await;
    let mut matrix = Matrix {
        backend,
        rows: Vec::new(),
    };
    chain(
        &db,
        &proxy,
        &["sync", "--wait", "--timeout", "120s"],
        SYNC,
        &mut matrix,
    )
    .await;
    let output = run(&db, &proxy.plan, &["validate"], None);
    assert_eq!(
        output.status.code(),
        Some(0),
        "validate after sync: {}",
        text(&output)
    );

    let load = Load::start(&proxy.url()).await;
    load.run_for(100).await;
    chain(
        &db,
        &proxy,
        &["cutover", "--yes"],
        CUTOVER_STEPS,
        &mut matrix,
    )
    .await;
    assert_eq!(proxy.status().await["backend"], "target");
    load.run_for(100).await;
    chain(&db, &proxy, &["rollback", "--yes"], ROLLBACK, &mut matrix).await;
    assert_eq!(proxy.status().await["backend"], "source");
    load.run_for(100).await;
    let (acked, errors) = load.stop().await;
    for error in &errors {
        // Between a kill and the next run, clients meet a fenced server: refused, never split.
        assert!(
            error.contains("42501"),
            "a client error other than the fence: {error}"
        );
    }
    assert_holds_exactly(&db.source_client().await, &acked, "source").await;

    let output = run(&db, &proxy.plan, &["abort"], None);
    assert_eq!(output.status.code(), Some(0), "abort: {}", text(&output));
    nothing_left(&db).await;
    matrix.print();
}

/// sync and cutover to the end, then finalize crashed after every step.
async fn finalize(backend: Backend, name: &str) {
    let (db, proxy) = ready(name, backend).await;
    let mut matrix = Matrix {
        backend,
        rows: Vec::new(),
    };
    for args in [
        &["sync", "--wait", "--timeout", "120s"][..],
        &["validate"],
        &["cutover", "--yes"],
    ] {
        let output = run(&db, &proxy.plan, args, None);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {}", text(&output));
    }
    let output = run(&db, &proxy.plan, &["validate"], None);
    assert_eq!(
        output.status.code(),
        Some(0),
        "validate after the cutover: {}",
        text(&output)
    );
    chain(&db, &proxy, &["finalize"], FINALIZE, &mut matrix).await;
    assert_eq!(state_show(&db, &proxy.plan)["phase"], "finished");
    nothing_left(&db).await;
    matrix.print();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_matrix_sync_cutover_rollback_file() {
    sync_cutover_rollback(Backend::File, "matrix_file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_matrix_sync_cutover_rollback_dynamodb() {
    sync_cutover_rollback(Backend::Dynamodb, "matrix_ddb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_matrix_finalize_file() {
    finalize(Backend::File, "matrix_fin_file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_matrix_finalize_dynamodb() {
    finalize(Backend::Dynamodb, "matrix_fin_ddb").await;
}
