//! Upload targets, and where files go in a binary cache (docs/upload.md §3.3):
//! `<hash part>.narinfo`, `nar/<nix32 FileHash>.nar<ext>`, `nix-cache-info`.
//!
//! - `file:///dir`: each file is written under `dir/.ferry-tmp/`, `fsync`ed, renamed into place
//!   and the directory `fsync`ed, so a reader (or a crash) never sees a partial file. Nix's own
//!   `file://` store renames without fsync (`local-binary-cache-store.cc`, `upsertFile`).
//! - `http(s)://…`: `PUT` per file, as Nix's `HttpBinaryCacheStore::upsertFile` does, with
//!   Nix's content types; existence by `HEAD`. A PUT either lands whole or not at all.
//! - `s3://bucket?endpoint=…&region=…`: the S3 API (`PUT`/`HEAD`/`GET` object) signed with
//!   SigV4 (see `s3`); an S3 PUT is atomic too.
//!
//! Every URL may carry `?compression=zstd|xz|none` (Nix's store parameter), overriding the
//! configured default for that target.
//!
//! The narinfo is the commit point: the uploader writes it last (see `upload`).

use crate::compress::Compression;
use crate::s3::{Credentials, S3Location};
use crate::spool::fsync_dir;
use ferry_nix::hash::Hash;
use ferry_nix::store_path::{StoreDir, StorePath};
use ferry_nix::url::redact;
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
    #[error("unsupported target URL {0:?} (use file:///dir, http://…, https://… or s3://bucket)")]
    BadUrl(String),
    #[error("target URL {url:?}: {message}")]
    BadParam { url: String, message: String },
    #[error("target URL {url:?}: {source}")]
    S3Url {
        url: String,
        #[source]
        source: crate::s3::S3UrlError,
    },
    #[error("{target}: S3 credentials: {source}")]
    Credentials {
        target: String,
        #[source]
        source: crate::s3::CredentialsError,
    },
    #[error("{target}: {path}: {source}")]
    Io {
        target: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{target}: {method} {key}: HTTP {status}{}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status {
        target: String,
        method: &'static str,
        key: String,
        status: u16,
        /// S3's error code (`SignatureDoesNotMatch`, `NoSuchBucket`, `SlowDown`…).
        code: Option<String>,
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
    S3(S3Location),
}

/// A target URL taken apart: where, and the per-target store parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUrl {
    pub location: TargetUrl,
    /// `?compression=`; `None` means the configured default.
    pub compression: Option<Compression>,
}

/// Percent-decoding of a URL query value (Nix decodes its store URL parameters).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Parses a target URL. Unknown parameters are refused rather than ignored: a typo in
/// `endpoint` must not send the cache to AWS.
pub fn parse_url(url: &str) -> Result<ParsedUrl, TargetError> {
    let bad = || TargetError::BadUrl(redact(url));
    let bad_param = |message: String| TargetError::BadParam {
        url: redact(url),
        message,
    };
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut params = Vec::new();
    for kv in query
        .unwrap_or_default()
        .split('&')
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v =
            percent_decode(v).ok_or_else(|| bad_param(format!("bad percent-encoding in {k}")))?;
        params.push((k.to_owned(), v));
    }
    let is_s3 = base.starts_with("s3://");
    let mut compression = None;
    for (k, v) in &params {
        match k.as_str() {
            "compression" => {
                compression =
                    Some(Compression::from_name(v).ok_or_else(|| {
                        bad_param(format!("compression={v} (use zstd, xz or none)"))
                    })?)
            }
            "endpoint" | "region" | "scheme" | "profile" if is_s3 => {}
            _ => {
                let known = if is_s3 {
                    "compression, endpoint, region, scheme, profile"
                } else {
                    "compression"
                };
                return Err(bad_param(format!(
                    "unknown parameter {k:?} (known: {known})"
                )));
            }
        }
    }
    let location = if let Some(rest) = base.strip_prefix("file://") {
        // Only slashes (`file:////`) would be the empty path: the current directory.
        let dir = rest.trim_end_matches('/');
        if !rest.starts_with('/') || dir.is_empty() {
            return Err(bad());
        }
        TargetUrl::File(PathBuf::from(dir))
    } else if base.starts_with("http://") || base.starts_with("https://") {
        let trimmed = base.trim_end_matches('/');
        if trimmed.split("://").nth(1).is_none_or(|h| h.is_empty()) {
            return Err(bad());
        }
        TargetUrl::Http(trimmed.to_owned())
    } else if let Some(bucket) = base.strip_prefix("s3://") {
        let bucket = bucket.trim_end_matches('/');
        TargetUrl::S3(S3Location::new(url, bucket, &params).map_err(|source| {
            TargetError::S3Url {
                url: redact(url),
                source,
            }
        })?)
    } else {
        return Err(bad());
    };
    Ok(ParsedUrl {
        location,
        compression,
    })
}

