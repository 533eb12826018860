//! `switchyard plan`: everything that would make the migration fail, found before anything is
//! changed, and the steps `sync` would run.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::catalog::{self, RoleInfo, Selection, TableInfo};
use super::{sql, tools, PgError, Server, TableName};
use crate::output::human_bytes;
use crate::plan::Plan;
use crate::state::{Phase, State};

mod servers;
mod tables;

use servers::*;
use tables::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Replication would fail: `sync` refuses to start.
    Block,
    /// Works, but an operator should know.
    Warn,
    Info,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable identifier of the check, e.g. `no_replica_identity`.
    pub check: &'static str,
    /// What it is about: `source`, `target` or a table or role name.
    pub subject: String,
    pub message: String,
    /// The statement or action that fixes it.
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerReport {
    pub url: String,
    pub version: String,
    pub settings: BTreeMap<String, String>,
    /// Free bytes on the file system that holds `pg_wal`, when the server lets us ask.
    pub free_disk_bytes: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    pub name: String,
    pub estimated_rows: i64,
    pub bytes: i64,
    /// How UPDATE and DELETE find their row: `primary key`, `full`, `index …`, or null.
    pub identity: Option<String>,
    pub partitioned: bool,
    pub partition_of: Option<String>,
    /// `absent`, `empty` or `has_rows`.
    pub on_target: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct UnfenceableRole {
    pub role: String,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub description: String,
    pub done: bool,
}

/// What `switchyard plan` reports; its JSON form is a stable document.
#[derive(Debug, Clone, Serialize)]
pub struct Preflight {
    pub name: String,
    pub blocked: bool,
    pub source: ServerReport,
    pub target: ServerReport,
    pub tables: Vec<TableReport>,
    pub sequences: Vec<String>,
    pub roles_to_create: Vec<String>,
    pub extensions_to_create: Vec<String>,
    pub unfenceable_roles: Vec<UnfenceableRole>,
    pub findings: Vec<Finding>,
    pub steps: Vec<Step>,
}

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

struct Checker {
    findings: Vec<Finding>,
}

impl Checker {
    fn add(
        &mut self,
        severity: Severity,
        check: &'static str,
        subject: impl Into<String>,
        message: impl Into<String>,
        fix: Option<String>,
    ) {
        self.findings.push(Finding {
            severity,
            check,
            subject: subject.into(),
            message: message.into(),
            fix,
        });
    }
}

fn setting_i64(settings: &HashMap<String, String>, name: &str) -> i64 {
    settings.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

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
    let copy_workers = if plan.sync.copy_workers > 0 {
        i64::from(plan.sync.copy_workers)
    } else {
        setting_i64(&tgt_settings, "max_sync_workers_per_subscription").max(1)
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
            |s| crate::sync::replication::sync_slot_pattern(s.oid, s.target_system_id),
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

    check_selection(&mut c, &selection);
    let on_target = check_target_tables(&mut c, target, &selection, state).await?;
    check_large_objects(&mut c, source, &selection).await?;
    check_references_outside(&mut c, source, &selection).await?;
    check_long_transactions(&mut c, source).await?;
    let restored = state.created.schema.as_ref().is_some_and(|s| s.restored);
    if resuming && restored {
        for drift in crate::sync::drift::detect(plan, source, target).await? {
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

fn server_report(
    server: &Server,
    settings: HashMap<String, String>,
    free_disk_bytes: Option<i64>,
) -> ServerReport {
    let mut settings: BTreeMap<String, String> = settings.into_iter().collect();
    let version = settings.remove("server_version").unwrap_or_default();
    ServerReport {
        url: server.url.to_string(),
        version,
        settings,
        free_disk_bytes,
    }
}

fn planned_steps(
    plan: &Plan,
    selection: &Selection,
    roles: &[RoleInfo],
    extensions: &[(String, String)],
    state: &State,
    copy_workers: i64,
) -> Vec<Step> {
    let name = plan.replication_name();
    let rows: i64 = selection.leaves().map(|t| t.estimated_rows).sum();
    let bytes: i64 = selection.leaves().map(|t| t.bytes).sum();
    let created = &state.created;
    let mut steps = Vec::new();
    if !roles.is_empty() {
        let names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
        steps.push(Step {
            description: format!("create roles on the target: {}", names.join(", ")),
            done: false,
        });
    }
    if !extensions.is_empty() {
        let names: Vec<&str> = extensions.iter().map(|(e, _)| e.as_str()).collect();
        steps.push(Step {
            description: format!("create extensions on the target: {}", names.join(", ")),
            done: false,
        });
    }
    steps.push(Step {
        description: format!("copy the schema of {} ({} tables) with pg_dump --schema-only and pg_restore, in one transaction", selection.schemas.join(", "), selection.tables.len()),
        done: created.schema.is_some(),
    });
    steps.push(Step {
        description: format!(
            "create publication {name} on the source for {} tables",
            selection.published().len()
        ),
        done: created.publication.is_some(),
    });
    steps.push(Step {
        description: format!("create subscription {name} on the target with slot {name} on the source; copy about {rows} rows ({}), {copy_workers} tables at a time, then stream changes", human_bytes(bytes)),
        done: created.subscription.is_some(),
    });
    steps.push(Step { description: format!("with --wait: wait until every table streams and lag < {} bytes, then ANALYZE the target and check its indexes", plan.sync.max_lag_bytes), done: state.phase == Phase::Synced });
    steps
}
