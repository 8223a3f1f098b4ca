//! Per-upstream circuit breaker: a pure state machine, driven with explicit instants.
//!
//! Closed: requests flow; `failures_to_open` consecutive failures (connect errors, time-outs,
//! 5xx, garbage answers) open it. Open: requests skip the upstream until the cool-down ends.
//! Then the first caller gets [`Admit::Probe`] and the breaker is half-open: exactly one probe
//! (`GET /nix-cache-info`, run in the background by the caller) decides: success closes it,
//! failure reopens it with a doubled cool-down (capped). A `Retry-After` from the upstream
//! (429/503) opens it at once, for at least that long.
//!
//! Why: Nix 2.8 retries a failing substituter 5 times per request with back-off and aborts the
//! build on the first narinfo error (docs/binary-cache.md §2.2, §2.4); Ferry must make a dead upstream cheap
//! (≤ 5 ms once open, goal G5) and send it at most one probe per cool-down (goal G6).

use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BreakerConfig {
    pub(crate) failures_to_open: u32,
    pub(crate) cooldown: Duration,
    pub(crate) max_cooldown: Duration,
    /// A probe not reported within this time is presumed lost; another may start.
    pub(crate) probe_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { since: Instant },
}

/// What a caller may do with the upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Use it.
    Allow,
    /// Skip it for this request, and run the single health probe.
    Probe,
    /// Skip it.
    Reject,
}

