//! The step runners that end a migration's replication: `abort` for now.

pub mod abort;
