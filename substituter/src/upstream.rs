//! One upstream cache: its HTTP client or directory, breaker, rate limit, in-flight cap and
//! metrics. The I/O shell around [`crate::breaker`]; policies live in the pure modules.

use crate::breaker::{Admit, Breaker};
use crate::config::{UpstreamLocation, UpstreamSettings};
use crate::metrics::UpstreamMetrics;
use crate::paths::{file_path, http_url};
use crate::race::FailureKind;
use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use std::io;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why an upstream request failed. Every variant counts against the upstream's breaker; none
/// is ever a negative-cache entry.
#[derive(Debug, Error)]
pub enum FetchError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("{0}")]
    Transfer(String),
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("bad Content-Range {0:?} for the requested offset")]
    BadRange(String),
    /// The key would leave the upstream's base once resolved: never sent.
    #[error("key {0:?} does not stay under the upstream's base")]
    OutsideBase(String),
}

impl FetchError {
    /// Whether a fresh attempt may succeed (`race::retry_delay`): connect errors and time-outs
    /// (a dropped SYN, a full listen backlog), resets and early closes, and 5xx. A 429 asks
    /// for less traffic, other statuses and oversized bodies would repeat, and a local file's
    /// I/O error is not a network blip.
    pub fn kind(&self) -> FailureKind {
        match self {
            FetchError::Connect(_) | FetchError::Timeout | FetchError::Transfer(_) => {
                FailureKind::Transient
            }
            FetchError::Status(s) if (500..600).contains(s) => FailureKind::Transient,
            FetchError::Status(_)
            | FetchError::TooLarge(_)
            | FetchError::Io(_)
            | FetchError::BadRange(_)
            | FetchError::OutsideBase(_) => FailureKind::Permanent,
        }
    }
}

/// The answer to a small request (narinfo, listing, log).
#[derive(Debug)]
pub enum Fetch {
    Found(Bytes),
    /// A definite "not here": 404, 410 or 403 (S3 answers 403 for absent keys without list
    /// permission; Nix treats all three as a miss, `http-binary-cache-store.cc`).
    Missing,
    /// `retry_after` from a 429 or 503.
    Failed {
        error: FetchError,
        retry_after: Option<Duration>,
    },
}

/// A NAR body opened at some offset.
pub struct NarBody {
    /// Full length of the file, when the upstream said.
    pub total: Option<u64>,
    /// Bytes at the start of `stream` to drop: the upstream ignored `Range` and sent from 0.
    pub skip: u64,
    pub stream: BoxStream<'static, Result<Bytes, io::Error>>,
}

pub enum OpenNar {
    Opened(NarBody),
    Missing,
    Failed(FetchError),
}

/// Longest connect time-out of a retry ([`Upstream::patient_connect_timeout`]).
pub const PATIENT_CONNECT_MAX: Duration = Duration::from_secs(4);
/// Shortest connect time-out of a retry: over Linux's 1 s SYN retransmission.
pub const PATIENT_CONNECT_MIN: Duration = Duration::from_millis(1300);

pub struct Upstream {
    pub id: usize,
    pub settings: UpstreamSettings,
    source: Source,
    /// Smoothed latency of successful small requests, in microseconds (0: none yet).
    latency_ewma_us: std::sync::atomic::AtomicU64,
    breaker: Mutex<Breaker>,
    limiter: Option<governor::DefaultDirectRateLimiter>,
    inflight: Arc<Semaphore>,
    pub metrics: UpstreamMetrics,
}

/// Where requests go: a directory, or an HTTP base with its clients.
enum Source {
    File(PathBuf),
    Http(HttpSource),
}

struct HttpSource {
    /// Base URL without a trailing '/', as configured.
    base: String,
    /// The base, parsed once: every request URL is checked against it (`None` if it does not
    /// parse; every request is then refused as outside the base).
    base_url: Option<reqwest::Url>,
    client: reqwest::Client,
    /// The client for retries after a transient failure: a connect time-out long enough for
    /// one SYN retransmission (Linux resends after 1 s), so a busy upstream whose listen
    /// backlog dropped the first SYN is reached on the second (issue 12, "never a false miss").
    patient_client: reqwest::Client,
}

impl HttpSource {
    /// The client of a first attempt, or of a retry after a transient failure (`patient`).
    fn client(&self, patient: bool) -> &reqwest::Client {
        if patient {
            &self.patient_client
        } else {
            &self.client
        }
    }
}

/// Why an upstream was not asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    BreakerOpen,
    RateLimited,
}

