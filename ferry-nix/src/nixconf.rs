//! A reader for `nix.conf`, following `src/libutil/config.cc` (Nix 2.8: `applyConfig`,
//! `applyConfigFile`, `Config::set`, the `BaseSetting<T>::set` specialisations) and HEAD
//! `src/libutil/configuration.cc` (`parseConfigFiles`), plus `loadConfFile` in
//! `src/libstore/globals.cc` for the loading order.
//!
//! Rules, as Nix applies them:
//! - The text is split on `\n`. Everything from the first `#` on a line is a comment. There is
//!   **no quoting** in any Nix version: a `#` inside a value also starts a comment.
//! - The rest is split into tokens on space, tab, CR and LF; a line without tokens is skipped.
//! - `include PATH` / `!include PATH` (exactly two tokens) read another file, with a relative
//!   `PATH` resolved against the including file's directory and normalised like `canonPath`
//!   (`.` and `..` removed lexically, symlinks untouched). A missing file is an error for
//!   `include` and ignored for `!include`. A file that exists but cannot be read is skipped
//!   silently by Nix (`applyConfigFile` swallows `SysError`); Ferry does the same and records
//!   a warning.
//! - Otherwise the second token must be exactly `=` (so `name=value` and `name =value` are
//!   syntax errors), and the value is the remaining tokens joined by single spaces.
//! - `Config::set`: a known name (or alias) is replaced; `extra-NAME` appends (space-joined)
//!   when NAME is a list-typed setting; a later plain `NAME = …` discards everything appended
//!   before it. `extra-NAME` for a setting that was never assigned appends to its *default*
//!   (`https://cache.nixos.org/` for `substituters`, the computed platforms for
//!   `extra-platforms`, …); Ferry has no table of defaults, so callers seed the ones they need
//!   with [`NixConf::set_default`], and without a default the appended words are the whole value.
//! - `extra-platforms` is a setting of its own, not an append: `extra-platforms = x` replaces
//!   its computed default (verified against Nix 2.8.0), and `extra-extra-platforms` appends.
//! - `extra-NAME` where NAME is not appendable (e.g. `extra-builders`, `extra-max-jobs`: plain
//!   string and integer settings) is an *unknown setting* to Nix: it warns and ignores it. Ferry
//!   keeps it under its literal name `extra-NAME` (so it never changes NAME) and records a warning.
//! - Values are not checked while reading (Nix would throw at once for `max-jobs = x`); the typed
//!   getters check them and name the setting and the file:line where it was set.
//!
//! Differences from Nix, all deliberate:
//! - Nix has no guard against include cycles (it recurses until the stack overflows); Ferry
//!   reports a cycle, and limits nesting to [`MAX_INCLUDE_DEPTH`].
//! - Unknown settings: Nix keeps the *first* value of a name it does not know (`emplace`) and
//!   never prints it. Ferry does not know Nix's full registry, so every name behaves like a
//!   known one: the last assignment wins.
//! - HEAD applies `experimental-features` lines of a file before the others; that changes only
//!   which settings are accepted, never the values read here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use thiserror::Error;

/// Deepest include nesting Ferry follows (Nix has no limit).
pub const MAX_INCLUDE_DEPTH: usize = 32;

/// Source name Nix uses for the `NIX_CONFIG` environment variable (`loadConfFile`).
pub const NIX_CONFIG_SOURCE: &str = "NIX_CONFIG";

/// Source name for values layered on top from the build hook's settings stream.
pub const HOOK_STREAM_SOURCE: &str = "the build hook's settings stream";

/// Reads files for includes, so tests and callers control the filesystem.
///
/// `Ok(None)` means the file does not exist (Nix: `ENOENT`, or `pathExists` false).
/// Any other error is an `Err`.
pub trait FileLoader {
    fn load(&self, path: &Path) -> io::Result<Option<String>>;
}

impl<F> FileLoader for F
where
    F: Fn(&Path) -> io::Result<Option<String>>,
{
    fn load(&self, path: &Path) -> io::Result<Option<String>> {
        self(path)
    }
}

