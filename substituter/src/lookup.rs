//! The async shell of the priority race ([`crate::race`]) with coalescing and the
//! positive/negative answer cache.
//!
//! Identical concurrent lookups share one race (moka's `try_get_with`). A found answer is kept
//! for `positive-ttl`, a definitive miss for `negative-ttl`; an incomplete miss (an upstream
//! failed, timed out, was skipped or missed the deadline) is returned as an error, which moka
//! never caches.

use crate::check::{Expect, check_narinfo};
use crate::paths::HashPart;
use crate::race::{Decision, FailureKind, Phase, Slot, decide, retry_delay, start_next_early};
use crate::server::{Route, State};
use crate::upstream::{Fetch, Skip};
use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest listing or log Ferry passes through.
pub(crate) const MAX_SMALL: usize = 16 * 1024 * 1024;

/// Largest narinfo Ferry reads from an upstream. Nix writes one line per field, and only
/// `References` and `Sig` grow with the path: 1 MiB holds some 4,000 references of maximal
/// length (a store path base name is at most 244 bytes), more than any closure Nix builds
/// references directly. Anything bigger is an upstream failure, never buffered further
/// (issue 12 item 4: 15 MiB narinfos took Ferry to 1.26 GiB).
pub(crate) const MAX_NARINFO: usize = 1024 * 1024;

/// Bytes of answers (narinfos, listings, logs, misses) kept in memory: the warm set of a
/// large closure (a narinfo is 0.5–2 KiB) within goal G13's 64 MiB.
pub(crate) const ANSWER_CACHE_BYTES: u64 = 48 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// A narinfo by hash part.
    NarInfo(HashPart),
    /// Another small object by key.
    Other(String),
}

#[derive(Debug)]
pub(crate) enum Answer {
    Found {
        body: Bytes,
    },
    /// Every upstream said no.
    Missing,
}

/// No definite answer: never cached.
#[derive(Debug)]
pub(crate) struct Incomplete {
    /// A live upstream that may hold the path gave no definite answer within the patience:
    /// answered 503, not 404 (see `race.rs`, rule 5). False: every upstream that could hold
    /// the path said no, the others are down or broken: an (uncached) 404.
    pub(crate) unknown: bool,
}

/// Entry lifetimes by kind of answer.
pub(crate) struct AnswerExpiry {
    pub(crate) positive: Duration,
    pub(crate) negative: Duration,
}

impl moka::Expiry<Key, Arc<Answer>> for AnswerExpiry {
    fn expire_after_create(
        &self,
        _k: &Key,
        v: &Arc<Answer>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(match **v {
            Answer::Found { .. } => self.positive,
            Answer::Missing => self.negative,
        })
    }
}

pub(crate) type AnswerCache = moka::future::Cache<Key, Arc<Answer>>;

pub(crate) fn answer_cache(positive: Duration, negative: Duration) -> AnswerCache {
    moka::future::Cache::builder()
        // Weighted by body size: a miss weighs 64 bytes.
        .weigher(|k: &Key, v: &Arc<Answer>| {
            let key_len = match k {
                Key::NarInfo(h) => h.as_str().len(),
                Key::Other(k) => k.len(),
            };
            let body = match &**v {
                Answer::Found { body, .. } => body.len(),
                Answer::Missing => 0,
            };
            u32::try_from(64 + key_len + body).unwrap_or(u32::MAX)
        })
        .max_capacity(ANSWER_CACHE_BYTES)
        .expire_after(AnswerExpiry { positive, negative })
        .build()
}

/// Looks `key` up through the cache; `Err` is an uncached 404.
pub(crate) async fn lookup(state: &Arc<State>, key: Key) -> Result<Arc<Answer>, Arc<Incomplete>> {
    if let Some(a) = state.answers.get(&key).await {
        match *a {
            Answer::Found { .. } => state.metrics.cache_hits.inc(),
            Answer::Missing => state.metrics.negative_hits.inc(),
        }
        return Ok(a);
    }
    let st = Arc::clone(state);
    let k = key.clone();
    state
        .answers
        .try_get_with(key, async move {
            if let Key::NarInfo(h) = &k
                && let Some(a) = from_disk(&st, h.as_str()).await
            {
                return Ok(a);
            }
            race(&st, &k).await
        })
        .await
}

