//! Taking a server connection (waiting while paused), giving it back, and losing it.

use super::*;

impl Session {
    /// Takes a server connection (waiting while the proxy is paused) and brings its session
    /// settings in line with the client's.
    pub(super) async fn attach(&mut self, apply_settings: bool) -> Result<(), Fatal> {
        let seen = self.cancel_slot.unanswered();
        let checkout = match self.take_turn_and_server_now() {
            Some(found) => Ok(found),
            None => self.wait_for_turn_and_server(seen).await,
        };
        let checkout = match checkout {
            Ok((server, side))
                if !self
                    .cancel_slot
                    .start_running(self.running_on(&server), seen) =>
            {
                // The cancel came with the connection: the query does not run.
                self.end_turn();
                self.give_back(server, side);
                Err(Waited::Cancelled)
            }
            other => other,
        };
        if checkout.is_err() {
            self.end_turn();
        }
        let (mut server, side) = checkout.map_err(|e| match e {
            Waited::Cancelled => Fatal::new(QUERY_CANCELED, "canceling statement due to user request"),
            Waited::Pool(bb8::RunError::TimedOut) => {
                metrics::add(&self.metrics().wait_timeouts, 1);
                Fatal::new("08006", format!(
                "no server connection within query_wait_timeout ({}): the pool is busy or the server is down",
                humantime::format_duration(self.shared.settings.query_wait_timeout.0)
                ))
            }
            // A login the server refused keeps the server's SQLSTATE (28P01 for a wrong
            // password): the client's error handling can tell it from a server that is down.
            Waited::Pool(bb8::RunError::User(e)) => Fatal::new(
                e.sqlstate().to_string(),
                format!("cannot connect to the database: {e}"),
            ),
        })?;
        if server.home != self.shard {
            metrics::add(&self.metrics().borrowed, 1);
        }
        let changes = if apply_settings && server.applied_tag != self.settings.wanted_tag {
            let changes = settings::reconcile(&self.settings.wanted, &mut server.applied);
            // In step once the changes are applied (a failure breaks the connection).
            server.applied_tag = self.settings.wanted_tag;
            changes
        } else {
            Vec::new()
        };
        if !changes.is_empty() {
            if let Err(error) = self.reapply_settings(&mut server, &changes).await {
                tracing::warn!(user = %self.user, "re-applying session settings failed: {}", error.message);
                server.broken = true;
                self.end_turn();
                self.give_back(server, side);
                return Err(error);
            }
        }
        self.server = Some(server);
        self.server_side = side;
        self.unnamed.here = false;
        self.unnamed.replayed = None;
        Ok(())
    }

    /// The common case of [`Session::take_turn_and_server`], without a future: the proxy is
    /// neither paused nor throttled, and a connection given back a moment ago is on the
    /// stack. `None` (nothing taken, nothing counted) when any of that is not so.
    pub(super) fn take_turn_and_server_now(&mut self) -> Option<(Pooled, Side)> {
        let control = &self.shared.control;
        if !control.admits_now() {
            return None;
        }
        // Counted as active before the pause is checked again, as in begin_turn.
        control.attached(self.shard);
        if control.is_paused() {
            control.detached(self.shard);
            return None;
        }
        let side = self.route().side();
        let pool = &self.pools[crate::proxy::side_index(side)];
        // Idle time as of the start of this turn: one clock read per transaction is enough.
        let now = std::time::Instant::now();
        let server = pool.take_warm();
        // One clock subtraction for both checks below (each is a call, some 25 instructions).
        let idle = server.as_ref().map_or(std::time::Duration::MAX, |server| {
            now.saturating_duration_since(server.idle_since)
        });
        match server {
            Some(mut server) if idle < self.shared.settings.server_check_delay.0 => {
                // Given back a moment ago, as under load: nothing to look at. Otherwise the
                // server may have closed it meanwhile (a restart): the checkout that follows
                // takes another.
                if idle >= LOOK_AFTER_IDLE && server.closed_while_idle() {
                    tracing::info!(
                        user = %self.user,
                        "a pooled server connection was closed by the server while idle: replaced"
                    );
                    server.broken = true;
                    drop(server);
                    control.detached(self.shard);
                    return None;
                }
                self.throttle_permit = None;
                self.in_turn = true;
                self.attached_at = now;
                Some((server, side))
            }
            stale => {
                // Back on top, for the checkout that follows (it checks a stale one).
                if let Some(server) = stale {
                    pool.give_back(server);
                }
                control.detached(self.shard);
                None
            }
        }
    }

