//! `switchyard proxy`: the PostgreSQL pooler applications connect to instead of the database.
//!
//! Clients log in with SCRAM-SHA-256 as one of the plan's `[[proxy.users]]`; the proxy logs in
//! to the current primary as the same role, so the database's own grants apply and a cutover
//! can fence application roles. Frames are forwarded as they come; only the messages a pooler
//! must understand are parsed.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod control;
pub mod metrics;
pub mod pool;
pub mod protocol;
mod session;
mod settings;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::pg::Side;
use crate::plan::{Endpoint, Plan, PoolMode, ProxySettings};
use auth::scram::Verifier;
use backend::Backend;
use control::Control;
use pool::{Pool, ServerManager, ServerTarget};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "[proxy] users is empty: add at least one [[proxy.users]] with a name and password_env"
    )]
    NoUsers,
    #[error("environment variable {var} (password of proxy user {user}) is not set")]
    MissingPassword { user: String, var: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// A proxy user as the proxy needs it: the verifier for clients and a pool towards each
/// server (indexed by [`Side`]); only the current backend's pool is used. Pools connect
/// lazily, so the server that is not the backend may be down.
pub struct User {
    pub verifier: Verifier,
    pub pools: [Pool; 2],
}

impl User {
    pub fn pool(&self, side: Side) -> &Pool {
        &self.pools[side_index(side)]
    }
}

pub(crate) fn side_index(side: Side) -> usize {
    match side {
        Side::Source => 0,
        Side::Target => 1,
    }
}

/// Where a client's query runs right now, for forwarding a CancelRequest there.
/// Also what `/pause` lists while a transaction still runs.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: std::net::SocketAddr,
    pub process_id: i32,
    pub secret_key: i32,
    pub user: Arc<str>,
    pub since: std::time::Instant,
}

/// A session's current [`CancelTarget`]: the session updates its own slot at every attach and
/// release without touching the shared map.
pub type CancelSlot = Arc<Mutex<Option<CancelTarget>>>;

