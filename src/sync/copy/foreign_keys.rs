//! Foreign keys between copied tables, after the rows and the indexes: added `NOT VALID`
//! (instant: no scan, and a brief lock), then validated, several at once. Validation takes
//! only a SHARE UPDATE EXCLUSIVE lock, so it would not stop replication's writes either.

use futures_util::stream::{self, StreamExt, TryStreamExt};

use crate::pg::{PgError, Server, Side, TableName};
use crate::plan::Plan;

/// Each foreign key declared on a copied table (on a partitioned root, not again on each
/// partition), with the referenced names qualified in full (the empty `search_path`).
const FOREIGN_KEYS: &str =
    "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), quote_ident(con.conname),
       pg_get_constraintdef(con.oid), con.convalidated, c.relkind = 'p'
  FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE con.contype = 'f' AND con.conparentid = 0 AND con.conrelid = ANY ($1::text[]::regclass[])
 ORDER BY 1, 2";

#[derive(Debug, Clone, PartialEq)]
pub struct ForeignKey {
    pub table: String,
    pub name: String,
    pub definition: String,
    /// Validated on the source: validate it on the target too.
    pub validated: bool,
    /// On a partitioned table, which cannot take a `NOT VALID` foreign key before
    /// PostgreSQL 18: added validating.
    pub partitioned: bool,
}

impl ForeignKey {
    /// The statement that adds it, and the one that validates it afterwards, if any.
    pub fn statements(&self) -> (String, Option<String>) {
        let deferred = self.validated && !self.partitioned;
        let add = format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {}{}",
            self.table,
            self.name,
            self.definition,
            if deferred { " NOT VALID" } else { "" }
        );
        let validate = deferred.then(|| {
            format!(
                "ALTER TABLE {} VALIDATE CONSTRAINT {}",
                self.table, self.name
            )
        });
        (add, validate)
    }
}

pub async fn read(plan: &Plan, tables: &[TableName]) -> Result<Vec<ForeignKey>, PgError> {
    let source = Server::connect(Side::Source, &plan.source).await?;
    source
        .execute("qualify names in full", "SET search_path = ''")
        .await?;
    let names: Vec<String> = tables.iter().map(TableName::sql).collect();
    let rows = source
        .query("list foreign keys", FOREIGN_KEYS, &[&names])
        .await?;
    Ok(rows
        .iter()
        .map(|r| ForeignKey {
            table: r.get(0),
            name: r.get(1),
            definition: r.get(2),
            validated: r.get(3),
            partitioned: r.get(4),
        })
        .collect())
}

/// Adds every foreign key `NOT VALID`, then validates them `jobs` at a time.
pub async fn add(plan: &Plan, keys: &[ForeignKey], jobs: u32) -> Result<(), PgError> {
    if keys.is_empty() {
        return Ok(());
    }
    let target = Server::connect(Side::Target, &plan.target).await?;
    let mut validations = Vec::new();
    for key in keys {
        let (add, validate) = key.statements();
        target.execute("add a foreign key", &add).await?;
        validations.extend(validate);
    }
    drop(target);
    stream::iter(validations)
        .map(|statement| async move {
            let target = Server::connect(Side::Target, &plan.target).await?;
            target
                .execute(
                    "validate a foreign key",
                    &format!("SET maintenance_work_mem = '512MB'; {statement}"),
                )
                .await
        })
        .buffer_unordered(jobs.max(1) as usize)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_added_not_valid_then_validated_unless_it_cannot_be() {
        let key = ForeignKey {
            table: "public.orders".into(),
            name: "orders_customer_fkey".into(),
            definition: "FOREIGN KEY (customer_id) REFERENCES public.customers(id)".into(),
            validated: true,
            partitioned: false,
        };
        assert_eq!(
            key.statements(),
            (
                "ALTER TABLE public.orders ADD CONSTRAINT orders_customer_fkey FOREIGN KEY (customer_id) REFERENCES public.customers(id) NOT VALID".into(),
                Some("ALTER TABLE public.orders VALIDATE CONSTRAINT orders_customer_fkey".into())
            )
        );
        let on_partitioned = ForeignKey {
            partitioned: true,
            ..key.clone()
        };
        assert!(!on_partitioned.statements().0.contains("NOT VALID"));
        assert_eq!(on_partitioned.statements().1, None);
        // Not valid on the source (its definition says so): left not valid.
        let not_valid = ForeignKey {
            validated: false,
            definition: format!("{} NOT VALID", key.definition),
            ..key
        };
        assert_eq!(not_valid.statements().1, None);
        assert!(!not_valid.statements().0.ends_with("NOT VALID NOT VALID"));
    }
}
