//! `switchyard plan`: everything that would make the migration fail, found before anything is
//! changed, and the steps `sync` would run.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::catalog::{self, RoleInfo, Selection, TableInfo};
use super::{sql, tools, PgError, Server, TableName};
use crate::output::human_bytes;
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

fn check_versions(c: &mut Checker, source: &Server, target: &Server) {
    if source.major() < 10 {
        c.add(
            Severity::Block,
            "source_version",
            "source",
            format!("PostgreSQL {} has no logical replication", source.major()),
            Some("upgrade the source to PostgreSQL 10 or later".into()),
        );
    }
    if target.major() < source.major() {
        c.add(
            Severity::Block,
            "target_version",
            "target",
            format!(
                "the target runs PostgreSQL {}, older than the source's {}",
                target.major(),
                source.major()
            ),
            Some("use a target of the same or a newer major version".into()),
        );
    }
}

fn check_tools(c: &mut Checker, source: &Server) -> (std::path::PathBuf, std::path::PathBuf) {
    let pg_dump = match tools::find("pg_dump", source.major()) {
        Ok((path, _)) => path,
        Err(e) => {
            c.add(
                Severity::Block,
                "pg_dump",
                "coordinator",
                e.to_string(),
                None,
            );
            "pg_dump".into()
        }
    };
    let pg_restore = match tools::find("pg_restore", source.major()) {
        Ok((path, _)) => path,
        Err(e) => {
            c.add(
                Severity::Block,
                "pg_restore",
                "coordinator",
                e.to_string(),
                None,
            );
            "pg_restore".into()
        }
    };
    (pg_dump, pg_restore)
}

/// Applications must not log in as the coordinator's role: the cutover fences every role but
/// that one.
fn check_proxy_users(c: &mut Checker, plan: &Plan) {
    for user in &plan.proxy.users {
        if user.name.0 == plan.source.url.user() || user.name.0 == plan.target.url.user() {
            c.add(
                Severity::Block,
                "proxy_user_is_coordinator",
                user.name.0.clone(),
                "a [[proxy.users]] entry is the coordinator's own role: the cutover could not fence the applications",
                Some("give the applications a role of their own".into()),
            );
        }
    }
}

async fn check_superuser(c: &mut Checker, server: &Server) -> Result<(), PgError> {
    let row = server
        .query_one(
            "check the coordinator's role",
            // Managed services give a superuser-like role instead of superuser.
            "SELECT current_user::text, rolsuper OR EXISTS (
                 SELECT 1 FROM pg_roles g
                  WHERE g.rolname IN ('rds_superuser', 'cloudsqlsuperuser', 'azure_pg_admin')
                    AND pg_has_role(current_user, g.oid, 'MEMBER'))
               FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (user, superuser): (String, bool) = (row.get(0), row.get(1));
    if !superuser {
        c.add(
            Severity::Block,
            "coordinator_not_superuser",
            server.side.to_string(),
            format!("role {user} is not a superuser: it cannot create subscriptions on PostgreSQL 15 nor revoke rights for the fence"),
            Some(format!("ALTER ROLE {} SUPERUSER;  -- or, on RDS, GRANT rds_superuser TO {}", sql::ident(&user), sql::ident(&user))),
        );
    }
    Ok(())
}

async fn count(server: &Server, context: &str, query: &str, name: &str) -> Result<i64, PgError> {
    Ok(server.query_one(context, query, &[&name]).await?.get(0))
}

/// Counts rows of `query`, which takes this migration's slot name ($1) and its table-sync slot
/// pattern ($2) so as to leave them out.
async fn count_others(
    server: &Server,
    context: &str,
    query: &str,
    ours: [&String; 2],
) -> Result<i64, PgError> {
    Ok(server
        .query_one(context, query, &[ours[0], ours[1]])
        .await?
        .get(0))
}

