//! Connections to the two servers and catalog inspection.

pub mod catalog;
pub mod copy_plan;
mod pgpass;
pub mod slot_wait;
pub mod sql;
pub mod tls;
pub mod tools;

use std::fmt;

use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Row, SimpleQueryMessage};

use crate::plan::{Endpoint, PgUrl};
pub use sql::TableName;

/// Which of the two servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// The side as the proxy's admin API names it.
impl From<Side> for crate::admin_api::Side {
    fn from(side: Side) -> Self {
        match side {
            Side::Source => crate::admin_api::Side::Source,
            Side::Target => crate::admin_api::Side::Target,
        }
    }
}

impl From<crate::admin_api::Side> for Side {
    fn from(side: crate::admin_api::Side) -> Self {
        match side {
            crate::admin_api::Side::Source => Side::Source,
            crate::admin_api::Side::Target => Side::Target,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot connect to the {side} ({url}): {message}")]
    Connect {
        side: Side,
        url: String,
        /// What a person needs to read ([`describe`]): the server's message, detail and
        /// hint, or the client's chain of causes.
        message: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{side}: {context}: {message}")]
    Query {
        side: Side,
        context: String,
        /// As for `Connect`.
        message: String,
        /// The driver's error, with the server's SQLSTATE when it sent one ([`PgError::code`]).
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{0}")]
    Tool(String),
}

impl PgError {
    /// The server's SQLSTATE, when it sent one.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            PgError::Query { source, .. } | PgError::Connect { source, .. } => source.code(),
            PgError::Tool(_) => None,
        }
    }
}

/// The message a person needs: the server's message with its detail and hint, or the client's.
pub fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => {
            let mut text = db.message().to_string();
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(inner) = source {
                text.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            text
        }
    }
}

/// One of the two servers, connected as the coordinator's role.
pub struct Server {
    pub side: Side,
    pub client: Client,
    /// `server_version_num`, e.g. 150010.
    pub version_num: i32,
    pub url: PgUrl,
}

impl Server {
    /// The one way switchyard connects to a server.
    pub async fn connect(side: Side, endpoint: &Endpoint) -> Result<Server, PgError> {
        let url = endpoint.url.clone();
        let mut config = url.config().clone();
        if let Some(password) = password_for(&url) {
            config.password(password);
        }
        config.application_name("switchyard-coordinator");
        config.connect_timeout(endpoint.connect_timeout.0);
        let failed = |e: tokio_postgres::Error| PgError::Connect {
            side,
            url: url.to_string(),
            message: describe(&e),
            source: e,
        };
        let client = if config.get_ssl_mode() == SslMode::Disable {
            let (client, connection) = config.connect(NoTls).await.map_err(failed)?;
            tokio::spawn(drive(side, connection));
            client
        } else {
            let (client, connection) = config.connect(tls::connector()?).await.map_err(failed)?;
            tokio::spawn(drive(side, connection));
            client
        };
        let mut server = Server {
            side,
            client,
            version_num: 0,
            url,
        };
        let row = server
            .query_one(
                "read the server version",
                "SELECT current_setting('server_version_num')::int4",
                &[],
            )
            .await?;
        server.version_num = row.get(0);
        Ok(server)
    }

    pub fn major(&self) -> i32 {
        self.version_num / 10000
    }

    fn error(&self, context: &str, err: tokio_postgres::Error) -> PgError {
        PgError::Query {
            side: self.side,
            context: context.to_string(),
            message: describe(&err),
            source: err,
        }
    }

    pub async fn query(
        &self,
        context: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        tracing::trace!(side = %self.side, sql, "query");
        self.client
            .query(sql, params)
            .await
            .map_err(|e| self.error(context, e))
    }

    pub async fn query_one(
        &self,
        context: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Row, PgError> {
        tracing::trace!(side = %self.side, sql, "query");
        self.client
            .query_one(sql, params)
            .await
            .map_err(|e| self.error(context, e))
    }

    /// Runs statements that take no parameters (DDL) with the simple protocol.
    pub async fn execute(&self, context: &str, sql: &str) -> Result<(), PgError> {
        tracing::debug!(side = %self.side, sql, "execute");
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| self.error(context, e))
    }

    /// `ALTER SYSTEM SET name = 'value'` and a configuration reload. ALTER SYSTEM cannot run
    /// in a transaction block, so the two go as separate statements.
    pub async fn set_system_setting(&self, name: &str, value: &str) -> Result<(), PgError> {
        let statement = format!(
            "ALTER SYSTEM SET {} = {}",
            sql::ident(name),
            sql::literal(value)
        );
        self.execute(&format!("set {name}"), &statement).await?;
        self.execute("reload the configuration", "SELECT pg_reload_conf()")
            .await
    }

    /// Like [`Server::execute`], but never logs the statement: it carries a password.
    pub async fn execute_secret(&self, context: &str, sql: &str) -> Result<(), PgError> {
        tracing::debug!(side = %self.side, context, "execute (statement not logged: it holds a password)");
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| self.error(context, e))
    }

    /// Runs a simple query and returns the first column of each row as text.
    pub async fn simple_column(
        &self,
        context: &str,
        sql: &str,
    ) -> Result<Vec<Option<String>>, PgError> {
        let messages = self
            .client
            .simple_query(sql)
            .await
            .map_err(|e| self.error(context, e))?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_string)),
                _ => None,
            })
            .collect())
    }
}

/// Runs a connection's I/O until it closes.
async fn drive<F>(side: Side, connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(e) = connection.await {
        tracing::debug!(%side, "connection closed: {}", describe(&e));
    }
}

/// The password for `url`: in the URL, else `PGPASSWORD`, else `~/.pgpass`.
fn password_for(url: &PgUrl) -> Option<String> {
    url.config()
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .or_else(|| pgpass::resolve_password(&url.host(), url.port(), url.dbname(), url.user()))
}

/// A libpq `key=value` connection string for `url`, without the password.
fn conninfo(url: &PgUrl) -> String {
    let sslmode = match url.config().get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => "disable",
        tokio_postgres::config::SslMode::Require => "require",
        _ => "prefer",
    };
    format!(
        "host={} port={} dbname={} user={} sslmode={sslmode}",
        sql::conninfo_value(&url.host()),
        url.port(),
        sql::conninfo_value(url.dbname()),
        sql::conninfo_value(url.user()),
    )
}

/// The connection string for the coordinator's own client programs (pg_dump, pg_restore) and
/// the password to hand them in the environment.
pub fn coordinator_conninfo(url: &PgUrl) -> (String, Option<String>) {
    (conninfo(url), password_for(url))
}

/// The connection string a *server* uses to reach `endpoint` (for `CREATE SUBSCRIPTION`):
/// `replication_url` if given, else `url`, with the password resolved on the coordinator,
/// because the server cannot see the coordinator's environment or `~/.pgpass`.
pub fn peer_conninfo(endpoint: &Endpoint) -> String {
    let url = endpoint.replication_url.as_ref().unwrap_or(&endpoint.url);
    let password = password_for(url).or_else(|| password_for(&endpoint.url));
    // Without a timeout, CREATE SUBSCRIPTION waits as long as the network lets it.
    let timeout = endpoint.connect_timeout.0.as_secs().max(2);
    let conninfo = format!("{} connect_timeout={timeout}", conninfo(url));
    match password {
        Some(password) => format!("{conninfo} password={}", sql::conninfo_value(&password)),
        None => conninfo,
    }
}
