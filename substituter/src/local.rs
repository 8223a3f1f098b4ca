//! This host's own store as a binary cache (`[substituter.local]`): what nix-serve and
//! harmonia do, in front of the upstreams.
//!
//! - **Narinfos** come from Nix's database, opened read-only: `ValidPaths` and `Refs` have had
//!   the same columns from Nix 2.8 to 2.34 (schema version 10,
//!   <https://github.com/NixOS/nix/blob/2.8.0/src/libstore/schema.sql>,
//!   <https://github.com/NixOS/nix/blob/2.34.0/src/libstore/schema.sql>); [`LocalStore::open`]
//!   checks them. Each narinfo carries the path's own signatures plus a fresh one per
//!   configured key over the same fingerprint `nix store sign` signs
//!   ([`ferry_nix::narinfo::fingerprint`]); Ed25519 is deterministic, so the `Sig:` line is
//!   byte-identical to the one `nix store sign` would add.
//! - **NARs** are dumped from the file system as they are sent ([`ferry_nix::nar::dump_path`],
//!   byte-identical to `nix-store --dump`), through a bounded channel: no temporary file, a
//!   few chunks of memory per stream. `Compression: none`, `Content-Length` from `NarSize`,
//!   single `Range` requests. The last chunk of every response is held back until the whole
//!   NAR has been dumped and matched `NarSize` and `NarHash`: a path garbage-collected (or
//!   changed) while it streams makes the dump fail or differ, and the connection is then
//!   aborted, so a client never sees a truncated or different NAR end cleanly.
//!
//! The URL of a local NAR is `nar/<hash part>-<NarHash nix32>.nar` (nix-serve's shape): it
//! names the path and its content, so it resolves without any memory after a restart, and a
//! URL that Nix cached for a path since collected and rebuilt differently is a 404, not a
//! NAR that fails its hash check.

use crate::metrics::LocalMetrics;
use crate::paths::HashPart;
use bytes::{Bytes, BytesMut};
use ferry_nix::hash::{Hash, HashAlgo, Sha256Sink};
use ferry_nix::narinfo::NarInfo;
use ferry_nix::signing::{SecretKey, Signature};
use ferry_nix::store_path::{StoreDir, StorePath};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LocalError {
    #[error("Nix database {}: {source}", db.display())]
    Db {
        db: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "Nix database {}: {what} (not the schema of Nix 2.8 to 2.34)",
        db.display()
    )]
    Schema { db: PathBuf, what: String },
    #[error("path {path} in the Nix database: {what}")]
    BadRow { path: String, what: String },
}

/// What Nix's database says about one valid path.
#[derive(Debug, Clone)]
pub(crate) struct PathInfo {
    pub(crate) path: StorePath,
    pub(crate) nar_hash: Hash,
    pub(crate) nar_size: u64,
    pub(crate) references: BTreeSet<StorePath>,
    pub(crate) deriver: Option<StorePath>,
    pub(crate) sigs: BTreeSet<Signature>,
    pub(crate) ca: Option<String>,
}

/// A narinfo rendered from the store.
#[derive(Debug, Clone)]
pub(crate) struct LocalNarInfo {
    pub(crate) body: Bytes,
    /// Whether a client can accept it without trusting Ferry: it has a signature (its own or
    /// a configured key's) or a content address.
    pub(crate) signed: bool,
}

/// Time SQLite waits for a lock before giving up. Readers of a WAL database are not blocked
/// by Nix's writers; only WAL recovery or a checkpoint can hold them briefly, and the
/// lookup runs on a serving thread.
const BUSY_TIMEOUT: Duration = Duration::from_millis(200);

/// Bytes per chunk sent to the client, and chunks queued per stream: memory per stream is
/// about (QUEUE + 1) × CHUNK plus the dump's 64 KiB read buffer, whatever the NAR's size.
const CHUNK: usize = 256 * 1024;
const QUEUE: usize = 2;

pub struct LocalStore {
    store_dir: StoreDir,
    db: PathBuf,
    keys: Vec<SecretKey>,
    /// Check every NAR's SHA-256 before its last byte goes out (`verify-nar-hash`).
    pub(crate) verify_nar_hash: bool,
    /// Rendered, signed narinfos by hash part, each with the identity of the store path's
    /// top-level inode when it was read (see [`LocalStore::narinfo_cached`]).
    rendered: moka::future::Cache<HashPart, Arc<Rendered>>,
    pub(crate) metrics: LocalMetrics,
}

