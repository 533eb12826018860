//! Integration tests against real servers: PostgreSQL 15 source, PostgreSQL 17 target.

#[path = "../common/mod.rs"]
mod common;

mod sync_live;
