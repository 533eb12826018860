//! The default state store: one JSON file, written atomically (temporary file and rename),
//! compare-and-set on the state's version.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::lock::{FileLock, Holder, LockGuard, LockInfo};
use super::{State, StateError, StateStore};

pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock_path(&self) -> PathBuf {
        self.path.with_extension("lock")
    }

    /// The version of the state on disk: 0 when there is none yet, or when it was written by
    /// a release before versions.
    /// Also how many log entries it has: those past them are what a save adds.
    fn stored_version(&self) -> Result<(u64, usize), StateError> {
        #[derive(Deserialize)]
        struct Versioned {
            #[serde(default)]
            version: u64,
            #[serde(default)]
            log: Vec<serde::de::IgnoredAny>,
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(self.io("read")(e)),
        };
        serde_json::from_str::<Versioned>(&text)
            .map(|v| (v.version, v.log.len()))
            .map_err(|source| StateError::Corrupt {
                path: self.path.display().to_string(),
                source,
            })
    }

    fn io(&self, action: &'static str) -> impl FnOnce(std::io::Error) -> StateError + '_ {
        move |source| StateError::Io {
            action,
            path: self.path.display().to_string(),
            source,
        }
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Result<Option<State>, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("read")(e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::Corrupt {
                path: self.path.display().to_string(),
                source,
            })
    }

    fn save(&self, state: &mut State) -> Result<(), StateError> {
        let dir = match self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => dir,
            None => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(self.io("create the directory of"))?;
        // The compare and the rename under one exclusive flock of the directory, held for
        // the few microseconds of a write: the migration's lock file cannot serve, its holder
        // is the process saving, and a second flock of it from the same process would wait
        // for itself. Nothing else in the directory is blocked for longer than that.
        let dir_lock = File::open(dir).map_err(self.io("open the directory of"))?;
        // SAFETY: flock on a descriptor this function owns; released when it is closed.
        if unsafe { libc::flock(dir_lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(self.io("lock the directory of")(
                std::io::Error::last_os_error(),
            ));
        }
        let (found, logged) = self.stored_version()?;
        if found != state.version {
            return Err(StateError::Conflict {
                path: self.describe(),
                read: state.version,
                found,
            });
        }
        let mut next = state.clone();
        next.version += 1;
        let json = serde_json::to_vec_pretty(&next).map_err(|source| StateError::Corrupt {
            path: self.path.display().to_string(),
            source,
        })?;
        let tmp = self.path.with_extension("json.tmp");
        let mut file = File::create(&tmp).map_err(self.io("write"))?;
        file.write_all(&json).map_err(self.io("write"))?;
        file.sync_all().map_err(self.io("write"))?;
        std::fs::rename(&tmp, &self.path).map_err(self.io("replace"))?;
        state.version = next.version;
        drop(dir_lock);
        super::faults::after_save(state.log.get(logged..).unwrap_or_default());
        Ok(())
    }

    fn lock(&self, purpose: &str) -> Result<LockGuard, StateError> {
        FileLock::acquire(self.lock_path(), purpose)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn lock_info(&self) -> Result<Option<LockInfo>, StateError> {
        FileLock::info(&self.lock_path())
    }

    /// A flock dies with its holder: a lock that is held has a live holder, and is never
    /// broken; one that is not held needs nothing.
    fn force_unlock(&self) -> Result<Option<Holder>, StateError> {
        match self.lock_info()? {
            Some(LockInfo {
                held: true, holder, ..
            }) => Err(StateError::Locked {
                path: self.lock_path().display().to_string(),
                holder: holder.map_or_else(|| "another process".into(), |h| h.to_string()),
            }),
            _ => Ok(None),
        }
    }

    fn probe(&self) -> Vec<(&'static str, Option<String>)> {
        let dir = match self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => dir.to_path_buf(),
            None => PathBuf::from("."),
        };
        let probe = dir.join(format!(".switchyard-probe-{}", std::process::id()));
        let problem = std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&probe, b""))
            .and_then(|_| std::fs::remove_file(&probe))
            .err()
            .map(|e| format!("cannot write in {}: {e}", dir.display()));
        vec![("write the state file", problem)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Phase;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("nested/shop.json"));
        assert!(store.load().unwrap().is_none());
        let mut state = State::new("shop");
        state.set_phase(Phase::Syncing).unwrap();
        store.save(&mut state).unwrap();
        assert_eq!(state.version, 1);
        assert_eq!(store.load().unwrap(), Some(state));
    }

    #[test]
    fn a_writer_that_read_an_older_version_overwrites_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("shop.json"));
        let mut first = State::new("shop");
        store.save(&mut first).unwrap();
        let mut second = store.load().unwrap().unwrap();
        second.set_phase(Phase::Syncing).unwrap();
        store.save(&mut second).unwrap();
        // `first` was read before `second` saved: its write is refused, and says so.
        first.note(crate::state::Event::AbortIncomplete);
        let err = store.save(&mut first).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Conflict {
                    read: 1,
                    found: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("run the command again"), "{err}");
        assert_eq!(store.load().unwrap(), Some(second));
    }

    #[test]
    fn a_new_state_does_not_overwrite_one_already_saved() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("shop.json"));
        store.save(&mut State::new("shop")).unwrap();
        let err = store.save(&mut State::new("shop")).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Conflict {
                    read: 0,
                    found: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// A state file as the release before the typed log (1fce031) wrote it, left by a
    /// cutover that stopped right after its commit point.
    const EARLIER_RELEASE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/state-interrupted-after-switch.json"
    );

    #[test]
    fn a_state_file_of_the_earlier_release_loads_recovers_and_keeps_its_log() {
        let state = FileStore::new(EARLIER_RELEASE).load().unwrap().unwrap();
        assert_eq!(
            state.recovery(),
            crate::state::Recovery::FinishSwitch(crate::state::Direction::Cutover)
        );
        assert!(state
            .log
            .iter()
            .all(|entry| !matches!(entry.event, crate::state::Event::Other(_))));
        // Saved again, every line reads as it did.
        let before: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(EARLIER_RELEASE).unwrap()).unwrap();
        let after = serde_json::to_value(&state).unwrap();
        assert_eq!(after["log"], before["log"]);
        assert_eq!(after["created"], before["created"]);
        assert_eq!(after["fences"], before["fences"]);
    }

    #[test]
    fn damaged_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = FileStore::new(&path).load().unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }
}
