use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Args;
use switchyard::plan::TablePattern;
use switchyard::state::{self, StateError, StateStore};
use switchyard::validate::hashing::Mode;
use switchyard::validate::report::{describe, Report, Verdict, UNKNOWN_LSN};
use switchyard::validate::{self, Options};
use switchyard::{Error, Exit};

use super::draw::table;

/// Compare the rows of source and target, live, and say exactly which rows differ.
///
/// Checksums run inside both databases, chunk by chunk and bucket by bucket; only rows in
/// buckets that differ are fetched. While replication runs, a chunk that differs is compared
/// again once the target has applied what the source's snapshot saw, and rows that changed
/// meanwhile are reported as in flight, not as differences. The result is kept in the state
/// store for the cutover.
///
/// Exits 0 when the data is identical, 1 when differences were found, 2 when it could not
/// validate (the report says why).
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  switchyard validate plans/shop.toml\n  switchyard validate plans/shop.toml --tables 'public.orders*' --jobs 4\n  switchyard validate plans/shop.toml --max-rate 200000 --report reports/\n  switchyard validate plans/shop.toml --json | jq '.differences[]'"
)]
pub struct ValidateArgs {
    /// The plan file (TOML).
    plan: PathBuf,
    /// Only these tables (`schema.table`, `*` and `?` wildcards; repeat or separate with commas).
    #[arg(long, value_delimiter = ',')]
    tables: Vec<TablePattern>,
    /// Chunks compared at once (each uses one connection per server).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// At most this many rows per second, both servers together, so a validation never
    /// starves a production source.
    #[arg(long)]
    max_rate: Option<u64>,
    /// How often a row that differs is checked again before it counts as a difference.
    #[arg(long, default_value_t = 3)]
    rechecks: u32,
    /// Compare every column's text form: `1.0` and `1.00`, `'1 day'` and `'24 hours'` differ.
    #[arg(long)]
    strict: bool,
    /// statement_timeout of every checksum query.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    statement_timeout: Duration,
    /// How long a chunk waits for the target to apply what the source's snapshot saw.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    catchup_timeout: Duration,
    /// About how long each chunk's checksum query runs; chunk sizes follow from a timed
    /// probe. Shorter chunks hold a snapshot for less time and re-check less on a difference.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    chunk_time: Duration,
    /// Differences printed in the terminal report.
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// Write a self-contained HTML report into this directory (created if missing).
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: ValidateArgs) -> Result<Exit, Error> {
    let (plan, store) = super::load_plan(&args.plan)?;
    let state = state::load_or_new(store.as_ref(), &plan.name.0)?;
    let options = Options {
        tables: args.tables.clone(),
        jobs: args.jobs.max(1),
        max_rate: args.max_rate,
        rechecks: args.rechecks,
        strict: args.strict,
        statement_timeout: args.statement_timeout,
        catchup_timeout: args.catchup_timeout,
        chunk_seconds: args.chunk_time.as_secs_f64(),
        ..Options::default()
    };
    let bar = (!args.json && std::io::stderr().is_terminal())
        .then(|| super::draw::rows_bar("validating", 0, 0));
    let observe = bar.clone().map(|bar| -> validate::Observer {
        std::sync::Arc::new(move |progress: validate::Progress| {
            bar.set_length(progress.rows_total.max(progress.rows_done).max(1));
            bar.set_position(progress.rows_done);
            bar.set_message(super::draw::rate_and_eta(
                progress.rows_done,
                0,
                progress.elapsed,
                progress.rows_total,
            ));
        })
    });
    let started = SystemTime::now();
    // The report's directory first, so that a long run does not end unable to write it.
    if let Some(dir) = &args.report {
        if let Err(why) = std::fs::create_dir_all(dir) {
            let why = cannot_write(dir, &why);
            return finish(&args, validate::failed(&plan, &options, started, why));
        }
    }
    let run = validate::run(&plan, &state, &options, observe).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let mut report = match run {
        Ok(mut report) => {
            if let Err(e) = remember(store.as_ref(), &plan.name.0, &report).await {
                report.add_problem(format!(
                    "the verdict ({}) is not recorded in the state, so a cutover cannot rely on it: {e}",
                    report.verdict
                ));
            }
            report
        }
        Err(e) => validate::failed(&plan, &options, started, e.to_string()),
    };
    if let Some(dir) = &args.report {
        match write_html(dir, &report) {
            Ok(path) => eprintln!("HTML report: {}", path.display()),
            Err(why) => report.add_problem(cannot_write(dir, &why)),
        }
    }
    finish(&args, report)
}

