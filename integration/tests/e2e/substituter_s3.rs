//! `ferry-substituter` in front of a private S3 bucket (issue 14 item 2): moto's S3 server on a
//! LAN host, checking every request's SigV4 signature, with a bucket that allows no anonymous
//! read. A real Nix daemon (the fleet's version, `FERRY_NIX`) substitutes through Ferry with
//! `require-sigs`, trusting only the producer's key; with a wrong secret, `check-config` says
//! which key was refused and why, and Ferry answers misses that are neither 5xx nor remembered.
//!
//! Only fleet addresses are contacted: the bucket's endpoint is the moto host.

use ferry_integration::support::post_build as post_build_support;
use ferry_integration::support::substituter as substituter_support;

use ferry_integration::{check, ferry_bin, nonce, out_paths};
use post_build_support::{
    BucketAccess, MotoBucket, moto_or_skip, s3_key_files_toml, s3_upstream_toml, start_moto_bucket,
    write_s3_key_files,
};
use std::path::Path;
use std::process::Stdio;
use substituter_support::*;

fn ferry_toml(dir: &Path, name: &str, url: &str, id: &Path, secret: &Path) -> std::path::PathBuf {
    let conf = dir.join(name);
    std::fs::write(
        &conf,
        format!(
            "[substituter]\nlisten = \"127.0.0.1:{FERRY_PORT}\"\n[[substituter.upstream]]\n{}",
            s3_upstream_toml(url, "", id, secret)
        ),
    )
    .expect("ferry.toml");
    conf
}

