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
use ferry_nix::hash::Hash;
use ferry_nix::store_path::{StoreDir, StorePath};
use ferry_nix::url::redact;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

mod file;
mod url;

pub(crate) use file::clean_file_target;
use file::{file_put, file_put_from};
pub use url::{ParsedUrl, TargetUrl, parse_url};

pub(crate) const NARINFO_TYPE: &str = "text/x-nix-narinfo";
pub(crate) const NAR_TYPE: &str = "application/x-nix-nar";
pub(crate) const CACHE_INFO_TYPE: &str = "text/x-nix-cache-info";
pub(crate) const CACHE_INFO: &str = "nix-cache-info";
/// Where `file://` targets stage files; hidden, so no temporary name is ever visible among
/// the cache's files.
pub(crate) const FILE_TMP_DIR: &str = ".ferry-tmp";

pub(crate) fn narinfo_key(p: &StorePath) -> String {
    format!("{}.narinfo", p.hash_part())
}

pub(crate) fn nar_key(file_hash: &Hash, c: Compression) -> String {
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
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            TargetError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What targets need besides their URL.
#[derive(Debug, Clone)]
pub(crate) struct TargetOptions {
    pub(crate) connect_timeout: Duration,
    /// Compression of targets whose URL does not say.
    pub(crate) compression: Compression,
    pub(crate) access_key_id_file: Option<PathBuf>,
    pub(crate) secret_access_key_file: Option<PathBuf>,
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

pub(crate) struct Target {
    pub(crate) url: String,
    pub(crate) compression: Compression,
    kind: Kind,
}

enum Kind {
    File(PathBuf),
    Remote(Remote),
}

/// An HTTP or S3 target: everything the one request path ([`Target::send`]) needs.
pub(crate) struct Remote {
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
pub(crate) enum Resource<'a> {
    Key(&'a str),
    /// Only [`Target::create_bucket`] (tests) addresses the bucket.
    #[cfg(test)]
    Bucket,
}

impl Resource<'_> {
    /// The key as errors show it (empty for the bucket).
    fn key(&self) -> &str {
        match self {
            Resource::Key(k) => k,
            #[cfg(test)]
            Resource::Bucket => "",
        }
    }
}

/// A request body: bytes in memory, a file or part of one streamed from disk.
pub(crate) enum Body<'a> {
    Empty,
    Bytes(Vec<u8>),
    File(&'a Path),
    Range {
        path: &'a Path,
        offset: u64,
        len: u64,
    },
}

/// One request to a remote target, as [`Target::send`] takes it.
pub(crate) struct Request<'a> {
    pub(crate) method: &'static str,
    pub(crate) resource: Resource<'a>,
    /// Query parameters (S3's multipart operations).
    pub(crate) query: &'a [(&'a str, &'a str)],
    pub(crate) body: Body<'a>,
    pub(crate) content_type: Option<&'a str>,
    /// Base64 MD5 of the body, sent as `Content-MD5` (S3 only).
    pub(crate) content_md5: Option<String>,
    /// The body's hex SHA-256 when known (S3 signs it; computed here otherwise).
    pub(crate) sha256: Option<String>,
}

impl<'a> Request<'a> {
    pub(crate) fn new(method: &'static str, resource: Resource<'a>, body: Body<'a>) -> Self {
        Request {
            method,
            resource,
            query: &[],
            body,
            content_type: None,
            content_md5: None,
            sha256: None,
        }
    }
}

impl Target {
    pub(crate) fn new(url: &str, opts: &TargetOptions) -> Result<Target, TargetError> {
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
    pub(crate) fn shown(&self) -> String {
        redact(&self.url)
    }

    /// The S3 access key id in use (never the secret), for `check-config`.
    pub(crate) fn s3_access_key_id(&self) -> Option<&str> {
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
    pub(crate) async fn init(&self, store_dir: &StoreDir) -> Result<(), TargetError> {
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

    /// Sends one request to an HTTP or S3 target (signed for S3).
    pub(crate) async fn send(
        &self,
        remote: &Remote,
        req: Request<'_>,
    ) -> Result<reqwest::Response, TargetError> {
        let Request {
            method,
            resource,
            query,
            body,
            content_type,
            content_md5,
            sha256,
        } = req;
        let key = resource.key();
        let (url, extra) = match &remote.api {
            Api::Http { base } => (format!("{base}/{key}"), Vec::new()),
            Api::S3 { loc, creds } => {
                let path = match resource {
                    Resource::Key(k) => loc.object_path(k),
                    #[cfg(test)]
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
                    // Ranges are multipart parts, whose caller always hashes them first.
                    (Body::Range { .. }, None) => {
                        return Err(self.io(Path::new(key))(std::io::Error::other(
                            "a part was sent without its SHA-256",
                        )));
                    }
                };
                let s3req = crate::s3::S3Request {
                    method,
                    path: &path,
                    query,
                    content_type,
                    content_md5: content_md5.as_deref(),
                    payload_sha256: &sha,
                };
                let headers =
                    crate::s3::s3_headers(loc, creds, &s3req, std::time::SystemTime::now());
                (format!("{}{}", loc.base, s3req.path_and_query()), headers)
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
            Body::Range { path, offset, len } => {
                use tokio::io::{AsyncReadExt, AsyncSeekExt};
                let mut f = tokio::fs::File::open(path).await.map_err(self.io(path))?;
                f.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(self.io(path))?;
                let stream = tokio_util::io::ReaderStream::with_capacity(f.take(len), 256 * 1024);
                rb.header(reqwest::header::CONTENT_LENGTH, len)
                    .body(reqwest::Body::wrap_stream(stream))
            }
        };
        rb.send().await.map_err(|e| self.net(method, key, e))
    }

    pub(crate) fn is_s3(&self) -> bool {
        self.s3_remote().is_some()
    }

    /// The remote side of an S3 target (for multipart uploads), or `None`.
    pub(crate) fn s3_remote(&self) -> Option<&Remote> {
        match &self.kind {
            Kind::Remote(
                r @ Remote {
                    api: Api::S3 { .. },
                    ..
                },
            ) => Some(r),
            _ => None,
        }
    }

    pub(crate) async fn exists(&self, key: &str) -> Result<bool, TargetError> {
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
            .send(
                remote,
                Request::new("HEAD", Resource::Key(key), Body::Empty),
            )
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
            .send(remote, Request::new("GET", Resource::Key(key), Body::Empty))
            .await?;
        match r.status().as_u16() {
            200..=299 => Ok(Some(self.small_text("GET", key, r, MAX_SMALL_BODY).await?)),
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
            match tokio::time::timeout(Duration::from_secs(5), text_at_most(r, MAX_SMALL_BODY))
                .await
            {
                Ok(Ok((body, _))) => crate::s3::error_code(&body),
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

    /// The error for an unexpected status (S3's error code read from the body).
    pub(crate) async fn status_error(
        &self,
        method: &'static str,
        key: &str,
        r: reqwest::Response,
    ) -> TargetError {
        self.status(method, key, r).await
    }

    /// A small answer (`nix-cache-info`, S3's multipart XML), at most `max` bytes: a peer
    /// cannot make the uploader buffer more.
    pub(crate) async fn small_text(
        &self,
        method: &'static str,
        key: &str,
        r: reqwest::Response,
        max: usize,
    ) -> Result<String, TargetError> {
        let (text, whole) = text_at_most(r, max)
            .await
            .map_err(|e| self.net(method, key, e))?;
        if !whole {
            return Err(TargetError::Network {
                target: self.shown(),
                method,
                key: key.to_owned(),
                message: format!("answer larger than {max} bytes"),
            });
        }
        Ok(text)
    }

    pub(crate) async fn put_bytes(
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
    pub(crate) async fn put_file(
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
                return tokio::task::spawn_blocking(move || file_put_from(&dir, &key2, &src2))
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
                Request {
                    content_type: Some(content_type),
                    sha256,
                    ..Request::new("PUT", Resource::Key(key), body)
                },
            )
            .await?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(self.status("PUT", key, r).await)
        }
    }

    /// Creates the bucket of an S3 target (`PUT /bucket`); for tests (nothing else creates
    /// buckets). "Already yours" counts as success.
    #[cfg(test)]
    pub(crate) async fn create_bucket(&self) -> Result<(), TargetError> {
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
                Request::new("PUT", Resource::Bucket, Body::Bytes(body)),
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

/// Most bytes read of a small answer (`nix-cache-info`, an S3 error document): whatever a
/// server sends, memory stays bounded.
const MAX_SMALL_BODY: usize = 64 * 1024;

/// Most bytes of an answer to S3's multipart operations (a part list can be long).
pub(crate) const MAX_XML_ANSWER: usize = 1 << 20;

/// Reads at most `max` bytes of `r`'s body as (lossy) UTF-8, and whether that was all of it.
async fn text_at_most(
    mut r: reqwest::Response,
    max: usize,
) -> Result<(String, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        let room = max - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((String::from_utf8_lossy(&body).into_owned(), false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((String::from_utf8_lossy(&body).into_owned(), true))
}

#[cfg(test)]
mod tests;
