//! Integration tests against real servers: PostgreSQL 15 source, PostgreSQL 17 target, shared
//! by all tests of this binary; each test has its own database.

#[path = "../common/mod.rs"]
mod common;

mod abort;
mod cache;
mod crash_matrix;
pub mod cutover;
mod drift;
mod initial_copy;
mod plan_errors;
mod private_folder;
pub mod proxy;
mod proxy_drivers;
mod proxy_fidelity;
mod proxy_fuzz;
mod proxy_limits;
mod proxy_server_auth;
mod proxy_state;
mod resume;
mod roles;
mod shadow;
pub mod shared_state;
mod sync_live;
mod tls;
mod validate;
mod way_back;
