//! `switchyard abort`: removes the subscription, the slots and the publication, from any phase
//! before the switch and after a crash. Works by name as well as from the state, so it cleans
//! up after a run that died before it could record what it made. Each step runs even when an
//! earlier one failed; what could not be removed is reported with exit code 3.

use serde::Serialize;

use super::CutoverError;
use crate::pg::{sql, PgError, Server, Side};
use crate::plan::Plan;
use crate::replication;
use crate::state::{self, Created, Direction, Event, Phase, Recovery, StateStore, Step};
use crate::sync::schema;
use crate::{Error, Result};

#[derive(Debug, Default, Serialize)]
pub struct AbortReport {
    pub dropped_subscription: bool,
    pub dropped_slots: Vec<String>,
    pub dropped_publication: bool,
    pub dropped_target_objects: Vec<String>,
    pub dropped_roles: Vec<String>,
    /// Servers whose write grants were given back (after an interrupted cutover or a rollback).
    pub unfenced: Vec<String>,
    /// What could not be done, and why.
    pub left_behind: Vec<String>,
}

impl AbortReport {
    fn record<T: Default>(&mut self, what: &str, result: std::result::Result<T, PgError>) -> T {
        result.unwrap_or_else(|e| {
            self.left_behind.push(format!("{what}: {e}"));
            T::default()
        })
    }
}

pub async fn run(
    plan: &Plan,
    store: &dyn StateStore,
    drop_target_data: bool,
) -> Result<AbortReport> {
    let lock = store.lock("abort")?;
    let mut state = state::load_or_new(store, &plan.name.0)?;
    if state.phase == Phase::Switched {
        return Err(CutoverError::AbortAfterCutover.into());
    }
    if state.recovery() == Recovery::FinishSwitch(Direction::Rollback) {
        return Err(CutoverError::AbortMidRollback.into());
    }
    if state.phase == Phase::Finished {
        return Err(CutoverError::AbortFinished.into());
    }
    state.note(Event::Begin(Step::Abort));
    store.save(&mut state)?;
    let name = plan.replication_name();
    let mut report = AbortReport::default();

    let (target, source) = tokio::join!(
        Server::connect(Side::Target, &plan.target),
        Server::connect(Side::Source, &plan.source)
    );
    undo_switch(
        plan,
        lock.generation(),
        &mut state,
        &source,
        &target,
        &mut report,
    )
    .await;
    store.save(&mut state)?;
    let half_copied = state.created.copy.as_ref().is_some_and(|c| !c.done);
    let recorded = state.created.subscription.clone();
    let mut sync_slots = recorded
        .as_ref()
        .map(|s| replication::sync_slot_pattern(s.oid, s.target_system_id));
    match &target {
        Ok(target) => {
            if let Some(oid) = report.record(
                "look up the subscription",
                replication::subscription_oid(target, &name).await,
            ) {
                let system_id = report.record(
                    "read the target's system identifier",
                    replication::system_identifier(target).await.map(Some),
                );
                sync_slots = Some(replication::sync_slot_pattern(oid, system_id));
                // Saved before the drop: if the source cannot be reached now, a later abort
                // still knows which table-sync slots to look for.
                state.created.subscription = Some(crate::state::SubscriptionRecord {
                    name: name.clone(),
                    oid,
                    slot: name.clone(),
                    target_system_id: system_id,
                });
                store.save(&mut state)?;
            }
            report.dropped_subscription = report.record(
                "drop the subscription on the target",
                replication::drop_subscription(target, &name).await,
            );
        }
        Err(e) => report
            .left_behind
            .push(format!("subscription {name} on the target: {e}")),
    }
    match &source {
        Ok(source) => {
            report.dropped_slots = report.record(
                "drop the slots on the source",
                replication::drop_slots(source, &name, sync_slots.as_deref()).await,
            );
            report.dropped_publication = report.record(
                "drop the publication on the source",
                replication::drop_publication(source, &name).await,
            );
        }
        Err(e) => report
            .left_behind
            .push(format!("slot and publication {name} on the source: {e}")),
    }
    if plan.proxy.cache.is_some() {
        for side in [Side::Source, Side::Target] {
            if let Err(e) = crate::cache_setup::drop(plan, side).await {
                report.left_behind.push(format!(
                    "the read cache's slot, publication and event trigger on the {side}: {e}"
                ));
            }
        }
    }
    match &target {
        Ok(target) => {
            report.record(
                "restore max_sync_workers_per_subscription on the target",
                crate::sync::restore_copy_workers(target, &state.created).await,
            );
            report.record(
                "drop the copy's bookkeeping on the target",
                target
                    .execute(
                        "drop the copy's bookkeeping",
                        crate::sync::copy::progress::DROP,
                    )
                    .await,
            );
            if drop_target_data {
                drop_target_objects(target, &state.created, &mut report).await;
            } else if half_copied {
                // Tables the snapshot copy had not finished: half a table is of no use, and
                // the next `sync` copies them again from its own snapshot.
                for statement in copied_objects(target, &state.created, &mut report).await {
                    match target.execute("drop half-copied tables", &statement).await {
                        Ok(()) => report.dropped_target_objects.push(statement),
                        Err(e) => report.left_behind.push(format!("{statement}: {e}")),
                    }
                }
            }
        }
        Err(_) if drop_target_data => report
            .left_behind
            .push("the copied schema and data on the target".into()),
        Err(_) => {}
    }

    if !report.left_behind.is_empty() {
        state.note(Event::AbortIncomplete);
        store.save(&mut state)?;
        return Err(Error::NeedsOperator(format!(
            "abort could not finish:\n  {}\nfix the cause and run `switchyard abort` again; it carries on",
            report.left_behind.join("\n  ")
        )));
    }
    let kept = std::mem::take(&mut state.created);
    if !drop_target_data {
        // The target keeps its tables; remember them so a later `abort --drop-target-data`
        // can still remove them. `sync` refuses to copy into them from the planned phase.
        state.created = Created {
            roles: kept.roles,
            extensions: kept.extensions,
            extension_schemas: kept.extension_schemas,
            schema: kept.schema.filter(|_| !half_copied),
            ..Created::default()
        };
    }
    state.set_phase(Phase::Planned)?;
    state.note(Event::Done(Step::Abort));
    store.save(&mut state)?;
    Ok(report)
}

