//! A real Nix fleet on one machine, for Ferry's end-to-end tests and demo.
//!
//! Each host (one client, N builders, later caches) gets its own network namespace and its
//! own mount namespace in which a host directory is bind-mounted over `/nix` and another over
//! `/etc/nix`: every host has its own store and its own `nix.conf`, and nothing is written to
//! the machine's global `/etc/nix`. Builders run their own `sshd`; the client runs a real
//! `nix-daemon`. See `docs/testing.md` for the recipe and the rules that keep it safe:
//! fleet addresses exist only inside the namespaces, and every command that may reach them
//! runs inside the client's namespace.
//!
//! A [`Fleet`] tears everything down on drop, also when a test panics: it kills every process
//! in its namespaces, which releases the private mounts, and deletes the namespaces.
//! Names embed the creating process id, so [`reap_stale`] can remove what a killed test run
//! left behind without touching fleets of live processes.

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Prefix of every namespace a fleet creates: `fy<pid>n<seq><host>`.
const NS_PREFIX: &str = "fy";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The system string of this machine, as Nix calls it.
pub const SYSTEM: &str = "x86_64-linux";

/// A Nix version a fleet host runs: this machine's own Debian `nix-bin`, or a Debian suite's
/// `nix-bin` in a root file system of its own (built and cached by `dev/rootfs`). The list
/// lives in `integration/nix-versions`, one line per version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nix {
    /// Short version label, `2.8`, `2.26`, ...: what `FERRY_NIX` names.
    pub label: String,
    /// Debian suite whose `nix-bin` the host runs; `None` for this machine's own.
    pub suite: Option<String>,
}

const NIX_VERSIONS: &str = include_str!("../nix-versions");

impl Nix {
    /// Every version of `integration/nix-versions`, in file order.
    pub fn all() -> Vec<Nix> {
        NIX_VERSIONS
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let label = f.next()?.to_owned();
                let suite = f.next().filter(|s| *s != "-").map(str::to_owned);
                Some(Nix { label, suite })
            })
            .collect()
    }

    /// The version labelled `label` (`2.26`), or an error listing the known ones.
    pub fn by_label(label: &str) -> Result<Nix> {
        let all = Nix::all();
        all.iter()
            .find(|n| n.label == label)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = all.iter().map(|n| n.label.as_str()).collect();
                anyhow!(
                    "unknown Nix version '{label}' (integration/nix-versions has {})",
                    known.join(", ")
                )
            })
    }

    /// This machine's own Nix (Debian bookworm's 2.8).
    pub fn native() -> Nix {
        Nix::all()
            .into_iter()
            .find(|n| n.suite.is_none())
            .unwrap_or(Nix {
                label: "native".into(),
                suite: None,
            })
    }

    /// The version under test: `FERRY_NIX` (a label), else this machine's own. Every host
    /// whose Nix the test does not choose runs this one, so the whole suite runs on a
    /// version by setting one variable (`dev/test` does it for each).
    pub fn under_test() -> Nix {
        match std::env::var("FERRY_NIX") {
            Ok(l) if !l.is_empty() => {
                Nix::by_label(&l).unwrap_or_else(|e| panic!("FERRY_NIX: {e}"))
            }
            _ => Nix::native(),
        }
    }

    /// (major, minor) from the label, for behaviour that differs by version.
    pub fn minor(&self) -> (u32, u32) {
        let mut it = self.label.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    }

    /// Nix 2.25 to 2.33 ignore `build-hook` in `nix.conf` (it became an internal setting);
    /// only the daemon's environment (`NIX_CONFIG`) sets it there.
    pub fn ignores_build_hook_in_conf(&self) -> bool {
        let v = self.minor();
        ((2, 25)..(2, 34)).contains(&v)
    }

    /// The root file system of this version, built on first use (`dev/rootfs`).
    fn rootfs(&self) -> Result<Option<PathBuf>> {
        let Some(suite) = &self.suite else {
            return Ok(None);
        };
        static CACHE: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = cache.iter().find(|(s, _)| s == suite) {
            return Ok(Some(p.clone()));
        }
        let script = workspace_root().join("dev/rootfs");
        let out = run(Command::new(&script).arg(suite).stderr(Stdio::inherit()))
            .with_context(|| format!("preparing the {suite} root file system"))?;
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        cache.push((suite.clone(), dir.clone()));
        Ok(Some(dir))
    }
}

