//! Where replication stands: per-table state, lag, retained WAL, errors, drift.

use serde::Serialize;

use crate::pg::{PgError, Server, TableName};
use crate::plan::Plan;
use crate::preflight::drift::{self, Drift};
use crate::replication;
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
    /// Why the table is in `error`, when known.
    pub problem: Option<String>,
    /// The table's OID on the target.
    #[serde(skip)]
    pub relid: u32,
    /// The table the publication lists for it (its partition root, or itself).
    #[serde(skip)]
    pub published_as: Option<TableName>,
    /// Its copy finished but the table-sync slot it must catch up from is gone: PostgreSQL
    /// drops that slot just before it records the copy as done, so a target that stops in
    /// between leaves the table stuck for good. The cure is to copy it again.
    #[serde(skip)]
    pub sync_slot_lost: bool,
}

/// The proxies' read cache's slot on one server.
#[derive(Debug, Clone, Serialize)]
pub struct CacheSlot {
    pub side: crate::pg::Side,
    pub retained_wal_bytes: Option<i64>,
    /// A proxy's invalidator consumes it now.
    pub active: bool,
}

/// The read cache's slot: WAL kept, and whether it is consumed.
const CACHE_SLOT: &str = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, active \
     FROM pg_replication_slots WHERE slot_name = $1";

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
    /// The source invalidated the slot (`max_slot_wal_keep_size`): replication cannot resume.
    pub slot_lost: bool,
    /// `[proxy.cache]`: the read cache's slot on each server that has it.
    pub cache_slots: Vec<CacheSlot>,
    pub apply_errors: i64,
    pub sync_errors: i64,
    pub last_error: Option<String>,
    pub drift: Vec<Drift>,
    pub warnings: Vec<String>,
    /// A step an earlier command began and never finished (it was killed or failed).
    pub interrupted_step: Option<String>,
    /// What must be fixed before the migration can go on (drift, a lost slot, a failing apply).
    pub blocking: Vec<String>,
    /// Where the proxies send transactions, and the epoch of the last switch.
    pub backend: crate::state::Switch,
    /// Servers whose write grants a cutover or rollback revoked.
    pub fenced: Vec<crate::pg::Side>,
    /// After a cutover: WAL the source has not yet applied from the target (the way back).
    pub reverse_lag_bytes: Option<i64>,
    /// After a cutover: the replication that carries the target's writes back to the source.
    pub reverse: Option<ReverseStatus>,
    /// The snapshot copy under way (before its subscription exists): per table rows, bytes,
    /// rate and ETA, as its chunks commit on the target.
    pub copy: Option<super::copy::CopyProgress>,
}

/// The way back after a cutover: the source's subscription to the target, and its slot there.
#[derive(Debug, Clone, Serialize)]
pub struct ReverseStatus {
    pub subscription: String,
    /// The subscription exists on the source.
    pub exists: bool,
    pub enabled: bool,
    /// Its apply worker runs on the source.
    pub worker_running: bool,
    pub apply_errors: i64,
    /// The last error of its apply in the source's log, when readable.
    pub last_error: Option<String>,
    /// WAL of the target the source has not confirmed.
    pub lag_bytes: Option<i64>,
    /// WAL the slot keeps on the target.
    pub retained_wal_bytes: Option<i64>,
}

impl ReverseStatus {
    /// Why the way back does not work, if it does not. A failing apply stops its worker, which
    /// starts again every `wal_retrieve_retry_interval` (5 s) and fails again: errors counted,
    /// no worker at the moment of the reading and WAL not yet applied say it is failing; a
    /// worker that runs again after one error (the target restarted) is not.
    pub fn problem(&self) -> Option<String> {
        let name = &self.subscription;
        if !self.exists {
            return Some(format!("the reverse subscription {name} is missing on the source: there is no way back; `switchyard rollback` is refused"));
        }
        if !self.enabled {
            return Some(format!("the reverse subscription {name} on the source is disabled: the source does not follow the target's writes (ALTER SUBSCRIPTION {name} ENABLE on the source)"));
        }
        let behind = self.lag_bytes.is_some_and(|lag| lag > 0);
        if self.apply_errors > 0 && !self.worker_running && behind {
            let last = self
                .last_error
                .as_deref()
                .map_or(String::new(), |e| format!(" (last: {e})"));
            return Some(format!(
                "the source's apply of the reverse subscription {name} keeps failing{last}; {} errors so far: the way back is broken until the cause is fixed on the source (see its log); `switchyard rollback` waits for it",
                self.apply_errors
            ));
        }
        None
    }
}

