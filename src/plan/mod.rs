//! The plan file: what to migrate, from where to where, and how.
//!
//! Every key but `name`, `[source] url` and `[target] url` has a default; `plans/example.toml`
//! documents them all. Errors name the file, line, column and key path.

mod interpolate;
mod shadow;
mod sync;
mod values;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use interpolate::interpolate;
pub use shadow::ShadowSettings;
pub(crate) use sync::default_tables;
pub use sync::{CopyMethod, SyncSettings};
pub use values::{Dur, EnvString, Fraction, ListenAddr, PgUrl, PlanName, TablePattern};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read plan file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: PlanName,
    pub source: Endpoint,
    pub target: Endpoint,
    #[serde(default)]
    pub sync: SyncSettings,
    #[serde(default)]
    pub state: StateSettings,
    #[serde(default)]
    pub proxy: ProxySettings,
    #[serde(default)]
    pub cutover: CutoverSettings,
    /// The file the plan was read from.
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// The coordinator's own connection (a superuser).
    pub url: PgUrl,
    /// How the *other* server reaches this one, when it differs from `url`'s host and port.
    pub replication_url: Option<PgUrl>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
}

/// Where the migration's state and lock live: `[state]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    #[serde(default)]
    pub backend: StateBackend,
    /// The file backend's state file (default `.switchyard/<name>.json`).
    pub path: Option<EnvString>,
    /// The DynamoDB backend's table (one table holds any number of migrations).
    pub table: Option<EnvString>,
    /// The DynamoDB backend's region; default: the AWS chain's (`AWS_REGION`, the profile).
    pub region: Option<EnvString>,
    /// Another endpoint than AWS's (DynamoDB Local, say).
    pub endpoint_url: Option<EnvString>,
    /// How long a coordinator's lock outlives its last heartbeat (DynamoDB backend): another
    /// takes over only after seeing the heartbeat unchanged this long on its own clock.
    #[serde(default = "default_lease")]
    pub lease: Dur,
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            backend: StateBackend::File,
            path: None,
            table: None,
            region: None,
            endpoint_url: None,
            lease: default_lease(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    #[default]
    File,
    Dynamodb,
}

fn default_lease() -> Dur {
    Dur(Duration::from_secs(20))
}

/// How applications reach the database: `switchyard proxy`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    #[serde(default = "default_listen")]
    pub listen: ListenAddr,
    #[serde(default = "default_admin_listen")]
    pub admin_listen: ListenAddr,
    /// The environment variable that holds the bearer token of the control endpoints.
    #[serde(default = "default_admin_token_env")]
    pub admin_token_env: EnvString,
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// Server connections per (database, user).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Worker threads, each serving its share of the clients with its share of every pool;
    /// 0: one per core.
    #[serde(default)]
    pub workers: u32,
    #[serde(default = "default_max_client_connections")]
    pub max_client_connections: u32,
    /// Named prepared statements kept on one server connection; past it, the least recently
    /// used is closed (and prepared again if used again).
    #[serde(default = "default_max_prepared_statements")]
    pub max_prepared_statements: u32,
    /// A client waiting longer than this for a server connection gets an error.
    #[serde(default = "default_query_wait_timeout")]
    pub query_wait_timeout: Dur,
    /// Server connections idle for longer are closed.
    #[serde(default = "default_server_idle_timeout")]
    pub server_idle_timeout: Dur,
    /// Server connections idle for longer are checked with a round trip before use.
    #[serde(default = "default_server_check_delay")]
    pub server_check_delay: Dur,
    #[serde(default = "default_server_connect_timeout")]
    pub server_connect_timeout: Dur,
    /// A client that has not logged in after this long is disconnected.
    #[serde(default = "default_client_login_timeout")]
    pub client_login_timeout: Dur,
    /// A pause ends by itself after this long.
    #[serde(default = "default_max_pause")]
    pub max_pause: Dur,
    /// On SIGTERM, open transactions get this long to finish.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Dur,
    /// PEM certificate chain and key for TLS towards clients; without them, SSLRequest is
    /// answered "N".
    pub tls_cert: Option<EnvString>,
    pub tls_key: Option<EnvString>,
    #[serde(default)]
    pub users: Vec<ProxyUser>,
    /// `[proxy.cache]`: a Redis read cache; off when the section is absent.
    pub cache: Option<CacheSettings>,
    /// `[proxy.shadow]`: reads replayed on the other server and compared; off when the
    /// section is absent or its `fraction` is 0.
    pub shadow: Option<ShadowSettings>,
}

