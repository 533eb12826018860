//! `[proxy.cache]`: the proxy's Redis read cache, against a real PostgreSQL 15 and a real
//! `redis-server`: hits, and that no answer is ever served stale past what the design allows.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::common::redis::Redis;
use crate::common::TestDb;
use crate::proxy::{app_role, Proxy};

/// A database with the cache set up: Redis, the proxy in front of the source, and the
/// cache's objects on the source.
struct Cached {
    db: TestDb,
    redis: Redis,
    proxy: Proxy,
}

impl Cached {
    /// `schema` runs on the source first (as the superuser); `cache_keys` go into
    /// `[proxy.cache]`.
    async fn start(name: &str, schema: &str, cache_keys: &str) -> Cached {
        let db = TestDb::new(name).await;
        let source = db.source_client().await;
        source
            .batch_execute(schema)
            .await
            .expect("create the schema");
        let redis = Redis::start();
        let extra = format!(
            "\n[proxy.cache]\nredis_url = \"{}\"\nreplication_user = \"{name}_cache\"\n\
             replication_password_env = \"TEST_APP_PASSWORD\"\n{cache_keys}\n",
            redis.url()
        );
        let (user, password) = app_role(&db, &source).await;
        // The test servers commit asynchronously (their WAL is written every 200 ms): a
        // session's own writes would reach the invalidator that late. Production's default.
        source
            .batch_execute(&format!("ALTER ROLE {user} SET synchronous_commit = on"))
            .await
            .expect("synchronous commits for the application");
        let proxy = Proxy::start_for(
            &db,
            &db.plan_text(""),
            "transaction",
            4,
            &extra,
            &[(user.as_str(), password.as_str())],
        )
        .await;
        let cached = Cached { db, redis, proxy };
        cached.setup();
        cached.wait_consuming().await;
        cached
    }

    /// `switchyard cache setup` with the proxy's plan.
    fn setup(&self) {
        let output = self
            .db
            .command(&["cache", "setup"])
            .arg(&self.proxy.plan)
            .env("TEST_APP_PASSWORD", &self.proxy.password)
            .output()
            .expect("run switchyard cache setup");
        assert!(
            output.status.success(),
            "cache setup failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    async fn report(&self) -> serde_json::Value {
        let (code, body) = self.proxy.admin("GET", "/cache", None, "").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("/cache JSON")
    }

    async fn hits(&self) -> u64 {
        self.report().await["hits"].as_u64().unwrap_or(0)
    }

    async fn wait_consuming(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let report = self.report().await;
            let state = report["invalidator"]["state"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if state.starts_with("consuming") && report["required_position"].is_u64() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the invalidator did not start: {report}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `sql` through `client` until an answer comes from the cache; returns it.
    async fn warm(&self, client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let before = self.hits().await;
            let rows = rows(client, sql).await;
            if self.hits().await > before {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "{sql} was never served from the cache: {}",
                self.report().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A simple query's rows, as text.
async fn rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn one(value: &str) -> Vec<Vec<Option<String>>> {
    vec![vec![Some(value.to_string())]]
}

/// Polls `sql` through the proxy until it answers `expected`; fails past `within`.
async fn fresh_within(
    client: &Client,
    sql: &str,
    expected: &[Vec<Option<String>>],
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let got = rows(client, sql).await;
        if got == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{sql} still answered {got:?} {within:?} after the write (expected {expected:?})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);
     INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g;";

#[tokio::test]
async fn a_session_reads_its_own_writes_and_is_served_from_the_cache_between_them() {
    let cached = Cached::start("cache_own_writes", ITEMS, "").await;
    let client = cached.proxy.client().await;
    let read = "SELECT v FROM items WHERE id = 1";
    assert_eq!(cached.warm(&client, read).await, one("v1"));
    let hits_before = cached.hits().await;
    for round in 0..20 {
        let value = format!("w{round}");
        client
            .simple_query(&format!("UPDATE items SET v = '{value}' WHERE id = 1"))
            .await
            .expect("update through the proxy");
        // At once, by the same session: never the cached answer of before the write.
        assert_eq!(rows(&client, read).await, one(&value), "round {round}");
        assert_eq!(rows(&client, read).await, one(&value), "round {round}");
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(rows(&client, read).await, one(&value), "round {round}");
    }
    let report = cached.report().await;
    assert!(
        report["hits"].as_u64().unwrap_or(0) > hits_before + 10,
        "the reads between writes were served from the cache: {report}"
    );
    drop(cached.redis);
}

#[tokio::test]
async fn a_write_from_outside_the_proxy_is_seen_within_a_second_with_a_high_ttl_and_bound() {
    let cached = Cached::start(
        "cache_outside_write",
        ITEMS,
        "ttl = \"1h\"\nmax_staleness = \"1h\"",
    )
    .await;
    let client = cached.proxy.client().await;
    let direct = cached.db.source_client().await;
    let read = "SELECT id, v FROM items WHERE id BETWEEN 5 AND 6 ORDER BY id";
    cached.warm(&client, read).await;
    for round in 0..5 {
        let value = format!("direct{round}");
        direct
            .batch_execute(&format!("UPDATE items SET v = '{value}' WHERE id = 6"))
            .await
            .unwrap();
        let expected = vec![
            vec![Some("5".to_string()), Some("v5".to_string())],
            vec![Some("6".to_string()), Some(value)],
        ];
        fresh_within(&client, read, &expected, Duration::from_secs(1)).await;
        cached.warm(&client, read).await;
    }
}

#[tokio::test]
async fn time_dependent_reads_are_never_cached_and_say_why() {
    let cached = Cached::start("cache_time", ITEMS, "").await;
    let client = cached.proxy.client().await;
    let statements = [
        "SELECT now()",
        "SELECT current_timestamp",
        "SELECT 'now'::timestamptz",
        "SELECT id FROM items WHERE id < extract(epoch FROM clock_timestamp())",
        "SELECT v, random() FROM items WHERE id = 1",
        "SELECT v FROM items WHERE id = 1 FOR UPDATE",
    ];
    for _ in 0..5 {
        for sql in statements {
            rows(&client, sql).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = cached.report().await;
    assert_eq!(report["hits"], 0, "{report}");
    for sql in statements {
        let decision = report["decisions"]
            .as_array()
            .and_then(|all| all.iter().find(|d| d["statement"] == sql))
            .unwrap_or_else(|| panic!("no decision for {sql}: {report}"));
        assert_eq!(decision["cacheable"], false, "{decision}");
        assert!(
            decision["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{decision}"
        );
    }
}
