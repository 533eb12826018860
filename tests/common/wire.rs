//! A raw PostgreSQL wire-protocol client, for tests that need exact control over what is sent
//! (several messages in one write, pipelines no driver sends) and want to see every message
//! that comes back, in order. Every read has a deadline: a hang is reported, never waited out.

#![allow(dead_code)]

use std::fmt;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a read waits for the next message before the exchange counts as hung.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// One backend message: its type byte and its body (without the length).
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: Bytes,
}

impl Message {
    /// The message's name, with what tells it apart: DataRow values, the SQLSTATE of an
    /// ErrorResponse or NoticeResponse, a CommandComplete tag, a ReadyForQuery status, a
    /// ParameterStatus name and value.
    pub fn describe(&self) -> String {
        match self.tag {
            b'1' => "ParseComplete".into(),
            b'2' => "BindComplete".into(),
            b'3' => "CloseComplete".into(),
            b'C' => format!("CommandComplete({})", cstrings(&self.body).join("")),
            b'D' => format!("DataRow[{}]", self.row_text().join("|")),
            b'E' => format!("ErrorResponse({})", self.field(b'C').unwrap_or_default()),
            b'N' => format!("NoticeResponse({})", self.field(b'C').unwrap_or_default()),
            b'Z' => format!(
                "ReadyForQuery({})",
                self.body.first().map_or('?', |&b| b as char)
            ),
            b'T' => "RowDescription".into(),
            b'n' => "NoData".into(),
            b't' => "ParameterDescription".into(),
            b'I' => "EmptyQueryResponse".into(),
            b's' => "PortalSuspended".into(),
            b'G' => "CopyInResponse".into(),
            b'H' => "CopyOutResponse".into(),
            b'W' => "CopyBothResponse".into(),
            b'd' => "CopyData".into(),
            b'c' => "CopyDone".into(),
            b'S' => {
                let parts = cstrings(&self.body);
                format!(
                    "ParameterStatus({}={})",
                    parts.first().map_or("", String::as_str),
                    parts.get(1).map_or("", String::as_str)
                )
            }
            b'A' => "NotificationResponse".into(),
            b'K' => "BackendKeyData".into(),
            b'R' => "Authentication".into(),
            other => format!("Message({:?})", other as char),
        }
    }

    /// A field of an ErrorResponse or NoticeResponse ('C' SQLSTATE, 'M' message, 'S'
    /// severity, ...).
    pub fn field(&self, code: u8) -> Option<String> {
        if !matches!(self.tag, b'E' | b'N') {
            return None;
        }
        let mut body = &self.body[..];
        while let Some((&kind, rest)) = body.split_first() {
            if kind == 0 {
                break;
            }
            let end = rest.iter().position(|&b| b == 0)?;
            if kind == code {
                return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
            body = &rest[end + 1..];
        }
        None
    }

    /// An ErrorResponse's SQLSTATE and message.
    pub fn error(&self) -> Option<(String, String)> {
        (self.tag == b'E').then(|| {
            (
                self.field(b'C').unwrap_or_default(),
                self.field(b'M').unwrap_or_default(),
            )
        })
    }

    /// A DataRow's values as raw bytes (None for NULL).
    pub fn row(&self) -> Vec<Option<Vec<u8>>> {
        if self.tag != b'D' {
            return Vec::new();
        }
        let mut body = &self.body[..];
        let count = body.get_i16();
        (0..count)
            .map(|_| {
                let len = body.get_i32();
                (len >= 0).then(|| {
                    let value = body[..len as usize].to_vec();
                    body.advance(len as usize);
                    value
                })
            })
            .collect()
    }

    /// A DataRow's values as text: UTF-8 as it is, other bytes as `\xNN`, NULL as `NULL`.
    pub fn row_text(&self) -> Vec<String> {
        self.row()
            .into_iter()
            .map(|value| match value {
                None => "NULL".into(),
                Some(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => text,
                    Err(e) => e
                        .into_bytes()
                        .iter()
                        .map(|&b| {
                            if b.is_ascii() {
                                (b as char).to_string()
                            } else {
                                format!("\\x{b:02x}")
                            }
                        })
                        .collect(),
                },
            })
            .collect()
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

fn cstrings(body: &[u8]) -> Vec<String> {
    body.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// How a read of several messages ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// What was waited for arrived.
    Done,
    /// The server closed the connection.
    Closed,
    /// Nothing more came within the timeout: a hang.
    TimedOut,
    /// The socket failed.
    Failed(String),
}

/// The messages of one exchange, and how reading them ended.
#[derive(Clone)]
pub struct Replies {
    pub messages: Vec<Message>,
    pub end: End,
}

impl Replies {
    /// What came back, described ([`Message::describe`]); a read that did not end as
    /// expected ends the list with what happened instead, so that comparing two lists
    /// shows a hang or a closed connection too.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.messages.iter().map(Message::describe).collect();
        match &self.end {
            End::Done => {}
            End::Closed => kinds.push("<connection closed>".into()),
            End::TimedOut => kinds.push(format!("<nothing more within {TIMEOUT:?}: hung>")),
            End::Failed(e) => kinds.push(format!("<socket error: {e}>")),
        }
        kinds
    }

    /// The first ErrorResponse's SQLSTATE and message.
    pub fn first_error(&self) -> Option<(String, String)> {
        self.messages.iter().find_map(Message::error)
    }

    /// The text of the DataRows' values.
    pub fn rows(&self) -> Vec<Vec<String>> {
        self.messages
            .iter()
            .filter(|m| m.tag == b'D')
            .map(Message::row_text)
            .collect()
    }

    /// The first value of the first DataRow.
    pub fn value(&self) -> Option<String> {
        self.rows().first().and_then(|row| row.first().cloned())
    }
}

impl fmt::Debug for Replies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kinds().fmt(f)
    }
}

