//! `ferry-substituter` serving a host's own store to the LAN (`[substituter.local]`, the
//! desktop or NAS role of nix-serve and harmonia), with real Nix on both sides: a "nas" host
//! builds and serves its store on its LAN address; a "laptop" host with `require-sigs`
//! substitutes from it. Runs on every Nix version of the matrix (`FERRY_NIX`): the NAS reads
//! that version's database.
//!
//! No test starts Ferry with an upstream: `[substituter.local]` alone needs none (and never
//! falls back to cache.nixos.org). These tests need root (namespaces), like the other fleet
//! tests.

use ferry_integration::support::substituter as substituter_support;

use ferry_integration::{check, nonce, out_paths, stdout_of};
use std::process::Stdio;
use std::time::{Duration, Instant};
use substituter_support::*;

#[test]
fn a_laptop_substitutes_what_the_nas_built_signed_on_the_fly() {
    let (fleet, key, _keys, nas_log) = nas_and_laptop();
    let nas = fleet.host("producer");

    // A new build is available the moment it is valid: no copy step.
    let expr = producer_only_drv(&nonce(), 100_000);
    let paths = build_on_producer(&fleet, &expr);
    // The NAS's database (made by its first build) has the schema Ferry reads
    // (Ferry checks the columns on every connection).
    let mut c = nas.command("cat");
    c.arg("/nix/var/nix/db/schema");
    let schema = stdout_of(c, "the database's schema version");
    eprintln!("Nix {} database schema version {schema}", nas.nix.label);
    assert_eq!(
        schema, "10",
        "Nix's database schema changed: check substituter/src/local.rs"
    );

    let t = Instant::now();
    let out = laptop_build(&fleet, &expr);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    check(&out, "nix-build on the laptop").unwrap_or_else(|e| {
        panic!(
            "{e}\nferry log:\n{}",
            std::fs::read_to_string(&nas_log).unwrap_or_default()
        )
    });
    assert_eq!(out_paths(&out), paths);
    assert!(
        stderr.contains(&format!("from '{}'", nas_url(&fleet))),
        "{stderr}"
    );
    assert_quiet(&stderr, "substitution from the NAS");
    eprintln!(
        "laptop substituted a 3-path closure from the NAS in {:?}",
        t.elapsed()
    );
    let laptop = fleet.host("laptop");
    let mut v = laptop.nix_command("nix-store");
    v.args(["--verify-path", &paths[0]]);
    stdout_of(v, "nix-store --verify-path");
    let mut q = laptop.nix_command("nix-store");
    q.args(["-qR", &paths[0]]);
    assert_eq!(stdout_of(q, "nix-store -qR").lines().count(), 3);

    // Every narinfo is what `nix copy --to file://…?compression=none&secret-key=…` writes for
    // the same path, signature included, except the URL (the NAR's name).
    let cache = fleet.root.path().join("cache-copy");
    copy_to_cache(&fleet, &paths, &cache, &key.secret, "none");
    let mut q = nas.nix_command("nix-store");
    q.args(["-qR", &paths[0]]);
    for p in stdout_of(q, "nix-store -qR").lines() {
        let name = narinfo_name(p);
        let (code, body) = get_on(laptop, &format!("{}/{name}", nas_url(&fleet)));
        assert_eq!(code, 200, "{name}");
        let ours = String::from_utf8(body).expect("utf-8");
        let theirs = std::fs::read_to_string(cache.join(&name)).expect("nix copy's narinfo");
        let strip = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with("URL: "))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            strip(&ours),
            strip(&theirs),
            "narinfo of {p}:\nFerry:\n{ours}\nnix copy:\n{theirs}"
        );
    }

    // `nix store sign` with the same key adds exactly the signature Ferry serves: afterwards
    // the path's own signatures include it and the narinfo is unchanged.
    let name = narinfo_name(&paths[0]);
    let (_, before) = get_on(laptop, &format!("{}/{name}", nas_url(&fleet)));
    let mut s = nas.nix_command("nix");
    s.args(["store", "sign", "--key-file"])
        .arg(&key.secret)
        .arg(&paths[0]);
    stdout_of(s, "nix store sign");
    let (_, after) = get_on(laptop, &format!("{}/{name}", nas_url(&fleet)));
    assert_eq!(
        String::from_utf8_lossy(&before),
        String::from_utf8_lossy(&after),
        "nix store sign added a different signature"
    );

    // Hostile requests: the request-path rules apply to the local store too.
    for t in [
        "nar/../../etc/passwd".to_owned(),
        "nar/%2e%2e/%2e%2e/etc/passwd".to_owned(),
        format!("nar/{}-..%2f..%2fetc%2fpasswd.nar", &name[..32]),
        "..%2f..%2fnix%2fvar%2fnix%2fdb%2fdb.sqlite".to_owned(),
    ] {
        let out = laptop
            .command("curl")
            .args([
                "-s",
                "--path-as-is",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg(format!("{}/{t}", nas_url(&fleet)))
            .output()
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "404", "{t}");
    }

    let m = nas_metrics(&fleet);
    assert_metric_at_least(&m, "ferry_substituter_local_narinfo_hits_total", 3.0);
    assert_metric_at_least(&m, "ferry_substituter_local_nar_requests_total", 3.0);
    assert_metric_eq(&m, "ferry_substituter_local_nar_aborts_total", 0.0);
    assert_metric_eq(&m, "ferry_substituter_local_errors_total", 0.0);
}

