//! The PostgreSQL wire protocol, as much of it as a pooler must understand.

pub mod backend;
pub mod codec;
pub mod frontend;
pub mod startup;

pub use codec::{body, tag, Frame, PgCodec};
