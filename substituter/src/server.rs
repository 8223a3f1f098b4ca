//! The HTTP front: routing and the mapping of every outcome to 200 or 404 (docs/binary-cache.md §5.1 rules 1–2).

use crate::check::Expect;
use crate::config::Settings;
use crate::disk::DiskCache;
use crate::lookup::{Answer, AnswerCache, Key, answer_cache, lookup};
use crate::metrics::{Metrics, UpstreamView, render, render_status};
use crate::paths::{Request, classify};
use crate::upstream::Upstream;
use axum::body::Body;
use axum::extract::State as AxState;
use axum::http::{HeaderValue, Method, Response, StatusCode, header};
use std::sync::Arc;
use std::time::Duration;

/// Shared server state.
pub(crate) struct State {
    pub(crate) settings: Settings,
    pub(crate) upstreams: Vec<Arc<Upstream>>,
    pub(crate) metrics: Metrics,
    pub(crate) answers: AnswerCache,
    /// NAR key → upstream whose narinfo named it, and what the file must be. In memory: after
    /// a restart, every upstream is tried in priority order, so URLs Nix cached for 30 days
    /// stay resolvable (docs/binary-cache.md §2.5).
    pub(crate) routes: moka::future::Cache<String, Route>,
    /// The disk cache, when `cache-dir` is set.
    pub(crate) disk: Option<Arc<DiskCache>>,
    /// This host's store, when `[substituter.local]` is set: asked before everything else.
    pub(crate) local: Option<crate::local::LocalStore>,
    cache_info: String,
}

/// Bytes of NAR routes kept in memory.
const ROUTES_BYTES: u64 = 16 * 1024 * 1024;
/// A route's memory beyond its key: the entry, the expected hash, moka's bookkeeping.
const ROUTE_OVERHEAD: usize = 160;

/// Where a NAR key came from.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// The upstream whose narinfo named it (None: the narinfo came from the disk cache).
    pub(crate) upstream: Option<usize>,
    pub(crate) expect: Expect,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("local store: {0}")]
    Local(#[from] crate::local::LocalError),
    #[error("disk cache {}: {error}", dir.display())]
    Disk {
        dir: std::path::PathBuf,
        error: std::io::Error,
    },
}

