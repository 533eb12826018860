//! What the catalogs say: tables, sequences, roles, columns, settings.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use tokio_postgres::error::SqlState;

use super::{PgError, Server, TableName};
use crate::plan::Plan;

/// A table (ordinary or partitioned) as the catalogs describe it.
#[derive(Debug, Clone, Serialize)]
pub struct TableInfo {
    pub name: TableName,
    #[serde(skip)]
    pub oid: u32,
    #[serde(skip)]
    pub owner_oid: u32,
    pub owner: String,
    pub partitioned: bool,
    pub partition_of: Option<TableName>,
    pub unlogged: bool,
    pub estimated_rows: i64,
    pub bytes: i64,
    /// A primary key that can identify rows (not DEFERRABLE).
    pub has_primary_key: bool,
    /// `d` default, `n` nothing, `f` full, `i` index.
    #[serde(skip)]
    pub replica_identity: char,
    #[serde(skip)]
    pub replica_identity_index: Option<String>,
    /// A unique index on NOT NULL columns that could serve as replica identity.
    #[serde(skip)]
    pub unique_candidate: Option<String>,
    /// Columns (`name type`) whose type has no equality operator; REPLICA IDENTITY FULL
    /// cannot apply an UPDATE or DELETE to such a table.
    #[serde(skip)]
    pub columns_without_equality: Vec<String>,
    /// Columns of type `oid` or `lo` that may point at large objects.
    #[serde(skip)]
    pub large_object_columns: Vec<String>,
    /// `FOR VALUES ...` of a partition.
    #[serde(skip)]
    pub partition_bound: Option<String>,
}

impl TableInfo {
    /// How UPDATE and DELETE find their row on the target, or `None` when they cannot.
    pub fn identity(&self) -> Option<String> {
        match self.replica_identity {
            'd' if self.has_primary_key => Some("primary key".into()),
            'f' => Some("full".into()),
            'i' => Some(format!(
                "index {}",
                self.replica_identity_index.as_deref().unwrap_or("?")
            )),
            _ => None,
        }
    }
}

const TABLES_SQL: &str = r#"
SELECT n.nspname, c.relname, c.oid, c.relowner, pg_get_userbyid(c.relowner),
       c.relkind = 'p', c.relpersistence = 'u',
       pn.nspname, p.relname,
       CASE WHEN c.reltuples >= 0 THEN c.reltuples::int8 ELSE coalesce(s.n_live_tup, 0) END,
       coalesce(pg_total_relation_size(c.oid), 0),
       -- A DEFERRABLE primary key cannot identify rows for logical replication.
       EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = c.oid AND x.indisprimary AND x.indimmediate),
       c.relreplident::text,
       (SELECT x.indexrelid::regclass::text FROM pg_index x WHERE x.indrelid = c.oid AND x.indisreplident),
       (SELECT x.indexrelid::regclass::text FROM pg_index x
         WHERE x.indrelid = c.oid AND x.indisunique AND x.indimmediate AND x.indpred IS NULL AND x.indexprs IS NULL
           AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                            WHERE a.attrelid = c.oid AND a.attnum = ANY (x.indkey) AND NOT a.attnotnull)
         ORDER BY x.indexrelid LIMIT 1),
       ARRAY(SELECT quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                AND coalesce(nullif(t.typbasetype, 0),
                             CASE WHEN t.typelem <> 0 AND t.typlen = -1 THEN t.typelem END,
                             t.oid)
                    IN ('json'::regtype, 'xml'::regtype, 'point'::regtype, 'line'::regtype, 'lseg'::regtype,
                        'box'::regtype, 'path'::regtype, 'polygon'::regtype, 'circle'::regtype)),
       ARRAY(SELECT quote_ident(a.attname) FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                AND (t.oid = 'oid'::regtype OR t.typname = 'lo')),
       pg_get_expr(c.relpartbound, c.oid)
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_inherits i ON i.inhrelid = c.oid AND c.relispartition
  LEFT JOIN pg_class p ON p.oid = i.inhparent
  LEFT JOIN pg_namespace pn ON pn.oid = p.relnamespace
  LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
 WHERE c.relkind IN ('r', 'p')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname !~ '^pg_(toast|temp)'
   AND c.relpersistence <> 't'
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
 ORDER BY 1, 2
"#;

