//! How an upstream is reached: its [`Source`] (a directory, or an HTTP base or S3 bucket with
//! a client for first attempts and a patient one for retries), the signed or authenticated
//! requests built for it, and the reads of small objects and NARs over HTTP or from files,
//! with their answers classified into [`Fetch`] and [`OpenNar`]. The parent module keeps the
//! upstream's health (breaker, rate limit, latency) that these requests feed.

use super::raw::{self, RawOpen, RawTarget};
use super::{
    AccessCheck, Fetch, FetchError, NarBody, NarStream, OpenNar, PATIENT_CONNECT_MAX, Upstream,
};
use crate::config::{UpstreamLocation, UpstreamSettings};
use crate::paths::{file_path, http_url};
use bytes::Bytes;
use futures_util::StreamExt as _;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

/// Where requests go: a directory, or an HTTP base or S3 bucket with its clients.
pub(super) enum Source {
    File(PathBuf),
    Remote(Remote),
}

/// The address part of a remote source.
enum RemoteKind {
    Http {
        /// Base URL without a trailing '/', as configured.
        base: String,
        /// The base, parsed once: every request URL is checked against it (`None` if it does
        /// not parse; every request is then refused as outside the base).
        base_url: Option<reqwest::Url>,
        credentials: Option<crate::credentials::Credentials>,
    },
    S3 {
        location: crate::s3::S3Location,
        credentials: crate::s3::Credentials,
    },
}

pub(super) struct Remote {
    kind: RemoteKind,
    client: reqwest::Client,
    /// The client for retries after a transient failure: a connect time-out long enough for
    /// one SYN retransmission (Linux resends after 1 s), so a busy upstream whose listen
    /// backlog dropped the first SYN is reached on the second (issue 12, "never a false miss").
    patient_client: reqwest::Client,
    /// Plain-HTTP NAR requests on sockets of Ferry's own, for splicing ([`raw`]).
    raw: Option<Box<RawTarget>>,
}

impl Remote {
    /// The client of a first attempt, or of a retry after a transient failure (`patient`).
    fn client(&self, patient: bool) -> &reqwest::Client {
        if patient {
            &self.patient_client
        } else {
            &self.client
        }
    }
}

fn is_missing(status: u16) -> bool {
    matches!(status, 403 | 404 | 410)
}

/// Whether a 403 of an S3 upstream refuses the credentials rather than saying "missing":
/// reads the (small, XML) error body within `wait`. `None` for HTTP upstreams and for other
/// statuses, which need no body.
async fn s3_refusal(remote: &Remote, resp: reqwest::Response, wait: Duration) -> Option<String> {
    if !matches!(remote.kind, RemoteKind::S3 { .. }) || resp.status().as_u16() != 403 {
        return None;
    }
    crate::s3::refusal(&error_document(resp, wait).await)
}

