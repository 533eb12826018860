//! The preflight's checks of what is migrated: the selected tables, clashes on the target,
//! large objects, extensions, roles the fence cannot hold, long transactions.

use super::*;

pub(super) fn check_selection(c: &mut Checker, selection: &Selection) {
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

pub(super) fn check_table(c: &mut Checker, t: &TableInfo) {
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

pub(super) async fn check_target_tables(
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

pub(super) async fn check_large_objects(
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

pub(super) async fn check_extensions(
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
pub(super) async fn unfenceable_roles(
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
pub(super) async fn check_references_outside(
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
pub(super) async fn check_name_clashes(
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
pub(super) async fn check_long_transactions(
    c: &mut Checker,
    source: &Server,
) -> Result<(), PgError> {
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
pub(super) fn order_roles(mut roles: Vec<RoleInfo>) -> Vec<RoleInfo> {
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
