//! One hook process, from the settings stream to the exit status (hook-protocol.md §1):
//! answer `try` requests until one is accepted, then do that build and exit.
//!
//! Logging: stderr is the reply channel, and after `# accept` the daemon drops every line
//! that is not `@nix` JSON, so everything the hook says goes through [`Logger`] as `@nix`
//! messages (shown to the client at their level), and the remote build log goes raw to fd 4.

use crate::local::{HeldLocksImporter, LocalStore};
use crate::protocol::{self, NixLog, Reply, Request, TryRequest, Verbosity};
use crate::remote::{self, BuildOptions, Job, Progress};
use crate::select::{Decision, DeclineReason, LocalCaps, Need, Policy, StockPolicy, eligible};
use crate::slots::{HeldLock, LoadDir};
use crate::ssh::{OpenSsh, Transport};
use ferry_nix::machines::{Machine, parse_builders_setting};
use ferry_nix::nixconf::{NixConf, RealFs};
use ferry_nix::wire::AsyncWireReader;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
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
}

impl Env {
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let nix_state_dir = var("NIX_STATE_DIR").unwrap_or_else(|| "/nix/var/nix".into());
        Env {
            conf_dir: var("NIX_CONF_DIR").unwrap_or_else(|| "/etc/nix".into()),
            ferry_state_dir: var("FERRY_STATE_DIR").unwrap_or_else(|| nix_state_dir.join("ferry")),
            nix_state_dir,
            nix_sshopts: std::env::var("NIX_SSHOPTS").ok(),
            build_log: "/dev/fd/4".into(),
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
        self.raw(&NixLog::Msg {
            level,
            msg: msg.into(),
        }
        .render());
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
struct Settings {
    conf: NixConf,
}

impl Settings {
    fn this_system(&self) -> String {
        self.conf
            .get("system")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS))
    }

