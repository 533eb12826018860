//! `[proxy.cache]`: answers to proven-cacheable reads kept in Redis, shared by every proxy,
//! invalidated from the primary's WAL, and never served staler than `max_staleness`.
//!
//! - [`analyze`] and [`catalog`] decide whether a statement can be cached, per (statement,
//!   role, `search_path`), in a task of their own: a statement seen for the first time goes to
//!   the database while it is decided.
//! - The key of an answer holds everything that can change its bytes, and the version of every
//!   table it read, read from Redis *before* the query runs: a write bumps the version, so an
//!   answer stored under the old one can never be found again.
//! - [`invalidator`] bumps those versions from a logical replication slot of its own and
//!   records the WAL position it has processed; [`freshness`] samples the primary's position
//!   every 100 ms. An answer is served only while the processed position has reached the one
//!   sampled `max_staleness` ago, and, for a session that wrote, its own commit.
//! - Anything wrong on the cache's side (Redis down or slow, the invalidator behind or gone)
//!   sends the query to the database: the cache never fails a client.

pub mod analyze;
pub mod catalog;
pub mod explain;
pub mod freshness;
pub mod invalidator;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};

pub use crate::cache_setup::Names;
use crate::pg::Side;
use crate::plan::{CacheSettings, Endpoint, Plan};

/// The `application_name` of the cache's own connections: the cutover's fence spares them.
pub const APPLICATION_NAME: &str = "switchyard-cache";

/// Decisions remembered at most; past it the map starts over (a workload of ever-new
/// statement texts, literals inlined, would otherwise grow it without bound).
const MAX_DECISIONS: usize = 10_000;

/// After this many Redis failures in a row the cache stops asking Redis for
/// [`BREAKER_OPEN`]: a Redis that is down costs each query a timeout only until then.
const BREAKER_FAILURES: u32 = 5;
const BREAKER_OPEN: Duration = Duration::from_secs(1);

/// How long an identical miss waits for the answer another session is filling before it goes
/// to the database itself.
const WAIT_FOR_FILL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("[proxy.cache] redis_url: {0}")]
    RedisUrl(String),
    #[error("[proxy.cache] replication_password_env: environment variable {0} is not set")]
    MissingPassword(String),
}

/// Whether a statement can be cached, remembered per (statement, role, `search_path`).
#[derive(Debug, Clone)]
enum Decision {
    /// Being decided: the statement goes to the database meanwhile.
    Pending,
    Cacheable {
        /// Tables whose versions gate its answers ([`catalog::table_key`]).
        tables: Arc<[String]>,
        /// The schema epoch it was decided in.
        schema: String,
        at: Instant,
    },
    Refused {
        reason: Arc<str>,
        at: Instant,
    },
}

type DecisionKey = (Arc<str>, Arc<str>, Option<Arc<str>>);

/// A session's read, as the cache looks it up.
pub struct Read<'a> {
    /// The server transactions go to now.
    pub side: Side,
    pub sql: &'a str,
    pub role: &'a Arc<str>,
    /// The client's settings.
    pub settings: &'a BTreeMap<String, String>,
    /// The session's last write committed at this position of `side` (0: none).
    pub own_write: u64,
    /// What else the client sent that shapes the answer: the extended protocol's messages,
    /// `Q` for a simple Query.
    pub group: &'a [u8],
}

/// What the session does with a read.
pub enum Lookup {
    /// The answer, as the server sent it (RowDescription, DataRows, CommandComplete).
    Hit(Bytes),
    /// Not in the cache: run it, and store the answer under this key ([`Fill`]).
    Miss(Fill),
    /// Not from the cache this time. `read_only`: the statement is a proven cacheable read
    /// (it cannot write, so no commit position is asked after it).
    Bypass { read_only: bool },
}

/// An answer being collected on its way to the client, stored when complete.
pub struct Fill {
    cache: Arc<Cache>,
    key: String,
    pub answer: BytesMut,
    limit: usize,
}

impl Drop for Fill {
    /// Stored or abandoned: the sessions waiting for this answer look again.
    fn drop(&mut self) {
        if let Some(notify) = lock(&self.cache.inflight).remove(&self.key) {
            notify.notify_waiters();
        }
    }
}

impl Fill {
    /// Adds a server message of the answer; false (and the fill is abandoned) when the answer
    /// grew past `max_entry_bytes`.
    pub fn add(&mut self, frame: &[u8]) -> bool {
        if self.answer.len() + frame.len() > self.limit {
            return false;
        }
        self.answer.extend_from_slice(frame);
        true
    }
}

