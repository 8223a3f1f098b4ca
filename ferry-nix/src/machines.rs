//! The remote-builder machine list (the `builders` setting and machines files), following
//! `src/libstore/machines.cc` (Nix 2.8 and HEAD, see docs/hook-protocol.md §2.1), and the slot-lock
//! file names of `build-remote.cc` (docs/hook-protocol.md §2.2) so Ferry and stock hooks share slot accounting.
//!
//! Format: entries separated by newlines and `;`; `#` starts a comment; `@PATH` reads another
//! file recursively (a missing file is ignored). Each entry has up to 8 whitespace-separated
//! positional fields; `-` leaves a field unset:
//!
//! `storeUri systems sshKey maxJobs speedFactor supportedFeatures mandatoryFeatures publicHostKey`
//!
//! Version differences and Ferry's choices:
//! - Comments: Nix 2.8 splits on `\n` and `;` first and strips `#…` from each piece, so a `;`
//!   inside a comment starts a new entry (`a # x; b` is two machines, `a` and `b`). HEAD strips
//!   the comment from each line first (`a # x; b` is only `a`). Ferry follows HEAD.
//! - speedFactor: 2.8 parses an `unsigned int` and uses `max(1, n)`; from 2.20 it is a `float`
//!   where 0 means 1.0 and a negative value is an error. Ferry follows 2.20 (a 2.8 integer is a
//!   valid float with the same meaning except that 2.8 rejects fractions). Ferry also rejects
//!   NaN and infinities, which the float parse would let through.
//! - Nix silently ignores fields after the 8th; Ferry reports them, since they are always a
//!   mistake (usually a space inside a comma list).
//! - Nix does not guard against `@file` cycles (it recurses until the stack overflows); Ferry
//!   reports a cycle and limits nesting to [`MAX_INCLUDE_DEPTH`].
//! - `@PATH` is used as written (relative paths are relative to the process's directory, `/`
//!   for a hook), exactly as Nix passes it to `readFile`.

use crate::nixconf::{FileLoader, MAX_INCLUDE_DEPTH, RealFs, normalize_path};
use crate::store_uri::StoreUri;
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Source name used in errors for the `builders` setting itself.
pub const BUILDERS_SETTING_SOURCE: &str = "the 'builders' setting";

/// Directory under the state directory holding the slot locks (`build-remote.cc`).
pub const CURRENT_LOAD_DIR: &str = "current-load";
/// The lock taken while choosing a machine.
pub const MAIN_LOCK: &str = "main-lock";

/// Human names of the 8 fields, index = field number − 1.
const FIELD_NAMES: [&str; 8] = [
    "storeUri",
    "systems",
    "sshKey",
    "maxJobs",
    "speedFactor",
    "supportedFeatures",
    "mandatoryFeatures",
    "publicHostKey",
];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MachinesError {
    #[error("{src} line {line}, field 1 (storeUri): a store URI is required, got '-'")]
    MissingStoreUri { src: String, line: usize },
    #[error("{src} line {line}, field {field} ({name}): '{value}' is not {expected}")]
    BadField {
        src: String,
        line: usize,
        field: usize,
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{src} line {line}, field 5 (speedFactor): speed factor must be >= 0, got '{value}'")]
    NegativeSpeedFactor {
        src: String,
        line: usize,
        value: String,
    },
    #[error("{src} line {line}, field 8 (publicHostKey): '{value}' is not valid base64: {reason}")]
    BadHostKey {
        src: String,
        line: usize,
        value: String,
        reason: String,
    },
    #[error(
        "{src} line {line}: {count} fields, a machine has at most 8 (is there a space inside a comma-separated list?)"
    )]
    TooManyFields {
        src: String,
        line: usize,
        count: usize,
    },
    #[error("{src} line {line}: machines file '{path}' includes itself (include cycle)")]
    IncludeCycle {
        src: String,
        line: usize,
        path: String,
    },
    #[error("{src} line {line}: machines files nested deeper than {MAX_INCLUDE_DEPTH} at '{path}'")]
    IncludeTooDeep {
        src: String,
        line: usize,
        path: String,
    },
    #[error("{src} line {line}: cannot read machines file '{path}': {reason}")]
    Read {
        src: String,
        line: usize,
        path: String,
        reason: String,
    },
}

