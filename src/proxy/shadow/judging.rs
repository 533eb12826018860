//! A replay's answer judged against the client's: compared (as sent first, then row by row),
//! a mismatch re-run once replication has caught up with what the primary's read saw, the
//! outcome tallied under the statement's fingerprint, and `EXPLAIN` kept for the first
//! divergence and regression.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::answer::{self, compare, Answer, Difference};
use super::replay::{self, Loan};
use super::replayer::{run_turns, Prepared, Replayed};
use super::statement::{self, Kind, Statement};
use super::{api, lock, other_side, Sample, Shadow, Tally, Turn};
use crate::pg::Side;

/// Re-runs of a mismatch before it is called unstable.
const RERUNS: usize = 3;

/// How long a re-run waits for the subscriber to confirm the primary's position.
const CONFIRM_WAIT: Duration = Duration::from_secs(10);

const CONFIRM_POLL: Duration = Duration::from_millis(20);

/// What became of one sample.
enum Outcome {
    Same,
    InFlight,
    Unstable,
    Diverged(Box<(Answer, Answer, Difference)>),
    /// A re-run could not run (a connection lost, `statement_timeout`): no verdict.
    Failed,
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
pub(super) fn stopped(code: &str) -> bool {
    code.starts_with("57") || code.starts_with("53") || code.starts_with("08") || code == "55P03"
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

async fn name_types(loan: &mut Loan<'_>, answer: &mut Answer) -> Result<(), replay::ReplayError> {
    let oids: Vec<u32> = answer.unnamed_types().collect();
    if !oids.is_empty() {
        let names = replay::type_names(loan, &oids).await?;
        answer.name_types(&names);
    }
    Ok(())
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

impl Shadow {
    /// A group's answers compared with the client's and tallied.
    pub(super) async fn judge_group(
        &self,
        group: Vec<Prepared>,
        answers: Vec<Option<Vec<Replayed>>>,
    ) {
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
}
