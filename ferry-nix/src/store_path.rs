//! Store paths and the store directory.
//!
//! Follows `src/libstore/path.cc` (`StorePath::StorePath`, `checkName`) and
//! `src/libstore/store-api.cc` (`Store::parseStorePath`). The store directory is always a
//! value ([`StoreDir`]): Ferry never assumes `/nix/store`.

use crate::hash::{HashError, nix32_decode, nix32_encode};
use thiserror::Error;

/// Length of the hash part of a store path: 20 bytes in Nix base-32.
pub const HASH_PART_LEN: usize = 32;
/// Longest name Nix accepts (`checkName`: 211 bytes).
pub const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("store directory '{0}' must be an absolute path without a trailing '/'")]
    BadStoreDir(String),
    #[error("path '{path}' is not in the store directory '{store_dir}'")]
    NotInStore { path: String, store_dir: String },
    #[error(
        "store path '{0}' has a '/' after its name (a path inside a store object, not a store path)"
    )]
    SubPath(String),
    #[error("store path base name '{0}' is too short: need 32 hash characters, '-' and a name")]
    TooShort(String),
    #[error("store path base name '{0}' lacks the '-' after its 32-character hash part")]
    MissingDash(String),
    #[error("store path base name '{0}' has a non-ASCII character in its 32-character hash part")]
    NonAsciiHash(String),
    #[error("invalid hash part in store path '{path}': {source}")]
    BadHash { path: String, source: HashError },
    #[error("store path name in '{path}' is {len} bytes long, the limit is {MAX_NAME_LEN}")]
    NameTooLong { path: String, len: usize },
    #[error("store path name in '{path}' has the forbidden character {ch:?} at offset {offset}")]
    BadNameChar {
        path: String,
        ch: char,
        offset: usize,
    },
    #[error("store path name in '{0}' must not be '.', '..' or start with '.-' or '..-'")]
    DotName(String),
}

/// The store directory, `/nix/store` on most systems.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl StoreDir {
    pub fn new(dir: impl Into<String>) -> Result<Self, StorePathError> {
        let dir = dir.into();
        if !dir.starts_with('/') || (dir.len() > 1 && dir.ends_with('/')) || dir.contains('\0') {
            return Err(StorePathError::BadStoreDir(dir));
        }
        Ok(StoreDir(dir))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What follows `<store dir>/` in `path`.
    fn below<'a>(&self, path: &'a str) -> Result<&'a str, StorePathError> {
        path.strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: path.to_owned(),
                store_dir: self.0.clone(),
            })
    }

    /// Parses an absolute store path such as `/nix/store/<hash>-<name>`.
    pub fn parse(&self, path: &str) -> Result<StorePath, StorePathError> {
        let rest = self.below(path)?;
        if rest.contains('/') {
            return Err(StorePathError::SubPath(path.to_owned()));
        }
        StorePath::from_base_name(rest)
    }

    /// Like [`StoreDir::parse`], but accepts a path inside a store object and returns the
    /// store path together with the rest (`/bin/sh` of `/nix/store/…-bash/bin/sh`).
    pub fn parse_with_subpath<'a>(
        &self,
        path: &'a str,
    ) -> Result<(StorePath, &'a str), StorePathError> {
        let rest = self.below(path)?;
        let (base, sub) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        Ok((StorePath::from_base_name(base)?, sub))
    }

    /// The absolute path of `p` in this store.
    pub fn display(&self, p: &StorePath) -> String {
        format!("{}/{}", self.0, p)
    }
}

impl std::fmt::Display for StoreDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A store path without its directory: a 20-byte hash and a name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    // Ordered by the printed base name, like Nix's `std::set<StorePath>` (the hash part
    // in base-32 first). Keep `base` as the first field so derived Ord matches.
    base: String,
    digest: [u8; 20],
}

impl std::fmt::Debug for StorePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StorePath({})", self.base)
    }
}

impl std::fmt::Display for StorePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base)
    }
}

/// Checks a store path name by `checkName` in `src/libstore/path.cc`.
pub fn check_name(name: &str, whole: &str) -> Result<(), StorePathError> {
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong {
            path: whole.to_owned(),
            len: name.len(),
        });
    }
    if name.is_empty() {
        return Err(StorePathError::TooShort(whole.to_owned()));
    }
    // Nix ≥ 2.15 rejects these, so a path with such a name could not be copied to a newer store.
    if name == "." || name == ".." || name.starts_with(".-") || name.starts_with("..-") {
        return Err(StorePathError::DotName(whole.to_owned()));
    }
    for (offset, ch) in name.char_indices() {
        let ok = ch.is_ascii_alphanumeric() || "+-._?=".contains(ch);
        if !ok {
            return Err(StorePathError::BadNameChar {
                path: whole.to_owned(),
                ch,
                offset,
            });
        }
    }
    Ok(())
}

