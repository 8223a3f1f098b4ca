//! One upstream cache: its HTTP client or directory, breaker, rate limit, in-flight cap and
//! metrics. The I/O shell around [`crate::breaker`]; policies live in the pure modules.
//!
//! This module holds the answers, the upstream and its health (breaker, rate limit, in-flight
//! slots, latency); `transport` how requests reach it (HTTP, S3 or a directory).

use crate::breaker::{Admit, Breaker};
use crate::config::UpstreamSettings;
use crate::metrics::UpstreamMetrics;
use crate::race::FailureKind;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use std::io;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

mod raw;
mod transport;

pub(crate) use raw::RawBody;

use transport::Source;

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
    /// An S3 403 that refuses the credentials (`SignatureDoesNotMatch`, …), not a missing
    /// key: a failure, never a remembered miss ([`crate::s3::refusal`]).
    #[error("S3 refused the credentials: {0}")]
    S3Refused(String),
}

impl FetchError {
    /// Whether a fresh attempt may succeed (`race::retry_delay`): connect errors and time-outs
    /// (a dropped SYN, a full listen backlog), resets and early closes, and 5xx. A 429 asks
    /// for less traffic, other statuses and oversized bodies would repeat, and a local file's
    /// I/O error is not a network blip.
    pub(crate) fn kind(&self) -> FailureKind {
        match self {
            FetchError::Connect(_) | FetchError::Timeout | FetchError::Transfer(_) => {
                FailureKind::Transient
            }
            FetchError::Status(s) if (500..600).contains(s) => FailureKind::Transient,
            FetchError::Status(_)
            | FetchError::TooLarge(_)
            | FetchError::Io(_)
            | FetchError::BadRange(_)
            | FetchError::OutsideBase(_)
            | FetchError::S3Refused(_) => FailureKind::Permanent,
        }
    }
}

/// The answer to a small request (narinfo, listing, log).
#[derive(Debug)]
pub(crate) enum Fetch {
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

/// What `nix-cache-info` answered ([`Upstream::check_access`]).
#[derive(Debug)]
pub enum AccessCheck {
    Ok,
    /// 404 or 410: reachable, accepted, but no `nix-cache-info` (not a binary cache?).
    Missing(u16),
    /// 401 or 403, with S3's error code when the body had one (`SignatureDoesNotMatch`,
    /// `InvalidAccessKeyId`, `AccessDenied`…).
    Refused {
        status: u16,
        code: Option<String>,
    },
    Failed(FetchError),
}

/// A NAR body opened at some offset.
pub(crate) struct NarBody {
    /// Full length of the file, when the upstream said.
    pub(crate) total: Option<u64>,
    /// Bytes at the start of `stream` to drop: the upstream ignored `Range` and sent from 0.
    pub(crate) skip: u64,
    pub(crate) stream: NarStream,
}

/// Where a NAR body's bytes come from.
pub(crate) enum NarStream {
    /// Chunks from reqwest or a file.
    Chunks(BoxStream<'static, Result<Bytes, io::Error>>),
    /// A plain-HTTP response still in its socket, which can be spliced ([`raw`]).
    Socket(RawBody),
}

pub(crate) enum OpenNar {
    Opened(NarBody),
    Missing,
    Failed(FetchError),
}

/// Longest connect time-out of a retry ([`Upstream::patient_connect_timeout`]).
pub(crate) const PATIENT_CONNECT_MAX: Duration = Duration::from_secs(4);
/// Shortest connect time-out of a retry: over Linux's 1 s SYN retransmission.
pub(crate) const PATIENT_CONNECT_MIN: Duration = Duration::from_millis(1300);

/// Why an upstream was not asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    BreakerOpen,
    RateLimited,
}

pub struct Upstream {
    pub(crate) settings: UpstreamSettings,
    source: Source,
    /// Smoothed latency of successful small requests, in microseconds (0: none yet).
    latency_ewma_us: std::sync::atomic::AtomicU64,
    breaker: Mutex<Breaker>,
    limiter: Option<governor::DefaultDirectRateLimiter>,
    inflight: Arc<Semaphore>,
    pub(crate) metrics: UpstreamMetrics,
}

impl Upstream {
    pub fn new(settings: UpstreamSettings) -> Result<Self, reqwest::Error> {
        let source = Source::new(&settings)?;
        let limiter = NonZeroU32::new(settings.rate_limit)
            .map(|r| governor::RateLimiter::direct(governor::Quota::per_second(r)));
        Ok(Upstream {
            breaker: Mutex::new(Breaker::new(settings.breaker.clone())),
            inflight: Arc::new(Semaphore::new(settings.max_in_flight)),
            metrics: UpstreamMetrics::default(),
            source,
            latency_ewma_us: std::sync::atomic::AtomicU64::new(0),
            limiter,
            settings,
        })
    }

    /// Whether the breaker lets requests through (closed), after the failures recorded so far.
    pub(crate) fn breaker_closed(&self) -> bool {
        self.breaker_state() == 0
    }

    /// See [`Breaker::suspect`].
    pub(crate) fn suspect(&self) -> bool {
        self.breaker.lock().is_ok_and(|b| b.suspect())
    }

    pub(crate) fn breaker_state(&self) -> u8 {
        self.breaker.lock().map(|b| b.state_code()).unwrap_or(0)
    }

    /// Asks breaker and rate limiter whether this upstream may be used now. When the breaker
    /// wants its half-open probe, the probe runs in the background and the caller skips.
    pub(crate) fn admit(self: &Arc<Self>) -> Result<(), Skip> {
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
    pub(crate) async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.inflight).acquire_owned().await.ok()
    }

    pub(crate) fn record_success(&self) {
        if let Ok(mut b) = self.breaker.lock() {
            b.on_success();
        }
    }

    /// A failure of a request that started at `started` (see [`Breaker::on_failure_since`]).
    pub(crate) fn record_failure_since(&self, started: Instant, retry_after: Option<Duration>) {
        self.metrics.failures.inc();
        if let Ok(mut b) = self.breaker.lock() {
            b.on_failure_since(Instant::now(), started, retry_after);
        }
    }

    /// Smoothed latency of successful small requests, if any succeeded yet.
    pub(crate) fn latency(&self) -> Option<Duration> {
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
    pub(crate) fn patient_connect_timeout(&self) -> Duration {
        let adaptive = self.latency().map_or(PATIENT_CONNECT_MIN, |l| l * 8);
        adaptive.clamp(PATIENT_CONNECT_MIN, PATIENT_CONNECT_MAX)
    }

    pub(crate) fn record_failure(&self, retry_after: Option<Duration>) {
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
}

#[cfg(test)]
mod tests;