impl std::fmt::Display for Nix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.suite {
            Some(s) => write!(f, "Nix {} ({s})", self.label),
            None => write!(f, "Nix {} (this machine)", self.label),
        }
    }
}

/// The workspace's root directory (the parent of `integration/`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.to_path_buf())
}

/// What to start.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Number of builders (each with its own sshd and store).
    pub builders: usize,
    /// Slots per builder in the machines file.
    pub max_jobs_per_builder: u32,
    /// Extra lines for the client's `nix.conf` (for example `build-hook = ...`).
    pub client_conf: String,
    /// Environment for the client's nix-daemon (for example `NIX_SSHOPTS`).
    pub daemon_env: Vec<(String, String)>,
    /// The client's Nix (and that of hosts added with [`Fleet::add_client`]); `None`: the
    /// version under test ([`Nix::under_test`]).
    pub client_nix: Option<Nix>,
    /// The builders' Nix; `None`: the version under test.
    pub builder_nix: Option<Nix>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            builders: 1,
            max_jobs_per_builder: 2,
            client_conf: String::new(),
            daemon_env: Vec::new(),
            client_nix: None,
            builder_nix: None,
        }
    }
}

/// One host of the fleet.
pub struct Host {
    /// Short role name: `client`, `b0`, `b1`, ...
    pub role: String,
    /// The network namespace.
    pub netns: String,
    /// The host's directory: `nix/` (its `/nix`), `etc-nix/` (its `/etc/nix`), logs.
    pub dir: PathBuf,
    /// The host's address on its link to the client (for the client: unused).
    pub addr: String,
    /// The Nix this host runs.
    pub nix: Nix,
    holder: Child,
    daemons: Vec<Child>,
}

impl Host {
    /// This host's view of a path under `/nix` (its store lives at `dir/nix/store`).
    pub fn nix_path(&self, p: &str) -> PathBuf {
        self.dir.join(p.trim_start_matches('/'))
    }

    /// Does this host's store hold `store_path` (an absolute `/nix/store/...` path)?
    pub fn has_store_path(&self, store_path: &str) -> bool {
        self.nix_path(store_path).symlink_metadata().is_ok()
    }