/// The first sample of `name` (any labels).
fn metric_any(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = rest.strip_prefix('{').map_or(rest, |r| {
                r.split_once("} ").map_or("", |(_, v)| v).trim_start()
            });
            rest.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

#[test]
fn s3_upstream_private_bucket() {
    let Some(python) = moto_or_skip("s3_upstream_private_bucket") else {
        return;
    };
    let (mut fleet, key, _keys) = producer_fleet();
    // Two closures: the first is substituted with the right keys, the second is asked for with
    // a wrong secret (Nix remembers a miss, so each case has its own paths).
    let expr = producer_only_drv(&nonce(), 300_000);
    let expr_wrong = producer_only_drv(&nonce(), 1000);
    let paths = build_on_producer(&fleet, &expr);
    let paths_wrong = build_on_producer(&fleet, &expr_wrong);
    let cache = fleet.root.path().join("cache-s3");
    let mut all = paths.clone();
    all.extend(paths_wrong.iter().cloned());
    copy_to_cache(&fleet, &all, &cache, &key.secret, "xz");

    let bucket = "ferry-private";
    let MotoBucket {
        endpoint,
        key_id,
        secret,
    } = start_moto_bucket(
        &mut fleet,
        &python,
        bucket,
        BucketAccess::Private,
        Some(&cache),
    );

    // The bucket is private: an anonymous GET of a narinfo is refused.
    let name = narinfo_name(&paths[0]);
    let (code, _) = http_get(&fleet, &format!("{endpoint}/{bucket}/{name}"), &[]);
    assert!(
        (400..600).contains(&code) && code != 404,
        "anonymous read of the private bucket answered {code}"
    );

    let creds = fleet.root.path().join("s3-creds");
    std::fs::create_dir_all(&creds).expect("creds dir");
    let (id_file, secret_file) = write_s3_key_files(&creds, &key_id, &secret);
    let wrong_file = creds.join("wrong-secret");
    let wrong_secret = "wrong-secret-for-ferry-test";
    std::fs::write(&wrong_file, wrong_secret).expect("wrong secret");
    let url = format!("s3://{bucket}?endpoint={endpoint}&region=us-east-1");

    // check-config reads nix-cache-info with the keys and shows the key id, never the secret.
    // Returns its output and what it printed (stdout, then stderr).
    let check_config = |conf: &Path| {
        let out = fleet
            .client
            .command(ferry_bin("ferry-substituter").to_str().expect("utf-8"))
            .arg("check-config")
            .env("FERRY_CONFIG", conf)
            .stdin(Stdio::null())
            .output()
            .expect("check-config");
        let shown = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out, shown)
    };
    let good_conf = ferry_toml(
        fleet.root.path(),
        "s3-good.toml",
        &url,
        &id_file,
        &secret_file,
    );
    let (out, shown) = check_config(&good_conf);
    check(&out, "check-config with the right keys").unwrap_or_else(|e| panic!("{e}\n{shown}"));
    assert!(
        shown.contains(&format!("access key id {key_id}")) && shown.contains("nix-cache-info OK"),
        "{shown}"
    );
    assert!(
        !shown.contains(&secret),
        "check-config shows the secret:\n{shown}"
    );

    let upstream_toml = s3_key_files_toml(&id_file, &secret_file);
    let ferry = start_ferry_with(&fleet, std::slice::from_ref(&url), "", &upstream_toml);
    let (out, elapsed) = substitute_through_ferry(
        &fleet,
        &ferry,
        &expr,
        "nix-build through Ferry from the private bucket",
        "substitution from a private bucket",
    );
    assert_eq!(out_paths(&out), paths, "same output paths as the producer");
    eprintln!("substituted a 3-path closure from S3 through Ferry in {elapsed:?}");

    // The narinfo is the bucket's, byte for byte; a NAR resumes with Range (a ranged,
    // signed GET to the bucket).
    let leaf = largest_path(&cache, &paths);
    let (code, body) = http_get(
        &fleet,
        &format!("{}/{}", ferry_url(), narinfo_name(&leaf)),
        &[],
    );
    assert_eq!(code, 200);
    let original = std::fs::read(cache.join(narinfo_name(&leaf))).expect("narinfo");
    assert_eq!(body, original, "narinfo not passed through byte for byte");
    let nar_url = String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .expect("URL line");
    let nar = std::fs::read(cache.join(&nar_url)).expect("nar file");
    assert!(nar.len() > 1000, "the leaf's NAR is large enough to resume");
    let (code, part) = http_get(
        &fleet,
        &format!("{}/{nar_url}", ferry_url()),
        &["-H", "Range: bytes=1000-"],
    );
    assert_eq!(code, 206, "ranged NAR request");
    assert_eq!(part, nar[1000..], "ranged NAR body");
    let m = metrics(&fleet);
    assert!(
        metric_any(&m, "ferry_substituter_upstream_failures_total") == 0.0,
        "{m}"
    );
    drop(ferry);

    // A wrong secret: check-config fails and names the refused key and S3's reason.
    let wrong_conf = ferry_toml(
        fleet.root.path(),
        "s3-wrong.toml",
        &url,
        &id_file,
        &wrong_file,
    );
    let (out, shown) = check_config(&wrong_conf);
    assert!(
        !out.status.success(),
        "check-config accepted a wrong secret:\n{shown}"
    );
    assert!(
        shown.contains(&format!("access key id {key_id} refused"))
            && shown.contains("SignatureDoesNotMatch"),
        "{shown}"
    );
    assert!(
        !shown.contains(wrong_secret),
        "check-config shows the secret:\n{shown}"
    );

    // Serving with it: every lookup is a failure, never a miss remembered in the negative
    // cache, and Ferry answers 404, never a 5xx; Nix falls back to building, which fails
    // cleanly (the derivation builds on the producer only).
    let wrong_toml = s3_key_files_toml(&id_file, &wrong_file);
    let ferry = start_ferry_with(
        &fleet,
        std::slice::from_ref(&url),
        "negative-ttl-secs = 300\n",
        &wrong_toml,
    );
    let wrong_name = narinfo_name(&paths_wrong[0]);
    for _ in 0..2 {
        let (code, _) = http_get(&fleet, &format!("{}/{wrong_name}", ferry_url()), &[]);
        assert_eq!(code, 404, "a refused lookup is an (uncached) 404");
    }
    let m = metrics(&fleet);
    assert_metric_eq(&m, "ferry_substituter_negative_cache_hits_total", 0.0);
    assert_eq!(
        metric_any(&m, "ferry_substituter_upstream_misses_total"),
        0.0,
        "{m}"
    );
    assert!(
        metric_any(&m, "ferry_substituter_upstream_failures_total") >= 2.0,
        "{m}"
    );
    let (out, stderr, _) = client_build(&fleet, &expr_wrong);
    assert!(!out.status.success(), "built without the paths?\n{stderr}");
    assert!(
        stderr.contains("ferry-test: built locally, not substituted"),
        "{stderr}"
    );
    let lower = stderr.to_lowercase();
    for bad in ["http error 5", "error: unable to download"] {
        assert!(!lower.contains(bad), "Nix saw {bad:?}:\n{stderr}");
    }
    // A status code is a word of its own; store paths hold random digits (a nonce ending in
    // "…503" once failed this check), so words with a '/' or '-' are not status codes.
    let status_words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ':' || c == ',')
        .filter(|w| !w.contains('/') && !w.contains('-'))
        .filter(|w| matches!(*w, "500" | "502" | "503" | "504"))
        .collect();
    assert!(
        status_words.is_empty(),
        "Nix saw {status_words:?}:\n{stderr}"
    );
    let log = ferry.log_text();
    assert!(log.contains("SignatureDoesNotMatch"), "{log}");
    assert!(!log.contains(wrong_secret), "the log shows the secret");
}

/// The path of the largest NAR in the cache: the leaf of the closure of `paths`, which holds
/// the large random blob.
fn largest_path(cache: &Path, paths: &[String]) -> String {
    let mut best = (0u64, String::new());
    for entry in std::fs::read_dir(cache).expect("cache dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(_) = name.strip_suffix(".narinfo") else {
            continue;
        };
        let text = std::fs::read_to_string(entry.path()).expect("narinfo");
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k).map(str::to_owned))
                .unwrap_or_default()
        };
        let size: u64 = get("NarSize: ").parse().unwrap_or(0);
        if size > best.0 {
            best = (size, get("StorePath: "));
        }
    }
    assert!(
        !paths.is_empty() && !best.1.is_empty(),
        "no narinfo in the cache"
    );
    best.1
}
