//! Finding PostgreSQL's client programs (pg_dump, pg_restore) able to read a given server.

use std::path::PathBuf;
use std::process::Command;

use super::PgError;

/// The newest `name` whose major version is at least `min_major`: `$SWITCHYARD_PG_BIN/name`,
/// Debian's `/usr/lib/postgresql/*/bin/name`, then `name` on the `PATH`.
pub fn find(name: &str, min_major: i32) -> Result<(PathBuf, i32), PgError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("SWITCHYARD_PG_BIN") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        candidates.extend(entries.flatten().map(|e| e.path().join("bin").join(name)));
    }
    candidates.push(PathBuf::from(name));
    let mut found: Vec<(PathBuf, i32)> = candidates
        .into_iter()
        .filter_map(|path| major_of(&path).map(|major| (path, major)))
        .collect();
    found.sort_by_key(|(_, major)| -major);
    match found.into_iter().next() {
        Some((path, major)) if major >= min_major => Ok((path, major)),
        Some((path, major)) => Err(PgError::Tool(format!(
            "{} is version {major}, which cannot read a PostgreSQL {min_major} server; install PostgreSQL {min_major} client programs or set SWITCHYARD_PG_BIN",
            path.display()
        ))),
        None => Err(PgError::Tool(format!(
            "{name} not found; install the PostgreSQL {min_major} client programs (apt install postgresql-client-{min_major}) or set SWITCHYARD_PG_BIN"
        ))),
    }
}

fn major_of(path: &std::path::Path) -> Option<i32> {
    let output = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
    let version = text.split_whitespace().nth(2)?;
    version.split('.').next()?.parse().ok()
}
