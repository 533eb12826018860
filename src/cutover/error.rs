//! Why a cutover, rollback, finalize or abort refused or was undone: each case its own
//! variant, with what to run next in its message. All are exit 1: nothing is left half-done
//! (what is, is `Error::NeedsOperator`, exit 3).

use std::time::Duration;

use crate::pg::Side;
use crate::state::{Direction, Phase, Step};

#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error("the migration is {phase}: {}", needs(*.direction))]
    WrongPhase { phase: Phase, direction: Direction },
    #[error("an earlier `{}` was interrupted: run it again without --dry-run to finish or undo it first", .0.name())]
    InterruptedBeforeDryRun(Direction),
    #[error("{} refused, nothing changed:\n  {}", .direction.name(), .failures.join("\n  "))]
    GatesNotMet {
        direction: Direction,
        failures: Vec<String>,
    },
    /// A proxy could not be reached, refused, or answered something else (the message names
    /// the proxy).
    #[error("{0}")]
    Proxy(String),
    #[error("the pause lasted {:.1} s before \"{step}\", past its budget of {:.1} s (max_pause {}, less a margin): the coordinator stalled or a step was slow; the proxies resume by themselves at max_pause, so nothing more is done in this pause", .elapsed.as_secs_f64(), .budget.as_secs_f64(), humantime::format_duration(*.max_pause))]
    PauseBudget {
        step: String,
        elapsed: Duration,
        budget: Duration,
        max_pause: Duration,
    },
    #[error("transactions still ran after drain_timeout ({}): {}; set [cutover] on_drain_timeout = \"cancel\" to end them", humantime::format_duration(*.drain), .running.join(", "))]
    StillRunning {
        drain: Duration,
        running: Vec<String>,
    },
    /// Failed before its commit point and undone cleanly.
    #[error("{} undone: {cause}\nthe applications run on the {from} again; {seen}", .direction.name())]
    Undone {
        direction: Direction,
        from: Side,
        cause: Box<crate::Error>,
        /// What the applications saw of the pause.
        seen: String,
    },
    #[error("the applications run on the target (after a cutover): `switchyard rollback` moves them back, `switchyard finalize` ends the migration there")]
    AbortAfterCutover,
    #[error("a rollback recorded its switch to the source and was interrupted: run `switchyard rollback` again to finish it first (abort now could leave proxies writing to the target)")]
    AbortMidRollback,
    #[error("the migration is finished: there is nothing to abort")]
    AbortFinished,
    #[error("the migration is {phase}{}: finalize follows a finished cutover", .unfinished.map(|s| format!(" with `{s}` unfinished (run it again first)")).unwrap_or_default())]
    FinalizeTooEarly {
        phase: Phase,
        unfinished: Option<Step>,
    },
}

fn needs(direction: Direction) -> &'static str {
    match direction {
        Direction::Cutover => "a cutover needs a synced migration: run `switchyard sync --wait`",
        Direction::Rollback => "a rollback needs a switched migration (after `switchyard cutover`)",
    }
}
