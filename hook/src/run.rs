//! One hook process, from the settings stream to the exit status (docs/hook-protocol.md §1):
//! answer `try` requests until one is accepted, then do that build and exit.
//!
//! Logging: stderr is the reply channel, and after `# accept` the daemon drops every line
//! that is not `@nix` JSON, so everything the hook says goes through [`Logger`] as `@nix`
//! messages (shown to the client at their level), and the remote build log goes raw to fd 4.

use crate::config::{self, Tuning};
use crate::delegate;
use crate::fault::{self, Fault};
use crate::health::{self, LocalSituation, Verdict};
use crate::health_store::HealthStore;
use crate::local::{AnyImporter, LocalStore};
use crate::probe::{self, Kind, Outcome, Prober};
use crate::protocol::{self, NixLog, Reply, Request, TryRequest, Verbosity};
use crate::remote::{self, BuildOptions, Job, Progress};
use crate::select::{
    Decision, DeclineReason, HealthPolicy, LocalCaps, Need, Policy, Speed, eligible,
};
use crate::siblings;
use crate::slots::{HeldLock, LoadDir};
use crate::ssh::OpenSsh;
use ferry_nix::machines::{Machine, parse_builders_setting};
use ferry_nix::nixconf::{NixConf, RealFs};
use ferry_nix::wire::AsyncWireReader;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncRead;

/// Where things are, from the environment (the daemon's).
#[derive(Debug, Clone)]
pub struct Env {
    /// `$NIX_CONF_DIR`, default `/etc/nix`.
    pub conf_dir: PathBuf,
    /// Nix's state directory (`$NIX_STATE_DIR`, default `/nix/var/nix`): slot locks live in
    /// its `current-load`, shared with stock hooks.
    pub nix_state_dir: PathBuf,
    /// Ferry's own state (`$FERRY_STATE_DIR`, default `<nix state dir>/ferry`).
    pub ferry_state_dir: PathBuf,
    /// `$NIX_SSHOPTS`.
    pub nix_sshopts: Option<String>,
    /// The build log: fd 4, opened as `/dev/fd/4`.
    pub build_log: PathBuf,
    /// Ferry's configuration file (`FERRY_CONFIG`, default `/etc/ferry/ferry.toml`).
    pub config_path: PathBuf,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let nix_state_dir = var("NIX_STATE_DIR").unwrap_or_else(|| "/nix/var/nix".into());
        Env {
            conf_dir: var("NIX_CONF_DIR").unwrap_or_else(|| "/etc/nix".into()),
            ferry_state_dir: var("FERRY_STATE_DIR").unwrap_or_else(|| nix_state_dir.join("ferry")),
            nix_state_dir,
            nix_sshopts: std::env::var("NIX_SSHOPTS").ok(),
            build_log: "/dev/fd/4".into(),
            config_path: ferry_nix::config::path_from_env(),
        }
    }
}

/// `@nix` messages to stderr, filtered by the daemon's verbosity, each in one write.
pub struct Logger {
    verbosity: Verbosity,
    out: Mutex<Box<dyn Write + Send>>,
}

impl Logger {
    pub fn new(verbosity: Verbosity, out: Box<dyn Write + Send>) -> Self {
        Logger {
            verbosity,
            out: Mutex::new(out),
        }
    }

    pub fn log(&self, level: Verbosity, msg: impl Into<String>) {
        if level > self.verbosity {
            return;
        }
        self.raw(
            &NixLog::Msg {
                level,
                msg: msg.into(),
            }
            .render(),
        );
    }

    /// Writes a reply or a rendered message as one write.
    pub fn raw(&self, text: &str) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    }

    pub fn reply(&self, r: &Reply) {
        self.raw(&r.render());
    }
}

impl Progress for Logger {
    fn message(&self, text: &str) {
        self.log(Verbosity::TALKATIVE, text);
    }
}

/// The settings the hook uses, read once from nix.conf plus the stream.
pub struct Settings {
    pub conf: NixConf,
}

impl Settings {
    /// nix.conf from `NIX_CONF_DIR` (for the commands run outside the daemon).
    pub fn load(env: &Env) -> Result<Settings, ferry_nix::nixconf::NixConfError> {
        Ok(Settings {
            conf: NixConf::load_system(&env.conf_dir, &RealFs)?,
        })
    }

    /// The machines of the `builders` setting.
    pub fn machines(&self) -> Result<Vec<Machine>, ferry_nix::machines::MachinesError> {
        parse_builders_setting(self.conf.get("builders").unwrap_or(""), &self.this_system())
    }

