//! The `[substituter]` section of `/etc/ferry/ferry.toml`, command-line overrides, and the
//! resolved [`Settings`] the server runs with.
//!
//! With no file and no flags, Ferry proxies `https://cache.nixos.org` on `127.0.0.1:37515`.
//! Every default below says why it was chosen; the reasoning about Nix's client behaviour is in
//! `docs/binary-cache.md` (§2 and §5).

use crate::credentials::Credentials;
use ferry_nix::signing::TrustedKeys;
use ferry_nix::store_path::StoreDir;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// The upstream used when neither the file nor the command line names one.
pub const DEFAULT_UPSTREAM: &str = "https://cache.nixos.org";
/// The listen address by default: loopback only, a port outside the usual ranges.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:37515";
/// Nix's compiled-in `trusted-public-keys`: what Nix trusts when no `nix.conf` line sets it,
/// and what `extra-trusted-public-keys` appends to
/// (<https://github.com/NixOS/nix/blob/2.8.0/src/libstore/globals.hh#L573-L576>).
pub const NIX_DEFAULT_TRUSTED_PUBLIC_KEYS: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SubstituterConfig {
    /// Address to listen on. Loopback by default: the proxy is for this machine's daemon;
    /// serving a LAN is an explicit choice.
    pub listen: String,
    /// The store directory announced in `nix-cache-info` and used to validate narinfos.
    pub store_dir: String,
    /// `Priority` announced in `nix-cache-info`. 20 puts Ferry before cache.nixos.org (40) and
    /// LAN caches (30), so Nix asks Ferry first (docs/binary-cache.md §5.1 rule 1).
    pub priority: i32,
    /// Time after which an upstream that has not answered no longer holds back a
    /// lower-priority hit, and a 404 is answered when every upstream that could hold the path
    /// said no or is down (breaker open). 2 s keeps one lookup well under Nix's own time-outs
    /// (docs/binary-cache.md §5.1 rule 2).
    pub narinfo_deadline_ms: u64,
    /// Total time Ferry keeps asking a live upstream that fails only transiently (time-outs,
    /// resets, 5xx: a busy cache with a full listen backlog) before answering 503 instead of
    /// a 404 that Nix would remember for an hour (issue 12, "never a false miss"). Nix 2.8
    /// waits without a time-out for the answer of a connected substituter, and 2.35's 15 s
    /// `connect-timeout` is about the connection to Ferry, which is immediate.
    pub narinfo_patience_ms: u64,
    /// Head start of each upstream over the next one in priority order: the next one is asked
    /// after this delay even if the first has not answered (and at once when the first has
    /// failed, e.g. after its connect time-out). It bounds how long a lower-priority upstream
    /// waits to be asked, not how long its hit waits: a hit is served once every
    /// higher-priority upstream has resolved (`race::decide`).
    pub head_start_ms: u64,
    /// How long a definitive miss (every upstream answered 404) is remembered.
    pub negative_ttl_secs: u64,
    /// How long a found narinfo is remembered (narinfos of a path never change, but a cache
    /// may be garbage-collected; one hour bounds staleness).
    pub positive_ttl_secs: u64,
    /// Keys whose signatures Nix trusts. Empty: the keys Nix itself trusts, computed from its
    /// own `nix.conf` (`$NIX_CONF_DIR` or `/etc/nix`) exactly as Nix does: its built-in
    /// default ([`NIX_DEFAULT_TRUSTED_PUBLIC_KEYS`]) unless a `trusted-public-keys` line
    /// replaces it, plus every `extra-trusted-public-keys`. Never "trust everything".
    pub trusted_public_keys: Vec<String>,
    /// Where to read Nix's configuration (`trusted-public-keys`, `require-sigs`).
    pub nix_conf_dir: Option<PathBuf>,
    /// A netrc file with credentials for upstreams (`machine HOST login USER password PASS`),
    /// as Nix's own `netrc-file` setting: secrets stay out of URLs, the TOML file and logs.
    pub netrc_file: Option<PathBuf>,
    /// Serve a narinfo no trusted key signs when no upstream has a trusted one. Off by default:
    /// Nix would ignore it with a warning and build locally, so a 404 is quieter and equal.
    pub serve_untrusted: bool,
    /// Idle time-out for one read of a NAR body, per upstream read; never a total time-out
    /// (ncro#30). Well under Nix's `stalled-download-timeout` (300 s).
    pub nar_idle_timeout_ms: u64,
    /// The upstream caches, in any order (they are sorted by priority).
    pub upstream: Vec<UpstreamConfig>,
    /// Directory of the disk cache of narinfos and NARs. Unset: no disk cache. What users get
    /// from an nginx caching proxy today (seed 001), with narinfo validation in front of it.
    pub cache_dir: Option<PathBuf>,
    /// Quota of the disk cache: bytes, or a number with K, M, G or T (powers of 1024, as in
    /// nginx). Least recently used entries are evicted to stay under it. 10G by default: safe on
    /// a laptop; the seed's proxy used 100G.
    pub cache_max_size: ByteSize,
    /// Entries not used for this long are dropped (nginx's `inactive`): seconds, or a number
    /// with s, m, h, d or w. 30d by default, Nix's own reuse period for narinfo URLs (docs/binary-cache.md §2.5).
    pub cache_max_age: Age,
    /// `[substituter.local]`: also serve the paths valid in this host's own store (the
    /// desktop or NAS cache role of nix-serve and harmonia), before any upstream. Absent: off.
    pub local: Option<LocalConfig>,
}

