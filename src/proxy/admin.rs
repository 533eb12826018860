//! The admin listener: `GET /metrics` (Prometheus text), `GET /status` (JSON), and, with the
//! bearer token, `POST /pause`, `POST /throttle`, `POST /switch` and `POST /resume`. A small
//! HTTP/1.1 server of its own: one request per connection, bodies bounded. The JSON requests and
//! answers are the types of `admin_api`, which the coordinator reads with.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::pool::Pool;
use super::Shared;
use crate::admin_api::{self as api, GENERATION_HEADER};

const MAX_REQUEST: usize = 16 * 1024;
/// How long a control call waits for the state store to say which generation holds the lock.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, token: Option<String>) {
    let token = Arc::new(token);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (shared, token) = (shared.clone(), token.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(shared, stream, token.as_deref()).await {
                tracing::debug!("admin request failed: {e}");
            }
        });
    }
}

struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    /// `X-Switchyard-Generation`: the migration lock's generation the coordinator holds.
    generation: Option<String>,
    body: Vec<u8>,
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        request_line.next().unwrap_or_default().to_string(),
        request_line.next().unwrap_or_default().to_string(),
    );
    let mut length = 0usize;
    let mut authorization = None;
    let mut generation = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "authorization" => authorization = Some(value.trim().to_string()),
                "x-switchyard-generation" => generation = Some(value.trim().to_string()),
                _ => {}
            }
        }
    }
    if length > MAX_REQUEST {
        return Ok(None);
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Some(Request {
        method,
        path,
        authorization,
        generation,
        body,
    }))
}

async fn handle(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    token: Option<&str>,
) -> std::io::Result<()> {
    let Some(request) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let path = request.path.split('?').next().unwrap_or_default();
    let (status, content_type, body) = match (request.method.as_str(), path) {
        ("GET", "/metrics") => (200, "text/plain; version=0.0.4", metrics_text(&shared)),
        ("GET", "/status") => (200, "application/json", json(&status(&shared))),
        ("GET", "/cache") => (
            200,
            "application/json",
            json(&shared.cache.as_ref().map(|cache| cache.report())),
        ),
        ("GET", "/shadow") => match &shared.shadow {
            Some(shadow) => (200, "application/json", json(&shadow.report())),
            None => (404, "application/json", error(SHADOW_OFF)),
        },
        ("POST", "/shadow/reset") => match (
            authorize(token, request.authorization.as_deref()),
            &shared.shadow,
        ) {
            (Err(message), _) => (
                if token.is_none() { 403 } else { 401 },
                "application/json",
                error(message),
            ),
            (Ok(()), Some(shadow)) => (200, "application/json", json(&shadow.reset())),
            (Ok(()), None) => (404, "application/json", error(SHADOW_OFF)),
        },
        ("POST", "/pause") | ("POST", "/resume") | ("POST", "/switch") | ("POST", "/throttle") => {
            match authorize(token, request.authorization.as_deref()) {
                Err(message) => (
                    if token.is_none() { 403 } else { 401 },
                    "application/json",
                    error(message),
                ),
                Ok(()) => match fenced(&shared, path, request.generation.as_deref()).await {
                    Err(refusal) => (409, "application/json", error(refusal)),
                    Ok(()) => control(&shared, path, &request.body).await,
                },
            }
        }
        _ => (404, "application/json", error("not found")),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        409 => "Conflict",
        500 => "Internal Server Error",
        _ => "Not Found",
    };
    let head = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// `/shadow` on a proxy that does not replay reads.
const SHADOW_OFF: &str =
    "shadow reads are off on this proxy: set [proxy.shadow] fraction (e.g. 0.1) in its plan and restart it";

/// An authorized control call that passed [`fenced`].
async fn control(shared: &Shared, path: &str, body: &[u8]) -> (u16, &'static str, String) {
    match path {
        "/pause" => (200, "application/json", json(&pause(shared, body).await)),
        "/switch" => switch(shared, body),
        "/throttle" => {
            throttle(shared, body);
            (200, "application/json", json(&status(shared)))
        }
        _ => {
            shared.control.resume();
            (200, "application/json", json(&status(shared)))
        }
    }
}

/// Fencing: when the proxy follows a migration's state store, a coordinator's control call
/// carries the generation of the migration's lock it holds ([`GENERATION_HEADER`]), and it
/// is accepted only while that is the lock's current generation, read from the store at this
/// call. A coordinator that lost its lock (frozen past its lease while another took over,
/// say) can then neither pause, switch nor resume anyone. A call without the header is an
/// operator's own (`curl .../pause`), as before: coordinators always send it. When the store
/// cannot be read, `/resume` and `/switch` go ahead (see below) and `/pause` is refused.
async fn fenced(shared: &Shared, path: &str, generation: Option<&str>) -> Result<(), String> {
    let Some(store) = shared.store.get().cloned() else {
        return Ok(());
    };
    let resume = path == "/resume";
    let given = match generation.map(str::parse::<u64>) {
        None => {
            tracing::info!(
                path,
                "a control call without a lock generation: an operator's"
            );
            return Ok(());
        }
        Some(Err(_)) => return Err(format!("{GENERATION_HEADER} must be a number")),
        Some(Ok(given)) => given,
    };
    let store_now = store.clone();
    // Bounded: a control call must not hang on a store that stopped answering.
    let read = tokio::time::timeout(
        STORE_CHECK_TIMEOUT,
        tokio::task::spawn_blocking(move || store_now.lock_info()),
    )
    .await
    .unwrap_or_else(|_| {
        Ok(Err(crate::state::StateError::Store {
            store: store.describe(),
            action: "read the lock",
            message: format!("no answer within {STORE_CHECK_TIMEOUT:?}"),
        }))
    });
    match read {
        Ok(Ok(Some(lock))) if lock.held && lock.generation == given => Ok(()),
        // No lock at all where this proxy looks: a file backend's lock file on the
        // coordinator's machine, not this one. Nothing to check against (a stale coordinator
        // always leaves a lock behind, so this is never one).
        Ok(Ok(None)) => {
            tracing::warn!(
                "no migration lock in {} to check generation {given} against; accepting {path}",
                store.describe()
            );
            Ok(())
        }
        Ok(Ok(Some(lock))) => Err(format!(
            "generation {given} does not hold the migration's lock ({}): a coordinator that lost its lock cannot pause, switch or resume proxies",
            if lock.held {
                format!(
                    "generation {} does, {}",
                    lock.generation,
                    lock.holder.map(|h| h.to_string()).unwrap_or_default()
                )
            } else {
                format!("it is free, at generation {}", lock.generation)
            }
        )),
        // The store unreachable: a resume is always safe, and a switch is still fenced by
        // its epoch (a coordinator that lost its lock never saved a newer one), so that a
        // cutover past its commit point can finish switching the proxies. A pause is
        // refused: a cutover that cannot reach the store cannot commit anyway.
        Ok(Err(e)) if resume || path == "/switch" => {
            tracing::warn!("cannot read the migration's lock ({e}); {path} goes ahead");
            Ok(())
        }
        Ok(Err(e)) => Err(format!(
            "cannot read the migration's lock to check this call's generation: {e}"
        )),
        Err(e) => Err(format!("cannot check this call's generation: {e}")),
    }
}

fn authorize(token: Option<&str>, header: Option<&str>) -> Result<(), &'static str> {
    let Some(token) = token else {
        return Err("control endpoints are off: set the environment variable named by [proxy] admin_token_env");
    };
    let given = header
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Constant time, so the comparison does not tell how much of a guess was right.
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err("missing or wrong bearer token")
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into())
}

