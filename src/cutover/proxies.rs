//! The coordinator's side of the proxies' admin listeners: status, pause, switch, resume.
//! A small HTTP/1.1 client of its own (one request per connection, `Connection: close`), the
//! counterpart of `proxy::admin`; the bodies are the types of `admin_api`.

use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::admin_api as api;
use crate::plan::Plan;
use crate::state::Switch;

/// A shadow-read report with its examples and plans can run to a few megabytes.
const MAX_RESPONSE: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ProxyAdmin {
    /// `host:port`, as written in the plan.
    pub address: String,
    token: Option<String>,
    /// The generation of the migration's lock this coordinator holds, sent with every control
    /// call: a proxy that follows the state refuses any other (`proxy::admin`).
    generation: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("proxy {address}: {message}")]
pub struct ProxyAdminError {
    pub address: String,
    pub message: String,
    /// The proxy answered, but not in the shape of `admin_api` (a field missing, say): not a
    /// matter of reaching it.
    pub mismatch: bool,
}

/// Asks every proxy of the plan for its window of shadow reads, all at once, and merges them,
/// judged by the plan's `[proxy.shadow]` thresholds. A proxy that does not answer fails the
/// whole report: a window without one of the proxies would pass for the fleet's. `reset`
/// starts a new window on every proxy (the report is then of the windows that ended).
pub async fn gather_shadow(plan: &Plan, reset: bool) -> Result<api::shadow::Report, String> {
    let admins = from_plan(plan)?;
    let answers = futures_util::future::join_all(admins.iter().map(|a| a.shadow(reset))).await;
    let mut reports = Vec::new();
    for (admin, answer) in admins.iter().zip(answers) {
        let report = answer.map_err(|e| {
            format!(
                "{e}: every proxy of the plan must answer for the report to stand for the fleet"
            )
        })?;
        reports.push((admin.address.clone(), report));
    }
    let thresholds = plan.proxy.shadow.clone().unwrap_or_default().thresholds();
    Ok(api::shadow::Report::merge(thresholds, reports))
}

/// The proxies named in `[[cutover.proxies]]`, or the plan's own `[proxy] admin_listen`.
pub fn from_plan(plan: &Plan) -> Result<Vec<ProxyAdmin>, String> {
    let default_token = &plan.proxy.admin_token_env.0;
    let token = |var: &str| std::env::var(var).ok().filter(|t| !t.is_empty());
    if plan.cutover.proxies.is_empty() {
        return Ok(vec![ProxyAdmin {
            address: plan.proxy.admin_listen.0.to_string(),
            token: token(default_token),
            generation: None,
        }]);
    }
    plan.cutover
        .proxies
        .iter()
        .map(|p| {
            let url = p.admin_url.0.trim_end_matches('/');
            let address = url.strip_prefix("http://").ok_or_else(|| {
                format!("[[cutover.proxies]] admin_url {url:?} must look like http://host:port")
            })?;
            if address.contains('/') || !address.contains(':') {
                return Err(format!(
                    "[[cutover.proxies]] admin_url {url:?} must look like http://host:port"
                ));
            }
            let var = p.token_env.as_ref().map_or(default_token, |v| &v.0);
            Ok(ProxyAdmin {
                address: address.to_string(),
                token: token(var),
                generation: None,
            })
        })
        .collect()
}

impl ProxyAdmin {
    /// Control calls from now on carry `generation`, the lock this coordinator holds.
    pub fn fenced_by(mut self, generation: u64) -> ProxyAdmin {
        self.generation = Some(generation);
        self
    }

    fn error(&self, message: impl Into<String>) -> ProxyAdminError {
        ProxyAdminError {
            address: self.address.clone(),
            message: message.into(),
            mismatch: false,
        }
    }

    pub async fn status(&self, timeout: Duration) -> Result<api::Status, ProxyAdminError> {
        let body = self.request("GET", "/status", "", timeout).await?;
        self.decode("GET", "/status", &body)
    }

    /// Pauses and waits up to `drain` for running transactions to finish. The answer says
    /// whether they did (`idle`) and lists those still running.
    pub async fn pause(&self, drain: Duration) -> Result<api::PauseAnswer, ProxyAdminError> {
        let body = to_json(&api::PauseRequest {
            timeout_ms: Some(drain.as_millis() as u64),
        });
        let answer = self
            .request("POST", "/pause", &body, drain + Duration::from_secs(5))
            .await?;
        self.decode("POST", "/pause", &answer)
    }

