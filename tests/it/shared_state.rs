//! The migration's state in a shared store: the lock's races, a holder killed or frozen, the
//! generation that fences a coordinator which lost its lock out of the state and the proxies,
//! proxies that follow the store. On both backends where both apply: the file (a flock, which
//! dies with its holder) and DynamoDB Local (a lease).

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, text, TestDb};
use crate::cutover::{assert_holds_exactly, coordinator, Load, CUTOVER};
use crate::proxy::{Proxy, TOKEN};

/// The lease of these tests: short, so that takeovers take seconds.
pub(crate) const LEASE: &str = "3s";
const LEASE_TIME: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    File,
    Dynamodb,
}

pub(crate) async fn migration(name: &str, backend: Backend) -> TestDb {
    migration_with_lease(name, backend, LEASE).await
}

pub(crate) async fn migration_with_lease(name: &str, backend: Backend, lease: &str) -> TestDb {
    let db = TestDb::new(name).await;
    match backend {
        Backend::File => db,
        Backend::Dynamodb => db.with_dynamodb(lease),
    }
}

/// The cutover tests' schema on the source, a proxy (transaction mode) in front of it, synced
/// and validated.
pub(crate) async fn synced_behind_a_proxy(db: &TestDb) -> Proxy {
    let proxy = behind_a_proxy(db, "").await;
    for step in [&["sync", "--wait", "--timeout", "120s"][..], &["validate"]] {
        let output = coordinator(db, &proxy.plan, step);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    }
    proxy
}

/// The cutover tests' schema and `extra_sql` on the source, and a proxy in front of it.
pub(crate) async fn behind_a_proxy(db: &TestDb, extra_sql: &str) -> Proxy {
    let source = db.source_client().await;
    source
        .batch_execute(&format!("{}{extra_sql}", crate::cutover::SCHEMA))
        .await
        .expect("schema");
    let plan = db.plan_text(CUTOVER);
    Proxy::start_with(db, &source, &plan, "transaction", 8, crate::cutover::PROXY).await
}

/// Starts `switchyard <args[0]> PLAN <args[1..]>` set to stop itself (SIGSTOP) right after
/// `point`, and waits until it has.
pub(crate) fn spawn_stopped_after(
    db: &TestDb,
    plan: &std::path::Path,
    args: &[&str],
    point: &str,
) -> Child {
    try_spawn_stopped_after(db, plan, args, point)
        .unwrap_or_else(|output| panic!("{} ended before {point:?}: {}", args[0], text(&output)))
}

/// [`spawn_stopped_after`], or the output of a command that ended before `point`.
fn try_spawn_stopped_after(
    db: &TestDb,
    plan: &std::path::Path,
    args: &[&str],
    point: &str,
) -> Result<Child, std::process::Output> {
    let mut all = vec![args[0], plan.to_str().unwrap()];
    all.extend_from_slice(&args[1..]);
    let mut child = db
        .command(&all)
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .env("TEST_APP_PASSWORD", "app-secret")
        .env("SWITCHYARD_FAULTS", "on")
        .env("SWITCHYARD_STOP_AFTER", point)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchyard");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !is_stopped(child.id()) {
        if child.try_wait().expect("poll the child").is_some() {
            return Err(child.wait_with_output().expect("read the child's output"));
        }
        assert!(
            Instant::now() < deadline,
            "{} never reached {point:?}",
            args[0]
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child)
}

/// `switchyard state show PLAN --json`.
pub(crate) fn state_show(db: &TestDb, plan: &std::path::Path) -> serde_json::Value {
    let output = db
        .command(&["state", "show", plan.to_str().unwrap(), "--json"])
        .output()
        .expect("run state show");
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    serde_json::from_slice(&output.stdout).expect("state show JSON")
}

fn spawn(db: &TestDb, args: &[&str]) -> Child {
    let mut all = args.to_vec();
    let plan = db.plan_path();
    all.insert(1, plan.to_str().unwrap());
    db.command(&all)
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchyard")
}

