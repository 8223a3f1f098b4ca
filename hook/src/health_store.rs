//! Builder health on disk, shared by every hook process and by `ferry-build-hook status`:
//! one JSON file per builder under `<ferry state dir>/health/`.
//!
//! - Reads take no lock: writers replace the file with `rename(2)`, so a reader sees the
//!   old or the new state, never half of one; a missing or unreadable file reads as
//!   `unknown` (the builder is simply probed again).
//! - Updates are read-modify-write under the builder's `.lock` (flock, held for
//!   microseconds), writing a temporary file that is synced and renamed over the old one,
//!   so a crash at any point leaves a whole state file.
//! - The `.probe` lock is held for the duration of a probe: it makes the half-open probe of
//!   a builder whose back-off ended a single probe, not one per hook.

use crate::health::Health;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("health state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A held probe lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub(crate) struct ProbeLock {
    _file: File,
}

#[derive(Debug, Clone)]
pub struct HealthStore {
    dir: PathBuf,
}

/// The file name stem for a builder: readable prefix plus a hash, so long or odd URIs
/// (query parameters) stay within name limits and never collide.
pub(crate) fn key(store_uri: &str) -> String {
    let readable: String = store_uri
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "@.-_:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    let digest = Sha256::digest(store_uri.as_bytes());
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{readable}-{hash}")
}

impl HealthStore {
    /// `<ferry state dir>/health`, created if needed (mode 0755: hooks run as the daemon's
    /// user; `status` may be run by anyone to read it).
    pub fn open(ferry_state_dir: &Path) -> Result<Self, StoreError> {
        let dir = ferry_state_dir.join("health");
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
        }
        Ok(HealthStore { dir })
    }

    /// Opens the directory without creating it (for read-only commands).
    pub(crate) fn at(ferry_state_dir: &Path) -> Self {
        HealthStore {
            dir: ferry_state_dir.join("health"),
        }
    }

    #[cfg(test)]
    fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, uri: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", key(uri)))
    }

    /// The builder's state; `unknown` if there is none (or it cannot be read).
    pub(crate) fn read(&self, uri: &str) -> Health {
        std::fs::read(self.path(uri, "json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Health>(&b).ok())
            .filter(|h| h.store_uri == uri)
            .unwrap_or_else(|| Health::new(uri))
    }

    fn open_lock(&self, uri: &str, ext: &str) -> Result<File, StoreError> {
        let path = self.path(uri, ext);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))
    }

    /// Applies `f` to the builder's state under its lock and stores the result.
    pub fn update<F: FnOnce(&mut Health)>(&self, uri: &str, f: F) -> Result<Health, StoreError> {
        let lock = self.open_lock(uri, "lock")?;
        let lock_path = self.path(uri, "lock");
        lock.lock().map_err(io(&lock_path))?;
        let mut h = self.read(uri);
        f(&mut h);
        let path = self.path(uri, "json");
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", key(uri), std::process::id()));
        let bytes = serde_json::to_vec_pretty(&h).map_err(|e| StoreError::Io {
            path: tmp.clone(),
            source: std::io::Error::other(e),
        })?;
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)
        };
        let r = write();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r.map_err(io(&path))?;
        Ok(h)
    }

    /// The probe lock, if nobody holds it.
    pub(crate) fn try_probe_lock(&self, uri: &str) -> Result<Option<ProbeLock>, StoreError> {
        let f = self.open_lock(uri, "probe")?;
        match f.try_lock() {
            Ok(()) => Ok(Some(ProbeLock { _file: f })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(io(&self.path(uri, "probe"))(e)),
        }
    }

    /// The probe lock, waiting at most `wait` for another hook's probe to finish. Returns
    /// the lock and whether it had to wait (then the other hook's result is on disk).
    /// Polls rather than blocking a thread in `flock`, so a caller that stops waiting
    /// (its answer no longer needs this builder) leaves nothing behind.
    pub(crate) async fn probe_lock(
        &self,
        uri: &str,
        wait: Duration,
    ) -> Result<Option<(ProbeLock, bool)>, StoreError> {
        let start = Instant::now();
        let mut waited = false;
        loop {
            if let Some(l) = self.try_probe_lock(uri)? {
                return Ok(Some((l, waited)));
            }
            if start.elapsed() >= wait {
                return Ok(None);
            }
            waited = true;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Tuning;
    use crate::health::State;

    #[test]
    fn missing_state_is_unknown_and_updates_persist() {
        let tmp = tempfile::tempdir().expect("tmp");
        let s = HealthStore::open(tmp.path()).expect("open");
        let uri = "ssh://root@10.0.0.2?remote-program=/x/y";
        assert_eq!(s.read(uri).state, State::Unknown);
        s.update(uri, |h| {
            h.record_failure(1000, "refused", &Tuning::default(), 0.0)
        })
        .expect("update");
        let h = s.read(uri);
        assert_eq!((h.state, h.consecutive_failures), (State::Down, 1));
        // Another store handle (another hook) sees it.
        let other = HealthStore::at(tmp.path());
        assert_eq!(other.read(uri).last_error.as_deref(), Some("refused"));
        // Only the state, its lock files and no temporaries are left behind.
        let names: Vec<String> = std::fs::read_dir(s.dir())
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("ssh:__root@10.0.0.2_remote-program_")
                    && n.ends_with(".json")),
            "{names:?}"
        );
    }

    #[test]
    fn corrupt_or_foreign_state_reads_as_unknown() {
        let tmp = tempfile::tempdir().expect("tmp");
        let s = HealthStore::open(tmp.path()).expect("open");
        std::fs::write(
            s.dir().join(format!("{}.json", key("ssh://a"))),
            "{not json",
        )
        .expect("w");
        assert_eq!(s.read("ssh://a").state, State::Unknown);
        s.update("ssh://a", |h| h.record_success(5, None))
            .expect("recovers");
        assert_eq!(s.read("ssh://a").state, State::Up);
    }

    #[test]
    fn keys_are_short_and_distinct() {
        let long = format!("ssh://root@{}", "h".repeat(300));
        assert!(key(&long).len() < 80);
        assert_ne!(key("ssh://a/b"), key("ssh://a_b"));
    }

    #[tokio::test]
    async fn probe_lock_is_exclusive_and_waits_boundedly() {
        let tmp = tempfile::tempdir().expect("tmp");
        let s = HealthStore::open(tmp.path()).expect("open");
        let held = s.try_probe_lock("ssh://a").expect("lock").expect("free");
        assert!(s.try_probe_lock("ssh://a").expect("lock").is_none());
        let t = Instant::now();
        assert!(
            s.probe_lock("ssh://a", Duration::from_millis(50))
                .await
                .expect("l")
                .is_none()
        );
        assert!(t.elapsed() >= Duration::from_millis(50));
        drop(held);
        let (_l, waited) = s
            .probe_lock("ssh://a", Duration::from_millis(50))
            .await
            .expect("l")
            .expect("free");
        assert!(!waited);
    }
}
