//! What `switchyard plan` reports (its JSON form is a stable document): the findings, the two
//! servers, the tables, the steps `sync` would run; and the [`Checker`] the checks add their
//! findings to.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::output::human_bytes;
use crate::pg::catalog::{RoleInfo, Selection};
use crate::pg::Server;
use crate::plan::Plan;
use crate::state::{Phase, State};

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
    /// How the snapshot copy will run (`[sync] copy = "snapshot"`); absent for the native copy.
    pub copy: Option<crate::pg::copy_plan::CopyPlan>,
}

/// What the checks found, in the order they ran (`inspect` sorts it by severity).
pub(super) struct Checker {
    pub(super) findings: Vec<Finding>,
}

impl Checker {
    pub(super) fn add(
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

pub(super) fn server_report(
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

pub(super) fn planned_steps(
    plan: &Plan,
    selection: &Selection,
    roles: &[RoleInfo],
    extensions: &[(String, String)],
    state: &State,
    copy_workers: i64,
    copy: Option<&crate::pg::copy_plan::CopyPlan>,
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
    let publication = Step {
        description: format!(
            "create publication {name} on the source for {} tables",
            selection.published().len()
        ),
        done: created.publication.is_some(),
    };
    let copied = created.copy.as_ref().is_some_and(|c| c.done);
    match copy {
        Some(copy) => {
            let binary = copy
                .tables
                .iter()
                .filter(|t| t.format == crate::pg::copy_plan::Format::Binary)
                .count();
            let chunks: u32 = copy.tables.iter().map(|t| t.chunks).sum();
            steps.push(publication);
            steps.push(Step { description: format!("create slot {name} on the source through the replication protocol, exporting its snapshot; share-lock the {} tables in it", copy.tables.len()), done: copied });
            steps.push(Step { description: format!("copy the schema of {} as of that snapshot (pg_dump --snapshot): types and tables first", selection.schemas.join(", ")), done: copied });
            steps.push(Step { description: format!("copy about {rows} rows ({}) from the snapshot, {} workers, {chunks} chunks of up to {}; {binary} tables in binary, {} in text (user-defined types)", human_bytes(copy.bytes()), copy.workers, human_bytes(copy.chunk_bytes), copy.tables.len() - binary), done: copied });
            steps.push(Step { description: format!("build keys and indexes, {} at a time; add foreign keys NOT VALID, then validate them", copy.workers), done: copied });
            steps.push(Step { description: format!("create subscription {name} on the slot (copy_data = false) and enable it: changes stream from exactly where the snapshot ends"), done: copied || (created.subscription.is_some() && created.copy.is_none()) });
        }
        None => {
            steps.push(Step {
                description: format!("copy the schema of {} ({} tables) with pg_dump --schema-only and pg_restore, in one transaction", selection.schemas.join(", "), selection.tables.len()),
                done: created.schema.is_some(),
            });
            steps.push(publication);
            steps.push(Step {
                description: format!("create subscription {name} on the target with slot {name} on the source; copy about {rows} rows ({}) with its table sync ([sync] copy = \"native\"), {copy_workers} tables at a time, then stream changes", human_bytes(bytes)),
                done: created.subscription.is_some(),
            });
        }
    }
    steps.push(Step { description: format!("with --wait: wait until every table streams and lag < {} bytes, then ANALYZE the target and check its indexes", plan.sync.max_lag_bytes), done: state.phase == Phase::Synced });
    steps
}
