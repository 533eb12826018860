use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar};
use switchyard::output::human_bytes;
use switchyard::state::StateStore;
use switchyard::sync::copy::CopyProgress;
use switchyard::sync::status::TableStatus;
use switchyard::sync::{self, Observed, Status, SyncOptions, SyncOutcome};
use switchyard::{Error, Exit};

use super::draw::{self, table};

/// Create roles, copy the schema, and start logical replication from source to target.
///
/// Runs the preflight first and refuses on blocking findings. Safe to run again after a crash
/// or Ctrl-C: it carries on where the last run stopped.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  switchyard sync plans/shop.toml                     # set up, return while tables copy\n  switchyard sync plans/shop.toml --wait --timeout 2h # and wait until caught up\n  switchyard sync plans/shop.toml --sequences         # copy sequence values now"
)]
pub struct SyncArgs {
    /// The plan file (TOML).
    plan: PathBuf,
    /// Wait until every table streams and lag is below [sync] max_lag_bytes, showing progress.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long ("90s", "2h"); replication goes on.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Only copy sequence values from source to target, now.
    #[arg(long, conflicts_with = "wait")]
    sequences: bool,
    /// Print the final status as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: SyncArgs) -> Result<Exit, Error> {
    let (plan, store) = super::load_plan(&args.plan)?;
    if args.sequences {
        return copy_sequences(&plan, store.as_ref(), args.json).await;
    }
    let options = SyncOptions {
        wait: args.wait,
        timeout: args.timeout,
    };
    let mut progress = Progress::new();
    let outcome = sync::run(
        &plan,
        store.as_ref(),
        &options,
        &mut |observed| match observed {
            Observed::Copy(copy) => progress.update_copy(copy),
            Observed::Status(status) => progress.update(status),
        },
    )
    .await;
    progress.finish();
    match outcome? {
        SyncOutcome::Blocked(report) => {
            if args.json {
                super::print_json(&report)?;
            } else {
                super::plan::print_report(&report);
            }
            Ok(Exit::Refused)
        }
        SyncOutcome::Started(status) => {
            show(&status, args.json)?;
            if !args.json {
                println!("\nReplication is set up and runs on its own. Watch it with `switchyard status`, or wait with `switchyard sync --wait`.");
            }
            Ok(Exit::Done)
        }
        SyncOutcome::Synced(status) => {
            show(&status, args.json)?;
            if !args.json {
                println!("\nSynced: every table streams; the target is analysed and its indexes are valid.");
            }
            Ok(Exit::Done)
        }
    }
}

fn show(status: &Status, json: bool) -> Result<(), Error> {
    if json {
        super::print_json(status)
    } else {
        super::status::print_status(status);
        Ok(())
    }
}

async fn copy_sequences(
    plan: &switchyard::plan::Plan,
    store: &dyn StateStore,
    json: bool,
) -> Result<Exit, Error> {
    let copied = sync::copy_sequences_now(plan, store).await?;
    if json {
        super::print_json(&copied)?;
    } else {
        println!(
            "{}",
            table(
                &["sequence", "last_value", "is_called"],
                copied.iter().map(|s| vec![
                    s.name.clone(),
                    s.last_value.to_string(),
                    s.is_called.to_string()
                ])
            )
        );
    }
    Ok(Exit::Done)
}

/// Copy progress per table while copying, then the lag; plain log lines when stderr is not a
/// terminal.
struct Progress {
    bars: MultiProgress,
    /// Per table being copied: its bar, and when and at how many rows we first saw it.
    tables: HashMap<String, (ProgressBar, Instant, u64)>,
    states: HashMap<String, &'static str>,
    lag: ProgressBar,
    interactive: bool,
    /// The snapshot copy's phase last shown.
    phase: Option<String>,
}

impl Progress {
    fn new() -> Progress {
        let bars = MultiProgress::new();
        let lag = bars.add(draw::status_line());
        Progress {
            bars,
            tables: HashMap::new(),
            states: HashMap::new(),
            lag,
            interactive: std::io::stderr().is_terminal(),
            phase: None,
        }
    }

    fn update(&mut self, status: &Status) {
        for table in &status.tables {
            self.note_state(&table.name, table.state);
            if table.state == "copying" {
                self.show_copy(table);
            } else if let Some((bar, _, _)) = self.tables.remove(&table.name) {
                bar.finish_and_clear();
            }
        }
        let streaming = status
            .tables
            .iter()
            .filter(|t| t.state == "streaming")
            .count();
        let lag = status.lag_bytes.map_or("-".into(), human_bytes);
        self.lag.set_message(format!(
            "{streaming}/{} tables streaming, lag {lag}",
            status.tables.len()
        ));
        self.lag.tick();
    }

    /// The snapshot copy: a bar per table being copied, the whole copy on the status line.
    fn update_copy(&mut self, copy: &CopyProgress) {
        for table in &copy.tables {
            self.note_state(&table.name, table.state);
            if table.state == "copying" {
                let (bar, _, _) = self.tables.entry(table.name.clone()).or_insert_with(|| {
                    let bar = draw::bytes_bar(&table.name, table.bytes, table.estimated_bytes);
                    (self.bars.insert_before(&self.lag, bar), Instant::now(), 0)
                });
                bar.set_length(table.estimated_bytes.max(table.bytes));
                bar.set_position(table.bytes);
            } else if let Some((bar, _, _)) = self.tables.remove(&table.name) {
                bar.finish_and_clear();
            }
        }
        let copied = copy.tables.iter().filter(|t| t.state == "copied").count();
        let eta = copy.eta_seconds.map_or(String::new(), |s| {
            format!(
                ", ETA {}",
                humantime::format_duration(std::time::Duration::from_secs(s as u64))
            )
        });
        let message = format!(
            "{}: {} of {} at {}/s, {copied}/{} tables copied{eta}",
            copy.phase,
            human_bytes(copy.bytes as i64),
            human_bytes(copy.estimated_bytes as i64),
            human_bytes(copy.rate as i64),
            copy.tables.len()
        );
        if self.interactive {
            self.lag.set_message(message);
            self.lag.tick();
        } else if self.phase.as_deref() != Some(copy.phase.as_str()) {
            tracing::info!("{message}");
        }
        self.phase = Some(copy.phase.clone());
    }

    fn note_state(&mut self, table: &str, state: &'static str) {
        if self.states.insert(table.to_string(), state) != Some(state) {
            if self.interactive {
                let _ = self.bars.println(format!("{table}: {state}"));
            } else {
                tracing::info!(table = %table, state = state, "table state");
            }
        }
    }

    fn show_copy(&mut self, table: &TableStatus) {
        let done = table.rows_copied.unwrap_or(0).max(0) as u64;
        let total = (table.estimated_rows.unwrap_or(0).max(0) as u64).max(done);
        let (bar, first_seen, first_rows) =
            self.tables.entry(table.name.clone()).or_insert_with(|| {
                let bar = self
                    .bars
                    .insert_before(&self.lag, draw::rows_bar(&table.name, done, total));
                (bar, Instant::now(), done)
            });
        bar.set_length(total.max(bar.length().unwrap_or(0)));
        bar.set_position(done);
        bar.set_message(draw::rate_and_eta(
            done,
            *first_rows,
            first_seen.elapsed(),
            total,
        ));
    }

    fn finish(&mut self) {
        for (_, (bar, _, _)) in self.tables.drain() {
            bar.finish_and_clear();
        }
        self.lag.finish_and_clear();
    }
}
