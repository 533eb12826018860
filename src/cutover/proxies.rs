//! The coordinator's side of the proxies' admin listeners: status, pause, switch, resume.
//! A small HTTP/1.1 client of its own (one request per connection, `Connection: close`), the
//! counterpart of `proxy::admin`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::plan::Plan;
use crate::state::Switch;

const MAX_RESPONSE: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ProxyAdmin {
    /// `host:port`, as written in the plan.
    pub address: String,
    token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("proxy {address}: {message}")]
pub struct ProxyAdminError {
    pub address: String,
    pub message: String,
}

/// The proxies named in `[[cutover.proxies]]`, or the plan's own `[proxy] admin_listen`.
pub fn from_plan(plan: &Plan) -> Result<Vec<ProxyAdmin>, String> {
    let default_token = &plan.proxy.admin_token_env.0;
    let token = |var: &str| std::env::var(var).ok().filter(|t| !t.is_empty());
    if plan.cutover.proxies.is_empty() {
        return Ok(vec![ProxyAdmin {
            address: plan.proxy.admin_listen.0.to_string(),
            token: token(default_token),
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
            })
        })
        .collect()
}

impl ProxyAdmin {
    fn error(&self, message: impl Into<String>) -> ProxyAdminError {
        ProxyAdminError {
            address: self.address.clone(),
            message: message.into(),
        }
    }

    pub async fn status(&self, timeout: Duration) -> Result<serde_json::Value, ProxyAdminError> {
        self.request("GET", "/status", "", timeout).await
    }

    /// Pauses and waits up to `drain` for running transactions to finish. The answer says
    /// whether they did (`idle`) and lists those still running.
    pub async fn pause(&self, drain: Duration) -> Result<serde_json::Value, ProxyAdminError> {
        let body = serde_json::json!({ "timeout_ms": drain.as_millis() as u64 }).to_string();
        self.request("POST", "/pause", &body, drain + Duration::from_secs(5))
            .await
    }

    /// At most `max_active` transactions at once, until resumed or `timeout`.
    pub async fn throttle(
        &self,
        max_active: u32,
        timeout: Duration,
    ) -> Result<serde_json::Value, ProxyAdminError> {
        let body = serde_json::json!({ "max_active": max_active, "timeout_ms": timeout.as_millis() as u64 })
            .to_string();
        self.request("POST", "/throttle", &body, Duration::from_secs(5))
            .await
    }

    pub async fn switch(&self, to: Switch) -> Result<serde_json::Value, ProxyAdminError> {
        let body = serde_json::to_string(&to).unwrap_or_default();
        self.request("POST", "/switch", &body, Duration::from_secs(5))
            .await
    }

    pub async fn resume(&self) -> Result<serde_json::Value, ProxyAdminError> {
        self.request("POST", "/resume", "", Duration::from_secs(5))
            .await
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value, ProxyAdminError> {
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
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
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

    fn parse(
        &self,
        method: &str,
        path: &str,
        response: &[u8],
    ) -> Result<serde_json::Value, ProxyAdminError> {
        let text = String::from_utf8_lossy(response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| self.error(format!("{method} {path}: not an HTTP answer")))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.error(format!("{method} {path}: not an HTTP answer")))?;
        let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        if status != 200 {
            let reason = value["error"].as_str().unwrap_or(body.trim());
            return Err(self.error(format!("{method} {path} answered {status}: {reason}")));
        }
        Ok(value)
    }
}
