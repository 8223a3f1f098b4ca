//! Finding out which builders are up before and while answering a `try`: sorting them by
//! their remembered health, probing the unknown ones within the probe budget, the bounded
//! wait for a free slot when every known builder is busy (hook/README.md "When every
//! builder is busy"), and handing the probes the answer did not wait for to a detached
//! process.

use super::Ctx;
use super::decide::{Builder, Builders, Fit, Picked, pick, policy_for};
use crate::health::{self, Verdict};
use crate::probe::{self, Kind, Outcome};
use crate::protocol::{TryRequest, Verbosity};
use crate::remote::Connection;
use crate::siblings;
use crate::slots::{LoadDir, SlotError};
use ferry_nix::machines::Machine;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Which of the fitting builders are known healthy, and the connections their probes
/// opened (reused for the build).
pub(super) struct Known<'m> {
    pub(crate) healthy: Builders<'m>,
    pub(crate) probed: BTreeMap<usize, Box<Connection>>,
}

impl<'m> Known<'m> {
    /// Takes in what a probe of `b` found.
    fn learn(&mut self, ctx: &Ctx<'_>, b: Builder<'m>, outcome: Outcome) {
        match outcome {
            Outcome::Up(conn) => {
                self.healthy.insert(b.index, b.machine);
                if let Some(c) = conn {
                    self.probed.insert(b.index, c);
                }
            }
            Outcome::Down(e) => ctx.cannot_build_on(b.machine, &e),
            Outcome::Skipped => {}
        }
    }
}

/// Sorts the right-type builders by their health and probes those that need it. Returns
/// the healthy ones with the connections the probes opened (reused for the build), and the
/// builders whose state is still unknown: when a builder is known up, the answer does not
/// wait for the others' probes (they run only if the known ones are full, see
/// [`wait_plan`], or else in the background after the answer); when none is, the probes
/// the answer stopped waiting for.
pub(super) async fn classify_and_probe<'m>(
    ctx: &Ctx<'_>,
    machines: &[Machine],
    right_type: &Builders<'m>,
) -> (Known<'m>, Vec<(Builder<'m>, Kind)>) {
    let now = health::now_ms();
    let tuning = ctx.prober.tuning;
    let mut known = Known {
        healthy: Builders::new(),
        probed: BTreeMap::new(),
    };
    let mut to_probe = Vec::new();
    for (&index, &machine) in right_type {
        let b = Builder { index, machine };
        let h = ctx.prober.health.read(&machine.store_uri);
        match h.verdict(now, &tuning) {
            Verdict::Healthy => {
                known.healthy.insert(index, machine);
            }
            Verdict::BackingOff { .. } => {}
            Verdict::Probe if h.state == health::State::Down => {
                // Half-open: only the hook that gets the lock probes; the others skip it.
                if let Ok(Some(lock)) = ctx.prober.health.try_probe_lock(&machine.store_uri) {
                    to_probe.push((b, Kind::HalfOpen(lock)));
                }
            }
            Verdict::Probe => to_probe.push((b, Kind::Fresh)),
        }
    }
    if to_probe.is_empty() || !known.healthy.is_empty() {
        return (known, to_probe);
    }
    let which = to_probe
        .into_iter()
        .map(|(b, kind)| (b.index, kind))
        .collect();
    let round = ctx.prober.probe_all(machines, which).await;
    let builder = |index| {
        right_type
            .get(&index)
            .map(|&machine| Builder { index, machine })
    };
    for (i, outcome) in round.outcomes {
        if let Some(b) = builder(i) {
            known.learn(ctx, b, outcome);
        }
    }
    let unfinished = round
        .unfinished
        .into_iter()
        .filter_map(builder)
        .map(|b| (b, Kind::Fresh))
        .collect();
    (known, unfinished)
}

/// How long [`wait_for_machine`] may keep the daemon waiting for an answer, and for what.
#[derive(Debug, Clone, Copy)]
pub(super) struct WaitPlan {
    until: Instant,
    /// Also wait for a slot of a healthy builder to free, not only for the probes.
    pub(crate) for_slots: bool,
}

/// Whether, and how long, to wait before telling the daemon that every builder is busy.
///
/// - Builders whose state is unknown (the answer did not wait for their probes because
///   another builder was known up) are probed now, within the probe budget: one of them may
///   well have a free slot, and the alternative is a `# postpone`, which Nix asks about again
///   only after `build-poll-interval` (5 s), however soon a machine frees up: the goal sits
///   in `waitingForAWhile`, which only the poll timer wakes
///   (<https://github.com/NixOS/nix/blob/2.34.0/src/libstore/build/worker.cc#L511>,
///   <https://github.com/NixOS/nix/blob/2.34.0/src/libstore/build/derivation-building-goal.cc#L483>).
/// - When `# decline` makes Nix wait for a running build instead (`decline_ok`, see
///   [`decline_waits`]), that is better than any wait here: Nix asks again the moment a
///   build ends, without blocking. So only the probes are waited for.
/// - Otherwise (Nix ≥ 2.33 under `max-jobs = 0`, or nothing running to wait for) the hook
///   waits up to `slot-wait-ms` for a slot. The daemon's worker is blocked reading this
///   answer meanwhile (`tryBuildHook` reads the reply line with a blocking `readLine`,
///   <https://github.com/NixOS/nix/blob/2.34.0/src/libstore/build/derivation-building-goal.cc#L1139>),
///   so it does not drain its other hooks' log pipes: the wait must stay short and bounded,
///   and a wait that ended without a slot is not repeated by this hook process within the
///   poll interval (the daemon asks about every waiting derivation in a row).
pub(super) fn wait_plan(ctx: &Ctx<'_>, decline_ok: bool, probes_pending: bool) -> Option<WaitPlan> {
    let tuning = ctx.prober.tuning;
    let now = Instant::now();
    // The probes end on their own at the probe budget; the slack lets their results in.
    let probes_until = now + tuning.probe_timeout + Duration::from_millis(100);
    let for_slots = !decline_ok && !tuning.slot_wait.is_zero() && !ctx.slot_wait_expired_lately();
    if for_slots {
        let until = now + tuning.slot_wait;
        let until = if probes_pending {
            until.max(probes_until)
        } else {
            until
        };
        return Some(WaitPlan { until, for_slots });
    }
    probes_pending.then_some(WaitPlan {
        until: probes_until,
        for_slots: false,
    })
}