/// A narinfo from the disk cache, checked again as if an upstream had sent it (the trusted
/// keys may have changed since it was stored).
async fn from_disk(state: &Arc<State>, hash: &str) -> Option<Arc<Answer>> {
    let disk = state.disk.as_ref()?;
    let bytes = disk.narinfo(hash).await?;
    let c = match check_narinfo(
        &state.settings.store_dir,
        hash,
        &bytes,
        &state.settings.trusted_keys,
        state.settings.require_sigs,
        None,
    ) {
        Ok(c) if c.trusted => c,
        Ok(_) => return None,
        Err(error) => {
            tracing::warn!(%hash, %error, "invalid narinfo in the disk cache; ignored");
            return None;
        }
    };
    disk.metrics.narinfo_hits.inc();
    if let Some(k) = &c.nar_key {
        state
            .routes
            .insert(
                k.clone(),
                Route {
                    upstream: None,
                    expect: c.expect.clone(),
                },
            )
            .await;
    }
    Some(Arc::new(Answer::Found { body: bytes }))
}

/// A usable answer: body, NAR key, what the NAR must be.
type Found = (Bytes, Option<String>, Expect);

struct Outcome {
    slot: Slot,
    found: Option<Found>,
    /// For [`Slot::Failed`]: whether trying again may help.
    failure: Option<FailureKind>,
}

/// Asks one upstream, validates, and feeds its breaker. `patient`: a retry after a transient
/// failure ([`crate::upstream::Upstream::fetch_small_attempt`]).
async fn ask(state: Arc<State>, i: usize, key: Key, patient: bool) -> Outcome {
    let up = &state.upstreams[i];
    let started = Instant::now();
    let _slot = up.slot().await;
    let (object, hash) = match &key {
        Key::NarInfo(h) => (format!("{h}.narinfo"), Some(h.as_str())),
        Key::Other(k) => (k.clone(), None),
    };
    let failed = |kind| Outcome {
        slot: Slot::Failed,
        found: None,
        failure: Some(kind),
    };
    let max = if hash.is_some() {
        MAX_NARINFO
    } else {
        MAX_SMALL
    };
    match up.fetch_small_attempt(&object, max, patient).await {
        Fetch::Missing => {
            up.record_success();
            up.metrics.misses.inc();
            Outcome {
                slot: Slot::Miss,
                found: None,
                failure: None,
            }
        }
        Fetch::Failed { error, retry_after } => {
            tracing::warn!(upstream = %up.settings.display, %object, %error, patient, "upstream request failed");
            up.record_failure_since(started, retry_after);
            failed(error.kind())
        }
        Fetch::Found(bytes) => match hash {
            None => {
                up.record_success();
                up.metrics.hits.inc();
                Outcome {
                    slot: Slot::Hit { trusted: true },
                    found: Some((bytes, None, Expect::default())),
                    failure: None,
                }
            }
            Some(h) => match check_narinfo(
                &state.settings.store_dir,
                h,
                &bytes,
                &state.settings.trusted_keys,
                state.settings.require_sigs,
                up.http_base(),
            ) {
                Ok(c) => {
                    up.record_success();
                    up.metrics.hits.inc();
                    if !c.trusted {
                        tracing::info!(upstream = %up.settings.display, %object, "narinfo has no trusted signature");
                    }
                    Outcome {
                        slot: Slot::Hit { trusted: c.trusted },
                        found: Some((Bytes::from(c.body), c.nar_key, c.expect)),
                        failure: None,
                    }
                }
                Err(error) => {
                    // An unparsable 200 (an HTML interstitial, a truncated body) is an
                    // upstream failure, not a miss (docs/binary-cache.md §5.1 rule 3).
                    tracing::warn!(upstream = %up.settings.display, %object, %error, "invalid narinfo");
                    up.record_failure(None);
                    // The same bytes would come again.
                    failed(FailureKind::Permanent)
                }
            },
        },
    }
}

type Running = FuturesUnordered<
    std::pin::Pin<
        Box<
            dyn std::future::Future<Output = (usize, Result<Outcome, tokio::task::JoinError>)>
                + Send,
        >,
    >,
>;

type Backoffs =
    FuturesUnordered<std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>>>;

