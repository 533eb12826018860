//! One client's life: startup and authentication, then forwarding between the client and a
//! server connection — held for the whole session in session mode, and only while a
//! transaction runs in transaction mode.

mod answers;
mod caching;
mod cancel;
mod connection;
mod in_place;
mod login;
mod prepared;
mod registry;
mod routing;
mod shadowing;
#[cfg(test)]
mod tests;
mod tracking;
mod unnamed;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use smallvec::smallvec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::auth::scram::{ScramError, ScramServer};
use super::inspect::{self, starts_with_keyword, Deallocate};
use super::metrics;
use super::pool::{Pooled, ServerConn};
use super::protocol::codec::{
    passes_through, queue, rewind, split_buffered, try_queue, CodecError,
};
use super::protocol::startup::{self, cstr, Startup};
use super::protocol::tags::*;
use super::protocol::{backend, body, frontend, tag, Frame, PgCodec};
use super::replies::Replies;
use super::settings::{self, SettingChange};
use super::statements::Book;
use super::tls::{self, ReadHalf, WriteHalf};
use super::{CancelTarget, Shared};
use crate::pg::{sql, Side};
use crate::plan::PoolMode;
use cancel::{forward_cancel, give_back_after_cancel};
use login::LoggedIn;
pub use login::{refuse, run};
use registry::{statement_name, Awaited, Effects, GroupPrepared, Placeholder, Prepared, Registry};
use tracking::remember_parameter;
use tracking::{ClientSettings, SettingPortal};
use unnamed::{Unnamed, UnnamedParse};

type ClientReader = FramedRead<ReadHalf, PgCodec>;
type ClientWriter = FramedWrite<WriteHalf, PgCodec>;

/// An error and its SQLSTATE. Sent to the client as FATAL when it ends the session; as an
/// ERROR when only a sync group fails for want of a server connection
/// ([`Session::fail_until_sync`]).
struct Fatal {
    /// Most are the proxy's own; a login the server refused keeps the server's.
    code: Cow<'static, str>,
    message: String,
}

