//! narinfo files (`<hash>.narinfo`) and `nix-cache-info` of a binary cache.
//!
//! Follows `src/libstore/nar-info.cc` (`NarInfo::NarInfo`, `NarInfo::to_string`), the
//! fingerprint of `ValidPathInfo::fingerprint` (`src/libstore/store-api.cc` in Nix 2.8,
//! `path-info.cc` later) and `BinaryCacheStore::init` (`src/libstore/binary-cache-store.cc`).
//!
//! A narinfo holds four kinds of information: where the file is (`URL`, `Compression`,
//! `FileHash`, `FileSize`), what the NAR is (`NarHash`, `NarSize`), the path's metadata
//! (`StorePath`, `References`, `Deriver`, `CA`, `System`) and signatures (`Sig`). Only
//! `StorePath`, `NarHash`, `NarSize` and `References` are signed.
//!
//! Parsing follows Nix's rules, with these documented choices:
//! - Each line is `Key: value\n`. Nix splits at the first ':' and skips one character; Ferry
//!   requires that character to be a space, and names the line when it is not.
//! - Repeated keys behave as in Nix: `StorePath`, `URL`, `Compression`, `FileHash`,
//!   `FileSize`, `NarHash`, `NarSize`, `Deriver` and `System`: the later line wins; `Sig`
//!   lines accumulate (a set, sorted and without duplicates); a second `References` after a
//!   non-empty one, or a second `CA` after a non-empty one, is an error.
//! - Unknown keys are ignored and not kept, as in every Nix version: they are not signed and
//!   Nix would not write them back. `System` (written by Nix ≤ 2.9) is kept so narinfos from
//!   those versions re-render byte for byte.
//! - `Sig` values are parsed strictly (name, base-64, 64 bytes) as current Nix does; 2.8 kept
//!   them as opaque strings.
//! - `CA` is checked for the forms Nix accepts (`text:sha256:<hash>`,
//!   `fixed:[r:]<algo>:<hash>`) but kept as written; Nix would re-render its hash in base-32.
//! - Sizes are plain decimal digits (Nix's `boost::lexical_cast` also takes a leading '+').

use std::collections::BTreeSet;

