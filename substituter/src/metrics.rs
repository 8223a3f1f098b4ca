//! Counters for `/metrics` (Prometheus text format 0.0.4) and `ferry-substituter status`.
//! Plain atomics: no registry crate, nothing allocated per request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.add(1);
    }
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Debug, Default)]
pub(crate) struct Histogram {
    buckets: [Counter; 11],
    count: Counter,
    sum_micros: Counter,
}

impl Histogram {
    pub(crate) fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, bound) in self.buckets.iter().zip(BUCKETS) {
            if s <= bound {
                b.inc();
            }
        }
        self.count.inc();
        self.sum_micros.add(d.as_micros() as u64);
    }
}

#[derive(Debug, Default)]
pub(crate) struct UpstreamMetrics {
    pub(crate) latency: Histogram,
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) failures: Counter,
    /// Attempts repeated after a transient failure within one race.
    pub(crate) retries: Counter,
    pub(crate) skipped_breaker: Counter,
    pub(crate) skipped_rate: Counter,
    pub(crate) nar_bytes: Counter,
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) narinfo_hits: Counter,
    pub(crate) narinfo_misses: Counter,
    /// Served from the negative cache.
    pub(crate) negative_hits: Counter,
    /// Served from the positive narinfo cache.
    pub(crate) cache_hits: Counter,
    /// 404s that were not definitive (failures, time-outs, open breakers): never cached.
    pub(crate) incomplete_misses: Counter,
    /// 503s: a live upstream gave no definite answer within the patience.
    pub(crate) unknown_answers: Counter,
    pub(crate) nar_requests: Counter,
    pub(crate) nar_bytes: Counter,
    /// Of `nar_bytes`, those spliced from an upstream socket (never in Ferry's memory).
    pub(crate) nar_spliced_bytes: Counter,
    pub(crate) nar_resumes: Counter,
    pub(crate) nar_aborts: Counter,
    pub(crate) nar_not_found: Counter,
}

/// The local store's counters (`[substituter.local]`).
#[derive(Debug, Default)]
pub(crate) struct LocalMetrics {
    /// Narinfos served from the store.
    pub(crate) narinfo_hits: Counter,
    /// Narinfo requests for paths not valid here (then the upstreams are asked).
    pub(crate) narinfo_misses: Counter,
    pub(crate) nar_requests: Counter,
    pub(crate) nar_bytes: Counter,
    /// NAR streams aborted because the path changed or vanished (garbage-collected).
    pub(crate) nar_aborts: Counter,
    /// Database errors.
    pub(crate) errors: Counter,
}

/// One upstream's row, for rendering.
pub(crate) struct UpstreamView<'a> {
    pub(crate) url: &'a str,
    pub(crate) priority: i32,
    pub(crate) breaker: u8,
    pub(crate) metrics: &'a UpstreamMetrics,
}

/// The disk cache's counters and its (entries, bytes), when it is enabled.
pub(crate) type DiskView<'a> = Option<(&'a crate::disk::DiskMetrics, (usize, u64))>;