/// `[substituter.local]`: this host's store as the first source of narinfos and NARs.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct LocalConfig {
    /// Nix secret key files (`nix-store --generate-binary-cache-key`): every narinfo served
    /// gets a fresh signature by each, next to the signatures the path already has, exactly
    /// as `nix store sign` would add them. Readable by the service only (the NixOS module
    /// passes them with systemd's `LoadCredential`).
    pub secret_key_files: Vec<PathBuf>,
    /// Nix's state directory; its database `db/db.sqlite` is read (read-only) for path
    /// metadata. Default `/nix/var/nix` (`NIX_STATE_DIR` when set).
    pub nix_state_dir: Option<PathBuf>,
    /// Also check each NAR's SHA-256 against `NarHash` before its last byte is sent (the
    /// length is always checked: a path collected mid-stream never ends cleanly). Off by
    /// default: Nix checks `NarHash` itself, so this only turns a corrupted store file into a
    /// cut connection instead of a hash mismatch on the client, and it costs a core at
    /// about 2 GB/s (NAR throughput 0.61 instead of 0.92 of nginx on the 2-core fleet).
    pub verify_nar_hash: bool,
}

/// A size in bytes, written as a number or as text like `"100G"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// A duration, written as seconds or as text like `"30d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Age(pub Duration);

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrText::deserialize(d)? {
            NumOrText::Num(n) => Ok(ByteSize(n)),
            NumOrText::Text(t) => parse_size(&t)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl<'de> Deserialize<'de> for Age {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrText::deserialize(d)? {
            NumOrText::Num(n) => Ok(Age(Duration::from_secs(n))),
            NumOrText::Text(t) => parse_age(&t).map(Age).map_err(serde::de::Error::custom),
        }
    }
}

fn split_number(text: &str) -> Option<(u64, &str)> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let n = t[..digits].parse().ok()?;
    Some((n, t[digits..].trim()))
}

/// `"100G"`, `"512M"`, `"1T"`, `"4096"`; an optional `i` and `B` after the unit are accepted
/// (`"100GiB"`). Units are powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {text:?} (expected e.g. 100G, 512M or a number of bytes)");
    let (n, unit) = split_number(text).ok_or_else(bad)?;
    let unit = unit.trim_end_matches(['B', 'b']).trim_end_matches('i');
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// `"30d"`, `"12h"`, `"90m"`, `"45s"`, `"2w"`, `"3600"` (seconds).
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid age {text:?} (expected e.g. 30d, 12h or a number of seconds)");
    let (n, unit) = split_number(text).ok_or_else(bad)?;
    let secs: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(bad)
}