/// What a cutover or rollback left: fences (grants revoked on either server), the reverse
/// replication, paused proxies. Done first, so the applications can write again.
async fn undo_switch(
    plan: &Plan,
    generation: u64,
    state: &mut crate::state::State,
    source: &std::result::Result<Server, PgError>,
    target: &std::result::Result<Server, PgError>,
    report: &mut AbortReport,
) {
    for fence in std::mem::take(&mut state.fences) {
        let server = match fence.side {
            Side::Source => source,
            Side::Target => target,
        };
        let restored = match server {
            Ok(server) => super::fence::restore(server, &fence.grants).await,
            Err(e) => Err(PgError::Tool(e.to_string())),
        };
        match restored {
            Ok(()) => {
                report
                    .unfenced
                    .push(format!("{}: {} grants", fence.side, fence.grants.len()))
            }
            Err(e) => {
                report
                    .left_behind
                    .push(format!("the write grants on the {}: {e}", fence.side));
                state.fences.push(fence);
            }
        }
    }
    if let Some(name) = state.created.reverse.clone() {
        let dropped = match (source, target) {
            (Ok(source), Ok(target)) => replication::drop_reverse(source, target, &name).await,
            _ => Err(PgError::Tool("both servers must be reachable".into())),
        };
        match dropped {
            Ok(()) => state.created.reverse = None,
            Err(e) => report
                .left_behind
                .push(format!("the reverse replication {name}: {e}")),
        }
    }
    if let Ok(proxies) = super::proxies::from_plan(plan) {
        for proxy in proxies {
            let proxy = proxy.fenced_by(generation);
            // A proxy that does not answer resumes by itself at max_pause.
            let _ = proxy.resume().await;
        }
    }
}

/// Drops what sync made on the target: the schema copy's tables, the other objects it restored
/// into schemas that already existed and the schemas it created; then the extensions and their
/// schemas (after the tables, whose columns may use them), and the roles it created.
async fn drop_target_objects(target: &Server, created: &Created, report: &mut AbortReport) {
    let mut statements = copied_objects(target, created, report).await;
    // No CASCADE: whatever still uses an extension or sits in its schema now is not
    // switchyard's, so it is reported instead of dropped along.
    statements.extend(
        created
            .extensions
            .iter()
            .rev()
            .map(|e| format!("DROP EXTENSION IF EXISTS {}", sql::ident(e))),
    );
    statements.extend(
        created
            .extension_schemas
            .iter()
            .map(|s| format!("DROP SCHEMA IF EXISTS {}", sql::ident(s))),
    );
    for statement in statements {
        match target.execute("drop copied objects", &statement).await {
            Ok(()) => report.dropped_target_objects.push(statement),
            Err(e) => report.left_behind.push(format!("{statement}: {e}")),
        }
    }
    for role in created.roles.iter().rev() {
        let statement = format!("DROP ROLE IF EXISTS {}", sql::ident(role));
        match target.execute("drop a created role", &statement).await {
            Ok(()) => report.dropped_roles.push(role.clone()),
            Err(e) => report
                .left_behind
                .push(format!("role {role} on the target: {e}")),
        }
    }
}

/// The statements that drop what the schema copy made. Only a restore that committed made
/// anything: a failed one (one transaction) made nothing, and objects of the same names then
/// belong to someone else.
async fn copied_objects(
    target: &Server,
    created: &Created,
    report: &mut AbortReport,
) -> Vec<String> {
    let Some(schema) = &created.schema else {
        return Vec::new();
    };
    let restored = schema.restored
        || report.record(
            "check the restore",
            schema::was_restored(target, schema).await,
        );
    if !restored {
        return Vec::new();
    }
    schema::drop_statements(schema)
}
