//! `ferry-substituter` as the only substituter of a real Nix 2.8 daemon on the fleet, with
//! real upstream caches on LAN hosts: a healthy signed cache made by `nix copy`, and caches
//! that black-hole, answer 500, answer garbage 200s, drip, or reset mid-NAR.
//!
//! The paths to substitute are built on a separate producer host by derivations whose builder
//! fails anywhere else: a successful client build proves they were substituted. Nix's stderr
//! must show no warning, retry or error: Ferry answers Nix only with 200 or 404.
//!
//! No test starts Ferry with its default upstream (cache.nixos.org): all upstreams are on the
//! fleet or in local directories. These tests need root (namespaces), like the other fleet tests.

use ferry_integration::support::substituter as substituter_support;

use ferry_integration::{blackhole_port, check, nonce, out_paths, stdout_of, trivial_drv};
use std::time::{Duration, Instant};
use substituter_support::*;

#[test]
fn substitutes_signed_paths_and_prefers_a_trusted_answer() {
    let (mut fleet, key, _keys) = producer_fleet();
    // Same key name, different key: its signatures do not verify.
    let (impostor, _impostor_dir) = temp_key("ferry-test-cache-1");
    let expr = producer_only_drv(&nonce(), 1000);
    let paths = build_on_producer(&fleet, &expr);
    let good_dir = fleet.root.path().join("cache-good");
    let bad_dir = fleet.root.path().join("cache-impostor");
    copy_to_cache(&fleet, &paths, &good_dir, &key.secret, "xz");
    copy_to_cache(&fleet, &paths, &bad_dir, &impostor.secret, "xz");
    let good = serve_cache(&mut fleet, "cache-good", "good", &good_dir);

    // The impostor cache comes first: Ferry must pass over its untrusted answers.
    let ferry = start_ferry(&fleet, &[format!("file://{}", bad_dir.display()), good], "");

    let (out, elapsed) = substitute_through_ferry(
        &fleet,
        &ferry,
        &expr,
        "nix-build through Ferry",
        "substitution through Ferry",
    );
    assert_eq!(out_paths(&out), paths, "same output paths as the producer");
    eprintln!("substituted a 3-path closure in {elapsed:?}");

    // The whole closure is valid on the client, with the producer's NAR hashes.
    let top = &paths[0];
    let mut v = fleet.client_command("nix-store");
    v.args(["--verify-path", top]);
    stdout_of(v, "nix-store --verify-path");
    let mut q = fleet.client_command("nix-store");
    q.args(["-qR", top]);
    let closure = stdout_of(q, "nix-store -qR");
    assert_eq!(closure.lines().count(), 3, "{closure}");

    // The narinfo Ferry serves is the trusted cache's, byte for byte (signatures included).
    let name = narinfo_name(top);
    let (code, body) = http_get(&fleet, &format!("{}/{name}", ferry_url()), &[]);
    assert_eq!(code, 200);
    let original = std::fs::read(good_dir.join(&name)).expect("narinfo in the cache");
    assert_eq!(body, original, "narinfo not passed through byte for byte");
    let impostor_text = std::fs::read(bad_dir.join(&name)).expect("impostor narinfo");
    assert_ne!(body, impostor_text);

    // HEAD works too, and unknown hashes are 404.
    let (code, _) = http_get(&fleet, &format!("{}/{name}", ferry_url()), &["-I"]);
    assert_eq!(code, 200, "HEAD narinfo");
    let (code, _) = http_get(
        &fleet,
        &format!("{}/00000000000000000000000000000000.narinfo", ferry_url()),
        &[],
    );
    assert_eq!(code, 404);
    let m = metrics(&fleet);
    assert_metric_at_least(&m, "ferry_substituter_narinfo_hits_total", 3.0);
}

#[test]
fn builds_locally_when_no_upstream_has_the_path_and_remembers_the_miss() {
    let (key, _keys) = temp_key("ferry-test-cache-1");
    let mut fleet = fleet(&key.public);
    let dir = fleet.root.path().join("cache-empty");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").expect("cache info");
    let up = serve_cache(&mut fleet, "cache-empty", "good", &dir);
    let ferry = start_ferry(
        &fleet,
        std::slice::from_ref(&up),
        "negative-ttl-secs = 300\n",
    );

    let expr = trivial_drv(&nonce(), "local");
    let (out, stderr, _) = client_build(&fleet, &expr);
    check(&out, "local build behind Ferry")
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_text()));
    assert_quiet(&stderr, "local fallback");
    assert!(fleet.client.has_store_path(&out_paths(&out)[0]));

    // A definitive miss is remembered: the second request does not reach the upstream.
    let url = format!("{}/11111111111111111111111111111111.narinfo", ferry_url());
    let label = format!("{{upstream=\"{up}\"}}");
    let before = metric(
        &metrics(&fleet),
        &format!("ferry_substituter_upstream_misses_total{label}"),
    );
    assert_eq!(http_get(&fleet, &url, &[]).0, 404);
    assert_eq!(http_get(&fleet, &url, &[]).0, 404);
    let m = metrics(&fleet);
    let after = metric(
        &m,
        &format!("ferry_substituter_upstream_misses_total{label}"),
    );
    assert_eq!(after - before, 1.0, "the upstream was asked again:\n{m}");
    assert_metric_at_least(&m, "ferry_substituter_negative_cache_hits_total", 1.0);
}

