use std::path::PathBuf;

use clap::Args;
use switchyard::output::human_bytes;

use super::draw::table;
use switchyard::preflight::{self as checks, Preflight, Severity};
use switchyard::state;
use switchyard::sync::Servers;
use switchyard::{Error, Exit};

/// Preflight: check both servers and print what `sync` would do. Changes nothing.
///
/// Checks versions, wal_level, slots, WAL senders, workers, disk for WAL, the coordinator's
/// rights, every table's key or replica identity, extensions, roles, roles the cutover cannot
/// fence, and tables that already hold rows on the target. Exits 1 on blocking findings.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  switchyard plan plans/shop.toml\n  switchyard plan plans/shop.toml --json | jq '.findings[] | select(.severity == \"block\")'"
)]
pub struct PlanArgs {
    /// The plan file (TOML).
    plan: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: PlanArgs) -> Result<Exit, Error> {
    let (plan, store) = super::load_plan(&args.plan)?;
    // The state store first: each action it needs, tried without changing anything, so a
    // missing table or a denied action is a finding here, not a failure mid-cutover.
    let store_findings: Vec<checks::Finding> = store
        .probe()
        .into_iter()
        .filter_map(|(action, problem)| {
            problem.map(|problem| checks::Finding {
                severity: Severity::Block,
                check: "state_store",
                subject: "state".into(),
                message: format!("{} cannot {action}: {problem}", store.describe()),
                fix: Some(
                    "allow that action to this role (IAM), or create the table with `switchyard state init`"
                        .into(),
                ),
            })
        })
        .collect();
    let state = if store_findings.is_empty() {
        state::load_or_new(store.as_ref(), &plan.name.0)?
    } else {
        state::State::new(&plan.name.0)
    };
    let servers = Servers::connect(&plan).await?;
    let inspection = checks::inspect(&plan, &servers.source, &servers.target, &state).await?;
    let mut report = inspection.report;
    report.blocked |= !store_findings.is_empty();
    report.findings.splice(0..0, store_findings);
    if args.json {
        super::print_json(&report)?;
    } else {
        print_report(&report);
    }
    Ok(if report.blocked {
        Exit::Refused
    } else {
        Exit::Done
    })
}

pub fn print_report(r: &Preflight) {
    println!(
        "Migration {}: source {} (PostgreSQL {}) -> target {} (PostgreSQL {})\n",
        r.name, r.source.url, r.source.version, r.target.url, r.target.version
    );
    let leaves = || r.tables.iter().filter(|t| !t.partitioned);
    let rows: i64 = leaves().map(|t| t.estimated_rows).sum();
    let bytes: i64 = leaves().map(|t| t.bytes).sum();
    println!(
        "Tables: {} (about {rows} rows, {})",
        r.tables.len(),
        human_bytes(bytes)
    );
    println!(
        "{}",
        table(
            &["table", "rows (est.)", "size", "identity", "on target"],
            r.tables.iter().map(|t| {
                let name = match &t.partition_of {
                    Some(parent) => format!("{} (partition of {parent})", t.name),
                    None if t.partitioned => format!("{} (partitioned)", t.name),
                    None => t.name.clone(),
                };
                vec![
                    name,
                    t.estimated_rows.to_string(),
                    human_bytes(t.bytes),
                    t.identity.clone().unwrap_or_else(|| "NONE".into()),
                    t.on_target.to_string(),
                ]
            })
        )
    );
    match &r.copy {
        Some(copy) => {
            println!(
                "Initial copy: from one exported snapshot, {} workers, chunks of up to {} ([sync] copy = \"snapshot\"; \"native\" uses the subscription's table sync)",
                copy.workers,
                human_bytes(copy.chunk_bytes)
            );
            println!(
                "{}",
                table(
                    &["table", "size", "chunks", "format"],
                    copy.tables.iter().map(|t| vec![
                        t.name.to_string(),
                        human_bytes(t.bytes),
                        t.chunks.to_string(),
                        match t.format {
                            switchyard::sync::copy::plan::Format::Binary => "binary".to_string(),
                            switchyard::sync::copy::plan::Format::Text => {
                                "text (a user-defined type)".to_string()
                            }
                        },
                    ])
                )
            );
        }
        None => {
            println!("Initial copy: the subscription's own table sync ([sync] copy = \"native\")")
        }
    }
    let disk = |free: Option<i64>| free.map_or("unknown".into(), human_bytes);
    println!(
        "Free disk for WAL: source {}, target {}",
        disk(r.source.free_disk_bytes),
        disk(r.target.free_disk_bytes)
    );
    let list = |items: &[String]| {
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(", ")
        }
    };
    println!(
        "Sequences (values copied at cutover): {}",
        list(&r.sequences)
    );
    println!(
        "Roles to create on the target: {}",
        list(&r.roles_to_create)
    );
    println!(
        "Extensions to create on the target: {}",
        list(&r.extensions_to_create)
    );
    if !r.unfenceable_roles.is_empty() {
        println!("\nRoles the cutover cannot fence:");
        println!(
            "{}",
            table(
                &["role", "why"],
                r.unfenceable_roles
                    .iter()
                    .map(|u| vec![u.role.clone(), u.reasons.join(", ")])
            )
        );
    }
    if !r.findings.is_empty() {
        println!("\nFindings:");
        println!(
            "{}",
            table(
                &["", "check", "subject", "finding", "fix"],
                r.findings.iter().map(|f| {
                    let mark = match f.severity {
                        Severity::Block => "BLOCK",
                        Severity::Warn => "warn",
                        Severity::Info => "info",
                    };
                    vec![
                        mark.to_string(),
                        f.check.to_string(),
                        f.subject.clone(),
                        f.message.clone(),
                        f.fix.clone().unwrap_or_default(),
                    ]
                })
            )
        );
    }
    println!("\nSteps `switchyard sync` runs:");
    for (i, step) in r.steps.iter().enumerate() {
        println!(
            "  {}. {}{}",
            i + 1,
            if step.done { "[done] " } else { "" },
            step.description
        );
    }
    let blocking = r
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Block)
        .count();
    if blocking > 0 {
        println!("\nBLOCKED: {blocking} finding(s) must be fixed first; nothing was changed.");
    } else {
        println!("\nReady: nothing blocks. Run `switchyard sync PLAN --wait`.");
    }
}
