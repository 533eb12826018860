//! Shadow reads' report: what `GET /shadow` answers for one proxy, and what `switchyard
//! shadow` makes of every proxy's answers ([`Report::merge`]) — the same document, so that
//! one proxy's window and the fleet's read alike.
//!
//! The latency of each side is kept as a [`Histogram`] of fixed buckets that every proxy
//! shares, so that windows add up exactly; percentiles are read off the merged buckets
//! (within 5% of the true value: each bucket is 10% wide).
//!
//! "Old" is always the source and "new" the target, whichever of them the applications use
//! at the time: before the cutover the client's answer is the old one and the replay the new
//! one; after it, the other way round (the way back is checked).

use serde::{Deserialize, Serialize};

/// Whether a window says it is safe to switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Enough samples, no divergence, no regression.
    Clean,
    /// Fewer comparable samples than `min_samples`: nothing to conclude yet.
    Insufficient,
    /// Some fingerprint's p95 on the new server exceeds `max_p95_ratio` × the old one's.
    Regressed,
    /// Some read answered differently on the two servers.
    Diverged,
}

/// The thresholds a report was judged by (`[proxy.shadow]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub min_samples: u64,
    pub max_p95_ratio: f64,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub verdict: Verdict,
    pub thresholds: Thresholds,
    pub window: Window,
    /// Worst first: divergences, then regressions, then the slowest p95 ratio.
    pub fingerprints: Vec<Fingerprint>,
    /// The proxies whose windows are in it (admin URLs), filled by `switchyard shadow`.
    #[serde(default)]
    pub proxies: Vec<String>,
}

/// The window's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// When the window started (RFC 3339; the earliest of the merged proxies).
    pub start: String,
    /// Reads replayed and compared (in flight and unstable ones included).
    pub samples: u64,
    /// Sampled reads not replayed: `max_in_flight` replays were already running.
    pub dropped: u64,
    /// Reads whose answer the data does not determine (`now()`, `random()`, `LIMIT` without
    /// `ORDER BY`): replayed for latency, never compared.
    pub not_comparable: u64,
    /// Statements that turned out to write (refused under `default_transaction_read_only`),
    /// or are not a single read: not counted as divergences.
    pub not_a_read: u64,
    /// Replays that could not run (the shadow server down, `statement_timeout`): no verdict
    /// on them. The clients saw none of it.
    pub failed: u64,
    pub divergences: u64,
    pub in_flight: u64,
    pub unstable: u64,
}

/// One statement fingerprint (PostgreSQL's normalisation: constants replaced by `$n`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// pg_query's fingerprint, hex.
    pub fingerprint: String,
    /// The normalised text.
    pub query: String,
    /// Replays compared (or timed, when not comparable).
    pub calls: u64,
    pub divergences: u64,
    /// Mismatches that were gone once the subscriber had confirmed the read's position: the
    /// replay ran before replication had applied what the read saw.
    pub in_flight: u64,
    /// Mismatches that kept changing across re-runs (the rows are being written to).
    pub unstable: u64,
    pub not_comparable: u64,
    pub regressed: bool,
    pub latency: Latency,
    /// One divergent instance, the first seen.
    pub example: Option<Example>,
    /// `EXPLAIN` of one sampled instance on both servers, kept for a divergence or a
    /// regression.
    pub plans: Option<Plans>,
    /// The buckets behind `latency`, so that windows merge exactly.
    pub histograms: Histograms,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub old: Percentiles,
    pub new: Percentiles,
    /// new p95 / old p95; absent without samples on both sides.
    pub p95_ratio: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histograms {
    pub old: Histogram,
    pub new: Histogram,
}

impl Histograms {
    /// Whether the two sides' p95s make a regression (what [`Histograms::judge`] says,
    /// reading only the p95s).
    pub fn regressed(&self, thresholds: &Thresholds) -> bool {
        let (old, new) = (&self.old, &self.new);
        if old.count().min(new.count()) < thresholds.min_samples {
            return false;
        }
        let (old_p95, new_p95) = (round3(old.quantile_ms(0.95)), round3(new.quantile_ms(0.95)));
        old_p95 > 0.0 && (new_p95 / old_p95 * 100.0).round() / 100.0 > thresholds.max_p95_ratio
    }