/// Why a read did not come from the cache, counted for `/cache` and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bypass {
    NotCacheable,
    Deciding,
    RedisUnavailable,
    /// The invalidator has not processed the position sampled `max_staleness` ago.
    InvalidatorBehind,
    /// The session's own last write is not processed yet.
    OwnWrite,
    /// No recent sample of the primary's WAL position.
    NoPositionSample,
    /// A table's version (or the schema epoch) was missing from Redis: seeded anew.
    VersionUnknown,
    SchemaChanged,
}

/// The cache's counters.
#[derive(Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stored: AtomicU64,
    /// Hits that waited for another session's identical miss to be filled.
    pub coalesced: AtomicU64,
    pub too_large: AtomicU64,
    pub redis_errors: AtomicU64,
    bypassed: Mutex<BTreeMap<Bypass, u64>>,
}

impl Stats {
    fn bypass(&self, why: Bypass) {
        *lock(&self.bypassed).entry(why).or_default() += 1;
    }

    pub fn bypassed(&self) -> BTreeMap<Bypass, u64> {
        lock(&self.bypassed).clone()
    }
}

/// Stops asking Redis for a while after repeated failures.
#[derive(Default)]
struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since [`Cache::started`] until which Redis is not asked.
    open_until: AtomicU64,
}

/// The cache, shared by every session of the proxy.
pub struct Cache {
    pub settings: CacheSettings,
    pub names: Names,
    /// Redis keys start with it: plan and database.
    prefix: String,
    database: String,
    /// One Redis connection per proxy worker, each driven on its worker's scheduler.
    redis: Vec<ConnectionManager>,
    breaker: Breaker,
    started: Instant,
    decisions: Mutex<HashMap<DecisionKey, Decision>>,
    asks: tokio::sync::mpsc::UnboundedSender<Ask>,
    asked: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Ask>>>,
    pub freshness: freshness::Freshness,
    pub stats: Stats,
    /// The invalidator's state, for `/cache`.
    pub invalidator: invalidator::Status,
    /// WAL the cache's slot keeps on the primary, in bytes, as last sampled (-1: not known).
    pub retained_wal: std::sync::atomic::AtomicI64,
    /// Answers being filled now, by key: identical misses wait for them.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
}

/// A statement to decide.
struct Ask {
    key: DecisionKey,
    standard_conforming_strings: bool,
}

