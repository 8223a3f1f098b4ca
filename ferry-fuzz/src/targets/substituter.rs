//! Targets for the substituter's parsers (`ferry-substituter`): the check of an upstream
//! narinfo, request paths and `Retry-After` values.

use super::{store, text, trusted_keys};
use std::path::Path;

/// The substituter's check of an upstream narinfo (`check_narinfo`), with and without
/// signatures required, relative and absolute upstreams; keys it routes NARs by are safe.
pub fn substituter_check(data: &[u8]) -> bool {
    use ferry_substituter::check::check_narinfo;
    use ferry_substituter::paths::is_safe_key;
    let dir = store();
    // Ask for the path the narinfo names, so the check goes past the hash part.
    let t = text(data);
    let hash_part = t
        .find("StorePath: /nix/store/")
        .and_then(|i| t.get(i + 22..i + 22 + 32))
        .unwrap_or("00000000000000000000000000000000");
    let keys = trusted_keys();
    let mut any = false;
    for (require, base) in [
        (true, None),
        (false, Some("http://cache.example:5000/sub")),
        (true, Some("https://cache.example")),
    ] {
        if let Ok(c) = check_narinfo(&dir, hash_part, data, &keys, require, base) {
            any = true;
            if let Some(k) = &c.nar_key {
                assert!(is_safe_key(k), "routes by an unsafe key {k:?}");
            }
            if !require {
                assert!(c.trusted);
            }
            // The body served is a narinfo of the same path.
            let served = ferry_nix::narinfo::NarInfo::parse(&dir, &c.body).expect("served body");
            assert_eq!(served.store_path.hash_part(), hash_part);
        }
    }
    any
}

/// The substituter's request paths (substituter/src/paths.rs): a safe key never leaves a
/// `file://` cache directory or an upstream's base, and routes are safe keys.
pub fn substituter_paths(data: &[u8]) -> bool {
    use ferry_substituter::paths::{
        HashPart, NarRoute, Request, classify, file_path, http_url, is_safe_key, nar_route,
        rewrite_url_line,
    };
    use std::path::Component;
    let t = text(data);
    let req = classify(&t);
    if let Request::NarInfo(h) = &req {
        assert_eq!(
            HashPart::parse(h.as_str()).map(|x| x.as_str().to_owned()),
            Some(h.as_str().to_owned())
        );
    }
    let key = t.strip_prefix('/').unwrap_or(&t);
    let safe = is_safe_key(key);
    let dir = Path::new("/srv/cache");
    if safe {
        let p = file_path(dir, key);
        assert!(p.starts_with(dir), "{p:?}");
        assert!(
            p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
            "{p:?}"
        );
    }
    for base_text in [
        "http://u:p@cache.example:8080/base",
        "https://cache.example",
    ] {
        let base = reqwest::Url::parse(base_text).expect("base");
        if let Some(url) = http_url(&base, base_text, key) {
            assert!(safe);
            let under = format!("{}/", base.path().trim_end_matches('/'));
            assert!(url.path().starts_with(&under), "{url} not under {base}");
            assert_eq!(url.host(), base.host());
            assert_eq!(url.port_or_known_default(), base.port_or_known_default());
            assert!(!url.path().contains("/../") && !url.path().contains("/./"));
        }
        match nar_route(&t, Some(base_text)) {
            NarRoute::Relative { key, .. } => assert!(is_safe_key(&key), "{key:?}"),
            NarRoute::Absolute => {}
        }
    }
    if let NarRoute::Relative { key, .. } = nar_route(&t, None) {
        assert!(is_safe_key(&key));
    }
    let rewritten = rewrite_url_line(&t, "nar/x.nar");
    assert_eq!(rewritten.lines().count(), t.lines().count());
    safe
}

/// `Retry-After` values (substituter/src/retry_after.rs), at several clocks.
pub fn retry_after(data: &[u8]) -> bool {
    use ferry_substituter::retry_after::{http_date, parse};
    use std::time::{Duration, UNIX_EPOCH};
    let t = text(data);
    let mut ok = false;
    for now in [0, 1_700_000_000, u64::from(u32::MAX) * 4] {
        if let Some(d) = parse(&t, UNIX_EPOCH + Duration::from_secs(now)) {
            ok = true;
            if let Ok(s) = t.trim().parse::<u64>() {
                assert_eq!(d, Duration::from_secs(s));
            }
        }
    }
    let _ = http_date(&t);
    ok
}
