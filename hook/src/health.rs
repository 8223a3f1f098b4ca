//! What Ferry remembers about each builder, and the rules that turn it into decisions.
//! Pure: times are passed in (milliseconds since the Unix epoch), randomness too; the
//! on-disk store is [`crate::health_store`].
//!
//! Why this exists: the daemon starts a new hook process for every accepted build
//! (docs/hook-protocol.md §1.9), so the stock hook's in-memory "this machine failed" dies with
//! each accept, and every derivation pays the dead builder's SSH time-out again
//! (NixOS/nix#13513, #1712). Ferry keeps the verdict on disk, shared by every hook.
//!
//! States, a circuit breaker per builder:
//! - `unknown` (never reached, or the state file is gone): probed before use;
//! - `up`: used; re-probed when the last check is older than `stale-after`;
//! - `down`: skipped until its back-off ends (exponential, capped, with jitter); then one
//!   hook (holding the builder's probe lock) probes it — half-open — and either brings it
//!   back `up` or doubles the back-off.

use crate::config::Tuning;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum State {
    #[default]
    Unknown,
    Up,
    Down,
}

impl State {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Down => "down",
        }
    }
}

/// How many recent build durations are kept.
pub(crate) const RECENT_BUILDS: usize = 8;
/// Weight of a new sample in the moving averages of latency and transfer rate.
const EWMA_ALPHA: f64 = 0.3;
/// Longest back-off exponent (2^20 × base is far beyond any cap).
const MAX_EXPONENT: u32 = 20;
/// Transfers smaller than this measure round trips, not bandwidth.
pub(crate) const MIN_RATE_BYTES: u64 = 256 * 1024;

/// One builder's health, as stored in its state file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct Health {
    pub(crate) store_uri: String,
    pub(crate) state: State,
    /// When `state` last changed.
    pub(crate) since_ms: u64,
    /// When the builder was last checked (probe, connect or build).
    pub(crate) checked_ms: u64,
    pub(crate) consecutive_failures: u32,
    /// While `down`: no hook tries the builder before this time.
    pub(crate) backoff_until_ms: u64,
    pub(crate) last_error: Option<String>,
    pub(crate) last_error_ms: Option<u64>,
    /// Moving average of the time to reach the builder (SSH and serve handshake).
    pub(crate) latency_ms: Option<f64>,
    /// Moving average of copy throughput (to and from the builder), bytes per second.
    pub(crate) transfer_rate: Option<f64>,
    /// Durations of the most recent remote builds, oldest first, in seconds.
    pub(crate) build_secs: Vec<f64>,
    /// Probes and connection attempts made so far (successful or not).
    pub(crate) attempts: u64,
}

/// What a hook should do with a builder right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Recently seen up: select it (the connect before accept still checks it).
    Healthy,
    /// Unknown, stale, or at the end of its back-off: probe it first.
    Probe,
    /// Down and backing off until the given time: skip it.
    BackingOff { until_ms: u64 },
}

impl Health {
    pub(crate) fn new(store_uri: &str) -> Self {
        Health {
            store_uri: store_uri.to_owned(),
            ..Health::default()
        }
    }

    pub(crate) fn verdict(&self, now_ms: u64, t: &Tuning) -> Verdict {
        match self.state {
            State::Unknown => Verdict::Probe,
            State::Up => {
                if now_ms.saturating_sub(self.checked_ms) < t.stale_after.as_millis() as u64 {
                    Verdict::Healthy
                } else {
                    Verdict::Probe
                }
            }
            State::Down if now_ms < self.backoff_until_ms => Verdict::BackingOff {
                until_ms: self.backoff_until_ms,
            },
            State::Down => Verdict::Probe,
        }
    }

    fn set_state(&mut self, s: State, now_ms: u64) {
        if self.state != s {
            self.state = s;
            self.since_ms = now_ms;
        }
    }

    /// A probe or connection reached the builder's Nix in `latency_ms`.
    pub fn record_success(&mut self, now_ms: u64, latency_ms: Option<f64>) {
        self.set_state(State::Up, now_ms);
        self.checked_ms = now_ms;
        self.consecutive_failures = 0;
        self.backoff_until_ms = 0;
        self.attempts += 1;
        if let Some(l) = latency_ms {
            self.latency_ms = Some(ewma(self.latency_ms, l));
        }
    }

