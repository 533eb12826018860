//! `switchyard finalize`: the way back dropped once the operator is sure.

use super::*;

/// What `finalize` did.
#[derive(Debug, Default)]
pub struct Finalized {
    /// One line per step, for the operator.
    pub done: Vec<String>,
    /// The source keeps its write grants revoked (finalize without `--unfence`).
    pub source_fenced: bool,
    /// An earlier finalize had finished it all: this run changed nothing.
    pub already_finished: bool,
}

/// `switchyard finalize`: drops the reverse replication and what is left of the forward one,
/// gives the target its table-copy setting back, and forgets the source's fence (giving the
/// grants back with `unfence`). Every step is idempotent, so a finalize that stopped half-way
/// is carried on by the next one instead of blocking it.
pub async fn finalize(plan: &Plan, store: &dyn StateStore, unfence: bool) -> Result<Finalized> {
    let _lock = store.lock("finalize")?;
    let mut state = state::load_or_new(store, &plan.name.0)?;
    if state.phase == Phase::Finished {
        return Ok(Finalized {
            already_finished: true,
            ..Finalized::default()
        });
    }
    let other_unfinished = state
        .recovery()
        .step()
        .filter(|step| *step != state::Step::Finalize);
    if state.phase != Phase::Switched || other_unfinished.is_some() {
        return Err(CutoverError::FinalizeTooEarly {
            phase: state.phase,
            unfinished: other_unfinished,
        }
        .into());
    }
    state.note(Event::Begin(state::Step::Finalize));
    store.save(&mut state)?;
    let (source, target) = tokio::join!(
        Server::connect(Side::Source, &plan.source),
        Server::connect(Side::Target, &plan.target)
    );
    let (source, target) = (source?, target?);
    finalize_steps(plan, store, &mut state, &source, &target, unfence)
        .await
        .map_err(|e| {
            e.halfway("run `switchyard finalize` again (with the same --unfence choice): it carries on where this run stopped")
        })
}

/// The work of `finalize`, each step recorded as soon as it is done.
pub(super) async fn finalize_steps(
    plan: &Plan,
    store: &dyn StateStore,
    state: &mut State,
    source: &Server,
    target: &Server,
    unfence: bool,
) -> Result<Finalized> {
    let mut report = Finalized::default();
    let reverse = reverse_name(plan);
    replication::drop_reverse(source, target, &reverse).await?;
    state.created.reverse = None;
    store.save(state)?;
    report
        .done
        .push(format!("dropped the reverse replication {reverse}"));
    let forward = plan.replication_name();
    replication::drop_slots(source, &forward, None).await?;
    if replication::drop_publication(source, &forward).await? {
        report
            .done
            .push(format!("dropped the publication {forward} on the source"));
    }
    state.created.publication = None;
    store.save(state)?;
    if let Some(original) = state.created.original_sync_workers.clone() {
        crate::sync::restore_copy_workers(target, &state.created).await?;
        state.created.original_sync_workers = None;
        store.save(state)?;
        report.done.push(format!(
            "set the target's max_sync_workers_per_subscription back to {original}"
        ));
    }
    if plan.proxy.cache.is_some() {
        // The proxies' read cache ends with the migration: its slots, publications and event
        // triggers go from both servers (the running consumer is ended).
        for side in [Side::Source, Side::Target] {
            let done = crate::cache_setup::drop(plan, side).await.map_err(|e| {
                PgError::Tool(format!("drop the read cache's objects on the {side}: {e}"))
            })?;
            report
                .done
                .push(format!("read cache on the {side}: {}", done.join("; ")));
        }
    }
    // Last, so that a run stopped before it still finds the fence recorded.
    if let Some(fence) = state.fence(Side::Source).cloned() {
        if unfence {
            fence::restore(source, &fence.grants).await?;
            report.done.push(format!(
                "gave the source its {} write grants back",
                fence.grants.len()
            ));
        } else {
            report.source_fenced = true;
            report.done.push(format!("the source stays fenced: no role but the coordinator's can write the migrated tables ({} revoked grants are forgotten now; GRANT them by hand if the source must take writes again)", fence.grants.len()));
        }
    }
    state.fences.clear();
    state.created = Default::default();
    state.set_phase(Phase::Finished)?;
    state.note(Event::Done(state::Step::Finalize));
    store.save(state)?;
    Ok(report)
}
