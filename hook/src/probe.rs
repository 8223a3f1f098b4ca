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
use crate::remote::{self, Connection, RemoteError};
use crate::russh::{Progress, Russh};
use crate::ssh::{OpenSsh, SshError, Transport};
use ferry_nix::machines::Machine;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Everything a probe needs; cheap to clone into tasks.
#[derive(Debug, Clone)]
pub(crate) struct Prober {
    pub(crate) ssh: OpenSsh,
    pub(crate) russh: Russh,
    pub(crate) health: HealthStore,
    pub(crate) tuning: Tuning,
}

/// Why a builder could not be reached. Its text is what the builder's health records and
/// what "cannot build on" messages show.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// SSH could not connect or log in.
    #[error(transparent)]
    Transport(#[from] SshError),
    /// russh failed where OpenSSH's configuration might have helped, and OpenSSH failed too.
    #[error("{openssh} (and over russh: {russh})")]
    BothTransports { openssh: SshError, russh: SshError },
    /// Logged in, but the `nix-store --serve` handshake failed.
    #[error(transparent)]
    Handshake(Box<RemoteError>),
    /// No answer within the budget; `stage` says how far it got.
    #[error("no answer within {ms} ms ({stage})")]
    Timeout { ms: u128, stage: String },
    /// Another hook's probe found it down meanwhile: the reason that hook recorded.
    #[error("{0}")]
    Recorded(String),
}

/// What a probe found.
pub(crate) enum Outcome {
    /// Reached; the connection is ready for a build (`None` when another hook's fresh probe
    /// said the builder is up and this one did not connect itself).
    Up(Option<Box<Connection>>),
    /// Not reachable; the reason was recorded.
    Down(ConnectError),
    /// Not probed (another hook is probing it, or it is backing off).
    Skipped,
}

/// Which probe to run.
#[derive(Debug)]
pub(crate) enum Kind {
    /// Unknown or stale: wait (within the budget) for another hook probing it, then probe
    /// if its result is not there.
    Fresh,
    /// Back-off over: the caller holds the probe lock (half-open).
    HalfOpen(ProbeLock),
}

impl Prober {
    /// The transport for `m` when `via` is configured: russh defers to OpenSSH for builders
    /// the user's SSH configuration is about ([`Russh::defer_reason`]).
    pub(crate) fn transport_for(&self, via: TransportKind, m: &Machine) -> TransportKind {
        match via {
            TransportKind::Russh if self.russh.defer_reason(m).is_some() => TransportKind::Openssh,
            v => v,
        }
    }

    /// Connects over `via` and handshakes within `budget`. Returns the connection, the time
    /// it took and the transport it went over (russh falls back to OpenSSH when it fails
    /// where OpenSSH's configuration might succeed).
    pub(crate) async fn connect_via(
        &self,
        via: TransportKind,
        m: &Machine,
        budget: Duration,
    ) -> Result<(Connection, f64, TransportKind), ConnectError> {
        let start = Instant::now();
        let via = self.transport_for(via, m);
        let progress = Progress::default();
        let attempt = async {
            let (session, used) = match via {
                TransportKind::Openssh => (self.ssh.connect(m).await?, via),
                TransportKind::Russh => match self.russh.open(m, &progress).await {
                    Ok(s) => (s, via),
                    Err(e) if e.openssh_might_work() => {
                        progress.set("OpenSSH, after russh failed");
                        let s = self.ssh.connect(m).await.map_err(|openssh| {
                            ConnectError::BothTransports {
                                openssh,
                                russh: e.into_ssh_error(m),
                            }
                        })?;
                        (s, TransportKind::Openssh)
                    }
                    Err(e) => return Err(e.into_ssh_error(m).into()),
                },
            };
            progress.set("the nix-store --serve handshake");
            remote::open(&m.store_uri, session)
                .await
                .map(|c| (c, used))
                .map_err(|e| ConnectError::Handshake(Box::new(e)))
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
            Err(_) => Err(ConnectError::Timeout {
                ms,
                stage: match via {
                    TransportKind::Openssh => {
                        "SSH connect and login, then the nix-store --serve handshake".to_owned()
                    }
                    TransportKind::Russh => format!("still in {}", progress.get()),
                },
            }),
        }
    }

    pub(crate) fn record_up(&self, uri: &str, latency_ms: Option<f64>) {
        let _ = self
            .health
            .update(uri, |h| h.record_success(health::now_ms(), latency_ms));
    }

    pub(crate) fn record_down(&self, uri: &str, reason: &str) {
        let t = self.tuning;
        let _ = self.health.update(uri, |h| {
            h.record_failure(health::now_ms(), reason, &t, health::jitter())
        });
    }