use crate::hash::{Hash, HashAlgo, HashError, nix32_decode, nix32_len};
use crate::signing::{PublicKey, SecretKey, Signature, SigningError, TrustedKeys};
use crate::store_path::{StoreDir, StorePath, StorePathError};
use base64::Engine as _;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NarInfoError {
    #[error("narinfo line {line} does not end with '\\n'")]
    MissingNewline { line: usize },
    #[error("narinfo line {line} is not 'Key: value' (no ': ' found)")]
    NoColon { line: usize },
    #[error("narinfo line {line}, field {field}: {source}")]
    BadStorePath {
        line: usize,
        field: &'static str,
        source: StorePathError,
    },
    #[error("narinfo line {line}, field {field}: {source}")]
    BadHash {
        line: usize,
        field: &'static str,
        source: HashError,
    },
    #[error("narinfo line {line}, field {field}: {value:?} is not a decimal size")]
    BadNumber {
        line: usize,
        field: &'static str,
        value: String,
    },
    #[error("narinfo line {line}, field Sig: {source}")]
    BadSignature { line: usize, source: SigningError },
    #[error("narinfo line {line}, field CA: {value:?} is not a content address: {reason}")]
    BadCa {
        line: usize,
        value: String,
        reason: &'static str,
    },
    #[error("narinfo line {line}: field {field} appears a second time")]
    Duplicate { line: usize, field: &'static str },
    #[error("narinfo has no {0} field")]
    Missing(&'static str),
    #[error("narinfo has NarSize 0 (Nix treats it as missing)")]
    ZeroNarSize,
    #[error("cannot fingerprint '{path}': its NarSize is 0 (unknown)")]
    FingerprintZeroSize { path: String },
    #[error("cannot fingerprint '{path}': its NarHash is {algo}, signatures need sha256")]
    FingerprintNotSha256 { path: String, algo: &'static str },
    #[error("nix-cache-info line {line}, field {field}: {value:?} {reason}")]
    BadCacheInfo {
        line: usize,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// The compression Nix assumes when `Compression` is missing or empty.
pub const DEFAULT_COMPRESSION: &str = "bzip2";

/// A parsed narinfo. Field order follows the file Nix writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Location of the (compressed) NAR, relative to the cache or absolute; opaque.
    pub url: String,
    /// `xz`, `zstd`, `none`, …; `bzip2` when the file has none.
    pub compression: String,
    pub file_hash: Option<Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// Sorted by base name, like Nix's `StorePathSet`; may contain the path itself.
    pub references: BTreeSet<StorePath>,
    /// `None` for a missing field or `unknown-deriver`.
    pub deriver: Option<StorePath>,
    /// Written by Nix ≤ 2.9 only.
    pub system: Option<String>,
    /// Sorted by text, like Nix's `std::set<std::string>`: the order of the `Sig:` lines.
    pub sigs: BTreeSet<Signature>,
    /// Content address as written, e.g. `fixed:r:sha256:<nix32>`.
    pub ca: Option<String>,
}

/// The fingerprint Nix signs (`ValidPathInfo::fingerprint`):
/// `1;<store path>;sha256:<nix32 nar hash>;<nar size>;<sorted full reference paths, comma-joined>`.
pub fn fingerprint<'a>(
    store_dir: &StoreDir,
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: impl IntoIterator<Item = &'a StorePath>,
) -> Result<String, NarInfoError> {
    let full = store_dir.display(path);
    if nar_size == 0 {
        return Err(NarInfoError::FingerprintZeroSize { path: full });
    }
    if nar_hash.algo() != HashAlgo::Sha256 {
        return Err(NarInfoError::FingerprintNotSha256 {
            path: full,
            algo: nar_hash.algo().name(),
        });
    }
    // Sorted and deduplicated whatever the caller passes, as a `StorePathSet` would be.
    let refs: BTreeSet<&StorePath> = references.into_iter().collect();
    let refs: Vec<String> = refs.into_iter().map(|r| store_dir.display(r)).collect();
    Ok(format!(
        "1;{full};{};{nar_size};{}",
        nar_hash.to_nix32_prefixed(),
        refs.join(",")
    ))
}

/// Decimal digits only, as a u64.
fn parse_size(line: usize, field: &'static str, value: &str) -> Result<u64, NarInfoError> {
    let bad = || NarInfoError::BadNumber {
        line,
        field,
        value: value.to_owned(),
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse().map_err(|_| bad())
}

/// Checks a hash body of `size` bytes in base-16, Nix base-32 or base-64 (by length, as
/// `Hash::parseNonSRIUnprefixed`), for algorithms `Hash` does not model (md5, sha1).
fn check_hash_body(body: &str, size: usize) -> bool {
    if body.len() == size * 2 {
        body.bytes().all(|b| b.is_ascii_hexdigit())
    } else if body.len() == nix32_len(size) {
        nix32_decode(body, size).is_ok()
    } else if body.len() == size.div_ceil(3) * 4 {
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .is_ok_and(|b| b.len() == size)
    } else {
        false
    }
}

/// Validates a content address as `parseContentAddress` does. After `fixed:` comes the
/// ingestion method's prefix (`ContentAddressMethod::parsePrefix`): none for a flat file,
/// `r:` for a NAR, `git:` for git hashing (Nix 2.20+, `fixed:git:sha1:…` or
/// `fixed:git:sha256:…`), then `<algo>:<hash>`
/// (<https://github.com/NixOS/nix/blob/2.8.0/src/libstore/content-address.cc#L62-L111>,
/// <https://github.com/NixOS/nix/blob/2.34.0/src/libstore/content-address.cc>).
fn check_ca(value: &str) -> Result<(), &'static str> {
    let (algo, body) = if let Some(rest) = value.strip_prefix("text:") {
        let body = rest
            .strip_prefix("sha256:")
            .ok_or("a text content address needs 'sha256:<hash>'")?;
        ("sha256", body)
    } else if let Some(rest) = value.strip_prefix("fixed:") {
        let (git, rest) = match rest.strip_prefix("git:") {
            Some(r) => (true, r),
            None => (false, rest.strip_prefix("r:").unwrap_or(rest)),
        };
        let (algo, body) = rest
            .split_once(':')
            .ok_or("a fixed content address needs '<algo>:<hash>'")?;
        // Git hashing knows only the object hashes git itself has: SHA-1 and SHA-256.
        if git && !matches!(algo, "sha1" | "sha256") {
            return Err("a git content address needs 'sha1' or 'sha256'");
        }
        (algo, body)
    } else {
        return Err("it starts with neither 'text:' nor 'fixed:'");
    };
    let ok = match algo {
        "md5" => check_hash_body(body, 16),
        "sha1" => check_hash_body(body, 20),
        "sha256" => Hash::parse_non_sri_unprefixed(body, HashAlgo::Sha256).is_ok(),
        "sha512" => Hash::parse_non_sri_unprefixed(body, HashAlgo::Sha512).is_ok(),
        _ => return Err("unknown hash algorithm"),
    };
    if ok { Ok(()) } else { Err("invalid hash") }
}

/// Splits text into `(line number, line)` pairs, requiring a final '\n' as Nix does.
fn lines_with_numbers(text: &str) -> impl Iterator<Item = Result<(usize, &str), NarInfoError>> {
    let mut rest = text;
    let mut line = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        line += 1;
        match rest.find('\n') {
            Some(nl) => {
                let l = &rest[..nl];
                rest = &rest[nl + 1..];
                Some(Ok((line, l)))
            }
            None => {
                rest = "";
                Some(Err(NarInfoError::MissingNewline { line }))
            }
        }
    })
}

impl NarInfo {
    /// Parses a narinfo for a store whose directory is `store_dir` (`StorePath` must be in it).
    pub fn parse(store_dir: &StoreDir, text: &str) -> Result<NarInfo, NarInfoError> {
        let mut store_path = None;
        let mut url = String::new();
        let mut compression = String::new();
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = 0u64;
        let mut references = BTreeSet::new();
        let mut deriver = None;
        let mut system = None;
        let mut sigs = BTreeSet::new();
        let mut ca: Option<String> = None;

        for item in lines_with_numbers(text) {
            let (line, l) = item?;
            // Nix splits at the first ':' and takes the value two bytes later.
            let (key, value) = l
                .split_once(':')
                .and_then(|(k, v)| Some((k, v.strip_prefix(' ')?)))
                .ok_or(NarInfoError::NoColon { line })?;
            let path_err = |field, source| NarInfoError::BadStorePath {
                line,
                field,
                source,
            };
            let hash = |field| {
                Hash::parse_any_prefixed(value).map_err(|source| NarInfoError::BadHash {
                    line,
                    field,
                    source,
                })
            };
            match key {
                "StorePath" => {
                    store_path = Some(
                        store_dir
                            .parse(value)
                            .map_err(|e| path_err("StorePath", e))?,
                    )
                }
                "URL" => url = value.to_owned(),
                "Compression" => compression = value.to_owned(),
                "FileHash" => file_hash = Some(hash("FileHash")?),
                "FileSize" => file_size = Some(parse_size(line, "FileSize", value)?),
                "NarHash" => nar_hash = Some(hash("NarHash")?),
                "NarSize" => nar_size = parse_size(line, "NarSize", value)?,
                "References" => {
                    // Nix only notices a repeat when the earlier line named a path.
                    if !references.is_empty() {
                        return Err(NarInfoError::Duplicate {
                            line,
                            field: "References",
                        });
                    }
                    for r in value.split(' ').filter(|r| !r.is_empty()) {
                        references.insert(
                            StorePath::from_base_name(r).map_err(|e| path_err("References", e))?,
                        );
                    }
                }
                "Deriver" => {
                    deriver = if value == "unknown-deriver" {
                        None
                    } else {
                        Some(StorePath::from_base_name(value).map_err(|e| path_err("Deriver", e))?)
                    }
                }
                "System" => system = Some(value.to_owned()),
                "Sig" => {
                    sigs.insert(
                        Signature::parse(value)
                            .map_err(|source| NarInfoError::BadSignature { line, source })?,
                    );
                }
                "CA" => {
                    if ca.is_some() {
                        return Err(NarInfoError::Duplicate { line, field: "CA" });
                    }
                    // An empty CA means none (`parseContentAddressOpt`).
                    if !value.is_empty() {
                        check_ca(value).map_err(|reason| NarInfoError::BadCa {
                            line,
                            value: value.to_owned(),
                            reason,
                        })?;
                        ca = Some(value.to_owned());
                    }
                }
                _ => {}
            }
        }

        // The same order of checks as Nix, so the first missing field is the one named.
        let store_path = store_path.ok_or(NarInfoError::Missing("StorePath"))?;
        let nar_hash = nar_hash.ok_or(NarInfoError::Missing("NarHash"))?;
        if url.is_empty() {
            return Err(NarInfoError::Missing("URL"));
        }
        if nar_size == 0 {
            return Err(NarInfoError::ZeroNarSize);
        }
        if compression.is_empty() {
            compression = DEFAULT_COMPRESSION.to_owned();
        }
        Ok(NarInfo {
            store_path,
            url,
            compression,
            file_hash,
            file_size,
            nar_hash,
            nar_size,
            references,
            deriver,
            system,
            sigs,
            ca,
        })
    }

    /// The narinfo text as Nix writes it (`NarInfo::to_string`): fields in Nix's order,
    /// `References: ` even when empty, hashes as `<algo>:<nix32>`, one `Sig:` line per signature.
    /// Nix always has `FileHash` and `FileSize`; Ferry writes them only when known.
    pub fn render(&self, store_dir: &StoreDir) -> String {
        use std::fmt::Write as _;
        let mut s = String::with_capacity(512);
        // Writing to a String cannot fail.
        let _ = writeln!(s, "StorePath: {}", store_dir.display(&self.store_path));
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {}", h.to_nix32_prefixed());
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash.to_nix32_prefixed());
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        let refs: Vec<&str> = self.references.iter().map(StorePath::as_str).collect();
        let _ = writeln!(s, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {d}");
        }
        if let Some(sys) = &self.system {
            let _ = writeln!(s, "System: {sys}");
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }

    /// The signed fingerprint of this path ([`fingerprint`]).
    pub fn fingerprint(&self, store_dir: &StoreDir) -> Result<String, NarInfoError> {
        fingerprint(
            store_dir,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds this key's signature (`ValidPathInfo::sign`); signing twice adds nothing.
    pub fn sign(&mut self, store_dir: &StoreDir, key: &SecretKey) -> Result<(), NarInfoError> {
        let fp = self.fingerprint(store_dir)?;
        self.sigs.insert(key.sign(fp.as_bytes()));
        Ok(())
    }

    /// Whether any `Sig` is by `key` and verifies.
    pub fn verify_with(&self, store_dir: &StoreDir, key: &PublicKey) -> Result<bool, NarInfoError> {
        let fp = self.fingerprint(store_dir)?;
        Ok(self.sigs.iter().any(|s| key.verify(fp.as_bytes(), s)))
    }

    /// How many signatures verify against trusted keys (`checkSignatures`). Nix also counts a
    /// content-addressed path as valid when its path matches its CA; that check is not made here.
    pub fn count_valid_sigs(
        &self,
        store_dir: &StoreDir,
        trusted: &TrustedKeys,
    ) -> Result<usize, NarInfoError> {
        let fp = self.fingerprint(store_dir)?;
        Ok(trusted.count_valid(fp.as_bytes(), &self.sigs))
    }

    /// Whether Nix with these `trusted-public-keys` would accept the path's signatures.
    pub fn is_trusted(
        &self,
        store_dir: &StoreDir,
        trusted: &TrustedKeys,
    ) -> Result<bool, NarInfoError> {
        Ok(self.count_valid_sigs(store_dir, trusted)? > 0)
    }
}

/// `nix-cache-info`, the file describing a binary cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: Option<StoreDir>,
    /// `WantMassQuery: 1`; Nix reads any other value as false.
    pub want_mass_query: Option<bool>,
    /// Lower is preferred; cache.nixos.org uses 40.
    pub priority: Option<i32>,
}

impl CacheInfo {
    /// Parses `nix-cache-info` as `BinaryCacheStore::init` does: lines without ':' and
    /// unknown keys are ignored, values are trimmed. Unlike `std::stoi`, `Priority` must be
    /// an integer and nothing else.
    pub fn parse(text: &str) -> Result<CacheInfo, NarInfoError> {
        let mut info = CacheInfo::default();
        for (i, l) in text.split('\n').enumerate() {
            let line = i + 1;
            let Some((name, value)) = l.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name {
                "StoreDir" => {
                    info.store_dir =
                        Some(
                            StoreDir::new(value).map_err(|_| NarInfoError::BadCacheInfo {
                                line,
                                field: "StoreDir",
                                value: value.to_owned(),
                                reason: "is not an absolute path without a trailing '/'",
                            })?,
                        )
                }
                "WantMassQuery" => info.want_mass_query = Some(value == "1"),
                "Priority" => {
                    info.priority = Some(value.parse().map_err(|_| NarInfoError::BadCacheInfo {
                        line,
                        field: "Priority",
                        value: value.to_owned(),
                        reason: "is not an integer",
                    })?)
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// `StoreDir`, `WantMassQuery`, `Priority`, each when set (Nix's `file://` store writes
    /// only `StoreDir: <dir>\n`).
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(d) = &self.store_dir {
            s += &format!("StoreDir: {d}\n");
        }
        if let Some(w) = self.want_mass_query {
            s += &format!("WantMassQuery: {}\n", if w { 1 } else { 0 });
        }
        if let Some(p) = self.priority {
            s += &format!("Priority: {p}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "StorePath: /nix/store/kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt
URL: nar/0dbpa0yw5ld0wlbqizk2fsf5ys1xdgqjhszaan0k4m2bmzwd6cq1.nar
Compression: none
NarHash: sha256:0dbpa0yw5ld0wlbqizk2fsf5ys1xdgqjhszaan0k4m2bmzwd6cq1
NarSize: 128
References: 
";

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").expect("store dir")
    }

    #[test]
    fn minimal_round_trip_and_defaults() {
        let ni = NarInfo::parse(&sd(), HELLO).expect("parse");
        assert!(ni.references.is_empty() && ni.sigs.is_empty() && ni.deriver.is_none());
        assert_eq!(ni.render(&sd()), HELLO);
        let fp = ni.fingerprint(&sd()).expect("fp");
        assert!(fp.ends_with(";128;"), "{fp}");

        let no_comp = HELLO.replace("Compression: none\n", "");
        assert_eq!(
            NarInfo::parse(&sd(), &no_comp).expect("parse").compression,
            "bzip2"
        );
    }

    #[test]
    fn duplicates_follow_nix() {
        let later = format!("{HELLO}URL: nar/other.nar\n");
        assert_eq!(
            NarInfo::parse(&sd(), &later).expect("parse").url,
            "nar/other.nar"
        );
        let refs = HELLO.replace(
            "References: \n",
            "References: kvpm810qs80pka1bfbqxvsivc1qq3bgl-hello.txt\nReferences: \n",
        );
        let e = NarInfo::parse(&sd(), &refs).expect_err("must fail");
        assert!(
            matches!(
                e,
                NarInfoError::Duplicate {
                    line: 7,
                    field: "References"
                }
            ),
            "{e}"
        );
        let ca = format!(
            "{HELLO}CA: text:sha256:1sljf4vacj7a1nbvdcnmkkrvr99m9rf2lpppzlnafa34n7cmkibd\n"
        );
        let twice =
            format!("{ca}CA: text:sha256:1sljf4vacj7a1nbvdcnmkkrvr99m9rf2lpppzlnafa34n7cmkibd\n");
        assert!(NarInfo::parse(&sd(), &ca).is_ok());
        assert!(matches!(
            NarInfo::parse(&sd(), &twice),
            Err(NarInfoError::Duplicate {
                line: 8,
                field: "CA"
            })
        ));
    }

    #[test]
    fn unknown_keys_are_ignored_and_system_kept() {
        let t = format!("{HELLO}Frobnicate: yes\nSystem: x86_64-linux\n");
        let ni = NarInfo::parse(&sd(), &t).expect("parse");
        assert_eq!(ni.system.as_deref(), Some("x86_64-linux"));
        assert_eq!(ni.render(&sd()), format!("{HELLO}System: x86_64-linux\n"));
    }

    #[test]
    fn ca_forms() {
        for ok in [
            "fixed:r:sha256:1b9mggss7fd0m9dc8gi68wqsv288gxn2a5bdrf0z6hx6s2wz6295",
            "fixed:sha1:0123456789abcdef0123456789abcdef01234567",
            "fixed:md5:0123456789abcdef0123456789abcdef",
            "text:sha256:1sljf4vacj7a1nbvdcnmkkrvr99m9rf2lpppzlnafa34n7cmkibd",
            // Git hashing (Nix 2.20+, `--extra-experimental-features git-hashing`).
            "fixed:git:sha1:0123456789abcdef0123456789abcdef01234567",
            "fixed:git:sha256:1b9mggss7fd0m9dc8gi68wqsv288gxn2a5bdrf0z6hx6s2wz6295",
        ] {
            assert_eq!(check_ca(ok), Ok(()), "{ok}");
            let t = format!("{HELLO}CA: {ok}\n");
            let ni = NarInfo::parse(&sd(), &t).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(ni.render(&sd()), t, "{ok} kept as written");
        }
        for bad in [
            "sha256:abc",
            "fixed:r:sha256:abc",
            "text:sha512:abc",
            "fixed:crc:00",
            "fixed:git:md5:0123456789abcdef0123456789abcdef",
            "fixed:git:r:sha256:1b9mggss7fd0m9dc8gi68wqsv288gxn2a5bdrf0z6hx6s2wz6295",
            "fixed:r:git:sha1:0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(check_ca(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_info_round_trip() {
        let t = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";
        let ci = CacheInfo::parse(t).expect("parse");
        assert_eq!(ci.priority, Some(40));
        assert_eq!(ci.want_mass_query, Some(true));
        assert_eq!(ci.render(), t);
        let junk = CacheInfo::parse("no colon here\nOther: x\nPriority:  7 \n").expect("parse");
        assert_eq!(junk.priority, Some(7));
        let e = CacheInfo::parse("StoreDir: /nix/store\nPriority: high\n").expect_err("must fail");
        assert!(
            e.to_string().contains("line 2") && e.to_string().contains("Priority"),
            "{e}"
        );
    }
}