    /// At most `max_active` transactions at once, until resumed or `timeout`. The answer (the
    /// proxy's status) is not read.
    pub async fn throttle(
        &self,
        max_active: u32,
        timeout: Duration,
    ) -> Result<(), ProxyAdminError> {
        let body = to_json(&api::ThrottleRequest {
            max_active: Some(u64::from(max_active)),
            timeout_ms: Some(timeout.as_millis() as u64),
        });
        self.request("POST", "/throttle", &body, Duration::from_secs(5))
            .await
            .map(drop)
    }

    /// The answer (the proxy's status) is not read: a switch the proxy made must not count as
    /// failed over a field the coordinator has no use for.
    pub async fn switch(&self, to: Switch) -> Result<(), ProxyAdminError> {
        let body = to_json(&api::SwitchRequest {
            backend: to.backend.into(),
            epoch: to.epoch,
        });
        self.request("POST", "/switch", &body, Duration::from_secs(5))
            .await
            .map(drop)
    }

    pub async fn resume(&self) -> Result<api::Status, ProxyAdminError> {
        let body = self
            .request("POST", "/resume", "", Duration::from_secs(5))
            .await?;
        self.decode("POST", "/resume", &body)
    }

    /// The proxy's window of shadow reads (`GET /shadow`); with `reset`, the window that
    /// ends as a new one starts (`POST /shadow/reset`).
    pub async fn shadow(&self, reset: bool) -> Result<api::shadow::Report, ProxyAdminError> {
        let (method, path) = if reset {
            ("POST", "/shadow/reset")
        } else {
            ("GET", "/shadow")
        };
        let body = self
            .request(method, path, "", Duration::from_secs(10))
            .await?;
        self.decode(method, path, &body)
    }

    fn mismatch(&self, method: &str, path: &str, detail: &str) -> ProxyAdminError {
        let message = format!(
            "{method} {path}: the answer does not match this coordinator's admin API ({detail}): run the proxy and the coordinator from the same switchyard version (`switchyard --version`)"
        );
        ProxyAdminError {
            mismatch: true,
            ..self.error(message)
        }
    }

    /// Sends one request; returns the body of a 200 answer.
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<String, ProxyAdminError> {
        let exchange = async {
            let mut stream = TcpStream::connect(&self.address)
                .await
                .map_err(|e| self.error(format!("cannot connect to the admin listener: {e}")))?;
            let _ = stream.set_nodelay(true);
            let authorization = self
                .token
                .as_ref()
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            let generation = self
                .generation
                .map(|g| format!("{}: {g}\r\n", crate::admin_api::GENERATION_HEADER))
                .unwrap_or_default();
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\n{authorization}{generation}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                self.address,
                body.len()
            );
            stream
                .write_all(format!("{head}{body}").as_bytes())
                .await
                .map_err(|e| self.error(format!("cannot send {method} {path}: {e}")))?;
            let mut response = Vec::new();
            (&mut stream)
                .take(MAX_RESPONSE as u64)
                .read_to_end(&mut response)
                .await
                .map_err(|e| self.error(format!("no answer to {method} {path}: {e}")))?;
            Ok(response)
        };
        let response = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| self.error(format!("{method} {path}: no answer within {timeout:?}")))??;
        self.parse(method, path, &response)
    }

    /// The body of a 200 answer; any other status is an error with the proxy's reason.
    fn parse(&self, method: &str, path: &str, response: &[u8]) -> Result<String, ProxyAdminError> {
        let text = String::from_utf8_lossy(response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| self.error(format!("{method} {path}: not an HTTP answer")))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.error(format!("{method} {path}: not an HTTP answer")))?;
        if status != 200 {
            let refusal = serde_json::from_str::<api::ErrorAnswer>(body).ok();
            let reason = refusal.as_ref().map_or(body.trim(), |r| r.error.as_str());
            return Err(self.error(format!("{method} {path} answered {status}: {reason}")));
        }
        Ok(body.to_string())
    }

    /// A 200 answer's body as its type in `admin_api`. An answer without a field the type
    /// requires is refused, naming the field: read as a default, a renamed field would pass
    /// for a 0 (a max_pause of 0, say) instead of showing that the versions differ.
    fn decode<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<T, ProxyAdminError> {
        let mismatch = |detail: String| self.mismatch(method, path, &detail);
        // Through a `Value`, so that serde's message has no line and column to confuse with
        // the field's place, which the path gives.
        let value: serde_json::Value =
            serde_json::from_str(body).map_err(|e| mismatch(format!("not JSON: {e}")))?;
        serde_path_to_error::deserialize(value).map_err(|e| {
            let at = e.path().to_string();
            let inner = e.into_inner();
            mismatch(if at == "." {
                inner.to_string()
            } else {
                format!("{inner} at `{at}`")
            })
        })
    }
}

