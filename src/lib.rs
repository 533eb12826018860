//! switchyard: move a live PostgreSQL database to a new server with near-zero downtime.
pub mod plan;
pub mod state;
