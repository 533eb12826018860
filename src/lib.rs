//! switchyard: move a live PostgreSQL database to a new server with near-zero downtime.
pub mod plan;
pub mod state;
pub mod pg;
pub mod error;
pub mod output;

pub use error::{Error, Exit, Result};
pub mod sync;
pub mod cutover;