async fn check_source_capacity(
    c: &mut Checker,
    source: &Server,
    s: &HashMap<String, String>,
    ours: [&String; 2],
    copy_workers: i64,
) -> Result<(), PgError> {
    if s.get("wal_level").map(String::as_str) != Some("logical") {
        c.add(
            Severity::Block,
            "wal_level",
            "source",
            format!(
                "wal_level is {}, logical replication needs logical",
                s.get("wal_level").map_or("unknown", String::as_str)
            ),
            Some("ALTER SYSTEM SET wal_level = logical;  -- then restart the source".into()),
        );
    }
    let used_slots = count_others(
        source,
        "count replication slots",
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name <> $1 AND slot_name NOT LIKE $2",
        ours,
    )
    .await?;
    let free_slots = setting_i64(s, "max_replication_slots") - used_slots;
    let senders = count_others(
        source,
        "count WAL senders",
        "SELECT count(*) FROM pg_stat_replication WHERE application_name <> $1 AND application_name NOT LIKE $2",
        ours,
    )
    .await?;
    let free_senders = setting_i64(s, "max_wal_senders") - senders;
    for (what, free, setting) in [
        ("replication slots", free_slots, "max_replication_slots"),
        ("WAL senders", free_senders, "max_wal_senders"),
    ] {
        let needed = 1 + copy_workers;
        if free < 1 {
            c.add(
                Severity::Block,
                "source_capacity",
                "source",
                format!(
                    "no free {what} ({setting} = {})",
                    s.get(setting).map_or("?", String::as_str)
                ),
                Some(format!(
                    "ALTER SYSTEM SET {setting} = {};  -- then restart the source",
                    setting_i64(s, setting) + needed
                )),
            );
        } else if free < needed {
            c.add(Severity::Warn, "source_capacity", "source", format!("{free} free {what}: the initial copy uses up to {needed} at once, so tables will copy fewer at a time"), Some(format!("ALTER SYSTEM SET {setting} = {};  -- then restart the source", setting_i64(s, setting) + needed - free)));
        }
    }
    Ok(())
}

async fn check_target_capacity(
    c: &mut Checker,
    target: &Server,
    s: &HashMap<String, String>,
    ours: &str,
    copy_workers: i64,
) -> Result<(), PgError> {
    let running = count(
        target,
        "count subscription workers",
        "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL AND subname <> $1",
        ours,
    )
    .await?;
    let free_workers = setting_i64(s, "max_logical_replication_workers") - running;
    if free_workers < 1 {
        c.add(
            Severity::Block,
            "target_capacity",
            "target",
            "no free logical replication worker on the target",
            Some(
                "ALTER SYSTEM SET max_logical_replication_workers = 8;  -- then restart the target"
                    .into(),
            ),
        );
    } else if free_workers < 1 + copy_workers {
        c.add(
            Severity::Warn,
            "target_capacity",
            "target",
            format!(
                "{free_workers} free logical replication workers: tables will copy {} at a time",
                free_workers - 1
            ),
            None,
        );
    }
    // Before PostgreSQL 18 replication origins are limited by max_replication_slots.
    let origin_limit = if target.major() >= 18 {
        "max_active_replication_origins"
    } else {
        "max_replication_slots"
    };
    let origins = count(target, "count replication origins", "SELECT count(*) FROM pg_replication_origin WHERE roname NOT LIKE 'pg\\_' || coalesce((SELECT oid::text FROM pg_subscription WHERE subname = $1), '-') || '%'", ours).await?;
    if setting_i64(s, origin_limit) - origins < 1 + copy_workers {
        c.add(
            Severity::Block,
            "target_capacity",
            "target",
            format!("{origin_limit} = {} leaves too few replication origins for one subscription and {copy_workers} table copies", s.get(origin_limit).map_or("?", String::as_str)),
            Some(format!("ALTER SYSTEM SET {origin_limit} = {};  -- then restart the target", origins + 2 + copy_workers)),
        );
    }
    if setting_i64(s, "max_worker_processes")
        < setting_i64(s, "max_logical_replication_workers") + 1
    {
        c.add(Severity::Warn, "target_capacity", "target", "max_worker_processes is lower than max_logical_replication_workers + 1: workers may fail to start", Some("raise max_worker_processes on the target".into()));
    }
    Ok(())
}

/// The database's encoding and collation (`lc_collate` is no setting since PostgreSQL 16).
async fn database_locale(server: &Server) -> Result<HashMap<String, String>, PgError> {
    let row = server
        .query_one(
            "read the database's locale",
            "SELECT pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok(HashMap::from([
        ("database_encoding".to_string(), row.get(0)),
        ("database_collate".to_string(), row.get(1)),
        ("database_ctype".to_string(), row.get(2)),
    ]))
}

