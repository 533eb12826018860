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
pub mod replay;
pub mod statement;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::admin_api::shadow as api;
use crate::pg::Side;
use crate::plan::ShadowSettings;
use answer::{compare, Answer, Difference};
use replay::{Connections, Loan};
use statement::{Control, Kind, Statement};

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Re-runs of a mismatch before it is called unstable.
const RERUNS: usize = 3;
/// How long a re-run waits for the subscriber to confirm the primary's position.
const CONFIRM_WAIT: Duration = Duration::from_secs(10);
const CONFIRM_POLL: Duration = Duration::from_millis(20);
/// Answers larger than this are not captured (the sample is dropped).
pub const MAX_CAPTURE: usize = 1 << 20;
/// Statements analysed are remembered by their text, up to this many.
const ANALYSED_KEPT: usize = 10_000;
/// Turns of a `READ ONLY` transaction captured, at most (a longer one is dropped).
pub const MAX_TURNS: usize = 64;
/// Samples taken from the queue at once, and sent to a shadow connection in one write
/// ([`replay::Loan::pipeline`]).
const MAX_BATCH: usize = 16;
/// How long the replayer may be on one batch before the helper takes what waits
/// ([`Shadow::help`]).
const HELP_AFTER: Duration = Duration::from_millis(20);

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

/// A replay's answer as the server sent it, and how long it took when that is known.
type Replayed = (Vec<u8>, Option<Duration>);

/// A sample that passed the look before its replay, with each turn's statement (`None` for
/// a transaction control, replayed and not compared).
struct Prepared {
    sample: Sample,
    statements: Vec<Option<Arc<Statement>>>,
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

/// What became of one sample.
enum Outcome {
    Same,
    InFlight,
    Unstable,
    Diverged(Box<(Answer, Answer, Difference)>),
    /// A re-run could not run (a connection lost, `statement_timeout`): no verdict.
    Failed,
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

    /// Runs the replays on the caller's scheduler: one replayer ([`Shadow::work`]), and a
    /// helper that steps in while it is held up ([`Shadow::help`]).
    pub async fn run(self: Arc<Self>) {
        if self.settings.pool_size > 1 {
            tokio::spawn(Box::pin(self.clone().help()));
        }
        self.work().await;
    }

    /// The replayer: waits for a sample, takes what else the queue holds (up to
    /// [`MAX_BATCH`]) and replays them together. Samples that arrive while it is busy wait
    /// in the queue and go out in its next write: at low load each sample alone, at once;
    /// under load, several per write, which is what makes a replay cheap for the other
    /// server (see [`replay::Loan::pipeline`]). In bench/shadow.sh (2 cores, `fraction =
    /// 0.1`) one replayer gave 0.937 of the throughput without shadow reads where two taking
    /// turns gave 0.876, and dropped fewer samples: with two, each sample went out alone.
    /// A timer that waited for more samples (1 ms) held the `max_in_flight` permits so long
    /// that half the draws were dropped.
    async fn work(self: Arc<Self>) {
        loop {
            let batch = {
                let mut inbox = self.inbox.lock().await;
                let Some(first) = inbox.recv().await else {
                    return;
                };
                take_more(&mut inbox, vec![first])
            };
            self.busy_since.store(since_start(), Ordering::Relaxed);
            self.replay(batch).await;
            self.busy_since.store(0, Ordering::Relaxed);
        }
    }

