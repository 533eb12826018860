//! The default state store: one JSON file, written atomically (temporary file and rename).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::lock::LockGuard;
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

    fn save(&self, state: &State) -> Result<(), StateError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(self.io("create the directory of"))?;
        }
        let json = serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt {
            path: self.path.display().to_string(),
            source,
        })?;
        let tmp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp).map_err(self.io("write"))?;
        file.write_all(&json).map_err(self.io("write"))?;
        file.sync_all().map_err(self.io("write"))?;
        std::fs::rename(&tmp, &self.path).map_err(self.io("replace"))?;
        Ok(())
    }

    fn lock(&self, purpose: &str) -> Result<LockGuard, StateError> {
        LockGuard::acquire(self.path.with_extension("lock"), purpose)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
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
        state.set_phase(Phase::Syncing);
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), Some(state));
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
