//! Upload targets, and where files go in a binary cache (docs/upload.md §3.3):
//! `<hash part>.narinfo`, `nar/<nix32 FileHash>.nar<ext>`, `nix-cache-info`.
//!
//! - `file:///dir`: each file is written under `dir/.ferry-tmp/`, `fsync`ed, renamed into place
//!   and the directory `fsync`ed, so a reader (or a crash) never sees a partial file. Nix's own
//!   `file://` store renames without fsync (`local-binary-cache-store.cc`, `upsertFile`).
//! - `http(s)://…`: `PUT` per file, as Nix's `HttpBinaryCacheStore::upsertFile` does, with
//!   Nix's content types; existence by `HEAD`. A PUT either lands whole or not at all.
//!
//! The narinfo is the commit point: the uploader writes it last (see `upload`).

use crate::compress::Compression;
use crate::spool::fsync_dir;
use ferry_nix::hash::Hash;
use ferry_nix::store_path::{StoreDir, StorePath};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

pub const NARINFO_TYPE: &str = "text/x-nix-narinfo";
pub const NAR_TYPE: &str = "application/x-nix-nar";
pub const CACHE_INFO_TYPE: &str = "text/x-nix-cache-info";
pub const CACHE_INFO: &str = "nix-cache-info";
/// Where `file://` targets stage files; hidden, so no temporary name is ever visible among
/// the cache's files.
pub const FILE_TMP_DIR: &str = ".ferry-tmp";

pub fn narinfo_key(p: &StorePath) -> String {
    format!("{}.narinfo", p.hash_part())
}

pub fn nar_key(file_hash: &Hash, c: Compression) -> String {
    format!("nar/{}.nar{}", file_hash.to_nix32(), c.extension())
}

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("unsupported target URL {0:?} (use file:///dir, http://… or https://…)")]
    BadUrl(String),
    #[error("{target}: {path}: {source}")]
    Io {
        target: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{target}: {method} {key}: HTTP {status}")]
    Status {
        target: String,
        method: &'static str,
        key: String,
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("{target}: {method} {key}: {message}")]
    Network {
        target: String,
        method: &'static str,
        key: String,
        message: String,
    },
    #[error("{target}: nix-cache-info says StoreDir {found:?}, this store is {want:?}")]
    StoreDirMismatch {
        target: String,
        found: String,
        want: String,
    },
}

impl TargetError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TargetError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetUrl {
    File(PathBuf),
    /// Base URL without a trailing slash.
    Http(String),
}

pub fn parse_url(url: &str) -> Result<TargetUrl, TargetError> {
    if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') || rest.contains('?') || rest.len() < 2 {
            return Err(TargetError::BadUrl(url.to_owned()));
        }
        return Ok(TargetUrl::File(PathBuf::from(rest.trim_end_matches('/'))));
    }
    if (url.starts_with("http://") || url.starts_with("https://")) && !url.contains('?') {
        let base = url.trim_end_matches('/');
        if base.split("://").nth(1).is_some_and(|h| !h.is_empty()) {
            return Ok(TargetUrl::Http(base.to_owned()));
        }
    }
    Err(TargetError::BadUrl(url.to_owned()))
}

pub struct Target {
    pub url: String,
    kind: Kind,
}

enum Kind {
    File(PathBuf),
    Http { base: String, client: reqwest::Client },
}

impl Target {
    pub fn new(url: &str, connect_timeout: Duration) -> Result<Target, TargetError> {
        let kind = match parse_url(url)? {
            TargetUrl::File(dir) => Kind::File(dir),
            TargetUrl::Http(base) => {
                // Connect time-out: a blackholed cache costs a worker seconds, not minutes.
                // Read time-out rather than a total one: a large NAR may take long to send.
                let client = reqwest::Client::builder()
                    .connect_timeout(connect_timeout)
                    .read_timeout(Duration::from_secs(120))
                    .user_agent(concat!("ferry-post-build/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| TargetError::Network {
                        target: url.to_owned(),
                        method: "client",
                        key: String::new(),
                        message: e.to_string(),
                    })?;
                Kind::Http { base, client }
            }
        };
        Ok(Target {
            url: url.to_owned(),
            kind,
        })
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> TargetError + '_ {
        let path = path.to_owned();
        move |source| TargetError::Io {
            target: self.url.clone(),
            path,
            source,
        }
    }

