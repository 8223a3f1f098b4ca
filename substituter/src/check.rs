//! Validation of an upstream's narinfo before Ferry forwards it (docs/binary-cache.md §1.3, §5.1 rule 3).
//!
//! The text is parsed strictly with `ferry_nix::narinfo` (Nix's own parser rules), the
//! `StorePath` must have the requested hash part (Nix would print "asked '…' for '…' but got
//! '…'" and move on, `substitution-goal.cc`), and the signatures are checked against Nix's
//! `trusted-public-keys` as `ValidPathInfo::checkSignatures` does, counting a `CA:` path as
//! trusted like Nix. The text Ferry serves is the upstream's, byte for byte, except possibly
//! the unsigned `URL:` line ([`crate::paths::nar_route`]).

use crate::paths::{NarRoute, nar_route, rewrite_url_line};
use ferry_nix::narinfo::{NarInfo, NarInfoError};
use ferry_nix::signing::TrustedKeys;
use ferry_nix::store_path::StoreDir;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CheckError {
    #[error("narinfo is not UTF-8")]
    NotUtf8,
    #[error("invalid narinfo: {0}")]
    Parse(#[from] NarInfoError),
    #[error("asked for '{asked}' but got '{got}'")]
    WrongPath { asked: String, got: String },
}

/// A narinfo fit to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// What Ferry serves.
    pub body: String,
    /// Whether Nix would accept it (always true when no keys are known).
    pub trusted: bool,
    /// The NAR key Nix will ask Ferry for, when the NAR flows through Ferry.
    pub nar_key: Option<String>,
    /// What the file at `nar_key` must be, as far as the narinfo says.
    pub expect: Expect,
}

/// Size and SHA-256 of the NAR file as served (compressed or not), when the narinfo gives
/// them: `FileHash`/`FileSize`, or `NarHash`/`NarSize` for `Compression: none`. Nix never
/// checks `FileHash` on substitution (docs/binary-cache.md §1.3), but Ferry does before keeping a file on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expect {
    pub size: Option<u64>,
    pub sha256: Option<ferry_nix::hash::Hash>,
}

impl Expect {
    pub fn of(info: &NarInfo) -> Expect {
        let sha256 = |h: &ferry_nix::hash::Hash| {
            (h.algo() == ferry_nix::hash::HashAlgo::Sha256).then(|| h.clone())
        };
        // A missing or empty Compression means bzip2 (nar-info.cc), not none.
        if info.compression == "none" {
            Expect {
                size: Some(info.nar_size),
                sha256: sha256(&info.nar_hash),
            }
        } else {
            Expect {
                size: info.file_size,
                sha256: info.file_hash.as_ref().and_then(sha256),
            }
        }
    }
}

