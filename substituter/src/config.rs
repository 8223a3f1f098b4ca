//! The `[substituter]` section of `/etc/ferry/ferry.toml`, command-line overrides, and the
//! resolved [`Settings`] the server runs with.
//!
//! With no file and no flags, Ferry proxies `https://cache.nixos.org` on `127.0.0.1:37515`.
//! Every default below says why it was chosen; the reasoning about Nix's client behaviour is in
//! `docs/binary-cache.md` (§2 and §5).
//!
//! The file's own types are in `raw` (re-exported here); this module resolves them, with the
//! overrides and what Nix's configuration trusts, into [`Settings`].

use crate::credentials::Credentials;
use ferry_nix::signing::TrustedKeys;
use ferry_nix::store_path::StoreDir;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

mod raw;

pub use raw::{ByteSize, LocalConfig, SubstituterConfig, UpstreamConfig};
#[cfg(test)]
use raw::{parse_age, parse_size};

/// The upstream used when neither the file nor the command line names one.
pub(crate) const DEFAULT_UPSTREAM: &str = "https://cache.nixos.org";
/// The listen address by default: loopback only, a port outside the usual ranges.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:37515";
/// Nix's compiled-in `trusted-public-keys`: what Nix trusts when no `nix.conf` line sets it,
/// and what `extra-trusted-public-keys` appends to
/// (<https://github.com/NixOS/nix/blob/2.8.0/src/libstore/globals.hh#L573-L576>).
pub(crate) const NIX_DEFAULT_TRUSTED_PUBLIC_KEYS: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("listen address '{0}' is not host:port")]
    Listen(String),
    #[error(transparent)]
    StoreDir(#[from] ferry_nix::store_path::StorePathError),
    #[error("upstream '{url}': {reason}")]
    Upstream { url: String, reason: &'static str },
    #[error("upstream '{url}': {source}")]
    S3 {
        url: String,
        #[source]
        source: crate::s3::S3ConfigError,
    },
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

/// Where an upstream's files are, with what it takes to read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamLocation {
    Http {
        /// Base URL without a trailing '/' and without `user:password@`.
        base: String,
        /// Basic credentials, from the URL's `user:password@` or the netrc file: sent only
        /// with requests under `base` ([`crate::paths::http_url`]).
        credentials: Option<Credentials>,
    },
    /// The cache directory.
    File(PathBuf),
    /// A bucket, read with SigV4-signed requests ([`crate::s3`]).
    S3 {
        location: crate::s3::S3Location,
        /// `Debug` shows the access key id only.
        credentials: crate::s3::Credentials,
    },
}

impl UpstreamLocation {
    /// An HTTP base without credentials.
    pub(crate) fn http(base: &str) -> UpstreamLocation {
        UpstreamLocation::Http {
            base: base.to_owned(),
            credentials: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// The URL as configured, credentials removed (see `display`); only the tests look.
    #[cfg(test)]
    pub(crate) url: String,
    /// The URL for logs, metrics and the status page: `user:password@` never appears.
    pub display: String,
    pub location: UpstreamLocation,
    pub priority: i32,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub rate_limit: u32,
    pub max_in_flight: usize,
    pub(crate) breaker: crate::breaker::BreakerConfig,
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub store_dir: StoreDir,
    pub priority: i32,
    pub(crate) narinfo_deadline: Duration,
    /// At least `narinfo_deadline`.
    pub(crate) narinfo_patience: Duration,
    pub(crate) head_start: Duration,
    pub(crate) negative_ttl: Duration,
    pub(crate) positive_ttl: Duration,
    /// The keys Ferry checks signatures against (see `trusted_keys_text`).
    pub(crate) trusted_keys: TrustedKeys,
    /// `trusted_keys` as text, for `check-config`.
    pub trusted_keys_text: String,
    /// What Nix itself trusts, from its `nix.conf`, for `check-config`.
    pub nix_trust: NixTrust,
    /// False when Nix runs with `require-sigs = false`: then it accepts every narinfo.
    pub(crate) require_sigs: bool,
    pub(crate) serve_untrusted: bool,
    pub(crate) nar_idle_timeout: Duration,
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

/// Parses an upstream URL (credentials already taken out of it). `s3_credentials` finds the
/// credentials of an `s3://` upstream once its URL parsed.
pub(crate) fn parse_location(
    url: &str,
    s3_credentials: impl FnOnce(
        &crate::s3::S3Location,
    ) -> Result<crate::s3::Credentials, crate::s3::S3ConfigError>,
) -> Result<UpstreamLocation, SettingsError> {
    let bad = |reason| SettingsError::Upstream {
        url: url.to_owned(),
        reason,
    };
    if url.starts_with("s3://") {
        let s3 = |source| SettingsError::S3 {
            url: url.to_owned(),
            source,
        };
        let location = crate::s3::parse_url(url).map_err(s3)?;
        let credentials = s3_credentials(&location).map_err(s3)?;
        return Ok(UpstreamLocation::S3 {
            location,
            credentials,
        });
    }
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
        return Ok(UpstreamLocation::http(base));
    }
    Err(bad(
        "only http://, https://, file:// and s3:// upstreams are supported",
    ))
}

impl SubstituterConfig {
    /// Applies overrides and validates. `nix_trust` reads what Nix trusts from Nix's
    /// configuration directory (a parameter so tests need no files; see [`nix_conf_trust`]).
    pub fn resolve(
        self,
        overrides: &Overrides,
        nix_trust: impl FnOnce(&std::path::Path) -> Result<NixTrust, SettingsError>,
    ) -> Result<Settings, SettingsError> {
        self.resolve_with_env(overrides, nix_trust, &|k| std::env::var(k).ok())
    }

    /// [`SubstituterConfig::resolve`] with `env` for the environment variables S3 credentials
    /// may come from (`AWS_*`, `HOME`).
    pub(crate) fn resolve_with_env(
        mut self,
        overrides: &Overrides,
        nix_trust: impl FnOnce(&std::path::Path) -> Result<NixTrust, SettingsError>,
        env: &dyn Fn(&str) -> Option<String>,
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
            let is_s3 = u.url.starts_with("s3://");
            // An s3:// URL carries no `user:password@` (parse_url refuses one); never split
            // its query's `endpoint=` as if it were an authority.
            let (url, in_url) = if is_s3 {
                (u.url.clone(), None)
            } else {
                crate::credentials::split_credentials(&u.url)
            };
            let display = if is_s3 {
                u.url.clone()
            } else {
                crate::credentials::redact(&u.url)
            };
            let s3_credentials = |loc: &crate::s3::S3Location| {
                crate::s3::credentials(
                    loc,
                    u.access_key_id_file.as_deref(),
                    u.secret_access_key_file.as_deref(),
                    env,
                )
            };
            let mut location = parse_location(&url, s3_credentials).map_err(|e| match e {
                SettingsError::Upstream { reason, .. } => SettingsError::Upstream {
                    url: display.clone(),
                    reason,
                },
                e => e,
            })?;
            if !is_s3 && (u.access_key_id_file.is_some() || u.secret_access_key_file.is_some()) {
                return Err(SettingsError::S3 {
                    url: display,
                    source: crate::s3::S3ConfigError::NotS3,
                });
            }
            if let UpstreamLocation::Http { credentials, .. } = &mut location {
                // Credentials in the URL win over the netrc file, as with curl.
                *credentials = in_url.or_else(|| {
                    let host = crate::credentials::host_of(&url)?;
                    netrc.as_ref()?.lookup(host)
                });
            }
            if u.max_in_flight == 0 {
                return Err(SettingsError::Zero("max-in-flight"));
            }
            if u.connect_timeout_ms == 0 || u.read_timeout_ms == 0 {
                return Err(SettingsError::Zero(
                    "connect-timeout-ms and read-timeout-ms",
                ));
            }
            upstreams.push(UpstreamSettings {
                #[cfg(test)]
                url,
                display,
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
mod tests;
