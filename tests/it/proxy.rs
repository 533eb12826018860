//! `switchyard proxy` against a real PostgreSQL 15, with real clients: pgbench, tokio-postgres,
//! and raw sockets that misbehave.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

use crate::common::servers::{free_ports, Cluster, Flavor};
use crate::common::TestDb;

pub const TOKEN: &str = "test-admin-token";

/// A running `switchyard proxy`, killed when dropped.
pub struct Proxy {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub user: String,
    pub password: String,
    /// Every proxy user (name, password), `user` first; each password is in the proxy's
    /// environment under `password_env(i)`.
    pub users: Vec<(String, String)>,
    pub database: String,
    /// The plan file the proxy runs with (the coordinator can use it too).
    pub plan: std::path::PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// Creates the application role on the source (grants on everything in public) and starts
    /// a proxy for it. `extra` goes into the plan's [proxy] table.
    pub async fn start(db: &TestDb, mode: &str, pool_size: u32, extra: &str) -> Proxy {
        let source = db.source_client().await;
        Proxy::start_with(db, &source, &db.plan_text(""), mode, pool_size, extra).await
    }

    /// Same, with the coordinator's `source` client and the plan text given.
    pub async fn start_with(
        db: &TestDb,
        source: &tokio_postgres::Client,
        plan_text: &str,
        mode: &str,
        pool_size: u32,
        extra: &str,
    ) -> Proxy {
        let (user, password) = app_role(db, source).await;
        Proxy::start_for(
            db,
            plan_text,
            mode,
            pool_size,
            extra,
            &[(user.as_str(), password.as_str())],
        )
        .await
    }

    /// A proxy for `users` (name, password) whose roles exist on the source already; the
    /// first is the one [`Proxy::client`] logs in as.
    pub async fn start_for(
        db: &TestDb,
        plan_text: &str,
        mode: &str,
        pool_size: u32,
        extra: &str,
        users: &[(&str, &str)],
    ) -> Proxy {
        let [port, admin_port] = free_ports();
        let users: Vec<(String, String)> = users
            .iter()
            .map(|(name, password)| (name.to_string(), password.to_string()))
            .collect();
        let user_tables: String = users
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                format!(
                    "[[proxy.users]]\nname = \"{name}\"\npassword_env = \"{}\"\n",
                    password_env(i)
                )
            })
            .collect();
        let plan = plan_text.replace(
            "[sync]\n",
            &format!(
                "[proxy]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\npool_mode = \"{mode}\"\npool_size = {pool_size}\n{extra}\n{user_tables}[sync]\n"
            ),
        );
        let path = db.dir.path().join(format!("proxy-{mode}-{port}.toml"));
        std::fs::write(&path, plan).expect("write the proxy plan");
        let child = spawn_proxy(&path, &users);
        let mut proxy = Proxy {
            child,
            port,
            admin_port,
            user: users[0].0.clone(),
            password: users[0].1.clone(),
            users,
            database: db.name.clone(),
            plan: path,
        };
        proxy.wait_listening().await;
        proxy
    }

    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            // A proxy that could not start (its port taken meanwhile) says so at once.
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the proxy exited before it listened on {} ({status}); \
                     SWITCHYARD_TEST_PROXY_LOG=1 shows why",
                    self.port
                );
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the proxy and starts it again with the same plan and ports.
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_proxy(&self.plan, &self.users);
        self.wait_listening().await;
    }

    /// `GET /status`, parsed.
    pub async fn status(&self) -> serde_json::Value {
        let (code, body) = self.admin("GET", "/status", None, "").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    pub fn url(&self) -> String {
        self.url_as(&self.user, &self.password)
    }

    /// The URL of the proxy for another of its users (or a wrong password).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{}",
            self.port, self.database
        )
    }

    /// The value of an unlabelled metric on `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, metrics) = self.admin("GET", "/metrics", None, "").await;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect through the proxy: {e}"));
        tokio::spawn(connection);
        client
    }

    /// With `client` inside a transaction: a short `/pause` does not go idle and names the
    /// client's role as running; the transaction then commits while paused, and the proxy
    /// resumes.
    pub async fn pause_waits_for_and_names(&self, client: &tokio_postgres::Client) {
        let (_, body) = self
            .admin("POST", "/pause", Some(TOKEN), "{\"timeout_ms\": 200}")
            .await;
        let paused: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(paused["idle"], false, "{paused}");
        assert_eq!(paused["running"][0]["user"], self.user.as_str(), "{paused}");
        client
            .batch_execute("COMMIT")
            .await
            .expect("an open transaction finishes while paused");
        self.admin("POST", "/resume", Some(TOKEN), "").await;
    }

    /// `POST path` with the token and a coordinator's lock generation; returns (status, body).
    pub async fn admin_with_generation(
        &self,
        path: &str,
        generation: u64,
        body: &str,
    ) -> (u16, String) {
        let headers =
            format!("Authorization: Bearer {TOKEN}\r\nX-Switchyard-Generation: {generation}\r\n");
        self.admin_request("POST", path, &headers, body).await
    }

    /// An HTTP request to the admin listener; returns (status, body).
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        self.admin_request(method, path, &auth, body).await
    }

    /// One request with `headers` (each ending in CRLF); returns (status, body).
    async fn admin_request(
        &self,
        method: &str,
        path: &str,
        headers: &str,
        body: &str,
    ) -> (u16, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.admin_port))
            .await
            .expect("connect to the admin listener");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }
}