impl Cache {
    /// The cache for `plan`, with a Redis connection for each of the proxy workers whose
    /// schedulers are `workers` (it connects on first use: the proxy starts when Redis is
    /// down, and serves from the database until it is up).
    pub fn new(
        plan: &Plan,
        settings: &CacheSettings,
        workers: &[tokio::runtime::Handle],
    ) -> Result<Cache, CacheError> {
        let client = redis::Client::open(settings.redis_url.0.as_str())
            .map_err(|e| CacheError::RedisUrl(e.to_string()))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let mut redis = Vec::new();
        for worker in workers {
            let _entered = worker.enter();
            redis.push(
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map_err(|e| CacheError::RedisUrl(e.to_string()))?,
            );
        }
        if std::env::var(&settings.replication_password_env.0).is_err() {
            return Err(CacheError::MissingPassword(
                settings.replication_password_env.0.clone(),
            ));
        }
        let (asks, asked) = tokio::sync::mpsc::unbounded_channel();
        let database = plan.source.url.dbname().to_string();
        Ok(Cache {
            settings: settings.clone(),
            names: Names::of(plan),
            prefix: format!("switchyard:{}:{}:", plan.name.0, database),
            database,
            redis,
            breaker: Breaker::default(),
            started: Instant::now(),
            decisions: Mutex::new(HashMap::new()),
            asks,
            asked: Mutex::new(Some(asked)),
            freshness: freshness::Freshness::new(settings.max_staleness.0),
            stats: Stats::default(),
            invalidator: invalidator::Status::default(),
            retained_wal: std::sync::atomic::AtomicI64::new(-1),
            inflight: Mutex::new(HashMap::new()),
        })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn version_key(&self, table: &str) -> String {
        self.key(&format!("v:{table}"))
    }

    fn schema_key(&self) -> String {
        self.key("schema")
    }

    /// The position processed on `side`'s server: positions of the two servers are never
    /// compared.
    fn position_key(&self, side: Side) -> String {
        self.key(&format!("pos:{side}"))
    }

    /// Whether Redis may be asked now (the breaker is closed).
    fn redis_allowed(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        self.breaker.open_until.load(Ordering::Relaxed) <= now
    }

    fn redis_failed(&self, what: &str, error: impl std::fmt::Display) {
        self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
        let failures = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= BREAKER_FAILURES {
            let until = self.started.elapsed() + BREAKER_OPEN;
            self.breaker
                .open_until
                .store(until.as_millis() as u64, Ordering::Relaxed);
            self.breaker.failures.store(0, Ordering::Relaxed);
            tracing::warn!(
                "redis {what} failed {failures} times in a row ({error}): not asked for {}",
                humantime::format_duration(BREAKER_OPEN)
            );
        } else {
            tracing::debug!("redis {what} failed: {error}");
        }
    }

    fn redis_worked(&self) {
        if self.breaker.failures.load(Ordering::Relaxed) != 0 {
            self.breaker.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A Redis call on worker `shard`'s connection, bounded by `redis_timeout`.
    async fn call<T: redis::FromRedisValue>(
        &self,
        shard: usize,
        what: &str,
        cmd: &redis::Cmd,
    ) -> Option<T> {
        if !self.redis_allowed() {
            return None;
        }
        let mut conn = self.redis.get(shard).or(self.redis.first())?.clone();
        match tokio::time::timeout(
            self.settings.redis_timeout.0,
            cmd.query_async::<T>(&mut conn),
        )
        .await
        {
            Ok(Ok(value)) => {
                self.redis_worked();
                Some(value)
            }
            Ok(Err(e)) => {
                self.redis_failed(what, e);
                None
            }
            Err(_) => {
                self.redis_failed(
                    what,
                    format!(
                        "no answer within redis_timeout ({})",
                        humantime::format_duration(self.settings.redis_timeout.0)
                    ),
                );
                None
            }
        }
    }

    /// Looks a session's read up (on worker `shard`'s Redis connection).
    pub async fn lookup(self: &Arc<Self>, shard: usize, read: Read<'_>) -> Lookup {
        let Read {
            side,
            sql,
            role,
            settings,
            own_write,
            group,
        } = read;
        let (tables, schema) = match self.decision(sql, role, settings) {
            Ok(found) => found,
            Err(why) => {
                self.stats.bypass(why);
                return Lookup::Bypass { read_only: false };
            }
        };
        let Some(required) = self.freshness.required(side) else {
            self.stats.bypass(Bypass::NoPositionSample);
            return Lookup::Bypass { read_only: true };
        };
        let mut keys = vec![self.position_key(side), self.schema_key()];
        keys.extend(tables.iter().map(|t| self.version_key(t)));
        let Some(values) = self
            .call::<Vec<Option<String>>>(shard, "MGET", redis::cmd("MGET").arg(&keys))
            .await
        else {
            self.stats.bypass(Bypass::RedisUnavailable);
            return Lookup::Bypass { read_only: true };
        };
        let processed = values
            .first()
            .cloned()
            .flatten()
            .and_then(|p| p.parse::<u64>().ok());
        let Some(processed) = processed else {
            self.stats.bypass(Bypass::InvalidatorBehind);
            return Lookup::Bypass { read_only: true };
        };
        if processed < own_write {
            tracing::trace!(
                processed,
                own_write,
                "cache: the session's own write is not processed yet"
            );
            self.stats.bypass(Bypass::OwnWrite);
            return Lookup::Bypass { read_only: true };
        }
        if processed < required {
            self.stats.bypass(Bypass::InvalidatorBehind);
            return Lookup::Bypass { read_only: true };
        }
        // A missing version is "unknown", never 0: seeded anew at random, so that no answer
        // stored before it went missing can be found under the new one.
        let mut unknown = false;
        for (key, value) in keys.iter().zip(&values).skip(1) {
            if value.is_none() {
                unknown = true;
                let seed = rand::random::<u64>() >> 1;
                let _: Option<()> = self
                    .call(
                        shard,
                        "SET NX",
                        redis::cmd("SET").arg(key).arg(seed).arg("NX"),
                    )
                    .await;
            }
        }
        if unknown {
            self.stats.bypass(Bypass::VersionUnknown);
            return Lookup::Bypass { read_only: true };
        }
        let epoch = values.get(1).cloned().flatten().unwrap_or_default();
        if epoch != *schema {
            // Decided before a schema change: decided again.
            lock(&self.decisions).clear();
            self.stats.bypass(Bypass::SchemaChanged);
            return Lookup::Bypass { read_only: true };
        }
        let key = self.entry_key(sql, role, settings, group, &values[1..]);
        match self
            .call::<Option<Vec<u8>>>(shard, "GET", redis::cmd("GET").arg(&key))
            .await
        {
            Some(Some(answer)) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Lookup::Hit(Bytes::from(answer))
            }
            Some(None) => {
                // Concurrent identical misses of this proxy send one query to the database:
                // the others wait for its answer (a stampede after an invalidation would
                // otherwise take a server connection each).
                let filling = {
                    let mut inflight = lock(&self.inflight);
                    match inflight.get(&key) {
                        Some(notify) => Some(notify.clone().notified_owned()),
                        None => {
                            inflight.insert(key.clone(), Arc::new(tokio::sync::Notify::new()));
                            None
                        }
                    }
                };
                if let Some(filled) = filling {
                    let _ = tokio::time::timeout(WAIT_FOR_FILL, filled).await;
                    return match self
                        .call::<Option<Vec<u8>>>(shard, "GET", redis::cmd("GET").arg(&key))
                        .await
                    {
                        Some(Some(answer)) => {
                            self.stats.hits.fetch_add(1, Ordering::Relaxed);
                            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                            Lookup::Hit(Bytes::from(answer))
                        }
                        _ => {
                            self.stats.misses.fetch_add(1, Ordering::Relaxed);
                            Lookup::Bypass { read_only: true }
                        }
                    };
                }
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                Lookup::Miss(Fill {
                    cache: self.clone(),
                    key,
                    answer: BytesMut::new(),
                    limit: self.settings.max_entry_bytes as usize,
                })
            }
            None => {
                self.stats.bypass(Bypass::RedisUnavailable);
                Lookup::Bypass { read_only: true }
            }
        }
    }

    /// Stores a complete answer (fire and forget: the client already has it).
    pub async fn store(&self, shard: usize, fill: Fill) {
        let ttl = self.settings.ttl.0.as_millis() as u64;
        let stored: Option<()> = self
            .call(
                shard,
                "SET",
                redis::cmd("SET")
                    .arg(&fill.key)
                    .arg(fill.answer.as_ref())
                    .arg("PX")
                    .arg(ttl.max(1)),
            )
            .await;
        if stored.is_some() {
            self.stats.stored.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The entry key: everything that can change the answer's bytes. `versions` are the
    /// schema epoch and the tables' versions, as read before the query.
    fn entry_key(
        &self,
        sql: &str,
        role: &str,
        settings: &BTreeMap<String, String>,
        group: &[u8],
        versions: &[Option<String>],
    ) -> String {
        let mut hash = Sha256::new();
        let mut part = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        part(self.database.as_bytes());
        part(role.as_bytes());
        for (name, value) in settings {
            // Which program is connected does not change an answer.
            if name != "application_name" {
                part(name.as_bytes());
                part(value.as_bytes());
            }
        }
        part(sql.as_bytes());
        // The extended protocol's messages as the client sent them (parameter types, values
        // and formats, result formats, whether it asked for a Describe); `Q` for a simple
        // Query.
        part(group);
        for version in versions {
            part(version.as_deref().unwrap_or("").as_bytes());
        }
        let digest = hash.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.key(&format!("e:{hex}"))
    }

    /// The remembered decision for a statement, or why the cache is not used for it (and
    /// the decision asked for, when there is none or it is due again).
    fn decision(
        &self,
        sql: &str,
        role: &Arc<str>,
        settings: &BTreeMap<String, String>,
    ) -> Result<(Arc<[String]>, String), Bypass> {
        let search_path = settings.get("search_path").map(|s| Arc::from(s.as_str()));
        let key: DecisionKey = (Arc::from(sql), role.clone(), search_path);
        let mut decisions = lock(&self.decisions);
        let recheck = self.settings.recheck.0;
        match decisions.get(&key) {
            Some(Decision::Pending) => return Err(Bypass::Deciding),
            Some(Decision::Cacheable { tables, schema, at }) if at.elapsed() < recheck => {
                return Ok((tables.clone(), schema.clone()))
            }
            Some(Decision::Refused { at, .. }) if at.elapsed() < recheck => {
                return Err(Bypass::NotCacheable)
            }
            _ => {}
        }
        if decisions.len() >= MAX_DECISIONS {
            decisions.clear();
        }
        decisions.insert(key.clone(), Decision::Pending);
        let standard_conforming_strings = settings
            .get("standard_conforming_strings")
            .is_none_or(|v| !v.trim_matches('\'').eq_ignore_ascii_case("off"));
        let _ = self.asks.send(Ask {
            key,
            standard_conforming_strings,
        });
        Err(Bypass::Deciding)
    }

    /// Decides the statements sessions ask about, one at a time, on a catalog connection to
    /// the primary `endpoint` as the invalidator's role (reconnected when it breaks).
    pub async fn decide_asked(self: Arc<Self>, primary: impl Fn() -> (Side, Endpoint)) {
        let Some(mut asked) = lock(&self.asked).take() else {
            return;
        };
        // The catalog of the primary, reconnected when the primary changes (a switch).
        let mut client: Option<(Side, tokio_postgres::Client)> = None;
        while let Some(ask) = asked.recv().await {
            let (sql, role, search_path) = &ask.key;
            let decided = match analyze::analyze(sql, ask.standard_conforming_strings) {
                Err(reason) => Some(Err::<(), _>(reason)),
                Ok(shape) => {
                    let (side, endpoint) = primary();
                    if client
                        .as_ref()
                        .is_none_or(|(on, c)| *on != side || c.is_closed())
                    {
                        client = connect(&endpoint, &self.settings)
                            .await
                            .map_err(|e| {
                                tracing::warn!("the cache cannot reach the primary's catalog: {e}");
                            })
                            .ok()
                            .map(|c| (side, c));
                    }
                    let schema = self.schema_epoch().await;
                    match (client.as_mut().map(|(_, c)| c), schema) {
                        (Some(c), Some(schema)) => {
                            let asker = catalog::Asker {
                                role,
                                search_path: search_path.as_deref(),
                                settings: &self.settings,
                                publication: &self.names.publication,
                            };
                            match catalog::decide(c, &shape, &asker).await {
                                Ok(Ok(tables)) => {
                                    lock(&self.decisions).insert(
                                        ask.key.clone(),
                                        Decision::Cacheable {
                                            tables: tables.into(),
                                            schema,
                                            at: Instant::now(),
                                        },
                                    );
                                    continue;
                                }
                                Ok(Err(reason)) => Some(Err(reason)),
                                Err(e) => {
                                    tracing::warn!(
                                        "cacheability check failed: {}",
                                        crate::pg::describe(&e)
                                    );
                                    None
                                }
                            }
                        }
                        _ => None,
                    }
                }
            };
            let mut decisions = lock(&self.decisions);
            match decided {
                Some(Err(reason)) => {
                    tracing::debug!(statement = %sql, "not cacheable: {reason}");
                    decisions.insert(
                        ask.key.clone(),
                        Decision::Refused {
                            reason: reason.into(),
                            at: Instant::now(),
                        },
                    );
                }
                // Not decided (the catalog or Redis could not be asked): asked again next time.
                _ => {
                    decisions.remove(&ask.key);
                }
            }
        }
    }

    /// The schema epoch in Redis (seeded when missing).
    async fn schema_epoch(&self) -> Option<String> {
        let main = self.redis.len().saturating_sub(1);
        let key = self.schema_key();
        match self
            .call::<Option<String>>(main, "GET", redis::cmd("GET").arg(&key))
            .await?
        {
            Some(epoch) => Some(epoch),
            None => {
                let seed = rand::random::<u64>() >> 1;
                let _: Option<()> = self
                    .call(
                        main,
                        "SET NX",
                        redis::cmd("SET").arg(&key).arg(seed).arg("NX"),
                    )
                    .await;
                None
            }
        }
    }

    /// What the cache would do with `sql` for `role`, and if not cacheable the first reason:
    /// `switchyard cache explain` and `/cache`.
    pub fn remembered(&self, sql: &str, role: &str) -> Option<String> {
        let decisions = lock(&self.decisions);
        decisions
            .iter()
            .find(|((s, r, _), _)| &**s == sql && &**r == role)
            .map(|(_, d)| match d {
                Decision::Pending => "being decided".to_string(),
                Decision::Cacheable { tables, .. } => {
                    format!("cacheable (gated by {} table versions)", tables.len())
                }
                Decision::Refused { reason, .. } => format!("not cacheable: {reason}"),
            })
    }

    /// `/cache`: the counters, the invalidator, and the decisions remembered (statement,
    /// role, and whether it is cacheable or the first reason it is not).
    pub fn report(&self) -> serde_json::Value {
        let decisions: Vec<serde_json::Value> = lock(&self.decisions)
            .iter()
            .take(50)
            .map(|((sql, role, search_path), decision)| {
                let (cacheable, reason) = match decision {
                    Decision::Pending => (false, Some("being decided".to_string())),
                    Decision::Cacheable { .. } => (true, None),
                    Decision::Refused { reason, .. } => (false, Some(reason.to_string())),
                };
                serde_json::json!({
                    "statement": &**sql,
                    "role": &**role,
                    "search_path": search_path.as_deref(),
                    "cacheable": cacheable,
                    "reason": reason,
                })
            })
            .collect();
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "hits": count(&self.stats.hits),
            "misses": count(&self.stats.misses),
            "stored": count(&self.stats.stored),
            "coalesced": count(&self.stats.coalesced),
            "too_large": count(&self.stats.too_large),
            "redis_errors": count(&self.stats.redis_errors),
            "bypassed": self.stats.bypassed(),
            "required_position": self.freshness.required_any(),
            "slot_retained_wal_bytes": Some(self.retained_wal.load(Ordering::Relaxed)).filter(|&b| b >= 0),
            "invalidator": {
                "state": self.invalidator.state(),
                "processed": count(&self.invalidator.processed),
                "transactions": count(&self.invalidator.transactions),
                "schema_changes": count(&self.invalidator.schema_changes),
            },
            "decisions": decisions,
        })
    }

    /// The cache's counters for `/metrics` (Prometheus text).
    pub fn metrics_text(&self) -> String {
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut text = String::new();
        let mut counter = |name: &str, help: &str, rows: Vec<(String, u64)>| {
            text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for (labels, value) in rows {
                text.push_str(&format!("{name}{labels} {value}\n"));
            }
        };
        counter(
            "switchyard_cache_reads_total",
            "Reads looked up in the cache, by outcome.",
            vec![
                ("{outcome=\"hit\"}".into(), count(&self.stats.hits)),
                ("{outcome=\"miss\"}".into(), count(&self.stats.misses)),
            ],
        );
        counter(
            "switchyard_cache_bypassed_total",
            "Reads sent to the database without looking in the cache, by reason.",
            self.stats
                .bypassed()
                .into_iter()
                .map(|(why, n)| {
                    let reason = serde_json::to_value(why)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    (format!("{{reason=\"{reason}\"}}"), n)
                })
                .collect(),
        );
        counter(
            "switchyard_cache_stored_total",
            "Answers stored in Redis.",
            vec![(String::new(), count(&self.stats.stored))],
        );
        counter(
            "switchyard_cache_redis_errors_total",
            "Redis calls that failed or timed out.",
            vec![(String::new(), count(&self.stats.redis_errors))],
        );
        text.push_str(&format!(
            "# HELP switchyard_cache_slot_retained_wal_bytes WAL the cache's slot keeps on the primary.\n\
             # TYPE switchyard_cache_slot_retained_wal_bytes gauge\n\
             switchyard_cache_slot_retained_wal_bytes {}\n",
            self.retained_wal.load(Ordering::Relaxed).max(0)
        ));
        text
    }

    /// Drops every decision (a schema change).
    pub fn forget_decisions(&self) {
        lock(&self.decisions).clear();
    }
}

/// A connection to `endpoint`'s server as the cache's own role.
pub async fn connect(
    endpoint: &Endpoint,
    settings: &CacheSettings,
) -> Result<tokio_postgres::Client, String> {
    let mut config = endpoint.url.config().clone();
    config.user(&settings.replication_user);
    let password = std::env::var(&settings.replication_password_env.0).map_err(|_| {
        format!(
            "environment variable {} is not set",
            settings.replication_password_env.0
        )
    })?;
    config.password(password);
    config.application_name(APPLICATION_NAME);
    config.connect_timeout(endpoint.connect_timeout.0);
    let client = if config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| crate::pg::describe(&e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    } else {
        let tls = crate::pg::tls::connector().map_err(|e| e.to_string())?;
        let (client, connection) = config
            .connect(tls)
            .await
            .map_err(|e| crate::pg::describe(&e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    };
    Ok(client)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
