use std::path::PathBuf;

use clap::Args;
use switchyard::cutover::abort;
use switchyard::{Error, Exit};

/// Remove the subscription, the replication slots and the publication. The target's copied
/// schema and data stay unless --drop-target-data is given.
///
/// Works from any phase before the switch, and after a crash: it finds the objects by name
/// even when the state file is lost.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  switchyard abort plans/shop.toml\n  switchyard abort plans/shop.toml --drop-target-data   # also empty the target"
)]
pub struct AbortArgs {
    /// The plan file (TOML).
    plan: PathBuf,
    /// Also drop the tables, schemas, types and roles that sync created on the target.
    #[arg(long)]
    drop_target_data: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: AbortArgs) -> Result<Exit, Error> {
    let (plan, store) = super::load_plan(&args.plan)?;
    let report = abort::run(&plan, store.as_ref(), args.drop_target_data).await?;
    if args.json {
        super::print_json(&report)?;
        return Ok(Exit::Done);
    }
    let yes_no = |b: bool| if b { "dropped" } else { "not present" };
    println!(
        "subscription on the target: {}",
        yes_no(report.dropped_subscription)
    );
    println!(
        "slots on the source: {}",
        if report.dropped_slots.is_empty() {
            "none present".into()
        } else {
            report.dropped_slots.join(", ")
        }
    );
    println!(
        "publication on the source: {}",
        yes_no(report.dropped_publication)
    );
    for unfenced in &report.unfenced {
        println!("write grants given back on the {unfenced}");
    }
    for object in &report.dropped_target_objects {
        println!("target: {object}");
    }
    if !report.dropped_roles.is_empty() {
        println!(
            "roles dropped on the target: {}",
            report.dropped_roles.join(", ")
        );
    }
    println!("Aborted: the migration is back in the planned phase.");
    Ok(Exit::Done)
}
