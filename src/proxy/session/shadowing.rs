//! Shadow reads' part of a session ([`crate::proxy::shadow`]): a read drawn for the sample
//! — one statement outside a transaction block, or a whole transaction opened `READ ONLY`,
//! turn by turn up to its end — has its answer copied on its way to the client, and is handed
//! to the shadow task at the ReadyForQuery that leaves the session idle. Nothing here waits:
//! the client's answer is never delayed or changed.

use super::*;
use crate::proxy::shadow::{Sample, Turn, MAX_CAPTURE, MAX_TURNS};

/// The session's shadow state.
#[derive(Default)]
pub(super) struct Shadowing {
    /// The proxy replays reads: what the hot path looks at.
    pub(super) on: bool,
    /// The read being captured.
    pub(super) capture: Option<Capture>,
}

pub(super) struct Capture {
    /// Turns answered so far: a `READ ONLY` transaction's, its `BEGIN` first.
    turns: Vec<Turn>,
    /// The turn under way.
    open: Option<OpenTurn>,
    /// A whole transaction opened `READ ONLY` is captured, not a single statement.
    transaction: bool,
    /// Bytes of the open turn's group still to come through the session: captured already,
    /// from the client's read buffer, with the turn's first message.
    expected: usize,
    /// Bytes captured, over every turn.
    size: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
}

struct OpenTurn {
    frames: Bytes,
    sql: String,
    answer: Vec<u8>,
    started: std::time::Instant,
}

/// What a turn's first message starts, as far as the session can tell without parsing.
enum Opens {
    /// A statement that may only read.
    Read,
    /// `BEGIN` or `START TRANSACTION` with `READ ONLY` (the shadow task checks it exactly).
    ReadOnlyTransaction,
}

impl Session {
    /// A Query, an unnamed Parse or a Bind of a named statement, with the rest of its group
    /// in the client's buffer, about to go to the server outside a transaction block: drawn
    /// for the sample or not.
    pub(super) fn maybe_shadow(&mut self, frame: &Bytes) {
        // Only a new turn comes here ([`Session::before_forwarding`]): a capture left over
        // lost its server before its ReadyForQuery.
        self.shadowing.capture = None;
        let Some(shadow) = self.shared.shadow.as_ref() else {
            return;
        };
        if !shadow.draw()
            || self.status != IDLE
            || self.replies.owed() != 0
            || !self.settings.pending.is_empty()
            || self.caching.fill.is_some()
        {
            return;
        }
        let Some((frames, sql, expected)) = self.turn(frame) else {
            return;
        };
        let Some(opens) = first_look(&sql) else {
            return;
        };
        let Some(permit) = shadow.permit() else {
            return;
        };
        tracing::trace!(sql, "drawn for a shadow read");
        self.shadowing.capture = Some(Capture {
            turns: Vec::new(),
            size: frames.len(),
            open: Some(OpenTurn {
                frames,
                sql,
                answer: Vec::new(),
                started: std::time::Instant::now(),
            }),
            transaction: matches!(opens, Opens::ReadOnlyTransaction),
            expected,
            permit,
        });
    }

    /// A client message mid-transaction while a read is captured: part of the open turn's
    /// group, or the next turn of a captured transaction (anything the replay could not send
    /// as it is, or a turn sent before the last one was answered, ends the capture).
    pub(super) fn shadow_client_frame(&mut self, frame: &Bytes) {
        let Some(capture) = self.shadowing.capture.as_mut() else {
            return;
        };
        if capture.expected >= frame.len() {
            capture.expected -= frame.len();
            return;
        }
        // What a client pipelines after a single captured statement is not captured.
        if !capture.transaction {
            return;
        }
        let next = if capture.open.is_none() && capture.turns.len() < MAX_TURNS {
            self.turn(frame)
        } else {
            None
        };
        let Some(capture) = self.shadowing.capture.as_mut() else {
            return;
        };
        match next {
            Some((frames, sql, expected)) if capture.size + frames.len() <= MAX_CAPTURE => {
                capture.size += frames.len();
                capture.expected = expected;
                capture.open = Some(OpenTurn {
                    frames,
                    sql,
                    answer: Vec::new(),
                    started: std::time::Instant::now(),
                });
            }
            _ => self.abandon_shadow(),
        }
    }

    /// A turn's messages as the replay sends them, its text, and how many bytes of them are
    /// still in the client's buffer: a Query; an unnamed Parse with the rest of its group; a
    /// Bind of a named statement rewritten as an unnamed group ([`Session::named_group`]).
    fn turn(&self, frame: &Bytes) -> Option<(Bytes, String, usize)> {
        let (frames, mut sql, expected) = match tag(frame) {
            QUERY => {
                let sql = frontend::query_text(frame).and_then(|t| std::str::from_utf8(t).ok())?;
                (frame.clone(), sql.to_string(), 0)
            }
            PARSE => {
                let sql = frontend::parse_message(frame)
                    .filter(|p| p.name.is_empty())
                    .and_then(|p| std::str::from_utf8(p.query).ok())?;
                let rest = caching::unnamed_group(self.client_r.read_buffer())?;
                let mut group = BytesMut::with_capacity(frame.len() + rest);
                group.extend_from_slice(frame);
                group.extend_from_slice(&self.client_r.read_buffer()[..rest]);
                (group.freeze(), sql.to_string(), rest)
            }
            BIND => self.named_group(frame)?,
            _ => return None,
        };
        sql.truncate(sql.trim_end_matches('\0').len());
        Some((frames, sql, expected))
    }