/// Most bytes of an S3 error document read (its code is near the start): a server sending
/// more cannot grow memory.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The start of an error answer's body: what arrives within `wait`, at most
/// [`MAX_ERROR_BODY`] bytes.
async fn error_document(mut resp: reqwest::Response, wait: Duration) -> String {
    let mut body = Vec::new();
    let read = async {
        while let Ok(Some(c)) = resp.chunk().await {
            let room = MAX_ERROR_BODY - body.len();
            body.extend_from_slice(&c[..c.len().min(room)]);
            if body.len() == MAX_ERROR_BODY {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(wait, read).await;
    String::from_utf8_lossy(&body).into_owned()
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    // A zero delay (or a date already past) says nothing about the upstream's health.
    crate::retry_after::parse(v, std::time::SystemTime::now()).filter(|d| !d.is_zero())
}

fn classify_reqwest(e: &reqwest::Error) -> FetchError {
    if e.is_timeout() {
        FetchError::Timeout
    } else if e.is_connect() {
        FetchError::Connect(ferry_nix::error_chain(e))
    } else {
        FetchError::Transfer(ferry_nix::error_chain(e))
    }
}

impl Source {
    /// The directory, or the HTTP base or S3 bucket with its two clients, of `settings`.
    pub(super) fn new(settings: &UpstreamSettings) -> Result<Source, reqwest::Error> {
        let build = |connect: Duration| {
            reqwest::Client::builder()
                .connect_timeout(connect)
                .tcp_nodelay(true)
                // Nix reuses connections for 90 s; an upstream may close earlier.
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("ferry-substituter/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        let remote = |kind| -> Result<Source, reqwest::Error> {
            let raw = match &kind {
                RemoteKind::Http {
                    base_url: Some(b),
                    credentials,
                    ..
                } => RawTarget::new(b, credentials.is_some()).map(Box::new),
                _ => None,
            };
            Ok(Source::Remote(Remote {
                kind,
                client: build(settings.connect_timeout)?,
                patient_client: build(PATIENT_CONNECT_MAX.max(settings.connect_timeout))?,
                raw,
            }))
        };
        Ok(match &settings.location {
            UpstreamLocation::Http { base, credentials } => remote(RemoteKind::Http {
                base: base.clone(),
                base_url: reqwest::Url::parse(base).ok(),
                credentials: credentials.clone(),
            })?,
            UpstreamLocation::S3 {
                location,
                credentials,
            } => remote(RemoteKind::S3 {
                location: location.clone(),
                credentials: credentials.clone(),
            })?,
            UpstreamLocation::File(dir) => Source::File(dir.clone()),
        })
    }
}

impl Upstream {
    /// A request for `key`, with the upstream's credentials (basic, or an S3 signature made
    /// now), or an error when the key would not stay under the base or in the bucket
    /// ([`crate::paths::http_url`], [`crate::s3::object_path`]).
    fn request(
        remote: &Remote,
        patient: bool,
        method: reqwest::Method,
        key: &str,
    ) -> Result<reqwest::RequestBuilder, FetchError> {
        let outside = || FetchError::OutsideBase(key.to_owned());
        match &remote.kind {
            RemoteKind::Http {
                base,
                base_url,
                credentials,
            } => {
                let url = base_url
                    .as_ref()
                    .and_then(|b| http_url(b, base, key))
                    .ok_or_else(outside)?;
                let req = remote.client(patient).request(method, url);
                Ok(match credentials {
                    Some(c) => req.basic_auth(&c.user, Some(&c.password)),
                    None => req,
                })
            }
            RemoteKind::S3 {
                location,
                credentials,
            } => {
                let path = crate::s3::object_path(location, key).ok_or_else(outside)?;
                let url = reqwest::Url::parse(&format!("{}{path}", location.base))
                    .map_err(|_| outside())?;
                let headers = crate::s3::request_headers(
                    location,
                    credentials,
                    method.as_str(),
                    &path,
                    std::time::SystemTime::now(),
                );
                let mut req = remote.client(patient).request(method, url);
                for (name, value) in headers {
                    req = req.header(name, value);
                }
                Ok(req)
            }
        }
    }

    /// The base URL for narinfo URL rewriting (None for directories and buckets, whose
    /// narinfos Nix wrote with relative URLs).
    pub(crate) fn http_base(&self) -> Option<&str> {
        match &self.source {
            Source::Remote(Remote {
                kind: RemoteKind::Http { base, .. },
                ..
            }) => Some(base),
            Source::Remote(_) | Source::File(_) => None,
        }
    }

    /// `check-config`'s look at `nix-cache-info` through this upstream's credentials: what a
    /// running Ferry would treat as a miss (any 403 of a bucket) is told apart here, so that
    /// wrong keys show up before Nix meets them as silent misses.
    pub async fn check_access(&self) -> AccessCheck {
        let Source::Remote(remote) = &self.source else {
            return match self.fetch_small("nix-cache-info", 64 * 1024).await {
                Fetch::Found(_) => AccessCheck::Ok,
                Fetch::Missing => AccessCheck::Missing(404),
                Fetch::Failed { error, .. } => AccessCheck::Failed(error),
            };
        };
        let req = match Self::request(remote, false, reqwest::Method::GET, "nix-cache-info") {
            Ok(r) => r,
            Err(e) => return AccessCheck::Failed(e),
        };
        let wait = self.settings.connect_timeout + self.settings.read_timeout;
        let resp = match tokio::time::timeout(wait, req.send()).await {
            Err(_) => return AccessCheck::Failed(FetchError::Timeout),
            Ok(Err(e)) => return AccessCheck::Failed(classify_reqwest(&e)),
            Ok(Ok(r)) => r,
        };
        match resp.status().as_u16() {
            200 => AccessCheck::Ok,
            status @ (401 | 403) => {
                let code = ferry_s3::error_code(&error_document(resp, wait).await);
                AccessCheck::Refused { status, code }
            }
            status if is_missing(status) => AccessCheck::Missing(status),
            status => AccessCheck::Failed(FetchError::Status(status)),
        }
    }

    /// Fetches a small object whole, within the read time-out. Does not touch the breaker:
    /// the caller decides after validating the body.
    pub(crate) async fn fetch_small(&self, key: &str, max_len: usize) -> Fetch {
        self.fetch_small_attempt(key, max_len, false).await
    }

    /// [`Upstream::fetch_small`]; `patient` for a retry after a transient failure: the patient
    /// client and an adaptive connect time-out ([`Upstream::patient_connect_timeout`]).
    pub(crate) async fn fetch_small_attempt(
        &self,
        key: &str,
        max_len: usize,
        patient: bool,
    ) -> Fetch {
        let started = Instant::now();
        let connect = if patient {
            self.patient_connect_timeout()
        } else {
            self.settings.connect_timeout
        };
        let r = match &self.source {
            Source::Remote(remote) => {
                match Self::request(remote, patient, reqwest::Method::GET, key) {
                    Ok(req) => self.fetch_http(remote, req, max_len, connect).await,
                    Err(error) => Fetch::Failed {
                        error,
                        retry_after: None,
                    },
                }
            }
            Source::File(dir) => {
                let path = file_path(dir, key);
                match tokio::time::timeout(self.settings.read_timeout, read_capped(&path, max_len))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Fetch::Failed {
                        error: FetchError::Timeout,
                        retry_after: None,
                    },
                }
            }
        };
        self.metrics.latency.observe(started.elapsed());
        if matches!(r, Fetch::Found(_) | Fetch::Missing) {
            self.observe_success_latency(started.elapsed());
        }
        r
    }

    async fn fetch_http(
        &self,
        remote: &Remote,
        req: reqwest::RequestBuilder,
        max_len: usize,
        connect: Duration,
    ) -> Fetch {
        let failed = |error| Fetch::Failed {
            error,
            retry_after: None,
        };
        let fut = async {
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => return failed(classify_reqwest(&e)),
            };
            let status = resp.status().as_u16();
            if is_missing(status) {
                return match s3_refusal(remote, resp, self.settings.read_timeout).await {
                    Some(code) => failed(FetchError::S3Refused(code)),
                    None => Fetch::Missing,
                };
            }
            if status != 200 {
                return Fetch::Failed {
                    error: FetchError::Status(status),
                    retry_after: retry_after(resp.headers()),
                };
            }
            if resp.content_length().is_some_and(|l| l > max_len as u64) {
                return failed(FetchError::TooLarge(max_len));
            }
            let mut body = Vec::new();
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => {
                        if body.len() + c.len() > max_len {
                            return failed(FetchError::TooLarge(max_len));
                        }
                        body.extend_from_slice(&c);
                    }
                    Err(e) => return failed(classify_reqwest(&e)),
                }
            }
            Fetch::Found(Bytes::from(body))
        };
        // A whole-response time-out is right for small objects (a drip of a narinfo is a
        // failure); NAR bodies use per-read idle time-outs instead.
        match tokio::time::timeout(self.settings.read_timeout + connect, fut).await {
            Ok(r) => r,
            Err(_) => failed(FetchError::Timeout),
        }
    }

    /// Size of a NAR, for HEAD requests.
    pub(crate) async fn head_nar(&self, key: &str, patient: bool) -> OpenNar {
        let wait = self.nar_wait(patient);
        match &self.source {
            // A HEAD answer has no body to tell a refusal from a missing key: a 403 is a miss,
            // as in Nix. Nix asks for NARs with GET; a refusal shows there and on narinfos.
            Source::Remote(remote) => {
                let req = match Self::request(remote, patient, reqwest::Method::HEAD, key) {
                    Ok(r) => r.send(),
                    Err(e) => return OpenNar::Failed(e),
                };
                match tokio::time::timeout(wait, req).await {
                    Err(_) => OpenNar::Failed(FetchError::Timeout),
                    Ok(Err(e)) => OpenNar::Failed(classify_reqwest(&e)),
                    Ok(Ok(r)) if is_missing(r.status().as_u16()) => OpenNar::Missing,
                    Ok(Ok(r)) if r.status().as_u16() != 200 => {
                        OpenNar::Failed(FetchError::Status(r.status().as_u16()))
                    }
                    // reqwest reports 0 for HEAD; read the header itself.
                    Ok(Ok(r)) => OpenNar::Opened(NarBody {
                        total: content_length_header(r.headers()),
                        skip: 0,
                        stream: NarStream::Chunks(futures_util::stream::empty().boxed()),
                    }),
                }
            }
            Source::File(dir) => match tokio::fs::metadata(file_path(dir, key)).await {
                Ok(m) if m.is_file() => OpenNar::Opened(NarBody {
                    total: Some(m.len()),
                    skip: 0,
                    stream: NarStream::Chunks(futures_util::stream::empty().boxed()),
                }),
                Ok(_) => OpenNar::Missing,
                Err(e) if e.kind() == io::ErrorKind::NotFound => OpenNar::Missing,
                Err(e) => OpenNar::Failed(e.into()),
            },
        }
    }

    /// Opens a NAR at `offset` (to the end of the file).
    pub(crate) async fn open_nar(&self, key: &str, offset: u64) -> OpenNar {
        self.open_nar_attempt(key, offset, false).await
    }

    /// The time allowed a NAR request up to its response headers: a retry (on the patient
    /// client) adds a latency-adaptive connect time-out
    /// ([`Upstream::patient_connect_timeout`]).
    fn nar_wait(&self, patient: bool) -> Duration {
        if patient {
            self.settings.read_timeout + self.patient_connect_timeout()
        } else {
            self.settings.read_timeout
        }
    }

    /// [`Upstream::open_nar`]; `patient` for a retry after a transient failure.
    pub(crate) async fn open_nar_attempt(&self, key: &str, offset: u64, patient: bool) -> OpenNar {
        let wait = self.nar_wait(patient);
        match &self.source {
            Source::Remote(remote) => {
                if let Some(opened) = self.open_raw(remote, key, offset, patient).await {
                    return opened;
                }
                let mut req = match Self::request(remote, patient, reqwest::Method::GET, key) {
                    Ok(r) => r,
                    Err(e) => return OpenNar::Failed(e),
                };
                if offset > 0 {
                    req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
                }
                // Up to the response headers only: the body has per-read idle time-outs.
                let resp = match tokio::time::timeout(wait, req.send()).await {
                    Err(_) => return OpenNar::Failed(FetchError::Timeout),
                    Ok(Err(e)) => return OpenNar::Failed(classify_reqwest(&e)),
                    Ok(Ok(r)) => r,
                };
                let status = resp.status().as_u16();
                if is_missing(status) {
                    return match s3_refusal(remote, resp, self.settings.read_timeout).await {
                        Some(code) => OpenNar::Failed(FetchError::S3Refused(code)),
                        None => OpenNar::Missing,
                    };
                }
                let content_range = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok());
                let (total, skip) = match opened_at(
                    status,
                    content_length_header(resp.headers()),
                    content_range,
                    offset,
                ) {
                    Ok(v) => v,
                    Err(e) => return OpenNar::Failed(e),
                };
                let stream = resp
                    .bytes_stream()
                    .map(|r| r.map_err(|e| io::Error::other(ferry_nix::error_chain(&e))))
                    .boxed();
                OpenNar::Opened(NarBody {
                    total,
                    skip,
                    stream: NarStream::Chunks(stream),
                })
            }
            Source::File(dir) => open_file(&file_path(dir, key), offset).await,
        }
    }
}

