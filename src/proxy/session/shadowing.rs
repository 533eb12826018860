//! Shadow reads' part of a session ([`crate::proxy::shadow`]): a read drawn for the sample
//! has its answer copied on its way to the client, and is handed to the shadow task at its
//! ReadyForQuery. Nothing here waits: the client's answer is never delayed or changed.

use super::*;
use crate::proxy::shadow::{Sample, MAX_CAPTURE};

/// The session's shadow state.
#[derive(Default)]
pub(super) struct Shadowing {
    /// The proxy replays reads: what the hot path looks at.
    pub(super) on: bool,
    /// The read being captured.
    pub(super) capture: Option<Capture>,
}

pub(super) struct Capture {
    frames: Bytes,
    sql: String,
    answer: Vec<u8>,
    started: std::time::Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl Session {
    /// A Query, or an unnamed Parse with the rest of its group in the client's buffer, about
    /// to go to the server outside a transaction block: drawn for the sample or not.
    pub(super) fn maybe_shadow(&mut self, frame: &Bytes) {
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
        let (frames, sql) = match tag(frame) {
            QUERY => {
                let Some(sql) =
                    frontend::query_text(frame).and_then(|t| std::str::from_utf8(t).ok())
                else {
                    return;
                };
                (frame.clone(), sql.to_string())
            }
            PARSE => {
                let Some(sql) = frontend::parse_message(frame)
                    .filter(|p| p.name.is_empty())
                    .and_then(|p| std::str::from_utf8(p.query).ok())
                else {
                    return;
                };
                let Some(rest) = caching::unnamed_group(self.client_r.read_buffer()) else {
                    return;
                };
                let mut group = BytesMut::with_capacity(frame.len() + rest);
                group.extend_from_slice(frame);
                group.extend_from_slice(&self.client_r.read_buffer()[..rest]);
                (group.freeze(), sql.to_string())
            }
            BIND => match self.named_group(frame) {
                Some(group) => group,
                None => return,
            },
            _ => return,
        };
        let sql = sql.trim_end_matches('\0');
        // A cheap look first: the statement is parsed off the client's path.
        let read_like = ["SELECT", "WITH", "VALUES", "TABLE"]
            .iter()
            .any(|word| inspect::starts_with_keyword(sql, word));
        if !read_like && !sql.trim_start().starts_with('(') {
            return;
        }
        let Some(permit) = shadow.permit() else {
            return;
        };
        tracing::trace!(sql, "drawn for a shadow read");
        self.shadowing.capture = Some(Capture {
            frames,
            sql: sql.to_string(),
            answer: Vec::new(),
            started: std::time::Instant::now(),
            permit,
        });
    }

    /// A Bind of one of the client's named statements into the unnamed portal, with the
    /// rest of its group (an optional Describe of the portal, Execute with no row limit,
    /// Sync) in the client's buffer: the same group with the statement unnamed, its Parse
    /// first, and its text.
    fn named_group(&self, bind: &Bytes) -> Option<(Bytes, String)> {
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
        Some((group.freeze(), sql))
    }

    /// A server message while a read is captured (a run of several, maybe).
    pub(super) fn collect_for_shadow(&mut self, frame: &[u8]) {
        let Some(capture) = self.shadowing.capture.as_mut() else {
            return;
        };
        if frame.first() == Some(&READY_FOR_QUERY) {
            return;
        }
        if capture.answer.len() + frame.len() > MAX_CAPTURE {
            self.shadowing.capture = None;
            if let Some(shadow) = &self.shared.shadow {
                shadow.abandoned();
            }
            return;
        }
        capture.answer.extend_from_slice(frame);
    }

    /// The ReadyForQuery that ends a captured answer: handed over when the statement ran
    /// outside a transaction block.
    pub(super) fn shadow_collected(&mut self, status: u8) {
        let Some(capture) = self.shadowing.capture.take() else {
            return;
        };
        let Some(shadow) = &self.shared.shadow else {
            return;
        };
        if status != IDLE {
            tracing::trace!(
                sql = capture.sql,
                "a shadow read's answer ended in a transaction: not replayed"
            );
            return;
        }
        shadow.submit(Sample {
            user: self.user.clone(),
            primary: self.server_side,
            frames: capture.frames,
            sql: capture.sql,
            standard_conforming_strings: self
                .settings
                .wanted
                .get("standard_conforming_strings")
                .is_none_or(|v| !v.trim_matches('\'').eq_ignore_ascii_case("off")),
            settings: self.settings.wanted.clone(),
            answer: capture.answer,
            elapsed: capture.started.elapsed(),
            permit: capture.permit,
        });
    }
}

fn push_message(out: &mut BytesMut, kind: u8, body: &[u8]) {
    out.extend_from_slice(&[kind]);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}