fn check_encoding(c: &mut Checker, src: &HashMap<String, String>, tgt: &HashMap<String, String>) {
    let get = |s: &HashMap<String, String>, key: &str| s.get(key).cloned().unwrap_or_default();
    let (src_enc, tgt_enc) = (get(src, "database_encoding"), get(tgt, "database_encoding"));
    if src_enc != tgt_enc {
        c.add(
            Severity::Block,
            "encoding",
            "target",
            format!("the source database is encoded {src_enc}, the target {tgt_enc}"),
            Some(format!(
                "create the target database with ENCODING '{src_enc}'"
            )),
        );
    }
    let (src_coll, tgt_coll) = (get(src, "database_collate"), get(tgt, "database_collate"));
    if src_coll != tgt_coll {
        c.add(Severity::Warn, "collation", "target", format!("collation differs: source {src_coll}, target {tgt_coll}; text sorts and unique indexes on text may behave differently"), None);
    }
}

fn check_disk(
    c: &mut Checker,
    s: &HashMap<String, String>,
    source_free: Option<i64>,
    target_free: Option<i64>,
    total_bytes: i64,
) {
    let keep_mb = setting_i64(s, "max_slot_wal_keep_size");
    if keep_mb < 0 {
        c.add(Severity::Info, "wal_retention", "source", "max_slot_wal_keep_size is unlimited: if replication stalls, the slot keeps WAL until the disk fills; `switchyard status` warns past [sync] retained_wal_warn_bytes", None);
    } else if keep_mb * 1024 * 1024 < total_bytes {
        c.add(Severity::Warn, "wal_retention", "source", format!("max_slot_wal_keep_size = {keep_mb}MB is smaller than the data to copy: writes during a long copy can invalidate the slot"), Some("raise max_slot_wal_keep_size on the source for the duration of the copy".into()));
    }
    match source_free {
        Some(free) if free < total_bytes / 2 => c.add(Severity::Warn, "disk_headroom", "source", format!("only {} free for WAL on the source; WAL retained during the copy may fill it", human_bytes(free)), None),
        Some(_) => {}
        None => c.add(Severity::Info, "disk_headroom", "source", "free disk space could not be read (needs superuser and a shell on the server); check it by hand", None),
    }
    if let Some(free) = target_free.filter(|&free| free < total_bytes) {
        c.add(
            Severity::Block,
            "disk_headroom",
            "target",
            format!(
                "the target has {} free but the selected tables take {}",
                human_bytes(free),
                human_bytes(total_bytes)
            ),
            Some("give the target more disk".into()),
        );
    }
}

fn check_selection(c: &mut Checker, selection: &Selection) {
    if selection.tables.is_empty() {
        c.add(
            Severity::Block,
            "no_tables",
            "plan",
            "no table on the source matches [sync] tables",
            Some("check the patterns in [sync] tables and exclude".into()),
        );
    }
    for pattern in &selection.unmatched_patterns {
        c.add(
            Severity::Warn,
            "unmatched_pattern",
            "plan",
            format!("pattern {pattern:?} matches no table"),
            None,
        );
    }
    for table in selection.leaves() {
        check_table(c, table);
    }
}

fn check_table(c: &mut Checker, t: &TableInfo) {
    let name = t.name.to_string();
    if t.unlogged {
        c.add(
            Severity::Block,
            "unlogged_table",
            &name,
            "unlogged tables are not written to WAL and cannot be replicated",
            Some(format!(
                "ALTER TABLE {} SET LOGGED;  -- or add it to [sync] exclude",
                t.name.sql()
            )),
        );
    }
    if t.identity().is_none() {
        let fix = match &t.unique_candidate {
            Some(index) => format!(
                "ALTER TABLE {} REPLICA IDENTITY USING INDEX {};",
                t.name.sql(),
                index.rsplit('.').next().unwrap_or(index)
            ),
            None => format!("ALTER TABLE {} REPLICA IDENTITY FULL;", t.name.sql()),
        };
        c.add(Severity::Block, "no_replica_identity", &name, "no primary key and no replica identity: UPDATE and DELETE on it would fail on the source once published", Some(fix));
    } else if t.replica_identity == 'f' && !t.columns_without_equality.is_empty() {
        c.add(
            Severity::Block,
            "identity_full_without_equality",
            &name,
            format!("REPLICA IDENTITY FULL, but column(s) {} have no equality operator, so the target cannot find rows to update or delete", t.columns_without_equality.join(", ")),
            Some(format!("add a primary key to {}, or change those columns to jsonb", t.name.sql())),
        );
    }
    if !t.large_object_columns.is_empty() {
        c.add(
            Severity::Warn,
            "large_object_column",
            &name,
            format!(
                "column(s) {} may reference large objects, which logical replication does not copy",
                t.large_object_columns.join(", ")
            ),
            None,
        );
    }
}

