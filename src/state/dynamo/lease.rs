//! The lease lock, and the rules that keep it safe without comparing clocks between hosts.
//!
//! - Taking it is a conditional write; each holder gets `generation + 1`, the fencing token
//!   that every state write checks and every proxy call carries.
//! - The holder raises a heartbeat counter every third of the lease, conditioned on its owner
//!   and generation. If no heartbeat has *landed* for `lease - lease/6`, counted on its own
//!   clock from when it sent the last one that did, it stops the process (exit 3) before any
//!   waiter can take over: a waiter starts counting only after it read that heartbeat, which
//!   was after it was sent.
//! - A waiter takes over only after it has seen (generation, heartbeat, owner) unchanged for
//!   a whole lease on its own clock, with a write conditioned on all three. A holder that
//!   moves in the meantime is alive: the waiter is refused, naming it.
//! - A store that does not answer is never read as a dead holder: the waiter gives up with an
//!   error, and the holder stops itself.
//!
//! The AWS lock client's record version numbers are random and cannot order two holders; a
//! generation only grows, so "is this still the current holder?" is one comparison.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::items::{Ctx, LockItem, Outcome};
use crate::state::lock::{Held, Holder, LockGuard};
use crate::state::StateError;

/// The lock as this process holds it.
#[derive(Debug, Clone)]
pub struct Owned {
    /// Unique to this acquisition: host, pid and a random part.
    pub owner: String,
    pub generation: u64,
}

/// What [`acquire`] took.
pub struct Acquired {
    owned: Owned,
    /// When the write that took it was sent: the heartbeat's clock starts there.
    sent: Instant,
}

/// The lease's timings, all on one host's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// A heartbeat every third of the lease.
    pub every: Duration,
    /// The holder stops when no heartbeat has landed this long (5/6 of the lease).
    pub give_up: Duration,
    /// One call to the store gives up after this (a quarter of the lease, 2 s at least).
    pub call: Duration,
}

impl Budget {
    pub fn of(lease: Duration) -> Budget {
        Budget {
            every: lease / 3,
            give_up: lease - lease / 6,
            call: (lease / 4).max(Duration::from_secs(2)),
        }
    }

    /// What is left for an undo when the store is lost just before a heartbeat was due and
    /// the holder's next call runs into it: `give_up - every - call`.
    #[cfg(test)]
    pub fn left_to_undo(&self) -> Duration {
        self.give_up.saturating_sub(self.every + self.call)
    }
}

