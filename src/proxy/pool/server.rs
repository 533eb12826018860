//! One raw server connection: connected, logged in as the application's own role, and kept
//! as frames so that sessions can forward bytes without parsing them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::proxy::protocol::backend::error_fields;
use crate::proxy::protocol::codec::CodecError;
use crate::proxy::protocol::{body, tag, Frame, PgCodec};
use crate::proxy::statements::OnConnection;
use crate::proxy::tls::{self, ReadHalf, WriteHalf};

/// TLS towards the server, from the plan URL's sslmode (`prefer` or `require`).
#[derive(Clone)]
pub struct ServerTls {
    pub connector: tokio_rustls::TlsConnector,
    pub name: rustls::pki_types::ServerName<'static>,
    /// `require`: a server that says no to TLS is an error; `prefer` goes on in plain.
    pub required: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("required", &self.required)
            .finish()
    }
}

/// Where and as whom a pool's connections log in.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: String,
    pub tls: Option<ServerTls>,
    /// Every open connection's backend pid towards this server, over all pools.
    pub pids: ServerPids,
    /// `[proxy] max_prepared_statements`.
    pub max_prepared_statements: usize,
    /// A walsender connection (`replication=database`) under this application_name: the
    /// cache's invalidator, the initial copy's slot.
    pub replication: Option<&'static str>,
}

/// The backend pids of the proxy's open connections towards one server: what the cutover's
/// fence spares. (Server connections once logged in as `switchyard-proxy` and the fence told
/// them by that name; the client's own application_name now reaches the server.)
#[derive(Debug, Clone, Default)]
pub struct ServerPids(Arc<std::sync::Mutex<HashSet<i32>>>);

impl ServerPids {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The pids, sorted.
    pub fn list(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self.lock().iter().copied().collect();
        pids.sort_unstable();
        pids
    }

    fn register(&self, pid: i32) -> Registered {
        self.lock().insert(pid);
        Registered {
            pids: self.clone(),
            pid,
        }
    }
}

/// A connection's place in [`ServerPids`], given up when the connection is dropped.
pub struct Registered {
    pids: ServerPids,
    pid: i32,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.pids.lock().remove(&self.pid);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot reach {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("connecting to {0} timed out")]
    Timeout(String),
    #[error("the server refused the login: {0}")]
    Refused(String),
    /// An ErrorResponse in answer to the login, with the server's SQLSTATE.
    #[error("the server refused the login: {message}")]
    Login { code: String, message: String },
    #[error("the server sent an unexpected message during login: {0}")]
    Protocol(String),
    #[error("TLS with {0}: {1}")]
    Tls(String, String),
    #[error("the server connection closed")]
    Closed,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl ServerError {
    /// The SQLSTATE a client hears for this error: the server's own when it refused the
    /// login, 28000 (invalid authorization) when the proxy could not authenticate the way the
    /// server asked, "connection failure" otherwise.
    pub fn sqlstate(&self) -> &str {
        match self {
            ServerError::Login { code, .. } if !code.is_empty() => code,
            ServerError::Refused(_) => "28000",
            _ => "08006",
        }
    }

    /// A copy of this error if it is a login failure that trying again does not cure: the
    /// server refused these credentials (SQLSTATE class 28: wrong password, no pg_hba.conf
    /// entry, role not allowed to log in), or the proxy could not authenticate the way the
    /// server asked. None for what may pass: a server starting up, out of connection slots,
    /// unreachable.
    pub fn login_refusal(&self) -> Option<ServerError> {
        match self {
            ServerError::Login { code, message } if code.starts_with("28") => {
                Some(ServerError::Login {
                    code: code.clone(),
                    message: message.clone(),
                })
            }
            ServerError::Refused(message) => Some(ServerError::Refused(message.clone())),
            _ => None,
        }
    }
}

pub struct ServerConn {
    pub reader: FramedRead<ReadHalf, PgCodec>,
    pub writer: FramedWrite<WriteHalf, PgCodec>,
    /// The server's session parameters as it reported them, plus what the proxy SET.
    pub params: HashMap<String, String>,
    /// The parameters as the server reported them at login: its defaults for the database
    /// and role, what a client that set nothing has.
    pub defaults: HashMap<String, String>,
    pub process_id: i32,
    pub secret_key: i32,
    pub addr: SocketAddr,
    /// Prepared statements (proxy names) that exist on this connection.
    pub prepared: OnConnection,
    /// Session settings clients made on this connection, name → value as SQL.
    pub applied: std::collections::BTreeMap<String, String>,
    /// The tag of the client settings `applied` equals ([`crate::proxy::settings::new_tag`]);
    /// 0 when not known to equal any.
    pub applied_tag: u64,
    /// Set when the connection must not be reused (it broke, or a client left it mid-way).
    pub broken: bool,
    pub idle_since: Instant,
    /// The worker whose pool the connection belongs to, where it goes back after a
    /// transaction (another worker may borrow it).
    pub home: usize,
    /// CancelRequests forwarded to this connection's backend that PostgreSQL has not yet
    /// acted on: until they have, the connection must not run another client's query.
    pub cancels_in_flight: Arc<AtomicU32>,
    /// Its pid among the proxy's server connections, while it is open.
    registered: Option<Registered>,
}

impl ServerConn {
    pub async fn connect(
        target: &ServerTarget,
        timeout: Duration,
    ) -> Result<ServerConn, ServerError> {
        let address = format!("{}:{}", target.host, target.port);
        let login = async {
            let stream = TcpStream::connect(&address)
                .await
                .map_err(|e| ServerError::Connect(address.clone(), e))?;
            let _ = stream.set_nodelay(true);
            let addr = stream
                .peer_addr()
                .map_err(|e| ServerError::Connect(address.clone(), e))?;
            let (read, write) = negotiate_tls(stream, target.tls.as_ref(), &address).await?;
            let mut conn = ServerConn {
                reader: FramedRead::new(read, PgCodec::typed()),
                writer: FramedWrite::new(write, PgCodec::typed()),
                params: HashMap::new(),
                defaults: HashMap::new(),
                process_id: 0,
                secret_key: 0,
                addr,
                prepared: OnConnection::new(target.max_prepared_statements),
                applied: Default::default(),
                applied_tag: 0,
                broken: false,
                idle_since: Instant::now(),
                home: 0,
                cancels_in_flight: Arc::default(),
                registered: None,
            };
            conn.login(target).await?;
            conn.defaults = conn.params.clone();
            conn.registered = Some(target.pids.register(conn.process_id));
            conn.reader.decoder_mut().batch_pass_through();
            Ok(conn)
        };
        tokio::time::timeout(timeout, login)
            .await
            .map_err(|_| ServerError::Timeout(address.clone()))?
    }

