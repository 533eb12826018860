//! The server's half of a cacheability decision: the statement's relations resolved to base
//! tables by OID (through views, with the client's `search_path`), and every function and
//! operator it calls checked in `pg_proc` / `pg_operator`.

use std::collections::BTreeSet;

use tokio_postgres::Client;

use super::analyze::{Refusal, Shape};
use crate::pg::sql::ident as quote_ident;
use crate::plan::CacheSettings;

/// A relation name resolved as the client would resolve it (its `search_path` is set in the
/// same transaction, `SET LOCAL`).
const RESOLVE: &str = "SELECT to_regclass(CASE WHEN $1 = '' THEN quote_ident($2) \
     ELSE quote_ident($1) || '.' || quote_ident($2) END)::oid";

/// What the cache needs to know of one relation.
const RELATION: &str = "SELECT n.nspname::text, c.relname::text, c.relkind::text, \
     c.relpersistence::text, c.relrowsecurity, \
     EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid \
             AND (i.indisprimary OR i.indisreplident)) OR c.relreplident = 'f', \
     has_table_privilege($2::text::name, c.oid, 'SELECT'), \
     EXISTS (SELECT 1 FROM pg_publication_tables p WHERE p.pubname = $3 \
             AND p.schemaname = n.nspname AND p.tablename = c.relname) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1";

/// Tables that inherit from a relation (partitions included), at any depth: a read of the
/// parent reads them too.
const DESCENDANTS: &str = "WITH RECURSIVE d(oid) AS ( \
     SELECT inhrelid FROM pg_inherits WHERE inhparent = $1 \
     UNION SELECT i.inhrelid FROM pg_inherits i JOIN d ON i.inhparent = d.oid) \
     SELECT oid FROM d";

/// What a view's rewrite rule uses: relations, functions and operators, by OID.
const VIEW_USES: &str = "SELECT DISTINCT d.refclassid::regclass::text, d.refobjid \
     FROM pg_rewrite r JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid \
     WHERE r.ev_class = $1 AND NOT (d.refclassid = 'pg_class'::regclass AND d.refobjid = $1)";

/// Function names with an overload that is not IMMUTABLE.
const NOT_IMMUTABLE_FUNCTIONS: &str = "SELECT DISTINCT proname::text, provolatile::text \
     FROM pg_proc WHERE proname = ANY($1) AND provolatile <> 'i' ORDER BY 1";

/// Function names no function has.
const UNKNOWN_FUNCTIONS: &str = "SELECT n FROM unnest($1::text[]) n \
     WHERE NOT EXISTS (SELECT 1 FROM pg_proc WHERE proname = n) ORDER BY 1";

/// Operator names with an overload that is volatile, or stable and not built in. A built-in
/// STABLE operator (`=` between `date` and `timestamptz` depends on `TimeZone`) depends only
/// on settings that are part of the cache key.
const UNSAFE_OPERATORS: &str = "SELECT DISTINCT o.oprname::text FROM pg_operator o \
     JOIN pg_proc p ON p.oid = o.oprcode JOIN pg_namespace n ON n.oid = p.pronamespace \
     WHERE o.oprname = ANY($1) AND (p.provolatile = 'v' \
       OR (p.provolatile = 's' AND n.nspname <> 'pg_catalog')) ORDER BY 1";

const FUNCTION_BY_OID: &str = "SELECT proname::text, provolatile::text FROM pg_proc WHERE oid = $1";

const OPERATOR_BY_OID: &str = "SELECT o.oprname::text, p.provolatile::text, n.nspname::text \
     FROM pg_operator o JOIN pg_proc p ON p.oid = o.oprcode \
     JOIN pg_namespace n ON n.oid = p.pronamespace WHERE o.oid = $1";

/// The decision's inputs besides the statement.
pub struct Asker<'a> {
    pub role: &'a str,
    /// The client's `search_path`, `None` for the server's default.
    pub search_path: Option<&'a str>,
    pub settings: &'a CacheSettings,
    pub publication: &'a str,
}

