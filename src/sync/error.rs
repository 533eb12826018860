//! Why `sync` refused or stopped: each case its own variant, with what to run next in its
//! message. All are refusals (exit 1): nothing is half-done by them.

use std::time::Duration;

use crate::state::Phase;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the migration is {0}: sync starts from a planned or syncing migration (after a rollback: `switchyard abort --drop-target-data` first)")]
    WrongPhase(Phase),
    #[error("an earlier `{}` was interrupted: run `switchyard {}` again to finish or undo it first", .0.name(), .0.name())]
    SwitchUnfinished(crate::state::Direction),
    #[error("the migration was aborted while sync waited")]
    AbortedMeanwhile,
    #[error("the target has no copied schema yet: run `switchyard sync` first")]
    NoSchemaYet,
    #[error("caught up, but the schema drifted:\n  {}\napply the fixes on the target (`switchyard status` prints them) and run `switchyard sync --wait` again", .0.join("\n  "))]
    Drifted(Vec<String>),
    #[error("subscription {0} is gone from the target (aborted meanwhile?); run `switchyard sync` to set it up again")]
    SubscriptionGone(String),
    /// What `status` reports as blocking (a lost slot, a table without its copy).
    #[error("{}", .0.join("; "))]
    Blocked(Vec<String>),
    #[error("subscription {name} on the target is disabled; enable it (ALTER SUBSCRIPTION {quoted} ENABLE) and run `switchyard sync --wait` again")]
    SubscriptionDisabled { name: String, quoted: String },
    #[error("replication keeps failing on the target: {0}; it retries on its own: fix the cause and run `switchyard sync --wait` again")]
    ApplyFailing(String),
    #[error("not caught up after {}: lag {lag} bytes, waiting for {waiting}{last_error}; replication goes on, run `switchyard sync --wait` again", humantime::format_duration(*.limit))]
    NotCaughtUp {
        limit: Duration,
        /// Bytes, or `unknown`.
        lag: String,
        /// The tables not streaming yet, or `the lag to fall`.
        waiting: String,
        /// `; last error on the target: ...`, or empty.
        last_error: String,
    },
    #[error("invalid indexes on the target: {}; run REINDEX INDEX CONCURRENTLY on each and then `switchyard sync --wait` again", .0.join(", "))]
    InvalidIndexes(Vec<String>),
}