fn is_missing(status: u16) -> bool {
    matches!(status, 403 | 404 | 410)
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

impl Upstream {
    pub fn new(id: usize, settings: UpstreamSettings) -> Result<Self, reqwest::Error> {
        let build = |connect: Duration| {
            reqwest::Client::builder()
                .connect_timeout(connect)
                .tcp_nodelay(true)
                // Nix reuses connections for 90 s; an upstream may close earlier.
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("ferry-substituter/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        let source = match &settings.location {
            UpstreamLocation::Http(base) => Source::Http(HttpSource {
                base: base.clone(),
                base_url: reqwest::Url::parse(base).ok(),
                client: build(settings.connect_timeout)?,
                patient_client: build(PATIENT_CONNECT_MAX.max(settings.connect_timeout))?,
            }),
            UpstreamLocation::File(dir) => Source::File(dir.clone()),
        };
        let limiter = NonZeroU32::new(settings.rate_limit)
            .map(|r| governor::RateLimiter::direct(governor::Quota::per_second(r)));
        Ok(Upstream {
            id,
            breaker: Mutex::new(Breaker::new(settings.breaker.clone())),
            inflight: Arc::new(Semaphore::new(settings.max_in_flight)),
            metrics: UpstreamMetrics::default(),
            source,
            latency_ewma_us: std::sync::atomic::AtomicU64::new(0),
            limiter,
            settings,
        })
    }

    /// A request for `key`, with the upstream's credentials, or an error when the key's URL
    /// would not stay under the base ([`crate::paths::http_url`]).
    fn request(
        &self,
        http: &HttpSource,
        patient: bool,
        method: reqwest::Method,
        key: &str,
    ) -> Result<reqwest::RequestBuilder, FetchError> {
        let url = http
            .base_url
            .as_ref()
            .and_then(|base| http_url(base, &http.base, key))
            .ok_or_else(|| FetchError::OutsideBase(key.to_owned()))?;
        let req = http.client(patient).request(method, url);
        Ok(match &self.settings.credentials {
            Some(c) => req.basic_auth(&c.user, Some(&c.password)),
            None => req,
        })
    }

    /// The base URL for narinfo URL rewriting (None for directories).
    pub fn http_base(&self) -> Option<&str> {
        match &self.source {
            Source::Http(http) => Some(&http.base),
            Source::File(_) => None,
        }
    }

    /// Whether the breaker lets requests through (closed), after the failures recorded so far.
    pub fn breaker_closed(&self) -> bool {
        self.breaker_state() == 0
    }

    /// See [`Breaker::suspect`].
    pub fn suspect(&self) -> bool {
        self.breaker.lock().is_ok_and(|b| b.suspect())
    }

    pub fn breaker_state(&self) -> u8 {
        self.breaker.lock().map(|b| b.state_code()).unwrap_or(0)
    }

    /// Asks breaker and rate limiter whether this upstream may be used now. When the breaker
    /// wants its half-open probe, the probe runs in the background and the caller skips.
    pub fn admit(self: &Arc<Self>) -> Result<(), Skip> {
        let admit = match self.breaker.lock() {
            Ok(mut b) => b.admit(Instant::now()),
            Err(_) => Admit::Allow,
        };
        match admit {
            Admit::Allow => {}
            Admit::Reject => {
                self.metrics.skipped_breaker.inc();
                return Err(Skip::BreakerOpen);
            }
            Admit::Probe => {
                self.metrics.skipped_breaker.inc();
                let me = Arc::clone(self);
                tokio::spawn(async move { me.probe().await });
                return Err(Skip::BreakerOpen);
            }
        }
        if let Some(l) = &self.limiter
            && l.check().is_err()
        {
            self.metrics.skipped_rate.inc();
            return Err(Skip::RateLimited);
        }
        Ok(())
    }

    /// Waits for an in-flight slot (callers bound the wait with their own deadline).
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.inflight).acquire_owned().await.ok()
    }

    pub fn record_success(&self) {
        if let Ok(mut b) = self.breaker.lock() {
            b.on_success();
        }
    }

    /// A failure of a request that started at `started` (see [`Breaker::on_failure_since`]).
    pub fn record_failure_since(&self, started: Instant, retry_after: Option<Duration>) {
        self.metrics.failures.inc();
        if let Ok(mut b) = self.breaker.lock() {
            b.on_failure_since(Instant::now(), started, retry_after);
        }
    }

    /// Smoothed latency of successful small requests, if any succeeded yet.
    pub fn latency(&self) -> Option<Duration> {
        match self
            .latency_ewma_us
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn observe_success_latency(&self, d: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let us = (d.as_micros() as u64).max(1);
        let old = self.latency_ewma_us.load(Relaxed);
        // Weight 1/8 per sample, like TCP's smoothed RTT.
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        self.latency_ewma_us.store(new.max(1), Relaxed);
    }

    /// The connect time-out of a retry: eight times the upstream's usual latency (a busy
    /// upstream answers slower than usual), at least [`PATIENT_CONNECT_MIN`] and at most
    /// [`PATIENT_CONNECT_MAX`].
    pub fn patient_connect_timeout(&self) -> Duration {
        let adaptive = self.latency().map_or(PATIENT_CONNECT_MIN, |l| l * 8);
        adaptive.clamp(PATIENT_CONNECT_MIN, PATIENT_CONNECT_MAX)
    }

    pub fn record_failure(&self, retry_after: Option<Duration>) {
        self.metrics.failures.inc();
        if let Ok(mut b) = self.breaker.lock() {
            b.on_failure(Instant::now(), retry_after);
        }
    }

    /// The half-open probe: `nix-cache-info` must answer 200 (docs/binary-cache.md §5.1 rule 7).
    async fn probe(&self) {
        let ok = matches!(
            self.fetch_small("nix-cache-info", 64 * 1024).await,
            Fetch::Found(_)
        );
        tracing::info!(upstream = %self.settings.display, ok, "breaker probe");
        if ok {
            self.record_success();
        } else {
            self.record_failure(None);
        }
    }

    /// Fetches a small object whole, within the read time-out. Does not touch the breaker:
    /// the caller decides after validating the body.
    pub async fn fetch_small(&self, key: &str, max_len: usize) -> Fetch {
        self.fetch_small_attempt(key, max_len, false).await
    }

    /// [`Upstream::fetch_small`]; `patient` for a retry after a transient failure: the patient
    /// client and an adaptive connect time-out ([`Upstream::patient_connect_timeout`]).
    pub async fn fetch_small_attempt(&self, key: &str, max_len: usize, patient: bool) -> Fetch {
        let started = Instant::now();
        let connect = if patient {
            self.patient_connect_timeout()
        } else {
            self.settings.connect_timeout
        };
        let r = match &self.source {
            Source::Http(http) => match self.request(http, patient, reqwest::Method::GET, key) {
                Ok(req) => self.fetch_http(req, max_len, connect).await,
                Err(error) => Fetch::Failed {
                    error,
                    retry_after: None,
                },
            },
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
                return Fetch::Missing;
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
    pub async fn head_nar(&self, key: &str, patient: bool) -> OpenNar {
        let wait = self.nar_wait(patient);
        match &self.source {
            Source::Http(http) => {
                let req = match self.request(http, patient, reqwest::Method::HEAD, key) {
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
                        stream: futures_util::stream::empty().boxed(),
                    }),
                }
            }
            Source::File(dir) => match tokio::fs::metadata(file_path(dir, key)).await {
                Ok(m) if m.is_file() => OpenNar::Opened(NarBody {
                    total: Some(m.len()),
                    skip: 0,
                    stream: futures_util::stream::empty().boxed(),
                }),
                Ok(_) => OpenNar::Missing,
                Err(e) if e.kind() == io::ErrorKind::NotFound => OpenNar::Missing,
                Err(e) => OpenNar::Failed(e.into()),
            },
        }
    }

    /// Opens a NAR at `offset` (to the end of the file).
    pub async fn open_nar(&self, key: &str, offset: u64) -> OpenNar {
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
    pub async fn open_nar_attempt(&self, key: &str, offset: u64, patient: bool) -> OpenNar {
        let wait = self.nar_wait(patient);
        match &self.source {
            Source::Http(http) => {
                let mut req = match self.request(http, patient, reqwest::Method::GET, key) {
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
                    return OpenNar::Missing;
                }
                let (total, skip) = match status {
                    200 => (content_length_header(resp.headers()), offset),
                    206 => {
                        let cr = resp
                            .headers()
                            .get(reqwest::header::CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        match parse_content_range(&cr) {
                            Some((start, total)) if start == offset => (total, 0),
                            _ => return OpenNar::Failed(FetchError::BadRange(cr)),
                        }
                    }
                    s => return OpenNar::Failed(FetchError::Status(s)),
                };
                let stream = resp
                    .bytes_stream()
                    .map(|r| r.map_err(|e| io::Error::other(ferry_nix::error_chain(&e))))
                    .boxed();
                OpenNar::Opened(NarBody {
                    total,
                    skip,
                    stream,
                })
            }
            Source::File(dir) => open_file(&file_path(dir, key), offset).await,
        }
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
pub fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
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
        stream,
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

    #[test]
    fn network_blips_and_5xx_are_transient_other_answers_are_not() {
        use FailureKind::*;
        for (e, k) in [
            (FetchError::Connect("refused".into()), Transient),
            (FetchError::Timeout, Transient),
            (FetchError::Transfer("reset".into()), Transient),
            (FetchError::Status(500), Transient),
            (FetchError::Status(503), Transient),
            (FetchError::Status(429), Permanent),
            (FetchError::Status(400), Permanent),
            (FetchError::TooLarge(1), Permanent),
            (FetchError::BadRange("x".into()), Permanent),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }
}
