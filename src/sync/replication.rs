//! The publication on the source and the subscription on the target, created and removed by
//! name, so that a re-run after a crash finds what an earlier run made.

use std::time::Duration;

use crate::pg::catalog::Selection;
use crate::pg::{sql, PgError, Server};

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

pub async fn slot_exists(source: &Server, slot: &str) -> Result<bool, PgError> {
    let rows = source
        .query(
            "look up the slot",
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// Creates the subscription; the target connects to the source, creates the slot, copies the
/// existing rows and then streams changes.
pub async fn create_subscription(
    target: &Server,
    name: &str,
    source_conninfo: &str,
) -> Result<u32, PgError> {
    let statement = format!(
        "CREATE SUBSCRIPTION {sub} CONNECTION {conn} PUBLICATION {sub} \
         WITH (slot_name = {slot}, create_slot = true, copy_data = true, streaming = on)",
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

/// Drops the subscription's slot and any table-sync slots (`pg_<suboid>_sync_…`) on the
/// source, ending the WAL senders that still use them. Returns the slots dropped.
pub async fn drop_slots(
    source: &Server,
    slot: &str,
    subscription_oid: Option<u32>,
) -> Result<Vec<String>, PgError> {
    let sync_prefix = subscription_oid
        .map(|oid| format!("pg\\_{oid}\\_sync\\_%"))
        .unwrap_or_else(|| "-".into());
    let select = "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name = $1 OR slot_name LIKE $2";
    let mut dropped = Vec::new();
    for attempt in 0..50 {
        source
            .query(
                "end WAL senders of the slots",
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE (slot_name = $1 OR slot_name LIKE $2) AND active_pid IS NOT NULL",
                &[&slot, &sync_prefix],
            )
            .await?;
        let slots: Vec<String> = source
            .query("list the slots", select, &[&slot, &sync_prefix])
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
                // 55006: still active for a moment after its sender was ended; try again.
                Err(e) if e.code() == Some("55006") && attempt < 49 => {}
                Err(e) if e.code() == Some("42704") => {}
                Err(e) => return Err(e),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(dropped)
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