/// Every user table on a server (extension-owned and temporary tables left out).
pub async fn tables(server: &Server) -> Result<Vec<TableInfo>, PgError> {
    let rows = server.query("list tables", TABLES_SQL, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let parent_schema: Option<String> = r.get(7);
            let parent_name: Option<String> = r.get(8);
            let replident: String = r.get(12);
            TableInfo {
                name: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                oid: r.get(2),
                owner_oid: r.get(3),
                owner: r.get(4),
                partitioned: r.get(5),
                unlogged: r.get(6),
                partition_of: parent_schema
                    .zip(parent_name)
                    .map(|(s, n)| TableName::new(s, n)),
                estimated_rows: r.get(9),
                bytes: r.get(10),
                has_primary_key: r.get(11),
                replica_identity: replident.chars().next().unwrap_or('d'),
                replica_identity_index: r.get(13),
                unique_candidate: r.get(14),
                columns_without_equality: r.get(15),
                large_object_columns: r.get(16),
                partition_bound: r.get(17),
            }
        })
        .collect())
}

/// The tables a plan migrates, and the schemas that hold them.
#[derive(Debug, Clone)]
pub struct Selection {
    pub tables: Vec<TableInfo>,
    /// Schemas whose structure is copied.
    pub schemas: Vec<String>,
    /// Tables in those schemas that the plan leaves out (`pg_dump -T`).
    pub excluded: Vec<TableName>,
    /// Patterns that matched no table.
    pub unmatched_patterns: Vec<String>,
}

impl Selection {
    /// The tables the publication lists: partitions are covered by their root.
    pub fn published(&self) -> Vec<&TableInfo> {
        self.tables
            .iter()
            .filter(|t| t.partition_of.is_none())
            .collect()
    }

    /// Tables that hold rows (partitioned roots hold none themselves).
    pub fn leaves(&self) -> impl Iterator<Item = &TableInfo> {
        self.tables.iter().filter(|t| !t.partitioned)
    }

    pub fn names(&self) -> Vec<TableName> {
        self.tables.iter().map(|t| t.name.clone()).collect()
    }
}

/// Applies the plan's patterns. A partition comes with its whole partition tree, because a
/// partition cannot exist without its root nor a root be copied without its partitions.
pub fn select(plan: &Plan, all: Vec<TableInfo>) -> Selection {
    let parent_of: HashMap<TableName, TableName> = all
        .iter()
        .filter_map(|t| t.partition_of.clone().map(|p| (t.name.clone(), p)))
        .collect();
    let root_of = |name: &TableName| {
        let mut name = name.clone();
        while let Some(parent) = parent_of.get(&name) {
            name = parent.clone();
        }
        name
    };
    let chosen_roots: BTreeSet<TableName> = all
        .iter()
        .filter(|t| plan.selects(&t.name.schema, &t.name.name))
        .map(|t| root_of(&t.name))
        .collect();
    let unmatched_patterns = plan
        .sync
        .tables
        .iter()
        .filter(|p| !all.iter().any(|t| p.matches(&t.name.schema, &t.name.name)))
        .map(|p| p.to_string())
        .collect();
    let (tables, rest): (Vec<TableInfo>, Vec<TableInfo>) = all
        .into_iter()
        .partition(|t| chosen_roots.contains(&root_of(&t.name)));
    let schemas: BTreeSet<String> = tables.iter().map(|t| t.name.schema.clone()).collect();
    let excluded = rest
        .into_iter()
        .filter(|t| schemas.contains(&t.name.schema))
        .map(|t| t.name)
        .collect();
    Selection {
        tables,
        schemas: schemas.into_iter().collect(),
        excluded,
        unmatched_patterns,
    }
}

/// A sequence, and the table column that owns it (serial and identity columns).
#[derive(Debug, Clone, Serialize)]
pub struct SequenceInfo {
    pub name: TableName,
    pub owned_by: Option<TableName>,
}

