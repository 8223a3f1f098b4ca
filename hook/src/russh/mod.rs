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

mod host_keys;

pub(crate) use host_keys::{HostKeyPolicy, Target, known_entries, load_key, pinned_keys};

use crate::ssh::{LogTap, Session, SshError, Transport, remote_command};
use ::russh::client::{self, Handle};
use ::russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg};
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
pub(crate) enum RusshError {
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

/// Where the step of a connection is, so a time-out can name it.
#[derive(Debug, Default)]
pub(crate) struct Progress(Mutex<&'static str>);

impl Progress {
    pub(crate) fn set(&self, step: &'static str) {
        if let Ok(mut s) = self.0.lock() {
            *s = step;
        }
    }

    pub(crate) fn get(&self) -> &'static str {
        self.0.lock().map(|s| *s).unwrap_or("")
    }
}

/// The russh client for `ssh://` builders.
#[derive(Debug, Clone)]
pub(crate) struct Russh {
    /// The hook user's login name (default remote user) and `~/.ssh`.
    pub(crate) user: String,
    pub(crate) ssh_dir: PathBuf,
    /// Known-hosts files read when the machine pins no host key.
    pub(crate) known_hosts: Vec<PathBuf>,
    /// Try ssh-agent's keys (`SSH_AUTH_SOCK`) when the machine names no key file.
    pub(crate) use_agent: bool,
    /// SSH keep-alives: a builder that stops answering mid-build is noticed (Nix's daemon
    /// does not time hooks out, NixOS/nix#16437; the values of NixOS/nix PR #15620).
    pub(crate) keepalive: Option<Duration>,
    /// `Host` patterns of the user's `~/.ssh/config` (see [`Russh::defer_reason`]).
    pub(crate) ssh_config_hosts: Vec<String>,
    /// `NIX_SSHOPTS` is set: OpenSSH options this client cannot apply.
    pub(crate) nix_sshopts: bool,
}

/// The `Host` patterns of an ssh_config text (`Host a b*`, `Host=a`; negated patterns are
/// kept with their `!`).
pub(crate) fn ssh_config_hosts(text: &str) -> Vec<String> {
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
    pub(crate) fn for_current_user() -> Self {
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
    pub(crate) fn defer_reason(&self, m: &Machine) -> Option<String> {
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
    pub(crate) async fn open(
        &self,
        m: &Machine,
        progress: &Progress,
    ) -> Result<Session, RusshError> {
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
    pub(crate) fn openssh_might_work(&self) -> bool {
        matches!(self, RusshError::Resolve { .. } | RusshError::Auth { .. })
    }

    /// As the OpenSSH transport reports it: "cannot connect to 'user@host': …".
    pub(crate) fn into_ssh_error(self, machine: &Machine) -> SshError {
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
