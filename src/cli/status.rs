use std::path::PathBuf;

use clap::Args;
use switchyard::output::human_bytes;

use super::draw::table;
use switchyard::sync::status::TableStatus;
use switchyard::sync::{status, Servers, Status};
use switchyard::{state, Error, Exit};

/// Show the phase, each table's state, lag, retained WAL, the last apply error and drift.
///
/// Exits 1 when something blocks the migration (schema drift, a lost slot, a failing apply),
/// so that a monitor can page on it.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  switchyard status plans/shop.toml\n  watch -n 5 switchyard status plans/shop.toml\n  switchyard status plans/shop.toml --json | jq .lag_bytes"
)]
pub struct StatusArgs {
    /// The plan file (TOML).
    plan: PathBuf,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: StatusArgs) -> Result<Exit, Error> {
    let (plan, store) = super::load_plan(&args.plan)?;
    let state = state::load_or_new(store.as_ref(), &plan.name.0)?;
    let servers = Servers::connect(&plan).await?;
    let status = status::read(&plan, &state, &servers.source, &servers.target, true).await?;
    if args.json {
        super::print_json(&status)?;
    } else {
        print_status(&status);
    }
    // Scripts and monitors can tell a migration that needs a person from one that does not.
    Ok(if status.blocking.is_empty() {
        Exit::Done
    } else {
        Exit::Refused
    })
}

pub fn print_status(s: &Status) {
    println!("Migration {}: phase {}", s.name, s.phase);
    println!(
        "Applications (through the proxies) go to the {} (switch epoch {})",
        s.backend.backend, s.backend.epoch
    );
    for side in &s.fenced {
        println!(
            "The {side} is fenced: no role but the coordinator's can write the migrated tables"
        );
    }
    if let Some(reverse) = &s.reverse {
        let lag = reverse
            .lag_bytes
            .map_or("its slot on the target is missing".to_string(), |lag| {
                format!("the source is {} behind the target", human_bytes(lag))
            });
        let worker = match (reverse.exists, reverse.enabled, reverse.worker_running) {
            (false, _, _) => "MISSING on the source",
            (true, false, _) => "DISABLED",
            (true, true, true) => "apply worker running",
            (true, true, false) => "apply worker NOT running",
        };
        println!(
            "Way back: subscription {} on the source, {worker}; {lag}",
            reverse.subscription
        );
        if let Some(retained) = reverse.retained_wal_bytes {
            println!(
                "WAL retained by the reverse slot on the target: {}",
                human_bytes(retained)
            );
        }
        if reverse.apply_errors > 0 {
            println!("Errors on the source: {} apply", reverse.apply_errors);
        }
        if let Some(error) = &reverse.last_error {
            println!("Last error on the source: {error}");
        }
    }
    match &s.subscription {
        Some(sub) => println!(
            "Subscription {sub}: {}, apply worker {}",
            if s.enabled { "enabled" } else { "DISABLED" },
            if s.worker_running {
                "running"
            } else {
                "not running"
            }
        ),
        None => println!("No subscription on the target."),
    }
    if let Some(copy) = &s.copy {
        print_copy(copy);
    }
    if s.tables.iter().any(|t| t.rows_copied.is_some()) {
        let rows = |t: &TableStatus| match (t.rows_copied, t.estimated_rows) {
            (Some(done), Some(total)) => format!("{done} of ~{total}"),
            (Some(done), None) => done.to_string(),
            _ => String::new(),
        };
        println!(
            "{}",
            table(
                &["table", "state", "rows copied"],
                s.tables
                    .iter()
                    .map(|t| vec![t.name.clone(), t.state.to_string(), rows(t)])
            )
        );
    } else if !s.tables.is_empty() {
        println!(
            "{}",
            table(
                &["table", "state"],
                s.tables
                    .iter()
                    .map(|t| vec![t.name.clone(), t.state.to_string()])
            )
        );
    }
    let lag = match (s.lag_bytes, s.lag_seconds) {
        (Some(bytes), Some(secs)) => format!("{} ({secs:.1} s)", human_bytes(bytes)),
        (Some(bytes), None) => format!("{} (no WAL sender connected)", human_bytes(bytes)),
        _ => "no slot".into(),
    };
    println!("Lag: {lag}");
    for slot in &s.cache_slots {
        println!(
            "Read cache slot on the {}: {} WAL retained, {}",
            slot.side,
            slot.retained_wal_bytes.map_or("?".to_string(), human_bytes),
            if slot.active {
                "consumed by a proxy"
            } else {
                "not consumed now (no proxy runs its invalidator)"
            }
        );
    }
    if let Some(retained) = s.retained_wal_bytes {
        println!(
            "WAL retained by the slot on the source: {}",
            human_bytes(retained)
        );
    }
    if s.apply_errors + s.sync_errors > 0 {
        println!(
            "Errors on the target: {} apply, {} table copy",
            s.apply_errors, s.sync_errors
        );
    }
    if let Some(error) = &s.last_error {
        println!("Last error: {error}");
    }
    if let Some(step) = &s.interrupted_step {
        println!("WARNING: step `{step}` was begun and not finished (the command was stopped or failed); run the same command again to carry on, or `switchyard abort`");
    }
    for warning in &s.warnings {
        println!("WARNING: {warning}");
    }
    for blocker in &s.blocking {
        println!("BLOCKING: {blocker}");
    }
    if !s.drift.is_empty() {
        println!("\nSchema drift (blocking: apply the fix on the target):");
        println!(
            "{}",
            table(
                &["table", "drift", "fix"],
                s.drift
                    .iter()
                    .map(|d| vec![d.table.clone(), d.detail.clone(), d.fix.clone()])
            )
        );
    }
}

/// The snapshot copy, as its chunks commit on the target.
fn print_copy(copy: &switchyard::sync::copy::CopyProgress) {
    let eta = copy.eta_seconds.map_or(String::new(), |s| {
        format!(
            ", ETA {}",
            humantime::format_duration(std::time::Duration::from_secs(s as u64))
        )
    });
    println!(
        "Initial copy ({}): {} of {} in {:.0} s, {}/s{eta}",
        copy.phase,
        human_bytes(copy.bytes as i64),
        human_bytes(copy.estimated_bytes as i64),
        copy.elapsed_seconds,
        human_bytes(copy.rate as i64)
    );
    println!(
        "{}",
        table(
            &["table", "state", "chunks", "rows", "bytes", "rate", "ETA"],
            copy.tables.iter().map(|t| vec![
                t.name.clone(),
                t.state.to_string(),
                format!("{}/{}", t.chunks_done, t.chunks),
                t.rows.to_string(),
                format!(
                    "{} of ~{}",
                    human_bytes(t.bytes as i64),
                    human_bytes(t.estimated_bytes as i64)
                ),
                t.rate
                    .map_or(String::new(), |r| format!("{}/s", human_bytes(r as i64))),
                t.eta_seconds.map_or(String::new(), |s| {
                    humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string()
                }),
            ])
        )
    );
}