    /// A probe, connection or copy failed for a reason on the builder's side. `jitter` in
    /// [0, 1) spreads the retries of many clients.
    pub(crate) fn record_failure(&mut self, now_ms: u64, error: &str, t: &Tuning, jitter: f64) {
        self.set_state(State::Down, now_ms);
        self.checked_ms = now_ms;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.attempts += 1;
        self.last_error = Some(error.to_owned());
        self.last_error_ms = Some(now_ms);
        self.backoff_until_ms =
            now_ms.saturating_add(backoff_ms(self.consecutive_failures, t, jitter));
    }

    /// A remote build finished (successfully or with a build failure, which says nothing
    /// against the builder). `transfer` is bytes copied and the seconds it took.
    pub(crate) fn record_build(
        &mut self,
        now_ms: u64,
        build_secs: f64,
        transfer: Option<(u64, f64)>,
    ) {
        self.set_state(State::Up, now_ms);
        self.checked_ms = now_ms;
        self.consecutive_failures = 0;
        self.backoff_until_ms = 0;
        self.build_secs.push(build_secs);
        if self.build_secs.len() > RECENT_BUILDS {
            let extra = self.build_secs.len() - RECENT_BUILDS;
            self.build_secs.drain(..extra);
        }
        if let Some((bytes, secs)) = transfer
            && bytes >= MIN_RATE_BYTES
            && secs > 0.0
        {
            self.transfer_rate = Some(ewma(self.transfer_rate, bytes as f64 / secs));
        }
    }

    pub(crate) fn mean_build_secs(&self) -> Option<f64> {
        if self.build_secs.is_empty() {
            None
        } else {
            Some(self.build_secs.iter().sum::<f64>() / self.build_secs.len() as f64)
        }
    }
}

fn ewma(old: Option<f64>, sample: f64) -> f64 {
    match old {
        Some(o) => o + EWMA_ALPHA * (sample - o),
        None => sample,
    }
}

/// Back-off after the `failures`-th consecutive failure: `base × 2^(failures−1)`, capped,
/// then shortened by up to 20 % at random so clients that saw the same outage do not all
/// come back at the same instant; the cap is never exceeded.
pub(crate) fn backoff_ms(failures: u32, t: &Tuning, jitter: f64) -> u64 {
    let exp = failures.saturating_sub(1).min(MAX_EXPONENT);
    let base = t.backoff_base.as_millis() as u64;
    let cap = t.backoff_cap.as_millis() as u64;
    let full = base.saturating_mul(1u64 << exp).min(cap);
    let j = jitter.clamp(0.0, 1.0);
    full - (full as f64 * 0.2 * j) as u64
}

/// A pseudo-random number in [0, 1) from the clock and the process id; good enough to
/// spread retries (no cryptographic use).
pub(crate) fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // splitmix64
    let mut z = nanos ^ (u64::from(std::process::id()) << 32);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `14:03:05 UTC` for a time today-ish, `2025-11-03 14:03:05 UTC` otherwise.
pub(crate) fn format_utc(ms: u64, now_ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if days == now_ms / 1000 / 86_400 {
        return format!("{h:02}:{m:02}:{s:02} UTC");
    }
    let (y, mo, d, ..) = ferry_nix::civil::utc(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02} UTC")
}

/// `42 s`, `3 min`, `2 h`.
pub(crate) fn format_age(ms: u64) -> String {
    let s = ms / 1000;
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s / 60)
    } else {
        format!("{} h", s / 3600)
    }
}

/// One line about a builder for humans: `down since 14:03:05 UTC (12 s ago, 3 failures,
/// next try in 8 s): <error>`.
pub(crate) fn describe(h: &Health, now_ms: u64) -> String {
    let mut s = String::from(h.state.as_str());
    match h.state {
        State::Unknown => s.push_str(" (not reached yet)"),
        State::Up => {
            let _ = write!(
                s,
                " since {} ({} ago)",
                format_utc(h.since_ms, now_ms),
                format_age(now_ms.saturating_sub(h.since_ms))
            );
        }
        State::Down => {
            let _ = write!(
                s,
                " since {} ({} ago, {} failure{}",
                format_utc(h.since_ms, now_ms),
                format_age(now_ms.saturating_sub(h.since_ms)),
                h.consecutive_failures,
                if h.consecutive_failures == 1 { "" } else { "s" }
            );
            if h.backoff_until_ms > now_ms {
                let _ = write!(
                    s,
                    ", next try in {}",
                    format_age(h.backoff_until_ms - now_ms)
                );
            }
            s.push(')');
            if let Some(e) = &h.last_error {
                let _ = write!(s, ": {e}");
            }
        }
    }
    s
}

