//! One hook process, from the settings stream to the exit status (docs/hook-protocol.md §1):
//! answer `try` requests until one is accepted, then do that build and exit.
//!
//! One `try` goes through three steps, each its own module:
//! - `decide`: which builders fit, their health (`probing`: probes and the bounded wait
//!   for a slot), the selection under the slot locks, the reply;
//! - `connect`: the connection to the chosen builder (the probe's, or a new one), and
//!   failover to another builder after the accept;
//! - `transfer`: after `# accept`, copy the inputs, build, fetch and import the outputs,
//!   retrying transient failures ([`crate::fault`]).
//!
//! Every error that ends a `try` or the process is a [`HookError`]; [`HookError::report`]
//! is the one place that turns it into a log line, a reply and an exit status.
//!
//! Logging: stderr is the reply channel, and after `# accept` the daemon drops every line
//! that is not `@nix` JSON, so everything the hook says goes through [`Logger`] as `@nix`
//! messages (shown to the client at their level), and the remote build log goes raw to fd 4.

mod connect;
mod decide;
mod error;
mod probing;
mod transfer;

pub(crate) use error::HookError;

use crate::config::{self, Tuning};
use crate::delegate;
use crate::health_store::HealthStore;
use crate::probe::Prober;
use crate::protocol::{self, NixLog, Reply, Request, TryRequest, Verbosity};
use crate::remote::{BuildOptions, Progress};
use crate::select::LocalCaps;
use crate::ssh::OpenSsh;
use decide::Answered;
use ferry_nix::machines::{Machine, parse_builders_setting};
use ferry_nix::nixconf::{NixConf, RealFs};
use ferry_nix::wire::AsyncWireReader;
use ferry_store::LocalStore;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncRead;

/// Where things are, from the environment (the daemon's).
#[derive(Debug, Clone)]
pub struct Env {
    /// `$NIX_CONF_DIR`, default `/etc/nix`.
    pub(crate) conf_dir: PathBuf,
    /// Nix's state directory (`$NIX_STATE_DIR`, default `/nix/var/nix`): slot locks live in
    /// its `current-load`, shared with stock hooks.
    pub(crate) nix_state_dir: PathBuf,
    /// Ferry's own state (`$FERRY_STATE_DIR`, default `<nix state dir>/ferry`).
    pub(crate) ferry_state_dir: PathBuf,
    /// `$NIX_SSHOPTS`.
    pub(crate) nix_sshopts: Option<String>,
    /// The build log: fd 4, opened as `/dev/fd/4`.
    pub(crate) build_log: PathBuf,
    /// Ferry's configuration file (`FERRY_CONFIG`, default `/etc/ferry/ferry.toml`).
    pub(crate) config_path: PathBuf,
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
    pub(crate) fn raw(&self, text: &str) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    }

    pub(crate) fn reply(&self, r: &Reply) {
        self.raw(&r.render());
    }
}

impl Progress for Logger {
    fn message(&self, text: &str) {
        self.log(Verbosity::TALKATIVE, text);
    }
}

/// The settings the hook uses, read once from nix.conf plus the stream.
pub(crate) struct Settings {
    pub(crate) conf: NixConf,
}

impl Settings {
    /// nix.conf from `NIX_CONF_DIR` (for the commands run outside the daemon).
    pub(crate) fn load(env: &Env) -> Result<Settings, ferry_nix::nixconf::NixConfError> {
        Ok(Settings {
            conf: NixConf::load_system(&env.conf_dir, &RealFs)?,
        })
    }

    /// The machines of the `builders` setting.
    pub(crate) fn machines(&self) -> Result<Vec<Machine>, ferry_nix::machines::MachinesError> {
        parse_builders_setting(self.conf.get("builders").unwrap_or(""), &self.this_system())
    }

    /// `max-jobs` is 0: the daemon never builds locally.
    fn max_jobs_zero(&self) -> bool {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        self.conf.get_max_jobs(cpus).ok().flatten() == Some(0)
    }

    pub(crate) fn this_system(&self) -> String {
        self.conf
            .get("system")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS))
    }

    pub(crate) fn local_caps(&self) -> LocalCaps {
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

    /// `state_dir`: where the local Nix's version is remembered between hook processes.
    fn local_store(&self, state_dir: &std::path::Path) -> LocalStore {
        let store = self
            .conf
            .get("store")
            .filter(|s| s.starts_with("local"))
            .map(str::to_owned);
        LocalStore::default()
            .with_store(store)
            .with_version_cache(state_dir.join("nix-version"))
    }
}

