//! What a request path names, and how names map to upstream URLs and files.
//!
//! Nix builds request paths from the cache URL (docs/binary-cache.md §1.1, §1.5): `nix-cache-info`,
//! `<hash32>.narinfo`, and whatever the narinfo's `URL:` says (Nix-written caches use
//! `nar/<filehash>.nar.xz`; nix-serve and harmonia differ, and harmonia adds `?hash=`). Ferry
//! treats everything after the cache root as an opaque key, query included, and asks an
//! upstream for `<upstream base>/<key>` (or the file `<dir>/<key without query>`).

use std::path::PathBuf;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    CacheInfo,
    Metrics,
    Status,
    /// `<hash>.narinfo`: the 32-character hash part.
    NarInfo(HashPart),
    /// A NAR file: the key as Nix requests it, relative to the cache root, query included.
    Nar(String),
    /// `.ls` listings, `log/`, `realisations/`, `build-trace-v2/`, `debuginfo/`: passed through.
    Other(String),
    /// Nothing a binary cache serves.
    Unknown,
}

/// A store path's hash part, validated: 32 characters of Nix's base-32 alphabet. Kept inline
/// (no heap allocation) because it keys every narinfo request, the hot path.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashPart([u8; ferry_nix::store_path::HASH_PART_LEN]);

impl HashPart {
    pub fn parse(s: &str) -> Option<HashPart> {
        if !is_hash_part(s) {
            return None;
        }
        s.as_bytes().try_into().ok().map(HashPart)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII nix32 characters get in (`parse`), so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for HashPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for HashPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Nix's base-32 alphabet (no e, o, u, t).
fn is_nix32(s: &str) -> bool {
    s.bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'z') && !matches!(b, b'e' | b'o' | b'u' | b't'))
}

fn is_hash_part(s: &str) -> bool {
    s.len() == ferry_nix::store_path::HASH_PART_LEN && is_nix32(s)
}

/// Decodes `%XX` escapes of one path segment (invalid escapes stay as they are).
fn percent_decode(seg: &str) -> Vec<u8> {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Whether one path segment is safe to pass on: not empty, not `.` or `..` even once
/// percent-decoded (URL libraries and servers resolve `%2e%2e` as `..`, issue 12 item 6), and
/// no separator, backslash or NUL, encoded or not.
fn is_safe_segment(seg: &str) -> bool {
    let decoded = percent_decode(seg);
    !seg.is_empty()
        && decoded != b"."
        && decoded != b".."
        && !decoded.iter().any(|b| matches!(b, b'/' | b'\\' | 0))
}

/// A key is safe when every path segment is ([`is_safe_segment`]) and it has no fragment: it
/// cannot escape a `file://` cache directory or an upstream's base path.
pub fn is_safe_key(key: &str) -> bool {
    let path = key.split('?').next().unwrap_or("");
    !path.is_empty()
        && !key.contains('\0')
        && !key.contains('\\')
        && !key.contains('#')
        && path.split('/').all(is_safe_segment)
}

/// Classifies `path_and_query` (the request target, starting with '/').
pub fn classify(path_and_query: &str) -> Request {
    let key = path_and_query.strip_prefix('/').unwrap_or(path_and_query);
    let path = key.split('?').next().unwrap_or("");
    match path {
        "nix-cache-info" => return Request::CacheInfo,
        "metrics" => return Request::Metrics,
        "ferry/status" => return Request::Status,
        _ => {}
    }
    // Checked first, as the most frequent request: a valid hash part is a safe key by itself
    // (nix32 characters only), and the query, if any, is not part of the lookup.
    if let Some(h) = path.strip_suffix(".narinfo").and_then(HashPart::parse) {
        return Request::NarInfo(h);
    }
    if !is_safe_key(key) {
        return Request::Unknown;
    }
    if path.starts_with("nar/") {
        return Request::Nar(key.to_owned());
    }
    let other = path.strip_suffix(".ls").is_some_and(is_hash_part)
        || ["log/", "realisations/", "build-trace-v2/", "debuginfo/"]
            .iter()
            .any(|p| path.starts_with(p));
    if other {
        Request::Other(key.to_owned())
    } else {
        Request::Unknown
    }
}

/// The URL of `key` on an HTTP upstream whose base (`base`, parsed from `base_text`, which has
/// no trailing '/') it must stay under. Built segment by segment from a [`is_safe_key`] key,
/// then parsed and checked: same scheme, host and port as the base, and a path that is the
/// base's path, '/', and the key's path with nothing resolved or re-encoded. Anything else is
/// `None`, and no request (with its credentials) is sent (issue 12 item 6).
pub fn http_url(base: &reqwest::Url, base_text: &str, key: &str) -> Option<reqwest::Url> {
    if !is_safe_key(key) {
        return None;
    }
    let (path, query) = match key.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (key, None),
    };
    let mut text = String::with_capacity(base_text.len() + key.len() + 1);
    text.push_str(base_text);
    for seg in path.split('/') {
        text.push('/');
        text.push_str(seg);
    }
    if let Some(q) = query {
        text.push('?');
        text.push_str(q);
    }
    let url = reqwest::Url::parse(&text).ok()?;
    let base_path = base.path().trim_end_matches('/');
    let same_origin = url.scheme() == base.scheme()
        && url.host() == base.host()
        && url.port_or_known_default() == base.port_or_known_default()
        && url.username().is_empty()
        && url.password().is_none();
    let rest = url.path().strip_prefix(base_path)?.strip_prefix('/')?;
    (same_origin && rest == path).then_some(url)
}

