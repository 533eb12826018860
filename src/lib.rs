//! switchyard: move a live PostgreSQL database to a new server with near-zero downtime.
pub mod admin_api;
pub mod cache_setup;
pub mod error;
pub mod output;
pub mod pg;
pub mod plan;
pub mod state;

pub use error::{Error, Exit, Result};
pub mod cutover;
pub mod preflight;
pub mod proxy;
pub mod replication;
pub mod shadow;
pub mod sync;
pub mod validate;
