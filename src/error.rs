//! The crate's top-level error and the exit codes every subcommand shares.

use crate::pg::PgError;
use crate::plan::PlanError;
use crate::state::StateError;

/// 0 = done; 1 = refused or cleanly undone; 2 = usage, plan or connection error;
/// 3 = stopped half-way, an operator must look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Done = 0,
    Refused = 1,
    Usage = 2,
    NeedsOperator = 3,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Pg(#[from] PgError),
    /// A long-running service (the proxy) could not start or run: its own error, kept as the
    /// source. The library's layers do not depend on the proxy; the CLI wraps its error here.
    #[error(transparent)]
    Service(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    #[error(transparent)]
    Validate(#[from] crate::validate::ValidateError),
    #[error(transparent)]
    Cutover(#[from] crate::cutover::CutoverError),
    /// Blocking findings, a gate not met, a step that failed and was undone.
    #[error("{0}")]
    Refused(String),
    /// Something is half-done; the message says what to run next.
    #[error("{0}")]
    NeedsOperator(String),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Plan(_) => Exit::Usage,
            Error::State(StateError::Locked { .. } | StateError::Conflict { .. }) => Exit::Refused,
            // Fenced mid-command: whatever it was doing stopped half-way.
            Error::State(StateError::LostLock { .. }) => Exit::NeedsOperator,
            Error::State(_) => Exit::Usage,
            Error::Pg(_) => Exit::Usage,
            Error::Service(_) => Exit::Usage,
            Error::Refused(_) | Error::Sync(_) | Error::Validate(_) | Error::Cutover(_) => {
                Exit::Refused
            }
            Error::NeedsOperator(_) => Exit::NeedsOperator,
        }
    }

    /// Turns a failure in the middle of a resumable command into "an operator must look",
    /// telling them what to run next.
    pub fn halfway(self, next: &str) -> Error {
        match self {
            Error::Pg(PgError::Connect { .. })
            | Error::Refused(_)
            | Error::Sync(_)
            | Error::Validate(_)
            | Error::Cutover(_)
            | Error::NeedsOperator(_)
            | Error::State(
                StateError::Locked { .. }
                | StateError::Conflict { .. }
                | StateError::LostLock { .. },
            ) => self,
            other => Error::NeedsOperator(format!("{other}\nnothing is lost: {next}")),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
