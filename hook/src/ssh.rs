//! Transports to a builder's `nix-store --serve --write`.
//!
//! [`Transport`] is what the rest of the hook needs: a byte stream to the remote serve
//! process plus its stderr (the remote build log). [`OpenSsh`] implements it with the OpenSSH
//! client, like the stock hook (Nix 2.8 `src/libstore/ssh.cc` `SSHMaster::startCommand`:
//! `ssh host -x -a [NIX_SSHOPTS] [-i key] [-oUserKnownHostsFile=…] cmd`), and adds one
//! multiplexed ControlMaster per builder kept alive for a few minutes, so later builds (each
//! in a new hook process) skip the TCP and SSH handshakes (NixOS/nix#8499). The in-process
//! client in [`crate::russh`] implements the same trait.

use ferry_nix::machines::Machine;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

#[derive(Debug, Error)]
#[non_exhaustive]
pub(crate) enum SshError {
    #[error("'{uri}' is not an ssh:// store URI with a host")]
    NoHost { uri: String },
    #[error("preparing {path}: {source}")]
    Setup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to '{host}': {reason}")]
    Connect { host: String, reason: String },
}

/// A running remote command: its stdin and stdout carry the serve protocol, its stderr is
/// the remote log.
pub(crate) struct Session {
    pub(crate) writer: Box<dyn AsyncWrite + Send + Unpin>,
    pub(crate) reader: Box<dyn AsyncRead + Send + Unpin>,
    pub(crate) log: LogTap,
    child: Option<Child>,
    finisher: Option<Finisher>,
}

/// How an in-process transport ends its session (see [`ProcessGuard::finish`]); dropping it
/// instead tears the session down at once.
pub(crate) type Finisher = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Session {
    /// Builds a session from raw parts (tests, other transports).
    pub(crate) fn from_parts(
        writer: Box<dyn AsyncWrite + Send + Unpin>,
        reader: Box<dyn AsyncRead + Send + Unpin>,
        log: LogTap,
    ) -> Self {
        Session {
            writer,
            reader,
            log,
            child: None,
            finisher: None,
        }
    }

    /// A session of an in-process transport: `finish` is awaited when the serve client is
    /// done (after its writer was dropped).
    pub(crate) fn with_finisher(
        writer: Box<dyn AsyncWrite + Send + Unpin>,
        reader: Box<dyn AsyncRead + Send + Unpin>,
        log: LogTap,
        finish: Finisher,
    ) -> Self {
        Session {
            finisher: Some(finish),
            ..Session::from_parts(writer, reader, log)
        }
    }

    /// Splits the session; the guard owns the transport process.
    pub(crate) fn into_parts(
        self,
    ) -> (
        Box<dyn AsyncWrite + Send + Unpin>,
        Box<dyn AsyncRead + Send + Unpin>,
        LogTap,
        ProcessGuard,
    ) {
        (
            self.writer,
            self.reader,
            self.log,
            ProcessGuard(self.child, self.finisher),
        )
    }
}

/// The transport process of a session (killed if dropped while running), or the end of an
/// in-process session.
pub(crate) struct ProcessGuard(Option<Child>, Option<Finisher>);

impl ProcessGuard {
    /// Waits briefly for the transport process to exit after its stdin was closed (the
    /// serve loop ends on EOF); kills it if it lingers.
    pub(crate) async fn finish(mut self) {
        if let Some(f) = self.1.take() {
            f.await;
        }
        if let Some(mut child) = self.0.take()
            && tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

/// The remote command's stderr, read by a background task into a channel: before the hook
/// accepts, it is kept to explain a failed handshake (`nix-store: command not found`); after,
/// it is forwarded to the build log on fd 4.
pub(crate) struct LogTap {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl LogTap {
    /// A tap fed by hand, chunk by chunk; it ends when the sender is dropped.
    pub(crate) fn pair() -> (mpsc::UnboundedSender<Vec<u8>>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, LogTap { rx })
    }

    pub(crate) fn spawn<R: AsyncRead + Send + Unpin + 'static>(mut r: R) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf.get(..n).unwrap_or_default().to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        LogTap { rx }
    }

    /// Everything that arrives within `wait` (or until the stream ends), as text.
    pub(crate) async fn collect(&mut self, wait: Duration) -> String {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            out.extend_from_slice(&chunk);
            if out.len() > 64 * 1024 {
                break;
            }
        }
        String::from_utf8_lossy(&out).trim().to_owned()
    }

    /// The next chunk, `None` at the end of the stream.
    pub(crate) async fn next(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }
}

/// A way to reach a builder's serve process.
pub(crate) trait Transport {
    fn connect(&self, machine: &Machine) -> impl Future<Output = Result<Session, SshError>> + Send;
}

