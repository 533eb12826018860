//! Real drivers through `switchyard proxy` in transaction mode, on a pool of two server
//! connections, with server-side prepared statements: psycopg 3 (`tests/drivers/psycopg_load.py`)
//! and pgjdbc (`tests/drivers/JdbcLoad.java`). Each program checks every answer it gets and
//! exits non-zero on a mismatch; this side checks its exit status and report, then what the
//! database holds. `scripts/install-deps.sh` installs both drivers.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::proxy::Proxy;
use crate::common::TestDb;

const WORKERS: i64 = 8;
const TRANSACTIONS: i64 = 50;
/// One driver run: about ten seconds on two busy cores; a hang fails the test well before CI's
/// own limit.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);
const PGJDBC: &str = "/usr/share/java/postgresql.jar";

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Runs `command` to its end (killed after `RUN_TIMEOUT`), asserts that it succeeded, and
/// gives its standard output.
async fn run(mut command: Command, what: &str) -> String {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().unwrap_or_else(|e| {
        panic!("{what}: cannot start it ({e}); scripts/install-deps.sh installs it")
    });
    let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: still running after {RUN_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what}: {}\n--- stdout\n{stdout}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The tables both programs write, with a `totals` row for each of `workers` workers. Made
/// before the proxy starts: `Proxy::start` grants the application role everything in public.
async fn make_tables(db: &TestDb, workers: i64) {
    db.source_client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE events (id bigserial PRIMARY KEY, worker int NOT NULL, n int NOT NULL,
                                  kind text NOT NULL, amount int NOT NULL);
             CREATE TABLE totals (worker int PRIMARY KEY, n int NOT NULL DEFAULT 0,
                                  amount bigint NOT NULL DEFAULT 0);
             INSERT INTO totals (worker) SELECT generate_series(0, {});
             CREATE TABLE copied (worker int NOT NULL, n int NOT NULL, payload text NOT NULL);",
            workers - 1
        ))
        .await
        .expect("create the drivers' tables");
}

/// Rows of `events` per kind, kinds with none left out.
async fn kinds(db: &TestDb) -> Vec<(String, i64)> {
    db.source_client()
        .await
        .query(
            "SELECT kind, count(*) FROM events GROUP BY kind ORDER BY kind",
            &[],
        )
        .await
        .expect("count events")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Every worker's `totals` row holds what its transactions added, one per round: (workers
/// whose row is right, all rows).
async fn totals_right(db: &TestDb) -> (i64, i64) {
    let row = db
        .source_client()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE n = $1 AND amount = $2), count(*) FROM totals",
            &[
                &(TRANSACTIONS as i32),
                &(TRANSACTIONS * (TRANSACTIONS - 1) / 2),
            ],
        )
        .await
        .expect("read totals");
    (row.get(0), row.get(1))
}

