//! The answer to one `try`: which builders fit, which of them are healthy (probing those
//! whose state is unknown, see [`probing`](super::probing)), the selection under the slot
//! locks, and the reply (docs/hook-protocol.md §1.5, §2.1–§2.2).

use super::error::HookError;
use super::probing::{self, Known};
use super::{Ctx, connect};
use crate::config::Tuning;
use crate::health::{self, LocalSituation};
use crate::probe::Kind;
use crate::protocol::{Reply, TryRequest, Verbosity};
use crate::remote::Connection;
use crate::select::{
    Decision, DeclineReason, HealthPolicy, LocalCaps, Need, Policy, Speed, eligible,
};
use crate::slots::{HeldLock, LoadDir, SlotError};
use ferry_nix::machines::Machine;
use std::collections::BTreeSet;
use std::time::Instant;

/// A builder of this hook process: its place in the machines list (the key the selection
/// policy, the probes and the health measurements use) and the machine.
#[derive(Debug, Clone, Copy)]
pub(super) struct Builder<'m> {
    pub(crate) index: usize,
    pub(crate) machine: &'m Machine,
}

/// Builders by their place in the machines list (so in the order of that list).
pub(super) type Builders<'m> = std::collections::BTreeMap<usize, &'m Machine>;

/// The builders of `machines` that accept the derivation and are not `excluded`.
fn fitting<'m>(machines: &'m [Machine], need: &Need, excluded: &BTreeSet<usize>) -> Builders<'m> {
    let fit: BTreeSet<usize> = eligible(machines, need, excluded).into_iter().collect();
    machines
        .iter()
        .enumerate()
        .filter(|(i, _)| fit.contains(i))
        .collect()
}

/// What one `try` needs, and the builders that can take it (system, features).
pub(super) struct Fit<'m> {
    pub(crate) machines: &'m [Machine],
    pub(crate) right_type: Builders<'m>,
    pub(crate) need: Need,
    pub(crate) local: LocalCaps,
}

/// The builder chosen for a build, and what failover after the accept needs.
pub(super) struct Chosen<'m> {
    pub(crate) conn: Connection,
    pub(crate) builder: Builder<'m>,
    pub(crate) slot: Option<HeldLock>,
    pub(crate) machines: &'m [Machine],
    pub(crate) need: Need,
    /// The builders that can take the derivation (system, features), whatever their health.
    pub(crate) candidates: Builders<'m>,
}

pub(super) enum Answered<'m> {
    /// Declined or postponed: the hook keeps answering.
    Replied,
    Stop(i32),
    Accepted(Box<Chosen<'m>>),
    /// Only these non-`ssh://` machines can take it: the stock hook builds it.
    Delegate(Vec<&'m Machine>),
}

/// Selects a machine for one `try` from the builders' health (probing those whose state
/// is unknown or stale in parallel, within the probe budget), connects, and replies.
pub(super) async fn answer<'m>(
    t: &TryRequest,
    machines: &'m [Machine],
    ctx: &Ctx<'_>,
) -> Result<Answered<'m>, HookError> {
    let logger = ctx.logger;
    if machines.is_empty() {
        logger.reply(&Reply::DeclinePermanently);
        return Ok(Answered::Stop(0));
    }
    let need = Need {
        system: t.needed_system.clone(),
        required_features: t.required_features.clone(),
        am_willing: t.am_willing,
    };
    let local = ctx.settings.local_caps();
    // Local first by policy: answer before touching any builder.
    if !ctx.prober.tuning.prefer_remote && local.can_build(&need) {
        logger.log(
            Verbosity::CHATTY,
            "ferry-build-hook: building locally (prefer-remote = false)",
        );
        logger.reply(&Reply::Decline);
        return Ok(Answered::Replied);
    }
    let load_dir = LoadDir::open(&ctx.env.nix_state_dir)?;

    // Only ssh:// is handled natively. Other schemes (ssh-ng://, local stores) are left out
    // of the selection; if only they can take the derivation, the stock hook does
    // (`delegate.rs`).
    let (mut excluded, mut native) = (BTreeSet::new(), BTreeSet::new());
    for (i, m) in machines.iter().enumerate() {
        if m.scheme() == Some("ssh") {
            native.insert(i);
        } else {
            excluded.insert(i);
        }
    }
    let right_type = fitting(machines, &need, &excluded);
    if right_type.is_empty() {
        let others: Vec<&Machine> = fitting(machines, &need, &native).into_values().collect();
        if !others.is_empty() {
            return Ok(Answered::Delegate(others));
        }
    }
    let (known, mut deferred) = probing::classify_and_probe(ctx, machines, &right_type).await;
    let fit = Fit {
        machines,
        right_type,
        need,
        local,
    };
    let answered = choose(t, ctx, &load_dir, &fit, known, &mut deferred).await;
    // Builders whose state is still unknown are found out after the answer, not before.
    probing::release_deferred(ctx, deferred);
    answered
}

