//! The priority race: which upstream's answer Ferry serves, and when.
//!
//! Upstreams are ordered by priority (lower first, as in Nix). The shell asks the first one at
//! once and each next one after a head start (or at once when every earlier one has already
//! answered without a usable hit). [`decide`] is then called after every answer and at the
//! deadline, and applies this rule:
//!
//! 1. **Priority wins within the deadline.** The highest-priority acceptable hit is served as
//!    soon as every higher-priority upstream has resolved (missed, failed, was skipped, or gave
//!    an unacceptable answer). A lower-priority hit that arrives first waits for them; it never
//!    beats a higher-priority hit that arrives before the deadline.
//! 2. **Trust before priority.** Given Nix's `trusted-public-keys`, a hit Nix would trust (a
//!    valid signature by a trusted key, or a `CA:` field) beats any untrusted hit. Untrusted
//!    hits are served only when `serve-untrusted` is set and no trusted hit exists.
//! 3. **At the deadline,** still-pending upstreams no longer hold back a hit: the best hit so
//!    far is served.
//! 4. **A 404 means "not here" from every upstream that could hold the path** (issue 12,
//!    "never a false miss"). Upstreams that are down (breaker open) or answer garbage cannot
//!    serve the path either way and do not hold a 404 back; it is then not cached by Ferry.
//!    Negative caching happens only for a *definitive* miss: every upstream answered 404 (or
//!    untrusted). Errors never create negative entries (docs/binary-cache.md §5.1 rule 2, ncps#298).
//!
//! 5. **A transient failure of a live upstream is retried until the patience runs out**
//!    ([`retry_delay`]): a connect error or time-out, a read time-out, a reset, a 5xx or a
//!    rate-limit skip gets more attempts after [`RETRY_BACKOFFS`] (the last one repeating),
//!    with a longer, latency-adaptive connect time-out, as long as the upstream's breaker
//!    stays closed and an attempt still fits before `narinfo-patience-ms`. Meanwhile the
//!    slot is [`Slot::Retrying`], which counts as failed for rule 1 (a lower-priority hit is
//!    served at once, exactly as without retries) but keeps a 404 from being decided. If the
//!    patience runs out with no definite answer from a live upstream, the answer is
//!    [`Decision::Unknown`]: a 503, never a 404. Why: Nix remembers a narinfo 404 for
//!    `narinfo-cache-negative-ttl` (an hour by default, docs/binary-cache.md §2.5); a 503 is retried by Nix
//!    (up to 5 attempts, each a new race here) and never cached (see the README).
//!
//! 6. **A suspect upstream is not waited for.** An upstream whose last requests failed (its
//!    breaker is closed but counting failures) starts each race as [`Slot::Retrying`] rather
//!    than pending: a lower-priority hit is served without waiting for it, and its own answer
//!    still counts when it comes (a hit of its own wins if nothing better is there; a 404
//!    waits for it). It stops being suspect at its first success.
//!
//! A dead first upstream therefore costs its connect time-out (200 ms by default): its failure
//! starts the next upstream at once (unless the head start already has) and rule 1 lets the
//! next hit through, so the lookup takes the connect time-out plus the next upstream's latency
//! (goal G5: 250 ms in all), and only for the lookups that find it dead first: the ones after
//! them find it suspect (rule 6). Its retries delay only a 404, by at most two back-offs and connect
//! time-outs, and only until its breaker opens (three failures by default).

use std::time::Duration;

/// What one upstream has said so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Not asked yet, or no answer yet.
    Pending,
    /// A valid narinfo (or other object) for the requested path.
    Hit { trusted: bool },
    /// A definite "not here" (404, 410, 403).
    Miss,
    /// Connect error, time-out, 5xx, 429, or an invalid answer.
    Failed,
    /// Not asked: breaker open, rate limit, or in-flight cap.
    Skipped,
    /// Failed transiently; another attempt is waiting for its back-off or running. Counts as
    /// failed when a hit waits on it, as pending when only a 404 is left (rule 5).
    Retrying,
    /// A live upstream that failed only transiently and is not asked again (its patience ran
    /// out): it may hold the path, so the race cannot end in a 404 (rule 5).
    Unanswered,
}

/// How far into the race the shell is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Before `narinfo-deadline-ms`.
    Racing,
    /// After the deadline: pending upstreams no longer hold back a hit (rule 3).
    PastDeadline,
    /// After `narinfo-patience-ms`: nothing is waited for any more.
    PastPatience,
}

/// Why an attempt failed, as far as trying again is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// Connect error or time-out, read time-out, reset, 5xx: a fresh attempt may well succeed.
    Transient,
    /// The same request would get the same answer: an invalid or wrong narinfo, too large a
    /// body, a 429 or another 4xx.
    Permanent,
}

/// Back-off before the second, third and every later attempt at one upstream within one race.
pub(crate) const RETRY_BACKOFFS: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(150),
    Duration::from_millis(300),
];

