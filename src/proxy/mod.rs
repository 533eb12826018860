//! `switchyard proxy`: the PostgreSQL pooler applications connect to instead of the database.
//!
//! Clients log in with SCRAM-SHA-256 as one of the plan's `[[proxy.users]]`; the proxy logs in
//! to the current primary as the same role, so the database's own grants apply and a cutover
//! can fence application roles. Frames are forwarded as they come; only the messages a pooler
//! must understand are parsed.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cache;
mod cancel;
pub mod control;
#[cfg(test)]
pub(crate) mod harness;
mod inspect;
pub mod metrics;
pub mod pool;
pub mod protocol;
mod replies;
mod session;
mod settings;
mod setup;
pub mod shadow;
mod statements;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use cancel::{Cancel, CancelSlot, CancelTarget};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::pg::Side;
use crate::plan::{Endpoint, Plan, PoolMode, ProxySettings};
use auth::scram::Verifier;
use backend::Backend;
use control::Control;
use pool::server::ServerPids;
use pool::Pool;
use setup::{build_pool, build_shadow, reaper_rate, shard_count, shard_share};

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
    #[error("{0}")]
    Cache(String),
    #[error("cannot start a proxy worker thread: {0}")]
    Worker(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// A proxy user as the proxy needs it: the verifier its clients log in against.
pub struct User {
    pub verifier: Verifier,
    /// Which server statements this user's clients hold.
    pub statements: Arc<statements::Book>,
}

/// One worker thread of the proxy, with its own single-threaded scheduler and its own share
/// of every pool. A client is served by one shard from login to goodbye, and its server
/// connections are the shard's, so a transaction never crosses threads. Measured on 2 cores
/// shared with PostgreSQL (bench/proxy.sh: pgbench -S, pool of 10), against one tokio scheduler
/// of two workers, whose cross-thread wake-ups cost more CPU than the proxy's own work: 10-12%
/// more transactions per second at 16 clients (extended) and 64 clients, and the proxy's CPU
/// time per transaction at 1 client from 44 to 40 µs.
pub struct Shard {
    /// Per proxy user: a pool towards each server (indexed by [`Side`]); only the current
    /// backend's pool is used. Pools connect lazily, so the server that is not the backend
    /// may be down.
    pools: HashMap<String, [Pool; 2]>,
    /// Clients this shard serves now: a new client goes to the shard with the fewest.
    sessions: AtomicUsize,
    pub metrics: metrics::Metrics,
    /// Accepted clients handed to this shard's thread.
    inbox: tokio::sync::mpsc::UnboundedSender<Handover>,
}

impl Shard {
    pub fn pool(&self, user: &str, side: Side) -> Option<&Pool> {
        self.pools.get(user).map(|pools| &pools[side_index(side)])
    }

    /// Every user's pool towards `side`.
    pub fn pools_on(&self, side: Side) -> impl Iterator<Item = &Pool> {
        self.pools
            .values()
            .map(move |pools| &pools[side_index(side)])
    }

    /// Clients this shard serves now.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }
}

/// A client accepted on the listener, on its way to a shard: the socket leaves the listener's
/// scheduler and registers with the shard's.
struct Handover {
    stream: std::net::TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
}

pub(crate) fn side_index(side: Side) -> usize {
    match side {
        Side::Source => 0,
        Side::Target => 1,
    }
}

/// State shared by every session.
pub struct Shared {
    pub settings: ProxySettings,
    pub database: String,
    pub users: HashMap<String, User>,
    pub shards: Vec<Shard>,
    pub control: Control,
    /// Which server transactions go to, and the switch epoch that said so.
    pub backend: Backend,
    /// Our (process id, secret key) handed to each client → where its query runs now.
    pub cancels: Mutex<HashMap<(i32, i32), CancelSlot>>,
    pub clients: AtomicUsize,
    /// For logins as a role the proxy does not know: a verifier nobody has the password of.
    pub mock_verifier: Verifier,
    /// TLS towards clients, when `[proxy] tls_cert` and `tls_key` are set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The backend pids of the open server connections, per side (source, target).
    pub server_pids: [ServerPids; 2],
    client_slots: Arc<Semaphore>,
    shutting_down: std::sync::atomic::AtomicBool,
    /// `[proxy.cache]`, when configured.
    pub cache: Option<Arc<cache::Cache>>,
    /// `[proxy.shadow]`, when configured with a `fraction` above 0.
    pub shadow: Option<Arc<shadow::Shadow>>,
    /// The migration's state store, when the proxy runs from a plan: control calls are
    /// fenced by its lock's generation (`admin::fenced`), and the switch is followed from it.
    pub store: std::sync::OnceLock<Arc<dyn crate::state::StateStore>>,
    /// The plan's two servers (source, target), for the cache's own connections.
    endpoints: [Endpoint; 2],
}

impl Shared {
    /// Builds the pools towards both servers, a share of each for every shard (`shards`: the
    /// schedulers they run on); transactions go to `backend`'s. Nothing connects yet: the
    /// proxy starts even when a server is down and connects on first use. Returns the shards'
    /// inboxes of accepted clients.
    fn new(
        plan: &Plan,
        backend: Backend,
        shards: &[tokio::runtime::Handle],
    ) -> Result<(Shared, Vec<Inbox>), ProxyError> {
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
        let mut passwords = Vec::new();
        for user in &settings.users {
            let name = user.name.0.clone();
            let password =
                std::env::var(&user.password_env.0).map_err(|_| ProxyError::MissingPassword {
                    user: name.clone(),
                    var: user.password_env.0.clone(),
                })?;
            let verifier = Verifier::from_password(&password);
            users.insert(
                name.clone(),
                User {
                    verifier,
                    statements: Arc::default(),
                },
            );
            passwords.push((name, password));
        }
        let mut built = Vec::new();
        let mut inboxes = Vec::new();
        let server_pids = [ServerPids::default(), ServerPids::default()];
        for (index, handle) in shards.iter().enumerate() {
            // bb8 starts its reaper task on the scheduler current when a pool is built: the
            // main one, where the other timers that tend the pools run (see start_shards).
            let size = shard_share(settings.pool_size.max(1), shards.len(), index);
            let mut pools = HashMap::new();
            for (name, password) in &passwords {
                let pool_of = |endpoint, pids| {
                    build_pool(
                        &settings,
                        endpoint,
                        (name, password),
                        handle,
                        index,
                        size,
                        pids,
                    )
                };
                let pair = [
                    pool_of(&plan.source, &server_pids[0])?,
                    pool_of(&plan.target, &server_pids[1])?,
                ];
                pools.insert(name.clone(), pair);
            }
            let (inbox, receiver) = tokio::sync::mpsc::unbounded_channel();
            built.push(Shard {
                pools,
                sessions: AtomicUsize::new(0),
                metrics: metrics::Metrics::default(),
                inbox,
            });
            inboxes.push(receiver);
        }
        let cache = match &settings.cache {
            Some(cache_settings) => Some(Arc::new(
                cache::Cache::new(plan, cache_settings, shards)
                    .map_err(|e| ProxyError::Cache(e.to_string()))?,
            )),
            None => None,
        };
        let shadow = match &settings.shadow {
            Some(shadow) if shadow.fraction.0 > 0.0 => {
                Some(Arc::new(build_shadow(plan, &settings, shadow, &passwords)?))
            }
            _ => None,
        };
        let shared = Shared {
            cache,
            shadow,
            store: std::sync::OnceLock::new(),
            endpoints: [plan.source.clone(), plan.target.clone()],
            database: plan.source.url.dbname().to_string(),
            client_slots: Arc::new(Semaphore::new(settings.max_client_connections as usize)),
            settings,
            users,
            control: Control::new(shards.len()),
            backend,
            cancels: Mutex::new(HashMap::new()),
            clients: AtomicUsize::new(0),
            mock_verifier: Verifier::from_password(&format!("{:032x}", rand::random::<u128>())),
            tls,
            shards: built,
            server_pids,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        };
        Ok((shared, inboxes))
    }

    /// Server connections towards the current backend as `user`, over all shards: (open,
    /// idle).
    pub fn server_connections(&self, user: &str) -> (u32, u32) {
        let side = self.backend.side();
        self.shards
            .iter()
            .filter_map(|shard| shard.pool(user, side))
            .map(Pool::connections)
            .fold((0, 0), |(open, idle), (o, i)| (open + o, idle + i))
    }

    /// Every worker's counters added up.
    pub fn metrics(&self) -> metrics::Metrics {
        metrics::Metrics::total(self.shards.iter().map(|shard| &shard.metrics))
    }

    /// The shard with the fewest clients.
    fn least_busy_shard(&self) -> usize {
        (0..self.shards.len())
            .min_by_key(|&i| self.shards[i].sessions.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub fn pool_mode(&self) -> PoolMode {
        self.settings.pool_mode
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// The plan's endpoint of the server transactions go to now.
    pub fn primary_endpoint(&self) -> (Side, Endpoint) {
        let side = self.backend.side();
        (side, self.endpoints[side_index(side)].clone())
    }
}

/// Starts the cache's tasks on the caller's scheduler: the decisions, the invalidator, and
/// the sampling of the primary's WAL position.
fn start_cache(shared: &Arc<Shared>) {
    let Some(cache) = shared.cache.clone() else {
        return;
    };
    let primary = {
        let shared = shared.clone();
        move || shared.primary_endpoint()
    };
    tokio::spawn(cache.clone().decide_asked(primary.clone()));
    tokio::spawn(cache::invalidator::run(cache.clone(), primary.clone()));
    tokio::spawn(cache::freshness::sample(cache, primary));
}

type Inbox = tokio::sync::mpsc::UnboundedReceiver<Handover>;

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
                    match shared.client_slots.clone().try_acquire_owned() {
                        Ok(permit) => hand_over(&shared, stream, permit),
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

/// Gives an accepted client to the shard with the fewest clients.
fn hand_over(shared: &Shared, stream: tokio::net::TcpStream, permit: OwnedSemaphorePermit) {
    let index = shared.least_busy_shard();
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!("cannot hand a client to a worker: {e}");
            return;
        }
    };
    let shard = &shared.shards[index];
    shard.sessions.fetch_add(1, Ordering::Relaxed);
    if shard.inbox.send(Handover { stream, permit }).is_err() {
        shard.sessions.fetch_sub(1, Ordering::Relaxed);
        tracing::error!(shard = index, "a proxy worker has stopped; client dropped");
    }
}

/// A shard's thread: serves the clients handed to it, each in a task of its own.
async fn run_shard(shared: Arc<Shared>, index: usize, mut inbox: Inbox) {
    while let Some(Handover { stream, permit }) = inbox.recv().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => {
                    shared.clients.fetch_add(1, Ordering::Relaxed);
                    session::run(shared.clone(), index, stream).await;
                    shared.clients.fetch_sub(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!("cannot take over a client: {e}"),
            }
            shared.shards[index]
                .sessions
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    // The listener is gone (shutdown): open sessions finish their transactions until the
    // process exits.
    std::future::pending::<()>().await;
}

/// Minds the sessions waiting at the shard's pools: ends the waits past `query_wait_timeout`,
/// queues the shard's sessions that waited [`pool::SPREAD_AFTER`] at the other shards' pools
/// too (or hands them one idle there), and serves the sessions queued at this shard's pools
/// where bb8 has a connection idle or room for one. Looks every 5 ms while sessions wait,
/// every 50 ms otherwise (so spreading starts after 10 to 60 ms, and a wait ends at most 5 ms
/// late). A task of its own rather than a timer in every wait: under load most transactions
/// wait, and a timer per wait cost a transaction 1-2 µs of CPU at 16 clients.
async fn tend_waits(shared: Arc<Shared>, index: usize) {
    let mut waited = false;
    loop {
        // Looked at often only while sessions wait.
        let pace = if waited {
            pool::SPREAD_AFTER / 2
        } else {
            pool::SPREAD_AFTER * 5
        };
        tokio::time::sleep(pace).await;
        waited = false;
        for (user, pools) in &shared.shards[index].pools {
            for (side, pool) in [Side::Source, Side::Target].into_iter().zip(pools) {
                pool.expire(shared.settings.query_wait_timeout.0);
                for (since, handoff) in pool.overdue(pool::SPREAD_AFTER) {
                    waited = true;
                    for (other, shard) in shared.shards.iter().enumerate() {
                        if other == index {
                            continue;
                        }
                        let lender = shard.pool(user, side);
                        if lender.is_some_and(|lender| lender.adopt(since, &handoff)) {
                            break;
                        }
                    }
                }
                pool.serve_waiters();
                waited |= pool.has_waiters();
            }
        }
    }
}

/// Closes the shard's idle server connections that outlived `server_idle_timeout` on the
/// pools' own stacks, as often as bb8's reaper looks at its idle ones.
async fn trim_pools(shared: Arc<Shared>, index: usize) {
    let mut every = tokio::time::interval(reaper_rate(shared.settings.server_idle_timeout.0));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        for pool in shared.shards[index].pools.values().flatten() {
            pool.trim();
        }
    }
}

/// Starts the shards' threads, each on a single-threaded scheduler of its own, and, on the
/// caller's scheduler, the tasks that tend their pools.
///
/// Those tasks (and bb8's reapers) run here rather than on the shards' threads: with no timer
/// of its own, a shard's thread parks in `epoll_wait` without a timeout (no kernel timer to
/// arm and cancel), and tokio has no deadline to work out of its timer wheel, on every park:
/// twice per transaction at 1 client. In alternating runs at 1 client (bench/proxy.sh's
/// setup, AMD EPYC VM, 2 cores) that was worth about 1% TPS, less than a single run's noise.
fn start_shards(plan: &Plan, backend: Backend) -> Result<Arc<Shared>, ProxyError> {
    let count = shard_count(&plan.proxy);
    let runtimes = (0..count)
        .map(|_| {
            // IO and time. (With the crate's `signal` and `process` features, tokio's IO driver
            // brings their drivers along: a park also looks for orphaned child processes.)
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(ProxyError::Worker)?;
    let handles: Vec<_> = runtimes.iter().map(|r| r.handle().clone()).collect();
    let (shared, inboxes) = Shared::new(plan, backend, &handles)?;
    let shared = Arc::new(shared);
    for (index, (runtime, inbox)) in runtimes.into_iter().zip(inboxes).enumerate() {
        tokio::spawn(trim_pools(shared.clone(), index));
        tokio::spawn(tend_waits(shared.clone(), index));
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("proxy-worker-{index}"))
            .spawn(move || runtime.block_on(run_shard(shared, index, inbox)))
            .map_err(ProxyError::Worker)?;
    }
    start_cache(&shared);
    if let Some(shadow) = shared.shadow.clone() {
        tokio::spawn(shadow.run());
    }
    tracing::debug!(workers = count, "proxy workers started");
    Ok(shared)
}

/// Runs the proxy for `plan` in front of `primary` until SIGTERM or Ctrl-C: the client
/// listener, the admin listener, and the graceful shutdown.
pub async fn run(
    plan: &Plan,
    backend: Backend,
    store: Option<Arc<dyn crate::state::StateStore>>,
) -> Result<(), ProxyError> {
    let shared = start_shards(plan, backend)?;
    if let Some(store) = store {
        let _ = shared.store.set(store.clone());
        tokio::spawn(follow_store(shared.clone(), store));
    }
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

/// How often a proxy reads the switch from the state store.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads the switch from the state store every [`FOLLOW_EVERY`] and takes a newer one: a proxy
/// that was down or unreachable during a cutover, or one added to the fleet later, comes to the
/// side the migration is on without a coordinator calling it.
async fn follow_store(shared: Arc<Shared>, store: Arc<dyn crate::state::StateStore>) {
    let mut failing = false;
    loop {
        tokio::time::sleep(FOLLOW_EVERY).await;
        let read = store.clone();
        match tokio::task::spawn_blocking(move || read.switch()).await {
            Ok(Ok(Some(switch))) => {
                failing = false;
                if switch.epoch > shared.backend.epoch() {
                    tracing::info!(backend = %switch.backend, epoch = switch.epoch, "the migration's state has a newer switch; following it");
                    if let Err(e) = shared.backend.switch(switch) {
                        tracing::warn!("cannot follow the state's switch: {e}");
                    }
                }
            }
            Ok(Ok(None)) => failing = false,
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(
                    "cannot read the switch from the migration's state ({e}); keeping epoch {}",
                    shared.backend.epoch()
                );
            }
            _ => {}
        }
    }
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
