//! A session's start: encryption negotiated, the startup packet and SCRAM exchange, and the
//! first ReadyForQuery.

use super::*;

/// Says no to a client before its session starts (too many clients).
pub async fn refuse(stream: TcpStream, code: &'static str, message: &'static str) {
    let (_read, write) = tls::split_plain(stream);
    let mut writer = FramedWrite::new(write, PgCodec::typed());
    let _ = writer
        .send(backend::error_response("FATAL", code, message))
        .await;
}

/// How the connection goes on after its first packet.
pub(super) enum Negotiated {
    /// In plain text; the bytes read so far belong to the startup packet.
    Plain(Vec<u8>),
    /// The client asked for TLS and the proxy said yes.
    Tls,
}

/// Answers SSLRequest and GSSENCRequest before anything is framed: TLS, when configured,
/// wraps the raw socket.
pub(super) async fn negotiate(
    shared: &Shared,
    stream: &mut TcpStream,
) -> std::io::Result<Negotiated> {
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
    let cancel_slot = crate::proxy::CancelSlot::default();
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

impl Session {
    /// ParameterStatus, BackendKeyData and the first ReadyForQuery. Takes a server connection
    /// and applies the client's startup settings on it (a value the server refuses fails the
    /// login, as it would directly), to tell the client what its own session has: the
    /// server's defaults for the database and role, as a fresh connection reported them,
    /// and, for what the client set, the server's spelling of its values (`UTF8` where the
    /// client wrote `utf8`). The connection's current values are not the client's: another
    /// client's `SET client_encoding` was once reported to the next client of the same
    /// connection, which then decoded every string wrongly.
    pub(super) async fn welcome(&mut self) -> Result<(), Fatal> {
        self.attach(true).await?;
        let mut reported: Vec<(String, String)> = match self.server.as_ref() {
            Some(server) => server
                .defaults
                .iter()
                .map(|(name, default)| {
                    let value = match server.params.get(name) {
                        Some(value) if self.settings.wanted.contains_key(name) => value,
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
        frames.push(backend::ready_for_query(IDLE));
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
}

pub(super) struct LoggedIn {
    pub(super) user: String,
    /// The settings the startup packet asks for (name → value as SQL).
    pub(super) settings: BTreeMap<String, String>,
}

pub(super) async fn next_startup(reader: &mut ClientReader) -> Result<Option<Bytes>, Fatal> {
    match reader.next().await {
        Some(Ok(Frame::Startup(packet))) => Ok(Some(packet)),
        Some(Ok(Frame::Message(_))) => Err(Fatal::new("08P01", "expected a startup packet")),
        Some(Err(CodecError::BadLength(_))) => {
            Err(Fatal::new("08P01", "invalid length of startup packet"))
        }
        Some(Err(CodecError::Io(_))) | None => Ok(None),
    }
}

pub(super) async fn next_message(
    reader: &mut ClientReader,
    expected: u8,
) -> Result<Option<Bytes>, Fatal> {
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

pub(super) async fn login(
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
    let Some(initial) = next_message(reader, PASSWORD_MESSAGE).await? else {
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
    let Some(response) = next_message(reader, PASSWORD_MESSAGE).await? else {
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