/// After attempt number `attempts` (1 for the first) at one upstream failed with `kind`,
/// `elapsed` into a race with `deadline` (the patience): the back-off before the next attempt,
/// or `None` to give up on this upstream. `breaker_closed` is the upstream's breaker after this
/// failure was recorded: an open breaker means the upstream is presumed down, and retries
/// would only prolong the miss (goal G5). `min_attempt` (the next attempt's connect time-out)
/// is the least time an attempt needs to be worth sending before the deadline.
pub(crate) fn retry_delay(
    kind: FailureKind,
    attempts: u32,
    breaker_closed: bool,
    elapsed: Duration,
    deadline: Duration,
    min_attempt: Duration,
) -> Option<Duration> {
    if kind != FailureKind::Transient || !breaker_closed {
        return None;
    }
    let i = usize::try_from(attempts).ok()?.checked_sub(1)?;
    let backoff = RETRY_BACKOFFS[i.min(RETRY_BACKOFFS.len() - 1)];
    (elapsed + backoff + min_attempt <= deadline).then_some(backoff)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Keep waiting for higher-priority answers.
    Wait,
    /// Serve this upstream's answer.
    Serve(usize),
    /// Answer 404; cache the miss only if `definitive`.
    NotFound { definitive: bool },
    /// No definite answer from a live upstream within the patience: answer 503 (rule 5).
    Unknown,
}

/// Applies the rule above to `slots` (in priority order).
pub(crate) fn decide(slots: &[Slot], phase: Phase, serve_untrusted: bool) -> Decision {
    let past_deadline = phase != Phase::Racing;
    let resolved = |s: &Slot| past_deadline || *s != Slot::Pending;
    // Rule 1 and 2: the first trusted hit wins once everything before it has resolved.
    if let Some(t) = slots.iter().position(|s| *s == Slot::Hit { trusted: true }) {
        if slots[..t].iter().all(resolved) {
            return Decision::Serve(t);
        }
        return Decision::Wait;
    }
    if !slots.iter().all(resolved) {
        return Decision::Wait;
    }
    // Nothing trusted anywhere and nothing left to hear from.
    if serve_untrusted
        && let Some(u) = slots
            .iter()
            .position(|s| *s == Slot::Hit { trusted: false })
    {
        return Decision::Serve(u);
    }
    // Rule 5: a 404 waits for live upstreams still being asked, until the patience runs out.
    if slots
        .iter()
        .any(|s| matches!(s, Slot::Pending | Slot::Retrying))
    {
        return match phase {
            Phase::PastPatience => Decision::Unknown,
            _ => Decision::Wait,
        };
    }
    if slots.contains(&Slot::Unanswered) {
        return Decision::Unknown;
    }
    let definitive = slots
        .iter()
        .all(|s| matches!(s, Slot::Miss | Slot::Hit { trusted: false }));
    Decision::NotFound { definitive }
}

