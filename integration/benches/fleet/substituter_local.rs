//! Serving the local store (a NAS's store over the LAN) against nginx over a `nix copy`ed
//! directory.

use crate::driver::{client_driver, json_num};
use ferry_integration::support::substituter as substituter_support;
use ferry_integration::{nonce, stdout_of};
use std::time::Instant;
use substituter_support::*;

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
/// `dev/bench local_store`
pub fn bench_local_store_against_nginx_and_nix_copy() {
    // The Python driver exists on hosts of this machine's Nix only.
    if ferry_integration::Nix::under_test() != ferry_integration::Nix::native() {
        eprintln!(
            "bench_local_store_against_nginx_and_nix_copy: runs with this machine's Nix only"
        );
        return;
    }
    let (key, _keys) = temp_key("nas-1");
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
        r.push(client_driver(
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
        r.push(client_driver(
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
        r.push(client_driver(&fleet, &["throughput", &url, "5"]));
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