/// `shellEscape` of Nix: single quotes around `s`, each `'` in it written `'\''`
/// (<https://github.com/NixOS/nix/blob/2.8.0/src/libutil/util.cc>).
pub(crate) fn shell_escape(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The command run on the builder: `nix-store --serve --write`, honouring the store URI's
/// `remote-program` and `remote-store` parameters (`LegacySSHStore`). ssh joins the words
/// with spaces into one line for the remote shell, so `remote-store` is shell-escaped as Nix
/// does (`" --store " + shellEscape(remoteStore)`,
/// <https://github.com/NixOS/nix/blob/2.8.0/src/libstore/legacy-ssh-store.cc>);
/// `remote-program` is not, also as in Nix: it may carry arguments of its own.
pub(crate) fn remote_command(machine: &Machine) -> Vec<String> {
    let uri = machine.uri();
    let program = uri.param_set("remote-program").unwrap_or("nix-store");
    let mut cmd = vec![program.to_owned(), "--serve".into(), "--write".into()];
    if let Some(s) = uri.param_set("remote-store") {
        cmd.push("--store".into());
        cmd.push(shell_escape(s));
    }
    cmd
}

/// The OpenSSH client with a shared ControlMaster per builder.
#[derive(Debug, Clone)]
pub(crate) struct OpenSsh {
    /// The `ssh` program.
    pub(crate) program: String,
    /// Words of `NIX_SSHOPTS` (split on whitespace, as Nix does).
    pub(crate) extra_opts: Vec<String>,
    /// Where control sockets, their locks and known_hosts files live.
    pub(crate) control_dir: PathBuf,
    /// How long an idle master stays up.
    pub(crate) persist: Duration,
    /// `ConnectTimeout` for new connections (whole seconds, rounded up): a backstop behind
    /// the hook's own deadline, so an abandoned attempt does not linger for the kernel's
    /// TCP time-out. `NIX_SSHOPTS` comes first and wins (ssh keeps the first value).
    pub(crate) connect_timeout: Option<Duration>,
}

impl OpenSsh {
    pub(crate) fn new(control_dir: PathBuf, nix_sshopts: Option<&str>) -> Self {
        OpenSsh {
            program: "ssh".to_owned(),
            extra_opts: nix_sshopts
                .map(|o| o.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            control_dir,
            persist: Duration::from_secs(300),
            connect_timeout: None,
        }
    }

    /// A short name per (host, key, host key, options): ControlPath must fit in a socket
    /// address (108 bytes), and different credentials must not share a master.
    fn key(&self, machine: &Machine, host: &str) -> String {
        let mut h = Sha256::new();
        for part in [
            host,
            machine.ssh_key.as_deref().unwrap_or(""),
            machine
                .public_host_key
                .as_ref()
                .map_or("", |k| k.base64.as_str()),
            &self.extra_opts.join(" "),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.finalize()
            .iter()
            .take(10)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Options shared by the master and the sessions (so a session that finds no master
    /// still connects on its own with the same identity and host key).
    fn common_args(
        &self,
        machine: &Machine,
        host: &str,
        key: &str,
    ) -> Result<Vec<String>, SshError> {
        let mut args = vec![
            "-x".into(),
            "-a".into(),
            // Never prompt: the hook has no terminal, and a prompt would hang the build.
            "-oBatchMode=yes".into(),
        ];
        args.extend(self.extra_opts.iter().cloned());
        if let Some(t) = self.connect_timeout {
            let secs = t.as_millis().div_ceil(1000).max(1);
            args.push(format!("-oConnectTimeout={secs}"));
        }
        if let Some(k) = &machine.ssh_key {
            args.push("-i".into());
            args.push(k.clone());
        }
        if let Some(pk) = &machine.public_host_key {
            let path = self.control_dir.join(format!("{key}.known_hosts"));
            write_atomic(&path, pk.known_hosts_line(host).as_bytes())?;
            args.push(format!("-oUserKnownHostsFile={}", path.display()));
        }
        args.push(format!("-oControlPath={}", self.socket(key).display()));
        Ok(args)
    }

    fn socket(&self, key: &str) -> PathBuf {
        self.control_dir.join(format!("{key}.sock"))
    }

    /// Makes sure a master for `host` listens on its control socket. Serialised per builder
    /// by a lock file, so concurrent hooks start one master, not several.
    async fn ensure_master(
        &self,
        host: &str,
        key: &str,
        common: &[String],
    ) -> Result<(), SshError> {
        let sock = self.socket(key);
        if master_alive(&sock).await {
            return Ok(());
        }
        let lock_path = self.control_dir.join(format!("{key}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| SshError::Setup {
                path: lock_path.clone(),
                source,
            })?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
            .await
            .map_err(|e| SshError::Setup {
                path: lock_path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| SshError::Setup {
                path: lock_path.clone(),
                source,
            })?;
        if master_alive(&sock).await {
            return Ok(());
        }
        // A socket nobody answers on is left by a killed master.
        let _ = std::fs::remove_file(&sock);
        let errfile = tempfile::NamedTempFile::new_in(&self.control_dir).map_err(|source| {
            SshError::Setup {
                path: self.control_dir.clone(),
                source,
            }
        })?;
        let err_out = errfile.reopen().map_err(|source| SshError::Setup {
            path: errfile.path().to_owned(),
            source,
        })?;
        // `-f` backgrounds the master once it is authenticated (and detaches it from our
        // stdio), so the exit status tells whether the connection works. Its own process
        // group keeps it alive when the daemon kills this hook's group at the end; its stderr
        // goes to a file, never to the daemon's pipes, which it would otherwise hold open.
        let ciphers = self.cipher_preference(host, common).await;
        let status = Command::new(&self.program)
            .args(common)
            .args(ciphers)
            .args(["-M", "-N", "-f"])
            .arg(format!(
                "-oControlPersist={}",
                self.persist.as_secs().max(1)
            ))
            // `--`: a host that starts with `-` is a host, never an option
            // (`ssh://-oProxyCommand=…` would otherwise run a command here, as root).
            .arg("--")
            .arg(host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_out)
            .process_group(0)
            // If the hook's deadline fires first, the attempt is abandoned: kill it rather
            // than leave it connecting in the background.
            .kill_on_drop(true)
            .status()
            .await
            .map_err(|source| SshError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        drop(lock);
        if status.success() {
            return Ok(());
        }
        let reason = std::fs::read_to_string(errfile.path()).unwrap_or_default();
        Err(SshError::Connect {
            host: host.to_owned(),
            reason: describe_failure(reason.trim(), status.code()),
        })
    }
}

/// Ciphers put first for a builder's master when the CPU does AES in hardware: AES-GCM then
/// costs a fraction of the CPU of OpenSSH's default first choice, chacha20-poly1305 (which is
/// first because it is the fastest constant-time cipher *without* AES instructions). A NAR
/// upload keeps ssh and the builder's sshd busy encrypting and decrypting, so this is most of
/// the transport's cost.
const AES_GCM: [&str; 2] = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"];

/// Whether this CPU has AES and carry-less multiplication instructions (AES-GCM in
/// hardware, constant time).
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Whether `NIX_SSHOPTS` words choose ciphers themselves (`-c list`, `-oCiphers=…`,
/// `-o Ciphers …`).
fn opts_choose_ciphers(opts: &[String]) -> bool {
    opts.iter().any(|o| {
        o.starts_with("-c")
            || o.to_ascii_lowercase()
                .trim_start_matches("-o")
                .starts_with("ciphers")
    })
}

/// The `ciphers` line of `ssh -G` output.
fn ciphers_line(g: &[u8]) -> Option<String> {
    String::from_utf8_lossy(g)
        .lines()
        .find_map(|l| l.strip_prefix("ciphers "))
        .map(|c| c.trim().to_owned())
}

/// `list` with AES-GCM first, or `None` when this ssh does not offer it.
fn aes_gcm_first(list: &str) -> Option<String> {
    let have: Vec<&str> = list.split(',').filter(|c| !c.is_empty()).collect();
    if !AES_GCM.iter().all(|c| have.contains(c)) {
        return None;
    }
    let rest = have.into_iter().filter(|c| !AES_GCM.contains(c));
    Some(
        AES_GCM
            .into_iter()
            .chain(rest)
            .collect::<Vec<_>>()
            .join(","),
    )
}

impl OpenSsh {
    /// `-oCiphers=…` putting AES-GCM first for a new master, only where it is faster and
    /// nobody chose otherwise: the CPU has AES instructions, `NIX_SSHOPTS` sets no ciphers,
    /// and `ssh -G` resolves the same ciphers for this host with the user's and system's
    /// configuration as without any (so a `Ciphers` line in `~/.ssh/config` or
    /// `/etc/ssh/ssh_config` is kept). The rest of ssh's default list follows, so a builder
    /// without AES-GCM still gets its usual choice. Costs two local `ssh -G` runs per
    /// master, no network.
    async fn cipher_preference(&self, host: &str, common: &[String]) -> Option<String> {
        if !aes_in_hardware() || opts_choose_ciphers(&self.extra_opts) {
            return None;
        }
        let resolve = |no_config: bool| {
            let mut c = Command::new(&self.program);
            c.arg("-G").args(common);
            if no_config {
                // After `common`: ssh keeps the last `-F`, so this also overrides a config
                // file named in `NIX_SSHOPTS`.
                c.args(["-F", "none"]);
            }
            c.arg("--")
                .arg(host)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .output()
        };
        let (configured, default) = tokio::join!(resolve(false), resolve(true));
        let (configured, default) = (configured.ok()?, default.ok()?);
        if !configured.status.success() || !default.status.success() {
            return None;
        }
        let list = ciphers_line(&configured.stdout)?;
        if ciphers_line(&default.stdout)? != list {
            return None;
        }
        aes_gcm_first(&list).map(|l| format!("-oCiphers={l}"))
    }

    /// Stops the builder's master, if any: after a failure its TCP connection may be
    /// stuck on a dead link, and later sessions through it would hang too.
    pub(crate) async fn drop_master(&self, machine: &Machine) {
        let Some(host) = machine.host() else { return };
        let key = self.key(machine, host);
        let sock = self.socket(&key);
        if !sock.exists() {
            return;
        }
        let run = Command::new(&self.program)
            .arg(format!("-oControlPath={}", sock.display()))
            .args(["-O", "exit", "--", host])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(1), run).await;
        let _ = std::fs::remove_file(&sock);
    }
}

/// One line explaining why ssh failed.
fn describe_failure(stderr: &str, code: Option<i32>) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
        .collect();
    if lines.is_empty() {
        return match code {
            Some(c) => format!("ssh exited with status {c}"),
            None => "ssh was killed by a signal".to_owned(),
        };
    }
    lines.join("; ")
}

/// The channel for ssh's stdin: a Unix socket pair rather than a pipe. A pipe holds 64 KiB
/// and wakes its writer whenever ssh has read a little of it, so a NAR upload goes out in
/// many small writes, each a wake-up of this process; a socket holds about 200 KiB and
/// wakes the writer only once most of it has been read. ssh reads a socket like a pipe, and
/// our end's shutdown (or drop) is its end of input.
fn stdin_socket() -> std::io::Result<(tokio::net::UnixStream, std::os::unix::net::UnixStream)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    // Only the other end is written by us; ssh never writes to its stdin.
    ours.shutdown(std::net::Shutdown::Read)?;
    // Room for 1 MiB (the kernel doubles it, within `wmem_max`): the NAR writer runs further
    // ahead of ssh's 16 KiB reads. A refusal leaves the default, which works.
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&ours, 1 << 20);
    ours.set_nonblocking(true)?;
    Ok((tokio::net::UnixStream::from_std(ours)?, theirs))
}

async fn master_alive(sock: &Path) -> bool {
    sock.exists() && tokio::net::UnixStream::connect(sock).await.is_ok()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SshError> {
    // Unique per call, not only per process: the hook prepares the same builder's files from
    // concurrent tasks (a probe and a connection), and a shared temporary name let one task
    // rename the other's file away ("preparing …known_hosts: No such file or directory").
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| SshError::Setup {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod write_atomic_tests {
    use super::write_atomic;

    /// Many writers of one file in one process: every write succeeds and the file ends whole.
    #[test]
    fn concurrent_writes_of_one_file_in_one_process_all_succeed() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("k.known_hosts");
        std::thread::scope(|s| {
            for i in 0..16 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..200 {
                        write_atomic(path, format!("line {i}\n").as_bytes()).expect("write");
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.starts_with("line ") && text.ends_with('\n'),
            "{text:?}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
        assert_eq!(left.len(), 1, "temporary files left behind");
    }
}

impl Transport for OpenSsh {
    async fn connect(&self, machine: &Machine) -> Result<Session, SshError> {
        let host = machine
            .host()
            .filter(|_| machine.scheme() == Some("ssh"))
            .ok_or_else(|| SshError::NoHost {
                uri: machine.store_uri.clone(),
            })?
            .to_owned();
        std::fs::create_dir_all(&self.control_dir).map_err(|source| SshError::Setup {
            path: self.control_dir.clone(),
            source,
        })?;
        let key = self.key(machine, &host);
        let common = self.common_args(machine, &host, &key)?;
        self.ensure_master(&host, &key, &common).await?;
        let (ours, theirs) = stdin_socket().map_err(|source| SshError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let mut child = Command::new(&self.program)
            .args(&common)
            .arg("-oControlMaster=no")
            .arg("--")
            .arg(&host)
            .args(remote_command(machine))
            .stdin(std::os::fd::OwnedFd::from(theirs))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SshError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(SshError::Spawn {
                program: self.program.clone(),
                source: std::io::Error::other("stdio pipes missing"),
            });
        };
        Ok(Session {
            writer: Box::new(ours),
            reader: Box::new(stdout),
            log: LogTap::spawn(stderr),
            child: Some(child),
            finisher: None,
        })
    }
}

#[cfg(test)]
mod tests;
