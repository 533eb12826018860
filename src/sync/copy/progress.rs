//! What the copy has done, in two places: a table on the target that each chunk's transaction
//! marks done together with its rows (so a retry after a lost COMMIT answer knows, and
//! `status` can read it from any host), and counters in memory for `sync`'s progress bars.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::plan::{CopyPlan, Format};
use crate::pg::{PgError, Server};

pub const CREATE: &str = "CREATE SCHEMA _switchyard_copy;
CREATE TABLE _switchyard_copy.chunks (
    relation text NOT NULL,
    chunk int4 NOT NULL,
    estimated_bytes int8 NOT NULL,
    rows int8,
    bytes int8,
    started_at timestamptz,
    done_at timestamptz,
    PRIMARY KEY (relation, chunk)
);
CREATE TABLE _switchyard_copy.run (started_at timestamptz NOT NULL DEFAULT now(), phase text NOT NULL)";

pub const DROP: &str = "DROP SCHEMA IF EXISTS _switchyard_copy CASCADE";

pub const ADD_CHUNK: &str =
    "INSERT INTO _switchyard_copy.chunks (relation, chunk, estimated_bytes) VALUES ($1, $2, $3)";
pub const SET_PHASE: &str = "UPDATE _switchyard_copy.run SET phase = $1";
/// Run in the chunk's own transaction, after its COPY (the workers speak the simple protocol).
pub fn mark_done(relation: &str, chunk: u32, rows: u64, bytes: u64) -> String {
    format!(
        "UPDATE _switchyard_copy.chunks SET rows = {rows}, bytes = {bytes}, done_at = clock_timestamp() \
          WHERE relation = {} AND chunk = {chunk}",
        crate::pg::sql::literal(relation)
    )
}

/// Run on its own before the chunk's transaction, so that `status` from anywhere sees the
/// chunk under way.
pub fn mark_started(relation: &str, chunk: u32) -> String {
    format!(
        "UPDATE _switchyard_copy.chunks SET started_at = clock_timestamp() WHERE relation = {} AND chunk = {chunk}",
        crate::pg::sql::literal(relation)
    )
}

pub fn is_done(relation: &str, chunk: u32) -> String {
    format!(
        "SELECT done_at IS NOT NULL FROM _switchyard_copy.chunks WHERE relation = {} AND chunk = {chunk}",
        crate::pg::sql::literal(relation)
    )
}
const READ: &str =
    "SELECT c.relation, count(*)::int8, count(c.done_at)::int8, coalesce(sum(c.rows), 0)::int8,
       coalesce(sum(c.bytes), 0)::int8, sum(c.estimated_bytes)::int8,
       extract(epoch FROM clock_timestamp() - r.started_at)::float8, r.phase,
       count(c.started_at)::int8, extract(epoch FROM max(c.done_at) - min(c.started_at))::float8
  FROM _switchyard_copy.chunks c, _switchyard_copy.run r
 GROUP BY c.relation, r.started_at, r.phase ORDER BY c.relation";

/// One table's copy, as `sync` and `status` show it.
#[derive(Debug, Clone, Serialize)]
pub struct TableProgress {
    pub name: String,
    /// `queued`, `copying` or `copied`.
    pub state: &'static str,
    pub format: Option<Format>,
    pub chunks: u64,
    pub chunks_done: u64,
    pub rows: u64,
    pub bytes: u64,
    pub estimated_bytes: u64,
    /// Bytes per second over its finished chunks, from the first one's start to the last
    /// one's end (`status`; `sync`'s bars measure their own).
    pub rate: Option<f64>,
    pub eta_seconds: Option<f64>,
}

impl TableProgress {
    fn timed(mut self, seconds: Option<f64>) -> TableProgress {
        self.rate = seconds
            .filter(|&s| s > 0.0 && self.bytes > 0)
            .map(|s| self.bytes as f64 / s);
        self.eta_seconds = self
            .rate
            .filter(|_| self.state != "copied")
            .map(|rate| self.estimated_bytes.saturating_sub(self.bytes) as f64 / rate);
        self
    }
}

/// The whole copy.
#[derive(Debug, Clone, Serialize)]
pub struct CopyProgress {
    /// `copying rows`, `building indexes`, `validating foreign keys`, `starting replication`.
    pub phase: String,
    pub elapsed_seconds: f64,
    pub bytes: u64,
    pub estimated_bytes: u64,
    /// Bytes per second since the copy started.
    pub rate: f64,
    pub eta_seconds: Option<f64>,
    pub tables: Vec<TableProgress>,
}

impl CopyProgress {
    fn new(phase: String, elapsed: f64, tables: Vec<TableProgress>) -> CopyProgress {
        let bytes: u64 = tables.iter().map(|t| t.bytes).sum();
        let estimated_bytes: u64 = tables.iter().map(|t| t.estimated_bytes.max(t.bytes)).sum();
        let rate = if elapsed > 0.0 {
            bytes as f64 / elapsed
        } else {
            0.0
        };
        let eta_seconds = (rate > 0.0 && phase == "copying rows")
            .then(|| estimated_bytes.saturating_sub(bytes) as f64 / rate);
        CopyProgress {
            phase,
            elapsed_seconds: elapsed,
            bytes,
            estimated_bytes,
            rate,
            eta_seconds,
            tables,
        }
    }
}

