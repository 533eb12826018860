//! The statements the switch runs on the servers: the reverse replication's publication,
//! slot, subscription and origin, the waits for the apply, and ending transactions.

use super::*;

/// Cancels the running queries and ends the transactions left idle (their server connection
/// closes, which rolls them back).
pub(super) async fn end_transactions(server: &Server, pids: &[i32]) -> Result<(), PgError> {
    server
        .query(
            "end the transactions still running",
            "SELECT CASE WHEN state = 'active' THEN pg_cancel_backend(pid) ELSE pg_terminate_backend(pid) END
               FROM pg_stat_activity WHERE pid = ANY($1)",
            &[&pids],
        )
        .await?;
    Ok(())
}

/// The lag the pause should start from: what is still to apply then is applied inside it.
pub(super) const SETTLED_LAG_BYTES: i64 = 64 * 1024;

pub(super) const SETTLE_PATIENCE: Duration = Duration::from_secs(10);

/// Waits, up to a few seconds, until `slot` lags less than [`SETTLED_LAG_BYTES`], so that the
/// catch-up inside the pause starts from little. Under a write load heavier than the apply
/// can follow it gives up waiting and the pause starts anyway (the catch-up has its own
/// timeout).
pub(super) async fn settle_lag(server: &Server, slot: &str) -> Result<((), String), PgError> {
    let started = Instant::now();
    loop {
        let Some(lag) = replication::slot_lag(server, slot).await? else {
            return Err(PgError::Tool(format!(
                "the slot {slot} is gone from the {}",
                server.side
            )));
        };
        if lag < SETTLED_LAG_BYTES || started.elapsed() >= SETTLE_PATIENCE {
            return Ok(((), format!("{lag} bytes behind")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `slot` on `server` has confirmed the server's current WAL position.
pub(super) async fn catch_up(
    server: &Server,
    slot: &str,
    timeout: Duration,
) -> Result<((), String), PgError> {
    let prepared: i64 = server
        .query_one(
            "look for prepared transactions",
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await?
        .get(0);
    if prepared > 0 {
        return Err(PgError::Tool(format!(
            "{prepared} prepared transactions are pending on the {}: COMMIT PREPARED or ROLLBACK PREPARED them first",
            server.side
        )));
    }
    // Applications may commit with synchronous_commit = off: their commits are acknowledged
    // before the WAL holding them is flushed, and a WAL sender sends only flushed WAL. A
    // transaction of our own that writes WAL (a transactional logical message, which
    // pgoutput skips), committed synchronously, flushes everything before it; the position
    // read after it covers every commit an application saw acknowledged.
    server
        .execute(
            "flush the WAL",
            "SELECT pg_logical_emit_message(true, 'switchyard', 'catch-up')",
        )
        .await?;
    let lsn: String = server
        .query_one(
            "read the current WAL position",
            "SELECT pg_current_wal_lsn()::text",
            &[],
        )
        .await?
        .get(0);
    let waited =
        replication::wait_confirmed(server, slot, &lsn, timeout, Duration::from_millis(2)).await?;
    match waited {
        replication::Confirmed::Reached { polls } => {
            Ok(((), format!("{lsn} confirmed after {polls} polls")))
        }
        replication::Confirmed::SlotMissing => Err(PgError::Tool(format!(
            "the slot {slot} is gone from the {}",
            server.side
        ))),
        replication::Confirmed::TimedOut => Err(PgError::Tool(format!(
            "the slot {slot} did not confirm {lsn} within catchup_timeout ({})",
            humantime::format_duration(timeout)
        ))),
    }
}

/// The server's clock plus a number of milliseconds, as a timestamptz in text.
pub(super) const SERVER_DEADLINE: &str =
    "SELECT (clock_timestamp() + $1::float8 * interval '1 millisecond')::text";

/// Which of a subscription's workers a wait is about.
#[derive(Clone, Copy)]
pub(super) enum Workers {
    /// Its apply worker has started.
    ApplyRunning,
    /// All its workers (apply and table sync) have exited.
    AllGone,
}

/// Waits until the subscription `name` on `server` is as `until` says, or `timeout`.
pub(super) async fn wait_workers(
    server: &Server,
    name: &str,
    until: Workers,
    timeout: Duration,
) -> Result<(), PgError> {
    let (which, wanted, poll, failure) = match until {
        Workers::ApplyRunning => ("AND relid IS NULL", true, 20, "did not start"),
        Workers::AllGone => ("", false, 2, "did not exit"),
    };
    let query = format!(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_subscription WHERE subname = $1 AND pid IS NOT NULL {which})"
    );
    let started = Instant::now();
    loop {
        let running: bool = server
            .query_one("look for the subscription's workers", &query, &[&name])
            .await?
            .get(0);
        if running == wanted {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(PgError::Tool(format!(
                "the workers of {name} on the {} {failure} within {timeout:?}",
                server.side
            )));
        }
        tokio::time::sleep(Duration::from_millis(poll)).await;
    }
}
