//! `[sync]`: which tables, how their rows reach the target, and when replication counts as
//! caught up.

use std::time::Duration;

use serde::Deserialize;

use super::{Dur, TablePattern};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    #[serde(default = "default_tables")]
    pub tables: Vec<TablePattern>,
    #[serde(default)]
    pub exclude: Vec<TablePattern>,
    #[serde(default = "default_max_lag_bytes")]
    pub max_lag_bytes: u64,
    #[serde(default = "default_retained_wal_warn_bytes")]
    pub retained_wal_warn_bytes: u64,
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Dur,
    /// How the rows already in the source reach the target: `snapshot` (default), switchyard's
    /// own parallel copy from the slot's exported snapshot; `native`, the subscription's table
    /// sync.
    #[serde(default)]
    pub copy: CopyMethod,
    /// How many copies run at once: the snapshot copy's workers (default 4); with `copy =
    /// "native"`, the target's `max_sync_workers_per_subscription` (unset: the target's own).
    pub copy_workers: Option<u32>,
    /// The snapshot copy's largest chunk: a table bigger than this is copied as page ranges of
    /// about this size. Unset: a quarter of each worker's share of the data, between 64 MiB
    /// and 1 GiB.
    pub copy_chunk_bytes: Option<u64>,
}

/// `[sync] copy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMethod {
    #[default]
    Snapshot,
    Native,
}

impl SyncSettings {
    /// The snapshot copy's workers when `copy_workers` is not set: two per core of a typical
    /// small server pair, and what `bench/sync.sh` measured best on 2 cores.
    pub const DEFAULT_COPY_WORKERS: u32 = 4;

    /// The snapshot copy's worker count.
    pub fn snapshot_workers(&self) -> u32 {
        self.copy_workers
            .unwrap_or(Self::DEFAULT_COPY_WORKERS)
            .max(1)
    }
}

pub(crate) fn default_tables() -> Vec<TablePattern> {
    vec![TablePattern {
        schema: "public".into(),
        table: "*".into(),
    }]
}

fn default_max_lag_bytes() -> u64 {
    1024 * 1024
}

fn default_retained_wal_warn_bytes() -> u64 {
    8 * 1024 * 1024 * 1024
}

fn default_poll_interval() -> Dur {
    Dur(Duration::from_secs(1))
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            tables: default_tables(),
            exclude: Vec::new(),
            max_lag_bytes: default_max_lag_bytes(),
            retained_wal_warn_bytes: default_retained_wal_warn_bytes(),
            poll_interval: default_poll_interval(),
            copy: CopyMethod::default(),
            copy_workers: None,
            copy_chunk_bytes: None,
        }
    }
}