/// A narinfo rendered from the store, and the inode it describes.
struct Rendered {
    fs_path: PathBuf,
    inode: (u64, u64, i64, i64),
    narinfo: LocalNarInfo,
}

/// How long a rendered narinfo is reused without asking the database again. Validity is
/// checked on every use (the store path's inode must be the same one: a collected path is
/// gone, a rebuilt one is a new inode); the time only bounds how late signatures added to
/// the database since (`nix store sign`, a later substitution) show.
const RENDERED_TTL: Duration = Duration::from_secs(10);
/// Bytes of rendered narinfos kept (a narinfo is 0.5–2 KiB).
const RENDERED_BYTES: u64 = 8 * 1024 * 1024;

/// Device, inode and change time of a store path's top-level entry (not followed if it is a
/// symlink).
fn inode_of(p: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::symlink_metadata(p).ok()?;
    Some((m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

thread_local! {
    /// One read-only connection per serving thread (a `Connection` is not `Sync`; the
    /// serving threads are single-threaded runtimes, so this is one per core).
    static CONN: RefCell<Option<(PathBuf, Connection)>> = const { RefCell::new(None) };
}

impl LocalStore {
    /// Opens Nix's database once to check that it is there and has the expected columns.
    pub fn open(
        store_dir: StoreDir,
        db: PathBuf,
        keys: Vec<SecretKey>,
        verify_nar_hash: bool,
    ) -> Result<LocalStore, LocalError> {
        if db.exists() {
            connect(&db)?;
        } else {
            // Nix creates its database on the first store operation: a fresh host serves
            // once it exists (every connection checks the schema when it is made).
            tracing::warn!(db = %db.display(), "Nix's database does not exist yet; serving nothing from the local store until it does");
        }
        Ok(LocalStore {
            store_dir,
            db,
            keys,
            verify_nar_hash,
            rendered: moka::future::Cache::builder()
                .weigher(|_k: &HashPart, v: &Arc<Rendered>| {
                    u32::try_from(v.narinfo.body.len() + 256).unwrap_or(u32::MAX)
                })
                .max_capacity(RENDERED_BYTES)
                .time_to_live(RENDERED_TTL)
                .build(),
            metrics: LocalMetrics::default(),
        })
    }

    pub(crate) fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, LocalError> {
        let db_err = |source| LocalError::Db {
            db: self.db.clone(),
            source,
        };
        CONN.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(p, _)| p != &self.db) {
                *slot = Some((self.db.clone(), connect(&self.db)?));
            }
            let Some((_, conn)) = slot.as_ref() else {
                return Err(db_err(rusqlite::Error::InvalidQuery));
            };
            let r = f(conn).map_err(db_err);
            if r.is_err() {
                // A fresh connection next time (the database may have been replaced).
                *slot = None;
            }
            r
        })
    }

    /// The valid path with this hash part, as Nix's `queryPathFromHashPart` finds it: the
    /// first path not below `<store>/<hash>` in the unique index
    /// (<https://github.com/NixOS/nix/blob/2.8.0/src/libstore/local-store.cc#L1090-L1104>).
    pub(crate) fn query(&self, hash: &HashPart) -> Result<Option<PathInfo>, LocalError> {
        let prefix = format!("{}/{}", self.store_dir.as_str(), hash.as_str());
        let row = self.with_conn(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, path, hash, deriver, narSize, sigs, ca FROM ValidPaths \
                 WHERE path >= ?1 ORDER BY path LIMIT 1",
            )?;
            let row = st
                .query_row([&prefix], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                    ))
                })
                .optional()?;
            let Some(row) = row else { return Ok(None) };
            if !row.1.starts_with(&prefix) || row.1.as_bytes().get(prefix.len()) != Some(&b'-') {
                return Ok(None);
            }
            let mut st = c.prepare_cached(
                "SELECT path FROM Refs JOIN ValidPaths ON reference = id WHERE referrer = ?1",
            )?;
            let refs = st
                .query_map([row.0], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some((row, refs)))
        })?;
        let Some(((_, path, hash, deriver, nar_size, sigs, ca), refs)) = row else {
            return Ok(None);
        };
        let bad = |what: String| LocalError::BadRow {
            path: path.clone(),
            what,
        };
        let parse = |p: &str| self.store_dir.parse(p).map_err(|e| bad(e.to_string()));
        let nar_hash = Hash::parse_any_prefixed(&hash).map_err(|e| bad(e.to_string()))?;
        if nar_hash.algo() != HashAlgo::Sha256 {
            return Err(bad("NAR hash is not SHA-256".into()));
        }
        // Nix registers every path with its size since 2.0; a row without one cannot be
        // signed (the fingerprint needs it) or framed with a Content-Length.
        let nar_size = match nar_size {
            Some(n) if n > 0 => n as u64,
            _ => return Err(bad("no NAR size".into())),
        };
        let references = refs
            .iter()
            .map(|r| parse(r))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let deriver = match deriver.as_deref() {
            None | Some("") => None,
            Some(d) => Some(parse(d)?),
        };
        let mut parsed_sigs = BTreeSet::new();
        for s in sigs.as_deref().unwrap_or("").split_ascii_whitespace() {
            match Signature::parse(s) {
                Ok(sig) => {
                    parsed_sigs.insert(sig);
                }
                // Nix keeps what it was given; a signature it could not parse is one no
                // client can use either.
                Err(error) => {
                    tracing::warn!(%path, %error, "unparsable signature in the Nix database; left out")
                }
            }
        }
        Ok(Some(PathInfo {
            path: parse(&path)?,
            nar_hash,
            nar_size,
            references,
            deriver,
            sigs: parsed_sigs,
            ca: ca.filter(|c| !c.is_empty()),
        }))
    }

    /// The narinfo of a valid path, signed with the configured keys (`None` when the path is
    /// not valid here), reusing one rendered in the last [`RENDERED_TTL`] while the store
    /// path is still the same inode: a warm lookup is a `stat`, not a database
    /// query and an Ed25519 signature (goal: within 1.2× of nginx serving a static file).
    pub(crate) async fn narinfo_cached(
        &self,
        hash: &HashPart,
    ) -> Result<Option<LocalNarInfo>, LocalError> {
        if let Some(r) = self.rendered.get(hash).await {
            if inode_of(&r.fs_path) == Some(r.inode) {
                return Ok(Some(r.narinfo.clone()));
            }
            self.rendered.invalidate(hash).await;
        }
        let Some((info, narinfo)) = self.narinfo_info(hash)? else {
            return Ok(None);
        };
        let fs_path = self.fs_path(&info.path);
        if let Some(inode) = inode_of(&fs_path) {
            self.rendered
                .insert(
                    *hash,
                    Arc::new(Rendered {
                        fs_path,
                        inode,
                        narinfo: narinfo.clone(),
                    }),
                )
                .await;
        }
        Ok(Some(narinfo))
    }

    /// The NAR key of a path: `nar/<hash part>-<NarHash nix32>.nar`.
    pub(crate) fn nar_key(info: &PathInfo) -> String {
        format!(
            "nar/{}-{}.nar",
            info.path.hash_part(),
            info.nar_hash.to_nix32()
        )
    }

    fn narinfo_info(
        &self,
        hash: &HashPart,
    ) -> Result<Option<(PathInfo, LocalNarInfo)>, LocalError> {
        let Some(info) = self.query(hash)? else {
            return Ok(None);
        };
        let keep = info.clone();
        let mut ni = NarInfo {
            url: Self::nar_key(&info),
            store_path: info.path,
            compression: "none".to_owned(),
            file_hash: Some(info.nar_hash.clone()),
            file_size: Some(info.nar_size),
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: info.references,
            deriver: info.deriver,
            system: None,
            sigs: info.sigs,
            ca: info.ca,
        };
        for k in &self.keys {
            // Only a zero size or a non-SHA-256 hash fail, both excluded by `query`.
            if let Err(error) = ni.sign(&self.store_dir, k) {
                return Err(LocalError::BadRow {
                    path: self.store_dir.display(&ni.store_path),
                    what: error.to_string(),
                });
            }
        }
        Ok(Some((
            keep,
            LocalNarInfo {
                signed: !ni.sigs.is_empty() || ni.ca.is_some(),
                body: Bytes::from(ni.render(&self.store_dir)),
            },
        )))
    }

    /// The path a local NAR key names, if it is valid here with that NAR hash.
    pub(crate) fn nar(&self, key: &str) -> Result<Option<PathInfo>, LocalError> {
        let Some((hash, nar_hash)) = parse_nar_key(key) else {
            return Ok(None);
        };
        let Some(info) = self.query(&hash)? else {
            return Ok(None);
        };
        Ok((info.nar_hash.to_nix32() == nar_hash).then_some(info))
    }

    /// The file system path of a store path.
    pub(crate) fn fs_path(&self, p: &StorePath) -> PathBuf {
        Path::new(self.store_dir.as_str()).join(p.as_str())
    }
}

