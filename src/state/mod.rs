//! Migration state: the phase, every object switchyard created, and a log of every step, kept
//! in a [`StateStore`] so that a coordinator that died mid-step can be run again.

#[cfg(feature = "dynamodb")]
mod dynamo;
pub mod faults;
mod file;
mod lock;
mod log;
mod phase;
mod recovery;
mod switch;

use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

#[cfg(feature = "dynamodb")]
pub use dynamo::DynamoStore;
pub use file::FileStore;
pub use lock::{Held, Holder, LockGuard, LockInfo};
pub use log::{Event, LogEntry, Step, SyncStep, Undone};
pub use phase::{BadMove, Phase};
pub use recovery::{recovery, Recovery};
pub use switch::{Direction, Switch};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {action} state file {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("state file {path} is damaged ({source}); restore it from a backup or move it away")]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
    #[error("state file {path} belongs to migration {found:?}, not {expected:?}")]
    WrongMigration {
        path: String,
        found: String,
        expected: String,
    },
    #[error("another switchyard is working on this migration: {holder} (lock {path}); wait for it to finish, or stop it")]
    Locked { path: String, holder: String },
    #[error(transparent)]
    BadMove(#[from] BadMove),
    /// A state write or lock renewal refused because another coordinator holds the lock now.
    #[error("this command no longer holds the migration's lock in {store}: {holder} has it now; nothing was written. Look with `switchyard state show`, then run the command again")]
    LostLock { store: String, holder: String },
    /// The state store did not answer, or refused (permissions, a missing table).
    #[error("state store {store}: cannot {action}: {message}")]
    Store {
        store: String,
        action: &'static str,
        message: String,
    },
    #[error("the migration's state in {store} was moved to {to} by `switchyard state migrate`: set the plan's [state] backend to it")]
    Moved { store: String, to: String },
    /// The plan asks for a backend this build does not have.
    #[error("{0}")]
    Unsupported(String),
    /// A compare-and-set write lost: someone saved the state after this command read it.
    #[error("the state in {path} changed since this command read it (version {read}, now {found}): another switchyard wrote it; nothing was overwritten, run the command again")]
    Conflict { path: String, read: u64, found: u64 },
}

/// Objects switchyard created, so that `abort` removes exactly these and a re-run skips them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Created {
    /// Roles created on the target.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Extensions created on the target.
    #[serde(default)]
    pub extensions: Vec<String>,
    /// Schemas created on the target to hold those extensions (they did not exist before).
    #[serde(default)]
    pub extension_schemas: Vec<String>,
    /// The schema copy: recorded before the restore runs, marked `restored` once it committed.
    #[serde(default)]
    pub schema: Option<SchemaCopy>,
    /// Publication on the source.
    #[serde(default)]
    pub publication: Option<String>,
    /// Subscription on the target, with the slot it created on the source.
    #[serde(default)]
    pub subscription: Option<SubscriptionRecord>,
    /// The snapshot copy: recorded before its slot is made, `done` once its subscription is
    /// enabled. Not done at the start of a `sync`: the coordinator died mid-copy, and the
    /// copy starts over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyRecord>,
    /// The target's `max_sync_workers_per_subscription` before switchyard changed it.
    #[serde(default)]
    pub original_sync_workers: Option<String>,
    /// The way back, made by the cutover: publication and slot on the target, subscription on
    /// the source, all under this name.
    #[serde(default)]
    pub reverse: Option<String>,
}