/// Waits until the lock is held by a process other than `not` (pid), and returns its pid.
fn wait_held(db: &TestDb, not: Option<u64>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = state_show(db, &db.plan_path());
        let pid = shown["lock"]["holder"]["pid"].as_u64();
        if shown["lock"]["held"] == true && pid.is_some() && pid != not {
            return pid.unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "nobody took the lock: {shown}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn two_coordinators_at_once(backend: Backend, name: &str) {
    let db = migration(name, backend).await;
    db.load_testdata(20_000).await;
    let first = spawn(&db, &["sync", "--wait", "--timeout", "120s"]);
    let second = spawn(&db, &["sync", "--wait", "--timeout", "120s"]);
    let outputs = [first, second].map(|c| c.wait_with_output().expect("wait for sync"));
    let codes: Vec<Option<i32>> = outputs.iter().map(|o| o.status.code()).collect();
    let refused: Vec<&std::process::Output> = outputs
        .iter()
        .filter(|o| o.status.code() == Some(1))
        .collect();
    assert_eq!(
        codes.iter().filter(|c| **c == Some(0)).count(),
        1,
        "exactly one proceeds: {codes:?}\n{}\n{}",
        text(&outputs[0]),
        text(&outputs[1])
    );
    assert_eq!(refused.len(), 1, "the other is refused: {codes:?}");
    let message = text(refused[0]);
    assert!(
        message.contains("another switchyard is working on this migration")
            && message.contains("`sync` by pid"),
        "the refusal names the holder: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_at_once_one_proceeds_file() {
    two_coordinators_at_once(Backend::File, "race_file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_at_once_one_proceeds_dynamodb() {
    two_coordinators_at_once(Backend::Dynamodb, "race_ddb").await;
}

/// A holder killed with SIGKILL leaves its lease behind: the next coordinator takes it over
/// after one lease of an unchanged heartbeat, not before, and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_is_taken_over_after_one_lease_not_before() {
    let db = migration("lease_kill", Backend::Dynamodb).await;
    db.load_testdata(20_000).await;
    // Held for certain when it dies: it stops itself in its schema step (sync lets the lock
    // go while it waits for the lag), and SIGKILL ends a stopped process as any other.
    let mut holder = spawn_stopped_after(
        &db,
        &db.plan_path(),
        &["sync", "--wait", "--timeout", "120s"],
        "begin schema",
    );
    let pid = wait_held(&db, None);
    assert_eq!(pid, u64::from(holder.id()));
    holder.kill().expect("SIGKILL the holder");
    let _ = holder.wait();
    let shown = state_show(&db, &db.plan_path());
    assert_eq!(
        shown["lock"]["held"], true,
        "the lease outlives its holder: {shown}"
    );
    let generation = shown["lock"]["generation"].as_u64().unwrap();

    let started = Instant::now();
    let output = db.switchyard(&["sync", "--wait", "--timeout", "120s"]);
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(
        took >= LEASE_TIME,
        "took over after {took:?}, before a whole lease ({LEASE_TIME:?})"
    );
    assert!(
        text(&output).contains("took over the migration's lock"),
        "{}",
        text(&output)
    );
    let shown = state_show(&db, &db.plan_path());
    assert_eq!(shown["lock"]["held"], false, "{shown}");
    assert!(
        shown["lock"]["generation"].as_u64() > Some(generation),
        "the takeover raised the generation past {generation}: {shown}"
    );
    assert_eq!(shown["phase"], "synced", "{shown}");
}

/// A coordinator frozen (SIGSTOP) in a cutover past its lease while another takes over and
/// finishes, then resumed: nothing it does reaches the state or the proxies, and it stops
/// with exit 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_holder_resumed_after_a_takeover_is_fenced() {
    let db = migration("lease_frozen", Backend::Dynamodb).await;
    let proxy = synced_behind_a_proxy(&db).await;
    let load = Load::start(&proxy.url()).await;
    load.run_for(100).await;

    // Frozen right after it recorded the way back: it holds the lock, nothing is paused yet.
    let mut frozen = spawn_stopped_after(
        &db,
        &proxy.plan,
        &["cutover", "--yes"],
        "reverse replication recorded",
    );
    let stale = state_show(&db, &proxy.plan)["lock"]["generation"]
        .as_u64()
        .unwrap();

    // Another coordinator takes over after one lease, undoes the frozen one's start and cuts
    // over.
    let output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(proxy.status().await["backend"], "target");
    let after_takeover = state_show(&db, &proxy.plan);

    // The proxy refuses the stale generation outright.
    for path in ["/pause", "/switch", "/resume"] {
        let (status, body) = proxy
            .admin_with_generation(path, stale, "{\"backend\": \"source\", \"epoch\": 99}")
            .await;
        assert_eq!(status, 409, "{path} with a stale generation: {body}");
        assert!(
            body.contains("does not hold the migration's lock"),
            "{body}"
        );
    }

    unsafe { libc::kill(frozen.id() as i32, libc::SIGCONT) };
    let resumed_at = Instant::now();
    let mut paused_seen = false;
    let status = loop {
        if let Some(status) = frozen.try_wait().unwrap() {
            break status;
        }
        paused_seen |= proxy.status().await["paused"] == true;
        assert!(
            resumed_at.elapsed() < Duration::from_secs(30),
            "the resumed coordinator did not stop"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut stderr = String::new();
    use std::io::Read;
    let _ = frozen.stderr.take().unwrap().read_to_string(&mut stderr);
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("switchyard state show"),
        "it says what to run: {stderr}"
    );
    assert!(!paused_seen, "the fenced coordinator paused the proxy");
    let now = state_show(&db, &proxy.plan);
    assert_eq!(
        now["version"], after_takeover["version"],
        "it wrote the state: {now}"
    );
    assert_eq!(now["phase"], "switched");
    assert_eq!(proxy.status().await["backend"], "target");

    load.run_for(100).await;
    let (acked, errors) = load.stop().await;
    for error in &errors {
        assert!(
            error.contains("42501"),
            "a client error other than the fence: {error}"
        );
    }
    assert_holds_exactly(&db.target_client().await, &acked, "target").await;
}

/// Whether the process is stopped (state `T` in /proc).
pub(crate) fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s == "T"))
        })
        .unwrap_or(false)
}