/// The proxy kept to its pool of two. (Session settings left behind on a server connection
/// show up in the programs' own checks: each worker has a work_mem of its own.)
async fn pool_kept(proxy: &Proxy) {
    let status = proxy.status().await;
    let servers = status["pools"][0]["server_connections"]
        .as_u64()
        .expect("server_connections in /status");
    assert!(servers <= 2, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_prepared_statements_in_transaction_mode() {
    let db = TestDb::new("proxy_psycopg").await;
    make_tables(&db, WORKERS).await;
    let proxy = Proxy::start(&db, "transaction", 2, "workers = 2").await;
    let mut python = Command::new("python3");
    python
        .arg(drivers_dir().join("psycopg_load.py"))
        .arg(proxy.url())
        .arg(WORKERS.to_string())
        .arg(TRANSACTIONS.to_string());
    let out = run(python, "python3 psycopg_load.py").await;
    let copies = WORKERS * ((TRANSACTIONS + 9) / 10);
    assert!(
        out.contains(&format!(
            "workers={WORKERS} rounds={} copies={copies} cancels={WORKERS}",
            WORKERS * TRANSACTIONS
        )),
        "{out}"
    );

    let rounds = WORKERS * TRANSACTIONS;
    // Each round: one INSERT ... RETURNING, one insert in the multi-statement transaction, one
    // kept beside a savepoint rolled back, five by executemany and three more returning; the
    // doomed ones were all rolled back (after an error, by a ROLLBACK statement, to a
    // savepoint).
    assert_eq!(
        kinds(&db).await,
        vec![
            ("insert".to_string(), rounds),
            ("kept".to_string(), rounds),
            ("many".to_string(), 5 * rounds),
            ("many_ret".to_string(), 3 * rounds),
            ("multi".to_string(), rounds),
        ]
    );
    let source = db.source_client().await;
    let row = source
        .query_one(
            "SELECT (SELECT sum(amount) FROM events WHERE kind = 'insert')::int8,
                    (SELECT sum(amount) FROM events WHERE kind = 'many')::int8,
                    (SELECT count(DISTINCT (worker, n)) FROM events WHERE kind = 'insert'),
                    (SELECT count(*) FROM copied),
                    (SELECT count(DISTINCT payload) FROM copied)",
            &[],
        )
        .await
        .expect("sums");
    assert_eq!(
        row.get::<_, i64>(0),
        WORKERS * TRANSACTIONS * (TRANSACTIONS - 1) / 2
    );
    assert_eq!(
        row.get::<_, i64>(1),
        10 * rounds,
        "0 + 1 + 2 + 3 + 4 a round"
    );
    assert_eq!(
        row.get::<_, i64>(2),
        rounds,
        "one insert per worker and round"
    );
    assert_eq!(row.get::<_, i64>(3), 20 * copies, "COPY FROM STDIN rows");
    assert_eq!(row.get::<_, i64>(4), 20 * copies);
    assert_eq!(totals_right(&db).await, (WORKERS, WORKERS));
    pool_kept(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_prepared_statements_in_transaction_mode() {
    let db = TestDb::new("proxy_pgjdbc").await;
    // Two runs, each with workers of their own: named statements from the first use
    // (prepareThreshold=1), then forced binary transfer (prepareThreshold=-1).
    let runs = [("prepareThreshold=1", 0), ("prepareThreshold=-1", WORKERS)];
    make_tables(&db, 2 * WORKERS).await;
    let proxy = Proxy::start(&db, "transaction", 2, "workers = 2").await;

    let classes = db.dir.path().join("jdbc");
    let mut javac = Command::new("javac");
    javac
        .arg("-d")
        .arg(&classes)
        .arg("-cp")
        .arg(PGJDBC)
        .arg(drivers_dir().join("JdbcLoad.java"));
    run(javac, "javac JdbcLoad.java").await;

    for (settings, first_worker) in runs {
        let mut java = Command::new("java");
        java.arg("-cp")
            .arg(format!("{PGJDBC}:{}", classes.display()))
            .arg("JdbcLoad")
            .arg(format!(
                "jdbc:postgresql://127.0.0.1:{}/{}?{settings}",
                proxy.port, proxy.database
            ))
            .arg(&proxy.user)
            .arg(&proxy.password)
            .arg(first_worker.to_string())
            .arg(WORKERS.to_string())
            .arg(TRANSACTIONS.to_string());
        let out = run(java, &format!("java JdbcLoad ({settings})")).await;
        assert!(
            out.contains(&format!(
                "workers={WORKERS} rounds={} cancels={WORKERS}",
                WORKERS * TRANSACTIONS
            )),
            "{settings}: {out}"
        );
    }

    let rounds = 2 * WORKERS * TRANSACTIONS;
    // Each round: one INSERT ... RETURNING, a batch of five, one kept beside a savepoint
    // rolled back; the doomed and rolled-back ones are gone.
    assert_eq!(
        kinds(&db).await,
        vec![
            ("batch".to_string(), 5 * rounds),
            ("insert".to_string(), rounds),
            ("kept".to_string(), rounds),
        ]
    );
    let row = db
        .source_client()
        .await
        .query_one(
            "SELECT (SELECT sum(amount) FROM events WHERE kind = 'insert')::int8,
                    (SELECT sum(amount) FROM events WHERE kind = 'batch')::int8,
                    (SELECT count(DISTINCT (worker, n)) FROM events WHERE kind = 'batch')",
            &[],
        )
        .await
        .expect("sums");
    assert_eq!(
        row.get::<_, i64>(0),
        2 * WORKERS * TRANSACTIONS * (TRANSACTIONS - 1) / 2
    );
    assert_eq!(
        row.get::<_, i64>(1),
        10 * rounds,
        "0 + 1 + 2 + 3 + 4 a batch"
    );
    assert_eq!(
        row.get::<_, i64>(2),
        rounds,
        "one batch per worker and round"
    );
    assert_eq!(totals_right(&db).await, (2 * WORKERS, 2 * WORKERS));
    pool_kept(&proxy).await;
}
