//! The `[build-hook]` section of Ferry's configuration (`/etc/ferry/ferry.toml`, or
//! `FERRY_CONFIG`). Machines and Nix settings still come from Nix (`builders`, the settings
//! stream); only the knobs Ferry adds live here. Every key is optional and the defaults are
//! safe with no file at all.

use serde::Deserialize;
use std::time::Duration;

/// Raw section as written in the file (milliseconds and seconds as integers, nix.conf-like
/// kebab-case keys).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub(crate) struct HookConfig {
    /// Budget for reaching a builder before answering the daemon: TCP connect, SSH
    /// handshake and authentication, and the `nix-store --serve` handshake. The daemon
    /// waits for the hook's answer with the client's build blocked (docs/hook-protocol.md §1.9),
    /// so this bounds what a dead builder can cost one derivation. 1 s covers an SSH login
    /// on a LAN or a nearby data centre several times over; raise it for builders across
    /// slow links.
    pub(crate) probe_timeout_ms: u64,
    /// When no builder is known healthy and several are probed, how long to keep waiting,
    /// once one has answered, for those with a higher speed factor (which the selection
    /// would prefer); probes of builders that could not be preferred are not waited for.
    /// Probes still running then go on in a detached `ferry-build-hook` process that
    /// records their result, so a dead builder costs one derivation at most this much, not
    /// the whole probe budget. When some builder is already known healthy, the hook does not
    /// wait for probes at all.
    pub(crate) probe_grace_ms: u64,
    /// When every healthy builder's slots are taken and a `# decline` would not make Nix
    /// wait for a running build to end, how long the hook itself waits for a free slot (or
    /// for a builder whose state was unknown to turn out up) before answering
    /// `# postpone`. A postponed derivation is asked about again only after
    /// `build-poll-interval` (5 s), however soon a slot frees, so a short wait here saves
    /// most of that. Kept short because the daemon's worker is blocked reading the answer:
    /// it does not read its other hooks' logs meanwhile, so a build whose log pipe fills
    /// cannot end (and free its slot) until this wait is over. At most one such wait per
    /// poll interval and hook process ends without a slot, so many postponed derivations
    /// do not add up. 0 turns it off.
    pub(crate) slot_wait_ms: u64,
    /// First back-off after a failure; doubled on each further consecutive failure.
    /// Hydra's queue runner waits 60 s (×3 per failure); a hook answers interactive users,
    /// so Ferry starts lower and relies on the single half-open probe to keep retries cheap.
    pub(crate) backoff_base_secs: u64,
    /// Longest back-off: a builder that was down for hours is retried at least this often.
    pub(crate) backoff_cap_secs: u64,
    /// A builder last seen healthy longer ago than this is probed (in parallel with the
    /// others, within the probe budget) before it is chosen.
    pub(crate) stale_after_secs: u64,
    /// Send builds to a healthy builder even when a local build slot is free (the stock
    /// hook's behaviour). `false` builds locally whenever the host can, and uses builders
    /// only for what it cannot build or when its slots are full (NixOS/nix#2589).
    pub(crate) prefer_remote: bool,
    /// The stock hook that builds on machines Ferry does not speak to (`ssh-ng://`, local
    /// stores): a command line split on whitespace, the verbosity appended. Unset: Debian's
    /// `/usr/libexec/nix/build-remote` if it exists, else the `build-remote` next to `nix`
    /// on PATH (Nix ≤ 2.9), else `nix __build-remote` (see `delegate.rs`).
    pub(crate) stock_hook: Option<String>,
    /// How the hook's own probes reach a builder. `openssh` (default): the probe is the
    /// first half of a build connection, and when the builder is up the build goes on over
    /// that same connection, so a first contact costs one SSH login, not two (measured on the
    /// fleet: a russh probe followed by an OpenSSH build connection made a single remote build
    /// about 0.2–0.35 s slower). The deadline is enforced by Ferry either way.
    /// `ferry-build-hook probe` checks over russh unless told otherwise (`--transport`).
    /// `russh`: Ferry's in-process SSH client, which
    /// runs every step (TCP connect, SSH handshake, login, serve handshake) under the probe
    /// deadline, names the step that failed, and needs no `ssh` process. It reads neither
    /// `~/.ssh/config` nor `NIX_SSHOPTS`: it connects to the machines file's host and port,
    /// checks the host key against the machines file (8th field) or `~/.ssh/known_hosts`,
    /// and logs in with the machine's key file, ssh-agent or `~/.ssh/id_*`. Builders that
    /// only work through `~/.ssh/config` (`Host` aliases, `Port`, `ProxyJump`,
    /// `IdentityFile`) or `NIX_SSHOPTS` need `openssh` here.
    pub(crate) probe_transport: TransportKind,
    /// How builds reach a builder. `openssh` (default): the `ssh` program, exactly as the
    /// stock hook runs it, so `~/.ssh/config`, `NIX_SSHOPTS` and agents work as users expect,
    /// with a ControlMaster per builder so later builds skip the handshakes. `russh`: the
    /// in-process client (see `probe-transport` for what it does not read). When both
    /// transports are the same, a probe's connection is kept for the build it precedes.
    pub(crate) build_transport: TransportKind,
    /// How fetched outputs become valid in the local store while the daemon holds their
    /// locks (docs/hook-protocol.md §3.4). `auto` (default): `held-locks` when `nix-store
    /// --version` names Lix or a Nix older than 2.29, else `restore`. `held-locks`:
    /// `nix-store --import` with `NIX_HELD_LOCKS` (Nix 2.0–2.28, Lix; on Nix ≥ 2.29 it would
    /// block on the daemon's lock). `restore`: `nix-store --restore` under a temporary name,
    /// rename into place, `nix-store --register-validity`, then a NAR hash check (every
    /// version; no signatures or `ca` are recorded).
    pub(crate) import_method: ImportMethod,
}

