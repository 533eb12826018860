//! The step runners that move the applications between the servers and end a migration:
//! `cutover` (source → target, with replication turned around for the way back), `rollback`
//! (back again), `finalize` and `abort`.
//!
//! A switch has the same shape in both directions: checks and preparation outside the pause;
//! then pause the proxies, fence the old primary, wait until the new one has applied its last
//! change, copy the sequences, (cutover only) turn replication around, switch the proxies and
//! resume. The state is saved with the new epoch before the first proxy is switched: that is
//! the commit point. A failure before it is undone; after it, the switch is finished.

pub mod abort;
mod error;
pub mod fence;
pub mod gates;
pub mod proxies;
mod switch;

use std::time::Instant;

use serde::Serialize;

use crate::pg::{PgError, Server, Side};
use crate::plan::Plan;

pub use error::CutoverError;
pub use switch::{check, finalize, Checked, Finalized, Report};

pub use crate::state::Direction;

impl Direction {
    /// The server holding the subscription that feeds the new primary, and its name (also
    /// the name of the slot it reads on the old primary).
    fn feeding(self, plan: &Plan) -> (Side, String) {
        match self {
            Direction::Cutover => (Side::Target, plan.replication_name()),
            Direction::Rollback => (Side::Source, reverse_name(plan)),
        }
    }
}

/// The publication and slot on the target and the subscription on the source that carry the
/// writes made on the target back to the source.
pub fn reverse_name(plan: &Plan) -> String {
    plan.reverse_replication_name()
}

/// One step as it ran: printed as it finishes, and kept for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    pub ms: f64,
    pub outcome: String,
    pub in_pause: bool,
}

/// Times steps and hands each to the caller's printer as it finishes.
pub struct Steps<'a> {
    pub done: Vec<Step>,
    in_pause: bool,
    observe: &'a mut (dyn FnMut(&Step) + Send),
}

impl<'a> Steps<'a> {
    pub fn new(observe: &'a mut (dyn FnMut(&Step) + Send)) -> Steps<'a> {
        Steps {
            done: Vec::new(),
            in_pause: false,
            observe,
        }
    }

    /// Runs `work` as the step `name`; its `Ok` text or its error becomes the outcome.
    pub async fn run<T, E: std::fmt::Display>(
        &mut self,
        name: &str,
        work: impl std::future::Future<Output = Result<(T, String), E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = work.await;
        self.record(name, started, result)
    }

    /// [`Steps::run`] for work that does not wait on the network (saving the state).
    pub fn run_now<T, E: std::fmt::Display>(
        &mut self,
        name: &str,
        work: impl FnOnce() -> Result<(T, String), E>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = work();
        self.record(name, started, result)
    }

    fn record<T, E: std::fmt::Display>(
        &mut self,
        name: &str,
        started: Instant,
        result: Result<(T, String), E>,
    ) -> Result<T, E> {
        let outcome = match &result {
            Ok((_, text)) => text.clone(),
            Err(e) => format!("FAILED: {e}"),
        };
        let step = Step {
            name: name.to_string(),
            ms: started.elapsed().as_secs_f64() * 1000.0,
            outcome,
            in_pause: self.in_pause,
        };
        (self.observe)(&step);
        self.done.push(step);
        result.map(|(value, _)| value)
    }
}

/// `statement_timeout` and `lock_timeout` for the statements inside the pause: a lock held by
/// someone else must fail the step quickly, not stretch the pause. `synchronous_commit =
/// local`: the coordinator's own commits flush the WAL before them (see `catch_up`).
async fn set_pause_timeouts(server: &Server, plan: &Plan) -> Result<(), PgError> {
    let statement = plan.cutover.statement_timeout.0.as_millis().max(1);
    let lock = (statement / 5).max(1);
    server
        .execute(
            "set the pause's timeouts",
            &format!("SET statement_timeout = {statement}; SET lock_timeout = {lock}; SET synchronous_commit = local"),
        )
        .await
}

async fn reset_timeouts(server: &Server) {
    let _ = server
        .execute(
            "reset timeouts",
            "RESET statement_timeout; RESET lock_timeout; RESET synchronous_commit",
        )
        .await;
}

/// `ALTER SUBSCRIPTION name SET (synchronous_commit = value)` when it exists on `server`.
async fn set_subscription_commit(server: &Server, name: &str, value: &str) -> Result<(), PgError> {
    crate::replication::set_synchronous_commit(server, name, value).await
}