impl StorePath {
    /// Parses `<hash>-<name>`, the base name of a store path.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        if base.len() < HASH_PART_LEN + 2 {
            return Err(StorePathError::TooShort(base.to_owned()));
        }
        // A non-ASCII character across byte 32 is not a char boundary: `split_at` would panic
        // on it, and such a hash part is invalid anyway (nix32 is ASCII).
        let Some((hash, rest)) = base.split_at_checked(HASH_PART_LEN) else {
            return Err(StorePathError::NonAsciiHash(base.to_owned()));
        };
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::MissingDash(base.to_owned()))?;
        let digest = nix32_decode(hash, 20).map_err(|source| StorePathError::BadHash {
            path: base.to_owned(),
            source,
        })?;
        check_name(name, base)?;
        let mut d = [0u8; 20];
        d.copy_from_slice(&digest);
        Ok(StorePath {
            base: base.to_owned(),
            digest: d,
        })
    }

    /// Builds a store path from its digest and name (after the caller computed the digest).
    pub fn from_parts(digest: [u8; 20], name: &str) -> Result<Self, StorePathError> {
        let base = format!("{}-{}", nix32_encode(&digest), name);
        check_name(name, &base)?;
        Ok(StorePath { base, digest })
    }

    /// The 32-character hash part: the key of `<hash>.narinfo` in a binary cache.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_PART_LEN]
    }

    pub fn digest(&self) -> &[u8; 20] {
        &self.digest
    }

    pub fn name(&self) -> &str {
        &self.base[HASH_PART_LEN + 1..]
    }

    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }

    /// The base name, `<hash>-<name>`.
    pub fn as_str(&self) -> &str {
        &self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSYBOX: &str = "ap5lw0pkyvrc3bbxz5qq1fs0yn7xm1n0-busybox";

    /// Found by fuzzing: a multi-byte character straddling byte 32 of a base name (from a
    /// narinfo `References:` line or a builder's reply) panicked in `split_at`.
    #[test]
    fn non_ascii_across_the_hash_part_is_an_error_not_a_panic() {
        for base in [
            "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0i\u{e9}x-name",
            "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0\u{e9}-name",
            "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}-x",
        ] {
            let e = StorePath::from_base_name(base).expect_err(base);
            assert!(e.to_string().contains(base), "{e}");
            let sd = StoreDir::new("/nix/store").expect("dir");
            assert!(sd.parse(&format!("/nix/store/{base}")).is_err());
        }
    }

    #[test]
    fn parses_with_any_store_dir() {
        for dir in ["/nix/store", "/tmp/x/store", "/gnu/store"] {
            let sd = StoreDir::new(dir).expect("dir");
            let p = sd.parse(&format!("{dir}/{BUSYBOX}")).expect("path");
            assert_eq!(p.hash_part(), "ap5lw0pkyvrc3bbxz5qq1fs0yn7xm1n0");
            assert_eq!(p.name(), "busybox");
            assert_eq!(sd.display(&p), format!("{dir}/{BUSYBOX}"));
            let full = format!("{dir}/{BUSYBOX}/bin/sh");
            let (q, sub) = sd.parse_with_subpath(&full).expect("subpath");
            assert_eq!((q, sub), (p, "/bin/sh"));
        }
    }

    #[test]
    fn from_parts_round_trips() {
        let p = StorePath::from_base_name(BUSYBOX).expect("parse");
        let q = StorePath::from_parts(*p.digest(), p.name()).expect("parts");
        assert_eq!(p, q);
    }

    #[test]
    fn errors_name_the_problem() {
        let sd = StoreDir::new("/nix/store").expect("dir");
        assert!(matches!(
            sd.parse(&format!("/nix/stor/{BUSYBOX}")),
            Err(StorePathError::NotInStore { .. })
        ));
        assert!(matches!(
            sd.parse(&format!("/nix/store/{BUSYBOX}/bin")),
            Err(StorePathError::SubPath(_))
        ));
        assert!(matches!(
            StorePath::from_base_name("abc"),
            Err(StorePathError::TooShort(_))
        ));
        assert!(matches!(
            StorePath::from_base_name("ap5lw0pkyvrc3bbxz5qq1fs0yn7xm1n0_busybox"),
            Err(StorePathError::MissingDash(_))
        ));
        let e = StorePath::from_base_name("ap5lw0pkyvrc3bbxz5qq1fs0yn7xm1ne-busybox").unwrap_err();
        assert!(e.to_string().contains("offset 31"), "{e}");
        let e = StorePath::from_base_name("ap5lw0pkyvrc3bbxz5qq1fs0yn7xm1n0-bus box").unwrap_err();
        assert_eq!(
            e,
            StorePathError::BadNameChar {
                path: "ap5lw0pkyvrc3bbxz5qq1fs0yn7xm1n0-bus box".into(),
                ch: ' ',
                offset: 3
            }
        );
        let long = format!("ap5lw0pkyvrc3bbxz5qq1fs0yn7xm1n0-{}", "a".repeat(212));
        assert!(matches!(
            StorePath::from_base_name(&long),
            Err(StorePathError::NameTooLong { len: 212, .. })
        ));
        assert!(matches!(
            StorePath::from_base_name("ap5lw0pkyvrc3bbxz5qq1fs0yn7xm1n0-.."),
            Err(StorePathError::DotName(_))
        ));
        assert!(StoreDir::new("nix/store").is_err());
        assert!(StoreDir::new("/nix/store/").is_err());
    }
}
