use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use switchyard::plan::{Plan, StateBackend};
use switchyard::state::{self, LockInfo, StateError, StateStore};
use switchyard::{Error, Exit};

/// The migration's shared state: create its table, show it, free a dead holder's lock, move it
/// between backends.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  switchyard state init plans/shop.toml\n  switchyard state show plans/shop.toml\n  switchyard state unlock plans/shop.toml --force\n  switchyard state migrate plans/shop.toml --to dynamodb"
)]
pub struct StateArgs {
    #[command(subcommand)]
    command: StateCommand,
}

#[derive(Debug, Subcommand)]
enum StateCommand {
    /// Create the DynamoDB table ([state] table, on-demand billing); nothing for a file.
    Init {
        /// The plan file (TOML).
        plan: PathBuf,
    },
    /// Phase, switch epoch, the lock's holder and generation, whether its heartbeat moves,
    /// and the last steps.
    Show {
        /// The plan file (TOML).
        plan: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Free the lock of a holder that is gone. Only by the rule a waiting coordinator follows
    /// (its heartbeat unchanged for a whole lease, seen here), so a live holder is never
    /// broken.
    Unlock {
        /// The plan file (TOML).
        plan: PathBuf,
        /// Required: this waits one lease and may take the lock from its holder.
        #[arg(long)]
        force: bool,
    },
    /// Move the migration to the other backend, under both locks; then set [state] backend.
    Migrate {
        /// The plan file (TOML); its [state] section names both backends' settings.
        plan: PathBuf,
        #[arg(long, value_enum)]
        to: To,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum To {
    Dynamodb,
    File,
}

pub async fn run(args: StateArgs) -> Result<Exit, Error> {
    match args.command {
        StateCommand::Init { plan } => init(&plan),
        StateCommand::Show { plan, json } => show(&plan, json).await,
        StateCommand::Unlock { plan, force } => unlock(&plan, force),
        StateCommand::Migrate { plan, to } => migrate(&plan, to),
    }
}

fn init(path: &std::path::Path) -> Result<Exit, Error> {
    let plan = Plan::load(path)?;
    match plan.state.backend {
        StateBackend::File => {
            println!(
                "the file backend needs nothing made: the state goes to {}",
                plan.state_path().display()
            );
            Ok(Exit::Done)
        }
        #[cfg(feature = "dynamodb")]
        StateBackend::Dynamodb => {
            let store = state::DynamoStore::open(&plan)?;
            let created = store.init()?;
            println!(
                "{} {}",
                store.describe(),
                if created {
                    "created (on-demand billing)"
                } else {
                    "exists already"
                }
            );
            Ok(Exit::Done)
        }
        #[cfg(not(feature = "dynamodb"))]
        StateBackend::Dynamodb => Err(state::open(&plan).err().map_or_else(
            || Error::Refused("no DynamoDB support in this build".into()),
            Error::from,
        )),
    }
}

#[derive(Serialize)]
struct Shown {
    store: String,
    name: String,
    phase: Option<String>,
    backend: Option<String>,
    epoch: Option<u64>,
    version: Option<u64>,
    lock: Option<LockInfo>,
    /// The heartbeat, watched here: `moved` after how many seconds, or unchanged for how long.
    heartbeat_moved_after_s: Option<f64>,
    heartbeat_unchanged_for_s: Option<f64>,
    interrupted: Option<String>,
    last_steps: Vec<state::LogEntry>,
}

/// Reads the lock, and watches a held one's heartbeat for a third of the lease (one beat):
/// "moved" means a live holder; "unchanged for" is measured on this clock only.
/// (A file lock has no heartbeat: its flock dies with its holder.)
async fn watch_lock(
    store: &dyn StateStore,
    plan: &Plan,
) -> Result<(Option<LockInfo>, Option<f64>, Option<f64>), StateError> {
    let lease = plan.state.lease.0;
    let first = store.lock_info()?;
    let leased = plan.state.backend == StateBackend::Dynamodb;
    let Some(seen) = first.clone().filter(|l| l.held && leased) else {
        return Ok((first, None, None));
    };
    let start = Instant::now();
    let until = start + lease / 3 + Duration::from_millis(500);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = store.lock_info()?;
        if now.as_ref() != Some(&seen) {
            return Ok((now, Some(start.elapsed().as_secs_f64()), None));
        }
    }
    Ok((first, None, Some(start.elapsed().as_secs_f64())))
}

async fn show(path: &std::path::Path, json: bool) -> Result<Exit, Error> {
    let (plan, store) = super::load_plan(path)?;
    let loaded = store.load()?;
    let (lock, moved, unchanged) = watch_lock(store.as_ref(), &plan).await?;
    let shown = Shown {
        store: store.describe(),
        name: plan.name.0.clone(),
        phase: loaded.as_ref().map(|s| s.phase.to_string()),
        backend: loaded.as_ref().map(|s| s.backend.backend.to_string()),
        epoch: loaded.as_ref().map(|s| s.backend.epoch),
        version: loaded.as_ref().map(|s| s.version),
        lock,
        heartbeat_moved_after_s: moved,
        heartbeat_unchanged_for_s: unchanged,
        interrupted: loaded
            .as_ref()
            .and_then(|s| s.interrupted_step())
            .map(|s| s.to_string()),
        last_steps: loaded
            .as_ref()
            .map(|s| s.log.iter().rev().take(10).rev().cloned().collect())
            .unwrap_or_default(),
    };
    if json {
        super::print_json(&shown)?;
        return Ok(Exit::Done);
    }
    println!("Migration {} in {}", shown.name, shown.store);
    match (&shown.phase, &shown.backend, shown.epoch, shown.version) {
        (Some(phase), Some(backend), Some(epoch), Some(version)) => println!(
            "  phase {phase}, applications on the {backend} (switch epoch {epoch}), state version {version}"
        ),
        _ => println!("  no state yet: nothing has run"),
    }
    match &shown.lock {
        None => println!("  lock: never taken"),
        Some(lock) => {
            let holder = lock
                .holder
                .as_ref()
                .map_or_else(|| "unknown".into(), |h| h.to_string());
            if lock.held {
                println!("  lock: held by {holder}");
                match (moved, unchanged) {
                    (Some(after), _) => println!(
                        "  heartbeat {} moved after {after:.1}s: the holder is alive",
                        lock.heartbeat
                    ),
                    (_, Some(for_s)) => println!(
                        "  heartbeat {} unchanged for {for_s:.1}s (lease {:?}): if it stays so, `switchyard state unlock {} --force` frees it",
                        lock.heartbeat,
                        plan.state.lease.0,
                        path.display()
                    ),
                    _ => {}
                }
            } else {
                println!(
                    "  lock: free (generation {}; last holder {holder})",
                    lock.generation
                );
            }
        }
    }
    if let Some(step) = &shown.interrupted {
        println!(
            "  interrupted: {step} (run `switchyard {step} {}` again)",
            path.display()
        );
    }
    if !shown.last_steps.is_empty() {
        println!("  last steps:");
        for entry in &shown.last_steps {
            println!("    {}  {}", entry.at, entry.event);
        }
    }
    Ok(Exit::Done)
}

fn unlock(path: &std::path::Path, force: bool) -> Result<Exit, Error> {
    if !force {
        return Err(Error::Refused(format!(
            "`state unlock` frees another holder's lock: it waits one lease ({}) to see that holder's heartbeat stand still, and takes the lock only then. Add --force to do it: switchyard state unlock {} --force",
            humantime::format_duration(Plan::load(path)?.state.lease.0),
            path.display()
        )));
    }
    let (_, store) = super::load_plan(path)?;
    match store.force_unlock()? {
        Some(holder) => println!("freed the lock of {holder}: its heartbeat did not move for a whole lease; its generation is fenced"),
        None => println!("the lock is free: nothing to do"),
    }
    Ok(Exit::Done)
}

fn migrate(path: &std::path::Path, to: To) -> Result<Exit, Error> {
    let plan = Plan::load(path)?;
    let mut other = plan.clone();
    other.state.backend = match to {
        To::Dynamodb => StateBackend::Dynamodb,
        To::File => StateBackend::File,
    };
    if other.state.backend == plan.state.backend {
        return Err(Error::Refused(format!(
            "the plan's state is in that backend already ({})",
            state::open(&plan)?.describe()
        )));
    }
    if other.state.backend == StateBackend::Dynamodb && other.state.table.is_none() {
        return Err(Error::Refused(format!(
            "{}: add `table` (and `region` or `endpoint_url`) to [state] for the DynamoDB store, run `switchyard state init`, then migrate",
            path.display()
        )));
    }
    let (from, into) = (state::open(&plan)?, state::open(&other)?);
    let _from_lock = from.lock("state migrate")?;
    let _into_lock = into.lock("state migrate")?;
    let Some(mut moving) = state::load_or_new(from.as_ref(), &plan.name.0)
        .map(Some)?
        .filter(|s| s.version > 0)
    else {
        return Err(Error::Refused(format!(
            "{} holds no state for {}: nothing to move; set [state] backend and start there",
            from.describe(),
            plan.name.0
        )));
    };
    if let Some(there) = into.load()? {
        return Err(Error::Refused(format!(
            "{} already holds a state for {} (version {}): nothing was moved; remove it first if it is stale",
            into.describe(),
            there.name,
            there.version
        )));
    }
    let mut copy = moving.clone();
    copy.version = 0;
    into.save(&mut copy)?;
    moving.moved_to = Some(into.describe());
    from.save(&mut moving)?;
    println!(
        "moved {} (phase {}, {} log entries) from {} to {}; now set [state] backend = \"{}\" in {}",
        plan.name.0,
        copy.phase,
        copy.log.len(),
        from.describe(),
        into.describe(),
        match to {
            To::Dynamodb => "dynamodb",
            To::File => "file",
        },
        path.display()
    );
    Ok(Exit::Done)
}
