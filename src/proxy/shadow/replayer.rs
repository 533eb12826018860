//! The replayer: samples taken from the queue, looked at, sent to the other server — what
//! queued up meanwhile in one write — and handed to [`super::judging`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::judging::stopped;
use super::replay::{self, Loan};
use super::statement::{self, Control, Kind, Statement};
use super::{answer, lock, other_side, Sample, Shadow};

/// Samples taken from the queue at once, and sent to a shadow connection in one write
/// ([`replay::Loan::pipeline`]).
const MAX_BATCH: usize = 16;

/// How long the replayer may be on one batch before the helper takes what waits
/// ([`Shadow::help`]).
const HELP_AFTER: Duration = Duration::from_millis(20);

/// A replay's answer as the server sent it, and how long it took when that is known.
pub(super) type Replayed = (Vec<u8>, Option<Duration>);

/// A sample that passed the look before its replay, with each turn's statement (`None` for
/// a transaction control, replayed and not compared).
pub(super) struct Prepared {
    pub(super) sample: Sample,
    pub(super) statements: Vec<Option<Arc<Statement>>>,
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

/// A sample's turns run one after the other on `loan` (a transaction's turns wait for each
/// other's answers, as the client's did): their answers, each timed.
pub(super) async fn run_turns(
    loan: &mut Loan<'_>,
    sample: &Sample,
) -> Result<Vec<Replayed>, replay::ReplayError> {
    let mut answers = Vec::with_capacity(sample.turns.len());
    for turn in &sample.turns {
        answers.extend(loan.pipeline(&[&turn.frames[..]]).await?);
    }
    Ok(answers)
}

impl Shadow {
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
}
