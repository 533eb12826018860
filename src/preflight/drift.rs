//! Schema drift: DDL run on the source after the schema copy. Logical replication does not
//! carry DDL, so a new column or table on the source breaks or silently skips replication.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::pg::catalog::{self, Column, Fill};
use crate::pg::{sql, PgError, Server, TableName};
use crate::plan::Plan;

#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    pub table: String,
    /// `missing_table`, `missing_column`, `extra_column` or `type_differs`.
    pub kind: &'static str,
    pub column: Option<String>,
    pub detail: String,
    /// The statement(s) to run on the target.
    pub fix: String,
}

/// Compares the selected tables' columns on both sides.
pub async fn detect(plan: &Plan, source: &Server, target: &Server) -> Result<Vec<Drift>, PgError> {
    let selection = catalog::select(plan, catalog::tables(source).await?);
    let names = selection.names();
    let on_source = catalog::columns(source, &names).await?;
    let on_target = catalog::columns(target, &names).await?;
    let publication = sql::ident(&plan.replication_name());
    let refresh =
        format!("ALTER SUBSCRIPTION {publication} REFRESH PUBLICATION;  -- on the target");
    let mut drift = Vec::new();
    // A refresh fails while any table the publication carries is missing on the target, and a
    // new partition of a published root is carried as soon as it exists: its fix goes first,
    // so that the fixes run in the order listed all succeed.
    let mut partitions = Vec::new();
    for info in &selection.tables {
        let table = &info.name;
        let source_columns = on_source.get(table).map(Vec::as_slice).unwrap_or_default();
        match (on_target.get(table), &info.partition_of, &info.partition_bound) {
            // The target only needs the partition and a refresh.
            (None, Some(parent), Some(bound)) if on_target.contains_key(parent) => {
                partitions.push(missing_table(table, format!("CREATE TABLE {} PARTITION OF {} {bound};  -- on the target\n{refresh}", table.sql(), parent.sql())))
            }
            (None, _, _) => drift.push(missing_table(
                table,
                format!(
                    "{}\nALTER PUBLICATION {publication} ADD TABLE {};  -- on the source\n{refresh}",
                    create_table_sql(table, source_columns),
                    table.sql()
                ),
            )),
            (Some(target_columns), _, _) => {
                drift.extend(compare_columns(table, source_columns, target_columns))
            }
        }
    }
    partitions.append(&mut drift);
    let mut drift = partitions;
    drift.extend(unsubscribed(plan, target, &selection, &on_target).await?);
    Ok(drift)
}

/// Tables on both sides that the subscription does not carry (a partition made on the target
/// without the refresh): their rows would be skipped without a word.
async fn unsubscribed(
    plan: &Plan,
    target: &Server,
    selection: &catalog::Selection,
    on_target: &std::collections::BTreeMap<TableName, Vec<Column>>,
) -> Result<Vec<Drift>, PgError> {
    let name = plan.replication_name();
    let Some(oid) = crate::replication::subscription_oid(target, &name).await? else {
        return Ok(Vec::new());
    };
    let subscribed = crate::replication::subscribed_tables(target, oid).await?;
    Ok(selection
        .leaves()
        .filter(|t| on_target.contains_key(&t.name) && !subscribed.contains(&t.name))
        .map(|t| Drift {
            table: t.name.to_string(),
            kind: "not_subscribed",
            column: None,
            detail: "exists on both sides, but the subscription does not carry it".into(),
            fix: format!("ALTER SUBSCRIPTION {} REFRESH PUBLICATION;  -- on the target, or run `switchyard sync`", sql::ident(&name)),
        })
        .collect())
}

fn missing_table(table: &TableName, fix: String) -> Drift {
    Drift {
        table: table.to_string(),
        kind: "missing_table",
        column: None,
        detail: "exists on the source and matches [sync] tables, but not on the target".into(),
        fix,
    }
}

fn create_table_sql(table: &TableName, columns: &[Column]) -> String {
    let defs: Vec<String> = columns.iter().map(column_sql).collect();
    format!(
        "CREATE TABLE {} ({});  -- on the target; add its keys and indexes too",
        table.sql(),
        defs.join(", ")
    )
}

