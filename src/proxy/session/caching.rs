//! The read cache's part of a session ([`crate::proxy::cache`]): a read answered from Redis
//! without a server connection, a miss's answer collected on its way to the client, and the
//! commit position of the session's writes (read-your-writes).

use super::*;
use crate::proxy::cache::freshness::INSERT_POSITION;
use crate::proxy::cache::{Fill, Lookup, Read};

/// The session's cache state.
#[derive(Default)]
pub(super) struct Caching {
    /// The answer of a miss being collected, stored at its ReadyForQuery.
    pub(super) fill: Option<Fill>,
    /// The session's last write transaction committed at this position of this server: the
    /// cache serves the session only once the invalidator has processed it. (A position of
    /// the old primary after a switch is processed by then: the invalidator reads the old
    /// primary's stream to its end before the new one's.)
    pub(super) own_write: Option<(Side, u64)>,
    /// The transaction running may write (anything but a cacheable read): its commit
    /// position is asked before the connection goes back.
    pub(super) may_write: bool,
    /// The proxy caches: what the hot path looks at.
    pub(super) on: bool,
    /// The session may have made a temporary table: one of the same name as a cached table
    /// would shadow it for this session only, which the cache's decisions (made on a
    /// connection of its own) cannot see. Such a session is not served from the cache again.
    pub(super) temporary: bool,
}

/// ParameterDescription: the answer to a Describe of the statement.
const PARAMETER_DESCRIPTION: u8 = b't';

/// What the cache did with a query.
pub(super) enum Served {
    /// Answered from the cache.
    Answered,
    /// Not answered: it goes to the server (collected for the cache if `fill` was set).
    Forward,
    /// The client went away.
    Closed,
}

impl Session {
    /// Nothing is pending on the session: a read may be answered without a server.
    fn cache_may_answer(&self) -> bool {
        self.status == IDLE
            && self.replies.owed() == 0
            && self.unsynced == 0
            && self.settings.pending.is_empty()
            && self.registry.awaited.is_empty()
            && self.unnamed.sent.is_empty()
            && self.unnamed.replayed.is_none()
            && self.parked.is_none()
    }

    /// A simple Query outside a transaction block, with nothing pending: answered from the
    /// cache when it can be.
    pub(super) async fn serve_from_cache(&mut self, frame: &Bytes) -> Served {
        if !self.cache_may_answer() {
            return Served::Forward;
        }
        let Some(sql) = frontend::query_text(frame).and_then(|t| std::str::from_utf8(t).ok())
        else {
            return Served::Forward;
        };
        self.look_up(sql, b"Q", 0).await
    }

    /// An unnamed Parse outside a transaction block followed, in what the client sent with
    /// it, by the rest of its group: Bind of the unnamed statement into the unnamed portal,
    /// Describe of that portal (or not), Execute, Sync. Answered from the cache when it can
    /// be, the group's other messages taken from the client's buffer.
    pub(super) async fn serve_group_from_cache(&mut self, parse: &Bytes) -> Served {
        if !self.cache_may_answer() {
            return Served::Forward;
        }
        let Some(sql) = frontend::parse_message(parse)
            .filter(|p| p.name.is_empty())
            .and_then(|p| std::str::from_utf8(p.query).ok())
        else {
            return Served::Forward;
        };
        let Some(rest) = unnamed_group(self.client_r.read_buffer()) else {
            return Served::Forward;
        };
        let mut group = Vec::with_capacity(parse.len() + rest);
        group.extend_from_slice(parse);
        group.extend_from_slice(&self.client_r.read_buffer()[..rest]);
        let sql = sql.to_string();
        let served = self.look_up(&sql, &group, rest).await;
        if matches!(served, Served::Answered) {
            // The client's unnamed statement is now this one: replayed on whichever server
            // connection a later Bind of it runs on.
            self.unnamed.text.clear();
            self.unnamed.text.extend_from_slice(parse);
            self.unnamed.here = false;
            self.unnamed.before = None;
            self.unnamed.sets = false;
        }
        served
    }

