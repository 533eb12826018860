//! An in-process test harness for the proxy: a whole proxy (workers, pools, sessions) in the
//! test's process, in front of scripted servers that speak enough of the protocol to be
//! pooled, so that routing, the statement registry, settings and error paths get fast unit
//! tests that need no PostgreSQL. (What needs the real server's behaviour, the differential
//! fuzzer and the fidelity tests, stays in `tests/it` against PostgreSQL.)
//!
//! A scripted server trusts every login, prepares what it is asked to, refuses a duplicate
//! named Parse (42P05) and a Bind of a statement it lacks (26000), skips to Sync after an
//! error as PostgreSQL does, answers a SELECT with one text column holding its own name and
//! the statement's text, and writes down every message it gets, per connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::backend::Backend;
use super::protocol::{backend, message, put_cstr, read_cstr, tags::*};
use crate::plan::Plan;
use crate::state::Switch;

/// One message a scripted server received, as text: `Query SET x = 1`, `Parse s1 SELECT 1`,
/// `Close S s1`, `Bind p s1`, `Describe S s1`, `Execute p`, `Sync`.
pub type Seen = (usize, String);

/// A scripted server on a 127.0.0.1 port.
pub struct ScriptedServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl ScriptedServer {
    /// Starts one; `name` is in every row it returns.
    pub async fn start(name: &'static str) -> ScriptedServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            let pids = AtomicI32::new(1000);
            let mut connection = 0;
            while let Ok((stream, _)) = listener.accept().await {
                connection += 1;
                let pid = pids.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(stream, name, connection, pid, log.clone()));
            }
        });
        ScriptedServer { addr, seen }
    }

    /// Every message received so far, on every connection, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The messages received so far that start with `prefix`.
    pub fn seen_starting(&self, prefix: &str) -> Vec<String> {
        self.seen()
            .into_iter()
            .map(|(_, text)| text)
            .filter(|text| text.starts_with(prefix))
            .collect()
    }
}

async fn read_message(stream: &mut TcpStream) -> Option<(u8, Bytes)> {
    let tag = stream.read_u8().await.ok()?;
    let len = stream.read_u32().await.ok()? as usize;
    let mut body = vec![0; len.checked_sub(4)?];
    stream.read_exact(&mut body).await.ok()?;
    Some((tag, Bytes::from(body)))
}

fn error(code: &str, text: &str) -> Bytes {
    backend::error_response("ERROR", code, text)
}

/// What a scripted connection holds.
#[derive(Default)]
struct Conn {
    statements: HashMap<String, String>,
    portals: HashMap<String, String>,
    /// Skipping to Sync after an error.
    failed: bool,
    status: u8,
}