enum Event {
    Answer(usize, Outcome),
    HeadStart,
    /// An upstream's back-off after a transient failure is over.
    Retry(usize),
    Deadline,
    Patience,
}

/// Back-off before asking a rate-limited upstream again (its limit is per second).
const RATE_LIMIT_BACKOFF: Duration = Duration::from_millis(100);

/// How long upstream `i` gets before the next one is asked too: four times its usual latency
/// (so a fast LAN cache that stalls is hedged by the next upstream early), at least 50 ms and
/// at most `head-start-ms`.
fn head_start(state: &State, i: usize) -> Duration {
    let max = state.settings.head_start;
    state.upstreams[i].latency().map_or(max, |l| {
        (l * 4).clamp(Duration::from_millis(50).min(max), max)
    })
}

async fn race(state: &Arc<State>, key: &Key) -> Result<Arc<Answer>, Incomplete> {
    let n = state.upstreams.len();
    let mut slots = vec![Slot::Pending; n];
    let mut found: Vec<Option<Found>> = vec![None; n];
    let mut running: Running = FuturesUnordered::new();
    let mut backoffs: Backoffs = FuturesUnordered::new();
    // Attempts started per upstream in this race.
    let mut attempts = vec![0u32; n];
    let mut handles = Vec::new();
    let start = Instant::now();
    let patience = state.settings.narinfo_patience;
    let deadline = tokio::time::sleep(state.settings.narinfo_deadline);
    tokio::pin!(deadline);
    let patience_end = tokio::time::sleep(patience);
    tokio::pin!(patience_end);
    let mut phase = Phase::Racing;
    let head = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(head);
    let mut next = 0usize;

    // Starts an attempt at upstream `i`, unless its breaker or rate limit says no.
    let mut launch = |i: usize, patient: bool, running: &mut Running| {
        let up = &state.upstreams[i];
        up.admit()?;
        // A task, so that a request still running at the deadline completes and teaches the
        // breaker; it is aborted only once a winner is known.
        let h = tokio::spawn(ask(Arc::clone(state), i, key.clone(), patient));
        handles.push(h.abort_handle());
        running.push(Box::pin(async move { (i, h.await) }));
        Ok::<(), Skip>(())
    };
    let backoff = |i: usize, d: Duration, backoffs: &mut Backoffs| {
        backoffs.push(Box::pin(async move {
            tokio::time::sleep(d).await;
            i
        }));
    };
    // Whether another attempt still fits before the patience runs out.
    let fits = |i: usize, d: Duration| {
        start.elapsed() + d + state.upstreams[i].patient_connect_timeout() <= patience
    };

    // The head start of the next upstream ran out.
    let mut head_due = false;
    let decision = loop {
        // Ask the next upstream when its head start ran out, or now when every earlier one
        // has already said no.
        while next < n && (next == 0 || head_due || start_next_early(&slots, next)) {
            head_due = false;
            let i = next;
            next += 1;
            head.as_mut()
                .reset(tokio::time::Instant::now() + head_start(state, i));
            match launch(i, false, &mut running) {
                Ok(()) => {
                    attempts[i] = 1;
                    // A suspect upstream (its last requests failed) is not waited for by
                    // lower-priority hits (rule 6 in race.rs): a black-holed upstream costs
                    // the first lookups that find it dead their connect time-out, and the
                    // lookups after them nothing, even before its breaker opens (goal G5).
                    slots[i] = if state.upstreams[i].suspect() {
                        Slot::Retrying
                    } else {
                        Slot::Pending
                    };
                }
                Err(Skip::BreakerOpen) => slots[i] = Slot::Skipped,
                // Busy, not down: asked again shortly.
                Err(Skip::RateLimited) if fits(i, RATE_LIMIT_BACKOFF) => {
                    slots[i] = Slot::Retrying;
                    backoff(i, RATE_LIMIT_BACKOFF, &mut backoffs);
                }
                Err(Skip::RateLimited) => slots[i] = Slot::Unanswered,
            }
        }
        match decide(&slots, phase, state.settings.serve_untrusted) {
            Decision::Wait => {}
            d => break d,
        }
        let event = tokio::select! {
            Some((i, r)) = running.next() => {
                Event::Answer(i, r.unwrap_or(Outcome {
                    slot: Slot::Failed,
                    found: None,
                    failure: Some(FailureKind::Permanent),
                }))
            }
            Some(i) = backoffs.next() => Event::Retry(i),
            _ = &mut head, if next < n => Event::HeadStart,
            _ = &mut deadline, if phase == Phase::Racing => Event::Deadline,
            _ = &mut patience_end => Event::Patience,
        };
        match event {
            Event::Answer(i, o) => {
                let up = &state.upstreams[i];
                let transient = o.failure == Some(FailureKind::Transient);
                let retry = o.failure.and_then(|kind| {
                    retry_delay(
                        kind,
                        attempts[i],
                        up.breaker_closed(),
                        start.elapsed(),
                        patience,
                        up.patient_connect_timeout(),
                    )
                });
                if let Some(d) = retry {
                    slots[i] = Slot::Retrying;
                    backoff(i, d, &mut backoffs);
                } else if transient && up.breaker_closed() {
                    // Alive but out of time: it may hold the path (rule 5).
                    slots[i] = Slot::Unanswered;
                } else {
                    slots[i] = o.slot;
                    found[i] = o.found;
                }
            }
            Event::Retry(i) => {
                // Its breaker may have opened during the back-off (other lookups fail too):
                // then it is down, not blipping, and gets no more traffic (goal G5).
                match launch(i, true, &mut running) {
                    Ok(()) => {
                        attempts[i] += 1;
                        state.upstreams[i].metrics.retries.inc();
                        tracing::debug!(?key, upstream = %state.upstreams[i].settings.display, attempt = attempts[i], "retrying after a transient failure");
                    }
                    Err(Skip::BreakerOpen) => slots[i] = Slot::Failed,
                    Err(Skip::RateLimited) if fits(i, RATE_LIMIT_BACKOFF) => {
                        backoff(i, RATE_LIMIT_BACKOFF, &mut backoffs);
                    }
                    Err(Skip::RateLimited) => slots[i] = Slot::Unanswered,
                }
            }
            // The next upstream is asked at the top of the loop.
            Event::HeadStart => head_due = true,
            Event::Deadline => phase = Phase::PastDeadline,
            Event::Patience => {
                break decide(&slots, Phase::PastPatience, state.settings.serve_untrusted);
            }
        }
    };
    if matches!(decision, Decision::Serve(_)) {
        for h in &handles {
            h.abort();
        }
    }
    let elapsed = start.elapsed();
    match decision {
        Decision::Serve(i) => {
            let (body, nar_key, expect) = found[i].take().unwrap_or_default();
            // The NAR's expected hash is kept with the disk cache, so that it can be cached
            // (and checked) even after a restart (issue 12 item 2).
            if let (Some(k), Some(disk), Slot::Hit { trusted: true }) =
                (&nar_key, &state.disk, slots[i])
                && expect.sha256.is_some()
            {
                let (disk, k, e) = (Arc::clone(disk), k.clone(), expect.clone());
                tokio::spawn(async move { disk.put_expected(&k, &e).await });
            }
            if let Some(k) = &nar_key {
                state
                    .routes
                    .insert(
                        k.clone(),
                        Route {
                            upstream: Some(i),
                            expect,
                        },
                    )
                    .await;
            }
            // Only narinfos Nix would trust are kept on disk; written in the background.
            if let (Key::NarInfo(h), Some(disk), Slot::Hit { trusted: true }) =
                (key, &state.disk, slots[i])
            {
                let (disk, h, body) = (Arc::clone(disk), *h, body.clone());
                tokio::spawn(async move { disk.put_narinfo(h.as_str(), body).await });
            }
            tracing::debug!(?key, upstream = %state.upstreams[i].settings.display, ?elapsed, "found");
            Ok(Arc::new(Answer::Found { body }))
        }
        Decision::NotFound { definitive: true } => {
            tracing::debug!(?key, ?elapsed, "missing everywhere");
            Ok(Arc::new(Answer::Missing))
        }
        Decision::Unknown => {
            tracing::warn!(
                ?key,
                ?slots,
                ?elapsed,
                "no definite answer from a live upstream in time: 503, not a 404"
            );
            Err(Incomplete { unknown: true })
        }
        _ => {
            tracing::info!(
                ?key,
                ?slots,
                ?elapsed,
                "not found; the other upstreams are down or broken (not cached)"
            );
            Err(Incomplete { unknown: false })
        }
    }
}
