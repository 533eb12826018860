//! Statements: the client's named statements under their shared server names, its unnamed
//! statement, and what the server ran of them when an error made it skip the rest of a
//! sync group.

use super::*;

impl Session {
    /// DEALLOCATE of a client's statement. The server knows it by its shared name, and maybe
    /// not on this connection: a throwaway statement of that name is prepared first (its
    /// CloseComplete and ParseComplete swallowed) so that the server's own DEALLOCATE answers
    /// the client, with its tag, in its place among the client's other queries. Other
    /// statements of the client stay prepared.
    pub(super) fn deallocate(&mut self, frame: Bytes, text: &str) -> Frames {
        // In a failed transaction the server refuses the DEALLOCATE itself (25P02), and
        // refuses a Parse too, which would make it skip the query: the client's text goes.
        if self.status == FAILED_TRANSACTION {
            return smallvec![frame];
        }
        match inspect::deallocate(text) {
            Some(Deallocate::All) => {
                self.forget_statements();
                if let Some(server) = self.server.as_mut() {
                    server.prepared.clear();
                }
                smallvec![frame]
            }
            Some(Deallocate::Named(name)) => match self.registry.statements.remove(&name) {
                Some(prepared) => {
                    self.registry.book.release(&prepared.server_name);
                    self.deallocate_on_server(&prepared.server_name)
                }
                // Not one of the client's: the server's own error (26000).
                None => smallvec![frame],
            },
            // Several statements: client names mean nothing to the server, so it is refused
            // rather than half run.
            None if inspect::is_multi_statement(text) => {
                smallvec![frontend::query(REFUSE_MULTI_DEALLOCATE)]
            }
            // Not a DEALLOCATE the proxy can read: the server's syntax error.
            None => smallvec![frame],
        }
    }

    pub(super) fn deallocate_on_server(&mut self, server_name: &str) -> Frames {
        if let Some(server) = self.server.as_mut() {
            server.prepared.remove(server_name);
        }
        self.replies.sent_ours();
        self.replies.sent_ours();
        let placeholder = frontend::Parse {
            name: server_name,
            query: b"SELECT",
            rest: &[0, 0],
        };
        smallvec![
            frontend::rebuild_target(CLOSE, STATEMENT, server_name),
            frontend::rename_parse(&placeholder, server_name),
            frontend::query(&format!("DEALLOCATE {server_name}")),
        ]
    }