#[test]
fn faulty_upstreams_are_invisible_to_nix() {
    let (mut fleet, key, _keys) = producer_fleet();
    let good_dir = fleet.root.path().join("cache-good");
    let exprs: Vec<String> = (0..2).map(|_| producer_only_drv(&nonce(), 1000)).collect();
    for e in &exprs {
        let paths = build_on_producer(&fleet, e);
        copy_to_cache(&fleet, &paths, &good_dir, &key.secret, "xz");
    }
    let hole = serve_cache(&mut fleet, "cache-hole", "good", &good_dir);
    blackhole_port(fleet.host("cache-hole"), CACHE_PORT).expect("blackhole");
    let error = serve_cache(&mut fleet, "cache-500", "error", &good_dir);
    let garbage = serve_cache(&mut fleet, "cache-junk", "garbage", &good_dir);
    let drip = serve_cache(&mut fleet, "cache-drip", "drip", &good_dir);
    let good = serve_cache(&mut fleet, "cache-good", "good", &good_dir);
    let faulty = [hole.clone(), error.clone(), garbage.clone(), drip.clone()];
    let mut ups = faulty.to_vec();
    ups.push(good);
    // Breakers stay open for the whole test once they open.
    let ferry = start_ferry_with(&fleet, &ups, "", "breaker-cooldown-ms = 60000\n");

    // nix-cache-info is local and immediate whatever the upstreams do.
    let t = Instant::now();
    let (code, body) = http_get(&fleet, &format!("{}/nix-cache-info", ferry_url()), &[]);
    assert_eq!(code, 200);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 20\n"
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    let (_, first) = substitute_through_ferry(
        &fleet,
        &ferry,
        &exprs[0],
        "nix-build with faulty upstreams",
        "faulty upstreams",
    );

    // A few misses make sure every faulty upstream failed at least 3 times.
    for i in 0..3 {
        let url = format!("{}/{}.narinfo", ferry_url(), format!("{i}").repeat(32));
        let t = Instant::now();
        assert_eq!(
            http_get(&fleet, &url, &[]).0,
            404,
            "only 404 for a miss under faults"
        );
        // A 404 waits until every faulty upstream is known to be down (its breaker open:
        // three failures with no success in between), never a false miss (issue 12): the
        // first miss pays for the drip upstream's three read time-outs; later ones are quick.
        let limit = Duration::from_secs(if i == 0 { 10 } else { 2 });
        assert!(t.elapsed() < limit, "miss {i} took {:?}", t.elapsed());
    }
    let m = metrics(&fleet);
    for u in &faulty {
        let state = metric(
            &m,
            &format!("ferry_substituter_upstream_breaker_state{{upstream=\"{u}\"}}"),
        );
        assert_eq!(state, 1.0, "breaker of {u} not open:\n{m}");
    }
    // Errors never become negative entries.
    assert_metric_eq(&m, "ferry_substituter_negative_cache_hits_total", 0.0);
    assert_metric_at_least(&m, "ferry_substituter_incomplete_misses_total", 3.0);

    // With the breakers open the dead upstreams cost next to nothing.
    let (_, second) = substitute_through_ferry(
        &fleet,
        &ferry,
        &exprs[1],
        "second nix-build, breakers open",
        "faulty upstreams, breakers open",
    );
    eprintln!("3-path closure with 4 faulty upstreams first: {first:?}, breakers open: {second:?}");
    assert!(
        second < Duration::from_secs(5),
        "second build took {second:?}"
    );

    // `status` reads the running instance.
    let status = stdout_of(
        {
            let mut c = fleet.client.command(
                ferry_integration::ferry_bin("ferry-substituter")
                    .to_str()
                    .expect("path"),
            );
            c.env("FERRY_CONFIG", "/nonexistent")
                .args(["status", "--url", &ferry_url()]);
            c
        },
        "ferry-substituter status",
    );
    assert!(status.contains("breaker OPEN"), "{status}");
}