impl Default for SubstituterConfig {
    fn default() -> Self {
        SubstituterConfig {
            listen: DEFAULT_LISTEN.to_owned(),
            store_dir: "/nix/store".to_owned(),
            priority: 20,
            narinfo_deadline_ms: 2000,
            narinfo_patience_ms: 15_000,
            head_start_ms: 250,
            negative_ttl_secs: 60,
            positive_ttl_secs: 3600,
            trusted_public_keys: Vec::new(),
            nix_conf_dir: None,
            netrc_file: None,
            serve_untrusted: false,
            nar_idle_timeout_ms: 30_000,
            upstream: Vec::new(),
            cache_dir: None,
            cache_max_size: ByteSize(10 << 30),
            cache_max_age: Age(Duration::from_secs(30 * 86_400)),
            local: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UpstreamConfig {
    /// `http://`, `https://` or `file://` (a directory written by `nix copy --to file://`).
    pub url: String,
    /// Lower is asked first, as in Nix. Default: the position in the list times 10, plus 10.
    pub priority: Option<i32>,
    /// TCP connect time-out. 200 ms by default: a LAN or CDN answers SYNs in a few ms, so a
    /// dead host costs little. A dead first-priority upstream costs this time-out plus the next
    /// upstream's answer (`race`), and goal G5 allows 250 ms for both: 200 ms leaves 50 ms
    /// for the next upstream, a LAN cache or a CDN, and for timer and scheduling slack.
    ///
    /// Under load this is shorter than any SYN loss: when a busy cache's listen backlog is full
    /// it drops the SYN, and Linux resends it only after 1 s (`TCP_TIMEOUT_INIT`), so a single
    /// drop always exceeds 200 ms. Raising the time-out to cover that (over 1 s) would make
    /// every dead host cost more than a second and eat half the narinfo deadline. Instead a
    /// transient failure is retried on a fresh connection (a new SYN at once) after 50 ms and
    /// then 150 ms while the deadline has room for one more connect time-out (`race::retry_delay`),
    /// so a lost SYN costs about 250 ms (the time-out and the first back-off), not a 404 that
    /// Nix would remember for an hour (`narinfo-cache-negative-ttl`, docs/binary-cache.md §2.5). Keep it well
    /// under a third of `narinfo-deadline-ms` so that the retries fit.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time-out for a whole small response (narinfo, log, listing) and for each NAR read.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// Requests per second Ferry sends to this upstream; over the limit it skips to the next
    /// upstream instead of waiting (docs/binary-cache.md §5.1 rule 7). 0: unlimited.
    #[serde(default = "default_rate_limit")]
    pub rate_limit: u32,
    /// Concurrent requests to this upstream; Nix itself opens up to 25 connections.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Consecutive failures (connect errors, time-outs, 5xx, garbage) that open the breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// First open period of the breaker; doubles on each failed probe up to 60 s.
    #[serde(default = "default_breaker_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
}

fn default_connect_timeout_ms() -> u64 {
    200
}
fn default_read_timeout_ms() -> u64 {
    1500
}
fn default_rate_limit() -> u32 {
    200
}
fn default_max_in_flight() -> usize {
    16
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_cooldown_ms() -> u64 {
    2000
}

impl UpstreamConfig {
    pub fn new(url: &str) -> Self {
        UpstreamConfig {
            url: url.to_owned(),
            priority: None,
            connect_timeout_ms: default_connect_timeout_ms(),
            read_timeout_ms: default_read_timeout_ms(),
            rate_limit: default_rate_limit(),
            max_in_flight: default_max_in_flight(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown_ms: default_breaker_cooldown_ms(),
        }
    }
}

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("listen address '{0}' is not host:port")]
    Listen(String),
    #[error(transparent)]
    StoreDir(#[from] ferry_nix::store_path::StorePathError),
    #[error("upstream '{url}': {reason}")]
    Upstream { url: String, reason: &'static str },
    #[error("trusted-public-keys: {0}")]
    Keys(#[from] ferry_nix::signing::SigningError),
    #[error("reading Nix's configuration: {0}")]
    NixConf(#[from] ferry_nix::nixconf::NixConfError),
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
    #[error("cache-dir '{}' must be an absolute path", .0.display())]
    CacheDir(PathBuf),
    #[error("local secret key: {0}")]
    LocalKey(ferry_nix::signing::SigningError),
    #[error("netrc-file {}: {source}", path.display())]
    Netrc {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What Nix itself trusts, from its configuration (`nix.conf` and Nix's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixTrust {
    /// The effective `trusted-public-keys`, space-separated (may be empty).
    pub trusted_public_keys: String,
    /// `require-sigs` (true unless set to false): with false, Nix accepts any narinfo.
    pub require_sigs: bool,
}

impl Default for NixTrust {
    /// A Nix with no `nix.conf` at all.
    fn default() -> Self {
        NixTrust {
            trusted_public_keys: NIX_DEFAULT_TRUSTED_PUBLIC_KEYS.to_owned(),
            require_sigs: true,
        }
    }
}

/// Where an upstream's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamLocation {
    /// Base URL without a trailing '/'.
    Http(String),
    /// The cache directory.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// The URL as configured, credentials removed (see `display`).
    pub url: String,
    /// The URL for logs, metrics and the status page: `user:password@` never appears.
    pub display: String,
    /// Basic credentials, from the URL's `user:password@` or the netrc file: sent only with
    /// requests under this upstream's base ([`crate::paths::http_url`]).
    pub credentials: Option<Credentials>,
    pub location: UpstreamLocation,
    pub priority: i32,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub rate_limit: u32,
    pub max_in_flight: usize,
    pub breaker: crate::breaker::BreakerConfig,
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub store_dir: StoreDir,
    pub priority: i32,
    pub narinfo_deadline: Duration,
    /// At least `narinfo_deadline`.
    pub narinfo_patience: Duration,
    pub head_start: Duration,
    pub negative_ttl: Duration,
    pub positive_ttl: Duration,
    /// The keys Ferry checks signatures against (see `trusted_keys_text`).
    pub trusted_keys: TrustedKeys,
    /// `trusted_keys` as text, for `check-config`.
    pub trusted_keys_text: String,
    /// What Nix itself trusts, from its `nix.conf`, for `check-config`.
    pub nix_trust: NixTrust,
    /// False when Nix runs with `require-sigs = false`: then it accepts every narinfo.
    pub require_sigs: bool,
    pub serve_untrusted: bool,
    pub nar_idle_timeout: Duration,
    /// Sorted by priority (stable: equal priorities keep their order).
    pub upstreams: Vec<UpstreamSettings>,
    pub disk: Option<DiskSettings>,
    /// This host's store, when `[substituter.local]` is set.
    pub local: Option<LocalSettings>,
}

/// The local store, when configured.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// Nix's database, opened read-only.
    pub db: PathBuf,
    /// Keys that sign every narinfo served from the store.
    pub keys: Vec<ferry_nix::signing::SecretKey>,
    pub verify_nar_hash: bool,
}

/// The disk cache, when configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub max_age: Duration,
}

/// Command-line overrides of the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    /// When non-empty, replaces the file's upstreams (priorities by position).
    pub upstreams: Vec<String>,
}

pub fn parse_location(url: &str) -> Result<UpstreamLocation, SettingsError> {
    let bad = |reason| SettingsError::Upstream {
        url: url.to_owned(),
        reason,
    };
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(bad(
                "a file:// upstream needs an absolute path (file:///dir)",
            ));
        }
        let path = path.trim_end_matches('/');
        return Ok(UpstreamLocation::File(PathBuf::from(if path.is_empty() {
            "/"
        } else {
            path
        })));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        if url.contains('?') || url.contains('#') {
            return Err(bad("query strings and fragments are not supported"));
        }
        let base = url.trim_end_matches('/');
        if base.len() <= "https://".len() || base.ends_with(':') {
            return Err(bad("no host"));
        }
        return Ok(UpstreamLocation::Http(base.to_owned()));
    }
    Err(bad(
        "only http://, https:// and file:// upstreams are supported",
    ))
}

impl SubstituterConfig {
    /// Applies overrides and validates. `nix_trust` reads what Nix trusts from Nix's
    /// configuration directory (a parameter so tests need no files; see [`nix_conf_trust`]).
    pub fn resolve(
        mut self,
        overrides: &Overrides,
        nix_trust: impl FnOnce(&std::path::Path) -> Result<NixTrust, SettingsError>,
    ) -> Result<Settings, SettingsError> {
        if let Some(l) = &overrides.listen {
            self.listen = l.clone();
        }
        if !overrides.upstreams.is_empty() {
            self.upstream = overrides
                .upstreams
                .iter()
                .map(|u| UpstreamConfig::new(u))
                .collect();
        }
        // A host that serves only its own store (the NAS or desktop role) needs no upstream:
        // the default one is for the proxy role alone.
        if self.upstream.is_empty() && self.local.is_none() {
            self.upstream.push(UpstreamConfig::new(DEFAULT_UPSTREAM));
        }
        let netrc = match &self.netrc_file {
            None => None,
            Some(path) => Some(crate::credentials::Netrc::parse(
                &std::fs::read_to_string(path).map_err(|source| SettingsError::Netrc {
                    path: path.clone(),
                    source,
                })?,
            )),
        };
        let listen = self
            .listen
            .parse()
            .map_err(|_| SettingsError::Listen(self.listen.clone()))?;
        let store_dir = StoreDir::new(self.store_dir.clone())?;
        for (v, name) in [
            (self.narinfo_deadline_ms, "narinfo-deadline-ms"),
            (self.nar_idle_timeout_ms, "nar-idle-timeout-ms"),
        ] {
            if v == 0 {
                return Err(SettingsError::Zero(name));
            }
        }
        let mut upstreams = Vec::new();
        for (i, u) in self.upstream.iter().enumerate() {
            let (url, in_url) = crate::credentials::split_credentials(&u.url);
            let display = crate::credentials::redact(&u.url);
            let location = parse_location(&url).map_err(|e| match e {
                SettingsError::Upstream { reason, .. } => SettingsError::Upstream {
                    url: display.clone(),
                    reason,
                },
                e => e,
            })?;
            // Credentials in the URL win over the netrc file, as with curl.
            let credentials = in_url.or_else(|| {
                let host = crate::credentials::host_of(&url)?;
                netrc.as_ref()?.lookup(host)
            });
            let credentials = match location {
                UpstreamLocation::Http(_) => credentials,
                UpstreamLocation::File(_) => None,
            };
            if u.max_in_flight == 0 {
                return Err(SettingsError::Zero("max-in-flight"));
            }
            if u.connect_timeout_ms == 0 || u.read_timeout_ms == 0 {
                return Err(SettingsError::Zero(
                    "connect-timeout-ms and read-timeout-ms",
                ));
            }
            upstreams.push(UpstreamSettings {
                url,
                display,
                credentials,
                location,
                priority: u.priority.unwrap_or(10 + 10 * i as i32),
                connect_timeout: Duration::from_millis(u.connect_timeout_ms),
                read_timeout: Duration::from_millis(u.read_timeout_ms),
                rate_limit: u.rate_limit,
                max_in_flight: u.max_in_flight,
                breaker: crate::breaker::BreakerConfig {
                    failures_to_open: u.breaker_failures.max(1),
                    cooldown: Duration::from_millis(u.breaker_cooldown_ms),
                    max_cooldown: Duration::from_secs(60),
                    probe_timeout: Duration::from_millis(u.connect_timeout_ms + u.read_timeout_ms),
                },
            });
        }
        upstreams.sort_by_key(|u| u.priority);
        let dir = self.nix_conf_dir.clone().unwrap_or_else(|| {
            std::env::var_os("NIX_CONF_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/etc/nix"))
        });
        let nix_trust = nix_trust(&dir)?;
        let trusted_keys_text = if self.trusted_public_keys.is_empty() {
            nix_trust.trusted_public_keys.clone()
        } else {
            self.trusted_public_keys.join(" ")
        };
        let trusted_keys = TrustedKeys::parse_list(&trusted_keys_text)?;
        let disk = match &self.cache_dir {
            None => None,
            Some(dir) => {
                if !dir.is_absolute() {
                    return Err(SettingsError::CacheDir(dir.clone()));
                }
                if self.cache_max_size.0 == 0 {
                    return Err(SettingsError::Zero("cache-max-size"));
                }
                Some(DiskSettings {
                    dir: dir.clone(),
                    max_bytes: self.cache_max_size.0,
                    max_age: self.cache_max_age.0,
                })
            }
        };
        let local = match &self.local {
            None => None,
            Some(l) => Some(LocalSettings {
                db: l
                    .nix_state_dir
                    .clone()
                    .or_else(|| std::env::var_os("NIX_STATE_DIR").map(PathBuf::from))
                    .unwrap_or_else(|| PathBuf::from("/nix/var/nix"))
                    .join("db/db.sqlite"),
                keys: l
                    .secret_key_files
                    .iter()
                    .map(|p| ferry_nix::signing::SecretKey::from_file(p))
                    .collect::<Result<_, _>>()
                    .map_err(SettingsError::LocalKey)?,
                verify_nar_hash: l.verify_nar_hash,
            }),
        };
        Ok(Settings {
            local,
            listen,
            store_dir,
            priority: self.priority,
            narinfo_deadline: Duration::from_millis(self.narinfo_deadline_ms),
            narinfo_patience: Duration::from_millis(
                self.narinfo_patience_ms.max(self.narinfo_deadline_ms),
            ),
            head_start: Duration::from_millis(self.head_start_ms),
            negative_ttl: Duration::from_secs(self.negative_ttl_secs),
            positive_ttl: Duration::from_secs(self.positive_ttl_secs),
            trusted_keys,
            trusted_keys_text,
            require_sigs: nix_trust.require_sigs,
            nix_trust,
            serve_untrusted: self.serve_untrusted,
            nar_idle_timeout: Duration::from_millis(self.nar_idle_timeout_ms),
            upstreams,
            disk,
        })
    }
}

/// What Nix trusts according to `<dir>/nix.conf`, computed as Nix computes it (includes,
/// later lines win): its built-in default key unless `trusted-public-keys` replaces it, plus
/// `extra-trusted-public-keys` (appended to the default when nothing replaced it), and
/// `require-sigs` (default true,
/// <https://github.com/NixOS/nix/blob/2.8.0/src/libstore/globals.hh#L567-L581>).
pub fn nix_conf_trust(dir: &std::path::Path) -> Result<NixTrust, SettingsError> {
    let mut conf = ferry_nix::nixconf::NixConf::new();
    conf.set_default("trusted-public-keys", NIX_DEFAULT_TRUSTED_PUBLIC_KEYS);
    conf.set_default("require-sigs", "true");
    conf.apply_file(&dir.join("nix.conf"), &ferry_nix::nixconf::RealFs)?;
    Ok(NixTrust {
        trusted_public_keys: conf.get("trusted-public-keys").unwrap_or("").to_owned(),
        require_sigs: conf.get_bool("require-sigs")?.unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_nix_conf(_: &std::path::Path) -> Result<NixTrust, SettingsError> {
        Ok(NixTrust::default())
    }

    #[test]
    fn zero_config_proxies_cache_nixos_org_on_loopback() {
        let s = SubstituterConfig::default()
            .resolve(&Overrides::default(), no_nix_conf)
            .expect("defaults resolve");
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(s.upstreams.len(), 1);
        assert_eq!(
            s.upstreams[0].location,
            UpstreamLocation::Http("https://cache.nixos.org".into())
        );
        // No nix.conf: Nix's built-in key, never "trust everything".
        assert_eq!(s.trusted_keys.len(), 1);
        assert!(s.trusted_keys.get("cache.nixos.org-1").is_some());
        assert!(s.require_sigs);
    }

    #[test]
    fn file_section_with_upstreams_sorts_by_priority() {
        let text = r#"
[substituter]
listen = "127.0.0.1:9000"
priority = 15
[[substituter.upstream]]
url = "http://10.0.0.2:5000/"
priority = 50
connect-timeout-ms = 100
[[substituter.upstream]]
url = "file:///srv/cache"
priority = 5
"#;
        let c: SubstituterConfig = ferry_nix::config::parse_section(
            text,
            std::path::Path::new("/etc/ferry/ferry.toml"),
            "substituter",
        )
        .expect("parses");
        let s = c
            .resolve(&Overrides::default(), no_nix_conf)
            .expect("resolves");
        assert_eq!(s.priority, 15);
        assert_eq!(
            s.upstreams[0].location,
            UpstreamLocation::File("/srv/cache".into())
        );
        assert_eq!(
            s.upstreams[1].location,
            UpstreamLocation::Http("http://10.0.0.2:5000".into())
        );
        assert_eq!(s.upstreams[1].connect_timeout, Duration::from_millis(100));
    }

    #[test]
    fn typo_names_the_line() {
        let text = "[substituter]\nlisten = \"127.0.0.1:1\"\n[[substituter.upstream]]\nurl = \"http://a\"\nconect-timeout-ms = 3\n";
        let e = ferry_nix::config::parse_section::<SubstituterConfig>(
            text,
            std::path::Path::new("f.toml"),
            "substituter",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("f.toml line 5:"), "{e}");
    }

    #[test]
    fn flags_replace_file_upstreams_and_keys_come_from_nix_conf() {
        let mut c = SubstituterConfig::default();
        c.upstream.push(UpstreamConfig::new("http://from-file"));
        let o = Overrides {
            listen: Some("127.0.0.1:1234".into()),
            upstreams: vec!["http://a:1".into(), "file:///b".into()],
        };
        let key = ferry_nix::signing::SecretKey::from_seed("test-1", [1; 32])
            .expect("key")
            .to_public()
            .to_string();
        let s = c
            .resolve(&o, |_| {
                Ok(NixTrust {
                    trusted_public_keys: key,
                    require_sigs: true,
                })
            })
            .expect("resolves");
        assert_eq!(s.upstreams.len(), 2);
        assert_eq!(s.upstreams[0].priority, 10);
        assert_eq!(s.upstreams[1].priority, 20);
        assert_eq!(s.trusted_keys.len(), 1);
    }

    #[test]
    fn disk_cache_sizes_and_ages() {
        assert_eq!(parse_size("100G"), Ok(100 << 30));
        assert_eq!(parse_size("100GiB"), Ok(100 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "G", "10X", "-1", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_age("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_age("3600"), Ok(Duration::from_secs(3600)));
        assert!(parse_age("1y").is_err());

        let text = "[substituter]\ncache-dir = \"/var/cache/ferry\"\ncache-max-size = \"100G\"\ncache-max-age = \"30d\"\n";
        let c: SubstituterConfig =
            ferry_nix::config::parse_section(text, std::path::Path::new("f.toml"), "substituter")
                .expect("parses");
        let s = c
            .resolve(&Overrides::default(), no_nix_conf)
            .expect("resolves");
        assert_eq!(
            s.disk,
            Some(DiskSettings {
                dir: "/var/cache/ferry".into(),
                max_bytes: 100 << 30,
                max_age: Duration::from_secs(30 * 86_400),
            })
        );
        let text = "[substituter]\ncache-max-size = 1000\ncache-max-age = 60\n";
        let c: SubstituterConfig =
            ferry_nix::config::parse_section(text, std::path::Path::new("f.toml"), "substituter")
                .expect("numbers parse");
        assert_eq!(c.cache_max_size, ByteSize(1000));
        assert_eq!(
            c.resolve(&Overrides::default(), no_nix_conf)
                .expect("ok")
                .disk,
            None,
            "no cache-dir, no disk cache"
        );
        let e = ferry_nix::config::parse_section::<SubstituterConfig>(
            "[substituter]\ncache-max-size = \"lots\"\n",
            std::path::Path::new("f.toml"),
            "substituter",
        )
        .unwrap_err();
        assert!(e.to_string().contains("invalid size"), "{e}");
    }

    /// Issue 12 item 3: Ferry trusted one key where Nix trusts two with only
    /// `extra-trusted-public-keys`, and everything with no `trusted-public-keys` line.
    #[test]
    fn trusted_keys_are_computed_as_nix_computes_them() {
        let k = |seed| {
            ferry_nix::signing::SecretKey::from_seed("test-1", [seed; 32])
                .expect("key")
                .to_public()
                .to_string()
        };
        let dir = tempfile::tempdir().expect("tmp");
        let trust = |conf: &str| {
            std::fs::write(dir.path().join("nix.conf"), conf).expect("nix.conf");
            nix_conf_trust(dir.path()).expect("trust")
        };
        assert_eq!(trust(""), NixTrust::default());
        let t = trust(&format!("extra-trusted-public-keys = {}\n", k(1)));
        assert_eq!(
            t.trusted_public_keys,
            format!("{NIX_DEFAULT_TRUSTED_PUBLIC_KEYS} {}", k(1))
        );
        let t = trust(&format!(
            "trusted-public-keys = {}\nrequire-sigs = false\n",
            k(1)
        ));
        assert_eq!(t.trusted_public_keys, k(1));
        assert!(!t.require_sigs);
        let t = trust(&format!(
            "trusted-public-keys = {}\nextra-trusted-public-keys = {}\n",
            k(1),
            k(2)
        ));
        assert_eq!(t.trusted_public_keys, format!("{} {}", k(1), k(2)));
        // An explicitly empty list trusts no key at all (only content-addressed paths).
        assert_eq!(trust("trusted-public-keys =\n").trusted_public_keys, "");
        std::fs::remove_file(dir.path().join("nix.conf")).expect("rm");
        assert_eq!(
            nix_conf_trust(dir.path()).expect("no file"),
            NixTrust::default()
        );
    }

    #[test]
    fn credentials_come_out_of_urls_and_from_netrc() {
        let dir = tempfile::tempdir().expect("tmp");
        let netrc = dir.path().join("netrc");
        std::fs::write(&netrc, "machine b.lan login bob password hunter2\n").expect("netrc");
        let mut c = SubstituterConfig {
            netrc_file: Some(netrc),
            ..SubstituterConfig::default()
        };
        c.upstream = vec![
            UpstreamConfig::new("http://alice:s3cret@a.lan:5000/c"),
            UpstreamConfig::new("http://b.lan:5000"),
        ];
        let s = c.resolve(&Overrides::default(), no_nix_conf).expect("ok");
        let a = &s.upstreams[0];
        assert_eq!(a.url, "http://a.lan:5000/c");
        assert_eq!(a.display, "http://***@a.lan:5000/c");
        assert_eq!(
            a.location,
            UpstreamLocation::Http("http://a.lan:5000/c".into())
        );
        let ca = a.credentials.as_ref().expect("from the URL");
        assert_eq!(
            (ca.user.as_str(), ca.password.as_str()),
            ("alice", "s3cret")
        );
        let cb = s.upstreams[1].credentials.as_ref().expect("from netrc");
        assert_eq!(cb.password, "hunter2");
        assert!(!format!("{s:?}").contains("s3cret"), "Debug leaks");
        assert!(!format!("{s:?}").contains("hunter2"), "Debug leaks");
    }

    #[test]
    fn bad_upstreams_are_rejected() {
        for u in ["ftp://x", "file://relative", "http://", "http://a/?x=1"] {
            assert!(parse_location(u).is_err(), "{u}");
        }
    }
}