/// Frontend messages to send in one write.
#[derive(Default, Clone)]
pub struct Msgs(BytesMut);

impl Msgs {
    pub fn new() -> Msgs {
        Msgs::default()
    }

    pub fn query(mut self, sql: &str) -> Msgs {
        frontend::query(sql, &mut self.0).expect("query message");
        self
    }

    /// Parse without parameter types.
    pub fn parse(mut self, statement: &str, sql: &str) -> Msgs {
        frontend::parse(statement, sql, [], &mut self.0).expect("parse message");
        self
    }

    /// Bind without parameters, all results in text.
    pub fn bind(mut self, portal: &str, statement: &str) -> Msgs {
        frontend::bind(
            portal,
            statement,
            [],
            std::iter::empty::<()>(),
            |(), _| unreachable!(),
            [],
            &mut self.0,
        )
        .map_err(|_| ())
        .expect("bind message");
        self
    }

    /// Bind with text parameters, all results in text.
    pub fn bind_params(mut self, portal: &str, statement: &str, params: &[&str]) -> Msgs {
        frontend::bind(
            portal,
            statement,
            [],
            params.iter(),
            |param, buf| {
                buf.extend_from_slice(param.as_bytes());
                Ok::<_, Box<dyn std::error::Error + Sync + Send>>(postgres_protocol::IsNull::No)
            },
            [],
            &mut self.0,
        )
        .map_err(|_| ())
        .expect("bind message");
        self
    }

    /// Execute with no row limit.
    pub fn execute(mut self, portal: &str) -> Msgs {
        frontend::execute(portal, 0, &mut self.0).expect("execute message");
        self
    }

    /// Describe of a statement (`b'S'`) or a portal (`b'P'`).
    pub fn describe(mut self, kind: u8, name: &str) -> Msgs {
        frontend::describe(kind, name, &mut self.0).expect("describe message");
        self
    }

    /// Close of a statement (`b'S'`) or a portal (`b'P'`).
    pub fn close(mut self, kind: u8, name: &str) -> Msgs {
        frontend::close(kind, name, &mut self.0).expect("close message");
        self
    }

    pub fn sync(mut self) -> Msgs {
        frontend::sync(&mut self.0);
        self
    }

    pub fn flush(mut self) -> Msgs {
        frontend::flush(&mut self.0);
        self
    }

    pub fn copy_data(mut self, data: &[u8]) -> Msgs {
        frontend::CopyData::new(data)
            .expect("copy data message")
            .write(&mut self.0);
        self
    }

    pub fn copy_done(mut self) -> Msgs {
        frontend::copy_done(&mut self.0);
        self
    }

