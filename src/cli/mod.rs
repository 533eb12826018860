//! Command-line interface: one file per subcommand, each turning arguments into a library call
//! and its result into output and an exit code.

mod abort;
mod cache;
mod cutover;
mod draw;
mod finalize;
mod plan;
mod proxy;
mod shadow;
mod state;
mod status;
mod sync;
mod validate;

use std::io::IsTerminal;

use clap::{Parser, Subcommand, ValueEnum};
use switchyard::plan::Plan;
use switchyard::state::StateStore;
use switchyard::{Error, Exit};

const AFTER_HELP: &str = "\
Exit codes (every subcommand):
  0  done
  1  refused, or a step failed and was cleanly undone (blocking findings, a gate not met)
  2  usage, plan or connection error
  3  stopped half-way: an operator must look; the message says what to run next

A migration, start to finish:
  switchyard plan plans/shop.toml          # preflight: what blocks, what will happen
  switchyard sync plans/shop.toml --wait   # copy schema and rows, then stream changes
  switchyard status plans/shop.toml        # per-table state, lag, drift
  switchyard validate plans/shop.toml      # which rows differ, if any
  switchyard proxy plans/shop.toml         # what the applications connect to
  switchyard cutover plans/shop.toml       # pause, fence, catch up, switch, resume
  switchyard rollback plans/shop.toml      # the way back, with the target's writes
  switchyard finalize plans/shop.toml      # drop the way back when sure
  switchyard abort plans/shop.toml         # remove slot, publication, subscription";

/// Move a live PostgreSQL database to a new server with near-zero downtime and a way back.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, after_help = AFTER_HELP)]
pub struct Args {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    Plan(plan::PlanArgs),
    Sync(sync::SyncArgs),
    Status(status::StatusArgs),
    Abort(abort::AbortArgs),
    Proxy(proxy::ProxyArgs),
    Validate(validate::ValidateArgs),
    Cutover(cutover::CutoverArgs),
    Rollback(cutover::RollbackArgs),
    Finalize(finalize::FinalizeArgs),
    Cache(cache::CacheArgs),
    State(state::StateArgs),
    Shadow(shadow::ShadowArgs),
}

/// The async runtime for a command: tokio's multi-threaded scheduler, one worker per core.
/// The proxy's runs only its listeners and signals, on one thread: its clients are served
/// by worker threads of their own (see [`crate::proxy::Shard`]).
pub fn runtime(args: &Args) -> std::io::Result<tokio::runtime::Runtime> {
    match &args.command {
        Command::Proxy(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}

pub fn init_logging(args: &Args) {
    let default = match args.verbose {
        0 => "warn,switchyard=info",
        1 => "info,switchyard=debug",
        _ => "debug,switchyard=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub async fn dispatch(args: Args) -> Exit {
    if let Err(message) = switchyard::state::faults::check() {
        eprintln!("error: {message}");
        return Exit::Usage;
    }
    let result = match args.command {
        Command::Plan(a) => plan::run(a).await,
        Command::Sync(a) => sync::run(a).await,
        Command::Status(a) => status::run(a).await,
        Command::Abort(a) => abort::run(a).await,
        Command::Proxy(a) => proxy::run(a).await,
        Command::Validate(a) => validate::run(a).await,
        Command::Cutover(a) => cutover::run(a).await,
        Command::Rollback(a) => cutover::rollback(a).await,
        Command::Finalize(a) => finalize::run(a).await,
        Command::Cache(a) => cache::run(a).await,
        Command::State(a) => state::run(a).await,
        Command::Shadow(a) => shadow::run(a).await,
    };
    match result {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit()
        }
    }
}

/// The plan, and the state store its `[state]` names.
fn load_plan(path: &std::path::Path) -> Result<(Plan, Box<dyn StateStore>), Error> {
    let plan = Plan::load(path)?;
    let store = switchyard::state::open(&plan)?;
    Ok((plan, store))
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Refused(format!("cannot render JSON: {e}")))?;
    println!("{text}");
    Ok(())
}