async fn check_target_tables(
    c: &mut Checker,
    target: &Server,
    selection: &Selection,
    state: &State,
) -> Result<HashMap<TableName, &'static str>, PgError> {
    let existing: BTreeSet<TableName> = catalog::tables(target)
        .await?
        .into_iter()
        .map(|t| t.name)
        .collect();
    // Tables this migration restored and is copying into. After `abort` (the planned phase)
    // they hold an old copy that a new subscription would collide with.
    let ours = state.created.schema.is_some() && state.phase != Phase::Planned;
    let mut on_target = HashMap::new();
    for table in selection.leaves().filter(|t| existing.contains(&t.name)) {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM ONLY {})", table.name.sql());
        let has_rows: bool = target
            .query_one("look for rows on the target", &sql, &[])
            .await?
            .get(0);
        on_target.insert(
            table.name.clone(),
            if has_rows { "has_rows" } else { "empty" },
        );
        if ours {
            continue;
        }
        let (message, fix) = if has_rows {
            ("already holds rows on the target: the initial copy would duplicate or collide with them", format!("TRUNCATE {};  -- on the target, or `switchyard abort --drop-target-data` after an earlier run", table.name.sql()))
        } else {
            (
                "already exists on the target: switchyard copies the schema itself",
                format!(
                    "DROP TABLE {};  -- on the target, or add it to [sync] exclude",
                    table.name.sql()
                ),
            )
        };
        c.add(
            Severity::Block,
            "exists_on_target",
            table.name.to_string(),
            message,
            Some(fix),
        );
    }
    Ok(on_target)
}

async fn check_large_objects(
    c: &mut Checker,
    source: &Server,
    selection: &Selection,
) -> Result<(), PgError> {
    if selection.tables.is_empty() {
        return Ok(());
    }
    let n: i64 = source
        .query_one(
            "count large objects",
            "SELECT count(*) FROM pg_largeobject_metadata",
            &[],
        )
        .await?
        .get(0);
    if n > 0 {
        c.add(Severity::Warn, "large_objects", "source", format!("the source database holds {n} large objects; logical replication does not copy them"), Some("move them with pg_dump --large-objects before the cutover, or store them in bytea".into()));
    }
    Ok(())
}

async fn check_extensions(
    c: &mut Checker,
    source: &Server,
    target: &Server,
) -> Result<Vec<(String, String)>, PgError> {
    let used = source
        .query("list extensions", "SELECT e.extname::text, n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname <> 'plpgsql' ORDER BY 1", &[])
        .await?;
    let available = target
        .query(
            "list available extensions",
            "SELECT name::text, installed_version IS NOT NULL FROM pg_available_extensions",
            &[],
        )
        .await?;
    let available: HashMap<String, bool> = available.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut missing = Vec::new();
    for row in &used {
        let (name, schema): (String, String) = (row.get(0), row.get(1));
        match available.get(&name) {
            Some(true) => {}
            Some(false) => missing.push((name, schema)),
            None => c.add(
                Severity::Block,
                "extension_unavailable",
                &name,
                format!("extension {name} is used on the source but not installable on the target"),
                Some(format!(
                    "install the package that provides {name} on the target server"
                )),
            ),
        }
    }
    Ok(missing)
}