    /// The percentiles of both sides, and whether they make a regression.
    pub fn judge(&self, thresholds: &Thresholds) -> (Latency, bool) {
        let (old, new) = (&self.old, &self.new);
        let mut latency = Latency {
            old: old.percentiles(),
            new: new.percentiles(),
            p95_ratio: None,
        };
        if old.count() > 0 && new.count() > 0 && latency.old.p95 > 0.0 {
            latency.p95_ratio = Some((latency.new.p95 / latency.old.p95 * 100.0).round() / 100.0);
        }
        (latency, self.regressed(thresholds))
    }
}

/// A divergent instance: what was sent and both answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// The statement as the client sent it.
    pub statement: String,
    /// Its parameters as text (binary ones as `\x` hex); `null` for NULL.
    pub parameters: Vec<Option<String>>,
    /// What differs, in words.
    pub reason: String,
    pub old: Answer,
    pub new: Answer,
    /// Rows only in the old answer, and only in the new one (a multiset difference).
    pub only_old: Vec<Vec<Option<String>>>,
    pub only_new: Vec<Vec<Option<String>>>,
}

/// One side's answer, as text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub columns: Vec<Column>,
    /// The first rows (at most [`Answer::ROWS_KEPT`]); binary values as `\x` hex.
    pub rows: Vec<Vec<Option<String>>>,
    pub row_count: u64,
    /// The command tag (`SELECT 3`).
    pub command: Option<String>,
    pub error: Option<AnswerError>,
}

impl Answer {
    pub const ROWS_KEPT: usize = 50;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// The type's name on that server (`format_type`): OIDs differ between servers.
    pub type_name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plans {
    pub old: String,
    pub new: String,
}

/// Latencies in buckets 10% wide from 10 µs up (bucket `i` holds `[10 µs × 1.1^i,
/// 10 µs × 1.1^(i+1))`), the last one open; only counts, so that two windows add up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Counts per bucket, trailing empty buckets left out.
    pub buckets: Vec<u64>,
}

/// 200 buckets reach 10 µs × 1.1^200 ≈ 31 minutes.
const BUCKETS: usize = 200;
const FIRST_US: f64 = 10.0;
const GROWTH: f64 = 1.1;

impl Histogram {
    pub fn record(&mut self, elapsed: std::time::Duration) {
        let us = elapsed.as_secs_f64() * 1e6;
        let index = if us <= FIRST_US {
            0
        } else {
            ((us / FIRST_US).ln() / GROWTH.ln()) as usize
        }
        .min(BUCKETS - 1);
        if self.buckets.len() <= index {
            self.buckets.resize(index + 1, 0);
        }
        self.buckets[index] += 1;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    pub fn add(&mut self, other: &Histogram) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
    }

    /// The `q` quantile (0..1) in milliseconds: the middle of its bucket; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (index, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let low = FIRST_US * GROWTH.powi(index as i32);
                return low * (1.0 + GROWTH) / 2.0 / 1000.0;
            }
        }
        0.0
    }

    pub fn percentiles(&self) -> Percentiles {
        Percentiles {
            p50: round3(self.quantile_ms(0.50)),
            p95: round3(self.quantile_ms(0.95)),
            p99: round3(self.quantile_ms(0.99)),
        }
    }
}

