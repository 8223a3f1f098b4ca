//! Machine selection, as the stock hook does it (docs/hook-protocol.md §2.1–§2.2; Nix 2.8
//! `src/build-remote/build-remote.cc`, HEAD `src/nix/build-remote/build-remote.cc`).
//!
//! Pure policy: it sees machines, what the derivation needs, what the local host can do and
//! the load numbers the caller measured through the slot locks (`slots`), and returns a
//! decision. No I/O, so a health-aware policy (remembering dead builders on disk, probing
//! with deadlines, preferring local when builders are down) can replace `StockPolicy`
//! behind the [`Policy`] trait without touching the lock or transport code.

use ferry_nix::machines::Machine;
use std::collections::BTreeSet;

/// What the derivation in a `try` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Need {
    pub(crate) system: String,
    pub(crate) required_features: BTreeSet<String>,
    /// The daemon has a free local slot (`amWilling`).
    pub(crate) am_willing: bool,
}

/// What the local host can build, from the daemon's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LocalCaps {
    /// `system`.
    pub(crate) system: String,
    /// `extra-platforms`.
    pub(crate) extra_platforms: BTreeSet<String>,
    /// `system-features`.
    pub(crate) system_features: BTreeSet<String>,
}

impl LocalCaps {
    /// `couldBuildLocally` without `amWilling`: right platform and every required feature
    /// present locally (2.8 `allSupportedLocally`).
    pub(crate) fn could_build(&self, need: &Need) -> bool {
        (need.system == self.system || self.extra_platforms.contains(&need.system))
            && need
                .required_features
                .iter()
                .all(|f| self.system_features.contains(f))
    }

    /// `canBuildLocally = amWilling && couldBuildLocally`.
    pub(crate) fn can_build(&self, need: &Need) -> bool {
        need.am_willing && self.could_build(need)
    }
}

/// A machine's load as measured through its slot locks: how many slots others hold, and the
/// first free slot (whose lock the caller keeps while the decision is made).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Load {
    /// Index into the machine list.
    pub(crate) machine: usize,
    pub(crate) load: u64,
    pub(crate) free_slot: Option<u64>,
}

