//! `[proxy.cache]`: the proxy's Redis read cache, against a real PostgreSQL 15 and a real
//! `redis-server`: hits, and that no answer is ever served stale past what the design allows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

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
        Cached::start_in("transaction", name, schema, cache_keys).await
    }

    /// [`Cached::start`] with a proxy in `mode` (`transaction` or `session`).
    async fn start_in(mode: &str, name: &str, schema: &str, cache_keys: &str) -> Cached {
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
            mode,
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

    /// `/cache` with only the decisions about SELECTs, for a failure's message.
    async fn counters(&self) -> serde_json::Value {
        let mut report = self.report().await;
        if let Some(decisions) = report.get_mut("decisions").and_then(|d| d.as_array_mut()) {
            decisions.retain(|d| {
                d["statement"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("SELECT"))
            });
        }
        report
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
                self.counters().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A simple query's rows, as text.
async fn rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    crate::shadow::simple(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
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
    let (_, metrics) = cached.proxy.admin("GET", "/metrics", None, "").await;
    let hits_line = format!(
        "switchyard_cache_reads_total{{outcome=\"hit\"}} {}",
        report["hits"]
    );
    assert!(metrics.contains(&hits_line), "{metrics}");
    assert!(
        metrics.contains("switchyard_cache_slot_retained_wal_bytes"),
        "{metrics}"
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

/// Reads `sql` through the proxy until it equals what the source answers directly; fails past
/// a second.
async fn matches_direct_within_a_second(cached: &Cached, client: &Client, sql: &str) {
    let direct = cached.db.source_client().await;
    let expected = rows(&direct, sql).await;
    fresh_within(client, sql, &expected, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn truncate_triggers_partitions_views_and_new_columns_are_never_served_stale() {
    let schema = "
        CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);
        INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 10) g;
        CREATE TABLE audit (id bigserial PRIMARY KEY, item int, v text);
        CREATE FUNCTION log_item() RETURNS trigger LANGUAGE plpgsql AS
          $$ BEGIN INSERT INTO audit (item, v) VALUES (NEW.id, NEW.v); RETURN NEW; END $$;
        CREATE TRIGGER log_item AFTER UPDATE ON items FOR EACH ROW EXECUTE FUNCTION log_item();
        CREATE TABLE events (id int, at date NOT NULL, what text, PRIMARY KEY (id, at))
          PARTITION BY RANGE (at);
        CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
        CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
        INSERT INTO events VALUES (1, '2026-05-01', 'a'), (2, '2027-05-01', 'b');
        CREATE VIEW item_view AS SELECT id, upper(v) AS v FROM items;";
    let cached = Cached::start(
        "cache_invalidation",
        schema,
        "ttl = \"1h\"\nmax_staleness = \"1h\"",
    )
    .await;
    let client = cached.proxy.client().await;
    let direct = cached.db.source_client().await;

    // A trigger writes a second cached table: its readers see the row at once.
    let audit = "SELECT count(*) FROM audit";
    cached.warm(&client, audit).await;
    direct
        .batch_execute("UPDATE items SET v = 'x' WHERE id = 1")
        .await
        .unwrap();
    matches_direct_within_a_second(&cached, &client, audit).await;

    // A partition's write reaches its parent's readers.
    let parent = "SELECT id, what FROM events ORDER BY id";
    cached.warm(&client, parent).await;
    direct
        .batch_execute("UPDATE events SET what = 'changed' WHERE id = 2")
        .await
        .unwrap();
    matches_direct_within_a_second(&cached, &client, parent).await;
    cached.warm(&client, parent).await;
    direct
        .batch_execute("INSERT INTO events_2026 VALUES (3, '2026-06-01', 'direct')")
        .await
        .unwrap();
    matches_direct_within_a_second(&cached, &client, parent).await;

    // A view's base table.
    let view = "SELECT v FROM item_view WHERE id = 2";
    cached.warm(&client, view).await;
    direct
        .batch_execute("UPDATE items SET v = 'through the view' WHERE id = 2")
        .await
        .unwrap();
    matches_direct_within_a_second(&cached, &client, view).await;

    // TRUNCATE.
    let all = "SELECT count(*) FROM audit";
    cached.warm(&client, all).await;
    direct.batch_execute("TRUNCATE audit").await.unwrap();
    matches_direct_within_a_second(&cached, &client, all).await;

    // A column added under SELECT *.
    let star = "SELECT * FROM items WHERE id = 3";
    cached.warm(&client, star).await;
    direct
        .batch_execute("ALTER TABLE items ADD COLUMN extra text DEFAULT 'new'")
        .await
        .unwrap();
    matches_direct_within_a_second(&cached, &client, star).await;
    cached.warm(&client, star).await;

    // SELECT revoked from the application's role: its next read fails as it would directly.
    direct
        .batch_execute(&format!(
            "REVOKE SELECT ON items FROM {}",
            cached.proxy.user
        ))
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        match client.simple_query(star).await {
            Err(e) => {
                assert_eq!(
                    e.code(),
                    Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
                    "{e}"
                );
                break;
            }
            Ok(_) => assert!(
                started.elapsed() < Duration::from_secs(1),
                "a revoked table was still served a second later"
            ),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn sessions_with_different_search_paths_and_time_zones_get_their_own_answers() {
    let schema = "
        CREATE SCHEMA a; CREATE SCHEMA b;
        CREATE TABLE a.t (id int PRIMARY KEY, v text); INSERT INTO a.t VALUES (1, 'from a');
        CREATE TABLE b.t (id int PRIMARY KEY, v text); INSERT INTO b.t VALUES (1, 'from b');
        CREATE TABLE public.stamps (id int PRIMARY KEY, at timestamptz NOT NULL);
        INSERT INTO stamps VALUES (1, '2026-12-07 12:00:00+00');";
    let cached = Cached::start("cache_settings", schema, "tables = [\"*.*\"]").await;
    let direct = cached.db.source_client().await;
    direct
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA a, b TO {user}; GRANT SELECT ON ALL TABLES IN SCHEMA a, b TO {user}",
            user = cached.proxy.user
        ))
        .await
        .unwrap();
    let in_a = cached.proxy.client().await;
    let in_b = cached.proxy.client().await;
    in_a.batch_execute("SET search_path = a").await.unwrap();
    in_b.batch_execute("SET search_path = b").await.unwrap();
    let read = "SELECT v FROM t WHERE id = 1";
    assert_eq!(cached.warm(&in_a, read).await, one("from a"));
    assert_eq!(cached.warm(&in_b, read).await, one("from b"));
    for _ in 0..5 {
        assert_eq!(rows(&in_a, read).await, one("from a"));
        assert_eq!(rows(&in_b, read).await, one("from b"));
    }

    let utc = cached.proxy.client().await;
    let tokyo = cached.proxy.client().await;
    utc.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    tokyo
        .batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    let stamp = "SELECT at FROM stamps WHERE id = 1";
    assert_eq!(
        cached.warm(&utc, stamp).await,
        one("2026-12-07 12:00:00+00")
    );
    assert_eq!(
        cached.warm(&tokyo, stamp).await,
        one("2026-12-07 21:00:00+09")
    );
    assert_eq!(rows(&utc, stamp).await, one("2026-12-07 12:00:00+00"));
}

#[tokio::test]
async fn redis_killed_under_load_costs_no_client_an_error_and_caching_resumes() {
    let mut cached = Cached::start("cache_redis_down", ITEMS, "redis_timeout = \"20ms\"").await;
    let client = cached.proxy.client().await;
    let read = "SELECT v FROM items WHERE id = 7";
    cached.warm(&client, read).await;
    let load = {
        let url = cached.proxy.url();
        tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let started = Instant::now();
            let mut reads = 0;
            while started.elapsed() < Duration::from_secs(4) {
                let got = rows(&client, "SELECT v FROM items WHERE id = 7").await;
                assert_eq!(got, one("v7"));
                reads += 1;
            }
            reads
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    cached.redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cached.redis.restart();
    let reads = load.await.expect("no read failed while Redis was down");
    assert!(reads > 50, "only {reads} reads in 4 s");
    // Back: versions were lost with Redis, seeded anew, and the cache serves again.
    assert_eq!(cached.warm(&client, read).await, one("v7"));
    let report = cached.report().await;
    assert!(report["redis_errors"].as_u64().unwrap_or(0) > 0, "{report}");
}

#[tokio::test]
async fn versions_lost_from_redis_never_serve_an_old_answer() {
    let cached = Cached::start(
        "cache_versions_lost",
        ITEMS,
        "ttl = \"1h\"\nmax_staleness = \"1h\"",
    )
    .await;
    let client = cached.proxy.client().await;
    let direct = cached.db.source_client().await;
    let read = "SELECT v FROM items WHERE id = 9";
    assert_eq!(cached.warm(&client, read).await, one("v9"));
    // The versions go (evicted, flushed by hand) while the answers stay.
    for key in cached.redis.cli(&["--scan", "--pattern", "*:v:*"]).lines() {
        cached.redis.cli(&["DEL", key]);
    }
    direct
        .batch_execute("UPDATE items SET v = 'after the flush' WHERE id = 9")
        .await
        .unwrap();
    for _ in 0..20 {
        let got = rows(&client, read).await;
        assert_ne!(
            got,
            one("v9"),
            "an answer stored under a lost version was served"
        );
    }
    matches_direct_within_a_second(&cached, &client, read).await;
    cached.warm(&client, read).await;
    // Everything flushed: the same.
    cached.redis.cli(&["FLUSHALL"]);
    direct
        .batch_execute("UPDATE items SET v = 'after flushall' WHERE id = 9")
        .await
        .unwrap();
    matches_direct_within_a_second(&cached, &client, read).await;
    assert_eq!(cached.warm(&client, read).await, one("after flushall"));
}

#[tokio::test]
async fn a_second_proxy_takes_over_the_invalidation_when_the_first_dies() {
    let mut first = Cached::start(
        "cache_failover",
        ITEMS,
        "ttl = \"1h\"\nmax_staleness = \"1h\"",
    )
    .await;
    // A second proxy of the same plan: same Redis, same slot.
    let plan_text = std::fs::read_to_string(&first.proxy.plan).expect("read the plan");
    let cache_section = plan_text
        .split("[proxy.cache]")
        .nth(1)
        .and_then(|rest| rest.split("[[proxy.users]]").next())
        .expect("the cache section");
    let second = Proxy::start_for(
        &first.db,
        &first.db.plan_text(""),
        "transaction",
        4,
        &format!("\n[proxy.cache]{cache_section}"),
        &[(first.proxy.user.as_str(), first.proxy.password.as_str())],
    )
    .await;
    let state = |report: &serde_json::Value| {
        report["invalidator"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = second.admin("GET", "/cache", None, "").await;
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        if state(&report).starts_with("stand-by") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second proxy did not stand by: {report}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(state(&first.report().await).starts_with("consuming"));

    let client = second.client().await;
    let direct = first.db.source_client().await;
    let read = "SELECT v FROM items WHERE id = 4";
    // The first proxy dies: the second consumes within a few seconds, and what is written
    // meanwhile is not lost (the slot kept it).
    let _ = first.proxy.child.kill();
    let _ = first.proxy.child.wait();
    direct
        .batch_execute("UPDATE items SET v = 'while nobody consumed' WHERE id = 4")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = second.admin("GET", "/cache", None, "").await;
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        if state(&report).starts_with("consuming") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second proxy did not take over: {report}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows(&client, read).await, one("while nobody consumed"));
    let before = second_hits(&second).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while second_hits(&second).await == before {
        assert_eq!(rows(&client, read).await, one("while nobody consumed"));
        assert!(
            Instant::now() < deadline,
            "the second proxy never served from the cache"
        );
    }
    direct
        .batch_execute("UPDATE items SET v = 'after the takeover' WHERE id = 4")
        .await
        .unwrap();
    fresh_within(
        &client,
        read,
        &one("after the takeover"),
        Duration::from_secs(1),
    )
    .await;
    first.redis.cli(&["PING"]);
}

async fn second_hits(proxy: &Proxy) -> u64 {
    let (_, body) = proxy.admin("GET", "/cache", None, "").await;
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    report["hits"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_cutover_under_load_keeps_the_cache_warm_and_loses_nothing() {
    use crate::cutover::{assert_holds_exactly, coordinator, Load, CUTOVER, PROXY, SCHEMA};
    let db = TestDb::new("cache_cutover").await;
    let source = db.source_client().await;
    source.batch_execute(SCHEMA).await.expect("schema");
    let redis = Redis::start();
    let extra = format!(
        "{PROXY}\n[proxy.cache]\nredis_url = \"{}\"\nreplication_user = \"cache_cutover_cache\"\n\
         replication_password_env = \"TEST_APP_PASSWORD\"\nttl = \"1h\"\nredis_timeout = \"100ms\"\n",
        redis.url()
    );
    let plan = db.plan_text(CUTOVER);
    let proxy = Proxy::start_with(&db, &source, &plan, "transaction", 8, &extra).await;
    let output = coordinator(&db, &proxy.plan, &["sync", "--wait", "--timeout", "120s"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        crate::common::text(&output)
    );
    let output = coordinator(&db, &proxy.plan, &["validate"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        crate::common::text(&output)
    );
    let cached = Cached { db, redis, proxy };
    cached.setup();
    cached.wait_consuming().await;

    let reader = cached.proxy.client().await;
    // The load writes accounts and events, never notes: its answers stay valid throughout.
    let read = "SELECT count(*) FROM notes";
    cached.warm(&reader, read).await;
    let stored_before = cached.report().await["stored"].as_u64().unwrap_or(0);

    let load = Load::start(&cached.proxy.url()).await;
    load.run_for(100).await;
    let reads = {
        let url = cached.proxy.url();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let mut n = 0;
            while !stopped.load(Ordering::Relaxed) {
                let got = rows(&client, "SELECT count(*) FROM notes").await;
                assert_eq!(got, one("0"));
                n += 1;
            }
            n
        });
        (stop, task)
    };
    let output = coordinator(&cached.db, &cached.proxy.plan, &["cutover", "--yes"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        crate::common::text(&output)
    );
    // After the switch the cache serves again, from the entry stored before it: warm.
    let deadline = Instant::now() + Duration::from_secs(3);
    let hits = cached.hits().await;
    loop {
        rows(&reader, read).await;
        if cached.hits().await > hits + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no hit after the cutover: {}",
            cached.counters().await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    load.run_for(100).await;
    reads.0.store(true, Ordering::Relaxed);
    let reads = reads
        .1
        .await
        .expect("the reader saw no error and no wrong answer");
    assert!(reads > 5, "{reads}");
    let (acked, errors) = load.stop().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    let target = cached.db.target_client().await;
    assert_holds_exactly(&target, &acked, "target").await;
    let report = cached.report().await;
    assert_eq!(
        report["stored"].as_u64().unwrap_or(0),
        stored_before,
        "the cache was filled again after the cutover instead of staying warm: {report}"
    );
    // Writes on the new primary invalidate.
    cached
        .proxy
        .client()
        .await
        .batch_execute("INSERT INTO notes (body) VALUES ('on the target')")
        .await
        .unwrap();
    fresh_within(&reader, read, &one("1"), Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_extended_protocol_with_binary_results_is_cached_per_parameter_and_reads_its_writes() {
    use tokio_postgres::types::Type;
    let cached = Cached::start("cache_extended", ITEMS, "").await;
    let client = cached.proxy.client().await;
    let read = "SELECT id, v FROM items WHERE id = $1";
    // query_typed: an unnamed Parse, Bind (binary parameters and results), Describe of the
    // portal, Execute, Sync, in one write.
    let typed = |id: i32| {
        let client = &client;
        async move {
            let rows = client
                .query_typed(read, &[(&id, Type::INT4)])
                .await
                .unwrap_or_else(|e| panic!("{read} ({id}): {e}"));
            rows.iter()
                .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = cached.hits().await;
        assert_eq!(typed(3).await, vec![(3, "v3".to_string())]);
        if cached.hits().await > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never a hit: {}",
            cached.counters().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each parameter value its own answer, from the cache once filled.
    let before = cached.hits().await;
    for _ in 0..10 {
        assert_eq!(typed(3).await, vec![(3, "v3".to_string())]);
        assert_eq!(typed(4).await, vec![(4, "v4".to_string())]);
    }
    assert!(
        cached.hits().await >= before + 15,
        "{}",
        cached.counters().await
    );
    // The unnamed statement the cache answered for is still the client's: a simple query in
    // between, then the same typed read again, and a write through the extended protocol.
    client.simple_query("SELECT 1").await.unwrap();
    client
        .execute_typed(
            "UPDATE items SET v = $1 WHERE id = $2",
            &[(&"typed write", Type::TEXT), (&3i32, Type::INT4)],
        )
        .await
        .unwrap();
    assert_eq!(typed(3).await, vec![(3, "typed write".to_string())]);
    assert_eq!(typed(4).await, vec![(4, "v4".to_string())]);
}

#[tokio::test]
async fn identical_misses_at_once_send_one_query_to_the_database() {
    let cached = Cached::start("cache_stampede", ITEMS, "").await;
    let direct = cached.db.source_client().await;
    // About a million rows joined: long enough for the others to arrive while it runs.
    let slow = "SELECT count(*) FROM items a, items b, items c WHERE a.id > b.id";
    let first = cached.proxy.client().await;
    cached.warm(&first, slow).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(cached.proxy.client().await);
    }
    let expected = rows(&direct, slow).await;
    for round in 0..3 {
        // Invalidated: the next reads all miss at once.
        direct
            .batch_execute(&format!(
                "UPDATE items SET v = 'round {round}' WHERE id = 1"
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reads = clients.iter().map(|client| rows(client, slow));
        for got in futures_util::future::join_all(reads).await {
            assert_eq!(got, expected);
        }
    }
    let report = cached.counters().await;
    assert!(
        report["coalesced"].as_u64().unwrap_or(0) >= 3,
        "identical misses each went to the database: {report}"
    );
}

#[tokio::test]
async fn hits_are_answered_while_the_proxy_is_paused() {
    let cached = Cached::start("cache_paused", ITEMS, "").await;
    let client = cached.proxy.client().await;
    let read = "SELECT v FROM items WHERE id = 5";
    cached.warm(&client, read).await;
    let (code, body) = cached
        .proxy
        .admin(
            "POST",
            "/pause",
            Some(crate::proxy::TOKEN),
            "{\"timeout_ms\": 1000}",
        )
        .await;
    assert_eq!(code, 200, "{body}");
    // Nothing can be written while paused: a cached answer is as good as the database's.
    let before = cached.hits().await;
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(rows(&client, read).await, one("v5"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the reads waited for the pause"
    );
    assert_eq!(
        cached.hits().await,
        before + 5,
        "{}",
        cached.counters().await
    );
    cached
        .proxy
        .admin("POST", "/resume", Some(crate::proxy::TOKEN), "")
        .await;
}

#[tokio::test]
async fn temporary_tables_do_not_empty_the_cache_but_other_ddl_does() {
    let cached = Cached::start("cache_temp_ddl", ITEMS, "").await;
    let client = cached.proxy.client().await;
    let direct = cached.db.source_client().await;
    let read = "SELECT v FROM items WHERE id = 6";
    cached.warm(&client, read).await;
    let changes = |r: &serde_json::Value| r["invalidator"]["schema_changes"].as_u64().unwrap_or(0);
    let before = changes(&cached.report().await);
    direct
        .batch_execute(
            "CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1); DROP TABLE scratch",
        )
        .await
        .unwrap();
    // Once the invalidator has processed a position after it, it has seen the DDL's message.
    let after: i64 = direct
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(2);
    while cached.report().await["invalidator"]["processed"]
        .as_u64()
        .unwrap_or(0)
        < after as u64
    {
        assert!(
            Instant::now() < deadline,
            "the invalidator did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        changes(&cached.report().await),
        before,
        "a temporary table bumped the schema epoch"
    );
    direct
        .batch_execute("CREATE TABLE other (id int PRIMARY KEY)")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while changes(&cached.report().await) == before {
        assert!(
            Instant::now() < deadline,
            "CREATE TABLE did not bump the schema epoch"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_session_with_a_temporary_table_of_a_cached_name_reads_its_own() {
    let cached = Cached::start_in("session", "cache_temp_shadow", ITEMS, "").await;
    let other = cached.proxy.client().await;
    let read = "SELECT v FROM items WHERE id = 1";
    assert_eq!(cached.warm(&other, read).await, one("v1"));
    let shadowing = cached.proxy.client().await;
    shadowing
        .batch_execute(
            "CREATE TEMP TABLE items (id int PRIMARY KEY, v text); \
             INSERT INTO items VALUES (1, 'the session''s own')",
        )
        .await
        .unwrap();
    // As directly: its temporary table shadows the cached one, for it alone.
    for _ in 0..5 {
        assert_eq!(rows(&shadowing, read).await, one("the session's own"));
    }
    let before = cached.hits().await;
    assert_eq!(rows(&other, read).await, one("v1"));
    assert!(cached.hits().await > before, "{}", cached.counters().await);
}
