//! The server's answers: what each tells the session about its statements, settings and
//! transaction on the way to the client, and the end of a transaction.

use super::*;

impl Session {
    pub(super) async fn on_server_frame(&mut self, frame: Bytes) -> bool {
        let kind = tag(&frame);
        match kind {
            PARSE_COMPLETE | CLOSE_COMPLETE => match self.replies.complete_received() {
                Err(at) => {
                    if let Some(parse) = self.unnamed.sent.iter_mut().find(|p| p.marker == Some(at))
                    {
                        parse.reached = true;
                    }
                    if !self.registry.group_prepared.is_empty() {
                        self.registry.group_prepared.retain(|p| p.at != at);
                    }
                    if self
                        .unnamed
                        .replayed
                        .is_some_and(|(_, replayed)| replayed == at)
                    {
                        self.unnamed.replayed = None;
                    }
                    return true;
                }
                Ok(at) => {
                    // A statement prepared in this group exists: an error later in it does
                    // not undo that.
                    if !self.registry.group_prepared.is_empty() {
                        self.registry.group_prepared.retain(|p| p.at != at);
                    }
                    if let Some(parse) = self.unnamed.sent.iter_mut().find(|p| p.at == at) {
                        parse.ran = true;
                    } else if !self.registry.awaited.is_empty() {
                        self.registry.awaited.retain(|awaited| awaited.at != at);
                    }
                }
            },
            PARAMETER_STATUS => self.note_parameter(&frame),
            // Copy-in began: the Syncs sent after the Execute that started it were (or will
            // be) ignored by the server.
            COPY_IN_RESPONSE => self.replies.copy_in_received(),
            // The server is ending the connection (shutdown, pg_terminate_backend): that ends
            // this client's transaction, not its session.
            ERROR_RESPONSE if backend::is_fatal(body(&frame)) => {
                let (code, message) = backend::error_fields(body(&frame));
                tracing::warn!(user = %self.user, code, "server connection ended: {message}");
                return self.server_lost_because(Fatal::new(code, message)).await;
            }
            READY_FOR_QUERY => {
                let status = body(&frame).first().copied().unwrap_or(IDLE);
                self.ready_received(status);
                if self.caching.fill.is_some() {
                    self.answer_collected(status);
                }
                if self.shadowing.capture.is_some() {
                    self.shadow_collected(status);
                }
            }
            ERROR_RESPONSE => {
                self.replies.error_received();
                self.group_failed = true;
                // The transaction failed (or, outside a block, the statement and the rest of
                // its query or pipeline): its setting changes are undone.
                self.settings.pending.undo(self.replies.answering());
                let answering = self.replies.answering();
                self.unlist_prepared(|p| p.group <= answering);
                if !self.registry.placeholders.is_empty() {
                    self.settle_placeholders(answering, true);
                }
            }
            // A COMMIT's or ROLLBACK's CommandComplete, maybe in a run of rows and
            // completions.
            _ if passes_through(kind)
                && (!self.settings.pending.is_empty()
                    || self.settings.controls_sent.0 == self.replies.answering()) =>
            {
                self.transaction_controls_done(&frame);
            }
            _ => {}
        }
        if self.caching.fill.is_some() {
            self.collect_for_cache(&frame);
        }
        if self.shadowing.capture.is_some() {
            self.collect_for_shadow(&frame);
        }
        let ready = kind == READY_FOR_QUERY;
        metrics::add(&self.metrics().bytes_to_clients, frame.len() as u64);
        let more_coming = self
            .server
            .as_ref()
            .is_some_and(|s| !s.reader.read_buffer().is_empty());
        if !try_queue(&mut self.client_w, &frame)
            && queue(&mut self.client_w, &frame).await.is_err()
        {
            return false;
        }
        if (ready || !more_coming) && self.client_w.flush().await.is_err() {
            return false;
        }
        if ready && self.replies.owed() == 0 && self.unsynced == 0 && self.status == IDLE {
            if self.caching.may_write && self.in_turn && !Box::pin(self.note_own_write()).await {
                return false;
            }
            self.transaction_done();
        }
        true
    }

    /// ReadyForQuery: a sync group is answered, and with it what was pending on it (setting
    /// changes, statements prepared or closed in it, the unnamed statement's Parses).
    #[inline(always)]
    pub(super) fn ready_received(&mut self, status: u8) {
        self.status = status;
        if !self.settings.pending.is_empty() {
            self.settle_settings();
        }
        // That sync group is answered, whatever an error made the server skip.
        self.replies.ready_received();
        // The transaction ended, and its portals with it; those bound in groups the
        // client sent since belong to the next ones (a pipeline: the client may bind
        // one before this answer came).
        if self.status == IDLE && !self.settings.portals.is_empty() {
            let answering = self.replies.answering();
            self.settings.portals.retain(|p| p.group >= answering);
        }
        if !self.unnamed.sent.is_empty() {
            self.settle_unnamed(self.replies.answered());
        }
        if self.unnamed.replayed.is_some() {
            self.settle_unnamed_replay(self.replies.answered());
        }
        if !self.registry.awaited.is_empty() {
            self.not_run(self.replies.answered());
        }
        if !self.registry.group_prepared.is_empty() {
            let answering = self.replies.answering();
            // After an error the server skipped the rest of the group, including
            // statements the proxy prepared after the error came (a group whose
            // error answered an earlier write): the connection may lack them.
            if std::mem::take(&mut self.group_failed) {
                self.unlist_prepared(|p| p.group < answering);
            }
            self.registry
                .group_prepared
                .retain(|p| p.group >= answering);
        }
        if !self.registry.placeholders.is_empty() {
            self.settle_placeholders(self.replies.answering(), false);
        }
        self.group_failed = false;
    }

    /// Statements the proxy prepared in a group that failed: the connection may lack them,
    /// so its record no longer lists them. A client's Close of one, sent since and still
    /// unanswered, found it listed (the Parse was on its way): if the server skips that Close
    /// too, the statement must not be listed again (it would be bound without being prepared
    /// first, 26000 where PostgreSQL answers otherwise).
    fn unlist_prepared(&mut self, failed: impl Fn(&GroupPrepared) -> bool) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        for p in self.registry.group_prepared.iter().filter(|p| failed(p)) {
            server.prepared.remove(&p.name);
            for awaited in &mut self.registry.awaited {
                if awaited
                    .closed
                    .as_ref()
                    .is_some_and(|closed| closed.server_name == p.name)
                {
                    awaited.closed_on_server = false;
                }
            }
        }
    }

    /// The client is between transactions: the server connection goes back to the pool in
    /// transaction mode, and stays in session mode (but the session no longer counts as
    /// active: a pause holds its next transaction).
    pub(super) fn transaction_done(&mut self) {
        if !self.in_turn {
            return;
        }
        let now = std::time::Instant::now();
        self.metrics()
            .transaction(now.saturating_duration_since(self.attached_at));
        match self.mode() {
            PoolMode::Transaction => self.release_at(now),
            PoolMode::Session => self.end_turn(),
        }
    }
}