/// The real filesystem. Invalid UTF-8 is replaced (Nix treats the file as bytes; only ASCII
/// is meaningful to either parser).
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl FileLoader for RealFs {
    fn load(&self, path: &Path) -> io::Result<Option<String>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// Seeded by the caller with [`NixConf::set_default`].
    Default,
    /// A line of a file (or of text such as `NIX_CONFIG`), 1-based.
    Line { source: String, line: usize },
    /// An override without a line, e.g. the hook's settings stream.
    Override { source: String },
}

impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provenance::Default => f.write_str("the default value"),
            Provenance::Line { source, line } => write!(f, "{source}:{line}"),
            Provenance::Override { source } => f.write_str(source),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NixConfError {
    #[error(
        "{file}:{line}: illegal configuration line '{text}': expected 'name = value' with '=' as a separate word"
    )]
    Syntax {
        file: String,
        line: usize,
        text: String,
    },
    #[error(
        "{file}:{line}: illegal configuration line '{text}': '{keyword}' takes exactly one path"
    )]
    BadInclude {
        file: String,
        line: usize,
        keyword: String,
        text: String,
    },
    #[error("file '{path}' included from {file}:{line} not found")]
    IncludeMissing {
        path: String,
        file: String,
        line: usize,
    },
    #[error("include cycle: '{path}' included from {file}:{line} is already being read")]
    IncludeCycle {
        path: String,
        file: String,
        line: usize,
    },
    #[error(
        "includes nested deeper than {MAX_INCLUDE_DEPTH} files at '{path}' included from {file}:{line}"
    )]
    IncludeTooDeep {
        path: String,
        file: String,
        line: usize,
    },
    #[error(
        "Boolean setting '{name}' has invalid value '{value}' (set at {at}); expected true, false, yes, no, 1 or 0"
    )]
    BadBool {
        name: String,
        value: String,
        at: Provenance,
    },
    #[error("setting '{name}' has invalid value '{value}' (set at {at}); expected {expected}")]
    BadInt {
        name: String,
        value: String,
        at: Provenance,
        expected: &'static str,
    },
}

/// Setting aliases of Nix 2.8 (`src/libstore/globals.hh`, the last constructor argument),
/// alias → canonical name. Still present in HEAD.
const ALIASES: &[(&str, &str)] = &[
    ("build-fallback", "fallback"),
    ("build-max-jobs", "max-jobs"),
    ("build-cores", "cores"),
    ("build-max-silent-time", "max-silent-time"),
    ("build-timeout", "timeout"),
    ("build-use-substitutes", "substitute"),
    ("build-impersonate-linux-26", "impersonate-linux-26"),
    ("build-keep-log", "keep-build-log"),
    ("build-compress-log", "compress-build-log"),
    ("build-max-log-size", "max-build-log-size"),
    ("gc-keep-outputs", "keep-outputs"),
    ("gc-keep-derivations", "keep-derivations"),
    ("env-keep-derivations", "keep-env-derivations"),
    ("build-use-chroot", "sandbox"),
    ("build-use-sandbox", "sandbox"),
    ("build-chroot-dirs", "sandbox-paths"),
    ("build-sandbox-paths", "sandbox-paths"),
    ("build-repeat", "repeat"),
    ("binary-cache-public-keys", "trusted-public-keys"),
    ("binary-caches", "substituters"),
    ("trusted-binary-caches", "trusted-substituters"),
];

/// Settings whose type is appendable (`isAppendable()` is true for `Strings`, `StringSet`,
/// `StringMap`, `PathSet`, `Paths` and the experimental-feature set) in Nix 2.8, plus
/// `impure-env` (a `StringMap`, 2.19). Only these take `extra-NAME`.
const APPENDABLE: &[&str] = &[
    "access-tokens",
    "allowed-impure-host-deps",
    "allowed-uris",
    "allowed-users",
    "experimental-features",
    "extra-platforms",
    "hashed-mirrors",
    "ignored-acls",
    "impure-env",
    "nix-path",
    "plugin-files",
    "sandbox-paths",
    "secret-key-files",
    "substituters",
    "system-features",
    "trusted-public-keys",
    "trusted-substituters",
    "trusted-users",
];

/// The canonical name for `name` (resolving Nix 2.8's aliases).
pub fn canonical_name(name: &str) -> &str {
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, canon)| canon)
}