#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    state: State,
    consecutive_failures: u32,
    /// Current open period; doubles when a probe fails.
    current_cooldown: Duration,
    /// When a request last succeeded: the upstream was alive then.
    last_success: Option<Instant>,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        let current_cooldown = config.cooldown;
        Breaker {
            config,
            state: State::Closed,
            consecutive_failures: 0,
            current_cooldown,
            last_success: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// 0 closed, 1 open, 2 half-open (the `/metrics` gauge).
    pub(crate) fn state_code(&self) -> u8 {
        match self.state {
            State::Closed => 0,
            State::Open { .. } => 1,
            State::HalfOpen { .. } => 2,
        }
    }

    pub(crate) fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed => Admit::Allow,
            State::Open { until } if now < until => Admit::Reject,
            State::Open { .. } => {
                self.state = State::HalfOpen { since: now };
                Admit::Probe
            }
            State::HalfOpen { since } if now.duration_since(since) >= self.config.probe_timeout => {
                self.state = State::HalfOpen { since: now };
                Admit::Probe
            }
            State::HalfOpen { .. } => Admit::Reject,
        }
    }

    /// Closed, but the last request(s) failed: the upstream may be going down. A race does
    /// not hold a lower-priority hit back for it (see `race.rs`, rule 1), so a dead upstream
    /// delays one lookup by its time-out, not every lookup until the breaker opens.
    pub(crate) fn suspect(&self) -> bool {
        self.state == State::Closed && self.consecutive_failures > 0
    }

    /// A request (or the probe) succeeded: any definite answer, including 404.
    pub(crate) fn on_success(&mut self) {
        self.on_success_at(Instant::now());
    }

    /// [`Breaker::on_success`] at `now`.
    pub(crate) fn on_success_at(&mut self, now: Instant) {
        self.last_success = Some(now);
        self.state = State::Closed;
        self.consecutive_failures = 0;
        self.current_cooldown = self.config.cooldown;
    }

    /// A request that started at `started` failed. When another request succeeded since, the
    /// upstream is alive and only busy (a short listen backlog under a burst drops SYNs, issue
    /// 12 "never a false miss"): the failure does not count towards opening the breaker,
    /// which would turn every lookup into a skip. A dead or black-holed upstream has no
    /// successes, so it still opens after `failures_to_open` failures (goal G5). A
    /// `Retry-After` always counts: the upstream asked for less traffic.
    pub(crate) fn on_failure_since(
        &mut self,
        now: Instant,
        started: Instant,
        retry_after: Option<Duration>,
    ) {
        let alive = self.last_success.is_some_and(|s| s >= started);
        if alive && retry_after.is_none() && self.state == State::Closed {
            return;
        }
        self.on_failure(now, retry_after);
    }

    /// A request failed in a way that says the upstream is unhealthy. `retry_after` is the
    /// upstream's `Retry-After`, if it sent one.
    pub(crate) fn on_failure(&mut self, now: Instant, retry_after: Option<Duration>) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let open_for = match self.state {
            // The probe failed: back off further.
            State::HalfOpen { .. } => {
                self.current_cooldown = (self.current_cooldown * 2).min(self.config.max_cooldown);
                Some(self.current_cooldown)
            }
            // Late failures of requests admitted before it opened do not extend the period.
            State::Open { .. } => None,
            State::Closed if self.consecutive_failures >= self.config.failures_to_open => {
                Some(self.current_cooldown)
            }
            State::Closed => None,
        };
        let open_for = match (open_for, retry_after) {
            (a, None) => a,
            (None, Some(r)) => Some(r.min(self.config.max_cooldown)),
            (Some(a), Some(r)) => Some(a.max(r.min(self.config.max_cooldown))),
        };
        if let Some(d) = open_for {
            let until = now + d;
            self.state = match self.state {
                State::Open { until: old } if old > until => State::Open { until: old },
                _ => State::Open { until },
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_overtaken_by_a_success_do_not_open_it() {
        let mut b = Breaker::new(BreakerConfig {
            failures_to_open: 3,
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        // A burst: 25 requests start at t0, one succeeds, the others time out after it.
        b.on_success_at(t0 + Duration::from_millis(5));
        for i in 0..24 {
            b.on_failure_since(t0 + Duration::from_millis(200 + i), t0, None);
        }
        assert_eq!(b.state(), State::Closed);
        assert!(!b.suspect());
        // Failures of requests started after the last success count: a host that died.
        let t1 = t0 + Duration::from_secs(1);
        for i in 0..3 {
            b.on_failure_since(t1 + Duration::from_millis(200 * i), t1, None);
        }
        assert!(matches!(b.state(), State::Open { .. }));
    }

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failures_to_open: 3,
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(5),
        }
    }

    /// The failures in a row that open a breaker with [`cfg`], all at `t`.
    fn fail_to_open(b: &mut Breaker, t: Instant) {
        for _ in 0..cfg().failures_to_open {
            b.on_failure(t, None);
        }
    }

    /// A breaker with [`cfg`] that opened at `t`.
    fn opened(t: Instant) -> Breaker {
        let mut b = Breaker::new(cfg());
        fail_to_open(&mut b, t);
        b
    }

    #[test]
    fn suspect_between_a_failure_and_the_next_success() {
        let mut b = Breaker::new(cfg());
        assert!(!b.suspect());
        b.on_failure(Instant::now(), None);
        assert!(b.suspect());
        b.on_success();
        assert!(!b.suspect());
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t = Instant::now();
        let mut b = Breaker::new(cfg());
        b.on_failure(t, None);
        b.on_failure(t, None);
        b.on_success();
        b.on_failure(t, None);
        b.on_failure(t, None);
        assert_eq!(
            b.admit(t),
            Admit::Allow,
            "a success in between resets the count"
        );
        b.on_failure(t, None);
        assert_eq!(b.admit(t), Admit::Reject);
        assert_eq!(b.state_code(), 1);
    }

    #[test]
    fn half_open_admits_a_single_probe() {
        let t = Instant::now();
        let mut b = opened(t);
        let later = t + Duration::from_secs(2);
        assert_eq!(b.admit(later), Admit::Probe);
        assert_eq!(b.admit(later), Admit::Reject, "only one probe at a time");
        assert_eq!(b.admit(later + Duration::from_secs(1)), Admit::Reject);
        b.on_success();
        assert_eq!(b.admit(later), Admit::Allow);
    }

    #[test]
    fn failed_probe_doubles_the_cooldown_up_to_the_cap() {
        let t = Instant::now();
        let mut b = opened(t);
        let mut now = t + Duration::from_secs(2);
        let mut expected = Duration::from_secs(4);
        for _ in 0..10 {
            assert_eq!(b.admit(now), Admit::Probe);
            b.on_failure(now, None);
            assert_eq!(
                b.admit(now + expected - Duration::from_millis(1)),
                Admit::Reject
            );
            now += expected;
            expected = (expected * 2).min(Duration::from_secs(60));
        }
        assert_eq!(b.admit(now), Admit::Probe);
        b.on_success();
        // Back to the base cool-down after recovery.
        fail_to_open(&mut b, now);
        assert_eq!(b.admit(now + Duration::from_secs(2)), Admit::Probe);
    }

    #[test]
    fn lost_probe_is_replaced_after_its_timeout() {
        let t = Instant::now();
        let mut b = opened(t);
        let p = t + Duration::from_secs(2);
        assert_eq!(b.admit(p), Admit::Probe);
        assert_eq!(b.admit(p + Duration::from_secs(5)), Admit::Probe);
    }

    #[test]
    fn retry_after_opens_at_once_for_that_long() {
        let t = Instant::now();
        let mut b = Breaker::new(cfg());
        b.on_failure(t, Some(Duration::from_secs(10)));
        assert_eq!(b.admit(t + Duration::from_secs(9)), Admit::Reject);
        assert_eq!(b.admit(t + Duration::from_secs(10)), Admit::Probe);
        // A huge Retry-After is capped.
        let mut b = Breaker::new(cfg());
        b.on_failure(t, Some(Duration::from_secs(86_400)));
        assert_eq!(b.admit(t + Duration::from_secs(60)), Admit::Probe);
    }

    #[test]
    fn late_failures_do_not_extend_an_open_period() {
        let t = Instant::now();
        let mut b = opened(t);
        b.on_failure(t + Duration::from_secs(1), None);
        assert_eq!(b.admit(t + Duration::from_secs(2)), Admit::Probe);
    }
}
