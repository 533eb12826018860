//! The migration's log: what each command began, finished, switched and fenced, typed.
//!
//! Each entry is stored as the line of text it has always been (`"begin cutover"`,
//! `"switch to the target (epoch 3)"`), so state files written by earlier releases load, and
//! a person reading the file sees sentences. Recovery reads the typed [`Event`]s, never the
//! words: rewording a line is a change to [`Event`]'s `Display` and `FromStr`, checked by the
//! round-trip tests below.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{Direction, Phase};
use crate::pg::Side;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When (RFC 3339, milliseconds).
    pub at: String,
    pub event: Event,
}

/// A step a command begins and finishes, recorded before and after so that a run that
/// stopped in between is found ([`super::State::interrupted_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Sync(SyncStep),
    /// A cutover or a rollback.
    Switch(Direction),
    Finalize,
    Abort,
}

/// The steps of `sync`, each one done at most once and skipped when it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncStep {
    Roles,
    Extensions,
    Schema,
    Publication,
    Subscription,
    /// The snapshot copy: slot, rows, indexes, then the subscription.
    Copy,
    Analyze,
}

impl SyncStep {
    pub(crate) const ALL: [SyncStep; 7] = [
        SyncStep::Roles,
        SyncStep::Extensions,
        SyncStep::Schema,
        SyncStep::Publication,
        SyncStep::Subscription,
        SyncStep::Copy,
        SyncStep::Analyze,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SyncStep::Roles => "roles",
            SyncStep::Extensions => "extensions",
            SyncStep::Schema => "schema",
            SyncStep::Publication => "publication",
            SyncStep::Subscription => "subscription",
            SyncStep::Copy => "copy",
            SyncStep::Analyze => "analyze",
        }
    }
}

