//! The optional disk cache of narinfos and NARs: what users build today with an nginx caching
//! proxy (seed 001 in docs/goals.md: 100 GB, 30 days), behind Ferry's validation and race.
//!
//! Layout under `cache-dir`:
//! - `narinfo/<hash>.narinfo`: the narinfo exactly as Ferry served it (the upstream's bytes;
//!   at most the unsigned `URL:` line differs, see [`crate::check`]). Only narinfos Nix would
//!   trust are kept, and they are checked again when read.
//! - `nar/<nix32 sha256 of the key>`: a NAR file under the key Nix asks for (keys may carry
//!   queries and slashes, so the file name is a digest of the key).
//! - `nar-hash/<same digest>`: `sha256:<nix32> <size>`, the expected hash of that key's file,
//!   from a narinfo Ferry served (`FileHash`/`FileSize`, or `NarHash`/`NarSize` for
//!   `Compression: none`). Written when the narinfo is served, so the route survives a
//!   restart; a NAR is kept only against it, checked on the way in, and served only when the
//!   record is there and the file has its size (issue 12 item 2: unchecked bytes were kept
//!   and served). A NAR with no known hash is streamed through and not kept.
//! - `tmp/`: files being written. A NAR is streamed to Nix and into a temp file at the same
//!   time, and becomes an entry (fsync, rename, fsync of the directory) only when the stream
//!   completed, its length is the announced one and its SHA-256 matches the narinfo's
//!   `FileHash` (or `NarHash` for `Compression: none`) when known. A stream cut for any reason
//!   deletes its temp file; a crash leaves it in `tmp/`, which is emptied at start-up.
//!
//! The eviction index ([`crate::lru`]) lives in memory and is rebuilt from the directory at
//! start: file sizes, and modification times as last use (Ferry sets a file's modification
//! time when it serves it, rather than trusting atime on `noatime`/`relatime` mounts). The
//! rebuild runs on a thread of its own while Ferry already serves: a 100 GB cache on a NAS
//! disk can take many seconds to list, and Nix must not wait for it. Until it is done, a
//! lookup the index does not know yet looks at the file itself. The index keeps an entry in
//! 37–39 bytes (a narinfo) or 49–51 (a NAR): its decoded file name, size and last use
//! (issue 14: a million entries within 64 MiB). The rebuild streams the listing and deletes
//! what it evicts as it goes, so no listing is ever held whole. Files in `narinfo/` or `nar/` whose names Ferry never
//! writes cannot be looked up (so never served) and are deleted by the rebuild rather than
//! left outside the quota.

use crate::check::Expect;
use crate::lru::{Key, Lru, Policy, Touch};
use crate::metrics::Counter;
use bytes::Bytes;
use ferry_nix::hash::{Hash, Sha256Sink, nix32_decode, nix32_encode};
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Chunks in flight between a NAR stream and its disk writer: bounded, so a slow disk slows
/// the stream instead of growing memory (at most a few hundred KiB per stream).
const WRITER_QUEUE: usize = 4;

/// Modification times are rewritten at most this often per file on hits (seconds).
const TOUCH_PERSIST_SECS: u64 = 3600;

#[derive(Debug, Default)]
pub(crate) struct DiskMetrics {
    pub(crate) narinfo_hits: Counter,
    pub(crate) nar_hits: Counter,
    pub(crate) nar_stored: Counter,
    /// NAR streams not kept: cut, wrong length or hash, write errors.
    pub(crate) nar_discarded: Counter,
    pub(crate) evictions: Counter,
}