fn round3(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

impl Fingerprint {
    /// Latency and `regressed` read again off the histograms.
    pub fn judge(&mut self, thresholds: &Thresholds) {
        (self.latency, self.regressed) = self.histograms.judge(thresholds);
    }

    fn add(&mut self, other: &Fingerprint) {
        self.calls += other.calls;
        self.divergences += other.divergences;
        self.in_flight += other.in_flight;
        self.unstable += other.unstable;
        self.not_comparable += other.not_comparable;
        self.histograms.old.add(&other.histograms.old);
        self.histograms.new.add(&other.histograms.new);
        if self.example.is_none() {
            self.example = other.example.clone();
        }
        if self.plans.is_none() {
            self.plans = other.plans.clone();
        }
    }
}

impl Report {
    /// Judges `window` and `fingerprints` by `thresholds`: each fingerprint's latency, then
    /// the verdict, worst fingerprints first.
    pub fn judged(
        thresholds: Thresholds,
        window: Window,
        fingerprints: Vec<Fingerprint>,
    ) -> Report {
        let mut report = Report {
            verdict: Verdict::Insufficient,
            thresholds,
            window,
            fingerprints,
            proxies: Vec::new(),
        };
        report.judge();
        report
    }

    fn judge(&mut self) {
        for fingerprint in &mut self.fingerprints {
            fingerprint.judge(&self.thresholds);
        }
        self.window.divergences = self.fingerprints.iter().map(|f| f.divergences).sum();
        self.fingerprints.sort_by(|a, b| {
            (b.divergences > 0, b.regressed)
                .cmp(&(a.divergences > 0, a.regressed))
                .then_with(|| {
                    let ratio = |f: &Fingerprint| f.latency.p95_ratio.unwrap_or(0.0);
                    ratio(b).total_cmp(&ratio(a))
                })
                .then_with(|| b.calls.cmp(&a.calls))
        });
        self.verdict = if self.window.divergences > 0 {
            Verdict::Diverged
        } else if self.fingerprints.iter().any(|f| f.regressed) {
            Verdict::Regressed
        } else if self.compared() < self.thresholds.min_samples {
            Verdict::Insufficient
        } else {
            Verdict::Clean
        };
    }

    /// Samples that were compared: a verdict rests on these.
    pub fn compared(&self) -> u64 {
        self.window
            .samples
            .saturating_sub(self.window.not_comparable)
    }

    /// Several proxies' windows as one, judged by `thresholds` (the plan's).
    pub fn merge(
        thresholds: Thresholds,
        reports: impl IntoIterator<Item = (String, Report)>,
    ) -> Report {
        let mut window = Window::default();
        let mut proxies = Vec::new();
        let mut by_fingerprint: std::collections::BTreeMap<String, Fingerprint> =
            Default::default();
        for (proxy, report) in reports {
            proxies.push(proxy);
            let w = &report.window;
            if window.start.is_empty() || (!w.start.is_empty() && w.start < window.start) {
                window.start = w.start.clone();
            }
            window.samples += w.samples;
            window.dropped += w.dropped;
            window.not_comparable += w.not_comparable;
            window.not_a_read += w.not_a_read;
            window.failed += w.failed;
            window.in_flight += w.in_flight;
            window.unstable += w.unstable;
            for fingerprint in report.fingerprints {
                match by_fingerprint.get_mut(&fingerprint.fingerprint) {
                    Some(known) => known.add(&fingerprint),
                    None => {
                        by_fingerprint.insert(fingerprint.fingerprint.clone(), fingerprint);
                    }
                }
            }
        }
        let mut report = Report::judged(thresholds, window, by_fingerprint.into_values().collect());
        report.proxies = proxies;
        report
    }

    /// What a cutover gate (`[cutover] shadow`) finds wrong with this window: empty when it
    /// passes.
    pub fn gate_problems(&self, gate: &Gate) -> Vec<String> {
        let mut problems = Vec::new();
        if self.compared() < gate.min_samples {
            problems.push(format!(
                "{} shadow reads compared since {}, fewer than the {} the gate asks for: \
                 let traffic run through the proxies with [proxy.shadow] fraction > 0",
                self.compared(),
                self.window.start,
                gate.min_samples
            ));
        }
        if self.window.divergences > gate.max_divergences {
            let offending: Vec<String> = self
                .fingerprints
                .iter()
                .filter(|f| f.divergences > 0)
                .map(|f| {
                    format!(
                        "{} ({} divergent): {}",
                        f.fingerprint, f.divergences, f.query
                    )
                })
                .collect();
            problems.push(format!(
                "{} divergent shadow reads (the gate allows {}): {}",
                self.window.divergences,
                gate.max_divergences,
                offending.join("; ")
            ));
        }
        for f in &self.fingerprints {
            let enough = f.histograms.old.count().min(f.histograms.new.count())
                >= self.thresholds.min_samples;
            if let (true, Some(ratio)) = (enough, f.latency.p95_ratio) {
                if ratio > gate.max_p95_ratio {
                    problems.push(format!(
                        "{} is {ratio}× slower at p95 on the new server ({} ms against {} ms; \
                         the gate allows {}×): {}",
                        f.fingerprint,
                        f.latency.new.p95,
                        f.latency.old.p95,
                        gate.max_p95_ratio,
                        f.query
                    ));
                }
            }
        }
        problems
    }
}

/// `[cutover] shadow`: what the window must show before a cutover goes ahead.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    #[serde(default = "default_gate_min_samples")]
    pub min_samples: u64,
    #[serde(default)]
    pub max_divergences: u64,
    #[serde(default = "default_gate_ratio")]
    pub max_p95_ratio: f64,
}

