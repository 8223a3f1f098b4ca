//! Validation of an upstream's narinfo before Ferry forwards it (docs/binary-cache.md §1.3, §5.1 rule 3).
//!
//! The text is parsed strictly with `ferry_nix::narinfo` (Nix's own parser rules), the
//! `StorePath` must have the requested hash part (Nix would print "asked '…' for '…' but got
//! '…'" and move on, `substitution-goal.cc`), and the signatures are checked against Nix's
//! `trusted-public-keys` as `ValidPathInfo::checkSignatures` does, counting a `CA:` path as
//! trusted like Nix only once its store path is recomputed from the content address
//! ([`crate::ca`]). The text Ferry serves is the upstream's, byte for byte, except possibly
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
    #[error("narinfo field {field} is {len} bytes long, more than the {max} Ferry accepts")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// Longest `URL:` Ferry accepts. Nix writes `nar/<52-character FileHash>.nar.<ext>` (under 80
/// bytes); other servers' forms (harmonia's `?hash=`, snix's base64 root nodes, presigned
/// object-storage URLs) stay well under this. The URL becomes a route key kept in memory for
/// 30 days, so it must be small (issue 12 item 4).
pub(crate) const MAX_URL: usize = 4096;

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
    pub(crate) expect: Expect,
}

/// Size and SHA-256 of the NAR file as served (compressed or not), when the narinfo gives
/// them: `FileHash`/`FileSize`, or `NarHash`/`NarSize` for `Compression: none`. Nix never
/// checks `FileHash` on substitution (docs/binary-cache.md §1.3), but Ferry does before keeping a file on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Expect {
    pub(crate) size: Option<u64>,
    pub(crate) sha256: Option<ferry_nix::hash::Hash>,
}

impl Expect {
    pub(crate) fn of(info: &NarInfo) -> Expect {
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
    require_sigs: bool,
    upstream_base: Option<&str>,
) -> Result<Checked, CheckError> {
    let text = std::str::from_utf8(bytes).map_err(|_| CheckError::NotUtf8)?;
    let info = NarInfo::parse(store_dir, text)?;
    if info.url.len() > MAX_URL {
        return Err(CheckError::FieldTooLong {
            field: "URL",
            len: info.url.len(),
            max: MAX_URL,
        });
    }
    if info.store_path.hash_part() != hash_part {
        return Err(CheckError::WrongPath {
            asked: hash_part.to_owned(),
            got: store_dir.display(&info.store_path),
        });
    }
    // As `checkSignatures`: a true content address, else a valid signature by a trusted key;
    // with `require-sigs = false` Nix takes anything
    // (https://github.com/NixOS/nix/blob/2.8.0/src/libstore/build/substitution-goal.cc#L112-L121).
    let trusted = !require_sigs
        || crate::ca::is_content_addressed(store_dir, &info)
        || info.is_trusted(store_dir, keys)?;
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
    /// The hash part of [`PATH`].
    const HASH: &str = "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig";

    /// `check_narinfo` in the store `/nix/store`, for a narinfo from a relative-URL upstream.
    fn check(
        hash_part: &str,
        text: impl AsRef<[u8]>,
        keys: &TrustedKeys,
        require_sigs: bool,
    ) -> Result<Checked, CheckError> {
        check_narinfo(&sd(), hash_part, text.as_ref(), keys, require_sigs, None)
    }

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
        let c = check(HASH, &text, &keys, true).expect("valid");
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
        let c = check(HASH, signed_text(&key), &keys, true).expect("valid");
        assert!(!c.trusted);
        // With no keys, nothing signed is trusted (issue 12 item 3: it used to be everything)...
        let c = check(HASH, signed_text(&key), &TrustedKeys::new(), true).expect("valid");
        assert!(!c.trusted);
        // ...unless Nix runs with `require-sigs = false`.
        let c = check(HASH, signed_text(&key), &TrustedKeys::new(), false).expect("valid");
        assert!(c.trusted);
    }

