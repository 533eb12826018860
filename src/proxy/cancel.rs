//! Where a session's CancelRequests go: the server backend its query runs on, or the wait for
//! a server connection.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Where a client's query runs right now, for forwarding a CancelRequest there.
/// Also what `/pause` lists while a transaction still runs.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: std::net::SocketAddr,
    pub process_id: i32,
    pub secret_key: i32,
    pub user: Arc<str>,
    pub since: std::time::Instant,
    /// The server connection's count of cancels on their way (see
    /// [`pool::server::ServerConn::cancels_in_flight`]).
    pub cancels_in_flight: Arc<std::sync::atomic::AtomicU32>,
}

/// What a CancelRequest for one session reaches: where its query runs, or, while the query
/// still waits for a turn or a server connection, the wait itself.
pub type CancelSlot = Arc<Cancel>;

#[derive(Default)]
pub struct Cancel {
    /// Where the session's query runs now: the session updates it at every attach and release
    /// without touching the shared map.
    running: Mutex<Option<CancelTarget>>,
    /// CancelRequests that found nothing running. A query waiting for a server connection
    /// ends its wait when this moves, as a query on a server would end: pgjdbc sends a single
    /// cancel per statement timeout, which a proxy that dropped it would swallow.
    unanswered: std::sync::atomic::AtomicU64,
    /// The session's wait for a connection, woken when `unanswered` moves. One waker, not a
    /// Notify: only the session itself waits here, and registering it costs an atomic
    /// swap instead of a lock and a list entry for every transaction that waits.
    unanswered_changed: futures_util::task::AtomicWaker,
}

impl Cancel {
    pub fn running(&self) -> Option<CancelTarget> {
        self.running_slot().clone()
    }

    pub fn set_running(&self, target: Option<CancelTarget>) {
        *self.running_slot() = target;
    }

    fn running_slot(&self) -> std::sync::MutexGuard<'_, Option<CancelTarget>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A CancelRequest for this session: where to forward it, or None when nothing runs on a
    /// server (then it ends a wait for a server connection, if one is on). A target comes
    /// with its connection's in-flight count raised, counted under the lock the session
    /// clears the target under: a session that has cleared it and then reads a count of
    /// zero knows no cancel can still reach the connection. The caller lowers the count
    /// once PostgreSQL has acted on the cancel.
    pub fn cancel(&self) -> Option<CancelTarget> {
        let running = self.running_slot();
        match running.as_ref() {
            Some(target) => {
                target.cancels_in_flight.fetch_add(1, Ordering::SeqCst);
            }
            None => {
                // Counted under the lock: see [`Cancel::start_running`].
                self.unanswered.fetch_add(1, Ordering::SeqCst);
                self.unanswered_changed.wake();
            }
        }
        running.clone()
    }

    /// The session's query now runs at `target`, unless a cancel came since `seen`
    /// ([`Cancel::unanswered`] when its wait began): then false, and it must not run. Under
    /// the same lock as [`Cancel::cancel`], so that a cancel is either forwarded to the
    /// server or seen here, never lost in between (as when the cancel and the connection
    /// the query waited for arrive together).
    pub fn start_running(&self, target: CancelTarget, seen: u64) -> bool {
        let mut running = self.running_slot();
        if self.unanswered() != seen {
            return false;
        }
        *running = Some(target);
        true
    }

    /// How many cancels found nothing running so far: what [`Cancel::cancelled_after`] counts
    /// from.
    pub fn unanswered(&self) -> u64 {
        self.unanswered.load(Ordering::SeqCst)
    }

    /// Returns once a cancel arrives after `seen` was read.
    /// Only the session the slot belongs to may wait here (one waker).
    pub async fn cancelled_after(&self, seen: u64) {
        std::future::poll_fn(|cx| {
            // Registered before the count is read: a cancel between the two is seen by one
            // or the other.
            self.unanswered_changed.register(cx.waker());
            if self.unanswered() != seen {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }
}