impl State {
    pub(crate) fn new(settings: Settings) -> Result<Arc<Self>, StateError> {
        crate::install_crypto_provider();
        let upstreams = settings
            .upstreams
            .iter()
            .map(|u| Upstream::new(u.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let cache_info = format!(
            "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
            settings.store_dir, settings.priority
        );
        let disk = settings
            .disk
            .as_ref()
            .map(|d| {
                DiskCache::open(&d.dir, d.max_bytes, d.max_age).map_err(|error| StateError::Disk {
                    dir: d.dir.clone(),
                    error,
                })
            })
            .transpose()?;
        let local = settings
            .local
            .as_ref()
            .map(|l| {
                crate::local::LocalStore::open(
                    settings.store_dir.clone(),
                    l.db.clone(),
                    l.keys.clone(),
                    l.verify_nar_hash,
                )
            })
            .transpose()?;
        Ok(Arc::new(State {
            local,
            disk,
            answers: answer_cache(settings.positive_ttl, settings.negative_ttl),
            // Weighed by bytes, not counted: a route's key is an upstream's `URL:` (issue 12
            // item 4). 16 MiB holds 100,000 routes of Nix's usual 80-byte URLs.
            routes: moka::future::Cache::builder()
                .weigher(|k: &String, _r: &Route| {
                    u32::try_from(k.len() + ROUTE_OVERHEAD).unwrap_or(u32::MAX)
                })
                .max_capacity(ROUTES_BYTES)
                .time_to_idle(Duration::from_secs(30 * 24 * 3600))
                .build(),
            metrics: Metrics::default(),
            upstreams,
            settings,
            cache_info,
        }))
    }

    fn views(&self) -> Vec<UpstreamView<'_>> {
        self.upstreams
            .iter()
            .map(|u| UpstreamView {
                url: &u.settings.display,
                priority: u.settings.priority,
                breaker: u.breaker_state(),
                metrics: &u.metrics,
            })
            .collect()
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn status_only(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

/// The whole request is taken by value and only borrowed from: extracting `Method`, `Uri` and
/// `HeaderMap` separately would clone each of them for every request (G2's hot path).
pub(crate) async fn handle(
    AxState(state): AxState<Arc<State>>,
    req: axum::extract::Request,
) -> Response<Body> {
    let (parts, _body) = req.into_parts();
    let method = &parts.method;
    if method != Method::GET && method != Method::HEAD {
        // Nix only PUTs when it writes to a cache; Ferry is read-only.
        return status_only(StatusCode::METHOD_NOT_ALLOWED);
    }
    let uri = &parts.uri;
    let target = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    match classify(target) {
        Request::CacheInfo => text(
            StatusCode::OK,
            "text/x-nix-cache-info",
            state.cache_info.clone(),
        ),
        Request::Metrics => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            render(
                &state.metrics,
                &state.views(),
                state.disk.as_deref().map(|d| (&d.metrics, d.usage())),
                state.local.as_ref().map(|l| &l.metrics),
            ),
        ),
        Request::Status => text(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            render_status(
                &state.metrics,
                &state.views(),
                state.disk.as_deref().map(|d| (&d.metrics, d.usage())),
                state.local.as_ref().map(|l| &l.metrics),
            ),
        ),
        Request::NarInfo(hash) => {
            // This host's store first, never cached: a path is served the moment it is
            // valid, and not a moment after it was collected.
            let mut unsigned = None;
            let mut local_failed = false;
            if let Some(local) = &state.local {
                match local.narinfo_cached(&hash).await {
                    Ok(Some(n)) if n.signed => {
                        local.metrics.narinfo_hits.inc();
                        state.metrics.narinfo_hits.inc();
                        return narinfo_response(n.body);
                    }
                    // Unsigned and not content-addressed: a client requiring signatures
                    // would skip it, so a signed copy upstream is preferred ("Trust before
                    // priority"); it is served when no upstream has one.
                    Ok(Some(n)) => unsigned = Some(n.body),
                    Ok(None) => local.metrics.narinfo_misses.inc(),
                    Err(error) => {
                        local.metrics.errors.inc();
                        local_failed = true;
                        tracing::warn!(%hash, %error, "local store lookup failed");
                    }
                }
            }
            let r = small(&state, Key::NarInfo(hash), "text/x-nix-narinfo").await;
            let r = match (r.status(), unsigned) {
                (StatusCode::OK, _) => r,
                (_, Some(body)) => {
                    if let Some(l) = &state.local {
                        l.metrics.narinfo_hits.inc();
                    }
                    narinfo_response(body)
                }
                // The store may hold the path but could not be read: a 404 would be a false
                // miss that Nix remembers for an hour, a 503 is retried.
                (StatusCode::NOT_FOUND, None) if local_failed => {
                    state.metrics.unknown_answers.inc();
                    status_only(StatusCode::SERVICE_UNAVAILABLE)
                }
                _ => r,
            };
            if r.status() == StatusCode::OK {
                state.metrics.narinfo_hits.inc();
            } else {
                state.metrics.narinfo_misses.inc();
            }
            r
        }
        Request::Other(key) => {
            let ct = if key.starts_with("log/") {
                "text/plain; charset=utf-8"
            } else {
                "application/json"
            };
            small(&state, Key::Other(key), ct).await
        }
        Request::Nar(key) => {
            if let Some(local) = &state.local
                && crate::local::parse_nar_key(&key).is_some()
            {
                match local.nar(&key) {
                    Ok(Some(info)) => {
                        let range = parts
                            .headers
                            .get(header::RANGE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(crate::nar::parse_range);
                        state.metrics.nar_requests.inc();
                        let head = method == Method::HEAD;
                        return crate::local::serve_nar(
                            Arc::clone(&state),
                            local,
                            info,
                            range,
                            head,
                        )
                        .await;
                    }
                    Ok(None) => {}
                    Err(error) => {
                        local.metrics.errors.inc();
                        tracing::warn!(%key, %error, "local store lookup failed");
                    }
                }
            }
            // Placeholders are for HTTP/1 only: HTTP/2 copies frames into its own.
            let splice = (parts.version <= axum::http::Version::HTTP_11)
                .then(|| {
                    parts
                        .extensions
                        .get::<axum::extract::ConnectInfo<crate::splice::SpliceHandle>>()
                        .map(|c| Arc::clone(&c.0.0))
                })
                .flatten();
            crate::nar::serve(state, key, method, &parts.headers, splice).await
        }
        Request::Unknown => status_only(StatusCode::NOT_FOUND),
    }
}

fn narinfo_response(body: bytes::Bytes) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/x-nix-narinfo"),
    );
    r
}

/// A small object through the race: 200 with the body, 404 when every upstream that could
/// hold it said no (or is down), and 503 only when a live upstream gave no definite answer
/// within `narinfo-patience-ms` (never a false 404, issue 12).
async fn small(state: &Arc<State>, key: Key, content_type: &'static str) -> Response<Body> {
    match lookup(state, key).await {
        Ok(a) => match &*a {
            Answer::Found { body, .. } => {
                let mut r = Response::new(Body::from(body.clone()));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                r
            }
            Answer::Missing => status_only(StatusCode::NOT_FOUND),
        },
        Err(i) if i.unknown => {
            // A live upstream may hold it but did not answer in time. A 404 would be a false
            // miss that Nix remembers for `narinfo-cache-negative-ttl` (an hour); a 503 is
            // never cached and Nix asks again (up to 5 attempts with back-off, each a new
            // race here). See the README, "Never a false miss".
            state.metrics.unknown_answers.inc();
            status_only(StatusCode::SERVICE_UNAVAILABLE)
        }
        Err(_) => {
            state.metrics.incomplete_misses.inc();
            status_only(StatusCode::NOT_FOUND)
        }
    }
}