/// Sequences in the selected schemas, except those owned by tables the plan leaves out.
pub async fn sequences(
    server: &Server,
    selection: &Selection,
) -> Result<Vec<SequenceInfo>, PgError> {
    let sql = r#"
        SELECT s.schemaname::text, s.sequencename::text, tn.nspname, t.relname
          FROM pg_sequences s
          JOIN pg_namespace n ON n.nspname = s.schemaname
          JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.sequencename
          LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
                               AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
          LEFT JOIN pg_class t ON t.oid = d.refobjid
          LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
         WHERE s.schemaname = ANY ($1)
         ORDER BY 1, 2"#;
    let rows = server
        .query("list sequences", sql, &[&selection.schemas])
        .await?;
    let excluded: BTreeSet<&TableName> = selection.excluded.iter().collect();
    Ok(rows
        .iter()
        .map(|r| {
            let owner_schema: Option<String> = r.get(2);
            let owner_table: Option<String> = r.get(3);
            SequenceInfo {
                name: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                owned_by: owner_schema
                    .zip(owner_table)
                    .map(|(s, t)| TableName::new(s, t)),
            }
        })
        .filter(|s| s.owned_by.as_ref().is_none_or(|t| !excluded.contains(t)))
        .collect())
}

/// A role as `CREATE ROLE` needs it.
#[derive(Debug, Clone, Serialize)]
pub struct RoleInfo {
    pub name: String,
    #[serde(skip)]
    pub attributes: Vec<&'static str>,
    #[serde(skip)]
    pub connection_limit: i32,
    #[serde(skip)]
    pub valid_until: Option<String>,
    /// The password verifier, when the coordinator may read `pg_authid`.
    #[serde(skip)]
    pub password: Option<String>,
    /// Roles this role is a member of (within the same set).
    pub member_of: Vec<String>,
}

