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

use bytes::{Buf, BytesMut};
use postgres_protocol::message::frontend;

use crate::pg::{sql, PgError, Server, Side, TableName};
use crate::plan::Endpoint;
use crate::proxy::pool::server::{ServerConn, ServerTarget, ServerTls};
use crate::proxy::protocol::backend::{error_fields, messages};

/// What `pg_stat_replication` and `pg_stat_activity` call the copy's connections.
pub const APPLICATION_NAME: &str = "switchyard-copy";

/// The slot made for the subscription, with its snapshot still exported.
pub struct ExportedSlot {
    /// Held idle: the exported snapshot lives while it does.
    _walsender: ServerConn,
    /// Where streaming starts: every transaction that committed before is in the snapshot.
    pub consistent_point: String,
    pub snapshot: String,
}

/// Creates the logical slot `slot` for pgoutput and exports its snapshot. Like
/// `CREATE SUBSCRIPTION`, it waits for the transactions open on the source to end.
pub async fn create_exported_slot(source: &Endpoint, slot: &str) -> Result<ExportedSlot, PgError> {
    let url = &source.url;
    let (_, password) = crate::pg::coordinator_conninfo(url);
    let tls = match url.config().get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => None,
        mode => Some(ServerTls {
            connector: crate::proxy::tls::connector()
                .map_err(|e| PgError::Tool(format!("TLS towards the source: {e}")))?,
            name: crate::proxy::tls::server_name(&url.host())
                .map_err(|e| PgError::Tool(format!("TLS towards the source: {e}")))?,
            required: mode == tokio_postgres::config::SslMode::Require,
        }),
    };
    let target = ServerTarget {
        host: url.host(),
        port: url.port(),
        database: url.dbname().to_string(),
        user: url.user().to_string(),
        password: password.unwrap_or_default(),
        tls,
        pids: Default::default(),
        max_prepared_statements: 0,
        replication: Some(APPLICATION_NAME),
    };
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        PgError::Tool(format!(
            "source: {what} through the replication protocol: {e}"
        ))
    };
    let mut conn = ServerConn::connect(&target, source.connect_timeout.0)
        .await
        .map_err(|e| failed("connect", &e))?;
    let statement = format!(
        "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
        sql::ident(slot)
    );
    let mut buf = BytesMut::new();
    frontend::query(&statement, &mut buf).map_err(|e| failed("create the slot", &e))?;
    conn.send(buf.freeze())
        .await
        .map_err(|e| failed("create the slot", &e))?;
    let mut row: Option<Vec<Option<String>>> = None;
    let mut error = None;
    'answer: loop {
        let frame = conn
            .recv()
            .await
            .map_err(|e| failed("create the slot", &e))?;
        // The connection hands over runs of messages at once.
        for message in messages(&frame) {
            let body = message.get(5..).unwrap_or_default();
            match message[0] {
                b'D' => row = Some(data_row(body)),
                b'E' => {
                    let (code, text) = error_fields(body);
                    error = Some(format!("{text} ({code})"));
                }
                b'Z' => break 'answer,
                _ => {}
            }
        }
    }
    if let Some(error) = error {
        return Err(failed("create the slot", &error));
    }
    // slot_name, consistent_point, snapshot_name, output_plugin
    match row.as_deref() {
        Some([_, Some(lsn), Some(snapshot), ..]) => Ok(ExportedSlot {
            consistent_point: lsn.clone(),
            snapshot: snapshot.clone(),
            _walsender: conn,
        }),
        _ => Err(failed("create the slot", &"no snapshot in the answer")),
    }
}

/// A DataRow's columns as text.
fn data_row(mut body: &[u8]) -> Vec<Option<String>> {
    let mut columns = Vec::new();
    if body.len() < 2 {
        return columns;
    }
    let count = body.get_i16();
    for _ in 0..count {
        if body.len() < 4 {
            break;
        }
        let len = body.get_i32();
        if len < 0 {
            columns.push(None);
            continue;
        }
        let len = (len as usize).min(body.len());
        columns.push(Some(String::from_utf8_lossy(&body[..len]).into_owned()));
        body.advance(len);
    }
    columns
}

/// The anchor: a source transaction in the slot's snapshot, holding every copied table
/// share-locked (as pg_dump does: nothing can rewrite, truncate or drop one between chunks)
/// and exporting the snapshot for the workers and pg_dump.
pub struct Anchor {
    _server: Server,
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
            _server: server,
        })
    }

    /// Whether the anchor's connection still holds the snapshot.
    pub fn alive(&self) -> bool {
        !self._server.client.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_row_reads_as_text_columns() {
        let mut body = Vec::new();
        body.extend_from_slice(&3i16.to_be_bytes());
        for value in [Some("slot"), None, Some("0/16B3748")] {
            match value {
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v.as_bytes());
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        assert_eq!(
            data_row(&body),
            vec![Some("slot".into()), None, Some("0/16B3748".into())]
        );
        // A short body never panics.
        assert_eq!(data_row(&body[..5]), vec![None::<String>; 0]);
    }
}