/// A public host key from field 8: the base64 as written and its decoded text, a
/// `known_hosts`-style key such as `ssh-ed25519 AAAA… comment`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicHostKey {
    pub base64: String,
    pub decoded: String,
}

impl PublicHostKey {
    /// The line Nix writes into its temporary `known_hosts` file (2.8 `src/libstore/ssh.cc`:
    /// `host + " " + decoded + "\n"`, with the user part of `user@host` removed). The trailing
    /// newline of a base64-encoded `.pub` file is dropped so the entry is a single line.
    pub fn known_hosts_line(&self, host: &str) -> String {
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        format!("{host} {}\n", self.decoded.trim_end_matches(['\n', '\r']))
    }
}

/// One remote builder.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// Store URI, with `ssh://` prepended to a bare host name.
    pub store_uri: String,
    /// Systems it builds for; the caller's `this_system` when the field is unset.
    pub systems: Vec<String>,
    pub ssh_key: Option<String>,
    /// Concurrent builds (slots); 1 when unset.
    pub max_jobs: u64,
    /// Relative speed, > 0; 1.0 when unset or 0.
    pub speed_factor: f64,
    pub supported_features: BTreeSet<String>,
    /// The machine only takes derivations that require all of these.
    pub mandatory_features: BTreeSet<String>,
    pub public_host_key: Option<PublicHostKey>,
}

impl Machine {
    /// The machine as one machines-file line, which parses back to an equal `Machine` (every
    /// field written out, `-` for unset ones). Used to hand builders to another process.
    pub fn to_line(&self) -> String {
        // A field that is exactly `-` is unset, so a list whose only item is `-` is written
        // `,-` (Nix tokenizes on ',' and drops empty tokens).
        let field = |joined: String| {
            if joined == "-" {
                ",-".to_owned()
            } else {
                joined
            }
        };
        let list = |s: &BTreeSet<String>| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                field(s.iter().map(String::as_str).collect::<Vec<_>>().join(","))
            }
        };
        format!(
            "{} {} {} {} {} {} {} {}",
            self.store_uri,
            // A set field that lists no system (`,`, as Nix tokenizes it) means none, while
            // `-` means this system: keep the difference.
            if self.systems.is_empty() {
                ",".to_owned()
            } else {
                field(self.systems.join(","))
            },
            self.ssh_key.as_deref().unwrap_or("-"),
            self.max_jobs,
            self.speed_factor,
            list(&self.supported_features),
            list(&self.mandatory_features),
            self.public_host_key
                .as_ref()
                .map_or("-", |k| k.base64.as_str()),
        )
    }
}

/// The `Machine` constructor's rule: prepend `ssh://` unless the URI has a scheme, contains a
/// `/` anywhere (a path), or is one of the special store words (optionally with parameters).
pub fn normalize_store_uri(uri: &str) -> String {
    let keep = uri.contains("://")
        || uri.contains('/')
        || matches!(uri, "auto" | "daemon" | "local")
        || ["auto?", "daemon?", "local?", "?"]
            .iter()
            .any(|p| uri.starts_with(p));
    if keep {
        uri.to_owned()
    } else {
        format!("ssh://{uri}")
    }
}

impl Machine {
    /// The scheme (`ssh`, `ssh-ng`, …), or `None` for `auto`, `daemon`, `local`, paths.
    pub fn scheme(&self) -> Option<&str> {
        self.uri().scheme()
    }

