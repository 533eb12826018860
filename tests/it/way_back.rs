//! The way back after faults around a cutover: a crash of the new primary right after the
//! switch, and a coordinator frozen in the pause past `max_pause`. Each runs on servers of
//! its own where it must stop one.

use std::time::Duration;

use crate::common::servers::{Cluster, Flavor};
use crate::common::{self, text, TestDb};
use crate::cutover::{assert_holds_exactly, coordinator, ready_on, signal, Load, CLIENTS};
use crate::proxy::TOKEN;

/// A target of the test's own, which it may crash: it lives as long as the test process.
fn own_target() -> &'static Cluster {
    Box::leak(Box::new(Cluster::start(Flavor::Target17)))
}

/// As many clients as the pool has connections, each holding one at once, then gone: the
/// pool keeps them all, idle.
async fn fill_pool(url: &str) {
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect through the proxy");
        tokio::spawn(connection);
        clients.push(client);
    }
    let reads = clients
        .iter()
        .map(|client| client.batch_execute("SELECT pg_sleep(0.2)"));
    for result in futures_util::future::join_all(reads).await {
        result.expect("a read through the proxy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_that_crashes_right_after_the_cutover_keeps_the_way_back() {
    let target = own_target();
    let db = TestDb::on("way_back_crash", common::source(), target).await;
    let (db, proxy) = ready_on(db, "").await;
    let load = Load::start(&proxy.url()).await;
    load.run_for(200).await;
    let (mut acked, errors) = load.stop().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");

    // No write after the switch: the reverse slot's start is only what the cutover set.
    let output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    // Reads fill the proxy's pool with connections to the target (no WAL written).
    fill_pool(&proxy.url()).await;
    target.crash_restart();

    // The proxy gives the applications fresh connections to the restarted target, and the
    // source applies their writes once, without replaying what it has.
    let load = Load::start_at(&proxy.url(), CLIENTS + 1).await;
    load.run_for(200).await;
    let (more, errors) = load.stop().await;
    assert!(
        errors.is_empty(),
        "clients saw errors after the target restarted: {errors:?}"
    );
    acked.extend(more);
    let target_client = db.target_client().await;
    let reverse = format!("switchyard_{}_back", db.name);
    common::wait_caught_up(&target_client, &reverse, Duration::from_secs(60)).await;
    // Caught up: the source's apply did not stop at a row it had already (a replay fails
    // with a duplicate key, again and again, and never confirms).
    let source = db.source_client().await;
    assert_holds_exactly(&target_client, &acked, "target").await;
    assert_holds_exactly(&source, &acked, "source").await;
    let output = coordinator(&db, &proxy.plan, &["validate"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));

    // And the way back works, under load.
    let load = Load::start_at(&proxy.url(), 2 * CLIENTS + 1).await;
    load.run_for(100).await;
    let output = coordinator(&db, &proxy.plan, &["rollback", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    load.run_for(100).await;
    let (more, errors) = load.stop().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    acked.extend(more);
    assert_eq!(proxy.status().await["backend"], "source");
    let source = db.source_client().await;
    assert_holds_exactly(&source, &acked, "source").await;
}

/// `status` after a cutover watches the way back as it watches the forward replication
/// before: a reverse apply that keeps failing makes it exit 1 with the subscription, its last
/// error and the reverse slot's WAL; fixed, it exits 0 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_reports_a_failing_way_back() {
    let (db, proxy) = ready_on(TestDb::new("way_back_status").await, "").await;
    let output = coordinator(&db, &proxy.plan, &["cutover", "--yes"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let reverse = format!("switchyard_{}_back", db.name);
    let output = coordinator(&db, &proxy.plan, &["status"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(text(&output).contains(&reverse), "{}", text(&output));

    // A row only the source has (the coordinator's role passes the fence), then the same key
    // written on the target by an application: the source cannot apply it.
    let source = db.source_client().await;
    source
        .batch_execute("INSERT INTO notes (id, body) VALUES (1000, 'only on the source')")
        .await
        .expect("a row on the source");
    let app = crate::common::connect(&proxy.url()).await;
    app.batch_execute("INSERT INTO notes (id, body) VALUES (1000, 'on the target')")
        .await
        .expect("a write through the proxy");
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let output = loop {
        let output = coordinator(&db, &proxy.plan, &["status"]);
        if output.status.code() == Some(1) || std::time::Instant::now() > deadline {
            break output;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let shown = text(&output);
    assert_eq!(output.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains(&reverse) && shown.contains("keeps failing"),
        "{shown}"
    );
    assert!(
        shown.contains("duplicate key"),
        "the last error is not shown: {shown}"
    );
    assert!(
        shown.contains("WAL retained by the reverse slot"),
        "{shown}"
    );

    // Fixed on the source: the way back catches up, and status is clean again.
    source
        .batch_execute("DELETE FROM notes WHERE id = 1000")
        .await
        .expect("remove the conflicting row");
    let target = db.target_client().await;
    common::wait_caught_up(&target, &reverse, Duration::from_secs(60)).await;
    let output = coordinator(&db, &proxy.plan, &["status"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}

/// The proxies end a pause by themselves at `max_pause` (5 s here). A coordinator frozen in
/// the pause (`kill -STOP`) and woken after that must not fence the source the applications
/// are using again: it undoes the cutover, and the applications saw only a pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_frozen_past_max_pause_never_fences() {
    let (db, proxy) = ready_on(TestDb::new("way_back_freeze").await, "").await;
    let load = Load::start(&proxy.url()).await;
    load.run_for(100).await;
    // A transaction kept open keeps the pause draining, so that the freeze lands before the
    // fence; it commits while the coordinator is frozen.
    let open = crate::common::connect(&proxy.url()).await;
    open.batch_execute("BEGIN; SELECT 1")
        .await
        .expect("open a transaction");
    let plan = proxy.plan.to_str().expect("utf-8 path").to_string();
    let child = db
        .command(&["cutover", &plan, "--yes"])
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the cutover");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while proxy.status().await["paused"] != true {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never paused"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = child.id() as i32;
    signal(pid, "STOP");
    open.batch_execute("COMMIT")
        .await
        .expect("commit while paused");
    tokio::time::sleep(Duration::from_millis(6500)).await;
    assert_eq!(
        proxy.status().await["paused"],
        false,
        "the proxy did not resume by itself at max_pause"
    );
    signal(pid, "CONT");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait for the cutover");
    let shown = text(&output);
    assert_eq!(output.status.code(), Some(1), "{shown}");
    // Undone (by the pause's budget, or, on a slow machine, by the pause request that the
    // freeze made time out), never fenced, and reported as what it was.
    assert!(
        shown.contains("they saw only a pause") && !shown.contains("grants revoked"),
        "{shown}"
    );

    load.run_for(100).await;
    let (acked, errors) = load.stop().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    let status = proxy.status().await;
    assert_eq!(status["backend"], "source", "{status}");
    let source = db.source_client().await;
    assert_holds_exactly(&source, &acked, "source").await;
    // Never fenced: the application's role writes on the source directly too.
    let url = db.source.url_without_password(&db.name).replacen(
        "postgres@",
        &format!("{}:{}@", proxy.user, proxy.password),
        1,
    );
    crate::common::connect(&url)
        .await
        .batch_execute("INSERT INTO notes (body) VALUES ('after the frozen cutover')")
        .await
        .expect("the source is writable");
}
