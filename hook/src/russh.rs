//! The in-process SSH transport (the `russh` crate): no `ssh` process, no ControlMaster, and
//! every step — TCP connect, SSH handshake, host-key check, authentication, `exec` — inside
//! the hook's own deadline, so a probe can say which step a builder failed at.
//!
//! What it does not do, by design: read `~/.ssh/config` or `NIX_SSHOPTS` (no `Host` aliases,
//! `Port`, `ProxyJump`, `IdentityFile`, certificates). That is why OpenSSH stays the default
//! for builds (`build-transport`), where users expect their SSH configuration to apply as it
//! does for the stock hook; probes, which only need a yes/no within a deadline, default to
//! this transport (`probe-transport`, see [`crate::config`]).
//!
//! Equivalences with the stock hook (Nix 2.8 `src/libstore/ssh.cc`):
//! - the machines file's 8th field pins the host key (Nix writes it to a temporary
//!   `UserKnownHostsFile`); without it the host key must be in `~/.ssh/known_hosts` or
//!   `/etc/ssh/ssh_known_hosts` (OpenSSH with `BatchMode`, which never asks);
//! - the 3rd field is the identity file (`-i`); without it, ssh-agent's keys and then the
//!   default files `~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa`;
//! - the command is `nix-store --serve --write` with the store URI's `remote-program` and
//!   `remote-store` ([`remote_command`]), its stderr (SSH extended data) is the remote log.

use crate::ssh::{LogTap, Session, SshError, Transport, remote_command};
use ::russh::client::{self, Handle};
use ::russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use ::russh::{ChannelMsg, Disconnect, Preferred};
use ferry_nix::machines::Machine;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RusshError {
    #[error("'{uri}' is not an ssh:// store URI with a host")]
    NoHost { uri: String },
    #[error("bad port in '{target}'")]
    BadPort { target: String },
    #[error("cannot resolve '{host}': {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TCP connect to {addr}: {source}")]
    Tcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// Worded like OpenSSH's refusal, so one search finds both.
    #[error("Host key verification failed: {0}")]
    HostKey(String),
    #[error("cannot use the ssh key {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("{user}@{host}: Permission denied (publickey); tried {tried}")]
    Auth {
        user: String,
        host: String,
        tried: String,
    },
    #[error("SSH {step}: {source}")]
    Ssh {
        step: &'static str,
        #[source]
        source: ::russh::Error,
    },
}

/// `user@host[:port]` of an `ssh://` URI. The user defaults to the hook's own user, as with
/// `ssh`; the port to 22. `[v6addr]:port` and bare `v6addr` are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub user: String,
    pub host: String,
    pub port: u16,
}

impl Target {
    pub fn parse(spec: &str, default_user: &str) -> Result<Target, RusshError> {
        let (user, rest) = match spec.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (u.to_owned(), r),
            Some((_, r)) => (default_user.to_owned(), r),
            None => (default_user.to_owned(), spec),
        };
        let bad = || RusshError::BadPort {
            target: spec.to_owned(),
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(p) => (h, p.parse().map_err(|_| bad())?),
                None if after.is_empty() => (h, 22),
                None => return Err(bad()),
            }
        } else if rest.matches(':').count() == 1 {
            let (h, p) = rest.split_once(':').ok_or_else(bad)?;
            (h, p.parse().map_err(|_| bad())?)
        } else {
            (rest, 22)
        };
        if host.is_empty() {
            return Err(RusshError::NoHost {
                uri: spec.to_owned(),
            });
        }
        Ok(Target {
            user,
            host: host.to_owned(),
            port,
        })
    }

    /// The name known_hosts files use: `host`, or `[host]:port` off port 22.
    pub fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }
}

/// Which server keys are accepted, decided before connecting.
#[derive(Debug, Clone)]
pub enum HostKeyPolicy {
    /// The machines file's 8th field: only these keys.
    Pinned(Vec<PublicKey>),
    /// Entries for the host in known_hosts files: `(file, line, key)`, plus the files read.
    Known {
        entries: Vec<(PathBuf, usize, PublicKey)>,
        files: Vec<PathBuf>,
    },
}