    /// Waits for a turn and a server connection; a cancel from the client ends the wait.
    pub(super) async fn wait_for_turn_and_server(
        &mut self,
        seen: u64,
    ) -> Result<(Pooled, Side), Waited> {
        let cancel = self.cancel_slot.clone();
        tokio::select! {
            biased;
            checkout = self.take_turn_and_server() => checkout,
            () = cancel.cancelled_after(seen) => Err(Waited::Cancelled),
        }
    }

    /// Waits for a turn (while paused), then takes a server connection of the current
    /// backend. Safe to drop while waiting: a connection being checked is marked broken
    /// until its check succeeds.
    pub(super) async fn take_turn_and_server(&mut self) -> Result<(Pooled, Side), Waited> {
        self.begin_turn().await;
        // Read after the pause: a switch happens only while paused.
        let side = self.route().side();
        let pool = &self.pools[crate::proxy::side_index(side)];
        // The common case without a wait is take_turn_and_server_now's; checkout takes a
        // connection from the stack as it is, checking it if it sat idle too long.
        // Boxed: the checkout future is large, and moving it through the nested futures cost
        // more than the allocation.
        Box::pin(checkout(
            &self.shared,
            self.metrics(),
            pool,
            pool.take_warm(),
        ))
        .await
        .map(|server| (server, side))
        .map_err(Waited::Pool)
    }

    /// A transaction may start: waits while the proxy is paused (and, while throttled, for a
    /// turn). Counted as active before the pause is checked again: either `/pause` sees this
    /// session and waits for it, or this session sees the pause.
    pub(super) async fn begin_turn(&mut self) {
        let permit = loop {
            self.shared.control.admit().await;
            let permit = self.shared.control.throttle_permit().await;
            self.shared.control.attached(self.shard);
            if !self.shared.control.is_paused() {
                break permit;
            }
            self.shared.control.detached(self.shard);
        };
        self.throttle_permit = permit;
        self.in_turn = true;
        self.attached_at = std::time::Instant::now();
    }

    /// The transaction is over (and gives up its throttle turn).
    pub(super) fn end_turn(&mut self) {
        if std::mem::take(&mut self.in_turn) {
            // Cleared before the session stops counting as active: `/pause`, once it sees
            // no session active, lists what still runs from these slots.
            self.cancel_slot.set_running(None);
            self.throttle_permit = None;
            self.shared.control.detached(self.shard);
        }
    }

    /// Says which server backend runs this client's transaction: where a cancel goes, and
    /// what `/pause` lists as still running.
    pub(super) fn show_running(&self) {
        let target = self.server.as_ref().map(|server| self.running_on(server));
        self.cancel_slot.set_running(target);
    }

    pub(super) fn running_on(&self, server: &ServerConn) -> CancelTarget {
        CancelTarget {
            addr: server.addr,
            process_id: server.process_id,
            secret_key: server.secret_key,
            user: self.user.clone(),
            since: self.attached_at,
            cancels_in_flight: server.cancels_in_flight.clone(),
        }
    }

    /// Session mode, between transactions: a session whose server connection is on the side
    /// the proxy no longer sends to (a cutover or rollback switched) moves to a connection of
    /// the new side. What the proxy tracks (settings, prepared statements) follows it; other
    /// session state (temporary tables, WITH HOLD cursors) stays behind, as it would after a
    /// reconnect.
    pub(super) async fn follow_switch(&mut self) -> Result<(), Fatal> {
        if self.server.is_none() || self.server_side == self.shared.backend.side() {
            return Ok(());
        }
        tracing::info!(user = %self.user, "session moves to the new primary");
        self.release(true).await;
        self.attach(true).await
    }