/// How outputs are imported (see [`ferry_store::AnyImporter`]).
pub(crate) use ferry_store::ImportMethod;

/// An SSH transport (see [`crate::ssh`] and [`crate::russh`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TransportKind {
    Openssh,
    Russh,
}

impl TransportKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TransportKind::Openssh => "openssh",
            TransportKind::Russh => "russh",
        }
    }
}

impl Default for HookConfig {
    fn default() -> Self {
        HookConfig {
            probe_timeout_ms: 1000,
            probe_grace_ms: 250,
            slot_wait_ms: 2000,
            backoff_base_secs: 10,
            backoff_cap_secs: 600,
            stale_after_secs: 60,
            prefer_remote: true,
            stock_hook: None,
            probe_transport: TransportKind::Openssh,
            build_transport: TransportKind::Openssh,
            import_method: ImportMethod::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ConfigError {
    #[error(transparent)]
    Load(#[from] ferry_nix::config::ConfigError),
    #[error("{path}: [build-hook] {key} = {value}: {problem}")]
    Value {
        path: String,
        key: &'static str,
        value: u64,
        problem: &'static str,
    },
}

/// Longest `slot-wait-ms`: waiting longer than Nix's own poll interval (`build-poll-interval`,
/// 5 s by default) would block the daemon's worker for longer than a `# postpone` costs.
const MAX_SLOT_WAIT_MS: u64 = 4000;

/// The validated settings, as durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tuning {
    pub(crate) probe_timeout: Duration,
    pub(crate) probe_grace: Duration,
    pub(crate) slot_wait: Duration,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_cap: Duration,
    pub(crate) stale_after: Duration,
    pub(crate) prefer_remote: bool,
    pub(crate) probe_transport: TransportKind,
    pub(crate) build_transport: TransportKind,
    pub(crate) import_method: ImportMethod,
}

impl Default for Tuning {
    fn default() -> Self {
        // The defaults are valid by construction.
        HookConfig::default()
            .validate("<defaults>")
            .unwrap_or(Tuning {
                probe_timeout: Duration::from_secs(1),
                probe_grace: Duration::from_millis(250),
                slot_wait: Duration::from_secs(2),
                backoff_base: Duration::from_secs(10),
                backoff_cap: Duration::from_secs(600),
                stale_after: Duration::from_secs(60),
                prefer_remote: true,
                probe_transport: TransportKind::Openssh,
                build_transport: TransportKind::Openssh,
                import_method: ImportMethod::Auto,
            })
    }
}

impl HookConfig {
    pub(crate) fn validate(&self, path: &str) -> Result<Tuning, ConfigError> {
        let bad = |key, value, problem| ConfigError::Value {
            path: path.to_owned(),
            key,
            value,
            problem,
        };
        if self.probe_timeout_ms == 0 {
            return Err(bad("probe-timeout-ms", 0, "must be at least 1"));
        }
        if self.probe_timeout_ms > 600_000 {
            return Err(bad(
                "probe-timeout-ms",
                self.probe_timeout_ms,
                "must be at most 600000 (the daemon waits that long for every derivation)",
            ));
        }
        if self.probe_grace_ms > self.probe_timeout_ms {
            return Err(bad(
                "probe-grace-ms",
                self.probe_grace_ms,
                "must not be above probe-timeout-ms",
            ));
        }
        if self.slot_wait_ms > MAX_SLOT_WAIT_MS {
            return Err(bad(
                "slot-wait-ms",
                self.slot_wait_ms,
                "must be at most 4000 (below Nix's 5 s build-poll-interval; the daemon's worker is blocked while the hook waits)",
            ));
        }
        if self.backoff_base_secs == 0 {
            return Err(bad("backoff-base-secs", 0, "must be at least 1"));
        }
        if self.backoff_cap_secs < self.backoff_base_secs {
            return Err(bad(
                "backoff-cap-secs",
                self.backoff_cap_secs,
                "must not be below backoff-base-secs",
            ));
        }
        Ok(Tuning {
            probe_timeout: Duration::from_millis(self.probe_timeout_ms),
            probe_grace: Duration::from_millis(self.probe_grace_ms),
            slot_wait: Duration::from_millis(self.slot_wait_ms),
            backoff_base: Duration::from_secs(self.backoff_base_secs),
            backoff_cap: Duration::from_secs(self.backoff_cap_secs),
            stale_after: Duration::from_secs(self.stale_after_secs),
            prefer_remote: self.prefer_remote,
            probe_transport: self.probe_transport,
            build_transport: self.build_transport,
            import_method: self.import_method,
        })
    }
}

/// Loads and validates the section from `path` (a missing file gives the defaults).
pub(crate) fn load(path: &std::path::Path) -> Result<Tuning, ConfigError> {
    load_all(path).map(|(t, _)| t)
}

/// The tuning and the `stock-hook` command, if set.
pub(crate) fn load_all(path: &std::path::Path) -> Result<(Tuning, Option<String>), ConfigError> {
    let raw: HookConfig = ferry_nix::config::load_section(path, "build-hook")?;
    let t = raw.validate(&path.display().to_string())?;
    Ok((t, raw.stock_hook.filter(|s| !s.trim().is_empty())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The `[build-hook]` section of `text`, as if read from `f.toml`.
    fn parse(text: &str) -> Result<HookConfig, ferry_nix::config::ConfigError> {
        ferry_nix::config::parse_section(text, Path::new("f.toml"), "build-hook")
    }

    #[test]
    fn defaults_without_a_file_and_overrides_with_one() {
        let t = load(Path::new("/nonexistent/ferry.toml")).expect("defaults");
        assert_eq!(t, Tuning::default());
        assert_eq!(t.probe_timeout, Duration::from_secs(1));
        let raw = parse(
            "[build-hook]\nprobe-timeout-ms = 300\nbackoff-base-secs = 1\nbackoff-cap-secs = 2\nprefer-remote = false\n",
        )
        .expect("parse");
        let t = raw.validate("f.toml").expect("valid");
        assert_eq!(t.probe_timeout, Duration::from_millis(300));
        assert_eq!(t.backoff_cap, Duration::from_secs(2));
        assert!(!t.prefer_remote);
        assert_eq!(t.stale_after, Duration::from_secs(60));
        assert_eq!(t.probe_transport, TransportKind::Openssh);
        assert_eq!(t.build_transport, TransportKind::Openssh);
        let raw =
            parse("[build-hook]\nprobe-transport = \"openssh\"\nbuild-transport = \"russh\"\n")
                .expect("parse");
        let t = raw.validate("f.toml").expect("valid");
        assert_eq!(t.probe_transport, TransportKind::Openssh);
        assert_eq!(t.build_transport, TransportKind::Russh);
        assert_eq!(t.import_method, ImportMethod::Auto);
        for (text, want) in [
            ("held-locks", ImportMethod::HeldLocks),
            ("restore", ImportMethod::Restore),
            ("auto", ImportMethod::Auto),
        ] {
            let raw = parse(&format!("[build-hook]\nimport-method = \"{text}\"\n")).expect("parse");
            assert_eq!(raw.validate("f").expect("valid").import_method, want);
            assert_eq!(want.name(), text);
        }
        let e =
            parse("[build-hook]\nimport-method = \"copy\"\n").expect_err("unknown import method");
        assert!(e.to_string().contains("line 2"), "{e}");
        let e =
            parse("[build-hook]\nprobe-transport = \"libssh\"\n").expect_err("unknown transport");
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let raw = HookConfig {
            backoff_base_secs: 20,
            backoff_cap_secs: 5,
            ..HookConfig::default()
        };
        let e = raw.validate("f.toml").expect_err("cap below base");
        assert!(e.to_string().contains("backoff-cap-secs = 5"), "{e}");
        let raw = HookConfig {
            probe_timeout_ms: 0,
            ..HookConfig::default()
        };
        assert!(raw.validate("f").is_err());
        let raw = HookConfig {
            probe_grace_ms: 2000,
            ..HookConfig::default()
        };
        let e = raw.validate("f.toml").expect_err("grace above budget");
        assert!(e.to_string().contains("probe-grace-ms = 2000"), "{e}");
        let raw = HookConfig {
            slot_wait_ms: 6000,
            ..HookConfig::default()
        };
        let e = raw
            .validate("f.toml")
            .expect_err("slot wait beyond the poll interval");
        assert!(e.to_string().contains("slot-wait-ms = 6000"), "{e}");
        let e = parse("[build-hook]\nprobe-timeout = 3\n").expect_err("typo");
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