/// The keys in the 8th field's decoded text: an OpenSSH `.pub` line (`type base64 comment`),
/// possibly several lines, possibly prefixed with host names as in known_hosts.
pub fn pinned_keys(decoded: &str) -> Result<Vec<PublicKey>, RusshError> {
    let keys: Vec<PublicKey> = decoded
        .split_whitespace()
        .filter(|w| w.starts_with("AAAA"))
        .filter_map(|w| ::russh::keys::parse_public_key_base64(w).ok())
        .collect();
    if keys.is_empty() {
        return Err(RusshError::HostKey(format!(
            "the machines file's host key field (8th) holds no public host key I can read: '{}'",
            decoded.trim()
        )));
    }
    Ok(keys)
}

/// The known_hosts entries for `target` in `files` (missing files are skipped; an entry
/// that does not parse is an error naming its file).
pub fn known_entries(target: &Target, files: &[PathBuf]) -> Result<HostKeyPolicy, RusshError> {
    let mut entries = Vec::new();
    for f in files {
        let found = ::russh::keys::known_hosts::known_host_keys_path(&target.host, target.port, f)
            .map_err(|e| {
                RusshError::HostKey(format!(
                    "cannot read the host keys for {} in {}: {e}",
                    target.known_hosts_name(),
                    f.display()
                ))
            })?;
        let text = std::fs::read_to_string(f).unwrap_or_default();
        entries.extend(
            found
                .into_iter()
                .map(|(n, k)| (f.clone(), file_line(&text, n), k)),
        );
    }
    Ok(HostKeyPolicy::Known {
        entries,
        files: files.to_vec(),
    })
}

/// The file line of russh's `n`th entry: russh numbers only the lines that are not
/// comments (`#` first), so a file with comments would be misquoted.
fn file_line(text: &str, n: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.starts_with('#'))
        .nth(n.saturating_sub(1))
        .map_or(n, |(i, _)| i + 1)
}

fn describe(k: &PublicKey) -> String {
    format!("{} {}", k.algorithm(), k.fingerprint(HashAlg::Sha256))
}

impl HostKeyPolicy {
    /// Accepts `offered` or says why not (every message contains "host key").
    pub fn check(&self, target: &Target, offered: &PublicKey) -> Result<(), String> {
        let name = target.known_hosts_name();
        match self {
            HostKeyPolicy::Pinned(keys) => {
                if keys.iter().any(|k| k.key_data() == offered.key_data()) {
                    return Ok(());
                }
                let pinned: Vec<String> = keys.iter().map(describe).collect();
                Err(format!(
                    "host key mismatch for {name}: the builder offers {}, the machines file pins {}",
                    describe(offered),
                    pinned.join(", ")
                ))
            }
            HostKeyPolicy::Known { entries, files } => {
                if entries
                    .iter()
                    .any(|(_, _, k)| k.key_data() == offered.key_data())
                {
                    return Ok(());
                }
                if let Some((f, line, _)) = entries
                    .iter()
                    .find(|(_, _, k)| k.algorithm().as_str() == offered.algorithm().as_str())
                {
                    return Err(format!(
                        "host key for {name} has CHANGED: the builder offers {}, {} line {line} has another key (remove that line if the change is expected)",
                        describe(offered),
                        f.display()
                    ));
                }
                let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                Err(format!(
                    "host key for {name} is not known: the builder offers {}, which is not in {}; pin it in the machines file's 8th field or add it to known_hosts",
                    describe(offered),
                    files.join(" or ")
                ))
            }
        }
    }