    /// Connects over the build transport within `budget` and records the result; on
    /// failure also stops the builder's SSH master (it may be stuck on a dead link).
    pub(crate) async fn connect_recorded(
        &self,
        m: &Machine,
        budget: Duration,
    ) -> Result<Connection, ConnectError> {
        self.connect_recorded_via(self.tuning.build_transport, m, budget)
            .await
            .map(|(c, _)| c)
    }

    async fn connect_recorded_via(
        &self,
        via: TransportKind,
        m: &Machine,
        budget: Duration,
    ) -> Result<(Connection, TransportKind), ConnectError> {
        match self.connect_via(via, m, budget).await {
            Ok((c, latency, used)) => {
                self.record_up(&m.store_uri, Some(latency));
                Ok((c, used))
            }
            Err(e) => {
                self.record_down(&m.store_uri, &e.to_string());
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
    pub(crate) async fn probe_recorded(
        &self,
        m: &Machine,
        budget: Duration,
    ) -> Result<Option<Connection>, ConnectError> {
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

    /// One probe, as described by `kind`, ending by `deadline`. `started` is set once this
    /// probe holds the builder's probe lock and is connecting (so a caller that stops
    /// waiting knows the builder's state is still being found out, and by it).
    pub(crate) async fn probe(
        &self,
        m: &Machine,
        kind: Kind,
        deadline: Instant,
        started: &AtomicBool,
    ) -> Outcome {
        let uri = m.store_uri.clone();
        let _lock = match kind {
            Kind::HalfOpen(lock) => Some(lock),
            Kind::Fresh => {
                let wait = deadline.saturating_duration_since(Instant::now());
                match self.health.probe_lock(&uri, wait).await {
                    Ok(Some((lock, waited))) => {
                        if waited {
                            // Another hook probed it meanwhile: use its answer.
                            let h = self.health.read(&uri);
                            match h.verdict(health::now_ms(), &self.tuning) {
                                Verdict::Healthy => return Outcome::Up(None),
                                Verdict::BackingOff { .. } => {
                                    return Outcome::Down(ConnectError::Recorded(
                                        h.last_error.unwrap_or_default(),
                                    ));
                                }
                                Verdict::Probe => {}
                            }
                        }
                        Some(lock)
                    }
                    // Still being probed elsewhere at the deadline: not usable for this
                    // derivation, and nothing learned to record.
                    Ok(None) => return Outcome::Skipped,
                    // The lock itself failed (state directory unwritable): probe anyway.
                    Err(_) => None,
                }
            }
        };
        started.store(true, Ordering::Relaxed);
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(50) {
            return Outcome::Skipped;
        }
        match self.probe_recorded(m, left).await {
            Ok(c) => Outcome::Up(c.map(Box::new)),
            Err(e) => Outcome::Down(e),
        }
    }

    /// Probes `which` in parallel, all ending within the probe budget from now, and returns
    /// as soon as the answer to the daemon no longer depends on them: when every probe has
    /// ended, or `probe-grace-ms` after the first builder answered. The probes still
    /// connecting then are listed in `unfinished` (stopped here; see [`hand_off`]).
    pub(crate) async fn probe_all(
        self: &Arc<Self>,
        machines: &[Machine],
        which: Vec<(usize, Kind)>,
    ) -> Round {
        self.probe_all_within(machines, which, Some(self.tuning.probe_grace))
            .await
    }

    /// Probes `which` in parallel and waits for every probe to end (within the budget).
    pub(crate) async fn probe_all_to_end(
        self: &Arc<Self>,
        machines: &[Machine],
        which: Vec<(usize, Kind)>,
    ) -> Round {
        self.probe_all_within(machines, which, None).await
    }

    async fn probe_all_within(
        self: &Arc<Self>,
        machines: &[Machine],
        which: Vec<(usize, Kind)>,
        grace: Option<Duration>,
    ) -> Round {
        let deadline = Instant::now() + self.tuning.probe_timeout;
        // Every probe ends by `deadline` on its own (with its time-out recorded); the slack
        // lets those results arrive rather than count them as unfinished.
        let mut stop_at = deadline + Duration::from_millis(100);
        let mut set = tokio::task::JoinSet::new();
        let mut flags = Vec::new();
        for (i, kind) in which {
            let Some(m) = machines.get(i).cloned() else {
                continue;
            };
            let p = Arc::clone(self);
            let started = Arc::new(AtomicBool::new(false));
            flags.push((i, Arc::clone(&started)));
            set.spawn(async move { (i, p.probe(&m, kind, deadline, &started).await) });
        }
        let mut round = Round::default();
        let speed = |i: usize| machines.get(i).map_or(0.0, |m| m.speed_factor);
        let mut best_up: Option<f64> = None;
        loop {
            tokio::select! {
                r = set.join_next() => match r {
                    Some(Ok((i, outcome))) => {
                        let up = matches!(outcome, Outcome::Up(_));
                        round.outcomes.push((i, outcome));
                        if let (true, Some(g)) = (up, grace) {
                            if best_up.is_none() {
                                stop_at = stop_at.min(Instant::now() + g);
                            }
                            best_up = Some(best_up.map_or(speed(i), |b| b.max(speed(i))));
                        }
                        if let Some(best) = best_up {
                            let pending = flags
                                .iter()
                                .filter(|(j, _)| !round.outcomes.iter().any(|(k, _)| k == j))
                                .map(|(j, _)| speed(*j));
                            if !worth_waiting(best, pending) {
                                break;
                            }
                        }
                    }
                    Some(Err(_)) => {}
                    None => break,
                },
                () = tokio::time::sleep_until(stop_at.into()) => break,
            }
        }
        // Dropping the set stops the probes still running (their ssh processes are killed
        // on drop and their probe locks released).
        drop(set);
        let done: Vec<usize> = round.outcomes.iter().map(|(i, _)| *i).collect();
        round.unfinished = flags
            .into_iter()
            .filter(|(i, started)| !done.contains(i) && started.load(Ordering::Relaxed))
            .map(|(i, _)| i)
            .collect();
        round.outcomes.sort_by_key(|(i, _)| *i);
        round
    }
}

/// Once a builder of speed factor `best_up` has answered, is any still-pending probe of a
/// builder the selection could prefer? Only a higher speed factor can: the pending builders
/// have no measured speed yet, and equal ones would only tie. (A pending builder could
/// also have a free slot when the answered one has none; then the daemon is told to
/// postpone and asks again shortly, by when the detached probe has recorded its state.)
fn worth_waiting(best_up: f64, mut pending: impl Iterator<Item = f64>) -> bool {
    pending.any(|s| s > best_up)
}

/// What [`Prober::probe_all`] found by the time it returned.
#[derive(Default)]
pub(crate) struct Round {
    pub(crate) outcomes: Vec<(usize, Outcome)>,
    /// Builders whose probe (by this process) was still connecting: their state is still
    /// unknown, and nobody else is finding it out.
    pub(crate) unfinished: Vec<usize>,
}

/// Finds out the state of `machines` in a detached `ferry-build-hook probe-detached`
/// process, which records what it finds in the health store like any hook's probe.
///
/// The hook cannot do it itself once it has answered: when the build ends the daemon kills
/// the hook's whole process group (2.8 `DerivationGoal::buildDone`, `hook->pid.kill()`),
/// and a short build would end a probe of a dead builder before its deadline, so nothing
/// would be learnt and every later derivation would probe again. The detached process has
/// its own process group and none of the daemon's pipes (stdin, stdout, stderr, the build
/// log on fd 4), so the daemon neither waits for it nor kills it.
pub(crate) fn hand_off(machines: &[&Machine]) {
    if machines.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    // The daemon's pipes other than stdio (fd 4: the build log; later Nix versions also
    // pass fd 5) are inherited without close-on-exec: a shell closes them before the
    // probe process starts, so the daemon sees their end when this hook exits.
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("exec \"$0\" probe-detached 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&-")
        .arg(exe)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0);
    let Ok(mut child) = cmd.spawn() else { return };
    if let Some(mut stdin) = child.stdin.take() {
        let lines: String = machines.iter().map(|m| m.to_line() + "\n").collect();
        let _ = stdin.write_all(lines.as_bytes());
    }
    // Not waited for: it outlives this process and is reaped by init.
    drop(child);
}

#[cfg(test)]
mod tests {
    use super::{ConnectError, worth_waiting};
    use crate::ssh::SshError;

    /// The texts are what health records and messages show, as they were as strings.
    #[test]
    fn connect_errors_read_as_before() {
        let timeout = ConnectError::Timeout {
            ms: 3000,
            stage: "still in the SSH handshake".into(),
        };
        assert_eq!(
            timeout.to_string(),
            "no answer within 3000 ms (still in the SSH handshake)"
        );
        let refused = |why: &str| SshError::Connect {
            host: "b1".into(),
            reason: why.into(),
        };
        let both = ConnectError::BothTransports {
            openssh: refused("refused"),
            russh: refused("no route"),
        };
        assert_eq!(
            both.to_string(),
            "cannot connect to 'b1': refused (and over russh: cannot connect to 'b1': no route)"
        );
        assert_eq!(ConnectError::Recorded("gone".into()).to_string(), "gone");
    }

    #[test]
    fn waits_only_for_builders_that_could_be_preferred() {
        assert!(!worth_waiting(1.0, [].into_iter()));
        assert!(!worth_waiting(1.0, [1.0, 0.5].into_iter()));
        assert!(worth_waiting(1.0, [1.0, 2.0].into_iter()));
        assert!(!worth_waiting(4.0, [2.0].into_iter()));
    }
}