    /// A Bind of one of the client's named statements into the unnamed portal, with the
    /// rest of its group (an optional Describe of the portal, Execute with no row limit,
    /// Sync) in the client's buffer: the same group with the statement unnamed, its Parse
    /// first, its text, and the length of the rest.
    fn named_group(&self, bind: &Bytes) -> Option<(Bytes, String, usize)> {
        let (portal, statement, rest_at) = frontend::bind_statement(bind)?;
        if !portal.is_empty() || statement.is_empty() {
            return None;
        }
        let prepared = self.registry.statements.get(statement)?;
        let parse = frontend::parse_message(&prepared.parse)?;
        let sql = std::str::from_utf8(parse.query).ok()?.to_string();
        let rest = caching::rest_of_group(self.client_r.read_buffer())?;
        let mut group = BytesMut::new();
        let mut parse_body = vec![0];
        parse_body.extend_from_slice(parse.query);
        parse_body.push(0);
        parse_body.extend_from_slice(parse.rest);
        push_message(&mut group, PARSE, &parse_body);
        // Bind: portal "" and statement "", then the rest as the client sent it.
        let mut bind_body = vec![0, 0];
        bind_body.extend_from_slice(bind.get(rest_at..)?);
        push_message(&mut group, BIND, &bind_body);
        group.extend_from_slice(&self.client_r.read_buffer()[..rest]);
        Some((group.freeze(), sql, rest))
    }

    /// A server message while a read is captured (a run of several, maybe).
    pub(super) fn collect_for_shadow(&mut self, frame: &[u8]) {
        let Some(capture) = self.shadowing.capture.as_mut() else {
            return;
        };
        if frame.first() == Some(&READY_FOR_QUERY) {
            return;
        }
        let Some(open) = capture.open.as_mut() else {
            return;
        };
        if capture.size + frame.len() > MAX_CAPTURE {
            self.abandon_shadow();
            return;
        }
        capture.size += frame.len();
        open.answer.extend_from_slice(frame);
    }

    /// A ReadyForQuery while a read is captured: the open turn is answered. At `IDLE` the
    /// sample is handed over; a captured transaction waits for its next turn; a single
    /// statement that left a transaction open is not replayed.
    pub(super) fn shadow_collected(&mut self, status: u8) {
        let Some(capture) = self.shadowing.capture.as_mut() else {
            return;
        };
        let Some(open) = capture.open.take() else {
            return;
        };
        capture.turns.push(Turn {
            frames: open.frames,
            sql: open.sql,
            answer: open.answer,
            elapsed: open.started.elapsed(),
        });
        if status != IDLE {
            if !capture.transaction {
                tracing::trace!("a shadow read's answer ended in a transaction: not replayed");
                self.shadowing.capture = None;
            }
            return;
        }
        let Some(capture) = self.shadowing.capture.take() else {
            return;
        };
        let Some(shadow) = &self.shared.shadow else {
            return;
        };
        shadow.submit(Sample {
            user: self.user.clone(),
            primary: self.server_side,
            turns: capture.turns,
            transaction: capture.transaction,
            standard_conforming_strings: self
                .settings
                .wanted
                .get("standard_conforming_strings")
                .is_none_or(|v| !v.trim_matches('\'').eq_ignore_ascii_case("off")),
            settings: self.settings.wanted.clone(),
            permit: capture.permit,
        });
    }

    /// The capture ends without a sample (too large, or a turn the replay could not send):
    /// counted as dropped.
    fn abandon_shadow(&mut self) {
        self.shadowing.capture = None;
        if let Some(shadow) = &self.shared.shadow {
            shadow.abandoned();
        }
    }
}

/// A cheap look at a turn's text: the shadow task parses it, off the client's path.
fn first_look(sql: &str) -> Option<Opens> {
    if ["SELECT", "WITH", "VALUES", "TABLE"]
        .iter()
        .any(|word| inspect::starts_with_keyword(sql, word))
        || sql.trim_start().starts_with('(')
    {
        return Some(Opens::Read);
    }
    let opens =
        inspect::starts_with_keyword(sql, "BEGIN") || inspect::starts_with_keyword(sql, "START");
    (opens && contains_words(sql, "READ", "ONLY")).then_some(Opens::ReadOnlyTransaction)
}

/// Whether `first` followed by `second` (any whitespace between) is in `sql`, in any case.
fn contains_words(sql: &str, first: &str, second: &str) -> bool {
    let mut words = sql
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter(|w| !w.is_empty());
    let mut previous: Option<&str> = None;
    for word in words.by_ref() {
        if previous.is_some_and(|p| p.eq_ignore_ascii_case(first))
            && word.eq_ignore_ascii_case(second)
        {
            return true;
        }
        previous = Some(word);
    }
    false
}

fn push_message(out: &mut BytesMut, kind: u8, body: &[u8]) {
    out.extend_from_slice(&[kind]);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}