/// Prints the report; the exit code follows its verdict.
fn finish(args: &ValidateArgs, report: Report) -> Result<Exit, Error> {
    if args.json {
        super::print_json(&report)?;
    } else {
        print!("{}", render_text(&report, args.samples));
    }
    Ok(match report.verdict {
        Verdict::Identical => Exit::Done,
        Verdict::Different => Exit::Refused,
        Verdict::Incomplete => Exit::Usage,
    })
}

/// How long recording the result waits for another command holding the state's lock: those
/// hold it for a step at a time, and the run is done by then.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Records the result for the cutover.
async fn remember(store: &dyn StateStore, name: &str, report: &Report) -> Result<(), StateError> {
    let _lock = state::lock_within(store, "record a validation", LOCK_WAIT).await?;
    let mut state = state::load_or_new(store, name)?;
    state.last_validation = Some(validate::record(report));
    state.note(state::Event::Validation(report.verdict.to_string()));
    store.save(&mut state)
}

fn cannot_write(dir: &Path, why: &std::io::Error) -> String {
    format!("cannot write the report into {}: {why}", dir.display())
}

/// Writes the self-contained HTML page into `dir`; returns its path.
fn write_html(dir: &Path, report: &Report) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let stamp: String = report
        .started_at
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let path = dir.join(format!("validation-{}-{stamp}.html", report.migration));
    std::fs::write(&path, report.render_html())?;
    Ok(path)
}

/// The per-table table and up to `samples` differences, for a terminal.
fn render_text(report: &Report, samples: usize) -> String {
    let mut out = format!(
        "Validation of {}: {} ({} ms; source LSN {} → {})\n",
        report.migration,
        report.verdict.to_string().to_uppercase(),
        report.duration_ms,
        report.source_lsn_start.as_deref().unwrap_or(UNKNOWN_LSN),
        report.source_lsn_end.as_deref().unwrap_or(UNKNOWN_LSN)
    );
    let rows = report.tables.iter().map(|t| {
        vec![
            t.name.clone(),
            t.rows_source.to_string(),
            t.rows_target.to_string(),
            t.chunks.to_string(),
            t.matching.to_string(),
            t.missing.to_string(),
            t.extra.to_string(),
            t.changed.to_string(),
            t.in_flight.to_string(),
            format!("{} ms", t.duration_ms),
            t.rows_per_second.to_string(),
            t.error.clone().unwrap_or_default(),
        ]
    });
    if !report.tables.is_empty() {
        out.push_str(&table(
            &[
                "table",
                "rows source",
                "rows target",
                "chunks",
                "matching",
                "missing on target",
                "extra on target",
                "changed",
                "in flight",
                "time",
                "rows/s",
                "error",
            ],
            rows,
        ));
        out.push('\n');
    }
    let text_columns: Vec<String> = report
        .tables
        .iter()
        .flat_map(|t| {
            t.columns
                .iter()
                .filter(|c| c.mode == Mode::Text)
                .map(move |c| {
                    format!(
                        "{}.{} ({}): {}",
                        t.name,
                        c.name,
                        c.type_sql,
                        c.note.as_deref().unwrap_or("text")
                    )
                })
        })
        .collect();
    if !text_columns.is_empty() {
        out.push_str("Columns compared by their text form:\n");
        for line in &text_columns {
            out.push_str(&format!("  {line}\n"));
        }
    }
    if !report.differences.is_empty() {
        out.push_str(&format!(
            "Differences ({} shown of {}):\n",
            samples.min(report.differences.len()),
            report.differences.len()
        ));
        for d in report.differences.iter().take(samples) {
            out.push_str(&format!("  {}\n", describe(d)));
        }
    }
    for p in &report.problems {
        out.push_str(&format!("Could not validate: {p}\n"));
    }
    out
}