impl Status {
    pub fn all_streaming(&self) -> bool {
        !self.tables.is_empty() && self.tables.iter().all(|t| t.state == "streaming")
    }

    /// Every table streams, the apply worker runs, the slot is healthy and the lag is within
    /// `max_lag_bytes`. (A quiet source keeps the lag small even while the apply fails, so the
    /// lag alone proves nothing.) Drift is checked separately: it is read on demand.
    pub fn caught_up(&self, max_lag_bytes: u64) -> bool {
        self.all_streaming()
            && self.worker_running
            && !self.slot_lost
            && self
                .lag_bytes
                .is_some_and(|lag| lag >= 0 && lag as u64 <= max_lag_bytes)
    }

    /// Conditions that must be fixed before the migration can go on. (A failing apply is not
    /// among them here: one reading cannot tell a failing worker from one that restarts;
    /// `sync --wait` watches the error count grow.)
    pub fn blockers(&self) -> Vec<String> {
        let mut blockers: Vec<String> = self
            .drift
            .iter()
            .map(|d| format!("schema drift on {}: {}", d.table, d.detail))
            .collect();
        if self.slot_lost {
            blockers.push("the source invalidated the replication slot (WAL past max_slot_wal_keep_size): run `switchyard abort --drop-target-data` and sync again".into());
        }
        if let Some(problem) = self.reverse.as_ref().and_then(ReverseStatus::problem) {
            blockers.push(problem);
        }
        blockers
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
        slot_lost: false,
        cache_slots: Vec::new(),
        apply_errors: 0,
        sync_errors: 0,
        last_error: None,
        drift: Vec::new(),
        warnings: Vec::new(),
        interrupted_step: state.interrupted_step().map(|step| step.name().to_string()),
        blocking: Vec::new(),
        backend: state.backend,
        fenced: state.fences.iter().map(|f| f.side).collect(),
        reverse_lag_bytes: None,
        reverse: None,
        copy: None,
    };
    if state.created.copy.as_ref().is_some_and(|c| !c.done) {
        status.copy = super::copy::progress::read(target).await?;
    }
    if let Some(reverse) = &state.created.reverse {
        let way_back = read_reverse(source, target, reverse).await?;
        // Kept in the JSON document as it was before `reverse` came: the same reading.
        status.reverse_lag_bytes = way_back.lag_bytes;
        status.reverse = Some(way_back);
    }
    let subscription_oid = replication::subscription_oid(target, &name).await?;
    if let Some(oid) = subscription_oid {
        status.subscription = Some(name.clone());
        read_subscription(&mut status, target, oid).await?;
    }
    read_slot(&mut status, source, &name).await?;
    if plan.proxy.cache.is_some() {
        let slot = crate::cache_setup::Names::of(plan).slot;
        for server in [source, target] {
            let rows = server
                .query("look up the read cache's slot", CACHE_SLOT, &[&slot])
                .await?;
            if let Some(row) = rows.first() {
                status.cache_slots.push(CacheSlot {
                    side: server.side,
                    retained_wal_bytes: row.get(0),
                    active: row.get(1),
                });
            }
        }
    }
    if let Some(oid) = subscription_oid {
        check_sync_slots(&mut status, source, target, oid).await?;
    }
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
    if let Some(oid) = subscription_oid.filter(|_| status.apply_errors + status.sync_errors > 0) {
        status.last_error = last_replication_error(target, &name, oid).await;
    }
    if with_drift && state.created.schema.is_some() {
        status.drift = drift::detect(plan, source, target).await?;
    }
    status.blocking = status.blockers();
    Ok(status)
}

