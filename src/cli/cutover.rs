use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;
use switchyard::cutover::{self, Direction, Report, Step};
use switchyard::{Error, Exit};

/// Move the applications from the source to the target, live, with a pause of a fraction of a
/// second, and turn replication around for the way back.
///
/// Checks first (replication caught up, no drift, indexes valid, a recent passing validation,
/// every proxy reachable, roles fenceable, timeouts nested); then, outside the pause, creates
/// the reverse publication and slot on the target. Inside the pause: pause the proxies, fence
/// the source, wait until the target has applied the source's last change, copy sequences,
/// turn replication around, switch the proxies to the target and resume. A failure before the
/// switch is undone (exit 1); the applications saw only a pause.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  switchyard cutover plans/shop.toml --dry-run   # every check, nothing changed\n  switchyard cutover plans/shop.toml --yes\n  switchyard rollback plans/shop.toml --yes      # the way back"
)]
pub struct CutoverArgs {
    #[command(flatten)]
    switch: SwitchArgs,
    /// Go ahead without a recent passing `switchyard validate`.
    #[arg(long)]
    skip_validation: bool,
}

/// Move the applications back to the source after a cutover, with every write made on the
/// target meanwhile.
///
/// The cutover in reverse: pause the proxies, fence the target, wait until the source has
/// applied the target's last change, copy sequences back, switch the proxies to the source,
/// give the source its write grants back and resume; then drop the reverse replication. The
/// target stays fenced, ready to be dropped or synced again.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  switchyard rollback plans/shop.toml --yes")]
pub struct RollbackArgs {
    #[command(flatten)]
    switch: SwitchArgs,
}

/// What a cutover and a rollback both take.
#[derive(Debug, Args)]
struct SwitchArgs {
    /// The plan file (TOML).
    plan: PathBuf,
    /// Do not ask for confirmation after the checks.
    #[arg(long)]
    yes: bool,
    /// Run every check and print the steps; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: CutoverArgs) -> Result<Exit, Error> {
    switch(&args.switch, Direction::Cutover, args.skip_validation).await
}

pub async fn rollback(args: RollbackArgs) -> Result<Exit, Error> {
    switch(&args.switch, Direction::Rollback, false).await
}

async fn switch(
    args: &SwitchArgs,
    direction: Direction,
    skip_validation: bool,
) -> Result<Exit, Error> {
    let SwitchArgs {
        plan: path,
        yes,
        dry_run,
        json,
    } = args;
    let (yes, dry_run, json) = (*yes, *dry_run, *json);
    let (plan, store) = super::load_plan(path)?;
    let checked =
        cutover::check(&plan, store.as_ref(), direction, skip_validation, dry_run).await?;
    if let Some(recovered) = &checked.recovered {
        eprintln!("{recovered}");
    }
    if !json && !checked.finished_earlier {
        for gate in &checked.gates.0 {
            let mark = if gate.problem.is_some() { "FAIL" } else { "ok" };
            eprintln!("  [{mark:>4}] {}", gate.name);
            if let Some(problem) = &gate.problem {
                eprintln!("         {problem}");
            }
        }
    }
    let ready = checked.gates.failures().is_empty() && !checked.finished_earlier;
    if ready && !dry_run && !yes && !confirm(direction)? {
        return Err(Error::Refused("not confirmed; nothing changed".into()));
    }
    let mut print = |step: &Step| {
        if !json {
            let mark = if step.in_pause { "⏸" } else { " " };
            eprintln!(
                "{mark} {:>8.1} ms  {}: {}",
                step.ms, step.name, step.outcome
            );
        }
    };
    let report = checked.run(dry_run, &mut print).await?;
    if json {
        super::print_json(&report)?;
    } else {
        print_summary(&report);
    }
    Ok(Exit::Done)
}

fn confirm(direction: Direction) -> Result<bool, Error> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::Refused(
            "not a terminal, so no one can confirm: pass --yes".into(),
        ));
    }
    let to = direction.to();
    eprint!("Switch the applications to the {to} now? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Error::Refused(format!("cannot read the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn print_summary(report: &Report) {
    if report.dry_run {
        println!("Dry run: every check passed. The steps, in order:");
        for step in &report.steps {
            println!("  {}", step.name);
        }
        return;
    }
    let to = report.direction.to();
    match (report.pause_ms, report.pause_coordinator_ms) {
        (Some(proxy), Some(coordinator)) => println!(
            "Switched to the {to} (epoch {}). Pause seen by the applications: {proxy:.1} ms (coordinator: {coordinator:.1} ms).",
            report.epoch
        ),
        _ => println!("The {to} is the primary (epoch {}).", report.epoch),
    }
}