impl Upstream {
    /// A NAR over a socket of Ferry's own, for a plain-HTTP upstream; `None` when this
    /// upstream or this response is not one for it (then reqwest asks).
    async fn open_raw(
        &self,
        remote: &Remote,
        key: &str,
        offset: u64,
        patient: bool,
    ) -> Option<OpenNar> {
        let (
            Some(target),
            RemoteKind::Http {
                base,
                base_url: Some(base_url),
                ..
            },
        ) = (&remote.raw, &remote.kind)
        else {
            return None;
        };
        let Some(url) = http_url(base_url, base, key) else {
            return Some(OpenNar::Failed(FetchError::OutsideBase(key.to_owned())));
        };
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let connect = if patient {
            self.patient_connect_timeout()
        } else {
            self.settings.connect_timeout
        };
        let (status, content_length, content_range, body) =
            match raw::open(target, &path, offset, connect, self.settings.read_timeout).await {
                RawOpen::NotRaw => return None,
                RawOpen::Missing => return Some(OpenNar::Missing),
                RawOpen::Failed(e) => return Some(OpenNar::Failed(e)),
                RawOpen::Opened {
                    status,
                    content_length,
                    content_range,
                    body,
                } => (status, content_length, content_range, body),
            };
        let (total, skip) = match opened_at(
            status,
            Some(content_length),
            content_range.as_deref(),
            offset,
        ) {
            Ok(v) => v,
            Err(e) => return Some(OpenNar::Failed(e)),
        };
        Some(OpenNar::Opened(NarBody {
            total,
            skip,
            stream: NarStream::Socket(body),
        }))
    }
}

