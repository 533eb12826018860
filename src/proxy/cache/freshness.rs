//! The staleness bound: the primary's WAL insert position, sampled about every 100 ms.
//!
//! A transaction that committed before time `T` ends at or before the position of any sample
//! taken after `T`. So once the invalidator has processed the first sample taken after
//! `now - max_staleness`, every write older than the bound has bumped its tables' versions,
//! and a cached answer can be at most `max_staleness` old. Keepalives alone would say nothing
//! when the WAL sender stalls; the samples come from the primary itself.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pg::Side;

/// How often the primary's position is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// `pg_current_wal_insert_lsn()` as a number: past every commit a client has seen
/// (asynchronous commits too, which are visible before their WAL is written).
pub const INSERT_POSITION: &str = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8";

/// WAL kept by the cache's slot, in bytes.
const RETAINED_WAL: &str = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
     FROM pg_replication_slots WHERE slot_name = $1";

pub struct Freshness {
    max_staleness: Duration,
    /// The server sampled, and its samples (when, position), oldest first; none older than
    /// `max_staleness` plus one sample.
    samples: Mutex<Samples>,
}

/// The server sampled, and (when, position) samples of it, oldest first.
type Samples = (Option<Side>, VecDeque<(Instant, u64)>);

impl Freshness {
    pub fn new(max_staleness: Duration) -> Freshness {
        Freshness {
            max_staleness,
            samples: Mutex::new((None, VecDeque::new())),
        }
    }

    /// Records a sample of `side`'s server taken at `at` (a new side forgets the other's).
    pub fn sampled(&self, side: Side, at: Instant, position: u64) {
        let mut guard = super::lock(&self.samples);
        if guard.0 != Some(side) {
            *guard = (Some(side), VecDeque::new());
        }
        let samples = &mut guard.1;
        samples.push_back((at, position));
        while samples.len() > 1 && samples[1].0 + self.max_staleness <= at {
            samples.pop_front();
        }
    }

    /// The position the invalidator must have processed for an answer to be served now: the
    /// first sample taken within the last `max_staleness`. `None` when there is none (the
    /// sampler cannot reach the primary): nothing is served.
    /// Positions are those of `side`'s server; samples of the other one (the primary changed a
    /// moment ago) say nothing.
    pub fn required(&self, side: Side) -> Option<u64> {
        self.required_at(side, Instant::now())
    }

    /// [`Freshness::required`] for whichever server is sampled: `/cache`.
    pub fn required_any(&self) -> Option<u64> {
        let side = super::lock(&self.samples).0?;
        self.required(side)
    }

    fn required_at(&self, side: Side, now: Instant) -> Option<u64> {
        let guard = super::lock(&self.samples);
        if guard.0 != Some(side) {
            return None;
        }
        let samples = &guard.1;
        let since = now.checked_sub(self.max_staleness);
        samples
            .iter()
            .find(|(at, _)| since.is_none_or(|since| *at >= since))
            .map(|&(_, position)| position)
    }
}

/// Samples the primary's position every [`SAMPLE_EVERY`] for as long as the proxy runs, on
/// a connection of the cache's own role (reconnected when it breaks; while it is down no
/// sample is taken, and after `max_staleness` nothing is served from the cache).
pub async fn sample(
    cache: std::sync::Arc<super::Cache>,
    primary: impl Fn() -> (Side, crate::plan::Endpoint),
) {
    let mut client: Option<(Side, tokio_postgres::Client)> = None;
    let mut ticks = 0u64;
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let (side, endpoint) = primary();
        // A switch: the new primary is sampled from now on.
        if client
            .as_ref()
            .is_none_or(|(on, c)| *on != side || c.is_closed())
        {
            match super::connect(&endpoint, &cache.settings).await {
                Ok(c) => client = Some((side, c)),
                Err(e) => {
                    client = None;
                    tracing::warn!("the cache cannot sample the primary's WAL position: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let Some((_, c)) = client.as_ref() else {
            continue;
        };
        ticks += 1;
        if ticks % 50 == 1 {
            // Every 5 s: the WAL the cache's slot keeps (`/cache`, the metrics).
            if let Ok(Ok(row)) = tokio::time::timeout(
                SAMPLE_EVERY * 5,
                c.query_opt(RETAINED_WAL, &[&cache.names.slot]),
            )
            .await
            {
                let bytes = row.and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(-1);
                cache
                    .retained_wal
                    .store(bytes, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let asked_at = Instant::now();
        match tokio::time::timeout(SAMPLE_EVERY * 5, c.query_one(INSERT_POSITION, &[])).await {
            Ok(Ok(row)) => cache
                .freshness
                .sampled(side, asked_at, row.get::<_, i64>(0) as u64),
            Ok(Err(e)) => {
                tracing::debug!("sampling the primary's WAL position failed: {e}");
                client = None;
            }
            Err(_) => client = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_sample_inside_the_bound_is_required() {
        let f = Freshness::new(Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..30u64 {
            f.sampled(Side::Source, t0 + Duration::from_millis(100 * i), 1000 + i);
        }
        // At 2.95 s the bound starts at 1.95 s: the sample of 2.0 s (position 1020).
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(f.required_at(Side::Source, at(2950)), Some(1020));
        // The other server's positions are never compared with these.
        assert_eq!(f.required_at(Side::Target, at(2950)), None);
        // Samples stopped: past 3.9 s none is inside the bound, nothing is served.
        assert_eq!(f.required_at(Side::Source, at(3950)), None);
        // A switch: the target's first sample replaces the source's.
        f.sampled(Side::Target, at(3000), 7);
        assert_eq!(f.required_at(Side::Source, at(3050)), None);
        assert_eq!(f.required_at(Side::Target, at(3050)), Some(7));
    }
}