fn default_gate_min_samples() -> u64 {
    1000
}

fn default_gate_ratio() -> f64 {
    2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fingerprint(name: &str, old_ms: u64, new_ms: u64, calls: u64) -> Fingerprint {
        let mut histograms = Histograms::default();
        for _ in 0..calls {
            histograms.old.record(Duration::from_millis(old_ms));
            histograms.new.record(Duration::from_millis(new_ms));
        }
        Fingerprint {
            fingerprint: name.into(),
            query: format!("SELECT {name}"),
            calls,
            divergences: 0,
            in_flight: 0,
            unstable: 0,
            not_comparable: 0,
            regressed: false,
            latency: Latency::default(),
            example: None,
            plans: None,
            histograms,
        }
    }

    const T: Thresholds = Thresholds {
        min_samples: 50,
        max_p95_ratio: 2.0,
    };

    fn window(samples: u64) -> Window {
        Window {
            start: "2026-12-07T10:00:00Z".into(),
            samples,
            ..Window::default()
        }
    }

    #[test]
    fn percentiles_come_within_five_percent() {
        let mut h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        for (q, want) in [(0.5, 50.0), (0.95, 95.0), (0.99, 99.0)] {
            let got = h.quantile_ms(q);
            assert!(
                (got / want - 1.0).abs() < 0.06,
                "q{q}: {got} against {want}"
            );
        }
        assert_eq!(Histogram::default().quantile_ms(0.5), 0.0);
    }

    #[test]
    fn verdicts() {
        let slow = fingerprint("a", 1, 5, 60);
        let fine = fingerprint("b", 2, 2, 60);
        let report = Report::judged(T, window(120), vec![fine.clone(), slow.clone()]);
        assert_eq!(report.verdict, Verdict::Regressed);
        assert!(slow.histograms.regressed(&T) && !fine.histograms.regressed(&T));
        assert_eq!(report.fingerprints[0].fingerprint, "a", "worst first");
        assert!(report.fingerprints[0].latency.p95_ratio.unwrap() > 4.0);
        // Too few calls to call it a regression: not enough samples overall either.
        let few = fingerprint("a", 1, 5, 10);
        assert_eq!(
            Report::judged(T, window(10), vec![few]).verdict,
            Verdict::Insufficient
        );
        assert_eq!(
            Report::judged(T, window(60), vec![fine.clone()]).verdict,
            Verdict::Clean
        );
        let mut diverged = fine.clone();
        diverged.divergences = 1;
        assert_eq!(
            Report::judged(T, window(60), vec![diverged]).verdict,
            Verdict::Diverged
        );
    }

    #[test]
    fn windows_merge_exactly() {
        let one = Report::judged(T, window(30), vec![fingerprint("a", 1, 5, 30)]);
        let mut other = Report::judged(T, window(30), vec![fingerprint("a", 1, 5, 30)]);
        other.window.start = "2026-12-07T09:00:00Z".into();
        assert_eq!(one.verdict, Verdict::Insufficient);
        let merged = Report::merge(T, [("p1".into(), one), ("p2".into(), other)]);
        assert_eq!(merged.window.samples, 60);
        assert_eq!(merged.window.start, "2026-12-07T09:00:00Z");
        assert_eq!(merged.fingerprints.len(), 1);
        assert_eq!(merged.fingerprints[0].calls, 60);
        assert_eq!(
            merged.verdict,
            Verdict::Regressed,
            "60 calls reach min_samples"
        );
        assert_eq!(merged.proxies, ["p1", "p2"]);
    }

    #[test]
    fn the_gate_names_what_it_refuses() {
        let gate = Gate {
            min_samples: 100,
            max_divergences: 0,
            max_p95_ratio: 2.0,
        };
        let mut diverged = fingerprint("d", 1, 1, 60);
        diverged.divergences = 2;
        let report = Report::judged(T, window(60), vec![diverged, fingerprint("s", 1, 5, 60)]);
        let problems = report.gate_problems(&gate);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("60 shadow reads compared"));
        assert!(problems[1].contains("SELECT d"));
        assert!(problems[2].contains("SELECT s"));
        let clean = Report::judged(T, window(200), vec![fingerprint("c", 1, 1, 200)]);
        assert!(clean.gate_problems(&gate).is_empty());
    }
}