    /// Gives the server connection back: as it is between transactions, reset after a session
    /// (`DISCARD ALL`), or closed when it is mid-way through something (`ending` with a
    /// transaction open: closing the connection rolls it back).
    pub(super) async fn release(&mut self, ending: bool) {
        if ending && self.mode() == PoolMode::Session && self.clean() {
            if let Some(server) = self.server.as_mut() {
                if reset(server).await.is_err() {
                    server.broken = true;
                }
            }
        }
        self.release_at(std::time::Instant::now());
    }

    /// Nothing is owed or pending on the server connection: it can serve another client.
    fn clean(&self) -> bool {
        self.status == IDLE
            && self.replies.owed() == 0
            && self.unsynced == 0
            && !self.replies.copy_in()
            && !self.dirty
    }

    /// [`Session::release`] without the reset (a transaction's end in transaction mode), the
    /// clock read at `now` by the caller. Not async: the end of every transaction comes here,
    /// and a future of its own cost more than the work.
    pub(super) fn release_at(&mut self, now: std::time::Instant) {
        let Some(mut server) = self.server.take() else {
            self.end_turn();
            return;
        };
        if !self.clean() {
            server.broken = true;
        }
        self.replies.clear();
        self.unsynced = 0;
        self.dirty = false;
        // Positions count again from 0 on the next connection: what is still awaited (the
        // connection broke) is taken as not run.
        if !self.registry.awaited.is_empty() {
            self.not_run(u64::MAX);
        }
        self.registry.placeholders.clear();
        self.group_failed = false;
        self.unnamed.sent.clear();
        self.unnamed.before = None;
        self.settings.portals.clear();
        self.status = IDLE;
        server.idle_since = now;
        // The turn ends first: it clears where this session's cancels go, so none is
        // forwarded to the connection once another client may hold it.
        self.end_turn();
        self.give_back(server, self.server_side);
    }

    /// Hands a server connection back to the pool it came from (another worker's, if it was
    /// borrowed). One that a forwarded cancel may still reach goes back only once PostgreSQL
    /// has acted on the cancel, which would otherwise stop another client's query. Call it
    /// after the session's cancel target is cleared ([`Session::end_turn`]).
    pub(super) fn give_back(&self, server: Pooled, side: Side) {
        let home = if server.home == self.shard {
            Some(&self.pools[crate::proxy::side_index(side)])
        } else {
            self.shared
                .shards
                .get(server.home)
                .and_then(|s| s.pool(&self.user, side))
        };
        // Without its pool found (it always is), dropping it gives it back to bb8.
        let Some(pool) = home else {
            return;
        };
        if server
            .cancels_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
        {
            metrics::add(&self.metrics().held_for_cancel, 1);
            tokio::spawn(give_back_after_cancel(pool.clone(), server));
            return;
        }
        pool.give_back(server);
    }

    /// The server connection broke: the client's transaction is lost, the session goes on.
    pub(super) async fn server_lost(&mut self) -> bool {
        self.server_lost_because(Fatal::new("08006", LOST)).await
    }

