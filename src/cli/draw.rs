//! Everything drawn for a person: the tables of the reports, and the progress bars (the
//! library reports progress through observers; bars go to stderr, hidden when it is not a
//! terminal).

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use indicatif::{ProgressBar, ProgressStyle};

/// A table with a header row, sized to the terminal.
pub fn table<R, C>(header: &[&str], rows: R) -> String
where
    R: IntoIterator<Item = Vec<C>>,
    C: ToString,
{
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    // A terminal that reports no usable width (a pty without a size) gets the natural layout.
    if table.width().is_some_and(|width| width < 60) {
        table.set_content_arrangement(ContentArrangement::Disabled);
    }
    for row in rows {
        table.add_row(row.into_iter().map(|c| c.to_string()).collect::<Vec<_>>());
    }
    table.to_string()
}

/// A bar counting rows; its message carries the rate and ETA (see [`rate_and_eta`]). Hidden
/// when stderr is not a terminal.
pub fn rows_bar(label: &str, done: u64, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total.max(done).max(1)).with_position(done);
    let style =
        ProgressStyle::with_template("{prefix:>28} [{bar:30}] {human_pos}/{human_len} rows {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar
}

/// A table's copy by bytes (the snapshot copy knows each table's size, not its rows).
pub fn bytes_bar(label: &str, done: u64, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total.max(done).max(1)).with_position(done);
    let style = ProgressStyle::with_template(
        "{prefix:>28} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}, ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar
}

/// "12,345 rows/s, ETA 3m 2s" from rows done since an earlier observation. The bar's own
/// estimate would count from zero, but a copy may have started long before we first saw it.
pub fn rate_and_eta(rows: u64, since_rows: u64, since: std::time::Duration, total: u64) -> String {
    let secs = since.as_secs_f64();
    if secs < 0.5 || rows <= since_rows {
        return String::new();
    }
    let rate = (rows - since_rows) as f64 / secs;
    let eta = std::time::Duration::from_secs((total.saturating_sub(rows) as f64 / rate) as u64);
    format!(
        "{} rows/s, ETA {}",
        indicatif::HumanCount(rate as u64),
        humantime::format_duration(eta)
    )
}

/// A line that shows a changing message (the lag once streaming).
pub fn status_line() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar
}
