//! Where a migration stands, and the one table of the moves between phases.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a migration stands. Transitions are recorded before and after each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Nothing created yet (or everything removed again by `abort`).
    Planned,
    /// Replication objects exist; tables are copying or streaming.
    Syncing,
    /// Every table streams, lag was below the limit, the target is analysed and its indexes valid.
    Synced,
    /// The cutover switched the applications: the target is primary, reverse replication
    /// keeps the source current for a rollback.
    Switched,
    /// A rollback switched the applications back: the source is primary again, the target is
    /// fenced and no longer replicated to.
    RolledBack,
    /// `finalize` removed everything switchyard made; the target is the primary for good.
    Finished,
}

/// Every move between phases, and the command that makes it. Anything else is refused
/// ([`Phase::check_move`]): a bug that would, say, mark a migration finished that never
/// switched stops there instead of reaching the state file.
const MOVES: &[(Phase, Phase, &str)] = &[
    (Phase::Planned, Phase::Syncing, "sync"),
    (Phase::Syncing, Phase::Synced, "sync"),
    (Phase::Syncing, Phase::Switched, "cutover"),
    (Phase::Synced, Phase::Switched, "cutover"),
    (Phase::Switched, Phase::RolledBack, "rollback"),
    (Phase::Switched, Phase::Finished, "finalize"),
    (Phase::Syncing, Phase::Planned, "abort"),
    (Phase::Synced, Phase::Planned, "abort"),
    (Phase::RolledBack, Phase::Planned, "abort"),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a migration cannot go from {from} to {to} (a bug in switchyard: the state is left as it was)"
)]
pub struct BadMove {
    pub from: Phase,
    pub to: Phase,
}

impl Phase {
    const ALL: [Phase; 6] = [
        Phase::Planned,
        Phase::Syncing,
        Phase::Synced,
        Phase::Switched,
        Phase::RolledBack,
        Phase::Finished,
    ];

    /// Staying is always allowed; a move must be in the table.
    pub fn check_move(self, to: Phase) -> Result<(), BadMove> {
        if self == to || MOVES.iter().any(|(a, b, _)| (*a, *b) == (self, to)) {
            Ok(())
        } else {
            Err(BadMove { from: self, to })
        }
    }

    fn name(self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::Syncing => "syncing",
            Phase::Synced => "synced",
            Phase::Switched => "switched",
            Phase::RolledBack => "rolled_back",
            Phase::Finished => "finished",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Phase {
    type Err = ();

    fn from_str(name: &str) -> Result<Phase, ()> {
        Phase::ALL.into_iter().find(|p| p.name() == name).ok_or(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_moves_in_the_table_are_allowed() {
        let allowed: Vec<(Phase, Phase)> = Phase::ALL
            .into_iter()
            .flat_map(|from| Phase::ALL.into_iter().map(move |to| (from, to)))
            .filter(|(from, to)| from != to && from.check_move(*to).is_ok())
            .collect();
        assert_eq!(allowed.len(), MOVES.len());
        // The ones a bug could most plausibly attempt.
        for (from, to) in [
            (Phase::Planned, Phase::Switched),
            (Phase::Synced, Phase::Finished),
            (Phase::RolledBack, Phase::Switched),
            (Phase::Switched, Phase::Planned),
            (Phase::Finished, Phase::Planned),
        ] {
            assert_eq!(from.check_move(to), Err(BadMove { from, to }));
        }
    }

    #[test]
    fn names_read_back() {
        for phase in Phase::ALL {
            assert_eq!(phase.to_string().parse(), Ok(phase));
        }
    }
}