    /// [`Session::server_lost`], telling the client `cause`: the server's own error when it
    /// ended the connection with one (57P01 terminated by an administrator, 25P03 idle in
    /// transaction too long), as an ERROR, since the client's session goes on.
    pub(super) async fn server_lost_because(&mut self, cause: Fatal) -> bool {
        metrics::add(&self.metrics().server_connections_lost, 1);
        if self.mode() == PoolMode::Session && cause.code != "08006" {
            // The client's session is that server session: it ends with it, with the
            // server's FATAL, as it would directly (a client that checks whether its
            // connection broke finds it closed, and reconnects).
            if let Some(server) = self.server.as_mut() {
                server.broken = true;
            }
            self.release(false).await;
            let fatal = backend::error_response("FATAL", &cause.code, &cause.message);
            let _ = self.client_w.send(fatal).await;
            return false;
        }
        if let Some(server) = self.server.as_mut() {
            server.broken = true;
        }
        let waiting = self.replies.owed();
        let in_transaction = self.status != IDLE;
        // Its transaction is lost, and the setting changes made in it with it.
        self.settings.pending.clear();
        self.release(false).await;
        if waiting > 0 {
            // The client waits for answers: its transaction failed; every Sync and Query it
            // sent gets its ReadyForQuery.
            let error = backend::error_response("ERROR", &cause.code, &cause.message);
            if self.client_w.feed(error).await.is_err() {
                return false;
            }
            for _ in 0..waiting {
                if self
                    .client_w
                    .feed(backend::ready_for_query(IDLE))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            return self.client_w.flush().await.is_ok();
        }
        // Idle in a transaction: it learns with its next message.
        self.lost_transaction = in_transaction.then_some(cause);
        true
    }
}

/// A server connection from the pool (`first`, if given, is tried first). One that sat idle
/// longer than `server_check_delay` proves it still works with a round trip first (checked
/// here rather than by bb8 on every checkout, which costs the hot path a future per
/// transaction).
pub(super) async fn checkout(
    shared: &Shared,
    metrics: &metrics::Metrics,
    pool: &crate::proxy::pool::Pool,
    mut first: Option<Pooled>,
) -> Result<Pooled, bb8::RunError<crate::proxy::pool::ServerError>> {
    let mut attempt = 0;
    loop {
        let mut server = match first.take().or_else(|| pool.take_warm()) {
            Some(server) => server,
            None => {
                metrics::add(&metrics.waits, 1);
                let _waiting = metrics::Held::count(&metrics.clients_waiting);
                pool.get().await?
            }
        };
        // Closed by the server while it sat in the pool (a restart ends every connection):
        // dropped, and the next one looked at, however many there are; bb8 makes new ones
        // for the room they leave. One handed over the moment it came back (a session that
        // waited in the queue) is not looked at, as on the fast path.
        if server.idle_since.elapsed() >= LOOK_AFTER_IDLE && server.closed_while_idle() {
            tracing::info!(
                "a pooled server connection was closed by the server while idle: replaced"
            );
            server.broken = true;
            continue;
        }
        attempt += 1;
        if server.idle_since.elapsed() < shared.settings.server_check_delay.0 {
            return Ok(server);
        }
        let timeout = shared.settings.server_connect_timeout.0;
        // Broken until the ping is answered: a checkout abandoned half-way (the client
        // cancelled) must not give back a connection with a reply still to read.
        server.broken = true;
        match tokio::time::timeout(timeout, server.ping()).await {
            Ok(Ok(())) => {
                server.broken = false;
                return Ok(server);
            }
            _ if attempt < 3 => server.broken = true,
            _ => {
                server.broken = true;
                return Err(bb8::RunError::User(crate::proxy::pool::ServerError::Closed));
            }
        }
    }
}

/// How long a connection sits in the pool before a checkout looks whether the server closed
/// it meanwhile ([`ServerConn::closed_while_idle`]). A restart takes far longer, and under
/// load connections come back within microseconds: the hot path never looks.
const LOOK_AFTER_IDLE: std::time::Duration = std::time::Duration::from_millis(10);

/// Why no server connection was taken.
pub(super) enum Waited {
    Pool(bb8::RunError<crate::proxy::pool::ServerError>),
    Cancelled,
}

/// Session mode: a connection goes back to the pool as a fresh session would find it.
pub(super) async fn reset(server: &mut ServerConn) -> Result<(), crate::proxy::pool::ServerError> {
    server.send(frontend::query("DISCARD ALL")).await?;
    loop {
        let frame = server.recv().await?;
        match tag(&frame) {
            // The values it goes back to: the connection's view of them stays true.
            PARAMETER_STATUS => remember_parameter(server, &frame),
            ERROR_RESPONSE => {
                return Err(crate::proxy::pool::ServerError::Refused(
                    backend::error_fields(body(&frame)).1,
                ))
            }
            READY_FOR_QUERY => break,
            _ => {}
        }
    }
    server.prepared.clear();
    server.applied.clear();
    server.applied_tag = 0;
    Ok(())
}