    /// Host-key algorithms to ask for, known ones first (as OpenSSH orders
    /// `HostKeyAlgorithms` by the keys it already has for the host), so a server with several
    /// keys presents one we can check.
    fn preferred_algorithms(&self) -> Vec<Algorithm> {
        let known: Vec<&PublicKey> = match self {
            HostKeyPolicy::Pinned(k) => k.iter().collect(),
            HostKeyPolicy::Known { entries, .. } => entries.iter().map(|(_, _, k)| k).collect(),
        };
        let defaults = Preferred::DEFAULT.key.to_vec();
        let mut out: Vec<Algorithm> = Vec::new();
        for k in known {
            // RSA host keys are negotiated by signature algorithm: take the default's RSA
            // entries in their order.
            let alg = k.algorithm();
            for d in &defaults {
                let same = match (&alg, d) {
                    (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
                    (a, d) => a == d,
                };
                if same && !out.contains(d) {
                    out.push(d.clone());
                }
            }
        }
        for d in defaults {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }
}

/// Loads an OpenSSH private key; the error names the file. Encrypted keys are refused (the
/// hook has no terminal to ask for a passphrase, like `ssh -oBatchMode=yes`).
pub fn load_key(path: &Path) -> Result<PrivateKey, RusshError> {
    ::russh::keys::load_secret_key(path, None).map_err(|e| RusshError::KeyFile {
        path: path.to_owned(),
        reason: match e {
            ::russh::keys::Error::KeyIsEncrypted => {
                "it is encrypted and the hook cannot ask for its passphrase".to_owned()
            }
            ::russh::keys::Error::IO(io) => io.to_string(),
            other => other.to_string(),
        },
    })
}

/// Where the step of a connection is, so a time-out can name it.
#[derive(Debug, Default)]
pub struct Progress(Mutex<&'static str>);

impl Progress {
    pub fn set(&self, step: &'static str) {
        if let Ok(mut s) = self.0.lock() {
            *s = step;
        }
    }

    pub fn get(&self) -> &'static str {
        self.0.lock().map(|s| *s).unwrap_or("")
    }
}

/// The russh client for `ssh://` builders.
#[derive(Debug, Clone)]
pub struct Russh {
    /// The hook user's login name (default remote user) and `~/.ssh`.
    pub user: String,
    pub ssh_dir: PathBuf,
    /// Known-hosts files read when the machine pins no host key.
    pub known_hosts: Vec<PathBuf>,
    /// Try ssh-agent's keys (`SSH_AUTH_SOCK`) when the machine names no key file.
    pub use_agent: bool,
    /// SSH keep-alives: a builder that stops answering mid-build is noticed (Nix's daemon
    /// does not time hooks out, NixOS/nix#16437; the values of NixOS/nix PR #15620).
    pub keepalive: Option<Duration>,
    /// `Host` patterns of the user's `~/.ssh/config` (see [`Russh::defer_reason`]).
    pub ssh_config_hosts: Vec<String>,
    /// `NIX_SSHOPTS` is set: OpenSSH options this client cannot apply.
    pub nix_sshopts: bool,
}

/// The `Host` patterns of an ssh_config text (`Host a b*`, `Host=a`; negated patterns are
/// kept with their `!`).
pub fn ssh_config_hosts(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let (kw, rest) = match line.split_once(|c: char| c.is_whitespace() || c == '=') {
            Some(x) => x,
            None => continue,
        };
        if kw.eq_ignore_ascii_case("host") {
            out.extend(
                rest.trim_start_matches(|c: char| c.is_whitespace() || c == '=')
                    .split_whitespace()
                    .map(str::to_owned),
            );
        }
    }
    out
}

/// ssh_config's pattern matching: `*` any run, `?` one character.
fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => {
                go(p.get(1..).unwrap_or_default(), n)
                    || (!n.is_empty() && go(p, n.get(1..).unwrap_or_default()))
            }
            (Some(b'?'), Some(_)) => go(
                p.get(1..).unwrap_or_default(),
                n.get(1..).unwrap_or_default(),
            ),
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => go(
                p.get(1..).unwrap_or_default(),
                n.get(1..).unwrap_or_default(),
            ),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

impl Russh {
    /// For the current user, from `/etc/passwd` (as `ssh` does: `~` is the passwd home, not
    /// `$HOME`).
    pub fn for_current_user() -> Self {
        let (user, home) = current_user();
        let ssh_dir = home.join(".ssh");
        let ssh_config_hosts = std::fs::read_to_string(ssh_dir.join("config"))
            .map(|t| ssh_config_hosts(&t))
            .unwrap_or_default();
        Russh {
            user,
            known_hosts: vec![
                ssh_dir.join("known_hosts"),
                PathBuf::from("/etc/ssh/ssh_known_hosts"),
            ],
            ssh_dir,
            use_agent: true,
            keepalive: Some(Duration::from_secs(30)),
            ssh_config_hosts,
            nix_sshopts: false,
        }
    }

    /// Why this builder's connections must go through OpenSSH even where russh is
    /// configured, if they must: `NIX_SSHOPTS` is set, or a `Host` block of `~/.ssh/config`
    /// other than a bare `Host *` names it (an alias, a port, a jump host, an identity:
    /// things only `ssh` applies). Global `Host *` defaults (keep-alives, multiplexing) are
    /// not taken as a reason, or no one with such a file could use this transport.
    pub fn defer_reason(&self, m: &Machine) -> Option<String> {
        if self.nix_sshopts {
            return Some("NIX_SSHOPTS is set".to_owned());
        }
        let spec = m.host()?;
        let host = Target::parse(spec, &self.user).ok()?.host;
        self.ssh_config_hosts
            .iter()
            .filter(|p| p.as_str() != "*" && !p.starts_with('!'))
            .find(|p| glob(p, &host))
            .map(|p| format!("~/.ssh/config has 'Host {p}'"))
    }