/// The outcome of one selection round.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Build on `machine` using `slot`.
    Use { machine: usize, slot: u64 },
    /// Every suitable machine is busy and the local host cannot take it: ask again later.
    Postpone,
    /// Nothing suitable remote; the daemon builds locally (or fails if it cannot).
    Decline(DeclineReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeclineReason {
    /// No machine of the right type (or all of them failed to connect).
    NoMachine,
    /// Suitable machines exist but are busy, and the local host can build it.
    BusyButLocalCan,
    /// The policy prefers a free local slot to a remote builder.
    LocalPreferred,
}

/// A selection policy. `candidates` are the machines worth asking about (not excluded by a
/// failed connect in this process); `loads` holds one entry per candidate that accepts the
/// derivation.
pub(crate) trait Policy {
    fn decide(
        &self,
        machines: &[Machine],
        loads: &[Load],
        need: &Need,
        local: &LocalCaps,
    ) -> Decision;
}

/// The indexes of machines that accept the derivation (system, supported and mandatory
/// features) and are not in `excluded`.
pub(crate) fn eligible(
    machines: &[Machine],
    need: &Need,
    excluded: &BTreeSet<usize>,
) -> Vec<usize> {
    machines
        .iter()
        .enumerate()
        .filter(|(i, m)| !excluded.contains(i) && m.accepts(&need.system, &need.required_features))
        .map(|(i, _)| i)
        .collect()
}

/// The stock hook's policy: least load per speed factor, ties to the faster machine, then to
/// the less loaded one; postpone only when the local host cannot build. Ferry runs
/// [`HealthPolicy`]; this one stays as the tests' reference for the stock behaviour.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StockPolicy;

#[cfg(test)]
impl Policy for StockPolicy {
    fn decide(
        &self,
        machines: &[Machine],
        loads: &[Load],
        need: &Need,
        local: &LocalCaps,
    ) -> Decision {
        if let Some(d) = best_free(machines, loads, |m, sm, b, sb| {
            beats(m.load, sm, b.load, sb)
        }) {
            return d;
        }
        let right_type = !loads.is_empty();
        if right_type && !local.can_build(need) {
            Decision::Postpone
        } else if right_type {
            Decision::Decline(DeclineReason::BusyButLocalCan)
        } else {
            Decision::Decline(DeclineReason::NoMachine)
        }
    }
}

/// Among the machines with a free slot, the one no later one `beats` (so the first wins a
/// tie), as the decision to use it. `beats(m, sf_m, b, sf_b)`: load `m` of a machine with
/// speed factor `sf_m` is strictly better than the best so far. Speed factors are compared
/// as floats, as Nix ≥ 2.20 does (2.8 divided integers, which hides differences); the
/// machines parser already turned 0 into 1.
fn best_free(
    machines: &[Machine],
    loads: &[Load],
    beats: impl Fn(&Load, f64, &Load, f64) -> bool,
) -> Option<Decision> {
    let mut best: Option<(Load, f64)> = None;
    for l in loads {
        let (Some(_), Some(m)) = (l.free_slot, machines.get(l.machine)) else {
            continue;
        };
        let sf = if m.speed_factor > 0.0 {
            m.speed_factor
        } else {
            1.0
        };
        if best.as_ref().is_none_or(|(b, bsf)| beats(l, sf, b, *bsf)) {
            best = Some((*l, sf));
        }
    }
    let (l, _) = best?;
    Some(Decision::Use {
        machine: l.machine,
        slot: l.free_slot?,
    })
}

/// `m` beats the current best `b` (2.8 `build-remote.cc`: lower load per speed, then higher
/// speed, then lower load).
#[cfg(test)]
fn beats(load_m: u64, sf_m: f64, load_b: u64, sf_b: f64) -> bool {
    let (rm, rb) = (load_m as f64 / sf_m, load_b as f64 / sf_b);
    if rm != rb {
        return rm < rb;
    }
    if sf_m != sf_b {
        return sf_m > sf_b;
    }
    load_m < load_b
}

/// What Ferry measured about a builder (from its health state).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Speed {
    /// Time to reach the builder's Nix, ms.
    pub(crate) latency_ms: Option<f64>,
    /// Copy throughput, bytes per second.
    pub(crate) bytes_per_sec: Option<f64>,
}

/// Ferry's policy. The caller passes only builders that are healthy (up, or just probed
/// successfully), so postponing happens only while a *healthy* builder is busy, never for
/// a dead one. Among builders with a free slot: least load per speed factor, then the
/// higher speed factor (the stock order, so slots spread the same way), then measured
/// speed — higher throughput, then lower latency — then the lower load. With
/// `prefer_remote = false`, a free local slot wins over any builder.
#[derive(Debug, Clone, Default)]
pub(crate) struct HealthPolicy {
    pub(crate) prefer_remote: bool,
    /// Measurements by machine index; missing entries count as unmeasured.
    pub(crate) speeds: std::collections::BTreeMap<usize, Speed>,
}

impl Policy for HealthPolicy {
    fn decide(
        &self,
        machines: &[Machine],
        loads: &[Load],
        need: &Need,
        local: &LocalCaps,
    ) -> Decision {
        if !self.prefer_remote && local.can_build(need) {
            return Decision::Decline(DeclineReason::LocalPreferred);
        }
        let speed = |i: usize| self.speeds.get(&i).copied().unwrap_or_default();
        if let Some(d) = best_free(machines, loads, |m, sm, b, sb| {
            health_beats(
                (m.load, sm, speed(m.machine)),
                (b.load, sb, speed(b.machine)),
            )
        }) {
            return d;
        }
        if loads.is_empty() {
            Decision::Decline(DeclineReason::NoMachine)
        } else if local.can_build(need) {
            Decision::Decline(DeclineReason::BusyButLocalCan)
        } else {
            Decision::Postpone
        }
    }
}