/// How often a waiter looks again.
fn poll_interval(lease: Duration) -> Duration {
    (lease / 20).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

/// Takes the lock: at once if it is free; after one lease of an unchanged heartbeat if its
/// holder is gone; never from a holder that is alive ([`StateError::Locked`] names it).
pub async fn acquire(ctx: &Ctx, purpose: &str, lease: Duration) -> Result<Acquired, StateError> {
    let owner = format!(
        "{}:{}:{:016x}",
        crate::state::lock::hostname(),
        std::process::id(),
        rand::random::<u64>()
    );
    loop {
        let seen = ctx.read_lock().await?;
        let sent = Instant::now();
        let outcome = match &seen {
            None => ctx.create_lock(&owner, &Holder::me(purpose, 1)).await?,
            Some(free) if free.owner.is_none() => {
                ctx.replace_lock(
                    free,
                    Some(&owner),
                    &Holder::me(purpose, free.generation + 1),
                )
                .await?
            }
            Some(held) => match watch(ctx, held, lease).await? {
                Watched::Alive(now) => {
                    return Err(StateError::Locked {
                        path: ctx.describe.clone(),
                        holder: now.named(),
                    })
                }
                // Let go while this one watched: it was alive, as a flock held at that
                // moment would say (a command run beside another is refused, not queued).
                Watched::Released => {
                    return Err(StateError::Locked {
                        path: ctx.describe.clone(),
                        holder: held.named(),
                    })
                }
                Watched::Unchanged => {
                    let sent = Instant::now();
                    let taken = ctx
                        .replace_lock(
                            held,
                            Some(&owner),
                            &Holder::me(purpose, held.generation + 1),
                        )
                        .await?;
                    if let Outcome::Done = taken {
                        tracing::warn!(
                            previous = %held.named(),
                            "took over the migration's lock: its holder's heartbeat did not move for a whole lease ({lease:?})"
                        );
                        return Ok(Acquired {
                            owned: Owned {
                                owner,
                                generation: held.generation + 1,
                            },
                            sent,
                        });
                    }
                    continue;
                }
            },
        };
        if let Outcome::Done = outcome {
            let generation = seen.map_or(1, |l| l.generation + 1);
            return Ok(Acquired {
                owned: Owned { owner, generation },
                sent,
            });
        }
        // Someone else wrote first: look again.
    }
}

#[derive(Debug, PartialEq)]
enum Watched {
    /// The holder moved: alive (or a new one took it).
    Alive(LockItem),
    Released,
    /// Unchanged for a whole lease on this clock.
    Unchanged,
}

/// Watches a held lock for one lease from now.
async fn watch(ctx: &Ctx, seen: &LockItem, lease: Duration) -> Result<Watched, StateError> {
    let until = Instant::now() + lease;
    while Instant::now() < until {
        tokio::time::sleep(poll_interval(lease).min(until - Instant::now())).await;
        if let Some(verdict) = judge(seen, ctx.read_lock().await?) {
            return Ok(verdict);
        }
    }
    Ok(Watched::Unchanged)
}

/// One more look at a lock seen held: released, alive (anything of it moved), or no news.
fn judge(seen: &LockItem, now: Option<LockItem>) -> Option<Watched> {
    match now {
        None => Some(Watched::Released),
        Some(now) if now.owner.is_none() => Some(Watched::Released),
        Some(now) if now != *seen => Some(Watched::Alive(now)),
        Some(_) => None,
    }
}

/// `state unlock --force`: frees a lock only by the takeover rule, so a live holder is never
/// broken; the generation is raised, fencing whoever held it.
pub async fn force_unlock(ctx: &Ctx, lease: Duration) -> Result<Option<Holder>, StateError> {
    let Some(seen) = ctx.read_lock().await? else {
        return Ok(None);
    };
    if seen.owner.is_none() {
        return Ok(None);
    }
    match watch(ctx, &seen, lease).await? {
        Watched::Alive(now) => Err(StateError::Locked {
            path: ctx.describe.clone(),
            holder: format!("{} (its heartbeat moved: it is alive)", now.named()),
        }),
        Watched::Released => Ok(None),
        Watched::Unchanged => {
            let marker = Holder::me("state unlock --force", seen.generation + 1);
            match ctx.replace_lock(&seen, None, &marker).await? {
                Outcome::Done => Ok(seen.holder),
                Outcome::Refused(now) => Err(StateError::Locked {
                    path: ctx.describe.clone(),
                    holder: now.map_or_else(|| "another coordinator".into(), |l| l.named()),
                }),
            }
        }
    }
}

/// The guard of a DynamoDB lock: the heartbeat runs until it is dropped, then the lock is
/// released.
#[derive(Debug)]
struct LeaseLock {
    ctx_release: Option<tokio::sync::oneshot::Sender<()>>,
    released: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    held: Arc<Mutex<Option<Owned>>>,
}

impl Held for LeaseLock {}

impl Drop for LeaseLock {
    fn drop(&mut self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(stop) = self.ctx_release.take() {
            let _ = stop.send(());
        }
        // Waits (briefly) for the release to land, so the next command finds the lock free
        // instead of waiting out a lease.
        let released = self
            .released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(released) = released {
            let _ = released.recv_timeout(Duration::from_secs(2));
        }
    }
}

/// Starts the heartbeat of a lock just taken and returns its guard.
pub fn hold(
    runtime: tokio::runtime::Handle,
    ctx: Ctx,
    acquired: Acquired,
    lease: Duration,
    held: Arc<Mutex<Option<Owned>>>,
    next: String,
) -> LockGuard {
    let Acquired { owned, sent } = acquired;
    *held.lock().unwrap_or_else(|e| e.into_inner()) = Some(owned.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (done, released) = std::sync::mpsc::sync_channel(1);
    let generation = owned.generation;
    runtime.spawn(async move {
        heartbeat(&ctx, &owned, sent, lease, stopped, &next).await;
        if let Err(e) = ctx.release(&owned).await {
            tracing::warn!("cannot release the migration's lock ({e}); the next command waits one lease for it");
        }
        let _ = done.send(());
    });
    LockGuard::new(
        LeaseLock {
            ctx_release: Some(stop),
            released: Mutex::new(Some(released)),
            held,
        },
        generation,
    )
}

/// Raises the heartbeat every third of the lease until `stop`; exits the process (3) when it
/// cannot before the lease could run out, or when another holder has the lock.
async fn heartbeat(
    ctx: &Ctx,
    owned: &Owned,
    mut renewed: Instant,
    lease: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    next: &str,
) {
    let Budget { every, give_up, .. } = Budget::of(lease);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep_until(renewed + every) => {}
        }
        loop {
            let sent = Instant::now();
            let deadline = renewed + give_up;
            if sent >= deadline {
                lost(&format!(
                    "the migration's lock in {} could not be renewed for {:.1}s (the store did not answer in time, or this process was stopped): stopping before its lease of {lease:?} can run out, so that no other coordinator ever acts beside this one. Nothing half-done is lost: {next}",
                    ctx.describe,
                    (sent - renewed).as_secs_f64()
                ));
            }
            match tokio::time::timeout(deadline - sent, ctx.renew(owned)).await {
                Ok(Ok(Outcome::Done)) => {
                    renewed = sent;
                    break;
                }
                Ok(Ok(Outcome::Refused(now))) => lost(&format!(
                    "the migration's lock in {} was taken over by {}: this process stops without writing anything more. {next}",
                    ctx.describe,
                    now.map_or_else(|| "another coordinator".into(), |l| l.named())
                )),
                Ok(Err(e)) => {
                    tracing::warn!("cannot renew the migration's lock: {e}; trying again");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(poll_interval(lease)) => {}
                    }
                }
                Err(_) => {}
            }
        }
    }
}

