//! The cache's Redis calls: keys, each call bounded by `redis_timeout`, the circuit breaker,
//! storing an answer, the schema epoch.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::{Cache, Fill};
use crate::pg::Side;

/// After this many Redis failures in a row the cache stops asking Redis for
/// [`BREAKER_OPEN`]: a Redis that is down costs each query a timeout only until then.
const BREAKER_FAILURES: u32 = 5;

const BREAKER_OPEN: Duration = Duration::from_secs(1);

/// Stops asking Redis for a while after repeated failures.
#[derive(Default)]
pub(super) struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since [`Cache::started`] until which Redis is not asked.
    open_until: AtomicU64,
}

impl Cache {
    pub(super) fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub(super) fn version_key(&self, table: &str) -> String {
        self.key(&format!("v:{table}"))
    }

    pub(super) fn schema_key(&self) -> String {
        self.key("schema")
    }

    /// The position processed on `side`'s server: positions of the two servers are never
    /// compared.
    pub(super) fn position_key(&self, side: Side) -> String {
        self.key(&format!("pos:{side}"))
    }

    /// Whether Redis may be asked now (the breaker is closed).
    pub(super) fn redis_allowed(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        self.breaker.open_until.load(Ordering::Relaxed) <= now
    }

    pub(super) fn redis_failed(&self, what: &str, error: impl std::fmt::Display) {
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

    pub(super) fn redis_worked(&self) {
        if self.breaker.failures.load(Ordering::Relaxed) != 0 {
            self.breaker.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A Redis call on worker `shard`'s connection, bounded by `redis_timeout`.
    pub(super) async fn call<T: redis::FromRedisValue>(
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

    /// The schema epoch in Redis (seeded when missing).
    pub(super) async fn schema_epoch(&self) -> Option<String> {
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
}
