//! Sequence values: logical replication does not carry them, so they are copied on demand
//! (`switchyard sync --sequences`, and by the cutover inside the pause). Two round trips in all.

use serde::Serialize;

use crate::pg::catalog::{self, Selection};
use crate::pg::{sql, PgError, Server};

#[derive(Debug, Clone, Serialize)]
pub struct SequenceCopy {
    pub name: String,
    /// `None`: never used on the source, so restarted on the other side.
    pub value: Option<i64>,
}

/// Copies every selected sequence's value from `from` to `to`.
pub async fn copy_sequences(
    from: &Server,
    to: &Server,
    selection: &Selection,
) -> Result<Vec<SequenceCopy>, PgError> {
    let sequences = catalog::sequences(from, selection).await?;
    if sequences.is_empty() {
        return Ok(Vec::new());
    }
    let statements: Vec<String> = sequences
        .iter()
        .map(|s| match s.last_value {
            Some(value) => format!(
                "SELECT setval({}, {value}, true);",
                sql::literal(&s.name.sql())
            ),
            None => format!("ALTER SEQUENCE {} RESTART;", s.name.sql()),
        })
        .collect();
    to.execute("set sequence values", &statements.join("\n"))
        .await?;
    Ok(sequences
        .into_iter()
        .map(|s| SequenceCopy {
            name: s.name.to_string(),
            value: s.last_value,
        })
        .collect())
}