/// What one hook process shares between its `try` answers and its build.
struct Ctx<'a> {
    settings: &'a Settings,
    /// The local store of [`Settings::local_store`], one per process so that the local Nix
    /// version is asked once.
    local: LocalStore,
    env: &'a Env,
    prober: Arc<Prober>,
    logger: &'a Logger,
    /// The settings stream as the daemon sent it (replayed to the stock hook).
    daemon_settings: &'a [(String, String)],
    /// `stock-hook` from `[build-hook]`.
    stock_hook: Option<String>,
    /// When this process last waited `slot-wait-ms` for a slot in vain (see
    /// [`probing::wait_plan`]).
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

    /// Says that `m` cannot be used now (a failed probe or connect).
    fn cannot_build_on(&self, m: &Machine, why: &dyn std::fmt::Display) {
        self.logger.log(
            Verbosity::WARN,
            format!("cannot build on '{}': {why}", m.store_uri),
        );
    }
}

/// Runs the hook; returns the exit status.
pub async fn run<R: AsyncRead + Unpin>(
    argv: &[String],
    env: &Env,
    stdin: R,
    logger: &Logger,
) -> i32 {
    // A broken command line or stream always ends the process (status 1).
    if let Err(e) = protocol::parse_args(argv) {
        return HookError::from(e).report(logger).unwrap_or(1);
    }
    let mut input = AsyncWireReader::new(stdin);
    let stream = match protocol::read_settings(&mut input).await {
        Ok(s) => s,
        Err(e) => return HookError::from(e).report(logger).unwrap_or(1),
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
        local: settings.local_store(&env.ferry_state_dir),
        env,
        prober: Arc::new(prober(env, tuning)),
        logger,
        daemon_settings: &stream,
        stock_hook,
        slot_wait_expired: Mutex::new(None),
    };
    let verbosity = argv.last().map_or("3", String::as_str);
    // The local Nix's version decides how outputs are imported and whether a decline waits:
    // find it out while the daemon's request and the builder's connection are on their
    // way, not after the build.
    let local = ctx.local.clone();
    tokio::spawn(async move { local.nix_version().await });

    loop {
        let t = match protocol::read_request(&mut input).await {
            Ok(Request::Try(t)) => t,
            Ok(Request::Done) => return 0,
            Err(e) => return HookError::from(e).report(logger).unwrap_or(1),
        };
        let handled = handle(&t, &ctx, &mut input, verbosity).await;
        let status = match handled {
            Ok(status) => status,
            Err(e) => e.report(logger),
        };
        if let Some(status) = status {
            return status;
        }
    }
}

/// One `try`: decide, and if accepted, build. `None`: replied, keep answering; else the
/// exit status.
async fn handle<R: AsyncRead + Unpin>(
    t: &TryRequest,
    ctx: &Ctx<'_>,
    input: &mut AsyncWireReader<R>,
    verbosity: &str,
) -> Result<Option<i32>, HookError> {
    let machines = ctx.settings.machines()?;
    match decide::answer(t, &machines, ctx).await? {
        Answered::Replied => Ok(None),
        Answered::Stop(status) => Ok(Some(status)),
        Answered::Accepted(chosen) => {
            transfer::build(*chosen, t, input, ctx).await?;
            Ok(Some(0))
        }
        Answered::Delegate(others) => {
            let status = hand_over(t, &others, verbosity, ctx, input.get_mut()).await?;
            Ok(Some(status))
        }
    }
}

/// The transport and health store from the environment and configuration.
pub(crate) fn prober(env: &Env, tuning: Tuning) -> Prober {
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

/// Hands the derivation to the stock hook (`delegate.rs`), which then is this hook process;
/// returns its exit status. If it cannot be started, the derivation is declined with the
/// reason ([`HookError::Delegate`]), and Ferry keeps answering.
async fn hand_over<R: AsyncRead + Unpin>(
    t: &TryRequest,
    others: &[&Machine],
    verbosity: &str,
    ctx: &Ctx<'_>,
    stdin: &mut R,
) -> Result<i32, HookError> {
    let names: Vec<&str> = others.iter().map(|m| m.store_uri.as_str()).collect();
    let failed = |source| HookError::Delegate {
        drv: t.drv_path.clone(),
        machines: names.join(", "),
        source,
    };
    let command = delegate::stock_hook_command(
        ctx.stock_hook.as_deref(),
        |p| p.exists(),
        delegate::find_nix_on_path,
    )
    .map_err(failed)?;
    ctx.logger.log(
        Verbosity::TALKATIVE,
        format!(
            "ferry-build-hook: '{}' can only go to {}, which Ferry does not speak to (only ssh://); handing it to the stock hook {}",
            t.drv_path,
            names.join(", "),
            command.join(" ")
        ),
    );
    let prefix = delegate::replay(ctx.daemon_settings, others, t);
    delegate::hand_over(&command, verbosity, prefix, stdin)
        .await
        .map_err(failed)
}