    /// Writes `nix-cache-info` if the cache has none; refuses a cache of another store dir.
    pub async fn init(&self, store_dir: &StoreDir) -> Result<(), TargetError> {
        let text = ferry_nix::narinfo::CacheInfo {
            store_dir: Some(store_dir.clone()),
            ..Default::default()
        }
        .render();
        let existing = match &self.kind {
            Kind::File(dir) => match tokio::fs::read_to_string(dir.join(CACHE_INFO)).await {
                Ok(t) => Some(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(self.io(&dir.join(CACHE_INFO))(e)),
            },
            Kind::Http { .. } => self.get_text(CACHE_INFO).await?,
        };
        match existing {
            None => self.put_bytes(CACHE_INFO, text.into_bytes(), CACHE_INFO_TYPE).await,
            Some(t) => {
                let found = ferry_nix::narinfo::CacheInfo::parse(&t)
                    .ok()
                    .and_then(|c| c.store_dir)
                    .map(|d| d.as_str().to_owned())
                    .unwrap_or_default();
                if found.is_empty() || found == store_dir.as_str() {
                    Ok(())
                } else {
                    Err(TargetError::StoreDirMismatch {
                        target: self.url.clone(),
                        found,
                        want: store_dir.as_str().to_owned(),
                    })
                }
            }
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, TargetError> {
        match &self.kind {
            Kind::File(dir) => match tokio::fs::symlink_metadata(dir.join(key)).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(self.io(&dir.join(key))(e)),
            },
            Kind::Http { base, client } => {
                let r = client
                    .head(format!("{base}/{key}"))
                    .send()
                    .await
                    .map_err(|e| self.net("HEAD", key, e))?;
                match r.status().as_u16() {
                    200..=299 => Ok(true),
                    // S3 answers 403 for a missing key without ListBucket permission.
                    404 | 403 => Ok(false),
                    _ => Err(self.status("HEAD", key, &r)),
                }
            }
        }
    }

    async fn get_text(&self, key: &str) -> Result<Option<String>, TargetError> {
        let Kind::Http { base, client } = &self.kind else {
            return Ok(None);
        };
        let r = client
            .get(format!("{base}/{key}"))
            .send()
            .await
            .map_err(|e| self.net("GET", key, e))?;
        match r.status().as_u16() {
            200..=299 => Ok(Some(r.text().await.map_err(|e| self.net("GET", key, e))?)),
            404 | 403 => Ok(None),
            _ => Err(self.status("GET", key, &r)),
        }
    }

    fn net(&self, method: &'static str, key: &str, e: reqwest::Error) -> TargetError {
        // The error chain says why (connect time-out, refused, reset); keep all of it.
        let mut message = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            message += &format!(": {s}");
            src = s.source();
        }
        TargetError::Network {
            target: self.url.clone(),
            method,
            key: key.to_owned(),
            message,
        }
    }

    fn status(&self, method: &'static str, key: &str, r: &reqwest::Response) -> TargetError {
        TargetError::Status {
            target: self.url.clone(),
            method,
            key: key.to_owned(),
            status: r.status().as_u16(),
            retry_after: r
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::retry::parse_retry_after),
        }
    }

    pub async fn put_bytes(&self, key: &str, data: Vec<u8>, content_type: &str) -> Result<(), TargetError> {
        match &self.kind {
            Kind::File(dir) => {
                let dir = dir.clone();
                let key2 = key.to_owned();
                let dest = dir.join(key);
                tokio::task::spawn_blocking(move || {
                    file_put(&dir, &key2, |f| std::io::Write::write_all(f, &data))
                })
                .await
                .map_err(|e| self.io(&dest)(std::io::Error::other(e)))?
                .map_err(self.io(&dest))
            }
            Kind::Http { base, client } => {
                let len = data.len();
                let r = client
                    .put(format!("{base}/{key}"))
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .body(data)
                    .send()
                    .await
                    .map_err(|e| self.net("PUT", key, e))?;
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(self.status("PUT", key, &r))
                }
            }
        }
    }

    /// Uploads the local file `src` as `key`, streaming it.
    pub async fn put_file(&self, key: &str, src: &Path, content_type: &str) -> Result<(), TargetError> {
        match &self.kind {
            Kind::File(dir) => {
                let dir = dir.clone();
                let key2 = key.to_owned();
                let src2 = src.to_owned();
                let dest = dir.join(key);
                tokio::task::spawn_blocking(move || {
                    file_put(&dir, &key2, |f| {
                        let mut from = std::fs::File::open(&src2)?;
                        std::io::copy(&mut from, f).map(|_| ())
                    })
                })
                .await
                .map_err(|e| self.io(&dest)(std::io::Error::other(e)))?
                .map_err(self.io(&dest))
            }
            Kind::Http { base, client } => {
                let f = tokio::fs::File::open(src).await.map_err(self.io(src))?;
                let len = f.metadata().await.map_err(self.io(src))?.len();
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024));
                let r = client
                    .put(format!("{base}/{key}"))
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| self.net("PUT", key, e))?;
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(self.status("PUT", key, &r))
                }
            }
        }
    }
}

