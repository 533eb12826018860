//! The shadow connections: `pool_size` per (role, server), apart from the applications'
//! pools, logged in as the application's role, with `default_transaction_read_only = on`
//! (a second guard: a read that turns out to write fails instead) and the plan's
//! `statement_timeout`, and the client's tracked settings applied before each replay.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::answer::Answer;
use crate::pg::{sql, Side};
use crate::proxy::pool::server::{ServerConn, ServerTarget};
use crate::proxy::protocol::frontend;
use crate::proxy::protocol::tags::*;
use crate::proxy::protocol::{backend, tag};

/// Why a replay could not run.
#[derive(Debug)]
pub struct ReplayError(pub String);

/// A shadow connection and the client settings it has now.
struct Conn {
    server: ServerConn,
    settings: Option<BTreeMap<String, String>>,
    /// Outside a transaction block (its last ReadyForQuery said so).
    idle: bool,
}

/// One (role, server)'s shadow connections.
struct Slot {
    target: ServerTarget,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
}

/// Every (role, server)'s shadow connections.
pub struct Connections {
    slots: HashMap<(String, usize), Slot>,
    connect_timeout: Duration,
    /// `SET statement_timeout = ...` as SQL.
    statement_timeout: String,
    deadline: Duration,
}

/// A shadow connection on loan: given back when dropped, unless it broke.
pub struct Loan<'a> {
    slot: &'a Slot,
    /// An exchange that takes longer (a server frozen, not just slow: `statement_timeout`
    /// stops slow ones) gives the connection up.
    deadline: Duration,
    conn: Option<Conn>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Loan<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // One left in a transaction (a replayed transaction whose end did not run) is
            // not used again.
            if !conn.server.broken && conn.idle {
                super::lock(&self.slot.idle).push(conn);
            }
        }
    }
}

impl Connections {
    pub fn new(
        targets: Vec<(String, Side, ServerTarget)>,
        pool_size: u32,
        connect_timeout: Duration,
        statement_timeout: Duration,
    ) -> Connections {
        let slots = targets
            .into_iter()
            .map(|(user, side, target)| {
                (
                    (user, crate::proxy::side_index(side)),
                    Slot {
                        target,
                        idle: Mutex::new(Vec::new()),
                        permits: Arc::new(Semaphore::new(pool_size.max(1) as usize)),
                    },
                )
            })
            .collect();
        Connections {
            slots,
            connect_timeout,
            statement_timeout: format!("{}ms", statement_timeout.as_millis().max(1)),
            deadline: statement_timeout * 2 + Duration::from_secs(1),
        }
    }

    /// A connection as `user` to `side`, with `settings` applied.
    pub async fn take(
        &self,
        user: &str,
        side: Side,
        settings: &BTreeMap<String, String>,
    ) -> Result<Loan<'_>, ReplayError> {
        let slot = self
            .slots
            .get(&(user.to_string(), crate::proxy::side_index(side)))
            .ok_or_else(|| ReplayError(format!("no shadow connections for role {user}")))?;
        let permit = slot
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ReplayError("the proxy is stopping".into()))?;
        let idle = super::lock(&slot.idle).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                // Boxed: a login's future is large and rare; inline, it would be copied with
                // every replay's task.
                let server = Box::pin(ServerConn::connect(&slot.target, self.connect_timeout))
                    .await
                    .map_err(|e| ReplayError(format!("connecting to the {side}: {e}")))?;
                Conn {
                    server,
                    settings: None,
                    idle: true,
                }
            }
        };
        let mut loan = Loan {
            slot,
            deadline: self.deadline,
            conn: Some(conn),
            _permit: permit,
        };
        loan.apply(settings, &self.statement_timeout).await?;
        Ok(loan)
    }
}

