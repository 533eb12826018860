//! Pause, throttle and resume every proxy at once.

use super::*;
use crate::admin_api;

/// What the proxies answered to a pause.
pub(super) struct Drain {
    /// Every proxy said no session holds a server connection.
    pub(super) idle: bool,
    /// The transactions they listed as still running (a session still waiting for its
    /// server connection is not listed, but makes `idle` false).
    pub(super) running: Vec<admin_api::Running>,
    /// Each proxy's `server_pids` (per side).
    pub(super) pids: Vec<admin_api::ServerPidLists>,
}

impl Drain {
    /// The backend pids of the proxies' server connections to `side`.
    pub(super) fn server_pids(&self, side: Side) -> Vec<i32> {
        self.pids
            .iter()
            .flat_map(|pids| pids.on(side.into()))
            .copied()
            .collect()
    }
}

/// Pauses every proxy; returns the transactions still running after `drain`.
pub(super) async fn pause_all(
    proxies: &[ProxyAdmin],
    drain: Duration,
) -> Result<(Drain, String), String> {
    let answers = join_all(proxies.iter().map(|p| p.pause(drain))).await;
    let answers = first_error(answers)?;
    let idle = answers.iter().all(|a| a.idle);
    let (running, pids): (Vec<_>, Vec<_>) = answers
        .into_iter()
        .map(|a| (a.running, a.server_pids))
        .unzip();
    let running: Vec<admin_api::Running> = running.into_iter().flatten().collect();
    let text = if idle {
        format!("{} proxies paused, no transaction running", proxies.len())
    } else {
        format!("{} transactions still running", running.len().max(1))
    };
    Ok((
        Drain {
            idle,
            running,
            pids,
        },
        text,
    ))
}

/// Throttles every proxy to `max_active` transactions at once until resumed or `timeout`.
pub(super) async fn throttle_all(
    proxies: &[ProxyAdmin],
    max_active: u32,
    timeout: Duration,
) -> Result<(), String> {
    let answers = join_all(proxies.iter().map(|p| p.throttle(max_active, timeout))).await;
    first_error(answers).map(drop)
}

/// Resumes every proxy; returns the longest pause they measured, in ms.
pub(super) async fn resume_all(proxies: &[ProxyAdmin]) -> Result<(f64, String), String> {
    let answers = join_all(proxies.iter().map(|p| p.resume())).await;
    let answers = first_error(answers)?;
    let longest = answers.iter().map(|a| a.last_pause_ms).fold(0.0, f64::max);
    Ok((
        longest,
        format!("{} proxies resumed; pause {longest:.1} ms", proxies.len()),
    ))
}

pub(super) fn first_error<T>(
    answers: Vec<Result<T, proxies::ProxyAdminError>>,
) -> Result<Vec<T>, String> {
    answers
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}
