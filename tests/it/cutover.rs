//! `switchyard cutover`, `rollback` and `finalize` on real servers, with applications writing
//! through real proxies the whole time: no acknowledged write lost or doubled, no client
//! error, the old primary fenced, and every way out (undo, crash, rollback) leaving both
//! servers consistent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{self, show, text, TestDb};
use crate::proxy::Proxy;

use crate::proxy::TOKEN;
pub(crate) const CLIENTS: i32 = 16;

/// The cutover settings of these tests: short, and nested as the gate wants.
pub(crate) const CUTOVER: &str = "[cutover]\ndrain_timeout = \"1s\"\ncatchup_timeout = \"2s\"\n";
// Two workers whatever the machine has (one per core is the default): a pool split between them.
pub(crate) const PROXY: &str = "max_pause = \"5s\"\nquery_wait_timeout = \"20s\"\nworkers = 2";

pub(crate) const SCHEMA: &str = "
    CREATE TABLE accounts (id int PRIMARY KEY, counter bigint NOT NULL DEFAULT 0);
    INSERT INTO accounts SELECT g FROM generate_series(1, 32) g;
    CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                         client int NOT NULL, seq int NOT NULL, UNIQUE (client, seq));
    CREATE TABLE notes (id serial PRIMARY KEY, body text);";

/// A database with the schema, an application role, a proxy in front of the source, synced
/// and validated. `extra_plan` goes into the plan's [sync] table.
async fn ready(name: &str, extra_plan: &str) -> (TestDb, Proxy) {
    ready_on(TestDb::new(name).await, extra_plan).await
}

