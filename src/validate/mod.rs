//! `switchyard validate`: do source and target hold the same rows?
//!
//! Each table's key range is cut into chunks at keyset bounds taken from a block sample (no
//! OFFSET), sized from a timed probe to about `chunk_seconds` of work. Per chunk both servers
//! compute, inside the database, per sub-bucket (`key hash mod buckets`): row count, sum and
//! XOR of 64-bit row hashes ([`hashing`]). Only buckets whose aggregates differ are opened:
//! their (key, row hash) pairs are compared here, and only the rows that differ are fetched.
//!
//! Live data: the source side of a chunk runs in a snapshot whose WAL position is noted; a
//! chunk that differs is compared again once the target has confirmed that position, and a
//! row that still differs is re-checked `rechecks` times: a row that changed on the source
//! meanwhile is "in flight", not a difference.

mod compare;
pub mod hashing;
mod planning;
pub mod report;
pub mod table;

use compare::*;
use planning::*;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};

use crate::pg::catalog;
use crate::pg::{Server, Side, TableName};
use crate::plan::{Plan, TablePattern};
use crate::state::{State, TableSummary, ValidationRecord};
use crate::Error;
use hashing::{ColumnHash, SESSION_SETTINGS};
use report::{Difference, Kind, Report, Settings, TableReport, Verdict};
use table::{fold_bucket, key_object, Aggregates, Chunk, KeyColumn, Step, TablePlan};

type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone)]
pub struct Options {
    /// Only tables matching these patterns (default: every table of the plan).
    pub tables: Vec<TablePattern>,
    pub jobs: usize,
    /// Rows per second over both servers, at most.
    pub max_rate: Option<u64>,
    pub rechecks: u32,
    pub strict: bool,
    pub statement_timeout: Duration,
    /// How long a chunk waits for the target to confirm the source's position.
    pub catchup_timeout: Duration,
    pub chunk_seconds: f64,
    /// Rows per bucket. Opening a differing bucket re-reads it twice (cells, then the rows
    /// of differing cells): measured on 5M rows with 100 differences, 4,096-row buckets made
    /// the run 1.45x a clean one and 2,048-row buckets 1.25x, at no cost to the clean run.
    pub bucket_rows: i64,
    /// Differences fetched in full per table (counts stay exact beyond it).
    pub max_details: usize,
}

/// How far a run is, as it goes: rows compared on both servers (halved: each row is read
/// twice), of an estimate of them all, and the time since the run started.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub rows_done: u64,
    pub rows_total: u64,
    pub elapsed: Duration,
}

/// Told of [`Progress`] as chunks finish, from the run's workers; the CLI draws it.
pub type Observer = std::sync::Arc<dyn Fn(Progress) + Send + Sync>;

impl Default for Options {
    fn default() -> Options {
        Options {
            tables: Vec::new(),
            jobs: 2,
            max_rate: None,
            rechecks: 3,
            strict: false,
            statement_timeout: Duration::from_secs(300),
            catchup_timeout: Duration::from_secs(60),
            chunk_seconds: 0.5,
            bucket_rows: 2048,
            max_details: 1000,
        }
    }
}

/// What the state store keeps of a run: the cutover refuses to run without a recent passing
/// validation.
pub fn record(report: &Report) -> ValidationRecord {
    ValidationRecord {
        at: report.started_at.clone(),
        verdict: report.verdict.to_string(),
        source_lsn_start: report.source_lsn_start.clone().unwrap_or_default(),
        source_lsn_end: report.source_lsn_end.clone().unwrap_or_default(),
        tables: report
            .tables
            .iter()
            .map(|t| TableSummary {
                name: t.name.clone(),
                rows_source: t.rows_source,
                rows_target: t.rows_target,
                missing: t.missing,
                extra: t.extra,
                changed: t.changed,
                in_flight: t.in_flight,
            })
            .collect(),
    }
}

/// One server connection per side, set up for hashing.
struct Pair {
    source: Server,
    target: Server,
}

impl Pair {
    async fn connect(plan: &Plan, opts: &Options) -> Result<Pair> {
        let (source, target) = tokio::join!(
            Server::connect(Side::Source, &plan.source),
            Server::connect(Side::Target, &plan.target)
        );
        let pair = Pair {
            source: source?,
            target: target?,
        };
        let settings = format!(
            // Chunks are key ranges: read them through the key's index, never by a scan of
            // the whole table per chunk (which a planner may prefer for a large chunk). (A
            // bitmap heap scan was slower over whole chunks: its bitmap goes lossy.)
            "{SESSION_SETTINGS}; SET statement_timeout = {}; SET lock_timeout = 5000; SET enable_seqscan = off",
            opts.statement_timeout.as_millis()
        );
        pair.source
            .execute("prepare the session", &settings)
            .await?;
        pair.target
            .execute("prepare the session", &settings)
            .await?;
        Ok(pair)
    }
}

