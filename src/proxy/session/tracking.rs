//! The session's settings: what a query or an executed statement changes, settled when its
//! transaction ends, and re-applied on the server connection a transaction runs on.

use super::*;

impl Session {
    /// At a ReadyForQuery: outside a transaction block, the setting changes of the
    /// transaction that ended either lasted or were undone. A ROLLBACK that leaves a block
    /// open was `ROLLBACK TO SAVEPOINT`: which changes it undid is not known here, so they
    /// are not followed, and the connection, which may still hold some, is not reused.
    pub(super) fn settle_settings(&mut self) {
        let group = self.replies.answering();
        if std::mem::take(&mut self.settings.rolled_back) && self.status != IDLE {
            self.dirty = true;
        }
        if self.status == IDLE {
            let lasted = self.settings.pending.settle(group);
            self.settings_lasted(lasted);
        }
    }

    /// The CommandCompletes in `frames` of statements that end or open a transaction: a
    /// COMMIT makes the setting changes sent before it in its group the client's, a ROLLBACK
    /// (or `ROLLBACK TO SAVEPOINT`, whose tag is the same) undoes them.
    pub(super) fn transaction_controls_done(&mut self, frames: &[u8]) {
        let group = self.replies.answering();
        for command in backend::command_tags(frames) {
            let committed = match command {
                b"COMMIT" => true,
                b"ROLLBACK" => false,
                b"BEGIN" | b"START TRANSACTION" | b"SAVEPOINT" | b"RELEASE" => {
                    self.control_done(group);
                    continue;
                }
                _ => continue,
            };
            let control = self.control_done(group);
            // A ROLLBACK TO SAVEPOINT (the same tag) with changes pending leaves the
            // connection unfit for reuse (settle_settings); without any, it changes nothing.
            if !committed && !self.settings.pending.is_empty() {
                self.settings.rolled_back = true;
            }
            let lasted = self
                .settings
                .pending
                .end_transaction(group, control, committed);
            self.settings_lasted(lasted);
        }
    }

    /// Counts a completed statement of `group` that ends or opens a transaction; returns
    /// its number in the group, from 0.
    fn control_done(&mut self, group: u64) -> u32 {
        if self.settings.controls_done.0 != group {
            self.settings.controls_done = (group, 0);
        }
        self.settings.controls_done.1 += 1;
        self.settings.controls_done.1 - 1
    }

    /// Counts a statement that ends or opens a transaction sent in the open group.
    pub(super) fn control_sent(&mut self) {
        let group = self.replies.open_group();
        if self.settings.controls_sent.0 != group {
            self.settings.controls_sent = (group, 0);
        }
        self.settings.controls_sent.1 += 1;
    }

    /// How many statements that end or open a transaction were sent in the open group.
    fn controls_sent_now(&self) -> u32 {
        if self.settings.controls_sent.0 == self.replies.open_group() {
            self.settings.controls_sent.1
        } else {
            0
        }
    }

    /// A ParameterStatus from the server in the client's transaction: the server connection's
    /// value changed, and, as the client caused it, it is now one of the client's settings.
    pub(super) fn note_parameter(&mut self, frame: &Bytes) {
        let mut b = body(frame);
        let (Some(name), Some(value)) = (cstr(&mut b), cstr(&mut b)) else {
            return;
        };
        let name = name.to_ascii_lowercase();
        let passed_to_server = settings::passed_to_server(&name);
        let in_step = self.settings_in_step();
        if let Some(server) = self.server.as_mut() {
            server.params.insert(name.clone(), value.clone());
            if passed_to_server {
                server.applied.insert(name.clone(), sql::literal(&value));
            }
        }
        if passed_to_server {
            self.settings.wanted.insert(name, sql::literal(&value));
            self.settings_changed(in_step);
        }
    }

    /// A simple query: SET and RESET are remembered; LISTEN is refused in transaction mode
    /// (a notification could arrive on a connection another client holds by then).
    pub(super) fn query(&mut self, frame: Bytes) -> Frames {
        let Some(bytes) = frontend::query_text(&frame) else {
            return smallvec![frame];
        };
        let scan = inspect::scan(bytes);
        if scan == inspect::Scan::default() {
            return smallvec![frame];
        }
        let text = std::str::from_utf8(bytes).ok();
        if scan.transaction_control {
            self.note_transaction_control();
            // Several statements are counted one by one as they are tracked.
            if !text.is_some_and(inspect::is_multi_statement) {
                self.control_sent();
            }
        }
        if self.mode() == PoolMode::Transaction {
            if scan.listen {
                return smallvec![frontend::query(REFUSE_LISTEN)];
            }
            self.dirty |= scan.creates_temp;
        }
        let Some(text) = text else {
            return smallvec![frame];
        };
        if scan.deallocate {
            return self.deallocate(frame.clone(), text);
        }
        self.track_setting(text);
        smallvec![frame]
    }

