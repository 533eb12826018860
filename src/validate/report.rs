//! The validation report: its model (the `--json` document) and the self-contained HTML
//! page (the terminal's tables are drawn by the CLI).

use serde::Serialize;
use serde_json::{Map, Value};

use super::hashing::ColumnHash;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Identical,
    Different,
    /// Something could not be compared (an error, a timeout): the report says what.
    Incomplete,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Identical => "identical",
            Verdict::Different => "different",
            Verdict::Incomplete => "incomplete",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// On the source, not on the target.
    Missing,
    /// On the target, not on the source.
    Extra,
    /// On both, with different values.
    Changed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub jobs: usize,
    pub max_rate: Option<u64>,
    pub rechecks: u32,
    pub strict: bool,
    pub bucket_rows: i64,
    pub chunk_seconds: f64,
    pub statement_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    /// Schema-qualified.
    pub name: String,
    pub rows_source: u64,
    pub rows_target: u64,
    pub chunks: usize,
    pub matching: u64,
    pub missing: u64,
    pub extra: u64,
    pub changed: u64,
    /// Rows that changed on the source while they were compared: not differences.
    pub in_flight: u64,
    pub duration_ms: u64,
    pub rows_per_second: u64,
    /// Primary-key columns; empty when the table has none (compared as a multiset).
    pub key: Vec<String>,
    /// How each column was hashed.
    pub columns: Vec<ColumnHash>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub table: String,
    /// Primary-key column → value; the whole row for a table without a key.
    pub key: Map<String, Value>,
    pub kind: Kind,
    /// For `changed`: the columns that differ.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// The row on each side (column → text value), where it exists and was fetched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Format of this document; bumped only on incompatible changes.
    pub format: u32,
    pub migration: String,
    pub verdict: Verdict,
    pub started_at: String,
    pub duration_ms: u64,
    /// The source's WAL position when the run started and ended (`None` for a run that
    /// could not start), and how far the target had confirmed at the end (the replication
    /// slot's `confirmed_flush_lsn`), if it replicates.
    pub source_lsn_start: Option<String>,
    pub source_lsn_end: Option<String>,
    pub target_confirmed_lsn: Option<String>,
    pub settings: Settings,
    pub tables: Vec<TableReport>,
    /// Every difference found, up to the detail limit per table (counts are always exact).
    pub differences: Vec<Difference>,
    /// Why the verdict is `incomplete`.
    pub problems: Vec<String>,
}

/// Shown for a WAL position a run that could not start never read.
/// Shown for a position that could not be read.
pub const UNKNOWN_LSN: &str = "n/a";

impl Report {
    /// Something could not be compared (or reported): the verdict is `incomplete`.
    pub fn add_problem(&mut self, problem: String) {
        self.problems.push(problem);
        self.verdict = Verdict::Incomplete;
    }

    pub fn verdict_from(tables: &[TableReport], problems: &[String]) -> Verdict {
        if !problems.is_empty() || tables.iter().any(|t| t.error.is_some()) {
            Verdict::Incomplete
        } else if tables.iter().any(|t| t.missing + t.extra + t.changed > 0) {
            Verdict::Different
        } else {
            Verdict::Identical
        }
    }