    /// Looks a read up; on a hit answers it and takes the group's `rest` bytes (the
    /// messages after the first) from the client's buffer.
    async fn look_up(&mut self, sql: &str, group: &[u8], rest: usize) -> Served {
        let Some(cache) = self.shared.cache.clone() else {
            return Served::Forward;
        };
        let sql = sql.trim_end_matches('\0');
        if self.caching.temporary {
            return Served::Forward;
        }
        // Only a SELECT (or WITH ... SELECT) can be cached: anything else is not even
        // decided (each distinct write would take a decision and a place in the map).
        if !inspect::starts_with_keyword(sql, "SELECT")
            && !inspect::starts_with_keyword(sql, "WITH")
        {
            return Served::Forward;
        }
        let side = self.route().side();
        let own_write = match self.caching.own_write {
            Some((on, position)) if on == side => position,
            _ => 0,
        };
        match cache
            .lookup(
                self.shard,
                Read {
                    side,
                    sql,
                    role: &self.user,
                    settings: &self.settings.wanted,
                    own_write,
                    group,
                },
            )
            .await
        {
            Lookup::Hit(answer) => {
                metrics::add(&self.metrics().queries, 1);
                metrics::add(&self.metrics().bytes_to_clients, answer.len() as u64 + 6);
                self.client_r.read_buffer_mut().advance(rest);
                if self.client_w.feed(answer).await.is_err()
                    || self
                        .client_w
                        .send(backend::ready_for_query(IDLE))
                        .await
                        .is_err()
                {
                    return Served::Closed;
                }
                self.caching.may_write = false;
                Served::Answered
            }
            Lookup::Miss(fill) => {
                self.caching.fill = Some(fill);
                self.caching.may_write = false;
                Served::Forward
            }
            Lookup::Bypass { read_only } => {
                // A proven read cannot write: no commit position to ask after it (a read that
                // asked would chase the position of every other session's writes).
                if read_only {
                    self.caching.may_write = false;
                }
                Served::Forward
            }
        }
    }

    /// A Query or Parse that may make a temporary table (`CREATE TEMP ...`, `SELECT ... INTO
    /// TEMP ...`, `pg_temp.`): see [`Caching::temporary`]. Once noticed, never looked for again.
    pub(super) fn note_temporary(&mut self, frame: &Bytes) {
        if self.caching.temporary {
            return;
        }
        let text = match tag(frame) {
            QUERY => frontend::query_text(frame),
            PARSE => frontend::parse_message(frame).map(|p| p.query),
            _ => None,
        };
        if text.is_some_and(may_make_temporary) {
            self.caching.temporary = true;
        }
    }

    /// A client message forwarded within the turn of a cacheable read: the turn may write
    /// unless it only goes on with the read's own unnamed statement and portal.
    pub(super) fn note_forwarded(&mut self, frame: &Bytes) {
        self.note_temporary(frame);
        let part_of_the_read = self.caching.fill.is_some()
            && match tag(frame) {
                DESCRIBE | EXECUTE | SYNC | FLUSH => true,
                BIND => frontend::bind_statement(frame)
                    .is_some_and(|(_, statement, _)| statement.is_empty()),
                _ => false,
            };
        if !part_of_the_read {
            self.caching.may_write = true;
        }
    }