/// The body of a refusal.
fn error(message: impl Into<String>) -> String {
    json(&api::ErrorAnswer {
        error: message.into(),
    })
}

/// The backend pids of the proxy's server connections, per server.
fn server_pid_lists(shared: &Shared) -> api::ServerPidLists {
    api::ServerPidLists {
        source: shared.server_pids[0].list(),
        target: shared.server_pids[1].list(),
    }
}

fn status(shared: &Shared) -> api::Status {
    let mut pools: Vec<api::PoolStatus> = shared
        .users
        .keys()
        .map(|user| {
            let (open, idle) = shared.server_connections(user);
            api::PoolStatus {
                user: user.clone(),
                server_connections: open,
                idle,
            }
        })
        .collect();
    pools.sort_by(|a, b| a.user.cmp(&b.user));
    let side = shared.backend.side();
    let workers = shared
        .shards
        .iter()
        .map(|shard| {
            let (open, idle) = shard
                .pools_on(side)
                .map(Pool::connections)
                .fold((0, 0), |(open, idle), (o, i)| (open + o, idle + i));
            api::WorkerStatus {
                clients: shard.sessions() as u64,
                server_connections: open,
                idle,
            }
        })
        .collect();
    let backend = shared.backend.current();
    api::Status {
        paused: shared.control.is_paused(),
        throttled: shared.control.throttled() as u64,
        backend: backend.backend.into(),
        epoch: backend.epoch,
        last_pause_ms: shared.control.last_pause_us() as f64 / 1000.0,
        max_pause_ms: shared.settings.max_pause.0.as_millis() as u64,
        query_wait_timeout_ms: shared.settings.query_wait_timeout.0.as_millis() as u64,
        pool_mode: shared.pool_mode().into(),
        clients: shared.clients.load(Ordering::Relaxed) as u64,
        clients_in_transaction: shared.control.active() as u64,
        clients_waiting: shared.metrics().clients_waiting.load(Ordering::Relaxed),
        server_pids: server_pid_lists(shared),
        pools,
        workers,
    }
}

/// A request's body as its type in [`api`]. A body that is not a JSON object reads as `{}`,
/// and a field of the wrong type as absent (see `admin_api`), so the defaults apply: as when
/// the requests were read untyped, a malformed one is not refused.
fn request<T: DeserializeOwned + Default>(body: &[u8]) -> T {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value @ serde_json::Value::Object(_)) => {
            serde_json::from_value(value).unwrap_or_default()
        }
        _ => T::default(),
    }
}

