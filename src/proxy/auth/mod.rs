//! Authentication: SCRAM-SHA-256 towards clients; SCRAM-SHA-256, md5, cleartext or trust
//! towards the servers (see `pool::server`).

pub mod scram;