pub fn check_narinfo(
    store_dir: &StoreDir,
    hash_part: &str,
    bytes: &[u8],
    keys: &TrustedKeys,
    upstream_base: Option<&str>,
) -> Result<Checked, CheckError> {
    let text = std::str::from_utf8(bytes).map_err(|_| CheckError::NotUtf8)?;
    let info = NarInfo::parse(store_dir, text)?;
    if info.store_path.hash_part() != hash_part {
        return Err(CheckError::WrongPath {
            asked: hash_part.to_owned(),
            got: store_dir.display(&info.store_path),
        });
    }
    let trusted = keys.is_empty() || info.ca.is_some() || info.is_trusted(store_dir, keys)?;
    let (body, nar_key) = match nar_route(&info.url, upstream_base) {
        NarRoute::Relative { key, rewritten } => {
            let body = if rewritten {
                rewrite_url_line(text, &key)
            } else {
                text.to_owned()
            };
            (body, Some(key))
        }
        NarRoute::Absolute => (text.to_owned(), None),
    };
    Ok(Checked {
        body,
        trusted,
        nar_key,
        expect: Expect::of(&info),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_nix::hash::Hash;
    use ferry_nix::signing::SecretKey;

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").expect("store dir")
    }

    const PATH: &str = "/nix/store/0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig-hello";

    fn signed_text(key: &SecretKey) -> String {
        let unsigned = format!(
            "StorePath: {PATH}\nURL: nar/abc.nar.xz\nCompression: xz\nNarHash: {}\nNarSize: 120\nReferences: \nUnknown: x\n",
            Hash::sha256_of(b"nar").to_nix32_prefixed()
        );
        let mut info = NarInfo::parse(&sd(), &unsigned).expect("parse");
        info.sign(&sd(), key).expect("sign");
        let sig = info.sigs.iter().next().expect("one sig").to_string();
        format!("{unsigned}Sig: {sig}\n")
    }

    #[test]
    fn accepts_a_signed_narinfo_byte_for_byte() {
        let key = SecretKey::from_seed("cache-1", [3; 32]).expect("key");
        let mut keys = TrustedKeys::new();
        keys.insert(key.to_public());
        let text = signed_text(&key);
        let c = check_narinfo(
            &sd(),
            "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig",
            text.as_bytes(),
            &keys,
            None,
        )
        .expect("valid");
        assert!(c.trusted);
        assert_eq!(c.body, text, "unknown keys and Sig lines are kept");
        assert_eq!(c.nar_key.as_deref(), Some("nar/abc.nar.xz"));
        // xz without FileHash/FileSize: nothing to check but the length.
        assert_eq!(c.expect, Expect::default());
    }

    #[test]
    fn untrusted_when_signed_by_another_key_or_unsigned() {
        let key = SecretKey::from_seed("cache-1", [3; 32]).expect("key");
        let other = SecretKey::from_seed("cache-1", [4; 32]).expect("key");
        let mut keys = TrustedKeys::new();
        keys.insert(other.to_public());
        let c = check_narinfo(
            &sd(),
            "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig",
            signed_text(&key).as_bytes(),
            &keys,
            None,
        )
        .expect("valid");
        assert!(!c.trusted);
        // With no keys known, everything counts as trusted.
        let c = check_narinfo(
            &sd(),
            "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig",
            signed_text(&key).as_bytes(),
            &TrustedKeys::new(),
            None,
        )
        .expect("valid");
        assert!(c.trusted);
    }

    #[test]
    fn rejects_wrong_path_garbage_and_missing_fields() {
        let key = SecretKey::from_seed("cache-1", [3; 32]).expect("key");
        let k = TrustedKeys::new();
        let e = check_narinfo(
            &sd(),
            "1c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig",
            signed_text(&key).as_bytes(),
            &k,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, CheckError::WrongPath { .. }), "{e}");
        for garbage in [
            &b"<html><body>Please log in</body></html>\n"[..],
            b"StorePath: /nix/store/0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig-hello\n",
            b"\xff\xfe",
            b"",
        ] {
            assert!(
                check_narinfo(&sd(), "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig", garbage, &k, None)
                    .is_err(),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn absolute_url_on_the_upstream_is_rewritten_relative() {
        let text = format!(
            "StorePath: {PATH}\nURL: http://up:8080/nar/abc.nar\nNarHash: {}\nNarSize: 120\n",
            Hash::sha256_of(b"nar").to_nix32_prefixed()
        );
        let c = check_narinfo(
            &sd(),
            "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig",
            text.as_bytes(),
            &TrustedKeys::new(),
            Some("http://up:8080"),
        )
        .expect("valid");
        assert!(c.body.contains("\nURL: nar/abc.nar\n"));
        assert_eq!(c.nar_key.as_deref(), Some("nar/abc.nar"));
        // No Compression line means bzip2: NarHash says nothing about the file.
        assert_eq!(c.expect, Expect::default());
        let none = text.replace("NarSize", "Compression: none\nNarSize");
        let c = check_narinfo(
            &sd(),
            "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig",
            none.as_bytes(),
            &TrustedKeys::new(),
            None,
        )
        .expect("valid");
        assert_eq!(c.expect.size, Some(120));
        assert_eq!(c.expect.sha256, Some(Hash::sha256_of(b"nar")));
    }
}
