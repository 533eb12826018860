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
    let (plan, store) = super::load_plan(&args.plan)?;
    // The state store says where the applications belong; the proxy's own switch file wins
    // when it is newer (a cutover whose coordinator died before saving).
    let from_state = match store.switch() {
        Ok(switch) => switch.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(
                "cannot read the migration state ({e}); using the proxy's own switch file"
            );
            Default::default()
        }
    };
    let backend =
        switchyard::proxy::backend::Backend::restore(from_state, plan.proxy_switch_path());
    switchyard::proxy::run(&plan, backend, Some(std::sync::Arc::from(store)))
        .await
        .map_err(|e| Error::Service(Box::new(e)))?;
    Ok(Exit::Done)
}
