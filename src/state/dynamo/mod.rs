//! The shared state store: one DynamoDB table, any number of migrations, so that a team and a
//! fleet of proxies on many hosts share one migration (`[state] backend = "dynamodb"`).
//!
//! Items, keyed by (`pk` = the migration's name, `sk`):
//! - `lock`: the lease lock ([`lease`]): `owner` while held, `generation` (the fencing token,
//!   only ever raised), `heartbeat` (a counter the holder raises every third of the lease),
//!   `holder` (JSON: pid, host, command, since).
//! - `state`: the [`State`] as JSON without its log, its `version` (compare-and-set),
//!   `log_len`, and `backend`/`epoch` beside it for the proxies' cheap read.
//! - `log#0000000042`: one log entry each, so no item grows with the migration's length
//!   (DynamoDB refuses items over 400 KB).
//!
//! Every state write is one transaction: a condition check on the lock item (this holder's
//! owner and generation), the state put conditioned on its version, and the new log entries.
//! A coordinator that lost its lock (frozen past its lease, say) writes nothing. Reads are
//! strongly consistent.
//!
//! The SDK is async and [`StateStore`] is not: the store runs its own runtime on a thread of
//! its own, where the lease's heartbeat also runs, and each call waits for its answer there.
//! A call blocks its caller for one round trip, as the file store's fsync does; the heartbeat
//! never waits for a caller.

mod items;
mod lease;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;

use self::items::{Ctx, LOG_PREFIX};
use super::lock::{Holder, LockGuard, LockInfo};
use super::{State, StateError, StateStore, Switch};
use crate::plan::Plan;

/// DynamoDB refuses items over 400 KB; a state this large is refused with room to spare.
const MAX_STATE_BYTES: usize = 350 * 1024;
/// A transaction holds at most 100 items: the lock check and the state take two.
const MAX_LOG_PER_SAVE: usize = 98;

pub struct DynamoStore {
    ctx: Ctx,
    runtime: Option<tokio::runtime::Runtime>,
    lease: Duration,
    /// The plan file, for the commands a message names.
    plan: String,
    /// The lock this process holds now, which every save checks.
    held: Arc<Mutex<Option<lease::Owned>>>,
    /// For each version this process read or wrote, how many log entries it had: a save
    /// writes the entries past them.
    logged: Mutex<HashMap<u64, usize>>,
}

impl DynamoStore {
    pub fn open(plan: &Plan) -> Result<DynamoStore, StateError> {
        let settings = &plan.state;
        let table = settings
            .table
            .as_ref()
            .map(|t| t.0.clone())
            .unwrap_or_default();
        let describe = format!(
            "DynamoDB table {table}{} (migration {})",
            settings
                .endpoint_url
                .as_ref()
                .map(|u| format!(" at {}", u.0))
                .unwrap_or_default(),
            plan.name.0
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("switchyard-state")
            .enable_all()
            .build()
            .map_err(|e| StateError::Store {
                store: describe.clone(),
                action: "start",
                message: e.to_string(),
            })?;
        // A call gives up after a quarter of the lease (2s at least): a store that stopped
        // answering is an error while the holder still has time to act on it (undo a cutover
        // before its commit point) before its heartbeat must stop it, at 5/6 of the lease
        // after the last one that landed. The worst case, the store lost just before a
        // heartbeat was due: 1/3 (since that heartbeat) + 1/4 (this call) leaves a quarter of
        // the lease for the undo (5 s of the default 20 s). (The heartbeat keeps its own
        // deadline: `lease`.)
        let lease = settings.lease.0;
        let operation = lease::Budget::of(lease).call;
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(operation / 2)
            .operation_attempt_timeout(operation / 2)
            .operation_timeout(operation)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3));
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.0.clone()));
        }
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url.0.clone());
        }
        let config = wait(&runtime, loader.load()).ok_or_else(|| StateError::Store {
            store: describe.clone(),
            action: "load the AWS configuration",
            message: "the store's runtime stopped".into(),
        })?;
        Ok(DynamoStore {
            ctx: Ctx {
                client: Client::new(&config),
                table,
                pk: plan.name.0.clone(),
                describe,
            },
            runtime: Some(runtime),
            lease,
            plan: plan.path.display().to_string(),
            held: Arc::new(Mutex::new(None)),
            logged: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `future` on the store's runtime and waits for it.
    fn call<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T, StateError>> + Send + 'static,
    ) -> Result<T, StateError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| self.ctx.error("reach", "closed"))?;
        wait(runtime, future).unwrap_or_else(|| {
            Err(self
                .ctx
                .error("reach", "the store's runtime stopped before answering"))
        })
    }

    /// `switchyard state init`: creates the table (on-demand billing) unless it exists, and
    /// waits until it is active.
    pub fn init(&self) -> Result<bool, StateError> {
        let ctx = self.ctx.clone();
        self.call(async move { ctx.create_table().await })
    }
}

