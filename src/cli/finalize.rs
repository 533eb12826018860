use std::path::PathBuf;

use clap::Args;
use switchyard::cutover;
use switchyard::{Error, Exit};

/// End a migration after a successful cutover: drop the reverse replication, the forward
/// publication and every other object switchyard made on either server.
///
/// The source stays fenced (no role but the coordinator's can write the migrated tables)
/// unless --unfence gives the grants back.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  switchyard finalize plans/shop.toml\n  switchyard finalize plans/shop.toml --unfence"
)]
pub struct FinalizeArgs {
    /// The plan file (TOML).
    plan: PathBuf,
    /// Give the source its write grants back.
    #[arg(long)]
    unfence: bool,
}

pub async fn run(args: FinalizeArgs) -> Result<Exit, Error> {
    let (plan, store) = super::load_plan(&args.plan)?;
    let finalized = cutover::finalize(&plan, store.as_ref(), args.unfence).await?;
    for line in &finalized.done {
        println!("{line}");
    }
    // The fence is the one thing finalize may leave on purpose: say so instead of claiming
    // that nothing is left.
    let summary = if finalized.already_finished {
        "Finished already: an earlier finalize ended this migration; nothing was changed."
    } else if finalized.source_fenced {
        "Finished: the target is the primary; switchyard's replication objects are gone from both servers, but the source stays fenced."
    } else {
        "Finished: the target is the primary; nothing of switchyard's is left on either server."
    };
    println!("{summary}");
    Ok(Exit::Done)
}
