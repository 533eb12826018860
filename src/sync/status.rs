//! Where replication stands: per-table state, lag, retained WAL, errors, drift.

use serde::Serialize;

use super::drift::{self, Drift};
use super::replication;
use crate::pg::{PgError, Server};
use crate::plan::Plan;
use crate::state::{Phase, State};

#[derive(Debug, Clone, Serialize)]
pub struct TableStatus {
    pub name: String,
    /// `queued`, `copying`, `catching_up`, `streaming` or `error`.
    pub state: &'static str,
    /// Rows copied so far while `copying`.
    pub rows_copied: Option<i64>,
    /// The source's estimate of the table's rows.
    pub estimated_rows: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    pub phase: Phase,
    pub subscription: Option<String>,
    pub enabled: bool,
    /// The apply worker runs on the target.
    pub worker_running: bool,
    pub tables: Vec<TableStatus>,
    /// WAL the target has not confirmed yet.
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    /// WAL the slot keeps on the source.
    pub retained_wal_bytes: Option<i64>,
    pub apply_errors: i64,
    pub sync_errors: i64,
    pub last_error: Option<String>,
    pub drift: Vec<Drift>,
    pub warnings: Vec<String>,
    /// A step an earlier command began and never finished (it was killed or failed).
    pub interrupted_step: Option<String>,
}

impl Status {
    pub fn all_streaming(&self) -> bool {
        !self.tables.is_empty() && self.tables.iter().all(|t| t.state == "streaming")
    }

    /// Every table streams and the lag is within `max_lag_bytes`.
    pub fn caught_up(&self, max_lag_bytes: u64) -> bool {
        self.all_streaming()
            && self
                .lag_bytes
                .is_some_and(|lag| lag >= 0 && lag as u64 <= max_lag_bytes)
    }
}

/// Reads the replication state from both servers. Drift is only compared when asked, as it
/// reads every selected table's columns.
pub async fn read(
    plan: &Plan,
    state: &State,
    source: &Server,
    target: &Server,
    with_drift: bool,
) -> Result<Status, PgError> {
    let name = plan.replication_name();
    let mut status = Status {
        name: plan.name.0.clone(),
        phase: state.phase,
        subscription: None,
        enabled: false,
        worker_running: false,
        tables: Vec::new(),
        lag_bytes: None,
        lag_seconds: None,
        retained_wal_bytes: None,
        apply_errors: 0,
        sync_errors: 0,
        last_error: None,
        drift: Vec::new(),
        warnings: Vec::new(),
        interrupted_step: state.interrupted_step().map(str::to_string),
    };
    if let Some(oid) = replication::subscription_oid(target, &name).await? {
        status.subscription = Some(name.clone());
        read_subscription(&mut status, target, oid).await?;
    }
    read_slot(&mut status, source, &name).await?;
    if status.tables.iter().any(|t| t.state != "streaming") {
        read_estimates(&mut status, source).await?;
    }
    if let Some(retained) = status
        .retained_wal_bytes
        .filter(|&r| r as u64 > plan.sync.retained_wal_warn_bytes)
    {
        status.warnings.push(format!(
            "the slot {name} keeps {} of WAL on the source (warning above {}); if replication cannot catch up, `switchyard abort` releases it",
            crate::output::human_bytes(retained),
            crate::output::human_bytes(plan.sync.retained_wal_warn_bytes as i64)
        ));
    }
    if status.apply_errors + status.sync_errors > 0 {
        status.last_error = last_replication_error(target).await;
    }
    if with_drift && state.created.schema.is_some() {
        status.drift = drift::detect(plan, source, target).await?;
    }
    Ok(status)
}

async fn read_subscription(status: &mut Status, target: &Server, oid: u32) -> Result<(), PgError> {
    let row = target
        .query_one(
            "read the subscription",
            "SELECT s.subenabled,
                    EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = s.oid AND w.relid IS NULL AND w.pid IS NOT NULL),
                    coalesce(st.apply_error_count, 0), coalesce(st.sync_error_count, 0)
               FROM pg_subscription s LEFT JOIN pg_stat_subscription_stats st ON st.subid = s.oid
              WHERE s.oid = $1",
            &[&oid],
        )
        .await?;
    status.enabled = row.get(0);
    status.worker_running = row.get(1);
    status.apply_errors = row.get(2);
    status.sync_errors = row.get(3);
    let rows = target
        .query(
            "read table states",
            "SELECT n.nspname || '.' || c.relname, r.srsubstate::text,
                    (SELECT p.tuples_processed FROM pg_stat_progress_copy p WHERE p.relid = r.srrelid LIMIT 1),
                    EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = r.srsubid AND w.relid = r.srrelid AND w.pid IS NOT NULL)
               FROM pg_subscription_rel r
               JOIN pg_class c ON c.oid = r.srrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE r.srsubid = $1
              ORDER BY 1",
            &[&oid],
        )
        .await?;
    let failing = status.sync_errors > 0;
    status.tables = rows
        .iter()
        .map(|r| {
            let code: String = r.get(1);
            let worker: bool = r.get(3);
            let state = match code.as_str() {
                "r" => "streaming",
                "s" | "f" => "catching_up",
                "d" if failing && !worker => "error",
                "d" => "copying",
                _ if failing && !worker => "error",
                _ => "queued",
            };
            TableStatus {
                name: r.get(0),
                state,
                rows_copied: r.get(2),
                estimated_rows: None,
            }
        })
        .collect();
    Ok(())
}

async fn read_estimates(status: &mut Status, source: &Server) -> Result<(), PgError> {
    let names: Vec<&str> = status.tables.iter().map(|t| t.name.as_str()).collect();
    let rows = source
        .query(
            "read row estimates",
            "SELECT n.nspname || '.' || c.relname,
                    CASE WHEN c.reltuples >= 0 THEN c.reltuples::int8 ELSE coalesce(s.n_live_tup, 0) END
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
              WHERE n.nspname || '.' || c.relname = ANY ($1)",
            &[&names],
        )
        .await?;
    let estimates: std::collections::HashMap<String, i64> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for table in &mut status.tables {
        table.estimated_rows = estimates.get(&table.name).copied();
    }
    Ok(())
}

async fn read_slot(status: &mut Status, source: &Server, slot: &str) -> Result<(), PgError> {
    let rows = source
        .query(
            "read the slot",
            "SELECT (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8,
                    (pg_current_wal_lsn() - s.restart_lsn)::int8,
                    (SELECT extract(epoch FROM coalesce(r.replay_lag, '0'::interval))::float8
                       FROM pg_stat_replication r WHERE r.pid = s.active_pid)
               FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&slot],
        )
        .await?;
    if let Some(row) = rows.first() {
        status.lag_bytes = row.get(0);
        status.retained_wal_bytes = row.get(1);
        status.lag_seconds = row.get(2);
    }
    Ok(())
}

/// The last logical-replication error line in the target's server log, when the log is
/// collected and readable (superuser). The catalogs keep only counts, not the message.
async fn last_replication_error(target: &Server) -> Option<String> {
    let rows = target
        .query(
            "read the server log",
            "SELECT pg_read_file(f, greatest(0, (pg_stat_file(f)).size - 262144), 262144)
               FROM pg_current_logfile() AS f WHERE f IS NOT NULL",
            &[],
        )
        .await
        .ok()?;
    let text: String = rows.first()?.get(0);
    text.lines()
        .rev()
        .find(|line| {
            line.contains("ERROR:")
                && (line.contains("logical replication") || line.contains("subscription"))
        })
        .or_else(|| text.lines().rev().find(|line| line.contains("ERROR:")))
        .map(|line| line.trim().to_string())
}