    /// Parse of a named statement: renamed to its shared server name. If this connection has
    /// that statement already, it is closed first (the CloseComplete is swallowed), so the
    /// client's Parse behaves as it would on a connection of its own.
    pub(super) fn parse(&mut self, frame: Bytes) -> Frames {
        let Some(message) = frontend::parse_message(&frame) else {
            self.replies.sent_theirs();
            return smallvec![frame];
        };
        let sets = match self.parse_effects(&message) {
            Effects::Refused(refused) => return self.parse(refused),
            Effects::Sets(sets) => sets,
        };
        if message.name.is_empty() {
            let mut out = Frames::new();
            // After other messages of its group, it comes after a Close of a name that does
            // not exist (its answer swallowed): if that answer comes and the Parse's does not,
            // the Parse itself failed; if neither comes, an error before made the server skip
            // it. (The first message of a group, as in most clients' queries, needs none: it
            // ran or failed.)
            let marker = (self.unsynced > 1).then(|| {
                let at = self.replies.next_position();
                self.replies.sent_ours();
                out.push(frontend::rebuild_target(
                    CLOSE,
                    STATEMENT,
                    "switchyard_marker",
                ));
                at
            });
            match self.unnamed.sent.last_mut() {
                None => {
                    self.unnamed.before = marker
                        .is_some()
                        .then(|| (self.unnamed.text.clone(), self.unnamed.here));
                }
                // The one before may turn out to be the last the server ran.
                Some(previous) => previous.text = Some(self.unnamed.text.clone()),
            }
            // A copy: a frame shares the read buffer's allocation, and holding it would make
            // every later read allocate a new buffer. Copied into the same buffer each time:
            // most clients send an unnamed Parse with every query.
            self.unnamed.text.clear();
            self.unnamed.text.extend_from_slice(&frame);
            self.unnamed.here = true;
            self.unnamed.sets = sets;
            let at = self.replies.sent_theirs();
            self.unnamed.sent.push(UnnamedParse {
                at,
                group: self.replies.open_group(),
                marker,
                reached: false,
                ran: false,
                close: false,
                text: None,
            });
            out.push(frame);
            return out;
        }
        if self.registry.statements.contains_key(message.name) {
            return self.parse_duplicate(&message);
        }
        let server_name = statement_name(message.query, message.rest);
        let parse = frontend::rename_parse(&message, &server_name);
        let client_name = message.name.to_string();
        self.registry.book.hold(&server_name);
        self.registry.statements.insert(
            client_name.clone(),
            Prepared {
                server_name: server_name.clone(),
                parse: parse.clone(),
                sets,
            },
        );
        let mut out = Frames::new();
        // Closed first in case the connection has it already (from another client, or from
        // a group that failed after its Parse went through); the CloseComplete is swallowed.
        self.make_room_for(&server_name, &mut out);
        out.push(frontend::rebuild_target(CLOSE, STATEMENT, &server_name));
        self.replies.sent_ours();
        let at = self.replies.sent_theirs();
        self.registry.group_prepared.push(GroupPrepared {
            group: self.replies.open_group(),
            name: server_name,
            at,
        });
        self.registry.awaited.push(Awaited {
            at,
            group: self.replies.open_group(),
            name: client_name,
            closed: None,
            closed_on_server: false,
        });
        out.push(parse);
        out
    }

    /// A Parse of a name the client has prepared already: PostgreSQL's own 42P05, in its
    /// place among the answers, from the server: the client's name is prepared twice (the
    /// first answer swallowed). That leaves a statement under a client's name on the
    /// connection, which is therefore not reused.
    pub(super) fn parse_duplicate(&mut self, message: &frontend::Parse<'_>) -> Frames {
        self.dirty = true;
        match self
            .registry
            .placeholders
            .iter_mut()
            .find(|p| p.name == message.name)
        {
            Some(placeholder) => placeholder.closing = None,
            None => self.registry.placeholders.push(Placeholder {
                name: message.name.to_string(),
                closing: None,
            }),
        }
        let placeholder = frontend::Parse {
            name: message.name,
            query: b"SELECT",
            rest: &[0, 0],
        };
        self.replies.sent_ours();
        self.replies.sent_ours();
        self.replies.sent_theirs();
        // The client's own statement last: PostgreSQL parses and analyses it before it
        // looks at the name, so a syntax error (42601) or a missing table (42P01) wins. (A
        // placeholder from an earlier duplicate is closed first.)
        smallvec![
            frontend::rebuild_target(CLOSE, STATEMENT, message.name),
            frontend::rename_parse(&placeholder, message.name),
            frontend::rename_parse(message, message.name)
        ]
    }

    /// Between transactions: the error PostgreSQL gives a Parse of a name the client has
    /// prepared already.
    pub(super) fn duplicate_parse(&self, frame: &Bytes) -> Option<Fatal> {
        let message = frontend::parse_message(frame)?;
        self.registry
            .statements
            .contains_key(message.name)
            .then(|| {
                Fatal::new(
                    "42P05",
                    format!("prepared statement \"{}\" already exists", message.name),
                )
            })
    }

    /// The current backend's pool could give this worker a connection without waiting.
    pub(super) fn server_free_now(&self) -> bool {
        let control = &self.shared.control;
        control.admits_now()
            && !control.is_paused()
            && self.pools[crate::proxy::side_index(self.route().side())].has_free()
    }

