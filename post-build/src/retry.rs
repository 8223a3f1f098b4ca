//! When to try a failed job again: exponential back-off with jitter, honouring a server's
//! `Retry-After`. Jittered so that many jobs failing together (a cache outage) do not all
//! come back in the same instant; "equal jitter": half the delay is fixed, half random.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

/// A `Retry-After` longer than this is taken as this: a misconfigured server must not park
/// the queue for days.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

impl RetryPolicy {
    /// Delay before attempt `failures + 1`, where `failures ≥ 1` attempts have failed so far.
    /// `unit` is a random number in [0, 1).
    pub(crate) fn delay(
        &self,
        failures: u32,
        unit: f64,
        retry_after: Option<Duration>,
    ) -> Duration {
        let exp = failures.saturating_sub(1).min(32);
        let base = self
            .initial
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.max)
            .min(self.max);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let jittered = base / 2 + base.mul_f64(unit / 2.0);
        match retry_after {
            Some(ra) => jittered.max(ra.min(MAX_RETRY_AFTER)),
            None => jittered,
        }
    }
}

/// A random number in [0, 1) from the OS (jitter needs no cryptographic quality, but this is
/// simple and has no state).
pub(crate) fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Parses `Retry-After` in its delay-seconds form. The HTTP-date form is rare for uploads
/// (S3 and nginx send seconds) and falls back to normal back-off.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: RetryPolicy = RetryPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };

    #[test]
    fn doubles_then_caps() {
        // With unit = 1 the delay is the full base.
        let full: Vec<u64> = (1..=9).map(|f| P.delay(f, 1.0, None).as_secs()).collect();
        assert_eq!(full, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(P.delay(1000, 1.0, None), Duration::from_secs(60));
        assert_eq!(P.delay(0, 1.0, None), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_upper_half() {
        for f in 1..12 {
            let lo = P.delay(f, 0.0, None);
            let hi = P.delay(f, 0.999, None);
            assert!(lo <= hi);
            assert_eq!(lo * 2, P.delay(f, 1.0, None));
        }
        assert_eq!(P.delay(3, f64::NAN, None), P.delay(3, 0.5, None));
    }

    #[test]
    fn retry_after_is_a_floor_with_a_ceiling() {
        let ra = Some(Duration::from_secs(30));
        assert_eq!(P.delay(1, 0.0, ra), Duration::from_secs(30));
        assert_eq!(
            P.delay(9, 1.0, Some(Duration::from_secs(1))),
            Duration::from_secs(60)
        );
        assert_eq!(
            P.delay(1, 0.0, Some(Duration::from_secs(86400 * 7))),
            MAX_RETRY_AFTER
        );
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn random_unit_in_range() {
        for _ in 0..100 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
