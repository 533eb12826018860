//! What the server still owes a session on its current connection, worked out from the
//! messages sent and the answers seen, without a server: which ReadyForQuery ends which sync
//! group, which ParseComplete or CloseComplete answers a message the proxy added (and is
//! swallowed), and which Syncs PostgreSQL ignores because they reached it in copy-in mode.
//!
//! A connection may go back to the pool only when nothing is owed ([`Replies::owed`] is 0):
//! a miscount hands one client's answers to the next (a pipelined `COPY ... FROM STDIN`
//! followed by a query in the same write once did exactly that).

use std::collections::VecDeque;

/// The answers owed on one server connection while a session holds it.
#[derive(Debug, Default)]
pub struct Replies {
    /// Per sync group sent and not yet answered (one per Sync, Query or FunctionCall that
    /// gets a ReadyForQuery), oldest first. An error makes the server skip to the group's
    /// Sync, so its ReadyForQuery says how many ParseComplete/CloseComplete will never come.
    groups: VecDeque<Group>,
    /// The number the next group gets: numbers only grow, over every connection the session
    /// holds, so that what was sent in a group can be compared with what is answered.
    next_group: u64,
    /// Parse and Close messages sent, and their answers seen or skipped. ParseComplete and
    /// CloseComplete come in the order their messages went, and only from those messages.
    sent: u64,
    answered: u64,
    /// Positions (among `sent`) of the Parses and Closes the proxy added, oldest first:
    /// their answers are the proxy's, never the client's.
    swallow: VecDeque<u64>,
    /// The server reported copy-in (CopyInResponse) and the client has not yet sent
    /// CopyDone or CopyFail: a Sync now is ignored by the server.
    copy_in: bool,
    /// The group of the last Query or Execute sent, and whether it was a Query.
    last_start: (u64, bool),
    /// Syncs sent since the last Query or Execute.
    syncs_since_start: u32,
    /// CopyDone/CopyFail sent before the server said whether a COPY started.
    windows: VecDeque<CopyWindow>,
}

#[derive(Debug, Clone, Copy)]
struct Group {
    number: u64,
    /// Parse and Close messages sent when it ended.
    end: u64,
}

/// The Syncs between a statement that may start a copy-in and the CopyDone or CopyFail that
/// would end it: ignored by the server if the statement did start one.
#[derive(Debug, Clone, Copy)]
struct CopyWindow {
    group: u64,
    query: bool,
    syncs: u32,
}

impl Replies {
    /// ReadyForQuery messages still owed.
    pub fn owed(&self) -> usize {
        self.groups.len()
    }

    /// The server is in copy-in mode as far as the proxy knows.
    pub fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// The group the server is answering now.
    pub fn answering(&self) -> u64 {
        self.groups.front().map_or(self.next_group, |g| g.number)
    }

    /// The group a message sent now belongs to.
    pub fn open_group(&self) -> u64 {
        self.next_group
    }

    fn end_group(&mut self) {
        self.groups.push_back(Group {
            number: self.next_group,
            end: self.sent,
        });
        self.next_group += 1;
    }

    /// A Parse or Close the proxy added: its answer is swallowed.
    pub fn sent_ours(&mut self) {
        self.swallow.push_back(self.sent);
        self.sent += 1;
    }

    /// A client's Parse or Close (renamed or not): its answer goes to the client. Returns
    /// its position, which [`Replies::complete_received`] gives back with its answer.
    pub fn sent_theirs(&mut self) -> u64 {
        self.sent += 1;
        self.sent - 1
    }

    /// Parse and Close answers seen, or skipped by an error: a client message at a position
    /// below this whose answer never came failed.
    pub fn answered(&self) -> u64 {
        self.answered
    }

    /// A simple Query: it may start a copy, and it ends a group.
    pub fn query_sent(&mut self) {
        self.last_start = (self.open_group(), true);
        self.syncs_since_start = 0;
        self.end_group();
    }

    /// An Execute: it may start a copy.
    pub fn execute_sent(&mut self) {
        self.last_start = (self.open_group(), false);
        self.syncs_since_start = 0;
    }

    /// A Sync, or a FunctionCall: false if the server will ignore it (copy-in mode), so no
    /// ReadyForQuery is owed for it.
    pub fn sync_sent(&mut self) -> bool {
        if self.copy_in {
            return false;
        }
        self.syncs_since_start += 1;
        self.end_group();
        true
    }