/// The file holding `key` in a `file://` cache directory (the query is not part of a file name).
pub fn file_path(dir: &std::path::Path, key: &str) -> PathBuf {
    dir.join(key.split('?').next().unwrap_or(key))
}

/// How the NAR named by a narinfo's `URL:` will be reached through Ferry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarRoute {
    /// A relative key: Nix asks Ferry for it and Ferry asks the upstream for the same key.
    /// `rewritten` is set when the narinfo must be edited to say `URL: <key>`.
    Relative { key: String, rewritten: bool },
    /// An absolute URL elsewhere (e.g. presigned object storage): left as is; Nix fetches it
    /// directly.
    Absolute,
}

/// Maps a narinfo `URL:` from the upstream at `base` (None for `file://` upstreams) to a route.
/// Relative URLs are kept byte for byte (Nix 2.8 concatenates, 2.32+ resolves per RFC 3986;
/// both give the same key for a relative path without a leading '/', docs/binary-cache.md §1.5). An absolute
/// URL inside the upstream's own base is rewritten to the relative key so the NAR also flows
/// through Ferry. A leading '/' is ambiguous across Nix versions (docs/binary-cache.md §1.5) and is treated as
/// relative to the upstream's base, which is what Nix ≤ 2.31 does.
pub fn nar_route(url: &str, base: Option<&str>) -> NarRoute {
    let has_scheme = ["http://", "https://", "file://", "s3://"]
        .iter()
        .any(|s| url.starts_with(s));
    if !has_scheme {
        let key = url.trim_start_matches('/');
        if !is_safe_key(key) {
            return NarRoute::Absolute;
        }
        return NarRoute::Relative {
            key: key.to_owned(),
            rewritten: key.len() != url.len(),
        };
    }
    if let Some(base) = base
        && let Some(rest) = url.strip_prefix(base).and_then(|r| r.strip_prefix('/'))
        && is_safe_key(rest)
    {
        return NarRoute::Relative {
            key: rest.to_owned(),
            rewritten: true,
        };
    }
    NarRoute::Absolute
}

