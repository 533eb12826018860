//! Server connection pools: bb8 with our own manager of raw protocol connections, one pool per
//! (database, user).

pub mod server;

use std::sync::Arc;
use std::time::Duration;

pub use server::{ServerConn, ServerError, ServerTarget};

/// Makes and checks raw server connections for bb8.
pub struct ServerManager {
    pub target: Arc<ServerTarget>,
    pub connect_timeout: Duration,
    /// A connection idle for longer than this is pinged before it is handed out.
    pub check_after: Duration,
}

impl bb8::ManageConnection for ServerManager {
    type Connection = ServerConn;
    type Error = ServerError;

    async fn connect(&self) -> Result<ServerConn, ServerError> {
        let conn = ServerConn::connect(&self.target, self.connect_timeout).await;
        if let Err(e) = &conn {
            tracing::warn!(user = %self.target.user, "server connection failed: {e}");
        }
        conn
    }

    async fn is_valid(&self, conn: &mut ServerConn) -> Result<(), ServerError> {
        if conn.idle_since.elapsed() < self.check_after {
            return Ok(());
        }
        tokio::time::timeout(self.connect_timeout, conn.ping())
            .await
            .map_err(|_| ServerError::Timeout("health check".into()))?
    }

    fn has_broken(&self, conn: &mut ServerConn) -> bool {
        conn.broken
    }
}

pub type Pool = bb8::Pool<ServerManager>;
pub type Pooled = bb8::PooledConnection<'static, ServerManager>;