    /// The helper: every [`HELP_AFTER`], when the replayer has been on one batch longer than
    /// that (a slow statement on the other server, up to `statement_timeout`), takes what
    /// waits in the queue on another shadow connection, so that one slow read does not stop
    /// the sampling of all the others.
    async fn help(self: Arc<Self>) {
        loop {
            tokio::time::sleep(HELP_AFTER).await;
            let busy_since = self.busy_since.load(Ordering::Relaxed);
            if busy_since == 0 || since_start() - busy_since < HELP_AFTER.as_micros() as u64 {
                continue;
            }
            let batch = match self.inbox.try_lock() {
                Ok(mut inbox) => take_more(&mut inbox, Vec::new()),
                Err(_) => continue,
            };
            if !batch.is_empty() {
                self.replay(batch).await;
            }
        }
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

    /// Replays a batch: each sample looked at, then, per role, primary and settings, the
    /// single statements sent to the other server in one write and each transaction turn by
    /// turn, then every read compared and tallied.
    async fn replay(self: &Arc<Self>, batch: Vec<Sample>) {
        let mut groups: Vec<Vec<Prepared>> = Vec::new();
        for sample in batch {
            let Some(prepared) = self.prepare(sample) else {
                continue;
            };
            let sample = &prepared.sample;
            match groups.iter_mut().find(|group| {
                let first = &group[0].sample;
                first.user == sample.user
                    && first.primary == sample.primary
                    && first.settings == sample.settings
            }) {
                Some(group) => group.push(prepared),
                None => groups.push(vec![prepared]),
            }
        }
        for group in groups {
            let answers = self.run_group(&group).await;
            // Judged apart: a mismatch's re-runs wait for replication (up to CONFIRM_WAIT),
            // and the replayer goes back to the queue at once.
            let shadow = self.clone();
            tokio::spawn(Box::pin(
                async move { shadow.judge_group(group, answers).await },
            ));
        }
    }

    /// A group's answers compared with the client's and tallied.
    async fn judge_group(&self, group: Vec<Prepared>, answers: Vec<Option<Vec<Replayed>>>) {
        for (prepared, answers) in group.into_iter().zip(answers) {
            let Some(answers) = answers else {
                lock(&self.state).window.failed += 1;
                continue;
            };
            let Prepared { sample, statements } = prepared;
            for (turn, (statement, (shadow, elapsed))) in
                statements.into_iter().zip(answers).enumerate()
            {
                if let Some(statement) = statement {
                    self.judge(&sample, turn, &statement, &shadow, elapsed)
                        .await;
                }
            }
        }
    }

    /// The look before a replay: each turn's statement analysed, and the sample set aside
    /// (counted) when it is not a read, reads a table not covered, or was not answered.
    fn prepare(&self, sample: Sample) -> Option<Prepared> {
        let scs = sample.standard_conforming_strings;
        let mut statements = Vec::with_capacity(sample.turns.len());
        for (i, turn) in sample.turns.iter().enumerate() {
            let control = if sample.transaction {
                statement::transaction_control(&turn.sql, scs)
            } else {
                None
            };
            // A transaction is replayed only from its `BEGIN ... READ ONLY`.
            let opens_right =
                i > 0 || !sample.transaction || control == Some(Control::BeginReadOnly);
            let statement = match control {
                Some(_) => None,
                None => Some(self.analysed(&turn.sql, scs)),
            };
            if !opens_right
                || statement
                    .as_ref()
                    .is_some_and(|s| matches!(s.kind, Kind::NotARead(_)))
            {
                tracing::debug!(sql = %turn.sql, "a shadow sample that is not a read");
                lock(&self.state).window.not_a_read += 1;
                return None;
            }
            if statement.as_ref().is_some_and(|s| !s.covered) {
                return None;
            }
            if statement.is_some() && answer::error_code(&turn.answer).is_some_and(|c| stopped(&c))
            {
                // The client's own statement was canceled or timed out: nothing to compare.
                lock(&self.state).window.failed += 1;
                return None;
            }
            statements.push(statement);
        }
        Some(Prepared { sample, statements })
    }

    /// Runs a group of samples (one role, primary and settings) on the other server: the
    /// single statements in one write, each transaction turn by turn (each turn timed).
    /// Per sample, its answers, or `None` when it could not run.
    async fn run_group(&self, group: &[Prepared]) -> Vec<Option<Vec<Replayed>>> {
        let first = &group[0].sample;
        let other = other_side(first.primary);
        let mut answers: Vec<Option<Vec<Replayed>>> = (0..group.len()).map(|_| None).collect();
        let mut loan = match self
            .connections
            .take(&first.user, other, &first.settings)
            .await
        {
            Ok(loan) => loan,
            Err(e) => {
                tracing::debug!(error = %e.0, "a shadow read could not run");
                return answers;
            }
        };
        let singles: Vec<usize> = (0..group.len())
            .filter(|&i| !group[i].sample.transaction)
            .collect();
        if !singles.is_empty() {
            let frames: Vec<&[u8]> = singles
                .iter()
                .map(|&i| &group[i].sample.turns[0].frames[..])
                .collect();
            match loan.pipeline(&frames).await {
                Ok(done) => {
                    for (&i, answer) in singles.iter().zip(done) {
                        answers[i] = Some(vec![answer]);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e.0, "shadow reads could not run");
                    return answers;
                }
            }
        }
        for (i, prepared) in group.iter().enumerate() {
            if prepared.sample.transaction {
                answers[i] = run_turns(&mut loan, &prepared.sample).await.ok();
            }
        }
        answers
    }

    /// One read of a sample, its answer on the other server at hand: compared (re-run when
    /// it differs) and tallied under its fingerprint.
    async fn judge(
        &self,
        sample: &Sample,
        turn: usize,
        statement: &Statement,
        shadow: &[u8],
        shadow_elapsed: Option<Duration>,
    ) {
        match answer::error_code(shadow) {
            Some(code) if code == READ_ONLY => {
                lock(&self.state).window.not_a_read += 1;
                return;
            }
            Some(code) if stopped(&code) => {
                lock(&self.state).window.failed += 1;
                return;
            }
            _ => {}
        }
        let mut comparable = matches!(statement.kind, Kind::Read { .. });
        let verdict = match &statement.kind {
            Kind::Read { .. } if answer::same_as_sent(&sample.turns[turn].answer, shadow) => {
                Outcome::Same
            }
            Kind::Read { order, limited } => {
                let (client, shadow) = Box::pin(self.read_both(sample, turn, shadow)).await;
                let (old, new) = by_side(sample.primary, &client, &shadow);
                match compare(old, new, order, *limited) {
                    None => Outcome::Same,
                    Some(first) if first.undetermined => {
                        comparable = false;
                        Outcome::Same
                    }
                    // Boxed: the re-runs' future is large, and rare; inline it would enlarge
                    // (and be copied with) every replay's task.
                    Some(first) => Box::pin(self.rerun(sample, turn, order, *limited, first)).await,
                }
            }
            _ => Outcome::Same,
        };
        self.counters.samples.fetch_add(1, Ordering::Relaxed);
        let explain = {
            let mut state = lock(&self.state);
            let state = &mut *state;
            state.window.samples += 1;
            let tally = state
                .fingerprints
                .entry(statement.fingerprint)
                .or_insert_with(|| Tally {
                    query: statement.normalized.clone(),
                    calls: 0,
                    divergences: 0,
                    in_flight: 0,
                    unstable: 0,
                    not_comparable: 0,
                    histograms: api::Histograms::default(),
                    example: None,
                    plans: None,
                    explained: false,
                });
            tally.calls += 1;
            // Timed when the replay's time is known ([`replay::Loan::pipeline`]).
            if let Some(shadow_elapsed) = shadow_elapsed {
                let primary_elapsed = sample.turns[turn].elapsed;
                let (old_elapsed, new_elapsed) = match sample.primary {
                    Side::Source => (primary_elapsed, shadow_elapsed),
                    Side::Target => (shadow_elapsed, primary_elapsed),
                };
                tally.histograms.old.record(old_elapsed);
                tally.histograms.new.record(new_elapsed);
            }
            if !comparable {
                tally.not_comparable += 1;
                state.window.not_comparable += 1;
            }
            match verdict {
                Outcome::Same => {}
                Outcome::InFlight => {
                    tally.in_flight += 1;
                    state.window.in_flight += 1;
                }
                Outcome::Unstable => {
                    tally.unstable += 1;
                    state.window.unstable += 1;
                }
                Outcome::Failed => state.window.failed += 1,
                Outcome::Diverged(both) => {
                    let (old, new, difference) = *both;
                    self.counters.divergences.fetch_add(1, Ordering::Relaxed);
                    tally.divergences += 1;
                    state.window.divergences += 1;
                    if tally.example.is_none() {
                        tally.example = Some(example(&sample.turns[turn], &old, &new, &difference));
                    }
                }
            }
            // The p95s are read at min_samples calls, then at powers of two and every 64th
            // call: each read walks the buckets, and a regression shows over many calls.
            let (calls, min) = (tally.calls, self.settings.min_samples);
            let look = calls >= min && (calls == min || calls.is_power_of_two() || calls % 64 == 0);
            let explain = !tally.explained
                && (tally.divergences > 0
                    || (look && tally.histograms.regressed(&self.settings.thresholds())));
            tally.explained |= explain;
            explain
        };
        tracing::debug!(sql = %sample.turns[turn].sql, "shadow replay compared");
        if explain {
            Box::pin(self.explain(sample, turn, statement.fingerprint)).await;
        }
    }

    /// The client's answer and the replay's read into rows, their user-defined types named
    /// on their own servers.
    async fn read_both(&self, sample: &Sample, turn: usize, shadow: &[u8]) -> (Answer, Answer) {
        let mut answers = [
            Answer::read(&sample.turns[turn].answer),
            Answer::read(shadow),
        ];
        let sides = [sample.primary, other_side(sample.primary)];
        for (answer, side) in answers.iter_mut().zip(sides) {
            if answer.unnamed_types().next().is_some() {
                if let Ok(mut loan) = self
                    .connections
                    .take(&sample.user, side, &sample.settings)
                    .await
                {
                    let _ = name_types(&mut loan, answer).await;
                }
            }
        }
        let [client, shadow] = answers;
        (client, shadow)
    }

    /// A mismatch run again on both servers, each time once the subscriber has confirmed
    /// what the primary's run saw.
    async fn rerun(
        &self,
        sample: &Sample,
        turn: usize,
        order: &[statement::SortKey],
        limited: bool,
        first: Difference,
    ) -> Outcome {
        let other = other_side(sample.primary);
        let mut last = first;
        for _ in 0..RERUNS {
            let both = async {
                let on_primary = self.run_on(sample, turn, sample.primary).await?;
                // Taken after the primary's run: everything that run saw is before it.
                let mut primary = self
                    .connections
                    .take(&sample.user, sample.primary, &sample.settings)
                    .await?;
                let position = primary
                    .value("SELECT pg_current_wal_insert_lsn()::text")
                    .await?
                    .unwrap_or_default();
                self.wait_confirmed(&mut primary, sample.primary, &position)
                    .await?;
                drop(primary);
                let on_other = self.run_on(sample, turn, other).await?;
                Ok::<_, replay::ReplayError>((on_primary, on_other))
            }
            .await;
            let (on_primary, on_other) = match both {
                Ok((p, o)) if !could_not_run(&p) && !could_not_run(&o) => (p, o),
                _ => return Outcome::Failed,
            };
            let (old, new) = by_side(sample.primary, &on_primary, &on_other);
            match compare(old, new, order, limited) {
                None => return Outcome::InFlight,
                Some(again) if again.undetermined => return Outcome::InFlight,
                Some(again) if again == last => {
                    let (old, new) = (old.clone(), new.clone());
                    return Outcome::Diverged(Box::new((old, new, again)));
                }
                Some(again) => last = again,
            }
        }
        Outcome::Unstable
    }

    /// The sample run again on `side` with the client's settings (a transaction, whole):
    /// the answer of its turn `turn`, with user-defined types named.
    async fn run_on(
        &self,
        sample: &Sample,
        turn: usize,
        side: Side,
    ) -> Result<Answer, replay::ReplayError> {
        let mut loan = self
            .connections
            .take(&sample.user, side, &sample.settings)
            .await?;
        let mut answers = run_turns(&mut loan, sample).await?;
        if turn >= answers.len() {
            return Err(replay::ReplayError("a turn without its answer".into()));
        }
        let (messages, _) = answers.swap_remove(turn);
        let mut answer = Answer::read(&messages);
        name_types(&mut loan, &mut answer).await?;
        Ok(answer)
    }

    /// Waits until the slot that feeds the other server has confirmed `position` of the
    /// primary (at most [`CONFIRM_WAIT`]); at once when there is no such slot.
    async fn wait_confirmed(
        &self,
        primary: &mut Loan<'_>,
        side: Side,
        position: &str,
    ) -> Result<(), replay::ReplayError> {
        let slot = &self.slots[crate::proxy::side_index(side)];
        let sql = format!(
            "SELECT (SELECT (confirmed_flush_lsn >= {}::pg_lsn)::text FROM pg_replication_slots WHERE slot_name = {})",
            crate::pg::sql::literal(position),
            crate::pg::sql::literal(slot)
        );
        let started = Instant::now();
        loop {
            match primary.value(&sql).await?.as_deref() {
                Some("true") | None => return Ok(()),
                _ if started.elapsed() > CONFIRM_WAIT => return Ok(()),
                _ => tokio::time::sleep(CONFIRM_POLL).await,
            }
        }
    }

    /// `EXPLAIN` of the sample's turn `turn` on both servers, kept with its fingerprint.
    async fn explain(&self, sample: &Sample, turn: usize, fingerprint: u64) {
        let Some(frames) = replay::explain_frames(&sample.turns[turn].frames) else {
            return;
        };
        let mut plans = [String::new(), String::new()];
        for side in [Side::Source, Side::Target] {
            let plan = async {
                let mut loan = self
                    .connections
                    .take(&sample.user, side, &sample.settings)
                    .await?;
                let (answer, _) = loan.run(&frames).await?;
                Ok::<_, replay::ReplayError>(replay::plan_text(&answer))
            }
            .await;
            plans[crate::proxy::side_index(side)] =
                plan.unwrap_or_else(|e| format!("EXPLAIN could not run: {}", e.0));
        }
        let [old, new] = plans;
        if let Some(tally) = lock(&self.state).fingerprints.get_mut(&fingerprint) {
            tally.plans = Some(api::Plans { old, new });
        }
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

/// What else `inbox` holds, after `batch`, up to [`MAX_BATCH`].
fn take_more(inbox: &mut mpsc::UnboundedReceiver<Sample>, mut batch: Vec<Sample>) -> Vec<Sample> {
    while batch.len() < MAX_BATCH {
        match inbox.try_recv() {
            Ok(sample) => batch.push(sample),
            Err(_) => break,
        }
    }
    batch
}

/// Microseconds since the first call (never 0): the replayer's `busy_since`, where 0 says
/// "not busy".
fn since_start() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1
}

/// SQLSTATE `read_only_sql_transaction`: the replay tried to write.
const READ_ONLY: &str = "25006";

/// The replay was stopped, not answered: canceled or timed out (class 57), out of resources
/// (53), a lock not available (55P03), a connection problem (08). Not a divergence: the
/// statement did not get to answer.
fn could_not_run(answer: &Answer) -> bool {
    answer.error.as_ref().is_some_and(|(code, _)| stopped(code))
}

/// The same, of a SQLSTATE.
fn stopped(code: &str) -> bool {
    code.starts_with("57") || code.starts_with("53") || code.starts_with("08") || code == "55P03"
}

fn other_side(side: Side) -> Side {
    match side {
        Side::Source => Side::Target,
        Side::Target => Side::Source,
    }
}

/// (old, new): the source's answer first.
fn by_side<'a>(
    primary: Side,
    on_primary: &'a Answer,
    on_other: &'a Answer,
) -> (&'a Answer, &'a Answer) {
    match primary {
        Side::Source => (on_primary, on_other),
        Side::Target => (on_other, on_primary),
    }
}

/// A sample's turns run one after the other on `loan` (a transaction's turns wait for each
/// other's answers, as the client's did): their answers, each timed.
async fn run_turns(
    loan: &mut Loan<'_>,
    sample: &Sample,
) -> Result<Vec<Replayed>, replay::ReplayError> {
    let mut answers = Vec::with_capacity(sample.turns.len());
    for turn in &sample.turns {
        answers.extend(loan.pipeline(&[&turn.frames[..]]).await?);
    }
    Ok(answers)
}

async fn name_types(loan: &mut Loan<'_>, answer: &mut Answer) -> Result<(), replay::ReplayError> {
    let oids: Vec<u32> = answer.unnamed_types().collect();
    if !oids.is_empty() {
        let names = replay::type_names(loan, &oids).await?;
        answer.name_types(&names);
    }
    Ok(())
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

fn example(turn: &Turn, old: &Answer, new: &Answer, difference: &Difference) -> api::Example {
    api::Example {
        statement: turn.sql.clone(),
        parameters: replay::parameters(&turn.frames),
        reason: difference.reason.clone(),
        old: old.to_api(),
        new: new.to_api(),
        only_old: difference
            .only_old
            .iter()
            .take(api::Answer::ROWS_KEPT)
            .map(|row| old.row_text(row))
            .collect(),
        only_new: difference
            .only_new
            .iter()
            .take(api::Answer::ROWS_KEPT)
            .map(|row| new.row_text(row))
            .collect(),
    }
}