/// Whether upstream `next` should be asked now, before its head-start timer fires: every
/// upstream before it has resolved and none of them is a hit that could still win.
pub(crate) fn start_next_early(slots: &[Slot], next: usize) -> bool {
    slots[..next.min(slots.len())].iter().all(|s| {
        matches!(
            s,
            Slot::Miss
                | Slot::Failed
                | Slot::Retrying
                | Slot::Unanswered
                | Slot::Skipped
                | Slot::Hit { trusted: false }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Slot::*;

    const T: Slot = Hit { trusted: true };
    const U: Slot = Hit { trusted: false };

    /// Checks [`decide`] on each case (slots, phase, `serve_untrusted`, wanted decision),
    /// naming the case that fails.
    fn check(cases: &[(&[Slot], Phase, bool, Decision)]) {
        for &(slots, phase, serve_untrusted, want) in cases {
            assert_eq!(
                decide(slots, phase, serve_untrusted),
                want,
                "{slots:?} {phase:?} serve_untrusted={serve_untrusted}"
            );
        }
    }

    const MISS: Decision = Decision::NotFound { definitive: true };
    const UNCACHED_MISS: Decision = Decision::NotFound { definitive: false };

    #[test]
    fn higher_priority_hit_wins_even_when_it_arrives_later() {
        check(&[
            // The second upstream answered first: wait for the first.
            (&[Pending, T], Phase::Racing, false, Decision::Wait),
            (&[T, T], Phase::Racing, false, Decision::Serve(0)),
        ]);
    }

    #[test]
    fn lower_priority_hit_wins_once_higher_ones_resolve() {
        check(&[
            (&[Miss, T], Phase::Racing, false, Decision::Serve(1)),
            // Every higher one, not just some: the second is still being asked.
            (&[Miss, Pending, T], Phase::Racing, false, Decision::Wait),
            (
                &[Failed, Skipped, T, Pending],
                Phase::Racing,
                false,
                Decision::Serve(2),
            ),
        ]);
    }

    #[test]
    fn deadline_turns_pending_into_failed() {
        check(&[
            (
                &[Pending, T],
                Phase::PastDeadline,
                false,
                Decision::Serve(1),
            ),
            // A live upstream still asked holds a 404 back until the patience runs out, then
            // the answer is "unknown", never a 404 (issue 12).
            (&[Pending, Miss], Phase::PastDeadline, false, Decision::Wait),
            (
                &[Pending, Miss],
                Phase::PastPatience,
                false,
                Decision::Unknown,
            ),
        ]);
    }

    #[test]
    fn trusted_beats_untrusted_regardless_of_priority() {
        check(&[
            (&[U, T], Phase::Racing, false, Decision::Serve(1)),
            (&[U, Pending], Phase::Racing, true, Decision::Wait),
            (&[U, Miss], Phase::Racing, true, Decision::Serve(0)),
            (&[U, Miss], Phase::Racing, false, MISS),
        ]);
    }

    #[test]
    fn only_complete_answers_are_definitive_misses() {
        check(&[
            (&[Miss, Miss], Phase::Racing, false, MISS),
            (&[Miss, Failed], Phase::Racing, false, UNCACHED_MISS),
            (&[Miss, Skipped], Phase::Racing, false, UNCACHED_MISS),
            (&[Miss, Pending], Phase::Racing, false, Decision::Wait),
            (&[], Phase::Racing, false, MISS),
        ]);
    }

    #[test]
    fn next_upstream_starts_early_only_after_earlier_ones_fail_or_miss() {
        assert!(start_next_early(&[Failed, Pending], 1));
        assert!(start_next_early(&[Miss, Skipped, Pending], 2));
        assert!(!start_next_early(&[Pending, Pending], 1));
        assert!(!start_next_early(&[T, Pending], 1));
        assert!(start_next_early(&[Retrying, Pending], 1));
    }

    #[test]
    fn a_retrying_upstream_never_delays_a_lower_priority_hit() {
        check(&[
            // As if it had failed: the dead-upstream case costs what it cost without retries.
            (&[Retrying, T], Phase::Racing, false, Decision::Serve(1)),
            (&[Retrying, U], Phase::Racing, true, Decision::Serve(1)),
            (&[Retrying, Pending], Phase::Racing, false, Decision::Wait),
            // Its retry can still win while the lower ones are pending.
            (&[T, Pending], Phase::Racing, false, Decision::Serve(0)),
        ]);
    }

    #[test]
    fn a_retrying_upstream_holds_back_a_404_until_the_deadline() {
        check(&[
            (&[Retrying, Miss], Phase::Racing, false, Decision::Wait),
            (&[Miss, Retrying], Phase::Racing, false, Decision::Wait),
            (&[Retrying], Phase::Racing, false, Decision::Wait),
            (
                &[Retrying, Miss],
                Phase::PastDeadline,
                false,
                Decision::Wait,
            ),
            (
                &[Retrying, Miss],
                Phase::PastPatience,
                false,
                Decision::Unknown,
            ),
            (&[Unanswered, Miss], Phase::Racing, false, Decision::Unknown),
            // Down (breaker open) or garbage: it cannot serve the path; an uncached 404.
            (&[Skipped, Miss], Phase::Racing, false, UNCACHED_MISS),
            // Given up after its last attempt: an uncached 404 as before.
            (&[Failed, Miss], Phase::Racing, false, UNCACHED_MISS),
        ]);
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn transient_failures_are_retried_with_growing_back_off_while_time_remains() {
        let t = FailureKind::Transient;
        let d = MS(2000);
        assert_eq!(retry_delay(t, 1, true, MS(500), d, MS(250)), Some(MS(50)));
        assert_eq!(retry_delay(t, 2, true, MS(800), d, MS(250)), Some(MS(150)));
        assert_eq!(retry_delay(t, 3, true, MS(1000), d, MS(250)), Some(MS(300)));
        assert_eq!(retry_delay(t, 9, true, MS(1000), d, MS(250)), Some(MS(300)));
        assert_eq!(retry_delay(t, 0, true, MS(0), d, MS(250)), None);
    }

    #[test]
    fn permanent_failures_and_open_breakers_are_not_retried() {
        let d = MS(2000);
        assert_eq!(
            retry_delay(FailureKind::Permanent, 1, true, MS(10), d, MS(250)),
            None
        );
        assert_eq!(
            retry_delay(FailureKind::Transient, 1, false, MS(10), d, MS(250)),
            None
        );
    }

    #[test]
    fn retries_never_run_past_the_deadline() {
        let t = FailureKind::Transient;
        let d = MS(2000);
        // The attempt after the back-off must have one connect time-out left.
        assert_eq!(retry_delay(t, 1, true, MS(1700), d, MS(250)), Some(MS(50)));
        assert_eq!(retry_delay(t, 1, true, MS(1701), d, MS(250)), None);
        assert_eq!(retry_delay(t, 2, true, MS(1650), d, MS(250)), None);
        assert_eq!(retry_delay(t, 1, true, MS(2500), d, MS(250)), None);
    }
}
