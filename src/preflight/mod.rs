//! `switchyard plan`: everything that would make the migration fail, found before anything is
//! changed, and the steps `sync` would run. [`inspect`] runs the checks, which live by subject:
//! `servers` (versions, tools, capacity, encoding, disk, open transactions), `roles` (the roles
//! that log in, the coordinator's, the fence), `tables` (what is selected) and `target` (what
//! is already there); `report` holds what they find.
//!
//! A module of its own, beside `sync`, rather than in `pg`: a re-run reads the migration's
//! state and asks `sync` about its slots and the schema's drift.

use std::collections::{BTreeSet, HashMap};

use crate::output::human_bytes;
use crate::pg::catalog::{self, RoleInfo, Selection, TableInfo};
use crate::pg::copy_plan::CopyPlan;
use crate::pg::{sql, tools, PgError, Server, TableName};
use crate::plan::Plan;
use crate::state::{Phase, State};

pub mod drift;
mod report;
mod roles;
mod servers;
mod tables;
mod target;

use report::{planned_steps, server_report, Checker};
pub use report::{Finding, Preflight, ServerReport, Severity, Step, TableReport, UnfenceableRole};
use roles::*;
use servers::*;
use tables::*;
use target::*;

/// The preflight report and what `sync` needs from the inspection.
pub struct Inspection {
    pub report: Preflight,
    pub selection: Selection,
    /// Roles to create on the target, in an order that creates members after their groups.
    pub missing_roles: Vec<RoleInfo>,
    /// `(extension, schema)` pairs to create on the target.
    pub missing_extensions: Vec<(String, String)>,
    pub pg_dump: std::path::PathBuf,
    pub pg_restore: std::path::PathBuf,
}

const SOURCE_SETTINGS: &[&str] = &[
    "server_version",
    "wal_level",
    "max_replication_slots",
    "max_wal_senders",
    "max_slot_wal_keep_size",
];

const TARGET_SETTINGS: &[&str] = &[
    "server_version",
    "max_logical_replication_workers",
    "max_sync_workers_per_subscription",
    "max_worker_processes",
    "max_replication_slots",
    "max_active_replication_origins",
];

/// Inspects both servers; changes nothing on either.
pub async fn inspect(
    plan: &Plan,
    source: &Server,
    target: &Server,
    state: &State,
) -> Result<Inspection, PgError> {
    let mut c = Checker {
        findings: Vec::new(),
    };
    let mut src_settings = catalog::settings(source, SOURCE_SETTINGS).await?;
    let mut tgt_settings = catalog::settings(target, TARGET_SETTINGS).await?;
    src_settings.extend(database_locale(source).await?);
    tgt_settings.extend(database_locale(target).await?);
    let ours = plan.replication_name();

    check_versions(&mut c, source, target);
    let (pg_dump, pg_restore) = check_tools(&mut c, source);
    check_proxy_users(&mut c, plan);
    check_superuser(&mut c, source).await?;
    check_superuser(&mut c, target).await?;
    // The native copy's table syncs each take a slot, a sender and an origin; the snapshot
    // copy takes one slot and sender for the stream, plus one connection per worker.
    let copy_workers = match (plan.sync.copy, plan.sync.copy_workers) {
        (crate::plan::CopyMethod::Snapshot, _) => 0,
        (crate::plan::CopyMethod::Native, Some(workers)) => i64::from(workers),
        (crate::plan::CopyMethod::Native, None) => {
            setting_i64(&tgt_settings, "max_sync_workers_per_subscription").max(1)
        }
    };
    // A re-run must not count this migration's own slots and senders against it.
    let resuming = state.phase != Phase::Planned;
    let own_sync_slots = state
        .created
        .subscription
        .as_ref()
        .filter(|_| resuming)
        .map_or_else(
            || "-".to_string(),
            |s| crate::replication::sync_slot_pattern(s.oid, s.target_system_id),
        );
    check_source_capacity(
        &mut c,
        source,
        &src_settings,
        [&ours, &own_sync_slots],
        copy_workers,
    )
    .await?;
    check_target_capacity(&mut c, target, &tgt_settings, &ours, copy_workers).await?;
    check_encoding(&mut c, &src_settings, &tgt_settings);
    if plan.proxy.cache.is_some() {
        check_cache(&mut c, source, &src_settings, &tgt_settings, plan).await?;
    }

    let selection = catalog::select(plan, catalog::tables(source).await?);
    let total_bytes: i64 = selection.leaves().map(|t| t.bytes).sum();
    let source_disk = free_disk_bytes(source).await;
    let target_disk = free_disk_bytes(target).await;
    // Once copying, the target's free space already reflects what was copied.
    check_disk(
        &mut c,
        &src_settings,
        source_disk,
        target_disk.filter(|_| !resuming),
        total_bytes,
    );

    let copy = copy_plan(&mut c, plan, source, &selection).await?;
    check_selection(&mut c, &selection);
    let on_target = check_target_tables(&mut c, target, &selection, state).await?;
    check_large_objects(&mut c, source, &selection).await?;
    check_references_outside(&mut c, source, &selection).await?;
    check_long_transactions(&mut c, source).await?;
    let restored = state.created.schema.as_ref().is_some_and(|s| s.restored);
    if resuming && restored {
        for drift in crate::preflight::drift::detect(plan, source, target).await? {
            if drift.kind == "not_subscribed" {
                // `sync` puts such tables back in the subscription and copies them again.
                let message = format!("{}; sync copies it again", drift.detail);
                c.add(Severity::Info, "not_subscribed", drift.table, message, None);
            } else {
                c.add(
                    Severity::Block,
                    "schema_drift",
                    drift.table,
                    drift.detail,
                    Some(drift.fix),
                );
            }
        }
    } else if !(resuming && state.created.schema.is_some()) {
        // Only before this migration restored anything: afterwards the names are its own.
        check_name_clashes(&mut c, source, target, &selection).await?;
    }
    let sequences = catalog::sequences(source, &selection).await?;

    let missing_extensions = check_extensions(&mut c, source, target).await?;
    let (roles, verifiers_readable) = catalog::roles(source, &selection).await?;
    let target_roles = catalog::role_names(target).await?;
    let missing_roles: Vec<RoleInfo> = order_roles(
        roles
            .into_iter()
            .filter(|r| !target_roles.contains(&r.name))
            .collect(),
    );
    if !missing_roles.is_empty() && !verifiers_readable {
        c.add(
            Severity::Warn,
            "password_verifiers_unreadable",
            "source",
            "the coordinator cannot read pg_authid, so roles are created on the target without passwords",
            Some("set each created role's password on the target with ALTER ROLE ... PASSWORD before the cutover".into()),
        );
    }
    let unfenceable_roles = unfenceable_roles(source, &selection).await?;
    for role in &unfenceable_roles {
        c.add(
            Severity::Warn,
            "unfenceable_role",
            &role.role,
            format!("the cutover cannot stop this role from writing to the source ({})", role.reasons.join(", ")),
            Some("do not let applications log in as this role; give them a plain role through the proxy".into()),
        );
    }

    let tables = selection
        .tables
        .iter()
        .map(|t| TableReport {
            name: t.name.to_string(),
            estimated_rows: t.estimated_rows,
            bytes: t.bytes,
            identity: t.identity(),
            partitioned: t.partitioned,
            partition_of: t.partition_of.as_ref().map(|p| p.to_string()),
            on_target: on_target.get(&t.name).copied().unwrap_or("absent"),
        })
        .collect();
    c.findings.sort_by_key(|f| f.severity);
    let blocked = c.findings.iter().any(|f| f.severity == Severity::Block);
    let steps = planned_steps(
        plan,
        &selection,
        &missing_roles,
        &missing_extensions,
        state,
        copy_workers,
        copy.as_ref(),
    );
    let report = Preflight {
        name: plan.name.0.clone(),
        blocked,
        source: server_report(source, src_settings, source_disk),
        target: server_report(target, tgt_settings, target_disk),
        tables,
        sequences: sequences.iter().map(|s| s.name.to_string()).collect(),
        roles_to_create: missing_roles.iter().map(|r| r.name.clone()).collect(),
        extensions_to_create: missing_extensions.iter().map(|(e, _)| e.clone()).collect(),
        unfenceable_roles,
        findings: c.findings,
        steps,
        copy,
    };
    Ok(Inspection {
        report,
        selection,
        missing_roles,
        missing_extensions,
        pg_dump,
        pg_restore,
    })
}

