//! Counters for `/metrics`, kept as atomics: the hot path pays one relaxed add per event.
//! Each proxy worker counts in its own [`Metrics`] (no cache line bounces between cores on
//! every message); `/metrics` adds them up.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the transaction latency histogram.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Aligned to its own cache lines, away from the other workers' counters.
#[derive(Default)]
#[repr(align(128))]
pub struct Metrics {
    pub transactions: AtomicU64,
    pub queries: AtomicU64,
    pub bytes_from_clients: AtomicU64,
    pub bytes_to_clients: AtomicU64,
    pub clients_waiting: AtomicU64,
    pub logins_refused: AtomicU64,
    pub wait_timeouts: AtomicU64,
    pub server_connections_lost: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Checkouts served by another worker's pool.
    pub borrowed: AtomicU64,
    /// Checkouts that found no server connection free and waited for one.
    pub waits: AtomicU64,
    /// Server connections released while a cancel forwarded to them was on its way.
    pub held_for_cancel: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_micros: AtomicU64,
}

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Counts one in a gauge for as long as it lives: also when the future holding it is dropped
/// half-way (a client that cancels its wait for a server connection).
pub struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    pub fn count(gauge: &'a AtomicU64) -> Held<'a> {
        add(gauge, 1);
        Held(gauge)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// The sum of several workers' counters.
    pub fn total<'a>(parts: impl IntoIterator<Item = &'a Metrics>) -> Metrics {
        let total = Metrics::default();
        for part in parts {
            let pairs = [
                (&total.transactions, &part.transactions),
                (&total.queries, &part.queries),
                (&total.bytes_from_clients, &part.bytes_from_clients),
                (&total.bytes_to_clients, &part.bytes_to_clients),
                (&total.clients_waiting, &part.clients_waiting),
                (&total.logins_refused, &part.logins_refused),
                (&total.wait_timeouts, &part.wait_timeouts),
                (
                    &total.server_connections_lost,
                    &part.server_connections_lost,
                ),
                (&total.protocol_errors, &part.protocol_errors),
                (&total.borrowed, &part.borrowed),
                (&total.waits, &part.waits),
                (&total.held_for_cancel, &part.held_for_cancel),
                (&total.latency_count, &part.latency_count),
                (&total.latency_micros, &part.latency_micros),
            ];
            let buckets = total.latency_buckets.iter().zip(&part.latency_buckets);
            for (into, from) in pairs.into_iter().chain(buckets) {
                add(into, from.load(Ordering::Relaxed));
            }
        }
        total
    }

    /// A transaction (server connection held from first message to ReadyForQuery 'I') ended.
    pub fn transaction(&self, took: Duration) {
        add(&self.transactions, 1);
        let seconds = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&bound| seconds <= bound) {
            add(&self.latency_buckets[i], 1);
        }
        add(&self.latency_count, 1);
        add(&self.latency_micros, took.as_micros() as u64);
    }

    /// Prometheus text format. `gauges` are (name, help, labels, value) read at render time.
    pub fn render(&self, gauges: &[(&str, &str, String, u64)]) -> String {
        let mut out = String::with_capacity(4096);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut last = "";
        for (name, help, labels, value) in gauges {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                last = name;
            }
            let _ = writeln!(out, "{name}{labels} {value}");
        }
        let counters: [(&str, &str, &AtomicU64); 7] = [
            (
                "switchyard_transactions_total",
                "Transactions run through the proxy.",
                &self.transactions,
            ),
            (
                "switchyard_queries_total",
                "Queries and Syncs forwarded.",
                &self.queries,
            ),
            (
                "switchyard_client_bytes_received_total",
                "Bytes received from clients.",
                &self.bytes_from_clients,
            ),
            (
                "switchyard_client_bytes_sent_total",
                "Bytes sent to clients.",
                &self.bytes_to_clients,
            ),
            (
                "switchyard_server_connections_borrowed_total",
                "Transactions a worker ran on another worker's server connection (its own were all busy).",
                &self.borrowed,
            ),
            (
                "switchyard_server_connections_held_for_cancel_total",
                "Server connections held back after a transaction until PostgreSQL had acted on a cancel forwarded to them (closed if it had not within 2 s).",
                &self.held_for_cancel,
            ),
            (
                "switchyard_server_connection_waits_total",
                "Transactions that found every server connection of their pool busy and waited for one.",
                &self.waits,
            ),
        ];
        for (name, help, counter) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                load(counter)
            );
        }
        let _ = writeln!(out, "# HELP switchyard_clients_waiting Clients waiting for a server connection.\n# TYPE switchyard_clients_waiting gauge\nswitchyard_clients_waiting {}", load(&self.clients_waiting));
        let _ = writeln!(out, "# HELP switchyard_errors_total Errors by kind.\n# TYPE switchyard_errors_total counter");
        for (kind, counter) in [
            ("login_refused", &self.logins_refused),
            ("query_wait_timeout", &self.wait_timeouts),
            ("server_connection_lost", &self.server_connections_lost),
            ("protocol", &self.protocol_errors),
        ] {
            let _ = writeln!(
                out,
                "switchyard_errors_total{{kind=\"{kind}\"}} {}",
                load(counter)
            );
        }
        let _ = writeln!(out, "# HELP switchyard_transaction_duration_seconds Time a transaction held a server connection.\n# TYPE switchyard_transaction_duration_seconds histogram");
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += load(bucket);
            let _ = writeln!(
                out,
                "switchyard_transaction_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = load(&self.latency_count);
        let _ = writeln!(
            out,
            "switchyard_transaction_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "switchyard_transaction_duration_seconds_sum {}",
            load(&self.latency_micros) as f64 / 1e6
        );
        let _ = writeln!(out, "switchyard_transaction_duration_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.transaction(Duration::from_micros(300));
        m.transaction(Duration::from_millis(20));
        let text = m.render(&[]);
        assert!(
            text.contains("switchyard_transaction_duration_seconds_bucket{le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_transaction_duration_seconds_bucket{le=\"0.025\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_transaction_duration_seconds_count 2"),
            "{text}"
        );
        assert!(text.contains("switchyard_transactions_total 2"), "{text}");
    }
}