impl Fatal {
    fn new(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Fatal {
        Fatal {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// What one client message becomes on the server: itself, rewritten, or with a Close and a
/// Parse before it; inline, so the hot path allocates nothing for it.
type Frames = smallvec::SmallVec<[Bytes; 3]>;

/// LISTEN in transaction mode: raised by the server, so that a transaction around it fails
/// as it should.
const REFUSE_LISTEN: &str = "DO $switchyard$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', \
     MESSAGE = 'LISTEN is not supported in transaction pooling mode', \
     HINT = 'use a connection through a session-mode proxy for LISTEN'; END $switchyard$";

const REFUSE_MULTI_DEALLOCATE: &str =
    "DO $switchyard$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', \
     MESSAGE = 'DEALLOCATE must be sent alone through switchyard', \
     HINT = 'send DEALLOCATE as a query of its own'; END $switchyard$";

/// What a client hears when its server connection broke under its transaction.
const LOST: &str = "the server connection was lost; the transaction was rolled back";

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SQLSTATE of a statement stopped by a cancel.
const QUERY_CANCELED: &str = "57014";

struct Session {
    shared: Arc<Shared>,
    /// The worker serving this session: its pools and counters are the session's.
    shard: usize,
    user: Arc<str>,
    /// The user's pools (source, target), looked up once; the backend picks one per checkout.
    pools: [super::pool::Pool; 2],
    key: (i32, i32),
    /// Where this session's CancelRequests go: updated at every attach and release.
    cancel_slot: super::CancelSlot,
    client_r: ClientReader,
    client_w: ClientWriter,
    server: Option<Pooled>,
    /// The client's named statements, and what the server did with their Parses and Closes.
    registry: Registry,
    /// A client message that must wait for the answers to Parses or Closes of earlier
    /// groups (it names a statement one of them concerns); the client is not read meanwhile.
    parked: Option<Bytes>,
    /// The client's settings, and the changes not yet settled by their transaction's end.
    settings: ClientSettings,
    /// What the server still owes on the attached connection (ReadyForQuery messages, the
    /// answers to the proxy's own Parses and Closes, Syncs a copy makes it ignore).
    replies: Replies,
    /// The server connection died while the client sat in a transaction: its next message
    /// gets the error.
    lost_transaction: Option<Fatal>,
    /// The server connection holds session state the proxy cannot track (an unrecognised SET,
    /// SET ROLE): it is closed instead of going back to the pool.
    dirty: bool,
    /// The group being answered had an error.
    group_failed: bool,
    /// Client messages forwarded since the last Sync or Query.
    unsynced: u32,
    /// The client's unnamed statement.
    unnamed: Unnamed,
    /// The last transaction status the server reported.
    status: u8,
    /// When the server connection was taken, for the latency histogram.
    attached_at: std::time::Instant,
    /// This transaction's turn while the proxy is throttled.
    throttle_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// A transaction may be running: the session counts as active for `/pause`.
    in_turn: bool,
    /// The side the server connection is on.
    server_side: crate::pg::Side,
    /// The read cache's part: a miss being collected, the session's last write's position.
    caching: caching::Caching,
    /// Shadow reads' part: a read whose answer is being captured for its replay.
    shadowing: shadowing::Shadowing,
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        shard: usize,
        pools: [super::pool::Pool; 2],
        reader: ClientReader,
        writer: ClientWriter,
        logged_in: LoggedIn,
        (key, cancel_slot): ((i32, i32), super::CancelSlot),
    ) -> Session {
        let wanted = logged_in.settings;
        let book = shared
            .users
            .get(&logged_in.user)
            .map(|user| user.statements.clone())
            .unwrap_or_default();
        Session {
            pools,
            caching: caching::Caching {
                on: shared.cache.is_some(),
                ..Default::default()
            },
            shadowing: shadowing::Shadowing {
                on: shared.shadow.is_some(),
                ..Default::default()
            },
            shared,
            shard,
            user: Arc::from(logged_in.user.as_str()),
            key,
            cancel_slot,
            client_r: reader,
            client_w: writer,
            server: None,
            registry: Registry::new(book),
            parked: None,
            settings: ClientSettings::new(wanted),
            replies: Replies::default(),
            unnamed: Unnamed::default(),
            lost_transaction: None,
            group_failed: false,
            unsynced: 0,
            dirty: false,
            status: IDLE,
            attached_at: std::time::Instant::now(),
            throttle_permit: None,
            in_turn: false,
            server_side: crate::pg::Side::Source,
        }
    }

    fn metrics(&self) -> &metrics::Metrics {
        &self.shared.shards[self.shard].metrics
    }

    fn mode(&self) -> PoolMode {
        self.shared.pool_mode()
    }

    /// Forwards until the client leaves or a connection breaks.
    async fn serve(&mut self) {
        loop {
            if let Some(frame) = self.parked.take() {
                if self.server.is_some() && self.must_wait(&frame) {
                    self.parked = Some(frame);
                } else {
                    if !self.on_client_frames(frame).await {
                        return;
                    }
                    continue;
                }
            }
            let event = {
                let server = &mut self.server;
                let client = &mut self.client_r;
                let reading = self.parked.is_none();
                tokio::select! {
                    biased;
                    frame = next_server_frame(server), if server.is_some() => Event::Server(frame),
                    frame = client.next(), if reading => Event::Client(frame),
                }
            };
            let carry_on = match event {
                Event::Server(Some(Ok(frame))) => self.on_server_frames(frame).await,
                Event::Server(_) => self.server_lost().await,
                Event::Client(Some(Ok(Frame::Message(frame)))) => {
                    self.on_client_frames(frame).await
                }
                Event::Client(Some(Err(CodecError::BadLength(len)))) => {
                    metrics::add(&self.metrics().protocol_errors, 1);
                    let _ = self
                        .client_w
                        .send(backend::error_response(
                            "FATAL",
                            "08P01",
                            &format!("invalid message length {len}"),
                        ))
                        .await;
                    false
                }
                Event::Client(_) => false,
            };
            if !carry_on {
                return;
            }
        }
    }

    /// A client message, then the others the same read brought (a pipeline, or Parse, Bind,
    /// Execute and Sync in one packet), handled without a trip through the select loop.
    ///
    /// Mid-transaction, a message needs no more than [`Session::translate`] and a place in the
    /// server writer's buffer, without a future of its own (the extended protocol sends five
    /// per query); [`Session::before_forwarding`] is awaited only for the others. What is
    /// queued goes out in one write, once the client has nothing more buffered.
    async fn on_client_frames(&mut self, mut frame: Bytes) -> bool {
        loop {
            if (!self.registry.awaited.is_empty()
                || self.unnamed_unsettled_before()
                || tag(&frame) == TERMINATE)
                && self.must_wait(&frame)
            {
                // It and what follows wait for the server's answers ([`Session::serve`]).
                self.parked = Some(frame);
                break;
            }
            metrics::add(&self.metrics().bytes_from_clients, frame.len() as u64);
            let forward = if self.in_transaction() && tag(&frame) != TERMINATE {
                // More in the turn than a cacheable read: it may write.
                if self.caching.on {
                    self.note_forwarded(&frame);
                }
                if self.shadowing.capture.is_some() {
                    self.shadow_client_frame(&frame);
                }
                Some(frame)
            } else {
                match self.before_forwarding(frame).await {
                    Next::Forward(frame) => Some(frame),
                    Next::Handled => None,
                    Next::End => return false,
                }
            };
            if let Some(frame) = forward {
                if let Err(rest) = self.queue_for_server(frame) {
                    if !self.queue_after_flush(rest).await {
                        return false;
                    }
                }
            }
            while self.forward_in_place() {}
            match split_buffered(self.client_r.read_buffer_mut(), false) {
                Some(next) => frame = next,
                None => break,
            }
        }
        rewind(self.client_r.read_buffer_mut());
        let Some(server) = self.server.as_mut() else {
            return true;
        };
        let more_to_read = !self.client_r.read_buffer().is_empty() && self.parked.is_none();
        if server.writer.write_buffer().is_empty() || more_to_read {
            return true;
        }
        server.writer.flush().await.is_ok() || self.server_lost().await
    }

    /// Puts what a client message becomes ([`Session::translate`]) in the server writer's buffer.
    /// What does not fit (the buffer is full) is given back, for [`Session::queue_after_flush`].
    fn queue_for_server(&mut self, frame: Bytes) -> Result<(), Frames> {
        let frames = self.translate(frame);
        let Some(server) = self.server.as_mut() else {
            // Not reached (a message is forwarded only with a server connection attached);
            // if it were, queue_after_flush ends the session rather than lose the message.
            return Err(frames);
        };
        match frames
            .iter()
            .position(|f| !try_queue(&mut server.writer, f))
        {
            None => Ok(()),
            Some(queued) => Err(frames.into_iter().skip(queued).collect()),
        }
    }

    /// The frames a full buffer left out, after a flush makes room.
    async fn queue_after_flush(&mut self, frames: Frames) -> bool {
        let Some(server) = self.server.as_mut() else {
            return false;
        };
        for frame in frames {
            if queue(&mut server.writer, &frame).await.is_err() {
                return self.server_lost().await;
            }
        }
        true
    }

    /// The same for server messages, as long as the same server connection is attached.
    async fn on_server_frames(&mut self, mut frame: Bytes) -> bool {
        loop {
            if !self.on_server_frame(frame).await {
                return false;
            }
            loop {
                if let Some(more) = self.pass_answers_in_place() {
                    if more {
                        continue;
                    }
                } else if self.ready_in_place() {
                    if self.client_w.flush().await.is_err() {
                        return false;
                    }
                    if self.replies.owed() == 0 && self.unsynced == 0 && self.status == IDLE {
                        if self.caching.may_write
                            && self.in_turn
                            && !Box::pin(self.note_own_write()).await
                        {
                            return false;
                        }
                        self.transaction_done();
                    }
                    continue;
                } else {
                    break;
                }
                if self.client_w.flush().await.is_err() {
                    return false;
                }
                break;
            }
            let Some(server) = self.server.as_mut() else {
                return true;
            };
            let batch = server.reader.decoder().batching();
            match split_buffered(server.reader.read_buffer_mut(), batch) {
                Some(next) => frame = next,
                None => {
                    rewind(server.reader.read_buffer_mut());
                    return true;
                }
            }
        }
    }

    /// What a client message needs before it can go to a server: a server connection (or
    /// none, for what the proxy answers itself), a turn in session mode, or an error.
    async fn before_forwarding(&mut self, frame: Bytes) -> Next {
        // Terminate ends the session; the server connection is the pool's, never told.
        if tag(&frame) == TERMINATE {
            return Next::End;
        }
        if let Some(lost) = self.lost_transaction.take() {
            return Next::after(self.fail_until_sync(&frame, &lost).await);
        }
        if self.caching.on {
            // A new turn: anything but a cacheable read may write.
            self.caching.may_write = true;
            self.note_temporary(&frame);
            // Boxed, here and where the commit position is asked: the cache's futures are
            // large, and without the box they would enlarge this future (initialised on every
            // transaction) whether the cache is on or not.
            let served = match tag(&frame) {
                QUERY => Box::pin(self.serve_from_cache(&frame)).await,
                PARSE if body(&frame).first() == Some(&0) => {
                    Box::pin(self.serve_group_from_cache(&frame)).await
                }
                _ => caching::Served::Forward,
            };
            match served {
                caching::Served::Answered => return Next::Handled,
                caching::Served::Closed => return Next::End,
                caching::Served::Forward => {}
            }
        }
        if self.server.is_none() {
            match tag(&frame) {
                // A named Parse: PostgreSQL checks it at once, so it goes to a server when one
                // is free now. With every connection busy it is remembered and prepared on
                // whichever connection first runs it (checked then): a client that prepares
                // synchronously while its other sessions hold every server connection, as
                // pgbench does, would otherwise wait for ever.
                PARSE if body(&frame).first() != Some(&0) && !self.server_free_now() => {
                    // Without a server the proxy answers a duplicate itself, where PostgreSQL
                    // would first have reported an error in the statement, if any.
                    if let Some(error) = self.duplicate_parse(&frame) {
                        return Next::after(self.fail_until_sync(&frame, &error).await);
                    }
                    if self.remember_parse(&frame) {
                        return Next::Handled;
                    }
                }
                // Nothing else pending: answer a Sync or Flush ourselves.
                SYNC => {
                    return Next::after(
                        self.answer_locally(Some(backend::ready_for_query(IDLE)))
                            .await,
                    )
                }
                FLUSH => return Next::after(self.answer_locally(None).await),
                _ => {}
            }
            if self.shared.is_shutting_down() {
                let bye = backend::error_response(
                    "FATAL",
                    "57P01",
                    "terminating connection: the proxy is shutting down",
                );
                let _ = self.client_w.send(bye).await;
                return Next::End;
            }
            if let Err(error) = self.attach(true).await {
                return Next::after(self.fail_until_sync(&frame, &error).await);
            }
            self.close_dead_statements();
            if !self.answer_locally(None).await {
                return Next::End;
            }
        } else if !self.in_turn {
            // Session mode, between transactions.
            self.begin_turn().await;
            if let Err(error) = self.follow_switch().await {
                return Next::after(self.fail_until_sync(&frame, &error).await);
            }
            self.show_running();
        }
        if self.shadowing.on {
            self.maybe_shadow(&frame);
        }
        Next::Forward(frame)
    }

    /// A Terminate after a query still running: PostgreSQL reads it only once the query is
    /// answered, so the client gets its answer and then the end of the connection. The
    /// proxy waits the same way (but not in copy-in, where the server waits for the client).
    fn terminate_waits(&self) -> bool {
        self.server.is_some() && self.replies.owed() > 0 && !self.replies.copy_in()
    }

    /// A server connection is attached and the session is in its turn: a client message goes
    /// straight to the server.
    fn in_transaction(&self) -> bool {
        self.server.is_some() && self.in_turn && self.lost_transaction.is_none()
    }

    /// Notes what a client message does to the session's state, and gives what goes to the
    /// server in its place (itself, renamed, or with what must come first).
    fn translate(&mut self, frame: Bytes) -> Frames {
        let kind = tag(&frame);
        // Messages of a sync group not yet closed by its Sync: the connection must stay.
        self.unsynced = match kind {
            SYNC | QUERY | FUNCTION_CALL => 0,
            FLUSH | COPY_DATA | COPY_DONE | COPY_FAIL => self.unsynced,
            _ => self.unsynced + 1,
        };
        match kind {
            QUERY => {
                metrics::add(&self.metrics().queries, 1);
                let frames = self.query(frame);
                self.replies.query_sent();
                // A simple Query destroys the unnamed statement, here and on the server.
                self.forget_unnamed();
                frames
            }
            // PostgreSQL ignores a Sync that arrives in copy-in mode: it gets no ReadyForQuery.
            SYNC | FUNCTION_CALL => {
                if self.replies.sync_sent() {
                    metrics::add(&self.metrics().queries, 1);
                }
                smallvec![frame]
            }
            EXECUTE => {
                self.replies.execute_sent();
                if !self.settings.portals.is_empty() {
                    self.execute_effects(&frame);
                }
                smallvec![frame]
            }
            COPY_DONE | COPY_FAIL => {
                self.replies.copy_end_sent();
                smallvec![frame]
            }
            PARSE => self.parse(frame),
            BIND => self.bind(frame),
            DESCRIBE | CLOSE => self.describe_or_close(frame),
            _ => smallvec![frame],
        }
    }

    /// Answers a message that found no server connection: its whole sync group fails with one
    /// error, as PostgreSQL fails a pipeline.
    ///
    /// As in PostgreSQL, the error goes out at once (a client that sent Flush waits for it),
    /// and in the extended protocol everything until the next Sync is skipped, a Query or
    /// FunctionCall too.
    async fn fail_until_sync(&mut self, first: &Bytes, error: &Fatal) -> bool {
        // Parses remembered before the failure were answered as accepted; their
        // ParseCompletes come first, as they would have.
        if !self.answer_locally(None).await {
            return false;
        }
        let error = backend::error_response("ERROR", &error.code, &error.message);
        if self.client_w.send(error).await.is_err() {
            return false;
        }
        let mut frame = first.clone();
        if !matches!(tag(&frame), QUERY | FUNCTION_CALL) {
            while tag(&frame) != SYNC {
                match self.client_r.next().await {
                    Some(Ok(Frame::Message(next))) if tag(&next) == TERMINATE => return false,
                    Some(Ok(Frame::Message(next))) => frame = next,
                    _ => return false,
                }
            }
        }
        self.client_w
            .send(backend::ready_for_query(IDLE))
            .await
            .is_ok()
    }
}

/// What becomes of a client message after [`Session::before_forwarding`].
enum Next {
    /// It goes to the server connection now attached.
    Forward(Bytes),
    /// The proxy answered it (or failed its sync group), and the session goes on.
    Handled,
    /// The session ends.
    End,
}

impl Next {
    /// `Handled` if the session goes on, `End` if not.
    fn after(carry_on: bool) -> Next {
        if carry_on {
            Next::Handled
        } else {
            Next::End
        }
    }
}

enum Event {
    Server(Option<Result<Bytes, super::pool::ServerError>>),
    Client(Option<Result<Frame, CodecError>>),
}

async fn next_server_frame(
    server: &mut Option<Pooled>,
) -> Option<Result<Bytes, super::pool::ServerError>> {
    match server {
        Some(server) => Some(server.recv().await),
        None => std::future::pending().await,
    }
}
