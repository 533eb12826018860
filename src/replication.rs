//! Logical replication, both directions, in one place: every publication, slot and
//! subscription statement (the forward replication `sync` makes, the way back the cutover
//! makes), created and removed by name so that a re-run after a crash finds what an earlier
//! run made, and [`wait_confirmed`], the one wait for a slot to confirm a position. Used by
//! `sync`, `cutover`, `validate` and the preflight; depends only on `pg`.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use crate::pg::catalog::Selection;
use crate::pg::{sql, PgError, Server, TableName};

pub async fn publication_exists(source: &Server, name: &str) -> Result<bool, PgError> {
    let rows = source
        .query(
            "look up the publication",
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?;
    Ok(!rows.is_empty())
}

pub async fn create_publication(
    source: &Server,
    name: &str,
    selection: &Selection,
) -> Result<(), PgError> {
    let tables: Vec<String> = selection.published().iter().map(|t| t.name.sql()).collect();
    let statement = format!(
        "CREATE PUBLICATION {} FOR TABLE {}",
        sql::ident(name),
        tables.join(", ")
    );
    source.execute("create the publication", &statement).await
}

/// Tables the publication lists (partition roots, not their partitions).
pub async fn published_tables(source: &Server, name: &str) -> Result<Vec<TableName>, PgError> {
    let rows = source
        .query(
            "list published tables",
            "SELECT n.nspname::text, c.relname::text FROM pg_publication_rel pr
               JOIN pg_publication p ON p.oid = pr.prpubid
               JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE p.pubname = $1",
            &[&name],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Tables the subscription copies or streams, as the target names them.
pub async fn subscribed_tables(
    target: &Server,
    subscription_oid: u32,
) -> Result<Vec<TableName>, PgError> {
    let rows = target
        .query(
            "list subscribed tables",
            "SELECT n.nspname::text, c.relname::text FROM pg_subscription_rel r
               JOIN pg_class c ON c.oid = r.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE r.srsubid = $1",
            &[&subscription_oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Makes the publication list every root in `roots` and the subscription hold every table in
/// `leaves`. A table the subscription lacks receives no changes, so whatever the target holds
/// of it is stale: it is emptied before the subscription copies it again. This is also how an
/// interrupted re-copy is finished.
pub async fn reconcile_membership(
    source: &Server,
    target: &Server,
    name: &str,
    roots: &[TableName],
    leaves: &[TableName],
) -> Result<Vec<TableName>, PgError> {
    let published = published_tables(source, name).await?;
    let unpublished: Vec<String> = roots
        .iter()
        .filter(|t| !published.contains(t))
        .map(TableName::sql)
        .collect();
    if !unpublished.is_empty() {
        let statement = format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            sql::ident(name),
            unpublished.join(", ")
        );
        source
            .execute("add tables to the publication", &statement)
            .await?;
    }
    let Some(oid) = subscription_oid(target, name).await? else {
        return Ok(Vec::new());
    };
    let subscribed = subscribed_tables(target, oid).await?;
    let missing: Vec<TableName> = leaves
        .iter()
        .filter(|t| !subscribed.contains(t))
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    empty_on_target(target, &missing).await?;
    let refresh = format!(
        "ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = true)",
        sql::ident(name)
    );
    target.execute("refresh the subscription", &refresh).await?;
    Ok(missing)
}

/// Deletes every row of `tables` on the target in replica mode, as the apply itself runs:
/// foreign keys pointing at them do not stop it, and the rows come back with the copy.
async fn empty_on_target(target: &Server, tables: &[TableName]) -> Result<(), PgError> {
    let deletes: Vec<String> = tables
        .iter()
        .map(|t| format!("DELETE FROM ONLY {}", t.sql()))
        .collect();
    let statement = format!(
        "SET LOCAL session_replication_role = replica; {}",
        deletes.join("; ")
    );
    target
        .execute(
            "empty tables on the target before copying them again",
            &format!("BEGIN; {statement}; COMMIT"),
        )
        .await
}

/// Copies a table (a partition root: all its partitions) again from scratch: out of the
/// publication and the subscription, emptied, and back with a fresh copy. Changes made
/// meanwhile on the source are in the new copy's snapshot or streamed after it. A run that
/// dies half-way is finished by [`reconcile_membership`], which every `sync` runs.
pub async fn recopy_table(
    source: &Server,
    target: &Server,
    name: &str,
    root: &TableName,
) -> Result<(), PgError> {
    if published_tables(source, name).await?.contains(root) {
        let statement = format!(
            "ALTER PUBLICATION {} DROP TABLE {}",
            sql::ident(name),
            root.sql()
        );
        source
            .execute("take the table out of the publication", &statement)
            .await?;
    }
    let refresh = format!(
        "ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = false)",
        sql::ident(name)
    );
    target.execute("refresh the subscription", &refresh).await?;
    let rows = target
        .query(
            "list partitions",
            "SELECT n.nspname::text, c.relname::text FROM pg_partition_tree($1::text::regclass) t
               JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.isleaf",
            &[&root.sql()],
        )
        .await?;
    // pg_partition_tree has no rows for a table outside any partitioning: it is its own leaf.
    let mut leaves: Vec<TableName> = rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    if leaves.is_empty() {
        leaves.push(root.clone());
    }
    reconcile_membership(source, target, name, std::slice::from_ref(root), &leaves).await?;
    Ok(())
}

/// The subscription's OID on the target, if it exists in the current database.
pub async fn subscription_oid(target: &Server, name: &str) -> Result<Option<u32>, PgError> {
    let rows = target
        .query(
            "look up the subscription",
            "SELECT oid FROM pg_subscription WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&name],
        )
        .await?;
    Ok(rows.first().map(|r| r.get(0)))
}

/// How far `slot` lags behind `server`'s current WAL position, in bytes (what its consumer
/// has not confirmed); `None` when there is no such slot.
pub async fn slot_lag(server: &Server, slot: &str) -> Result<Option<i64>, PgError> {
    let rows = server
        .query(
            "read the slot's lag",
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(rows.first().and_then(|r| r.get(0)))
}

/// Whether `slot` exists for this database (slot names are shared by the whole cluster).
pub async fn slot_exists(source: &Server, slot: &str) -> Result<bool, PgError> {
    let rows = source
        .query(
            "look up the slot",
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// Creates the subscription; the target connects to the source, creates the slot, copies the
/// existing rows and then streams changes (the native copy).
pub async fn create_subscription(
    target: &Server,
    name: &str,
    source_conninfo: &str,
) -> Result<u32, PgError> {
    create(
        target,
        name,
        source_conninfo,
        "create_slot = true, copy_data = true",
    )
    .await
}

/// Creates the subscription on the slot the snapshot copy made, disabled and without a copy:
/// enabled once the copy is in, it streams from the slot's consistent point, exactly where
/// the snapshot ends.
pub async fn create_subscription_on_slot(
    target: &Server,
    name: &str,
    source_conninfo: &str,
) -> Result<u32, PgError> {
    create(
        target,
        name,
        source_conninfo,
        "create_slot = false, copy_data = false, enabled = false",
    )
    .await
}

/// From PostgreSQL 16 the apply would run as each table's owner; `run_as_owner` keeps it the
/// coordinator's, so row-level security on a table cannot stop replication.
async fn create(
    target: &Server,
    name: &str,
    source_conninfo: &str,
    options: &str,
) -> Result<u32, PgError> {
    let run_as_owner = if target.major() >= 16 {
        ", run_as_owner = true"
    } else {
        ""
    };
    let statement = format!(
        "CREATE SUBSCRIPTION {sub} CONNECTION {conn} PUBLICATION {sub} \
         WITH (slot_name = {slot}, {options}, streaming = on{run_as_owner})",
        sub = sql::ident(name),
        conn = sql::literal(source_conninfo),
        slot = sql::literal(name),
    );
    target
        .execute_secret("create the subscription", &statement)
        .await?;
    subscription_oid(target, name).await?.ok_or_else(|| {
        PgError::Tool(format!(
            "subscription {name} vanished right after it was created"
        ))
    })
}

/// Drops the subscription on the target without asking the target to reach the source: the
/// slots are dropped from the source side by [`drop_slots`].
pub async fn drop_subscription(target: &Server, name: &str) -> Result<bool, PgError> {
    if subscription_oid(target, name).await?.is_none() {
        return Ok(false);
    }
    let sub = sql::ident(name);
    target
        .execute(
            "disable the subscription",
            &format!("ALTER SUBSCRIPTION {sub} DISABLE"),
        )
        .await?;
    target
        .execute(
            "detach the subscription from its slot",
            &format!("ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)"),
        )
        .await?;
    target
        .execute("drop the subscription", &format!("DROP SUBSCRIPTION {sub}"))
        .await?;
    Ok(true)
}

/// The table-sync slots a subscription's copy workers create on the source are named
/// `pg_<subscription oid>_sync_<relid>_<target system identifier>`.
pub fn sync_slot_pattern(subscription_oid: u32, target_system_id: Option<u64>) -> String {
    match target_system_id {
        Some(id) => format!("pg\\_{subscription_oid}\\_sync\\_%\\_{id}"),
        None => format!("pg\\_{subscription_oid}\\_sync\\_%"),
    }
}

/// The target's system identifier, which table-sync slot names carry.
pub async fn system_identifier(server: &Server) -> Result<u64, PgError> {
    let row = server
        .query_one(
            "read the system identifier",
            "SELECT system_identifier FROM pg_control_system()",
            &[],
        )
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Drops the subscription's slot and its table-sync slots (matching `sync_pattern`, from
/// [`sync_slot_pattern`]) in this database on the source, ending the WAL senders that still
/// use them. Returns the slots dropped; fails naming the slots that would not go.
pub async fn drop_slots(
    source: &Server,
    slot: &str,
    sync_pattern: Option<&str>,
) -> Result<Vec<String>, PgError> {
    let pattern = sync_pattern.unwrap_or("-");
    let ours = "database = current_database() AND (slot_name = $1 OR slot_name LIKE $2)";
    let mut dropped = Vec::new();
    for _ in 0..100 {
        let terminate = format!("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE {ours} AND active_pid IS NOT NULL");
        source
            .query(
                "end WAL senders of the slots",
                &terminate,
                &[&slot, &pattern],
            )
            .await?;
        let list = format!("SELECT slot_name::text FROM pg_replication_slots WHERE {ours}");
        let slots: Vec<String> = source
            .query("list the slots", &list, &[&slot, &pattern])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if slots.is_empty() {
            return Ok(dropped);
        }
        for name in slots {
            match source
                .query(
                    "drop a slot",
                    "SELECT pg_drop_replication_slot($1)",
                    &[&name],
                )
                .await
            {
                Ok(_) => dropped.push(name),
                // 55006: still active for a moment after its sender was ended; 42704: gone
                // meanwhile. Both are looked at again on the next round.
                Err(e)
                    if e.code().is_some_and(|code| {
                        *code == SqlState::OBJECT_IN_USE || *code == SqlState::UNDEFINED_OBJECT
                    }) => {}
                Err(e) => return Err(e),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let list = format!("SELECT slot_name::text FROM pg_replication_slots WHERE {ours}");
    let left: Vec<String> = source
        .query("list the slots", &list, &[&slot, &pattern])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Err(PgError::Tool(format!(
        "replication slots {} are still in use after 10 s; end their WAL senders and run SELECT pg_drop_replication_slot(name) on the source",
        left.join(", ")
    )))
}

pub async fn drop_publication(source: &Server, name: &str) -> Result<bool, PgError> {
    let existed = publication_exists(source, name).await?;
    source
        .execute(
            "drop the publication",
            &format!("DROP PUBLICATION IF EXISTS {}", sql::ident(name)),
        )
        .await?;
    Ok(existed)
}

/// How a wait for a slot to confirm a WAL position ended ([`wait_confirmed`]), for the caller to
/// word in its own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// The slot confirmed the position, after this many looks.
    Reached { polls: u32 },
    /// The slot does not exist (dropped, or never made): waiting longer cannot help.
    SlotMissing,
    /// The slot exists but had not confirmed the position when the time ran out.
    TimedOut,
}

/// Waits until `slot` on `server` has confirmed `lsn` (its consumer has applied and flushed
/// everything up to there), looking every `poll`, for at most `timeout`. A missing slot ends
/// the wait at once: the one place both the cutover's catch-up and validation's wait for the
/// target go through, so that they agree on it.
pub async fn wait_confirmed(
    server: &Server,
    slot: &str,
    lsn: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<Confirmed, PgError> {
    let started = Instant::now();
    let mut polls = 0u32;
    loop {
        let reached: Option<bool> = server
            .query_one(
                "read the slot's confirmed position",
                SLOT_CONFIRMED,
                &[&slot, &lsn],
            )
            .await?
            .get(0);
        polls += 1;
        match reached {
            Some(true) => return Ok(Confirmed::Reached { polls }),
            None => return Ok(Confirmed::SlotMissing),
            Some(false) if started.elapsed() >= timeout => return Ok(Confirmed::TimedOut),
            Some(false) => tokio::time::sleep(poll).await,
        }
    }
}

/// Whether a slot has confirmed a position: NULL when there is no such slot.
const SLOT_CONFIRMED: &str = "SELECT (SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1)";

/// `ALTER SUBSCRIPTION ... ENABLE` or `DISABLE`: a disabled subscription's workers exit (the
/// caller waits for them when it must), an enabled one's apply worker starts within a second.
pub async fn set_enabled(
    server: &Server,
    subscription: &str,
    enabled: bool,
) -> Result<(), PgError> {
    let (context, verb) = if enabled {
        ("enable the subscription", "ENABLE")
    } else {
        ("disable the subscription", "DISABLE")
    };
    server
        .execute(
            &format!("{context} {subscription}"),
            &format!("ALTER SUBSCRIPTION {} {verb}", sql::ident(subscription)),
        )
        .await
}

/// `ALTER SUBSCRIPTION name SET (synchronous_commit = value)`.
pub async fn set_synchronous_commit(
    server: &Server,
    subscription: &str,
    value: &str,
) -> Result<(), PgError> {
    server
        .execute(
            "set the subscription's synchronous_commit",
            &format!(
                "ALTER SUBSCRIPTION {} SET (synchronous_commit = {})",
                sql::ident(subscription),
                sql::literal(value)
            ),
        )
        .await
}

// The way back, made by the cutover: a publication and slot on the target, a subscription
// on the source.

/// The source's subscription to the target, made before the pause but disabled: creating it
/// asks the target for the publication's tables (a connection and a round trip), which the
/// pause should not wait for. Inside the pause it is only enabled.
pub async fn create_reverse_subscription(
    source: &Server,
    name: &str,
    target_conninfo: &str,
) -> Result<(), PgError> {
    if subscription_oid(source, name).await?.is_some() {
        return Ok(());
    }
    let statement = format!(
        "CREATE SUBSCRIPTION {sub} CONNECTION {conn} PUBLICATION {sub} \
         WITH (create_slot = false, slot_name = {slot}, copy_data = false, enabled = false, synchronous_commit = 'off')",
        sub = sql::ident(name),
        conn = sql::literal(target_conninfo),
        slot = sql::literal(name),
    );
    source
        .execute_secret("create the reverse subscription", &statement)
        .await
}

pub async fn create_reverse_publication(
    target: &Server,
    name: &str,
    tables: &[TableName],
) -> Result<(), PgError> {
    if publication_exists(target, name).await? {
        return Ok(());
    }
    let list: Vec<String> = tables.iter().map(TableName::sql).collect();
    target
        .execute(
            "create the reverse publication",
            &format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                sql::ident(name),
                list.join(", ")
            ),
        )
        .await
}

/// Creates the logical slot (waits for every open transaction on the server, so never inside
/// the pause). An existing one is kept.
pub async fn create_slot(server: &Server, name: &str) -> Result<String, PgError> {
    if slot_exists(server, name).await? {
        return Ok("existing".into());
    }
    let row = server
        .query_one(
            "create the reverse slot",
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await?;
    Ok(row.get(0))
}

/// Moves the slot to the server's current WAL position. Returns the position and how far
/// behind it the slot's restart point is: an advance decodes from there, so that is what
/// makes it slow (the restart point follows logged snapshots of running transactions, every
/// 15 s or at a checkpoint).
pub async fn advance_slot(server: &Server, name: &str) -> Result<(String, String), PgError> {
    let row = server
        .query_one(
            "advance the reverse slot",
            "SELECT a.end_lsn::text, pg_size_pretty(a.end_lsn - s.restart_lsn)
               FROM pg_replication_slots s, pg_replication_slot_advance($1, pg_current_wal_lsn()) a
              WHERE s.slot_name = $1",
            &[&name],
        )
        .await?;
    let (lsn, decoded): (String, String) = (row.get(0), row.get(1));
    let text = format!("{lsn} (restart point {decoded} behind)");
    Ok((lsn, text))
}

/// The reverse subscription's replication origin on the source, moved to `lsn`: what the
/// source asks the target's slot to start from. A slot advanced by
/// `pg_replication_slot_advance` is written to disk only at the target's next checkpoint, so
/// a crash of the target right after the cutover brings it back before `lsn`, and the
/// source would apply again what it has (a duplicate key, every 5 s, and no way back). The
/// origin's position is WAL-logged on the source at once, and the target's walsender skips
/// every transaction that committed before the position the subscriber asks for. (A
/// `CHECKPOINT` on the target would also do, at the price of a checkpoint inside the pause.)
pub async fn start_origin_at(
    source: &Server,
    subscription: &str,
    lsn: &str,
) -> Result<(), PgError> {
    let Some(oid) = subscription_oid(source, subscription).await? else {
        return Err(PgError::Tool(format!(
            "the reverse subscription {subscription} is missing on the source"
        )));
    };
    source
        .query_one(
            "advance the reverse subscription's origin",
            ADVANCE_ORIGIN,
            &[&format!("pg_{oid}"), &lsn],
        )
        .await?;
    Ok(())
}

/// The reverse subscription on the source, its slot and publication on the target.
pub async fn drop_reverse(source: &Server, target: &Server, name: &str) -> Result<(), PgError> {
    drop_subscription(source, name).await?;
    drop_slots(target, name, None).await?;
    drop_publication(target, name).await?;
    Ok(())
}

/// A subscription's replication origin is named `pg_<its oid>`; the subscription is disabled,
/// so the origin is not in use.
pub const ADVANCE_ORIGIN: &str = "SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)";