pub(crate) fn render(
    m: &Metrics,
    ups: &[UpstreamView<'_>],
    disk: DiskView<'_>,
    local: Option<&LocalMetrics>,
) -> String {
    let mut s = String::with_capacity(4096);
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(s, "# HELP ferry_substituter_{name} {help}");
        let _ = writeln!(s, "# TYPE ferry_substituter_{name} counter");
        let _ = writeln!(s, "ferry_substituter_{name} {v}");
    };
    counter(
        "narinfo_hits_total",
        "narinfo requests answered 200",
        m.narinfo_hits.get(),
    );
    counter(
        "narinfo_misses_total",
        "narinfo requests answered 404",
        m.narinfo_misses.get(),
    );
    counter(
        "negative_cache_hits_total",
        "404s served from the negative cache",
        m.negative_hits.get(),
    );
    counter(
        "positive_cache_hits_total",
        "200s served from the narinfo cache",
        m.cache_hits.get(),
    );
    counter(
        "incomplete_misses_total",
        "404s caused by failing or skipped upstreams (not cached)",
        m.incomplete_misses.get(),
    );
    counter(
        "unknown_answers_total",
        "503s: a live upstream gave no definite answer in time (never a false 404)",
        m.unknown_answers.get(),
    );
    counter("nar_requests_total", "NAR requests", m.nar_requests.get());
    counter(
        "nar_bytes_total",
        "NAR bytes sent to clients",
        m.nar_bytes.get(),
    );
    counter(
        "nar_spliced_bytes_total",
        "NAR bytes spliced from an upstream socket to the client (zero-copy)",
        m.nar_spliced_bytes.get(),
    );
    counter(
        "nar_resumes_total",
        "NAR streams resumed after an upstream failure",
        m.nar_resumes.get(),
    );
    counter(
        "nar_aborts_total",
        "NAR streams aborted (no upstream could resume)",
        m.nar_aborts.get(),
    );
    counter(
        "nar_not_found_total",
        "NAR requests answered 404",
        m.nar_not_found.get(),
    );
    if let Some(l) = local {
        for (name, help, v) in [
            (
                "local_narinfo_hits_total",
                "narinfos served from this host's store",
                &l.narinfo_hits,
            ),
            (
                "local_narinfo_misses_total",
                "narinfo requests for paths not valid in this host's store",
                &l.narinfo_misses,
            ),
            (
                "local_nar_requests_total",
                "NAR requests served from this host's store",
                &l.nar_requests,
            ),
            (
                "local_nar_bytes_total",
                "NAR bytes sent from this host's store",
                &l.nar_bytes,
            ),
            (
                "local_nar_aborts_total",
                "local NAR streams aborted: the path changed or vanished while it was served",
                &l.nar_aborts,
            ),
            (
                "local_errors_total",
                "errors reading Nix's database",
                &l.errors,
            ),
        ] {
            counter(name, help, v.get());
        }
    }
    if let Some((d, (entries, bytes))) = disk {
        counter(
            "disk_narinfo_hits_total",
            "narinfos served from the disk cache",
            d.narinfo_hits.get(),
        );
        counter(
            "disk_nar_hits_total",
            "NARs served from the disk cache",
            d.nar_hits.get(),
        );
        counter(
            "disk_nar_stored_total",
            "NARs verified and stored in the disk cache",
            d.nar_stored.get(),
        );
        counter(
            "disk_nar_discarded_total",
            "NAR copies not kept (stream cut, wrong length or hash, write error)",
            d.nar_discarded.get(),
        );
        counter(
            "disk_evictions_total",
            "disk cache entries evicted (quota or age)",
            d.evictions.get(),
        );
        let _ = writeln!(s, "# TYPE ferry_substituter_disk_entries gauge");
        let _ = writeln!(s, "ferry_substituter_disk_entries {entries}");
        let _ = writeln!(s, "# TYPE ferry_substituter_disk_bytes gauge");
        let _ = writeln!(s, "ferry_substituter_disk_bytes {bytes}");
    }
    let label = |u: &UpstreamView<'_>| format!("upstream=\"{}\"", u.url.replace(['"', '\\'], "_"));
    let _ = writeln!(
        s,
        "# HELP ferry_substituter_upstream_breaker_state 0 closed, 1 open, 2 half-open"
    );
    let _ = writeln!(s, "# TYPE ferry_substituter_upstream_breaker_state gauge");
    for u in ups {
        let _ = writeln!(
            s,
            "ferry_substituter_upstream_breaker_state{{{}}} {}",
            label(u),
            u.breaker
        );
    }
    type Get = fn(&UpstreamMetrics) -> u64;
    let per: [(&str, Get); 7] = [
        ("upstream_hits_total", |m| m.hits.get()),
        ("upstream_misses_total", |m| m.misses.get()),
        ("upstream_failures_total", |m| m.failures.get()),
        ("upstream_retries_total", |m| m.retries.get()),
        ("upstream_skipped_breaker_total", |m| {
            m.skipped_breaker.get()
        }),
        ("upstream_skipped_rate_limit_total", |m| {
            m.skipped_rate.get()
        }),
        ("upstream_nar_bytes_total", |m| m.nar_bytes.get()),
    ];
    for (name, get) in per {
        let _ = writeln!(s, "# TYPE ferry_substituter_{name} counter");
        for u in ups {
            let _ = writeln!(
                s,
                "ferry_substituter_{name}{{{}}} {}",
                label(u),
                get(u.metrics)
            );
        }
    }
    let _ = writeln!(
        s,
        "# HELP ferry_substituter_upstream_latency_seconds time to a whole small answer"
    );
    let _ = writeln!(
        s,
        "# TYPE ferry_substituter_upstream_latency_seconds histogram"
    );
    for u in ups {
        let l = label(u);
        let h = &u.metrics.latency;
        for (b, bound) in h.buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                s,
                "ferry_substituter_upstream_latency_seconds_bucket{{{l},le=\"{bound}\"}} {}",
                b.get()
            );
        }
        let _ = writeln!(
            s,
            "ferry_substituter_upstream_latency_seconds_bucket{{{l},le=\"+Inf\"}} {}",
            h.count.get()
        );
        let _ = writeln!(
            s,
            "ferry_substituter_upstream_latency_seconds_sum{{{l}}} {}",
            h.sum_micros.get() as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "ferry_substituter_upstream_latency_seconds_count{{{l}}} {}",
            h.count.get()
        );
    }
    s
}

