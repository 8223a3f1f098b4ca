//! Slot locks under `<stateDir>/current-load`, in the stock hook's layout (docs/hook-protocol.md
//! §2.2; Nix 2.8 `src/build-remote/build-remote.cc` `openSlotLock`, `main-lock`,
//! `.upload-lock`), so Ferry and stock hooks on one host share slot accounting.
//!
//! Locks are `flock(2)` locks (what Nix's `lockFile` uses) through `std::fs::File::lock`,
//! which is `flock` on Linux. They are per open file description and vanish when the process
//! dies, so a crashed hook never leaks a slot.

use crate::select::Load;
use ferry_nix::machines::{MAIN_LOCK, Machine, current_load_dir, upload_lock_name};
use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SlotError {
    #[error("creating the slot directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening lock file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locking {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held lock; released when dropped.
#[derive(Debug)]
pub struct HeldLock {
    file: File,
    path: PathBuf,
}

impl HeldLock {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the lock file's mtime to now, as the stock hook does to a chosen slot
    /// (`futimens`): the mtime then says when the slot was last used.
    pub fn touch(&self) {
        let _ = self.file.set_modified(SystemTime::now());
    }
}

/// `<stateDir>/current-load`.
#[derive(Debug, Clone)]
pub struct LoadDir {
    dir: PathBuf,
}

impl LoadDir {
    /// Creates the directory if needed, mode 0777 like the stock hook (hooks of every user
    /// of a single-user install share it).
    pub fn open(state_dir: &Path) -> Result<Self, SlotError> {
        let dir = current_load_dir(state_dir);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(|source| SlotError::CreateDir {
                path: dir.clone(),
                source,
            })?;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        }
        Ok(LoadDir { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn open_file(&self, name: &str) -> Result<(File, PathBuf), SlotError> {
        let path = self.dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| SlotError::Open {
                path: path.clone(),
                source,
            })?;
        Ok((file, path))
    }

    /// Takes `main-lock`, blocking: held while loads are measured and a slot is chosen, so two
    /// hooks never pick the same free slot.
    pub fn lock_main(&self) -> Result<HeldLock, SlotError> {
        let (file, path) = self.open_file(MAIN_LOCK)?;
        file.lock().map_err(|source| SlotError::Lock {
            path: path.clone(),
            source,
        })?;
        Ok(HeldLock { file, path })
    }

    /// Measures `machines[index]`'s load: tries each slot lock without blocking; slots held
    /// elsewhere count as load, and the first free one is kept (locked) for the caller.
    pub fn probe(
        &self,
        index: usize,
        machine: &Machine,
    ) -> Result<(Load, Option<HeldLock>), SlotError> {
        let mut load = 0;
        let mut free: Option<(u64, HeldLock)> = None;
        for slot in 0..machine.max_jobs {
            let (file, path) = self.open_file(&machine.slot_lock_name(slot))?;
            match file.try_lock() {
                Ok(()) => {
                    if free.is_none() {
                        free = Some((slot, HeldLock { file, path }));
                    }
                }
                Err(TryLockError::WouldBlock) => load += 1,
                Err(TryLockError::Error(source)) => {
                    return Err(SlotError::Lock { path, source });
                }
            }
        }
        let load = Load {
            machine: index,
            load,
            free_slot: free.as_ref().map(|(s, _)| *s),
        };
        Ok((load, free.map(|(_, l)| l)))
    }

    /// Takes the machine's upload lock, waiting at most `max_wait` (the stock hook's alarm is
    /// 15 minutes). `None` after the wait: the caller goes on without it, as the stock hook
    /// does ("somebody is hogging the upload lock").
    pub fn upload_lock(
        &self,
        machine: &Machine,
        max_wait: Duration,
    ) -> Result<Option<HeldLock>, SlotError> {
        let (file, path) = self.open_file(&upload_lock_name(&machine.store_uri))?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Some(HeldLock { file, path })),
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(source)) => {
                    return Err(SlotError::Lock { path, source });
                }
            }
            if start.elapsed() >= max_wait {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_nix::machines::parse_builders_setting;

    #[test]
    fn slots_held_elsewhere_count_as_load_and_file_names_match_stock() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = LoadDir::open(tmp.path()).expect("open");
        let m = &parse_builders_setting("ssh://root@h - - 3", "x86_64-linux").expect("m")[0];
        let (l, held) = dir.probe(0, m).expect("probe");
        assert_eq!((l.load, l.free_slot), (0, Some(0)));
        let held0 = held.expect("slot 0");
        assert!(held0.path().ends_with("current-load/ssh:__root@h-0"));
        // A second prober (another open file description, like another hook) sees slot 0
        // taken and gets slot 1.
        let (l, held1) = dir.probe(0, m).expect("probe");
        assert_eq!((l.load, l.free_slot), (1, Some(1)));
        let (l, held2) = dir.probe(0, m).expect("probe");
        assert_eq!((l.load, l.free_slot), (2, Some(2)));
        let (l, none) = dir.probe(0, m).expect("probe");
        assert_eq!((l.load, l.free_slot), (3, None));
        assert!(none.is_none());
        drop((held1, held2));
        let (l, _h) = dir.probe(0, m).expect("probe");
        assert_eq!((l.load, l.free_slot), (1, Some(1)));
        held0.touch();
        let _main = dir.lock_main().expect("main");
        assert!(tmp.path().join("current-load/main-lock").exists());
    }

    #[test]
    fn upload_lock_gives_up_after_the_wait() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = LoadDir::open(tmp.path()).expect("open");
        let m = &parse_builders_setting("ssh://h", "x86_64-linux").expect("m")[0];
        let first = dir.upload_lock(m, Duration::ZERO).expect("lock");
        assert!(first.expect("held").path().ends_with("ssh:__h.upload-lock"));
        let a = dir
            .upload_lock(m, Duration::ZERO)
            .expect("lock")
            .expect("held");
        let b = dir
            .upload_lock(m, Duration::from_millis(120))
            .expect("lock");
        assert!(b.is_none(), "got a lock someone holds");
        drop(a);
    }

    #[test]
    fn open_errors_name_the_file() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = LoadDir::open(tmp.path()).expect("open");
        std::fs::create_dir(dir.path().join("main-lock")).expect("dir");
        let e = dir.lock_main().expect_err("a directory");
        assert!(e.to_string().contains("main-lock"), "{e}");
    }
}