    /// CopyDone or CopyFail. If the server has not yet said whether a copy started, the
    /// Syncs since the last Query or Execute are remembered: they are ignored if it did.
    pub fn copy_end_sent(&mut self) {
        if std::mem::take(&mut self.copy_in) {
            return;
        }
        self.windows.push_back(CopyWindow {
            group: self.last_start.0,
            query: self.last_start.1,
            syncs: self.syncs_since_start,
        });
    }

    /// A ParseComplete or CloseComplete: `Ok` with the position of the client's message it
    /// answers, `Err` with the position of the proxy's own (swallowed).
    pub fn complete_received(&mut self) -> Result<u64, u64> {
        let at = self.answered;
        self.answered += 1;
        if self.swallow.front() == Some(&at) {
            self.swallow.pop_front();
            return Err(at);
        }
        Ok(at)
    }

    /// The position the next Parse or Close sent gets.
    pub fn next_position(&self) -> u64 {
        self.sent
    }

    /// CopyInResponse: the statement of the group being answered started a copy-in. The
    /// Syncs sent after it and before the copy's end were (or will be) ignored: the group
    /// goes on to the next Sync that counts.
    pub fn copy_in_received(&mut self) {
        let front = self.answering();
        while self.windows.front().is_some_and(|w| w.group < front) {
            self.windows.pop_front();
        }
        let (syncs, query) = match self.windows.front() {
            Some(w) if w.group == front => {
                let w = *w;
                self.windows.pop_front();
                (w.syncs, w.query)
            }
            // The client has not ended the copy yet: every Sync until it does is ignored.
            _ => {
                self.copy_in = true;
                (
                    std::mem::take(&mut self.syncs_since_start),
                    self.last_start.1,
                )
            }
        };
        // A Query is its group's end and gets its ReadyForQuery after the copy; an
        // Execute's group ended at the first of the ignored Syncs.
        let from = usize::from(query).min(self.groups.len());
        let to = (from + syncs as usize).min(self.groups.len());
        // The group now ends at the next Sync that counts, whose entry stays.
        self.groups.drain(from..to);
    }

    /// An ErrorResponse: a copy in progress is over (the server ignores the client's
    /// remaining copy messages).
    pub fn error_received(&mut self) {
        self.copy_in = false;
    }

    /// ReadyForQuery: the oldest group is answered, whatever an error made the server skip.
    pub fn ready_received(&mut self) {
        self.copy_in = false;
        if let Some(group) = self.groups.pop_front() {
            self.answered = self.answered.max(group.end);
            while self.swallow.front().is_some_and(|&at| at < self.answered) {
                self.swallow.pop_front();
            }
        }
    }