    /// Issue 12 item 1: an unsigned narinfo with a made-up `CA:` counted as trusted; a true
    /// content address still needs no signature.
    #[test]
    fn a_content_address_counts_only_when_it_names_the_path() {
        let keys = TrustedKeys::new();
        let made_up = format!(
            "StorePath: {PATH}\nURL: nar/abc.nar\nCompression: none\nNarHash: {h}\nNarSize: 120\nReferences: \nCA: fixed:r:{h}\n",
            h = Hash::sha256_of(b"nar").to_nix32_prefixed()
        );
        let c = check(HASH, made_up, &keys, true).expect("valid");
        assert!(!c.trusted, "a made-up CA is not a signature");
        // `nix path-info --json` of a real source path (Nix 2.8, ferry-nix golden files).
        let real = "StorePath: /nix/store/04m350imlv7hf9pd6b84wj34d7f4hl0r-hello.txt\nURL: nar/x.nar\nCompression: none\nNarHash: sha256-z20dFjm4uZTxhhKwVeaqOWpRKO5etQZQrjcW1wxvUWY=\nNarSize: 128\nReferences: \nCA: fixed:r:sha256:0rjidw6df5ipmr80ddayxql52sirmbk5bc0jhvqr9fdq74b1svfg\n";
        let c = check("04m350imlv7hf9pd6b84wj34d7f4hl0r", real, &keys, true).expect("valid");
        assert!(c.trusted);
    }

    #[test]
    fn rejects_wrong_path_garbage_and_missing_fields() {
        let key = SecretKey::from_seed("cache-1", [3; 32]).expect("key");
        let k = TrustedKeys::new();
        let e = check(
            "1c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig",
            signed_text(&key),
            &k,
            true,
        )
        .unwrap_err();
        assert!(matches!(e, CheckError::WrongPath { .. }), "{e}");
        for garbage in [
            &b"<html><body>Please log in</body></html>\n"[..],
            b"StorePath: /nix/store/0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig-hello\n",
            b"\xff\xfe",
            b"",
        ] {
            assert!(check(HASH, garbage, &k, true).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn an_overlong_url_is_refused() {
        let text = |len: usize| {
            format!(
                "StorePath: {PATH}\nURL: nar/{}\nNarHash: {}\nNarSize: 120\n",
                "a".repeat(len),
                Hash::sha256_of(b"nar").to_nix32_prefixed()
            )
        };
        let check_len = |len: usize| check(HASH, text(len), &TrustedKeys::new(), false);
        assert!(check_len(MAX_URL - 4).is_ok());
        assert!(matches!(
            check_len(MAX_URL),
            Err(CheckError::FieldTooLong { field: "URL", .. })
        ));
    }

    #[test]
    fn absolute_url_on_the_upstream_is_rewritten_relative() {
        let text = format!(
            "StorePath: {PATH}\nURL: http://up:8080/nar/abc.nar\nNarHash: {}\nNarSize: 120\n",
            Hash::sha256_of(b"nar").to_nix32_prefixed()
        );
        let c = check_narinfo(
            &sd(),
            HASH,
            text.as_bytes(),
            &TrustedKeys::new(),
            true,
            Some("http://up:8080"),
        )
        .expect("valid");
        assert!(c.body.contains("\nURL: nar/abc.nar\n"));
        assert_eq!(c.nar_key.as_deref(), Some("nar/abc.nar"));
        // No Compression line means bzip2: NarHash says nothing about the file.
        assert_eq!(c.expect, Expect::default());
        let none = text.replace("NarSize", "Compression: none\nNarSize");
        let c = check(HASH, none, &TrustedKeys::new(), true).expect("valid");
        assert_eq!(c.expect.size, Some(120));
        assert_eq!(c.expect.sha256, Some(Hash::sha256_of(b"nar")));
    }
}