/// The test database's application role (`<db>_app`, password `app-secret`, all grants on
/// schema public), created if missing: (name, password).
pub async fn app_role(db: &TestDb, source: &tokio_postgres::Client) -> (String, String) {
    let user = format!("{}_app", db.name);
    let password = "app-secret".to_string();
    source
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {user} LOGIN PASSWORD '{password}'; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             GRANT ALL ON SCHEMA public TO {user};
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {user};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {user};"
        ))
        .await
        .expect("create the application role");
    (user, password)
}

/// The environment variable that holds the password of the proxy's `i`-th user.
fn password_env(i: usize) -> String {
    match i {
        0 => "TEST_APP_PASSWORD".into(),
        _ => format!("TEST_APP_PASSWORD_{i}"),
    }
}

fn spawn_proxy(plan: &std::path::Path, users: &[(String, String)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    for (i, (_, password)) in users.iter().enumerate() {
        command.env(password_env(i), password);
    }
    command
        .arg("proxy")
        .arg(plan)
        .envs(crate::common::dynamodb::ENV)
        .current_dir(plan.parent().expect("the plan's directory"))
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("SWITCHYARD_TEST_PROXY_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("start switchyard proxy")
}

fn pgbench(args: &[&str], url: &str) -> std::process::Output {
    Command::new("/usr/lib/postgresql/15/bin/pgbench")
        .args(args)
        .arg(url)
        .output()
        .expect("run pgbench")
}

async fn sums(client: &tokio_postgres::Client) -> (i64, i64, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::int8, (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::int8, (SELECT count(*) FROM pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_in_both_modes_and_all_query_protocols() {
    let db = TestDb::new("proxy_pgbench").await;
    let init = pgbench(&["-q", "-i", "-s", "1"], &db.source.url(&db.name));
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let source = db.source_client().await;
    // Session mode gives each client a server connection of its own, so its pool must hold
    // all eight; transaction mode shares three.
    for (mode, pool) in [("transaction", 3), ("session", 8)] {
        // Two workers whatever the machine has: a pool split between them.
        let proxy = Proxy::start(&db, mode, pool, "workers = 2").await;
        for protocol in ["simple", "extended", "prepared"] {
            let (_, _, before) = sums(&source).await;
            let out = pgbench(
                &["-n", "-c", "8", "-j", "2", "-t", "40", "-M", protocol],
                &proxy.url(),
            );
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{mode}/{protocol}: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                text.contains("number of transactions actually processed: 320/320"),
                "{mode}/{protocol}: {text}"
            );
            let (balance, deltas, after) = sums(&source).await;
            assert_eq!(
                after - before,
                320,
                "{mode}/{protocol}: every transaction wrote its history row"
            );
            assert_eq!(
                balance, deltas,
                "{mode}/{protocol}: balances match the history"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_and_settings_across_pooled_transactions() {
    let db = TestDb::new("proxy_prepared").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE hits (client int, n int, PRIMARY KEY (client, n))")
        .await
        .unwrap();
    // Two workers, one connection each: a client's statements follow it across both.
    let proxy = Proxy::start(&db, "transaction", 2, "workers = 2").await;
    let mut tasks = Vec::new();
    for c in 0..20 {
        let client = proxy.client().await;
        tasks.push(tokio::spawn(async move {
            let add = client.prepare("SELECT $1::int4 + 1").await.unwrap();
            let insert = client
                .prepare("INSERT INTO hits VALUES ($1, $2)")
                .await
                .unwrap();
            // Every client its own time zone: settings follow the client, not the connection.
            let zone = if c % 2 == 0 {
                "Asia/Tokyo"
            } else {
                "America/Lima"
            };
            client
                .batch_execute(&format!("SET TimeZone = '{zone}'"))
                .await
                .unwrap();
            for n in 0..30 {
                client.batch_execute("BEGIN").await.unwrap();
                let row = client.query_one(&add, &[&n]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), n + 1);
                client.execute(&insert, &[&c, &n]).await.unwrap();
                client.batch_execute("COMMIT").await.unwrap();
                let shown: String = client.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
                assert_eq!(shown, zone, "client {c} lost its setting");
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    let count: i64 = db
        .source_client()
        .await
        .query_one("SELECT count(*) FROM hits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 20 * 30);
    let status = proxy.status().await;
    assert!(
        status["pools"][0]["server_connections"].as_u64().unwrap() <= 2,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_both_ways_and_listen_refused_in_transaction_mode() {
    use futures_util::{SinkExt, StreamExt};
    let db = TestDb::new("proxy_copy").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let proxy = Proxy::start(&db, "transaction", 2, "").await;
    let client = proxy.client().await;
    let sink = client.copy_in("COPY items FROM STDIN").await.unwrap();
    let mut sink = Box::pin(sink);
    let data: String = (1..=1000).map(|i| format!("{i}\titem {i}\n")).collect();
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.as_mut().finish().await.unwrap(), 1000);
    let stream = client
        .copy_out("COPY (SELECT * FROM items ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.map(|c| c.unwrap()).collect().await;
    assert_eq!(chunks.concat(), data.as_bytes());

    let err = client.batch_execute("LISTEN news").await.unwrap_err();
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "0A000");
    assert!(db_err.message().contains("LISTEN"), "{}", db_err.message());
    client
        .batch_execute("SELECT 1")
        .await
        .expect("the session goes on");
}

/// Thousands of small CopyData messages arrive a read at a time: the proxy's buffer towards the
/// server fills and is flushed part-way through a read, and nothing is lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_copy_messages_fill_the_server_buffer_and_all_arrive() {
    use futures_util::SinkExt;
    let db = TestDb::new("proxy_copy_many").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE lines (id int PRIMARY KEY, body text)")
        .await
        .unwrap();
    let proxy = Proxy::start(&db, "transaction", 2, "").await;
    let client = proxy.client().await;
    let sink = client.copy_in("COPY lines FROM STDIN").await.unwrap();
    let mut sink = Box::pin(sink);
    let rows = 20_000;
    for i in 1..=rows {
        let line = format!("{i}\tline {i} {}\n", "x".repeat(i % 50));
        sink.feed(bytes::Bytes::from(line)).await.unwrap();
    }
    assert_eq!(sink.as_mut().finish().await.unwrap(), rows as u64);
    let row = client
        .query_one(
            "SELECT count(*), sum(id), sum(length(body)) FROM lines WHERE body = 'line ' || id || ' ' || repeat('x', id % 50)",
            &[],
        )
        .await
        .unwrap();
    let expected_length: i64 = (1..=rows as i64)
        .map(|i| format!("line {i} ").len() as i64 + i % 50)
        .sum();
    assert_eq!(row.get::<_, i64>(0), rows as i64);
    assert_eq!(row.get::<_, i64>(1), (rows as i64) * (rows as i64 + 1) / 2);
    assert_eq!(row.get::<_, i64>(2), expected_length);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_right_query_only() {
    let db = TestDb::new("proxy_cancel").await;
    let proxy = Proxy::start(&db, "transaction", 4, "").await;
    let (a, b) = (proxy.client().await, proxy.client().await);
    let token = a.cancel_token();
    let slow = tokio::spawn(async move { a.batch_execute("SELECT pg_sleep(20)").await });
    let other = tokio::spawn(async move {
        b.query_one("SELECT pg_sleep(1.5), 42", &[])
            .await
            .map(|r| r.get::<_, i32>(1))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    token.cancel_query(NoTls).await.expect("send the cancel");
    let result = slow.await.unwrap();
    let err = result.expect_err("the slow query was cancelled");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57014"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        other
            .await
            .unwrap()
            .expect("the other client's query was not cancelled"),
        42
    );
}

/// A cancel that reaches PostgreSQL only after the query it was meant for has ended must not
/// stop the next client's query on that server connection. The postmaster, which turns a
/// cancel request into a signal, is stopped while the first query ends, so the cancel is on
/// its way when the connection is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_still_on_its_way_does_not_reach_the_next_client() {
    // A source of its own: stopping the shared postmaster would stall the other tests.
    let source: &'static Cluster = Box::leak(Box::new(Cluster::start(Flavor::Source15)));
    let db = TestDb::on("proxy_late_cancel", source, crate::common::target()).await;
    // One worker: both clients share the one connection.
    let proxy = Proxy::start(&db, "transaction", 1, "workers = 1").await;
    let (a, b) = (proxy.client().await, proxy.client().await);
    // The pool's one connection, opened before the postmaster stops.
    b.batch_execute("SELECT 1").await.expect("warm the pool");

    let token = a.cancel_token();
    let first = tokio::spawn(async move {
        a.query_one("SELECT pg_sleep(1.5), 1", &[])
            .await
            .map(|r| r.get::<_, i32>(1))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = Stopped::postmaster(source);
    let cancel = tokio::spawn(async move { token.cancel_query(NoTls).await });
    assert_eq!(
        first
            .await
            .unwrap()
            .expect("the cancel could not reach the first query"),
        1
    );

    let second = tokio::spawn(async move {
        b.query_one("SELECT pg_sleep(1.5), 42", &[])
            .await
            .map(|r| r.get::<_, i32>(1))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stopped);
    assert_eq!(
        second
            .await
            .unwrap()
            .expect("the next client's query was not cancelled"),
        42
    );
    // The connection was held back for the cancel (which shows it was forwarded while the
    // first query ran, so this test tests something), then passed on once PostgreSQL had
    // acted on it, or closed.
    assert_eq!(
        proxy
            .metric("switchyard_server_connections_held_for_cancel_total")
            .await,
        1.0
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), cancel).await;
}

/// A postmaster held with SIGSTOP (its backends run on), resumed when dropped.
struct Stopped(u32);

impl Stopped {
    fn postmaster(cluster: &Cluster) -> Stopped {
        let pid = cluster.pid();
        signal(pid, "-STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

fn signal(pid: u32, which: &str) {
    let status = Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {which} {pid}");
}

/// A client's setting that no longer applies (the text search configuration it names was
/// dropped) fails the transaction that needs it re-applied, with the server's error, rather
/// than letting it run with the previous client's value; the client's next transaction runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_that_no_longer_applies_fails_the_transaction_not_silently() {
    let db = TestDb::new("proxy_stale_setting").await;
    let direct = db.source_client().await;
    direct
        .batch_execute("CREATE TEXT SEARCH CONFIGURATION public.sy_cfg (COPY = pg_catalog.english)")
        .await
        .unwrap();
    let default = crate::common::show(&direct, "default_text_search_config").await;
    // One worker: both clients take from the same stack of idle connections.
    let proxy = Proxy::start(&db, "transaction", 2, "workers = 1").await;
    let (a, b) = (proxy.client().await, proxy.client().await);
    // Both connections open, each with one client's setting.
    a.batch_execute("BEGIN").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET default_text_search_config = 'public.sy_cfg'; COMMIT")
        .await
        .unwrap();
    b.batch_execute("SET default_text_search_config = 'pg_catalog.simple'; COMMIT")
        .await
        .unwrap();
    direct
        .batch_execute("DROP TEXT SEARCH CONFIGURATION public.sy_cfg")
        .await
        .unwrap();

    // b's connection was given back last: a's transaction lands there, and its setting
    // cannot be applied.
    let err = a
        .query_one("SELECT current_setting('default_text_search_config')", &[])
        .await
        .expect_err("a setting that cannot be applied fails the transaction");
    let db_error = err.as_db_error().expect("an error from the proxy");
    assert_eq!(db_error.code().code(), "22023", "{db_error}");
    assert!(
        db_error.message().contains("default_text_search_config"),
        "{db_error}"
    );

    // Next time the setting is gone, and no one else's is in its place.
    let shown: String = a
        .query_one("SELECT current_setting('default_text_search_config')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, default);
    let shown: String = b
        .query_one("SELECT current_setting('default_text_search_config')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "pg_catalog.simple");
}

/// A query that waits for a server connection (the pool's only one is held by another
/// client's transaction) is ended by a cancel, as it would be on a server; a cancel while
/// the client is idle ends nothing later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_wait_for_a_server_connection() {
    let db = TestDb::new("proxy_cancel_queued").await;
    let proxy = Proxy::start(&db, "transaction", 1, "query_wait_timeout = \"30s\"").await;
    let (holder, queued) = (proxy.client().await, proxy.client().await);
    let token = queued.cancel_token();
    // Idle: nothing to cancel, and nothing kept for later.
    token.cancel_query(NoTls).await.expect("send a cancel");
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("hold the only connection");
    let waiting = tokio::spawn(async move {
        let result = queued.query_one("SELECT 7", &[]).await;
        (queued, result)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the query waits for the pool's only connection"
    );
    assert_eq!(proxy.status().await["clients_waiting"], 1);
    let started = Instant::now();
    token.cancel_query(NoTls).await.expect("send the cancel");
    let (queued, result) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the cancel ends the wait")
        .expect("join");
    let err = result.expect_err("the waiting query was cancelled");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57014"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        proxy.status().await["clients_waiting"],
        0,
        "no waiter left counted"
    );
    holder
        .batch_execute("COMMIT")
        .await
        .expect("the holder's transaction goes on");
    let row = queued
        .query_one("SELECT 8", &[])
        .await
        .expect("the cancelled client goes on");
    assert_eq!(row.get::<_, i32>(0), 8);
}

/// Reads whatever the proxy answers until it closes the connection (or 5 s).
async fn answer(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    out
}

fn sqlstate(reply: &[u8]) -> Option<String> {
    let at = reply.iter().position(|&b| b == b'E')?;
    let body = &reply[at + 5..];
    let c = body.windows(1).position(|w| w[0] == b'C')?;
    let end = body[c + 1..].iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&body[c + 1..c + 1 + end]).into_owned())
}

fn startup_packet(user: &str, database: &str, version: u32) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", database)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_get_errors_and_others_see_nothing() {
    let db = TestDb::new("proxy_bad_clients").await;
    let proxy = Proxy::start(&db, "transaction", 1, "client_login_timeout = \"1s\"").await;
    let good = proxy.client().await;
    let addr = ("127.0.0.1", proxy.port);

    // Random bytes: a startup length no packet has.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x7f, 0x13, 0x99, 0x01, 0xde, 0xad, 0xbe, 0xef])
        .await
        .unwrap();
    assert_eq!(sqlstate(&answer(&mut s).await).as_deref(), Some("08P01"));

    // A length claiming 2 GB.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&0x8000_0000u32.to_be_bytes()).await.unwrap();
    assert_eq!(sqlstate(&answer(&mut s).await).as_deref(), Some("08P01"));

    // Protocol 2.0.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&startup_packet(&proxy.user, &db.name, 2 << 16))
        .await
        .unwrap();
    assert_eq!(sqlstate(&answer(&mut s).await).as_deref(), Some("0A000"));

    // A truncated startup packet, then silence: the login timeout ends it.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&startup_packet(&proxy.user, &db.name, 3 << 16)[..10])
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(sqlstate(&answer(&mut s).await).as_deref(), Some("08P01"));
    assert!(started.elapsed() < Duration::from_secs(4));

    // A client that connects and never speaks.
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(sqlstate(&answer(&mut s).await).as_deref(), Some("08P01"));

    // Wrong password, unknown database, unknown user.
    let wrong = format!(
        "postgres://{}:nope@127.0.0.1:{}/{}",
        proxy.user, proxy.port, db.name
    );
    let err = tokio_postgres::connect(&wrong, NoTls)
        .await
        .err()
        .expect("wrong password refused");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("28P01"),
        "{err}"
    );
    let other_db = format!(
        "postgres://{}:{}@127.0.0.1:{}/nope",
        proxy.user, proxy.password, proxy.port
    );
    let err = tokio_postgres::connect(&other_db, NoTls)
        .await
        .err()
        .expect("unknown database refused");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("3D000"),
        "{err}"
    );
    let stranger = format!("postgres://stranger:x@127.0.0.1:{}/{}", proxy.port, db.name);
    let err = tokio_postgres::connect(&stranger, NoTls)
        .await
        .err()
        .expect("unknown user refused");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("28P01"),
        "{err}"
    );

    // A client that vanishes mid-transaction: with a pool of one, the next client can only
    // run if that server connection was cleaned up, and the vanished write is rolled back.
    let quitter = proxy.client().await;
    quitter
        .batch_execute("CREATE TABLE t (x int)")
        .await
        .unwrap();
    quitter
        .batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    drop(quitter);
    let next = tokio::time::timeout(
        Duration::from_secs(10),
        good.query_one("SELECT count(*) FROM t", &[]),
    )
    .await
    .expect("the pool's only connection came back")
    .unwrap();
    assert_eq!(next.get::<_, i64>(0), 0);

    let (status, body) = proxy.admin("GET", "/metrics", None, "").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("switchyard_errors_total{kind=\"login_refused\"}"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_and_resume_runs_them_all() {
    let db = TestDb::new("proxy_pause").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE ticks (n int)")
        .await
        .unwrap();
    let proxy = Proxy::start(&db, "transaction", 4, "max_pause = \"20s\"\nworkers = 2").await;
    let (status, _) = proxy.admin("POST", "/pause", None, "").await;
    assert_eq!(status, 401, "control endpoints need the token");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let client = proxy.client().await;
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut done = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .batch_execute("BEGIN; INSERT INTO ticks VALUES (1); COMMIT")
                    .await
                    .expect("no client sees an error");
                done += 1;
            }
            done
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = proxy
        .admin("POST", "/pause", Some(TOKEN), "{\"timeout_ms\": 3000}")
        .await;
    assert_eq!(status, 200, "{body}");
    let paused: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(paused["idle"], true, "{paused}");
    let count = |client: tokio_postgres::Client| async move {
        client
            .query_one("SELECT count(*) FROM ticks", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let during = count(db.source_client().await).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(db.source_client().await).await,
        during,
        "nothing ran while paused"
    );
    let (status, _) = proxy.admin("POST", "/resume", Some(TOKEN), "").await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for worker in workers {
        total += worker.await.expect("worker");
    }
    assert_eq!(count(db.source_client().await).await, i64::from(total));
    assert!(count(db.source_client().await).await > during);

    // A transaction that does not finish in time is named in the answer.
    let holder = proxy.client().await;
    holder
        .batch_execute("BEGIN; INSERT INTO ticks VALUES (1)")
        .await
        .unwrap();
    proxy.pause_waits_for_and_names(&holder).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_on_a_pool_of_ten() {
    let db = TestDb::new("proxy_thousand").await;
    // A thousand SCRAM logins at once keep this test's own two cores busy: the login
    // deadline is the proxy's, not what this test is about.
    let proxy = Proxy::start(
        &db,
        "transaction",
        10,
        "client_login_timeout = \"120s\"\nworkers = 2",
    )
    .await;
    let url = proxy.url();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
            tokio::spawn(connection);
            let row = client
                .query_one("SELECT $1::int4 * 2", &[&i])
                .await
                .expect("query");
            assert_eq!(row.get::<_, i32>(0), i * 2);
            client
        }));
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.expect("client"));
    }
    assert_eq!(clients.len(), 1000);
    let status = proxy.status().await;
    assert_eq!(status["clients"], 1000, "{status}");
    assert!(
        status["pools"][0]["server_connections"].as_u64().unwrap() <= 10,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_server_connection_fails_only_that_transaction() {
    let db = TestDb::new("proxy_server_lost").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE notes (n int)")
        .await
        .unwrap();
    let proxy = Proxy::start(&db, "transaction", 2, "").await;
    let (victim, bystander) = (proxy.client().await, proxy.client().await);
    victim
        .batch_execute("BEGIN; INSERT INTO notes VALUES (1)")
        .await
        .unwrap();
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    bystander
        .batch_execute("BEGIN; INSERT INTO notes VALUES (2)")
        .await
        .unwrap();
    db.source_client()
        .await
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The victim's transaction is gone, and it is told so once, with the server's own
    // error (57P01: terminated by an administrator); its session goes on.
    let err = victim
        .batch_execute("INSERT INTO notes VALUES (3); COMMIT")
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57P01"),
        "{err}"
    );
    victim
        .batch_execute("INSERT INTO notes VALUES (4)")
        .await
        .expect("the session goes on");
    // The other client never noticed.
    bystander.batch_execute("COMMIT").await.unwrap();
    let rows: Vec<i32> = db
        .source_client()
        .await
        .query("SELECT n FROM notes ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![2, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_too_long_gets_an_error_not_a_hang() {
    let db = TestDb::new("proxy_wait_timeout").await;
    let proxy = Proxy::start(&db, "transaction", 1, "query_wait_timeout = \"1s\"").await;
    let (holder, waiter) = (proxy.client().await, proxy.client().await);
    holder.batch_execute("BEGIN").await.unwrap();
    let started = Instant::now();
    let err = waiter.batch_execute("SELECT 1").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("query_wait_timeout")),
        "{err}"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    waiter
        .batch_execute("SELECT 1")
        .await
        .expect("once the pool frees up, the same session works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_transactions_finish_then_exits() {
    let db = TestDb::new("proxy_sigterm").await;
    db.source_client()
        .await
        .batch_execute("CREATE TABLE done (n int)")
        .await
        .unwrap();
    let mut proxy = Proxy::start(&db, "transaction", 2, "shutdown_timeout = \"10s\"").await;
    let (busy, idle) = (proxy.client().await, proxy.client().await);
    busy.batch_execute("BEGIN; INSERT INTO done VALUES (1)")
        .await
        .unwrap();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(proxy.child.id() as libc::pid_t, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(("127.0.0.1", proxy.port)).await.is_err(),
        "no new clients after SIGTERM"
    );
    let err = idle.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.code().code() == "57P01")
            || err.is_closed(),
        "{err:?}"
    );
    busy.batch_execute("INSERT INTO done VALUES (2); COMMIT")
        .await
        .expect("the open transaction finishes");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not exit once idle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let count: i64 = db
        .source_client()
        .await
        .query_one("SELECT count(*) FROM done", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_notify_work_in_session_mode() {
    use futures_util::StreamExt;
    let db = TestDb::new("proxy_listen").await;
    let proxy = Proxy::start(&db, "session", 4, "").await;
    let (client, mut connection) = tokio_postgres::connect(&proxy.url(), NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(stream.for_each(move |message| {
        if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = message {
            let _ = tx.send(n.payload().to_string());
        }
        futures_util::future::ready(())
    }));
    client.batch_execute("LISTEN news").await.unwrap();
    db.source_client()
        .await
        .batch_execute("NOTIFY news, 'hello'")
        .await
        .unwrap();
    let payload = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a notification")
        .unwrap();
    assert_eq!(payload, "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_idle_server_connection_is_replaced_before_use() {
    let db = TestDb::new("proxy_health_check").await;
    let proxy = Proxy::start(&db, "transaction", 1, "server_check_delay = \"100ms\"").await;
    let client = proxy.client().await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // The pool's only connection dies while idle.
    db.source_client()
        .await
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("the check replaced the dead connection")
        .get(0);
    assert_ne!(other, pid);
}
