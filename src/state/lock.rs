//! A lock file next to the state file: one coordinator acts on a migration at a time.

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::StateError;

#[derive(Serialize, Deserialize)]
struct Holder {
    pid: u32,
    host: String,
    purpose: String,
    since: String,
}

/// Held while a command acts on a migration; the lock file is removed when it is dropped.
#[derive(Debug)]
pub struct LockGuard {
    path: PathBuf,
}

impl LockGuard {
    pub(super) fn acquire(path: PathBuf, purpose: &str) -> Result<LockGuard, StateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| io_error(&path, source))?;
        }
        let me = Holder {
            pid: std::process::id(),
            host: hostname(),
            purpose: purpose.to_string(),
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        // Two attempts: the second after removing a lock whose process is gone.
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    let json = serde_json::to_vec(&me).unwrap_or_default();
                    file.write_all(&json)
                        .map_err(|source| io_error(&path, source))?;
                    return Ok(LockGuard { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|text| serde_json::from_str::<Holder>(&text).ok());
                    match holder {
                        Some(h) if h.host == me.host && !process_alive(h.pid) => {
                            tracing::warn!(pid = h.pid, "removing stale lock {}", path.display());
                            let _ = std::fs::remove_file(&path);
                        }
                        Some(h) => {
                            return Err(StateError::Locked {
                                path: path.display().to_string(),
                                holder: format!(
                                    "`{}` by pid {} on {} since {}",
                                    h.purpose, h.pid, h.host, h.since
                                ),
                            })
                        }
                        None => {
                            return Err(StateError::Locked {
                                path: path.display().to_string(),
                                holder: "an unknown holder".into(),
                            })
                        }
                    }
                }
                Err(source) => return Err(io_error(&path, source)),
            }
        }
        Err(StateError::Locked {
            path: path.display().to_string(),
            holder: "a process that keeps taking it".into(),
        })
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn io_error(path: &std::path::Path, source: std::io::Error) -> StateError {
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

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_and_stale_lock_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.lock");
        let first = LockGuard::acquire(path.clone(), "sync").unwrap();
        let err = LockGuard::acquire(path.clone(), "abort")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`sync`"), "{err}");
        drop(first);
        assert!(!path.exists());

        let stale = Holder {
            pid: u32::MAX / 2,
            host: hostname(),
            purpose: "sync".into(),
            since: "then".into(),
        };
        std::fs::write(&path, serde_json::to_vec(&stale).unwrap()).unwrap();
        let _taken = LockGuard::acquire(path.clone(), "abort").unwrap();
    }
}
