//! A lock file next to the state file: one coordinator acts on a migration at a time.
//!
//! The lock is an advisory `flock` on the file, so it is released by the kernel whatever way
//! its holder ends: no stale locks to guess about. The file itself stays; it names the last
//! holder, which is what a refused command prints.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StateError;

#[derive(Serialize, Deserialize)]
struct Holder {
    pid: u32,
    host: String,
    purpose: String,
    since: String,
}

/// Held while a command acts on a migration; released when dropped (or when the process
/// ends). What it holds is the store's: [`FileLock`] for the file store.
#[derive(Debug)]
pub struct LockGuard {
    _held: Box<dyn Held>,
}

/// A store's lock, as its [`LockGuard`] holds it: released by its `Drop`.
pub trait Held: Send + Sync + std::fmt::Debug {}

impl LockGuard {
    pub fn new(held: impl Held + 'static) -> LockGuard {
        LockGuard {
            _held: Box::new(held),
        }
    }
}

/// The file store's lock: an advisory `flock` on the lock file.
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl Held for FileLock {}

impl FileLock {
    pub(super) fn acquire(path: PathBuf, purpose: &str) -> Result<LockGuard, StateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| io_error(&path, source))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| io_error(&path, source))?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io_error(&path, err));
            }
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = serde_json::from_str::<Holder>(&text)
                .map(|h| {
                    format!(
                        "`{}` by pid {} on {} since {}",
                        h.purpose, h.pid, h.host, h.since
                    )
                })
                .unwrap_or_else(|_| "another process".into());
            return Err(StateError::Locked {
                path: path.display().to_string(),
                holder,
            });
        }
        let me = Holder {
            pid: std::process::id(),
            host: hostname(),
            purpose: purpose.to_string(),
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        let json = serde_json::to_vec(&me).unwrap_or_default();
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(&json))
            .map_err(|source| io_error(&path, source))?;
        Ok(LockGuard::new(FileLock { file }))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor this guard owns; closing it would release it too.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn io_error(path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        action: "lock",
        path: path.display().to_string(),
        source,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_and_named_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.lock");
        let first = FileLock::acquire(path.clone(), "sync").unwrap();
        let err = FileLock::acquire(path.clone(), "abort")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`sync`"), "{err}");
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        drop(first);
        let _second = FileLock::acquire(path.clone(), "abort").unwrap();
    }

    #[test]
    fn a_lock_left_by_a_dead_holder_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.lock");
        // What a killed coordinator leaves: the file with its holder, but no flock.
        std::fs::write(
            &path,
            r#"{"pid":999999,"host":"x","purpose":"sync","since":"then"}"#,
        )
        .unwrap();
        let _taken = FileLock::acquire(path, "abort").unwrap();
    }
}