/// The file's total length and the bytes to drop from the body, for a NAR asked from
/// `offset`: a 200 is the whole file (its first `offset` bytes dropped: the upstream ignored
/// `Range`), a 206 must start at `offset`; other statuses are failures.
fn opened_at(
    status: u16,
    content_length: Option<u64>,
    content_range: Option<&str>,
    offset: u64,
) -> Result<(Option<u64>, u64), FetchError> {
    match status {
        200 => Ok((content_length, offset)),
        206 => {
            let cr = content_range.unwrap_or("");
            match parse_content_range(cr) {
                Some((start, total)) if start == offset => Ok((total, 0)),
                _ => Err(FetchError::BadRange(cr.to_owned())),
            }
        }
        s => Err(FetchError::Status(s)),
    }
}

fn content_length_header(h: &reqwest::header::HeaderMap) -> Option<u64> {
    h.get(reqwest::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `bytes <start>-<end>/<total>` → (start, total); total `*` → None.
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((start.parse().ok()?, total))
}

async fn read_capped(path: &std::path::Path, max_len: usize) -> Fetch {
    match tokio::fs::metadata(path).await {
        Ok(m) if !m.is_file() => return Fetch::Missing,
        Ok(m) if m.len() > max_len as u64 => {
            return Fetch::Failed {
                error: FetchError::TooLarge(max_len),
                retry_after: None,
            };
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Fetch::Missing,
        Err(e) => {
            return Fetch::Failed {
                error: e.into(),
                retry_after: None,
            };
        }
    }
    match tokio::fs::read(path).await {
        Ok(b) => Fetch::Found(Bytes::from(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Fetch::Missing,
        Err(e) => Fetch::Failed {
            error: e.into(),
            retry_after: None,
        },
    }
}

const FILE_CHUNK: usize = 256 * 1024;

async fn open_file(path: &std::path::Path, offset: u64) -> OpenNar {
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return OpenNar::Missing,
        Err(e) => return OpenNar::Failed(e.into()),
    };
    let total = match f.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => return OpenNar::Missing,
        Err(e) => return OpenNar::Failed(e.into()),
    };
    if offset > total {
        return OpenNar::Failed(FetchError::BadRange(format!(
            "offset {offset} > size {total}"
        )));
    }
    if let Err(e) = f.seek(io::SeekFrom::Start(offset)).await {
        return OpenNar::Failed(e.into());
    }
    let stream = futures_util::stream::unfold(f, |mut f| async move {
        let mut buf = vec![0u8; FILE_CHUNK];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
    .boxed();
    OpenNar::Opened(NarBody {
        total: Some(total),
        skip: 0,
        stream: NarStream::Chunks(stream),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