/// Login roles that the fence (revoking writes on the migrated tables) cannot stop: superusers,
/// members of `pg_write_all_data`, and owners of the migrated tables or members of an owner
/// role (they can `SET ROLE` to it).
async fn unfenceable_roles(
    source: &Server,
    selection: &Selection,
) -> Result<Vec<UnfenceableRole>, PgError> {
    let owners: Vec<u32> = selection.tables.iter().map(|t| t.owner_oid).collect();
    let write_all = if source.major() >= 14 {
        "pg_has_role(r.oid, 'pg_write_all_data', 'MEMBER')"
    } else {
        "false"
    };
    let sql = format!(
        "SELECT r.rolname::text, r.rolsuper,
                NOT r.rolsuper AND {write_all},
                NOT r.rolsuper AND r.oid = ANY ($1),
                ARRAY(SELECT DISTINCT o.rolname::text FROM pg_roles o
                       WHERE o.oid = ANY ($1) AND o.oid <> r.oid AND NOT r.rolsuper AND pg_has_role(r.oid, o.oid, 'MEMBER'))
           FROM pg_roles r
          WHERE r.rolcanlogin AND r.rolname <> current_user
          ORDER BY 1"
    );
    let rows = source
        .query("list roles the cutover cannot fence", &sql, &[&owners])
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let mut reasons: Vec<String> = [
                (1, "superuser"),
                (2, "member of pg_write_all_data"),
                (3, "owns migrated tables"),
            ]
            .iter()
            .filter(|&&(i, _)| r.get::<_, bool>(i))
            .map(|&(_, why)| why.to_string())
            .collect();
            let owner_roles: Vec<String> = r.get(4);
            if !owner_roles.is_empty() {
                reasons.push(format!(
                    "can SET ROLE to table owner {}",
                    owner_roles.join(", ")
                ));
            }
            (!reasons.is_empty()).then(|| UnfenceableRole {
                role: r.get(0),
                reasons,
            })
        })
        .collect())
}

/// Foreign keys from the copied tables, and views in the copied schemas, that point at tables
/// the plan does not copy (left out by `exclude`, or in another schema): the schema restore
/// would fail on them.
async fn check_references_outside(
    c: &mut Checker,
    source: &Server,
    selection: &Selection,
) -> Result<(), PgError> {
    let selected: Vec<u32> = selection.tables.iter().map(|t| t.oid).collect();
    let sql = r#"
        SELECT DISTINCT format('%s references %s', r.conrelid::regclass, r.confrelid::regclass)
          FROM pg_constraint r
         WHERE r.contype = 'f' AND r.conrelid = ANY ($1) AND NOT r.confrelid = ANY ($1)
        UNION
        SELECT DISTINCT format('view %s reads %s', v.ev_class::regclass, d.refobjid::regclass)
          FROM pg_rewrite v
          JOIN pg_class vc ON vc.oid = v.ev_class
          JOIN pg_namespace vn ON vn.oid = vc.relnamespace
          JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = v.oid
                          AND d.refclassid = 'pg_class'::regclass
          JOIN pg_class t ON t.oid = d.refobjid AND t.relkind IN ('r', 'p')
         WHERE vn.nspname = ANY ($2) AND v.ev_class <> d.refobjid AND NOT d.refobjid = ANY ($1)
           AND t.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)"#;
    let rows = source
        .query(
            "look for references to tables that are not copied",
            sql,
            &[&selected, &selection.schemas],
        )
        .await?;
    for row in &rows {
        let what: String = row.get(0);
        c.add(
            Severity::Block,
            "references_uncopied_table",
            what.clone(),
            format!("{what}, which the plan does not copy: the schema copy would fail on it"),
            Some("add the referenced table to [sync] tables, or drop the reference".into()),
        );
    }
    Ok(())
}

