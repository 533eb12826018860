//! Pause and resume: the primitive the cutover uses. While paused, new transactions wait at
//! checkout; transactions already running finish. A pause ends by itself at its deadline, so a
//! coordinator that dies cannot freeze the applications.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

pub struct Control {
    /// `Some(deadline)` while paused.
    paused: watch::Sender<Option<Instant>>,
    /// Sessions holding a server connection right now.
    active: AtomicUsize,
    idle: Notify,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            paused: watch::channel(None).0,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }
}

impl Control {
    /// Waits while the proxy is paused. Returns at once when it is not.
    pub async fn admit(&self) {
        // The common case, without subscribing to changes.
        if self.paused.borrow().is_none() {
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

    pub fn pause(&self, max: Duration) {
        let deadline = Instant::now() + max;
        self.paused.send_replace(Some(deadline));
        tracing::info!(
            max_ms = max.as_millis() as u64,
            "paused: new transactions wait"
        );
    }

    pub fn resume(&self) {
        if self.paused.send_replace(None).is_some() {
            tracing::info!("resumed");
        }
    }

    fn resume_if(&self, deadline: Instant) {
        let expired = self.paused.send_if_modified(|state| {
            if *state == Some(deadline) {
                *state = None;
                true
            } else {
                false
            }
        });
        if expired {
            tracing::warn!("pause reached max_pause and ended by itself");
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused
            .borrow()
            .is_some_and(|deadline| Instant::now() < deadline)
    }

    pub fn attached(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
    }

    pub fn detached(&self) {
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Waits until no session holds a server connection, or `timeout`. True when idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
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
    async fn wait_idle_sees_the_last_session_go() {
        let control = std::sync::Arc::new(Control::default());
        control.attached();
        let c = control.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.detached();
        });
        assert!(control.wait_idle(Duration::from_secs(1)).await);
        control.attached();
        assert!(!control.wait_idle(Duration::from_millis(100)).await);
    }
}