/// The reverse subscription on the source and its slot on the target.
async fn read_reverse(
    source: &Server,
    target: &Server,
    name: &str,
) -> Result<ReverseStatus, PgError> {
    let mut reverse = ReverseStatus {
        subscription: name.to_string(),
        exists: false,
        enabled: false,
        worker_running: false,
        apply_errors: 0,
        last_error: None,
        lag_bytes: None,
        retained_wal_bytes: None,
    };
    let slot = target
        .query("read the reverse slot", READ_SLOT_SIZES, &[&name])
        .await?;
    if let Some(row) = slot.first() {
        reverse.lag_bytes = row.get(0);
        reverse.retained_wal_bytes = row.get(1);
    }
    let Some(oid) = replication::subscription_oid(source, name).await? else {
        return Ok(reverse);
    };
    reverse.exists = true;
    let row = source
        .query_one("read the reverse subscription", READ_WORKER, &[&oid])
        .await?;
    reverse.enabled = row.get(0);
    reverse.worker_running = row.get(1);
    reverse.apply_errors = row.get(2);
    if reverse.apply_errors > 0 {
        reverse.last_error = last_replication_error(source, name, oid).await;
    }
    Ok(reverse)
}

/// A slot's unconfirmed and retained WAL, in bytes.
const READ_SLOT_SIZES: &str = "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, (pg_current_wal_lsn() - restart_lsn)::int8
   FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()";

/// A subscription's state, whether its apply worker runs, and its error counts.
const READ_WORKER: &str = "SELECT s.subenabled,
        EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = s.oid AND w.relid IS NULL AND w.pid IS NOT NULL),
        coalesce(st.apply_error_count, 0), coalesce(st.sync_error_count, 0)
   FROM pg_subscription s LEFT JOIN pg_stat_subscription_stats st ON st.subid = s.oid
  WHERE s.oid = $1";

async fn read_subscription(status: &mut Status, target: &Server, oid: u32) -> Result<(), PgError> {
    let row = target
        .query_one("read the subscription", READ_WORKER, &[&oid])
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
                    EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = r.srsubid AND w.relid = r.srrelid AND w.pid IS NOT NULL),
                    r.srrelid,
                    (SELECT rn.nspname FROM pg_class rc JOIN pg_namespace rn ON rn.oid = rc.relnamespace
                      WHERE rc.oid = coalesce(pg_partition_root(r.srrelid), r.srrelid)),
                    (SELECT rc.relname FROM pg_class rc WHERE rc.oid = coalesce(pg_partition_root(r.srrelid), r.srrelid))
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
            let root_schema: Option<String> = r.get(5);
            let root_name: Option<String> = r.get(6);
            TableStatus {
                name: r.get(0),
                state,
                rows_copied: r.get(2),
                estimated_rows: None,
                problem: None,
                relid: r.get(4),
                published_as: root_schema
                    .zip(root_name)
                    .map(|(s, n)| TableName::new(s, n)),
                sync_slot_lost: code == "f",
            }
        })
        .collect();
    Ok(())
}