    /// Starts a `nix-daemon` on this host (its own store and `/etc/nix/nix.conf`) and waits
    /// for its socket.
    pub fn start_nix_daemon(&mut self, env: &[(String, String)]) -> Result<()> {
        let log = std::fs::File::create(self.dir.join("log/nix-daemon.log"))?;
        let mut cmd = self.command("nix-daemon");
        cmd.env("XDG_CACHE_HOME", self.dir.join("cache"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting nix-daemon")?;
        self.daemons.push(child);
        let sock = self.nix_path("/nix/var/nix/daemon-socket/socket");
        wait_until(
            &format!("the nix-daemon socket of {}", self.role),
            Duration::from_secs(10),
            || sock.exists(),
        )
    }

    /// A command run on this host that talks to its nix-daemon, with a private narinfo
    /// cache (`XDG_CACHE_HOME`) so nothing leaks between tests.
    pub fn nix_command(&self, program: &str) -> Command {
        let mut c = self.command(program);
        c.env("NIX_REMOTE", "daemon")
            .env("XDG_CACHE_HOME", self.dir.join("cache-cli"))
            .env_remove("NIX_CONF_DIR")
            .env_remove("NIX_USER_CONF_FILES");
        c
    }

    /// Writes this host's `/etc/nix/nix.conf`: the fleet's base settings plus `extra`.
    pub fn write_nix_conf(&self, extra: &str) -> Result<()> {
        std::fs::write(
            self.dir.join("etc-nix/nix.conf"),
            format!("{BASE_CONF}{extra}\n"),
        )?;
        Ok(())
    }

    /// Keeps `child` to be killed at teardown (everything in the namespace is killed anyway;
    /// this also reaps it).
    pub fn adopt(&mut self, child: Child) {
        self.daemons.push(child);
    }

    /// A command that runs inside this host's network and mount namespaces (and its own
    /// root file system, for a host with a Debian suite's Nix).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", "-n", "-r", "--"])
            .arg(program);
        if self.nix.suite.is_some() {
            // Inside another Debian: this machine's search paths and library paths (cargo
            // sets some for tests) mean nothing there.
            c.env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env_remove("LD_LIBRARY_PATH");
        }
        c
    }
}

/// A client with N builders, each in its own namespaces.
pub struct Fleet {
    pub id: String,
    pub root: tempfile::TempDir,
    pub client: Host,
    pub builders: Vec<Host>,
    /// Other hosts on the fleet's LAN (caches, a second client), see [`Fleet::add_host`].
    pub others: Vec<Host>,
    /// Hosts created so far, for addresses: host k gets `.(10 + k)`.
    next_host: u8,
    /// The client's private key, accepted by every builder's sshd.
    pub client_key: PathBuf,
    subnet: (u8, u8),
    config: FleetConfig,
}

/// Runs a command and fails with its stderr when it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Polls `ok` every 20 ms until it holds, or fails after `timeout` naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Removes namespaces left behind by fleets whose process is gone (a test run killed with
/// SIGKILL cannot run its destructors).
pub fn reap_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('n').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_netns_processes(name);
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
}