/// Runs a validation and builds its report.
pub async fn run(
    plan: &Plan,
    state: &State,
    opts: &Options,
    observe: Option<Observer>,
) -> Result<Report> {
    let started = Instant::now();
    let started_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let main = Pair::connect(plan, opts).await?;
    let slot = state.created.subscription.as_ref().map(|s| s.slot.clone());
    let source_lsn_start = current_lsn(&main.source).await?;
    let plans = plan_tables(plan, &main, opts).await?;
    let total_rows: i64 = plans.iter().map(|p| p.estimated_rows.max(0)).sum();

    let shared = Arc::new(Shared {
        tasks: Mutex::new(
            plans
                .iter()
                .enumerate()
                .flat_map(|(t, p)| (0..p.chunks.len()).map(move |c| (t, c)))
                .collect(),
        ),
        plans,
        slot,
        opts: opts.clone(),
        results: Mutex::new(HashMap::new()),
        partials: Mutex::new(HashMap::new()),
        rows_done: Default::default(),
        started,
        rows_total: total_rows.max(0) as u64,
        observe,
    });
    let mut workers = Vec::new();
    for _ in 0..opts.jobs.max(1) {
        let shared = shared.clone();
        let plan = plan.clone();
        workers.push(tokio::spawn(async move { worker(&plan, &shared).await }));
    }
    let mut problems = Vec::new();
    for w in workers {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(e.to_string()),
            Err(e) => problems.push(format!("a validation worker failed: {e}")),
        }
    }
    let source_lsn_end = current_lsn(&main.source).await?;
    let target_confirmed_lsn = match &shared.slot {
        Some(slot) => confirmed_lsn(&main.source, slot).await?,
        None => None,
    };
    let (tables, differences) = summarise(&shared);
    let verdict = Report::verdict_from(&tables, &problems);
    Ok(Report {
        format: 1,
        migration: plan.name.0.clone(),
        verdict,
        started_at,
        duration_ms: started.elapsed().as_millis() as u64,
        source_lsn_start: Some(source_lsn_start),
        source_lsn_end: Some(source_lsn_end),
        target_confirmed_lsn,
        settings: settings(opts),
        tables,
        differences,
        problems,
    })
}

/// The report of a run that could not validate at all (no table selected, a server not
/// reached …): verdict `incomplete`, and why.
pub fn failed(plan: &Plan, opts: &Options, started: SystemTime, why: String) -> Report {
    Report {
        format: 1,
        migration: plan.name.0.clone(),
        verdict: Verdict::Incomplete,
        started_at: humantime::format_rfc3339_millis(started).to_string(),
        duration_ms: started.elapsed().map_or(0, |d| d.as_millis() as u64),
        source_lsn_start: None,
        source_lsn_end: None,
        target_confirmed_lsn: None,
        settings: settings(opts),
        tables: Vec::new(),
        differences: Vec::new(),
        problems: vec![why],
    }
}

fn settings(opts: &Options) -> Settings {
    Settings {
        jobs: opts.jobs,
        max_rate: opts.max_rate,
        rechecks: opts.rechecks,
        strict: opts.strict,
        bucket_rows: opts.bucket_rows,
        chunk_seconds: opts.chunk_seconds,
        statement_timeout_ms: opts.statement_timeout.as_millis() as u64,
    }
}

struct Shared {
    plans: Vec<TablePlan>,
    tasks: Mutex<VecDeque<(usize, usize)>>,
    slot: Option<String>,
    opts: Options,
    /// Per table: what its chunks found.
    results: Mutex<HashMap<usize, TableResult>>,
    /// Per table in scan mode: the bucket aggregates summed so far.
    partials: Mutex<HashMap<usize, Partials>>,
    rows_done: std::sync::atomic::AtomicU64,
    started: Instant,
    /// The estimate of rows to compare, for [`Progress`].
    rows_total: u64,
    observe: Option<Observer>,
}

#[derive(Default)]
struct Partials {
    source: Aggregates,
    target: Aggregates,
    chunks_done: usize,
    failed: bool,
}