/// Like [`producer_only_drv`], with a leaf of 32 files of 1 MiB (a tree, so that collecting
/// it mid-stream removes files Ferry has not opened yet).
fn producer_only_tree_drv(nonce: &str) -> String {
    producer_only_chain(
        nonce,
        "mkdir $out; for i in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31; do head -c 1048576 /dev/urandom > $out/f$i; done",
    )
}

#[test]
fn a_path_collected_mid_stream_is_never_imported_truncated() {
    let (fleet, _key, _keys, nas_log) = nas_and_laptop();
    let expr = producer_only_tree_drv(&nonce());
    let paths = build_on_producer(&fleet, &expr);
    let nas = fleet.host("producer");
    let mut q = nas.nix_command("nix-store");
    q.args(["-qR", &paths[0]]);
    let closure: Vec<String> = stdout_of(q, "nix-store -qR")
        .lines()
        .map(str::to_owned)
        .collect();

    // The NAS's link is slow (32 MiB take some 5 s), so the path is collected mid-stream.
    ferry_integration::throttle_host(nas, "50mbit", "64kb").expect("tc");
    let build = fleet
        .host("laptop")
        .nix_command("nix-build")
        .args(["--no-out-link", "-j1", "-E", &expr])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nix-build");
    let start = Instant::now();
    loop {
        let m = nas_metrics(&fleet);
        if metric(&m, "ferry_substituter_local_nar_bytes_total") > 2_000_000.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no NAR streamed:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Collect the closure on the NAS (nothing roots it). `--ignore-liveness`: Nix's GC counts
    // open files as runtime roots (`/proc/*/fd`), so it would refuse while Ferry reads one of
    // the leaf's files; between two files it would not, and that is the case made sure here.
    // The daemon refuses `--ignore-liveness` to its clients: root collects directly.
    let mut d = nas.command("nix-store");
    d.env("NIX_REMOTE", "local")
        .args(["--delete", "--ignore-liveness"])
        .args(&closure);
    stdout_of(d, "nix-store --delete");
    let out = build.wait_with_output().expect("nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "laptop nix-build after the collection: {}\n{stderr}",
        out.status
    );

    // Nix got an error (or retried and found the path gone): never a corrupt import. Every
    // path the laptop holds verifies; the big leaf is not valid there.
    let laptop = fleet.host("laptop");
    for p in &closure {
        let mut v = laptop.nix_command("nix-store");
        v.args(["--check-validity", p]);
        let valid = v
            .stdin(Stdio::null())
            .output()
            .expect("check")
            .status
            .success();
        if valid {
            let mut v = laptop.nix_command("nix-store");
            v.args(["--verify-path", p]);
            stdout_of(v, "nix-store --verify-path");
        }
        if p.contains("-ferry-sub-leaf-") {
            assert!(
                !valid,
                "the collected leaf was imported on the laptop:\n{stderr}"
            );
        }
    }
    assert!(
        !out.status.success(),
        "the build cannot succeed without the leaf:\n{stderr}"
    );
    let m = nas_metrics(&fleet);
    assert!(
        metric(&m, "ferry_substituter_local_nar_aborts_total") >= 1.0,
        "{m}\n{}",
        std::fs::read_to_string(&nas_log).unwrap_or_default()
    );
}