async fn serve(
    mut stream: TcpStream,
    name: &'static str,
    connection: usize,
    pid: i32,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    // The startup packet: length, protocol, parameters; trusted. An SSLRequest first (the
    // plan's sslmode=prefer) is declined.
    loop {
        let Ok(len) = stream.read_u32().await else {
            return;
        };
        let mut startup = vec![0; (len as usize).saturating_sub(4)];
        if stream.read_exact(&mut startup).await.is_err() {
            return;
        }
        if startup.get(..4) != Some(&SSL_REQUEST[..]) {
            break;
        }
        if stream
            .write_all(&backend::refuse_encryption())
            .await
            .is_err()
        {
            return;
        }
    }
    let mut out = BytesMut::new();
    out.put_slice(&backend::authentication_ok());
    for (key, value) in [
        ("server_version", "17.0 (scripted)"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("standard_conforming_strings", "on"),
        ("integer_datetimes", "on"),
        ("application_name", ""),
    ] {
        out.put_slice(&backend::parameter_status(key, value));
    }
    out.put_slice(&backend::backend_key_data(pid, 7));
    out.put_slice(&backend::ready_for_query(IDLE));
    if stream.write_all(&out).await.is_err() {
        return;
    }
    let mut conn = Conn {
        status: IDLE,
        ..Conn::default()
    };
    while let Some((tag, body)) = read_message(&mut stream).await {
        if tag == TERMINATE {
            return;
        }
        let (text, answer) = conn.answer(name, tag, &body);
        if let Ok(mut seen) = seen.lock() {
            seen.push((connection, text));
        }
        if !answer.is_empty() && stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

impl Conn {
    /// The message as text, and the answer to it.
    fn answer(&mut self, server: &str, tag: u8, body: &[u8]) -> (String, BytesMut) {
        let mut b = body;
        let mut out = BytesMut::new();
        let text = match tag {
            QUERY => {
                let query = read_cstr(&mut b).unwrap_or_default().to_string();
                self.simple(server, &query, &mut out);
                format!("Query {query}")
            }
            SYNC => {
                self.failed = false;
                out.put_slice(&backend::ready_for_query(self.status));
                "Sync".into()
            }
            FLUSH => "Flush".into(),
            _ => {
                let text = self.extended(server, tag, &mut b, &mut out);
                if self.failed {
                    return (format!("{text} (skipped)"), BytesMut::new());
                }
                text
            }
        };
        (text, out)
    }

    fn simple(&mut self, server: &str, query: &str, out: &mut BytesMut) {
        for statement in query.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let verb = statement
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            match verb.as_str() {
                "BEGIN" => self.status = IN_TRANSACTION,
                "COMMIT" | "ROLLBACK" => self.status = IDLE,
                "DEALLOCATE" => {
                    let name = statement.split_whitespace().last().unwrap_or_default();
                    if name.eq_ignore_ascii_case("ALL") {
                        self.statements.clear();
                    } else {
                        self.statements.remove(name);
                    }
                }
                "DISCARD" => {
                    self.statements.clear();
                    self.portals.clear();
                }
                _ => {}
            }
            if verb == "SELECT" {
                out.put_slice(&row_description());
                out.put_slice(&data_row(&format!("{server}: {statement}")));
                out.put_slice(&command_complete("SELECT 1"));
            } else {
                let tag = match verb.as_str() {
                    "DISCARD" => "DISCARD ALL".to_string(),
                    other => other.to_string(),
                };
                out.put_slice(&command_complete(&tag));
            }
        }
        if query.trim().is_empty() {
            out.put_slice(&message(EMPTY_QUERY_RESPONSE, |_| {}));
        }
        out.put_slice(&backend::ready_for_query(self.status));
    }

    fn extended(&mut self, server: &str, tag: u8, b: &mut &[u8], out: &mut BytesMut) -> String {
        let first = read_cstr(b).unwrap_or_default().to_string();
        let text = match tag {
            PARSE => {
                let query = read_cstr(b).unwrap_or_default().to_string();
                let text = format!("Parse {first} {query}");
                if self.failed {
                    return text;
                }
                if !first.is_empty() && self.statements.contains_key(&first) {
                    self.fail(
                        out,
                        "42P05",
                        &format!("prepared statement \"{first}\" already exists"),
                    );
                } else {
                    self.statements.insert(first, query);
                    out.put_slice(&backend::parse_complete());
                }
                text
            }
            BIND => {
                let statement = read_cstr(b).unwrap_or_default().to_string();
                let text = format!("Bind {first} {statement}");
                if self.failed {
                    return text;
                }
                match self.statements.get(&statement) {
                    Some(query) => {
                        self.portals.insert(first, query.clone());
                        out.put_slice(&message(BIND_COMPLETE, |_| {}));
                    }
                    None => self.fail(
                        out,
                        "26000",
                        &format!("prepared statement \"{statement}\" does not exist"),
                    ),
                }
                text
            }
            DESCRIBE | CLOSE => {
                // `first` holds the kind byte and the name.
                let (kind, name) = first.split_at(first.len().min(1));
                let text = format!(
                    "{} {kind} {name}",
                    if tag == DESCRIBE { "Describe" } else { "Close" }
                );
                if self.failed {
                    return text;
                }
                if tag == CLOSE {
                    match kind {
                        "S" => self.statements.remove(name),
                        _ => self.portals.remove(name),
                    };
                    out.put_slice(&message(CLOSE_COMPLETE, |_| {}));
                    return text;
                }
                let query = match kind {
                    "S" => self.statements.get(name),
                    _ => self.portals.get(name),
                };
                match query {
                    None => self.fail(out, "26000", &format!("\"{name}\" does not exist")),
                    Some(query) => {
                        if kind == "S" {
                            out.put_slice(&message(b't', |b| b.put_i16(0)));
                        }
                        if is_select(query) {
                            out.put_slice(&row_description());
                        } else {
                            out.put_slice(&message(b'n', |_| {}));
                        }
                    }
                }
                text
            }
            EXECUTE => {
                let text = format!("Execute {first}");
                if self.failed {
                    return text;
                }
                match self.portals.get(&first).cloned() {
                    None => self.fail(out, "34000", &format!("portal \"{first}\" does not exist")),
                    Some(query) if is_select(&query) => {
                        out.put_slice(&data_row(&format!("{server}: {query}")));
                        out.put_slice(&command_complete("SELECT 1"));
                    }
                    Some(query) => {
                        let verb = query.split_whitespace().next().unwrap_or_default();
                        out.put_slice(&command_complete(&verb.to_ascii_uppercase()));
                    }
                }
                text
            }
            other => format!("message {:?}", other as char),
        };
        text
    }

    fn fail(&mut self, out: &mut BytesMut, code: &str, text: &str) {
        out.put_slice(&error(code, text));
        self.failed = true;
        if self.status == IN_TRANSACTION {
            self.status = FAILED_TRANSACTION;
        }
    }
}

fn is_select(query: &str) -> bool {
    query
        .trim_start()
        .to_ascii_uppercase()
        .starts_with("SELECT")
}

fn row_description() -> Bytes {
    message(b'T', |b| {
        b.put_i16(1);
        put_cstr(b, "text");
        b.put_u32(0);
        b.put_i16(0);
        b.put_u32(25);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(0);
    })
}

fn data_row(value: &str) -> Bytes {
    message(DATA_ROW, |b| {
        b.put_i16(1);
        b.put_i32(value.len() as i32);
        b.put_slice(value.as_bytes());
    })
}

fn command_complete(tag: &str) -> Bytes {
    message(COMMAND_COMPLETE, |b| put_cstr(b, tag))
}

const EMPTY_QUERY_RESPONSE: u8 = b'I';

/// The SSLRequest code, 1234 5679.
const SSL_REQUEST: [u8; 4] = 80877103u32.to_be_bytes();

/// A proxy running in this process in front of a scripted source and target.
pub struct InProcess {
    pub addr: SocketAddr,
    pub source: ScriptedServer,
    pub target: ScriptedServer,
    pub shared: Arc<super::Shared>,
    password: String,
    _shutdown: tokio::sync::oneshot::Sender<()>,
    _files: tempfile::TempDir,
}

impl InProcess {
    /// `proxy` is the plan's `[proxy]` section's extra lines (`pool_mode`, `pool_size`, ...).
    pub async fn start(test: &str, proxy: &str) -> InProcess {
        let source = ScriptedServer::start("source").await;
        let target = ScriptedServer::start("target").await;
        let free = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = free.local_addr().expect("local address");
        let admin = TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|l| l.local_addr())
            .expect("admin port");
        let password_env = format!("SWITCHYARD_HARNESS_{}", test.to_ascii_uppercase());
        let password = format!("pw-{test}");
        // SAFETY (edition 2021: safe): each test has its own variable.
        std::env::set_var(&password_env, &password);
        // The state and the proxy's switch file: new for each proxy (a switch file left by an
        // earlier run would route its transactions).
        let files = tempfile::tempdir().expect("a temporary folder");
        let dir = files.path();
        let text = format!(
            "name = \"harness\"\n\
             [source]\nurl = \"postgres://postgres@{s}/app\"\n\
             [target]\nurl = \"postgres://postgres@{t}/app\"\n\
             [proxy]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\nworkers = 1\n{proxy}\n\
             [[proxy.users]]\nname = \"app\"\npassword_env = \"{password_env}\"\n\
             [state]\npath = \"{state}\"\n",
            s = source.addr,
            t = target.addr,
            state = dir
                .join(format!("switchyard-harness-{test}.json"))
                .display(),
        );
        let plan = Plan::parse(&text, std::path::Path::new("harness.toml")).expect("plan");
        let backend = Backend::restore(
            Switch::default(),
            dir.join(format!("switchyard-harness-{test}.switch")),
        );
        let shared = super::start_shards(&plan, backend).expect("proxy workers");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(super::serve(shared.clone(), free, async move {
            let _ = stopped.await;
        }));
        InProcess {
            addr,
            source,
            target,
            shared,
            password,
            _shutdown: stop,
            _files: files,
        }
    }

    /// A client logged in to the proxy as the plan's user (SCRAM), with its connection task.
    pub async fn client(&self) -> tokio_postgres::Client {
        self.client_with(|_| {}).await
    }

    /// The same, with more of the client's startup settings.
    pub async fn client_with(
        &self,
        more: impl FnOnce(&mut tokio_postgres::Config),
    ) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.addr.ip().to_string())
            .port(self.addr.port())
            .user("app")
            .password(&self.password)
            .dbname("app");
        more(&mut config);
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("log in through the proxy");
        tokio::spawn(connection);
        client
    }
}
