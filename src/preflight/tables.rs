//! The preflight's checks of what is migrated: the selected tables, large objects, and
//! references to tables the plan does not copy.

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