/// A request body. Serialising these types cannot fail (no maps with non-string keys).
fn to_json<T: serde::Serialize>(request: &T) -> String {
    serde_json::to_string(request).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy() -> ProxyAdmin {
        ProxyAdmin {
            address: "127.0.0.1:6433".into(),
            token: None,
            generation: None,
        }
    }

    fn answer(status: &str, body: &str) -> Vec<u8> {
        format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
    }

    const STATUS: &str = r#"{"paused": true, "throttled": 0, "backend": "source", "epoch": 0, "last_pause_ms": 0.0,
        "max_pause_ms": 15000, "query_wait_timeout_ms": 30000, "pool_mode": "transaction", "clients": 0,
        "clients_in_transaction": 0, "clients_waiting": 0, "server_pids": {"source": [], "target": []},
        "pools": [], "workers": []}"#;

    #[test]
    fn a_status_answer_reads_as_the_contract_type() {
        let p = proxy();
        let body = p
            .parse("GET", "/status", &answer("200 OK", STATUS))
            .expect("a 200 answer");
        let status: api::Status = p.decode("GET", "/status", &body).expect("decodes");
        assert!(status.paused);
        assert_eq!(status.max_pause_ms, 15000);
        assert_eq!(status.pool_mode, api::PoolMode::Transaction);
    }

    #[test]
    fn a_missing_field_names_the_proxy_and_the_field() {
        let p = proxy();
        let renamed = STATUS.replace("\"max_pause_ms\"", "\"max_pause\"");
        let e = p
            .decode::<api::Status>("GET", "/status", &renamed)
            .expect_err("max_pause_ms is missing");
        assert!(e.mismatch);
        let message = e.to_string();
        assert!(
            message.starts_with("proxy 127.0.0.1:6433: GET /status:"),
            "{message}"
        );
        assert!(
            message.contains("missing field `max_pause_ms`"),
            "{message}"
        );
        assert!(message.contains("switchyard --version"), "{message}");

        let e = p
            .decode::<api::PauseAnswer>(
                "POST",
                "/pause",
                r#"{"paused": true, "idle": false, "clients_in_transaction": 1, "running": [{"user": "app", "server_pid": "x", "running_ms": 1}]}"#,
            )
            .expect_err("server_pid is not a number");
        assert!(e.to_string().contains("at `running[0].server_pid`"), "{e}");

        let e = p
            .decode::<api::Status>("GET", "/status", "<html>")
            .expect_err("not JSON");
        assert!(e.to_string().contains("not JSON"), "{e}");
    }

    #[test]
    fn a_refusal_gives_the_proxy_s_reason() {
        let p = proxy();
        let e = p
            .parse(
                "POST",
                "/switch",
                &answer(
                    "409 Conflict",
                    r#"{"error": "switch epoch 1 is older than this proxy's epoch 2"}"#,
                ),
            )
            .expect_err("a 409");
        assert!(!e.mismatch);
        assert_eq!(
            e.to_string(),
            "proxy 127.0.0.1:6433: POST /switch answered 409: switch epoch 1 is older than this proxy's epoch 2"
        );
        let e = p
            .parse(
                "GET",
                "/status",
                &answer("502 Bad Gateway", "upstream gone\n"),
            )
            .expect_err("a 502");
        assert_eq!(
            e.to_string(),
            "proxy 127.0.0.1:6433: GET /status answered 502: upstream gone"
        );
    }
}
