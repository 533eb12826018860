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
}

impl bb8::ManageConnection for ServerManager {
    /// Boxed: a connection (its buffers, maybe a TLS session) is large, and bb8 moves it in
    /// and out of its idle queue on every checkout; a box moves as one pointer.
    type Connection = Box<ServerConn>;
    type Error = ServerError;

    async fn connect(&self) -> Result<Box<ServerConn>, ServerError> {
        match ServerConn::connect(&self.target, self.connect_timeout).await {
            Ok(conn) => Ok(Box::new(conn)),
            Err(e) => {
                tracing::warn!(user = %self.target.user, "server connection failed: {e}");
                Err(e)
            }
        }
    }

    /// Not called on checkout (`test_on_check_out` is off): sessions check connections idle
    /// past `server_check_delay` themselves, so the hot path pays nothing for fresh ones.
    async fn is_valid(&self, conn: &mut Box<ServerConn>) -> Result<(), ServerError> {
        tokio::time::timeout(self.connect_timeout, conn.ping())
            .await
            .map_err(|_| ServerError::Timeout("health check".into()))?
    }

    fn has_broken(&self, conn: &mut Box<ServerConn>) -> bool {
        conn.broken
    }
}

pub type Pool = bb8::Pool<ServerManager>;
pub type Pooled = bb8::PooledConnection<'static, ServerManager>;