    fn policy(&self, m: &Machine, target: &Target) -> Result<HostKeyPolicy, RusshError> {
        match &m.public_host_key {
            Some(pk) => Ok(HostKeyPolicy::Pinned(pinned_keys(&pk.decoded)?)),
            None => known_entries(target, &self.known_hosts),
        }
    }

    /// Connects, authenticates and starts the serve command, reporting each step to
    /// `progress`. The caller bounds it in time (dropping the future abandons everything).
    pub async fn open(&self, m: &Machine, progress: &Progress) -> Result<Session, RusshError> {
        let spec = m
            .host()
            .filter(|_| m.scheme() == Some("ssh"))
            .ok_or_else(|| RusshError::NoHost {
                uri: m.store_uri.clone(),
            })?;
        let target = Target::parse(spec, &self.user)?;
        let policy = Arc::new(self.policy(m, &target)?);
        // The identity file is read before any network traffic: a wrong path fails at once,
        // naming the file.
        let explicit = match &m.ssh_key {
            Some(k) => Some((PathBuf::from(k), load_key(Path::new(k))?)),
            None => None,
        };

        progress.set("the TCP connect");
        let addr = format!("{}:{}", target.host, target.port);
        let addrs: Vec<std::net::SocketAddr> =
            tokio::net::lookup_host((target.host.as_str(), target.port))
                .await
                .map_err(|source| RusshError::Resolve {
                    host: target.host.clone(),
                    source,
                })?
                .collect();
        let mut last = None;
        let mut stream = None;
        for a in addrs {
            match tokio::net::TcpStream::connect(a).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| RusshError::Tcp {
            addr: addr.clone(),
            source: last.unwrap_or_else(|| std::io::Error::other("no address")),
        })?;
        let _ = stream.set_nodelay(true);

        progress.set("the SSH handshake");
        let config = client::Config {
            preferred: Preferred {
                key: Cow::Owned(policy.preferred_algorithms()),
                ..Preferred::DEFAULT
            },
            keepalive_interval: self.keepalive,
            keepalive_max: 3,
            // Flow control is by this window alone (russh#770): large enough for NARs on
            // links with some latency.
            window_size: 16 * 1024 * 1024,
            nodelay: true,
            ..client::Config::default()
        };
        let refused = Arc::new(Mutex::new(None));
        let handler = Checker {
            target: target.clone(),
            policy,
            refused: Arc::clone(&refused),
        };
        let mut handle = match client::connect_stream(Arc::new(config), stream, handler).await {
            Ok(h) => h,
            Err(source) => {
                if let Some(why) = refused.lock().ok().and_then(|mut r| r.take()) {
                    return Err(RusshError::HostKey(why));
                }
                return Err(RusshError::Ssh {
                    step: "handshake",
                    source,
                });
            }
        };

        progress.set("SSH authentication");
        self.authenticate(&mut handle, &target, explicit).await?;

        progress.set("starting the remote command");
        let ssh = |step| move |source| RusshError::Ssh { step, source };
        let channel = handle
            .channel_open_session()
            .await
            .map_err(ssh("channel open"))?;
        let command = remote_command(m).join(" ");
        channel
            .exec(true, command.as_bytes())
            .await
            .map_err(ssh("exec"))?;
        Ok(session(handle, channel))
    }

