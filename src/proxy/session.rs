//! One client's life: startup and authentication, then forwarding between the client and a
//! server connection — held for the whole session in session mode, and only while a
//! transaction runs in transaction mode.

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
use super::protocol::{backend, body, frontend, tag, Frame, PgCodec};
use super::replies::Replies;
use super::settings::{self, SettingChange};
use super::statements::Book;
use super::tls::{self, ReadHalf, WriteHalf};
use super::{CancelTarget, Shared};
use crate::pg::{sql, Side};
use crate::plan::PoolMode;

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

/// Says no to a client before its session starts (too many clients).
pub async fn refuse(stream: TcpStream, code: &'static str, message: &'static str) {
    let (_read, write) = tls::split_plain(stream);
    let mut writer = FramedWrite::new(write, PgCodec::typed());
    let _ = writer
        .send(backend::error_response("FATAL", code, message))
        .await;
}

/// How the connection goes on after its first packet.
enum Negotiated {
    /// In plain text; the bytes read so far belong to the startup packet.
    Plain(Vec<u8>),
    /// The client asked for TLS and the proxy said yes.
    Tls,
}

/// Answers SSLRequest and GSSENCRequest before anything is framed: TLS, when configured,
/// wraps the raw socket.
async fn negotiate(shared: &Shared, stream: &mut TcpStream) -> std::io::Result<Negotiated> {
    loop {
        let length = stream.read_u32().await?;
        if length != 8 {
            // Not an encryption request; the codec judges the length.
            return Ok(Negotiated::Plain(length.to_be_bytes().to_vec()));
        }
        let code = stream.read_u32().await?;
        match code {
            startup::SSL_REQUEST if shared.tls.is_some() => {
                stream.write_all(b"S").await?;
                return Ok(Negotiated::Tls);
            }
            startup::SSL_REQUEST | startup::GSSENC_REQUEST => stream.write_all(b"N").await?,
            _ => {
                let mut prefix = length.to_be_bytes().to_vec();
                prefix.extend_from_slice(&code.to_be_bytes());
                return Ok(Negotiated::Plain(prefix));
            }
        }
    }
}

/// Serves one client on shard `shard` (whose pools it uses) until it leaves.
pub async fn run(shared: Arc<Shared>, shard: usize, mut stream: TcpStream) {
    let deadline = tokio::time::Instant::now() + shared.settings.client_login_timeout.0;
    let timed_out =
        || backend::error_response("FATAL", "08P01", "canceling authentication due to timeout");
    let (read, write, prefix) =
        match tokio::time::timeout_at(deadline, negotiate(&shared, &mut stream)).await {
            Ok(Ok(Negotiated::Plain(prefix))) => {
                let (read, write) = tls::split_plain(stream);
                (read, write, prefix)
            }
            Ok(Ok(Negotiated::Tls)) => {
                let Some(acceptor) = shared.tls.clone() else {
                    return;
                };
                match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                    Ok(Ok(encrypted)) => {
                        let (read, write) = tls::split(encrypted);
                        (read, write, Vec::new())
                    }
                    _ => return,
                }
            }
            Ok(Err(_)) => return,
            Err(_) => {
                let _ = stream.write_all(&timed_out()).await;
                return;
            }
        };
    let mut reader = FramedRead::new(read, PgCodec::startup());
    reader.read_buffer_mut().extend_from_slice(&prefix);
    let mut writer = FramedWrite::new(write, PgCodec::typed());
    let login = tokio::time::timeout_at(deadline, login(&shared, &mut reader, &mut writer)).await;
    let logged_in = match login {
        Ok(Ok(Some(logged_in))) => logged_in,
        Ok(Ok(None)) => return,
        Ok(Err(fatal)) => {
            tracing::debug!(code = %fatal.code, "login refused: {}", fatal.message);
            metrics::add(&shared.shards[shard].metrics.logins_refused, 1);
            let _ = writer
                .send(backend::error_response(
                    "FATAL",
                    &fatal.code,
                    &fatal.message,
                ))
                .await;
            return;
        }
        Err(_) => {
            let _ = writer.send(timed_out()).await;
            return;
        }
    };
    // Every user who can log in has pools on every shard.
    let Some(pools) = shared.shards[shard].pools.get(&logged_in.user).cloned() else {
        return;
    };
    let key = (rand::random::<i32>() & 0x7fff_ffff, rand::random::<i32>());
    let cancel_slot = super::CancelSlot::default();
    lock(&shared.cancels).insert(key, cancel_slot.clone());
    let mut session = Session::new(
        shared.clone(),
        shard,
        pools,
        reader,
        writer,
        logged_in,
        (key, cancel_slot),
    );
    if let Err(fatal) = session.welcome().await {
        let _ = session
            .client_w
            .send(backend::error_response(
                "FATAL",
                &fatal.code,
                &fatal.message,
            ))
            .await;
    } else {
        session.serve().await;
    }
    session.release(true).await;
    session.forget_statements();
    lock(&shared.cancels).remove(&key);
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct LoggedIn {
    user: String,
    /// The settings the startup packet asks for (name → value as SQL).
    settings: BTreeMap<String, String>,
}

async fn next_startup(reader: &mut ClientReader) -> Result<Option<Bytes>, Fatal> {
    match reader.next().await {
        Some(Ok(Frame::Startup(packet))) => Ok(Some(packet)),
        Some(Ok(Frame::Message(_))) => Err(Fatal::new("08P01", "expected a startup packet")),
        Some(Err(CodecError::BadLength(_))) => {
            Err(Fatal::new("08P01", "invalid length of startup packet"))
        }
        Some(Err(CodecError::Io(_))) | None => Ok(None),
    }
}

async fn next_message(reader: &mut ClientReader, expected: u8) -> Result<Option<Bytes>, Fatal> {
    match reader.next().await {
        Some(Ok(Frame::Message(frame))) if tag(&frame) == expected => Ok(Some(frame)),
        Some(Ok(_)) => Err(Fatal::new(
            "08P01",
            format!("expected message type {:?}", expected as char),
        )),
        Some(Err(CodecError::BadLength(len))) => {
            Err(Fatal::new("08P01", format!("invalid message length {len}")))
        }
        Some(Err(CodecError::Io(_))) | None => Ok(None),
    }
}

