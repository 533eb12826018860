//! Pause and resume: the primitive the cutover uses. While paused, new transactions wait at
//! checkout; transactions already running finish. A pause ends by itself at its deadline, so a
//! coordinator that dies cannot freeze the applications.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub struct Control {
    /// `Some(deadline)` while paused.
    paused: watch::Sender<Option<Instant>>,
    /// Whether `paused` is `Some`, kept with it under the watch's lock: the check every
    /// transaction makes is one load, not a lock of the watch.
    pausing: AtomicBool,
    /// Sessions holding a server connection right now, one count per worker: every
    /// transaction changes its worker's count twice, and one count shared by the workers
    /// moved its cache line between their cores each time.
    active: Box<[ActiveCount]>,
    /// Callers of [`Control::wait_idle`] waiting now: only then does a count that drops to 0
    /// wake them (the wake takes a lock shared by the workers).
    idle_watchers: AtomicUsize,
    idle: Notify,
    /// When the current pause began, and how long the last one lasted (µs): the pause the
    /// applications saw, measured where they saw it.
    paused_since: Mutex<Option<Instant>>,
    last_pause_us: AtomicU64,
    /// At most this many transactions at once (0: no limit), until `throttle_until`: the
    /// cutover lowers the write rate for a moment so that the new primary's apply catches up
    /// before the pause, and the pause has little left to wait for.
    limit: AtomicUsize,
    /// Waiting sessions queue on the semaphore (first come, first served).
    throttle: Mutex<Option<(std::sync::Arc<Semaphore>, Instant)>>,
}

/// A worker's count of active sessions, alone on its cache line.
#[derive(Default)]
#[repr(align(128))]
struct ActiveCount(AtomicUsize);

/// One caller of [`Control::wait_idle`], counted for as long as it waits, also when its
/// future is dropped half-way (a `/pause` whose HTTP client went away). Like
/// [`super::metrics::Held`], but SeqCst: the count is half of the handshake with
/// [`Control::detached`], not a statistic.
struct IdleWatch<'a>(&'a AtomicUsize);

impl<'a> IdleWatch<'a> {
    fn start(watchers: &'a AtomicUsize) -> Self {
        watchers.fetch_add(1, Ordering::SeqCst);
        IdleWatch(watchers)
    }
}

impl Drop for IdleWatch<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for Control {
    fn default() -> Self {
        Control::new(1)
    }
}

impl Control {
    /// Pause and resume for a proxy of `workers` worker threads.
    pub fn new(workers: usize) -> Self {
        Control {
            paused: watch::channel(None).0,
            pausing: AtomicBool::new(false),
            active: (0..workers.max(1))
                .map(|_| ActiveCount::default())
                .collect(),
            idle_watchers: AtomicUsize::new(0),
            idle: Notify::new(),
            paused_since: Mutex::new(None),
            last_pause_us: AtomicU64::new(0),
            limit: AtomicUsize::new(0),
            throttle: Mutex::new(None),
        }
    }

    /// Neither paused nor throttled: a transaction may start without waiting. A pause that
    /// begins right after is caught by the [`Control::is_paused`] check that follows
    /// [`Control::attached`].
    pub fn admits_now(&self) -> bool {
        !self.pausing.load(Ordering::SeqCst) && self.limit.load(Ordering::Relaxed) == 0
    }

