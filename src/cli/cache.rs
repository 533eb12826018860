use std::path::PathBuf;

use clap::{Args, Subcommand};
use switchyard::cache_setup as setup;
use switchyard::pg::Side;
use switchyard::proxy::cache::explain;
use switchyard::{Error, Exit};

/// The proxy's Redis read cache (`[proxy.cache]`): its objects on the primary, and what it
/// would do with a statement.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  CACHE_PASSWORD=... switchyard cache setup plans/shop.toml\n  switchyard cache explain plans/shop.toml \"SELECT * FROM orders WHERE id = 1\" --role app\n  switchyard cache drop plans/shop.toml"
)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Create (or bring in step with [proxy.cache] tables/exclude) the cache's role,
    /// publication, slot and event trigger on the source, as the coordinator's role.
    Setup {
        /// The plan file (TOML).
        plan: PathBuf,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove the cache's slot, publication and event trigger from both servers.
    Drop {
        /// The plan file (TOML).
        plan: PathBuf,
    },
    /// Say whether a statement would be served from the cache and, if not, the first reason.
    Explain {
        /// The plan file (TOML).
        plan: PathBuf,
        /// The statement, as the application sends it.
        sql: String,
        /// The role the application logs in as (default: the first [[proxy.users]]).
        #[arg(long)]
        role: Option<String>,
        /// The application's search_path, when it sets one.
        #[arg(long)]
        search_path: Option<String>,
    },
}

pub async fn run(args: CacheArgs) -> Result<Exit, Error> {
    match args.command {
        CacheCommand::Setup { plan, json } => {
            let plan = switchyard::plan::Plan::load(&plan)?;
            let report = setup::setup(&plan, Side::Source).await?;
            if json {
                super::print_json(&report)?;
            } else {
                for line in &report.done {
                    println!("{line}");
                }
                println!(
                    "cached tables: {}",
                    if report.tables.is_empty() {
                        "none".to_string()
                    } else {
                        report.tables.join(", ")
                    }
                );
            }
            Ok(Exit::Done)
        }
        CacheCommand::Drop { plan } => {
            let plan = switchyard::plan::Plan::load(&plan)?;
            for side in [Side::Source, Side::Target] {
                match setup::drop(&plan, side).await {
                    Ok(done) => done.iter().for_each(|line| println!("{side}: {line}")),
                    Err(e) => eprintln!("{side}: {e}"),
                }
            }
            Ok(Exit::Done)
        }
        CacheCommand::Explain {
            plan,
            sql,
            role,
            search_path,
        } => {
            let plan = switchyard::plan::Plan::load(&plan)?;
            let role = match role.or_else(|| plan.proxy.users.first().map(|u| u.name.0.clone())) {
                Some(role) => role,
                None => {
                    return Err(Error::Refused(
                        "name the application's role with --role".into(),
                    ))
                }
            };
            match explain::explain(&plan, &sql, &role, search_path.as_deref()).await? {
                Ok(tables) => {
                    println!("cacheable: answers are gated by the versions of {tables} table(s)");
                    Ok(Exit::Done)
                }
                Err(reason) => {
                    println!("not cacheable: {reason}");
                    Ok(Exit::Refused)
                }
            }
        }
    }
}