pub(crate) struct DiskCache {
    dir: PathBuf,
    index: Mutex<Lru>,
    /// The index holds every file that was in the directory at start.
    indexed: AtomicBool,
    tmp_seq: AtomicU64,
    pub(crate) metrics: DiskMetrics,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn mtime_secs(m: &fs::Metadata) -> u64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// The index's key for an entry's relative path: its nix32 name decoded (20 bytes for a
/// narinfo, 32 for a NAR). None for names Ferry never writes.
fn key_of(entry: &str) -> Option<Key> {
    if let Some(name) = entry
        .strip_prefix("narinfo/")
        .and_then(|n| n.strip_suffix(".narinfo"))
    {
        return Some(Key::Narinfo(nix32_decode(name, 20).ok()?.try_into().ok()?));
    }
    let name = entry.strip_prefix("nar/")?;
    Some(Key::Nar(nix32_decode(name, 32).ok()?.try_into().ok()?))
}

/// The relative path of an indexed entry (the inverse of [`key_of`]: a 32-character nix32
/// string holds exactly 160 bits, and the decoder rejects 52-character ones above 256).
fn entry_of(key: &Key) -> String {
    match key {
        Key::Narinfo(n) => narinfo_entry(&nix32_encode(n)),
        Key::Nar(n) => format!("nar/{}", nix32_encode(n)),
    }
}

/// The relative path of a NAR key's file.
pub fn nar_entry(key: &str) -> String {
    format!("nar/{}", Hash::sha256_of(key.as_bytes()).to_nix32())
}

/// The relative path of a NAR key's expected-hash record.
pub fn nar_hash_entry(key: &str) -> String {
    format!("nar-hash/{}", Hash::sha256_of(key.as_bytes()).to_nix32())
}

/// `sha256:<nix32> <size>` for an expectation with both.
fn render_expect(e: &Expect) -> Option<String> {
    Some(format!(
        "{} {}\n",
        e.sha256.as_ref()?.to_nix32_prefixed(),
        e.size?
    ))
}

fn parse_expect(text: &str) -> Option<Expect> {
    let (h, size) = text.trim().split_once(' ')?;
    Some(Expect {
        sha256: Some(Hash::parse_any_prefixed(h).ok()?),
        size: Some(size.parse().ok()?),
    })
}

/// The relative path of a narinfo's file.
pub(crate) fn narinfo_entry(hash_part: &str) -> String {
    format!("narinfo/{hash_part}.narinfo")
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl DiskCache {
    /// Creates the layout, empties `tmp/`, and starts rebuilding the index from the files
    /// present (evicting what no longer fits the policy) on a thread of its own.
    pub(crate) fn open(
        dir: &Path,
        max_bytes: u64,
        max_age: Duration,
    ) -> io::Result<Arc<DiskCache>> {
        let cache = Self::create(dir, max_bytes, max_age)?;
        let me = Arc::clone(&cache);
        std::thread::Builder::new()
            .name("disk-index".into())
            .spawn(move || me.index_existing())?;
        Ok(cache)
    }

    /// The layout and an empty index, not yet rebuilt.
    fn create(dir: &Path, max_bytes: u64, max_age: Duration) -> io::Result<Arc<DiskCache>> {
        for sub in ["narinfo", "nar", "nar-hash", "tmp"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        // Whatever is in tmp/ was being written when a previous instance died: never an entry.
        for e in fs::read_dir(dir.join("tmp"))? {
            let _ = fs::remove_file(e?.path());
        }
        let cache = Arc::new(DiskCache {
            dir: dir.to_owned(),
            index: Mutex::new(Lru::new(Policy {
                max_bytes,
                max_idle_secs: max_age.as_secs(),
            })),
            indexed: AtomicBool::new(false),
            tmp_seq: AtomicU64::new(0),
            metrics: DiskMetrics::default(),
        });
        Ok(cache)
    }

    /// Adds the files present at start to the index. Entries the serving side added meanwhile
    /// (stored, or found by [`DiskCache::touch`]) are left as they are.
    fn index_existing(&self) {
        let now = now_secs();
        let (mut evicted, mut strays, mut errors) = (0usize, 0usize, 0usize);
        for sub in ["narinfo", "nar"] {
            let Ok(entries) = fs::read_dir(self.dir.join(sub)) else {
                errors += 1;
                continue;
            };
            for e in entries {
                let Some((name, m)) = e.ok().and_then(|e| {
                    let m = e.metadata().ok()?;
                    Some((e.file_name().to_str()?.to_owned(), m))
                }) else {
                    errors += 1;
                    continue;
                };
                if !m.is_file() {
                    continue;
                }
                let rel = format!("{sub}/{name}");
                // Not a name Ferry writes (so never served, and not in the index): it would
                // only take space outside the quota.
                let Some(key) = key_of(&rel) else {
                    strays += 1;
                    let _ = fs::remove_file(self.dir.join(&rel));
                    continue;
                };
                // Deleted as they come rather than collected: a cache far over a lowered
                // quota must not hold its whole listing in memory.
                let doomed = match self.index.lock() {
                    Ok(mut l) if l.last_use(&key).is_none() => {
                        l.insert(key, m.len(), mtime_secs(&m), now)
                    }
                    _ => Vec::new(),
                };
                evicted += doomed.len();
                self.remove_files(&doomed);
            }
        }
        let (entries, bytes, memory) = match self.index.lock() {
            Ok(mut l) => {
                let doomed = l.expire(now);
                let usage = (l.len(), l.total_bytes(), l.memory_bytes());
                drop(l);
                evicted += doomed.len();
                self.remove_files(&doomed);
                usage
            }
            Err(_) => (0, 0, 0),
        };
        self.indexed.store(true, Ordering::Release);
        tracing::info!(dir = %self.dir.display(), entries, bytes, index_bytes = memory, evicted, strays, errors, "disk cache indexed");
    }

    /// Whether the files present at start are all in the index.
    pub(crate) fn indexed(&self) -> bool {
        self.indexed.load(Ordering::Acquire)
    }

    /// (entries, bytes) for metrics.
    pub(crate) fn usage(&self) -> (usize, u64) {
        self.index
            .lock()
            .map(|l| (l.len(), l.total_bytes()))
            .unwrap_or((0, 0))
    }

    /// Marks `entry` used; false when it is absent (or just expired and deleted). Returns
    /// whether the file's modification time should be refreshed too.
    fn touch(&self, entry: &str) -> Option<bool> {
        let key = key_of(entry)?;
        let now = now_secs();
        let mut l = self.index.lock().ok()?;
        let last = l.last_use(&key);
        match l.touch(&key, now) {
            Touch::Hit => Some(last.is_none_or(|t| now.saturating_sub(t) >= TOUCH_PERSIST_SECS)),
            Touch::Expired => {
                drop(l);
                self.remove_files(&[key]);
                None
            }
            // Not indexed yet (the rebuild is still running): the file itself decides.
            Touch::Absent if !self.indexed() => {
                drop(l);
                let m = fs::metadata(self.dir.join(entry))
                    .ok()
                    .filter(|m| m.is_file())?;
                let doomed = {
                    let mut l = self.index.lock().ok()?;
                    l.insert(key, m.len(), now, now)
                };
                let kept = !doomed.contains(&key);
                self.remove_files(&doomed);
                kept.then_some(true)
            }
            Touch::Absent => None,
        }
    }

    /// The file vanished or is unreadable: forget it.
    fn forget(&self, entry: &str) {
        if let (Some(key), Ok(mut l)) = (key_of(entry), self.index.lock()) {
            l.remove(&key);
        }
    }

    fn remove_files(&self, keys: &[Key]) {
        for k in keys {
            let entry = entry_of(k);
            let _ = fs::remove_file(self.dir.join(&entry));
            if let Some(d) = entry.strip_prefix("nar/") {
                let _ = fs::remove_file(self.dir.join("nar-hash").join(d));
            }
            self.metrics.evictions.inc();
        }
    }

    /// The expected-hash record of `key` ([`nar_hash_entry`]).
    pub(crate) async fn expected(&self, key: &str) -> Option<Expect> {
        let text = tokio::fs::read_to_string(self.dir.join(nar_hash_entry(key)))
            .await
            .ok()?;
        parse_expect(&text)
    }

    /// Records the hash the file of `key` must have (a narinfo Ferry serves names it). A
    /// different record drops the file kept against the old one.
    pub(crate) async fn put_expected(self: &Arc<Self>, key: &str, expect: &Expect) {
        let Some(text) = render_expect(expect) else {
            return;
        };
        let me = Arc::clone(self);
        let key = key.to_owned();
        let r = tokio::task::spawn_blocking(move || {
            let path = me.dir.join(nar_hash_entry(&key));
            if fs::read_to_string(&path).is_ok_and(|old| old == text) {
                return Ok(());
            }
            let entry = nar_entry(&key);
            if fs::remove_file(me.dir.join(&entry)).is_ok() {
                me.forget(&entry);
            }
            let tmp = me.tmp_path();
            fs::write(&tmp, &text)?;
            fs::rename(&tmp, &path)
        })
        .await;
        if !matches!(r, Ok(Ok(()))) {
            tracing::warn!(?r, "disk cache: recording a NAR's expected hash failed");
        }
    }

    /// Adds a committed file to the index and deletes whatever it pushes out.
    fn admit(&self, key: Key, size: u64) {
        let now = now_secs();
        let doomed = match self.index.lock() {
            Ok(mut l) => l.insert(key, size, now, now),
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
    pub(crate) async fn narinfo(&self, hash_part: &str) -> Option<Bytes> {
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
    pub(crate) async fn put_narinfo(self: &std::sync::Arc<Self>, hash_part: &str, body: Bytes) {
        let me = std::sync::Arc::clone(self);
        let entry = narinfo_entry(hash_part);
        // Only names the index can hold are written (lookups never find others).
        let Some(key) = key_of(&entry) else {
            return;
        };
        let r = tokio::task::spawn_blocking(move || {
            let tmp = me.tmp_path();
            let r = (|| {
                let mut f = fs::File::create(&tmp)?;
                f.write_all(&body)?;
                f.sync_all()?;
                fs::rename(&tmp, me.dir.join(&entry))
            })();
            match r {
                Ok(()) => me.admit(key, body.len() as u64),
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

    /// A stored NAR file, opened, with its length: only when it was kept against `expect`
    /// (its record says that hash) and has that size.
    pub(crate) async fn open_nar(
        &self,
        key: &str,
        expect: &Expect,
    ) -> Option<(tokio::fs::File, u64)> {
        let recorded = self.expected(key).await?;
        if expect.sha256.is_none() || recorded != *expect {
            return None;
        }
        let entry = nar_entry(key);
        let persist = self.touch(&entry)?;
        let path = self.dir.join(&entry);
        let opened = async {
            let f = tokio::fs::File::open(&path).await?;
            let len = f.metadata().await?.len();
            io::Result::Ok((f, len))
        };
        match opened.await {
            Ok((_, len)) if Some(len) != expect.size => {
                tracing::warn!(path = %path.display(), len, expected = ?expect.size, "disk cache NAR has the wrong size; dropped");
                let _ = tokio::fs::remove_file(&path).await;
                self.forget(&entry);
                None
            }
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
    pub(crate) fn nar_writer(
        self: &std::sync::Arc<Self>,
        key: &str,
        total: u64,
        expect: Expect,
    ) -> Option<NarWriter> {
        // Only bytes checked against a hash from a narinfo Ferry served are kept.
        if expect.sha256.is_none() {
            tracing::debug!(%key, "no expected hash for this NAR; streamed, not kept");
            return None;
        }
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
            let want = expect.sha256.as_ref().ok_or("no expected hash")?;
            if *want != got {
                return Err(format!(
                    "SHA-256 {} differs from the narinfo's {}",
                    got.to_nix32_prefixed(),
                    want.to_nix32_prefixed()
                ));
            }
            f.sync_all().map_err(|e| e.to_string())?;
            drop(f);
            let entry = nar_entry(key);
            // The record first: a file is never there without the hash it was checked against.
            let record = Expect {
                size: Some(total),
                sha256: Some(got),
            };
            let rtmp = self.tmp_path();
            fs::write(&rtmp, render_expect(&record).unwrap_or_default())
                .and_then(|()| fs::rename(&rtmp, self.dir.join(nar_hash_entry(key))))
                .map_err(|e| e.to_string())?;
            fs::rename(&tmp, self.dir.join(&entry)).map_err(|e| e.to_string())?;
            let _ = fsync_dir(&self.dir.join("nar"));
            if let Some(key) = key_of(&entry) {
                self.admit(key, total);
            }
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
pub(crate) struct NarWriter {
    tx: tokio::sync::mpsc::Sender<Msg>,
}

impl NarWriter {
    /// Queues a chunk; false when the writer gave up (write error), after which the copy is
    /// abandoned but the stream to Nix goes on.
    pub(crate) async fn write(&self, b: Bytes) -> bool {
        self.tx.send(Msg::Data(b)).await.is_ok()
    }

    /// The stream reached its announced end: verify and commit.
    pub(crate) async fn finish(self) {
        let _ = self.tx.send(Msg::Finish).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_indexed(c: &DiskCache) {
        let t = std::time::Instant::now();
        while !c.indexed() {
            assert!(t.elapsed() < Duration::from_secs(10), "index never built");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn layout(dir: &Path, files: &[(&str, usize)]) {
        for sub in ["narinfo", "nar", "nar-hash", "tmp"] {
            fs::create_dir_all(dir.join(sub)).expect("dir");
        }
        for (name, len) in files {
            fs::write(dir.join(name), vec![b'x'; *len]).expect("file");
        }
    }

    #[test]
    fn index_keys_name_the_files_they_came_from() {
        for entry in [
            narinfo_entry("0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig"),
            nar_entry("nar/x.nar"),
        ] {
            assert_eq!(key_of(&entry).map(|k| entry_of(&k)), Some(entry));
        }
        for stray in [
            "nar/00",
            "narinfo/0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig",
            "narinfo/0c5bkdzpsq0kbl4wbamr6aa1g4jxv0i.narinfo",
            "narinfo/ec5bkdzpsq0kbl4wbamr6aa1g4jxv0ig.narinfo",
            // 260 bits: the top 4 would be lost.
            "nar/z000000000000000000000000000000000000000000000000000",
            "tmp/0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig",
        ] {
            assert_eq!(key_of(stray), None, "{stray}");
        }
    }

    #[tokio::test]
    async fn files_present_at_start_are_served_before_and_after_the_index_is_built() {
        let tmp = tempfile::tempdir().expect("tmp");
        let hash = "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig";
        let nar = nar_entry("nar/x.nar");
        layout(
            tmp.path(),
            &[(&narinfo_entry(hash), 10), (&nar, 20), ("tmp/leftover", 5)],
        );
        let c = DiskCache::create(tmp.path(), 1 << 20, Duration::from_secs(3600)).expect("open");
        assert!(
            fs::read_dir(tmp.path().join("tmp"))
                .expect("tmp")
                .next()
                .is_none()
        );
        // Before the rebuild: served from the file itself, and indexed from then on.
        assert_eq!(c.narinfo(hash).await.map(|b| b.len()), Some(10));
        assert_eq!(c.usage(), (1, 10));
        assert!(
            c.narinfo("1c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig")
                .await
                .is_none()
        );
        c.index_existing();
        assert!(c.indexed());
        assert_eq!(
            c.usage(),
            (2, 30),
            "the entry found early is not counted twice"
        );
        let expect = Expect {
            size: Some(20),
            sha256: Some(Hash::sha256_of(&[b'x'; 20])),
        };
        // No record of the hash it was checked against: never served (issue 12 item 2).
        assert!(c.open_nar("nar/x.nar", &expect).await.is_none());
        fs::write(
            tmp.path().join(nar_hash_entry("nar/x.nar")),
            render_expect(&expect).expect("record"),
        )
        .expect("record");
        assert_eq!(
            c.open_nar("nar/x.nar", &expect).await.map(|(_, l)| l),
            Some(20)
        );
        // A narinfo that names another hash for the key: not this file.
        let other = Expect {
            sha256: Some(Hash::sha256_of(b"other")),
            ..expect
        };
        assert!(c.open_nar("nar/x.nar", &other).await.is_none());
        assert!(
            c.narinfo("1c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig")
                .await
                .is_none()
        );
    }

    #[test]
    fn the_rebuild_evicts_what_exceeds_the_quota() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut files: Vec<(String, usize)> = (0..10)
            .map(|i| (nar_entry(&format!("k{i}")), 100))
            .collect();
        // Not a name Ferry writes: removed, and not counted.
        files.push(("nar/stray".into(), 1000));
        let refs: Vec<(&str, usize)> = files.iter().map(|(n, l)| (n.as_str(), *l)).collect();
        layout(tmp.path(), &refs);
        let c = DiskCache::open(tmp.path(), 450, Duration::from_secs(3600)).expect("open");
        wait_indexed(&c);
        let (entries, bytes) = c.usage();
        assert!(
            bytes <= 450 && entries == 4,
            "{entries} entries, {bytes} bytes"
        );
        let left = fs::read_dir(tmp.path().join("nar")).expect("nar").count();
        assert_eq!(left, 4);
    }
}