/// Atomic, durable write of `dir/key`: stage in `dir/.ferry-tmp/`, fsync, rename, fsync the
/// destination directory.
fn file_put(
    dir: &Path,
    key: &str,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dest = dir.join(key);
    let dest_dir = dest.parent().unwrap_or(dir).to_owned();
    let tmp_dir = dir.join(FILE_TMP_DIR);
    std::fs::create_dir_all(&tmp_dir)?;
    if !dest_dir.exists() {
        std::fs::create_dir_all(&dest_dir)?;
        fsync_dir(dir)?;
    }
    let mut r = [0u8; 8];
    let _ = getrandom::fill(&mut r);
    let tmp = tmp_dir.join(format!("{}.{:016x}", std::process::id(), u64::from_le_bytes(r)));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        // Caches are read by others (nginx, nix-serve): world-readable like Nix's files.
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        drop(f);
        std::fs::rename(&tmp, &dest)?;
        fsync_dir(&dest_dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes staging files a killed uploader left in a `file://` target.
pub fn clean_file_target(url: &str) {
    if let Ok(TargetUrl::File(dir)) = parse_url(url)
        && let Ok(rd) = std::fs::read_dir(dir.join(FILE_TMP_DIR))
    {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_nix() {
        let sp = StorePath::from_base_name("7hmcr4m0qxnr5yb9mr37k2bw4ylp7wjc-hello-2.12").expect("sp");
        assert_eq!(narinfo_key(&sp), "7hmcr4m0qxnr5yb9mr37k2bw4ylp7wjc.narinfo");
        let h = Hash::sha256_of(b"");
        assert_eq!(
            nar_key(&h, Compression::Zstd),
            "nar/0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73.nar.zst"
        );
        assert_eq!(
            nar_key(&h, Compression::None),
            "nar/0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73.nar"
        );
    }

    #[test]
    fn urls() {
        assert_eq!(parse_url("file:///var/c/").expect("f"), TargetUrl::File("/var/c".into()));
        assert_eq!(
            parse_url("http://10.0.0.1:8080/up/").expect("h"),
            TargetUrl::Http("http://10.0.0.1:8080/up".into())
        );
        for bad in ["file://rel", "file:///", "s4://x", "http://", "file:///c?compression=xz", ""] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn file_target_writes_atomically() {
        let d = tempfile::tempdir().expect("dir");
        let url = format!("file://{}", d.path().display());
        let t = Target::new(&url, Duration::from_secs(1)).expect("target");
        let sd = StoreDir::new("/nix/store").expect("sd");
        t.init(&sd).await.expect("init");
        assert_eq!(
            std::fs::read_to_string(d.path().join(CACHE_INFO)).expect("ci"),
            "StoreDir: /nix/store\n"
        );
        t.init(&sd).await.expect("init again");
        let other = StoreDir::new("/other").expect("sd");
        assert!(matches!(t.init(&other).await, Err(TargetError::StoreDirMismatch { .. })));
        assert!(!t.exists("nar/x.nar").await.expect("exists"));
        t.put_bytes("nar/x.nar", b"abc".to_vec(), NAR_TYPE).await.expect("put");
        assert!(t.exists("nar/x.nar").await.expect("exists"));
        assert_eq!(std::fs::read(d.path().join("nar/x.nar")).expect("read"), b"abc");
        assert_eq!(std::fs::read_dir(d.path().join(FILE_TMP_DIR)).expect("tmp").count(), 0);
    }
}