    /// `server_name` is about to be prepared on the attached connection: at most
    /// `max_prepared_statements` stay there, the least recently used closed first.
    pub(super) fn make_room_for(&mut self, server_name: &str, out: &mut Frames) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if let Some(evicted) = server.prepared.insert(server_name) {
            out.push(frontend::rebuild_target(CLOSE, STATEMENT, &evicted));
            self.replies.sent_ours();
        }
    }

    /// Statements no client holds any more that the connection just attached still has are
    /// closed before the client's first message (their answers swallowed).
    pub(super) fn close_dead_statements(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let deaths = self.registry.book.deaths();
        if server.prepared.seen_deaths == deaths {
            return;
        }
        server.prepared.seen_deaths = deaths;
        for name in self.registry.book.dead(&server.prepared) {
            server.prepared.remove(&name);
            let close = frontend::rebuild_target(CLOSE, STATEMENT, &name);
            if !try_queue(&mut server.writer, &close) {
                // A full buffer (it never is, before the first message): left for later.
                server.prepared.seen_deaths = deaths.wrapping_sub(1);
                break;
            }
            self.replies.sent_ours();
        }
    }

    /// Awaited Parses and Closes whose answer should have come before the answer at
    /// `answered` and did not: they failed, or an error made the server skip them. A
    /// Parse's name is free again; a Close's statement is still the client's.
    pub(super) fn not_run(&mut self, answered: u64) {
        let (failed, awaited): (Vec<Awaited>, Vec<Awaited>) =
            std::mem::take(&mut self.registry.awaited)
                .into_iter()
                .partition(|awaited| awaited.at < answered);
        self.registry.awaited = awaited;
        // Undone latest first: a Close and a Parse of the same name, both skipped, leave the
        // statement from before them.
        for Awaited {
            name,
            closed,
            closed_on_server,
            ..
        } in failed.into_iter().rev()
        {
            match closed {
                None => {
                    if let Some(prepared) = self.registry.statements.remove(&name) {
                        self.registry.book.release(&prepared.server_name);
                    }
                }
                Some(prepared) => {
                    // Still on the connection (prepared again under a changed search_path, it
                    // could name other tables than the client's statement does).
                    // Unless a later Close, still unanswered, closes it (another client name
                    // for the same text: the server names statements by their text).
                    let closed_later = self.registry.awaited.iter().any(|later| {
                        later
                            .closed
                            .as_ref()
                            .is_some_and(|p| p.server_name == prepared.server_name)
                    });
                    if let (true, false, Some(server)) =
                        (closed_on_server, closed_later, self.server.as_mut())
                    {
                        server.prepared.restore(&prepared.server_name);
                    }
                    if let std::collections::hash_map::Entry::Vacant(entry) =
                        self.registry.statements.entry(name)
                    {
                        self.registry.book.hold(&prepared.server_name);
                        entry.insert(prepared);
                    }
                }
            }
        }
    }

    /// The client's statements are gone (its session ended, DEALLOCATE ALL).
    pub(super) fn forget_statements(&mut self) {
        for (_, prepared) in self.registry.statements.drain() {
            self.registry.book.release(&prepared.server_name);
        }
        self.registry.awaited.clear();
    }

    /// The client's last unnamed Parse (or Close) went in an earlier sync group, still
    /// unanswered. (Most clients parse the unnamed statement in the group that binds it: then
    /// this is false, and costs one comparison.)
    pub(super) fn unnamed_unsettled_before(&self) -> bool {
        self.unnamed
            .sent
            .last()
            .is_some_and(|parse| parse.group < self.replies.open_group())
    }

    /// Whether a client message names a statement whose Parse or Close, sent in an earlier
    /// sync group, is still awaited: what the server did with it (ran it, or skipped it
    /// after an error) decides what this message means. Within one group it does not
    /// matter: after an error the server skips the rest of the group too.
    pub(super) fn must_wait(&self, frame: &Bytes) -> bool {
        if tag(frame) == TERMINATE {
            return self.terminate_waits();
        }
        let name = match tag(frame) {
            PARSE => frontend::parse_message(frame).map(|p| p.name),
            BIND => frontend::bind_statement(frame).map(|(_, statement, _)| statement),
            DESCRIBE | CLOSE => match frontend::target(frame) {
                Some((STATEMENT, name)) => Some(name),
                _ => None,
            },
            _ => None,
        };
        let open = self.replies.open_group();
        if name.is_some_and(str::is_empty) && matches!(tag(frame), BIND | DESCRIBE) {
            // The unnamed statement, last parsed in a group not yet answered: whether the
            // server ran that Parse (or skipped it after an error) decides which statement
            // this binds, and whether this connection has it.
            return self.unnamed_unsettled_before();
        }
        let Some(name) = name.filter(|name| !name.is_empty()) else {
            return false;
        };
        self.registry
            .awaited
            .iter()
            .any(|awaited| awaited.name == name && awaited.group < open)
    }

    /// What a Parse's statement does to the session, taken as done when the Parse arrives,
    /// whether it goes to a server now or is remembered for later: a SET is tracked like one
    /// sent as a simple query (JDBC sends SET through the extended protocol, psycopg with
    /// prepare_threshold=0 prepares it), and LISTEN in transaction mode is refused. Returns
    /// the Parse to handle instead (the refusal under the client's name), if any.
    pub(super) fn parse_effects(&mut self, message: &frontend::Parse<'_>) -> Effects {
        let scan = inspect::scan(message.query);
        if scan.transaction_control {
            self.note_transaction_control();
            self.control_sent();
        }
        // A temporary object must reach no other client: the connection is closed after
        // the transaction (in session mode, the session's DISCARD ALL drops it).
        if self.mode() == PoolMode::Transaction && scan.creates_temp {
            self.dirty = true;
        }
        if self.mode() == PoolMode::Transaction && scan.listen {
            let refused = frontend::Parse {
                name: message.name,
                query: REFUSE_LISTEN.as_bytes(),
                rest: &[0, 0],
            };
            return Effects::Refused(frontend::rename_parse(&refused, message.name));
        }
        if scan.changes_session && std::str::from_utf8(message.query).is_err() {
            // Not UTF-8 (another client_encoding): what it sets cannot be read, so the
            // connection does not go to another client afterwards.
            self.dirty = true;
            return Effects::Sets(false);
        }
        Effects::Sets(scan.changes_session)
    }

    /// Remembers a named Parse that arrived with no server connection; its ParseComplete is
    /// owed to the client. False for an unnamed Parse, which needs the server.
    pub(super) fn remember_parse(&mut self, frame: &Bytes) -> bool {
        // Most Parses are of the unnamed statement (an empty name: the body starts with its
        // terminator), and parse() reads those again: not read twice.
        if body(frame).first() == Some(&0) {
            return false;
        }
        let Some(message) = frontend::parse_message(frame) else {
            return false;
        };
        // What the statement does to the session counts when it is executed, as for a Parse
        // sent to a server: this is the path of a client that prepares between transactions
        // (psycopg with prepare_threshold=0 in autocommit, pgjdbc's named statements), and a
        // SET prepared here and run in the next transaction was once tracked by nobody — it
        // stayed on the server connection for whichever client came next, and was missing
        // from this client's own later transactions.
        let sets = match self.parse_effects(&message) {
            Effects::Refused(refused) => return self.remember_parse(&refused),
            Effects::Sets(sets) => sets,
        };
        let server_name = statement_name(message.query, message.rest);
        let parse = frontend::rename_parse(&message, &server_name);
        self.registry.book.hold(&server_name);
        self.registry.statements.insert(
            message.name.to_string(),
            Prepared {
                server_name,
                parse,
                sets,
            },
        );
        self.registry.owed_parse_complete += 1;
        true
    }

    /// Sends the ParseCompletes owed for remembered Parses, then `last` (a ReadyForQuery for a
    /// Sync), and flushes.
    pub(super) async fn answer_locally(&mut self, last: Option<Bytes>) -> bool {
        if self.registry.owed_parse_complete == 0 && last.is_none() {
            return true;
        }
        for _ in 0..std::mem::take(&mut self.registry.owed_parse_complete) {
            if self.client_w.feed(backend::parse_complete()).await.is_err() {
                return false;
            }
        }
        if let Some(frame) = last {
            if self.client_w.feed(frame).await.is_err() {
                return false;
            }
        }
        self.client_w.flush().await.is_ok()
    }

    /// Makes sure the statement exists on this server connection (its ParseComplete is
    /// swallowed) and gives its server name.
    pub(super) fn ensure_prepared(
        &mut self,
        client_name: &str,
        out: &mut Frames,
    ) -> Option<(String, bool)> {
        let prepared = self.registry.statements.get(client_name)?;
        let server = self.server.as_mut()?;
        let (server_name, sets) = (prepared.server_name.clone(), prepared.sets);
        let open = self.replies.open_group();
        let uncertain = self
            .registry
            .group_prepared
            .iter()
            .any(|p| p.group < open && p.name == server_name);
        if !server.prepared.touch(&server_name) || uncertain {
            let parse = prepared.parse.clone();
            self.make_room_for(&server_name, out);
            // Closed first: after an error the proxy cannot know whether an earlier Parse of
            // it went through, and Close of a statement that does not exist is no error.
            out.push(frontend::rebuild_target(CLOSE, STATEMENT, &server_name));
            out.push(parse);
            self.replies.sent_ours();
            let at = self.replies.next_position();
            self.replies.sent_ours();
            self.registry.group_prepared.push(GroupPrepared {
                group: open,
                name: server_name.clone(),
                at,
            });
        }
        Some((server_name, sets))
    }

    pub(super) fn bind(&mut self, frame: Bytes) -> Frames {
        let Some((portal, statement, rest_at)) = frontend::bind_statement(&frame) else {
            return smallvec![frame];
        };
        if statement.is_empty() {
            let sets = self.unnamed.sets;
            if sets || !self.settings.portals.is_empty() {
                self.bound(portal.to_string(), String::new(), sets);
            }
            return self.with_unnamed(frame);
        }
        let mut out = Frames::new();
        let (renamed, sets) = match self.ensure_prepared(statement, &mut out) {
            Some((server_name, sets)) => (
                frontend::rename_bind(&frame, portal, &server_name, rest_at),
                sets,
            ),
            None => {
                self.close_placeholder(statement, &mut out);
                (frame.clone(), false)
            }
        };
        if sets || !self.settings.portals.is_empty() {
            self.bound(portal.to_string(), statement.to_string(), sets);
        }
        out.push(renamed);
        out
    }

    /// A message names a statement the client does not have: if a duplicate Parse left a
    /// placeholder of that name on the connection, it is closed first, so that the server
    /// answers as PostgreSQL does (26000).
    pub(super) fn close_placeholder(&mut self, name: &str, out: &mut Frames) {
        if self.placeholder_closing(name) {
            out.push(frontend::rebuild_target(CLOSE, STATEMENT, name));
            self.replies.sent_ours();
        }
    }

    /// A Close of the placeholder `name`, if there is one, goes in the open group: noted, so
    /// that the placeholder is forgotten only once that group ends without error.
    fn placeholder_closing(&mut self, name: &str) -> bool {
        let group = self.replies.open_group();
        match self
            .registry
            .placeholders
            .iter_mut()
            .find(|p| p.name == name)
        {
            Some(placeholder) => {
                placeholder.closing = Some(group);
                true
            }
            None => false,
        }
    }

    /// A sync group was answered (`answering` is the first group still open), or failed
    /// (`failed`: that group and those before it). A placeholder whose Close went in a group
    /// that failed may still be on the connection: an error before the Close made the server
    /// skip it, so it is closed again the next time its name comes. One closed in a group that
    /// ended without error is gone.
    pub(super) fn settle_placeholders(&mut self, answering: u64, failed: bool) {
        if failed {
            for placeholder in &mut self.registry.placeholders {
                if placeholder.closing.is_some_and(|group| group <= answering) {
                    placeholder.closing = None;
                }
            }
        } else {
            self.registry
                .placeholders
                .retain(|p| p.closing.is_none_or(|group| group >= answering));
        }
    }

    /// A Bind of `portal`: it remembers the statement's text if that changes settings.
    pub(super) fn bound(&mut self, portal: String, statement: String, sets: bool) {
        self.settings.portals.retain(|p| p.portal != portal);
        if !sets {
            return;
        }
        let parse = if statement.is_empty() {
            (!self.unnamed.text.is_empty()).then(|| Bytes::copy_from_slice(&self.unnamed.text))
        } else {
            self.registry
                .statements
                .get(&statement)
                .map(|p| p.parse.clone())
        };
        let text = parse
            .as_ref()
            .and_then(frontend::parse_message)
            .and_then(|message| std::str::from_utf8(message.query).ok().map(str::to_string));
        if let Some(text) = text {
            self.settings.portals.push(SettingPortal {
                portal,
                text,
                group: self.replies.open_group(),
            });
        }
    }

    /// An Execute of a portal bound to a statement that changes settings: the change is
    /// tracked as if the statement came as a simple Query, here and now.
    pub(super) fn execute_effects(&mut self, frame: &Bytes) {
        let mut b = body(frame);
        let Some(portal) = cstr(&mut b) else {
            return;
        };
        if let Some(text) = self
            .settings
            .portals
            .iter()
            .find(|p| p.portal == portal)
            .map(|p| p.text.clone())
        {
            self.track_setting(&text);
        }
    }

    /// Describe of a statement is renamed (and prepared if need be). Close of a statement only
    /// forgets the client's name: other clients may share the server statement, so the server
    /// gets a Close of a name that does not exist, which PostgreSQL answers with CloseComplete
    /// in its proper place.
    pub(super) fn describe_or_close(&mut self, frame: Bytes) -> Frames {
        let kind = tag(&frame);
        let close_at = if kind == CLOSE {
            self.replies.sent_theirs()
        } else {
            0
        };
        let Some((STATEMENT, name)) = frontend::target(&frame) else {
            return smallvec![frame];
        };
        if name.is_empty() {
            if kind == DESCRIBE {
                return self.with_unnamed(frame);
            }
            // Closed here and on the server alike, unless an error earlier in its group makes
            // the server skip it: it is settled with the unnamed Parses.
            self.close_unnamed(close_at);
            return smallvec![frame];
        }
        if kind == CLOSE {
            let Some(prepared) = self.registry.statements.remove(name) else {
                // The server's own answer; a placeholder of that name goes with it (unless an
                // error earlier in the group makes the server skip it).
                self.placeholder_closing(name);
                return smallvec![frame];
            };
            // The last client to hold it: deallocated on this connection (the server's
            // CloseComplete answers the client), and on the others before their next
            // transaction. Otherwise only the client's name goes, and the server is asked
            // to close a name that does not exist, so that its answer comes in its place.
            // In session mode the connection is the client's alone: closed there whoever
            // else holds the statement.
            let last = self.registry.book.release(&prepared.server_name);
            if !last && self.mode() == PoolMode::Transaction {
                self.registry.awaited.push(Awaited {
                    at: close_at,
                    group: self.replies.open_group(),
                    name: name.to_string(),
                    closed: Some(prepared),
                    closed_on_server: false,
                });
                return smallvec![frontend::rebuild_target(
                    CLOSE,
                    STATEMENT,
                    "switchyard_forgotten"
                )];
            }
            let listed = self
                .server
                .as_mut()
                .is_some_and(|server| server.prepared.remove(&prepared.server_name));
            let close = frontend::rebuild_target(CLOSE, STATEMENT, &prepared.server_name);
            self.registry.awaited.push(Awaited {
                at: close_at,
                group: self.replies.open_group(),
                name: name.to_string(),
                closed: Some(prepared),
                closed_on_server: listed,
            });
            return smallvec![close];
        }
        let mut out = Frames::new();
        match self.ensure_prepared(name, &mut out) {
            Some((server_name, _)) => {
                out.push(frontend::rebuild_target(DESCRIBE, STATEMENT, &server_name))
            }
            None => {
                self.close_placeholder(name, &mut out);
                out.push(frame.clone())
            }
        }
        out
    }
}