    pub async fn send(&mut self, frame: Bytes) -> Result<(), ServerError> {
        self.writer.send(frame).await.map_err(ServerError::from)
    }

    pub async fn recv(&mut self) -> Result<Bytes, ServerError> {
        match self.reader.next().await {
            Some(Ok(Frame::Message(frame))) => Ok(frame),
            Some(Ok(Frame::Startup(_))) => {
                Err(ServerError::Protocol("startup packet from a server".into()))
            }
            Some(Err(e)) => Err(e.into()),
            None => Err(ServerError::Closed),
        }
    }

    async fn login(&mut self, target: &ServerTarget) -> Result<(), ServerError> {
        let mut buf = BytesMut::new();
        // No application_name: a client that names none has the server's default, as it
        // would directly, and one that does sets it like any other setting.
        let mut params = vec![
            ("user", target.user.as_str()),
            ("database", target.database.as_str()),
        ];
        if let Some(application_name) = target.replication {
            params.push(("replication", "database"));
            params.push(("application_name", application_name));
        }
        frontend::startup_message(params.iter().copied(), &mut buf)
            .map_err(|e| ServerError::Protocol(e.to_string()))?;
        self.send(buf.split().freeze()).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.recv().await?;
            match tag(&frame) {
                b'R' => self.authenticate(target, &frame, &mut scram).await?,
                b'S' => {
                    let mut b = body(&frame);
                    if let (Some(k), Some(v)) = (
                        crate::proxy::protocol::startup::cstr(&mut b),
                        crate::proxy::protocol::startup::cstr(&mut b),
                    ) {
                        self.params.insert(k, v);
                    }
                }
                b'K' => {
                    let mut b = body(&frame);
                    if b.len() >= 8 {
                        self.process_id = b.get_i32();
                        self.secret_key = b.get_i32();
                    }
                }
                b'Z' => return Ok(()),
                b'E' => {
                    let (code, message) = error_fields(body(&frame));
                    return Err(ServerError::Login { code, message });
                }
                b'N' => {}
                other => {
                    return Err(ServerError::Protocol(format!(
                        "message type {:?}",
                        other as char
                    )))
                }
            }
        }
    }

