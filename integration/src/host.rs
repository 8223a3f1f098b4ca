//! One host of a fleet: its namespaces, its `/nix` and `/etc/nix`, and the processes it runs.

use crate::nix::Nix;
use crate::process::wait_until;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub(crate) const BASE_CONF: &str = "\
# Written by Ferry's test fleet: this host's own /etc/nix/nix.conf.
# Hosts share the kernel and /etc/passwd: builds run as root so that hosts never kill each
# other's nixbld users' processes (docs/testing.md §2).
build-users-group =
sandbox = false
substituters =
experimental-features = nix-command
trusted-users = root
";

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
    pub(crate) holder: Child,
    pub(crate) daemons: Vec<Child>,
}

impl Host {
    /// The pid of this host's listening `nix-daemon`: the process of that name in the host's
    /// network namespace whose parent is not one (the others are its per-connection workers).
    pub fn nix_daemon_pid(&self) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
            .ok()?;
        let comm = |pid: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let parent = |pid: &str| {
            crate::proc_stat(pid)
                .and_then(|f| f.into_iter().nth(1))
                .unwrap_or_default()
        };
        let mut pids = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|p| comm(p) == "nix-daemon" && comm(&parent(p)) != "nix-daemon")
            .map(str::to_owned)
            .collect::<Vec<_>>();
        // Two would be a broken fixture: say nothing rather than pick one.
        (pids.len() == 1).then(|| pids.remove(0))
    }

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