async fn login(
    shared: &Shared,
    reader: &mut ClientReader,
    writer: &mut ClientWriter,
) -> Result<Option<LoggedIn>, Fatal> {
    let params = loop {
        let Some(packet) = next_startup(reader).await? else {
            return Ok(None);
        };
        match startup::parse(&packet) {
            Startup::Ssl | Startup::GssEnc => {
                if writer.send(backend::refuse_encryption()).await.is_err() {
                    return Ok(None);
                }
            }
            Startup::Cancel {
                process_id,
                secret_key,
            } => {
                forward_cancel(shared, process_id, secret_key).await;
                return Ok(None);
            }
            Startup::Unsupported(message) => return Err(Fatal::new("0A000", message)),
            Startup::Start { params } => break params,
        }
    };
    reader.decoder_mut().set_typed();
    let user = Startup::param(&params, "user")
        .ok_or_else(|| {
            Fatal::new(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            )
        })?
        .to_string();
    if Startup::param(&params, "replication")
        .is_some_and(|r| r != "false" && r != "0" && r != "off")
    {
        return Err(Fatal::new(
            "08P01",
            "replication connections are not supported through the switchyard proxy",
        ));
    }
    // As PostgreSQL does: an unknown role goes through a mock exchange and fails like a
    // wrong password, and the database is checked after the login, so that nobody learns
    // which roles or databases exist without a password.
    let account = shared.users.get(&user);
    let verifier = account.map_or_else(|| shared.mock_verifier.clone(), |a| a.verifier.clone());

    if writer
        .send(backend::authentication_sasl(&["SCRAM-SHA-256"]))
        .await
        .is_err()
    {
        return Ok(None);
    }
    let Some(initial) = next_message(reader, b'p').await? else {
        return Ok(None);
    };
    let mut b = body(&initial);
    let mechanism =
        cstr(&mut b).ok_or_else(|| Fatal::new("08P01", "malformed SASLInitialResponse"))?;
    if mechanism != "SCRAM-SHA-256" || b.len() < 4 {
        return Err(Fatal::new(
            "08P01",
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    b.advance(4);
    let wrong_password = || {
        Fatal::new(
            "28P01",
            format!("password authentication failed for user \"{user}\""),
        )
    };
    let scram_error = |e: ScramError| match e {
        ScramError::WrongPassword => wrong_password(),
        other => Fatal::new("08P01", other.to_string()),
    };
    let (exchange, server_first) = ScramServer::start(&verifier, b).map_err(scram_error)?;
    if writer
        .send(backend::authentication_sasl_continue(
            server_first.as_bytes(),
        ))
        .await
        .is_err()
    {
        return Ok(None);
    }
    let Some(response) = next_message(reader, b'p').await? else {
        return Ok(None);
    };
    let server_final = exchange.finish(body(&response)).map_err(scram_error)?;
    if account.is_none() {
        return Err(wrong_password());
    }
    let database = Startup::param(&params, "database").unwrap_or(&user);
    if database != shared.database {
        return Err(Fatal::new(
            "3D000",
            format!("database \"{database}\" does not exist"),
        ));
    }
    let settings = settings::startup_settings(&params).map_err(|e| Fatal::new("0A000", e))?;
    if writer
        .feed(backend::authentication_sasl_final(server_final.as_bytes()))
        .await
        .is_err()
        || writer.send(backend::authentication_ok()).await.is_err()
    {
        return Ok(None);
    }
    Ok(Some(LoggedIn { user, settings }))
}

/// Passes a CancelRequest to the server connection running that client's query, if any,
/// and returns once PostgreSQL has acted on it (or gave up), as PostgreSQL's own cancel
/// connection does: a client whose cancel call returned before that (libpq waits for the
/// server to close it) could send its next statement first and have that cancelled, which
/// psycopg's stream() did in session mode. The delivery runs on its own task: the client's
/// login deadline, which drops this wait, must not cut it short.
async fn forward_cancel(shared: &Shared, process_id: i32, secret_key: i32) {
    let slot = lock(&shared.cancels)
        .get(&(process_id, secret_key))
        .cloned();
    if let Some(target) = slot.and_then(|slot| slot.cancel()) {
        let _ = tokio::spawn(deliver_cancel(target)).await;
    }
}

/// Sends a cancel to PostgreSQL and waits until it has acted on it; only then does the
/// server connection stop counting it as on its way ([`super::Cancel::cancel`] counted it). A
/// cancel that may have reached PostgreSQL without a confirmation (an error after it was
/// sent, no answer within [`CANCEL_DELIVERY`]) stays counted: that connection is closed
/// when released, never reused.
async fn deliver_cancel(target: super::CancelTarget) {
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(
        target.process_id,
        target.secret_key,
        &mut buf,
    );
    let mut connected = false;
    let exchange = async {
        let mut stream = TcpStream::connect(target.addr).await?;
        connected = true;
        stream.write_all(&buf).await?;
        // PostgreSQL closes the connection once it has signalled the backend: from then on
        // the cancel can only hit what that backend runs now.
        let mut rest = [0u8; 64];
        while stream.read(&mut rest).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let outcome = tokio::time::timeout(CANCEL_DELIVERY, exchange).await;
    let delivered = match outcome {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!("cannot forward a cancel request: {e}");
            // Never connected: the cancel cannot arrive later.
            !connected
        }
        Err(_) => {
            tracing::warn!("a forwarded cancel request got no answer within {CANCEL_DELIVERY:?}");
            false
        }
    };
    if delivered {
        target
            .cancels_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Gives a server connection back to `pool` once no forwarded cancel is on its way to it
/// (PostgreSQL has signalled the backend, idle by then, which ignores it), polling: a cancel
/// takes PostgreSQL about a millisecond. Closed if that takes longer than
/// [`CANCEL_SETTLE`], or for good when a cancel was never confirmed.
async fn give_back_after_cancel(pool: super::pool::Pool, mut server: Pooled) {
    let deadline = tokio::time::Instant::now() + CANCEL_SETTLE;
    while server
        .cancels_in_flight
        .load(std::sync::atomic::Ordering::SeqCst)
        > 0
    {
        if tokio::time::Instant::now() >= deadline {
            tracing::debug!("a cancel is still on its way to a server connection: closed");
            server.broken = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    pool.give_back(server);
}

/// How long a released server connection waits for a cancel on its way to it.
const CANCEL_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// SQLSTATE of a statement stopped by a cancel.
const QUERY_CANCELED: &str = "57014";

/// How long a forwarded cancel may take to be confirmed by PostgreSQL.
const CANCEL_DELIVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A named prepared statement as the client knows it.
struct Prepared {
    /// The name it has on server connections: derived from its text, so that clients that
    /// prepare the same statement share it.
    server_name: String,
    /// Its Parse message under that name, to prepare it on a server connection that lacks it.
    parse: Bytes,
    /// It changes the session's settings (a SET, RESET, DISCARD ALL) when it is executed.
    sets: bool,
}

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
    statements: HashMap<String, Prepared>,
    /// The user's count of which server statements its clients hold.
    book: Arc<Book>,
    /// The client's named Parses and Closes sent to the server and not yet answered: until
    /// their answers come, the proxy does not know whether the server ran them or skipped
    /// them after an error.
    awaited: Vec<Awaited>,
    /// Statements left on the attached connection under a client's own name by a duplicate
    /// Parse ([`Session::parse_duplicate`]): closed before a message that names one reaches
    /// the server, which would otherwise find it.
    placeholders: Vec<String>,
    /// A client message that must wait for those answers (it names a statement whose Parse
    /// or Close of an earlier sync group is awaited); the client is not read meanwhile.
    parked: Option<Bytes>,
    /// The client's settings, name → value as SQL.
    wanted: BTreeMap<String, String>,
    /// Setting changes sent whose transaction has not ended yet.
    pending_settings: settings::Pending,
    /// The group being answered rolled back (a ROLLBACK's CommandComplete), while setting
    /// changes were pending.
    rolled_back: bool,
    /// The last sync group with a statement that ends or opens a transaction.
    transaction_control: Option<u64>,
    /// What the server still owes on the attached connection (ReadyForQuery messages, the
    /// answers to the proxy's own Parses and Closes, Syncs a copy makes it ignore).
    replies: Replies,
    /// The server connection died while the client sat in a transaction: its next message
    /// gets the error.
    lost_transaction: Option<Fatal>,
    /// The server connection holds session state the proxy cannot track (an unrecognised SET,
    /// SET ROLE): it is closed instead of going back to the pool.
    dirty: bool,
    /// Statements the unanswered sync groups made the connection prepare, with their group:
    /// if that group fails, they may not exist, and a later group that uses one prepares it
    /// again rather than trust a Parse that may be skipped.
    group_prepared: Vec<(u64, String)>,
    /// Client messages forwarded since the last Sync or Query.
    unsynced: u32,
    /// The client's last unnamed Parse, and whether the current server connection has it.
    /// (Empty when there is none; kept, not reallocated, from one Parse to the next.)
    unnamed: Vec<u8>,
    unnamed_here: bool,
    /// The client's unnamed Parses sent and not yet settled, oldest first: until their
    /// group is answered it is not known which of them the server ran (an error makes it
    /// skip the rest of the group), and the client's unnamed statement is replayed on
    /// another connection only as the server left it.
    unnamed_sent: Vec<UnnamedParse>,
    /// The client's unnamed statement, and whether the connection had it, before the first
    /// of `unnamed_sent` (kept only when that one may be skipped: it has a marker).
    unnamed_before: Option<(Vec<u8>, bool)>,
    /// The unnamed statement changes settings when executed.
    unnamed_sets: bool,
    /// Portals bound in this transaction to a statement that changes settings, with its
    /// text: what it sets counts when the portal is executed, not when it is parsed.
    setting_portals: Vec<(String, String)>,
    /// ParseCompletes owed to the client for Parses remembered without a server.
    owed_parse_complete: u32,
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
            shared,
            shard,
            user: Arc::from(logged_in.user.as_str()),
            key,
            cancel_slot,
            client_r: reader,
            client_w: writer,
            server: None,
            statements: HashMap::new(),
            book,
            awaited: Vec::new(),
            parked: None,
            placeholders: Vec::new(),
            wanted,
            pending_settings: settings::Pending::default(),
            rolled_back: false,
            transaction_control: None,
            replies: Replies::default(),
            owed_parse_complete: 0,
            unnamed: Vec::new(),
            unnamed_here: false,
            unnamed_sent: Vec::new(),
            unnamed_before: None,
            unnamed_sets: false,
            setting_portals: Vec::new(),
            lost_transaction: None,
            group_prepared: Vec::new(),
            unsynced: 0,
            dirty: false,
            status: b'I',
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

    /// ParameterStatus, BackendKeyData and the first ReadyForQuery. Takes a server connection
    /// and applies the client's startup settings on it (a value the server refuses fails the
    /// login, as it would directly), to tell the client what its own session has: the
    /// server's defaults for the database and role, as a fresh connection reported them,
    /// and, for what the client set, the server's spelling of its values (`UTF8` where the
    /// client wrote `utf8`). The connection's current values are not the client's: another
    /// client's `SET client_encoding` was once reported to the next client of the same
    /// connection, which then decoded every string wrongly.
    async fn welcome(&mut self) -> Result<(), Fatal> {
        self.attach(true).await?;
        let mut reported: Vec<(String, String)> = match self.server.as_ref() {
            Some(server) => server
                .defaults
                .iter()
                .map(|(name, default)| {
                    let value = match server.params.get(name) {
                        Some(value) if self.wanted.contains_key(name) => value,
                        _ => default,
                    };
                    (name.clone(), value.clone())
                })
                .collect(),
            None => Vec::new(),
        };
        reported.sort();
        let mut frames = Vec::with_capacity(reported.len() + 3);
        for (name, value) in &reported {
            frames.push(backend::parameter_status(name, value));
        }
        frames.push(backend::backend_key_data(self.key.0, self.key.1));
        frames.push(backend::ready_for_query(b'I'));
        for frame in frames {
            self.client_w
                .feed(frame)
                .await
                .map_err(|e| Fatal::new("08006", e.to_string()))?;
        }
        self.client_w
            .flush()
            .await
            .map_err(|e| Fatal::new("08006", e.to_string()))?;
        match self.mode() {
            PoolMode::Transaction => self.release(false).await,
            PoolMode::Session => self.end_turn(),
        }
        Ok(())
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
    /// Mid-transaction, a message needs no more than [`Session::route`] and a place in the
    /// server writer's buffer, without a future of its own (the extended protocol sends five
    /// per query); [`Session::before_forwarding`] is awaited only for the others. What is
    /// queued goes out in one write, once the client has nothing more buffered.
    async fn on_client_frames(&mut self, mut frame: Bytes) -> bool {
        loop {
            if !self.awaited.is_empty() && self.must_wait(&frame) {
                // It and what follows wait for the server's answers ([`Session::serve`]).
                self.parked = Some(frame);
                break;
            }
            metrics::add(&self.metrics().bytes_from_clients, frame.len() as u64);
            let forward = if self.in_transaction() && tag(&frame) != b'X' {
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

    /// Puts what a client message becomes ([`Session::route`]) in the server writer's buffer.
    /// What does not fit (the buffer is full) is given back, for [`Session::queue_after_flush`].
    fn queue_for_server(&mut self, frame: Bytes) -> Result<(), Frames> {
        let frames = self.route(frame);
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
        if tag(&frame) == b'X' {
            return Next::End;
        }
        if let Some(lost) = self.lost_transaction.take() {
            return Next::after(self.fail_until_sync(&frame, &lost).await);
        }
        if self.server.is_none() {
            match tag(&frame) {
                // A named Parse: PostgreSQL checks it at once, so it goes to a server when one
                // is free now. With every connection busy it is remembered and prepared on
                // whichever connection first runs it (checked then): a client that prepares
                // synchronously while its other sessions hold every server connection, as
                // pgbench does, would otherwise wait for ever.
                b'P' if body(&frame).first() != Some(&0) && !self.server_free_now() => {
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
                b'S' => {
                    return Next::after(
                        self.answer_locally(Some(backend::ready_for_query(b'I')))
                            .await,
                    )
                }
                b'H' => return Next::after(self.answer_locally(None).await),
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
        Next::Forward(frame)
    }

    /// A server connection is attached and the session is in its turn: a client message goes
    /// straight to the server.
    fn in_transaction(&self) -> bool {
        self.server.is_some() && self.in_turn && self.lost_transaction.is_none()
    }

    /// Notes what a client message does to the session's state, and gives what goes to the
    /// server in its place (itself, renamed, or with what must come first).
    fn route(&mut self, frame: Bytes) -> Frames {
        let kind = tag(&frame);
        // Messages of a sync group not yet closed by its Sync: the connection must stay.
        self.unsynced = match kind {
            b'S' | b'Q' | b'F' => 0,
            b'H' | b'd' | b'c' | b'f' => self.unsynced,
            _ => self.unsynced + 1,
        };
        match kind {
            b'Q' => {
                metrics::add(&self.metrics().queries, 1);
                let frames = self.query(frame);
                self.replies.query_sent();
                // A simple Query destroys the unnamed statement, here and on the server.
                self.forget_unnamed();
                frames
            }
            // PostgreSQL ignores a Sync that arrives in copy-in mode: it gets no ReadyForQuery.
            b'S' | b'F' => {
                if self.replies.sync_sent() {
                    metrics::add(&self.metrics().queries, 1);
                }
                smallvec![frame]
            }
            b'E' => {
                self.replies.execute_sent();
                if !self.setting_portals.is_empty() {
                    self.execute_effects(&frame);
                }
                smallvec![frame]
            }
            b'c' | b'f' => {
                self.replies.copy_end_sent();
                smallvec![frame]
            }
            b'P' => self.parse(frame),
            b'B' => self.bind(frame),
            b'D' | b'C' => self.describe_or_close(frame),
            _ => smallvec![frame],
        }
    }

    async fn on_server_frame(&mut self, frame: Bytes) -> bool {
        let kind = tag(&frame);
        match kind {
            b'1' | b'3' => match self.replies.complete_received() {
                Err(at) => {
                    if let Some(parse) = self.unnamed_sent.iter_mut().find(|p| p.marker == Some(at))
                    {
                        parse.reached = true;
                    }
                    return true;
                }
                Ok(at) => match at {
                    at if self.unnamed_sent.iter().any(|p| p.at == at) => {
                        if let Some(parse) = self.unnamed_sent.iter_mut().find(|p| p.at == at) {
                            parse.ran = true;
                        }
                    }
                    at if !self.awaited.is_empty() => {
                        self.awaited.retain(|awaited| awaited.at != at);
                    }
                    _ => {}
                },
            },
            b'S' => self.note_parameter(&frame),
            // Copy-in began: the Syncs sent after the Execute that started it were (or will
            // be) ignored by the server.
            b'G' => self.replies.copy_in_received(),
            // The server is ending the connection (shutdown, pg_terminate_backend): that ends
            // this client's transaction, not its session.
            b'E' if backend::is_fatal(body(&frame)) => {
                let (code, message) = backend::error_fields(body(&frame));
                tracing::warn!(user = %self.user, code, "server connection ended: {message}");
                return self.server_lost_because(Fatal::new(code, message)).await;
            }
            b'Z' => {
                self.status = body(&frame).first().copied().unwrap_or(b'I');
                if !self.pending_settings.is_empty() {
                    self.settle_settings();
                }
                // That sync group is answered, whatever an error made the server skip.
                self.replies.ready_received();
                if self.status == b'I' {
                    self.setting_portals.clear();
                }
                if !self.unnamed_sent.is_empty() {
                    self.settle_unnamed(self.replies.answered());
                }
                if !self.awaited.is_empty() {
                    self.not_run(self.replies.answered());
                }
                if !self.group_prepared.is_empty() {
                    let answering = self.replies.answering();
                    self.group_prepared.retain(|(group, _)| *group >= answering);
                }
            }
            b'E' => {
                self.replies.error_received();
                // The transaction failed (or, outside a block, the statement and the rest of
                // its query or pipeline): its setting changes are undone.
                self.pending_settings.undo(self.replies.answering());
                if let Some(server) = self.server.as_mut() {
                    let answering = self.replies.answering();
                    for (_, name) in self.group_prepared.iter().filter(|(g, _)| *g <= answering) {
                        server.prepared.remove(name);
                    }
                }
            }
            // A ROLLBACK's CommandComplete, maybe in a run of rows and completions.
            _ if !self.pending_settings.is_empty()
                && passes_through(kind)
                && backend::command_tags(&frame).any(|tag| tag == b"ROLLBACK") =>
            {
                self.pending_settings.undo(self.replies.answering());
                self.rolled_back = true;
            }
            _ => {}
        }
        let ready = kind == b'Z';
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
        if ready && self.replies.owed() == 0 && self.unsynced == 0 && self.status == b'I' {
            self.transaction_done().await;
        }
        true
    }

    /// At a ReadyForQuery: outside a transaction block, the setting changes of the
    /// transaction that ended either lasted or were undone. A ROLLBACK that leaves a block
    /// open was `ROLLBACK TO SAVEPOINT`: which changes it undid is not known here, so they
    /// are not followed, and the connection, which may still hold some, is not reused.
    fn settle_settings(&mut self) {
        let group = self.replies.answering();
        if std::mem::take(&mut self.rolled_back) && self.status != b'I' {
            self.dirty = true;
        }
        if self.status == b'I' {
            self.settings_lasted(group);
        }
    }

    /// The client is between transactions: the server connection goes back to the pool in
    /// transaction mode, and stays in session mode (but the session no longer counts as
    /// active: a pause holds its next transaction).
    async fn transaction_done(&mut self) {
        if !self.in_turn {
            return;
        }
        let now = std::time::Instant::now();
        self.metrics()
            .transaction(now.saturating_duration_since(self.attached_at));
        match self.mode() {
            PoolMode::Transaction => self.release_at(false, now).await,
            PoolMode::Session => self.end_turn(),
        }
    }

    /// A ParameterStatus from the server in the client's transaction: the server connection's
    /// value changed, and, as the client caused it, it is now one of the client's settings.
    fn note_parameter(&mut self, frame: &Bytes) {
        let mut b = body(frame);
        let (Some(name), Some(value)) = (cstr(&mut b), cstr(&mut b)) else {
            return;
        };
        let name = name.to_ascii_lowercase();
        let passed_to_server = settings::passed_to_server(&name);
        if let Some(server) = self.server.as_mut() {
            server.params.insert(name.clone(), value.clone());
            if passed_to_server {
                server.applied.insert(name.clone(), sql::literal(&value));
            }
        }
        if passed_to_server {
            self.wanted.insert(name, sql::literal(&value));
        }
    }

    /// A simple query: SET and RESET are remembered; LISTEN is refused in transaction mode
    /// (a notification could arrive on a connection another client holds by then).
    fn query(&mut self, frame: Bytes) -> Frames {
        let Some(bytes) = frontend::query_text(&frame) else {
            return smallvec![frame];
        };
        let scan = inspect::scan(bytes);
        if scan == inspect::Scan::default() {
            return smallvec![frame];
        }
        if scan.transaction_control {
            self.note_transaction_control();
        }
        if self.mode() == PoolMode::Transaction {
            if scan.listen {
                return smallvec![frontend::query(REFUSE_LISTEN)];
            }
            self.dirty |= scan.creates_temp;
        }
        let Ok(text) = std::str::from_utf8(bytes) else {
            return smallvec![frame];
        };
        if scan.deallocate {
            return self.deallocate(frame.clone(), text);
        }
        self.track_setting(text);
        smallvec![frame]
    }

    /// DEALLOCATE of a client's statement. The server knows it by its shared name, and maybe
    /// not on this connection: a throwaway statement of that name is prepared first (its
    /// CloseComplete and ParseComplete swallowed) so that the server's own DEALLOCATE answers
    /// the client, with its tag, in its place among the client's other queries. Other
    /// statements of the client stay prepared.
    fn deallocate(&mut self, frame: Bytes, text: &str) -> Frames {
        // In a failed transaction the server refuses the DEALLOCATE itself (25P02), and
        // refuses a Parse too, which would make it skip the query: the client's text goes.
        if self.status == b'E' {
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
            Some(Deallocate::Named(name)) => match self.statements.remove(&name) {
                Some(prepared) => {
                    self.book.release(&prepared.server_name);
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

    fn deallocate_on_server(&mut self, server_name: &str) -> Frames {
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
            frontend::rebuild_target(b'C', b'S', server_name),
            frontend::rename_parse(&placeholder, server_name),
            frontend::query(&format!("DEALLOCATE {server_name}")),
        ]
    }

    /// Remembers what a text whose statements change the session does to its settings, to
    /// take effect if its transaction commits ([`settings::Pending`]). A change the proxy
    /// cannot follow (SET ROLE, a text it cannot split) leaves the server connection with
    /// state no other client may inherit: it is closed afterwards.
    fn track_setting(&mut self, text: &str) {
        if !inspect::is_multi_statement(text) {
            return self.track_statement(text);
        }
        // Several statements: each one that changes the session is followed as if it came
        // alone; a text the proxy cannot split safely may hide anything: the connection is
        // not reused.
        match inspect::split_statements(text) {
            Some(statements) => {
                for statement in statements {
                    self.track_statement(statement);
                }
            }
            None => self.dirty = true,
        }
    }

    /// [`Self::track_setting`] for one statement.
    fn track_statement(&mut self, text: &str) {
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
        if self.transaction_control == Some(group) {
            self.dirty = true;
        }
        self.pending_settings.stage(group, change);
    }

    /// A COMMIT or ROLLBACK in the same query or pipeline as a SET decides whether the SET
    /// lasts by where it stands between them and an error, which the proxy does not follow
    /// statement by statement: the connection, which may hold either value, is closed after
    /// the transaction.
    fn note_transaction_control(&mut self) {
        let group = self.replies.open_group();
        self.transaction_control = Some(group);
        if self.pending_settings.has_group(group) {
            self.dirty = true;
        }
    }

    /// A change whose transaction committed becomes the client's, and the connection's: it
    /// ran there (a simple Query, or the Execute of a portal, on the connection the
    /// transaction holds).
    fn settings_lasted(&mut self, group: u64) {
        for change in self.pending_settings.settle(group) {
            let applied = self.server.as_mut().map(|server| &mut server.applied);
            match change {
                SettingChange::Set { name, value_sql } if settings::passed_to_server(&name) => {
                    if let Some(applied) = applied {
                        applied.insert(name.clone(), value_sql.clone());
                    }
                    self.wanted.insert(name, value_sql);
                }
                SettingChange::Set { .. } => {}
                SettingChange::Reset(name) => {
                    if let Some(applied) = applied {
                        applied.remove(&name);
                    }
                    self.wanted.remove(&name);
                }
                SettingChange::ResetAll => {
                    if let Some(applied) = applied {
                        applied.clear();
                    }
                    self.wanted.retain(|name, _| name == "client_encoding");
                }
            }
        }
    }

    /// Parse of a named statement: renamed to its shared server name. If this connection has
    /// that statement already, it is closed first (the CloseComplete is swallowed), so the
    /// client's Parse behaves as it would on a connection of its own.
    fn parse(&mut self, frame: Bytes) -> Frames {
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
                out.push(frontend::rebuild_target(b'C', b'S', "switchyard_marker"));
                at
            });
            match self.unnamed_sent.last_mut() {
                None => {
                    self.unnamed_before = marker
                        .is_some()
                        .then(|| (self.unnamed.clone(), self.unnamed_here));
                }
                // The one before may turn out to be the last the server ran.
                Some(previous) => previous.text = Some(self.unnamed.clone()),
            }
            // A copy: a frame shares the read buffer's allocation, and holding it would make
            // every later read allocate a new buffer. Copied into the same buffer each time:
            // most clients send an unnamed Parse with every query.
            self.unnamed.clear();
            self.unnamed.extend_from_slice(&frame);
            self.unnamed_here = true;
            self.unnamed_sets = sets;
            let at = self.replies.sent_theirs();
            self.unnamed_sent.push(UnnamedParse {
                at,
                marker,
                reached: false,
                ran: false,
                text: None,
            });
            out.push(frame);
            return out;
        }
        if self.statements.contains_key(message.name) {
            return self.parse_duplicate(&message);
        }
        let server_name = statement_name(message.query, message.rest);
        let parse = frontend::rename_parse(&message, &server_name);
        let client_name = message.name.to_string();
        self.book.hold(&server_name);
        self.statements.insert(
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
        out.push(frontend::rebuild_target(b'C', b'S', &server_name));
        self.replies.sent_ours();
        self.group_prepared
            .push((self.replies.open_group(), server_name));
        let at = self.replies.sent_theirs();
        self.awaited.push(Awaited {
            at,
            group: self.replies.open_group(),
            name: client_name,
            closed: None,
        });
        out.push(parse);
        out
    }

    /// A Parse of a name the client has prepared already: PostgreSQL's own 42P05, in its
    /// place among the answers, from the server: the client's name is prepared twice (the
    /// first answer swallowed). That leaves a statement under a client's name on the
    /// connection, which is therefore not reused.
    fn parse_duplicate(&mut self, message: &frontend::Parse<'_>) -> Frames {
        self.dirty = true;
        if !self.placeholders.iter().any(|name| name == message.name) {
            self.placeholders.push(message.name.to_string());
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
            frontend::rebuild_target(b'C', b'S', message.name),
            frontend::rename_parse(&placeholder, message.name),
            frontend::rename_parse(message, message.name)
        ]
    }

    /// Between transactions: the error PostgreSQL gives a Parse of a name the client has
    /// prepared already.
    fn duplicate_parse(&self, frame: &Bytes) -> Option<Fatal> {
        let message = frontend::parse_message(frame)?;
        self.statements.contains_key(message.name).then(|| {
            Fatal::new(
                "42P05",
                format!("prepared statement \"{}\" already exists", message.name),
            )
        })
    }

    /// The current backend's pool could give this worker a connection without waiting.
    fn server_free_now(&self) -> bool {
        let control = &self.shared.control;
        control.admits_now()
            && !control.is_paused()
            && self.pools[super::side_index(self.shared.backend.side())].has_free()
    }

    /// `server_name` is about to be prepared on the attached connection: at most
    /// `max_prepared_statements` stay there, the least recently used closed first.
    fn make_room_for(&mut self, server_name: &str, out: &mut Frames) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if let Some(evicted) = server.prepared.insert(server_name) {
            out.push(frontend::rebuild_target(b'C', b'S', &evicted));
            self.replies.sent_ours();
        }
    }

    /// Statements no client holds any more that the connection just attached still has are
    /// closed before the client's first message (their answers swallowed).
    fn close_dead_statements(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let deaths = self.book.deaths();
        if server.prepared.seen_deaths == deaths {
            return;
        }
        server.prepared.seen_deaths = deaths;
        for name in self.book.dead(&server.prepared) {
            server.prepared.remove(&name);
            let close = frontend::rebuild_target(b'C', b'S', &name);
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
    fn not_run(&mut self, answered: u64) {
        let (failed, awaited): (Vec<Awaited>, Vec<Awaited>) = std::mem::take(&mut self.awaited)
            .into_iter()
            .partition(|awaited| awaited.at < answered);
        self.awaited = awaited;
        // Undone latest first: a Close and a Parse of the same name, both skipped, leave the
        // statement from before them.
        for Awaited { name, closed, .. } in failed.into_iter().rev() {
            match closed {
                None => {
                    if let Some(prepared) = self.statements.remove(&name) {
                        self.book.release(&prepared.server_name);
                    }
                }
                Some(prepared) => {
                    if let std::collections::hash_map::Entry::Vacant(entry) =
                        self.statements.entry(name)
                    {
                        self.book.hold(&prepared.server_name);
                        entry.insert(prepared);
                    }
                }
            }
        }
    }

    /// The client's statements are gone (its session ended, DEALLOCATE ALL).
    fn forget_statements(&mut self) {
        for (_, prepared) in self.statements.drain() {
            self.book.release(&prepared.server_name);
        }
        self.awaited.clear();
    }

    /// Whether a client message names a statement whose Parse or Close, sent in an earlier
    /// sync group, is still awaited: what the server did with it (ran it, or skipped it
    /// after an error) decides what this message means. Within one group it does not
    /// matter: after an error the server skips the rest of the group too.
    fn must_wait(&self, frame: &Bytes) -> bool {
        let name = match tag(frame) {
            b'P' => frontend::parse_message(frame).map(|p| p.name),
            b'B' => frontend::bind_statement(frame).map(|(_, statement, _)| statement),
            b'D' | b'C' => match frontend::target(frame) {
                Some((b'S', name)) => Some(name),
                _ => None,
            },
            _ => None,
        };
        let Some(name) = name.filter(|name| !name.is_empty()) else {
            return false;
        };
        let open = self.replies.open_group();
        self.awaited
            .iter()
            .any(|awaited| awaited.name == name && awaited.group < open)
    }

    /// What a Parse's statement does to the session, taken as done when the Parse arrives,
    /// whether it goes to a server now or is remembered for later: a SET is tracked like one
    /// sent as a simple query (JDBC sends SET through the extended protocol, psycopg with
    /// prepare_threshold=0 prepares it), and LISTEN in transaction mode is refused. Returns
    /// the Parse to handle instead (the refusal under the client's name), if any.
    fn parse_effects(&mut self, message: &frontend::Parse<'_>) -> Effects {
        let scan = inspect::scan(message.query);
        if scan.transaction_control {
            self.note_transaction_control();
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
    fn remember_parse(&mut self, frame: &Bytes) -> bool {
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
        self.book.hold(&server_name);
        self.statements.insert(
            message.name.to_string(),
            Prepared {
                server_name,
                parse,
                sets,
            },
        );
        self.owed_parse_complete += 1;
        true
    }

    /// Sends the ParseCompletes owed for remembered Parses, then `last` (a ReadyForQuery for a
    /// Sync), and flushes.
    async fn answer_locally(&mut self, last: Option<Bytes>) -> bool {
        if self.owed_parse_complete == 0 && last.is_none() {
            return true;
        }
        for _ in 0..std::mem::take(&mut self.owed_parse_complete) {
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
    fn ensure_prepared(&mut self, client_name: &str, out: &mut Frames) -> Option<String> {
        let prepared = self.statements.get(client_name)?;
        let server = self.server.as_mut()?;
        let (server_name, parse) = (prepared.server_name.clone(), prepared.parse.clone());
        let open = self.replies.open_group();
        let uncertain = self
            .group_prepared
            .iter()
            .any(|(group, name)| *group < open && *name == server_name);
        if !server.prepared.touch(&server_name) || uncertain {
            self.make_room_for(&server_name, out);
            // Closed first: after an error the proxy cannot know whether an earlier Parse of
            // it went through, and Close of a statement that does not exist is no error.
            out.push(frontend::rebuild_target(b'C', b'S', &server_name));
            out.push(parse);
            self.replies.sent_ours();
            self.replies.sent_ours();
            self.group_prepared.push((open, server_name.clone()));
        }
        Some(server_name)
    }

    /// A Bind or Describe of the unnamed statement, on a server connection that does not have
    /// the client's (it was parsed in an earlier sync group, on another connection): the
    /// client's last unnamed Parse goes first.
    fn with_unnamed(&mut self, frame: Bytes) -> Frames {
        if self.unnamed_here {
            return smallvec![frame];
        }
        self.unnamed_here = true;
        self.replies.sent_ours();
        if self.unnamed.is_empty() {
            // The client has none (a simple Query destroyed it, or it never made one): the
            // connection's own, left by another client, must not answer in its place.
            return smallvec![frontend::rebuild_target(b'C', b'S', ""), frame];
        }
        smallvec![Bytes::copy_from_slice(&self.unnamed), frame]
    }

    fn bind(&mut self, frame: Bytes) -> Frames {
        let Some((portal, statement, rest_at)) = frontend::bind_statement(&frame) else {
            return smallvec![frame];
        };
        let sets = if statement.is_empty() {
            self.unnamed_sets
        } else {
            self.statements.get(statement).is_some_and(|p| p.sets)
        };
        if sets || !self.setting_portals.is_empty() {
            self.bound(portal.to_string(), statement.to_string(), sets);
        }
        if statement.is_empty() {
            return self.with_unnamed(frame);
        }
        let mut out = Frames::new();
        match self.ensure_prepared(statement, &mut out) {
            Some(server_name) => {
                out.push(frontend::rename_bind(&frame, portal, &server_name, rest_at))
            }
            None => {
                self.close_placeholder(statement, &mut out);
                out.push(frame.clone())
            }
        }
        out
    }

    /// A message names a statement the client does not have: if a duplicate Parse left a
    /// placeholder of that name on the connection, it is closed first, so that the server
    /// answers as PostgreSQL does (26000).
    fn close_placeholder(&mut self, name: &str, out: &mut Frames) {
        if let Some(at) = self.placeholders.iter().position(|p| p == name) {
            self.placeholders.swap_remove(at);
            out.push(frontend::rebuild_target(b'C', b'S', name));
            self.replies.sent_ours();
        }
    }

    /// The groups of the oldest unnamed Parses are answered (their answers would have come
    /// before position `answered`): which of them the server ran decides the client's
    /// unnamed statement. Taken in order, each ran (its ParseComplete came), failed (no
    /// answer, though the server reached it: it was the first of its group, or its marker's
    /// answer came), or was skipped after an error before it (neither came); the first that
    /// did not run ends the walk, as the server skipped everything after it. A Parse that
    /// failed leaves no unnamed statement; one skipped leaves the one before it, which the
    /// connection has only if it had it before.
    fn settle_unnamed(&mut self, answered: u64) {
        // Most clients: one unnamed Parse per group, and it ran.
        if let [only] = self.unnamed_sent.as_slice() {
            if only.ran && only.at < answered {
                self.unnamed_sent.clear();
                self.unnamed_before = None;
                return;
            }
        }
        let count = self
            .unnamed_sent
            .iter()
            .take_while(|parse| parse.at < answered)
            .count();
        if count == 0 {
            return;
        }
        let settled: Vec<UnnamedParse> = self.unnamed_sent.drain(..count).collect();
        let pending_after = !self.unnamed_sent.is_empty();
        let mut outcome = None; // None: as before the first of them
        for (i, parse) in settled.iter().enumerate() {
            if parse.ran {
                outcome = Some(Some(i));
                continue;
            }
            if parse.marker.is_none() || parse.reached {
                outcome = Some(None);
            }
            break;
        }
        let last = settled.len() - 1;
        let state: (Vec<u8>, bool) = match outcome {
            // The latest ran and none is pending after it: `unnamed` is already right.
            Some(Some(i)) if i == last && !pending_after => {
                self.unnamed_before = None;
                return;
            }
            Some(Some(i)) => match settled[i].text.clone() {
                Some(text) => (text, true),
                None => (self.unnamed.clone(), true),
            },
            Some(None) => (Vec::new(), true),
            // Skipped: the statement before them; unknown (never asked of the connection)
            // if it was not kept.
            None => self.unnamed_before.take().unwrap_or((Vec::new(), false)),
        };
        if pending_after {
            // The later ones settle against this.
            self.unnamed_before = Some(state);
            return;
        }
        self.unnamed_before = None;
        let (text, here) = state;
        self.unnamed_sets = !text.is_empty()
            && frontend::parse_message(&Bytes::copy_from_slice(&text))
                .is_some_and(|m| inspect::scan(m.query).changes_session);
        self.unnamed = text;
        self.unnamed_here = here;
    }

    /// The unnamed statement is gone, from the client's session and the server connection.
    fn forget_unnamed(&mut self) {
        self.unnamed_sent.clear();
        self.unnamed_before = None;
        self.unnamed.clear();
        self.unnamed_here = true;
        self.unnamed_sets = false;
    }

    /// A Bind of `portal`: it remembers the statement's text if that changes settings.
    fn bound(&mut self, portal: String, statement: String, sets: bool) {
        self.setting_portals.retain(|(bound, _)| *bound != portal);
        if !sets {
            return;
        }
        let parse = if statement.is_empty() {
            (!self.unnamed.is_empty()).then(|| Bytes::copy_from_slice(&self.unnamed))
        } else {
            self.statements.get(&statement).map(|p| p.parse.clone())
        };
        let text = parse
            .as_ref()
            .and_then(frontend::parse_message)
            .and_then(|message| std::str::from_utf8(message.query).ok().map(str::to_string));
        if let Some(text) = text {
            self.setting_portals.push((portal, text));
        }
    }

    /// An Execute of a portal bound to a statement that changes settings: the change is
    /// tracked as if the statement came as a simple Query, here and now.
    fn execute_effects(&mut self, frame: &Bytes) {
        let mut b = body(frame);
        let Some(portal) = cstr(&mut b) else {
            return;
        };
        if let Some((_, text)) = self
            .setting_portals
            .iter()
            .find(|(bound, _)| *bound == portal)
            .cloned()
        {
            self.track_setting(&text);
        }
    }

    /// Describe of a statement is renamed (and prepared if need be). Close of a statement only
    /// forgets the client's name: other clients may share the server statement, so the server
    /// gets a Close of a name that does not exist, which PostgreSQL answers with CloseComplete
    /// in its proper place.
    fn describe_or_close(&mut self, frame: Bytes) -> Frames {
        let kind = tag(&frame);
        let close_at = if kind == b'C' {
            self.replies.sent_theirs()
        } else {
            0
        };
        let Some((b'S', name)) = frontend::target(&frame) else {
            return smallvec![frame];
        };
        if name.is_empty() {
            if kind == b'D' {
                return self.with_unnamed(frame);
            }
            // Closed here and on the server alike.
            self.forget_unnamed();
            return smallvec![frame];
        }
        if kind == b'C' {
            let Some(prepared) = self.statements.remove(name) else {
                // The server's own answer; a placeholder of that name goes with it.
                self.placeholders.retain(|placeholder| placeholder != name);
                return smallvec![frame];
            };
            // The last client to hold it: deallocated on this connection (the server's
            // CloseComplete answers the client), and on the others before their next
            // transaction. Otherwise only the client's name goes, and the server is asked
            // to close a name that does not exist, so that its answer comes in its place.
            // In session mode the connection is the client's alone: closed there whoever
            // else holds the statement.
            let last = self.book.release(&prepared.server_name);
            if !last && self.mode() == PoolMode::Transaction {
                self.awaited.push(Awaited {
                    at: close_at,
                    group: self.replies.open_group(),
                    name: name.to_string(),
                    closed: Some(prepared),
                });
                return smallvec![frontend::rebuild_target(b'C', b'S', "switchyard_forgotten")];
            }
            if let Some(server) = self.server.as_mut() {
                server.prepared.remove(&prepared.server_name);
            }
            let close = frontend::rebuild_target(b'C', b'S', &prepared.server_name);
            self.awaited.push(Awaited {
                at: close_at,
                group: self.replies.open_group(),
                name: name.to_string(),
                closed: Some(prepared),
            });
            return smallvec![close];
        }
        let mut out = Frames::new();
        match self.ensure_prepared(name, &mut out) {
            Some(server_name) => out.push(frontend::rebuild_target(b'D', b'S', &server_name)),
            None => {
                self.close_placeholder(name, &mut out);
                out.push(frame.clone())
            }
        }
        out
    }

    /// Brings a server connection's settings in line with the client's before the client's
    /// transaction is sent: a setting that fails to apply (its value became invalid, as a
    /// text search configuration that was dropped, or after a switch to a server that lacks
    /// the parameter) fails that transaction, rather than letting it run with what the
    /// connection's last client set. The failed settings are no longer kept for the session,
    /// and the error says so, so that the client's next transaction can run.
    async fn reapply_settings(
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
                    b'S' => remember_parameter(server, &frame),
                    // The connection is ending (terminated, the server shutting down, an idle
                    // timeout that struck while it sat in the pool): not the setting's fault.
                    b'E' if backend::is_fatal(body(&frame)) => {
                        return Err(Fatal::new("08006", "the server connection broke"));
                    }
                    b'E' => {
                        let (code, message) = backend::error_fields(body(&frame));
                        server.applied.remove(&change.name);
                        let error = if refuses_the_setting(&code) {
                            self.wanted.remove(&change.name);
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
                    b'Z' => break,
                    _ => {}
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Takes a server connection (waiting while the proxy is paused) and brings its session
    /// settings in line with the client's.
    async fn attach(&mut self, apply_settings: bool) -> Result<(), Fatal> {
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
        let changes = if apply_settings {
            settings::reconcile(&self.wanted, &mut server.applied)
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
        self.unnamed_here = false;
        Ok(())
    }

    /// The common case of [`Session::take_turn_and_server`], without a future: the proxy is
    /// neither paused nor throttled, and a connection given back a moment ago is on the
    /// stack. `None` (nothing taken, nothing counted) when any of that is not so.
    fn take_turn_and_server_now(&mut self) -> Option<(Pooled, Side)> {
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
        let side = self.shared.backend.side();
        let pool = &self.pools[super::side_index(side)];
        // Idle time as of the start of this turn: one clock read per transaction is enough.
        let now = std::time::Instant::now();
        let server = pool.take_warm();
        match server {
            Some(server)
                if now.saturating_duration_since(server.idle_since)
                    < self.shared.settings.server_check_delay.0 =>
            {
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
    async fn wait_for_turn_and_server(&mut self, seen: u64) -> Result<(Pooled, Side), Waited> {
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
    async fn take_turn_and_server(&mut self) -> Result<(Pooled, Side), Waited> {
        self.begin_turn().await;
        // Read after the pause: a switch happens only while paused.
        let side = self.shared.backend.side();
        let pool = &self.pools[super::side_index(side)];
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
    async fn begin_turn(&mut self) {
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
    fn end_turn(&mut self) {
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
    fn show_running(&self) {
        let target = self.server.as_ref().map(|server| self.running_on(server));
        self.cancel_slot.set_running(target);
    }

    fn running_on(&self, server: &ServerConn) -> CancelTarget {
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
    async fn follow_switch(&mut self) -> Result<(), Fatal> {
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
    async fn release(&mut self, ending: bool) {
        self.release_at(ending, std::time::Instant::now()).await
    }

    /// [`Session::release`], the clock read at `now` by the caller.
    async fn release_at(&mut self, ending: bool, now: std::time::Instant) {
        let Some(mut server) = self.server.take() else {
            self.end_turn();
            return;
        };
        let clean = self.status == b'I'
            && self.replies.owed() == 0
            && self.unsynced == 0
            && !self.replies.copy_in()
            && !self.dirty;
        let needs_reset = ending && self.mode() == PoolMode::Session;
        if !clean || (needs_reset && reset(&mut server).await.is_err()) {
            server.broken = true;
        }
        self.replies.clear();
        self.unsynced = 0;
        self.dirty = false;
        // Positions count again from 0 on the next connection: what is still awaited (the
        // connection broke) is taken as not run.
        if !self.awaited.is_empty() {
            self.not_run(u64::MAX);
        }
        self.placeholders.clear();
        self.unnamed_sent.clear();
        self.unnamed_before = None;
        self.setting_portals.clear();
        self.status = b'I';
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
    fn give_back(&self, server: Pooled, side: Side) {
        let home = if server.home == self.shard {
            Some(&self.pools[super::side_index(side)])
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
    async fn server_lost(&mut self) -> bool {
        self.server_lost_because(Fatal::new("08006", LOST)).await
    }

    /// [`Session::server_lost`], telling the client `cause`: the server's own error when it
    /// ended the connection with one (57P01 terminated by an administrator, 25P03 idle in
    /// transaction too long), as an ERROR, since the client's session goes on.
    async fn server_lost_because(&mut self, cause: Fatal) -> bool {
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
        let in_transaction = self.status != b'I';
        // Its transaction is lost, and the setting changes made in it with it.
        self.pending_settings.clear();
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
                    .feed(backend::ready_for_query(b'I'))
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
        if !matches!(tag(&frame), b'Q' | b'F') {
            while tag(&frame) != b'S' {
                match self.client_r.next().await {
                    Some(Ok(Frame::Message(next))) if tag(&next) == b'X' => return false,
                    Some(Ok(Frame::Message(next))) => frame = next,
                    _ => return false,
                }
            }
        }
        self.client_w
            .send(backend::ready_for_query(b'I'))
            .await
            .is_ok()
    }
}

/// A server connection from the pool (`first`, if given, is tried first). One that sat idle
/// longer than `server_check_delay` proves it still works with a round trip first (checked
/// here rather than by bb8 on every checkout, which costs the hot path a future per
/// transaction).
async fn checkout(
    shared: &Shared,
    metrics: &metrics::Metrics,
    pool: &super::pool::Pool,
    mut first: Option<Pooled>,
) -> Result<Pooled, bb8::RunError<super::pool::ServerError>> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut server = match first.take().or_else(|| pool.take_warm()) {
            Some(server) => server,
            None => {
                metrics::add(&metrics.waits, 1);
                let _waiting = metrics::Held::count(&metrics.clients_waiting);
                pool.get().await?
            }
        };
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
                return Err(bb8::RunError::User(super::pool::ServerError::Closed));
            }
        }
    }
}

/// Why no server connection was taken.
enum Waited {
    Pool(bb8::RunError<super::pool::ServerError>),
    Cancelled,
}

/// A client's unnamed Parse sent and not yet settled (`Session::settle_unnamed`).
struct UnnamedParse {
    /// Its position among the Parse and Close answers.
    at: u64,
    /// The position of the Close sent just before it, when it was not the first message
    /// of its group.
    marker: Option<u64>,
    /// The marker's answer came: the server reached the Parse.
    reached: bool,
    /// Its ParseComplete came.
    ran: bool,
    /// Its Parse message, kept once a later unnamed Parse replaced it in `Session::unnamed`.
    text: Option<Vec<u8>>,
}

/// A client's Parse or Close sent to the server whose answer has not come yet.
struct Awaited {
    /// Its position among the Parse and Close answers ([`Replies::sent_theirs`]).
    at: u64,
    /// The sync group it was sent in.
    group: u64,
    /// The client's name of the statement.
    name: String,
    /// For a Close: the statement, given back to the client if the Close did not run.
    closed: Option<Prepared>,
}

/// What a Parse's statement does, as [`Session::parse_effects`] finds it.
enum Effects {
    /// The Parse to handle in its place (LISTEN refused in transaction mode).
    Refused(Bytes),
    /// Whether the statement changes settings when it is executed.
    Sets(bool),
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

/// Session mode: a connection goes back to the pool as a fresh session would find it.
async fn reset(server: &mut ServerConn) -> Result<(), super::pool::ServerError> {
    server.send(frontend::query("DISCARD ALL")).await?;
    loop {
        let frame = server.recv().await?;
        match tag(&frame) {
            // The values it goes back to: the connection's view of them stays true.
            b'S' => remember_parameter(server, &frame),
            b'E' => {
                return Err(super::pool::ServerError::Refused(
                    backend::error_fields(body(&frame)).1,
                ))
            }
            b'Z' => break,
            _ => {}
        }
    }
    server.prepared.clear();
    server.applied.clear();
    Ok(())
}

/// An error that says a setting itself cannot be applied: a bad value (class 22), an unknown
/// parameter or object, or a lack of privilege (class 42), or a parameter that cannot be
/// changed now (55P02).
fn refuses_the_setting(sqlstate: &str) -> bool {
    sqlstate.starts_with("22") || sqlstate.starts_with("42") || sqlstate == "55P02"
}

/// Keeps a ParameterStatus the server sent in the connection's view of its parameters.
fn remember_parameter(server: &mut ServerConn, frame: &Bytes) {
    let mut b = body(frame);
    if let (Some(name), Some(value)) = (cstr(&mut b), cstr(&mut b)) {
        server.params.insert(name.to_ascii_lowercase(), value);
    }
}

/// The name a statement gets on server connections: from its text and parameter types, so
/// the same statement is prepared once per server connection whichever client asks.
fn statement_name(query: &[u8], param_types: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    // A cryptographic hash: a client must not be able to make its statement's name collide
    // with another client's.
    let mut hasher = Sha256::new();
    hasher.update((query.len() as u64).to_be_bytes());
    hasher.update(query);
    hasher.update(param_types);
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("switchyard_{hex}")
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

    #[test]
    fn statement_names_depend_on_text_and_types() {
        assert_eq!(
            statement_name(b"SELECT 1", &[0, 0]),
            statement_name(b"SELECT 1", &[0, 0])
        );
        assert_ne!(
            statement_name(b"SELECT 1", &[0, 0]),
            statement_name(b"SELECT 2", &[0, 0])
        );
        assert_ne!(
            statement_name(b"SELECT $1", &[0, 1, 0, 0, 0, 23]),
            statement_name(b"SELECT $1", &[0, 1, 0, 0, 0, 25])
        );
    }
}