/// The human summary printed by `ferry-substituter status`.
pub(crate) fn render_status(
    m: &Metrics,
    ups: &[UpstreamView<'_>],
    disk: DiskView<'_>,
    local: Option<&LocalMetrics>,
) -> String {
    let mut s = String::new();
    if let Some(l) = local {
        let _ = writeln!(
            s,
            "local store: {} narinfo hits, {} misses; {} NARs, {} bytes, {} aborted (path changed or collected); {} database errors",
            l.narinfo_hits.get(),
            l.narinfo_misses.get(),
            l.nar_requests.get(),
            l.nar_bytes.get(),
            l.nar_aborts.get(),
            l.errors.get()
        );
    }
    let _ = writeln!(
        s,
        "narinfo: {} hits, {} misses ({} from the negative cache, {} incomplete), {} unknown (503), {} from the narinfo cache",
        m.narinfo_hits.get(),
        m.narinfo_misses.get(),
        m.negative_hits.get(),
        m.incomplete_misses.get(),
        m.unknown_answers.get(),
        m.cache_hits.get()
    );
    let _ = writeln!(
        s,
        "nar: {} requests, {} bytes, {} resumed, {} aborted, {} not found",
        m.nar_requests.get(),
        m.nar_bytes.get(),
        m.nar_resumes.get(),
        m.nar_aborts.get(),
        m.nar_not_found.get()
    );
    if let Some((d, (entries, bytes))) = disk {
        let _ = writeln!(
            s,
            "disk cache: {entries} entries, {bytes} bytes; {} narinfo and {} NAR hits, {} NARs stored, {} discarded, {} evicted",
            d.narinfo_hits.get(),
            d.nar_hits.get(),
            d.nar_stored.get(),
            d.nar_discarded.get(),
            d.evictions.get()
        );
    }
    for u in ups {
        let state = match u.breaker {
            0 => "closed",
            1 => "OPEN",
            _ => "half-open",
        };
        let h = &u.metrics.latency;
        let mean_ms = if h.count.get() == 0 {
            0.0
        } else {
            h.sum_micros.get() as f64 / h.count.get() as f64 / 1000.0
        };
        let _ = writeln!(
            s,
            "upstream {} (priority {}): breaker {state}, {} hits, {} misses, {} failures, {} skipped, mean latency {mean_ms:.1} ms",
            u.url,
            u.priority,
            u.metrics.hits.get(),
            u.metrics.misses.get(),
            u.metrics.failures.get(),
            u.metrics.skipped_breaker.get() + u.metrics.skipped_rate.get(),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.narinfo_hits.inc();
        let um = UpstreamMetrics::default();
        um.latency.observe(Duration::from_millis(3));
        let text = render(
            &m,
            &[UpstreamView {
                url: "http://a",
                priority: 10,
                breaker: 1,
                metrics: &um,
            }],
            None,
            None,
        );
        assert!(text.contains("ferry_substituter_narinfo_hits_total 1\n"));
        assert!(
            text.contains("ferry_substituter_upstream_breaker_state{upstream=\"http://a\"} 1\n")
        );
        assert!(text.contains("le=\"0.0025\"} 0\n"));
        assert!(text.contains("le=\"0.005\"} 1\n"));
    }
}
