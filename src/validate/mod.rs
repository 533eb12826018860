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

pub mod hashing;
pub mod report;
pub mod table;

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
    pub progress: bool,
}

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
            progress: false,
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
pub async fn run(plan: &Plan, state: &State, opts: &Options) -> Result<Report> {
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
        bar: opts
            .progress
            .then(|| crate::output::rows_bar("validating", 0, total_rows.max(0) as u64)),
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
    if let Some(bar) = &shared.bar {
        bar.finish_and_clear();
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
    bar: Option<indicatif::ProgressBar>,
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

/// Counts rows done, updates the bar, and sleeps as long as `max_rate` asks.
async fn pace(shared: &Shared, rows: u64) {
    use std::sync::atomic::Ordering;
    let done = shared.rows_done.fetch_add(rows, Ordering::Relaxed) + rows;
    let elapsed = shared.started.elapsed();
    if let Some(bar) = &shared.bar {
        bar.set_position(done / 2);
        bar.set_message(crate::output::rate_and_eta(
            done / 2,
            0,
            elapsed,
            bar.length().unwrap_or(0),
        ));
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

async fn current_lsn(server: &Server) -> Result<String> {
    Ok(server
        .query_one(
            "read the WAL position",
            "SELECT pg_current_wal_lsn()::text",
            &[],
        )
        .await?
        .get(0))
}

async fn confirmed_lsn(source: &Server, slot: &str) -> Result<Option<String>> {
    Ok(source
        .query(
            "read the slot",
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .first()
        .and_then(|r| r.get(0)))
}

/// Waits until the target confirmed the source's `lsn` on the subscription's slot. Without
/// replication there is nothing to wait for; a slot that disappears meanwhile ends the run at
/// once (it used to wait out `catchup_timeout`).
async fn wait_applied(shared: &Shared, source: &Server, lsn: &str) -> Result<()> {
    let Some(slot) = &shared.slot else {
        return Ok(());
    };
    let timeout = shared.opts.catchup_timeout;
    let waited = crate::sync::replication::wait_confirmed(
        source,
        slot,
        lsn,
        timeout,
        Duration::from_millis(20),
    )
    .await?;
    match waited {
        crate::sync::replication::Confirmed::Reached { .. } => Ok(()),
        crate::sync::replication::Confirmed::SlotMissing => Err(Error::Refused(format!(
            "the replication slot {slot} is gone from the source: the target no longer follows it, so rows cannot be compared while they change; run `switchyard status` to see why"
        ))),
        crate::sync::replication::Confirmed::TimedOut => Err(Error::Refused(format!(
            "the target did not confirm source position {lsn} within {} (slot {slot})",
            humantime::format_duration(timeout)
        ))),
    }
}

/// A moment between re-checks while replication runs, for a transaction in flight to land.
async fn settle(shared: &Shared) {
    if shared.slot.is_some() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `sql` on the source in a fresh snapshot; returns the WAL position the snapshot is
/// complete up to, and the rows.
async fn in_snapshot(source: &Server, sql: &str) -> Result<(String, Vec<tokio_postgres::Row>)> {
    source
        .execute(
            "begin a snapshot",
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        )
        .await?;
    // The first statement takes the snapshot; every commit it sees lies before this position.
    let result = async {
        let lsn = current_lsn(source).await?;
        let rows = source.query("checksum the source", sql, &[]).await?;
        Ok::<_, Error>((lsn, rows))
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    source.execute("end the snapshot", end).await?;
    result
}

/// Runs `sql` on both servers at once, the source in a snapshot. When the two disagree
/// and replication runs, the target is read again once it has confirmed what the snapshot
/// saw: a disagreement that remains is not lag.
async fn on_both<T: PartialEq>(
    pair: &Pair,
    shared: &Shared,
    sql: &str,
    parse: impl Fn(&[tokio_postgres::Row]) -> T,
) -> Result<(T, T)> {
    let (source, target) = tokio::join!(
        in_snapshot(&pair.source, sql),
        pair.target.query("read the target", sql, &[])
    );
    let (lsn, source) = source?;
    let source = parse(&source);
    let mut target = parse(&target?);
    if source != target && shared.slot.is_some() {
        wait_applied(shared, &pair.source, &lsn).await?;
        target = parse(&pair.target.query("read the target again", sql, &[]).await?);
    }
    Ok((source, target))
}

/// What one chunk found.
struct ChunkFound {
    rows_source: u64,
    rows_target: u64,
    in_flight: u64,
    differences: Vec<Found>,
}

struct Found {
    kind: Kind,
    /// Rows this stands for (a duplicated row in a table without a key counts each copy).
    count: u64,
    detail: Difference,
}

/// Bucket aggregates as the checksum queries return them. (The sum of int8 values is always
/// an integer; were it not, the bucket would carry a marker sum and XOR.)
fn aggregates(rows: &[tokio_postgres::Row]) -> Aggregates {
    rows.iter()
        .map(|r| {
            let count: i64 = r.get(1);
            let sum: String = r.get(2);
            let folded = fold_bucket(count, &sum, r.get(3)).unwrap_or((count, i64::MIN, i64::MIN));
            (r.get::<_, i32>(0), folded)
        })
        .collect()
}

fn rows_in(aggs: &Aggregates) -> u64 {
    aggs.values().map(|a| a.0 as u64).sum()
}

fn differing_buckets(a: &Aggregates, b: &Aggregates) -> Vec<i32> {
    let mut buckets: Vec<i32> = a
        .iter()
        .filter(|(k, v)| b.get(k) != Some(v))
        .map(|(k, _)| *k)
        .chain(b.keys().filter(|k| !a.contains_key(k)).copied())
        .collect();
    buckets.sort_unstable();
    buckets.dedup();
    buckets
}

async fn check_chunk(
    pair: &Pair,
    shared: &Shared,
    table: &TablePlan,
    chunk: &Chunk,
) -> Result<ChunkFound> {
    let sql = table.aggregates_sql(chunk);
    // Both sides at once: on a quiet or caught-up chunk they agree and nothing waits.
    let (source, target) = tokio::join!(
        in_snapshot(&pair.source, &sql),
        pair.target.query("checksum the target", &sql, &[])
    );
    // A bucket that differs only because the target had not applied what the snapshot saw
    // yet agrees when it is opened: that waits for the target first.
    let (_, source) = source?;
    let source = aggregates(&source);
    let target = aggregates(&target?);
    let mut found = ChunkFound {
        rows_source: rows_in(&source),
        rows_target: rows_in(&target),
        in_flight: 0,
        differences: Vec::new(),
    };
    let buckets = differing_buckets(&source, &target);
    if buckets.is_empty() {
        return Ok(found);
    }
    if table.key.is_empty() {
        compare_multiset(pair, shared, table, chunk, &buckets, &mut found).await?;
    } else {
        compare_keyed(pair, shared, table, chunk, &buckets, &mut found).await?;
    }
    Ok(found)
}

/// A page range of a table in scan mode: partial aggregates on both servers, added to the
/// table's sums. The chunk that completes the table compares the sums and opens the buckets
/// that differ, by key range, in a snapshot, as [`check_chunk`] does: rows that moved while
/// the pages were read (counted twice or not at all) only make a bucket look different until
/// it is opened.
async fn scan_chunk(
    pair: &Pair,
    shared: &Shared,
    t: usize,
    whole: &Chunk,
    chunk: &Chunk,
) -> Result<ChunkFound> {
    let table = &shared.plans[t];
    let sql = table.aggregates_sql(chunk);
    let (source, target) = tokio::join!(
        pair.source.query("checksum the source", &sql, &[]),
        pair.target.query("checksum the target", &sql, &[])
    );
    let (source, target) = (
        source.map(|rows| aggregates(&rows)),
        target.map(|rows| aggregates(&rows)),
    );
    let mut found = ChunkFound {
        rows_source: 0,
        rows_target: 0,
        in_flight: 0,
        differences: Vec::new(),
    };
    let complete = {
        let mut partials = lock(&shared.partials);
        let sums = partials.entry(t).or_default();
        sums.chunks_done += 1;
        match (&source, &target) {
            (Ok(s), Ok(d)) => {
                merge(&mut sums.source, s);
                merge(&mut sums.target, d);
                found.rows_source = rows_in(s);
                found.rows_target = rows_in(d);
            }
            _ => sums.failed = true,
        }
        (sums.chunks_done == table.chunks.len() && !sums.failed).then(|| {
            (
                std::mem::take(&mut sums.source),
                std::mem::take(&mut sums.target),
            )
        })
    };
    source?;
    target?;
    if let Some((source, target)) = complete {
        let buckets = differing_buckets(&source, &target);
        if !buckets.is_empty() {
            compare_keyed(pair, shared, table, whole, &buckets, &mut found).await?;
        }
    }
    Ok(found)
}

/// Adds bucket aggregates: counts and sums (mod 2^64) add, XORs XOR.
fn merge(into: &mut Aggregates, from: &Aggregates) {
    for (bucket, (count, sum, xor)) in from {
        let total = into.entry(*bucket).or_insert((0, 0, 0));
        total.0 += count;
        total.1 = total.1.wrapping_add(*sum);
        total.2 ^= xor;
    }
}

type KeyHashes = BTreeMap<Vec<String>, i64>;

fn key_hashes(rows: &[tokio_postgres::Row]) -> KeyHashes {
    rows.iter()
        .map(|r| (r.get::<_, Vec<String>>(0), r.get::<_, i64>(1)))
        .collect()
}

/// The rows of differing buckets, compared by key; then re-checked.
async fn compare_keyed(
    pair: &Pair,
    shared: &Shared,
    table: &TablePlan,
    chunk: &Chunk,
    buckets: &[i32],
    found: &mut ChunkFound,
) -> Result<()> {
    // The differing buckets' cells, then the rows of the differing cells.
    let sql = table.cell_aggregates_sql(chunk, buckets);
    let (source, target) = on_both(pair, shared, &sql, aggregates).await?;
    let cells = differing_buckets(&source, &target);
    if cells.is_empty() {
        return Ok(());
    }
    let sql = table.cell_rows_sql(chunk, &cells);
    let (source, target) = on_both(pair, shared, &sql, key_hashes).await?;
    // key → (source hash, target hash, the source changed while re-checking)
    let mut candidates: BTreeMap<Vec<String>, (Option<i64>, Option<i64>, bool)> = source
        .iter()
        .filter(|(k, h)| target.get(*k) != Some(h))
        .map(|(k, h)| (k.clone(), (Some(*h), target.get(k).copied(), false)))
        .chain(
            target
                .iter()
                .filter(|(k, _)| !source.contains_key(*k))
                .map(|(k, h)| (k.clone(), (None, Some(*h), false))),
        )
        .collect();
    for _ in 0..shared.opts.rechecks {
        if candidates.is_empty() {
            break;
        }
        settle(shared).await;
        let keys: Vec<Vec<String>> = candidates.keys().cloned().collect();
        let sql = table.keyed_rows_sql(&keys);
        let (source, target) = on_both(pair, shared, &sql, key_hashes).await?;
        candidates.retain(|key, (was_source, was_target, moved)| {
            let (now_source, now_target) = (source.get(key).copied(), target.get(key).copied());
            if now_source == now_target {
                found.in_flight += 1;
                return false;
            }
            *moved |= now_source != *was_source;
            *was_source = now_source;
            *was_target = now_target;
            true
        });
    }
    let mut persistent = Vec::new();
    for (key, (source, target, moved)) in candidates {
        if moved {
            found.in_flight += 1;
            continue;
        }
        let kind = match (source, target) {
            (Some(_), None) => Kind::Missing,
            (None, Some(_)) => Kind::Extra,
            _ => Kind::Changed,
        };
        persistent.push((key, kind));
    }
    found.differences = detail_keyed(pair, table, persistent).await?;
    Ok(())
}

/// Fetches the differing rows in full on both sides and names the columns that differ.
async fn detail_keyed(
    pair: &Pair,
    table: &TablePlan,
    persistent: Vec<(Vec<String>, Kind)>,
) -> Result<Vec<Found>> {
    if persistent.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<Vec<String>> = persistent.iter().map(|(k, _)| k.clone()).collect();
    let sql = table.full_rows_sql(&keys);
    let (source, target) = tokio::join!(
        pair.source.query("read differing rows", &sql, &[]),
        pair.target.query("read differing rows", &sql, &[])
    );
    type Full = HashMap<Vec<String>, (Vec<i64>, Vec<Option<String>>)>;
    let index = |rows: Vec<tokio_postgres::Row>| -> Full {
        rows.into_iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect()
    };
    let (source, target) = (index(source?), index(target?));
    let row_object = |values: &[Option<String>]| -> Map<String, Value> {
        table
            .columns
            .iter()
            .zip(values)
            .map(|(c, v)| (c.name.clone(), v.clone().map_or(Value::Null, Value::String)))
            .collect()
    };
    Ok(persistent
        .into_iter()
        .map(|(key, kind)| {
            let s = source.get(&key);
            let t = target.get(&key);
            let columns = match (s, t) {
                (Some((sh, _)), Some((th, _))) => table
                    .columns
                    .iter()
                    .zip(sh.iter().zip(th))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(c, _)| c.name.clone())
                    .collect(),
                _ => Vec::new(),
            };
            Found {
                kind,
                count: 1,
                detail: Difference {
                    table: table.name.to_string(),
                    key: key_object(&table.key, &key),
                    kind,
                    columns,
                    source: s.map(|(_, v)| row_object(v)),
                    target: t.map(|(_, v)| row_object(v)),
                },
            }
        })
        .collect())
}

type HashCounts = BTreeMap<i64, i64>;

/// Without a key: the row hashes of differing buckets as multisets (duplicates count).
async fn compare_multiset(
    pair: &Pair,
    shared: &Shared,
    table: &TablePlan,
    chunk: &Chunk,
    buckets: &[i32],
    found: &mut ChunkFound,
) -> Result<()> {
    let sql = table.bucket_hashes_sql(chunk, buckets);
    let counts = |rows: &[tokio_postgres::Row]| -> HashCounts {
        rows.iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .collect()
    };
    // hash → source count - target count, over the differing buckets.
    let delta = |s: &HashCounts, t: &HashCounts| -> HashCounts {
        let mut d: HashCounts = s.clone();
        for (h, n) in t {
            *d.entry(*h).or_default() -= n;
        }
        d.retain(|_, n| *n != 0);
        d
    };
    let (source, target) = on_both(pair, shared, &sql, counts).await?;
    let mut diff = delta(&source, &target);
    for _ in 0..shared.opts.rechecks {
        if diff.is_empty() {
            break;
        }
        settle(shared).await;
        let (source, target) = on_both(pair, shared, &sql, counts).await?;
        let now = delta(&source, &target);
        // Only a difference that stays exactly the same is one; the rest moved meanwhile.
        let (same, moved): (HashCounts, HashCounts) =
            diff.into_iter().partition(|(h, n)| now.get(h) == Some(n));
        found.in_flight += moved.values().map(|n| n.unsigned_abs()).sum::<u64>();
        diff = same;
    }
    let hashes: Vec<i64> = diff.keys().copied().collect();
    if hashes.is_empty() {
        return Ok(());
    }
    let rows_sql = table.rows_by_hash_sql(chunk, &hashes);
    let (source, target) = tokio::join!(
        pair.source.query("read differing rows", &rows_sql, &[]),
        pair.target.query("read differing rows", &rows_sql, &[])
    );
    let mut values: HashMap<i64, Vec<Option<String>>> = HashMap::new();
    for r in source?.into_iter().chain(target?) {
        values.entry(r.get(0)).or_insert_with(|| r.get(1));
    }
    for (h, n) in diff {
        let row: Map<String, Value> = table
            .columns
            .iter()
            .zip(values.get(&h).cloned().unwrap_or_default())
            .map(|(c, v)| (c.name.clone(), v.map_or(Value::Null, Value::String)))
            .collect();
        let kind = if n > 0 { Kind::Missing } else { Kind::Extra };
        found.differences.push(Found {
            kind,
            count: n.unsigned_abs(),
            detail: Difference {
                table: table.name.to_string(),
                key: row.clone(),
                kind,
                columns: Vec::new(),
                source: (n > 0).then(|| row.clone()),
                target: (n < 0).then_some(row),
            },
        });
    }
    Ok(())
}

/// Chooses tables, hashes and chunks.
async fn plan_tables(plan: &Plan, pair: &Pair, opts: &Options) -> Result<Vec<TablePlan>> {
    let all = catalog::tables(&pair.source).await?;
    let selection = catalog::select(plan, all);
    let tables: Vec<&catalog::TableInfo> = selection
        .leaves()
        .filter(|t| {
            opts.tables.is_empty()
                || opts
                    .tables
                    .iter()
                    .any(|p| p.matches(&t.name.schema, &t.name.name))
        })
        .collect();
    if tables.is_empty() {
        return Err(Error::Refused(
            "no table to validate: the plan's [sync] tables and --tables select none".into(),
        ));
    }
    let mut described = Vec::new();
    for t in &tables {
        described.push(describe_columns(&pair.source, &t.name).await?);
    }
    let oids: Vec<u32> = described
        .iter()
        .flat_map(|cols| cols.iter().map(|c| c.oid))
        .collect();
    let types = hashing::resolve_types(&pair.source, oids.iter().copied()).await?;
    let to_test = hashing::types_to_test(&types, &oids);
    let passed = hashing::self_test(&pair.source, &pair.target, &to_test).await?;
    let mut plans = Vec::new();
    for (info, cols) in tables.iter().zip(described) {
        let columns: Vec<ColumnHash> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let column = hashing::Column {
                    name: &c.name,
                    type_sql: &c.type_sql,
                    oid: c.oid,
                    not_null: c.not_null,
                    position: i as i64 + 1,
                };
                hashing::column_hash(&column, &types, &passed, opts.strict)
            })
            .collect();
        let mut keyed: Vec<&DescribedColumn> = cols.iter().filter(|c| c.key_position > 0).collect();
        keyed.sort_by_key(|c| c.key_position);
        let key: Vec<KeyColumn> = keyed
            .iter()
            .map(|c| KeyColumn {
                name: c.name.clone(),
                type_sql: c.type_sql.clone(),
                collation: c.collation.clone(),
            })
            .collect();
        let cuttable = cuttable(&key);
        let mut table = TablePlan {
            name: info.name.clone(),
            columns,
            key,
            estimated_rows: info.estimated_rows.max(0),
            chunks: vec![Chunk::default()],
            buckets: (info.estimated_rows / opts.bucket_rows).max(1),
            scan: None,
        };
        if cuttable {
            cut_chunks(&pair.source, &mut table, opts).await?;
        }
        plans.push(table);
    }
    Ok(plans)
}

struct DescribedColumn {
    name: String,
    type_sql: String,
    oid: u32,
    /// 1-based position in the primary key, 0 when not in it.
    key_position: i32,
    /// `None` for a type without collation.
    collation: Option<String>,
    not_null: bool,
}

/// Whether a table with this key is cut into chunks. Keys are ordered in bytes (see
/// [`KeyColumn`]); a one-column key is chunked by pages and bucketed by key ranges, which
/// the key's index is not needed for. A composite key's chunks are key ranges: where its
/// leading column is collated otherwise its index cannot serve them and every chunk would be
/// a full scan, so such a table stays one chunk, bucketed by key hash.
fn cuttable(key: &[KeyColumn]) -> bool {
    match key {
        [] => false,
        [_] => true,
        [first, ..] => first.index_orders_bytes(),
    }
}

async fn describe_columns(source: &Server, table: &TableName) -> Result<Vec<DescribedColumn>> {
    let rows = source
        .query(
            "describe columns",
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid,
                    coalesce((SELECT k.n FROM unnest(pk.indkey) WITH ORDINALITY AS k(att, n) WHERE k.att = a.attnum), 0)::int4,
                    co.collname::text, a.attnotnull
               FROM pg_attribute a
               LEFT JOIN pg_index pk ON pk.indrelid = a.attrelid AND pk.indisprimary
               LEFT JOIN pg_collation co ON co.oid = a.attcollation
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&table.sql()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DescribedColumn {
            name: r.get(0),
            type_sql: r.get(1),
            oid: r.get(2),
            key_position: r.get(3),
            collation: r.get(4),
            not_null: r.get(5),
        })
        .collect())
}

/// Cuts a table with a byte-ordered key into chunks of about `chunk_seconds` of hashing
/// each (from a timed probe of the first rows), and, with a one-column key, each chunk into
/// key-range buckets of about `bucket_rows` rows. All bounds come from one block sample of
/// keys: no OFFSET, no full scan.
async fn cut_chunks(source: &Server, table: &mut TablePlan, opts: &Options) -> Result<()> {
    const PROBE_ROWS: i64 = 20_000;
    let rows = table.estimated_rows;
    if rows < 2 * opts.bucket_rows {
        return Ok(());
    }
    let pages: i32 = source
        .query_one(
            "count pages",
            "SELECT greatest(relpages, 1) FROM pg_class WHERE oid = $1::text::regclass",
            &[&table.name.sql()],
        )
        .await?
        .get(0);
    let wanted_chunks = if rows < 2 * PROBE_ROWS {
        1
    } else {
        let rate = probe_rate(source, table, PROBE_ROWS, pages).await?;
        let chunk_rows = (rate * opts.chunk_seconds).clamp(5_000.0, 20_000_000.0) as i64;
        // A multiple of the jobs, so that no job idles through the last round.
        let jobs = opts.jobs.max(1) as i64;
        let chunks = ((rows + chunk_rows - 1) / chunk_rows).max(1);
        if chunks == 1 {
            1
        } else {
            (chunks as u64).div_ceil(jobs as u64) as i64 * jobs
        }
    };
    let ranged = table.key.len() == 1;
    let wanted_bounds = if ranged {
        (rows / opts.bucket_rows).max(wanted_chunks)
    } else {
        wanted_chunks
    };
    if wanted_bounds <= 1 {
        return Ok(());
    }
    if ranged && wanted_chunks > 1 {
        if let Some(step) = even_step(source, table, wanted_bounds, pages).await? {
            scan_by_pages(table, Buckets::Step(step), wanted_chunks, i64::from(pages));
            return Ok(());
        }
    }
    // About two sampled pages per bound: enough for buckets of roughly even size, and the
    // sample stays a small part of the run.
    let sample = sample_keys(source, table, (wanted_bounds * 2) as f64, pages).await?;
    let n = (wanted_bounds as usize).min(sample.len());
    let mut bounds: Vec<Vec<String>> = (1..n)
        .map(|i| sample[i * sample.len() / n].clone())
        .collect();
    bounds.dedup();
    if bounds.is_empty() {
        return Ok(());
    }
    if ranged && wanted_chunks > 1 {
        scan_by_pages(
            table,
            Buckets::Bounds(bounds),
            wanted_chunks,
            i64::from(pages),
        );
        return Ok(());
    }
    let per_chunk = bounds.len().div_ceil(wanted_chunks as usize).max(1);
    let mut chunks = Vec::new();
    let mut lo: Option<Vec<String>> = None;
    let mut rest = bounds.into_iter().peekable();
    while rest.peek().is_some() {
        let mut inner: Vec<Vec<String>> = rest.by_ref().take(per_chunk).collect();
        // The last bound of a group ends the chunk, unless it is the last bound of all.
        let hi = if rest.peek().is_some() {
            inner.pop()
        } else {
            None
        };
        chunks.push(Chunk {
            lo: lo.clone(),
            hi: hi.clone(),
            inner: if ranged {
                inner.into_iter().map(|mut b| b.remove(0)).collect()
            } else {
                Vec::new()
            },
            pages: None,
            step: None,
        });
        lo = hi;
    }
    if lo.is_some() {
        chunks.push(Chunk {
            lo,
            hi: None,
            inner: Vec::new(),
            pages: None,
            step: None,
        });
    }
    table.buckets = (rows / chunks.len() as i64 / opts.bucket_rows).max(1);
    tracing::debug!(table = %table.name, chunks = chunks.len(), "chunks cut");
    table.chunks = chunks;
    Ok(())
}

/// The first key of about `wanted` of the table's `pages` (see [`TablePlan::sample_keys_sql`]).
async fn sample_keys(
    source: &Server,
    table: &TablePlan,
    wanted: f64,
    pages: i32,
) -> Result<Vec<Vec<String>>> {
    let percent = (100.0 * wanted / f64::from(pages)).clamp(0.001, 100.0);
    let rows = source
        .query(
            "sample keys",
            &table.sample_keys_sql((percent * 1000.0).ceil() / 1000.0),
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// How the rows of a table in scan mode are put in buckets.
enum Buckets {
    /// Key ranges between these sampled bounds.
    Bounds(Vec<Vec<String>>),
    /// Key ranges of equal width (see [`Chunk::step`]).
    Step(Step),
}

/// For an integer key spread evenly over its range: a [`Step`] for about `buckets` buckets,
/// judged from a small sample (256 pages) and the key's minimum and maximum (read from its
/// index), so that such a table needs no large sample of bounds.
async fn even_step(
    source: &Server,
    table: &TablePlan,
    buckets: i64,
    pages: i32,
) -> Result<Option<Step>> {
    let integer_key = matches!(
        table.key[0].type_sql.as_str(),
        "smallint" | "integer" | "bigint"
    );
    if !integer_key {
        return Ok(None);
    }
    let sample: Option<Vec<i64>> = sample_keys(source, table, 256.0, pages)
        .await?
        .iter()
        .map(|key| key.first().and_then(|k| k.parse().ok()))
        .collect();
    let range = source
        .query_one("read the key range", &table.key_range_sql(), &[])
        .await?;
    let parse = |i: usize| {
        range
            .get::<_, Option<String>>(i)
            .and_then(|v| v.parse::<i64>().ok())
    };
    Ok(match (sample, parse(0), parse(1)) {
        (Some(sample), Some(min), Some(max)) => Step::fit(&sample, min, max, buckets),
        _ => None,
    })
}

/// Scan mode (see [`TablePlan::scan`]): `chunks` page ranges over the source's `pages` (the
/// last one open, as the target may have more), all bucketed alike.
fn scan_by_pages(table: &mut TablePlan, buckets: Buckets, chunks: i64, pages: i64) {
    let (inner, step) = match buckets {
        Buckets::Bounds(bounds) => (bounds.into_iter().map(|mut b| b.remove(0)).collect(), None),
        Buckets::Step(step) => (Vec::new(), Some(step)),
    };
    let whole = Chunk {
        lo: None,
        hi: None,
        inner,
        pages: None,
        step,
    };
    let per = (pages + chunks - 1) / chunks;
    table.chunks = (0..chunks)
        .map(|i| Chunk {
            pages: Some((i * per, (i + 1 < chunks).then(|| (i + 1) * per))),
            ..whole.clone()
        })
        .collect();
    tracing::debug!(table = %table.name, chunks, step = ?table.chunks.first().and_then(|c| c.step), "scan by pages");
    table.scan = Some(whole);
}

/// Rows per second the source hashes this table at, timed on about `rows` rows of its
/// `pages`: its first keys where the key's index serves byte order, else its first pages
/// (the first keys in byte order of a key indexed in another collation would cost a full
/// scan and sort, and reading them another).
async fn probe_rate(source: &Server, table: &TablePlan, rows: i64, pages: i32) -> Result<f64> {
    let probe = if table.key.first().is_some_and(KeyColumn::index_orders_bytes) {
        let bound: Vec<String> = source
            .query_one("find a probe chunk", &table.probe_bound_sql(rows), &[])
            .await?
            .get(0);
        Chunk {
            hi: Some(bound),
            ..Chunk::default()
        }
    } else {
        let per_page = (table.estimated_rows / i64::from(pages)).max(1);
        Chunk {
            pages: Some((0, Some((rows / per_page).max(1)))),
            ..Chunk::default()
        }
    };
    let began = Instant::now();
    let hashed = source
        .query("time a probe chunk", &table.aggregates_sql(&probe), &[])
        .await?;
    let elapsed = began.elapsed().as_secs_f64().max(1e-4);
    Ok(rows_in(&aggregates(&hashed)).max(1) as f64 / elapsed)
}
