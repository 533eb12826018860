use std::path::PathBuf;

use clap::Args;
use switchyard::{Error, Exit};

/// Run the pooling proxy that applications connect to instead of the database.
///
/// Clients log in with SCRAM-SHA-256 as one of the plan's [[proxy.users]]; the proxy logs in to
/// the current primary as the same role with the same password. Runs until SIGTERM or Ctrl-C,
/// then lets open transactions finish (up to [proxy] shutdown_timeout).
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  APP_PASSWORD=... SWITCHYARD_ADMIN_TOKEN=... switchyard proxy plans/shop.toml\n  psql \"postgres://app@127.0.0.1:6432/shop\"\n  curl -s 127.0.0.1:9187/metrics\n  curl -s -X POST -H \"Authorization: Bearer $SWITCHYARD_ADMIN_TOKEN\" -d '{\"timeout_ms\": 2000}' 127.0.0.1:9187/pause"
)]
pub struct ProxyArgs {
    /// The plan file (TOML).
    plan: PathBuf,
}

pub async fn run(args: ProxyArgs) -> Result<Exit, Error> {
    let (plan, _store) = super::load_plan(&args.plan)?;
    // Before a cutover the source is the primary; the switch (a later step) changes this.
    switchyard::proxy::run(&plan, &plan.source).await?;
    Ok(Exit::Done)
}