/// `[proxy.cache]`: answers to proven-cacheable reads kept in Redis, invalidated from the
/// primary's WAL and never served staler than `max_staleness` (docs/proxy.md, "Read cache").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// `redis://` or `rediss://`; a password from `${VAR}`.
    pub redis_url: EnvString,
    #[serde(default = "default_tables")]
    pub tables: Vec<TablePattern>,
    #[serde(default)]
    pub exclude: Vec<TablePattern>,
    /// Entries expire after this long even if nothing invalidated them (a backstop).
    #[serde(default = "default_cache_ttl")]
    pub ttl: Dur,
    /// Answers larger than this are not stored.
    #[serde(default = "default_max_entry_bytes")]
    pub max_entry_bytes: u64,
    /// A cached answer is served only while the invalidator has processed the primary's WAL
    /// position of this long ago.
    #[serde(default = "default_max_staleness")]
    pub max_staleness: Dur,
    /// A Redis call slower than this counts as a failure; the query goes to the database.
    #[serde(default = "default_redis_timeout")]
    pub redis_timeout: Dur,
    /// Cacheability decisions are made again after this long (role membership, ALTER ROLE:
    /// what event triggers do not see).
    #[serde(default = "default_recheck")]
    pub recheck: Dur,
    /// The invalidator's own role: REPLICATION and SELECT on the cached tables.
    pub replication_user: String,
    pub replication_password_env: EnvString,
}

impl CacheSettings {
    /// Whether `[proxy.cache] tables` / `exclude` let `schema.table` be cached.
    pub fn covers(&self, schema: &str, table: &str) -> bool {
        self.tables.iter().any(|p| p.matches(schema, table))
            && !self.exclude.iter().any(|p| p.matches(schema, table))
    }
}

fn default_cache_ttl() -> Dur {
    Dur(Duration::from_secs(300))
}

fn default_max_entry_bytes() -> u64 {
    1 << 20
}

fn default_max_staleness() -> Dur {
    Dur(Duration::from_secs(1))
}

fn default_redis_timeout() -> Dur {
    Dur(Duration::from_millis(5))
}

fn default_recheck() -> Dur {
    Dur(Duration::from_secs(10))
}

/// `switchyard cutover` and `rollback`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverSettings {
    /// The newest passing `switchyard validate` must be younger than this.
    #[serde(default = "default_validation_max_age")]
    pub validation_max_age: Dur,
    /// How long the paused proxies give running transactions to finish.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
    /// How long the new primary may take to apply the old one's last changes.
    #[serde(default = "default_catchup_timeout")]
    pub catchup_timeout: Dur,
    #[serde(default)]
    pub on_drain_timeout: OnDrainTimeout,
    /// Before the pause, the proxies let at most this many transactions run at once (for up
    /// to a few seconds) so that the new primary's apply catches up and the pause has little
    /// left to wait for; 0 turns this off.
    #[serde(default = "default_settle_max_active")]
    pub settle_max_active: u32,
    /// Every statement inside the pause runs with this `statement_timeout` (its
    /// `lock_timeout` is a fifth of it).
    #[serde(default = "default_pause_statement_timeout")]
    pub statement_timeout: Dur,
    /// The proxies to pause and switch; without any, the plan's own `[proxy] admin_listen`.
    #[serde(default)]
    pub proxies: Vec<CutoverProxy>,
    /// `shadow = { min_samples, max_divergences, max_p95_ratio }`: the cutover refuses unless
    /// the proxies' window of shadow reads meets it (opt-in).
    pub shadow: Option<crate::admin_api::shadow::Gate>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDrainTimeout {
    /// Give up the cutover: undo, resume on the old primary.
    #[default]
    Abort,
    /// Cancel running queries and roll back transactions left open; their clients get an error.
    Cancel,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverProxy {
    /// `http://host:port` of the proxy's admin listener.
    pub admin_url: EnvString,
    /// The environment variable holding its bearer token; defaults to `[proxy] admin_token_env`.
    pub token_env: Option<EnvString>,
}

impl Default for CutoverSettings {
    fn default() -> Self {
        CutoverSettings {
            validation_max_age: default_validation_max_age(),
            drain_timeout: default_drain_timeout(),
            catchup_timeout: default_catchup_timeout(),
            on_drain_timeout: OnDrainTimeout::default(),
            settle_max_active: default_settle_max_active(),
            statement_timeout: default_pause_statement_timeout(),
            proxies: Vec::new(),
            shadow: None,
        }
    }
}

fn default_settle_max_active() -> u32 {
    2
}

fn default_validation_max_age() -> Dur {
    Dur(Duration::from_secs(3600))
}

fn default_drain_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}

