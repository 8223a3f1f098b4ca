//! Whether a narinfo's `CA:` field is true: the store path recomputed from the content
//! address, the references and the name must be the narinfo's own `StorePath`.
//!
//! Nix trusts a content-addressed path without signatures only after this check
//! (`ValidPathInfo::isContentAddressed`, which `checkSignatures` calls first:
//! <https://github.com/NixOS/nix/blob/2.8.0/src/libstore/path-info.cc#L26-L49>), printing
//! "path '…' claims to be content-addressed but isn't" otherwise. Ferry counted any `CA:` as
//! trusted (issue 12 item 1), so a made-up one from any upstream beat a correctly signed
//! narinfo and was kept on disk. The path computations follow `Store::makeStorePath`,
//! `makeType`, `makeFixedOutputPath` and `makeTextPath`
//! (<https://github.com/NixOS/nix/blob/2.8.0/src/libstore/store-api.cc#L140-L208>), and the
//! `CA:` syntax `parseContentAddress`
//! (<https://github.com/NixOS/nix/blob/2.8.0/src/libstore/content-address.cc#L62-L111>).

use ferry_nix::hash::{Hash, nix32_decode, nix32_encode, nix32_len};
use ferry_nix::narinfo::NarInfo;
use ferry_nix::store_path::{StoreDir, StorePath};

/// How the content was hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// `text:sha256:…` (derivations, `builtins.toFile`).
    Text,
    /// `fixed:…`: the file itself.
    Flat,
    /// `fixed:r:…`: the NAR serialisation.
    Recursive,
    /// `fixed:git:…` (Nix 2.19+).
    Git,
}

/// A hash of any algorithm a `CA:` may name, as its name and raw bytes (Ferry never hashes
/// with them; it only prints them back in base 16 as Nix does).
struct CaHash {
    algo: &'static str,
    bytes: Vec<u8>,
}

fn algo_size(name: &str) -> Option<(&'static str, usize)> {
    Some(match name {
        "md5" => ("md5", 16),
        "sha1" => ("sha1", 20),
        "sha256" => ("sha256", 32),
        "sha512" => ("sha512", 64),
        _ => return None,
    })
}