/// Whether `extra-NAME` appends to `name` (a list-typed Nix setting).
pub fn is_appendable(name: &str) -> bool {
    APPENDABLE.contains(&canonical_name(name))
}

/// One setting's effective value and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingValue {
    /// The value as Nix would hold it before type conversion: words joined by single spaces.
    pub value: String,
    /// Where the last plain assignment came from; [`Provenance::Default`] when the base is
    /// the default (seeded, or treated as empty when only `extra-` lines set it).
    pub set_at: Provenance,
    /// Where each `extra-` appended since that assignment came from.
    pub appended_at: Vec<Provenance>,
}

impl SettingValue {
    /// The most recent place that changed this value (for error messages).
    pub fn last_changed_at(&self) -> &Provenance {
        self.appended_at.last().unwrap_or(&self.set_at)
    }
}

/// Parsed `nix.conf` settings: canonical setting name → value, with provenance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NixConf {
    settings: BTreeMap<String, SettingValue>,
    warnings: Vec<String>,
}

/// Splits on the characters Nix's `tokenizeString` uses by default (" \t\n\r").
fn tokens(line: &str) -> Vec<&str> {
    line.split([' ', '\t', '\n', '\r'])
        .filter(|t| !t.is_empty())
        .collect()
}

/// Lexical normalisation like Nix's `canonPath` without symlink resolution: drops `.`,
/// applies `..`, collapses repeated `/`.
pub fn normalize_path(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                // `..` at the root stays at the root, as in canonPath.
                if !out.pop() && !path.is_absolute() {
                    out.push("..");
                }
                if path.is_absolute() && out.as_os_str().is_empty() {
                    out.push("/");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

impl NixConf {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `text` as the contents of `source_path` (which is only used for messages and to
    /// resolve relative includes), reading includes through `loader`.
    pub fn parse(
        text: &str,
        source_path: &Path,
        loader: &dyn FileLoader,
    ) -> Result<Self, NixConfError> {
        let mut conf = NixConf::new();
        conf.apply_text(text, source_path, loader)?;
        Ok(conf)
    }

    /// Like Nix's `loadConfFile` for the daemon side: seeds the `builders` default
    /// (`@<conf_dir>/machines`, `src/libstore/globals.hh`), then applies `<conf_dir>/nix.conf` if
    /// it exists. `conf_dir` is `$NIX_CONF_DIR` or the build-time default (`/etc/nix`).
    /// User files and `NIX_CONFIG` are for the caller to layer on with [`NixConf::apply_file`]
    /// and [`NixConf::apply_text`]; the hook's settings stream with [`NixConf::apply_overrides`].
    pub fn load_system(conf_dir: &Path, loader: &dyn FileLoader) -> Result<Self, NixConfError> {
        let mut conf = NixConf::new();
        let machines = normalize_path(&conf_dir.join("machines"));
        conf.set_default("builders", &format!("@{}", machines.display()));
        conf.apply_file(&conf_dir.join("nix.conf"), loader)?;
        Ok(conf)
    }

    /// Applies a whole file like `applyConfigFile`: a missing or unreadable file is skipped
    /// (unreadable ones with a warning).
    pub fn apply_file(&mut self, path: &Path, loader: &dyn FileLoader) -> Result<(), NixConfError> {
        let path = normalize_path(path);
        match loader.load(&path) {
            Ok(Some(text)) => self.apply_text(&text, &path, loader),
            Ok(None) => Ok(()),
            Err(e) => {
                self.warnings
                    .push(format!("skipping '{}': {e}", path.display()));
                Ok(())
            }
        }
    }

    /// Applies configuration text, e.g. the `NIX_CONFIG` environment variable (pass
    /// [`NIX_CONFIG_SOURCE`] as `source`, so relative includes are relative to the current
    /// directory as in Nix).
    pub fn apply_text(
        &mut self,
        text: &str,
        source: &Path,
        loader: &dyn FileLoader,
    ) -> Result<(), NixConfError> {
        let mut stack = vec![normalize_path(source)];
        self.apply_inner(text, source, loader, &mut stack)
    }

    fn apply_inner(
        &mut self,
        text: &str,
        source: &Path,
        loader: &dyn FileLoader,
        stack: &mut Vec<PathBuf>,
    ) -> Result<(), NixConfError> {
        let file = source.display().to_string();
        for (idx, raw) in text.split('\n').enumerate() {
            let line_no = idx + 1;
            let line = raw.split('#').next().unwrap_or("");
            let toks = tokens(line);
            let Some(&first) = toks.first() else { continue };
            let syntax = || NixConfError::Syntax {
                file: file.clone(),
                line: line_no,
                text: line.trim().to_owned(),
            };
            if toks.len() < 2 {
                return Err(syntax());
            }
            if first == "include" || first == "!include" {
                let ignore_missing = first == "!include";
                let [_, target] = toks[..] else {
                    return Err(NixConfError::BadInclude {
                        file,
                        line: line_no,
                        keyword: first.to_owned(),
                        text: line.trim().to_owned(),
                    });
                };
                let dir = source.parent().unwrap_or(Path::new(""));
                let path = normalize_path(&dir.join(target));
                self.include(&path, ignore_missing, &file, line_no, loader, stack)?;
                continue;
            }
            if toks.get(1) != Some(&"=") {
                return Err(syntax());
            }
            let value = toks.get(2..).unwrap_or(&[]).join(" ");
            self.set(
                first,
                &value,
                Provenance::Line {
                    source: file.clone(),
                    line: line_no,
                },
            );
        }
        Ok(())
    }

    fn include(
        &mut self,
        path: &Path,
        ignore_missing: bool,
        file: &str,
        line: usize,
        loader: &dyn FileLoader,
        stack: &mut Vec<PathBuf>,
    ) -> Result<(), NixConfError> {
        let shown = || path.display().to_string();
        if stack.iter().any(|p| p == path) {
            return Err(NixConfError::IncludeCycle {
                path: shown(),
                file: file.to_owned(),
                line,
            });
        }
        if stack.len() > MAX_INCLUDE_DEPTH {
            return Err(NixConfError::IncludeTooDeep {
                path: shown(),
                file: file.to_owned(),
                line,
            });
        }
        match loader.load(path) {
            Ok(Some(text)) => {
                stack.push(path.to_path_buf());
                let r = self.apply_inner(&text, path, loader, stack);
                stack.pop();
                r
            }
            Ok(None) if ignore_missing => Ok(()),
            Ok(None) => Err(NixConfError::IncludeMissing {
                path: shown(),
                file: file.to_owned(),
                line,
            }),
            Err(e) => {
                // Nix: `pathExists` is true, `readFile` throws `SysError`, which is swallowed.
                self.warnings.push(format!(
                    "skipping '{}' included from {file}:{line}: {e}",
                    shown()
                ));
                Ok(())
            }
        }
    }

    /// Seeds a default value (Nix's compiled-in or computed default). Does nothing to a
    /// setting that was already assigned.
    pub fn set_default(&mut self, name: &str, value: &str) {
        let name = canonical_name(name).to_owned();
        self.settings.entry(name).or_insert_with(|| SettingValue {
            value: tokens(value).join(" "),
            set_at: Provenance::Default,
            appended_at: Vec::new(),
        });
    }

    /// `Config::set`: assigns `name`, or appends for `extra-NAME` of an appendable setting.
    pub fn set(&mut self, name: &str, value: &str, at: Provenance) {
        let value = tokens(value).join(" ");
        // The full name is looked up first: `extra-platforms` is a setting of its own (the only
        // one whose name starts with `extra-`, 2.8 and HEAD `globals.hh`), so
        // `extra-extra-platforms` appends to it.
        let append_to = name
            .strip_prefix("extra-")
            .filter(|_| name != "extra-platforms")
            .map(canonical_name);
        if let Some(base) = append_to {
            if is_appendable(base) {
                match self.settings.get_mut(base) {
                    Some(s) => {
                        if !value.is_empty() {
                            if !s.value.is_empty() {
                                s.value.push(' ');
                            }
                            s.value.push_str(&value);
                        }
                        s.appended_at.push(at);
                    }
                    None => {
                        // Appending to a default Ferry was not given: the default counts as
                        // empty, and `set_at` says the base value is the default.
                        self.settings.insert(
                            base.to_owned(),
                            SettingValue {
                                value,
                                set_at: Provenance::Default,
                                appended_at: vec![at],
                            },
                        );
                    }
                }
                return;
            }
            self.warnings.push(format!(
                "'{name}' (at {at}) does not append: '{base}' is not a list setting; \
                 Nix ignores it as an unknown setting"
            ));
        }
        self.settings.insert(
            canonical_name(name).to_owned(),
            SettingValue {
                value,
                set_at: at,
                appended_at: Vec::new(),
            },
        );
    }

    /// Layers settings on top, e.g. the build hook's settings stream (docs/hook-protocol.md §1.3:
    /// values there are effective values with `extra-*` already merged).
    pub fn apply_overrides<N: AsRef<str>, V: AsRef<str>>(&mut self, overrides: &[(N, V)]) {
        for (name, value) in overrides {
            self.set(
                name.as_ref(),
                value.as_ref(),
                Provenance::Override {
                    source: HOOK_STREAM_SOURCE.to_owned(),
                },
            );
        }
    }

    /// The value of a setting (canonical name or alias), words joined by single spaces.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.setting(name).map(|s| s.value.as_str())
    }

    /// The value with its provenance.
    pub fn setting(&self, name: &str) -> Option<&SettingValue> {
        self.settings.get(canonical_name(name))
    }

    /// Where the setting was last changed.
    pub fn provenance(&self, name: &str) -> Option<&Provenance> {
        self.setting(name).map(SettingValue::last_changed_at)
    }

    /// A list setting split on whitespace, in order (as `Setting<Strings>`).
    pub fn get_list(&self, name: &str) -> Option<Vec<&str>> {
        self.get(name).map(tokens)
    }

    /// A set setting (as `Setting<StringSet>`: sorted, duplicates removed).
    pub fn get_set(&self, name: &str) -> Option<BTreeSet<&str>> {
        self.get(name).map(|v| tokens(v).into_iter().collect())
    }

    /// A Boolean, as `BaseSetting<bool>::set` accepts it: `true`/`yes`/`1`, `false`/`no`/`0`.
    pub fn get_bool(&self, name: &str) -> Result<Option<bool>, NixConfError> {
        let Some(s) = self.setting(name) else {
            return Ok(None);
        };
        match s.value.as_str() {
            "true" | "yes" | "1" => Ok(Some(true)),
            "false" | "no" | "0" => Ok(Some(false)),
            other => Err(NixConfError::BadBool {
                name: canonical_name(name).to_owned(),
                value: other.to_owned(),
                at: s.last_changed_at().clone(),
            }),
        }
    }

    /// An unsigned integer (`BaseSetting<uint64_t>::set` via `string2Int`: decimal digits,
    /// an optional leading `+`, no sign otherwise).
    pub fn get_u64(&self, name: &str) -> Result<Option<u64>, NixConfError> {
        let Some(s) = self.setting(name) else {
            return Ok(None);
        };
        parse_u64(&s.value)
            .map(Some)
            .ok_or_else(|| NixConfError::BadInt {
                name: canonical_name(name).to_owned(),
                value: s.value.clone(),
                at: s.last_changed_at().clone(),
                expected: "an unsigned integer",
            })
    }

    /// `max-jobs`, which also accepts `auto` (`MaxBuildJobsSetting::set`: the number of CPUs,
    /// at least 1; pass it as `nr_cpus`).
    pub fn get_max_jobs(&self, nr_cpus: u64) -> Result<Option<u64>, NixConfError> {
        let Some(s) = self.setting("max-jobs") else {
            return Ok(None);
        };
        if s.value == "auto" {
            return Ok(Some(nr_cpus.max(1)));
        }
        parse_u64(&s.value)
            .map(Some)
            .ok_or_else(|| NixConfError::BadInt {
                name: "max-jobs".to_owned(),
                value: s.value.clone(),
                at: s.last_changed_at().clone(),
                expected: "'auto' or an unsigned integer",
            })
    }

    /// All settings, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &SettingValue)> {
        self.settings.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Things Nix skips silently or with a warning (unreadable includes, `extra-` of a
    /// non-list setting), for the caller to log.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// Decimal unsigned integer like boost's `lexical_cast` behind Nix's `string2Int`.
pub(crate) fn parse_u64(s: &str) -> Option<u64> {
    let digits = s.strip_prefix('+').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests;
