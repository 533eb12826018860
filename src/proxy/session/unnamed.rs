//! The client's unnamed statement: replayed on a connection that lacks it, and settled by
//! which of its Parses the server ran.

use super::*;

/// The client's unnamed statement, as the proxy keeps it across server connections.
#[derive(Default)]
pub(super) struct Unnamed {
    /// The client's last unnamed Parse. (Empty when there is none; kept, not reallocated,
    /// from one Parse to the next.)
    pub(super) text: Vec<u8>,
    /// The current server connection has it.
    pub(super) here: bool,
    /// The sync group and position of the unnamed Parse (or Close) the proxy sent to put the
    /// client's unnamed statement on this connection, until its answer comes.
    pub(super) replayed: Option<(u64, u64)>,
    /// The client's unnamed Parses sent and not yet settled, oldest first: until their
    /// group is answered it is not known which of them the server ran (an error makes it
    /// skip the rest of the group), and the client's unnamed statement is replayed on
    /// another connection only as the server left it.
    pub(super) sent: Vec<UnnamedParse>,
    /// The client's unnamed statement, and whether the connection had it, before the first
    /// of `sent` (kept only when that one may be skipped: it has a marker).
    pub(super) before: Option<(Vec<u8>, bool)>,
    /// It changes settings when executed.
    pub(super) sets: bool,
}

impl Session {
    /// A Bind or Describe of the unnamed statement, on a server connection that does not have
    /// the client's (it was parsed in an earlier sync group, on another connection): the
    /// client's last unnamed Parse goes first.
    pub(super) fn with_unnamed(&mut self, frame: Bytes) -> Frames {
        // A replay in an earlier group, not yet answered, may be skipped: replayed again.
        let open = self.replies.open_group();
        if self.unnamed.here && self.unnamed.replayed.is_none_or(|(group, _)| group >= open) {
            return smallvec![frame];
        }
        self.unnamed.here = true;
        // An error earlier in the group makes the server skip it: then the connection still
        // lacks the statement ([`Session::settle_unnamed_replay`]).
        self.unnamed.replayed = Some((open, self.replies.next_position()));
        self.replies.sent_ours();
        if self.unnamed.text.is_empty() {
            // The client has none (a simple Query destroyed it, or it never made one): the
            // connection's own, left by another client, must not answer in its place.
            return smallvec![frontend::rebuild_target(CLOSE, STATEMENT, ""), frame];
        }
        smallvec![Bytes::copy_from_slice(&self.unnamed.text), frame]
    }

    /// The groups of the oldest unnamed Parses are answered (their answers would have come
    /// before position `answered`): which of them the server ran decides the client's
    /// unnamed statement. Taken in order, each ran (its ParseComplete came), failed (no
    /// answer, though the server reached it: it was the first of its group, or its marker's
    /// answer came), or was skipped after an error before it (neither came); the first that
    /// did not run ends the walk, as the server skipped everything after it. A Parse that
    /// failed leaves no unnamed statement; one skipped leaves the one before it, which the
    /// connection has only if it had it before.
    pub(super) fn settle_unnamed(&mut self, answered: u64) {
        // Most clients: one unnamed Parse per group, and it ran.
        if let [only] = self.unnamed.sent.as_slice() {
            if only.ran && only.at < answered {
                self.unnamed.sent.clear();
                self.unnamed.before = None;
                return;
            }
        }
        let count = self
            .unnamed
            .sent
            .iter()
            .take_while(|parse| parse.at < answered)
            .count();
        if count == 0 {
            return;
        }
        let settled: Vec<UnnamedParse> = self.unnamed.sent.drain(..count).collect();
        let pending_after = !self.unnamed.sent.is_empty();
        let mut outcome = None; // None: as before the first of them
        for (i, parse) in settled.iter().enumerate() {
            if parse.ran {
                outcome = Some(Some(i));
                continue;
            }
            if !parse.close && (parse.marker.is_none() || parse.reached) {
                outcome = Some(None);
            }
            break;
        }
        let last = settled.len() - 1;
        let state: (Vec<u8>, bool) = match outcome {
            // The latest ran and none is pending after it: `unnamed` is already right.
            Some(Some(i)) if i == last && !pending_after => {
                self.unnamed.before = None;
                return;
            }
            Some(Some(i)) => match settled[i].text.clone() {
                Some(text) => (text, true),
                None => (self.unnamed.text.clone(), true),
            },
            Some(None) => (Vec::new(), true),
            // Skipped: the statement before them; unknown (never asked of the connection)
            // if it was not kept.
            None => self.unnamed.before.take().unwrap_or((Vec::new(), false)),
        };
        if pending_after {
            // The later ones settle against this.
            self.unnamed.before = Some(state);
            return;
        }
        self.unnamed.before = None;
        let (text, here) = state;
        self.unnamed.sets = !text.is_empty()
            && frontend::parse_message(&Bytes::copy_from_slice(&text))
                .is_some_and(|m| inspect::scan(m.query).changes_session);
        self.unnamed.text = text;
        self.unnamed.here = here;
    }

    /// A Close of the unnamed statement, answered at position `at`: settled like an unnamed
    /// Parse that leaves no statement, except that it cannot fail: if its CloseComplete does
    /// not come, an error before it made the server skip it, and the statement stays.
    pub(super) fn close_unnamed(&mut self, at: u64) {
        match self.unnamed.sent.last_mut() {
            None => self.unnamed.before = Some((self.unnamed.text.clone(), self.unnamed.here)),
            Some(previous) => previous.text = Some(self.unnamed.text.clone()),
        }
        self.unnamed.text.clear();
        self.unnamed.here = true;
        self.unnamed.sets = false;
        self.unnamed.sent.push(UnnamedParse {
            at,
            group: self.replies.open_group(),
            marker: None,
            reached: false,
            ran: false,
            close: true,
            text: None,
        });
    }

    /// At a ReadyForQuery: the unnamed statement replayed on this connection (or the Close
    /// that cleared another client's) was skipped after an error if its answer did not
    /// come: the connection does not have the client's statement.
    pub(super) fn settle_unnamed_replay(&mut self, answered: u64) {
        if let Some((_, at)) = self.unnamed.replayed {
            if at < answered {
                self.unnamed.replayed = None;
                // (A Parse of the client's sent since, in a later group, settles it.)
                if self.unnamed.sent.is_empty() {
                    self.unnamed.here = false;
                }
            }
        }
    }

    /// The unnamed statement is gone, from the client's session and the server connection.
    pub(super) fn forget_unnamed(&mut self) {
        self.unnamed.sent.clear();
        self.unnamed.before = None;
        self.unnamed.text.clear();
        self.unnamed.here = true;
        self.unnamed.sets = false;
    }
}

/// A client's unnamed Parse sent and not yet settled (`Session::settle_unnamed`).
pub(super) struct UnnamedParse {
    /// Its position among the Parse and Close answers.
    pub(super) at: u64,
    /// The sync group it was sent in.
    pub(super) group: u64,
    /// The position of the Close sent just before it, when it was not the first message
    /// of its group.
    pub(super) marker: Option<u64>,
    /// The marker's answer came: the server reached the Parse.
    pub(super) reached: bool,
    /// Its ParseComplete came.
    pub(super) ran: bool,
    /// It is a Close of the unnamed statement, not a Parse.
    pub(super) close: bool,
    /// Its Parse message, kept once a later unnamed Parse replaced it in `Session::unnamed`.
    pub(super) text: Option<Vec<u8>>,
}
