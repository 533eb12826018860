//! Sequence values: logical replication does not carry them, so they are copied on demand
//! (`switchyard sync --sequences`, and by the cutover inside the pause). Two round trips in all.

use serde::Serialize;

use crate::pg::catalog::{self, Selection};
use crate::pg::{sql, PgError, Server};

#[derive(Debug, Clone, Serialize)]
pub struct SequenceCopy {
    pub name: String,
    pub last_value: i64,
    /// False when `nextval` will return `last_value` itself (never used, or `setval(.., false)`).
    pub is_called: bool,
}

/// Copies every selected sequence's state (`last_value` and `is_called`) from `from` to `to`.
pub async fn copy_sequences(
    from: &Server,
    to: &Server,
    selection: &Selection,
) -> Result<Vec<SequenceCopy>, PgError> {
    let sequences = catalog::sequences(from, selection).await?;
    if sequences.is_empty() {
        return Ok(Vec::new());
    }
    // One round trip for all of them: pg_sequences hides last_value when is_called is false.
    let read: Vec<String> = sequences
        .iter()
        .map(|s| {
            format!(
                "SELECT {}::text, last_value, is_called FROM {}",
                sql::literal(&s.name.to_string()),
                s.name.sql()
            )
        })
        .collect();
    let rows = from
        .query("read sequence values", &read.join(" UNION ALL "), &[])
        .await?;
    let copies: Vec<SequenceCopy> = rows
        .iter()
        .map(|r| SequenceCopy {
            name: r.get(0),
            last_value: r.get(1),
            is_called: r.get(2),
        })
        .collect();
    let statements: Vec<String> = sequences
        .iter()
        .zip(&copies)
        .map(|(s, c)| {
            format!(
                "SELECT setval({}, {}, {});",
                sql::literal(&s.name.sql()),
                c.last_value,
                c.is_called
            )
        })
        .collect();
    to.execute("set sequence values", &statements.join("\n"))
        .await?;
    Ok(copies)
}
