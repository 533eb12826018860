//! Test harness: one PostgreSQL 15 source and one PostgreSQL 17 target per test binary,
//! shared by all its tests; each test works in its own database (and its own role names).

#![allow(dead_code)]

pub mod chromium;
pub mod dynamodb;
pub mod redis;
pub mod servers;
pub mod wire;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use servers::{Cluster, Flavor};
use tokio_postgres::{Client, NoTls};

pub fn source() -> &'static Cluster {
    static SOURCE: OnceLock<Cluster> = OnceLock::new();
    SOURCE.get_or_init(|| Cluster::start(Flavor::Source15))
}

pub fn target() -> &'static Cluster {
    static TARGET: OnceLock<Cluster> = OnceLock::new();
    TARGET.get_or_init(|| Cluster::start(Flavor::Target17))
}

/// Taken by the tests that change a server-wide setting of the shared target (`[sync]
/// copy_workers`), so that none of them records another's value as the original to restore.
pub async fn target_settings_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// `SHOW setting` on a connection.
pub async fn show(client: &Client, setting: &str) -> String {
    client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .unwrap_or_else(|e| panic!("SHOW {setting}: {e:?}"))
        .get(0)
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(connection);
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("set time zone");
    client
}

/// `testdata/schema.sql`.
pub fn testdata_schema() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/schema.sql"))
        .expect("read testdata/schema.sql")
}

/// `testdata/data.sql` for `rows` customers.
pub fn testdata_rows(rows: u32) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/data.sql"))
        .expect("read testdata/data.sql")
        .replace("{{rows}}", &rows.to_string())
}

/// A migration of its own: a database named after the test on both servers, a plan file and a
/// state directory in a temporary directory.
pub struct TestDb {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub source: &'static Cluster,
    pub target: &'static Cluster,
    /// The plan's `[state]` section: empty for the file backend.
    pub state: String,
}

impl TestDb {
    pub async fn new(name: &str) -> TestDb {
        TestDb::on(name, source(), target()).await
    }

    pub async fn on(name: &str, source: &'static Cluster, target: &'static Cluster) -> TestDb {
        for cluster in [source, target] {
            let admin = connect(&cluster.url("postgres")).await;
            // Left from an earlier run of this test in the same process: never, but be safe.
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .expect("drop database");
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create database");
        }
        let db = TestDb {
            name: name.to_string(),
            dir: tempfile::tempdir().expect("temp dir"),
            source,
            target,
            state: String::new(),
        };
        db.write_plan("");
        db
    }

    /// Keeps this migration's state in the harness's DynamoDB Local instead of a file, with
    /// `lease`; creates the table if it is not there yet.
    pub fn with_dynamodb(self, lease: &str) -> TestDb {
        self.with_dynamodb_on(dynamodb::shared(), lease)
    }

    /// [`TestDb::with_dynamodb`] on a DynamoDB Local of the test's own.
    pub fn with_dynamodb_on(mut self, store: &dynamodb::DynamoDb, lease: &str) -> TestDb {
        self.state = store.state_section(lease);
        self.write_plan("");
        let plan = self.plan_path();
        let output = self
            .command(&["state", "init", plan.to_str().expect("utf-8 path")])
            .output()
            .expect("run switchyard state init");
        assert!(output.status.success(), "state init: {}", text(&output));
        self
    }

    pub async fn source_client(&self) -> Client {
        connect(&self.source.url(&self.name)).await
    }

    pub async fn target_client(&self) -> Client {
        connect(&self.target.url(&self.name)).await
    }

    /// Waits until the target has confirmed everything the source has written so far, on the
    /// migration's own slot.
    pub async fn wait_caught_up(&self, timeout: Duration) {
        let source = self.source_client().await;
        wait_caught_up(&source, &format!("switchyard_{}", self.name), timeout).await;
    }

    pub fn plan_path(&self) -> PathBuf {
        self.dir.path().join("plan.toml")
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(".switchyard")
            .join(format!("{}.json", self.name))
    }

