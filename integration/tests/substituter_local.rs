//! `ferry-substituter` serving a host's own store to the LAN (`[substituter.local]`, the
//! desktop or NAS role of nix-serve and harmonia), with real Nix on both sides: a "nas" host
//! builds and serves its store on its LAN address; a "laptop" host with `require-sigs`
//! substitutes from it. Runs on every Nix version of the matrix (`FERRY_NIX`): the NAS reads
//! that version's database.
//!
//! No test starts Ferry with an upstream: `[substituter.local]` alone needs none (and never
//! falls back to cache.nixos.org). These tests need root (namespaces), like the other fleet
//! tests.

mod substituter_support;

use ferry_integration::{Fleet, FleetConfig, Host, SYSTEM, check, ferry_bin, nonce, out_paths};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use substituter_support::*;

fn stdout_of(mut c: Command, what: &str) -> String {
    let out = c.stdin(Stdio::null()).output().expect(what);
    check(&out, what).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The NAS's URL as the laptop sees it.
fn nas_url(fleet: &Fleet) -> String {
    format!("http://{}:{FERRY_PORT}", fleet.host("producer").addr)
}

/// A fleet with a NAS (the producer: builds, serves its store) and no laptop yet.
fn nas_fleet() -> Fleet {
    let mut fleet = Fleet::start(FleetConfig {
        builders: 0,
        client_conf: String::new(),
        ..Default::default()
    })
    .expect("fleet");
    add_producer(&mut fleet);
    fleet
}

/// A laptop whose only substituter is the NAS, trusting `public_key`, signatures required.
fn add_laptop(fleet: &mut Fleet, public_key: &str) {
    let url = nas_url(fleet);
    let h = fleet.add_client("laptop").expect("laptop");
    h.write_nix_conf(&format!(
        "substituters = {url}\ntrusted-substituters = {url}\ntrusted-public-keys = {public_key}\n\
         require-sigs = true\nconnect-timeout = 5\nstalled-download-timeout = 10\n"
    ))
    .expect("laptop nix.conf");
    h.start_nix_daemon(&[]).expect("laptop daemon");
}

/// Ferry on the NAS, on its LAN address, serving its store signed with `secret`.
fn start_nas_ferry(fleet: &mut Fleet, secret: &Path) -> PathBuf {
    let dir = fleet.root.path().to_path_buf();
    let conf = dir.join("ferry-nas.toml");
    let nas = fleet.host("producer");
    std::fs::write(
        &conf,
        format!(
            "[substituter]\nlisten = \"{}:{FERRY_PORT}\"\n\n[substituter.local]\nsecret-key-files = [\"{}\"]\n",
            nas.addr,
            secret.display()
        ),
    )
    .expect("ferry.toml");
    let log = dir.join("ferry-nas.log");
    let logf = std::fs::File::create(&log).expect("log");
    let child = nas
        .command(ferry_bin("ferry-substituter").to_str().expect("utf-8"))
        .env("FERRY_CONFIG", &conf)
        .env("RUST_LOG", "ferry_substituter=debug,info")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf)
        .spawn()
        .expect("starting ferry-substituter");
    let nas = fleet
        .others
        .iter_mut()
        .find(|h| h.role == "producer")
        .expect("nas");
    nas.adopt(child);
    ferry_integration::wait_listening(nas, FERRY_PORT)
        .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    log
}

/// GET `url` with curl from `host`: (status, body).
fn get_on(host: &Host, url: &str) -> (u16, Vec<u8>) {
    let out = host
        .command("curl")
        .args(["-s", "--max-time", "30", "-w", "\n%{http_code}", url])
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    let mut body = out.stdout;
    let nl = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&body[nl + 1..])
        .trim()
        .parse()
        .unwrap_or(0);
    body.truncate(nl);
    (code, body)
}

fn nas_metrics(fleet: &Fleet) -> String {
    let (code, body) = get_on(fleet.host("laptop"), &format!("{}/metrics", nas_url(fleet)));
    assert_eq!(code, 200);
    String::from_utf8_lossy(&body).into_owned()
}

fn laptop_build(fleet: &Fleet, expr: &str) -> std::process::Output {
    fleet
        .host("laptop")
        .nix_command("nix-build")
        .args(["--no-out-link", "-j1", "-E", expr])
        .stdin(Stdio::null())
        .output()
        .expect("nix-build on the laptop")
}