    async fn authenticate(
        &self,
        handle: &mut Handle<Checker>,
        target: &Target,
        explicit: Option<(PathBuf, PrivateKey)>,
    ) -> Result<(), RusshError> {
        let mut tried: Vec<String> = Vec::new();
        let mut skipped: Vec<String> = Vec::new();
        let files: Vec<(PathBuf, Option<PrivateKey>)> = match explicit {
            Some((p, k)) => vec![(p, Some(k))],
            None => {
                if self.use_agent && self.agent_auth(handle, target, &mut tried).await {
                    return Ok(());
                }
                ["id_ed25519", "id_ecdsa", "id_rsa"]
                    .iter()
                    .map(|n| (self.ssh_dir.join(n), None))
                    .filter(|(p, _)| p.exists())
                    .collect()
            }
        };
        for (path, key) in files {
            let key = match key {
                Some(k) => k,
                None => match load_key(&path) {
                    Ok(k) => k,
                    // A default file that cannot be used is passed over, as ssh does.
                    Err(e) => {
                        skipped.push(e.to_string());
                        continue;
                    }
                },
            };
            let hash = rsa_hash(handle, key.algorithm()).await;
            let r = handle
                .authenticate_publickey(
                    target.user.clone(),
                    PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                )
                .await
                .map_err(|source| RusshError::Ssh {
                    step: "authentication",
                    source,
                })?;
            if r.success() {
                return Ok(());
            }
            tried.push(path.display().to_string());
        }
        let mut what = if tried.is_empty() {
            "no key".to_owned()
        } else {
            tried.join(", ")
        };
        if !skipped.is_empty() {
            what.push_str(&format!(" (skipped: {})", skipped.join("; ")));
        }
        Err(RusshError::Auth {
            user: target.user.clone(),
            host: target.host.clone(),
            tried: what,
        })
    }

    /// ssh-agent's plain keys, in its order; `true` once one is accepted.
    async fn agent_auth(
        &self,
        handle: &mut Handle<Checker>,
        target: &Target,
        tried: &mut Vec<String>,
    ) -> bool {
        if std::env::var_os("SSH_AUTH_SOCK").is_none() {
            return false;
        }
        let Ok(mut agent) = ::russh::keys::agent::client::AgentClient::connect_env().await else {
            return false;
        };
        let Ok(ids) = agent.request_identities().await else {
            return false;
        };
        for id in ids {
            let ::russh::keys::agent::AgentIdentity::PublicKey { key, comment } = id else {
                continue;
            };
            let hash = rsa_hash(handle, key.algorithm()).await;
            match handle
                .authenticate_publickey_with(target.user.clone(), key, hash, &mut agent)
                .await
            {
                Ok(r) if r.success() => return true,
                _ => tried.push(format!("agent key '{comment}'")),
            }
        }
        false
    }
}

/// The russh handler: checks the server's host key against the policy.
struct Checker {
    target: Target,
    policy: Arc<HostKeyPolicy>,
    refused: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Checker {
    type Error = ::russh::Error;

    async fn check_server_key(
        &mut self,
        key: &::russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let verdict = match key {
            ::russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
                self.policy.check(&self.target, key)
            }
            ::russh::keys::PublicKeyOrCertificate::Certificate(_) => Err(format!(
                "host key for {} is a certificate, which the russh transport does not check; use the openssh transport",
                self.target.known_hosts_name()
            )),
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(why) => {
                if let Ok(mut r) = self.refused.lock() {
                    *r = Some(why);
                }
                Ok(false)
            }
        }
    }
}

/// Splits the channel into the serve byte stream and the remote log. One task reads the
/// channel's messages: data goes to a pipe the serve client reads, extended data (the remote
/// stderr) to the log tap. The serve client's writer writes channel data directly.
fn session(handle: Handle<Checker>, channel: ::russh::Channel<client::Msg>) -> Session {
    let (mut rd, wr) = channel.split();
    let writer = wr.make_writer();
    let (pipe_rx, pipe_tx) = tokio::io::simplex(256 * 1024);
    let (log_tx, log) = LogTap::pair();
    let pump = tokio::spawn(async move {
        // The reader sees the end of the stream only after `shutdown`: the halves of a
        // simplex pipe share one buffer, so dropping the writer is not enough.
        async fn end(pipe: &mut Option<tokio::io::WriteHalf<tokio::io::SimplexStream>>) {
            if let Some(mut p) = pipe.take() {
                let _ = p.shutdown().await;
            }
        }
        let mut pipe = Some(pipe_tx);
        while let Some(msg) = rd.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    if let Some(p) = pipe.as_mut()
                        && p.write_all(&data).await.is_err()
                    {
                        pipe = None;
                    }
                }
                // ext 1 is SSH_EXTENDED_DATA_STDERR (RFC 4254 §5.2).
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    let _ = log_tx.send(data.to_vec());
                }
                ChannelMsg::Eof => end(&mut pipe).await,
                ChannelMsg::Failure => {
                    let _ =
                        log_tx.send(b"the builder's sshd refused to run the command\n".to_vec());
                }
                ChannelMsg::ExitSignal {
                    signal_name,
                    error_message,
                    ..
                } => {
                    let _ = log_tx.send(
                        format!(
                            "remote command killed by signal {signal_name:?} {error_message}\n"
                        )
                        .into_bytes(),
                    );
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        // Closed, or the connection is gone: the serve client must not wait for more.
        end(&mut pipe).await;
    });
    // The serve loop ends when its stdin ends: send EOF, let the remote side close the
    // channel (draining the last output and log), then close the connection.
    let finish: crate::ssh::Finisher = Box::pin(async move {
        let _ = wr.eof().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
        let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
    });
    Session::with_finisher(Box::new(writer), Box::new(pipe_rx), log, finish)
}