fn kill_netns_processes(netns: &str) {
    // Every process of a host runs in its network namespace: killing them all releases the
    // private mount namespace too (it dies with its last process).
    for _ in 0..50 {
        let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() else {
            return;
        };
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for p in pids {
            let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const BASE_CONF: &str = "\
# Written by Ferry's test fleet: this host's own /etc/nix/nix.conf.
# Hosts share the kernel and /etc/passwd: builds run as root so that hosts never kill each
# other's nixbld users' processes (docs/testing.md §2).
build-users-group =
sandbox = false
substituters =
experimental-features = nix-command
trusted-users = root
";

impl Fleet {
    /// Starts a fleet; on any error, what was started so far is torn down.
    pub fn start(config: FleetConfig) -> Result<Fleet> {
        reap_stale();
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let id = format!("{NS_PREFIX}{pid}n{seq}");
        // A /24 per fleet, unique among this process's fleets and spread across processes.
        let mix = pid
            .wrapping_mul(2_654_435_761)
            .wrapping_add(seq.wrapping_mul(97));
        let subnet = (64 + (mix % 128) as u8, ((mix >> 8) % 256) as u8);
        let root = tempfile::Builder::new()
            .prefix(&format!("ferry-fleet-{id}-"))
            .tempdir()
            .context("creating the fleet directory")?;
        let client_key = root.path().join("client_key");
        run(Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "ferry-fleet-client",
                "-f",
            ])
            .arg(&client_key))?;

        let client_addr = format!("10.{}.{}.1", subnet.0, subnet.1);
        let client_nix = config.client_nix.clone().unwrap_or_else(Nix::under_test);
        let client =
            Self::start_host(&id, root.path(), "client", client_addr.clone(), &client_nix)?;
        // The fleet's LAN: a bridge in the client's namespace; every other host hangs off it
        // by a veth pair, so hosts reach each other (a second client reaches a cache) and the
        // client is one of them.
        ip(&["-n", &client.netns, "link", "add", "lan", "type", "bridge"])?;
        ip(&[
            "-n",
            &client.netns,
            "addr",
            "add",
            &format!("{client_addr}/24"),
            "dev",
            "lan",
        ])?;
        ip(&["-n", &client.netns, "link", "set", "lan", "up"])?;
        let mut fleet = Fleet {
            id,
            root,
            client,
            builders: Vec::new(),
            others: Vec::new(),
            next_host: 0,
            client_key,
            subnet,
            config,
        };
        for i in 0..fleet.config.builders {
            fleet.add_builder(i)?;
        }
        fleet.write_machines()?;
        fleet.start_client_daemon()?;
        Ok(fleet)
    }

    fn start_host(id: &str, root: &Path, role: &str, addr: String, nix: &Nix) -> Result<Host> {
        let netns = format!("{id}{role}");
        let dir = root.join(role);
        for d in ["nix/store", "nix/var/nix", "etc-nix", "log"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::fs::write(dir.join("etc-nix/nix.conf"), BASE_CONF)?;
        let rootfs = nix.rootfs()?;
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        // The holder keeps the host's mount namespace alive; everything else enters it.
        let script = match &rootfs {
            None => {
                // This machine's own Nix: the host's /nix and /etc/nix over the machine's.
                // Debian's nix-bin creates neither, so the mount points are made first (empty
                // directories, in the machine's own root).
                // Root's shell start-up files are hidden behind an empty file: Debian's bash
                // runs ~/.bashrc for every SSH command, and a developer machine's (pyenv init,
                // say) can make each login slow, or wait a minute on a lock a killed login
                // left behind. The fleet's hosts are clean machines whose logins cost what
                // sshd and Nix cost.
                std::fs::create_dir_all("/nix")?;
                std::fs::create_dir_all("/etc/nix")?;
                std::fs::write(dir.join("empty-rc"), "")?;
                format!(
                    "mount --bind {nix} /nix && mount --bind {etc} /etc/nix && \
                     for f in /root/.bashrc /root/.profile /root/.bash_profile /root/.bash_login; do \
                     if [ -f \"$f\" ]; then mount --bind {empty} \"$f\" || exit 1; fi; done && \
                     exec sleep 100000000",
                    nix = dir.join("nix").display(),
                    etc = dir.join("etc-nix").display(),
                    empty = dir.join("empty-rc").display()
                )
            }
            Some(lower) => rootfs_holder_script(&dir, lower)?,
        };
        let holder = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "unshare",
                "-m",
                "--propagation",
                "private",
            ])
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the namespace holder")?;
        let mut host = Host {
            role: role.to_owned(),
            netns,
            dir,
            addr,
            nix: nix.clone(),
            holder,
            daemons: Vec::new(),
        };
        // The holder is ready once its mount namespace shows the bind mount.
        let conf = host.dir.join("etc-nix/nix.conf");
        let pid = host.holder.id();
        let ready = wait_until("the host's mounts", Duration::from_secs(10), || {
            std::fs::read_to_string(format!("/proc/{pid}/root/etc/nix/nix.conf")).ok()
                == std::fs::read_to_string(&conf).ok()
        });
        if let Err(e) = ready {
            let status = host.holder.try_wait().ok().flatten();
            let _ = host.holder.kill();
            let _ = host.holder.wait();
            let _ = Command::new("ip")
                .args(["netns", "del", &host.netns])
                .status();
            return Err(e.context(format!(
                "setting up host {role} ({nix}); holder exited: {status:?}"
            )));
        }
        Ok(host)
    }

    /// Adds a host on the fleet's LAN, in its own namespaces with its own `/nix` and
    /// `/etc/nix`, and returns it. The caller starts what it should run with
    /// [`Host::command`]; teardown kills every process in the host's namespace.
    ///
    /// The host runs this machine's own system (nginx, Python and the other test servers
    /// live there); for a host that runs Nix as a client, use [`Fleet::add_client`].
    pub fn add_host(&mut self, role: &str) -> Result<&mut Host> {
        self.add_host_with(role, &Nix::native())
    }

    /// Adds a host that runs the client's Nix (a second client, a producer of a cache).
    pub fn add_client(&mut self, role: &str) -> Result<&mut Host> {
        let nix = self.client.nix.clone();
        self.add_host_with(role, &nix)
    }

    /// Adds a host running `nix`.
    pub fn add_host_with(&mut self, role: &str, nix: &Nix) -> Result<&mut Host> {
        let host = self.link_host(role, nix)?;
        self.others.push(host);
        let i = self.others.len() - 1;
        Ok(&mut self.others[i])
    }

    /// A host added with [`Fleet::add_host`], by role.
    pub fn host(&self, role: &str) -> &Host {
        self.others
            .iter()
            .find(|h| h.role == role)
            .unwrap_or_else(|| panic!("no host '{role}' in the fleet"))
    }

    fn link_host(&mut self, role: &str, nix: &Nix) -> Result<Host> {
        let k = self.next_host;
        if k >= 200 {
            bail!("a fleet holds at most 200 hosts");
        }
        self.next_host += 1;
        let addr = format!("10.{}.{}.{}", self.subnet.0, self.subnet.1, 10 + k);
        let host = Self::start_host(&self.id, self.root.path(), role, addr.clone(), nix)?;
        let c_if = format!("to-{role}");
        // The veth pair is created directly inside the two namespaces: no interface and no
        // fleet address ever exists in the root namespace.
        ip(&[
            "link",
            "add",
            &c_if,
            "netns",
            &self.client.netns,
            "type",
            "veth",
            "peer",
            "name",
            "to-client",
            "netns",
            &host.netns,
        ])?;
        ip(&[
            "-n",
            &self.client.netns,
            "link",
            "set",
            &c_if,
            "master",
            "lan",
        ])?;
        ip(&[
            "-n",
            &host.netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "to-client",
        ])?;
        ip(&["-n", &self.client.netns, "link", "set", &c_if, "up"])?;
        ip(&["-n", &host.netns, "link", "set", "to-client", "up"])?;
        Ok(host)
    }

    fn add_builder(&mut self, i: usize) -> Result<()> {
        let nix = self
            .config
            .builder_nix
            .clone()
            .unwrap_or_else(Nix::under_test);
        let host = self.link_host(&format!("b{i}"), &nix)?;
        let addr = host.addr.clone();
        let host_key = host.dir.join("ssh_host_ed25519_key");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
            .arg(&host_key))?;
        let sshd_config = format!(
            "ListenAddress {addr}\nHostKey {hk}\nPidFile {dir}/sshd.pid\nAuthorizedKeysFile {ck}.pub\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\nMaxStartups 100\nMaxSessions 100\nLogLevel ERROR\n",
            hk = host_key.display(),
            dir = host.dir.display(),
            ck = self.client_key.display(),
        );
        std::fs::write(host.dir.join("sshd_config"), sshd_config)?;
        std::fs::create_dir_all("/run/sshd")?;
        self.builders.push(host);
        self.start_sshd(i)
    }

    /// The machines-file line for builder `i` (all 8 fields, host key pinned).
    pub fn machine_line(&self, i: usize) -> Result<String> {
        let b = &self.builders[i];
        let pubkey = std::fs::read(b.dir.join("ssh_host_ed25519_key.pub"))?;
        use base64::Engine as _;
        let pk = base64::engine::general_purpose::STANDARD.encode(pubkey.trim_ascii_end());
        Ok(format!(
            "ssh://root@{} {SYSTEM} {} {} 1 - - {pk}",
            b.addr,
            self.client_key.display(),
            self.config.max_jobs_per_builder
        ))
    }

    /// Writes the client's `/etc/nix/machines` with every builder, and its nix.conf.
    pub fn write_machines(&self) -> Result<()> {
        let mut lines = String::new();
        for i in 0..self.builders.len() {
            lines.push_str(&self.machine_line(i)?);
            lines.push('\n');
        }
        std::fs::write(self.client.dir.join("etc-nix/machines"), lines)?;
        let conf = format!(
            "{BASE_CONF}builders = @/etc/nix/machines\nmax-jobs = 1\n{}\n",
            self.config.client_conf
        );
        std::fs::write(self.client.dir.join("etc-nix/nix.conf"), conf)?;
        Ok(())
    }

    fn start_client_daemon(&mut self) -> Result<()> {
        let mut env = self.config.daemon_env.clone();
        if self.client.nix.ignores_build_hook_in_conf() {
            // Nix 2.25-2.33 read `build-hook` only from the daemon's environment: set it there,
            // as the README tells users to, when the test chose a hook.
            if let Some(line) = self
                .config
                .client_conf
                .lines()
                .find(|l| l.trim_start().starts_with("build-hook"))
            {
                let mut conf = env
                    .iter()
                    .find(|(k, _)| k == "NIX_CONFIG")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                env.retain(|(k, _)| k != "NIX_CONFIG");
                if !conf.is_empty() && !conf.ends_with('\n') {
                    conf.push('\n');
                }
                conf.push_str(line.trim());
                conf.push('\n');
                env.push(("NIX_CONFIG".to_owned(), conf));
            }
        }
        self.client.start_nix_daemon(&env)
    }

    /// Starts (or restarts) builder `i`'s sshd and waits until it listens.
    pub fn start_sshd(&mut self, i: usize) -> Result<()> {
        let b = &mut self.builders[i];
        let log = std::fs::File::create(b.dir.join("log/sshd.log"))?;
        let conf = b.dir.join("sshd_config");
        let child = b
            .command("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting sshd")?;
        b.daemons.push(child);
        let netns = b.netns.clone();
        wait_until(&format!("sshd of b{i}"), Duration::from_secs(10), || {
            Command::new("ip")
                .args(["netns", "exec", &netns, "ss", "-Hltn", "sport", "=", ":22"])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false)
        })
    }

    /// Fault: builder `i` refuses connections (its sshd is stopped).
    pub fn stop_sshd(&mut self, i: usize) -> Result<()> {
        let b = &mut self.builders[i];
        let pidfile = b.dir.join("sshd.pid");
        for mut c in b.daemons.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(pidfile);
        let netns = b.netns.clone();
        wait_until(
            &format!("sshd of b{i} to stop"),
            Duration::from_secs(10),
            || {
                Command::new("ip")
                    .args(["netns", "exec", &netns, "ss", "-Hltn", "sport", "=", ":22"])
                    .output()
                    .map(|o| o.stdout.is_empty())
                    .unwrap_or(false)
            },
        )
    }

    /// Fault: builder `i` drops every packet to its sshd (a machine that is off or
    /// unreachable behind a firewall: connections hang until a time-out).
    pub fn blackhole(&self, i: usize) -> Result<()> {
        blackhole_port(&self.builders[i], 22)
    }

    /// Fault: builder `i`'s link is slow: its outgoing traffic is shaped to `rate` (a `tc`
    /// rate such as `256kbit`) with a token bucket. `tc netem` would also give delay, but the
    /// kernels of this machine kind ship without `sch_netem`, so the fixture uses `tbf`.
    pub fn throttle(&self, i: usize, rate: &str) -> Result<()> {
        let ns = &self.builders[i].netns;
        run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "tc",
            "qdisc",
            "replace",
            "dev",
            "to-client",
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "4kb",
            "latency",
            "2s",
        ]))
        .map(|_| ())
    }

    /// Fault: builder `i`'s sshd drops each incoming packet with probability `p`
    /// (a lossy link, with iptables' `statistic` match since `netem` is not available).
    pub fn lossy(&self, i: usize, p: f64) -> Result<()> {
        let p = format!("{p}");
        drop_incoming(
            &self.builders[i],
            22,
            &["-m", "statistic", "--mode", "random", "--probability", &p],
        )
    }

    /// Heals builder `i`: no packet filter, no shaping (sshd is restarted separately).
    pub fn heal(&self, i: usize) -> Result<()> {
        heal_host(&self.builders[i])
    }

    /// A command run on the client, talking to the client's nix-daemon.
    pub fn client_command(&self, program: &str) -> Command {
        self.client.nix_command(program)
    }

    /// `nix-build` of a Nix expression on the client. Returns the output (stdout: out paths).
    pub fn nix_build(&self, expr: &str, extra_args: &[&str]) -> Output {
        let mut c = self.client_command("nix-build");
        c.args(["--no-out-link", "-E", expr]).args(extra_args);
        c.stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawning nix-build: {e}"))
    }

    /// The client daemon's log so far (for failure messages).
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.client.dir.join("log/nix-daemon.log")).unwrap_or_default()
    }

    /// Tears the fleet down; also done on drop.
    fn teardown(&mut self) {
        let hosts = self.builders.iter_mut().chain(self.others.iter_mut());
        for h in hosts.chain(std::iter::once(&mut self.client)) {
            for mut c in h.daemons.drain(..) {
                let _ = c.kill();
                let _ = c.wait();
            }
            kill_netns_processes(&h.netns);
            let _ = h.holder.kill();
            let _ = h.holder.wait();
            let _ = Command::new("ip").args(["netns", "del", &h.netns]).status();
        }
    }

    /// Namespaces of this fleet (for tests of the fixture itself).
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(&self.client)
            .chain(self.builders.iter())
            .chain(self.others.iter())
            .map(|h| h.netns.clone())
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Fault: `host` drops every incoming TCP packet to `port` (connections hang).
/// [`heal_host`] undoes it.
pub fn blackhole_port(host: &Host, port: u16) -> Result<()> {
    drop_incoming(host, port, &[])
}