    /// The plan text for this migration, followed by `extra` (more tables or keys).
    pub fn plan_text(&self, extra: &str) -> String {
        format!(
            "name = \"{name}\"\n{state}[source]\nurl = \"{src}\"\n[target]\nurl = \"{tgt}\"\n[sync]\npoll_interval = \"200ms\"\n{extra}",
            name = self.name,
            state = self.state,
            src = self.source.url(&self.name),
            tgt = self.target.url(&self.name),
        )
    }

    pub fn write_plan(&self, extra: &str) {
        std::fs::write(self.plan_path(), self.plan_text(extra)).expect("write plan");
    }

    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("PGPASSWORD")
            .envs(dynamodb::ENV)
            .env("NO_COLOR", "1");
        command
    }

    /// Runs `switchyard <args>` with the plan file appended as the last argument.
    pub fn switchyard(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        let plan = self.plan_path();
        all.insert(1, plan.to_str().expect("utf-8 path"));
        self.command(&all).output().expect("run switchyard")
    }

    pub async fn load_testdata(&self, rows: u32) {
        let client = self.source_client().await;
        client
            .batch_execute(&testdata_schema())
            .await
            .expect("load testdata schema");
        client
            .batch_execute(&testdata_rows(rows))
            .await
            .expect("load testdata rows");
    }
}

pub fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Waits until the target has confirmed everything the source has written so far.
pub async fn wait_caught_up(source: &Client, slot: &str, timeout: Duration) {
    let lsn: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let deadline = Instant::now() + timeout;
    loop {
        let row = source
            .query_one("SELECT coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $2", &[&lsn, &slot])
            .await
            .expect("read slot");
        if row.get::<_, bool>(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "target did not confirm {lsn} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every row of `table` on both sides, compared as multisets of the rows' text form (the
/// EXCEPT ALL of the two, both ways). Returns (only on source, only on target).
pub async fn except_all(
    source: &Client,
    target: &Client,
    table: &str,
) -> (Vec<String>, Vec<String>) {
    let (mut a, mut b) = (
        row_texts(source, table).await,
        row_texts(target, table).await,
    );
    a.sort();
    b.sort();
    let mut only_a = Vec::new();
    let mut only_b = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                only_a.push(x.clone());
                i += 1;
            }
            (Some(_), Some(y)) => {
                only_b.push(y.clone());
                j += 1;
            }
            (Some(x), None) => {
                only_a.push(x.clone());
                i += 1;
            }
            (None, Some(y)) => {
                only_b.push(y.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    (only_a, only_b)
}

async fn row_texts(client: &Client, table: &str) -> Vec<String> {
    let sql = format!("SELECT t::text FROM {table} AS t");
    let rows = client
        .query(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

/// A transaction that has written, held open by `holder` until a backend of its database has
/// waited on it (a slot being created: `wait_event = 'transactionid'`) for `after`, then
/// committed. Returns the holder's pid and the task that commits (its error, if nothing
/// waited on the transaction within two minutes).
pub async fn hold_a_writer_until_waited_on(
    holder: Client,
    watcher: Client,
    after: Duration,
) -> (i32, tokio::task::JoinHandle<Result<(), String>>) {
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("the holder's pid")
        .get(0);
    holder
        .batch_execute("BEGIN; SELECT txid_current()")
        .await
        .expect("a transaction with an xid");
    let commits = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        let waited_on = loop {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE wait_event = 'transactionid' AND datname = current_database()",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if waiting > 0 || Instant::now() > deadline {
                break waiting > 0;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if waited_on {
            tokio::time::sleep(after).await;
        }
        holder
            .batch_execute("COMMIT")
            .await
            .map_err(|e| e.to_string())?;
        if waited_on {
            Ok(())
        } else {
            Err("nothing waited on the open transaction".into())
        }
    });
    (pid, commits)
}
