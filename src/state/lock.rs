//! The migration's lock: one coordinator acts on a migration at a time, and every holder has
//! a `generation` that only grows, the fencing token its state writes and proxy calls carry.
//!
//! The file store's lock is an advisory `flock` on a lock file next to the state file, so it
//! is released by the kernel whatever way its holder ends: no stale locks to guess about. The
//! file itself stays; it names the last holder, which is what a refused command prints, and
//! the last generation, which the next holder raises by one.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StateError;

/// Who holds (or last held) a migration's lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// The command: `sync`, `cutover`, ...
    pub purpose: String,
    /// When it took the lock, on its own clock (RFC 3339): shown, never compared.
    pub since: String,
    /// The fencing token of this holder. (Lock files of releases before it have none: 0.)
    #[serde(default)]
    pub generation: u64,
}

impl Holder {
    pub(super) fn me(purpose: &str, generation: u64) -> Holder {
        Holder {
            pid: std::process::id(),
            host: hostname(),
            purpose: purpose.to_string(),
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            generation,
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` by pid {} on {} since {} (generation {})",
            self.purpose, self.pid, self.host, self.since, self.generation
        )
    }
}

/// The lock as the store has it now ([`super::StateStore::lock_info`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LockInfo {
    /// Someone holds it now (a live flock; a lease item with an owner).
    pub held: bool,
    /// The holder now, or the last one.
    pub holder: Option<Holder>,
    /// The current generation: the one a proxy accepts control calls from.
    pub generation: u64,
    /// The lease's heartbeat counter (DynamoDB); 0 for a file lock.
    pub heartbeat: u64,
}

/// Held while a command acts on a migration; released when dropped (or when the process
/// ends). What it holds is the store's: [`FileLock`] for the file store.
#[derive(Debug)]
pub struct LockGuard {
    generation: u64,
    _held: Box<dyn Held>,
}

/// A store's lock, as its [`LockGuard`] holds it: released by its `Drop`.
pub trait Held: Send + Sync + std::fmt::Debug {}

impl LockGuard {
    pub fn new(held: impl Held + 'static, generation: u64) -> LockGuard {
        LockGuard {
            generation,
            _held: Box::new(held),
        }
    }

    /// This holder's fencing token: proxies accept control calls that carry it only while it
    /// is the lock's current one.
    pub fn generation(&self) -> u64 {
        self.generation
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
            // The holder may be writing its name this very moment (it truncates, then
            // writes): read again a few times before calling it unknown.
            let holder = (0..20)
                .find_map(|attempt| {
                    if attempt > 0 {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    read_holder(&mut file)
                })
                .map(|h| h.to_string())
                .unwrap_or_else(|| "another process".into());
            return Err(StateError::Locked {
                path: path.display().to_string(),
                holder,
            });
        }
        let generation = read_holder(&mut file).map_or(0, |h| h.generation) + 1;
        let me = Holder::me(purpose, generation);
        let json = serde_json::to_vec(&me).unwrap_or_default();
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(&json))
            .and_then(|_| file.sync_all())
            .map_err(|source| io_error(&path, source))?;
        Ok(LockGuard::new(FileLock { file }, generation))
    }

    /// The lock file as it is now: held if another descriptor has its flock (this process's
    /// own guard included), and the last holder it names.
    pub(super) fn info(path: &Path) -> Result<Option<LockInfo>, StateError> {
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(path, e)),
        };
        // SAFETY: flock on a descriptor this function owns; released when it is closed.
        let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
        let holder = read_holder(&mut file);
        Ok(Some(LockInfo {
            held: !free,
            generation: holder.as_ref().map_or(0, |h| h.generation),
            holder,
            heartbeat: 0,
        }))
    }
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str::<Holder>(&text).ok()
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

pub(super) fn hostname() -> String {
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
        let second = FileLock::acquire(path.clone(), "abort").unwrap();
        assert_eq!(second.generation(), 2, "each holder raises the generation");
        let info = FileLock::info(&path).unwrap().unwrap();
        assert!(info.held);
        assert_eq!(info.generation, 2);
        drop(second);
        assert!(!FileLock::info(&path).unwrap().unwrap().held);
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