/// `Hash::parseNonSRIUnprefixed`: base 16, Nix base 32 or base 64, told apart by length.
fn parse_hash_body(body: &str, algo: &str) -> Option<CaHash> {
    let (algo, size) = algo_size(algo)?;
    let bytes = if body.len() == 2 * size {
        (0..size)
            .map(|i| u8::from_str_radix(body.get(2 * i..2 * i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?
    } else if body.len() == nix32_len(size) {
        nix32_decode(body, size).ok()?
    } else if body.len() == size.div_ceil(3) * 4 {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD
            .decode(body)
            .ok()?;
        (b.len() == size).then_some(b)?
    } else {
        return None;
    };
    Some(CaHash { algo, bytes })
}

fn parse_ca(ca: &str) -> Option<(Method, CaHash)> {
    if let Some(rest) = ca.strip_prefix("text:") {
        let body = rest.strip_prefix("sha256:")?;
        return Some((Method::Text, parse_hash_body(body, "sha256")?));
    }
    let rest = ca.strip_prefix("fixed:")?;
    let (method, rest) = if let Some(r) = rest.strip_prefix("r:") {
        (Method::Recursive, r)
    } else if let Some(r) = rest.strip_prefix("git:") {
        (Method::Git, r)
    } else {
        (Method::Flat, rest)
    };
    let (algo, body) = rest.split_once(':')?;
    Some((method, parse_hash_body(body, algo)?))
}

fn base16(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `Store::makeStorePath`: `<type>:<algo>:<base16>:<store dir>:<name>`, SHA-256, folded to 20
/// bytes (`compressHash`).
fn make_store_path(
    store_dir: &StoreDir,
    ty: &str,
    algo: &str,
    hash: &[u8],
    name: &str,
) -> [u8; 20] {
    let s = format!("{ty}:{algo}:{}:{store_dir}:{name}", base16(hash));
    let full = Hash::sha256_of(s.as_bytes());
    let mut out = [0u8; 20];
    for (i, b) in full.bytes().iter().enumerate() {
        out[i % 20] ^= b;
    }
    out
}

/// `makeType`: the type with every reference (full paths, sorted) and `:self` appended.
fn make_type(store_dir: &StoreDir, ty: &str, others: &[&StorePath], has_self: bool) -> String {
    let mut t = ty.to_owned();
    for r in others {
        t.push(':');
        t.push_str(&store_dir.display(r));
    }
    if has_self {
        t.push_str(":self");
    }
    t
}

/// Whether `info.ca` is present and names exactly `info.store_path`.
pub(crate) fn is_content_addressed(store_dir: &StoreDir, info: &NarInfo) -> bool {
    let Some(ca) = &info.ca else { return false };
    let Some((method, hash)) = parse_ca(ca) else {
        return false;
    };
    let path = &info.store_path;
    let has_self = info.references.contains(path);
    // `references` is sorted like Nix's `StorePathSet`, so the type string matches.
    let others: Vec<&StorePath> = info.references.iter().filter(|r| *r != path).collect();
    let name = path.name();
    let digest = match method {
        // A text path cannot refer to itself (Nix asserts it).
        Method::Text if has_self => return false,
        Method::Text => make_store_path(
            store_dir,
            &make_type(store_dir, "text", &others, false),
            hash.algo,
            &hash.bytes,
            name,
        ),
        Method::Recursive if hash.algo == "sha256" => make_store_path(
            store_dir,
            &make_type(store_dir, "source", &others, has_self),
            hash.algo,
            &hash.bytes,
            name,
        ),
        // Every other fixed output: no references allowed (Nix throws), and an inner digest
        // of `fixed:out:<prefix><algo>:<base16>:`.
        _ if has_self || !others.is_empty() => return false,
        Method::Git if hash.algo != "sha1" && hash.algo != "sha256" => return false,
        _ => {
            let prefix = match method {
                Method::Recursive => "r:",
                Method::Git => "git:",
                _ => "",
            };
            let inner = format!("fixed:out:{prefix}{}:{}:", hash.algo, base16(&hash.bytes));
            let inner = Hash::sha256_of(inner.as_bytes());
            make_store_path(store_dir, "output:out", "sha256", inner.bytes(), name)
        }
    };
    let ok = nix32_encode(&digest) == path.hash_part();
    if !ok {
        tracing::warn!(path = %store_dir.display(path), %ca, "narinfo claims to be content-addressed but is not");
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").expect("store dir")
    }

    fn info(path: &str, ca: &str, refs: &str) -> NarInfo {
        let text = format!(
            "StorePath: {path}\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 120\nReferences: {refs}\nCA: {ca}\n"
        );
        NarInfo::parse(&sd(), &text).expect("narinfo")
    }

    /// Vectors from real Nix 2.8: `nix path-info --json` of a `builtins.toFile` source and
    /// a derivation (`ferry-nix/tests/golden/cli/path-info/drv.json`), and
    /// `nix-store --print-fixed-path` for flat, sha1 and recursive sha512 hashes.
    #[test]
    fn recomputes_paths_like_nix() {
        let src = "/nix/store/04m350imlv7hf9pd6b84wj34d7f4hl0r-hello.txt";
        let src_ca = "fixed:r:sha256:0rjidw6df5ipmr80ddayxql52sirmbk5bc0jhvqr9fdq74b1svfg";
        assert!(is_content_addressed(&sd(), &info(src, src_ca, "")));
        let drv = "/nix/store/1v1sy7am6kdx8h1zwyfdl6f554ciqnaq-cli-built.drv";
        let drv_ca = "text:sha256:06ym7b2h3v2p19n5nymizkk7yb2bgfw5lqgkyrvgz7gl0zd2iddm";
        let src_ref = "04m350imlv7hf9pd6b84wj34d7f4hl0r-hello.txt";
        assert!(is_content_addressed(&sd(), &info(drv, drv_ca, src_ref)));
        // Without its reference, or under another store directory, it is another path.
        assert!(!is_content_addressed(&sd(), &info(drv, drv_ca, "")));
        let other = StoreDir::new("/gnu/store").expect("dir");
        assert!(!is_content_addressed(&other, &info(drv, drv_ca, src_ref)));
        // The same hash claimed flat, or with a reference, names another path.
        let flat = "fixed:sha256:0rjidw6df5ipmr80ddayxql52sirmbk5bc0jhvqr9fdq74b1svfg";
        assert!(!is_content_addressed(&sd(), &info(src, flat, "")));
        let dep = "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig-dep";
        assert!(!is_content_addressed(&sd(), &info(src, src_ca, dep)));

        for (path, ca) in [
            (
                "/nix/store/h2l53b2aji1zifx6aw60pdip4ksxv0wv-src.tar.gz",
                "fixed:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".to_owned(),
            ),
            (
                "/nix/store/qqrx6g4m2barc65kgnf980n35w3zz1j7-x",
                "fixed:sha1:0000000000000000000000000000000000000009".to_owned(),
            ),
            (
                "/nix/store/wdy36mkrmrhflkw0kgpqam1a6d168hky-y",
                format!("fixed:r:sha512:{}", "a".repeat(128)),
            ),
        ] {
            assert!(
                is_content_addressed(&sd(), &info(path, &ca, "")),
                "{path} {ca}"
            );
        }
    }

    /// The same flat hash in base 16, Nix base 32 and base 64 is the same content address;
    /// git hashes are printed back in base 16 like any other (no Nix 2.8 vector exists: git
    /// hashing came in 2.19).
    #[test]
    fn hash_spellings_and_git() {
        let path = "/nix/store/h2l53b2aji1zifx6aw60pdip4ksxv0wv-src.tar.gz";
        let h = Hash::parse_non_sri_unprefixed(
            "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            ferry_nix::hash::HashAlgo::Sha256,
        )
        .expect("hash");
        for ca in [
            format!("fixed:sha256:{}", h.to_base16()),
            format!("fixed:sha256:{}", h.to_base64()),
        ] {
            assert!(is_content_addressed(&sd(), &info(path, &ca, "")), "{ca}");
        }
        let sha1 = vec![9u8; 20];
        let inner = Hash::sha256_of(format!("fixed:out:git:sha1:{}:", base16(&sha1)).as_bytes());
        let d = make_store_path(&sd(), "output:out", "sha256", inner.bytes(), "g");
        let path = format!("/nix/store/{}-g", nix32_encode(&d));
        let i = info(&path, &format!("fixed:git:sha1:{}", base16(&sha1)), "");
        assert!(is_content_addressed(&sd(), &i));
    }

    /// Issue 12 item 1: a made-up `CA:` on an arbitrary path.
    #[test]
    fn a_made_up_content_address_is_not_trusted() {
        let path = "/nix/store/0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig-hello";
        let ca = "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        assert!(!is_content_addressed(&sd(), &info(path, ca, "")));
    }
}
