//! The proxy's admin API: what its admin listener (`proxy::admin`) answers and what the
//! coordinator (`cutover::proxies`) reads, as one set of types both sides use. A field renamed
//! on one side is then renamed on the other, or fails a test, instead of reading as 0.
//!
//! It depends on serde alone, so that the coordinator can use it without depending on the
//! proxy's internals, and the proxy without depending on the coordinator. (`pg::Side` and
//! `plan::PoolMode` convert into [`Side`] and [`PoolMode`] where they are defined.)
//!
//! The endpoints, one request per connection, JSON bodies:
//! - `GET /status`: [`Status`].
//! - `POST /pause` with a [`PauseRequest`]: [`PauseAnswer`].
//! - `POST /throttle` with a [`ThrottleRequest`]: [`Status`].
//! - `POST /switch` with a [`SwitchRequest`]: [`Status`]; 409 when the proxy has a newer epoch.
//! - `POST /resume`: [`Status`].
//! - `GET /shadow`: [`shadow::Report`], this proxy's window of shadow reads; `POST /shadow/reset`
//!   starts a new window and answers the closed one.
//! - Any refusal (400, 401, 403, 404, 409, 500): [`ErrorAnswer`].
//!
//! (`GET /metrics` is Prometheus text, not JSON, and not part of this contract.)
//!
//! The field names and their order are the JSON on the wire: a change here is a change of the
//! protocol between a proxy and a coordinator that may run different versions. A field that a
//! proxy older than the coordinator may not send has `#[serde(default)]`, with the reason; every
//! other field is required, and the coordinator refuses an answer without it (naming the proxy
//! and the field) rather than reading a default.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Which server a proxy sends transactions to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Source,
    Target,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// How a proxy lends server connections to its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection per transaction: the only mode a cutover can drain.
    Transaction,
    /// A server connection per client session.
    Session,
}

/// `GET /status`, and the answer to `/throttle`, `/switch` and `/resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub paused: bool,
    /// Transactions allowed at once while throttled before a pause (0: not throttled).
    /// Default: a proxy from before `/throttle` omits it, and is never throttled.
    #[serde(default)]
    pub throttled: u64,
    /// The server transactions go to, and the switch (`epoch`) that said so.
    pub backend: Side,
    pub epoch: u64,
    /// How long the last finished pause held new transactions, in milliseconds.
    pub last_pause_ms: f64,
    pub max_pause_ms: u64,
    pub query_wait_timeout_ms: u64,
    pub pool_mode: PoolMode,
    pub clients: u64,
    pub clients_in_transaction: u64,
    pub clients_waiting: u64,
    /// The backend pids of the proxy's server connections, per server: the cutover's fence
    /// ends every other session. Default: a proxy from before the fence spared connections by
    /// pid omits it, and then none is spared.
    #[serde(default)]
    pub server_pids: ServerPidLists,
    pub pools: Vec<PoolStatus>,
    /// Per worker thread, to see how clients and connections spread over them. Default: a
    /// proxy from before its worker threads omits it.
    #[serde(default)]
    pub workers: Vec<WorkerStatus>,
}

/// One proxy user's pool towards the current backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub user: String,
    pub server_connections: u32,
    pub idle: u32,
}

/// One worker thread: its clients, and the server connections it opened (all users).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub clients: u64,
    pub server_connections: u32,
    pub idle: u32,
}

/// The backend pids of a proxy's server connections, per server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerPidLists {
    pub source: Vec<i32>,
    pub target: Vec<i32>,
}

impl ServerPidLists {
    pub fn on(&self, side: Side) -> &[i32] {
        match side {
            Side::Source => &self.source,
            Side::Target => &self.target,
        }
    }
}

/// `POST /pause`: pause, then wait up to `timeout_ms` (the proxy's default: 5000) for running
/// transactions to finish.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseRequest {
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_ms: Option<u64>,
}

/// What `/pause` answers once no transaction runs, or its wait is over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseAnswer {
    /// Always true: the pause is on, whether or not the transactions finished.
    pub paused: bool,
    /// No session holds (or waits for) a server connection.
    pub idle: bool,
    pub clients_in_transaction: u64,
    /// The transactions still running (a session still waiting for its server connection is
    /// not listed, but makes `idle` false).
    pub running: Vec<Running>,
    /// Listed after the wait. Default: as in [`Status::server_pids`].
    #[serde(default)]
    pub server_pids: ServerPidLists,
}

/// A transaction still running after a pause's wait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// The proxy user (role) it runs as.
    pub user: String,
    /// The server backend it runs on, for `pg_cancel_backend`.
    pub server_pid: i32,
    pub running_ms: u64,
}

/// `POST /throttle`: at most `max_active` transactions at once (the proxy's default: 1) until
/// `/resume` or `timeout_ms` (default: the proxy's max_pause).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleRequest {
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_active: Option<u64>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_ms: Option<u64>,
}