#[test]
fn nar_resumes_from_another_upstream_and_never_truncates_silently() {
    let (mut fleet, key, _keys) = producer_fleet();
    let expr = producer_only_drv(&nonce(), 2_000_000);
    let paths = build_on_producer(&fleet, &expr);
    let dir = fleet.root.path().join("cache-good");
    copy_to_cache(&fleet, &paths, &dir, &key.secret, "none");
    let reset = serve_cache(&mut fleet, "cache-reset", "reset", &dir);
    let good = serve_cache(&mut fleet, "cache-good", "good", &dir);

    // The first upstream resets every NAR after 64 KiB: Ferry resumes from the second.
    let ferry = start_ferry(&fleet, &[reset.clone(), good], "");
    substitute_through_ferry(
        &fleet,
        &ferry,
        &expr,
        "nix-build with a resetting upstream",
        "resetting upstream",
    );
    let m = metrics(&fleet);
    assert_metric_at_least(&m, "ferry_substituter_nar_resumes_total", 1.0);
    assert_metric_eq(&m, "ferry_substituter_nar_aborts_total", 0.0);

    // Range requests are honoured byte for byte.
    let leaf = paths_of_closure(&fleet, &paths[0])
        .into_iter()
        .find(|p| p.contains("-ferry-sub-leaf-"))
        .expect("leaf");
    let narinfo = std::fs::read_to_string(dir.join(narinfo_name(&leaf))).expect("leaf narinfo");
    let nar_url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL")
        .to_owned();
    let file = std::fs::read(dir.join(&nar_url)).expect("nar file");
    let (code, body) = http_get(
        &fleet,
        &format!("{}/{nar_url}", ferry_url()),
        &["-r", "1000-1999"],
    );
    assert_eq!(code, 206);
    assert_eq!(body, file[1000..2000]);
    drop(ferry);

    // With no upstream able to resume, the stream is cut: never a short body that looks whole.
    let _ferry = start_ferry(&fleet, &[reset], "");
    let r = http_get_full(&fleet, &format!("{}/{nar_url}", ferry_url()), &[]);
    assert_eq!(r.status, 200, "the headers were sent before the failure");
    assert_ne!(
        r.curl_exit,
        0,
        "curl saw a complete body of {} bytes",
        r.body.len()
    );
    assert!(r.body.len() < file.len());
    // A NAR nobody has is a 404 before the first byte.
    let (code, _) = http_get(
        &fleet,
        &format!("{}/nar/doesnotexist.nar", ferry_url()),
        &[],
    );
    assert_eq!(code, 404);
}