/// Write grants a cutover or rollback revoked on one server, to be given back exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fence {
    pub side: crate::pg::Side,
    pub grants: Vec<Grant>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    /// Schema-qualified and quoted.
    pub table: String,
    /// Quoted, for a column grant.
    pub column: Option<String>,
    /// Quoted role name, or `PUBLIC`.
    pub grantee: String,
    pub privilege: String,
    pub grantable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaCopy {
    /// Schemas that did not exist on the target and were created by the restore.
    pub created_schemas: Vec<String>,
    /// Every table restored, schema-qualified and quoted.
    pub tables: Vec<String>,
    /// Other restored objects in schemas that already existed, as they follow `DROP`
    /// (`TYPE IF EXISTS "public"."mood"`, …), for
    /// `abort --drop-target-data`.
    #[serde(default)]
    pub other_objects: Vec<String>,
    /// False between the record being saved and the restore being confirmed.
    #[serde(default)]
    pub restored: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyRecord {
    /// The slot on the source, made with the copy's snapshot.
    pub slot: String,
    #[serde(default)]
    pub done: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    pub name: String,
    /// The target's OID of the subscription: table-sync slots on the source carry it.
    pub oid: u32,
    pub slot: String,
    /// The target's system identifier: table-sync slot names on the source end with it.
    #[serde(default)]
    pub target_system_id: Option<u64>,
}

/// The last validation run (`switchyard validate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationRecord {
    /// When it started (RFC 3339).
    pub at: String,
    /// `identical`, `different` or `incomplete`.
    pub verdict: String,
    pub source_lsn_start: String,
    pub source_lsn_end: String,
    pub tables: Vec<TableSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableSummary {
    pub name: String,
    pub rows_source: u64,
    pub rows_target: u64,
    pub missing: u64,
    pub extra: u64,
    pub changed: u64,
    pub in_flight: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// How many times it was saved: a save is a compare-and-set on it
    /// ([`StateStore::save`]). (Files of releases before it have none: version 0.)
    #[serde(default)]
    pub version: u64,
    pub name: String,
    pub phase: Phase,
    #[serde(default)]
    pub created: Created,
    #[serde(default)]
    pub last_validation: Option<ValidationRecord>,
    /// Where the proxies send transactions, and the epoch of the last switch.
    #[serde(default)]
    pub backend: Switch,
    /// Servers fenced now, with the grants that were revoked.
    #[serde(default)]
    pub fences: Vec<Fence>,
    #[serde(default)]
    pub log: Vec<LogEntry>,
    /// `switchyard state migrate` moved the migration to this store: this copy is kept for
    /// the record and refused as the migration's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
}

impl State {
    pub fn new(name: &str) -> State {
        State {
            format: 1,
            version: 0,
            name: name.to_string(),
            phase: Phase::Planned,
            created: Created::default(),
            last_validation: None,
            backend: Default::default(),
            fences: Vec::new(),
            log: Vec::new(),
            moved_to: None,
        }
    }

    pub fn note(&mut self, event: Event) {
        self.log.push(LogEntry {
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
        });
    }

    /// Moves to `phase` and logs it; a move not in the table ([`Phase::check_move`]) is
    /// refused and changes nothing.
    pub fn set_phase(&mut self, phase: Phase) -> Result<(), StateError> {
        self.phase.check_move(phase)?;
        if self.phase != phase {
            self.note(Event::Phase {
                from: self.phase,
                to: phase,
            });
            self.phase = phase;
        }
        Ok(())
    }

    pub fn fence(&self, side: crate::pg::Side) -> Option<&Fence> {
        self.fences.iter().find(|f| f.side == side)
    }

    /// The step that was begun and never recorded as done: a crash or Ctrl-C happened in it.
    pub fn interrupted_step(&self) -> Option<Step> {
        self.log
            .iter()
            .rev()
            .find_map(|e| e.event.step_boundary())
            .flatten()
    }

    /// What a command must do first about a run that stopped half-way ([`recovery`]).
    pub fn recovery(&self) -> Recovery {
        recovery(self)
    }
}

/// Keeps one migration's [`State`]. A file by default; later a shared backend for teams.
pub trait StateStore: Send + Sync {
    fn load(&self) -> Result<Option<State>, StateError>;
    /// Compare-and-set: writes `state` only if the stored state's version is still
    /// `state.version` (nothing stored counts as version 0), storing it as the next version
    /// and bumping `state.version` to match. A lost race is [`StateError::Conflict`] and
    /// overwrites nothing, so two writers cannot silently undo each other's records even if
    /// one of them runs without the lock.
    fn save(&self, state: &mut State) -> Result<(), StateError>;
    /// Takes the migration's lock, or says who holds it. The guard is the store's own (a
    /// lock file's `flock` here; a lease elsewhere): the lock is held until it is dropped.
    fn lock(&self, purpose: &str) -> Result<LockGuard, StateError>;
    /// Where the state lives, for messages.
    fn describe(&self) -> String;
    /// The lock as stored now, read consistently: what a proxy checks a control call's
    /// generation against, and what `state show` prints. `None`: never taken.
    fn lock_info(&self) -> Result<Option<LockInfo>, StateError>;
    /// Where the applications belong, as the state says: what proxies follow.
    fn switch(&self) -> Result<Option<Switch>, StateError> {
        Ok(self.load()?.map(|state| state.backend))
    }
    /// `state unlock --force`: frees a lock whose holder is gone, by the same rule as a
    /// waiting coordinator's takeover, so a live holder is never broken. Returns the holder
    /// it freed the lock from, if it was held.
    fn force_unlock(&self) -> Result<Option<Holder>, StateError>;
    /// Each action the store needs, tried without changing anything: `(action, problem)`.
    fn probe(&self) -> Vec<(&'static str, Option<String>)>;
}

/// Opens the store the plan's `[state]` names.
pub fn open(plan: &crate::plan::Plan) -> Result<Box<dyn StateStore>, StateError> {
    match plan.state.backend {
        crate::plan::StateBackend::File => Ok(Box::new(FileStore::new(plan.state_path()))),
        #[cfg(feature = "dynamodb")]
        crate::plan::StateBackend::Dynamodb => Ok(Box::new(DynamoStore::open(plan)?)),
        #[cfg(not(feature = "dynamodb"))]
        crate::plan::StateBackend::Dynamodb => Err(StateError::Unsupported(format!(
            "{}: [state] backend = \"dynamodb\" needs a switchyard built with the `dynamodb` feature (on by default)",
            plan.path.display()
        ))),
    }
}

/// Takes the state's lock, waiting up to `wait` for another command that holds it (a
/// cutover's steps, `sync` saving its progress) to let go.
pub async fn lock_within(
    store: &dyn StateStore,
    purpose: &str,
    wait: Duration,
) -> Result<LockGuard, StateError> {
    let deadline = Instant::now() + wait;
    loop {
        match store.lock(purpose) {
            Err(StateError::Locked { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            taken => return taken,
        }
    }
}

/// Loads the state or starts a new one for `name`.
pub fn load_or_new(store: &dyn StateStore, name: &str) -> Result<State, StateError> {
    match store.load()? {
        Some(State {
            moved_to: Some(to), ..
        }) => Err(StateError::Moved {
            store: store.describe(),
            to,
        }),
        Some(state) if state.name != name => Err(StateError::WrongMigration {
            path: store.describe(),
            found: state.name,
            expected: name.to_string(),
        }),
        Some(state) => Ok(state),
        None => Ok(State::new(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_step_is_detected() {
        let mut state = State::new("shop");
        assert_eq!(state.interrupted_step(), None);
        state.note(Event::Begin(Step::Sync(SyncStep::Schema)));
        assert_eq!(state.interrupted_step(), Some(Step::Sync(SyncStep::Schema)));
        state.note(Event::Done(Step::Sync(SyncStep::Schema)));
        assert_eq!(state.interrupted_step(), None);
    }

    #[test]
    fn phase_changes_are_logged() {
        let mut state = State::new("shop");
        state.set_phase(Phase::Syncing).unwrap();
        state.set_phase(Phase::Syncing).unwrap();
        assert_eq!(state.log.len(), 1);
        assert_eq!(state.log[0].event.to_string(), "phase planned -> syncing");
    }

    #[test]
    fn a_move_not_in_the_table_changes_nothing() {
        let mut state = State::new("shop");
        let err = state.set_phase(Phase::Finished).unwrap_err().to_string();
        assert!(err.contains("from planned to finished"), "{err}");
        assert_eq!(state.phase, Phase::Planned);
        assert!(state.log.is_empty());
    }
}
