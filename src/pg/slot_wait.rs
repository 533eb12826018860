//! What a logical slot being created waits for, said while it waits.
//!
//! Creating a logical slot (`CREATE_REPLICATION_SLOT`, `pg_create_logical_replication_slot`)
//! waits until every transaction that has written, in any database of the server's cluster,
//! has ended: the slot needs a start where no change is half seen. One forgotten `idle in
//! transaction` session makes it wait for hours, and the tools our users know wait without a
//! word. [`report_while`] runs the creation and, while it waits, names those transactions
//! every few seconds, read on a second connection.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use super::{PgError, Server, Side};
use crate::plan::Endpoint;

/// The first report comes after this long: most slots are made in well under it.
const FIRST_REPORT: Duration = Duration::from_secs(3);
/// Then one every this long, for as long as the creation waits.
const EVERY: Duration = Duration::from_secs(10);
/// A report that cannot connect or read in this long is skipped (the creation goes on).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The oldest transactions holding an xid (the ones a slot waits for), ours excepted, and
/// prepared transactions (which hold one with no session to show). `query` reads
/// `<insufficient privilege>` for another role's sessions without `pg_read_all_stats`: the
/// pid and the database still say where to look.
const OPEN_WRITERS: &str = "
    SELECT pid, database, who, state, seconds, query FROM (
        SELECT pid, coalesce(datname::text, '') AS database,
               coalesce(nullif(application_name, ''), usename::text, '') AS who,
               coalesce(state, '') AS state,
               extract(epoch FROM clock_timestamp() - xact_start)::float8 AS seconds,
               left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), 80) AS query,
               xact_start AS since
          FROM pg_stat_activity
         WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
        UNION ALL
        SELECT NULL, database::text, owner::text, 'prepared',
               extract(epoch FROM clock_timestamp() - prepared)::float8, gid, prepared
          FROM pg_prepared_xacts
    ) open ORDER BY since LIMIT 3";

/// A transaction that has written and is still open.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenWriter {
    /// `None` for a prepared transaction (then `query` is its gid).
    pub pid: Option<i32>,
    pub database: String,
    pub application: String,
    pub state: String,
    pub seconds: f64,
    pub query: String,
}

impl fmt::Display for OpenWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_unknown = |s: &str| {
            if s.is_empty() {
                "?".to_string()
            } else {
                s.to_string()
            }
        };
        match self.pid {
            Some(pid) => write!(
                f,
                "pid {pid} in database {:?} ({}, {}, open {:.0} s): {}",
                self.database,
                or_unknown(&self.application),
                or_unknown(&self.state),
                self.seconds,
                self.query
            ),
            None => write!(
                f,
                "prepared transaction {} in database {:?} ({}, prepared {:.0} s ago: COMMIT PREPARED or ROLLBACK PREPARED ends it)",
                super::sql::literal(&self.query),
                self.database,
                or_unknown(&self.application),
                self.seconds
            ),
        }
    }
}

/// The oldest transactions open on `server` that have written (up to three).
pub async fn open_writers(server: &Server) -> Result<Vec<OpenWriter>, PgError> {
    let rows = server
        .query("look for open transactions", OPEN_WRITERS, &[])
        .await?;
    Ok(rows
        .iter()
        .map(|row| OpenWriter {
            pid: row.get(0),
            database: row.get(1),
            application: row.get(2),
            state: row.get(3),
            seconds: row.get(4),
            query: row.get(5),
        })
        .collect())
}

/// Runs `creating` (a slot's creation on `endpoint`) to its end; while it waits, logs every
/// [`EVERY`] the transactions it waits for, and the statement that ends one.
pub async fn report_while<T>(
    side: Side,
    endpoint: &Endpoint,
    creating: impl Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    tokio::pin!(creating);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + FIRST_REPORT, EVERY);
    let mut watcher: Option<Server> = None;
    loop {
        tokio::select! {
            done = &mut creating => return done,
            _ = ticks.tick() => report(side, endpoint, &mut watcher).await,
        }
    }
}

/// One report, read on `watcher` (connected on first use). A lookup that fails or takes
/// over [`LOOKUP_TIMEOUT`] is skipped and its connection dropped: the next one connects anew.
async fn report(side: Side, endpoint: &Endpoint, watcher: &mut Option<Server>) {
    let looked = tokio::time::timeout(LOOKUP_TIMEOUT, async {
        let server = match watcher {
            Some(server) => server,
            None => watcher.insert(Server::connect(side, endpoint).await?),
        };
        open_writers(server).await
    })
    .await;
    match looked {
        Ok(Ok(open)) if !open.is_empty() => {
            let list: Vec<String> = open.iter().map(ToString::to_string).collect();
            tracing::warn!(
                "{side}: creating the slot waits for the transactions that have written to end, the oldest: {}; it goes on when they do (`SELECT pg_terminate_backend(<pid>)` ends one)",
                list.join("; ")
            );
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "could not look for what the slot waits for");
            *watcher = None;
        }
        Err(_) => *watcher = None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_writer_says_where_to_look() {
        let prepared = OpenWriter {
            pid: None,
            database: "shop".into(),
            application: "app".into(),
            state: "prepared".into(),
            seconds: 60.0,
            query: "tx'1".into(),
        };
        assert_eq!(
            prepared.to_string(),
            "prepared transaction 'tx''1' in database \"shop\" (app, prepared 60 s ago: COMMIT PREPARED or ROLLBACK PREPARED ends it)"
        );
        let writer = OpenWriter {
            pid: Some(4711),
            database: "shop".into(),
            application: "psql".into(),
            state: "idle in transaction".into(),
            seconds: 312.4,
            query: "UPDATE orders SET paid = true WHERE id = 1".into(),
        };
        assert_eq!(
            writer.to_string(),
            "pid 4711 in database \"shop\" (psql, idle in transaction, open 312 s): UPDATE orders SET paid = true WHERE id = 1"
        );
    }
}