/// Tables whose copy finished (`f`) must still have their table-sync slot on the source; the
/// flag set by `read_subscription` is kept only where the slot is gone.
async fn check_sync_slots(
    status: &mut Status,
    source: &Server,
    target: &Server,
    oid: u32,
) -> Result<(), PgError> {
    if !status.tables.iter().any(|t| t.sync_slot_lost) {
        return Ok(());
    }
    let system_id = replication::system_identifier(target).await?;
    let slot_of = |t: &TableStatus| format!("pg_{oid}_sync_{}_{system_id}", t.relid);
    let wanted: Vec<String> = status
        .tables
        .iter()
        .filter(|t| t.sync_slot_lost)
        .map(slot_of)
        .collect();
    let rows = source
        .query(
            "look for table-sync slots",
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name = ANY ($1)",
            &[&wanted],
        )
        .await?;
    let present: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    for table in status.tables.iter_mut().filter(|t| t.sync_slot_lost) {
        let slot = slot_of(table);
        if present.contains(&slot) {
            table.sync_slot_lost = false;
        } else {
            table.state = "error";
            table.problem = Some(format!(
                "its copy finished but table-sync slot {slot} is gone from the source (the target stopped at the wrong moment); `switchyard sync --wait` copies the table again"
            ));
        }
    }
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
                       FROM pg_stat_replication r WHERE r.pid = s.active_pid),
                    coalesce(s.wal_status = 'lost', false)
               FROM pg_replication_slots s WHERE s.slot_name = $1 AND s.database = current_database()",
            &[&slot],
        )
        .await?;
    if let Some(row) = rows.first() {
        status.lag_bytes = row.get(0);
        status.retained_wal_bytes = row.get(1);
        status.lag_seconds = row.get(2);
        status.slot_lost = row.get(3);
    }
    Ok(())
}

/// The last error of this subscription in the target's server log, when the log is collected
/// and readable (superuser): the catalogs keep only counts. An error belongs to the
/// subscription when its CONTEXT names the subscription's replication origin (`pg_<oid>`) or
/// the line names the subscription.
async fn last_replication_error(target: &Server, subscription: &str, oid: u32) -> Option<String> {
    let rows = target
        .query(
            "read the server log",
            "SELECT pg_read_binary_file(f, greatest(0, (pg_stat_file(f)).size - 262144), 262144)
               FROM pg_current_logfile() AS f WHERE f IS NOT NULL",
            &[],
        )
        .await
        .ok()?;
    let bytes: Vec<u8> = rows.first()?.get(0);
    find_error(&String::from_utf8_lossy(&bytes), subscription, oid)
}

fn find_error(log: &str, subscription: &str, oid: u32) -> Option<String> {
    let origin = format!("\"pg_{oid}\"");
    let named = format!("subscription \"{subscription}\"");
    let lines: Vec<&str> = log.lines().collect();
    let mut found = None;
    for (i, line) in lines.iter().enumerate() {
        if !line.contains("ERROR:") {
            continue;
        }
        let context = lines[i + 1..]
            .iter()
            .take(3)
            .take_while(|l| !l.contains("ERROR:") && !l.contains("LOG:"));
        let ours = line.contains(&named)
            || context
                .clone()
                .any(|l| l.contains(&origin) || l.contains(&named));
        if ours {
            let message = line.split_once("ERROR:").map_or(*line, |(_, m)| m).trim();
            found = Some(match context.clone().find(|l| l.contains("CONTEXT:")) {
                Some(ctx) => format!(
                    "{message} ({})",
                    ctx.split_once("CONTEXT:").map_or(*ctx, |(_, c)| c).trim()
                ),
                None => message.to_string(),
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::find_error;

    #[test]
    fn finds_only_this_subscriptions_error() {
        let log = "\
2026-11-26 12:00:00 UTC [1] ERROR:  duplicate key value violates unique constraint \"t_pkey\"
2026-11-26 12:00:00 UTC [1] CONTEXT:  processing remote data for replication origin \"pg_99\" during message type \"INSERT\"
2026-11-26 12:00:01 UTC [2] ERROR:  logical replication target relation \"public.events\" is missing replicated column: \"extra\"
2026-11-26 12:00:01 UTC [2] CONTEXT:  processing remote data for replication origin \"pg_16400\" during message type \"INSERT\"
2026-11-26 12:00:02 UTC [3] ERROR:  relation \"nope\" does not exist at character 15
2026-11-26 12:00:02 UTC [3] STATEMENT:  SELECT * FROM nope
";
        let error = find_error(log, "switchyard_shop", 16400).unwrap();
        assert!(
            error.starts_with("logical replication target relation \"public.events\" is missing"),
            "{error}"
        );
        assert!(error.contains("pg_16400"), "{error}");
        assert_eq!(find_error(log, "switchyard_other", 1), None);
    }
}