    /// The store URI, parsed.
    pub fn uri(&self) -> StoreUri<'_> {
        StoreUri::parse(&self.store_uri)
    }

    /// The `user@host[:port]` part of an `ssh://` or `ssh-ng://` URI.
    pub fn host(&self) -> Option<&str> {
        let uri = self.uri();
        match uri.scheme()? {
            "ssh" | "ssh-ng" => uri.authority(),
            _ => None,
        }
    }

    /// `Machine::systemSupported`: `builtin` derivations run anywhere.
    pub fn system_supported(&self, system: &str) -> bool {
        system == "builtin" || self.systems.iter().any(|s| s == system)
    }

    /// `Machine::allSupported`: every required feature is supported or mandatory.
    pub fn all_supported<I, S>(&self, required: I) -> bool
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        required.into_iter().all(|f| {
            self.supported_features.contains(f.as_ref())
                || self.mandatory_features.contains(f.as_ref())
        })
    }

    /// `Machine::mandatoryMet`: every mandatory feature is required by the derivation.
    pub fn mandatory_met<I, S>(&self, required: I) -> bool
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let required: BTreeSet<String> = required
            .into_iter()
            .map(|s| s.as_ref().to_owned())
            .collect();
        self.mandatory_features.iter().all(|m| required.contains(m))
    }

    /// The stock hook's eligibility test (docs/hook-protocol.md §2.1), without the per-process
    /// `enabled` flag: system, `all_supported` and `mandatory_met`.
    pub fn accepts(&self, system: &str, required: &BTreeSet<String>) -> bool {
        self.system_supported(system)
            && self.all_supported(required)
            && self.mandatory_met(required)
    }

    /// The `system-features` store parameter Nix passes: supported then mandatory features,
    /// space-separated (`Machine::openStore`).
    pub fn system_features_param(&self) -> String {
        self.supported_features
            .iter()
            .chain(self.mandatory_features.iter())
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The stock slot-lock file name for `slot` of this machine.
    pub fn slot_lock_name(&self, slot: u64) -> String {
        slot_lock_name(&self.store_uri, slot)
    }
}

/// `escapeUri` of `build-remote.cc`: every `/` becomes `_`.
pub fn escape_uri(uri: &str) -> String {
    uri.replace('/', "_")
}

/// `<stateDir>/current-load`.
pub fn current_load_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(CURRENT_LOAD_DIR)
}

/// Name of a slot lock under `current-load`: `<uri, '/'→'_'>-<slot>` (2.8 `openSlotLock`).
/// HEAD escapes `storeUri.render()`, which is the same string for URIs without query
/// parameters; Ferry uses the URI as written in the machines file, like 2.8.
pub fn slot_lock_name(store_uri: &str, slot: u64) -> String {
    format!("{}-{slot}", escape_uri(store_uri))
}

/// Name of the upload lock under `current-load`: `<uri, '/'→'_'>.upload-lock`.
pub fn upload_lock_name(store_uri: &str) -> String {
    format!("{}.upload-lock", escape_uri(store_uri))
}

/// Parses a machines specification (the value of `builders` or a machines file's text).
/// `source` names it in errors; `this_system` is the default for an unset systems field;
/// `@file` entries are read through `loader`.
pub fn parse_machines(
    text: &str,
    source: &str,
    this_system: &str,
    loader: &dyn FileLoader,
) -> Result<Vec<Machine>, MachinesError> {
    let mut out = Vec::new();
    let mut stack = Vec::new();
    expand(text, source, this_system, loader, &mut stack, &mut out)?;
    Ok(out)
}

/// Parses the `builders` setting, reading `@file` entries from the real filesystem.
pub fn parse_builders_setting(
    value: &str,
    this_system: &str,
) -> Result<Vec<Machine>, MachinesError> {
    parse_machines(value, BUILDERS_SETTING_SOURCE, this_system, &RealFs)
}

fn expand(
    text: &str,
    src: &str,
    this_system: &str,
    loader: &dyn FileLoader,
    stack: &mut Vec<PathBuf>,
    out: &mut Vec<Machine>,
) -> Result<(), MachinesError> {
    for (idx, raw) in text.split('\n').enumerate() {
        let line = idx + 1;
        // HEAD `expandBuilderLines`: strip the comment, then split on ';'.
        let uncommented = raw.split('#').next().unwrap_or("");
        for entry in uncommented.split(';') {
            let entry = entry.trim_matches([' ', '\t', '\n', '\r']);
            if entry.is_empty() {
                continue;
            }
            if let Some(path) = entry.strip_prefix('@') {
                let path = path.trim_matches([' ', '\t', '\n', '\r']);
                include(path, src, line, this_system, loader, stack, out)?;
                continue;
            }
            out.push(parse_entry(entry, src, line, this_system)?);
        }
    }
    Ok(())
}

