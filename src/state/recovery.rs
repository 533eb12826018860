//! What a command must do first when an earlier run stopped half-way: one pure function of
//! the state, used by every command that acts on a migration.

use super::{Direction, State, Step, SyncStep};

/// What an interrupted run (a crash, Ctrl-C, a lost connection) left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was interrupted.
    Nothing,
    /// A `sync` step stopped: `sync` runs it again (each step finds what exists and skips it).
    Sync(SyncStep),
    /// A cutover or rollback recorded its switch (the commit point) and stopped before it
    /// resumed every proxy and cleaned up: it must be finished, never undone.
    FinishSwitch(Direction),
    /// A cutover or rollback stopped before its commit point: the applications never moved,
    /// and what it did (fences, paused proxies, the way back) must be undone.
    UndoSwitch(Direction),
    /// `finalize` stopped: running it again carries on.
    Finalize,
    /// `abort` stopped: running it again carries on.
    Abort,
}

impl Recovery {
    /// The interrupted step, if any: also the command to run again (`sync` for its steps).
    pub fn step(self) -> Option<Step> {
        match self {
            Recovery::Nothing => None,
            Recovery::Sync(step) => Some(Step::Sync(step)),
            Recovery::FinishSwitch(direction) | Recovery::UndoSwitch(direction) => {
                Some(Step::Switch(direction))
            }
            Recovery::Finalize => Some(Step::Finalize),
            Recovery::Abort => Some(Step::Abort),
        }
    }

    /// A cutover or rollback is half-way, in either direction.
    pub fn switch(self) -> Option<Direction> {
        match self {
            Recovery::FinishSwitch(direction) | Recovery::UndoSwitch(direction) => Some(direction),
            _ => None,
        }
    }
}

/// Reads the log's last begun step that was never done, and for a switch whether its commit
/// point (the phase it records with the new epoch, in the same save) was reached.
pub fn recovery(state: &State) -> Recovery {
    match state.interrupted_step() {
        None => Recovery::Nothing,
        Some(Step::Sync(step)) => Recovery::Sync(step),
        Some(Step::Switch(direction)) if state.phase == direction.committed_phase() => {
            Recovery::FinishSwitch(direction)
        }
        Some(Step::Switch(direction)) => Recovery::UndoSwitch(direction),
        Some(Step::Finalize) => Recovery::Finalize,
        Some(Step::Abort) => Recovery::Abort,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::Side;
    use crate::state::{Event, Phase, Undone};

    /// Replays a command's log entries one by one (phase moves applied as they come) and
    /// gives the recovery a run stopped after each.
    fn stops(start: Phase, events: &[Event]) -> Vec<Recovery> {
        let mut state = State::new("shop");
        state.phase = start;
        events
            .iter()
            .map(|event| {
                if let Event::Phase { to, .. } = event {
                    state.phase = *to;
                }
                state.note(event.clone());
                recovery(&state)
            })
            .collect()
    }

    fn switch_events(direction: Direction, before: Phase) -> Vec<Event> {
        let step = Step::Switch(direction);
        vec![
            Event::Begin(step),
            Event::Fence(direction.from()),
            Event::ReverseRecorded,
            Event::Phase {
                from: before,
                to: direction.committed_phase(),
            },
            Event::Switch {
                to: direction.to(),
                epoch: 1,
            },
            Event::Unfence(direction.to()),
            Event::Done(step),
        ]
    }

    #[test]
    fn a_cutover_stopped_before_its_switch_is_undone_after_it_finished() {
        use Recovery::*;
        let d = Direction::Cutover;
        assert_eq!(
            stops(Phase::Synced, &switch_events(d, Phase::Synced)),
            [
                UndoSwitch(d),
                UndoSwitch(d),
                UndoSwitch(d),
                FinishSwitch(d),
                FinishSwitch(d),
                FinishSwitch(d),
                Nothing
            ]
        );
    }

    #[test]
    fn a_rollback_stopped_before_its_switch_is_undone_after_it_finished() {
        use Recovery::*;
        let d = Direction::Rollback;
        let mut events = switch_events(d, Phase::Switched);
        events.remove(2); // no way back is made by a rollback
        assert_eq!(
            stops(Phase::Switched, &events),
            [
                UndoSwitch(d),
                UndoSwitch(d),
                FinishSwitch(d),
                FinishSwitch(d),
                FinishSwitch(d),
                Nothing
            ]
        );
    }

    #[test]
    fn a_switch_that_undid_itself_leaves_nothing_to_do() {
        for how in [Undone::AfterFailure, Undone::AfterInterruption] {
            let step = Step::Switch(Direction::Cutover);
            let after = stops(
                Phase::Synced,
                &[
                    Event::Begin(step),
                    Event::Fence(Side::Source),
                    Event::Undone(step, how),
                ],
            );
            assert_eq!(after.last(), Some(&Recovery::Nothing));
        }
    }

    #[test]
    fn sync_finalize_and_abort_stopped_mid_step_are_run_again() {
        use Recovery::*;
        let mut events = vec![Event::Phase {
            from: Phase::Planned,
            to: Phase::Syncing,
        }];
        let mut expected = vec![Nothing];
        for step in SyncStep::ALL {
            events.push(Event::Begin(Step::Sync(step)));
            events.push(Event::Done(Step::Sync(step)));
            expected.extend([Sync(step), Nothing]);
        }
        assert_eq!(stops(Phase::Planned, &events), expected);

        let finalize = [
            Event::Begin(Step::Finalize),
            Event::Phase {
                from: Phase::Switched,
                to: Phase::Finished,
            },
            Event::Done(Step::Finalize),
        ];
        assert_eq!(
            stops(Phase::Switched, &finalize),
            [Finalize, Finalize, Nothing]
        );

        let abort = [
            Event::Begin(Step::Abort),
            Event::AbortIncomplete,
            Event::Begin(Step::Abort),
            Event::Phase {
                from: Phase::Syncing,
                to: Phase::Planned,
            },
            Event::Done(Step::Abort),
        ];
        assert_eq!(
            stops(Phase::Syncing, &abort),
            [Abort, Abort, Abort, Abort, Nothing]
        );
    }

    #[test]
    fn lines_this_release_does_not_know_do_not_hide_an_interrupted_step() {
        let step = Step::Switch(Direction::Cutover);
        let after = stops(
            Phase::Synced,
            &[
                Event::Begin(step),
                Event::Other("done something a newer release does".into()),
            ],
        );
        assert_eq!(
            after.last(),
            Some(&Recovery::UndoSwitch(Direction::Cutover))
        );
    }
}
