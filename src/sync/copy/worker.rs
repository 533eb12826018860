//! A copy worker: a source connection in the anchor's snapshot and a target connection; it
//! takes chunks off the shared queue and streams each from the source's `COPY TO` into the
//! target's `COPY FROM`, never landing on disk, marking it done in the same target
//! transaction as its rows. A failure (a dropped connection, a target restart) retries the
//! chunk on new connections in the same snapshot, while the anchor holds it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::plan::{Chunk, CopyPlan};
use super::progress::{self, Counters};
use super::raw::{self, Raw};
use super::snapshot::import_statement;
use crate::pg::{PgError, Side};
use crate::plan::Plan;

/// Attempts per chunk: a target restart takes a few seconds, and the waits between attempts
/// (1, 2, 4, 8 s) cover about 15 s of it.
const ATTEMPTS: u32 = 5;

/// What all workers share.
pub struct Shared {
    pub plan: Arc<CopyPlan>,
    pub queue: Mutex<VecDeque<Chunk>>,
    pub counters: Counters,
    /// The anchor's exported snapshot.
    pub snapshot: String,
}

impl Shared {
    fn next(&self) -> Option<Chunk> {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }
}

struct Connections {
    source: Raw,
    target: Raw,
}

/// Runs one worker until the queue is empty; the first chunk that fails every attempt ends
/// it with that chunk's error.
pub async fn run(plan: &Plan, shared: &Shared) -> Result<(), PgError> {
    let mut connections: Option<Connections> = None;
    while let Some(chunk) = shared.next() {
        let table = &shared.plan.tables[chunk.table];
        let relation = table.name.to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match connections.as_mut() {
                Some(c) => copy_chunk(c, shared, &chunk, &relation).await,
                None => match connect(plan, &shared.snapshot).await {
                    Ok(mut c) => {
                        let result = copy_chunk(&mut c, shared, &chunk, &relation).await;
                        connections = Some(c);
                        result
                    }
                    Err(e) => Err(e),
                },
            };
            let Err(error) = result else { break };
            // Whatever the connections were in the middle of, they start afresh.
            connections = None;
            if attempt >= ATTEMPTS {
                return Err(PgError::Tool(format!(
                    "copying {relation} (chunk {} of {}) failed {ATTEMPTS} times; last: {error}",
                    chunk.number + 1,
                    table.chunks
                )));
            }
            let wait = Duration::from_secs(1 << (attempt - 1));
            tracing::warn!(table = %relation, chunk = chunk.number, attempt, "copying a chunk failed: {error}; trying again in {wait:?} in the same snapshot");
            tokio::time::sleep(wait).await;
            // The COMMIT may have landed though its answer did not.
            if let Ok(mut c) = connect(plan, &shared.snapshot).await {
                if chunk_done(&mut c.target, &relation, &chunk)
                    .await
                    .unwrap_or(false)
                {
                    shared.counters.done(chunk.table, 0);
                    connections = Some(c);
                    break;
                }
                connections = Some(c);
            }
        }
    }
    Ok(())
}

async fn connect(plan: &Plan, snapshot: &str) -> Result<Connections, PgError> {
    let (source, target) = tokio::join!(
        Raw::connect(Side::Source, &plan.source, None),
        Raw::connect(Side::Target, &plan.target, None)
    );
    let (mut source, mut target) = (source?, target?);
    source.simple(&import_statement(snapshot)).await?;
    // Each chunk commits with its mark; a target crash loses both or neither, so the commit
    // need not wait for the WAL flush.
    target
        .simple("SET synchronous_commit = off; SET application_name = 'switchyard-copy'")
        .await?;
    Ok(Connections { source, target })
}

async fn chunk_done(target: &mut Raw, relation: &str, chunk: &Chunk) -> Result<bool, PgError> {
    let answer = target
        .simple(&progress::is_done(relation, chunk.number))
        .await?;
    Ok(answer
        .rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .as_deref()
        == Some("t"))
}

/// One attempt at one chunk.
async fn copy_chunk(
    c: &mut Connections,
    shared: &Shared,
    chunk: &Chunk,
    relation: &str,
) -> Result<(), PgError> {
    let counters = &shared.counters;
    counters.started(chunk.table);
    let mut streamed = 0u64;
    let result = stream(c, shared, chunk, relation, &mut streamed).await;
    counters.stopped(chunk.table);
    match result {
        Ok(rows) => {
            counters.done(chunk.table, rows);
            Ok(())
        }
        Err(e) => {
            counters.undo(chunk.table, streamed);
            Err(e)
        }
    }
}

async fn stream(
    c: &mut Connections,
    shared: &Shared,
    chunk: &Chunk,
    relation: &str,
    streamed: &mut u64,
) -> Result<u64, PgError> {
    let plan = &shared.plan;
    // Its own statement: in one query string with the BEGIN, the mark would belong to the
    // chunk's transaction and show only when it commits.
    c.target
        .simple(&progress::mark_started(relation, chunk.number))
        .await?;
    c.target.simple("BEGIN").await?;
    let copied = raw::pipe(
        &mut c.source,
        &mut c.target,
        &plan.copy_out(chunk),
        &plan.copy_in(chunk),
        &mut |bytes| {
            *streamed += bytes;
            shared.counters.streamed(chunk.table, bytes);
        },
    )
    .await?;
    c.target
        .simple(&format!(
            "{}; COMMIT",
            progress::mark_done(relation, chunk.number, copied, *streamed)
        ))
        .await?;
    Ok(copied)
}
