//! The preflight's checks of what is already on the target: tables, types and functions the
//! copy would clash with, and the extensions it lacks.

use super::*;

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