/// The tables whose versions gate a cached answer of `shape` (the relations read, views
/// replaced by what they read, by schema-qualified name: the same on both servers, so that
/// versions and answers stay valid across a switch), or why it cannot be cached. `Err(Ok(refusal))` is a
/// decision; `Err(Err(e))` means the catalog could not be asked.
pub async fn decide(
    client: &mut Client,
    shape: &Shape,
    asker: &Asker<'_>,
) -> Result<Result<Vec<String>, Refusal>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    if let Some(path) = asker.search_path {
        // `$user` means the client's role, not the invalidator's.
        let path = path
            .replace("\"$user\"", &quote_ident(asker.role))
            .replace("$user", &quote_ident(asker.role));
        tx.batch_execute(&format!("SET LOCAL search_path TO {path}"))
            .await?;
    }
    let functions: Vec<&str> = shape.functions.iter().map(String::as_str).collect();
    if !functions.is_empty() {
        let unknown = tx.query(UNKNOWN_FUNCTIONS, &[&functions]).await?;
        if let Some(row) = unknown.first() {
            return Ok(Err(format!(
                "calls {}, which is not a known function",
                row.get::<_, String>(0)
            )));
        }
        let rows = tx.query(NOT_IMMUTABLE_FUNCTIONS, &[&functions]).await?;
        if let Some(row) = rows.first() {
            return Ok(Err(format!(
                "calls {}, which is {} (only IMMUTABLE functions are cached)",
                row.get::<_, String>(0),
                volatility(&row.get::<_, String>(1))
            )));
        }
    }
    let operators: Vec<&str> = shape.operators.iter().map(String::as_str).collect();
    if !operators.is_empty() {
        let rows = tx.query(UNSAFE_OPERATORS, &[&operators]).await?;
        if let Some(row) = rows.first() {
            return Ok(Err(format!(
                "uses operator {}, which has a volatile or user-defined stable overload",
                row.get::<_, String>(0)
            )));
        }
    }
    let mut named = Vec::new();
    for relation in &shape.relations {
        let oid: Option<u32> = tx
            .query_one(RESOLVE, &[&relation.schema, &relation.name])
            .await?
            .get(0);
        let Some(oid) = oid else {
            let shown = if relation.schema.is_empty() {
                relation.name.clone()
            } else {
                format!("{}.{}", relation.schema, relation.name)
            };
            return Ok(Err(format!(
                "reads {shown}, which does not exist for this role's search_path"
            )));
        };
        named.push(oid);
    }
    let mut gates = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut todo: Vec<(u32, bool)> = named.into_iter().map(|oid| (oid, true)).collect();
    while let Some((oid, named_by_client)) = todo.pop() {
        if !seen.insert(oid) {
            continue;
        }
        let row = tx
            .query_one(RELATION, &[&oid, &asker.role, &asker.publication])
            .await?;
        let (schema, name, kind, persistence): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let (row_security, identity, select, published): (bool, bool, bool, bool) =
            (row.get(4), row.get(5), row.get(6), row.get(7));
        let shown = format!("{schema}.{name}");
        if named_by_client && !select {
            return Ok(Err(format!("the role may not SELECT from {shown}")));
        }
        if matches!(
            schema.as_str(),
            "pg_catalog" | "information_schema" | "pg_toast"
        ) {
            return Ok(Err(format!("reads the system catalog {shown}")));
        }
        match persistence.as_str() {
            "t" => return Ok(Err(format!("reads the temporary table {shown}"))),
            "u" => {
                return Ok(Err(format!(
                    "reads the unlogged table {shown} (its writes are not in the WAL)"
                )))
            }
            _ => {}
        }
        if row_security {
            return Ok(Err(format!("reads {shown}, which has row-level security")));
        }
        match kind.as_str() {
            "v" => {
                for use_row in tx.query(VIEW_USES, &[&oid]).await? {
                    let (class, used): (String, u32) = (use_row.get(0), use_row.get(1));
                    match class.as_str() {
                        "pg_class" => todo.push((used, false)),
                        "pg_proc" => {
                            let f = tx.query_one(FUNCTION_BY_OID, &[&used]).await?;
                            let volatility_code: String = f.get(1);
                            if volatility_code != "i" {
                                return Ok(Err(format!(
                                    "reads the view {shown}, which calls {}, which is {}",
                                    f.get::<_, String>(0),
                                    volatility(&volatility_code)
                                )));
                            }
                        }
                        "pg_operator" => {
                            let o = tx.query_one(OPERATOR_BY_OID, &[&used]).await?;
                            let (op, v, ns): (String, String, String) =
                                (o.get(0), o.get(1), o.get(2));
                            if v == "v" || (v == "s" && ns != "pg_catalog") {
                                return Ok(Err(format!(
                                    "reads the view {shown}, which uses operator {op} ({})",
                                    volatility(&v)
                                )));
                            }
                        }
                        _ => {}
                    }
                }
                continue;
            }
            "r" | "p" => {}
            "m" => return Ok(Err(format!("reads the materialized view {shown}"))),
            "S" => return Ok(Err(format!("reads the sequence {shown}"))),
            "f" => return Ok(Err(format!("reads the foreign table {shown}"))),
            other => return Ok(Err(format!("reads {shown}, a relation of kind {other}"))),
        }
        if !asker.settings.covers(&schema, &name) {
            return Ok(Err(format!(
                "reads {shown}, which [proxy.cache] tables/exclude leave out"
            )));
        }
        if kind == "r" {
            if !identity {
                return Ok(Err(format!(
                    "reads {shown}, which has neither a primary key nor a replica identity"
                )));
            }
            if !published {
                return Ok(Err(format!(
                    "reads {shown}, which is not in the cache's publication (run `switchyard cache setup`)"
                )));
            }
        }
        gates.insert(table_key(&schema, &name));
        for child in tx.query(DESCENDANTS, &[&oid]).await? {
            // Checked like the parent: a read of the parent reads them. Their writes bump
            // the parent's version (the invalidator bumps every ancestor).
            todo.push((child.get(0), false));
        }
    }
    tx.commit().await?;
    // Only the relations the client named or its views read gate the answer; descendants'
    // writes reach their ancestors' versions.
    Ok(Ok(gates.into_iter().collect()))
}

fn volatility(code: &str) -> &'static str {
    match code {
        "v" => "VOLATILE",
        "s" => "STABLE",
        _ => "IMMUTABLE",
    }
}

/// A table as the cache's version keys name it: `"schema"."table"`.
pub fn table_key(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}