/// The holder lost its lock, or cannot show it still has it: it stops here, exit 3.
fn lost(message: &str) -> ! {
    tracing::error!("{message}");
    eprintln!("error: {message}");
    std::process::exit(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(generation: u64, heartbeat: u64, owner: Option<&str>) -> LockItem {
        LockItem {
            generation,
            heartbeat,
            owner: owner.map(str::to_string),
            holder: None,
        }
    }

    #[test]
    fn a_holder_that_moves_in_any_way_is_alive_and_only_stillness_is_no_news() {
        let seen = lock(4, 10, Some("a"));
        assert_eq!(judge(&seen, Some(seen.clone())), None);
        for moved in [
            lock(4, 11, Some("a")),
            lock(5, 0, Some("b")),
            lock(5, 10, Some("a")),
        ] {
            assert_eq!(
                judge(&seen, Some(moved.clone())),
                Some(Watched::Alive(moved))
            );
        }
        assert_eq!(
            judge(&seen, Some(lock(4, 10, None))),
            Some(Watched::Released)
        );
        assert_eq!(judge(&seen, None), Some(Watched::Released));
    }

    #[test]
    fn the_holder_stops_before_any_waiter_may_take_over_and_has_time_to_undo() {
        for seconds in [1, 3, 12, 18, 20, 60] {
            let lease = Duration::from_secs(seconds);
            let budget = Budget::of(lease);
            // A waiter takes over after a whole lease from when it read a heartbeat, which
            // was after the holder sent it: the holder must have stopped before that.
            assert!(budget.give_up < lease, "{budget:?}");
            // At least two heartbeats may fail before the holder gives up.
            assert!(budget.give_up >= budget.every * 2, "{budget:?}");
        }
        // The default lease leaves 5 s to undo a cutover after a call ran into a lost store.
        let left = Budget::of(Duration::from_secs(20)).left_to_undo();
        assert_eq!(left.as_millis(), 5_000, "{left:?}");
    }
}