    /// Remembers what a text whose statements change the session does to its settings, to
    /// take effect if its transaction commits ([`settings::Pending`]). A change the proxy
    /// cannot follow (SET ROLE, a text it cannot split) leaves the server connection with
    /// state no other client may inherit: it is closed afterwards.
    pub(super) fn track_setting(&mut self, text: &str) {
        if !inspect::is_multi_statement(text) {
            return self.track_statement(text);
        }
        // Several statements: each one that changes the session is followed as if it came
        // alone; a text the proxy cannot split safely may hide anything: the connection is
        // not reused.
        match inspect::split_statements(text) {
            Some(statements) => {
                for statement in statements {
                    if inspect::scan(statement.as_bytes()).transaction_control {
                        self.control_sent();
                    } else {
                        self.track_statement(statement);
                    }
                }
            }
            None => self.dirty = true,
        }
    }

    /// [`Self::track_setting`] for one statement.
    pub(super) fn track_statement(&mut self, text: &str) {
        if !inspect::changes_session(text.as_bytes()) {
            return;
        }
        let Some(change) = settings::recognise(text) else {
            self.dirty = true;
            return;
        };
        if change == SettingChange::ResetAll && starts_with_keyword(text, "discard") {
            // What the connection holds, whether or not the DISCARD lasts: a statement the
            // proxy thinks missing is prepared again (a Close goes first), never assumed.
            if let Some(server) = self.server.as_mut() {
                server.prepared.clear();
            }
        }
        let group = self.replies.open_group();
        // The group already failed (its error answered an earlier write): the server skips
        // this statement.
        if self.group_failed && self.replies.answering() == group {
            return;
        }
        if self.settings.transaction_control == Some(group) {
            self.dirty = true;
        }
        let after_control = self.controls_sent_now();
        self.settings.pending.stage(group, after_control, change);
    }

    /// A COMMIT or ROLLBACK in the same query or pipeline as a SET decides whether the SET
    /// lasts by where it stands between them and an error, which the proxy does not follow
    /// statement by statement: the connection, which may hold either value, is closed after
    /// the transaction.
    pub(super) fn note_transaction_control(&mut self) {
        let group = self.replies.open_group();
        self.settings.transaction_control = Some(group);
        if self.settings.pending.has_group(group) {
            self.dirty = true;
        }
    }

    /// A change whose transaction committed becomes the client's, and the connection's: it
    /// ran there (a simple Query, or the Execute of a portal, on the connection the
    /// transaction holds).
    pub(super) fn settings_lasted(&mut self, lasted: Vec<SettingChange>) {
        if lasted.is_empty() {
            return;
        }
        let in_step = self.settings_in_step();
        for change in lasted {
            let applied = self.server.as_mut().map(|server| &mut server.applied);
            match change {
                SettingChange::Set { name, value_sql } if settings::passed_to_server(&name) => {
                    if let Some(applied) = applied {
                        applied.insert(name.clone(), value_sql.clone());
                    }
                    self.settings.wanted.insert(name, value_sql);
                }
                SettingChange::Set { .. } => {}
                SettingChange::Reset(name) => {
                    if let Some(applied) = applied {
                        applied.remove(&name);
                    }
                    self.settings.wanted.remove(&name);
                }
                SettingChange::ResetAll => {
                    if let Some(applied) = applied {
                        applied.clear();
                    }
                    self.settings
                        .wanted
                        .retain(|name, _| name == "client_encoding");
                }
            }
        }
        // The connection's settings changed with the client's, in step if they were.
        self.settings_changed(in_step);
    }

    /// The attached connection's settings carry the tag of the client's.
    fn settings_in_step(&self) -> bool {
        self.server
            .as_ref()
            .is_some_and(|server| server.applied_tag == self.settings.wanted_tag)
    }

    /// The client's settings changed (and the attached connection's with them): a new tag,
    /// which the connection carries too if it was in step and still is (a `DISCARD ALL`
    /// keeps the client's `client_encoding` but not the connection's). Rare: the maps are
    /// compared here, so that equal tags always mean equal settings.
    fn settings_changed(&mut self, in_step: bool) {
        self.settings.wanted_tag = settings::new_tag();
        if let Some(server) = self.server.as_mut() {
            server.applied_tag = if in_step && server.applied == self.settings.wanted {
                self.settings.wanted_tag
            } else {
                0
            };
        }
    }

