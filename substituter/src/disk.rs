//! The optional disk cache of narinfos and NARs: what users build today with an nginx caching
//! proxy (seed 001: 100 GB, 30 days), behind Ferry's validation and race.
//!
//! Layout under `cache-dir`:
//! - `narinfo/<hash>.narinfo`: the narinfo exactly as Ferry served it (the upstream's bytes;
//!   at most the unsigned `URL:` line differs, see [`crate::check`]). Only narinfos Nix would
//!   trust are kept, and they are checked again when read.
//! - `nar/<nix32 sha256 of the key>`: a NAR file under the key Nix asks for (keys may carry
//!   queries and slashes, so the file name is a digest of the key).
//! - `tmp/`: files being written. A NAR is streamed to Nix and into a temp file at the same
//!   time, and becomes an entry (fsync, rename, fsync of the directory) only when the stream
//!   completed, its length is the announced one and its SHA-256 matches the narinfo's
//!   `FileHash` (or `NarHash` for `Compression: none`) when known. A stream cut for any reason
//!   deletes its temp file; a crash leaves it in `tmp/`, which is emptied at start-up.
//!
//! The eviction index ([`crate::lru`]) lives in memory and is rebuilt from the directory at
//! start: file sizes, and modification times as last use (Ferry sets a file's modification
//! time when it serves it, rather than trusting atime on `noatime`/`relatime` mounts).

use crate::check::Expect;
use crate::lru::{Lru, Policy, Touch};
use crate::metrics::Counter;
use bytes::Bytes;
use ferry_nix::hash::{Hash, Sha256Sink};
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Chunks in flight between a NAR stream and its disk writer: bounded, so a slow disk slows
/// the stream instead of growing memory (at most a few hundred KiB per stream).
const WRITER_QUEUE: usize = 4;

/// Modification times are rewritten at most this often per file on hits.
const TOUCH_PERSIST_MS: u64 = 3600 * 1000;

#[derive(Debug, Default)]
pub struct DiskMetrics {
    pub narinfo_hits: Counter,
    pub nar_hits: Counter,
    pub nar_stored: Counter,
    /// NAR streams not kept: cut, wrong length or hash, write errors.
    pub nar_discarded: Counter,
    pub evictions: Counter,
}

