//! `[proxy.shadow]`: a sample of the applications' reads replayed on the other server after
//! the client has its answer, and compared with that answer (docs/proxy.md, "Shadow reads").
//!
//! A session hands over a [`Sample`] — the messages it sent, its settings, the answer the
//! client got and how long the primary took — only when a permit of `max_in_flight` is free
//! (else the sample is dropped and counted), and never waits for anything here. The replay
//! runs on the proxy's main scheduler, on shadow connections of its own
//! ([`replay::Connections`]).
//!
//! A mismatch is not yet a divergence: the other server is a replication subscriber and may
//! not have applied what the primary's read saw. It is re-run on both servers once the
//! subscriber's slot has confirmed the primary's WAL insert position taken right after the
//! primary's run ([`Shadow::rerun`]); a read that then agrees was "in flight", one whose
//! difference changes from re-run to re-run is "unstable", and one that differs the same way
//! twice is a divergence.

pub mod answer;
mod judging;
pub mod replay;
mod replayer;
pub mod statement;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::admin_api::shadow as api;
use crate::pg::Side;
use crate::plan::ShadowSettings;
use replay::Connections;
use statement::{Kind, Statement};

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Answers larger than this are not captured (the sample is dropped).
pub const MAX_CAPTURE: usize = 1 << 20;
/// Statements analysed are remembered by their text, up to this many.
const ANALYSED_KEPT: usize = 10_000;
/// Turns of a `READ ONLY` transaction captured, at most (a longer one is dropped).
pub const MAX_TURNS: usize = 64;

/// What a session hands over: one statement, or a whole transaction opened `READ ONLY`.
pub struct Sample {
    pub user: Arc<str>,
    /// The server that answered the client.
    pub primary: Side,
    /// One turn; or, for a transaction, every turn from its `BEGIN` to its end.
    pub turns: Vec<Turn>,
    pub transaction: bool,
    pub standard_conforming_strings: bool,
    /// The client's tracked settings.
    pub settings: BTreeMap<String, String>,
    pub permit: OwnedSemaphorePermit,
}

/// What the client sent up to a ReadyForQuery, and what it got.
pub struct Turn {
    /// A Query, or an unnamed Parse with its Bind, Describe, Execute and Sync.
    pub frames: Bytes,
    /// The statement's text.
    pub sql: String,
    /// The answer's messages as the client got them (without the ReadyForQuery).
    pub answer: Vec<u8>,
    /// From forwarding to the ReadyForQuery.
    pub elapsed: Duration,
}

/// Counters `/metrics` reads without a lock.
#[derive(Default)]
pub struct Counters {
    pub samples: AtomicU64,
    pub dropped: AtomicU64,
    pub divergences: AtomicU64,
}

/// One fingerprint's tally in the window.
struct Tally {
    query: String,
    calls: u64,
    divergences: u64,
    in_flight: u64,
    unstable: u64,
    not_comparable: u64,
    histograms: api::Histograms,
    example: Option<api::Example>,
    plans: Option<api::Plans>,
    /// An EXPLAIN was asked (or is being asked) for this fingerprint.
    explained: bool,
}

struct WindowState {
    start: SystemTime,
    window: api::Window,
    fingerprints: HashMap<u64, Tally>,
}

impl WindowState {
    fn new() -> WindowState {
        WindowState {
            start: SystemTime::now(),
            window: api::Window::default(),
            fingerprints: HashMap::new(),
        }
    }
}

pub struct Shadow {
    pub settings: ShadowSettings,
    permits: Arc<Semaphore>,
    queue: mpsc::UnboundedSender<Sample>,
    /// Shared by the replayer ([`Shadow::work`]) and its helper ([`Shadow::help`]).
    inbox: tokio::sync::Mutex<mpsc::UnboundedReceiver<Sample>>,
    /// When the replayer took its batch ([`since_start`]), 0 when it waits for one.
    busy_since: AtomicU64,
    connections: Connections,
    state: Mutex<WindowState>,
    analysed: Mutex<HashMap<String, Arc<Statement>>>,
    pub counters: Counters,
    /// The slot whose confirmed position says the other server has what the primary had:
    /// the forward subscription's on the source, the way back's on the target.
    slots: [String; 2],
}

impl Shadow {
    pub fn new(
        settings: ShadowSettings,
        connections: Connections,
        forward_slot: String,
        reverse_slot: String,
    ) -> Shadow {
        let (queue, inbox) = mpsc::unbounded_channel();
        Shadow {
            permits: Arc::new(Semaphore::new(settings.max_in_flight.max(1) as usize)),
            settings,
            queue,
            inbox: tokio::sync::Mutex::new(inbox),
            busy_since: AtomicU64::new(0),
            connections,
            state: Mutex::new(WindowState::new()),
            analysed: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            slots: [forward_slot, reverse_slot],
        }
    }