/// Spawns `future` on `runtime` and blocks this thread for its output; `None` if the
/// runtime dropped it. Works from inside another runtime too (it never enters this one).
fn wait<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(future.await);
    });
    rx.recv().ok()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for DynamoStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks; from inside the caller's runtime that panics.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl StateStore for DynamoStore {
    fn load(&self) -> Result<Option<State>, StateError> {
        let ctx = self.ctx.clone();
        let loaded = self.call(async move { ctx.load().await })?;
        if let Some(state) = &loaded {
            lock(&self.logged).insert(state.version, state.log.len());
        }
        Ok(loaded)
    }

    fn save(&self, state: &mut State) -> Result<(), StateError> {
        let logged = match lock(&self.logged).get(&state.version).copied() {
            Some(n) => n,
            None if state.version == 0 => 0,
            None => {
                let ctx = self.ctx.clone();
                self.call(async move { ctx.stored_log_len().await })?
            }
        };
        let added = state.log.get(logged..).unwrap_or_default().to_vec();
        if added.len() > MAX_LOG_PER_SAVE {
            return Err(self.ctx.error(
                "save the state",
                format!(
                    "{} log entries in one save (at most {MAX_LOG_PER_SAVE}): a bug in switchyard; nothing was written",
                    added.len()
                ),
            ));
        }
        let mut body = serde_json::to_value(&*state).map_err(|e| {
            self.ctx
                .error("save the state", format!("cannot render it: {e}"))
        })?;
        if let Some(object) = body.as_object_mut() {
            object.remove("log");
            object.insert("version".into(), (state.version + 1).into());
        }
        let body = body.to_string();
        if body.len() > MAX_STATE_BYTES {
            return Err(self.ctx.error(
                "save the state",
                format!(
                    "the state is {} KB, over the {} KB this store keeps in one item; nothing was written",
                    body.len() / 1024,
                    MAX_STATE_BYTES / 1024
                ),
            ));
        }
        let write = items::StateWrite {
            read_version: state.version,
            body,
            log_start: logged,
            added: added.clone(),
            log_len: state.log.len(),
            switch: state.backend,
            holder: lock(&self.held).clone(),
        };
        let ctx = self.ctx.clone();
        self.call(async move { ctx.save(write).await })?;
        state.version += 1;
        lock(&self.logged).insert(state.version, state.log.len());
        super::faults::after_save(&added);
        Ok(())
    }

    fn lock(&self, purpose: &str) -> Result<LockGuard, StateError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| self.ctx.error("reach", "closed"))?;
        let ctx = self.ctx.clone();
        let (lease, purpose_owned) = (self.lease, purpose.to_string());
        let acquired =
            self.call(async move { lease::acquire(&ctx, &purpose_owned, lease).await })?;
        let next = format!(
            "run `switchyard state show {plan}`, then `switchyard {} {plan}` again",
            command_of(purpose),
            plan = self.plan
        );
        Ok(lease::hold(
            runtime.handle().clone(),
            self.ctx.clone(),
            acquired,
            self.lease,
            self.held.clone(),
            next,
        ))
    }

    fn describe(&self) -> String {
        self.ctx.describe.clone()
    }

    fn lock_info(&self) -> Result<Option<LockInfo>, StateError> {
        let ctx = self.ctx.clone();
        let item = self.call(async move { ctx.read_lock().await })?;
        Ok(item.map(|item| item.info()))
    }

    fn switch(&self) -> Result<Option<Switch>, StateError> {
        let ctx = self.ctx.clone();
        self.call(async move { ctx.read_switch().await })
    }

    fn force_unlock(&self) -> Result<Option<Holder>, StateError> {
        let ctx = self.ctx.clone();
        let lease = self.lease;
        self.call(async move { lease::force_unlock(&ctx, lease).await })
    }

    fn probe(&self) -> Vec<(&'static str, Option<String>)> {
        let ctx = self.ctx.clone();
        self.call(async move { Ok(ctx.probe().await) })
            .unwrap_or_else(|e| vec![("reach the store", Some(e.to_string()))])
    }
}

/// The command to run again for a lock taken for `purpose` ("sync --sequences",
/// "record a validation", ...).
fn command_of(purpose: &str) -> &str {
    match purpose {
        "record a validation" => "validate",
        "state migrate" => "state migrate",
        "sync --sequences" => "sync --sequences",
        other => other.split_whitespace().next().unwrap_or("status"),
    }
}

/// The key of a log item: zero-padded, so the items sort in the log's order.
fn log_key(index: usize) -> String {
    format!("{LOG_PREFIX}{index:010}")
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_names_the_command_to_run_again() {
        for (purpose, command) in [
            ("cutover", "cutover"),
            ("sync (copying a table again)", "sync"),
            ("sync --sequences", "sync --sequences"),
            ("record a validation", "validate"),
            ("state migrate", "state migrate"),
        ] {
            assert_eq!(command_of(purpose), command);
        }
    }

    #[test]
    fn log_keys_sort_in_the_log_order() {
        let mut keys: Vec<String> = [10, 2, 1_000_000, 0].map(log_key).to_vec();
        keys.sort();
        assert_eq!(
            keys,
            [log_key(0), log_key(2), log_key(10), log_key(1_000_000)]
        );
    }
}
