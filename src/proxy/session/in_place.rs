//! The hot path's shortcut: messages the proxy passes on unchanged are copied from one
//! connection's read buffer into the other's write buffer, without being split off as a
//! [`Bytes`] first. Splitting takes a reference on the read buffer's allocation and the
//! frame's drop gives it back (two atomic operations and some 100 instructions a message,
//! measured with callgrind); an extended-protocol query is five client messages and three
//! server frames. Anything the session must look at more closely takes the ordinary path
//! ([`Session::translate`], [`Session::on_server_frame`]), which these functions mirror for
//! the cases they take.

use super::*;
use crate::proxy::protocol::codec::{buffered, has_room};

impl Session {
    /// The next message in the client's read buffer, if it is one a transaction under way
    /// passes on as it is (a Bind of the unnamed statement into the unnamed portal, a Describe
    /// of a portal, an Execute, a Sync), noted as [`Session::translate`] would note it and
    /// queued for the server. False, and nothing consumed, for anything else.
    pub(super) fn forward_in_place(&mut self) -> bool {
        if !self.in_transaction()
            || !self.registry.awaited.is_empty()
            || self.unnamed_unsettled_before()
            // A captured read's messages are counted ([`Session::shadow_client_frame`]).
            || self.shadowing.capture.is_some()
        {
            return false;
        }
        let Some(server) = self.server.as_mut() else {
            return false;
        };
        let buffer = self.client_r.read_buffer();
        if !buffer
            .first()
            .is_some_and(|&kind| matches!(kind, SYNC | EXECUTE | DESCRIBE | BIND))
        {
            return false;
        }
        let Some(len) = buffered(buffer, false) else {
            return false;
        };
        if !has_room(&server.writer) {
            return false;
        }
        let message = &buffer[..len];
        let open = self.replies.open_group();
        match message[0] {
            SYNC => {
                self.unsynced = 0;
                if self.replies.sync_sent() {
                    metrics::add(&self.shared.shards[self.shard].metrics.queries, 1);
                }
            }
            EXECUTE if self.settings.portals.is_empty() => {
                self.unsynced += 1;
                self.replies.execute_sent();
            }
            DESCRIBE if message.get(5) == Some(&PORTAL) => self.unsynced += 1,
            // Bind "" "": as [`Session::bind`] and [`Session::with_unnamed`] leave it when the
            // connection has the client's unnamed statement and nothing is tracked of portals.
            BIND if message.get(5..7) == Some(&[0, 0][..])
                && !self.unnamed.sets
                && self.settings.portals.is_empty()
                && self.unnamed.here
                && self.unnamed.replayed.is_none_or(|(group, _)| group >= open) =>
            {
                self.unsynced += 1;
            }
            _ => return false,
        }
        metrics::add(
            &self.shared.shards[self.shard].metrics.bytes_from_clients,
            len as u64,
        );
        try_queue(&mut server.writer, message);
        self.client_r.read_buffer_mut().advance(len);
        true
    }

    /// The next frame in the server's read buffer, if it is a run of answers the proxy only
    /// passes on (rows and completions, batched by the codec) while nothing is tracked of
    /// them (no setting change or transaction control awaits its completion): queued for
    /// the client as [`Session::on_server_frame`] would. `Some(more)` when taken, `more`
    /// saying whether the read buffer holds more (otherwise the caller flushes); `None`,
    /// and nothing consumed, for anything else.
    pub(super) fn pass_answers_in_place(&mut self) -> Option<bool> {
        if !self.settings.pending.is_empty()
            || self.caching.fill.is_some()
            || self.shadowing.capture.is_some()
            || self.settings.controls_sent.0 == self.replies.answering()
        {
            return None;
        }
        let server = self.server.as_mut()?;
        let batch = server.reader.decoder().batching();
        let buffer = server.reader.read_buffer();
        if !buffer.first().is_some_and(|&kind| passes_through(kind)) || !has_room(&self.client_w) {
            return None;
        }
        let len = buffered(buffer, batch)?;
        try_queue(&mut self.client_w, &buffer[..len]);
        let more = buffer.len() > len;
        server.reader.read_buffer_mut().advance(len);
        metrics::add(
            &self.shared.shards[self.shard].metrics.bytes_to_clients,
            len as u64,
        );
        Some(more)
    }

    /// A ReadyForQuery next in the server's read buffer: its sync group settled
    /// ([`Session::ready_received`]) and the message queued for the client, as
    /// [`Session::on_server_frame`] does. True when taken; the caller flushes, and gives the
    /// connection back if the transaction is over.
    pub(super) fn ready_in_place(&mut self) -> bool {
        let Some(server) = self.server.as_mut() else {
            return false;
        };
        let buffer = server.reader.read_buffer();
        if buffer.first() != Some(&READY_FOR_QUERY)
            || !has_room(&self.client_w)
            || self.caching.fill.is_some()
            || self.shadowing.capture.is_some()
        {
            return false;
        }
        // ReadyForQuery is six bytes: its tag, its length (5) and the status.
        let Some(6) = buffered(buffer, false) else {
            return false;
        };
        let status = buffer[5];
        try_queue(&mut self.client_w, &buffer[..6]);
        server.reader.read_buffer_mut().advance(6);
        metrics::add(&self.shared.shards[self.shard].metrics.bytes_to_clients, 6);
        self.ready_received(status);
        true
    }
}