    /// `max-jobs` is 0: the daemon never builds locally.
    fn max_jobs_zero(&self) -> bool {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        self.conf.get_max_jobs(cpus).ok().flatten() == Some(0)
    }

    pub fn this_system(&self) -> String {
        self.conf
            .get("system")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS))
    }

    pub fn local_caps(&self) -> LocalCaps {
        let set = |k: &str| -> BTreeSet<String> {
            self.conf
                .get_set(k)
                .map(|s| s.into_iter().map(str::to_owned).collect())
                .unwrap_or_default()
        };
        LocalCaps {
            system: self.this_system(),
            extra_platforms: set("extra-platforms"),
            system_features: set("system-features"),
        }
    }

    fn u64(&self, k: &str) -> u64 {
        self.conf.get_u64(k).ok().flatten().unwrap_or(0)
    }

    fn bool(&self, k: &str) -> bool {
        self.conf.get_bool(k).ok().flatten().unwrap_or(false)
    }

    fn build_options(&self) -> BuildOptions {
        BuildOptions {
            max_silent_time: self.u64("max-silent-time"),
            build_timeout: self.u64("timeout"),
            max_log_size: self.u64("max-log-size"),
            keep_failed: self.bool("keep-failed"),
        }
    }

    fn local_store(&self) -> LocalStore {
        let store = self
            .conf
            .get("store")
            .filter(|s| s.starts_with("local"))
            .map(str::to_owned);
        LocalStore {
            store,
            ..LocalStore::default()
        }
    }
}

/// What one hook process shares between its `try` answers and its build.
struct Ctx<'a> {
    settings: &'a Settings,
    env: &'a Env,
    prober: Arc<Prober>,
    logger: &'a Logger,
    /// The settings stream as the daemon sent it (replayed to the stock hook).
    daemon_settings: &'a [(String, String)],
    /// `stock-hook` from `[build-hook]`.
    stock_hook: Option<String>,
    /// When this process last waited `slot-wait-ms` for a slot in vain (see [`wait_plan`]).
    slot_wait_expired: Mutex<Option<Instant>>,
}

impl Ctx<'_> {
    fn note_slot_wait_expired(&self) {
        if let Ok(mut t) = self.slot_wait_expired.lock() {
            *t = Some(Instant::now());
        }
    }

    /// A slot wait of this process ended without a slot less than `build-poll-interval`
    /// ago: the slots are still full, and the daemon is asking about the other waiting
    /// derivations of the same round.
    fn slot_wait_expired_lately(&self) -> bool {
        let poll = match self.settings.u64("build-poll-interval") {
            0 => 5,
            n => n,
        };
        self.slot_wait_expired
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(poll))
    }
}

/// Runs the hook; returns the exit status.
pub async fn run<R: AsyncRead + Unpin>(
    argv: &[String],
    env: &Env,
    stdin: R,
    logger: &Logger,
) -> i32 {
    if let Err(e) = protocol::parse_args(argv) {
        logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
        return 1;
    }
    let mut input = AsyncWireReader::new(stdin);
    let stream = match protocol::read_settings(&mut input).await {
        Ok(s) => s,
        Err(e) => {
            logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
            return 1;
        }
    };
    // Nix's own configuration first, then the daemon's effective values (Lix 2.92–2.93 send
    // only overridden settings, docs/hook-protocol.md §1.3).
    let mut conf = match NixConf::load_system(&env.conf_dir, &RealFs) {
        Ok(c) => c,
        Err(e) => {
            logger.log(
                Verbosity::WARN,
                format!("ferry-build-hook: ignoring nix.conf: {e}"),
            );
            let mut c = NixConf::new();
            c.set_default(
                "builders",
                &format!("@{}", env.conf_dir.join("machines").display()),
            );
            c
        }
    };
    conf.apply_overrides(&stream);
    let settings = Settings { conf };
    // A broken Ferry configuration must not break builds: say so and use the defaults.
    let (tuning, stock_hook) = config::load_all(&env.config_path).unwrap_or_else(|e| {
        logger.log(
            Verbosity::WARN,
            format!("ferry-build-hook: using defaults: {e}"),
        );
        (Tuning::default(), None)
    });
    let ctx = Ctx {
        settings: &settings,
        env,
        prober: Arc::new(prober(env, tuning)),
        logger,
        daemon_settings: &stream,
        stock_hook,
        slot_wait_expired: Mutex::new(None),
    };

    loop {
        let t = match protocol::read_request(&mut input).await {
            Ok(Request::Try(t)) => t,
            Ok(Request::Done) => return 0,
            Err(e) => {
                logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
                return 1;
            }
        };
        match answer(&t, &ctx).await {
            Answered::Replied => continue,
            Answered::Stop(code) => return code,
            Answered::Accepted(chosen) => return build(*chosen, &t, &mut input, &ctx).await,
            Answered::Delegate(others) => {
                let verbosity = argv.last().map_or("3", String::as_str);
                match hand_over(&t, &others, verbosity, &ctx, input.get_mut()).await {
                    Some(code) => return code,
                    None => continue,
                }
            }
        }
    }
}