/// `POST /switch`: where transactions go from now on. Refused (409) when the proxy already
/// has a newer epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
// Named `Switch` to serde, as the state's type the proxy read it as before: its 400 answer
// quotes serde's message, which names the type ("expected struct Switch").
#[serde(rename = "Switch")]
pub struct SwitchRequest {
    pub backend: Side,
    pub epoch: u64,
}

/// The body of every refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: String,
}

/// A request field of the wrong type reads as absent, so the proxy applies its default, as it
/// did when it read the requests untyped (field by field).
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ValueOrNot<T> {
        Value(T),
        Not(serde::de::IgnoredAny),
    }
    Ok(match ValueOrNot::<T>::deserialize(deserializer)? {
        ValueOrNot::Value(value) => Some(value),
        ValueOrNot::Not(_) => None,
    })
}

/// The header a coordinator's control calls carry its lock's generation in: a proxy that
/// follows the migration's state accepts a call only from the lock's current generation.
pub const GENERATION_HEADER: &str = "X-Switchyard-Generation";

#[cfg(test)]
mod tests {
    use super::*;

    /// What `GET /status` answered before these types, as the proxy wrote it (pretty).
    const STATUS: &str = r#"{
  "paused": false,
  "throttled": 0,
  "backend": "source",
  "epoch": 0,
  "last_pause_ms": 0.0,
  "max_pause_ms": 15000,
  "query_wait_timeout_ms": 30000,
  "pool_mode": "transaction",
  "clients": 2,
  "clients_in_transaction": 1,
  "clients_waiting": 0,
  "server_pids": {
    "source": [
      4242,
      4243
    ],
    "target": []
  },
  "pools": [
    {
      "user": "app",
      "server_connections": 2,
      "idle": 1
    }
  ],
  "workers": [
    {
      "clients": 1,
      "server_connections": 1,
      "idle": 0
    },
    {
      "clients": 1,
      "server_connections": 1,
      "idle": 1
    }
  ]
}"#;

    /// What `POST /pause` answered before these types, with a transaction still running.
    const PAUSE: &str = r#"{
  "paused": true,
  "idle": false,
  "clients_in_transaction": 1,
  "running": [
    {
      "user": "app",
      "server_pid": 4242,
      "running_ms": 5003
    }
  ],
  "server_pids": {
    "source": [
      4242
    ],
    "target": []
  }
}"#;

    fn status() -> Status {
        Status {
            paused: false,
            throttled: 0,
            backend: Side::Source,
            epoch: 0,
            last_pause_ms: 0.0,
            max_pause_ms: 15000,
            query_wait_timeout_ms: 30000,
            pool_mode: PoolMode::Transaction,
            clients: 2,
            clients_in_transaction: 1,
            clients_waiting: 0,
            server_pids: ServerPidLists {
                source: vec![4242, 4243],
                target: vec![],
            },
            pools: vec![PoolStatus {
                user: "app".into(),
                server_connections: 2,
                idle: 1,
            }],
            workers: vec![
                WorkerStatus {
                    clients: 1,
                    server_connections: 1,
                    idle: 0,
                },
                WorkerStatus {
                    clients: 1,
                    server_connections: 1,
                    idle: 1,
                },
            ],
        }
    }

    fn pause_answer() -> PauseAnswer {
        PauseAnswer {
            paused: true,
            idle: false,
            clients_in_transaction: 1,
            running: vec![Running {
                user: "app".into(),
                server_pid: 4242,
                running_ms: 5003,
            }],
            server_pids: ServerPidLists {
                source: vec![4242],
                target: vec![],
            },
        }
    }

    fn round_trip<T>(value: &T)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
    {
        let text = serde_json::to_string_pretty(value).expect("serialises");
        let back: T = serde_json::from_str(&text).expect("parses what it wrote");
        assert_eq!(&back, value, "{text}");
    }

    #[test]
    fn every_type_round_trips() {
        round_trip(&status());
        round_trip(&Status {
            paused: true,
            throttled: 2,
            backend: Side::Target,
            epoch: 3,
            last_pause_ms: 12.5,
            pool_mode: PoolMode::Session,
            ..status()
        });
        round_trip(&pause_answer());
        round_trip(&PauseRequest {
            timeout_ms: Some(5000),
        });
        round_trip(&PauseRequest::default());
        round_trip(&ThrottleRequest {
            max_active: Some(2),
            timeout_ms: Some(10000),
        });
        round_trip(&SwitchRequest {
            backend: Side::Target,
            epoch: 1,
        });
        round_trip(&ErrorAnswer {
            error: "not found".into(),
        });
    }

    #[test]
    fn the_json_the_proxy_writes_is_unchanged() {
        assert_eq!(
            serde_json::to_string_pretty(&status()).expect("serialises"),
            STATUS
        );
        assert_eq!(
            serde_json::to_string_pretty(&pause_answer()).expect("serialises"),
            PAUSE
        );
        // The coordinator's requests, as it wrote them with `json!`.
        assert_eq!(
            serde_json::to_string(&PauseRequest {
                timeout_ms: Some(5000)
            })
            .expect("serialises"),
            r#"{"timeout_ms":5000}"#
        );
        assert_eq!(
            serde_json::to_string(&ThrottleRequest {
                max_active: Some(2),
                timeout_ms: Some(10000)
            })
            .expect("serialises"),
            r#"{"max_active":2,"timeout_ms":10000}"#
        );
        assert_eq!(
            serde_json::to_string(&SwitchRequest {
                backend: Side::Target,
                epoch: 1
            })
            .expect("serialises"),
            r#"{"backend":"target","epoch":1}"#
        );
    }

    #[test]
    fn the_json_the_proxy_wrote_before_parses() {
        assert_eq!(
            serde_json::from_str::<Status>(STATUS).expect("parses"),
            status()
        );
        assert_eq!(
            serde_json::from_str::<PauseAnswer>(PAUSE).expect("parses"),
            pause_answer()
        );
        let idle: PauseAnswer = serde_json::from_str(
            r#"{"paused": true, "idle": true, "clients_in_transaction": 0, "running": [], "server_pids": {"source": [], "target": [7]}}"#,
        )
        .expect("parses");
        assert!(idle.idle && idle.running.is_empty());
        assert_eq!(idle.server_pids.on(Side::Target), [7]);
        // A whole number where a fraction may stand.
        let status: Status =
            serde_json::from_str(&STATUS.replace("\"last_pause_ms\": 0.0", "\"last_pause_ms\": 3"))
                .expect("parses");
        assert_eq!(status.last_pause_ms, 3.0);
        for error in [
            r#"{"error": "not found"}"#,
            r#"{"error": "missing or wrong bearer token"}"#,
            r#"{"error": "control endpoints are off: set the environment variable named by [proxy] admin_token_env"}"#,
            r#"{"error": "expected {\"backend\": \"source\" | \"target\", \"epoch\": N}: missing field `epoch` at line 1 column 21"}"#,
            r#"{"error": "switch epoch 1 is older than this proxy's epoch 2: a newer coordinator has switched it since"}"#,
        ] {
            let answer: ErrorAnswer = serde_json::from_str(error).expect("parses");
            assert!(!answer.error.is_empty());
        }
    }

    #[test]
    fn an_older_proxy_may_omit_the_newer_fields() {
        let mut old: serde_json::Value = serde_json::from_str(STATUS).expect("parses");
        let fields = old.as_object_mut().expect("an object");
        for newer in ["throttled", "server_pids", "workers"] {
            fields.remove(newer);
        }
        let status: Status = serde_json::from_value(old).expect("parses");
        assert_eq!(status.throttled, 0);
        assert_eq!(status.server_pids, ServerPidLists::default());
        assert!(status.workers.is_empty());

        let pause: PauseAnswer = serde_json::from_str(
            r#"{"paused": true, "idle": true, "clients_in_transaction": 0, "running": []}"#,
        )
        .expect("parses");
        assert!(pause.server_pids.on(Side::Source).is_empty());
    }

    #[test]
    fn a_missing_required_field_is_an_error_that_names_it() {
        for required in [
            "paused",
            "backend",
            "max_pause_ms",
            "pool_mode",
            "last_pause_ms",
        ] {
            let mut value: serde_json::Value = serde_json::from_str(STATUS).expect("parses");
            value.as_object_mut().expect("an object").remove(required);
            let error = serde_json::from_value::<Status>(value)
                .expect_err("a required field is missing")
                .to_string();
            assert!(error.contains(required), "{error}");
        }
        let error = serde_json::from_str::<PauseAnswer>(
            r#"{"paused": true, "idle": false, "clients_in_transaction": 1, "running": [{"user": "app", "running_ms": 1}]}"#,
        )
        .expect_err("server_pid is missing")
        .to_string();
        assert!(error.contains("server_pid"), "{error}");
    }

    #[test]
    fn a_request_field_of_the_wrong_type_reads_as_absent() {
        let throttle: ThrottleRequest =
            serde_json::from_str(r#"{"max_active": 2, "timeout_ms": "soon"}"#).expect("parses");
        assert_eq!(throttle.max_active, Some(2));
        assert_eq!(throttle.timeout_ms, None);
        for timeout in ["-1", "1.5", "null", "[1]", "{}", "\"5\""] {
            let pause: PauseRequest =
                serde_json::from_str(&format!(r#"{{"timeout_ms": {timeout}}}"#)).expect("parses");
            assert_eq!(pause.timeout_ms, None, "{timeout}");
        }
        let pause: PauseRequest = serde_json::from_str("{}").expect("parses");
        assert_eq!(pause.timeout_ms, None);
        let pause: PauseRequest =
            serde_json::from_str(r#"{"timeout_ms": 250, "other": true}"#).expect("parses");
        assert_eq!(pause.timeout_ms, Some(250));
    }

    #[test]
    fn sides_and_pool_modes_read_as_before() {
        assert_eq!(Side::Source.to_string(), "source");
        assert_eq!(Side::Target.to_string(), "target");
        assert_eq!(
            serde_json::to_string(&PoolMode::Session).expect("serialises"),
            r#""session""#
        );
        assert!(serde_json::from_str::<Side>(r#""elsewhere""#).is_err());
    }
}

pub mod shadow;