    /// Waits while the proxy is paused. Returns at once when it is not.
    pub async fn admit(&self) {
        // The common case, without subscribing to changes.
        if !self.pausing.load(Ordering::SeqCst) {
            return;
        }
        let mut rx = self.paused.subscribe();
        loop {
            let deadline = *rx.borrow_and_update();
            let Some(deadline) = deadline else { return };
            if Instant::now() >= deadline {
                self.resume_if(deadline);
                return;
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Pauses for at most `max`. A pause while already paused keeps the running deadline:
    /// `max_pause` bounds the whole pause the applications see, and a coordinator that asks
    /// again (after ending transactions that did not drain) must not stretch it.
    pub fn pause(&self, max: Duration) {
        let now = Instant::now();
        let mut previous = None;
        self.paused.send_if_modified(|state| {
            previous = *state;
            match previous {
                Some(deadline) if now < deadline => false,
                _ => {
                    *state = Some(now + max);
                    self.pausing.store(true, Ordering::SeqCst);
                    true
                }
            }
        });
        match previous {
            Some(deadline) if now < deadline => {
                tracing::info!(
                    remaining_ms = (deadline - now).as_millis() as u64,
                    "already paused: the pause keeps its deadline"
                );
                return;
            }
            // Ran out unnoticed (no transaction waited to see it): that pause is over.
            Some(_) => {
                self.end_pause_measure();
            }
            None => {}
        }
        *self.paused_since() = Some(now);
        tracing::info!(
            max_ms = max.as_millis() as u64,
            "paused: new transactions wait"
        );
    }

    pub fn resume(&self) {
        self.unthrottle();
        if self.set_paused(None).is_some() {
            let paused_ms = self.end_pause_measure() as f64 / 1000.0;
            tracing::info!(paused_ms, "resumed");
        }
    }

    /// Sets the pause deadline (or ends the pause); returns the previous one.
    fn set_paused(&self, deadline: Option<Instant>) -> Option<Instant> {
        let mut previous = None;
        self.paused.send_modify(|state| {
            previous = std::mem::replace(state, deadline);
            self.pausing.store(deadline.is_some(), Ordering::SeqCst);
        });
        previous
    }

    fn paused_since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.paused_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records how long the pause that ends now lasted; returns it in µs.
    fn end_pause_measure(&self) -> u64 {
        let since = self.paused_since().take();
        let us = since.map_or(0, |t| t.elapsed().as_micros() as u64);
        self.last_pause_us.store(us, Ordering::Relaxed);
        us
    }

    /// How long the last finished pause lasted, in µs (0 before the first).
    pub fn last_pause_us(&self) -> u64 {
        self.last_pause_us.load(Ordering::Relaxed)
    }

    fn resume_if(&self, deadline: Instant) {
        let expired = self.paused.send_if_modified(|state| {
            if *state == Some(deadline) {
                *state = None;
                self.pausing.store(false, Ordering::SeqCst);
                true
            } else {
                false
            }
        });
        if expired {
            self.end_pause_measure();
            tracing::warn!("pause reached max_pause and ended by itself");
        }
    }

    pub fn is_paused(&self) -> bool {
        self.pausing.load(Ordering::SeqCst)
            && self
                .paused
                .borrow()
                .is_some_and(|deadline| Instant::now() < deadline)
    }

    /// A session of worker `worker` holds a server connection (or waits for one) from now.
    /// SeqCst, like the pause flag it is checked against: either this session then sees the
    /// pause, or [`Control::wait_idle`] sees this session.
    pub fn attached(&self, worker: usize) {
        self.count(worker).fetch_add(1, Ordering::SeqCst);
    }

    pub fn detached(&self, worker: usize) {
        if self.count(worker).fetch_sub(1, Ordering::SeqCst) == 1
            && self.idle_watchers.load(Ordering::SeqCst) > 0
        {
            self.idle.notify_waiters();
        }
    }

    fn count(&self, worker: usize) -> &AtomicUsize {
        &self.active[worker % self.active.len()].0
    }

    /// Lets at most `max_active` transactions run at once for up to `max`. (Sessions already
    /// in a transaction finish; new ones queue.)
    pub fn throttle(&self, max_active: usize, max: Duration) {
        let permits = std::sync::Arc::new(Semaphore::new(max_active.max(1)));
        if let Some((old, _)) = self
            .throttle_state()
            .replace((permits, Instant::now() + max))
        {
            old.close();
        }
        self.limit.store(max_active.max(1), Ordering::SeqCst);
        tracing::info!(max_active, "throttled");
    }

    pub fn unthrottle(&self) {
        self.limit.store(0, Ordering::SeqCst);
        if let Some((permits, _)) = self.throttle_state().take() {
            // Everyone queued goes ahead.
            permits.close();
            tracing::info!("throttle lifted");
        }
    }

    fn throttle_state(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(std::sync::Arc<Semaphore>, Instant)>> {
        self.throttle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// While throttled, waits for a turn and returns it (held until the transaction ends);
    /// `None` at once when not throttled.
    pub async fn throttle_permit(&self) -> Option<OwnedSemaphorePermit> {
        if self.limit.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let (permits, until) = self.throttle_state().clone()?;
        match tokio::time::timeout_at(until, permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Some(permit),
            // Lifted meanwhile.
            Ok(Err(_)) => None,
            Err(_) => {
                // Expired; a newer throttle (another semaphore) stays.
                let mut state = self.throttle_state();
                if state
                    .as_ref()
                    .is_some_and(|(current, _)| std::sync::Arc::ptr_eq(current, &permits))
                {
                    state.take();
                    drop(state);
                    self.limit.store(0, Ordering::SeqCst);
                    permits.close();
                }
                None
            }
        }
    }

    pub fn throttled(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> usize {
        self.active
            .iter()
            .map(|count| count.0.load(Ordering::SeqCst))
            .sum()
    }

    /// Waits until no session holds a server connection, or `timeout`. True when idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let _watching = IdleWatch::start(&self.idle_watchers);
        self.wait_idle_watched(timeout).await
    }

    /// [`Control::wait_idle`], counted as a watcher: a count that drops to 0 after the
    /// watcher count rose wakes it; one that dropped before is seen by the sum.
    async fn wait_idle_watched(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active() == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pause_holds_until_resume_or_deadline() {
        let control = std::sync::Arc::new(Control::default());
        control.admit().await;
        control.pause(Duration::from_secs(10));
        let waiting = tokio::spawn({
            let control = control.clone();
            async move { control.admit().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        control.resume();
        waiting.await.unwrap();

        control.pause(Duration::from_secs(2));
        let started = Instant::now();
        control.admit().await;
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert!(!control.is_paused());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_while_paused_keeps_the_first_deadline() {
        let control = Control::default();
        control.pause(Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(3)).await;
        control.pause(Duration::from_secs(5));
        let started = Instant::now();
        control.admit().await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "the first deadline"
        );
        assert!(!control.is_paused());
        assert_eq!(control.last_pause_us(), 5_000_000);

        // A pause that ran out unnoticed is over: the next one gets its own deadline.
        control.pause(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_secs(2)).await;
        control.pause(Duration::from_secs(5));
        assert_eq!(control.last_pause_us(), 2_000_000);
        let started = Instant::now();
        control.admit().await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "a fresh deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_queues_transactions_until_lifted_or_expired() {
        let control = std::sync::Arc::new(Control::default());
        assert!(control.throttle_permit().await.is_none());
        control.throttle(1, Duration::from_secs(10));
        let first = control.throttle_permit().await;
        assert!(first.is_some());
        let second = tokio::spawn({
            let control = control.clone();
            async move { control.throttle_permit().await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished());
        drop(first);
        assert!(second.await.unwrap(), "the next in line gets the turn");

        let _held = control.throttle_permit().await;
        let waiting = tokio::spawn({
            let control = control.clone();
            async move { control.throttle_permit().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        control.resume();
        assert!(waiting.await.unwrap().is_none(), "lifted: everyone goes");
        assert_eq!(control.throttled(), 0);

        control.throttle(1, Duration::from_secs(1));
        let _held = control.throttle_permit().await;
        let started = Instant::now();
        assert!(control.throttle_permit().await.is_none());
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "expires by itself"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wait_idle_sees_the_last_session_go() {
        let control = std::sync::Arc::new(Control::new(2));
        control.attached(0);
        control.attached(1);
        control.attached(1);
        let c = control.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.detached(1);
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.detached(0);
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.detached(1);
        });
        let started = Instant::now();
        assert!(control.wait_idle(Duration::from_secs(1)).await);
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(150),
            "idle when every worker's sessions are"
        );
        control.attached(0);
        assert_eq!(control.active(), 1);
        assert!(!control.wait_idle(Duration::from_millis(100)).await);

        // A wait given up half-way stops counting as a watcher.
        let abandoned = tokio::time::timeout(
            Duration::from_millis(10),
            control.wait_idle(Duration::from_secs(3600)),
        );
        assert!(abandoned.await.is_err());
        assert_eq!(control.idle_watchers.load(Ordering::SeqCst), 0);
    }
}