/// Pauses, then waits until no transaction runs or `timeout_ms` (default 5000) passes. A
/// pause while paused keeps the running pause's max_pause deadline.
async fn pause(shared: &Shared, body: &[u8]) -> api::PauseAnswer {
    let timeout_ms = request::<api::PauseRequest>(body)
        .timeout_ms
        .unwrap_or(5000);
    shared.control.pause(shared.settings.max_pause.0);
    let idle = shared
        .control
        .wait_idle(Duration::from_millis(timeout_ms))
        .await;
    // What still runs: which role, on which server backend, for how long.
    let running: Vec<api::Running> = shared
        .cancels
        .lock()
        .map(|map| {
            map.values()
                .filter_map(|slot| slot.running())
                .map(|t| api::Running {
                    user: t.user.to_string(),
                    server_pid: t.process_id,
                    running_ms: t.since.elapsed().as_millis() as u64,
                })
                .collect()
        })
        .unwrap_or_default();
    // Listed after the wait: while paused no transaction starts, so no connection opens.
    let server_pids = server_pid_lists(shared);
    api::PauseAnswer {
        paused: true,
        idle,
        clients_in_transaction: shared.control.active() as u64,
        running,
        server_pids,
    }
}

/// `{"max_active": 2, "timeout_ms": 10000}`: at most that many transactions at once until
/// `/resume` or the timeout (default: max_pause).
fn throttle(shared: &Shared, body: &[u8]) {
    let asked = request::<api::ThrottleRequest>(body);
    let max_active = asked.max_active.unwrap_or(1) as usize;
    let timeout = asked
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(shared.settings.max_pause.0);
    shared.control.throttle(max_active, timeout);
}

/// `{"backend": "target", "epoch": 3}`: where transactions go from now on. Refused (409) when
/// the proxy already has a newer epoch.
fn switch(shared: &Shared, body: &[u8]) -> (u16, &'static str, String) {
    let to = match serde_json::from_slice::<api::SwitchRequest>(body) {
        Ok(to) => super::backend::Switch {
            backend: to.backend.into(),
            epoch: to.epoch,
        },
        Err(e) => {
            let message =
                format!("expected {{\"backend\": \"source\" | \"target\", \"epoch\": N}}: {e}");
            return (400, "application/json", error(message));
        }
    };
    match shared.backend.switch(to) {
        Ok(()) => (200, "application/json", json(&status(shared))),
        Err(e @ super::backend::SwitchError::Stale { .. }) => {
            (409, "application/json", error(e.to_string()))
        }
        Err(e) => (500, "application/json", error(e.to_string())),
    }
}

fn metrics_text(shared: &Shared) -> String {
    let mut gauges = vec![
        (
            "switchyard_clients",
            "Client connections by state.",
            "{state=\"connected\"}".to_string(),
            shared.clients.load(Ordering::Relaxed) as u64,
        ),
        (
            "switchyard_clients",
            "Client connections by state.",
            "{state=\"in_transaction\"}".to_string(),
            shared.control.active() as u64,
        ),
        (
            "switchyard_paused",
            "1 while the proxy holds new transactions.",
            String::new(),
            u64::from(shared.control.is_paused()),
        ),
    ];
    for user in shared.users.keys() {
        let (open, idle) = shared.server_connections(user);
        let busy = open.saturating_sub(idle);
        gauges.push((
            "switchyard_server_connections",
            "Server connections by state.",
            format!("{{user=\"{user}\",state=\"idle\"}}"),
            u64::from(idle),
        ));
        gauges.push((
            "switchyard_server_connections",
            "Server connections by state.",
            format!("{{user=\"{user}\",state=\"active\"}}"),
            u64::from(busy),
        ));
    }
    let mut text = shared.metrics().render(&gauges);
    if let Some(cache) = &shared.cache {
        text.push_str(&cache.metrics_text());
    }
    if let Some(shadow) = &shared.shadow {
        text.push_str(&shadow_metrics(shadow));
    }
    text
}

/// Shadow reads' counters, in Prometheus text.
fn shadow_metrics(shadow: &crate::proxy::shadow::Shadow) -> String {
    let counters = &shadow.counters;
    let mut text = String::new();
    for (name, help, kind, value) in [
        (
            "switchyard_shadow_samples_total",
            "Reads replayed on the other server.",
            "counter",
            counters.samples.load(Ordering::Relaxed),
        ),
        (
            "switchyard_shadow_dropped_total",
            "Sampled reads not replayed: max_in_flight replays were running.",
            "counter",
            counters.dropped.load(Ordering::Relaxed),
        ),
        (
            "switchyard_shadow_divergences_total",
            "Replayed reads answered differently by the two servers.",
            "counter",
            counters.divergences.load(Ordering::Relaxed),
        ),
        (
            "switchyard_shadow_regressions",
            "Statement fingerprints slower on the new server past max_p95_ratio, in this window.",
            "gauge",
            shadow.regressions(),
        ),
    ] {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    text
}