/// Whether `output` is of a process killed by SIGKILL (a crash point).
pub(crate) fn was_killed(output: &std::process::Output) -> bool {
    output.status.signal() == Some(libc::SIGKILL)
}

/// Proxies follow the store: one the coordinator does not call switches by itself, one
/// restarted after the cutover with its own switch file gone comes back on the switched side,
/// and one added after the cutover starts on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxies_follow_the_store_after_a_restart_and_when_added_later() {
    let db = migration("follow_store", Backend::Dynamodb).await;
    let mut proxy = synced_behind_a_proxy(&db).await;
    let plan = db.plan_text(CUTOVER);
    // A proxy the coordinator does not call (not in its plan's list): it follows the store.
    let source = db.source_client().await;
    let bystander =
        Proxy::start_with(&db, &source, &plan, "session", 4, crate::cutover::PROXY).await;
    let output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let deadline = Instant::now() + Duration::from_secs(10);
    while bystander.status().await["backend"] != "target" {
        assert!(
            Instant::now() < deadline,
            "a proxy the coordinator did not call never followed the store's switch"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its own switch file gone too (a new host): only the store says where to go.
    let switch_files: Vec<_> = std::fs::read_dir(db.dir.path().join(".switchyard"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for file in switch_files {
        if file.to_string_lossy().contains(".proxy-") {
            std::fs::remove_file(file).unwrap();
        }
    }
    proxy.restart().await;
    assert_eq!(proxy.status().await["backend"], "target");
    let client = proxy.client().await;
    let on: String = client
        .query_one("SELECT CASE WHEN current_setting('server_version_num')::int >= 170000 THEN 'target' ELSE 'source' END", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on, "target");

    // (The cutover's fence ended the sessions on the source: a new one.)
    let source = db.source_client().await;
    let added = Proxy::start_with(&db, &source, &plan, "session", 4, crate::cutover::PROXY).await;
    assert_eq!(added.status().await["backend"], "target");
    assert_eq!(state_show(&db, &proxy.plan)["phase"], "switched");
}

/// The store stops answering in the middle of a switch (its server frozen):
/// - before the commit point, the cutover undoes itself (exit 1): the proxies resume on the
///   source, which takes writes again;
/// - at the commit point (its save unanswered: it may or may not have landed), the
///   coordinator exits 3 and the next run, with the store back, finishes or undoes it;
/// - after the commit point, the proxies keep the switch they were told, the coordinator
///   exits 3 naming the command to run, and that command finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_unreachable_mid_switch_undoes_before_the_commit_point_and_holds_after() {
    let store: &'static common::dynamodb::DynamoDb =
        Box::leak(Box::new(common::dynamodb::DynamoDb::start()));
    // A long lease: a call to the frozen store gives up after a quarter of it, with time
    // left to undo before the heartbeat must stop the coordinator (a quarter of it: 4.5 s).
    let db = TestDb::new("store_outage")
        .await
        .with_dynamodb_on(store, "18s");
    let proxy = synced_behind_a_proxy(&db).await;
    let load = Load::start(&proxy.url()).await;
    load.run_for(100).await;

    let before = switch_with_store_frozen_after(
        &db,
        &proxy,
        store,
        "cutover",
        "reverse replication recorded",
    )
    .await;
    assert_eq!(
        before.status.code(),
        Some(1),
        "undone before the commit point: {}",
        text(&before)
    );
    assert_eq!(proxy.status().await["paused"], false, "{}", text(&before));
    assert_eq!(proxy.status().await["backend"], "source");
    load.run_for(100).await; // the source takes writes again: unfenced

    let at =
        switch_with_store_frozen_after(&db, &proxy, store, "cutover", "fence the source").await;
    assert_eq!(
        at.status.code(),
        Some(3),
        "an unanswered commit: {}",
        text(&at)
    );
    assert!(text(&at).contains("switchyard cutover"), "{}", text(&at));
    // The next run finishes the switch if its commit landed, or undoes it and cuts over
    // anew; that new cutover's gates may refuse it (exit 1, nothing changed: the lag right
    // after the undo, on a loaded machine), and then it is simply run again.
    let mut output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    for _ in 0..3 {
        if output.status.code() != Some(1) {
            break;
        }
        assert!(
            state_show(&db, &proxy.plan)["interrupted"].is_null(),
            "refused with the earlier cutover still unresolved: {}",
            text(&output)
        );
        eprintln!(
            "cutover refused after the undo, run again: {}",
            text(&output)
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    }
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(proxy.status().await["backend"], "target");
    assert_eq!(state_show(&db, &proxy.plan)["phase"], "switched");
    load.run_for(100).await;

    let after =
        switch_with_store_frozen_after(&db, &proxy, store, "rollback", "switch to the source")
            .await;
    assert_eq!(
        after.status.code(),
        Some(3),
        "past the commit point: {}",
        text(&after)
    );
    assert!(
        text(&after).contains("switchyard rollback"),
        "names the command to run: {}",
        text(&after)
    );
    assert_eq!(
        proxy.status().await["backend"],
        "source",
        "{}",
        text(&after)
    );
    load.run_for(100).await;
    let output = coordinator(&db, &proxy.plan, &["rollback", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(state_show(&db, &proxy.plan)["phase"], "rolled_back");

    let (acked, errors) = load.stop().await;
    for error in &errors {
        assert!(
            error.contains("42501"),
            "a client error other than the fence: {error}"
        );
    }
    assert_holds_exactly(&db.source_client().await, &acked, "source").await;
}

/// Runs `command` (cutover, rollback), which stops itself right after `point`; freezes the
/// store; lets the command go on; thaws the store once it ended.
async fn switch_with_store_frozen_after(
    db: &TestDb,
    proxy: &Proxy,
    store: &common::dynamodb::DynamoDb,
    command: &str,
    point: &str,
) -> std::process::Output {
    // The gates may refuse a cutover run right after an undo (exit 1, nothing changed: the
    // lag of a shared, loaded source cluster a moment over [sync] max_lag_bytes): run it
    // again, as its message says.
    let mut child = try_spawn_stopped_after(db, &proxy.plan, &[command, "--yes"], point);
    for _ in 0..5 {
        match &child {
            Err(output)
                if output.status.code() == Some(1)
                    && text(output).contains("refused, nothing changed") =>
            {
                eprintln!(
                    "{command} refused by its gates, run again: {}",
                    text(output)
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
                child = try_spawn_stopped_after(db, &proxy.plan, &[command, "--yes"], point);
            }
            _ => break,
        }
    }
    let child = child
        .unwrap_or_else(|output| panic!("{command} ended before {point:?}: {}", text(&output)));
    store.freeze();
    unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("wait for the cutover");
    store.thaw();
    // The command let go of its lock while the store was frozen: that release sits in the
    // thawed server's socket and lands a moment later. A next command that read the lock
    // just before would see its holder let go while it watched and be refused (a command
    // run beside another is refused, not queued), so wait for the release to land; if it
    // was never sent, the lock stays held and the next command takes it over after a lease.
    let deadline = Instant::now() + Duration::from_secs(5);
    while state_show(db, &proxy.plan)["lock"]["held"] == true && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    output
}

/// `state migrate --to dynamodb` moves a running migration off its file under both locks; the
/// file is refused from then on, and the migration carries on from DynamoDB. `plan` names a
/// missing table as a blocking finding with the command that makes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_moves_from_its_file_to_dynamodb_and_plan_probes_the_store() {
    let mut db = TestDb::new("state_move").await.with_dynamodb(LEASE);
    let dynamodb_section = db.state.clone();
    db.state = dynamodb_section.replace("backend = \"dynamodb\"", "backend = \"file\"");
    db.write_plan("");
    db.load_testdata(200).await;
    let output = db.switchyard(&["sync", "--wait", "--timeout", "120s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let on_file = state_show(&db, &db.plan_path());

    let plan = db.plan_path();
    let output = db
        .command(&[
            "state",
            "migrate",
            plan.to_str().unwrap(),
            "--to",
            "dynamodb",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let output = db.switchyard(&["status"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("was moved to DynamoDB table"),
        "{}",
        text(&output)
    );

    db.state = dynamodb_section;
    db.write_plan("");
    let moved = state_show(&db, &db.plan_path());
    assert_eq!(moved["phase"], "synced", "{moved}");
    assert_eq!(moved["last_steps"], on_file["last_steps"], "{moved}");
    let output = db.switchyard(&["validate"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));

    db.state = db.state.replace(
        &format!("table = \"{}\"", common::dynamodb::TABLE),
        "table = \"no_such_table\"",
    );
    db.write_plan("");
    let output = db.switchyard(&["plan"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("no_such_table does not exist")
            && text(&output).contains("switchyard state init"),
        "{}",
        text(&output)
    );
}

/// A crash point without `SWITCHYARD_FAULTS=on` (a stray variable in an operator's shell) is
/// refused before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_point_that_is_not_enabled_is_refused() {
    let db = TestDb::new("faults_refused").await;
    let plan = db.plan_path();
    let output = db
        .command(&["state", "show", plan.to_str().unwrap()])
        .env("SWITCHYARD_CRASH_AFTER", "begin cutover")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("SWITCHYARD_FAULTS is not \"on\""),
        "{}",
        text(&output)
    );
}

/// A proxy restarted in the middle of a cutover — after its commit point, before the
/// coordinator switched the proxies — comes back on the switched side from the store, and
/// the cutover then finishes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxy_restarted_during_a_cutover_comes_back_on_the_switched_side() {
    let db = migration("restart_mid_cutover", Backend::Dynamodb).await;
    let mut proxy = synced_behind_a_proxy(&db).await;
    let child = spawn_stopped_after(
        &db,
        &proxy.plan,
        &["cutover", "--yes"],
        "switch to the target",
    );
    assert_eq!(proxy.status().await["paused"], true);
    proxy.restart().await;
    let status = proxy.status().await;
    assert_eq!(status["backend"], "target", "{status}");
    assert_eq!(status["epoch"], 1, "{status}");
    unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("wait for the cutover");
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let client = proxy.client().await;
    client
        .batch_execute("INSERT INTO notes (body) VALUES ('after the restart')")
        .await
        .expect("a write through the restarted proxy lands on the target");
    assert_eq!(state_show(&db, &proxy.plan)["phase"], "switched");
}

/// Fencing reaches the proxies on both backends: while a coordinator holds the lock, a
/// control call carrying an older generation (a coordinator that held it before) is refused
/// and the holder's own is accepted; once the lock is free, even that one is refused.
async fn a_stale_generation_is_refused_by_the_proxies(backend: Backend, name: &str) {
    let db = migration_with_lease(name, backend, "6s").await;
    let proxy = synced_behind_a_proxy(&db).await;
    let holder = spawn_stopped_after(&db, &proxy.plan, &["cutover", "--yes"], "begin cutover");
    let shown = state_show(&db, &proxy.plan);
    assert_eq!(shown["lock"]["held"], true, "{shown}");
    let current = shown["lock"]["generation"].as_u64().unwrap();
    assert!(current >= 2, "sync and validate held it before: {shown}");
    for path in ["/pause", "/switch", "/resume"] {
        let (status, body) = proxy
            .admin_with_generation(path, current - 1, "{\"backend\": \"target\", \"epoch\": 9}")
            .await;
        assert_eq!(status, 409, "{path} from an earlier holder: {body}");
        assert!(
            body.contains("does not hold the migration's lock"),
            "{body}"
        );
    }
    let (status, body) = proxy.admin_with_generation("/resume", current, "").await;
    assert_eq!(status, 200, "the holder's own generation: {body}");
    assert_eq!(proxy.status().await["paused"], false);

    unsafe { libc::kill(holder.id() as i32, libc::SIGCONT) };
    let output = tokio::task::spawn_blocking(move || holder.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(proxy.status().await["backend"], "target");
    let (status, body) = proxy.admin_with_generation("/resume", current, "").await;
    assert_eq!(status, 409, "a free lock accepts no generation: {body}");
    assert!(body.contains("it is free"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_generation_is_refused_by_the_proxies_file() {
    a_stale_generation_is_refused_by_the_proxies(Backend::File, "stale_file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_generation_is_refused_by_the_proxies_dynamodb() {
    a_stale_generation_is_refused_by_the_proxies(Backend::Dynamodb, "stale_ddb").await;
}

/// `state unlock --force` frees a dead holder's lease only after watching it stand still for
/// a whole lease, fencing its generation; without --force it explains and changes nothing;
/// a file lock held by a live process (here a stopped one: its flock stays) is never broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_unlock_frees_only_a_dead_holders_lock() {
    for backend in [Backend::Dynamodb, Backend::File] {
        let name = match backend {
            Backend::Dynamodb => "unlock_ddb",
            Backend::File => "unlock_file",
        };
        let db = migration(name, backend).await;
        db.load_testdata(200).await;
        let plan = db.plan_path().to_str().unwrap().to_string();
        let mut holder = spawn_stopped_after(&db, &db.plan_path(), &["sync"], "begin schema");
        let before = state_show(&db, &db.plan_path())["lock"]["generation"]
            .as_u64()
            .unwrap();

        let output = db.command(&["state", "unlock", &plan]).output().unwrap();
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        assert!(text(&output).contains("--force"), "{}", text(&output));

        if backend == Backend::File {
            // Stopped, not dead: the kernel keeps its flock, and unlock leaves it be.
            let output = db
                .command(&["state", "unlock", &plan, "--force"])
                .output()
                .unwrap();
            assert_eq!(output.status.code(), Some(1), "{}", text(&output));
            assert!(text(&output).contains("`sync` by pid"), "{}", text(&output));
            holder.kill().unwrap();
            let _ = holder.wait();
            let output = db
                .command(&["state", "unlock", &plan, "--force"])
                .output()
                .unwrap();
            assert_eq!(output.status.code(), Some(0), "{}", text(&output));
            assert!(
                text(&output).contains("the lock is free"),
                "{}",
                text(&output)
            );
            continue;
        }
        holder.kill().unwrap();
        let _ = holder.wait();
        let human = db.command(&["state", "show", &plan]).output().unwrap();
        assert!(
            text(&human).contains("unchanged for") && text(&human).contains("unlock"),
            "state show says the heartbeat stands still: {}",
            text(&human)
        );
        let started = Instant::now();
        let output = db
            .command(&["state", "unlock", &plan, "--force"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", text(&output));
        assert!(
            started.elapsed() >= LEASE_TIME,
            "freed before a whole lease"
        );
        assert!(
            text(&output).contains("freed the lock of `sync`"),
            "{}",
            text(&output)
        );
        let shown = state_show(&db, &db.plan_path());
        assert_eq!(shown["lock"]["held"], false, "{shown}");
        assert_eq!(
            shown["lock"]["generation"].as_u64(),
            Some(before + 1),
            "{shown}"
        );
        // The next command takes the free lock at once and carries on.
        let started = Instant::now();
        let output = db.switchyard(&["sync", "--wait", "--timeout", "120s"]);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output));
        assert!(!text(&output).contains("took over"), "{}", text(&output));
        assert!(started.elapsed() < Duration::from_secs(60));
    }
}
