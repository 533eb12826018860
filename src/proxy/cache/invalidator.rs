//! The invalidator: consumes the cache's logical replication slot (`pgoutput`, the cache's
//! publication, with logical messages) on the primary, over the replication protocol.
//!
//! For each committed transaction it bumps the version of every table it changed, and of
//! their ancestors (a write to a partition or an inheriting table changes what a read of the
//! parent sees); a schema change (the event trigger's logical message) bumps the schema epoch.
//! Then it records the position it has processed in Redis, and only then confirms it to the
//! slot: a crash in between replays the transaction, which bumps again (harmless).
//!
//! Several proxies run one each; the slot takes one consumer at a time (a second
//! `START_REPLICATION` fails with 55006, "object in use"), so the others stand by and retry.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::Cache;
use crate::pg::Side;
use crate::plan::Endpoint;
use crate::proxy::pool::server::{ServerConn, ServerError, ServerTarget};
use crate::proxy::protocol::backend::{error_fields, messages};
use crate::proxy::protocol::{body, frontend, tag};

/// How often the invalidator reports its position and asks the WAL sender for a keepalive:
/// the keepalive's position moves the processed position past WAL that holds no change to a
/// cached table, which is what lets a read right after another session's (or this one's)
/// unrelated write be served.
const STATUS_EVERY: Duration = Duration::from_millis(10);

/// How long the invalidator keeps reading the old primary's stream after a switch, to the
/// position where it ended; past it every answer is invalidated instead.
const DRAIN_FOR: Duration = Duration::from_secs(5);

/// How long a stand-by waits before trying the slot again.
const STAND_BY: Duration = Duration::from_secs(1);

/// A table's name and its ancestors' (partitioned parents, inheritance parents, at any
/// depth), as the cache's version keys name them ([`super::catalog::table_key`]).
const WITH_ANCESTORS: &str = "WITH RECURSIVE a(oid) AS ( \
     SELECT $1::oid UNION SELECT i.inhparent FROM pg_inherits i JOIN a ON i.inhrelid = a.oid) \
     SELECT n.nspname::text, c.relname::text FROM a JOIN pg_class c ON c.oid = a.oid \
     JOIN pg_namespace n ON n.oid = c.relnamespace";

/// What `/cache` shows of the invalidator.
#[derive(Default)]
pub struct Status {
    state: Mutex<String>,
    /// The position processed by this proxy's invalidator, when it is the consumer.
    pub processed: AtomicU64,
    pub transactions: AtomicU64,
    pub schema_changes: AtomicU64,
}

impl Status {
    fn set(&self, state: impl Into<String>) {
        *super::lock(&self.state) = state.into();
    }

    pub fn state(&self) -> String {
        super::lock(&self.state).clone()
    }
}

/// Runs the invalidator for as long as the proxy runs: consumer when the slot is free,
/// stand-by otherwise. `primary` gives the server transactions go to now.
pub async fn run(cache: Arc<Cache>, primary: impl Fn() -> (Side, Endpoint)) {
    loop {
        let (side, endpoint) = primary();
        match consume(&cache, side, &endpoint, &primary).await {
            Ok(()) => {}
            Err(Stop::StandBy) => {
                cache
                    .invalidator
                    .set("stand-by: another proxy consumes the cache's slot");
                tokio::time::sleep(STAND_BY).await;
            }
            Err(Stop::Failed(why)) => {
                tracing::warn!(
                    "cache invalidator: {why}; retrying in {}",
                    humantime::format_duration(STAND_BY)
                );
                cache.invalidator.set(format!("retrying: {why}"));
                tokio::time::sleep(STAND_BY).await;
            }
        }
    }
}

enum Stop {
    StandBy,
    Failed(String),
}

impl From<ServerError> for Stop {
    fn from(e: ServerError) -> Stop {
        Stop::Failed(e.to_string())
    }
}

/// One transaction's changed tables, gathered between its Begin and its Commit.
#[derive(Default)]
struct Transaction {
    open: bool,
    tables: BTreeSet<u32>,
    schema_changed: bool,
}

