//! The snapshot copy (`[sync] copy = "snapshot"`, the default): one consistent cut, the rows
//! copied in parallel page ranges, indexes built once after the data, and the subscription
//! streaming from exactly where the copy ends.
//!
//! 1. The publication exists first (pgoutput looks it up as of each change it decodes).
//! 2. The slot is created through the replication protocol, exporting its snapshot; an anchor
//!    transaction imports it and share-locks every copied table ([`snapshot`]).
//! 3. The schema's first part (types, tables, ...) is dumped in that snapshot and restored.
//! 4. `copy_workers` workers copy the chunks ([`plan`], [`worker`]), each marked done in the
//!    same target transaction as its rows ([`progress`]).
//! 5. Keys, indexes and constraints are built, `copy_workers` at a time; foreign keys are added
//!    `NOT VALID` and validated ([`foreign_keys`]).
//! 6. The subscription is created on the slot with `copy_data = false`, disabled, and enabled
//!    only now: an apply that ran earlier would skip updates to rows not yet copied.
//!
//! A coordinator that dies loses the snapshot (the anchor's transaction ends with it): the next
//! `sync` says so, drops what the attempt made (the subscription if any, the slot, the tables
//! it restored) and starts over.

pub mod foreign_keys;
/// The copy plan lives with the catalogs it reads, below `preflight`, which shows it.
pub use crate::pg::copy_plan as plan;
pub mod progress;
mod raw;
pub mod snapshot;
pub mod worker;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pg::{PgError, Server, Side, TableName};
use crate::plan::Plan;
use crate::preflight::Inspection;
use crate::replication;
use crate::state::{CopyRecord, State, StateStore, SyncStep};
use crate::Result;

use super::schema;
pub use progress::CopyProgress;

/// How often `sync` redraws the copy's progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Whether `sync` runs the snapshot copy now: nothing is streaming yet, or an earlier copy
/// did not finish.
pub fn needed(state: &State) -> bool {
    state.created.subscription.is_none() || state.created.copy.as_ref().is_some_and(|c| !c.done)
}

/// Runs the copy from the start (or finishes one whose subscription was made), through to an
/// enabled subscription.
pub async fn run(
    plan: &Plan,
    store: &dyn StateStore,
    state: &mut State,
    servers: &super::Servers,
    inspection: &Inspection,
    observe: &mut dyn FnMut(&CopyProgress),
) -> Result<()> {
    let super::Servers { source, target } = servers;
    let name = plan.replication_name();
    if state.created.copy.as_ref().is_some_and(|c| !c.done) {
        if state.created.subscription.is_some()
            && replication::subscription_oid(target, &name)
                .await?
                .is_some()
        {
            // Made only once every row and index was in: all that is left is to start it.
            return start_streaming(plan, store, state, target).await;
        }
        tracing::warn!("the earlier copy was interrupted: its snapshot ended with its coordinator, so the copy starts over from a new slot (dropping that run's slot and copied tables)");
        start_over(store, state, source, target, &name).await?;
    } else if let Some(record) = state.created.schema.clone() {
        // A schema kept by an earlier `abort`, or restored by a run that died before it
        // could record so: the copy takes its own from its snapshot.
        if record.restored || schema::was_restored(target, &record).await? {
            tracing::info!("dropping the schema an earlier run restored: the copy restores it again from its snapshot");
            drop_copied_tables(store, state, target, &record).await?;
        }
        state.created.schema = None;
    }

    if !replication::publication_exists(source, &name).await? {
        super::begin(state, store, SyncStep::Publication)?;
        replication::create_publication(source, &name, &inspection.selection).await?;
        state.created.publication = Some(name.clone());
        super::done(state, store, SyncStep::Publication)?;
    }

    super::begin(state, store, SyncStep::Copy)?;
    // Recorded before the slot exists: whatever happens next, `abort` or the next `sync`
    // knows to drop it.
    state.created.copy = Some(CopyRecord {
        slot: name.clone(),
        done: false,
    });
    store.save(state)?;
    tracing::info!("creating the slot on the source waits for transactions open there to end");
    let slot = crate::pg::slot_wait::report_while(
        Side::Source,
        &plan.source,
        snapshot::create_exported_slot(&plan.source, &name),
    )
    .await?;
    let leaves: Vec<TableName> = inspection
        .selection
        .leaves()
        .map(|t| t.name.clone())
        .collect();
    let anchor = snapshot::Anchor::hold(&plan.source, &slot, &leaves).await?;
    tracing::info!(consistent_point = %slot.consistent_point, "slot created; copying as of its snapshot");

    super::begin(state, store, SyncStep::Schema)?;
    let mut prepared =
        schema::prepare(inspection, &plan.source, target, Some(&anchor.snapshot)).await?;
    state.created.schema = Some(prepared.record.clone());
    store.save(state)?;
    schema::restore(&mut prepared, &plan.target, schema::Part::Tables).await?;
    state.created.schema = Some(prepared.record.clone());
    super::done(state, store, SyncStep::Schema)?;

    let workers = plan.sync.snapshot_workers();
    let copy_plan = Arc::new(
        plan::make(
            source,
            &inspection.selection,
            workers,
            plan.sync.copy_chunk_bytes,
        )
        .await?,
    );
    record_chunks(target, &copy_plan).await?;
    let shared = Arc::new(worker::Shared {
        plan: copy_plan.clone(),
        queue: Mutex::new(copy_plan.chunks.iter().cloned().collect()),
        counters: progress::Counters::new(&copy_plan),
        snapshot: anchor.snapshot.clone(),
    });
    tracing::info!(
        tables = copy_plan.tables.len(),
        chunks = copy_plan.chunks.len(),
        workers,
        bytes = copy_plan.bytes(),
        "copying rows"
    );
    let copied = copy_rows(plan, &shared, workers, observe).await;
    if let Err(e) = copied {
        if !anchor.alive() {
            return Err(PgError::Tool(format!("the source connection holding the copy's snapshot was lost ({e}); `switchyard sync` starts the copy over")).into());
        }
        return Err(e.into());
    }
    tracing::info!(elapsed = ?shared.counters.elapsed(), "rows copied");
    // The workers' retries ride out a target restart; this connection may not have.
    let target = &Server::connect(Side::Target, &plan.target).await?;

    set_phase(target, "building indexes").await?;
    observe(&shared.counters.snapshot(&copy_plan, "building indexes"));
    schema::restore(
        &mut prepared,
        &plan.target,
        schema::Part::AfterData { jobs: workers },
    )
    .await?;
    set_phase(target, "validating foreign keys").await?;
    observe(
        &shared
            .counters
            .snapshot(&copy_plan, "validating foreign keys"),
    );
    let names: Vec<TableName> = inspection.selection.names();
    let keys = foreign_keys::read(plan, &names).await?;
    foreign_keys::add(plan, &keys, workers).await?;
    tracing::info!(elapsed = ?shared.counters.elapsed(), "indexes and constraints built");
    observe(&shared.counters.snapshot(&copy_plan, "starting replication"));
    // The snapshot has served: let the source's vacuum go on.
    drop(anchor);
    drop(slot);

    super::begin(state, store, SyncStep::Subscription)?;
    let oid = replication::create_subscription_on_slot(
        target,
        &name,
        &crate::pg::peer_conninfo(&plan.source),
    )
    .await?;
    state.created.subscription = Some(super::subscription_record(target, &name, oid).await?);
    super::done(state, store, SyncStep::Subscription)?;
    start_streaming(plan, store, state, target).await
}