#[derive(Default)]
struct TableResult {
    rows_source: u64,
    rows_target: u64,
    chunks_done: usize,
    missing: u64,
    extra: u64,
    changed: u64,
    in_flight: u64,
    differences: Vec<Difference>,
    error: Option<String>,
    first_start: Option<Instant>,
    last_end: Option<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn worker(plan: &Plan, shared: &Shared) -> Result<()> {
    let pair = Pair::connect(plan, &shared.opts).await?;
    loop {
        let Some((t, c)) = lock(&shared.tasks).pop_front() else {
            return Ok(());
        };
        let table = &shared.plans[t];
        let began = Instant::now();
        let outcome = match &table.scan {
            Some(whole) => scan_chunk(&pair, shared, t, whole, &table.chunks[c]).await,
            None => check_chunk(&pair, shared, table, &table.chunks[c]).await,
        };
        let rows = record_chunk(shared, t, began, outcome);
        pace(shared, rows).await;
    }
}

/// Adds what a chunk found to its table's result; returns the rows it compared.
fn record_chunk(shared: &Shared, t: usize, began: Instant, outcome: Result<ChunkFound>) -> u64 {
    let mut results = lock(&shared.results);
    let result = results.entry(t).or_default();
    result.first_start = Some(result.first_start.map_or(began, |s| s.min(began)));
    result.last_end = Some(Instant::now());
    result.chunks_done += 1;
    match outcome {
        Ok(found) => {
            result.rows_source += found.rows_source;
            result.rows_target += found.rows_target;
            result.in_flight += found.in_flight;
            for d in found.differences {
                match d.kind {
                    Kind::Missing => result.missing += d.count,
                    Kind::Extra => result.extra += d.count,
                    Kind::Changed => result.changed += d.count,
                }
                if result.differences.len() < shared.opts.max_details {
                    result.differences.push(d.detail);
                }
            }
            found.rows_source + found.rows_target
        }
        Err(e) => {
            tracing::warn!(table = %shared.plans[t].name, "validation failed: {e}");
            result.error.get_or_insert_with(|| e.to_string());
            0
        }
    }
}

/// Counts rows done, tells the observer, and sleeps as long as `max_rate` asks.
async fn pace(shared: &Shared, rows: u64) {
    use std::sync::atomic::Ordering;
    let done = shared.rows_done.fetch_add(rows, Ordering::Relaxed) + rows;
    let elapsed = shared.started.elapsed();
    if let Some(observe) = &shared.observe {
        observe(Progress {
            rows_done: done / 2,
            rows_total: shared.rows_total,
            elapsed,
        });
    }
    if let Some(rate) = shared.opts.max_rate.filter(|r| *r > 0) {
        let due = Duration::from_secs_f64(done as f64 / rate as f64);
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

fn summarise(shared: &Shared) -> (Vec<TableReport>, Vec<Difference>) {
    let mut results = lock(&shared.results);
    let mut tables = Vec::new();
    let mut differences = Vec::new();
    for (i, plan) in shared.plans.iter().enumerate() {
        let r = results.remove(&i).unwrap_or_default();
        let duration = match (r.first_start, r.last_end) {
            (Some(a), Some(b)) => b.duration_since(a),
            _ => Duration::ZERO,
        };
        let rows = r.rows_source + r.rows_target;
        let error = r.error.or_else(|| {
            (r.chunks_done < plan.chunks.len()).then(|| "not every chunk was compared".into())
        });
        tables.push(TableReport {
            name: plan.name.to_string(),
            rows_source: r.rows_source,
            rows_target: r.rows_target,
            chunks: plan.chunks.len(),
            matching: r
                .rows_source
                .saturating_sub(r.missing + r.changed + r.in_flight),
            missing: r.missing,
            extra: r.extra,
            changed: r.changed,
            in_flight: r.in_flight,
            duration_ms: duration.as_millis() as u64,
            rows_per_second: (rows as f64 / duration.as_secs_f64().max(1e-3)) as u64,
            key: plan.key.iter().map(|k| k.name.clone()).collect(),
            columns: plan.columns.clone(),
            error,
        });
        differences.extend(r.differences);
    }
    (tables, differences)
}

/// Why a validation run could not compare (exit 1 with a report whose verdict is
/// `incomplete`): each case with what to look at next.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("no table to validate: the plan's [sync] tables and --tables select none")]
    NoTables,
    #[error("the replication slot {0} is gone from the source: the target no longer follows it, so rows cannot be compared while they change; run `switchyard status` to see why")]
    SlotMissing(String),
    #[error("the target did not confirm source position {lsn} within {} (slot {slot})", humantime::format_duration(*.timeout))]
    NotConfirmed {
        lsn: String,
        timeout: Duration,
        slot: String,
    },
}
