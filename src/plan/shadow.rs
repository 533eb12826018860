//! `[proxy.shadow]`: a sample of the applications' reads replayed on the other server, off
//! the client's path, and compared (docs/proxy.md, "Shadow reads").

use std::time::Duration;

use serde::Deserialize;

use super::{default_tables, Dur, Fraction, TablePattern};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSettings {
    /// The share of eligible reads replayed, 0 to 1; 0 (the default) turns shadow reads off.
    #[serde(default)]
    pub fraction: Fraction,
    /// Replays running at once per proxy; a sample past it is dropped (and counted).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// A replay (or re-run, or EXPLAIN) running longer is stopped by the server.
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout: Dur,
    /// Shadow connections per role and server, apart from the applications' pools.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// A fingerprint needs this many timed replays before it can count as a regression, and
    /// a window this many compared ones before its verdict is more than `insufficient`.
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// A fingerprint regressed when its p95 on the new server exceeds this × the old one's.
    #[serde(default = "default_max_p95_ratio")]
    pub max_p95_ratio: f64,
    /// Reads of tables these patterns select (all that a read names must be) are replayed.
    #[serde(default = "default_tables")]
    pub tables: Vec<TablePattern>,
    #[serde(default)]
    pub exclude: Vec<TablePattern>,
}

impl ShadowSettings {
    /// Whether a read of `schema.table` may be replayed. An unqualified name is checked as
    /// `public`'s and as every schema's (`*`).
    pub fn covers(&self, schema: &str, table: &str) -> bool {
        self.tables.iter().any(|p| p.matches(schema, table))
            && !self.exclude.iter().any(|p| p.matches(schema, table))
    }

    pub fn thresholds(&self) -> crate::admin_api::shadow::Thresholds {
        crate::admin_api::shadow::Thresholds {
            min_samples: self.min_samples,
            max_p95_ratio: self.max_p95_ratio,
        }
    }
}

impl Default for ShadowSettings {
    fn default() -> ShadowSettings {
        ShadowSettings {
            fraction: Fraction(0.0),
            max_in_flight: default_max_in_flight(),
            statement_timeout: default_statement_timeout(),
            pool_size: default_pool_size(),
            min_samples: default_min_samples(),
            max_p95_ratio: default_max_p95_ratio(),
            tables: default_tables(),
            exclude: Vec::new(),
        }
    }
}

fn default_max_in_flight() -> u32 {
    8
}

fn default_statement_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

fn default_pool_size() -> u32 {
    2
}

fn default_min_samples() -> u64 {
    50
}

fn default_max_p95_ratio() -> f64 {
    2.0
}
