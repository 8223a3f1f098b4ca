//! Ferry's own configuration file, `/etc/ferry/ferry.toml` (overridable with `FERRY_CONFIG`).
//!
//! One file, one section per binary (`[build-hook]`, `[post-build]`, `[substituter]`). Each
//! binary reads only its own section, with `deny_unknown_fields` on its own types, so a typo in
//! a key is an error that names the file and line, while the other binaries' sections are left
//! to them. A missing file means "all defaults": Ferry works with no configuration at all.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Where the configuration lives unless `FERRY_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/ferry/ferry.toml";

/// The sections Ferry knows; any other top-level key is a typo.
pub const SECTIONS: &[&str] = &["build-hook", "post-build", "substituter"];

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
}

/// The configuration path: `FERRY_CONFIG` if set, else [`DEFAULT_PATH`].
pub fn path_from_env() -> PathBuf {
    std::env::var_os("FERRY_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Parses `text` (read from `path`) and returns section `name`, or `T::default()` when the
/// section is absent. Unknown sections and unknown keys are errors naming the line.
pub fn parse_section<T: DeserializeOwned + Default>(
    text: &str,
    path: &Path,
    name: &str,
) -> Result<T, ConfigError> {
    let invalid = |line: Option<usize>, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        line,
        message,
    };
    let de = toml::de::Deserializer::parse(text).map_err(|e| {
        invalid(
            e.span().map(|s| line_of(text, s.start)),
            e.message().to_owned(),
        )
    })?;
    // Walk the top-level table with toml's own deserializer, so errors inside the section
    // carry spans within the real file.
    let unknown = std::cell::Cell::new(None);
    let seed = SectionSeed::<T> {
        name,
        unknown: &unknown,
        _t: std::marker::PhantomData,
    };
    let found = serde::de::DeserializeSeed::deserialize(seed, de).map_err(|e| {
        // An unknown section is reported at its key, not at the document.
        let at = unknown.take().or(e.span().map(|s| s.start));
        invalid(at.map(|o| line_of(text, o)), e.message().to_owned())
    })?;
    Ok(found.unwrap_or_default())
}

struct SectionSeed<'n, T> {
    name: &'n str,
    unknown: &'n std::cell::Cell<Option<usize>>,
    _t: std::marker::PhantomData<T>,
}

impl<'de, T: DeserializeOwned> serde::de::DeserializeSeed<'de> for SectionSeed<'_, T> {
    type Value = Option<T>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: DeserializeOwned> serde::de::Visitor<'de> for SectionSeed<'_, T> {
    type Value = Option<T>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a table of Ferry sections")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        let mut found = None;
        while let Some(spanned) = map.next_key::<toml::Spanned<String>>()? {
            let key = spanned.get_ref();
            if key == self.name {
                found = Some(map.next_value::<T>()?);
            } else if SECTIONS.contains(&key.as_str()) {
                map.next_value::<serde::de::IgnoredAny>()?;
            } else {
                self.unknown.set(Some(spanned.span().start));
                return Err(serde::de::Error::custom(format!(
                    "unknown section '{key}' (known: {})",
                    SECTIONS.join(", ")
                )));
            }
        }
        Ok(found)
    }
}

/// Loads section `name` of the file at `path`; a missing file gives the defaults.
pub fn load_section<T: DeserializeOwned + Default>(
    path: &Path,
    name: &str,
) -> Result<T, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_section(&text, path, name),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(ConfigError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Hook {
        #[serde(default)]
        probe_timeout_ms: u64,
        #[serde(default)]
        prefer_remote: bool,
    }

    const FILE: &str = "\
# Ferry
[build-hook]
probe-timeout-ms = 800
prefer-remote = true

[substituter]
anything = \"for the substituter to check\"
";

    #[test]
    fn reads_its_own_section_and_ignores_the_others() {
        let p = Path::new("/etc/ferry/ferry.toml");
        let h: Hook = parse_section(FILE, p, "build-hook").expect("parse");
        assert_eq!(
            h,
            Hook {
                probe_timeout_ms: 800,
                prefer_remote: true
            }
        );
        let d: Hook = parse_section(FILE, p, "post-build").expect("absent section");
        assert_eq!(d, Hook::default());
    }

    #[test]
    fn missing_file_gives_defaults() {
        let h: Hook = load_section(Path::new("/nonexistent/ferry.toml"), "build-hook").expect("ok");
        assert_eq!(h, Hook::default());
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let text = "[substituter]\nx = 1\n\n[build-hook]\nprobe-timeout-ms = 5\nprobe-timeut = 3\n";
        let e = parse_section::<Hook>(text, Path::new("/x/ferry.toml"), "build-hook").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/x/ferry.toml line 6:"), "{msg}");
        assert!(msg.contains("probe-timeut"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_line() {
        let text = "[build-hook]\nprobe-timeout-ms = \"fast\"\n";
        let e = parse_section::<Hook>(text, Path::new("f.toml"), "build-hook").unwrap_err();
        assert!(e.to_string().starts_with("f.toml line 2:"), "{e}");
    }

    #[test]
    fn unknown_section_and_syntax_errors_name_the_line() {
        let e = parse_section::<Hook>("\n[buildhook]\n", Path::new("f.toml"), "build-hook")
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("f.toml line 2: unknown section 'buildhook'"),
            "{e}"
        );
        let e = parse_section::<Hook>(
            "[build-hook]\nprobe-timeout-ms = \n",
            Path::new("f.toml"),
            "build-hook",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("f.toml line 2:"), "{e}");
    }
}
