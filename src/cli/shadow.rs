use std::path::PathBuf;

use clap::Args;
use switchyard::admin_api::shadow::{Report, Verdict};
use switchyard::plan::Plan;
use switchyard::{Error, Exit};

use super::draw::table;
use super::print_json;

/// Gather the proxies' shadow reads (`[proxy.shadow]`): every sampled read replayed on the
/// other server, its answer compared and its latency measured. Exit 0 when the window is
/// clean; 1 when it diverged, regressed or has too few samples to say.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  switchyard shadow plans/shop.toml\n  switchyard shadow plans/shop.toml --report reports/\n  switchyard shadow plans/shop.toml --json | jq '.fingerprints[] | select(.divergences > 0)'\n  switchyard shadow plans/shop.toml --reset   # report, then start a new window"
)]
pub struct ShadowArgs {
    /// The plan file (TOML).
    plan: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also write shadow.json and shadow.html into this directory.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Start a new window on every proxy once this one is read.
    #[arg(long)]
    reset: bool,
}

pub async fn run(args: ShadowArgs) -> Result<Exit, Error> {
    let plan = Plan::load(&args.plan)?;
    let report = switchyard::shadow::gather(&plan, args.reset).await?;
    if let Some(dir) = &args.report {
        write_report(dir, &report)?;
    }
    if args.json {
        print_json(&report)?;
    } else {
        print!("{}", render_text(&report));
        if let Some(dir) = &args.report {
            println!("report written to {}", dir.join("shadow.html").display());
        }
        if args.reset {
            println!("a new window started on every proxy");
        }
    }
    Ok(match report.verdict {
        Verdict::Clean => Exit::Done,
        _ => Exit::Refused,
    })
}

fn write_report(dir: &std::path::Path, report: &Report) -> Result<(), Error> {
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| Error::Refused(format!("cannot write {}: {e}", path.display())))
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Refused(format!("cannot create {}: {e}", dir.display())))?;
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| Error::Refused(format!("cannot render JSON: {e}")))?;
    write("shadow.json", json)?;
    write("shadow.html", switchyard::shadow::render_html(report))
}

fn render_text(report: &Report) -> String {
    let w = &report.window;
    let mut text = format!(
        "shadow reads since {} from {} prox{}: {} compared, {} not comparable, {} not a read, \
         {} dropped, {} failed; {} in flight, {} unstable\n",
        w.start,
        report.proxies.len(),
        if report.proxies.len() == 1 {
            "y"
        } else {
            "ies"
        },
        report.compared(),
        w.not_comparable,
        w.not_a_read,
        w.dropped,
        w.failed,
        w.in_flight,
        w.unstable,
    );
    let rows = report.fingerprints.iter().map(|f| {
        let short: String = f.query.chars().take(60).collect();
        vec![
            f.fingerprint.clone(),
            short,
            f.calls.to_string(),
            f.divergences.to_string(),
            format!("{:.2} / {:.2}", f.latency.old.p95, f.latency.new.p95),
            f.latency.p95_ratio.map_or("-".into(), |r| {
                format!("{r:.2}×{}", if f.regressed { " !" } else { "" })
            }),
        ]
    });
    text.push_str(&table(
        &[
            "fingerprint",
            "query",
            "calls",
            "divergent",
            "p95 ms old / new",
            "ratio",
        ],
        rows,
    ));
    text.push('\n');
    for f in report.fingerprints.iter().filter(|f| f.divergences > 0) {
        if let Some(example) = &f.example {
            text.push_str(&format!(
                "divergent: {}\n  {}\n  parameters: {:?}\n  {}\n",
                f.fingerprint, example.statement, example.parameters, example.reason
            ));
            for row in &example.only_old {
                text.push_str(&format!("  only on the old server: {}\n", row_text(row)));
            }
            for row in &example.only_new {
                text.push_str(&format!("  only on the new server: {}\n", row_text(row)));
            }
        }
    }
    let t = &report.thresholds;
    text.push_str(&match report.verdict {
        Verdict::Clean => "verdict: clean — no divergence, no regression\n".to_string(),
        Verdict::Insufficient => format!(
            "verdict: insufficient — {} reads compared, fewer than min_samples = {}: let more traffic through\n",
            report.compared(),
            t.min_samples
        ),
        Verdict::Regressed => format!(
            "verdict: regressed — a fingerprint's p95 on the new server exceeds {}× the old (marked !); see the plans with --report\n",
            t.max_p95_ratio
        ),
        Verdict::Diverged => format!(
            "verdict: diverged — {} reads answered differently; see the rows above, or --report for both answers and plans\n",
            w.divergences
        ),
    });
    text
}

fn row_text(row: &[Option<String>]) -> String {
    let cells: Vec<String> = row
        .iter()
        .map(|v| v.clone().unwrap_or_else(|| "NULL".into()))
        .collect();
    format!("({})", cells.join(", "))
}
