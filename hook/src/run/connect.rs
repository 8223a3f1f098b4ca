//! The connection to a chosen builder: the one its probe opened, or a new one over the
//! build transport (`ssh.rs`, `russh/`) with the serve handshake; and, after the accept,
//! another builder when the chosen one broke before the build started
//! (docs/hook-protocol.md §7.5).

use super::Ctx;
use super::decide::{Builder, Builders, Picked, pick, policy_for};
use crate::health::{self, Verdict};
use crate::probe::ConnectError;
use crate::remote::Connection;
use crate::select::{HealthPolicy, LocalCaps, Need};
use crate::slots::{HeldLock, LoadDir};
use ferry_nix::machines::Machine;
use std::collections::BTreeSet;

/// A connection to `b`: `probed` if its probe opened one, else a new one within the probe
/// budget (its outcome recorded in the builder's health).
pub(super) async fn connect(
    ctx: &Ctx<'_>,
    b: Builder<'_>,
    probed: Option<Box<Connection>>,
) -> Result<Connection, ConnectError> {
    match probed {
        Some(c) => Ok(*c),
        None => again(ctx, b).await,
    }
}

/// A new connection to `b` within the probe budget, recorded in its health.
pub(super) async fn again(ctx: &Ctx<'_>, b: Builder<'_>) -> Result<Connection, ConnectError> {
    ctx.prober
        .connect_recorded(b.machine, ctx.prober.tuning.probe_timeout)
        .await
}

/// Where failover after the accept may go.
pub(super) struct Failover<'m, 'd> {
    pub(crate) load_dir: Option<&'d LoadDir>,
    pub(crate) machines: &'m [Machine],
    pub(crate) need: &'d Need,
    /// The builders that can take the derivation (system, features), whatever their health.
    pub(crate) candidates: &'d Builders<'m>,
    /// Builders that failed this derivation (their failure is also recorded in their
    /// health, but that may not be writable).
    pub(crate) failed: BTreeSet<usize>,
}

impl<'m> Failover<'m, '_> {
    /// Another builder with a free slot, connected, or `None`. Candidates are the builders
    /// that fit and are not known to be down now: healthy ones, and those whose state is
    /// still unknown (the answer to the daemon did not wait for their probe), which get
    /// connected to within the probe budget like a probe.
    pub(crate) async fn next(
        &mut self,
        ctx: &Ctx<'_>,
    ) -> Option<(Connection, Builder<'m>, Option<HeldLock>)> {
        let dir = self.load_dir?;
        // The daemon's local-build question is settled by the accept: only builders now.
        let no_local = LocalCaps::default();
        let tuning = ctx.prober.tuning;
        loop {
            let now = health::now_ms();
            let usable: Builders<'m> = self
                .candidates
                .iter()
                .filter(|(i, _)| !self.failed.contains(i))
                .filter(|(_, m)| {
                    !matches!(
                        ctx.prober.health.read(&m.store_uri).verdict(now, &tuning),
                        Verdict::BackingOff { .. }
                    )
                })
                .map(|(&i, &m)| (i, m))
                .collect();
            if usable.is_empty() {
                return None;
            }
            let policy = HealthPolicy {
                prefer_remote: true,
                ..policy_for(ctx, self.machines, tuning)
            };
            let picked = tokio::task::block_in_place(|| {
                pick(dir, self.machines, self.need, &no_local, &usable, &policy)
            });
            let Ok(Picked::Use(b, slot)) = picked else {
                return None;
            };
            match again(ctx, b).await {
                Ok(c) => return Some((c, b, slot)),
                Err(e) => {
                    ctx.cannot_build_on(b.machine, &e);
                    self.failed.insert(b.index);
                }
            }
        }
    }
}