fn default_catchup_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

fn default_pause_statement_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}

impl ProxySettings {
    /// The application roles of `[[proxy.users]]`.
    pub fn user_names(&self) -> Vec<String> {
        self.users.iter().map(|u| u.name.0.clone()).collect()
    }
}

/// An application role: clients log in to the proxy with it, and the proxy logs in to the
/// servers as the same role with the same password.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyUser {
    pub name: EnvString,
    pub password_env: EnvString,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection per transaction.
    #[default]
    Transaction,
    /// A server connection per client session.
    Session,
}

/// The pool mode as the proxy's admin API names it.
impl From<PoolMode> for crate::admin_api::PoolMode {
    fn from(mode: PoolMode) -> Self {
        match mode {
            PoolMode::Transaction => crate::admin_api::PoolMode::Transaction,
            PoolMode::Session => crate::admin_api::PoolMode::Session,
        }
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            admin_token_env: default_admin_token_env(),
            pool_mode: PoolMode::default(),
            pool_size: default_pool_size(),
            workers: 0,
            max_client_connections: default_max_client_connections(),
            max_prepared_statements: default_max_prepared_statements(),
            query_wait_timeout: default_query_wait_timeout(),
            server_idle_timeout: default_server_idle_timeout(),
            server_check_delay: default_server_check_delay(),
            server_connect_timeout: default_server_connect_timeout(),
            client_login_timeout: default_client_login_timeout(),
            max_pause: default_max_pause(),
            shutdown_timeout: default_shutdown_timeout(),
            tls_cert: None,
            tls_key: None,
            users: Vec::new(),
            cache: None,
            shadow: None,
        }
    }
}

fn default_listen() -> ListenAddr {
    ListenAddr(std::net::SocketAddr::from(([127, 0, 0, 1], 6432)))
}

fn default_admin_listen() -> ListenAddr {
    ListenAddr(std::net::SocketAddr::from(([127, 0, 0, 1], 9187)))
}

fn default_admin_token_env() -> EnvString {
    EnvString("SWITCHYARD_ADMIN_TOKEN".into())
}

fn default_pool_size() -> u32 {
    20
}

fn default_max_client_connections() -> u32 {
    5000
}

fn default_query_wait_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}

fn default_server_idle_timeout() -> Dur {
    Dur(Duration::from_secs(600))
}

/// PgBouncer's default: enough for an application's working set of statements, few enough
/// that a server connection's memory for plans stays bounded.
fn default_max_prepared_statements() -> u32 {
    200
}

fn default_server_check_delay() -> Dur {
    Dur(Duration::from_secs(30))
}

fn default_server_connect_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

fn default_client_login_timeout() -> Dur {
    Dur(Duration::from_secs(15))
}

fn default_max_pause() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_shutdown_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}

fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