/// The selection, with the chosen builder and its slot's lock.
pub(super) enum Picked<'m> {
    Use(Builder<'m>, Option<HeldLock>),
    Postpone,
    Decline(DeclineReason),
}

impl Picked<'_> {
    pub(crate) fn is_postpone(&self) -> bool {
        matches!(self, Picked::Postpone)
    }
}

/// Picks a healthy builder with a free slot, connects and replies; when they are all full,
/// first finds out the builders whose state is unknown and waits (bounded) for a slot, see
/// [`probing::wait_plan`]; then declines or postpones.
async fn choose<'m>(
    t: &TryRequest,
    ctx: &Ctx<'_>,
    load_dir: &LoadDir,
    f: &Fit<'m>,
    mut k: Known<'m>,
    deferred: &mut Vec<(Builder<'m>, Kind)>,
) -> Result<Answered<'m>, HookError> {
    let logger = ctx.logger;
    let tuning = ctx.prober.tuning;
    let (need, local) = (&f.need, &f.local);
    let mut waited = false;
    // Whether a `# decline` makes Nix wait for a running build (asked once, when needed).
    let mut decline_ok: Option<bool> = None;
    loop {
        let policy = policy_for(ctx, f.machines, tuning);
        let mut picked = tokio::task::block_in_place(|| {
            pick(load_dir, f.machines, need, local, &k.healthy, &policy)
        });
        if !waited && matches!(&picked, Ok(p) if p.is_postpone()) {
            waited = true;
            let ok = match decline_ok {
                Some(ok) => ok,
                None => local.could_build(need) && probing::decline_waits(ctx, t).await,
            };
            decline_ok = Some(ok);
            if let Some(plan) = probing::wait_plan(ctx, ok, !deferred.is_empty()) {
                let start = Instant::now();
                picked = probing::wait_for_machine(ctx, load_dir, f, &mut k, deferred, &plan).await;
                let still_full = matches!(&picked, Ok(p) if p.is_postpone());
                if plan.for_slots && still_full {
                    ctx.note_slot_wait_expired();
                }
                logger.log(
                    Verbosity::CHATTY,
                    format!(
                        "ferry-build-hook: every known builder for '{}' was busy; after {} ms {}",
                        t.drv_path,
                        start.elapsed().as_millis(),
                        if still_full {
                            "still none is free"
                        } else {
                            "one is free"
                        }
                    ),
                );
            }
        }
        match picked? {
            Picked::Use(b, slot) => match connect::connect(ctx, b, k.probed.remove(&b.index)).await
            {
                Ok(conn) => {
                    logger.reply(&Reply::Accept(b.machine.store_uri.clone()));
                    return Ok(Answered::Accepted(Box::new(Chosen {
                        conn,
                        builder: b,
                        slot,
                        machines: f.machines,
                        need: f.need.clone(),
                        candidates: f.right_type.clone(),
                    })));
                }
                Err(e) => {
                    ctx.cannot_build_on(b.machine, &e);
                    k.healthy.remove(&b.index);
                }
            },
            Picked::Postpone => {
                // Every fitting builder is busy. A postponed goal is asked again only every
                // 5 s; a declined one that the host could build but has no local slot for is
                // asked again as soon as one of the worker's builds ends (`siblings.rs`).
                let ok = match decline_ok {
                    Some(ok) => ok,
                    None => local.could_build(need) && probing::decline_waits(ctx, t).await,
                };
                if ok {
                    logger.log(
                        Verbosity::CHATTY,
                        format!(
                            "ferry-build-hook: every builder for '{}' is busy; asking again when a running build ends",
                            t.drv_path
                        ),
                    );
                    logger.reply(&Reply::Decline);
                } else {
                    logger.reply(&Reply::Postpone);
                }
                return Ok(Answered::Replied);
            }
            Picked::Decline(reason) => {
                explain_decline(ctx, t, f, reason);
                logger.reply(&Reply::Decline);
                return Ok(Answered::Replied);
            }
        }
    }
}

