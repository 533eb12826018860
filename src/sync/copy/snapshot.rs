//! The copy's one consistent cut: the slot is created through the replication protocol,
//! exporting the snapshot at its consistent point, and an *anchor* transaction on the source
//! imports it, share-locks every copied table and exports it again for the workers.
//!
//! Why the anchor: a snapshot exported by `CREATE_REPLICATION_SLOT` lives only while its
//! walsender stays idle, and a worker whose source connection drops must import it again to
//! retry its chunk. A snapshot exported by `pg_export_snapshot()` lives as long as the
//! transaction that exported it, so the anchor's lets workers come and go for the whole copy,
//! and `pg_dump --snapshot` reads the schema in it too. The walsender is still held idle until
//! the copy ends, so nothing the copy depends on is let go early.

use super::raw::Raw;
use crate::pg::{sql, PgError, Server, Side, TableName};
use crate::plan::Endpoint;

/// What `pg_stat_replication` and `pg_stat_activity` call the copy's connections.
pub const APPLICATION_NAME: &str = "switchyard-copy";

/// The slot made for the subscription, with its snapshot still exported.
pub struct ExportedSlot {
    /// Held idle: the exported snapshot lives while it does.
    _walsender: Raw,
    /// Where streaming starts: every transaction that committed before is in the snapshot.
    pub consistent_point: String,
    pub snapshot: String,
}

/// Creates the logical slot `slot` for pgoutput and exports its snapshot. Like
/// `CREATE SUBSCRIPTION`, it waits for the transactions open on the source to end.
pub async fn create_exported_slot(source: &Endpoint, slot: &str) -> Result<ExportedSlot, PgError> {
    let mut walsender = Raw::connect(Side::Source, source, Some(APPLICATION_NAME)).await?;
    let answer = walsender
        .simple(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            sql::ident(slot)
        ))
        .await?;
    // slot_name, consistent_point, snapshot_name, output_plugin
    match answer.rows.first().map(Vec::as_slice) {
        Some([_, Some(lsn), Some(snapshot), ..]) => Ok(ExportedSlot {
            consistent_point: lsn.clone(),
            snapshot: snapshot.clone(),
            _walsender: walsender,
        }),
        _ => Err(PgError::Tool(
            "source: CREATE_REPLICATION_SLOT answered without a snapshot".into(),
        )),
    }
}

/// The anchor: a source transaction in the slot's snapshot, holding every copied table
/// share-locked (as pg_dump does: nothing can rewrite, truncate or drop one between chunks)
/// and exporting the snapshot for the workers and pg_dump.
pub struct Anchor {
    server: Server,
    /// The snapshot the workers import.
    pub snapshot: String,
}

/// `SET TRANSACTION SNAPSHOT` takes a literal, not a parameter.
pub fn import_statement(snapshot: &str) -> String {
    format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
        sql::literal(snapshot)
    )
}

impl Anchor {
    pub async fn hold(
        source: &Endpoint,
        slot: &ExportedSlot,
        tables: &[TableName],
    ) -> Result<Anchor, PgError> {
        let server = Server::connect(Side::Source, source).await?;
        server
            .execute(
                "import the slot's snapshot",
                &import_statement(&slot.snapshot),
            )
            .await?;
        if !tables.is_empty() {
            let names: Vec<String> = tables.iter().map(TableName::sql).collect();
            server
                .execute(
                    "share-lock the copied tables",
                    &format!("LOCK TABLE {} IN ACCESS SHARE MODE", names.join(", ")),
                )
                .await?;
        }
        let row = server
            .query_one("export the snapshot", "SELECT pg_export_snapshot()", &[])
            .await?;
        Ok(Anchor {
            snapshot: row.get(0),
            server,
        })
    }

    /// Whether the anchor's connection still holds the snapshot.
    pub fn alive(&self) -> bool {
        !self.server.client.is_closed()
    }
}