/// A column definition as the source has it. The fill clause matters: `ADD COLUMN ... NOT
/// NULL` without the source's DEFAULT fails on a target that already holds rows, and a column
/// without its identity or generation would take different values than the source's.
fn column_sql(c: &Column) -> String {
    let fill = match &c.fill {
        Fill::Nothing => String::new(),
        Fill::Default(expr) => format!(" DEFAULT {expr}"),
        Fill::Identity { always: true } => " GENERATED ALWAYS AS IDENTITY".into(),
        Fill::Identity { always: false } => " GENERATED BY DEFAULT AS IDENTITY".into(),
        Fill::Generated(expr) => format!(" GENERATED ALWAYS AS ({expr}) STORED"),
    };
    format!(
        "{} {}{}{fill}",
        sql::ident(&c.name),
        c.type_sql,
        if c.not_null { " NOT NULL" } else { "" }
    )
}

fn compare_columns(table: &TableName, source: &[Column], target: &[Column]) -> Vec<Drift> {
    let mut drift = Vec::new();
    let source_names: BTreeSet<&str> = source.iter().map(|c| c.name.as_str()).collect();
    for column in source {
        match target.iter().find(|t| t.name == column.name) {
            None => drift.push(Drift {
                table: table.to_string(),
                kind: "missing_column",
                column: Some(column.name.clone()),
                detail: format!(
                    "column {} {} was added on the source",
                    column.name, column.type_sql
                ),
                fix: format!(
                    "ALTER TABLE {} ADD COLUMN {};",
                    table.sql(),
                    column_sql(column)
                ),
            }),
            Some(t) if t.type_sql != column.type_sql => drift.push(Drift {
                table: table.to_string(),
                kind: "type_differs",
                column: Some(column.name.clone()),
                detail: format!(
                    "column {} is {} on the source and {} on the target",
                    column.name, column.type_sql, t.type_sql
                ),
                fix: format!(
                    "ALTER TABLE {} ALTER COLUMN {} TYPE {};",
                    table.sql(),
                    sql::ident(&column.name),
                    column.type_sql
                ),
            }),
            Some(_) => {}
        }
    }
    for column in target
        .iter()
        .filter(|c| !source_names.contains(c.name.as_str()))
    {
        drift.push(Drift {
            table: table.to_string(),
            kind: "extra_column",
            column: Some(column.name.clone()),
            detail: format!(
                "column {} exists only on the target (dropped or renamed on the source)",
                column.name
            ),
            fix: format!(
                "ALTER TABLE {} DROP COLUMN {};  -- or make the same change on the target",
                table.sql(),
                sql::ident(&column.name)
            ),
        });
    }
    drift
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            type_sql: ty.into(),
            not_null: false,
            fill: Fill::Nothing,
        }
    }

    fn filled(name: &str, ty: &str, fill: Fill) -> Column {
        Column {
            not_null: true,
            fill,
            ..col(name, ty)
        }
    }

    #[test]
    fn added_column_keeps_its_default_identity_or_generation() {
        let t = TableName::new("public", "customers");
        let source = [
            filled("loyalty", "integer", Fill::Default("0".into())),
            filled("id", "bigint", Fill::Identity { always: true }),
            filled("n", "bigint", Fill::Identity { always: false }),
            filled("twice", "integer", Fill::Generated("(loyalty * 2)".into())),
        ];
        let fixes: Vec<String> = compare_columns(&t, &source, &[])
            .into_iter()
            .map(|d| d.fix)
            .collect();
        let table = "ALTER TABLE \"public\".\"customers\" ADD COLUMN";
        assert_eq!(
            fixes,
            [
                format!("{table} \"loyalty\" integer NOT NULL DEFAULT 0;"),
                format!("{table} \"id\" bigint NOT NULL GENERATED ALWAYS AS IDENTITY;"),
                format!("{table} \"n\" bigint NOT NULL GENERATED BY DEFAULT AS IDENTITY;"),
                format!(
                    "{table} \"twice\" integer NOT NULL GENERATED ALWAYS AS ((loyalty * 2)) STORED;"
                ),
            ]
        );
    }

    #[test]
    fn added_changed_and_dropped_columns() {
        let t = TableName::new("public", "orders");
        let source = [
            col("id", "bigint"),
            col("note", "text"),
            col("qty", "bigint"),
        ];
        let target = [
            col("id", "bigint"),
            col("qty", "integer"),
            col("old", "text"),
        ];
        let kinds: Vec<&str> = compare_columns(&t, &source, &target)
            .iter()
            .map(|d| d.kind)
            .collect();
        assert_eq!(kinds, ["missing_column", "type_differs", "extra_column"]);
        let fix = &compare_columns(&t, &source, &target)[0].fix;
        assert_eq!(
            fix,
            "ALTER TABLE \"public\".\"orders\" ADD COLUMN \"note\" text;"
        );
    }
}