    /// One HTML page, no external assets.
    pub fn render_html(&self) -> String {
        let mut h = String::new();
        let verdict_class = match self.verdict {
            Verdict::Identical => "ok",
            Verdict::Different => "bad",
            Verdict::Incomplete => "warn",
        };
        h.push_str(&format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>switchyard validation: {name}</title><style>{STYLE}</style></head><body>",
            name = esc(&self.migration)
        ));
        h.push_str(&format!(
            "<h1>Validation of {}</h1><p class=\"verdict {verdict_class}\">{}</p>",
            esc(&self.migration),
            esc(&self.verdict.to_string().to_uppercase())
        ));
        h.push_str(&format!(
            "<p>Started {} · {} ms · source LSN {} → {} · target confirmed {}</p>",
            esc(&self.started_at),
            self.duration_ms,
            esc(self.source_lsn_start.as_deref().unwrap_or(UNKNOWN_LSN)),
            esc(self.source_lsn_end.as_deref().unwrap_or(UNKNOWN_LSN)),
            esc(self
                .target_confirmed_lsn
                .as_deref()
                .unwrap_or("n/a (no replication)"))
        ));
        for p in &self.problems {
            h.push_str(&format!("<p class=\"warn\">{}</p>", esc(p)));
        }
        h.push_str("<h2>Tables</h2><table><tr><th>table</th><th>rows source</th><th>rows target</th><th>chunks</th><th>matching</th><th>missing on target</th><th>extra on target</th><th>changed</th><th>in flight</th><th>time</th><th>rows/s</th><th>error</th></tr>");
        for t in &self.tables {
            let bad = t.missing + t.extra + t.changed > 0 || t.error.is_some();
            h.push_str(&format!(
                "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td><td>{}</td></tr>",
                if bad { "bad" } else { "" },
                esc(&t.name), t.rows_source, t.rows_target, t.chunks, t.matching, t.missing,
                t.extra, t.changed, t.in_flight, t.duration_ms, t.rows_per_second,
                esc(t.error.as_deref().unwrap_or(""))
            ));
        }
        h.push_str("</table>");
        h.push_str(&format!(
            "<h2>Differences ({})</h2>",
            self.differences.len()
        ));
        for d in &self.differences {
            h.push_str(&difference_html(d));
        }
        h.push_str("<h2>Hash modes</h2><table><tr><th>table</th><th>column</th><th>type</th><th>mode</th><th>why</th></tr>");
        for t in &self.tables {
            for c in &t.columns {
                h.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:?}</td><td>{}</td></tr>",
                    esc(&t.name),
                    esc(&c.name),
                    esc(&c.type_sql),
                    c.mode,
                    esc(c.note.as_deref().unwrap_or(""))
                ));
            }
        }
        h.push_str("</table><h2>Settings</h2><pre>");
        h.push_str(&esc(
            &serde_json::to_string_pretty(&self.settings).unwrap_or_default()
        ));
        h.push_str("</pre></body></html>\n");
        h
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}\
th{background:#f3f3f3}.verdict{font-size:2em;font-weight:bold;padding:.3em .6em;display:inline-block}\
.ok{background:#d9f2d9}.bad{background:#f8d7d7}.warn{background:#fff3cd}\
td.diff{background:#ffb3b3;font-weight:bold}.null{color:#999;font-style:italic}";

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn show(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "<span class=\"null\">NULL</span>".into(),
        Some(Value::String(s)) => esc(s),
        Some(other) => esc(&other.to_string()),
    }
}

fn difference_html(d: &Difference) -> String {
    let key = serde_json::to_string(&d.key).unwrap_or_default();
    let mut h = format!("<h3>{} {} — {:?}</h3>", esc(&d.table), esc(&key), d.kind);
    let columns: Vec<&String> = d
        .source
        .iter()
        .chain(d.target.iter())
        .flat_map(|m| m.keys())
        .fold(Vec::new(), |mut acc, c| {
            if !acc.contains(&c) {
                acc.push(c);
            }
            acc
        });
    if columns.is_empty() {
        return h;
    }
    h.push_str("<table><tr><th>column</th><th>source</th><th>target</th></tr>");
    for c in columns {
        let differs = d.columns.contains(c);
        let cell = if differs {
            "<td class=\"diff\">"
        } else {
            "<td>"
        };
        let side = |m: &Option<Map<String, Value>>| match m {
            Some(m) => show(m.get(c.as_str())),
            None => "<span class=\"null\">(no row)</span>".into(),
        };
        h.push_str(&format!(
            "<tr>{cell}{}</td>{cell}{}</td>{cell}{}</td></tr>",
            esc(c),
            side(&d.source),
            side(&d.target)
        ));
    }
    h.push_str("</table>");
    h
}

/// One line for a terminal: `public.orders {"id":"7"}: changed (amount, note)`.
pub fn describe(d: &Difference) -> String {
    let key = serde_json::to_string(&d.key).unwrap_or_default();
    match d.kind {
        Kind::Changed => format!("{} {key}: changed ({})", d.table, d.columns.join(", ")),
        Kind::Missing => format!("{} {key}: missing on target", d.table),
        Kind::Extra => format!("{} {key}: extra on target", d.table),
    }
}