    pub fn terminate(mut self) -> Msgs {
        frontend::terminate(&mut self.0);
        self
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// How many ReadyForQuery these messages ask for: one per Query and per Sync (outside
    /// copy-in mode).
    pub fn ready_count(&self) -> usize {
        let mut count = 0;
        let mut rest = &self.0[..];
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            count += usize::from(matches!(rest[0], b'Q' | b'S'));
            rest = &rest[(1 + len).min(rest.len())..];
        }
        count
    }
}

/// A logged-in raw connection.
pub struct Wire {
    stream: TcpStream,
    buf: BytesMut,
    /// Who this is, for messages ("directly", "through the proxy", ...).
    pub label: String,
    /// The ParameterStatus messages of the login, in order.
    pub login_params: Vec<(String, String)>,
    pub backend_key: Option<(i32, i32)>,
    closed: bool,
}

impl Wire {
    /// Connects to 127.0.0.1:`port` and logs in as `user` (SCRAM-SHA-256, MD5 or a clear-text
    /// password, whatever the server asks for, or none) to `database`, with `extra` startup
    /// parameters (`application_name`, `client_encoding`, `options`, ...). Panics if the login
    /// fails or hangs.
    pub async fn connect(
        label: &str,
        port: u16,
        user: &str,
        password: &str,
        database: &str,
        extra: &[(&str, &str)],
    ) -> Wire {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .unwrap_or_else(|_| panic!("{label}: connecting timed out"))
            .unwrap_or_else(|e| panic!("{label}: cannot connect to port {port}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let mut wire = Wire {
            stream,
            buf: BytesMut::with_capacity(8192),
            label: label.to_string(),
            login_params: Vec::new(),
            backend_key: None,
            closed: false,
        };
        let mut params = vec![("user", user), ("database", database)];
        params.extend_from_slice(extra);
        let mut startup = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut startup).expect("startup message");
        wire.write(&startup).await;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let message = wire.expect_message("logging in").await;
            let mut body = &message.body[..];
            match message.tag {
                b'R' => {
                    let code = body.get_i32();
                    let mut out = BytesMut::new();
                    match code {
                        0 => continue,
                        3 => frontend::password_message(password.as_bytes(), &mut out)
                            .expect("password message"),
                        5 => {
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                password.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)
                                .expect("password message");
                        }
                        10 => {
                            let mechanisms = cstrings(body);
                            assert!(
                                mechanisms.iter().any(|m| m == "SCRAM-SHA-256"),
                                "{label}: the server offers {mechanisms:?}, not SCRAM-SHA-256"
                            );
                            let exchange = ScramSha256::new(
                                password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                exchange.message(),
                                &mut out,
                            )
                            .expect("SASLInitialResponse");
                            scram = Some(exchange);
                        }
                        11 => {
                            let exchange = scram.as_mut().expect("SASLContinue before SASL");
                            exchange
                                .update(body)
                                .unwrap_or_else(|e| panic!("{label}: SCRAM: {e}"));
                            frontend::sasl_response(exchange.message(), &mut out)
                                .expect("SASLResponse");
                        }
                        12 => {
                            scram
                                .as_mut()
                                .expect("SASLFinal before SASL")
                                .finish(body)
                                .unwrap_or_else(|e| panic!("{label}: SCRAM: {e}"));
                            continue;
                        }
                        other => panic!("{label}: unsupported authentication request {other}"),
                    }
                    wire.write(&out).await;
                }
                b'S' => {
                    let parts = cstrings(body);
                    wire.login_params.push((
                        parts.first().cloned().unwrap_or_default(),
                        parts.get(1).cloned().unwrap_or_default(),
                    ));
                }
                b'K' => wire.backend_key = Some((body.get_i32(), body.get_i32())),
                b'Z' => return wire,
                b'E' => panic!(
                    "{label}: login refused: {:?}",
                    message.error().unwrap_or_default()
                ),
                // NoticeResponse, NegotiateProtocolVersion: nothing to do.
                _ => {}
            }
        }
    }

    /// The value a ParameterStatus gave `name` at login.
    pub fn login_param(&self, name: &str) -> Option<String> {
        self.login_params
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    async fn write(&mut self, bytes: &[u8]) {
        let label = &self.label;
        tokio::time::timeout(TIMEOUT, self.stream.write_all(bytes))
            .await
            .unwrap_or_else(|_| panic!("{label}: writing timed out"))
            .unwrap_or_else(|e| panic!("{label}: write failed: {e}"));
    }

    /// Sends `msgs` in one write.
    pub async fn send(&mut self, msgs: Msgs) {
        self.write(msgs.bytes()).await;
    }

    /// Sends `msgs` in one write, as far as the socket takes it: an error (the server closed
    /// the connection) is returned, not a panic.
    pub async fn try_send(&mut self, msgs: Msgs) -> Result<(), String> {
        match tokio::time::timeout(TIMEOUT, self.stream.write_all(msgs.bytes())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("writing timed out".into()),
        }
    }

    /// The next message, waiting at most `timeout`.
    pub async fn recv_within(&mut self, timeout: Duration) -> Result<Message, End> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                assert!(len >= 4, "{}: a message length of {len}", self.label);
                if self.buf.len() > len {
                    let mut frame = self.buf.split_to(1 + len);
                    let tag = frame[0];
                    frame.advance(5);
                    return Ok(Message {
                        tag,
                        body: frame.freeze(),
                    });
                }
            }
            if self.closed {
                return Err(End::Closed);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(End::TimedOut),
                Ok(Ok(0)) => self.closed = true,
                Ok(Ok(_)) => {}
                // A reset after the server's last message: as closed.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => self.closed = true,
                Ok(Err(e)) => return Err(End::Failed(e.to_string())),
            }
        }
    }

    async fn expect_message(&mut self, doing: &str) -> Message {
        match self.recv_within(TIMEOUT).await {
            Ok(message) => message,
            Err(end) => panic!("{}: {doing}: {end:?}", self.label),
        }
    }

    /// Reads until `done` says a message is the last one wanted (included), the connection
    /// closes, or nothing comes for [`TIMEOUT`].
    pub async fn read_until(&mut self, mut done: impl FnMut(&Message) -> bool) -> Replies {
        let mut messages = Vec::new();
        loop {
            match self.recv_within(TIMEOUT).await {
                Ok(message) => {
                    let last = done(&message);
                    messages.push(message);
                    if last {
                        return Replies {
                            messages,
                            end: End::Done,
                        };
                    }
                }
                Err(end) => return Replies { messages, end },
            }
        }
    }

    /// Reads until the `n`-th ReadyForQuery.
    pub async fn until_ready(&mut self, n: usize) -> Replies {
        let mut seen = 0;
        self.read_until(|m| {
            seen += usize::from(m.tag == b'Z');
            seen == n
        })
        .await
    }

    /// Reads until a message of type `tag`.
    pub async fn until_tag(&mut self, tag: u8) -> Replies {
        self.read_until(|m| m.tag == tag).await
    }

    /// Whatever arrives within `wait` without being asked for (a server's error before it
    /// closes the connection): ends at a close, or when nothing more comes.
    pub async fn unsolicited(&mut self, wait: Duration) -> Replies {
        let mut messages = Vec::new();
        loop {
            match self.recv_within(wait).await {
                Ok(message) => messages.push(message),
                Err(End::TimedOut) => {
                    return Replies {
                        messages,
                        end: End::Done,
                    }
                }
                Err(end) => return Replies { messages, end },
            }
        }
    }

    /// Sends `msgs` in one write, then reads until `n` ReadyForQuery.
    pub async fn exchange(&mut self, msgs: Msgs, n: usize) -> Replies {
        self.send(msgs).await;
        self.until_ready(n).await
    }

    /// Sends `msgs` in one write, then reads until the ReadyForQuery of each of its Syncs and
    /// Queries.
    pub async fn step(&mut self, msgs: Msgs) -> Replies {
        let n = msgs.ready_count();
        self.exchange(msgs, n).await
    }

    /// A simple query and its replies up to its ReadyForQuery.
    pub async fn simple(&mut self, sql: &str) -> Replies {
        self.exchange(Msgs::new().query(sql), 1).await
    }

    /// Whether the server has closed the connection (as seen by the last read).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Says goodbye and waits (briefly) for the server to close the connection.
    pub async fn terminate(mut self) {
        let _ = self.try_send(Msgs::new().terminate()).await;
        let _ = self.unsolicited(Duration::from_secs(2)).await;
    }
}