    /// A server message while a miss's answer is collected: RowDescription, DataRows and the
    /// CommandComplete are kept; anything else (an error, a notice, a setting reported)
    /// abandons the fill. `frame` may be a run of several messages.
    pub(super) fn collect_for_cache(&mut self, frame: &[u8]) {
        let Some(fill) = self.caching.fill.as_mut() else {
            return;
        };
        if frame.first() == Some(&READY_FOR_QUERY) {
            return;
        }
        let mut rest = frame;
        let mut fits = true;
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize + 1;
            let kept = matches!(
                rest[0],
                PARSE_COMPLETE
                    | BIND_COMPLETE
                    | PARAMETER_DESCRIPTION
                    | ROW_DESCRIPTION
                    | DATA_ROW
                    | COMMAND_COMPLETE
            );
            if !kept || len > rest.len() {
                fits = false;
                break;
            }
            rest = &rest[len..];
        }
        if !fits || !rest.is_empty() || !fill.add(frame) {
            if let Some(cache) = &self.shared.cache {
                cache
                    .stats
                    .too_large
                    .fetch_add(u64::from(fits), std::sync::atomic::Ordering::Relaxed);
            }
            self.caching.fill = None;
        }
    }

    /// The ReadyForQuery that ends a collected answer: stored when the statement ran outside
    /// a transaction block and completed.
    pub(super) fn answer_collected(&mut self, status: u8) {
        let Some(fill) = self.caching.fill.take() else {
            return;
        };
        let Some(cache) = self.shared.cache.clone() else {
            return;
        };
        // A simple Query's answer starts with its RowDescription; an unnamed group's with
        // ParseComplete and BindComplete. Either holds one completed statement.
        let complete = matches!(
            fill.answer.first(),
            Some(&ROW_DESCRIPTION) | Some(&PARSE_COMPLETE)
        ) && backend::command_tags(&fill.answer).count() == 1;
        if status == IDLE && complete && !self.group_failed {
            let shard = self.shard;
            tokio::spawn(async move { cache.store(shard, fill).await });
        }
    }

    /// A write transaction of this session is over: its commit position is asked on the
    /// same connection (one round trip, only while caching is on), so that the session's
    /// next read is served from the cache only once the invalidator has processed it.
    pub(super) async fn note_own_write(&mut self) -> bool {
        if !std::mem::take(&mut self.caching.may_write) {
            return true;
        }
        let Some(server) = self.server.as_mut() else {
            return true;
        };
        if server.send(frontend::query(INSERT_POSITION)).await.is_err() {
            return self.server_lost().await;
        }
        // A simple Query destroys the connection's unnamed statement: the client's, if it
        // made one, is replayed before its next Bind or Describe of it (found by the
        // fuzzer: `Parse "" ...; Sync; Bind "" ""` failed with 26000 in session mode).
        self.unnamed.here = false;
        let mut position = None;
        loop {
            match server.recv().await {
                // The server's answers come as runs of messages (RowDescription, DataRow,
                // CommandComplete in one frame).
                Ok(frame) => {
                    for message in backend::messages(&frame) {
                        if message.first() == Some(&DATA_ROW) {
                            position = data_row_int(message);
                        }
                    }
                    if tag(&frame) == READY_FOR_QUERY {
                        break;
                    }
                }
                Err(_) => return self.server_lost().await,
            }
        }
        match position {
            Some(position) => {
                let side = self.server_side;
                let before = match self.caching.own_write {
                    Some((on, before)) if on == side => before,
                    _ => 0,
                };
                self.caching.own_write = Some((side, before.max(position)));
            }
            // Not known (not reached: the query is the server's own function): the staleness
            // bound still holds for the session.
            None => {
                tracing::warn!(user = %self.user, "the commit position of a write was not read")
            }
        }
        true
    }
}

/// The single integer column of a one-column DataRow, sent as text.
fn data_row_int(frame: &[u8]) -> Option<u64> {
    let body = frame.get(5..)?;
    let columns = u16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    if columns != 1 || len < 0 {
        return None;
    }
    std::str::from_utf8(body.get(6..6 + len as usize)?)
        .ok()?
        .parse()
        .ok()
}

/// Whether a statement may make a temporary object: it mentions `temp` and is not a plain
/// SELECT (one with `INTO` counts). Conservative: a false alarm only stops the cache for one
/// session.
fn may_make_temporary(text: &[u8]) -> bool {
    let has = |word: &[u8]| {
        text.windows(word.len())
            .any(|w| w.eq_ignore_ascii_case(word))
    };
    if !has(b"temp") {
        return false;
    }
    let sql = std::str::from_utf8(text).unwrap_or("");
    let plain_select = (inspect::starts_with_keyword(sql, "SELECT")
        || inspect::starts_with_keyword(sql, "WITH"))
        && !has(b"into");
    !plain_select
}

