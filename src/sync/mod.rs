//! `switchyard sync`: roles, schema, publication and subscription, then the wait until every
//! table streams. Every step is recorded in the state before and after it runs, and every step
//! first looks for what an earlier, interrupted run already made.

pub mod copy;
mod error;
pub mod roles;
pub mod schema;
pub mod sequences;
pub mod status;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::pg::{self, catalog, sql, Server, Side, TableName};
use crate::plan::{CopyMethod, Plan};
use crate::preflight::drift;
use crate::preflight::{self as checks, Inspection, Preflight};
use crate::replication;
use crate::state::{self, Event, Phase, State, StateStore, Step, SubscriptionRecord, SyncStep};
use crate::Result;
pub use error::SyncError;
pub use status::Status;

pub struct SyncOptions {
    /// Wait until every table streams and lag is below `max_lag_bytes`.
    pub wait: bool,
    /// Give up waiting after this long.
    pub timeout: Option<Duration>,
}

/// What `sync` reports while it works: the snapshot copy's progress, then replication's
/// status while it waits.
pub enum Observed<'a> {
    Copy(&'a copy::CopyProgress),
    Status(&'a Status),
}

pub enum SyncOutcome {
    /// Blocking findings: nothing was changed.
    Blocked(Box<Preflight>),
    /// Replication is set up; tables may still be copying.
    Started(Status),
    /// Every table streams, the target is analysed and its indexes are valid.
    Synced(Status),
}

/// Both servers, connected as the coordinator.
pub struct Servers {
    pub source: Server,
    pub target: Server,
}

impl Servers {
    pub async fn connect(plan: &Plan) -> Result<Servers> {
        let (source, target) = tokio::join!(
            Server::connect(Side::Source, &plan.source),
            Server::connect(Side::Target, &plan.target)
        );
        Ok(Servers {
            source: source?,
            target: target?,
        })
    }
}

/// Runs `sync`; `observe` is called with the copy's progress and each status read while
/// waiting.
pub async fn run(
    plan: &Plan,
    store: &dyn StateStore,
    options: &SyncOptions,
    observe: &mut dyn FnMut(Observed<'_>),
) -> Result<SyncOutcome> {
    let lock = store.lock("sync")?;
    let mut state = state::load_or_new(store, &plan.name.0)?;
    if matches!(
        state.phase,
        Phase::Switched | Phase::RolledBack | Phase::Finished
    ) {
        return Err(SyncError::WrongPhase(state.phase).into());
    }
    // A cutover stopped before its commit point leaves the source fenced and the proxies
    // resuming on it: it is undone by running it again, not built on by a sync.
    if let Some(direction) = state.recovery().switch() {
        return Err(SyncError::SwitchUnfinished(direction).into());
    }
    let servers = Servers::connect(plan).await?;
    let inspection = checks::inspect(plan, &servers.source, &servers.target, &state).await?;
    if inspection.report.blocked {
        return Ok(SyncOutcome::Blocked(Box::new(inspection.report)));
    }
    let next =
        "run `switchyard sync` again to carry on, or `switchyard abort` to remove what was created";
    if state.phase == Phase::Planned {
        // A schema kept by an earlier `abort` and dropped since by the operator is copied again.
        if let Some(record) = &state.created.schema {
            if !schema::was_restored(&servers.target, record).await? {
                state.created.schema = None;
            }
        }
        state.set_phase(Phase::Syncing)?;
        store.save(&mut state)?;
    }
    set_up(plan, store, &mut state, &servers, &inspection, observe)
        .await
        .map_err(|e| e.halfway(next))?;
    // A long copy may have outlived a server restart (its workers retry): read on anew.
    let servers = if servers.source.client.is_closed() || servers.target.client.is_closed() {
        Servers::connect(plan).await?
    } else {
        servers
    };
    if !options.wait {
        let status = status::read(plan, &state, &servers.source, &servers.target, false).await?;
        return Ok(SyncOutcome::Started(status));
    }
    // Waiting only reads: let `abort` or `status` act meanwhile, and take the lock back for
    // the last steps.
    drop(lock);
    let mut status =
        wait_until_caught_up(plan, store, &state, &servers, options.timeout, observe).await?;
    let _lock = store.lock("sync")?;
    let mut state = state::load_or_new(store, &plan.name.0)?;
    if state.phase == Phase::Planned {
        return Err(SyncError::AbortedMeanwhile.into());
    }
    finish(store, &mut state, &servers, &inspection)
        .await
        .map_err(|e| e.halfway(next))?;
    status.phase = state.phase;
    Ok(SyncOutcome::Synced(status))
}

fn begin(state: &mut State, store: &dyn StateStore, step: SyncStep) -> Result<()> {
    tracing::info!("{}", step.name());
    state.note(Event::Begin(Step::Sync(step)));
    Ok(store.save(state)?)
}

fn done(state: &mut State, store: &dyn StateStore, step: SyncStep) -> Result<()> {
    state.note(Event::Done(Step::Sync(step)));
    Ok(store.save(state)?)
}

async fn set_up(
    plan: &Plan,
    store: &dyn StateStore,
    state: &mut State,
    servers: &Servers,
    inspection: &Inspection,
    observe: &mut dyn FnMut(Observed<'_>),
) -> Result<()> {
    let Servers { source, target } = servers;
    let name = plan.replication_name();

    if !inspection.missing_roles.is_empty() {
        begin(state, store, SyncStep::Roles)?;
        for role in &inspection.missing_roles {
            // Recorded first: a role created by a run that then died is still dropped by
            // `abort --drop-target-data`, and only roles missing on the target get here.
            if !state.created.roles.contains(&role.name) {
                state.created.roles.push(role.name.clone());
                store.save(state)?;
            }
            roles::create(target, role).await?;
        }
        done(state, store, SyncStep::Roles)?;
    }

    if !inspection.missing_extensions.is_empty() {
        begin(state, store, SyncStep::Extensions)?;
        for (extension, schema) in &inspection.missing_extensions {
            let statement = format!("CREATE SCHEMA IF NOT EXISTS {s}; CREATE EXTENSION IF NOT EXISTS {e} WITH SCHEMA {s}", s = sql::ident(schema), e = sql::ident(extension));
            // Both recorded before they are made, like the roles: `abort --drop-target-data`
            // then removes what a run that died half-way made. A schema that exists already
            // is someone else's (or recorded by an earlier run) and is left alone.
            if !state.created.extension_schemas.contains(schema)
                && !catalog::schema_names(target).await?.contains(schema)
            {
                state.created.extension_schemas.push(schema.clone());
                store.save(state)?;
            }
            if !state.created.extensions.contains(extension) {
                state.created.extensions.push(extension.clone());
                store.save(state)?;
            }
            target
                .execute(&format!("create extension {extension}"), &statement)
                .await?;
        }
        done(state, store, SyncStep::Extensions)?;
    }

    if plan.sync.copy == CopyMethod::Snapshot && copy::needed(state) {
        return copy::run(plan, store, state, servers, inspection, &mut |progress| {
            observe(Observed::Copy(progress))
        })
        .await;
    }
    if plan.sync.copy == CopyMethod::Native && plan.sync.copy_workers.is_some() {
        set_copy_workers(plan, store, state, target).await?;
    }

    copy_schema(plan, store, state, target, inspection).await?;

    if !replication::publication_exists(source, &name).await? {
        begin(state, store, SyncStep::Publication)?;
        replication::create_publication(source, &name, &inspection.selection).await?;
        state.created.publication = Some(name.clone());
        done(state, store, SyncStep::Publication)?;
    }

    // Tables the plan selects but the publication or the subscription lacks: added to the
    // plan since the last run, or left out by a re-copy that did not finish.
    let roots: Vec<TableName> = inspection
        .selection
        .published()
        .iter()
        .map(|t| t.name.clone())
        .collect();
    let leaves: Vec<TableName> = inspection
        .selection
        .leaves()
        .map(|t| t.name.clone())
        .collect();
    let recopied =
        replication::reconcile_membership(source, target, &name, &roots, &leaves).await?;
    if !recopied.is_empty() {
        let names: Vec<String> = recopied.iter().map(ToString::to_string).collect();
        tracing::warn!(
            "the subscription lacked {}: copying them again",
            names.join(", ")
        );
        state.note(Event::CopyAgain(names));
        store.save(state)?;
    }

    if replication::subscription_oid(target, &name)
        .await?
        .is_none()
    {
        begin(state, store, SyncStep::Subscription)?;
        // A slot without its subscription is left from a run that died in between.
        if replication::slot_exists(source, &name).await? {
            replication::drop_slots(source, &name, None).await?;
        }
        tracing::info!("creating the slot on the source waits for transactions open there to end");
        let oid = replication::create_subscription(target, &name, &pg::peer_conninfo(&plan.source))
            .await?;
        state.created.subscription = Some(subscription_record(target, &name, oid).await?);
        done(state, store, SyncStep::Subscription)?;
    } else if let Some(oid) = replication::subscription_oid(target, &name).await? {
        // Made by a run that died before it could record it (Ctrl-C while CREATE SUBSCRIPTION
        // waited): record it now, so that abort finds its table-sync slots.
        if state.created.subscription.as_ref().map(|s| s.oid) != Some(oid) {
            state.created.subscription = Some(subscription_record(target, &name, oid).await?);
            store.save(state)?;
        }
    }
    Ok(())
}

/// What the state records of our subscription (its slot carries its name; the target's
/// system identifier names its table-sync slots).
async fn subscription_record(
    target: &Server,
    name: &str,
    oid: u32,
) -> Result<SubscriptionRecord, crate::pg::PgError> {
    Ok(SubscriptionRecord {
        name: name.to_string(),
        oid,
        slot: name.to_string(),
        target_system_id: Some(replication::system_identifier(target).await?),
    })
}

/// Restores the schema on the target, once: a restore that committed before the run died is
/// recognised, not repeated.
async fn copy_schema(
    plan: &Plan,
    store: &dyn StateStore,
    state: &mut State,
    target: &Server,
    inspection: &Inspection,
) -> Result<()> {
    if let Some(record) = state.created.schema.as_mut().filter(|r| !r.restored) {
        if schema::was_restored(target, record).await? {
            record.restored = true;
            done(state, store, SyncStep::Schema)?;
        }
    }
    if state.created.schema.as_ref().is_some_and(|r| r.restored) {
        return Ok(());
    }
    begin(state, store, SyncStep::Schema)?;
    let mut prepared = schema::prepare(inspection, &plan.source, target, None).await?;
    state.created.schema = Some(prepared.record.clone());
    store.save(state)?;
    schema::restore(&mut prepared, &plan.target, schema::Part::Whole).await?;
    tracing::info!(
        tables = prepared.record.tables.len(),
        "schema restored on the target"
    );
    state.created.schema = Some(prepared.record.clone());
    done(state, store, SyncStep::Schema)
}

/// Gives the target back the `max_sync_workers_per_subscription` that sync changed (abort and
/// finalize both end the migration's use of it).
pub async fn restore_copy_workers(
    target: &Server,
    created: &crate::state::Created,
) -> std::result::Result<(), crate::pg::PgError> {
    if let Some(original) = &created.original_sync_workers {
        let now =
            crate::pg::catalog::settings(target, &["max_sync_workers_per_subscription"]).await?;
        if now.get("max_sync_workers_per_subscription") == Some(original) {
            return Ok(());
        }
        target
            .set_system_setting("max_sync_workers_per_subscription", original)
            .await?;
    }
    Ok(())
}

/// Sets the target's table-copy parallelism, remembering the old value for `abort`.
async fn set_copy_workers(
    plan: &Plan,
    store: &dyn StateStore,
    state: &mut State,
    target: &Server,
) -> Result<()> {
    let current = catalog::settings(target, &["max_sync_workers_per_subscription"]).await?;
    let current = current
        .get("max_sync_workers_per_subscription")
        .cloned()
        .unwrap_or_default();
    let wanted = plan.sync.copy_workers.unwrap_or_default().to_string();
    if current == wanted {
        return Ok(());
    }
    if state.created.original_sync_workers.is_none() {
        state.created.original_sync_workers = Some(current);
        store.save(state)?;
    }
    // A value from the server's command line outranks ALTER SYSTEM.
    let source: String = target
        .query_one(
            "read where the setting comes from",
            "SELECT source FROM pg_settings WHERE name = 'max_sync_workers_per_subscription'",
            &[],
        )
        .await?
        .get(0);
    if source == "command line" {
        tracing::warn!("[sync] copy_workers is ignored: the target's max_sync_workers_per_subscription is set on its command line, which ALTER SYSTEM cannot override");
        return Ok(());
    }
    target
        .set_system_setting("max_sync_workers_per_subscription", &wanted)
        .await?;
    Ok(())
}

/// Copies sequence values from source to target now (`switchyard sync --sequences`).
pub async fn copy_sequences_now(
    plan: &Plan,
    store: &dyn StateStore,
) -> Result<Vec<sequences::SequenceCopy>> {
    let _lock = store.lock("sync --sequences")?;
    let state = state::load_or_new(store, &plan.name.0)?;
    if state.phase == Phase::Planned || !state.created.schema.as_ref().is_some_and(|s| s.restored) {
        return Err(SyncError::NoSchemaYet.into());
    }
    let servers = Servers::connect(plan).await?;
    let selection = catalog::select(plan, catalog::tables(&servers.source).await?);
    Ok(sequences::copy_sequences(&servers.source, &servers.target, &selection).await?)
}

/// Polls until every table streams and the lag is within `[sync] max_lag_bytes`.
pub async fn wait_until_caught_up(
    plan: &Plan,
    store: &dyn StateStore,
    state: &State,
    servers: &Servers,
    timeout: Option<Duration>,
    observe: &mut dyn FnMut(Observed<'_>),
) -> Result<Status> {
    let started = Instant::now();
    let mut errors_at_start = None;
    let mut disabled_polls = 0;
    let mut lost_copies: HashMap<String, u32> = HashMap::new();
    loop {
        let mut status = status::read(plan, state, &servers.source, &servers.target, false).await?;
        observe(Observed::Status(&status));
        recopy_lost_tables(plan, store, servers, &status, &mut lost_copies).await?;
        if status.caught_up(plan.sync.max_lag_bytes) {
            // The lag says nothing about DDL: look for drift once before calling it caught up.
            status.drift = drift::detect(plan, &servers.source, &servers.target).await?;
            status.blocking = status.blockers();
            if status.drift.is_empty() {
                return Ok(status);
            }
            return Err(SyncError::Drifted(status.blocking).into());
        }
        if status.subscription.is_none() {
            return Err(SyncError::SubscriptionGone(plan.replication_name()).into());
        }
        if status.slot_lost {
            return Err(SyncError::Blocked(status.blockers()).into());
        }
        // `abort` disables the subscription just before dropping it: one poll is not enough.
        disabled_polls = if status.enabled {
            0
        } else {
            disabled_polls + 1
        };
        if disabled_polls >= 2 {
            return Err(SyncError::SubscriptionDisabled {
                name: plan.replication_name(),
                quoted: sql::ident(&plan.replication_name()),
            }
            .into());
        }
        let errors = status.apply_errors + status.sync_errors;
        if errors >= *errors_at_start.get_or_insert(errors) + 3 {
            return Err(SyncError::ApplyFailing(
                status
                    .last_error
                    .unwrap_or_else(|| "see the target's server log".into()),
            )
            .into());
        }
        if let Some(limit) = timeout.filter(|&limit| started.elapsed() >= limit) {
            let pending: Vec<String> = status
                .tables
                .iter()
                .filter(|t| t.state != "streaming")
                .map(|t| format!("{} ({})", t.name, t.state))
                .collect();
            let error = status
                .last_error
                .map(|e| format!("; last error on the target: {e}"))
                .unwrap_or_default();
            return Err(SyncError::NotCaughtUp {
                limit,
                lag: status.lag_bytes.map_or("unknown".into(), |l| l.to_string()),
                waiting: if pending.is_empty() {
                    "the lag to fall".into()
                } else {
                    pending.join(", ")
                },
                last_error: error,
            }
            .into());
        }
        tokio::time::sleep(plan.sync.poll_interval.0).await;
    }
}

/// Copies again the tables whose table-sync slot is gone (see `TableStatus::sync_slot_lost`),
/// once the same state has been seen twice: PostgreSQL drops the slot a moment before it
/// records the copy as done, and one poll may fall in between.
async fn recopy_lost_tables(
    plan: &Plan,
    store: &dyn StateStore,
    servers: &Servers,
    status: &Status,
    seen: &mut HashMap<String, u32>,
) -> Result<()> {
    seen.retain(|name, _| {
        status
            .tables
            .iter()
            .any(|t| t.sync_slot_lost && &t.name == name)
    });
    for table in status.tables.iter().filter(|t| t.sync_slot_lost) {
        let count = seen.entry(table.name.clone()).or_insert(0);
        *count += 1;
        if *count < 2 {
            continue;
        }
        let Some(root) = &table.published_as else {
            continue;
        };
        // The wait runs without the lock; a re-copy changes things, so it takes the lock and
        // makes sure nobody aborted meanwhile.
        let _lock = store.lock("sync (copying a table again)")?;
        if state::load_or_new(store, &plan.name.0)?.phase == Phase::Planned {
            return Err(SyncError::AbortedMeanwhile.into());
        }
        tracing::warn!(table = %table.name, "the copy of this table lost its table-sync slot; copying {root} again");
        replication::recopy_table(
            &servers.source,
            &servers.target,
            &plan.replication_name(),
            root,
        )
        .await?;
        seen.remove(&table.name);
    }
    Ok(())
}

/// After the copy: ANALYZE the target's tables, check every index is valid, mark the phase.
async fn finish(
    store: &dyn StateStore,
    state: &mut State,
    servers: &Servers,
    inspection: &Inspection,
) -> Result<()> {
    let target = &servers.target;
    if state.phase != Phase::Synced {
        begin(state, store, SyncStep::Analyze)?;
        let tables: Vec<String> = inspection
            .selection
            .tables
            .iter()
            .map(|t| t.name.sql())
            .collect();
        target
            .execute(
                "analyze the target",
                &format!("ANALYZE {}", tables.join(", ")),
            )
            .await?;
        done(state, store, SyncStep::Analyze)?;
    }
    let invalid = invalid_indexes(target, &inspection.selection.schemas).await?;
    if !invalid.is_empty() {
        return Err(SyncError::InvalidIndexes(invalid).into());
    }
    state.set_phase(Phase::Synced)?;
    store.save(state)?;
    Ok(())
}

pub async fn invalid_indexes(target: &Server, schemas: &[String]) -> Result<Vec<String>> {
    let rows = target
        .query(
            "check indexes",
            "SELECT i.indexrelid::regclass::text FROM pg_index i
               JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = ANY ($1) AND NOT (i.indisvalid AND i.indisready)",
            &[&schemas],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Direction, Event, FileStore};
    use crate::Error;

    /// Before it connects anywhere: a cutover stopped half-way is finished or undone by
    /// running it again, and sync refuses to build on it.
    #[tokio::test]
    async fn sync_refuses_while_a_switch_is_half_way() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "name = \"shop\"\n[source]\nurl = \"postgres://postgres@127.0.0.1:1/shop\"\n\
             [target]\nurl = \"postgres://postgres@127.0.0.1:2/shop\"\n\
             [state]\npath = \"{}\"\n",
            dir.path().join("shop.json").display()
        );
        let plan = Plan::parse(&text, std::path::Path::new("shop.toml")).unwrap();
        let store = FileStore::new(plan.state_path());
        let mut state = State::new("shop");
        state.set_phase(Phase::Syncing).unwrap();
        state.set_phase(Phase::Synced).unwrap();
        state.note(Event::Begin(state::Step::Switch(Direction::Cutover)));
        store.save(&mut state).unwrap();
        let options = SyncOptions {
            wait: false,
            timeout: None,
        };
        let err = run(&plan, &store, &options, &mut |_| {})
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(
                err,
                Error::Sync(SyncError::SwitchUnfinished(Direction::Cutover))
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("run `switchyard cutover` again"),
            "{err}"
        );
    }
}