impl RusshError {
    /// A failure OpenSSH might not have, because it reads `~/.ssh/config` and ssh-agent
    /// setups this client does not (a `Host` alias that is not a DNS name, another user or
    /// identity): worth one more try through OpenSSH before calling the builder down.
    pub fn openssh_might_work(&self) -> bool {
        matches!(self, RusshError::Resolve { .. } | RusshError::Auth { .. })
    }

    /// As the OpenSSH transport reports it: "cannot connect to 'user@host': …".
    pub fn into_ssh_error(self, machine: &Machine) -> SshError {
        match self {
            RusshError::NoHost { uri } => SshError::NoHost { uri },
            e => SshError::Connect {
                host: machine.host().unwrap_or(&machine.store_uri).to_owned(),
                reason: e.to_string(),
            },
        }
    }
}

impl Transport for Russh {
    async fn connect(&self, machine: &Machine) -> Result<Session, SshError> {
        self.open(machine, &Progress::default())
            .await
            .map_err(|e| e.into_ssh_error(machine))
    }
}

/// The login name and home directory of this process's user, from `/etc/passwd`; `$USER`
/// and `$HOME` (or root) if it has no entry.
fn current_user() -> (String, PathBuf) {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if let (Some(uid), Ok(passwd)) = (uid, std::fs::read_to_string("/etc/passwd")) {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if let (Some(name), Some(u), Some(home)) = (f.first(), f.get(2), f.get(5))
                && u.parse::<u32>().ok() == Some(uid)
            {
                return ((*name).to_owned(), PathBuf::from(home));
            }
        }
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "root".to_owned());
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    (user, home)
}