pub struct DiskCache {
    dir: PathBuf,
    index: Mutex<Lru<String>>,
    tmp_seq: AtomicU64,
    pub metrics: DiskMetrics,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mtime_ms(m: &fs::Metadata) -> u64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// The relative path of a NAR key's file.
pub fn nar_entry(key: &str) -> String {
    format!("nar/{}", Hash::sha256_of(key.as_bytes()).to_nix32())
}

/// The relative path of a narinfo's file.
pub fn narinfo_entry(hash_part: &str) -> String {
    format!("narinfo/{hash_part}.narinfo")
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl DiskCache {
    /// Creates the layout, empties `tmp/` and rebuilds the index from the files present
    /// (evicting what no longer fits the policy).
    pub fn open(dir: &Path, max_bytes: u64, max_age: Duration) -> io::Result<DiskCache> {
        for sub in ["narinfo", "nar", "tmp"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        // Whatever is in tmp/ was being written when a previous instance died: never an entry.
        for e in fs::read_dir(dir.join("tmp"))? {
            let _ = fs::remove_file(e?.path());
        }
        let mut lru = Lru::new(Policy {
            max_bytes,
            max_idle_ms: max_age.as_millis() as u64,
        });
        let now = now_ms();
        let mut doomed = Vec::new();
        for sub in ["narinfo", "nar"] {
            for e in fs::read_dir(dir.join(sub))? {
                let e = e?;
                let m = e.metadata()?;
                if !m.is_file() {
                    continue;
                }
                let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                doomed.extend(lru.insert(format!("{sub}/{name}"), m.len(), mtime_ms(&m), now));
            }
        }
        doomed.extend(lru.expire(now));
        for k in &doomed {
            let _ = fs::remove_file(dir.join(k));
        }
        tracing::info!(dir = %dir.display(), entries = lru.len(), bytes = lru.total_bytes(), evicted = doomed.len(), "disk cache opened");
        Ok(DiskCache {
            dir: dir.to_owned(),
            index: Mutex::new(lru),
            tmp_seq: AtomicU64::new(0),
            metrics: DiskMetrics::default(),
        })
    }

    /// (entries, bytes) for metrics.
    pub fn usage(&self) -> (usize, u64) {
        self.index
            .lock()
            .map(|l| (l.len(), l.total_bytes()))
            .unwrap_or((0, 0))
    }

    /// Marks `entry` used; false when it is absent (or just expired and deleted). Returns
    /// whether the file's modification time should be refreshed too.
    fn touch(&self, entry: &str) -> Option<bool> {
        let now = now_ms();
        let mut l = self.index.lock().ok()?;
        let last = l.last_use(&entry.to_owned());
        match l.touch(&entry.to_owned(), now) {
            Touch::Hit => Some(last.is_none_or(|t| now.saturating_sub(t) >= TOUCH_PERSIST_MS)),
            Touch::Expired => {
                drop(l);
                let _ = fs::remove_file(self.dir.join(entry));
                self.metrics.evictions.inc();
                None
            }
            Touch::Absent => None,
        }
    }

    /// The file vanished or is unreadable: forget it.
    fn forget(&self, entry: &str) {
        if let Ok(mut l) = self.index.lock() {
            l.remove(&entry.to_owned());
        }
    }

    fn remove_files(&self, entries: &[String]) {
        for k in entries {
            let _ = fs::remove_file(self.dir.join(k));
            self.metrics.evictions.inc();
        }
    }

    /// Adds a committed file to the index and deletes whatever it pushes out.
    fn admit(&self, entry: String, size: u64) {
        let now = now_ms();
        let doomed = match self.index.lock() {
            Ok(mut l) => l.insert(entry, size, now, now),
            Err(_) => return,
        };
        self.remove_files(&doomed);
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    /// A stored narinfo's bytes.
    pub async fn narinfo(&self, hash_part: &str) -> Option<Bytes> {
        let entry = narinfo_entry(hash_part);
        let persist = self.touch(&entry)?;
        let path = self.dir.join(&entry);
        match tokio::fs::read(&path).await {
            Ok(b) => {
                if persist {
                    set_mtime_now(path).await;
                }
                Some(Bytes::from(b))
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "disk cache narinfo unreadable");
                self.forget(&entry);
                None
            }
        }
    }

    /// Stores a narinfo (written whole to a temp file, then renamed).
    pub async fn put_narinfo(self: &std::sync::Arc<Self>, hash_part: &str, body: Bytes) {
        let me = std::sync::Arc::clone(self);
        let entry = narinfo_entry(hash_part);
        let r = tokio::task::spawn_blocking(move || {
            let tmp = me.tmp_path();
            let r = (|| {
                let mut f = fs::File::create(&tmp)?;
                f.write_all(&body)?;
                f.sync_all()?;
                fs::rename(&tmp, me.dir.join(&entry))
            })();
            match r {
                Ok(()) => me.admit(entry, body.len() as u64),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    tracing::warn!(error = %e, "disk cache: storing a narinfo failed");
                }
            }
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "disk cache writer task failed");
        }
    }

    /// A stored NAR file, opened, with its length.
    pub async fn open_nar(&self, key: &str) -> Option<(tokio::fs::File, u64)> {
        let entry = nar_entry(key);
        let persist = self.touch(&entry)?;
        let path = self.dir.join(&entry);
        let opened = async {
            let f = tokio::fs::File::open(&path).await?;
            let len = f.metadata().await?.len();
            io::Result::Ok((f, len))
        };
        match opened.await {
            Ok((f, len)) => {
                if persist {
                    set_mtime_now(path).await;
                }
                Some((f, len))
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "disk cache NAR unreadable");
                self.forget(&entry);
                None
            }
        }
    }

    /// A writer that keeps a copy of a NAR stream of `total` bytes, or None when it could never
    /// be kept (larger than the quota, or the narinfo announced another size).
    pub fn nar_writer(
        self: &std::sync::Arc<Self>,
        key: &str,
        total: u64,
        expect: Expect,
    ) -> Option<NarWriter> {
        if expect.size.is_some_and(|s| s != total) {
            tracing::warn!(%key, total, expected = ?expect.size, "NAR length differs from the narinfo; not cached");
            return None;
        }
        if !self.index.lock().ok()?.policy().max_bytes.ge(&total) {
            return None;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(WRITER_QUEUE);
        let me = std::sync::Arc::clone(self);
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || me.write_nar(&key, total, expect, rx));
        Some(NarWriter { tx })
    }

    /// The writer thread: appends chunks to a temp file and hashes them; commits on `Finish`.
    fn write_nar(
        &self,
        key: &str,
        total: u64,
        expect: Expect,
        mut rx: tokio::sync::mpsc::Receiver<Msg>,
    ) {
        let tmp = self.tmp_path();
        let outcome = (|| -> Result<(), String> {
            let mut f = fs::File::create(&tmp).map_err(|e| e.to_string())?;
            let mut hash = Sha256Sink::new();
            loop {
                match rx.blocking_recv() {
                    Some(Msg::Data(b)) => {
                        hash.update(&b);
                        f.write_all(&b).map_err(|e| e.to_string())?;
                    }
                    Some(Msg::Finish) => break,
                    // The stream was dropped before its end: a client went away, or no
                    // upstream could finish it.
                    None => return Err(format!("stream ended at {} of {total} bytes", hash.len())),
                }
            }
            if hash.len() != total {
                return Err(format!("got {} of {total} bytes", hash.len()));
            }
            let got = hash.finish();
            if let Some(want) = &expect.sha256
                && *want != got
            {
                return Err(format!(
                    "SHA-256 {} differs from the narinfo's {}",
                    got.to_nix32_prefixed(),
                    want.to_nix32_prefixed()
                ));
            }
            f.sync_all().map_err(|e| e.to_string())?;
            drop(f);
            let entry = nar_entry(key);
            fs::rename(&tmp, self.dir.join(&entry)).map_err(|e| e.to_string())?;
            let _ = fsync_dir(&self.dir.join("nar"));
            self.admit(entry, total);
            Ok(())
        })();
        match outcome {
            Ok(()) => {
                self.metrics.nar_stored.inc();
                tracing::debug!(%key, total, "NAR stored in the disk cache");
            }
            Err(why) => {
                let _ = fs::remove_file(&tmp);
                self.metrics.nar_discarded.inc();
                tracing::info!(%key, %why, "NAR not kept in the disk cache");
            }
        }
    }
}

async fn set_mtime_now(path: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || {
        fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(SystemTime::now()))
    })
    .await;
}

enum Msg {
    Data(Bytes),
    Finish,
}

/// The sending half of a NAR copy. Dropping it without [`NarWriter::finish`] discards the copy.
pub struct NarWriter {
    tx: tokio::sync::mpsc::Sender<Msg>,
}

impl NarWriter {
    /// Queues a chunk; false when the writer gave up (write error), after which the copy is
    /// abandoned but the stream to Nix goes on.
    pub async fn write(&self, b: Bytes) -> bool {
        self.tx.send(Msg::Data(b)).await.is_ok()
    }

    /// The stream reached its announced end: verify and commit.
    pub async fn finish(self) {
        let _ = self.tx.send(Msg::Finish).await;
    }
}