/// The length of the rest of an unnamed group at the front of `buffer` (the messages after
/// its Parse): Bind of the unnamed statement into the unnamed portal, an optional Describe of
/// that portal, Execute of it with no row limit, Sync. `None` for anything else, or when the
/// client has not sent it all yet.
pub(super) fn unnamed_group(buffer: &[u8]) -> Option<usize> {
    let message = backend::messages(buffer).next()?;
    // Bind: portal "" and statement "".
    if message[0] != BIND || !message[5..].starts_with(&[0, 0]) {
        return None;
    }
    Some(message.len() + rest_of_group(&buffer[message.len()..])?)
}

/// The length of what follows a Bind into the unnamed portal at the front of `buffer`: an
/// optional Describe of that portal (or of the statement), Execute of it with no row limit,
/// Sync. `None` for anything else, or when the client has not sent it all yet.
pub(super) fn rest_of_group(buffer: &[u8]) -> Option<usize> {
    let mut messages = backend::messages(buffer);
    let mut len = 0;
    let mut message = messages.next()?;
    if message[0] == DESCRIBE {
        // Of the portal (psycopg, pgjdbc) or of the statement (tokio-postgres).
        if message[5..] != [PORTAL, 0] && message[5..] != [STATEMENT, 0] {
            return None;
        }
        len += message.len();
        message = messages.next()?;
    }
    // Execute of portal "" with no row limit: the whole answer.
    if message[0] != EXECUTE || message[5..] != [0, 0, 0, 0, 0] {
        return None;
    }
    len += message.len();
    message = messages.next()?;
    if message[0] != SYNC {
        return None;
    }
    Some(len + message.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn statements_that_may_make_temporary_tables_are_noticed() {
        assert!(may_make_temporary(b"CREATE TEMP TABLE items (id int)"));
        assert!(may_make_temporary(b"create temporary table x as select 1"));
        assert!(may_make_temporary(b"SELECT * INTO TEMP t FROM items"));
        assert!(may_make_temporary(b"CREATE TABLE pg_temp.items (id int)"));
        assert!(!may_make_temporary(b"SELECT temperature FROM readings"));
        assert!(!may_make_temporary(b"UPDATE items SET v = 1"));
    }

    #[test]
    fn only_a_whole_unnamed_group_is_looked_up() {
        let bind = msg(BIND, &[0, 0, 0, 0, 0, 0, 0, 0]);
        let describe = msg(DESCRIBE, &[PORTAL, 0]);
        let execute = msg(EXECUTE, &[0, 0, 0, 0, 0]);
        let sync = msg(SYNC, &[]);
        let group = [
            bind.clone(),
            describe.clone(),
            execute.clone(),
            sync.clone(),
        ]
        .concat();
        assert_eq!(unnamed_group(&group), Some(group.len()));
        // Without the Describe, and with more after the Sync.
        let short = [
            bind.clone(),
            execute.clone(),
            sync.clone(),
            msg(QUERY, b"x\0"),
        ]
        .concat();
        assert_eq!(
            unnamed_group(&short),
            Some(bind.len() + execute.len() + sync.len())
        );
        // Not all sent yet.
        assert_eq!(unnamed_group(&group[..group.len() - 1]), None);
        // A named statement, a named portal, a row limit, a Describe of the statement.
        let named = [
            msg(BIND, b"\0s1\0\0\0\0\0\0\0"),
            execute.clone(),
            sync.clone(),
        ]
        .concat();
        assert_eq!(unnamed_group(&named), None);
        let limited = [bind.clone(), msg(EXECUTE, &[0, 0, 0, 0, 10]), sync.clone()].concat();
        assert_eq!(unnamed_group(&limited), None);
        let statement = [
            bind.clone(),
            msg(DESCRIBE, &[STATEMENT, 0]),
            execute,
            sync.clone(),
        ]
        .concat();
        assert_eq!(unnamed_group(&statement), Some(statement.len()));
        let named_portal = [
            bind,
            msg(DESCRIBE, b"Pp\0"),
            msg(EXECUTE, b"p\0\0\0\0\0"),
            sync,
        ]
        .concat();
        assert_eq!(unnamed_group(&named_portal), None);
    }
}
