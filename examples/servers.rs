//! Starts a throwaway PostgreSQL 15 source and PostgreSQL 17 target on free 127.0.0.1 ports,
//! prints their URLs as shell variables, and keeps them until stdin closes or Ctrl-C.
//! The demo (`scripts/demo.sh`) and the benchmarks use it.
//!
//! Usage: cargo run --example servers > servers.env

#[path = "../tests/common/servers.rs"]
mod servers;

use std::io::{Read, Write};

use servers::{Cluster, Flavor};

fn main() {
    let source = Cluster::start(Flavor::Source15);
    let target = Cluster::start(Flavor::Target17);
    let mut out = std::io::stdout();
    let lines = format!(
        "SOURCE_PORT={}\nTARGET_PORT={}\nPGPASSWORD={}\nSOURCE_URL={}\nTARGET_URL={}\nSOURCE_BIN={}\nTARGET_BIN={}\n",
        source.port,
        target.port,
        servers::PASSWORD,
        source.url("postgres"),
        target.url("postgres"),
        Flavor::Source15.bin_dir().display(),
        Flavor::Target17.bin_dir().display(),
    );
    if out
        .write_all(lines.as_bytes())
        .and_then(|_| out.flush())
        .is_err()
    {
        return;
    }
    // Runs until whoever started us closes our stdin (or kills us: the servers die with us).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(source);
    drop(target);
}