    /// The fraction's draw: whether the next turn is looked at at all (one random number,
    /// before anything of the message is read).
    pub fn draw(&self) -> bool {
        self.settings.fraction.0 >= 1.0 || rand::random::<f64>() < self.settings.fraction.0
    }

    /// A free permit for a drawn, eligible read; none free: dropped and counted.
    pub fn permit(&self) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                lock(&self.state).window.dropped += 1;
                None
            }
        }
    }

    /// A captured sample, for the shadow task.
    pub fn submit(&self, sample: Sample) {
        // The receiver lives as long as the proxy; a send after it is gone is dropped.
        let _ = self.queue.send(sample);
    }

    /// A sample that could not be captured (its answer too large).
    pub fn abandoned(&self) {
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        lock(&self.state).window.dropped += 1;
    }

    /// The sample's statement analysed: kept under its literal shape (one parse per
    /// statement, not per set of constants: `pg_query`'s parse is the replay's largest cost
    /// in the proxy; [`statement::literal_shape`]), or under its own text when the analysis
    /// depends on a constant.
    fn analysed(&self, sql: &str, standard_conforming_strings: bool) -> Arc<Statement> {
        let shape = statement::literal_shape(sql, standard_conforming_strings)
            .unwrap_or_else(|| statement::normalize(sql));
        let known = {
            let analysed = lock(&self.analysed);
            analysed
                .get(&shape)
                .filter(|s| !s.depends_on_constants)
                .or_else(|| analysed.get(sql))
                .cloned()
        };
        let statement = match known {
            Some(known) => known,
            None => {
                let mut statement = statement::analyze_normalized(
                    sql,
                    statement::normalize(sql),
                    standard_conforming_strings,
                );
                // Kept with the analysis: matching `tables`/`exclude` per sample was a third
                // of the proxy's work on a replay (callgrind).
                statement.covered = self.covers(&statement);
                let statement = Arc::new(statement);
                let key = if statement.depends_on_constants {
                    sql.to_string()
                } else {
                    shape
                };
                let mut analysed = lock(&self.analysed);
                if analysed.len() >= ANALYSED_KEPT {
                    analysed.clear();
                }
                analysed.insert(key, statement.clone());
                statement
            }
        };
        if matches!(statement.kind, Kind::Read { .. }) && statement::quotes_a_time_word(sql) {
            let mut this = (*statement).clone();
            this.kind = Kind::NotComparable("reads the time ('now', 'today', ...)".into());
            return Arc::new(this);
        }
        statement
    }

    /// Whether every table the statement reads is one `tables`/`exclude` select.
    fn covers(&self, statement: &Statement) -> bool {
        statement.tables.iter().all(|table| {
            let (schema, name) = match table.rsplit_once('.') {
                Some((schema, name)) => (schema, name),
                None => ("public", table.as_str()),
            };
            self.settings.covers(schema, name)
        })
    }

    /// This proxy's window.
    pub fn report(&self) -> api::Report {
        let state = lock(&self.state);
        let mut window = state.window.clone();
        window.start = humantime::format_rfc3339_seconds(state.start).to_string();
        let fingerprints = state
            .fingerprints
            .iter()
            .map(|(value, tally)| fingerprint(*value, tally))
            .collect();
        api::Report::judged(self.settings.thresholds(), window, fingerprints)
    }

    /// Starts a new window; answers the one that ends.
    pub fn reset(&self) -> api::Report {
        let report = self.report();
        *lock(&self.state) = WindowState::new();
        report
    }

    /// Fingerprints regressed in the window (for `/metrics`).
    pub fn regressions(&self) -> u64 {
        let thresholds = self.settings.thresholds();
        lock(&self.state)
            .fingerprints
            .values()
            .filter(|tally| tally.histograms.regressed(&thresholds))
            .count() as u64
    }
}

fn other_side(side: Side) -> Side {
    match side {
        Side::Source => Side::Target,
        Side::Target => Side::Source,
    }
}

/// One fingerprint's tally as the report shows it (its latency judged by the caller). The
/// hex form is pg_query's own.
fn fingerprint(value: u64, tally: &Tally) -> api::Fingerprint {
    api::Fingerprint {
        fingerprint: format!("{value:016x}"),
        query: tally.query.clone(),
        calls: tally.calls,
        divergences: tally.divergences,
        in_flight: tally.in_flight,
        unstable: tally.unstable,
        not_comparable: tally.not_comparable,
        regressed: false,
        latency: api::Latency::default(),
        example: tally.example.clone(),
        plans: tally.plans.clone(),
        histograms: tally.histograms.clone(),
    }
}
