//! Server connection pools: bb8 with our own manager of raw protocol connections, one pool per
//! (database, user).

pub mod server;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

pub use server::{ServerConn, ServerError, ServerTarget};

/// Makes and checks raw server connections for bb8.
pub struct ServerManager {
    pub target: Arc<ServerTarget>,
    pub connect_timeout: Duration,
    /// The last login the server refused for good ([`ServerError::login_refusal`]). bb8 only
    /// hands connect errors to its error sink and lets the sessions waiting for a connection
    /// wait out `query_wait_timeout`; [`Pool::get`] watches this instead, so that they hear
    /// the server's reason at once.
    pub refusals: watch::Sender<Option<ServerError>>,
    /// The worker whose pool this is: its connections belong to it.
    pub shard: usize,
}

impl bb8::ManageConnection for ServerManager {
    /// Boxed: a connection (its buffers, maybe a TLS session) is large, and bb8 moves it in
    /// and out of its idle queue on every checkout; a box moves as one pointer.
    type Connection = Box<ServerConn>;
    type Error = ServerError;

    async fn connect(&self) -> Result<Box<ServerConn>, ServerError> {
        match ServerConn::connect(&self.target, self.connect_timeout).await {
            Ok(mut conn) => {
                conn.home = self.shard;
                Ok(Box::new(conn))
            }
            Err(e) => {
                tracing::warn!(user = %self.target.user, "server connection failed: {e}");
                if let Some(refusal) = e.login_refusal() {
                    self.refusals.send_replace(Some(refusal));
                }
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

pub type Pooled = bb8::PooledConnection<'static, ServerManager>;

/// A worker's pool towards one server, for one user. bb8 makes, limits, reaps and hands out
/// the connections; the ones this worker's sessions just gave back wait on a stack of the
/// worker's own (the most recent on top), so that the next transaction takes one without a
/// trip through bb8 (its timeout, statistics and queue cost a transaction more than the rest
/// of its checkout). A session that finds neither waits in a queue of the pool's own, and a
/// connection given back goes to the first in it: bb8's own wait lets whoever asks at the
/// moment a connection comes back take it, and a session woken for one that lost it that way
/// went to the back of the line again, once for 30 s while the other sessions ran hundreds of
/// transactions. A connection goes back to bb8 when it broke (a new one is made for the
/// queue, [`Pool::serve_waiters`]) or when it sat idle past `server_idle_timeout`
/// ([`Pool::trim`]).
///
/// `pool_size` is the user's, split over the workers: a session that waited
/// [`SPREAD_AFTER`] for its own worker's connections is also queued, in order of its wait, at
/// the other workers' pools of the same user and server ([`Pool::adopt`]), so that it takes
/// whichever connection comes free (or sits idle) first.
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

/// How long a session waits for a connection of its own worker before it waits for any
/// worker's: long enough that under an even load connections stay on their workers' threads
/// (taking another worker's idle one at once, 11% of transactions crossed threads at 16
/// pgbench clients), short next to any `query_wait_timeout`.
pub const SPREAD_AFTER: Duration = Duration::from_millis(10);

/// What a checkout ends with.
pub type Checkout = Result<Pooled, bb8::RunError<ServerError>>;

/// Where a waiting session takes its connection (or hears why it gets none): shared by every
/// queue it stands in, and emptied by the first pool that answers it.
type Handoff = Arc<Mutex<Option<oneshot::Sender<Checkout>>>>;

/// A session in a pool's queue.
struct Waiter {
    since: Instant,
    handoff: Handoff,
    /// Queued at every worker's pool (a session of another worker, or one of this worker's
    /// that waited past [`SPREAD_AFTER`]): not spread again.
    spread: bool,
}

impl Waiter {
    /// Served elsewhere, or no longer waiting.
    fn is_gone(&self) -> bool {
        lock(&self.handoff)
            .as_ref()
            .is_none_or(oneshot::Sender::is_closed)
    }
}

struct Inner {
    bb8: bb8::Pool<ServerManager>,
    warm: Mutex<Vec<Pooled>>,
    /// Sessions waiting for a connection, oldest first. Locked before `warm` where both are,
    /// and before a waiter's handoff.
    waiters: Mutex<VecDeque<Waiter>>,
    idle_timeout: Duration,
    /// bb8's `max_size`: this worker's share of `pool_size`.
    max_size: u32,
    /// The manager's login refusals.
    refusals: watch::Sender<Option<ServerError>>,
    /// Checkouts from bb8 under way for the queue ([`Pool::serve_waiters`]).
    fetching: AtomicUsize,
    /// The scheduler of the pool's worker: a connection made for the queue is made there,
    /// whichever worker asks, so that its socket is served by that worker's thread.
    worker: tokio::runtime::Handle,
}

impl Pool {
    /// `refusals`: the sender its manager reports login refusals on; `worker`: the
    /// scheduler of the worker the pool belongs to.
    pub fn new(
        bb8: bb8::Pool<ServerManager>,
        idle_timeout: Duration,
        refusals: watch::Sender<Option<ServerError>>,
        worker: tokio::runtime::Handle,
    ) -> Pool {
        Pool(Arc::new(Inner {
            max_size: bb8.config().max_size,
            bb8,
            warm: Mutex::new(Vec::new()),
            waiters: Mutex::new(VecDeque::new()),
            idle_timeout,
            refusals,
            fetching: AtomicUsize::new(0),
            worker,
        }))
    }

    /// The connection given back last, if one waits.
    pub fn take_warm(&self) -> Option<Pooled> {
        self.warm().pop()
    }

    /// A connection: the first one given back (here, or, after [`SPREAD_AFTER`], at another
    /// worker's pool) after the sessions that waited before this one got theirs, or one bb8
    /// has or makes (when the pool has room, or a broken one left room), waiting up to
    /// `query_wait_timeout`, or less if the server refuses a login meanwhile: then the wait
    /// cannot end well, and the error says why.
    ///
    /// With every connection of the pool busy, as under load at most checkouts, the wait is
    /// the queue's alone: bb8's wait (a timer and a queue entry of its own, made and dropped
    /// each time) cost more than the rest of the checkout. The worker's [`Pool::expire`]
    /// ends waits past the timeout, and [`Pool::serve_waiters`] asks bb8 for the room a
    /// broken connection leaves.
    pub async fn get(&self) -> Checkout {
        let (mut handed, full) = {
            let mut waiters = self.waiters();
            // Given back after the caller looked and before it queued: not to be missed.
            if let Some(conn) = self.take_warm() {
                return Ok(conn);
            }
            // Sessions that stopped waiting are skipped by give_back; with no connection
            // given back for a while (the server is down), they are cleared here.
            while waiters.front().is_some_and(Waiter::is_gone) {
                waiters.pop_front();
            }
            let (sender, receiver) = oneshot::channel();
            waiters.push_back(Waiter {
                since: Instant::now(),
                handoff: Arc::new(Mutex::new(Some(sender))),
                spread: false,
            });
            (receiver, !self.can_serve_now())
        };
        if full {
            // The sender is only dropped with the pool.
            return handed.await.unwrap_or(Err(bb8::RunError::TimedOut));
        }
        // Subscribed before bb8 starts a login for this request, so that its refusal is seen;
        // refusals from before are not this request's business.
        let mut refusals = self.0.refusals.subscribe();
        // Leaving early (bb8 answered, a timeout, a cancel) drops the receiver: the queue
        // skips it, and a connection handed to it in that moment goes back to bb8.
        tokio::select! {
            biased;
            Ok(checkout) = &mut handed => checkout,
            got = self.0.bb8.get_owned() => got,
            refusal = next_refusal(&mut refusals) => Err(bb8::RunError::User(refusal)),
        }
    }

    /// The sessions that have waited here longer than `after` and are not yet queued at the
    /// other workers' pools, marked as queued there now.
    pub fn overdue(&self, after: Duration) -> Vec<(Instant, Handoff)> {
        let mut waiters = self.waiters();
        // Sessions that got a connection elsewhere, or left, go first.
        waiters.retain(|w| !w.is_gone());
        waiters
            .iter_mut()
            .take_while(|w| w.since.elapsed() >= after)
            .filter_map(|w| {
                let spread = std::mem::replace(&mut w.spread, true);
                (!spread).then(|| (w.since, w.handoff.clone()))
            })
            .collect()
    }

    /// Some session waits here for a connection.
    pub fn has_waiters(&self) -> bool {
        !self.waiters().is_empty()
    }

    /// For sessions queued here that bb8 does not know of (those that queued while every
    /// connection was busy, and other workers' sessions, [`Pool::adopt`]): a connection idle
    /// in bb8 (one handed to a session that had just stopped waiting), or one made where
    /// there is room (a broken one left it, or this worker never needed its whole share),
    /// goes to the first in the queue; a login the server refuses meanwhile ends every wait
    /// here, as it would end a wait in bb8.
    pub fn serve_waiters(&self) {
        // One checkout per waiting session at most: with the server down, a connect under
        // way leaves bb8 room, and a checkout asked for on every look would pile up.
        let waiting = self.waiters().len();
        if waiting <= self.0.fetching.load(Ordering::Relaxed) || !self.can_serve_now() {
            return;
        }
        self.0.fetching.fetch_add(1, Ordering::Relaxed);
        let pool = self.clone();
        let mut refusals = self.0.refusals.subscribe();
        self.0.worker.spawn(async move {
            tokio::select! {
                got = pool.0.bb8.get_owned() => {
                    if let Ok(conn) = got {
                        pool.give_back(conn);
                    }
                }
                refusal = next_refusal(&mut refusals) => pool.refuse_waiters(&refusal),
            }
            pool.0.fetching.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Ends the waits of the sessions queued here with the server's refusal of a login.
    fn refuse_waiters(&self, refusal: &ServerError) {
        for waiter in self.waiters().drain(..) {
            if let (Some(sender), Some(refusal)) =
                (lock(&waiter.handoff).take(), refusal.login_refusal())
            {
                let _ = sender.send(Err(bb8::RunError::User(refusal)));
            }
        }
    }

    /// Ends the waits of the sessions queued here longer than `timeout`
    /// (`query_wait_timeout`). The oldest are at the front.
    pub fn expire(&self, timeout: Duration) {
        let mut waiters = self.waiters();
        while waiters
            .front()
            .is_some_and(|w| w.since.elapsed() >= timeout)
        {
            if let Some(waiter) = waiters.pop_front() {
                if let Some(sender) = lock(&waiter.handoff).take() {
                    let _ = sender.send(Err(bb8::RunError::TimedOut));
                }
            }
        }
    }

    /// Serves another worker's overdue session: with a connection idle here, or by queueing
    /// it here in the order of its wait. True when it was served.
    pub fn adopt(&self, since: Instant, handoff: &Handoff) -> bool {
        let mut waiters = self.waiters();
        if let Some(conn) = self.take_warm() {
            match hand(handoff, conn) {
                Ok(()) => return true,
                Err(conn) => {
                    self.warm().push(conn);
                    return false;
                }
            }
        }
        let at = waiters.partition_point(|w| w.since <= since);
        waiters.insert(
            at,
            Waiter {
                since,
                handoff: handoff.clone(),
                spread: true,
            },
        );
        false
    }

    /// Takes back a connection a session is done with: to the longest waiting session, if
    /// any, else onto the stack.
    pub fn give_back(&self, mut conn: Pooled) {
        if conn.broken {
            // bb8 closes it; the room it leaves is made up for the sessions waiting here.
            drop(conn);
            self.serve_waiters();
            return;
        }
        let mut waiters = self.waiters();
        while let Some(waiter) = waiters.pop_front() {
            match hand(&waiter.handoff, conn) {
                Ok(()) => return,
                // That session stopped waiting, or another pool served it.
                Err(back) => conn = back,
            }
        }
        self.warm().push(conn);
    }

    /// Closes the connections that sat on the stack past `server_idle_timeout` (bb8's reaper
    /// only sees its own idle ones). The oldest are at the bottom.
    pub fn trim(&self) {
        let expired: Vec<Pooled> = {
            let mut warm = self.warm();
            let fresh_from = warm
                .iter()
                .position(|conn| conn.idle_since.elapsed() < self.0.idle_timeout)
                .unwrap_or(warm.len());
            warm.drain(..fresh_from).collect()
        };
        for mut conn in expired {
            conn.broken = true;
        }
    }

    /// bb8 has a connection idle, or room to open one: a checkout would not wait for
    /// another session's transaction to end.
    pub fn can_serve_now(&self) -> bool {
        let state = self.0.bb8.state();
        state.idle_connections > 0 || state.connections < self.0.max_size
    }

    /// A checkout now would not wait: a connection is on the stack, or bb8 has or can
    /// make one.
    pub fn has_free(&self) -> bool {
        !self.warm().is_empty() || self.can_serve_now()
    }

    /// Connections open, and of those idle (in bb8 or on the stack).
    pub fn connections(&self) -> (u32, u32) {
        let state = self.0.bb8.state();
        let warm = self.warm().len() as u32;
        (state.connections, state.idle_connections + warm)
    }

    fn warm(&self) -> std::sync::MutexGuard<'_, Vec<Pooled>> {
        self.0.warm.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiter>> {
        lock(&self.0.waiters)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gives a waiting session a connection, unless it is served or gone already.
fn hand(handoff: &Handoff, conn: Pooled) -> Result<(), Pooled> {
    match lock(handoff).take() {
        Some(sender) => match sender.send(Ok(conn)) {
            Ok(()) => Ok(()),
            Err(Ok(conn)) => Err(conn),
            // Only a connection is sent here.
            Err(Err(_)) => Ok(()),
        },
        None => Err(conn),
    }
}

/// The next login refusal reported after `refusals` was last looked at.
async fn next_refusal(refusals: &mut watch::Receiver<Option<ServerError>>) -> ServerError {
    loop {
        if refusals.changed().await.is_err() {
            // The pool holds a sender, so this does not happen; if it did, bb8's own timeout
            // still ends the wait.
            return std::future::pending().await;
        }
        if let Some(refusal) = refusals
            .borrow_and_update()
            .as_ref()
            .and_then(ServerError::login_refusal)
        {
            return refusal;
        }
    }
}
