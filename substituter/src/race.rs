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
//! 3. **At the deadline,** still-pending upstreams count as failed: the best hit so far is
//!    served, else 404.
//! 4. **Negative caching** happens only for a *definitive* miss: every upstream answered and
//!    none had an acceptable hit. A failure, time-out, skipped (breaker open, rate limited)
//!    or pending upstream makes the 404 non-definitive and uncached (doc §5.1 rule 2, ncps#298).
//!
//! A dead first upstream therefore costs its connect time-out (250 ms by default), after which
//! rule 1 lets the next hit through: about the head start plus the next upstream's latency.

/// What one upstream has said so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep waiting for higher-priority answers.
    Wait,
    /// Serve this upstream's answer.
    Serve(usize),
    /// Answer 404; cache the miss only if `definitive`.
    NotFound { definitive: bool },
}

/// Applies the rule above to `slots` (in priority order).
pub fn decide(slots: &[Slot], deadline_passed: bool, serve_untrusted: bool) -> Decision {
    let resolved = |s: &Slot| deadline_passed || *s != Slot::Pending;
    // Rule 1 and 2: the first trusted hit wins once everything before it has resolved.
    if let Some(t) = slots.iter().position(|s| *s == Slot::Hit { trusted: true }) {
        if slots[..t].iter().all(resolved) {
            return Decision::Serve(t);
        }
        return Decision::Wait;
    }
    let all_resolved = slots.iter().all(resolved);
    if !all_resolved {
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
    let definitive = !deadline_passed
        && slots
            .iter()
            .all(|s| matches!(s, Slot::Miss | Slot::Hit { trusted: false }));
    Decision::NotFound { definitive }
}

/// Whether upstream `next` should be asked now, before its head-start timer fires: every
/// upstream before it has resolved and none of them is a hit that could still win.
pub fn start_next_early(slots: &[Slot], next: usize) -> bool {
    slots[..next.min(slots.len())].iter().all(|s| {
        matches!(
            s,
            Slot::Miss | Slot::Failed | Slot::Skipped | Slot::Hit { trusted: false }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Slot::*;

    const T: Slot = Hit { trusted: true };
    const U: Slot = Hit { trusted: false };

    #[test]
    fn higher_priority_hit_wins_even_when_it_arrives_later() {
        // The second upstream answered first: wait for the first.
        assert_eq!(decide(&[Pending, T], false, false), Decision::Wait);
        assert_eq!(decide(&[T, T], false, false), Decision::Serve(0));
    }

    #[test]
    fn lower_priority_hit_wins_once_higher_ones_resolve() {
        assert_eq!(decide(&[Miss, T], false, false), Decision::Serve(1));
        assert_eq!(
            decide(&[Failed, Skipped, T, Pending], false, false),
            Decision::Serve(2)
        );
    }

    #[test]
    fn deadline_turns_pending_into_failed() {
        assert_eq!(decide(&[Pending, T], true, false), Decision::Serve(1));
        assert_eq!(
            decide(&[Pending, Miss], true, false),
            Decision::NotFound { definitive: false }
        );
    }

    #[test]
    fn trusted_beats_untrusted_regardless_of_priority() {
        assert_eq!(decide(&[U, T], false, false), Decision::Serve(1));
        assert_eq!(decide(&[U, Pending], false, true), Decision::Wait);
        assert_eq!(decide(&[U, Miss], false, true), Decision::Serve(0));
        assert_eq!(
            decide(&[U, Miss], false, false),
            Decision::NotFound { definitive: true }
        );
    }

    #[test]
    fn only_complete_answers_are_definitive_misses() {
        assert_eq!(
            decide(&[Miss, Miss], false, false),
            Decision::NotFound { definitive: true }
        );
        for s in [Failed, Skipped] {
            assert_eq!(
                decide(&[Miss, s], false, false),
                Decision::NotFound { definitive: false },
                "{s:?}"
            );
        }
        assert_eq!(decide(&[Miss, Pending], false, false), Decision::Wait);
        assert_eq!(
            decide(&[], false, false),
            Decision::NotFound { definitive: true }
        );
    }

    #[test]
    fn next_upstream_starts_early_only_after_earlier_ones_fail_or_miss() {
        assert!(start_next_early(&[Failed, Pending], 1));
        assert!(start_next_early(&[Miss, Skipped, Pending], 2));
        assert!(!start_next_early(&[Pending, Pending], 1));
        assert!(!start_next_early(&[T, Pending], 1));
    }
}