    /// The connection is given back or lost: nothing more is owed on it.
    pub fn clear(&mut self) {
        self.groups.clear();
        self.swallow.clear();
        self.windows.clear();
        self.copy_in = false;
        self.syncs_since_start = 0;
        self.sent = 0;
        self.answered = 0;
        self.last_start = (self.next_group, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds client messages and server answers by their type bytes; returns which server
    /// messages reach the client ('.' for swallowed) and what is still owed.
    fn run(client: &str, server: &str) -> (String, usize) {
        let mut r = Replies::default();
        for kind in client.bytes() {
            match kind {
                b'p' | b'x' => r.sent_ours(), // the proxy's own Parse / Close
                b'P' | b'C' => {
                    r.sent_theirs();
                }
                b'Q' => r.query_sent(),
                b'E' => r.execute_sent(),
                b'S' => {
                    r.sync_sent();
                }
                b'c' | b'f' => r.copy_end_sent(),
                _ => {}
            }
        }
        let mut seen = String::new();
        for kind in server.bytes() {
            let forwarded = match kind {
                b'1' | b'3' => r.complete_received().is_ok(),
                b'G' => {
                    r.copy_in_received();
                    true
                }
                b'E' => {
                    r.error_received();
                    true
                }
                b'Z' => {
                    r.ready_received();
                    true
                }
                _ => true,
            };
            seen.push(if forwarded { kind as char } else { '.' });
        }
        (seen, r.owed())
    }

    #[test]
    fn answers_to_the_proxys_messages_are_picked_by_position() {
        // Close 'P' p2 (the client's), then Parse s3 with the proxy's Close first.
        assert_eq!(run("CxPBES", "3312DCZ"), ("3.12DCZ".into(), 0));
        // The proxy's Close and Parse before a Bind of a statement this connection lacks.
        assert_eq!(run("xpBES", "312DCZ"), ("..2DCZ".into(), 0));
    }

    #[test]
    fn an_error_skips_to_the_sync_and_the_skipped_answers_never_come() {
        // The client's Parse fails; the proxy's Close+Parse after it never run.
        let (seen, owed) = run("PxpBESPBES", "EZ12DCZ");
        assert_eq!((seen.as_str(), owed), ("EZ12DCZ", 0));
    }

    #[test]
    fn a_pipelined_simple_copy_then_a_query_owes_two_ready_for_query() {
        // Query COPY, CopyData, CopyDone, then Parse/Bind/Execute/Sync in the same write.
        let mut r = Replies::default();
        r.query_sent();
        r.copy_end_sent();
        r.sent_theirs();
        r.execute_sent();
        r.sync_sent();
        assert_eq!(r.owed(), 2);
        r.copy_in_received();
        assert_eq!(r.owed(), 2, "the Sync after CopyDone is answered");
        r.ready_received();
        assert_eq!(
            r.owed(),
            1,
            "the connection is still owed the query's answer"
        );
        assert_eq!(r.complete_received(), Ok(0));
        r.ready_received();
        assert_eq!(r.owed(), 0);
    }

    #[test]
    fn the_sync_after_an_extended_copy_is_ignored_as_libpq_expects() {
        // Parse/Bind/Execute COPY, Sync; CopyInResponse; CopyData, CopyDone, Sync.
        let mut r = Replies::default();
        r.sent_theirs();
        r.execute_sent();
        r.sync_sent();
        assert_eq!(r.owed(), 1);
        assert_eq!(r.complete_received(), Ok(0));
        r.copy_in_received();
        assert_eq!(
            r.owed(),
            0,
            "the first Sync reached the server in copy-in mode"
        );
        assert!(!r.sync_sent(), "a Sync in copy-in mode is ignored");
        r.copy_end_sent();
        assert!(r.sync_sent());
        assert_eq!(r.owed(), 1);
        r.ready_received();
        assert_eq!(r.owed(), 0);
    }

    #[test]
    fn an_extended_copy_ended_in_the_same_write_ignores_only_the_syncs_before_its_end() {
        // Execute COPY, Sync, CopyData, CopyDone, Sync, then another Execute and Sync.
        let mut r = Replies::default();
        r.execute_sent();
        r.sync_sent();
        r.copy_end_sent();
        r.sync_sent();
        r.execute_sent();
        r.sync_sent();
        assert_eq!(r.owed(), 3);
        r.copy_in_received();
        assert_eq!(r.owed(), 2);
        r.ready_received();
        r.ready_received();
        assert_eq!(r.owed(), 0);
    }

    #[test]
    fn two_copies_in_one_write_each_ignore_their_own_syncs() {
        // Extended copy (Execute, Sync, CopyData, CopyDone, Sync), a Query, then a simple
        // copy (Query, CopyData, CopyDone) and a last group, all in one write.
        let mut r = Replies::default();
        r.execute_sent();
        r.sync_sent();
        r.copy_end_sent();
        r.sync_sent();
        r.query_sent();
        r.query_sent();
        r.copy_end_sent();
        r.execute_sent();
        r.sync_sent();
        assert_eq!(r.owed(), 5);
        r.copy_in_received();
        assert_eq!(
            r.owed(),
            4,
            "the Sync right after the first copy's Execute is ignored"
        );
        r.ready_received(); // the first copy's group
        r.ready_received(); // the Query
        r.copy_in_received();
        assert_eq!(r.owed(), 2, "the second copy ignores no Sync");
        r.ready_received();
        r.ready_received();
        assert_eq!(r.owed(), 0);
    }

    #[test]
    fn a_copy_that_never_started_leaves_no_window_for_the_next_one() {
        // COPY into a missing table: an error, no CopyInResponse; the client's CopyDone and
        // next query are pipelined. A later extended copy counts its own Syncs.
        let mut r = Replies::default();
        r.query_sent();
        r.copy_end_sent();
        r.error_received();
        r.ready_received();
        r.execute_sent();
        r.sync_sent();
        r.copy_in_received();
        assert_eq!(r.owed(), 0);
        assert!(r.copy_in());
    }
}