/// `nar/<hash part>-<nix32 sha256>.nar` → (hash part, NAR hash text). Anything else (a query,
/// another shape) is not a local key.
pub(crate) fn parse_nar_key(key: &str) -> Option<(HashPart, &str)> {
    let name = key.strip_prefix("nar/")?.strip_suffix(".nar")?;
    let (hash, nar_hash) = name.split_once('-')?;
    let hash = HashPart::parse(hash)?;
    (nar_hash.len() == ferry_nix::hash::nix32_len(32)
        && Hash::parse_non_sri_unprefixed(nar_hash, HashAlgo::Sha256).is_ok())
    .then_some((hash, nar_hash))
}

fn connect(db: &Path) -> Result<Connection, LocalError> {
    let err = |source| LocalError::Db {
        db: db.to_owned(),
        source,
    };
    // Read-only: Ferry never writes Nix's database. SQLite still maps the WAL index
    // (`db.sqlite-shm`) next to it, as every reader of a WAL database must.
    let c = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    c.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    check_schema(&c, db)?;
    Ok(c)
}

/// The columns Ferry reads, as Nix 2.8 to 2.34 create them.
fn check_schema(c: &Connection, db: &Path) -> Result<(), LocalError> {
    for (table, cols) in [
        (
            "ValidPaths",
            &["id", "path", "hash", "deriver", "narSize", "sigs", "ca"][..],
        ),
        ("Refs", &["referrer", "reference"][..]),
    ] {
        let have: Vec<String> = c
            .prepare(&format!("PRAGMA table_info({table})"))
            .and_then(|mut st| {
                st.query_map([], |r| r.get::<_, String>(1))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|source| LocalError::Db {
                db: db.to_owned(),
                source,
            })?;
        for col in cols {
            if !have.iter().any(|h| h == col) {
                return Err(LocalError::Schema {
                    db: db.to_owned(),
                    what: format!("table {table} has no column {col} (has: {have:?})"),
                });
            }
        }
    }
    Ok(())
}

/// Streams the NAR of `path` bytes `[start, end)` through a bounded channel; the dump runs on
/// a blocking thread. The last chunk is sent only after the whole NAR matched `nar_size` and
/// `nar_hash`; on any mismatch or read error the stream ends with an error, which aborts the
/// connection.
pub(crate) fn stream_nar(
    fs_path: PathBuf,
    nar_size: u64,
    nar_hash: Hash,
    start: u64,
    end: u64,
    verify_hash: bool,
    state: std::sync::Arc<crate::server::State>,
) -> impl futures_util::Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(QUEUE);
    let path_text = fs_path.display().to_string();
    tokio::task::spawn_blocking(move || {
        let mut w = Sender {
            state: std::sync::Arc::clone(&state),
            tx: tx.clone(),
            buf: BytesMut::with_capacity(CHUNK),
            pos: 0,
            sent: start,
            start,
            end,
            nar_size,
            hasher: verify_hash.then(Sha256Sink::new),
        };
        let r = ferry_nix::nar::dump_path(&fs_path, &mut w);
        let outcome = match (r, w.hasher.take()) {
            (Err(e), _) if w.tx.is_closed() => Err(format!("client gone: {e}")),
            (Err(e), _) => Err(e.to_string()),
            (Ok(n), _) if n != nar_size => {
                Err(format!("NAR is {n} bytes, NarSize says {nar_size}"))
            }
            (Ok(_), None) => Ok(()),
            (Ok(_), Some(h)) => {
                let got = h.finish();
                if got == nar_hash {
                    Ok(())
                } else {
                    Err(format!(
                        "NAR hash {} differs from NarHash {}",
                        got.to_nix32_prefixed(),
                        nar_hash.to_nix32_prefixed()
                    ))
                }
            }
        };
        match outcome {
            Ok(()) => {
                let last = w.buf.split().freeze();
                if !last.is_empty() {
                    let n = last.len() as u64;
                    if tx.blocking_send(Ok(last)).is_ok() {
                        state.metrics.nar_bytes.add(n);
                        if let Some(l) = &state.local {
                            l.metrics.nar_bytes.add(n);
                        }
                    }
                }
            }
            Err(why) => {
                if !tx.is_closed() {
                    if let Some(l) = &state.local {
                        l.metrics.nar_aborts.inc();
                    }
                    tracing::error!(path = %path_text, %why, "local NAR stream aborted: the path changed or vanished while it was served");
                    let _ = tx.blocking_send(Err(io::Error::other(why)));
                }
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    })
}

/// The dump's output: hashes everything, keeps the bytes of `[start, end)` and sends them in
/// chunks, holding back the last ones until [`stream_nar`] has checked the whole NAR.
struct Sender {
    state: std::sync::Arc<crate::server::State>,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>,
    buf: BytesMut,
    /// NAR offset of the next byte written.
    pos: u64,
    /// NAR offset up to which bytes were sent (or skipped before `start`).
    sent: u64,
    start: u64,
    end: u64,
    nar_size: u64,
    /// With `verify-nar-hash`.
    hasher: Option<Sha256Sink>,
}

impl io::Write for Sender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let from = self.pos;
        let to = from + data.len() as u64;
        if to > self.nar_size {
            // More than NarSize: not the registered content. Stop now.
            return Err(io::Error::other(format!(
                "NAR longer than its NarSize {}",
                self.nar_size
            )));
        }
        if let Some(h) = &mut self.hasher {
            h.update(data);
        }
        self.pos = to;
        let lo = from.max(self.start);
        let hi = to.min(self.end);
        if lo < hi {
            let part = &data[(lo - from) as usize..(hi - from) as usize];
            self.buf.extend_from_slice(part);
            // Send full chunks, but never the response's final bytes: they wait for the
            // NarSize and NarHash check at the end of the dump.
            if self.buf.len() >= CHUNK && self.sent + (self.buf.len() as u64) < self.end {
                let chunk = self.buf.split().freeze();
                let n = chunk.len() as u64;
                self.sent += n;
                self.state.metrics.nar_bytes.add(n);
                if let Some(l) = &self.state.local {
                    l.metrics.nar_bytes.add(n);
                }
                self.buf.reserve(CHUNK);
                self.tx
                    .blocking_send(Ok(chunk))
                    .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client gone"))?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Serves the NAR of a local path: HEAD, whole, or one range.
pub(crate) async fn serve_nar(
    state: std::sync::Arc<crate::server::State>,
    local: &LocalStore,
    info: PathInfo,
    range: Option<(u64, Option<u64>)>,
    head: bool,
) -> axum::http::Response<axum::body::Body> {
    use crate::nar::{Framed, frame};
    local.metrics.nar_requests.inc();
    let total = info.nar_size;
    let (mut resp, end) = match frame(range, Some(total)) {
        Framed::Body(r, e) => (r, e.unwrap_or(total)),
        Framed::Answered(r) => return r,
    };
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/x-nix-nar"),
    );
    if head {
        return resp;
    }
    let start = range.map_or(0, |r| r.0);
    let fs_path = local.fs_path(&info.path);
    *resp.body_mut() = axum::body::Body::from_stream(stream_nar(
        fs_path,
        info.nar_size,
        info.nar_hash,
        start,
        end,
        local.verify_nar_hash,
        state,
    ));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nar_keys() {
        let h = "0c0ilf4xs3ndm7lx7jglb9p8g8g2yq8p";
        let nh = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        let key = format!("nar/{h}-{nh}.nar");
        let (hp, got) = parse_nar_key(&key).expect("a local key");
        assert_eq!(hp.as_str(), h);
        assert_eq!(got, nh);
        for bad in [
            format!("nar/{h}-{nh}.nar.xz"),
            format!("nar/{h}-{nh}.nar?hash=x"),
            format!("nar/{h}.nar"),
            format!("nar/{nh}.nar"),
            format!("nar/{h}-{}.nar", &nh[1..]),
            format!("x/{h}-{nh}.nar"),
        ] {
            assert!(parse_nar_key(&bad).is_none(), "{bad}");
        }
    }
}