/// Waits, within `plan`, until a healthy builder has a free slot: probes the `deferred`
/// builders in parallel (a builder found up joins `k.healthy`, its connection `k.probed`),
/// notices builders other hooks found up, and re-measures the slots every 25 ms. Returns
/// the last selection: `Use` with the slot's lock, or still `Postpone` when the plan ran
/// out (or, without `for_slots`, when the probes ended). Probes still running then are put
/// back into `deferred`, for the background.
pub(super) async fn wait_for_machine<'m>(
    ctx: &Ctx<'_>,
    load_dir: &LoadDir,
    f: &Fit<'m>,
    k: &mut Known<'m>,
    deferred: &mut Vec<(Builder<'m>, Kind)>,
    plan: &WaitPlan,
) -> Result<Picked<'m>, SlotError> {
    let tuning = ctx.prober.tuning;
    let probe_deadline = Instant::now() + tuning.probe_timeout;
    let mut set = tokio::task::JoinSet::new();
    let mut flags = Vec::new();
    for (b, kind) in deferred.drain(..) {
        let p = Arc::clone(&ctx.prober);
        let m = b.machine.clone();
        let started = Arc::new(AtomicBool::new(false));
        flags.push((b, Arc::clone(&started)));
        set.spawn(async move { (b.index, p.probe(&m, kind, probe_deadline, &started).await) });
    }
    let mut ended = BTreeSet::new();
    let picked = loop {
        // Builders found up meanwhile, by these probes or by other hooks.
        let now_ms = health::now_ms();
        for (&i, &m) in &f.right_type {
            if !k.healthy.contains_key(&i)
                && ctx
                    .prober
                    .health
                    .read(&m.store_uri)
                    .verdict(now_ms, &tuning)
                    == Verdict::Healthy
            {
                k.healthy.insert(i, m);
            }
        }
        let policy = policy_for(ctx, f.machines, tuning);
        let picked = tokio::task::block_in_place(|| {
            pick(load_dir, f.machines, &f.need, &f.local, &k.healthy, &policy)
        });
        if !matches!(&picked, Ok(p) if p.is_postpone()) {
            break picked;
        }
        let probing = !set.is_empty();
        let left = plan.until.saturating_duration_since(Instant::now());
        if left.is_zero() || (!probing && !plan.for_slots) {
            break picked;
        }
        tokio::select! {
            r = set.join_next(), if probing => {
                if let Some(Ok((i, outcome))) = r {
                    ended.insert(i);
                    if let Some(&m) = f.right_type.get(&i) {
                        k.learn(ctx, Builder { index: i, machine: m }, outcome);
                    }
                }
            }
            () = tokio::time::sleep(SLOT_POLL.min(left)) => {}
        }
    };
    // Dropping the set stops the probes still connecting; the background takes them over.
    drop(set);
    for (b, started) in flags {
        if !ended.contains(&b.index) && started.load(Ordering::Relaxed) {
            deferred.push((b, Kind::Fresh));
        }
    }
    picked
}

/// How often a waiting hook re-measures the slots (a few flock attempts per builder).
const SLOT_POLL: Duration = Duration::from_millis(25);

/// Whether a `# decline` now makes the daemon wait for a build slot and ask again when one
/// of its builds ends. With local slots (`max-jobs` > 0) the host is not willing only when
/// they are all taken by running builds, and every Nix then waits for one of them. With
/// `max-jobs = 0` the waiting builds must be remote ones of this worker (this hook's
/// siblings: without a running build Nix 2.8 gives up), and only some Nix versions wait
/// (`ferry_nix::nix_version::decline_waits_with_max_jobs_zero`).
pub(super) async fn decline_waits(ctx: &Ctx<'_>, t: &TryRequest) -> bool {
    if !ctx.settings.max_jobs_zero() {
        return !t.am_willing;
    }
    if siblings::count() == 0 {
        return false;
    }
    ctx.local
        .nix_version()
        .await
        .is_some_and(|v| ferry_nix::nix_version::decline_waits_with_max_jobs_zero(&v))
}

/// After the answer: the builders whose state is still unknown and that nobody is probing
/// go to a detached process ([`probe::hand_off`]).
pub(super) fn release_deferred(ctx: &Ctx<'_>, deferred: Vec<(Builder<'_>, Kind)>) {
    let mut unknown = Vec::new();
    for (b, kind) in deferred {
        let free = match kind {
            // Released here, so the detached process can take it.
            Kind::HalfOpen(lock) => {
                drop(lock);
                true
            }
            // Being probed by another process already: nothing to add.
            Kind::Fresh => matches!(
                ctx.prober.health.try_probe_lock(&b.machine.store_uri),
                Ok(Some(_))
            ),
        };
        if free {
            unknown.push(b.machine);
        }
    }
    if unknown.is_empty() {
        return;
    }
    let names: Vec<&str> = unknown.iter().map(|m| m.store_uri.as_str()).collect();
    ctx.logger.log(
        Verbosity::TALKATIVE,
        format!(
            "ferry-build-hook: not waiting for {}; probing in the background",
            names.join(", ")
        ),
    );
    probe::hand_off(&unknown);
}
