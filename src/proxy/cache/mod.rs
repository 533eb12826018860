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
mod decisions;
pub mod explain;
pub mod freshness;
pub mod invalidator;
mod redis_store;
mod report;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};

pub use crate::cache_setup::Names;
use crate::pg::Side;
use crate::plan::{CacheSettings, Endpoint, Plan};
use decisions::{Ask, Decision, DecisionKey};
use redis_store::Breaker;

/// The `application_name` of the cache's own connections: the cutover's fence spares them.
pub const APPLICATION_NAME: &str = "switchyard-cache";

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