#[test]
fn a_laptop_substitutes_what_the_nas_built_signed_on_the_fly() {
    let keys = tempfile::tempdir().expect("tempdir");
    let key = generate_key(keys.path(), "nas-1");
    let mut fleet = nas_fleet();
    let nas_log = start_nas_ferry(&mut fleet, &key.secret);
    add_laptop(&mut fleet, &key.public);
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
    assert!(
        metric(&m, "ferry_substituter_local_narinfo_hits_total") >= 3.0,
        "{m}"
    );
    assert!(
        metric(&m, "ferry_substituter_local_nar_requests_total") >= 3.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "ferry_substituter_local_nar_aborts_total"),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "ferry_substituter_local_errors_total"),
        0.0,
        "{m}"
    );
}

/// Like [`producer_only_drv`], with a leaf of 32 files of 1 MiB (a tree, so that collecting
/// it mid-stream removes files Ferry has not opened yet).
fn producer_only_tree_drv(nonce: &str) -> String {
    format!(
        r#"let
  mk = name: script: builtins.derivation {{ name = "ferry-sub-${{name}}-{nonce}"; system = "{SYSTEM}"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    args = [ "-c" ("if [ ! -e {PRODUCER_MARKER} ]; then echo 'ferry-test: built locally, not substituted' >&2; exit 1; fi; " + script) ]; }};
  leaf = mk "leaf" "mkdir $out; for i in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31; do head -c 1048576 /dev/urandom > $out/f$i; done";
  mid = mk "mid" "mkdir $out; echo ${{leaf}} > $out/leaf";
in mk "top" "mkdir $out; echo ${{mid}} > $out/mid""#
    )
}

#[test]
fn a_path_collected_mid_stream_is_never_imported_truncated() {
    let keys = tempfile::tempdir().expect("tempdir");
    let key = generate_key(keys.path(), "nas-1");
    let mut fleet = nas_fleet();
    let nas_log = start_nas_ferry(&mut fleet, &key.secret);
    add_laptop(&mut fleet, &key.public);
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
    ferry_integration::run(Command::new("ip").args([
        "netns",
        "exec",
        &nas.netns,
        "tc",
        "qdisc",
        "replace",
        "dev",
        "to-client",
        "root",
        "tbf",
        "rate",
        "50mbit",
        "burst",
        "64kb",
        "latency",
        "2s",
    ]))
    .expect("tc");
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

/// Runs the benchmark driver in the fleet client's namespace (on the LAN, like the laptop).
fn bench_client(fleet: &Fleet, args: &[&str]) -> String {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/substituter_support/bench_client.py");
    let mut c = fleet.client.command("/usr/bin/python3");
    c.arg(script).args(args);
    stdout_of(c, "bench_client.py")
}

fn json_num(json: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\": ");
    json.split(&pat)
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {json}"))
}

fn narinfo_url_field(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL")
        .to_owned()
}