impl Plan {
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: path.to_owned(),
            source,
        })?;
        Plan::parse(&text, path)
    }

    /// Parses plan text; `path` is only used in error messages and to remember the origin.
    pub fn parse(text: &str, path: &Path) -> Result<Plan, PlanError> {
        let deserializer = toml::de::Deserializer::new(text);
        let mut plan: Plan = serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let key = err.path().to_string();
            let inner = err.into_inner();
            let (line, column) = inner
                .span()
                .map(|span| line_and_column(text, span.start))
                .unwrap_or((1, 1));
            PlanError::Invalid {
                path: path.to_owned(),
                line,
                column,
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: inner.message().trim().to_string(),
            }
        })?;
        plan.path = path.to_owned();
        plan.check_state(text)?;
        Ok(plan)
    }

    /// What the types cannot say about `[state]`: the DynamoDB backend needs its table, and a
    /// lease shorter than a second leaves a heartbeat no time to land.
    fn check_state(&self, text: &str) -> Result<(), PlanError> {
        let problem = if self.state.backend == StateBackend::Dynamodb && self.state.table.is_none()
        {
            Some((
                "state.table",
                "backend = \"dynamodb\" needs the table's name: table = \"switchyard-state\" (create it with `switchyard state init`)",
            ))
        } else if self.state.lease.0 < Duration::from_secs(1) {
            Some((
                "state.lease",
                "the lease must be at least \"1s\": a heartbeat goes out every third of it",
            ))
        } else {
            None
        };
        let Some((key, message)) = problem else {
            return Ok(());
        };
        let line = text
            .lines()
            .position(|l| l.trim_start().starts_with("[state]"))
            .map_or(1, |i| i + 1);
        Err(PlanError::Invalid {
            path: self.path.clone(),
            line,
            column: 1,
            key: key.into(),
            message: message.into(),
        })
    }

    /// Where the migration's state lives: `[state] path`, or `.switchyard/<name>.json` in the
    /// current directory.
    pub fn state_path(&self) -> PathBuf {
        match &self.state.path {
            Some(EnvString(path)) => PathBuf::from(path),
            None => PathBuf::from(".switchyard").join(format!("{}.json", self.name.0)),
        }
    }

    /// Where a proxy keeps the backend it was last switched to: next to the state file, one
    /// per admin listener, so that two proxies on one machine keep their own.
    pub fn proxy_switch_path(&self) -> PathBuf {
        let state = self.state_path();
        let file = format!(
            "{}.proxy-{}.json",
            state
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("switchyard"),
            self.proxy.admin_listen.0.port()
        );
        state.with_file_name(file)
    }

    /// The publication on the source, the slot it feeds and the subscription on the target all
    /// share one name, so that a crashed run can find what it created.
    pub fn replication_name(&self) -> String {
        format!("switchyard_{}", self.name.0)
    }

    /// The way back's publication, slot and subscription (target → source, after the
    /// cutover): the replication name with `_back`.
    pub fn reverse_replication_name(&self) -> String {
        format!("{}_back", self.replication_name())
    }

    pub fn selects(&self, schema: &str, table: &str) -> bool {
        self.sync.tables.iter().any(|p| p.matches(schema, table))
            && !self.sync.exclude.iter().any(|p| p.matches(schema, table))
    }
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "shop"
[source]
url = "postgres://migrator@db-old:5432/shop"
[target]
url = "postgres://migrator@db-new:5432/shop"
"#;

    fn parse(text: &str) -> Result<Plan, PlanError> {
        Plan::parse(text, Path::new("plans/shop.toml"))
    }

    #[test]
    fn minimal_plan_gets_defaults() {
        let plan = parse(MINIMAL).unwrap();
        assert_eq!(plan.sync.max_lag_bytes, 1024 * 1024);
        assert_eq!(plan.state_path(), PathBuf::from(".switchyard/shop.json"));
        assert!(plan.selects("public", "orders"));
        assert!(!plan.selects("audit", "log"));
        assert_eq!(plan.replication_name(), "switchyard_shop");
    }

    #[test]
    fn a_dynamodb_state_without_its_table_or_with_a_tiny_lease_names_the_key() {
        let text = format!("{MINIMAL}[state]\nbackend = \"dynamodb\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("plans/shop.toml:7:1: key `state.table`"),
            "{err}"
        );
        assert!(err.contains("switchyard state init"), "{err}");
        let text =
            format!("{MINIMAL}[state]\nbackend = \"dynamodb\"\ntable = \"t\"\nlease = \"500ms\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("key `state.lease`"), "{err}");
        let text = format!("{MINIMAL}[state]\nbackend = \"dynamodb\"\ntable = \"t\"\n");
        let plan = parse(&text).unwrap();
        assert_eq!(plan.state.backend, StateBackend::Dynamodb);
        assert_eq!(plan.state.lease, Dur(Duration::from_secs(20)));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = format!("{MINIMAL}[sync]\nmax_lag = 5\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("plans/shop.toml:8:1:"), "{err}");
        assert!(err.contains("sync"), "{err}");
        assert!(err.contains("max_lag"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = format!("{MINIMAL}[sync]\nmax_lag_bytes = \"big\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains(":8:17:"), "{err}");
        assert!(err.contains("sync.max_lag_bytes"), "{err}");
    }

    #[test]
    fn bad_url_and_duration_are_reported_at_their_key() {
        let text = MINIMAL.replace("postgres://migrator@db-new:5432/shop", "postgres://db-new");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("target.url"), "{err}");
        assert!(err.contains(":6:7:"), "{err}");

        let text = format!("{MINIMAL}[sync]\npoll_interval = \"soon\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("sync.poll_interval"), "{err}");
    }

    #[test]
    fn missing_env_var_is_named() {
        let text = MINIMAL.replace(
            "migrator@db-old",
            "migrator:${SWITCHYARD_TEST_SURELY_UNSET}@db-old",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("SWITCHYARD_TEST_SURELY_UNSET"), "{err}");
        assert!(err.contains("source.url"), "{err}");
    }
}