/// Under `main-lock`: measures the loads of the `healthy` builders, decides, and keeps the
/// chosen slot's lock.
pub(super) fn pick<'m>(
    dir: &LoadDir,
    machines: &[Machine],
    need: &Need,
    local: &LocalCaps,
    healthy: &Builders<'m>,
    policy: &dyn Policy,
) -> Result<Picked<'m>, SlotError> {
    let _main = dir.lock_main()?;
    let mut loads = Vec::new();
    let mut held = Vec::new();
    for (&index, &machine) in healthy {
        let (load, lock) = dir.probe(index, machine)?;
        loads.push(load);
        held.push((Builder { index, machine }, lock));
    }
    Ok(match policy.decide(machines, &loads, need, local) {
        Decision::Use { machine, .. } => {
            // The policy picks one of the builders it was given the loads of.
            match held.into_iter().find(|(b, _)| b.index == machine) {
                Some((b, slot)) => {
                    if let Some(l) = &slot {
                        l.touch();
                    }
                    Picked::Use(b, slot)
                }
                None => Picked::Decline(DeclineReason::NoMachine),
            }
        }
        Decision::Postpone => Picked::Postpone,
        Decision::Decline(reason) => Picked::Decline(reason),
    })
}

/// The health policy, with the measured speeds of `machines`.
pub(super) fn policy_for(ctx: &Ctx<'_>, machines: &[Machine], tuning: Tuning) -> HealthPolicy {
    let speeds = machines
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let h = ctx.prober.health.read(&m.store_uri);
            (
                i,
                Speed {
                    latency_ms: h.latency_ms,
                    bytes_per_sec: h.transfer_rate,
                },
            )
        })
        .collect();
    HealthPolicy {
        prefer_remote: tuning.prefer_remote,
        speeds,
    }
}

/// The message that goes with a decline.
fn explain_decline(ctx: &Ctx<'_>, t: &TryRequest, f: &Fit<'_>, reason: DeclineReason) {
    let logger = ctx.logger;
    let (need, local) = (&f.need, &f.local);
    if reason != DeclineReason::NoMachine || f.right_type.is_empty() {
        // The stock hook's message and levels (docs/hook-protocol.md §2.2 step 4).
        let level = if reason != DeclineReason::NoMachine || local.can_build(need) {
            Verbosity::CHATTY
        } else {
            Verbosity::WARN
        };
        logger.log(level, "Failed to find a machine for remote build!");
        return;
    }
    // Every builder that could take it is down.
    let now = health::now_ms();
    let states: Vec<health::Health> = f
        .right_type
        .values()
        .map(|m| ctx.prober.health.read(&m.store_uri))
        .collect();
    let max_jobs_zero = ctx.settings.max_jobs_zero();
    if local.can_build(need) || (!max_jobs_zero && local.could_build(need)) {
        // Local fallback, at once (or as soon as a local slot frees up).
        let names: Vec<&str> = states.iter().map(|h| h.store_uri.as_str()).collect();
        logger.log(
            Verbosity::TALKATIVE,
            format!(
                "ferry-build-hook: building '{}' locally: no builder is up ({})",
                t.drv_path,
                names.join(", ")
            ),
        );
        return;
    }
    // Nothing can build it: fail fast with the reasons. The daemon then reports "unable to
    // start any build" once nothing else is running (2.8 `Worker::run`), or asks again when
    // another build finishes, which costs only this message again.
    let situation = LocalSituation {
        max_jobs_zero,
        could_build: local.could_build(need),
    };
    logger.log(
        Verbosity::ERROR,
        health::render_no_builder(&t.drv_path, &t.needed_system, &states, situation, now),
    );
}