#[test]
fn disk_cache_substitutes_again_with_the_upstream_gone_after_a_restart() {
    let (mut fleet, key, _keys) = producer_fleet();
    let expr = producer_only_drv(&nonce(), 1_000_000);
    let paths = build_on_producer(&fleet, &expr);
    let dir = fleet.root.path().join("cache-good");
    // xz: the narinfos carry FileHash/FileSize, which Ferry checks before keeping a NAR.
    copy_to_cache(&fleet, &paths, &dir, &key.secret, "xz");
    let good = serve_cache(&mut fleet, "cache-good", "good", &dir);
    let cache_dir = fleet.root.path().join("ferry-disk-cache");
    let conf = format!(
        "cache-dir = \"{}\"\ncache-max-size = \"1G\"\n",
        cache_dir.display()
    );
    let ferry = start_ferry(&fleet, std::slice::from_ref(&good), &conf);
    substitute_through_ferry(
        &fleet,
        &ferry,
        &expr,
        "first substitution through Ferry",
        "first substitution",
    );
    let t = Instant::now();
    while metric(&metrics(&fleet), "ferry_substituter_disk_nar_stored_total") < 3.0 {
        assert!(t.elapsed() < Duration::from_secs(5), "{}", metrics(&fleet));
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(ferry);

    // The upstream disappears, Ferry restarts (nothing in memory), the client loses the paths.
    blackhole_port(fleet.host("cache-good"), CACHE_PORT).expect("blackhole");
    let ferry = start_ferry(&fleet, std::slice::from_ref(&good), &conf);
    let closure = paths_of_closure(&fleet, &paths[0]);
    let mut del = fleet.client_command("nix-store");
    del.arg("--delete").args(&closure);
    stdout_of(del, "nix-store --delete");
    assert!(!fleet.client.has_store_path(&paths[0]));

    let t = Instant::now();
    substitute_through_ferry(
        &fleet,
        &ferry,
        &expr,
        "substitution from Ferry's disk cache",
        "substitution from disk",
    );
    eprintln!(
        "3-path closure from the disk cache, upstream black-holed: {:?}",
        t.elapsed()
    );
    let mut v = fleet.client_command("nix-store");
    v.args(["--verify-path", &paths[0]]);
    stdout_of(v, "nix-store --verify-path");
    let m = metrics(&fleet);
    assert_metric_eq(&m, "ferry_substituter_disk_nar_hits_total", 3.0);
    // Nix had the narinfos in its own cache; asked directly, Ferry serves them from disk,
    // byte for byte as the upstream wrote them.
    for p in &closure {
        let name = narinfo_name(p);
        let (code, body) = http_get(&fleet, &format!("{}/{name}", ferry_url()), &[]);
        assert_eq!(code, 200, "{name}");
        assert_eq!(body, std::fs::read(dir.join(&name)).expect("narinfo"));
    }
    let m = metrics(&fleet);
    assert_metric_eq(&m, "ferry_substituter_disk_narinfo_hits_total", 3.0);
}

/// 25 store paths built on the producer only: 24 leaves and a top referring to them all.
fn producer_only_wide_drv(nonce: &str) -> String {
    let sys = ferry_integration::SYSTEM;
    format!(
        r#"let
  mk = name: script: builtins.derivation {{ name = "ferry-wide-${{name}}-{nonce}"; system = "{sys}"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    args = [ "-c" ("if [ ! -e {PRODUCER_MARKER} ]; then echo 'ferry-test: built locally, not substituted' >&2; exit 1; fi; " + script) ]; }};
  leaves = builtins.genList (i: mk "leaf${{toString i}}" "echo ${{toString i}} > $out") 24;
in mk "top" ("mkdir $out; echo " + builtins.concatStringsSep " " (map toString leaves) + " > $out/leaves")"#
    )
}

/// Issue 12, "never a false miss": a LAN cache that is alive but slow to accept (one request
/// at a time, a listen backlog of 1, so a burst overflows its accept queue and SYNs are
/// dropped) under a burst of 25 parallel narinfo requests, the way Nix queries a closure.
/// With a 200 ms connect time-out and two retries, Ferry answered 404 ("not found, incomplete
/// answers") for paths the cache holds, and Nix remembered each miss for an hour. Every
/// answer must now be a 200; and Nix substitutes the whole closure.
#[test]
fn a_slow_to_accept_upstream_under_a_burst_gives_no_false_404() {
    let (mut fleet, key, _keys) = producer_fleet();
    let expr = producer_only_wide_drv(&nonce());
    let top = build_on_producer(&fleet, &expr);
    let closure = paths_of_closure_on(&fleet, "producer", &top[0]);
    assert_eq!(closure.len(), 25, "{closure:?}");
    let dir = fleet.root.path().join("cache-slow");
    copy_to_cache(&fleet, &top, &dir, &key.secret, "none");
    let slow = serve_cache(&mut fleet, "cache-slow", "slow", &dir);
    let ferry = start_ferry(&fleet, std::slice::from_ref(&slow), "");

    // curl in the client's namespace (every Nix version's root has it): 25 transfers at once,
    // each on its own connection.
    let mut c = fleet.client.command("curl");
    c.args([
        "-s",
        "--max-time",
        "60",
        "--parallel",
        "--parallel-immediate",
        "--parallel-max",
        "25",
        "-w",
        "%{http_code}\\n",
    ]);
    for p in &closure {
        c.args(["-o", "/dev/null"])
            .arg(format!("{}/{}", ferry_url(), narinfo_name(p)));
    }
    let t = Instant::now();
    let out = stdout_of(c, "curl --parallel");
    eprintln!(
        "burst of 25 narinfo requests through Ferry to a slow-accept cache: {:?}",
        t.elapsed()
    );
    let statuses: Vec<u16> = out
        .lines()
        .map(|l| l.trim().parse().expect("status"))
        .collect();
    assert_eq!(statuses.len(), 25);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "not every answer was a 200 (404 = a false miss): {statuses:?}\nferry log:\n{}",
        ferry.log_text()
    );
    let m = metrics(&fleet);
    assert_metric_eq(&m, "ferry_substituter_incomplete_misses_total", 0.0);

    // Nix itself substitutes the closure through Ferry (its narinfos are warm now; the NARs
    // come from the slow cache one at a time).
    let (_, elapsed) = substitute_through_ferry(
        &fleet,
        &ferry,
        &expr,
        "nix-build from a slow-accept cache",
        "slow-accept cache",
    );
    eprintln!("25-path closure from a slow-accept cache through Ferry: {elapsed:?}");
}

fn paths_of_closure(fleet: &ferry_integration::Fleet, top: &str) -> Vec<String> {
    let mut q = fleet.client_command("nix-store");
    q.args(["-qR", top]);
    stdout_of(q, "nix-store -qR")
        .lines()
        .map(str::to_owned)
        .collect()
}