/// Roles that own or hold rights on anything in the selected schemas, and the roles they are
/// members of. Returns the roles and whether their password verifiers could be read.
pub async fn roles(
    server: &Server,
    selection: &Selection,
) -> Result<(Vec<RoleInfo>, bool), PgError> {
    let sql = r#"
        WITH RECURSIVE nsp AS (SELECT oid FROM pg_namespace WHERE nspname = ANY ($1)),
        objs AS (
            SELECT c.relowner AS owner, c.relacl AS acl FROM pg_class c
             WHERE c.relnamespace IN (SELECT oid FROM nsp) AND (c.relkind NOT IN ('r', 'p') OR c.oid = ANY ($2))
            UNION ALL SELECT n.nspowner, n.nspacl FROM pg_namespace n WHERE n.oid IN (SELECT oid FROM nsp)
            UNION ALL SELECT p.proowner, p.proacl FROM pg_proc p WHERE p.pronamespace IN (SELECT oid FROM nsp)
            UNION ALL SELECT t.typowner, t.typacl FROM pg_type t WHERE t.typnamespace IN (SELECT oid FROM nsp)
        ),
        acls AS (
            SELECT acl FROM objs WHERE acl IS NOT NULL
            UNION ALL SELECT a.attacl FROM pg_attribute a WHERE a.attrelid = ANY ($2) AND a.attacl IS NOT NULL
            UNION ALL SELECT d.defaclacl FROM pg_default_acl d WHERE d.defaclnamespace IN (SELECT oid FROM nsp)
        ),
        direct AS (
            SELECT owner AS role FROM objs
            UNION SELECT (aclexplode(acl)).grantee FROM acls
            UNION SELECT (aclexplode(acl)).grantor FROM acls
            UNION SELECT d.defaclrole FROM pg_default_acl d WHERE d.defaclnamespace IN (SELECT oid FROM nsp)
            UNION SELECT unnest(p.polroles) FROM pg_policy p WHERE p.polrelid = ANY ($2)
        ),
        -- Roles that get their rights through a group (the application's login roles)...
        members AS (
            SELECT role FROM direct WHERE role <> 0
            UNION SELECT m.member FROM pg_auth_members m JOIN members g ON m.roleid = g.role
        ),
        -- ...and every group they belong to, so that their memberships can be granted.
        closure AS (
            SELECT role FROM members
            UNION SELECT m.roleid FROM pg_auth_members m JOIN closure c ON m.member = c.role
        )
        SELECT r.rolname, r.rolsuper, r.rolinherit, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin,
               r.rolreplication, r.rolbypassrls, r.rolconnlimit, r.rolvaliduntil::text,
               ARRAY(SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                      WHERE m.member = r.oid AND m.roleid IN (SELECT role FROM closure) ORDER BY 1)
          FROM pg_roles r
         WHERE r.oid IN (SELECT role FROM closure) AND r.rolname !~ '^pg_'
         ORDER BY r.rolname"#;
    let oids: Vec<u32> = selection.tables.iter().map(|t| t.oid).collect();
    let rows = server
        .query("list roles", sql, &[&selection.schemas, &oids])
        .await?;
    let mut roles: Vec<RoleInfo> = rows
        .iter()
        .map(|r| {
            let flags: [(usize, &'static str, &'static str); 7] = [
                (1, "SUPERUSER", "NOSUPERUSER"),
                (2, "INHERIT", "NOINHERIT"),
                (3, "CREATEROLE", "NOCREATEROLE"),
                (4, "CREATEDB", "NOCREATEDB"),
                (5, "LOGIN", "NOLOGIN"),
                (6, "REPLICATION", "NOREPLICATION"),
                (7, "BYPASSRLS", "NOBYPASSRLS"),
            ];
            RoleInfo {
                name: r.get(0),
                attributes: flags
                    .iter()
                    .map(|&(i, yes, no)| if r.get(i) { yes } else { no })
                    .collect(),
                connection_limit: r.get(8),
                valid_until: r.get(9),
                password: None,
                member_of: r.get(10),
            }
        })
        .collect();
    let names: Vec<String> = roles.iter().map(|r| r.name.clone()).collect();
    let passwords = server
        .query(
            "read password verifiers",
            "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY ($1)",
            &[&names],
        )
        .await;
    let readable = match passwords {
        Ok(rows) => {
            let verifiers: HashMap<String, Option<String>> =
                rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            for role in &mut roles {
                role.password = verifiers.get(&role.name).cloned().flatten();
            }
            true
        }
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => false,
        Err(e) => return Err(e),
    };
    Ok((roles, readable))
}

/// Names of all roles on a server.
pub async fn role_names(server: &Server) -> Result<BTreeSet<String>, PgError> {
    let rows = server
        .query("list roles", "SELECT rolname FROM pg_roles", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Names of all schemas on a server.
pub async fn schema_names(server: &Server) -> Result<BTreeSet<String>, PgError> {
    let rows = server
        .query("list schemas", "SELECT nspname FROM pg_namespace", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A column as drift detection compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_sql: String,
    pub not_null: bool,
    /// Where the column's value comes from when a row does not give it.
    pub fill: Fill,
}

/// How PostgreSQL fills a column a row leaves out. The kinds exclude each other: an identity
/// or generated column cannot also have a DEFAULT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fill {
    /// No default: NULL.
    Nothing,
    /// `DEFAULT expr`, the expression as `pg_get_expr` deparses it.
    Default(String),
    /// `GENERATED {ALWAYS|BY DEFAULT} AS IDENTITY`.
    Identity { always: bool },
    /// `GENERATED ALWAYS AS (expr) STORED`.
    Generated(String),
}

impl Fill {
    /// Reads `attidentity`, `attgenerated` and the deparsed `adbin` of one column.
    fn from_catalog(identity: i8, generated: i8, expr: Option<String>) -> Fill {
        match (identity as u8, generated as u8, expr) {
            (b'a', _, _) => Fill::Identity { always: true },
            (b'd', _, _) => Fill::Identity { always: false },
            (_, b's', Some(expr)) => Fill::Generated(expr),
            (_, _, Some(expr)) => Fill::Default(expr),
            _ => Fill::Nothing,
        }
    }
}

/// Columns of the given tables, in order, keyed by table.
pub async fn columns(
    server: &Server,
    tables: &[TableName],
) -> Result<BTreeMap<TableName, Vec<Column>>, PgError> {
    let schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let sql = r#"
        SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               a.attidentity, a.attgenerated, pg_get_expr(d.adbin, d.adrelid)
          FROM unnest($1::text[], $2::text[]) AS wanted(schema, name)
          JOIN pg_namespace n ON n.nspname = wanted.schema
          JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = wanted.name
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         ORDER BY 1, 2, a.attnum"#;
    let rows = server
        .query("list columns", sql, &[&schemas, &names])
        .await?;
    let mut out: BTreeMap<TableName, Vec<Column>> = BTreeMap::new();
    for r in &rows {
        out.entry(TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .or_default()
            .push(Column {
                name: r.get(2),
                type_sql: r.get(3),
                not_null: r.get(4),
                fill: Fill::from_catalog(r.get(5), r.get(6), r.get(7)),
            });
    }
    Ok(out)
}

/// Current values of server settings by name.
pub async fn settings(server: &Server, names: &[&str]) -> Result<HashMap<String, String>, PgError> {
    let rows = server
        .query(
            "read settings",
            "SELECT name, setting FROM pg_settings WHERE name = ANY ($1)",
            &[&names],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
