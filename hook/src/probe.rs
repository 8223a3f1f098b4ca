//! Reaching builders within a deadline, and recording what happened in their health.
//!
//! A probe is a whole connection: TCP connect, SSH handshake, authentication and the
//! `nix-store --serve` handshake, so a successful probe proves there is a working Nix on the
//! other side. Probes of several builders run in parallel, so the daemon waits for the
//! slowest one at most, and never longer than the probe budget.
//!
//! Probes go over `probe-transport` (russh by default: every step under the deadline, and a
//! time-out names the step), builds over `build-transport` (OpenSSH by default). When the two
//! are the same, the probe's connection is the build's; otherwise the probe's connection is
//! closed once its result is recorded, and the build connects again (through OpenSSH's
//! ControlMaster, which the first build to a builder opens and later ones reuse).

use crate::config::{TransportKind, Tuning};
use crate::health::{self, Verdict};
use crate::health_store::{HealthStore, ProbeLock};
use crate::remote::{self, Connection};
use crate::russh::{Progress, Russh};
use crate::ssh::{OpenSsh, Transport};
use ferry_nix::machines::Machine;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything a probe needs; cheap to clone into tasks.
#[derive(Debug, Clone)]
pub struct Prober {
    pub ssh: OpenSsh,
    pub russh: Russh,
    pub health: HealthStore,
    pub tuning: Tuning,
}

/// What a probe found.
pub enum Outcome {
    /// Reached; the connection is ready for a build (`None` when another hook's fresh probe
    /// said the builder is up and this one did not connect itself).
    Up(Option<Box<Connection>>),
    /// Not reachable; the reason was recorded.
    Down(String),
    /// Not probed (another hook is probing it, or it is backing off).
    Skipped,
}

/// Which probe to run.
#[derive(Debug)]
pub enum Kind {
    /// Unknown or stale: wait (within the budget) for another hook probing it, then probe
    /// if its result is not there.
    Fresh,
    /// Back-off over: the caller holds the probe lock (half-open).
    HalfOpen(ProbeLock),
}

impl Prober {
    /// Connects over the build transport and handshakes within `budget`. Returns the
    /// connection and the time it took in milliseconds, or a one-line reason.
    pub async fn connect(
        &self,
        m: &Machine,
        budget: Duration,
    ) -> Result<(Connection, f64), String> {
        self.connect_via(self.tuning.build_transport, m, budget)
            .await
            .map(|(c, l, _)| (c, l))
    }

    /// The transport for `m` when `via` is configured: russh defers to OpenSSH for builders
    /// the user's SSH configuration is about ([`Russh::defer_reason`]).
    pub fn transport_for(&self, via: TransportKind, m: &Machine) -> TransportKind {
        match via {
            TransportKind::Russh if self.russh.defer_reason(m).is_some() => TransportKind::Openssh,
            v => v,
        }
    }