/// The transport and health store from the environment and configuration.
pub fn prober(env: &Env, tuning: Tuning) -> Prober {
    let mut ssh = OpenSsh::new(env.ferry_state_dir.join("ssh"), env.nix_sshopts.as_deref());
    ssh.connect_timeout = Some(tuning.probe_timeout);
    // Without a writable state directory health is not remembered, but builds still work.
    let health = HealthStore::open(&env.ferry_state_dir)
        .unwrap_or_else(|_| HealthStore::at(&env.ferry_state_dir));
    Prober {
        ssh,
        russh: crate::russh::Russh {
            nix_sshopts: env
                .nix_sshopts
                .as_deref()
                .is_some_and(|o| !o.trim().is_empty()),
            ..crate::russh::Russh::for_current_user()
        },
        health,
        tuning,
    }
}

/// The builder chosen for a build, and what failover after the accept needs.
struct Chosen {
    conn: remote::Connection,
    machine: usize,
    slot: Option<HeldLock>,
    machines: Vec<Machine>,
    need: Need,
    /// The builders that can take the derivation (system, features), whatever their health.
    candidates: BTreeSet<usize>,
}

enum Answered {
    Replied,
    Stop(i32),
    Accepted(Box<Chosen>),
    /// Only these non-`ssh://` machines can take it: the stock hook builds it.
    Delegate(Vec<Machine>),
}

/// Selects a machine for one `try` from the builders' health (probing those whose state
/// is unknown or stale in parallel, within the probe budget), connects, and replies.
async fn answer(t: &TryRequest, ctx: &Ctx<'_>) -> Answered {
    let logger = ctx.logger;
    let machines = match ctx.settings.machines() {
        Ok(m) => m,
        Err(e) => {
            logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
            logger.reply(&Reply::Decline);
            return Answered::Replied;
        }
    };
    if machines.is_empty() {
        logger.reply(&Reply::DeclinePermanently);
        return Answered::Stop(0);
    }
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
    let need = Need {
        system: t.needed_system.clone(),
        required_features: t.required_features.clone(),
        am_willing: t.am_willing,
    };
    let local = ctx.settings.local_caps();
    let tuning = ctx.prober.tuning;
    // Local first by policy: answer before touching any builder.
    if !tuning.prefer_remote && local.can_build(&need) {
        logger.log(
            Verbosity::CHATTY,
            "ferry-build-hook: building locally (prefer-remote = false)",
        );
        logger.reply(&Reply::Decline);
        return Answered::Replied;
    }
    let load_dir = match LoadDir::open(&ctx.env.nix_state_dir) {
        Ok(d) => d,
        Err(e) => {
            logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
            logger.reply(&Reply::Decline);
            return Answered::Replied;
        }
    };

    let right_type = eligible(&machines, &need, &excluded);
    if right_type.is_empty() {
        let others: Vec<Machine> = eligible(&machines, &need, &native)
            .into_iter()
            .filter_map(|i| machines.get(i).cloned())
            .collect();
        if !others.is_empty() {
            return Answered::Delegate(others);
        }
    }
    let (healthy, probed, mut deferred) = classify_and_probe(ctx, &machines, &right_type).await;
    let fit = Fit {
        machines: &machines,
        right_type: &right_type,
        need,
        local,
    };
    let known = Known { healthy, probed };
    let answered = choose(t, ctx, &load_dir, &fit, known, &mut deferred).await;
    // Builders whose state is still unknown are found out after the answer, not before.
    release_deferred(ctx, &machines, deferred);
    answered
}

/// What one `try` needs, and the builders that can take it (system, features).
struct Fit<'m> {
    machines: &'m [Machine],
    right_type: &'m [usize],
    need: Need,
    local: LocalCaps,
}

/// Which of the fitting builders are known healthy, and the connections their probes
/// opened (reused for the build).
struct Known {
    healthy: BTreeSet<usize>,
    probed: BTreeMap<usize, Box<remote::Connection>>,
}

