//! What [`Shared::new`](super::Shared) builds before anything connects: each worker's share of
//! the pools towards both servers, the shadow reads' own connections, and where and as whom
//! they log in.

use std::sync::Arc;

use super::pool::server::ServerPids;
use super::pool::{self, Pool, ServerManager, ServerTarget};
use super::{shadow, tls, ProxyError};
use crate::pg::Side;
use crate::plan::{Endpoint, Plan, ProxySettings};

/// Shard `index`'s part of `total` server connections split over `shards`.
pub(super) fn shard_share(total: u32, shards: usize, index: usize) -> u32 {
    let shards = shards.max(1) as u32;
    total / shards + u32::from((index as u32) < total % shards)
}

/// How many shards: `[proxy] workers`, or one per core; never more than `pool_size`, as each
/// shard needs a server connection of its own.
///
/// One per core by default: a single proxy thread is a queue that every transaction passes
/// through twice. On 2 cores shared with PostgreSQL and pgbench (bench/proxy.sh, an AMD EPYC
/// VM), with one worker the cores sat idle 7-17% of the time at 16 clients, as with
/// PgBouncer's one thread, and with two 1-3%: 0.94-0.97x PgBouncer's TPS at 16 clients became
/// 0.99-1.12x, and 1.04-1.08x at 64 became 1.05-1.17x. The price is CPU: each worker parks and
/// wakes more often (0.48 epoll waits per transaction against 0.14), 36-45 µs per transaction
/// at 16 clients against 29-33. `workers = 1` is the setting where the proxy's CPU matters
/// more than its latency (on an Intel VM one worker did as well or better at 16 and 64
/// clients, for 3-6 µs less per transaction).
pub(super) fn shard_count(settings: &ProxySettings) -> usize {
    let wanted = match settings.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };
    wanted.clamp(1, settings.pool_size.max(1) as usize)
}

/// A pool of `size` connections to `endpoint`'s server as the proxy user `user`, for the
/// shard `shard` whose scheduler is `worker`.
pub(super) fn build_pool(
    settings: &ProxySettings,
    endpoint: &Endpoint,
    (user, password): (&str, &str),
    worker: &tokio::runtime::Handle,
    shard: usize,
    size: u32,
    pids: &ServerPids,
) -> Result<Pool, ProxyError> {
    let target = server_target(settings, endpoint, (user, password), pids)?;
    let (refusals, _) = tokio::sync::watch::channel(None);
    let manager = ServerManager {
        target: Arc::new(target),
        connect_timeout: settings.server_connect_timeout.0,
        refusals: refusals.clone(),
        shard,
    };
    let pool = bb8::Pool::builder()
        .max_size(size.max(1))
        .min_idle(None)
        .connection_timeout(settings.query_wait_timeout.0)
        .idle_timeout(Some(settings.server_idle_timeout.0))
        // bb8 looks for idle connections every 30 s by default: a short server_idle_timeout
        // would be overrun by up to that much.
        .reaper_rate(reaper_rate(settings.server_idle_timeout.0))
        .max_lifetime(None)
        .test_on_check_out(false)
        .build_unchecked(manager);
    Ok(Pool::new(
        pool,
        settings.server_idle_timeout.0,
        refusals,
        worker.clone(),
    ))
}

/// Shadow reads: their own connections for every user on both servers (not among the
/// proxy's server pids: the fence may end them; they connect again), and the slots whose
/// confirmed positions say the other server has caught up.
pub(super) fn build_shadow(
    plan: &Plan,
    settings: &ProxySettings,
    shadow: &crate::plan::ShadowSettings,
    passwords: &[(String, String)],
) -> Result<shadow::Shadow, ProxyError> {
    let pids = ServerPids::default();
    let mut targets = Vec::new();
    for (user, password) in passwords {
        for (side, endpoint) in [(Side::Source, &plan.source), (Side::Target, &plan.target)] {
            let target = server_target(settings, endpoint, (user, password), &pids)?;
            targets.push((user.clone(), side, target));
        }
    }
    let connections = shadow::replay::Connections::new(
        targets,
        shadow.pool_size,
        settings.server_connect_timeout.0,
        shadow.statement_timeout.0,
    );
    Ok(shadow::Shadow::new(
        shadow.clone(),
        connections,
        plan.replication_name(),
        plan.reverse_replication_name(),
    ))
}

/// Where and as whom the proxy's connections towards `endpoint` log in as `user`.
fn server_target(
    settings: &ProxySettings,
    endpoint: &Endpoint,
    (user, password): (&str, &str),
    pids: &ServerPids,
) -> Result<ServerTarget, ProxyError> {
    let url = &endpoint.url;
    let server_tls = match url.config().get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => None,
        mode => Some(pool::server::ServerTls {
            connector: tls::connector()?,
            name: tls::server_name(&url.host())?,
            required: mode == tokio_postgres::config::SslMode::Require,
        }),
    };
    Ok(ServerTarget {
        host: url.host(),
        port: url.port(),
        database: url.dbname().to_string(),
        user: user.to_string(),
        password: password.to_string(),
        tls: server_tls,
        pids: pids.clone(),
        max_prepared_statements: settings.max_prepared_statements as usize,
        replication: None,
    })
}

/// How often idle server connections are looked at: often enough that none outlives
/// `server_idle_timeout` by more than half of it, and never more than every 30 s.
pub(super) fn reaper_rate(idle_timeout: std::time::Duration) -> std::time::Duration {
    use std::time::Duration;
    (idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(30))
}