/// Replaces the value of every `URL:` line (an unsigned field, docs/binary-cache.md §1.6) and keeps every other
/// byte, signatures included.
pub fn rewrite_url_line(text: &str, new_url: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if line.starts_with("URL: ") {
            out.push_str("URL: ");
            out.push_str(new_url);
            out.push('\n');
        } else {
            out.push_str(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig";

    #[test]
    fn classifies_the_cache_protocol() {
        assert_eq!(classify("/nix-cache-info"), Request::CacheInfo);
        assert_eq!(
            classify(&format!("/{H}.narinfo")),
            Request::NarInfo(HashPart::parse(H).expect("hash part"))
        );
        assert_eq!(
            classify("/nar/abc.nar.xz"),
            Request::Nar("nar/abc.nar.xz".into())
        );
        assert_eq!(
            classify("/nar/abc.nar?hash=xyz"),
            Request::Nar("nar/abc.nar?hash=xyz".into())
        );
        assert_eq!(
            classify(&format!("/{H}.ls")),
            Request::Other(format!("{H}.ls"))
        );
        assert_eq!(
            classify("/log/abc-foo.drv"),
            Request::Other("log/abc-foo.drv".into())
        );
        assert_eq!(
            classify("/realisations/sha256:00ff!out.doi"),
            Request::Other("realisations/sha256:00ff!out.doi".into())
        );
        assert_eq!(classify("/metrics"), Request::Metrics);
        // A query does not change which narinfo is asked for.
        assert_eq!(
            classify(&format!("/{H}.narinfo?x=1")),
            Request::NarInfo(HashPart::parse(H).expect("hash part"))
        );
    }

    #[test]
    fn a_hash_part_is_kept_as_its_text() {
        let h = HashPart::parse(H).expect("hash part");
        assert_eq!(h.as_str(), H);
        assert_eq!(h.to_string(), H);
        assert_eq!(format!("{h:?}"), format!("{H:?}"));
    }

    #[test]
    fn rejects_bad_hashes_and_traversal() {
        assert_eq!(classify("/tooshort.narinfo"), Request::Unknown);
        // 'e' is not in Nix's base-32 alphabet.
        assert_eq!(
            classify("/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo"),
            Request::Unknown
        );
        for c in ["o", "u", "t", "A", "-", "."] {
            let h = format!("{}{c}", &H[1..]);
            assert_eq!(classify(&format!("/{h}.narinfo")), Request::Unknown, "{h}");
            assert_eq!(HashPart::parse(&h), None, "{h}");
        }
        assert_eq!(classify(&format!("/{H}x.narinfo")), Request::Unknown);
        assert_eq!(classify("/nar/../../etc/passwd"), Request::Unknown);
        assert_eq!(classify("/nar//x"), Request::Unknown);
        assert_eq!(classify("/index.html"), Request::Unknown);
    }

    /// Issue 12 item 6: `/nar/%2e%2e/%2e%2e/secret` reached the upstream as `GET /secret`, with
    /// the upstream's credentials.
    #[test]
    fn percent_encoded_dot_segments_and_separators_are_rejected() {
        for bad in [
            "/nar/%2e%2e/%2e%2e/secret",
            "/nar/%2E%2E/x",
            "/nar/.%2e/x",
            "/nar/%2e/x",
            "/nar/a%2fb",
            "/nar/a%2F..%2Fb",
            "/nar/a%5cb",
            "/nar/a%00b",
            "/log/%2e%2e",
            "/realisations/%2e%2e%2fsecret",
        ] {
            assert_eq!(classify(bad), Request::Unknown, "{bad}");
        }
        // Other escapes are opaque key bytes.
        assert_eq!(
            classify("/nar/a%2Bb.nar"),
            Request::Nar("nar/a%2Bb.nar".into())
        );
        for bad in ["nar/%2e%2e/%2e%2e/secret", "nar/../x", "nar/a%2fb"] {
            assert_eq!(url("http://u.lan/base", bad), None, "{bad}");
        }
        // Whatever the URL parser would resolve or move is refused, not sent.
        assert_eq!(url("http://u.lan/base", "nar/a b"), None);
        assert_eq!(
            url("http://u.lan/base", "nar/x.nar").as_deref(),
            Some("http://u.lan/base/nar/x.nar")
        );
    }

    fn url(base: &str, key: &str) -> Option<String> {
        let b = reqwest::Url::parse(base).expect("base");
        http_url(&b, base, key).map(|u| u.to_string())
    }

    #[test]
    fn maps_keys_to_upstreams() {
        assert_eq!(
            url("http://h:5000/c", "nar/x.nar").as_deref(),
            Some("http://h:5000/c/nar/x.nar")
        );
        assert_eq!(
            url("http://h:5000", "nar/x.nar?hash=abc").as_deref(),
            Some("http://h:5000/nar/x.nar?hash=abc")
        );
        assert_eq!(
            file_path(std::path::Path::new("/srv/c"), "nar/x.nar?hash=1"),
            PathBuf::from("/srv/c/nar/x.nar")
        );
    }

    #[test]
    fn routes_every_url_shape_in_the_wild() {
        // Nix-written, nix-serve, harmonia, cachix, snix (docs/binary-cache.md §1.4): kept as they are.
        for u in [
            "nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz",
            "nar/0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig-1w1fff338fvdw53sqgamddn1b2xgds47.nar",
            "nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar?hash=0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig",
            "nar/d7ba0c0e4f0b7d7d0b7d7d0b7d7d0b7d7d0b7d7d0b7d7d0b7d7d0b7d7d0b7d7d.nar.zst",
            "nar/snix-castore/CiQKIF8?narsize=1234",
        ] {
            assert_eq!(
                nar_route(u, Some("http://h")),
                NarRoute::Relative {
                    key: u.into(),
                    rewritten: false
                },
                "{u}"
            );
        }
        assert_eq!(
            nar_route("http://h:5000/c/nar/x.nar", Some("http://h:5000/c")),
            NarRoute::Relative {
                key: "nar/x.nar".into(),
                rewritten: true
            }
        );
        assert_eq!(
            nar_route("/nar/x.nar", None),
            NarRoute::Relative {
                key: "nar/x.nar".into(),
                rewritten: true
            }
        );
        assert_eq!(
            nar_route("https://s3.example/bucket/x?sig=1", Some("http://h")),
            NarRoute::Absolute
        );
        assert_eq!(nar_route("../x", None), NarRoute::Absolute);
    }

    #[test]
    fn url_rewrite_keeps_every_other_byte() {
        let text = "StorePath: /nix/store/x\nURL: http://h/nar/a.nar\nCompression: none\nSig: k:AAAA\nUnknownKey: kept\n";
        let out = rewrite_url_line(text, "nar/a.nar");
        assert_eq!(
            out,
            "StorePath: /nix/store/x\nURL: nar/a.nar\nCompression: none\nSig: k:AAAA\nUnknownKey: kept\n"
        );
    }
}