/// Ordering of [`HealthPolicy`]: `m` strictly beats the current best `b`.
fn health_beats(m: (u64, f64, Speed), b: (u64, f64, Speed)) -> bool {
    let (rm, rb) = (m.0 as f64 / m.1, b.0 as f64 / b.1);
    if rm != rb {
        return rm < rb;
    }
    if m.1 != b.1 {
        return m.1 > b.1;
    }
    // Measured speed only decides between builders that were both measured.
    if let (Some(x), Some(y)) = (m.2.bytes_per_sec, b.2.bytes_per_sec)
        && x != y
    {
        return x > y;
    }
    if let (Some(x), Some(y)) = (m.2.latency_ms, b.2.latency_ms)
        && (x - y).abs() > 1.0
    {
        return x < y;
    }
    m.0 < b.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_nix::machines::parse_builders_setting;

    fn machines(spec: &str) -> Vec<Machine> {
        parse_builders_setting(spec, "x86_64-linux").expect("machines")
    }

    fn need(system: &str, features: &[&str], am_willing: bool) -> Need {
        Need {
            system: system.into(),
            required_features: features.iter().map(|s| s.to_string()).collect(),
            am_willing,
        }
    }

    fn local() -> LocalCaps {
        LocalCaps {
            system: "x86_64-linux".into(),
            extra_platforms: BTreeSet::from(["i686-linux".to_owned()]),
            system_features: BTreeSet::from(["big-parallel".to_owned()]),
        }
    }

    #[test]
    fn eligibility_follows_systems_and_features() {
        let ms = machines(
            "ssh://a x86_64-linux - 2 1 big-parallel\n\
             ssh://b aarch64-linux,x86_64-linux - 1 1 - kvm\n\
             ssh://c aarch64-linux",
        );
        let none = BTreeSet::new();
        assert_eq!(eligible(&ms, &need("x86_64-linux", &[], false), &none), [0]);
        assert_eq!(
            eligible(&ms, &need("aarch64-linux", &[], false), &none),
            [2]
        );
        // Mandatory `kvm` on b: only derivations requiring kvm go there.
        assert_eq!(
            eligible(&ms, &need("x86_64-linux", &["kvm"], false), &none),
            [1]
        );
        // `builtin` runs anywhere that has no mandatory features.
        assert_eq!(eligible(&ms, &need("builtin", &[], false), &none), [0, 2]);
        assert_eq!(
            eligible(&ms, &need("x86_64-linux", &["big-parallel"], false), &none),
            [0]
        );
        let excluded = BTreeSet::from([0]);
        assert!(eligible(&ms, &need("x86_64-linux", &[], false), &excluded).is_empty());
    }

    fn free(machine: usize, load: u64) -> Load {
        Load {
            machine,
            load,
            free_slot: Some(load),
        }
    }

    /// A machine at `load` with no slot free.
    fn busy(machine: usize, load: u64) -> Load {
        Load {
            machine,
            load,
            free_slot: None,
        }
    }

    fn used(machine: usize, slot: u64) -> Decision {
        Decision::Use { machine, slot }
    }

    fn health(prefer_remote: bool) -> HealthPolicy {
        HealthPolicy {
            prefer_remote,
            ..HealthPolicy::default()
        }
    }

    #[test]
    fn least_load_per_speed_then_speed_then_load() {
        let ms = machines("ssh://a - - 4 1\nssh://b - - 4 2\nssh://c - - 4 2");
        let n = need("x86_64-linux", &[], false);
        // a: 1/1, b: 1/2 → b.
        let d = StockPolicy.decide(&ms, &[free(0, 1), free(1, 1)], &n, &local());
        assert_eq!(d, used(1, 1));
        // a: 0/1, b: 0/2 → tie on ratio, b is faster.
        let d = StockPolicy.decide(&ms, &[free(0, 0), free(1, 0)], &n, &local());
        assert_eq!(d, used(1, 0));
        // b: 2/2 = 1, a: 1/1 = 1, equal ratio → faster b wins over a.
        let d = StockPolicy.decide(&ms, &[free(0, 1), free(1, 2)], &n, &local());
        assert_eq!(d, used(1, 2));
        // Same ratio and speed: first one kept unless strictly less loaded.
        let d = StockPolicy.decide(&ms, &[free(1, 0), free(2, 0)], &n, &local());
        assert_eq!(d, used(1, 0));
    }

    /// With one builder and no free slot on it: a busy builder is waited for only if local
    /// cannot build, and no healthy builder at all (dead ones are not passed in) is never
    /// waited for.
    fn busy_or_no_builder(p: &impl Policy) {
        let ms = machines("ssh://a - - 1 1");
        let busy = [busy(0, 1)];
        let can = need("x86_64-linux", &[], true);
        let cannot = need("x86_64-linux", &[], false);
        assert_eq!(p.decide(&ms, &busy, &cannot, &local()), Decision::Postpone);
        assert_eq!(
            p.decide(&ms, &busy, &can, &local()),
            Decision::Decline(DeclineReason::BusyButLocalCan)
        );
        assert_eq!(
            p.decide(&ms, &[], &cannot, &local()),
            Decision::Decline(DeclineReason::NoMachine)
        );
    }

    #[test]
    fn busy_machines_postpone_only_when_local_cannot_build() {
        busy_or_no_builder(&StockPolicy);
    }

    #[test]
    fn local_capabilities() {
        let l = local();
        assert!(l.can_build(&need("x86_64-linux", &[], true)));
        assert!(l.can_build(&need("i686-linux", &["big-parallel"], true)));
        assert!(!l.can_build(&need("x86_64-linux", &[], false)));
        assert!(!l.could_build(&need("aarch64-linux", &[], true)));
        assert!(!l.could_build(&need("x86_64-linux", &["kvm"], true)));
    }

    #[test]
    fn health_policy_scores_load_speed_factor_then_measured_speed() {
        let ms = machines("ssh://a - - 4 1\nssh://b - - 4 1\nssh://c - - 4 2");
        let n = need("x86_64-linux", &[], false);
        let mut p = health(true);
        // Same as stock without measurements: c (speed factor 2) at equal load.
        let d = p.decide(&ms, &[free(0, 0), free(1, 0), free(2, 0)], &n, &local());
        assert_eq!(d, used(2, 0));
        // a and b tie on load and speed factor: the measured faster link wins.
        p.speeds.insert(
            0,
            Speed {
                latency_ms: Some(5.0),
                bytes_per_sec: Some(1e6),
            },
        );
        p.speeds.insert(
            1,
            Speed {
                latency_ms: Some(50.0),
                bytes_per_sec: Some(9e6),
            },
        );
        let d = p.decide(&ms, &[free(0, 1), free(1, 1)], &n, &local());
        assert_eq!(d, used(1, 1));
        // Without throughput, lower latency wins (beyond a 1 ms noise floor).
        p.speeds.insert(
            1,
            Speed {
                latency_ms: Some(50.0),
                bytes_per_sec: None,
            },
        );
        let d = p.decide(&ms, &[free(1, 1), free(0, 1)], &n, &local());
        assert_eq!(d, used(0, 1));
        // Load per speed factor still comes first.
        let d = p.decide(&ms, &[free(0, 2), free(1, 1)], &n, &local());
        assert_eq!(d, used(1, 1));
    }

    #[test]
    fn health_policy_declines_postpones_and_prefers_local_by_setting() {
        let ms = machines("ssh://a - - 1 1");
        let remote_first = health(true);
        let local_first = health(false);
        let can = need("x86_64-linux", &[], true);
        let cannot = need("x86_64-linux", &[], false);
        assert_eq!(
            remote_first.decide(&ms, &[free(0, 0)], &can, &local()),
            used(0, 0)
        );
        assert_eq!(
            local_first.decide(&ms, &[free(0, 0)], &can, &local()),
            Decision::Decline(DeclineReason::LocalPreferred)
        );
        // No free local slot: the builder is used whatever the preference.
        assert_eq!(
            local_first.decide(&ms, &[free(0, 0)], &cannot, &local()),
            used(0, 0)
        );
        busy_or_no_builder(&remote_first);
    }
}