    fn local_caps(&self) -> LocalCaps {
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

/// Runs the hook; returns the exit status.
pub async fn run<R: AsyncRead + Unpin>(
    argv: &[String],
    env: &Env,
    stdin: R,
    logger: &Logger,
) -> i32 {
    let verbosity = match protocol::parse_args(argv) {
        Ok(v) => v,
        Err(e) => {
            logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
            return 1;
        }
    };
    let _ = verbosity;
    let mut input = AsyncWireReader::new(stdin);
    let stream = match protocol::read_settings(&mut input).await {
        Ok(s) => s,
        Err(e) => {
            logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
            return 1;
        }
    };
    // Nix's own configuration first, then the daemon's effective values (Lix 2.92–2.93 send
    // only overridden settings, hook-protocol.md §1.3).
    let mut conf = match NixConf::load_system(&env.conf_dir, &RealFs) {
        Ok(c) => c,
        Err(e) => {
            logger.log(Verbosity::WARN, format!("ferry-build-hook: ignoring nix.conf: {e}"));
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
    let ssh = OpenSsh::new(env.ferry_state_dir.join("ssh"), env.nix_sshopts.as_deref());

    loop {
        let t = match protocol::read_request(&mut input).await {
            Ok(Request::Try(t)) => t,
            Ok(Request::Done) => return 0,
            Err(e) => {
                logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
                return 1;
            }
        };
        match answer(&t, &settings, env, &ssh, logger).await {
            Answered::Replied => continue,
            Answered::Stop(code) => return code,
            Answered::Accepted(conn, machine) => {
                return build(*conn, &machine, &t, &mut input, &settings, env, logger).await;
            }
        }
    }
}

enum Answered {
    Replied,
    Stop(i32),
    Accepted(Box<remote::Connection>, Machine),
}

/// Selects a machine for one `try`, connects, and replies.
async fn answer(
    t: &TryRequest,
    settings: &Settings,
    env: &Env,
    ssh: &OpenSsh,
    logger: &Logger,
) -> Answered {
    let this_system = settings.this_system();
    let builders = settings.conf.get("builders").unwrap_or("");
    let machines = match parse_builders_setting(builders, &this_system) {
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
    // of the selection, so the daemon builds locally or another hook takes them.
    let mut excluded: BTreeSet<usize> = BTreeSet::new();
    for (i, m) in machines.iter().enumerate() {
        if m.scheme() != Some("ssh") {
            logger.log(
                Verbosity::CHATTY,
                format!("ferry-build-hook: skipping '{}': only ssh:// builders are supported", m.store_uri),
            );
            excluded.insert(i);
        }
    }
    let need = Need {
        system: t.needed_system.clone(),
        required_features: t.required_features.clone(),
        am_willing: t.am_willing,
    };
    let local = settings.local_caps();
    let load_dir = match LoadDir::open(&env.nix_state_dir) {
        Ok(d) => d,
        Err(e) => {
            logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
            logger.reply(&Reply::Decline);
            return Answered::Replied;
        }
    };
    loop {
        let picked = tokio::task::block_in_place(|| {
            pick(&load_dir, &machines, &need, &local, &excluded)
        });
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
                    excluded.insert(machine);
                    continue;
                };
                match connect(ssh, m).await {
                    Ok(conn) => {
                        logger.reply(&Reply::Accept(m.store_uri.clone()));
                        // The slot stays taken for the whole build: leak the lock into the
                        // process (the kernel drops it when we exit).
                        std::mem::forget(slot);
                        return Answered::Accepted(Box::new(conn), m.clone());
                    }
                    Err(e) => {
                        logger.log(
                            Verbosity::ERROR,
                            format!("cannot build on '{}': {e}", m.store_uri),
                        );
                        excluded.insert(machine);
                    }
                }
            }
            Decision::Postpone => {
                logger.reply(&Reply::Postpone);
                return Answered::Replied;
            }
            Decision::Decline(reason) => {
                let level = if reason == DeclineReason::BusyButLocalCan || local.can_build(&need)
                {
                    Verbosity::CHATTY
                } else {
                    Verbosity::WARN
                };
                logger.log(level, "Failed to find a machine for remote build!");
                logger.reply(&Reply::Decline);
                return Answered::Replied;
            }
        }
    }
}

/// Under `main-lock`: measures loads, decides, and keeps the chosen slot's lock.
fn pick(
    dir: &LoadDir,
    machines: &[Machine],
    need: &Need,
    local: &LocalCaps,
    excluded: &BTreeSet<usize>,
) -> Result<(Decision, Option<HeldLock>), crate::slots::SlotError> {
    let _main = dir.lock_main()?;
    let mut loads = Vec::new();
    let mut held = Vec::new();
    for i in eligible(machines, need, excluded) {
        if let Some(m) = machines.get(i) {
            let (load, lock) = dir.probe(i, m)?;
            loads.push(load);
            held.push((i, lock));
        }
    }
    let decision = StockPolicy.decide(machines, &loads, need, local);
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

/// Connect and handshake, so a dead or misconfigured builder costs a decline or another
/// machine instead of a failed build.
async fn connect(ssh: &OpenSsh, m: &Machine) -> Result<remote::Connection, String> {
    let session = ssh.connect(m).await.map_err(|e| e.to_string())?;
    remote::open(&m.store_uri, session)
        .await
        .map_err(|e| e.to_string())
}

/// After `# accept`: reads the inputs and outputs, builds, and maps the result to an exit
/// status.
async fn build<R: AsyncRead + Unpin>(
    mut conn: remote::Connection,
    machine: &Machine,
    t: &TryRequest,
    input: &mut AsyncWireReader<R>,
    settings: &Settings,
    env: &Env,
    logger: &Logger,
) -> i32 {
    let accepted = match protocol::read_accepted(input).await {
        Ok(a) => a,
        Err(e) => {
            logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
            return 1;
        }
    };
    // The remote log goes to fd 4 as it arrives.
    let mut tap = conn.take_log();
    let log_path = env.build_log.clone();
    let forwarder = tokio::spawn(async move {
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(&log_path) else {
            while tap.next().await.is_some() {}
            return;
        };
        let mut file = tokio::fs::File::from_std(file);
        while let Some(chunk) = tap.next().await {
            use tokio::io::AsyncWriteExt;
            if file.write_all(&chunk).await.is_err() {
                break;
            }
            let _ = file.flush().await;
        }
    });

    let local = settings.local_store();
    let job = Job {
        drv_path: t.drv_path.clone(),
        inputs: accepted.inputs,
        wanted_outputs: accepted.wanted_outputs,
        options: settings.build_options(),
        use_substitutes: settings.bool("builders-use-substitutes"),
    };
    let result = async {
        let outputs = local.derivation_outputs(&job.drv_path).await?;
        // Only one upload at a time per builder, shared with stock hooks; given up on after
        // 15 minutes like the stock hook's alarm.
        let upload = LoadDir::open(&env.nix_state_dir).ok().and_then(|d| {
            tokio::task::block_in_place(|| d.upload_lock(machine, Duration::from_secs(15 * 60)))
                .ok()
                .flatten()
        });
        let importer = HeldLocksImporter {
            local: local.clone(),
        };
        remote::build_on(&mut conn, &job, &outputs, &local, &importer, logger, upload).await
    }
    .await;
    conn.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), forwarder).await;
    match result {
        Ok(()) => 0,
        Err(e) => {
            // Shown to the client once; the remote log already went to fd 4.
            logger.log(Verbosity::ERROR, format!("ferry-build-hook: {e}"));
            e.exit_code()
        }
    }
}
