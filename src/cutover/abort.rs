//! `switchyard abort`: removes the subscription, the slots and the publication, from any phase
//! before the switch and after a crash. Works by name as well as from the state, so it cleans
//! up after a run that died before it could record what it made.

use serde::Serialize;

use crate::pg::{sql, Server, Side};
use crate::plan::Plan;
use crate::state::{self, Created, Phase, StateStore};
use crate::sync::replication;
use crate::{Error, Result};

#[derive(Debug, Default, Serialize)]
pub struct AbortReport {
    pub dropped_subscription: bool,
    pub dropped_slots: Vec<String>,
    pub dropped_publication: bool,
    pub dropped_target_objects: Vec<String>,
    pub dropped_roles: Vec<String>,
    /// What could not be done, with what to run.
    pub left_behind: Vec<String>,
}

pub async fn run(
    plan: &Plan,
    store: &dyn StateStore,
    drop_target_data: bool,
) -> Result<AbortReport> {
    let _lock = store.lock("abort")?;
    let mut state = state::load_or_new(store, &plan.name.0)?;
    state.note("begin abort");
    store.save(&state)?;
    let name = plan.replication_name();
    let mut report = AbortReport::default();

    let target = Server::connect(Side::Target, &plan.target).await;
    let source = Server::connect(Side::Source, &plan.source).await;

    let mut sub_oid = state.created.subscription.as_ref().map(|s| s.oid);
    match &target {
        Ok(target) => {
            if let Some(oid) = replication::subscription_oid(target, &name).await? {
                sub_oid = Some(oid);
            }
            report.dropped_subscription = replication::drop_subscription(target, &name).await?;
            restore_copy_workers(target, &state.created).await?;
        }
        Err(e) => report
            .left_behind
            .push(format!("subscription {name} on the target ({e})")),
    }
    match &source {
        Ok(source) => {
            report.dropped_slots = replication::drop_slots(source, &name, sub_oid).await?;
            report.dropped_publication = replication::drop_publication(source, &name).await?;
        }
        Err(e) => report
            .left_behind
            .push(format!("slot and publication {name} on the source ({e})")),
    }
    if drop_target_data {
        match &target {
            Ok(target) => drop_target_objects(target, &state.created, &mut report).await?,
            Err(_) => report
                .left_behind
                .push("the copied schema and data on the target".into()),
        }
    }

    if !report.left_behind.is_empty() {
        state.note("abort incomplete");
        store.save(&state)?;
        return Err(Error::NeedsOperator(format!(
            "abort could not remove: {}; run `switchyard abort` again once both servers are reachable",
            report.left_behind.join("; ")
        )));
    }
    let kept = std::mem::take(&mut state.created);
    if !drop_target_data {
        // The target keeps its tables; remember them so a later `abort --drop-target-data`
        // can still remove them. `sync` refuses to copy into them from the planned phase.
        state.created = Created {
            roles: kept.roles,
            extensions: kept.extensions,
            schema: kept.schema,
            ..Created::default()
        };
    }
    state.set_phase(Phase::Planned);
    state.note("done abort");
    store.save(&state)?;
    Ok(report)
}

async fn restore_copy_workers(target: &Server, created: &Created) -> Result<()> {
    if let Some(original) = &created.original_sync_workers {
        let statement = format!(
            "ALTER SYSTEM SET max_sync_workers_per_subscription = {}; SELECT pg_reload_conf()",
            sql::literal(original)
        );
        target
            .execute("restore max_sync_workers_per_subscription", &statement)
            .await?;
    }
    Ok(())
}

/// Drops what the schema copy made on the target: its tables, the other objects it restored
/// into schemas that already existed, the schemas it created, and the roles it created.
async fn drop_target_objects(
    target: &Server,
    created: &Created,
    report: &mut AbortReport,
) -> Result<()> {
    let Some(schema) = &created.schema else {
        return Ok(());
    };
    let mut statements: Vec<String> = schema
        .tables
        .iter()
        .map(|t| format!("DROP TABLE IF EXISTS {t} CASCADE"))
        .collect();
    statements.extend(
        schema
            .other_objects
            .iter()
            .map(|o| format!("DROP {o} CASCADE")),
    );
    statements.extend(
        schema
            .created_schemas
            .iter()
            .map(|s| format!("DROP SCHEMA IF EXISTS {} CASCADE", sql::ident(s))),
    );
    for statement in statements {
        target.execute("drop copied objects", &statement).await?;
        report.dropped_target_objects.push(statement);
    }
    for role in created.roles.iter().rev() {
        let statement = format!("DROP ROLE IF EXISTS {}", sql::ident(role));
        match target.execute("drop a created role", &statement).await {
            Ok(()) => report.dropped_roles.push(role.clone()),
            // 2BP01: the role still owns or may use something switchyard did not create.
            Err(e) if e.code() == Some("2BP01") => report
                .left_behind
                .push(format!("role {role} on the target ({e})")),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