    /// Connects over `via` and handshakes within `budget`. Returns the connection, the time
    /// it took and the transport it went over (russh falls back to OpenSSH when it fails
    /// where OpenSSH's configuration might succeed).
    pub async fn connect_via(
        &self,
        via: TransportKind,
        m: &Machine,
        budget: Duration,
    ) -> Result<(Connection, f64, TransportKind), String> {
        let start = Instant::now();
        let via = self.transport_for(via, m);
        let progress = Progress::default();
        let attempt = async {
            let (session, used) = match via {
                TransportKind::Openssh => {
                    (self.ssh.connect(m).await.map_err(|e| e.to_string())?, via)
                }
                TransportKind::Russh => match self.russh.open(m, &progress).await {
                    Ok(s) => (s, via),
                    Err(e) if e.openssh_might_work() => {
                        progress.set("OpenSSH, after russh failed");
                        let s = self.ssh.connect(m).await.map_err(|e2| {
                            format!("{e2} (and over russh: {})", e.into_ssh_error(m))
                        })?;
                        (s, TransportKind::Openssh)
                    }
                    Err(e) => return Err(e.into_ssh_error(m).to_string()),
                },
            };
            progress.set("the nix-store --serve handshake");
            remote::open(&m.store_uri, session)
                .await
                .map(|c| (c, used))
                .map_err(|e| e.to_string())
        };
        // The configured budget, not what was left of it, so one outage reads the same in
        // every message.
        let ms = self
            .tuning
            .probe_timeout
            .as_millis()
            .max(budget.as_millis());
        match tokio::time::timeout(budget, attempt).await {
            Ok(Ok((c, used))) => Ok((c, start.elapsed().as_secs_f64() * 1000.0, used)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(match via {
                TransportKind::Openssh => format!(
                    "no answer within {ms} ms (SSH connect and login, then the nix-store --serve handshake)"
                ),
                TransportKind::Russh => {
                    format!("no answer within {ms} ms (still in {})", progress.get())
                }
            }),
        }
    }

    pub fn record_up(&self, uri: &str, latency_ms: Option<f64>) {
        let _ = self
            .health
            .update(uri, |h| h.record_success(health::now_ms(), latency_ms));
    }

    pub fn record_down(&self, uri: &str, reason: &str) {
        let t = self.tuning;
        let _ = self.health.update(uri, |h| {
            h.record_failure(health::now_ms(), reason, &t, health::jitter())
        });
    }

    /// Connects over the build transport within `budget` and records the result; on
    /// failure also stops the builder's SSH master (it may be stuck on a dead link).
    pub async fn connect_recorded(
        &self,
        m: &Machine,
        budget: Duration,
    ) -> Result<Connection, String> {
        self.connect_recorded_via(self.tuning.build_transport, m, budget)
            .await
            .map(|(c, _)| c)
    }

    async fn connect_recorded_via(
        &self,
        via: TransportKind,
        m: &Machine,
        budget: Duration,
    ) -> Result<(Connection, TransportKind), String> {
        match self.connect_via(via, m, budget).await {
            Ok((c, latency, used)) => {
                self.record_up(&m.store_uri, Some(latency));
                Ok((c, used))
            }
            Err(e) => {
                self.record_down(&m.store_uri, &e);
                // Whichever transport found the builder down, OpenSSH's master may be
                // stuck on the same dead link: the next build must not go through it.
                let ssh = self.ssh.clone();
                let m = m.clone();
                tokio::spawn(async move { ssh.drop_master(&m).await });
                Err(e)
            }
        }
    }

    /// Probes over the probe transport within `budget` and records the result. Returns the
    /// connection when it can serve the build (same transport as builds), `None` when it was
    /// closed (the probe only recorded health).
    pub async fn probe_recorded(
        &self,
        m: &Machine,
        budget: Duration,
    ) -> Result<Option<Connection>, String> {
        let (c, used) = self
            .connect_recorded_via(self.tuning.probe_transport, m, budget)
            .await?;
        if used == self.transport_for(self.tuning.build_transport, m) {
            return Ok(Some(c));
        }
        // Closing (EOF, the remote `nix-store` exits, disconnect) is not on the critical
        // path: the answer to the daemon does not wait for it.
        tokio::spawn(async move {
            c.close().await;
        });
        Ok(None)
    }

    /// One probe, as described by `kind`, ending by `deadline`.
    pub async fn probe(&self, m: &Machine, kind: Kind, deadline: Instant) -> Outcome {
        let uri = m.store_uri.clone();
        let _lock = match kind {
            Kind::HalfOpen(lock) => lock,
            Kind::Fresh => {
                let health = self.health.clone();
                let (u, wait) = (
                    uri.clone(),
                    deadline.saturating_duration_since(Instant::now()),
                );
                let got = tokio::task::spawn_blocking(move || health.probe_lock(&u, wait)).await;
                match got {
                    Ok(Ok(Some((lock, waited)))) => {
                        if waited {
                            // Another hook probed it meanwhile: use its answer.
                            match self
                                .health
                                .read(&uri)
                                .verdict(health::now_ms(), &self.tuning)
                            {
                                Verdict::Healthy => return Outcome::Up(None),
                                Verdict::BackingOff { .. } => {
                                    return Outcome::Down(
                                        self.health.read(&uri).last_error.unwrap_or_default(),
                                    );
                                }
                                Verdict::Probe => {}
                            }
                        }
                        lock
                    }
                    // Still being probed elsewhere at the deadline: not usable for this
                    // derivation, and nothing learned to record.
                    Ok(Ok(None)) => return Outcome::Skipped,
                    // The lock itself failed (state directory unwritable): probe anyway.
                    _ => match self.health.try_probe_lock(&uri) {
                        Ok(Some(l)) => l,
                        _ => return self.unlocked_probe(m, deadline).await,
                    },
                }
            }
        };
        self.unlocked_probe(m, deadline).await
    }

    async fn unlocked_probe(&self, m: &Machine, deadline: Instant) -> Outcome {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(50) {
            return Outcome::Skipped;
        }
        match self.probe_recorded(m, left).await {
            Ok(c) => Outcome::Up(c.map(Box::new)),
            Err(e) => Outcome::Down(e),
        }
    }

    /// Probes `which` in parallel; every probe ends within the probe budget from now.
    pub async fn probe_all(
        self: &Arc<Self>,
        machines: &[Machine],
        which: Vec<(usize, Kind)>,
    ) -> Vec<(usize, Outcome)> {
        let deadline = Instant::now() + self.tuning.probe_timeout;
        let mut set = tokio::task::JoinSet::new();
        for (i, kind) in which {
            let Some(m) = machines.get(i).cloned() else {
                continue;
            };
            let p = Arc::clone(self);
            set.spawn(async move { (i, p.probe(&m, kind, deadline).await) });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(r) = r {
                out.push(r);
            }
        }
        out.sort_by_key(|(i, _)| *i);
        out
    }
}