/// Adds an iptables rule on `host` that drops incoming TCP packets to `port` which also
/// satisfy `matches` (none: every packet).
fn drop_incoming(host: &Host, port: u16, matches: &[&str]) -> Result<()> {
    let port = port.to_string();
    let mut args = vec![
        "netns",
        "exec",
        &host.netns,
        "iptables",
        "-w",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &port,
    ];
    args.extend_from_slice(matches);
    args.extend(["-j", "DROP"]);
    run(Command::new("ip").args(&args)).map(|_| ())
}

/// Removes every packet filter and traffic shaper from `host`.
pub fn heal_host(host: &Host) -> Result<()> {
    let ns = &host.netns;
    run(Command::new("ip").args(["netns", "exec", ns, "iptables", "-w", "-F", "INPUT"]))?;
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "tc",
            "qdisc",
            "del",
            "dev",
            "to-client",
            "root",
        ])
        .output();
    Ok(())
}

/// A derivation expression that builds `echo <text> > $out` with `/bin/sh` (no nixpkgs).
/// `nonce` makes the name unique so nothing is cached between runs.
pub fn trivial_drv(nonce: &str, text: &str) -> String {
    format!(
        r#"builtins.derivation {{ name = "ferry-test-{nonce}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "echo {text} > $out" ]; PATH = "/usr/bin:/bin"; }}"#
    )
}