/// What targets need besides their URL.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    pub connect_timeout: Duration,
    /// Compression of targets whose URL does not say.
    pub compression: Compression,
    pub access_key_id_file: Option<PathBuf>,
    pub secret_access_key_file: Option<PathBuf>,
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            connect_timeout: Duration::from_secs(5),
            compression: Compression::Zstd,
            access_key_id_file: None,
            secret_access_key_file: None,
        }
    }
}

pub struct Target {
    pub url: String,
    pub compression: Compression,
    kind: Kind,
}

enum Kind {
    File(PathBuf),
    Remote(Remote),
}

/// An HTTP or S3 target: everything the one request path ([`Target::send`]) needs.
struct Remote {
    client: reqwest::Client,
    api: Api,
}

/// How a remote target names and authenticates its requests.
enum Api {
    /// Plain `PUT`/`HEAD`/`GET` under a base URL.
    Http { base: String },
    /// The S3 API, every request signed with SigV4.
    S3 { loc: S3Location, creds: Credentials },
}

/// What a request addresses: an object under its key, or the bucket itself (S3; for HTTP
/// that would be the base URL).
#[derive(Clone, Copy)]
enum Resource<'a> {
    Key(&'a str),
    Bucket,
}

impl Resource<'_> {
    /// The key as errors show it (empty for the bucket).
    fn key(&self) -> &str {
        match self {
            Resource::Key(k) => k,
            Resource::Bucket => "",
        }
    }
}

/// A request body: bytes in memory or a file streamed from disk.
enum Body<'a> {
    Empty,
    Bytes(Vec<u8>),
    File(&'a Path),
}

impl Target {
    pub fn new(url: &str, opts: &TargetOptions) -> Result<Target, TargetError> {
        let parsed = parse_url(url)?;
        let client = || {
            // reqwest is built without a default TLS provider so that ring, not aws-lc, is
            // used; installing it twice is harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
            // Connect time-out: a blackholed cache costs a worker seconds, not minutes.
            // Read time-out rather than a total one: a large NAR may take long to send.
            reqwest::Client::builder()
                .connect_timeout(opts.connect_timeout)
                .read_timeout(Duration::from_secs(120))
                .user_agent(concat!("ferry-post-build/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| TargetError::Network {
                    target: redact(url),
                    method: "client",
                    key: String::new(),
                    message: e.to_string(),
                })
        };
        let kind = match parsed.location {
            TargetUrl::File(dir) => Kind::File(dir),
            TargetUrl::Http(base) => Kind::Remote(Remote {
                client: client()?,
                api: Api::Http { base },
            }),
            TargetUrl::S3(loc) => {
                let env = |k: &str| std::env::var(k).ok();
                let creds = crate::s3::resolve_credentials(
                    &crate::s3::CredentialSources {
                        access_key_id_file: opts.access_key_id_file.as_deref(),
                        secret_access_key_file: opts.secret_access_key_file.as_deref(),
                        env: &env,
                    },
                    loc.profile.as_deref(),
                )
                .map_err(|source| TargetError::Credentials {
                    target: redact(url),
                    source,
                })?;
                Kind::Remote(Remote {
                    client: client()?,
                    api: Api::S3 { loc, creds },
                })
            }
        };
        Ok(Target {
            url: url.to_owned(),
            compression: parsed.compression.unwrap_or(opts.compression),
            kind,
        })
    }

