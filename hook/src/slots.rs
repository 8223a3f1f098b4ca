//! Slot locks under `<stateDir>/current-load`, in the stock hook's layout (docs/hook-protocol.md
//! §2.2; Nix 2.8 `src/build-remote/build-remote.cc` `openSlotLock`, `main-lock`,
//! `.upload-lock`), so Ferry and stock hooks on one host share slot accounting.
//!
//! Locks are `flock(2)` locks (what Nix's `lockFile` uses) through `std::fs::File::lock`,
//! which is `flock` on Linux. They are per open file description and vanish when the process
//! dies, so a crashed hook never leaks a slot.
//!
//! Local users are not trusted (docs/threat-model.md). The stock hook creates the directory
//! with `mkdir(…, 0777)` and opens lock files with `O_CREAT`, following symlinks, and waits
//! for `main-lock` without a limit
//! (<https://github.com/NixOS/nix/blob/2.8.0/src/build-remote/build-remote.cc>,
//! `openLockFile` in <https://github.com/NixOS/nix/blob/2.8.0/src/libstore/pathlocks.cc>).
//! If the directory is writable by others, a local user can plant `main-lock` as a symlink
//! (root's hook then creates a root-owned file wherever it points) or hold a lock on a file
//! of their own and stall every remote build. Ferry instead:
//! - creates the directory 0755 and refuses one that is not a real directory, is owned by
//!   someone else than this user or root, or is writable by others (one of its own that is,
//!   from an earlier Ferry that made it 0777, it fixes);
//! - opens lock files with `O_NOFOLLOW` and keeps only regular files owned by the
//!   directory's owner with one link; anything else at the name (a leftover of the
//!   world-writable days) is removed and the file created anew with `O_EXCL`;
//! - waits for `main-lock` at most [`MAIN_LOCK_WAIT`] (its holders keep it for
//!   milliseconds), then declines and says why.
//!
//! The names stay the stock hook's, so root's stock hooks and Ferry still count the same
//! slots. Only hooks of other users sharing one state directory (a single-user install used
//! by several accounts) no longer can: that sharing is exactly the hole.

use crate::select::Load;
use ferry_nix::machines::{MAIN_LOCK, Machine, current_load_dir, upload_lock_name};
use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;

/// How long [`LoadDir::lock_main`] waits for `main-lock`. Hooks hold it while they measure
/// loads (milliseconds, also for a hundred hooks in a queue); much longer means a stuck or
/// hostile holder.
pub(crate) const MAIN_LOCK_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
#[non_exhaustive]
pub(crate) enum SlotError {
    #[error("creating the slot directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the slot directory {path} is not safe to use: {problem}")]
    UnsafeDir { path: PathBuf, problem: String },
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
    #[error(
        "{path} was held by another process for over {waited:?} (a stuck or hostile process? \
         `fuser -v {path}` names it); not waiting longer"
    )]
    MainLockBusy { path: PathBuf, waited: Duration },
}

/// This process's effective user id: the owner of `/proc/self` (Linux), else of a file
/// it creates.
fn effective_uid() -> std::io::Result<u32> {
    match std::fs::metadata("/proc/self") {
        Ok(m) => Ok(m.uid()),
        Err(_) => tempfile::tempfile()?.metadata().map(|m| m.uid()),
    }
}

/// A held lock; released when dropped.
#[derive(Debug)]
pub(crate) struct HeldLock {
    file: File,
    /// Only the tests look where a lock is.
    #[cfg(test)]
    path: PathBuf,
}

impl HeldLock {
    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the lock file's mtime to now, as the stock hook does to a chosen slot
    /// (`futimens`): the mtime then says when the slot was last used.
    pub(crate) fn touch(&self) {
        let _ = self.file.set_modified(SystemTime::now());
    }
}

/// `<stateDir>/current-load`.
#[derive(Debug, Clone)]
pub(crate) struct LoadDir {
    dir: PathBuf,
    /// The directory's owner: lock files must be owned by it.
    owner: u32,
}