/// Reads the copy's progress from the target, when a copy is under way there.
pub async fn read(target: &Server) -> Result<Option<CopyProgress>, PgError> {
    let exists: bool = target
        .query_one(
            "look for the copy's progress",
            "SELECT to_regclass('_switchyard_copy.run') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let rows = target.query("read the copy's progress", READ, &[]).await?;
    let mut elapsed = 0.0;
    let mut phase = String::from("copying rows");
    let tables = rows
        .iter()
        .map(|r| {
            elapsed = r.get(6);
            phase = r.get(7);
            let (chunks, done): (i64, i64) = (r.get(1), r.get(2));
            let started: i64 = r.get(8);
            TableProgress {
                name: r.get(0),
                state: state_of(chunks as u64, done as u64, started as u64),
                format: None,
                chunks: chunks as u64,
                chunks_done: done as u64,
                rows: r.get::<_, i64>(3) as u64,
                bytes: r.get::<_, i64>(4) as u64,
                estimated_bytes: r.get::<_, i64>(5) as u64,
                rate: None,
                eta_seconds: None,
            }
            .timed(r.get(9))
        })
        .collect();
    Ok(Some(CopyProgress::new(phase, elapsed, tables)))
}

fn state_of(chunks: u64, done: u64, started: u64) -> &'static str {
    if done == chunks {
        "copied"
    } else if started > 0 {
        "copying"
    } else {
        "queued"
    }
}

/// Counters the workers raise as rows stream, per table.
pub struct Counters {
    started: Instant,
    tables: Vec<TableCounters>,
}

#[derive(Default)]
struct TableCounters {
    bytes: AtomicU64,
    rows: AtomicU64,
    chunks_done: AtomicU64,
    /// Chunks a worker is on now.
    active: AtomicU64,
}

impl Counters {
    pub fn new(plan: &CopyPlan) -> Counters {
        Counters {
            started: Instant::now(),
            tables: plan
                .tables
                .iter()
                .map(|_| TableCounters::default())
                .collect(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn streamed(&self, table: usize, bytes: u64) {
        self.tables[table].bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A chunk's attempt failed: what it streamed is taken back.
    pub fn undo(&self, table: usize, bytes: u64) {
        self.tables[table].bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn started(&self, table: usize) {
        self.tables[table].active.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stopped(&self, table: usize) {
        self.tables[table].active.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn done(&self, table: usize, rows: u64) {
        let t = &self.tables[table];
        t.rows.fetch_add(rows, Ordering::Relaxed);
        t.chunks_done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self, plan: &CopyPlan, phase: &str) -> CopyProgress {
        let tables = plan
            .tables
            .iter()
            .zip(&self.tables)
            .map(|(table, c)| {
                let done = c.chunks_done.load(Ordering::Relaxed);
                let chunks = u64::from(table.chunks);
                TableProgress {
                    name: table.name.to_string(),
                    state: if done == chunks {
                        "copied"
                    } else if done > 0 || c.active.load(Ordering::Relaxed) > 0 {
                        "copying"
                    } else {
                        "queued"
                    },
                    format: Some(table.format),
                    chunks,
                    chunks_done: done,
                    rows: c.rows.load(Ordering::Relaxed),
                    bytes: c.bytes.load(Ordering::Relaxed),
                    estimated_bytes: table.bytes.max(0) as u64,
                    rate: None,
                    eta_seconds: None,
                }
            })
            .collect();
        CopyProgress::new(phase.to_string(), self.elapsed().as_secs_f64(), tables)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_is_what_is_left_at_the_rate_so_far() {
        let table = |bytes, estimated| TableProgress {
            name: "t".into(),
            state: "copying",
            format: None,
            chunks: 2,
            chunks_done: 1,
            rows: 0,
            bytes,
            estimated_bytes: estimated,
            rate: None,
            eta_seconds: None,
        };
        let p = CopyProgress::new(
            "copying rows".into(),
            10.0,
            vec![table(100, 300), table(100, 50)],
        );
        // 200 bytes in 10 s; 300 + 100 (a table past its estimate counts as its bytes) - 200.
        assert_eq!(p.rate, 20.0);
        assert_eq!(p.eta_seconds, Some(10.0));
        let p = CopyProgress::new("building indexes".into(), 10.0, vec![table(100, 300)]);
        assert_eq!(p.eta_seconds, None);
        assert_eq!(state_of(3, 3, 3), "copied");
        assert_eq!(state_of(3, 0, 0), "queued");
        assert_eq!(state_of(3, 0, 1), "copying");
        // Per table: 100 bytes over its chunks' 4 s, 200 left.
        let t = table(100, 300).timed(Some(4.0));
        assert_eq!((t.rate, t.eta_seconds), (Some(25.0), Some(8.0)));
        // Nothing finished yet: no rate to tell.
        let t = table(100, 300).timed(None);
        assert_eq!((t.rate, t.eta_seconds), (None, None));
    }
}