impl Loan<'_> {
    fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a loan holds its connection until dropped")
    }

    /// Makes the connection's settings the client's, plus the shadow's own two.
    async fn apply(
        &mut self,
        settings: &BTreeMap<String, String>,
        statement_timeout: &str,
    ) -> Result<(), ReplayError> {
        if self.conn().settings.as_ref() == Some(settings) {
            return Ok(());
        }
        let mut sql = String::from("RESET ALL;");
        for (name, value) in settings {
            sql.push_str(&format!("SET {} = {value};", sql::ident(name)));
        }
        sql.push_str(&format!(
            "SET default_transaction_read_only = on; SET statement_timeout = '{statement_timeout}';"
        ));
        let answer = self.simple(&sql).await?;
        if let Some((code, message)) = answer.error {
            return Err(ReplayError(format!(
                "the client's settings do not apply on the shadow connection: {code} {message}"
            )));
        }
        self.conn().settings = Some(settings.clone());
        Ok(())
    }

    /// Sends `frames` (a Query, or an extended-protocol group ending in Sync) and reads the
    /// answer up to its ReadyForQuery: the answer's messages and how long the server took.
    pub async fn run(&mut self, frames: &[u8]) -> Result<(Answer, Duration), ReplayError> {
        let started = Instant::now();
        let mut answers = self.pipeline(&[frames]).await?;
        let messages = answers
            .pop()
            .map(|(messages, _)| messages)
            .unwrap_or_default();
        Ok((Answer::read(&messages), started.elapsed()))
    }

    /// A simple Query of the proxy's own, its answer read.
    pub async fn simple(&mut self, sql: &str) -> Result<Answer, ReplayError> {
        Ok(self.run(&frontend::query(sql)).await?.0)
    }

    /// Sends every turn of `turns` (each a Query or a group ending in Sync) in one write and
    /// reads their answers' messages, each up to its ReadyForQuery. One write instead of one
    /// exchange per turn: the server reads them in one go instead of waking for each, which
    /// made a replay on PostgreSQL 17 cost 107 µs of its CPU against 45 µs pipelined eight at
    /// a time (2 cores, under pgbench load). Each answer has [`Connections`]' deadline.
    ///
    /// Timings: the first answer from the write; a later one from the end of the one before
    /// it (the server ran it meanwhile), when none of it had arrived by then, and not at
    /// all (`None`) when it had: it waited for the proxy, and its time is not known. A slow
    /// statement, the one that matters, arrives late and is timed.
    pub async fn pipeline(
        &mut self,
        turns: &[&[u8]],
    ) -> Result<Vec<(Vec<u8>, Option<Duration>)>, ReplayError> {
        let deadline = self.deadline;
        let conn = self.conn();
        let mut out = bytes::BytesMut::with_capacity(turns.iter().map(|t| t.len()).sum());
        for turn in turns {
            out.extend_from_slice(turn);
        }
        let started = Instant::now();
        let exchange = async {
            conn.server.send(out.freeze()).await?;
            let mut answers = Vec::with_capacity(turns.len());
            let mut last = started;
            while answers.len() < turns.len() {
                let waited = answers.is_empty() || conn.server.reader.read_buffer().is_empty();
                let (messages, status) =
                    tokio::time::timeout(deadline, read_answer(&mut conn.server))
                        .await
                        .map_err(|_| {
                            crate::proxy::pool::ServerError::Protocol(format!(
                                "no answer within {deadline:?}"
                            ))
                        })??;
                conn.idle = status == IDLE;
                let now = Instant::now();
                let elapsed = waited.then(|| now - last);
                last = now;
                answers.push((messages, elapsed));
            }
            Ok(answers)
        };
        exchange
            .await
            .map_err(|e: crate::proxy::pool::ServerError| {
                conn.server.broken = true;
                ReplayError(e.to_string())
            })
    }

    /// The single text value of a one-row answer.
    pub async fn value(&mut self, sql: &str) -> Result<Option<String>, ReplayError> {
        let answer = self.simple(sql).await?;
        if let Some((code, message)) = answer.error {
            return Err(ReplayError(format!("{code} {message}")));
        }
        Ok(answer
            .rows
            .first()
            .and_then(|row| row.first().cloned().flatten())
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

/// One answer's messages, up to (without) its ReadyForQuery, and the transaction status
/// that ReadyForQuery gave. A FATAL error ends the connection: an error.
async fn read_answer(
    server: &mut ServerConn,
) -> Result<(Vec<u8>, u8), crate::proxy::pool::ServerError> {
    let mut messages = Vec::new();
    loop {
        let frame = server.recv().await?;
        if tag(&frame) == READY_FOR_QUERY {
            return Ok((messages, frame.get(5).copied().unwrap_or(IDLE)));
        }
        if tag(&frame) == ERROR_RESPONSE && backend::is_fatal(&frame[5..]) {
            let (code, message) = backend::error_fields(&frame[5..]);
            return Err(crate::proxy::pool::ServerError::Protocol(format!(
                "{code} {message}"
            )));
        }
        messages.extend_from_slice(&frame);
    }
}

/// The names of the types `oids` on the server of `loan` (`format_type`).
pub async fn type_names(
    loan: &mut Loan<'_>,
    oids: &[u32],
) -> Result<BTreeMap<u32, String>, ReplayError> {
    if oids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let list: Vec<String> = oids.iter().map(|o| o.to_string()).collect();
    let answer = loan
        .simple(&format!(
            "SELECT oid::int8::text, format_type(oid, NULL) FROM pg_type WHERE oid IN ({})",
            list.join(",")
        ))
        .await?;
    Ok(answer
        .rows
        .iter()
        .filter_map(|row| {
            let oid = std::str::from_utf8(row.first()?.as_ref()?)
                .ok()?
                .parse()
                .ok()?;
            let name = String::from_utf8_lossy(row.get(1)?.as_ref()?).into_owned();
            Some((oid, name))
        })
        .collect())
}

/// The `EXPLAIN` of the statement `frames` carry: a Query's text, or an unnamed group's
/// Parse with `EXPLAIN ` in front and its other messages as they were.
pub fn explain_frames(frames: &[u8]) -> Option<Vec<u8>> {
    let first = backend::messages(frames).next()?;
    let body = &first[5..];
    match first[0] {
        QUERY => {
            let text = body.strip_suffix(&[0])?;
            Some(frontend::query(&format!("EXPLAIN {}", String::from_utf8_lossy(text))).to_vec())
        }
        PARSE => {
            let name_end = body.iter().position(|&b| b == 0)?;
            let mut parse_body = body[..=name_end].to_vec();
            parse_body.extend_from_slice(b"EXPLAIN ");
            parse_body.extend_from_slice(&body[name_end + 1..]);
            let mut out = message(PARSE, &parse_body);
            // EXPLAIN answers one text column: the client's result formats would not fit it.
            for rest in backend::messages(&frames[first.len()..]) {
                match rest[0] {
                    BIND => {
                        out.extend_from_slice(&message(BIND, &bind_with_text_results(&rest[5..])?))
                    }
                    _ => out.extend_from_slice(rest),
                }
            }
            Some(out)
        }
        _ => None,
    }
}

/// An EXPLAIN's answer as its text.
pub fn plan_text(answer: &Answer) -> String {
    if let Some((code, message)) = &answer.error {
        return format!("EXPLAIN failed: {code} {message}");
    }
    answer
        .rows
        .iter()
        .filter_map(|row| row.first().cloned().flatten())
        .map(|line| String::from_utf8_lossy(&line).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(kind);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A Bind's parts: portal, statement, parameter format codes, parameters, result formats.
struct Bind<'a> {
    formats: Vec<i16>,
    values: Vec<Option<&'a [u8]>>,
    /// Where the result format codes start.
    results_at: usize,
}

fn read_bind(body: &[u8]) -> Option<Bind<'_>> {
    let portal_end = body.iter().position(|&b| b == 0)?;
    let statement_end = portal_end + 1 + body[portal_end + 1..].iter().position(|&b| b == 0)?;
    let mut at = statement_end + 1;
    let i16_at = |at: usize| -> Option<i16> {
        Some(i16::from_be_bytes(body.get(at..at + 2)?.try_into().ok()?))
    };
    let count = i16_at(at)?.max(0) as usize;
    at += 2;
    let mut formats = Vec::with_capacity(count);
    for _ in 0..count {
        formats.push(i16_at(at)?);
        at += 2;
    }
    let params = i16_at(at)?.max(0) as usize;
    at += 2;
    let mut values = Vec::with_capacity(params);
    for _ in 0..params {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            values.push(None);
        } else {
            values.push(Some(body.get(at..at + len as usize)?));
            at += len as usize;
        }
    }
    Some(Bind {
        formats,
        values,
        results_at: at,
    })
}

/// The Bind body with its result format codes replaced by "all text".
fn bind_with_text_results(body: &[u8]) -> Option<Vec<u8>> {
    let bind = read_bind(body)?;
    let mut out = body[..bind.results_at].to_vec();
    out.extend_from_slice(&0i16.to_be_bytes());
    Some(out)
}

/// The parameters of the group's Bind, as text (binary ones as `\\x` hex).
pub fn parameters(frames: &[u8]) -> Vec<Option<String>> {
    let Some(bind) = backend::messages(frames).find(|m| m[0] == BIND) else {
        return Vec::new();
    };
    let Some(bind) = read_bind(&bind[5..]) else {
        return Vec::new();
    };
    bind.values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let format = match bind.formats.len() {
                0 => 0,
                1 => bind.formats[0],
                _ => bind.formats.get(i).copied().unwrap_or(0),
            };
            value.map(|v| super::answer::value_text(v, format == 1))
        })
        .collect()
}