/// What the fast-fail message needs to know about the local host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LocalSituation {
    /// `max-jobs` is 0: the daemon never builds locally.
    pub(crate) max_jobs_zero: bool,
    /// The local platform and features fit the derivation.
    pub(crate) could_build: bool,
}

/// The message shown (as an `@nix` error) when a derivation can go nowhere: every builder
/// that could take it is down and the host does not build locally. It names each builder
/// with its state, since when and why, and says how to build locally instead — the seed
/// incident's users had to find `--option max-jobs auto --option builders ""` by hand.
pub(crate) fn render_no_builder(
    drv: &str,
    system: &str,
    builders: &[Health],
    local: LocalSituation,
    now_ms: u64,
) -> String {
    let mut s = format!(
        "ferry-build-hook: cannot build '{drv}' ({system}): no remote builder is available"
    );
    if local.max_jobs_zero {
        s.push_str(" and local builds are disabled (max-jobs = 0).");
    } else if !local.could_build {
        let _ = write!(
            s,
            " and this machine cannot build '{system}' derivations with the required features."
        );
    } else {
        s.push('.');
    }
    for h in builders {
        let _ = write!(s, "\n  {}: {}", h.store_uri, describe(h, now_ms));
    }
    if local.could_build {
        s.push_str(
            "\nTo build on this machine instead, pass '--max-jobs 1' (or more) to nix-build / \
             nix build, or '--builders \"\"' to skip remote builders; \
             'ferry-build-hook status' shows the builders' health.",
        );
    } else {
        s.push_str("\n'ferry-build-hook status' shows the builders' health; 'ferry-build-hook probe' checks them now.");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tuning() -> Tuning {
        Tuning {
            probe_timeout: Duration::from_secs(1),
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(60),
            stale_after: Duration::from_secs(30),
            ..Tuning::default()
        }
    }

    #[test]
    fn unknown_is_probed_up_is_used_until_stale() {
        let t = tuning();
        let mut h = Health::new("ssh://a");
        assert_eq!(h.verdict(1_000, &t), Verdict::Probe);
        h.record_success(1_000, Some(20.0));
        assert_eq!(h.state, State::Up);
        assert_eq!(h.since_ms, 1_000);
        assert_eq!(h.verdict(20_000, &t), Verdict::Healthy);
        assert_eq!(h.verdict(31_000, &t), Verdict::Probe);
        h.record_success(31_000, Some(40.0));
        assert_eq!(h.since_ms, 1_000, "still up since the first success");
        assert_eq!(h.latency_ms, Some(26.0));
        assert_eq!(h.attempts, 2);
    }

    #[test]
    fn failures_back_off_exponentially_then_half_open() {
        let t = tuning();
        let mut h = Health::new("ssh://a");
        h.record_success(0, None);
        h.record_failure(5_000, "timed out", &t, 0.0);
        assert_eq!(h.state, State::Down);
        assert_eq!(h.since_ms, 5_000);
        assert_eq!(h.backoff_until_ms, 15_000);
        assert_eq!(
            h.verdict(14_999, &t),
            Verdict::BackingOff { until_ms: 15_000 }
        );
        // Back-off over: one probe (the caller holds the probe lock).
        assert_eq!(h.verdict(15_000, &t), Verdict::Probe);
        h.record_failure(15_000, "timed out", &t, 0.0);
        assert_eq!(h.backoff_until_ms, 35_000);
        assert_eq!(h.since_ms, 5_000, "down since the first failure");
        h.record_failure(35_000, "refused", &t, 0.0);
        assert_eq!(h.backoff_until_ms, 75_000);
        h.record_failure(75_000, "refused", &t, 0.0);
        assert_eq!(h.backoff_until_ms, 135_000, "capped at 60 s");
        assert_eq!(h.consecutive_failures, 4);
        assert_eq!(h.last_error.as_deref(), Some("refused"));
        // Recovery resets everything.
        h.record_success(140_000, Some(5.0));
        assert_eq!(
            (h.state, h.consecutive_failures, h.backoff_until_ms),
            (State::Up, 0, 0)
        );
        assert_eq!(h.since_ms, 140_000);
    }

    #[test]
    fn backoff_jitter_shortens_but_never_exceeds_the_cap() {
        let t = tuning();
        assert_eq!(backoff_ms(1, &t, 0.0), 10_000);
        assert_eq!(backoff_ms(2, &t, 0.0), 20_000);
        assert_eq!(backoff_ms(1, &t, 0.5), 9_000);
        assert_eq!(backoff_ms(99, &t, 0.0), 60_000);
        assert_eq!(backoff_ms(u32::MAX, &t, 0.999_999), 48_001);
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
            let b = backoff_ms(3, &t, j);
            assert!((32_000..=40_000).contains(&b), "{b}");
        }
    }

    #[test]
    fn builds_keep_recent_times_and_rates() {
        let mut h = Health::new("ssh://a");
        for i in 0..10 {
            h.record_build(i, i as f64, Some((1 << 20, 0.5)));
        }
        assert_eq!(h.build_secs.len(), RECENT_BUILDS);
        assert_eq!(h.build_secs[0], 2.0);
        assert_eq!(h.mean_build_secs(), Some(5.5));
        assert_eq!(h.transfer_rate, Some(2.0 * (1 << 20) as f64));
        // Small copies say nothing about bandwidth.
        let mut g = Health::new("ssh://b");
        g.record_build(0, 1.0, Some((1000, 0.001)));
        assert_eq!(g.transfer_rate, None);
    }

    #[test]
    fn state_file_round_trips_and_tolerates_missing_fields() {
        let mut h = Health::new("ssh://root@h");
        h.record_failure(1_700_000_000_000, "Connection refused", &tuning(), 0.0);
        let text = serde_json::to_string(&h).expect("json");
        assert!(text.contains("\"state\":\"down\""), "{text}");
        let back: Health = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, h);
        let old: Health =
            serde_json::from_str(r#"{"store-uri":"ssh://x","state":"up","future-field":1}"#)
                .expect("lenient");
        assert_eq!(old.state, State::Up);
    }

    #[test]
    fn times_render_in_utc() {
        let now = 1_762_178_585_000; // 2025-11-03 14:03:05 UTC
        assert_eq!(format_utc(now, now), "14:03:05 UTC");
        assert_eq!(format_utc(now - 86_400_000, now), "2025-11-02 14:03:05 UTC");
        assert_eq!(format_utc(951_782_400_000, now), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_age(59_999), "59 s");
        assert_eq!(format_age(600_000), "10 min");
        assert_eq!(format_age(3 * 3_600_000), "3 h");
    }

    #[test]
    fn no_builder_message_names_each_builder_and_the_way_out() {
        let now = 1_762_178_585_000;
        let t = tuning();
        let mut a = Health::new("ssh://root@10.0.0.2");
        a.record_failure(now - 12_000, "no answer within 1 s", &t, 0.0);
        let b = Health::new("ssh://root@10.0.0.3");
        let msg = render_no_builder(
            "/nix/store/abc-x.drv",
            "x86_64-linux",
            &[a, b],
            LocalSituation {
                max_jobs_zero: true,
                could_build: true,
            },
            now,
        );
        assert!(
            msg.contains("cannot build '/nix/store/abc-x.drv' (x86_64-linux)"),
            "{msg}"
        );
        assert!(msg.contains("max-jobs = 0"), "{msg}");
        assert!(
            msg.contains("ssh://root@10.0.0.2: down since 14:02:53 UTC (12 s ago, 1 failure): no answer within 1 s"),
            "{msg}"
        );
        assert!(msg.contains("ssh://root@10.0.0.3: unknown"), "{msg}");
        assert!(
            msg.contains("--max-jobs 1") && msg.contains("--builders \"\""),
            "{msg}"
        );
        let other = render_no_builder(
            "/nix/store/abc-x.drv",
            "aarch64-linux",
            &[],
            LocalSituation {
                max_jobs_zero: false,
                could_build: false,
            },
            now,
        );
        assert!(other.contains("cannot build 'aarch64-linux'"), "{other}");
        assert!(!other.contains("--max-jobs"), "{other}");
    }
}