    /// The URL as logs, errors and status output show it: without `user:password@`
    /// (issue 12 item 7; the queue keeps the URL as configured, in its 0600 database).
    pub fn shown(&self) -> String {
        redact(&self.url)
    }

    /// The S3 access key id in use (never the secret), for `check-config`.
    pub fn s3_access_key_id(&self) -> Option<&str> {
        match &self.kind {
            Kind::Remote(Remote {
                api: Api::S3 { creds, .. },
                ..
            }) => Some(&creds.access_key_id),
            _ => None,
        }
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> TargetError + '_ {
        let path = path.to_owned();
        move |source| TargetError::Io {
            target: self.shown(),
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
            Kind::Remote(remote) => self.get_text(remote, CACHE_INFO).await?,
        };
        match existing {
            None => {
                self.put_bytes(CACHE_INFO, text.into_bytes(), CACHE_INFO_TYPE)
                    .await
            }
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
                        target: self.shown(),
                        found,
                        want: store_dir.as_str().to_owned(),
                    })
                }
            }
        }
    }

    /// Sends one request to an HTTP or S3 target (signed for S3). `sha256` is the body's
    /// hex SHA-256 when known (S3 signs it; computed here otherwise).
    async fn send(
        &self,
        remote: &Remote,
        method: &'static str,
        resource: Resource<'_>,
        body: Body<'_>,
        content_type: Option<&str>,
        sha256: Option<String>,
    ) -> Result<reqwest::Response, TargetError> {
        let key = resource.key();
        let (url, extra) = match &remote.api {
            Api::Http { base } => (format!("{base}/{key}"), Vec::new()),
            Api::S3 { loc, creds } => {
                let path = match resource {
                    Resource::Key(k) => loc.object_path(k),
                    Resource::Bucket => loc.bucket_path(),
                };
                let sha = match (&body, sha256) {
                    (_, Some(s)) => s,
                    (Body::Empty, None) => crate::s3::sha256_hex(b""),
                    (Body::Bytes(b), None) => crate::s3::sha256_hex(b),
                    (Body::File(p), None) => {
                        let p = p.to_path_buf();
                        let h = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
                            let mut s = ferry_nix::hash::Sha256Sink::new();
                            std::io::copy(&mut std::fs::File::open(&p)?, &mut s)?;
                            Ok(s.finish().to_base16())
                        })
                        .await
                        .map_err(|e| self.io(Path::new(key))(std::io::Error::other(e)))?;
                        h.map_err(self.io(Path::new(key)))?
                    }
                };
                let headers = crate::s3::s3_headers(
                    loc,
                    creds,
                    method,
                    &path,
                    content_type,
                    &sha,
                    std::time::SystemTime::now(),
                );
                (format!("{}{path}", loc.base), headers)
            }
        };
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut rb = remote.client.request(m, url);
        for (k, v) in extra {
            rb = rb.header(k, v);
        }
        if let Some(ct) = content_type {
            rb = rb.header(reqwest::header::CONTENT_TYPE, ct);
        }
        rb = match body {
            Body::Empty => rb,
            Body::Bytes(b) => rb.header(reqwest::header::CONTENT_LENGTH, b.len()).body(b),
            Body::File(p) => {
                let f = tokio::fs::File::open(p).await.map_err(self.io(p))?;
                let len = f.metadata().await.map_err(self.io(p))?.len();
                let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024);
                rb.header(reqwest::header::CONTENT_LENGTH, len)
                    .body(reqwest::Body::wrap_stream(stream))
            }
        };
        rb.send().await.map_err(|e| self.net(method, key, e))
    }

    pub async fn exists(&self, key: &str) -> Result<bool, TargetError> {
        let remote = match &self.kind {
            Kind::File(dir) => {
                return match tokio::fs::symlink_metadata(dir.join(key)).await {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(self.io(&dir.join(key))(e)),
                };
            }
            Kind::Remote(remote) => remote,
        };
        let r = self
            .send(remote, "HEAD", Resource::Key(key), Body::Empty, None, None)
            .await?;
        match r.status().as_u16() {
            200..=299 => Ok(true),
            // S3 answers 403 for a missing key without ListBucket permission.
            404 | 403 => Ok(false),
            _ => Err(self.status("HEAD", key, r).await),
        }
    }

    async fn get_text(&self, remote: &Remote, key: &str) -> Result<Option<String>, TargetError> {
        let r = self
            .send(remote, "GET", Resource::Key(key), Body::Empty, None, None)
            .await?;
        match r.status().as_u16() {
            200..=299 => Ok(Some(r.text().await.map_err(|e| self.net("GET", key, e))?)),
            // Without ListBucket permission S3 says 403 for a missing key; a real refusal
            // (bad signature) shows up on the PUT that follows, with S3's error code.
            404 | 403 => Ok(None),
            _ => Err(self.status("GET", key, r).await),
        }
    }

    fn net(&self, method: &'static str, key: &str, e: reqwest::Error) -> TargetError {
        // The error chain says why (connect time-out, refused, reset); keep all of it.
        let message = ferry_nix::error_chain(&e);
        TargetError::Network {
            target: self.shown(),
            method,
            key: key.to_owned(),
            message,
        }
    }

    async fn status(&self, method: &'static str, key: &str, r: reqwest::Response) -> TargetError {
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::retry::parse_retry_after);
        // S3 explains itself in an XML body; read a little of it for the error code.
        let is_s3 = matches!(
            self.kind,
            Kind::Remote(Remote {
                api: Api::S3 { .. },
                ..
            })
        );
        let code = if is_s3 && method != "HEAD" {
            match tokio::time::timeout(Duration::from_secs(5), r.text()).await {
                Ok(Ok(body)) => crate::s3::error_code(&body),
                _ => None,
            }
        } else {
            None
        };
        TargetError::Status {
            target: self.shown(),
            method,
            key: key.to_owned(),
            status,
            code,
            retry_after,
        }
    }

    pub async fn put_bytes(
        &self,
        key: &str,
        data: Vec<u8>,
        content_type: &str,
    ) -> Result<(), TargetError> {
        let remote = match &self.kind {
            Kind::File(dir) => {
                let dir = dir.clone();
                let key2 = key.to_owned();
                let dest = dir.join(key);
                return tokio::task::spawn_blocking(move || {
                    file_put(&dir, &key2, |f| std::io::Write::write_all(f, &data))
                })
                .await
                .map_err(|e| self.io(&dest)(std::io::Error::other(e)))?
                .map_err(self.io(&dest));
            }
            Kind::Remote(remote) => remote,
        };
        self.put(remote, key, Body::Bytes(data), content_type, None)
            .await
    }

    /// Uploads the local file `src` as `key`, streaming it. `sha256` is the file's SHA-256
    /// if the caller knows it (S3 signs the payload hash; it is computed otherwise).
    pub async fn put_file(
        &self,
        key: &str,
        src: &Path,
        content_type: &str,
        sha256: Option<&Hash>,
    ) -> Result<(), TargetError> {
        let remote = match &self.kind {
            Kind::File(dir) => {
                let dir = dir.clone();
                let key2 = key.to_owned();
                let src2 = src.to_owned();
                let dest = dir.join(key);
                return tokio::task::spawn_blocking(move || {
                    file_put(&dir, &key2, |f| {
                        let mut from = std::fs::File::open(&src2)?;
                        std::io::copy(&mut from, f).map(|_| ())
                    })
                })
                .await
                .map_err(|e| self.io(&dest)(std::io::Error::other(e)))?
                .map_err(self.io(&dest));
            }
            Kind::Remote(remote) => remote,
        };
        let sha = sha256.map(Hash::to_base16);
        self.put(remote, key, Body::File(src), content_type, sha)
            .await
    }

    /// `PUT`s one object to a remote target; any status but 2xx is an error.
    async fn put(
        &self,
        remote: &Remote,
        key: &str,
        body: Body<'_>,
        content_type: &str,
        sha256: Option<String>,
    ) -> Result<(), TargetError> {
        let r = self
            .send(
                remote,
                "PUT",
                Resource::Key(key),
                body,
                Some(content_type),
                sha256,
            )
            .await?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(self.status("PUT", key, r).await)
        }
    }

    /// Creates the bucket of an S3 target (`PUT /bucket`); for tests and first set-up.
    /// "Already yours" counts as success.
    pub async fn create_bucket(&self) -> Result<(), TargetError> {
        let Kind::Remote(
            remote @ Remote {
                api: Api::S3 { loc, .. },
                ..
            },
        ) = &self.kind
        else {
            return Ok(());
        };
        // Outside us-east-1 S3 wants the region in a CreateBucketConfiguration body.
        let body = if loc.region == "us-east-1" {
            Vec::new()
        } else {
            format!(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                 <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                loc.region
            )
            .into_bytes()
        };
        let r = self
            .send(
                remote,
                "PUT",
                Resource::Bucket,
                Body::Bytes(body),
                None,
                None,
            )
            .await?;
        if r.status().is_success() {
            return Ok(());
        }
        let e = self.status("PUT", "", r).await;
        match &e {
            TargetError::Status { code: Some(c), .. } if c == "BucketAlreadyOwnedByYou" => Ok(()),
            _ => Err(e),
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
    let tmp = tmp_dir.join(format!(
        "{}.{:016x}",
        std::process::id(),
        u64::from_le_bytes(r)
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
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
    if let Ok(ParsedUrl {
        location: TargetUrl::File(dir),
        ..
    }) = parse_url(url)
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
        let sp =
            StorePath::from_base_name("7hmcr4m0qxnr5yb9mr37k2bw4ylp7wjc-hello-2.12").expect("sp");
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
        let loc = |u: &str| parse_url(u).expect(u).location;
        assert_eq!(loc("file:///var/c/"), TargetUrl::File("/var/c".into()));
        assert_eq!(
            loc("http://10.0.0.1:8080/up/"),
            TargetUrl::Http("http://10.0.0.1:8080/up".into())
        );
        let p = parse_url("file:///c?compression=none").expect("param");
        assert_eq!(
            (p.location, p.compression),
            (TargetUrl::File("/c".into()), Some(Compression::None))
        );
        assert_eq!(parse_url("http://h/x").expect("h").compression, None);
        let p = parse_url(
            "s3://my-cache?endpoint=http%3A%2F%2F10.0.0.2%3A5000&region=eu-west-1&compression=zstd",
        )
        .expect("s3");
        let TargetUrl::S3(s3) = p.location else {
            panic!("not s3")
        };
        assert_eq!(
            (s3.bucket.as_str(), s3.region.as_str()),
            ("my-cache", "eu-west-1")
        );
        assert_eq!(
            (s3.base.as_str(), s3.path_style),
            ("http://10.0.0.2:5000", true)
        );
        for bad in [
            "file://rel",
            "file:///",
            // Found by fuzzing: the empty path, i.e. the uploader's working directory.
            "file:////",
            "file://///",
            "s4://x",
            "http://",
            "",
            "file:///c?compression=lz5",
            "file:///c?endpoint=x",
            "http://h?region=x",
            "s3://b?endpiont=http://h",
            "s3://?region=x",
            "s3://B?region=x",
            "s3://bucket?scheme=ftp",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let e = parse_url("s3://bucket?endpiont=x")
            .expect_err("typo")
            .to_string();
        assert!(
            e.contains("endpiont") && e.contains("endpoint, region"),
            "{e}"
        );
    }

    /// Options whose S3 credentials are files in `dir`: key id `AKIATEST`, secret
    /// `very-secret-value`.
    fn s3_options(dir: &Path) -> TargetOptions {
        let (id, secret) = (dir.join("id"), dir.join("secret"));
        std::fs::write(&id, "AKIATEST\n").expect("w");
        std::fs::write(&secret, "very-secret-value\n").expect("w");
        TargetOptions {
            access_key_id_file: Some(id),
            secret_access_key_file: Some(secret),
            ..Default::default()
        }
    }

    #[test]
    fn s3_targets_need_credentials_and_never_show_the_secret() {
        let d = tempfile::tempdir().expect("dir");
        let opts = s3_options(d.path());
        let t = Target::new(
            "s3://bucket?endpoint=http://127.0.0.1:1&compression=none",
            &opts,
        )
        .expect("s3");
        assert_eq!(t.s3_access_key_id(), Some("AKIATEST"));
        assert_eq!(t.compression, Compression::None);
        let opts = TargetOptions {
            access_key_id_file: Some(d.path().join("id")),
            secret_access_key_file: Some(d.path().join("missing")),
            ..Default::default()
        };
        let e = Target::new("s3://bucket", &opts)
            .err()
            .expect("missing file")
            .to_string();
        assert!(e.contains("missing") && !e.contains("AKIATEST"), "{e}");
    }

    #[tokio::test]
    async fn file_target_writes_atomically() {
        let d = tempfile::tempdir().expect("dir");
        let url = format!("file://{}", d.path().display());
        let t = Target::new(&url, &TargetOptions::default()).expect("target");
        let sd = StoreDir::new("/nix/store").expect("sd");
        t.init(&sd).await.expect("init");
        assert_eq!(
            std::fs::read_to_string(d.path().join(CACHE_INFO)).expect("ci"),
            "StoreDir: /nix/store\n"
        );
        t.init(&sd).await.expect("init again");
        let other = StoreDir::new("/other").expect("sd");
        assert!(matches!(
            t.init(&other).await,
            Err(TargetError::StoreDirMismatch { .. })
        ));
        assert!(!t.exists("nar/x.nar").await.expect("exists"));
        t.put_bytes("nar/x.nar", b"abc".to_vec(), NAR_TYPE)
            .await
            .expect("put");
        assert!(t.exists("nar/x.nar").await.expect("exists"));
        assert_eq!(
            std::fs::read(d.path().join("nar/x.nar")).expect("read"),
            b"abc"
        );
        assert_eq!(
            std::fs::read_dir(d.path().join(FILE_TMP_DIR))
                .expect("tmp")
                .count(),
            0
        );
    }

    /// `create_bucket` goes through the one signed request path: `PUT /<bucket>` with the
    /// region's CreateBucketConfiguration, its payload hash and a SigV4 `Authorization`.
    #[tokio::test]
    async fn create_bucket_sends_a_signed_put_of_the_bucket() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // Head and body: the body ends with the configuration's closing tag.
            while !req.ends_with(b"</CreateBucketConfiguration>") {
                let n = conn.read(&mut buf).await.expect("read");
                assert!(n > 0, "eof: {}", String::from_utf8_lossy(&req));
                req.extend_from_slice(&buf[..n]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .expect("write");
            String::from_utf8(req).expect("utf-8")
        });
        let d = tempfile::tempdir().expect("dir");
        let opts = s3_options(d.path());
        let t = Target::new(
            &format!("s3://my-cache?endpoint=http://127.0.0.1:{port}&region=eu-west-1"),
            &opts,
        )
        .expect("s3");
        t.create_bucket().await.expect("create");
        let req = server.await.expect("server");
        let lower = req.to_ascii_lowercase();
        let body = &req[req.find("\r\n\r\n").expect("head") + 4..];
        assert!(req.starts_with("PUT /my-cache HTTP/1.1\r\n"), "{req}");
        assert!(
            body.contains("<LocationConstraint>eu-west-1</LocationConstraint>"),
            "{req}"
        );
        let sha = crate::s3::sha256_hex(body.as_bytes());
        assert!(
            lower.contains(&format!("x-amz-content-sha256: {sha}\r\n")),
            "{req}"
        );
        assert!(
            lower.contains("authorization: aws4-hmac-sha256 credential=akiatest/"),
            "{req}"
        );
        assert!(!req.contains("very-secret-value"), "{req}");
    }

    /// Issue 12 item 7: errors name a target without its credentials.
    #[test]
    fn errors_and_display_hide_credentials() {
        let Err(e) = parse_url("gopher://u:hunter2@h/x") else {
            panic!("a bad scheme parsed")
        };
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let t = Target::new(
            "https://u:hunter2@cache.example/up",
            &TargetOptions::default(),
        )
        .expect("target");
        assert_eq!(t.shown(), "https://***@cache.example/up");
    }
}