impl Step {
    /// The name in the log, which is also the command to run again for a switch, finalize
    /// and abort (`sync` for its steps).
    pub fn name(self) -> &'static str {
        match self {
            Step::Sync(step) => step.name(),
            Step::Switch(direction) => direction.name(),
            Step::Finalize => "finalize",
            Step::Abort => "abort",
        }
    }

    fn from_name(name: &str) -> Option<Step> {
        match name {
            "cutover" => Some(Step::Switch(Direction::Cutover)),
            "rollback" => Some(Step::Switch(Direction::Rollback)),
            "finalize" => Some(Step::Finalize),
            "abort" => Some(Step::Abort),
            other => SyncStep::ALL
                .into_iter()
                .find(|step| step.name() == other)
                .map(Step::Sync),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How an unfinished switch ended without finishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undone {
    /// It failed before its commit point and undid itself.
    AfterFailure,
    /// A later run found it interrupted before its commit point and undid it.
    AfterInterruption,
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Begin(Step),
    Done(Step),
    /// A switch that did not reach its commit point, undone: it counts as ended.
    Undone(Step, Undone),
    Phase {
        from: Phase,
        to: Phase,
    },
    /// The commit point of a cutover or rollback.
    Switch {
        to: Side,
        epoch: u64,
    },
    /// Write grants revoked on a server (the grants are in the state's fences).
    Fence(Side),
    Unfence(Side),
    /// The way back (reverse publication, slot, subscription) is in the state.
    ReverseRecorded,
    /// Tables whose copy `sync` started again.
    CopyAgain(Vec<String>),
    /// A validation run's verdict.
    Validation(String),
    /// `abort` could not remove everything; running it again carries on.
    AbortIncomplete,
    /// A line this release does not know (a newer release wrote it): kept as it is, and
    /// never taken as the beginning or end of a step.
    Other(String),
}

impl Event {
    /// Whether this entry begins a step (`Some(Some(step))`) or ends one (`Some(None)`).
    pub fn step_boundary(&self) -> Option<Option<Step>> {
        match self {
            Event::Begin(step) => Some(Some(*step)),
            Event::Done(_) | Event::Undone(..) => Some(None),
            _ => None,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Begin(step) => write!(f, "begin {step}"),
            Event::Done(step) => write!(f, "done {step}"),
            Event::Undone(step, Undone::AfterFailure) => write!(f, "done {step} (undone)"),
            Event::Undone(step, Undone::AfterInterruption) => {
                write!(f, "done {step} (undone after an interruption)")
            }
            Event::Phase { from, to } => write!(f, "phase {from} -> {to}"),
            Event::Switch { to, epoch } => write!(f, "switch to the {to} (epoch {epoch})"),
            Event::Fence(side) => write!(f, "fence the {side}"),
            Event::Unfence(side) => write!(f, "unfence the {side}"),
            Event::ReverseRecorded => f.write_str("reverse replication recorded"),
            Event::CopyAgain(tables) => write!(f, "copy again {}", tables.join(", ")),
            Event::Validation(verdict) => write!(f, "validation: {verdict}"),
            Event::AbortIncomplete => f.write_str("abort incomplete"),
            Event::Other(text) => f.write_str(text),
        }
    }
}

impl FromStr for Event {
    type Err = std::convert::Infallible;

    /// Never fails: a line it does not know is [`Event::Other`].
    fn from_str(line: &str) -> Result<Event, Self::Err> {
        Ok(parse(line).unwrap_or_else(|| Event::Other(line.to_string())))
    }
}

fn parse(line: &str) -> Option<Event> {
    if let Some(name) = line.strip_prefix("begin ") {
        return Step::from_name(name).map(Event::Begin);
    }
    if let Some(rest) = line.strip_prefix("done ") {
        let (name, undone) = match rest.split_once(' ') {
            None => (rest, None),
            Some((name, "(undone)")) => (name, Some(Undone::AfterFailure)),
            Some((name, "(undone after an interruption)")) => {
                (name, Some(Undone::AfterInterruption))
            }
            Some(_) => return None,
        };
        let step = Step::from_name(name)?;
        return Some(match undone {
            None => Event::Done(step),
            Some(how) => Event::Undone(step, how),
        });
    }
    if let Some(rest) = line.strip_prefix("phase ") {
        let (from, to) = rest.split_once(" -> ")?;
        return Some(Event::Phase {
            from: from.parse().ok()?,
            to: to.parse().ok()?,
        });
    }
    if let Some(rest) = line.strip_prefix("switch to the ") {
        let (side, epoch) = rest.split_once(" (epoch ")?;
        return Some(Event::Switch {
            to: side_named(side)?,
            epoch: epoch.strip_suffix(')')?.parse().ok()?,
        });
    }
    if let Some(side) = line.strip_prefix("fence the ") {
        return side_named(side).map(Event::Fence);
    }
    if let Some(side) = line.strip_prefix("unfence the ") {
        return side_named(side).map(Event::Unfence);
    }
    if let Some(tables) = line.strip_prefix("copy again ") {
        return Some(Event::CopyAgain(
            tables.split(", ").map(str::to_string).collect(),
        ));
    }
    if let Some(verdict) = line.strip_prefix("validation: ") {
        return Some(Event::Validation(verdict.to_string()));
    }
    match line {
        "reverse replication recorded" => Some(Event::ReverseRecorded),
        "abort incomplete" => Some(Event::AbortIncomplete),
        _ => None,
    }
}

fn side_named(name: &str) -> Option<Side> {
    match name {
        "source" => Some(Side::Source),
        "target" => Some(Side::Target),
        _ => None,
    }
}

// Stored as its line of text: the JSON of a state file is what it has always been.
impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Event, D::Error> {
        let line = String::deserialize(deserializer)?;
        Ok(line.parse().unwrap_or_else(|never| match never {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of line, as the releases before the typed log wrote it.
    const LINES: &[&str] = &[
        "begin roles",
        "done roles",
        "begin extensions",
        "done extensions",
        "begin schema",
        "done schema",
        "begin publication",
        "done publication",
        "begin subscription",
        "done subscription",
        "begin analyze",
        "done analyze",
        "begin cutover",
        "done cutover",
        "done cutover (undone)",
        "done cutover (undone after an interruption)",
        "begin rollback",
        "done rollback",
        "done rollback (undone)",
        "done rollback (undone after an interruption)",
        "begin finalize",
        "done finalize",
        "begin abort",
        "done abort",
        "abort incomplete",
        "phase planned -> syncing",
        "phase syncing -> synced",
        "phase synced -> switched",
        "phase switched -> rolled_back",
        "phase switched -> finished",
        "phase rolled_back -> planned",
        "switch to the target (epoch 1)",
        "switch to the source (epoch 12)",
        "fence the source",
        "fence the target",
        "unfence the source",
        "unfence the target",
        "reverse replication recorded",
        "copy again \"public\".\"a\", \"public\".\"b\"",
        "validation: identical",
    ];

    #[test]
    fn every_line_an_earlier_release_wrote_is_read_typed_and_written_back_the_same() {
        for line in LINES {
            let event: Event = line.parse().unwrap_or_else(|never| match never {});
            assert!(
                !matches!(event, Event::Other(_)),
                "{line:?} was not recognised"
            );
            assert_eq!(event.to_string(), *line);
        }
    }

    #[test]
    fn an_unknown_line_is_kept_and_is_no_step() {
        for line in [
            "begin something new",
            "done cutover (half)",
            "switch to the moon (epoch 1)",
            "phase syncing -> nowhere",
        ] {
            let event: Event = line.parse().unwrap_or_else(|never| match never {});
            assert_eq!(event, Event::Other(line.to_string()));
            assert_eq!(event.step_boundary(), None);
            assert_eq!(event.to_string(), line);
        }
    }

    #[test]
    fn entries_are_stored_as_their_lines() {
        let entry = LogEntry {
            at: "2026-12-06T10:00:00.000Z".into(),
            event: Event::Switch {
                to: Side::Target,
                epoch: 3,
            },
        };
        let json = serde_json::to_string(&entry).unwrap();
        assert_eq!(
            json,
            r#"{"at":"2026-12-06T10:00:00.000Z","event":"switch to the target (epoch 3)"}"#
        );
        assert_eq!(serde_json::from_str::<LogEntry>(&json).unwrap(), entry);
    }
}