/// Consumes `side`'s slot until the primary is no longer `side` (a switch: the caller moves
/// to the new primary's slot) or the stream breaks.
async fn consume(
    cache: &Cache,
    side: Side,
    endpoint: &Endpoint,
    primary: &impl Fn() -> (Side, Endpoint),
) -> Result<(), Stop> {
    let password = std::env::var(&cache.settings.replication_password_env.0).map_err(|_| {
        Stop::Failed(format!(
            "{} is not set",
            cache.settings.replication_password_env.0
        ))
    })?;
    let url = &endpoint.url;
    let target = ServerTarget {
        host: url.host(),
        port: url.port(),
        database: url.dbname().to_string(),
        user: cache.settings.replication_user.clone(),
        password,
        tls: None,
        pids: Default::default(),
        max_prepared_statements: 0,
        replication: Some(super::APPLICATION_NAME),
    };
    let catalog = super::connect(endpoint, &cache.settings)
        .await
        .map_err(Stop::Failed)?;
    let mut conn = ServerConn::connect(&target, endpoint.connect_timeout.0).await?;
    let names = &cache.names;
    let start = format!(
        "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names '{}', messages 'true')",
        crate::pg::sql::ident(&names.slot),
        names.publication.replace('\'', "''"),
    );
    conn.send(frontend::query(&start)).await?;
    loop {
        let frame = conn.recv().await?;
        match tag(&frame) {
            b'W' => break,
            b'E' => {
                let (code, message) = error_fields(body(&frame));
                return Err(if code == "55006" {
                    Stop::StandBy
                } else if code == "42704" {
                    Stop::Failed(format!("{message} (run `switchyard cache setup`)"))
                } else {
                    Stop::Failed(format!("START_REPLICATION: {message} ({code})"))
                });
            }
            _ => {}
        }
    }
    tracing::info!(slot = %names.slot, "cache invalidator consuming");
    cache.invalidator.set(format!(
        "consuming slot {} on {}:{}",
        names.slot,
        url.host(),
        url.port()
    ));
    let mut ancestors: HashMap<u32, Vec<String>> = HashMap::new();
    let mut tx = Transaction::default();
    let mut processed = 0u64;
    let mut recorded = 0u64;
    let mut drain_until: Option<(u64, Instant)> = None;
    let mut every = tokio::time::interval(STATUS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let frame = tokio::select! {
            frame = conn.recv() => frame?,
            _ = every.tick() => {
                if primary().0 != side {
                    // A switch. The old primary is fenced: its stream ends at its current
                    // position. Everything up to it is processed before the new primary's
                    // slot is read, so no write of the old primary is left unbumped.
                    match drain_until {
                        None => {
                            drain_until = Some(match catalog.query_one(super::freshness::INSERT_POSITION, &[]).await {
                                Ok(row) => (row.get::<_, i64>(0) as u64, Instant::now()),
                                Err(e) => {
                                    invalidate_all(cache, side, &format!("the old primary cannot be read ({e})")).await;
                                    return Ok(());
                                }
                            });
                        }
                        Some((end, _)) if processed >= end && !tx.open => {
                            tracing::info!("cache invalidator: the old primary's stream is processed; moving to the new primary's slot");
                            return Ok(());
                        }
                        Some((_, since)) if since.elapsed() > DRAIN_FOR => {
                            invalidate_all(cache, side, "its stream was not processed in time").await;
                            return Ok(());
                        }
                        Some(_) => {}
                    }
                }
                if processed > recorded {
                    record(cache, side, processed).await;
                    recorded = processed;
                }
                conn.send(status_update(recorded, true)).await?;
                continue;
            }
        };
        for message in messages(&frame) {
            match message[0] {
                b'd' => {}
                b'E' => {
                    let (code, text) = error_fields(&message[5..]);
                    return Err(Stop::Failed(format!("replication stream: {text} ({code})")));
                }
                b'c' => return Err(Stop::Failed("the replication stream ended".into())),
                _ => continue,
            }
            let mut data = &message[5..];
            if data.is_empty() {
                continue;
            }
            match data.get_u8() {
                // Keepalive: everything before its position was sent. Outside a transaction
                // nothing before it is left to process.
                b'k' if data.len() >= 17 => {
                    let end = data.get_u64();
                    if !tx.open && end > processed {
                        processed = end;
                    }
                    let _time = data.get_i64();
                    if data.get_u8() == 1 {
                        conn.send(status_update(recorded, false)).await?;
                    }
                }
                b'w' if data.len() >= 24 => {
                    let _start = data.get_u64();
                    let _end = data.get_u64();
                    let _time = data.get_i64();
                    let Some(commit_end) = on_message(&mut tx, data, &names.message_prefix) else {
                        continue;
                    };
                    let mut tables = BTreeSet::new();
                    for table in std::mem::take(&mut tx.tables) {
                        if let std::collections::hash_map::Entry::Vacant(entry) =
                            ancestors.entry(table)
                        {
                            let found = catalog
                                .query(WITH_ANCESTORS, &[&table])
                                .await
                                .map_err(|e| Stop::Failed(crate::pg::describe(&e)))?
                                .iter()
                                .map(|row| {
                                    super::catalog::table_key(
                                        &row.get::<_, String>(0),
                                        &row.get::<_, String>(1),
                                    )
                                })
                                .collect();
                            entry.insert(found);
                        }
                        tables.extend(ancestors.get(&table).into_iter().flatten().cloned());
                    }
                    let schema = std::mem::take(&mut tx.schema_changed);
                    if schema {
                        ancestors.clear();
                        cache.forget_decisions();
                        cache
                            .invalidator
                            .schema_changes
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    bump(cache, side, &tables, schema, commit_end).await;
                    cache
                        .invalidator
                        .transactions
                        .fetch_add(1, Ordering::Relaxed);
                    processed = processed.max(commit_end);
                    recorded = recorded.max(commit_end);
                }
                _ => {}
            }
        }
    }
}

/// Notes one pgoutput message; at a Commit, the commit's end position.
fn on_message(tx: &mut Transaction, mut m: &[u8], prefix: &str) -> Option<u64> {
    if m.is_empty() {
        return None;
    }
    tracing::trace!(kind = %(m[0] as char), "cache invalidator: message");
    match m.get_u8() {
        b'B' => {
            tx.open = true;
            tx.tables.clear();
            tx.schema_changed = false;
        }
        b'C' if m.len() >= 25 => {
            let _flags = m.get_u8();
            let _commit = m.get_u64();
            let end = m.get_u64();
            tx.open = false;
            return Some(end);
        }
        b'I' | b'U' | b'D' if m.len() >= 4 => {
            tx.tables.insert(m.get_u32());
        }
        b'T' if m.len() >= 5 => {
            let count = m.get_u32() as usize;
            let _options = m.get_u8();
            for _ in 0..count {
                if m.len() < 4 {
                    break;
                }
                tx.tables.insert(m.get_u32());
            }
        }
        b'M' if m.len() >= 9 => {
            let _flags = m.get_u8();
            let _lsn = m.get_u64();
            let end = m.iter().position(|&b| b == 0).unwrap_or(m.len());
            if &m[..end] == prefix.as_bytes() {
                tx.schema_changed = true;
                tracing::debug!("cache invalidator: schema change");
            }
        }
        _ => {}
    }
    None
}

/// Bumps the versions (and the schema epoch) and records the position, in one MULTI; retried
/// until Redis takes it: the position is never recorded, nor confirmed to the slot, before
/// the versions it covers are bumped.
async fn bump(cache: &Cache, side: Side, tables: &BTreeSet<String>, schema: bool, position: u64) {
    tracing::debug!(?tables, schema, position, "cache invalidator: bump");
    let mut pipe = redis::pipe();
    pipe.atomic();
    for table in tables {
        pipe.cmd("INCR").arg(cache.version_key(table)).ignore();
    }
    if schema {
        pipe.cmd("INCR").arg(cache.schema_key()).ignore();
    }
    if position > 0 {
        pipe.cmd("SET")
            .arg(cache.position_key(side))
            .arg(position)
            .ignore();
    }
    let main = cache.redis.len().saturating_sub(1);
    let Some(conn) = cache.redis.get(main) else {
        return;
    };
    let mut delay = Duration::from_millis(10);
    loop {
        let mut c = conn.clone();
        match tokio::time::timeout(Duration::from_secs(1), pipe.query_async::<()>(&mut c)).await {
            Ok(Ok(())) => break,
            Ok(Err(e)) => tracing::warn!("cache invalidator cannot reach redis: {e}"),
            Err(_) => tracing::warn!("cache invalidator: redis did not answer within 1s"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
    cache
        .invalidator
        .processed
        .store(position, Ordering::Relaxed);
}

/// The old primary's stream could not be read to its end after a switch: every answer is
/// invalidated (the schema epoch is part of every key).
async fn invalidate_all(cache: &Cache, side: Side, why: &str) {
    tracing::warn!("cache invalidator: after the switch, the {side}'s stream was not read to its end ({why}): every cached answer is invalidated");
    bump(cache, side, &BTreeSet::new(), true, 0).await;
}

/// Records a position with nothing to bump (a keepalive's).
async fn record(cache: &Cache, side: Side, position: u64) {
    bump(cache, side, &BTreeSet::new(), false, position).await;
}

/// A Standby Status Update: `position` written, flushed and applied.
fn status_update(position: u64, reply: bool) -> Bytes {
    let mut payload = BytesMut::with_capacity(34);
    payload.put_u8(b'r');
    payload.put_u64(position);
    payload.put_u64(position);
    payload.put_u64(position);
    payload.put_i64(pg_now());
    payload.put_u8(u8::from(reply));
    let mut frame = BytesMut::with_capacity(payload.len() + 5);
    frame.put_u8(b'd');
    frame.put_u32(payload.len() as u32 + 4);
    frame.extend_from_slice(&payload);
    frame.freeze()
}

/// Microseconds since 2000-01-01, the replication protocol's clock.
fn pg_now() -> i64 {
    const PG_EPOCH: u64 = 946_684_800;
    let since_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    since_unix.as_micros() as i64 - (PG_EPOCH as i64) * 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn a_transaction_gathers_its_tables_and_schema_changes_until_its_commit() {
        let mut tx = Transaction::default();
        assert_eq!(on_message(&mut tx, &message(b'B', &[0; 20]), "p"), None);
        assert!(tx.open);
        // Relation messages carry no change.
        on_message(&mut tx, &message(b'R', &[0, 0, 0, 9, b'x', 0]), "p");
        on_message(&mut tx, &message(b'I', &[0, 0, 0, 7, b'N']), "p");
        on_message(&mut tx, &message(b'U', &[0, 0, 0, 8, b'N']), "p");
        on_message(&mut tx, &message(b'D', &[0, 0, 0, 7, b'K']), "p");
        // TRUNCATE of two tables.
        on_message(
            &mut tx,
            &message(b'T', &[0, 0, 0, 2, 0, 0, 0, 0, 10, 0, 0, 0, 11]),
            "p",
        );
        // Another prefix's message is not a schema change; ours is.
        let mut logical = vec![1];
        logical.extend_from_slice(&[0; 8]);
        logical.extend_from_slice(b"other\0");
        on_message(&mut tx, &message(b'M', &logical), "p");
        assert!(!tx.schema_changed);
        let mut ours = vec![1];
        ours.extend_from_slice(&[0; 8]);
        ours.extend_from_slice(b"p\0");
        ours.extend_from_slice(&[0, 0, 0, 5]);
        ours.extend_from_slice(b"ALTER");
        on_message(&mut tx, &message(b'M', &ours), "p");
        assert!(tx.schema_changed);
        let mut commit = vec![0];
        commit.extend_from_slice(&100u64.to_be_bytes());
        commit.extend_from_slice(&164u64.to_be_bytes());
        commit.extend_from_slice(&[0; 8]);
        assert_eq!(on_message(&mut tx, &message(b'C', &commit), "p"), Some(164));
        assert!(!tx.open);
        assert_eq!(
            tx.tables.iter().copied().collect::<Vec<_>>(),
            vec![7, 8, 10, 11]
        );
    }

    #[test]
    fn a_status_update_reports_the_position_written_flushed_and_applied() {
        let frame = status_update(0x1234, true);
        assert_eq!(frame[0], b'd');
        assert_eq!(u32::from_be_bytes(frame[1..5].try_into().unwrap()), 38);
        assert_eq!(frame[5], b'r');
        for at in [6, 14, 22] {
            assert_eq!(
                u64::from_be_bytes(frame[at..at + 8].try_into().unwrap()),
                0x1234
            );
        }
        assert_eq!(frame[38], 1);
    }
}
