//! The switch record: which server the applications' transactions go to, and the epoch of the
//! switch that said so. Part of the migration's state (the coordinator writes it at the commit
//! point of a cutover or rollback); the proxy keeps a copy of its own and takes the higher
//! epoch of the two (`proxy::backend`).

use serde::{Deserialize, Serialize};

use crate::pg::Side;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    pub backend: Side,
    pub epoch: u64,
}

impl Default for Switch {
    fn default() -> Self {
        Switch {
            backend: Side::Source,
            epoch: 0,
        }
    }
}

/// Which way a switch moves the applications: a cutover (source → target) or a rollback
/// (target → source). Part of the state because a switch is recorded in the log and its
/// recovery depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Cutover,
    Rollback,
}

impl Direction {
    /// The primary before the switch.
    pub fn from(self) -> Side {
        match self {
            Direction::Cutover => Side::Source,
            Direction::Rollback => Side::Target,
        }
    }

    pub fn to(self) -> Side {
        match self {
            Direction::Cutover => Side::Target,
            Direction::Rollback => Side::Source,
        }
    }

    /// The command's name, as the log and the messages spell it.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Cutover => "cutover",
            Direction::Rollback => "rollback",
        }
    }

    /// The phase its commit point records.
    pub fn committed_phase(self) -> super::Phase {
        match self {
            Direction::Cutover => super::Phase::Switched,
            Direction::Rollback => super::Phase::RolledBack,
        }
    }
}