/// Picks a healthy builder with a free slot, connects and replies; when they are all full,
/// first finds out the builders whose state is unknown and waits (bounded) for a slot, see
/// [`wait_plan`]; then declines or postpones.
async fn choose(
    t: &TryRequest,
    ctx: &Ctx<'_>,
    load_dir: &LoadDir,
    f: &Fit<'_>,
    mut k: Known,
    deferred: &mut Vec<(usize, Kind)>,
) -> Answered {
    let logger = ctx.logger;
    let tuning = ctx.prober.tuning;
    let machines = f.machines;
    let need = &f.need;
    let local = &f.local;
    let mut waited = false;
    // Whether a `# decline` makes Nix wait for a running build (asked once, when needed).
    let mut decline_ok: Option<bool> = None;
    loop {
        let policy = policy_for(ctx, machines, tuning);
        let mut picked = tokio::task::block_in_place(|| {
            pick(load_dir, machines, need, local, &k.healthy, &policy)
        });
        if !waited && matches!(picked, Ok((Decision::Postpone, _))) {
            waited = true;
            let ok = match decline_ok {
                Some(ok) => ok,
                None => local.could_build(need) && decline_waits(ctx, t).await,
            };
            decline_ok = Some(ok);
            if let Some(plan) = wait_plan(ctx, ok, !deferred.is_empty()) {
                let start = Instant::now();
                picked = wait_for_machine(ctx, load_dir, f, &mut k, deferred, &plan).await;
                let still_full = matches!(picked, Ok((Decision::Postpone, _)));
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
        let (decision, slot) = match picked {
            Ok(p) => p,
            Err(e) => {
                logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
                logger.reply(&Reply::Decline);
                return Answered::Replied;
            }
        };
        match decision {
            Decision::Use { machine, .. } => {
                let Some(m) = machines.get(machine) else {
                    k.healthy.remove(&machine);
                    continue;
                };
                let conn = match k.probed.remove(&machine) {
                    Some(c) => Ok(*c),
                    None => ctx.prober.connect_recorded(m, tuning.probe_timeout).await,
                };
                match conn {
                    Ok(conn) => {
                        logger.reply(&Reply::Accept(m.store_uri.clone()));
                        return Answered::Accepted(Box::new(Chosen {
                            conn,
                            machine,
                            slot,
                            machines: machines.to_vec(),
                            need: f.need.clone(),
                            candidates: f.right_type.iter().copied().collect(),
                        }));
                    }
                    Err(e) => {
                        logger.log(
                            Verbosity::WARN,
                            format!("cannot build on '{}': {e}", m.store_uri),
                        );
                        k.healthy.remove(&machine);
                    }
                }
            }
            Decision::Postpone => {
                // Every fitting builder is busy. A postponed goal is asked again only every
                // 5 s; a declined one that the host could build but has no local slot for is
                // asked again as soon as one of the worker's builds ends (`siblings.rs`).
                let ok = match decline_ok {
                    Some(ok) => ok,
                    None => local.could_build(need) && decline_waits(ctx, t).await,
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
                return Answered::Replied;
            }
            Decision::Decline(reason) => {
                explain_decline(ctx, t, need, local, machines, f.right_type, reason);
                logger.reply(&Reply::Decline);
                return Answered::Replied;
            }
        }
    }
}

/// How long [`wait_for_machine`] may keep the daemon waiting for an answer, and for what.
#[derive(Debug, Clone, Copy)]
struct WaitPlan {
    until: Instant,
    /// Also wait for a slot of a healthy builder to free, not only for the probes.
    for_slots: bool,
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
fn wait_plan(ctx: &Ctx<'_>, decline_ok: bool, probes_pending: bool) -> Option<WaitPlan> {
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
async fn wait_for_machine(
    ctx: &Ctx<'_>,
    load_dir: &LoadDir,
    f: &Fit<'_>,
    k: &mut Known,
    deferred: &mut Vec<(usize, Kind)>,
    plan: &WaitPlan,
) -> Result<(Decision, Option<HeldLock>), crate::slots::SlotError> {
    let tuning = ctx.prober.tuning;
    let machines = f.machines;
    let probe_deadline = Instant::now() + tuning.probe_timeout;
    let mut set = tokio::task::JoinSet::new();
    let mut flags = Vec::new();
    for (i, kind) in deferred.drain(..) {
        let Some(m) = machines.get(i).cloned() else {
            continue;
        };
        let p = Arc::clone(&ctx.prober);
        let started = Arc::new(AtomicBool::new(false));
        flags.push((i, Arc::clone(&started)));
        set.spawn(async move { (i, p.probe(&m, kind, probe_deadline, &started).await) });
    }
    let mut ended = BTreeSet::new();
    let picked = loop {
        // Builders found up meanwhile, by these probes or by other hooks.
        let now_ms = health::now_ms();
        for &i in f.right_type {
            if k.healthy.contains(&i) {
                continue;
            }
            if let Some(m) = machines.get(i)
                && ctx
                    .prober
                    .health
                    .read(&m.store_uri)
                    .verdict(now_ms, &tuning)
                    == Verdict::Healthy
            {
                k.healthy.insert(i);
            }
        }
        let policy = policy_for(ctx, machines, tuning);
        let picked = tokio::task::block_in_place(|| {
            pick(load_dir, machines, &f.need, &f.local, &k.healthy, &policy)
        });
        if !matches!(picked, Ok((Decision::Postpone, _))) {
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
                    match outcome {
                        Outcome::Up(conn) => {
                            k.healthy.insert(i);
                            if let Some(c) = conn {
                                k.probed.insert(i, c);
                            }
                        }
                        Outcome::Down(e) => {
                            if let Some(m) = machines.get(i) {
                                ctx.logger.log(
                                    Verbosity::WARN,
                                    format!("cannot build on '{}': {e}", m.store_uri),
                                );
                            }
                        }
                        Outcome::Skipped => {}
                    }
                }
            }
            () = tokio::time::sleep(SLOT_POLL.min(left)) => {}
        }
    };
    // Dropping the set stops the probes still connecting; the background takes them over.
    drop(set);
    for (i, started) in flags {
        if !ended.contains(&i) && started.load(Ordering::Relaxed) {
            deferred.push((i, Kind::Fresh));
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
/// (`local::decline_waits_with_max_jobs_zero`).
async fn decline_waits(ctx: &Ctx<'_>, t: &TryRequest) -> bool {
    if !ctx.settings.max_jobs_zero() {
        return !t.am_willing;
    }
    if siblings::count() == 0 {
        return false;
    }
    let local = ctx.settings.local_store();
    crate::local::local_nix_version(&local)
        .await
        .is_some_and(|v| crate::local::decline_waits_with_max_jobs_zero(&v))
}

/// Sorts the right-type builders by their health and probes those that need it. Returns
/// the healthy ones, the connections the probes opened (reused for the build), and the
/// builders whose state is still unknown: when a builder is known up, the answer does not
/// wait for the others' probes (they run only if the known ones are full, see
/// [`wait_plan`], or else in the background after the answer); when none is, the probes
/// the answer stopped waiting for.
async fn classify_and_probe(
    ctx: &Ctx<'_>,
    machines: &[Machine],
    right_type: &[usize],
) -> (
    BTreeSet<usize>,
    BTreeMap<usize, Box<remote::Connection>>,
    Vec<(usize, Kind)>,
) {
    let now = health::now_ms();
    let tuning = ctx.prober.tuning;
    let mut healthy = BTreeSet::new();
    let mut to_probe = Vec::new();
    for &i in right_type {
        let Some(m) = machines.get(i) else { continue };
        let h = ctx.prober.health.read(&m.store_uri);
        match h.verdict(now, &tuning) {
            Verdict::Healthy => {
                healthy.insert(i);
            }
            Verdict::BackingOff { .. } => {}
            Verdict::Probe if h.state == health::State::Down => {
                // Half-open: only the hook that gets the lock probes; the others skip it.
                if let Ok(Some(lock)) = ctx.prober.health.try_probe_lock(&m.store_uri) {
                    to_probe.push((i, Kind::HalfOpen(lock)));
                }
            }
            Verdict::Probe => to_probe.push((i, Kind::Fresh)),
        }
    }
    let mut conns = BTreeMap::new();
    if to_probe.is_empty() || !healthy.is_empty() {
        return (healthy, conns, to_probe);
    }
    let round = ctx.prober.probe_all(machines, to_probe).await;
    for (i, outcome) in round.outcomes {
        match outcome {
            Outcome::Up(conn) => {
                healthy.insert(i);
                if let Some(c) = conn {
                    conns.insert(i, c);
                }
            }
            Outcome::Down(e) => {
                if let Some(m) = machines.get(i) {
                    ctx.logger.log(
                        Verbosity::WARN,
                        format!("cannot build on '{}': {e}", m.store_uri),
                    );
                }
            }
            Outcome::Skipped => {}
        }
    }
    let unfinished = round
        .unfinished
        .into_iter()
        .map(|i| (i, Kind::Fresh))
        .collect();
    (healthy, conns, unfinished)
}

/// After the answer: the builders whose state is still unknown and that nobody is probing
/// go to a detached process ([`probe_in_background`]).
fn release_deferred(ctx: &Ctx<'_>, machines: &[Machine], deferred: Vec<(usize, Kind)>) {
    let mut unknown = Vec::new();
    for (i, kind) in deferred {
        let Some(m) = machines.get(i) else { continue };
        let free = match kind {
            // Released here, so the detached process can take it.
            Kind::HalfOpen(lock) => {
                drop(lock);
                true
            }
            // Being probed by another process already: nothing to add.
            Kind::Fresh => {
                matches!(ctx.prober.health.try_probe_lock(&m.store_uri), Ok(Some(_)))
            }
        };
        if free {
            unknown.push(m);
        }
    }
    probe_in_background(ctx, &unknown);
}

/// Says which builders the answer does not wait for, and hands their probes to a detached
/// process ([`probe::hand_off`]).
fn probe_in_background(ctx: &Ctx<'_>, machines: &[&Machine]) {
    if machines.is_empty() {
        return;
    }
    let names: Vec<&str> = machines.iter().map(|m| m.store_uri.as_str()).collect();
    ctx.logger.log(
        Verbosity::TALKATIVE,
        format!(
            "ferry-build-hook: not waiting for {}; probing in the background",
            names.join(", ")
        ),
    );
    probe::hand_off(machines);
}

fn policy_for(ctx: &Ctx<'_>, machines: &[Machine], tuning: Tuning) -> HealthPolicy {
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
fn explain_decline(
    ctx: &Ctx<'_>,
    t: &TryRequest,
    need: &Need,
    local: &LocalCaps,
    machines: &[Machine],
    right_type: &[usize],
    reason: DeclineReason,
) {
    let logger = ctx.logger;
    if reason != DeclineReason::NoMachine || right_type.is_empty() {
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
    let states: Vec<health::Health> = right_type
        .iter()
        .filter_map(|&i| machines.get(i))
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

/// Under `main-lock`: measures the loads of the healthy builders, decides, and keeps the
/// chosen slot's lock.
fn pick(
    dir: &LoadDir,
    machines: &[Machine],
    need: &Need,
    local: &LocalCaps,
    healthy: &BTreeSet<usize>,
    policy: &dyn Policy,
) -> Result<(Decision, Option<HeldLock>), crate::slots::SlotError> {
    let _main = dir.lock_main()?;
    let mut loads = Vec::new();
    let mut held = Vec::new();
    for &i in healthy {
        if let Some(m) = machines.get(i) {
            let (load, lock) = dir.probe(i, m)?;
            loads.push(load);
            held.push((i, lock));
        }
    }
    let decision = policy.decide(machines, &loads, need, local);
    let slot = match decision {
        Decision::Use { machine, .. } => held
            .into_iter()
            .find(|(i, _)| *i == machine)
            .and_then(|(_, l)| l),
        _ => None,
    };
    if let Some(l) = &slot {
        l.touch();
    }
    Ok((decision, slot))
}

/// After `# accept`: reads the inputs and outputs, copies them (failing over to another
/// healthy builder if the chosen one breaks before the build starts), builds, and maps the
/// result to an exit status.
async fn build<R: AsyncRead + Unpin>(
    chosen: Chosen,
    t: &TryRequest,
    input: &mut AsyncWireReader<R>,
    ctx: &Ctx<'_>,
) -> i32 {
    let logger = ctx.logger;
    let accepted = match protocol::read_accepted(input).await {
        Ok(a) => a,
        Err(e) => {
            logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
            return 1;
        }
    };
    let local = ctx.settings.local_store();
    let job = Job::new(
        &local.store_dir,
        &t.drv_path,
        &accepted.inputs,
        accepted.wanted_outputs,
        ctx.settings.build_options(),
        ctx.settings.bool("builders-use-substitutes"),
    );
    let drv = job.map_err(|e| e.to_string()).and_then(|job| {
        let drv = local
            .read_derivation(&job.drv_path)
            .map_err(|e| e.to_string())?;
        Ok((job, drv))
    });
    let (job, drv) = match drv {
        Ok(x) => x,
        Err(e) => {
            logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
            return 1;
        }
    };
    let Chosen {
        mut conn,
        mut machine,
        mut slot,
        machines,
        need,
        candidates,
    } = chosen;
    // Builders that failed this derivation (their failure is also recorded in their health,
    // but that may not be writable).
    let mut failed = BTreeSet::new();
    let load_dir = LoadDir::open(&ctx.env.nix_state_dir).ok();
    // Transient failures left to retry (`fault.rs`), and whether the current builder was
    // already given its second chance.
    let mut retries_left = fault::RETRIES;
    let mut retried_here = false;
    let mut importer: Option<AnyImporter> = None;
    loop {
        let Some(m) = machines.get(machine) else {
            return 1;
        };
        // Only one upload at a time per builder, shared with stock hooks; given up on after
        // 15 minutes like the stock hook's alarm.
        let upload_lock = load_dir.as_ref().and_then(|d| {
            tokio::task::block_in_place(|| d.upload_lock(m, Duration::from_secs(15 * 60)))
                .ok()
                .flatten()
        });
        let (e, remote_stderr, build_started) =
            match remote::upload(&mut conn, &job, &local, logger, upload_lock).await {
                Ok(upload) => {
                    // The remote log goes to fd 4 as it arrives.
                    let (forwarder, tail) = conn.forward_log(ctx.env.build_log.clone());
                    // After the accept, once per hook process: `auto` runs `nix-store --version`.
                    if importer.is_none() {
                        let chosen =
                            AnyImporter::choose(ctx.prober.tuning.import_method, &local).await;
                        logger.log(
                        Verbosity::TALKATIVE,
                        format!(
                            "ferry-build-hook: importing the outputs of '{}' with import-method {}",
                            t.drv_path,
                            chosen.name()
                        ),
                    );
                        importer = Some(chosen);
                    }
                    let Some(imp) = importer.as_ref() else {
                        return 1;
                    };
                    let result = remote::build_and_fetch(&mut conn, &job, &drv, imp).await;
                    conn.close().await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), forwarder).await;
                    match result {
                        Ok((build_secs, fetched)) => {
                            drop(slot);
                            let bytes = upload.bytes + fetched.bytes;
                            let secs = upload.secs + fetched.secs;
                            let _ = ctx.prober.health.update(&m.store_uri, |h| {
                                h.record_build(health::now_ms(), build_secs, Some((bytes, secs)))
                            });
                            return 0;
                        }
                        Err(e) => {
                            let tail = tail.lock().map(|t| t.clone()).unwrap_or_default();
                            (e, String::from_utf8_lossy(&tail).into_owned(), true)
                        }
                    }
                }
                Err(e) => {
                    // The builder's side often says why only on its stderr.
                    let closing = tokio::time::timeout(Duration::from_secs(3), conn.close());
                    let stderr = match closing.await {
                        Ok(mut tap) => tap.collect(Duration::from_millis(500)).await,
                        Err(_) => String::new(),
                    };
                    (e, stderr, false)
                }
            };
        let fault = fault::classify(&e, &remote_stderr);
        match fault {
            Fault::Transient(why) if retries_left > 0 => {
                retries_left -= 1;
                let n = fault::RETRIES - retries_left;
                tokio::time::sleep(fault::backoff(n)).await;
                // Once more on the same builder, then on another one.
                let again = if retried_here {
                    None
                } else {
                    ctx.prober
                        .connect_recorded(m, ctx.prober.tuning.probe_timeout)
                        .await
                        .ok()
                };
                let (c, i, s) = match again {
                    Some(c) => (c, machine, slot.take()),
                    None => {
                        drop(slot.take());
                        failed.insert(machine);
                        let Some(next) = failover(
                            ctx,
                            load_dir.as_ref(),
                            &machines,
                            &need,
                            &candidates,
                            &mut failed,
                        )
                        .await
                        else {
                            logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
                            return e.exit_code();
                        };
                        next
                    }
                };
                retried_here = i == machine;
                logger.log(
                    Verbosity::WARN,
                    format!(
                        "ferry-build-hook: {e} ({}); trying again on '{}' (retry {n} of {})",
                        why.describe(),
                        machines.get(i).map_or("?", |x| x.store_uri.as_str()),
                        fault::RETRIES
                    ),
                );
                (conn, machine, slot) = (c, i, s);
            }
            Fault::Builder if !build_started => {
                // The builder broke before the build started: the machine name the daemon
                // printed is cosmetic, so another healthy builder can take over
                // (docs/hook-protocol.md §7.5).
                ctx.prober.record_down(&m.store_uri, &e.to_string());
                drop(slot.take());
                failed.insert(machine);
                match failover(
                    ctx,
                    load_dir.as_ref(),
                    &machines,
                    &need,
                    &candidates,
                    &mut failed,
                )
                .await
                {
                    Some((c, i, s)) => {
                        logger.log(
                            Verbosity::WARN,
                            format!(
                                "ferry-build-hook: copying to '{}' failed ({e}); building on '{}' instead",
                                m.store_uri,
                                machines.get(i).map_or("?", |x| x.store_uri.as_str())
                            ),
                        );
                        retried_here = false;
                        (conn, machine, slot) = (c, i, s);
                    }
                    None => {
                        logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
                        return 1;
                    }
                }
            }
            _ => {
                if fault == Fault::Builder {
                    ctx.prober.record_down(&m.store_uri, &e.to_string());
                }
                // Shown to the client once; the remote log already went to fd 4.
                logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
                return e.exit_code();
            }
        }
    }
}

/// Another builder with a free slot, connected, or `None`. Candidates are the builders
/// that fit and are not known to be down now: healthy ones, and those whose state is still
/// unknown (the answer to the daemon did not wait for their probe), which get connected to
/// within the probe budget like a probe.
async fn failover(
    ctx: &Ctx<'_>,
    load_dir: Option<&LoadDir>,
    machines: &[Machine],
    need: &Need,
    candidates: &BTreeSet<usize>,
    failed: &mut BTreeSet<usize>,
) -> Option<(remote::Connection, usize, Option<HeldLock>)> {
    let dir = load_dir?;
    // The daemon's local-build question is settled by the accept: only builders now.
    let no_local = LocalCaps::default();
    let tuning = ctx.prober.tuning;
    loop {
        let now = health::now_ms();
        let usable: BTreeSet<usize> = candidates
            .iter()
            .copied()
            .filter(|i| !failed.contains(i))
            .filter(|&i| {
                machines.get(i).is_some_and(|m| {
                    !matches!(
                        ctx.prober.health.read(&m.store_uri).verdict(now, &tuning),
                        Verdict::BackingOff { .. }
                    )
                })
            })
            .collect();
        if usable.is_empty() {
            return None;
        }
        let policy = HealthPolicy {
            prefer_remote: true,
            ..policy_for(ctx, machines, tuning)
        };
        let picked =
            tokio::task::block_in_place(|| pick(dir, machines, need, &no_local, &usable, &policy));
        let Ok((Decision::Use { machine, .. }, slot)) = picked else {
            return None;
        };
        let m = machines.get(machine)?;
        match ctx.prober.connect_recorded(m, tuning.probe_timeout).await {
            Ok(c) => return Some((c, machine, slot)),
            Err(e) => {
                ctx.logger.log(
                    Verbosity::WARN,
                    format!("cannot build on '{}': {e}", m.store_uri),
                );
                failed.insert(machine);
            }
        }
    }
}

/// Hands the derivation to the stock hook (`delegate.rs`). `Some(status)`: the stock hook
/// ran as this hook and exited with `status`. `None`: it could not be started; the
/// derivation was declined with the reason, and Ferry keeps answering.
async fn hand_over<R: AsyncRead + Unpin>(
    t: &TryRequest,
    others: &[Machine],
    verbosity: &str,
    ctx: &Ctx<'_>,
    stdin: &mut R,
) -> Option<i32> {
    let logger = ctx.logger;
    let names: Vec<&str> = others.iter().map(|m| m.store_uri.as_str()).collect();
    let command = delegate::stock_hook_command(
        ctx.stock_hook.as_deref(),
        |p| p.exists(),
        delegate::find_nix_on_path,
    );
    let started = match command {
        Ok(command) => {
            logger.log(
                Verbosity::TALKATIVE,
                format!(
                    "ferry-build-hook: '{}' can only go to {}, which Ferry does not speak to (only ssh://); handing it to the stock hook {}",
                    t.drv_path,
                    names.join(", "),
                    command.join(" ")
                ),
            );
            let refs: Vec<&Machine> = others.iter().collect();
            let prefix = delegate::replay(ctx.daemon_settings, &refs, t);
            delegate::hand_over(&command, verbosity, prefix, stdin).await
        }
        Err(e) => Err(e),
    };
    match started {
        Ok(code) => Some(code),
        Err(e) => {
            logger.log(
                Verbosity::ERROR,
                format!(
                    "ferry-build-hook: cannot build '{}' on {}: {e}",
                    t.drv_path,
                    names.join(", ")
                ),
            );
            logger.reply(&Reply::Decline);
            None
        }
    }
}