    async fn authenticate(
        &mut self,
        target: &ServerTarget,
        frame: &Bytes,
        scram: &mut Option<ScramSha256>,
    ) -> Result<(), ServerError> {
        let mut b = body(frame);
        if b.len() < 4 {
            return Err(ServerError::Protocol("short authentication request".into()));
        }
        let code = b.get_u32();
        let mut out = BytesMut::new();
        let encode_error = |e: std::io::Error| ServerError::Protocol(e.to_string());
        match code {
            // After SASL the server must have proved it knows the password too.
            0 if scram.is_some() => {
                return Err(ServerError::Refused(
                    "the server skipped the SCRAM final message".into(),
                ))
            }
            0 => return Ok(()),
            3 => frontend::password_message(target.password.as_bytes(), &mut out)
                .map_err(encode_error)?,
            5 if b.len() >= 4 => {
                let salt = [b[0], b[1], b[2], b[3]];
                let hashed = postgres_protocol::authentication::md5_hash(
                    target.user.as_bytes(),
                    target.password.as_bytes(),
                    salt,
                );
                frontend::password_message(hashed.as_bytes(), &mut out).map_err(encode_error)?;
            }
            10 => {
                let mechanisms = String::from_utf8_lossy(b);
                if !mechanisms.split('\0').any(|m| m == "SCRAM-SHA-256") {
                    return Err(ServerError::Refused(format!(
                        "no supported SASL mechanism in {mechanisms:?}"
                    )));
                }
                let client =
                    ScramSha256::new(target.password.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response("SCRAM-SHA-256", client.message(), &mut out)
                    .map_err(encode_error)?;
                *scram = Some(client);
            }
            11 => {
                let client = scram.as_mut().ok_or_else(|| {
                    ServerError::Protocol("SASL continue before SASL start".into())
                })?;
                client
                    .update(b)
                    .map_err(|e| ServerError::Refused(e.to_string()))?;
                frontend::sasl_response(client.message(), &mut out).map_err(encode_error)?;
            }
            12 => {
                let client = scram
                    .as_mut()
                    .ok_or_else(|| ServerError::Protocol("SASL final before SASL start".into()))?;
                client.finish(b).map_err(|e| {
                    ServerError::Refused(format!("the server's SCRAM signature is wrong: {e}"))
                })?;
                *scram = None;
                return Ok(());
            }
            other => {
                return Err(ServerError::Refused(format!(
                    "authentication method {other} is not supported"
                )))
            }
        }
        self.send(out.freeze()).await
    }

    /// Whether the server has said anything on this connection while it sat idle in the
    /// pool: PostgreSQL sends an idle connection nothing unless it is ending it (a FATAL as it
    /// shuts down or restarts, `pg_terminate_backend`, `idle_session_timeout`, then EOF). One
    /// poll of the reader, with a waker that does nothing: no system call when the socket has
    /// nothing to read (tokio knows it from its last readiness event), and what it reads is
    /// what makes the connection unusable anyway.
    pub fn closed_while_idle(&mut self) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        self.reader.poll_next_unpin(&mut cx).is_ready()
    }

    /// A quick round trip (an empty query) to prove the connection still works.
    pub async fn ping(&mut self) -> Result<(), ServerError> {
        self.send(crate::proxy::protocol::frontend::query(""))
            .await?;
        loop {
            let frame = self.recv().await?;
            if tag(&frame) == b'Z' {
                return Ok(());
            }
        }
    }
}

/// Asks the server for TLS when the sslmode wants it, and splits the stream.
async fn negotiate_tls(
    mut stream: TcpStream,
    tls: Option<&ServerTls>,
    address: &str,
) -> Result<(ReadHalf, WriteHalf), ServerError> {
    let Some(tls) = tls else {
        return Ok(tls::split_plain(stream));
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream
        .write_all(&request)
        .await
        .map_err(|e| ServerError::Connect(address.to_string(), e))?;
    let answer = stream
        .read_u8()
        .await
        .map_err(|e| ServerError::Connect(address.to_string(), e))?;
    match answer {
        b'S' => {
            let encrypted = tls
                .connector
                .connect(tls.name.clone(), stream)
                .await
                .map_err(|e| ServerError::Tls(address.to_string(), e.to_string()))?;
            Ok(tls::split(encrypted))
        }
        b'N' if !tls.required => Ok(tls::split_plain(stream)),
        b'N' => Err(ServerError::Tls(
            address.to_string(),
            "the server does not offer TLS, and sslmode=require".into(),
        )),
        other => Err(ServerError::Protocol(format!(
            "answer {other:?} to SSLRequest"
        ))),
    }
}