/// State shared by every session.
pub struct Shared {
    pub settings: ProxySettings,
    pub database: String,
    pub users: HashMap<String, User>,
    pub control: Control,
    /// Which server transactions go to, and the switch epoch that said so.
    pub backend: Backend,
    /// Our (process id, secret key) handed to each client → where its query runs now.
    pub cancels: Mutex<HashMap<(i32, i32), CancelSlot>>,
    pub clients: AtomicUsize,
    pub metrics: metrics::Metrics,
    /// For logins as a role the proxy does not know: a verifier nobody has the password of.
    pub mock_verifier: Verifier,
    /// TLS towards clients, when `[proxy] tls_cert` and `tls_key` are set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    client_slots: Arc<Semaphore>,
    shutting_down: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Builds the pools towards both servers; transactions go to `backend`'s. Nothing
    /// connects yet: the proxy starts even when a server is down and connects on first use.
    pub fn new(plan: &Plan, backend: Backend) -> Result<Shared, ProxyError> {
        let settings = plan.proxy.clone();
        if settings.users.is_empty() {
            return Err(ProxyError::NoUsers);
        }
        let tls = match (&settings.tls_cert, &settings.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(&cert.0, &key.0)?),
            (None, None) => None,
            _ => {
                return Err(ProxyError::Tls(
                    "set both [proxy] tls_cert and tls_key, or neither".into(),
                ))
            }
        };
        let mut users = HashMap::new();
        for user in &settings.users {
            let name = user.name.0.clone();
            let password =
                std::env::var(&user.password_env.0).map_err(|_| ProxyError::MissingPassword {
                    user: name.clone(),
                    var: user.password_env.0.clone(),
                })?;
            let pools = [
                build_pool(&settings, &plan.source, &name, &password)?,
                build_pool(&settings, &plan.target, &name, &password)?,
            ];
            users.insert(
                name,
                User {
                    verifier: Verifier::from_password(&password),
                    pools,
                },
            );
        }
        Ok(Shared {
            database: plan.source.url.dbname().to_string(),
            client_slots: Arc::new(Semaphore::new(settings.max_client_connections as usize)),
            settings,
            users,
            control: Control::default(),
            backend,
            cancels: Mutex::new(HashMap::new()),
            clients: AtomicUsize::new(0),
            metrics: metrics::Metrics::default(),
            mock_verifier: Verifier::from_password(&format!("{:032x}", rand::random::<u128>())),
            tls,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn pool_mode(&self) -> PoolMode {
        self.settings.pool_mode
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// A pool of connections to `endpoint`'s server as the proxy user `user`.
fn build_pool(
    settings: &ProxySettings,
    endpoint: &Endpoint,
    user: &str,
    password: &str,
) -> Result<Pool, ProxyError> {
    let url = &endpoint.url;
    let server_tls = match url.config().get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => None,
        mode => Some(pool::server::ServerTls {
            connector: tls::connector()?,
            name: tls::server_name(&url.host())?,
            required: mode == tokio_postgres::config::SslMode::Require,
        }),
    };
    let target = ServerTarget {
        host: url.host(),
        port: url.port(),
        database: url.dbname().to_string(),
        user: user.to_string(),
        password: password.to_string(),
        application_name: "switchyard-proxy".into(),
        tls: server_tls,
    };
    let manager = ServerManager {
        target: Arc::new(target),
        connect_timeout: settings.server_connect_timeout.0,
    };
    Ok(bb8::Pool::builder()
        .max_size(settings.pool_size.max(1))
        .min_idle(None)
        .connection_timeout(settings.query_wait_timeout.0)
        .idle_timeout(Some(settings.server_idle_timeout.0))
        .max_lifetime(None)
        .test_on_check_out(false)
        .build_unchecked(manager))
}

/// Accepts clients until `shutdown` resolves, then lets sessions finish their transactions up
/// to `[proxy] shutdown_timeout`.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    match shared.client_slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tokio::spawn(async move {
                                shared.clients.fetch_add(1, Ordering::Relaxed);
                                session::run(shared.clone(), stream).await;
                                shared.clients.fetch_sub(1, Ordering::Relaxed);
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "max_client_connections reached; refusing a client");
                            tokio::spawn(session::refuse(stream, "53300", "sorry, too many clients already"));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    shared.shutting_down.store(true, Ordering::Relaxed);
    tracing::info!("stopped accepting clients; waiting for open transactions to finish");
    if !shared
        .control
        .wait_idle(shared.settings.shutdown_timeout.0)
        .await
    {
        tracing::warn!(
            active = shared.control.active(),
            "shutdown_timeout reached with transactions still open"
        );
    }
}

/// Runs the proxy for `plan` in front of `primary` until SIGTERM or Ctrl-C: the client
/// listener, the admin listener, and the graceful shutdown.
pub async fn run(plan: &Plan, backend: Backend) -> Result<(), ProxyError> {
    let shared = Arc::new(Shared::new(plan, backend)?);
    let listen = |addr: std::net::SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::Listen {
                addr: addr.to_string(),
                source,
            })
    };
    let clients = listen(shared.settings.listen.0).await?;
    let admin = listen(shared.settings.admin_listen.0).await?;
    let token = std::env::var(&shared.settings.admin_token_env.0)
        .ok()
        .filter(|t| !t.is_empty());
    if token.is_none() {
        tracing::warn!(
            "{} is not set: /pause and /resume are off",
            shared.settings.admin_token_env.0
        );
    }
    tracing::info!(listen = %shared.settings.listen.0, admin = %shared.settings.admin_listen.0, backend = %shared.backend.side(), epoch = shared.backend.epoch(), mode = ?shared.pool_mode(), "proxy ready");
    tokio::spawn(admin::serve(shared.clone(), admin, token));
    serve(shared, clients, shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