/// [`ready`] for a database already made (on servers of the test's own).
pub(crate) async fn ready_on(db: TestDb, extra_plan: &str) -> (TestDb, Proxy) {
    let source = db.source_client().await;
    source.batch_execute(SCHEMA).await.expect("schema");
    let plan = db.plan_text(&format!("{extra_plan}{CUTOVER}"));
    let proxy = Proxy::start_with(&db, &source, &plan, "transaction", 8, PROXY).await;
    let output = coordinator(&db, &proxy.plan, &["sync", "--wait", "--timeout", "120s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let output = coordinator(&db, &proxy.plan, &["validate"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    (db, proxy)
}

pub(crate) fn coordinator(db: &TestDb, plan: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![args[0], plan.to_str().expect("utf-8 path")];
    all.extend_from_slice(&args[1..]);
    db.command(&all)
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        // The read cache's role's password (tests/it/cache.rs), for its setup at a cutover.
        .env("TEST_APP_PASSWORD", "app-secret")
        .output()
        .expect("run switchyard")
}

/// Clients writing through the proxy: each transaction inserts an event and bumps its
/// client's counter, and every acknowledged commit is recorded.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(i32, i32)>>>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `CLIENTS` clients with ids from `first_id` on.
    pub(crate) async fn start(url: &str) -> Load {
        Load::start_at(url, 1).await
    }

    pub(crate) async fn start_at(url: &str, first_id: i32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for client_id in first_id..first_id + CLIENTS {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect through the proxy");
            tokio::spawn(connection);
            let (stop, acked, errors) = (stop.clone(), acked.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let result = client
                        .batch_execute(&format!(
                            "BEGIN; INSERT INTO events (client, seq) VALUES ({client_id}, {seq});
                             UPDATE accounts SET counter = counter + 1 WHERE id = {client_id}; COMMIT"
                        ))
                        .await;
                    match result {
                        Ok(()) => acked.lock().unwrap().push((client_id, seq)),
                        Err(e) => {
                            let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
                            errors.lock().unwrap().push(format!("client {client_id} seq {seq}: {code} {e}"));
                            let _ = client.batch_execute("ROLLBACK").await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }));
        }
        Load {
            stop,
            acked,
            errors,
            tasks,
        }
    }

    pub(crate) fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` further commits were acknowledged.
    pub(crate) async fn run_for(&self, more: usize) {
        let goal = self.acked() + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked() < goal {
            assert!(
                Instant::now() < deadline,
                "the load stalled: {:?}",
                self.errors.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn stop(self) -> (Vec<(i32, i32)>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("load task");
        }
        let acked = self.acked.lock().unwrap().clone();
        let errors = self.errors.lock().unwrap().clone();
        (acked, errors)
    }
}

/// Every acknowledged commit is on `server` exactly once, nothing else is, and each client's
/// counter equals its commits.
pub(crate) async fn assert_holds_exactly(
    server: &tokio_postgres::Client,
    acked: &[(i32, i32)],
    side: &str,
) {
    let rows = server
        .query("SELECT client, seq FROM events", &[])
        .await
        .expect("read events");
    let found: Vec<(i32, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let found_set: BTreeSet<(i32, i32)> = found.iter().copied().collect();
    assert_eq!(
        found.len(),
        found_set.len(),
        "duplicate events on the {side}"
    );
    let acked_set: BTreeSet<(i32, i32)> = acked.iter().copied().collect();
    let lost: Vec<_> = acked_set.difference(&found_set).take(10).collect();
    assert!(
        lost.is_empty(),
        "acknowledged commits missing on the {side}: {lost:?}"
    );
    let unacked: Vec<_> = found_set.difference(&acked_set).take(10).collect();
    assert!(
        unacked.is_empty(),
        "commits on the {side} that no client saw acknowledged: {unacked:?}"
    );
    let mut per_client: BTreeMap<i32, i64> = BTreeMap::new();
    for (client, _) in acked {
        *per_client.entry(*client).or_default() += 1;
    }
    let counters = server
        .query("SELECT id, counter FROM accounts ORDER BY id", &[])
        .await
        .expect("read counters");
    for row in counters {
        let (id, counter): (i32, i64) = (row.get(0), row.get(1));
        assert_eq!(
            counter,
            per_client.get(&id).copied().unwrap_or(0),
            "counter of client {id} on the {side}"
        );
    }
}

/// An application role that connects straight to a server, outside the proxy.
async fn direct_client(
    server: &common::servers::Cluster,
    db: &str,
    role: &str,
    password: &str,
) -> tokio_postgres::Client {
    let url =
        server
            .url_without_password(db)
            .replacen("postgres@", &format!("{role}:{password}@"), 1);
    common::connect(&url).await
}

pub(crate) fn signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

pub(crate) fn pause_ms(output: &std::process::Output) -> f64 {
    let out = String::from_utf8_lossy(&output.stdout);
    out.split("Pause seen by the applications: ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no pause in the output: {}", text(output)))
}

/// How long the step named `name` took, from the coordinator's step lines (`  12.3 ms  name`).
fn step_ms(output: &std::process::Output, name: &str) -> f64 {
    let all = text(output);
    all.lines()
        .find(|line| line.contains(name) && line.contains(" ms "))
        .and_then(|line| line.split_whitespace().next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no step {name:?} in the output: {all}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cutover_and_rollback_under_write_load_lose_nothing() {
    let (db, proxy) = ready("cutover_load", "").await;
    let (source, target) = (db.source_client().await, db.target_client().await);
    // Another application, straight to the source: the fence must stop it.
    let direct = format!("{}_direct", db.name);
    source
        .batch_execute(&format!(
            "CREATE ROLE {direct} LOGIN PASSWORD '{direct}-pw'; GRANT ALL ON ALL TABLES IN SCHEMA public TO {direct}; GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {direct}"
        ))
        .await
        .expect("direct role");
    let outsider = direct_client(db.source, &db.name, &direct, &format!("{direct}-pw")).await;
    outsider
        .batch_execute("INSERT INTO notes (body) VALUES ('before')")
        .await
        .expect("the outsider writes before the cutover");

    let load = Load::start(&proxy.url()).await;
    load.run_for(300).await;
    // A transaction that has written, open on the target until the reverse slot has waited
    // for it 6 s: the slot waits (outside the pause), where it used to fail the cutover
    // after 5 s, and says what it waits for.
    let (pid, ends) = common::hold_a_writer_until_waited_on(
        db.target_client().await,
        db.target_client().await,
        Duration::from_secs(6),
    )
    .await;
    let output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    ends.await
        .expect("the committer")
        .expect("the slot waited for the open transaction");
    let slot_ms = step_ms(
        &output,
        "create the reverse publication and slot on the target",
    );
    assert!(
        slot_ms > 5_000.0,
        "the slot did not wait: {}",
        text(&output)
    );
    assert!(
        text(&output).contains(&format!(
            "target: creating the slot waits for the transactions that have written to end, the oldest: pid {pid} "
        )),
        "the wait did not name the transaction: {}",
        text(&output)
    );
    let pause = pause_ms(&output);
    eprintln!(
        "cutover pause: {pause:.1} ms\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status = proxy.status().await;
    assert_eq!(status["backend"], "target", "{status}");
    assert_eq!(status["epoch"], 1, "{status}");
    load.run_for(300).await;

    // The fence: the outsider's session was ended, and a new one cannot write, not even in
    // an explicit read-write transaction.
    assert!(
        outsider.batch_execute("SELECT 1").await.is_err(),
        "the outsider's session survived the fence"
    );
    let outsider = direct_client(db.source, &db.name, &direct, &format!("{direct}-pw")).await;
    for statement in [
        "INSERT INTO notes (body) VALUES ('after')",
        "BEGIN READ WRITE; UPDATE accounts SET counter = 0; COMMIT",
        "DELETE FROM events",
    ] {
        let err = outsider
            .batch_execute(statement)
            .await
            .expect_err("the fence let a write through");
        assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err}");
        let _ = outsider.batch_execute("ROLLBACK").await;
    }

    // Rollback, still under load: the source gets every write made on the target.
    let output = coordinator(&db, &proxy.plan, &["rollback", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    eprintln!(
        "rollback pause: {:.1} ms\n{}",
        pause_ms(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(proxy.status().await["backend"], "source");
    load.run_for(300).await;
    let (acked, errors) = load.stop().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    // The fences ended every session but the proxies' on each server in turn: these too.
    assert!(source.is_closed() && target.is_closed());
    let (source, target) = (db.source_client().await, db.target_client().await);
    assert_holds_exactly(&source, &acked, "source").await;
    // Serial and identity inserts on the source go on without duplicate keys.
    source
        .batch_execute(
            "INSERT INTO events (client, seq) VALUES (0, 1); INSERT INTO notes (body) VALUES ('x')",
        )
        .await
        .expect("identity and serial after the rollback");
    // The source is writable again for its other applications; the target is fenced.
    let outsider = direct_client(db.source, &db.name, &direct, &format!("{direct}-pw")).await;
    outsider
        .batch_execute("INSERT INTO notes (body) VALUES ('after rollback')")
        .await
        .expect("grants restored on the source");
    let app_on_target = direct_client(db.target, &db.name, &proxy.user, &proxy.password).await;
    let err = app_on_target
        .batch_execute("INSERT INTO notes (body) VALUES ('x')")
        .await
        .expect_err("the target stays fenced after a rollback");
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err}");
    let subs: i64 = source
        .query_one("SELECT count(*) FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(subs, 0, "the reverse subscription is left on the source");
    let slots: i64 = target
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "a slot is left on the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cutover_then_finalize_leaves_nothing_behind() {
    // This migration also sets the target's table-copy parallelism; finalize puts it back.
    let _settings = common::target_settings_lock().await;
    let (db, mut proxy) = ready("cutover_final", "copy = \"native\"\ncopy_workers = 3\n").await;
    let target = db.target_client().await;
    let load = Load::start(&proxy.url()).await;
    load.run_for(200).await;
    let output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    load.run_for(200).await;
    let (acked, errors) = load.stop().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    assert_holds_exactly(&target, &acked, "target").await;
    let status = coordinator(&db, &proxy.plan, &["status"]);
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        out.contains("go to the target (switch epoch 1)"),
        "{}",
        text(&status)
    );
    assert!(out.contains("The source is fenced"), "{}", text(&status));
    assert!(
        out.contains("Way back: subscription") && out.contains("behind the target"),
        "{}",
        text(&status)
    );
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    // A restarted proxy comes back on the target.
    proxy.restart().await;
    let status = proxy.status().await;
    assert_eq!(status["backend"], "target", "{status}");
    assert_eq!(status["epoch"], 1, "{status}");
    let dry = coordinator(&db, &proxy.plan, &["rollback", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("Dry run"),
        "{}",
        text(&dry)
    );
    assert_eq!(
        proxy.status().await["backend"],
        "target",
        "a dry run changed nothing"
    );
    target
        .batch_execute(
            "INSERT INTO events (client, seq) VALUES (0, 1); INSERT INTO notes (body) VALUES ('x')",
        )
        .await
        .expect("identity and serial on the target after the cutover");

    // A second cutover has nothing to do and says so (a retried job does not fail); abort is
    // refused.
    let output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(
        text(&output).contains("finished by an earlier run"),
        "{}",
        text(&output)
    );
    let output = coordinator(&db, &proxy.plan, &["abort"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));

    // A finalize that died right after recording its start does not lock the next one out:
    // the next run carries it on.
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(db.state_path()).unwrap()).unwrap();
    let original = state["created"]["original_sync_workers"]
        .as_str()
        .expect("sync recorded the target's setting")
        .to_string();
    let workers = show(&target, "max_sync_workers_per_subscription").await;
    assert_eq!(
        workers, "3",
        "sync set the target's setting (it was {original})"
    );
    state["log"]
        .as_array_mut()
        .expect("state log")
        .push(serde_json::json!({"at": "2026-01-01T00:00:00Z", "event": "begin finalize"}));
    std::fs::write(db.state_path(), state.to_string()).unwrap();
    let output = coordinator(&db, &proxy.plan, &["finalize"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(out.contains("the source stays fenced"), "{}", text(&output));
    assert!(
        !out.contains("nothing of switchyard's is left"),
        "{}",
        text(&output)
    );
    let workers = show(&target, "max_sync_workers_per_subscription").await;
    assert_eq!(workers, original, "finalize restores the target's setting");
    // Run again, it has nothing left to do and says so.
    let again = coordinator(&db, &proxy.plan, &["finalize"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("Finished already"),
        "{}",
        text(&again)
    );
    let source = db.source_client().await;
    for (server, side) in [(&source, "source"), (&target, "target")] {
        let left: i64 = server
            .query_one(
                "SELECT (SELECT count(*) FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())) + (SELECT count(*) FROM pg_publication)
                      + (SELECT count(*) FROM pg_replication_slots WHERE database = current_database())",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "replication objects left on the {side}");
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(db.state_path()).unwrap()).unwrap();
    assert_eq!(state["phase"], "finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_that_cannot_catch_up_makes_the_cutover_undo_itself() {
    // The hung worker lets the lag grow while the gates run: a generous limit.
    let (db, proxy) = ready("cutover_undo", "max_lag_bytes = 268435456\n").await;
    let target = db.target_client().await;
    let load = Load::start(&proxy.url()).await;
    load.run_for(200).await;
    // From outside: the target's apply worker hangs (stopped with SIGSTOP while idle, so it
    // holds no transaction the reverse slot's creation would wait for). It still looks alive
    // to the gates, but it can never confirm the source's position inside the pause.
    // (Disabling the subscription before the cutover is caught by the gates instead.)
    let (acked, errors) = load.stop().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    db.wait_caught_up(Duration::from_secs(60)).await;
    let worker: i32 = target
        .query_one(
            "SELECT pid FROM pg_stat_subscription WHERE subname = $1 AND relid IS NULL",
            &[&format!("switchyard_{}", db.name)],
        )
        .await
        .unwrap()
        .get(0);
    signal(worker, "STOP");
    let load = Load::start_at(&proxy.url(), CLIENTS + 1).await;
    let started = Instant::now();
    let plan = proxy.plan.to_str().expect("utf-8 path");
    let child = db
        .command(&["cutover", plan, "--yes"])
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the cutover");
    // During the cutover (it waits for the hung target inside the pause): the source is
    // fenced against the application role connecting straight to it, and an explicit
    // read-write transaction does not get around it.
    let app_on_source = direct_client(db.source, &db.name, &proxy.user, &proxy.password).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.status().await["paused"] != true {
        assert!(Instant::now() < deadline, "the proxy never paused");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let app_on_source = match app_on_source.batch_execute("SELECT 1").await {
        Ok(()) => app_on_source,
        // Its session was ended by the fence, as it should: a new one.
        Err(_) => direct_client(db.source, &db.name, &proxy.user, &proxy.password).await,
    };
    let err = app_on_source
        .batch_execute("BEGIN READ WRITE; INSERT INTO notes (body) VALUES ('during'); COMMIT")
        .await
        .expect_err("the fence let a write through during the cutover");
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err}");
    let output = child.wait_with_output().expect("wait for the cutover");
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("catchup_timeout"),
        "{}",
        text(&output)
    );
    assert!(
        took < Duration::from_secs(30),
        "the cutover took {took:?} to give up"
    );
    let status = proxy.status().await;
    assert_eq!(status["backend"], "source", "{status}");
    assert_eq!(status["paused"], false, "{status}");
    load.run_for(200).await;
    let (more, errors) = load.stop().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    let acked: Vec<(i32, i32)> = acked.into_iter().chain(more).collect();
    // Replication runs again once the worker does, and catches up.
    signal(worker, "CONT");
    db.wait_caught_up(Duration::from_secs(60)).await;
    assert_holds_exactly(&target, &acked, "target").await;
    let left: i64 = target
        .query_one("SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_replication_slots WHERE database = current_database())", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        left, 0,
        "the reverse publication or slot is left on the target"
    );
    // And the application role writes on the source directly too: its grants are back.
    let app = direct_client(db.source, &db.name, &proxy.user, &proxy.password).await;
    app.batch_execute("INSERT INTO notes (body) VALUES ('grants back')")
        .await
        .expect("grants restored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_killed_in_the_pause_is_finished_or_undone_by_the_next_run() {
    let (db, proxy) = ready("cutover_kill", "").await;
    let target = db.target_client().await;
    let load = Load::start(&proxy.url()).await;
    load.run_for(200).await;
    let mut child = db
        .command(&["cutover", proxy.plan.to_str().unwrap(), "--yes"])
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the cutover");
    // Kill it as soon as the proxy is paused.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if proxy.status().await["paused"] == true {
            child.kill().expect("kill the coordinator");
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the cutover ended before it paused"
        );
        assert!(Instant::now() < deadline, "the proxy never paused");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let killed_at = Instant::now();
    let _ = child.wait();
    // The proxy resumes by itself within max_pause (5 s).
    while proxy.status().await["paused"] == true {
        assert!(
            killed_at.elapsed() < Duration::from_secs(8),
            "the proxy stayed paused past max_pause"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(proxy.status().await["backend"], "target");
    load.run_for(200).await;
    let (acked, errors) = load.stop().await;
    // Between the kill and the next run, clients that hit the fenced source are refused,
    // never silently split: permission errors only.
    for error in &errors {
        assert!(
            error.contains("42501"),
            "a client error other than the fence: {error}"
        );
    }
    assert_holds_exactly(&target, &acked, "target").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_proxies_switch_together_and_an_unreachable_one_stops_the_rollback() {
    let db = TestDb::new("cutover_two").await;
    let source = db.source_client().await;
    source.batch_execute(SCHEMA).await.expect("schema");
    let plan = db.plan_text(CUTOVER);
    let first = Proxy::start_with(&db, &source, &plan, "transaction", 4, PROXY).await;
    let second = Proxy::start_with(&db, &source, &plan, "transaction", 4, PROXY).await;
    // The coordinator's plan: the first proxy's plan naming both admin listeners.
    let coordinator_plan = db.dir.path().join("two.toml");
    let mut text_of = std::fs::read_to_string(&first.plan).unwrap();
    for proxy in [&first, &second] {
        text_of.push_str(&format!(
            "\n[[cutover.proxies]]\nadmin_url = \"http://127.0.0.1:{}\"\n",
            proxy.admin_port
        ));
    }
    std::fs::write(&coordinator_plan, text_of).unwrap();
    for args in [&["sync", "--wait", "--timeout", "120s"][..], &["validate"]] {
        let output = coordinator(&db, &coordinator_plan, args);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    }
    let (load_one, load_two) = (
        Load::start(&first.url()).await,
        Load::start_at(&second.url(), CLIENTS + 1).await,
    );
    load_two.run_for(100).await;
    let output = coordinator(&db, &coordinator_plan, &["cutover", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    for proxy in [&first, &second] {
        let status = proxy.status().await;
        assert_eq!(status["backend"], "target", "{status}");
        assert_eq!(status["paused"], false, "{status}");
    }
    load_one.run_for(100).await;
    let (acked_two, errors_two) = load_two.stop().await;
    assert!(errors_two.is_empty(), "{errors_two:?}");
    drop(second);
    let output = coordinator(&db, &coordinator_plan, &["rollback", "--yes"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot connect"),
        "{}",
        text(&output)
    );
    // Nothing moved: the first proxy still serves on the target.
    assert_eq!(first.status().await["backend"], "target");
    load_one.run_for(100).await;
    let (mut acked, errors) = load_one.stop().await;
    assert!(errors.is_empty(), "{errors:?}");
    acked.extend(acked_two);
    assert_holds_exactly(&db.target_client().await, &acked, "target").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_that_does_not_finish_aborts_the_cutover_or_is_ended() {
    let (db, proxy) = ready("cutover_drain", "").await;
    // A client sits idle in a transaction: the pause cannot drain it.
    let idle = proxy.client().await;
    idle.batch_execute("BEGIN; INSERT INTO notes (body) VALUES ('open')")
        .await
        .unwrap();
    // By default the cutover gives up, and the transaction goes on untouched.
    let output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("drain_timeout"),
        "{}",
        text(&output)
    );
    idle.batch_execute("COMMIT")
        .await
        .expect("the open transaction commits after the undo");
    assert_eq!(proxy.status().await["backend"], "source");

    // With on_drain_timeout = "cancel", it is rolled back and the cutover goes through.
    let plan = std::fs::read_to_string(&proxy.plan)
        .unwrap()
        .replace("[cutover]\n", "[cutover]\non_drain_timeout = \"cancel\"\n");
    std::fs::write(&proxy.plan, plan).unwrap();
    idle.batch_execute("BEGIN; INSERT INTO notes (body) VALUES ('lost')")
        .await
        .unwrap();
    let output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let err = idle
        .batch_execute("COMMIT")
        .await
        .expect_err("the ended transaction cannot commit");
    eprintln!("the ended transaction's client saw: {err}");
    let target = db.target_client().await;
    let bodies: Vec<String> = target
        .query("SELECT body FROM notes ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(bodies, vec!["open".to_string()]);
    // The client's session goes on, now on the target.
    let fresh = proxy.client().await;
    fresh
        .batch_execute("INSERT INTO notes (body) VALUES ('after')")
        .await
        .expect("a new transaction after the cutover");
}