    /// Brings a server connection's settings in line with the client's before the client's
    /// transaction is sent: a setting that fails to apply (its value became invalid, as a
    /// text search configuration that was dropped, or after a switch to a server that lacks
    /// the parameter) fails that transaction, rather than letting it run with what the
    /// connection's last client set. The failed settings are no longer kept for the session,
    /// and the error says so, so that the client's next transaction can run.
    pub(super) async fn reapply_settings(
        &mut self,
        server: &mut ServerConn,
        changes: &[settings::Change],
    ) -> Result<(), Fatal> {
        let broke = |_| Fatal::new("08006", "the server connection broke");
        // One Query each, sent together: each gets its own answer, and one that fails
        // leaves the others applied.
        let mut queries = BytesMut::new();
        for change in changes {
            queries.extend_from_slice(&frontend::query(&change.statement));
        }
        server.send(queries.freeze()).await.map_err(broke)?;
        let mut failed: Option<Fatal> = None;
        for change in changes {
            loop {
                let frame = server.recv().await.map_err(broke)?;
                match tag(&frame) {
                    PARAMETER_STATUS => remember_parameter(server, &frame),
                    // The connection is ending (terminated, the server shutting down, an idle
                    // timeout that struck while it sat in the pool): not the setting's fault.
                    ERROR_RESPONSE if backend::is_fatal(body(&frame)) => {
                        return Err(Fatal::new("08006", "the server connection broke"));
                    }
                    ERROR_RESPONSE => {
                        let (code, message) = backend::error_fields(body(&frame));
                        server.applied.remove(&change.name);
                        server.applied_tag = 0;
                        let error = if refuses_the_setting(&code) {
                            self.settings.wanted.remove(&change.name);
                            self.settings.wanted_tag = settings::new_tag();
                            Fatal::new(code, format!(
                                "cannot apply this session's setting {} on a server connection, so the proxy no longer keeps it: {message}",
                                change.name
                            ))
                        } else {
                            // Anything else (the client's own cancel, a lack of memory) stops
                            // this transaction, not the setting.
                            Fatal::new(code, message)
                        };
                        failed.get_or_insert(error);
                    }
                    READY_FOR_QUERY => break,
                    _ => {}
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// An error that says a setting itself cannot be applied: a bad value (class 22), an unknown
/// parameter or object, or a lack of privilege (class 42), or a parameter that cannot be
/// changed now (55P02).
pub(super) fn refuses_the_setting(sqlstate: &str) -> bool {
    sqlstate.starts_with("22") || sqlstate.starts_with("42") || sqlstate == "55P02"
}

/// Keeps a ParameterStatus the server sent in the connection's view of its parameters.
pub(super) fn remember_parameter(server: &mut ServerConn, frame: &Bytes) {
    let mut b = body(frame);
    if let (Some(name), Some(value)) = (cstr(&mut b), cstr(&mut b)) {
        server.params.insert(name.to_ascii_lowercase(), value);
    }
}

/// The client's settings as the proxy follows them: what every server connection it uses
/// is brought to, and the changes whose transaction has not ended yet.
pub(super) struct ClientSettings {
    /// Name → value as SQL.
    pub(super) wanted: BTreeMap<String, String>,
    /// A new tag each time `wanted` changes ([`settings::new_tag`]).
    pub(super) wanted_tag: u64,
    /// Setting changes sent whose transaction has not ended yet.
    pub(super) pending: settings::Pending,
    /// The group being answered rolled back (a ROLLBACK's CommandComplete), while setting
    /// changes were pending.
    pub(super) rolled_back: bool,
    /// The last sync group with a statement that ends or opens a transaction.
    pub(super) transaction_control: Option<u64>,
    /// How many statements that end or open a transaction were sent in a sync group, and
    /// how many of them completed, with their group: a COMMIT or ROLLBACK ends the setting
    /// changes sent before it in its group, not those after.
    pub(super) controls_sent: (u64, u32),
    pub(super) controls_done: (u64, u32),
    /// Portals bound in this transaction to a statement that changes settings, with its
    /// text: what it sets counts when the portal is executed, not when it is parsed.
    pub(super) portals: Vec<SettingPortal>,
}

impl ClientSettings {
    pub(super) fn new(wanted: BTreeMap<String, String>) -> ClientSettings {
        ClientSettings {
            wanted,
            wanted_tag: settings::new_tag(),
            pending: settings::Pending::default(),
            rolled_back: false,
            transaction_control: None,
            // No group is numbered u64::MAX: nothing counted yet.
            controls_sent: (u64::MAX, 0),
            controls_done: (0, 0),
            portals: Vec::new(),
        }
    }
}

/// A portal bound to a statement that changes settings: what it sets counts when it is
/// executed.
pub(super) struct SettingPortal {
    pub(super) portal: String,
    /// The statement's text.
    pub(super) text: String,
    /// The sync group of its Bind.
    pub(super) group: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_about_the_setting_itself_drop_it() {
        // A bad value, an unknown parameter, no privilege, not changeable now.
        for code in ["22023", "42704", "42501", "55P02"] {
            assert!(refuses_the_setting(code), "{code}");
        }
        // The client's cancel, a lack of memory, a server shutting down.
        for code in ["57014", "53200", "57P01"] {
            assert!(!refuses_the_setting(code), "{code}");
        }
    }
}