impl LoadDir {
    /// Creates the directory if needed (0755), and checks it (module documentation).
    pub(crate) fn open(state_dir: &Path) -> Result<Self, SlotError> {
        let dir = current_load_dir(state_dir);
        let created = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir);
        if let Err(source) = created {
            return Err(SlotError::CreateDir { path: dir, source });
        }
        let unsafe_dir = |problem: String| SlotError::UnsafeDir {
            path: dir.clone(),
            problem,
        };
        let meta = std::fs::symlink_metadata(&dir).map_err(|e| unsafe_dir(e.to_string()))?;
        if !meta.file_type().is_dir() {
            return Err(unsafe_dir("it is not a directory (a symlink?)".into()));
        }
        let me = effective_uid().map_err(|e| unsafe_dir(format!("cannot tell who I am: {e}")))?;
        if meta.uid() != me && meta.uid() != 0 {
            return Err(unsafe_dir(format!(
                "it is owned by uid {}, neither this user ({me}) nor root",
                meta.uid()
            )));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            if meta.uid() != me {
                return Err(unsafe_dir(format!(
                    "it is writable by others (mode {mode:o})"
                )));
            }
            // Ours, made 0777 by an earlier Ferry (as the stock hook asks for): close it.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode & !0o022))
                .map_err(|e| unsafe_dir(format!("mode {mode:o}, and it cannot be fixed: {e}")))?;
        }
        Ok(LoadDir {
            dir,
            owner: meta.uid(),
        })
    }

    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.dir
    }

    fn open_file(&self, name: &str) -> Result<(File, PathBuf), SlotError> {
        let path = self.dir.join(name);
        let open_err = |source| SlotError::Open {
            path: path.clone(),
            source,
        };
        // Twice at most: a foreign or odd file is replaced once; if another hook replaced it
        // at the same moment, its file is the one to use.
        for _ in 0..2 {
            let existing = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path);
            match existing {
                Ok(file) => {
                    let m = file.metadata().map_err(open_err)?;
                    if m.file_type().is_file() && m.uid() == self.owner && m.nlink() == 1 {
                        return Ok((file, path));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // ELOOP: a symlink, never followed. Anything else (a FIFO that will not
                // open, a directory) is replaced too, or fails the creation below.
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {}
                Err(e) if e.raw_os_error() == Some(libc::EISDIR) => return Err(open_err(e)),
                Err(_) => {}
            }
            // Not ours (or not a plain file): remove the name, not what it points at.
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(open_err(e)),
            }
            let created = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path);
            match created {
                Ok(file) => return Ok((file, path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(open_err(e)),
            }
        }
        Err(open_err(std::io::Error::other(
            "it keeps being replaced by something that is not a lock file of this user",
        )))
    }

    /// Takes `main-lock`, waiting at most [`MAIN_LOCK_WAIT`]: held while loads are measured
    /// and a slot is chosen, so two hooks never pick the same free slot.
    pub(crate) fn lock_main(&self) -> Result<HeldLock, SlotError> {
        self.lock_main_within(MAIN_LOCK_WAIT)
    }

    /// [`lock_main`](Self::lock_main) with another bound.
    pub(crate) fn lock_main_within(&self, max_wait: Duration) -> Result<HeldLock, SlotError> {
        let (file, path) = self.open_file(MAIN_LOCK)?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match file.try_lock() {
                Ok(()) => {
                    return Ok(HeldLock {
                        file,
                        #[cfg(test)]
                        path,
                    });
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(source)) => return Err(SlotError::Lock { path, source }),
            }
            if start.elapsed() >= max_wait {
                return Err(SlotError::MainLockBusy {
                    path,
                    waited: max_wait,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Measures `machines[index]`'s load: tries each slot lock without blocking; slots held
    /// elsewhere count as load, and the first free one is kept (locked) for the caller.
    pub(crate) fn probe(
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
                        free = Some((
                            slot,
                            HeldLock {
                                file,
                                #[cfg(test)]
                                path,
                            },
                        ));
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
    pub(crate) fn upload_lock(
        &self,
        machine: &Machine,
        max_wait: Duration,
    ) -> Result<Option<HeldLock>, SlotError> {
        let (file, path) = self.open_file(&upload_lock_name(&machine.store_uri))?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => {
                    return Ok(Some(HeldLock {
                        file,
                        #[cfg(test)]
                        path,
                    }));
                }
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

    /// Issue 12 item 8: a fresh directory is not world-writable, and one an earlier Ferry
    /// made 0777 is closed.
    #[test]
    fn the_directory_is_not_writable_by_others() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = LoadDir::open(tmp.path()).expect("open");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").mode() & 0o7777;
        assert_eq!(mode(dir.path()), 0o755);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let dir = LoadDir::open(tmp.path()).expect("open again");
        assert_eq!(mode(dir.path()), 0o755);

        // A symlink in its place is refused, not followed.
        let other = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        std::os::unix::fs::symlink(other.path(), current_load_dir(state.path())).expect("ln");
        let e = LoadDir::open(state.path()).expect_err("a symlink");
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    /// Issue 12 item 8: a local user replaced `main-lock` with a symlink; root's hook used
    /// to create a root-owned file at its target. Now the link is replaced by a lock file
    /// and the target is never touched. A lock file planted by another user (possible while
    /// the directory was world-writable) is replaced too, so a lock held on it stalls no one.
    #[test]
    fn planted_lock_files_are_replaced_not_followed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = LoadDir::open(tmp.path()).expect("open");
        let target = tmp.path().join("etc-somewhere");
        let main = dir.path().join(MAIN_LOCK);
        std::os::unix::fs::symlink(&target, &main).expect("ln");
        let held = dir.lock_main().expect("main");
        assert!(!target.exists(), "the hook created the symlink's target");
        let m = std::fs::symlink_metadata(&main).expect("stat");
        assert!(m.file_type().is_file());
        assert_eq!(m.mode() & 0o777, 0o600);
        drop(held);

        // A hard link to a file elsewhere is not used either.
        let elsewhere = tmp.path().join("precious");
        std::fs::write(&elsewhere, b"keep").expect("write");
        std::fs::remove_file(&main).expect("rm");
        std::fs::hard_link(&elsewhere, &main).expect("ln");
        drop(dir.lock_main().expect("main"));
        assert_eq!(std::fs::read(&elsewhere).expect("read"), b"keep");
        assert_eq!(std::fs::metadata(&elsewhere).expect("stat").nlink(), 1);

        // Owned by someone else (only root can set that up here).
        if effective_uid().expect("uid") == 0 {
            std::os::unix::fs::chown(&main, Some(65534), Some(65534)).expect("chown");
            let foreign = File::open(&main).expect("open");
            foreign.lock().expect("the planter's lock");
            let t = Instant::now();
            let held = dir
                .lock_main_within(Duration::from_secs(5))
                .expect("a fresh main-lock");
            assert!(t.elapsed() < Duration::from_secs(1));
            assert_eq!(std::fs::metadata(&main).expect("stat").uid(), 0);
            drop((held, foreign));
        }
    }

    /// Issue 12 item 8: `main-lock` held by someone else is waited for within a bound, then
    /// the error says so (the hook logs it and declines). Before, the wait had no end.
    #[test]
    fn main_lock_wait_is_bounded() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = LoadDir::open(tmp.path()).expect("open");
        let holder = dir.lock_main().expect("first");
        let d2 = dir.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(d2.lock_main_within(Duration::from_millis(200)));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("lock_main returns while the lock is held");
        let e = r.expect_err("held elsewhere");
        assert!(
            matches!(e, SlotError::MainLockBusy { .. }) && e.to_string().contains("main-lock"),
            "{e}"
        );
        drop(holder);
        drop(
            dir.lock_main_within(Duration::from_millis(200))
                .expect("free again"),
        );
        assert!(MAIN_LOCK_WAIT <= Duration::from_secs(10));
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
