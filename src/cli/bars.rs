//! Progress bars: the library reports progress through observers, and the CLI draws them
//! here (on stderr, hidden when it is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};

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