/// A derivation with a two-level input closure: `top` depends on `mid`, which depends on `leaf`.
pub fn chain_drv(nonce: &str) -> String {
    format!(
        r#"let
  mk = name: script: builtins.derivation {{ name = "ferry-${{name}}-{nonce}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" script ]; PATH = "/usr/bin:/bin"; }};
  leaf = mk "leaf" "echo leaf > $out";
  mid = mk "mid" "mkdir $out; echo ${{leaf}} > $out/leaf; cat ${{leaf}} > $out/copy";
in mk "top" "mkdir $out; echo ${{mid}} > $out/mid; cat ${{mid}}/copy > $out/copy""#
    )
}

/// A unique nonce for test derivations.
pub fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst),
        t % 1_000_000_007
    )
}

/// Output paths printed by `nix-build`.
pub fn out_paths(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The holder script of a host that runs a Debian suite's Nix: the cached root file system
/// as the read-only layer of an overlay (the host's changes go to its own directory), the
/// host's `/nix` and `/etc/nix` bound over it, the kernel file systems, a private `/run`, and
/// the directories tests share with hosts (`/tmp`, where fleets and their files live, and the
/// workspace, where Ferry's binaries are). Then the root is switched with `pivot_root`, not
/// `chroot`: Nix 2.8 `setns()`es its ssh child back into its mount namespace, which resets a
/// chroot's root but keeps a pivoted one. Root's shell start-up files are removed in the
/// host's layer, as they are hidden on hosts of this machine's Nix: logins cost what sshd and
/// Nix cost.
fn rootfs_holder_script(dir: &Path, lower: &Path) -> Result<String> {
    for d in ["root", "upper", "overlay-work"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let mut shared = vec![std::env::temp_dir(), workspace_root()];
    // The target directory may live outside the workspace (CARGO_TARGET_DIR).
    if let Some(t) = std::env::current_exe().ok().and_then(|e| {
        e.ancestors()
            .find(|a| a.ends_with("target"))
            .map(Path::to_path_buf)
    }) {
        shared.push(t);
    }
    let mut binds = String::new();
    for d in &shared {
        let d = d.display();
        binds.push_str(&format!(
            "mkdir -p \"$R{d}\" && mount --bind \"{d}\" \"$R{d}\" && "
        ));
    }
    Ok(format!(
        "set -e; R={root}; \
         mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} \"$R\" && \
         mkdir -p \"$R/nix\" \"$R/etc/nix\" \"$R/.oldroot\" \"$R/proc\" \"$R/sys\" \"$R/dev\" \"$R/run\" && \
         mount --bind {nix} \"$R/nix\" && mount --bind {etc} \"$R/etc/nix\" && \
         mount -t proc proc \"$R/proc\" && mount --rbind /sys \"$R/sys\" && mount --rbind /dev \"$R/dev\" && \
         mount -t tmpfs -o mode=755 tmpfs \"$R/run\" && mkdir -p \"$R/run/sshd\" && \
         rm -f \"$R/root/.bashrc\" \"$R/root/.profile\" && \
         {binds}cd \"$R\" && pivot_root . .oldroot && umount -l /.oldroot && cd / && \
         exec sleep 100000000",
        root = dir.join("root").display(),
        lower = lower.display(),
        upper = dir.join("upper").display(),
        work = dir.join("overlay-work").display(),
        nix = dir.join("nix").display(),
        etc = dir.join("etc-nix").display(),
    ))
}

/// Fails unless `out` succeeded, with stdout and stderr in the message.
pub fn check(out: &Output, what: &str) -> Result<()> {
    if !out.status.success() {
        return Err(anyhow!(
            "{what} failed with {}:\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Path of one of Ferry's binaries in this build's target directory (`dev/test` builds them
/// before the tests run). Panics with a clear message when it is missing.
pub fn ferry_bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps/; binaries in target/<profile>/.
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first (dev/test does)",
        p.display()
    );
    p
}

/// Waits until `host` listens on TCP `port`.
pub fn wait_listening(host: &Host, port: u16) -> Result<()> {
    let netns = host.netns.clone();
    let sport = format!(":{port}");
    wait_until(
        &format!("{} to listen on {port}", host.role),
        Duration::from_secs(10),
        || {
            Command::new("ip")
                .args(["netns", "exec", &netns, "ss", "-Hltn", "sport", "=", &sport])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false)
        },
    )
}

/// Starts a real nginx on `host` serving `www` on `host.addr:port` (a binary cache as users
/// run it), accepting WebDAV `PUT` when `allow_put` (an upload target). Waits until it listens.
pub fn start_nginx(host: &mut Host, port: u16, www: &Path, allow_put: bool) -> Result<()> {
    let dir = host.dir.join(format!("nginx-{port}"));
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::create_dir_all(www)?;
    let put = if allow_put {
        "dav_methods PUT;\n      create_full_put_path on;\n      dav_access user:rw group:r all:r;\n"
    } else {
        ""
    };
    let conf = format!(
        "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
         \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
         \x20 server {{\n    listen {addr}:{port};\n    root {www};\n    client_max_body_size 0;\n\
         \x20   location / {{\n      {put}    }}\n  }}\n}}\n",
        d = dir.display(),
        www = www.display(),
        addr = host.addr,
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = host
        .command("nginx")
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    host.adopt(child);
    wait_listening(host, port)
}