fn include(
    path: &str,
    src: &str,
    line: usize,
    this_system: &str,
    loader: &dyn FileLoader,
    stack: &mut Vec<PathBuf>,
    out: &mut Vec<Machine>,
) -> Result<(), MachinesError> {
    let key = normalize_path(Path::new(path));
    if stack.contains(&key) {
        return Err(MachinesError::IncludeCycle {
            src: src.to_owned(),
            line,
            path: path.to_owned(),
        });
    }
    if stack.len() >= MAX_INCLUDE_DEPTH {
        return Err(MachinesError::IncludeTooDeep {
            src: src.to_owned(),
            line,
            path: path.to_owned(),
        });
    }
    match loader.load(Path::new(path)) {
        // Nix: "cannot find machines file", logged at debug level only.
        Ok(None) => Ok(()),
        Ok(Some(text)) => {
            stack.push(key);
            let r = expand(&text, path, this_system, loader, stack, out);
            stack.pop();
            r
        }
        Err(e) => Err(MachinesError::Read {
            src: src.to_owned(),
            line,
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// Nix's `tokenizeString(s, ",")`: empty items are dropped.
fn comma_list(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split(',').filter(|t| !t.is_empty()).map(str::to_owned)
}

/// Base64 as Nix's `base64Decode` accepts it: standard alphabet, padding optional.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

fn parse_entry(
    entry: &str,
    src: &str,
    line: usize,
    this_system: &str,
) -> Result<Machine, MachinesError> {
    let fields: Vec<&str> = entry
        .split([' ', '\t', '\n', '\r'])
        .filter(|t| !t.is_empty())
        .collect();
    if fields.len() > FIELD_NAMES.len() {
        return Err(MachinesError::TooManyFields {
            src: src.to_owned(),
            line,
            count: fields.len(),
        });
    }
    // `isSet`: present and not "-".
    let get = |i: usize| fields.get(i).copied().filter(|f| *f != "-");
    let bad = |i: usize, value: &str, expected: &'static str| MachinesError::BadField {
        src: src.to_owned(),
        line,
        field: i + 1,
        name: FIELD_NAMES.get(i).copied().unwrap_or("?"),
        value: value.to_owned(),
        expected,
    };

    let store_uri = get(0).ok_or_else(|| MachinesError::MissingStoreUri {
        src: src.to_owned(),
        line,
    })?;

    let systems = match get(1) {
        Some(s) => {
            let mut v: Vec<String> = Vec::new();
            for sys in comma_list(s) {
                if !v.contains(&sys) {
                    v.push(sys);
                }
            }
            v
        }
        None => vec![this_system.to_owned()],
    };

    // Nix: `string2Int<unsigned int>`.
    let max_jobs = match get(3) {
        Some(s) => crate::nixconf::parse_u64(s)
            .filter(|n| *n <= u64::from(u32::MAX))
            .ok_or_else(|| bad(3, s, "a number (an unsigned integer)"))?,
        None => 1,
    };

    let speed_factor = match get(4) {
        Some(s) => {
            let f: f64 = s
                .parse()
                .ok()
                .filter(|f: &f64| !f.is_nan() && f.is_finite())
                .ok_or_else(|| bad(4, s, "a number (a finite decimal)"))?;
            if f < 0.0 {
                return Err(MachinesError::NegativeSpeedFactor {
                    src: src.to_owned(),
                    line,
                    value: s.to_owned(),
                });
            }
            if f == 0.0 { 1.0 } else { f }
        }
        None => 1.0,
    };

    let public_host_key = match get(7) {
        Some(b64) => {
            let bytes = LENIENT_BASE64
                .decode(b64)
                .map_err(|e| MachinesError::BadHostKey {
                    src: src.to_owned(),
                    line,
                    value: b64.to_owned(),
                    reason: e.to_string(),
                })?;
            let decoded = String::from_utf8(bytes).map_err(|_| MachinesError::BadHostKey {
                src: src.to_owned(),
                line,
                value: b64.to_owned(),
                reason: "the decoded key is not text (expected e.g. 'ssh-ed25519 AAAA…')".into(),
            })?;
            Some(PublicHostKey {
                base64: b64.to_owned(),
                decoded,
            })
        }
        None => None,
    };

    Ok(Machine {
        store_uri: normalize_store_uri(store_uri),
        systems,
        ssh_key: get(2).map(str::to_owned),
        max_jobs,
        speed_factor,
        supported_features: get(5).map(|s| comma_list(s).collect()).unwrap_or_default(),
        mandatory_features: get(6).map(|s| comma_list(s).collect()).unwrap_or_default(),
        public_host_key,
    })
}

#[cfg(test)]
mod tests;