/// Whether the coordinator's role may use the replication protocol.
const COPY_ROLE: &str = "SELECT current_user::text, rolsuper OR rolreplication OR EXISTS (
    SELECT 1 FROM pg_roles g WHERE g.rolname = 'rds_replication' AND pg_has_role(current_user, g.oid, 'MEMBER'))
   FROM pg_roles WHERE rolname = current_user";

/// With `[sync] copy = "snapshot"`: how the copy will split the tables, and what it costs the
/// source while it runs.
async fn copy_plan(
    c: &mut Checker,
    plan: &Plan,
    source: &Server,
    selection: &catalog::Selection,
) -> Result<Option<CopyPlan>, PgError> {
    if plan.sync.copy == crate::plan::CopyMethod::Native {
        return Ok(None);
    }
    let copy = crate::pg::copy_plan::make(
        source,
        selection,
        plan.sync.snapshot_workers(),
        plan.sync.copy_chunk_bytes,
    )
    .await?;
    c.add(
        Severity::Warn,
        "copy_snapshot",
        "source",
        "the copy reads one snapshot from start to end: until its rows are in and its indexes built, vacuum on the source keeps every row version deleted or updated meanwhile, and the copied tables stay share-locked (ALTER TABLE, TRUNCATE and VACUUM FULL on them wait)",
        Some("run it when the source is not at its busiest; `switchyard status` shows its ETA".into()),
    );
    // The copy makes its slot itself, through the replication protocol: the subscription's
    // connection needed that right before, now the coordinator's own role does too.
    let row = source
        .query_one("check the coordinator's replication right", COPY_ROLE, &[])
        .await?;
    let (user, may): (String, bool) = (row.get(0), row.get(1));
    if !may {
        c.add(
            Severity::Block,
            "copy_needs_replication",
            "source",
            format!("role {user} may not open a replication connection, which the snapshot copy needs to create its slot and export its snapshot"),
            Some(format!("ALTER ROLE {} REPLICATION;  -- or, on RDS, GRANT rds_replication TO {}; or set [sync] copy = \"native\"", sql::ident(&user), sql::ident(&user))),
        );
    }
    c.add(
        Severity::Info,
        "copy_slot_wait",
        "source",
        "creating the slot waits for the transactions already open on the source to end",
        None,
    );
    Ok(Some(copy))
}