/// The NAS role against the stock recipe, in the same run: Ferry serving the store directly
/// against nginx serving the same paths as a `nix copy --to file://…?compression=none` cache
/// (the upper bound of a static server): warm narinfo latency on 1 and 25 connections and
/// NAR throughput; and the time until a new build can be substituted, against `nix copy
/// --to file://` (default compression) plus nginx.
/// `cargo test --release -p ferry-integration --test substituter_local -- --ignored --nocapture bench`
#[test]
#[ignore]
fn bench_local_store_against_nginx_and_nix_copy() {
    // The Python driver exists on hosts of this machine's Nix only.
    if ferry_integration::Nix::under_test() != ferry_integration::Nix::native() {
        eprintln!(
            "bench_local_store_against_nginx_and_nix_copy: runs with this machine's Nix only"
        );
        return;
    }
    let keys = tempfile::tempdir().expect("tempdir");
    let key = generate_key(keys.path(), "nas-1");
    let mut fleet = nas_fleet();
    let small = build_on_producer(&fleet, &producer_only_drv(&nonce(), 1000));
    let big = build_on_producer(&fleet, &producer_only_drv(&nonce(), 64 << 20));
    let cache = fleet.root.path().join("www");
    copy_to_cache(&fleet, &small, &cache, &key.secret, "none");
    copy_to_cache(&fleet, &big, &cache, &key.secret, "none");
    start_nas_ferry(&mut fleet, &key.secret);
    let nas = fleet
        .others
        .iter_mut()
        .find(|h| h.role == "producer")
        .expect("nas");
    ferry_integration::start_nginx(nas, CACHE_PORT, &cache, false).expect("nginx");
    let nginx = format!("http://{}:{CACHE_PORT}", fleet.host("producer").addr);
    let ferry = nas_url(&fleet);

    // 1. Warm narinfo, one keep-alive connection.
    let name = narinfo_name(&small[0]);
    let mut r = Vec::new();
    for base in [&nginx, &ferry] {
        r.push(bench_client(
            &fleet,
            &["latency", &format!("{base}/{name}"), "3000"],
        ));
    }
    let (n50, f50) = (json_num(&r[0], "p50_us"), json_num(&r[1], "p50_us"));
    let (n99, f99) = (json_num(&r[0], "p99_us"), json_num(&r[1], "p99_us"));
    eprintln!(
        "BENCH narinfo 1 connection p50: nginx {n50:.0} µs, Ferry {f50:.0} µs (ratio {:.2}, goal <= 1.2); p99 nginx {n99:.0} µs, Ferry {f99:.0} µs",
        f50 / n50
    );

    // 2. Warm narinfo, 25 connections (Nix's http-connections).
    let mut r = Vec::new();
    for base in [&nginx, &ferry] {
        r.push(bench_client(
            &fleet,
            &["concurrent", &format!("{base}/{name}"), "25", "3"],
        ));
    }
    let (n50, f50) = (json_num(&r[0], "p50_us"), json_num(&r[1], "p50_us"));
    let (nr, fr) = (json_num(&r[0], "rps"), json_num(&r[1], "rps"));
    eprintln!(
        "BENCH narinfo 25 connections p50: nginx {n50:.0} µs, Ferry {f50:.0} µs (ratio {:.2}, goal <= 1.2); nginx {nr:.0} req/s, Ferry {fr:.0} req/s (ratio {:.2})",
        f50 / n50,
        fr / nr
    );

    // 3. NAR throughput, 64 MiB, uncompressed on both.
    let leaf = {
        let mut q = fleet.host("producer").nix_command("nix-store");
        q.args(["-qR", &big[0]]);
        stdout_of(q, "nix-store -qR")
            .lines()
            .find(|p| p.contains("-ferry-sub-leaf-"))
            .expect("leaf")
            .to_owned()
    };
    let ln = narinfo_name(&leaf);
    let nginx_nar = narinfo_url_field(&std::fs::read_to_string(cache.join(&ln)).expect("narinfo"));
    let (_, body) = get_on(&fleet.client, &format!("{ferry}/{ln}"));
    let ferry_nar = narinfo_url_field(&String::from_utf8_lossy(&body));
    let mut r = Vec::new();
    for url in [
        format!("{nginx}/{nginx_nar}"),
        format!("{ferry}/{ferry_nar}"),
    ] {
        r.push(bench_client(&fleet, &["throughput", &url, "5"]));
    }
    let (n, f) = (json_num(&r[0], "mib_s"), json_num(&r[1], "mib_s"));
    eprintln!(
        "BENCH NAR 64 MiB: nginx (static file) {n:.0} MiB/s, Ferry (dumped from the store as it streams) {f:.0} MiB/s (ratio {:.2}, goal >= 0.9)",
        f / n
    );

    // 4. A new build (an 8 MiB closure), available to the LAN: Ferry at once; the stock recipe
    //    after `nix copy --to file://` (default compression, signed) into nginx's directory.
    let expr = producer_only_drv(&nonce(), 8 << 20);
    let fresh = build_on_producer(&fleet, &expr);
    let t = Instant::now();
    let (code, _) = get_on(
        &fleet.client,
        &format!("{ferry}/{}", narinfo_name(&fresh[0])),
    );
    let ferry_ready = t.elapsed();
    assert_eq!(code, 200);
    let t = Instant::now();
    let to = format!(
        "file://{}?secret-key={}",
        cache.display(),
        key.secret.display()
    );
    let mut c = fleet.host("producer").nix_command("nix");
    c.args(["copy", "--to", &to]).args(&fresh);
    stdout_of(c, "nix copy --to file://");
    let (code, _) = get_on(
        &fleet.client,
        &format!("{nginx}/{}", narinfo_name(&fresh[0])),
    );
    let stock_ready = t.elapsed();
    assert_eq!(code, 200);
    eprintln!(
        "BENCH new 8 MiB build available to the LAN: Ferry {:.1} ms after the build (the first request), nix copy --to file:// + nginx {:.0} ms (ratio {:.3})",
        ferry_ready.as_secs_f64() * 1e3,
        stock_ready.as_secs_f64() * 1e3,
        ferry_ready.as_secs_f64() / stock_ready.as_secs_f64()
    );
}
