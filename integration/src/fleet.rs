//! A fleet: a client and N builders (and other LAN hosts), each in its own network and mount
//! namespaces, created on start and torn down on drop.

use crate::host::{BASE_CONF, Host};
use crate::net::{
    blackhole_port, drop_incoming, heal_host, listening, not_listening, throttle_host,
};
use crate::nix::{Nix, rootfs_holder_script};
use crate::process::{ip, run, wait_until};
use crate::{NS_PREFIX, SEQ, SYSTEM};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

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
        wait_until(&format!("sshd of b{i}"), Duration::from_secs(10), || {
            listening(b, 22)
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
        wait_until(
            &format!("sshd of b{i} to stop"),
            Duration::from_secs(10),
            || not_listening(b, 22),
        )
    }

    /// Fault: builder `i` drops every packet to its sshd (a machine that is off or
    /// unreachable behind a firewall: connections hang until a time-out).
    pub fn blackhole(&self, i: usize) -> Result<()> {
        blackhole_port(&self.builders[i], 22)
    }

    /// Fault: builder `i`'s outgoing traffic is shaped to `rate` (a `tc` rate such as
    /// `256kbit`, see [`throttle_host`]).
    pub fn throttle(&self, i: usize, rate: &str) -> Result<()> {
        throttle_host(&self.builders[i], rate, "4kb")
    }

    /// Fault: builder `i`'s sshd drops each incoming packet but SYNs with probability `p`
    /// (a lossy link, with iptables' `statistic` match since `netem` is not available).
    pub fn lossy(&self, i: usize, p: f64) -> Result<()> {
        let p = format!("{p}");
        // Never a SYN: a lost SYN is retransmitted after 1 s, so whether a connection opens
        // would depend on the client's connect time-out, not on the retransmission of a
        // running connection this fault is meant to show (a tuned 2 s time-out failed about
        // one run in a hundred).
        drop_incoming(
            &self.builders[i],
            Some(22),
            &[
                "!",
                "--syn",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
            ],
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
