//! Which server the proxy sends transactions to, and the switch epoch that said so.
//!
//! The coordinator numbers every switch; a proxy refuses a switch older than the one it has,
//! so a stale coordinator cannot send the applications back. The proxy keeps its backend in a
//! small file of its own, written before the switch takes effect, and at start takes whichever
//! of that file and the migration's state store has the higher epoch: a proxy restarted after
//! a cutover comes back on the right side even if the coordinator died before saving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::pg::Side;

pub use crate::state::Switch;

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("switch epoch {given} is older than this proxy's epoch {current}: a newer coordinator has switched it since")]
    Stale { given: u64, current: u64 },
    #[error("cannot save the switch to {path}: {source}")]
    Save {
        path: String,
        source: std::io::Error,
    },
}

pub struct Backend {
    /// `epoch << 1 | side`: read on every checkout, so one atomic load.
    packed: AtomicU64,
    /// Where the proxy keeps its switch; `None` keeps it in memory only (tests).
    file: Option<PathBuf>,
    /// Serialises switches, so the file and the atomic agree.
    writing: Mutex<()>,
}

fn pack(switch: Switch) -> u64 {
    switch.epoch << 1 | u64::from(switch.backend == Side::Target)
}

fn unpack(packed: u64) -> Switch {
    Switch {
        backend: if packed & 1 == 1 {
            Side::Target
        } else {
            Side::Source
        },
        epoch: packed >> 1,
    }
}

impl Backend {
    pub fn new(switch: Switch, file: Option<PathBuf>) -> Backend {
        Backend {
            packed: AtomicU64::new(pack(switch)),
            file,
            writing: Mutex::new(()),
        }
    }

    /// The newer of `from_state` and what the proxy's own `file` says.
    pub fn restore(from_state: Switch, file: PathBuf) -> Backend {
        let saved = read_file(&file);
        let switch = match saved {
            Some(saved) if saved.epoch > from_state.epoch => saved,
            _ => from_state,
        };
        Backend::new(switch, Some(file))
    }

    pub fn current(&self) -> Switch {
        unpack(self.packed.load(Ordering::Acquire))
    }

    pub fn side(&self) -> Side {
        self.current().backend
    }

    pub fn epoch(&self) -> u64 {
        self.current().epoch
    }

    /// Switches to `to` unless the proxy already has a newer epoch. Saved before it takes
    /// effect. The same switch twice is fine (a coordinator retrying).
    pub fn switch(&self, to: Switch) -> Result<(), SwitchError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.current();
        if to.epoch < current.epoch || (to.epoch == current.epoch && to.backend != current.backend)
        {
            return Err(SwitchError::Stale {
                given: to.epoch,
                current: current.epoch,
            });
        }
        if let Some(file) = &self.file {
            write_file(file, to).map_err(|source| SwitchError::Save {
                path: file.display().to_string(),
                source,
            })?;
        }
        self.packed.store(pack(to), Ordering::Release);
        if to != current {
            tracing::info!(backend = %to.backend, epoch = to.epoch, "switched backend");
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Option<Switch> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(switch) => Some(switch),
        Err(e) => {
            tracing::warn!(path = %path.display(), "ignoring a damaged proxy switch file: {e}");
            None
        }
    }
}

/// Written to a temporary file and renamed, so a crash leaves the old or the new switch.
fn write_file(path: &Path, switch: Switch) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = path.with_extension("tmp");
    let text = serde_json::to_string(&switch).map_err(std::io::Error::other)?;
    std::fs::write(&temporary, text)?;
    std::fs::File::open(&temporary)?.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_switch_is_refused_and_the_file_wins_when_newer() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proxy.json");
        let backend = Backend::restore(Switch::default(), file.clone());
        assert_eq!(backend.side(), Side::Source);
        let to_target = Switch {
            backend: Side::Target,
            epoch: 1,
        };
        backend.switch(to_target).unwrap();
        backend.switch(to_target).unwrap();
        assert!(backend
            .switch(Switch {
                backend: Side::Source,
                epoch: 1
            })
            .is_err());
        assert!(backend.switch(Switch::default()).is_err());
        assert_eq!(backend.current(), to_target);

        // A restarted proxy whose state store is behind.
        let restarted = Backend::restore(Switch::default(), file);
        assert_eq!(restarted.current(), to_target);
    }
}
