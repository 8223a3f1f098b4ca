//! The `[substituter]` section as written in the file: [`SubstituterConfig`] and its
//! [`UpstreamConfig`]s, deserialised with `deny_unknown_fields`, with their defaults and the
//! size and age notations (`"100G"`, `"30d"`). Nothing here is checked beyond its syntax;
//! [`SubstituterConfig::resolve`] (in the parent module) validates it into [`Settings`].
//!
//! [`Settings`]: super::Settings

use super::DEFAULT_LISTEN;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

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
    /// default ([`NIX_DEFAULT_TRUSTED_PUBLIC_KEYS`](super::NIX_DEFAULT_TRUSTED_PUBLIC_KEYS))
    /// unless a `trusted-public-keys` line replaces it, plus every `extra-trusted-public-keys`. Never "trust everything".
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
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
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
pub(crate) fn parse_age(text: &str) -> Result<Duration, String> {
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
    /// `http://`, `https://`, `file://` (a directory written by `nix copy --to file://`) or
    /// `s3://bucket?endpoint=…&region=…` (Nix's S3 store URL, [`crate::s3`]).
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
    /// `s3://` only: a file holding the access key id. With `secret-access-key-file`, or
    /// neither: then the `AWS_*` variables or the shared credentials file (as Nix).
    #[serde(default)]
    pub access_key_id_file: Option<PathBuf>,
    /// `s3://` only: a file holding the secret access key (readable by the service only).
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
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
            access_key_id_file: None,
            secret_access_key_file: None,
        }
    }
}