/// Enables the subscription, the copy's last step, and drops its bookkeeping.
async fn start_streaming(
    plan: &Plan,
    store: &dyn StateStore,
    state: &mut State,
    target: &Server,
) -> Result<()> {
    replication::set_enabled(target, &plan.replication_name(), true).await?;
    if let Some(copy) = state.created.copy.as_mut() {
        copy.done = true;
    }
    store.save(state)?;
    target
        .execute("drop the copy's bookkeeping", progress::DROP)
        .await?;
    super::done(state, store, SyncStep::Copy)
}

async fn set_phase(target: &Server, phase: &str) -> Result<(), PgError> {
    target
        .query("record the copy's phase", progress::SET_PHASE, &[&phase])
        .await
        .map(drop)
}

/// The chunks, as rows of the target's progress table.
async fn record_chunks(target: &Server, copy_plan: &plan::CopyPlan) -> Result<(), PgError> {
    target
        .execute("make the copy's bookkeeping", progress::DROP)
        .await?;
    target
        .execute("make the copy's bookkeeping", progress::CREATE)
        .await?;
    target
        .execute(
            "make the copy's bookkeeping",
            "INSERT INTO _switchyard_copy.run (phase) VALUES ('copying rows')",
        )
        .await?;
    for chunk in &copy_plan.chunks {
        let relation = copy_plan.tables[chunk.table].name.to_string();
        target
            .query(
                "record a chunk",
                progress::ADD_CHUNK,
                &[&relation, &(chunk.number as i32), &chunk.estimated_bytes],
            )
            .await?;
    }
    Ok(())
}

/// Runs the workers on the runtime's threads (the coordinator pipes every byte: one thread
/// would cap the copy) and reports progress until they end.
async fn copy_rows(
    plan: &Plan,
    shared: &Arc<worker::Shared>,
    workers: u32,
    observe: &mut dyn FnMut(&CopyProgress),
) -> std::result::Result<(), PgError> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (plan, shared) = (plan.clone(), shared.clone());
        tasks.spawn(async move { worker::run(&plan, &shared).await });
    }
    let mut every = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    // One worker gave up on a chunk: the others stop (dropping the set ends
                    // them); the next `sync` starts over.
                    return Err(e);
                }
                Some(Err(e)) => return Err(PgError::Tool(format!("a copy worker failed: {e}"))),
            },
            _ = every.tick() => observe(&shared.counters.snapshot(&shared.plan, "copying rows")),
        }
    }
    observe(&shared.counters.snapshot(&shared.plan, "copying rows"));
    Ok(())
}

/// Drops what an interrupted copy made: its subscription, its slot, the tables it restored.
async fn start_over(
    store: &dyn StateStore,
    state: &mut State,
    source: &Server,
    target: &Server,
    name: &str,
) -> Result<()> {
    replication::drop_subscription(target, name).await?;
    state.created.subscription = None;
    store.save(state)?;
    replication::drop_slots(source, name, None).await?;
    target
        .execute("drop the copy's bookkeeping", progress::DROP)
        .await?;
    if let Some(record) = state.created.schema.clone() {
        // The first part of the schema is restored in one transaction: all of it or none.
        if record.restored || schema::was_restored(target, &record).await? {
            drop_copied_tables(store, state, target, &record).await?;
        }
        state.created.schema = None;
    }
    state.created.copy = None;
    store.save(state)?;
    Ok(())
}

async fn drop_copied_tables(
    store: &dyn StateStore,
    state: &mut State,
    target: &Server,
    record: &crate::state::SchemaCopy,
) -> Result<()> {
    for statement in schema::drop_statements(record) {
        target
            .execute("drop the tables an earlier copy restored", &statement)
            .await?;
    }
    state.created.schema = None;
    store.save(state)?;
    Ok(())
}