/// The signature hash to use with a key of `algorithm`: the best RSA hash the server
/// accepts for RSA keys (`server-sig-algs`), none for other keys.
async fn rsa_hash(handle: &Handle<Checker>, algorithm: Algorithm) -> Option<HashAlg> {
    if !algorithm.is_rsa() {
        return None;
    }
    handle
        .best_supported_rsa_hash()
        .await
        .ok()
        .flatten()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_nix::machines::parse_builders_setting;

    const K1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6WBW6Q7E+z9lfqr3ChtmMvBQ71YLRDg/IrLFd9KWNY";
    const K2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6ignflF9oSCIPSZN4nVXjQ6Vru5xgGZGb5fWJ2CMwG";

    fn key(line: &str) -> PublicKey {
        pinned_keys(line).expect("key").remove(0)
    }

    fn target(s: &str) -> Target {
        Target::parse(s, "me").expect("target")
    }

    #[test]
    fn targets_parse_user_host_and_port() {
        assert_eq!(
            target("root@10.0.0.1"),
            Target {
                user: "root".into(),
                host: "10.0.0.1".into(),
                port: 22
            }
        );
        let t = target("h:2222");
        assert_eq!((t.user.as_str(), t.port), ("me", 2222));
        assert_eq!(t.known_hosts_name(), "[h]:2222");
        assert_eq!(target("u@[fe80::1]:23").host, "fe80::1");
        assert_eq!(target("fe80::1").port, 22);
        assert!(Target::parse("h:x", "me").is_err());
    }

    #[test]
    fn pinned_host_key_is_matched_and_a_wrong_one_is_named() {
        let t = target("root@b1");
        let policy = HostKeyPolicy::Pinned(pinned_keys(&format!("{K1} root@b1\n")).expect("k"));
        assert!(policy.check(&t, &key(K1)).is_ok());
        let e = policy.check(&t, &key(K2)).expect_err("wrong key");
        assert!(e.contains("host key mismatch for b1"), "{e}");
        assert!(
            e.contains("SHA256:TwwyrvyMkN90XvNcLrBrq9E5dbKbxGYsIhL+jKTPa54"),
            "{e}"
        );
        // A known_hosts-style line (host names first) works too.
        assert_eq!(pinned_keys(&format!("b1,b1.lan {K1}")).expect("k").len(), 1);
        let e = pinned_keys("not a key").expect_err("garbage");
        assert!(e.to_string().contains("host key field"), "{e}");
    }

    #[test]
    fn known_hosts_accepts_refuses_changed_and_unknown_keys() {
        let dir = tempfile::tempdir().expect("tmp");
        let kh = dir.path().join("known_hosts");
        std::fs::write(
            &kh,
            format!("# comment\nother {K2}\nb1 {K1}\n[b2]:2222 {K2}\n"),
        )
        .expect("write");
        let files = vec![kh.clone(), dir.path().join("missing")];
        let t = target("root@b1");
        let p = known_entries(&t, &files).expect("read");
        assert!(p.check(&t, &key(K1)).is_ok());
        let e = p.check(&t, &key(K2)).expect_err("changed");
        assert!(e.contains("host key for b1 has CHANGED"), "{e}");
        assert!(e.contains(&format!("{} line 3", kh.display())), "{e}");
        let t2 = target("b2:2222");
        let p2 = known_entries(&t2, &files).expect("read");
        assert!(p2.check(&t2, &key(K2)).is_ok());
        let t3 = target("b3");
        let p3 = known_entries(&t3, &files).expect("read");
        let e = p3.check(&t3, &key(K1)).expect_err("unknown");
        assert!(e.contains("host key for b3 is not known"), "{e}");
        assert!(e.contains("8th field"), "{e}");
    }

    #[test]
    fn known_key_algorithms_come_first() {
        let p = HostKeyPolicy::Pinned(vec![key(K1)]);
        assert_eq!(p.preferred_algorithms().first(), Some(&Algorithm::Ed25519));
        assert_eq!(p.preferred_algorithms().len(), Preferred::DEFAULT.key.len());
    }

    #[test]
    fn ssh_config_host_blocks_defer_to_openssh() {
        let hosts = ssh_config_hosts(
            "# c\nHost *\n  ServerAliveInterval 30\nHost builder? *.lan !x.lan\nhost=jump\n  HostName 10.0.0.9\n",
        );
        assert_eq!(hosts, ["*", "builder?", "*.lan", "!x.lan", "jump"]);
        let mut r = Russh::for_current_user();
        r.ssh_config_hosts = hosts;
        let m = |s: &str| parse_builders_setting(s, "x").expect("m").remove(0);
        assert!(r.defer_reason(&m("ssh://root@10.0.0.1")).is_none());
        assert!(r.defer_reason(&m("ssh://builder1")).is_some());
        assert!(r.defer_reason(&m("ssh://root@b.LAN:2222")).is_some());
        assert_eq!(
            r.defer_reason(&m("ssh://jump")).as_deref(),
            Some("~/.ssh/config has 'Host jump'")
        );
        r.nix_sshopts = true;
        assert!(r.defer_reason(&m("ssh://root@10.0.0.1")).is_some());
    }

    #[test]
    fn key_file_errors_name_the_file() {
        let e = load_key(Path::new("/nonexistent/id_test")).expect_err("missing");
        let s = e.to_string();
        assert!(s.contains("/nonexistent/id_test"), "{s}");
        let dir = tempfile::tempdir().expect("tmp");
        let bad = dir.path().join("id_bad");
        std::fs::write(&bad, "not a key\n").expect("write");
        let s = load_key(&bad).expect_err("garbage").to_string();
        assert!(s.contains("id_bad"), "{s}");
    }

    #[test]
    fn a_bad_identity_file_fails_before_connecting() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        // Loopback's discard port: never contacted anyway, the key is read first.
        let m = parse_builders_setting(
            "ssh://root@127.0.0.1:9 x86_64-linux /nonexistent/builder_key",
            "x86_64-linux",
        )
        .expect("machine")
        .remove(0);
        let r = Russh::for_current_user();
        let e = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(5), r.open(&m, &Progress::default())).await
            })
            .expect("no network wait")
            .err()
            .expect("bad key");
        assert!(e.to_string().contains("/nonexistent/builder_key"), "{e}");
        let e = rt
            .block_on(r.connect(&parse_builders_setting("ssh-ng://h", "x").expect("m")[0]))
            .err()
            .expect("not ssh://");
        assert!(e.to_string().contains("ssh-ng://h"), "{e}");
    }
}
