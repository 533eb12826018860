//! Where a client's next transaction goes: the one place that decides, for each transaction
//! (transaction mode) or turn (session mode), before a server connection is taken for it.
//!
//! Today every transaction goes to the current primary. A read cache (answer a read from
//! Redis without a server) and shadow reads (replay a read on the other server after the
//! client has its answer) add their branches here, as variants of [`Route`], so that no
//! other part of the session learns where a transaction can go.

use super::*;

/// A routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// To a connection of the server the applications' transactions go to now: the side of
    /// the last switch the proxy knows of (a cutover or rollback changes it, while paused).
    Primary(Side),
}

impl Route {
    /// The server whose pool serves the transaction.
    pub(super) fn side(self) -> Side {
        match self {
            Route::Primary(side) => side,
        }
    }
}

impl Session {
    /// Decides where the client's next transaction goes. Read after any pause (a switch
    /// happens only while the proxies are paused), once per transaction: one atomic load.
    pub(super) fn route(&self) -> Route {
        Route::Primary(self.shared.backend.side())
    }
}