/// Types and functions in the copied schemas that already exist on the target: the schema
/// restore (one transaction) would fail on the first of them.
async fn check_name_clashes(
    c: &mut Checker,
    source: &Server,
    target: &Server,
    selection: &Selection,
) -> Result<(), PgError> {
    let sql = r#"
        SELECT 'TYPE ' || format('%I.%I', n.nspname, t.typname)
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE n.nspname = ANY ($1)
           AND t.typtype IN ('b', 'c', 'd', 'e', 'r')
           AND t.typcategory <> 'A'
           AND (t.typrelid = 0 OR EXISTS (SELECT 1 FROM pg_class k WHERE k.oid = t.typrelid AND k.relkind = 'c'))
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e')
        UNION
        SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE ' WHEN 'v' THEN 'VIEW ' WHEN 'm' THEN 'MATERIALIZED VIEW ' ELSE 'FOREIGN TABLE ' END
               || format('%I.%I', n.nspname, c.relname)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = ANY ($1) AND c.relkind IN ('S', 'v', 'm', 'f')
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
        UNION
        SELECT 'FUNCTION ' || format('%I.%I(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid))
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = ANY ($1)
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')"#;
    let on_source: BTreeSet<String> = source
        .query("list types and functions", sql, &[&selection.schemas])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let on_target: BTreeSet<String> = target
        .query("list types and functions", sql, &[&selection.schemas])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for clash in on_source.intersection(&on_target) {
        c.add(
            Severity::Block,
            "exists_on_target",
            clash.clone(),
            "already exists on the target: the schema copy would fail on it",
            Some(format!(
                "DROP {clash};  -- on the target, if it is not needed there"
            )),
        );
    }
    Ok(())
}

/// Transactions open on the source for more than a minute, and prepared transactions:
/// creating the replication slot waits for every one of them to end.
async fn check_long_transactions(c: &mut Checker, source: &Server) -> Result<(), PgError> {
    let prepared = source
        .query("look for prepared transactions", "SELECT gid, extract(epoch FROM now() - prepared)::int8 FROM pg_prepared_xacts ORDER BY prepared", &[])
        .await?;
    for row in &prepared {
        let (gid, secs): (String, i64) = (row.get(0), row.get(1));
        c.add(
            Severity::Block,
            "prepared_transaction",
            format!("prepared transaction {gid}"),
            format!("prepared {secs} s ago and still open: creating the replication slot would wait for it for ever"),
            Some(format!("COMMIT PREPARED {};  -- or ROLLBACK PREPARED, on the source", sql::literal(&gid))),
        );
    }
    let rows = source
        .query(
            "look for long transactions",
            "SELECT pid, usename::text, extract(epoch FROM now() - xact_start)::int8
               FROM pg_stat_activity
              WHERE xact_start < now() - interval '1 minute' AND pid <> pg_backend_pid()
                AND backend_type = 'client backend'
              ORDER BY xact_start",
            &[],
        )
        .await?;
    for row in &rows {
        let (pid, user, secs): (i32, Option<String>, i64) = (row.get(0), row.get(1), row.get(2));
        c.add(
            Severity::Warn,
            "long_transaction",
            format!("pid {pid}"),
            format!("a transaction of {} has been open for {secs} s; creating the slot waits until it ends", user.unwrap_or_default()),
            Some(format!("let it finish, or SELECT pg_terminate_backend({pid});  -- on the source")),
        );
    }
    Ok(())
}

/// Orders roles so that every role comes after the roles it is a member of.
fn order_roles(mut roles: Vec<RoleInfo>) -> Vec<RoleInfo> {
    let mut ordered: Vec<RoleInfo> = Vec::with_capacity(roles.len());
    while !roles.is_empty() {
        let placed: BTreeSet<String> = ordered.iter().map(|r| r.name.clone()).collect();
        let pending: BTreeSet<String> = roles.iter().map(|r| r.name.clone()).collect();
        let (ready, rest): (Vec<RoleInfo>, Vec<RoleInfo>) = roles.into_iter().partition(|r| {
            r.member_of
                .iter()
                .all(|g| placed.contains(g) || !pending.contains(g))
        });
        if ready.is_empty() {
            // A membership cycle cannot exist in PostgreSQL; keep the rest as they are.
            ordered.extend(rest);
            break;
        }
        ordered.extend(ready);
        roles = rest;
    }
    ordered
}

/// Free space of the file system that holds `pg_wal`, read with `df` through
/// `COPY ... FROM PROGRAM` inside a transaction that is rolled back. `None` where the server
/// does not allow it (not a superuser, a managed service).
async fn free_disk_bytes(server: &Server) -> Option<i64> {
    let dir = server
        .simple_column("read data_directory", "SHOW data_directory")
        .await
        .ok()?
        .into_iter()
        .next()??;
    let command = format!("df -Pk '{}/pg_wal'", dir.replace('\'', ""));
    let setup = format!(
        "BEGIN; CREATE TEMP TABLE switchyard_df (line text) ON COMMIT DROP; COPY switchyard_df FROM PROGRAM {}",
        sql::literal(&command)
    );
    let result = match server.execute("read free disk space", &setup).await {
        Ok(()) => server
            .simple_column("read free disk space", "SELECT line FROM switchyard_df")
            .await
            .ok(),
        Err(e) => {
            tracing::debug!("cannot read free disk space on the {}: {e}", server.side);
            None
        }
    };
    let _ = server.execute("roll back", "ROLLBACK").await;
    let lines = result?;
    let data_line = lines.into_iter().flatten().nth(1)?;
    let available_kb: i64 = data_line.split_whitespace().nth(3)?.parse().ok()?;
    Some(available_kb * 1024)
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
