//! What the cache shows: `/cache` and its part of `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{decisions::Decision, lock, Cache};

impl Cache {
    /// `/cache`: the counters, the invalidator, and the decisions remembered (statement,
    /// role, and whether it is cacheable or the first reason it is not).
    pub fn report(&self) -> serde_json::Value {
        let decisions: Vec<serde_json::Value> = lock(&self.decisions)
            .iter()
            .take(50)
            .map(|((sql, role, search_path), decision)| {
                let (cacheable, reason) = match decision {
                    Decision::Pending => (false, Some("being decided".to_string())),
                    Decision::Cacheable { .. } => (true, None),
                    Decision::Refused { reason, .. } => (false, Some(reason.to_string())),
                };
                serde_json::json!({
                    "statement": &**sql,
                    "role": &**role,
                    "search_path": search_path.as_deref(),
                    "cacheable": cacheable,
                    "reason": reason,
                })
            })
            .collect();
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "hits": count(&self.stats.hits),
            "misses": count(&self.stats.misses),
            "stored": count(&self.stats.stored),
            "coalesced": count(&self.stats.coalesced),
            "too_large": count(&self.stats.too_large),
            "redis_errors": count(&self.stats.redis_errors),
            "bypassed": self.stats.bypassed(),
            "required_position": self.freshness.required_any(),
            "slot_retained_wal_bytes": Some(self.retained_wal.load(Ordering::Relaxed)).filter(|&b| b >= 0),
            "invalidator": {
                "state": self.invalidator.state(),
                "processed": count(&self.invalidator.processed),
                "transactions": count(&self.invalidator.transactions),
                "schema_changes": count(&self.invalidator.schema_changes),
            },
            "decisions": decisions,
        })
    }

    /// The cache's counters for `/metrics` (Prometheus text).
    pub fn metrics_text(&self) -> String {
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut text = String::new();
        let mut counter = |name: &str, help: &str, rows: Vec<(String, u64)>| {
            text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for (labels, value) in rows {
                text.push_str(&format!("{name}{labels} {value}\n"));
            }
        };
        counter(
            "switchyard_cache_reads_total",
            "Reads looked up in the cache, by outcome.",
            vec![
                ("{outcome=\"hit\"}".into(), count(&self.stats.hits)),
                ("{outcome=\"miss\"}".into(), count(&self.stats.misses)),
            ],
        );
        counter(
            "switchyard_cache_bypassed_total",
            "Reads sent to the database without looking in the cache, by reason.",
            self.stats
                .bypassed()
                .into_iter()
                .map(|(why, n)| {
                    let reason = serde_json::to_value(why)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    (format!("{{reason=\"{reason}\"}}"), n)
                })
                .collect(),
        );
        counter(
            "switchyard_cache_stored_total",
            "Answers stored in Redis.",
            vec![(String::new(), count(&self.stats.stored))],
        );
        counter(
            "switchyard_cache_redis_errors_total",
            "Redis calls that failed or timed out.",
            vec![(String::new(), count(&self.stats.redis_errors))],
        );
        text.push_str(&format!(
            "# HELP switchyard_cache_slot_retained_wal_bytes WAL the cache's slot keeps on the primary.\n\
             # TYPE switchyard_cache_slot_retained_wal_bytes gauge\n\
             switchyard_cache_slot_retained_wal_bytes {}\n",
            self.retained_wal.load(Ordering::Relaxed).max(0)
        ));
        text
    }
}
