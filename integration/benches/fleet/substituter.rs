//! The substituter on the fleet: against the upstream asked directly, and stock Nix against
//! Ferry with a black-holed first cache.

use crate::driver::{client_driver, json_num};
use ferry_integration::support::substituter as substituter_support;
use ferry_integration::{blackhole_port, nonce};
use std::time::{Duration, Instant};
use substituter_support::*;

/// Benchmarks, as ratios against the same upstream asked directly in the same run (the
/// upstream is the fixture's Python cache server; the client is one Python driver for both):
/// warm narinfo latency, the cost of a black-holed first-priority upstream before and after
/// its breaker opens, and NAR pass-through throughput.
/// `dev/bench substituter_against`
pub fn bench_substituter_against_direct_upstream() {
    // Ferry's own figures against the upstream asked directly: nothing here depends on the
    // client's Nix, and the driver is the machine's Python, so it runs in the pass for the
    // machine's own Nix only.
    if ferry_integration::Nix::under_test() != ferry_integration::Nix::native() {
        eprintln!("bench_substituter_against_direct_upstream: runs with this machine's Nix only");
        return;
    }
    let (mut fleet, key, _keys) = producer_fleet();
    let dir = fleet.root.path().join("cache-good");
    // Nine small closures' paths (for cold lookups) and one 64 MiB NAR.
    let mut small = Vec::new();
    for _ in 0..3 {
        let paths = build_on_producer(&fleet, &producer_only_drv(&nonce(), 1000));
        copy_to_cache(&fleet, &paths, &dir, &key.secret, "none");
        small.extend(paths_of_closure_on(&fleet, "producer", &paths[0]));
    }
    let big = build_on_producer(&fleet, &producer_only_drv(&nonce(), 64 << 20));
    copy_to_cache(&fleet, &big, &dir, &key.secret, "none");
    let big_leaf = paths_of_closure_on(&fleet, "producer", &big[0])
        .into_iter()
        .find(|p| p.contains("-ferry-sub-leaf-"))
        .expect("leaf");
    let good = serve_cache(&mut fleet, "cache-good", "good", &dir);
    let hole = serve_cache(&mut fleet, "cache-hole", "good", &dir);
    blackhole_port(fleet.host("cache-hole"), CACHE_PORT).expect("blackhole");

    // 1. Warm narinfo, sequential on one keep-alive connection.
    let ferry = start_ferry(&fleet, std::slice::from_ref(&good), "");
    let name = narinfo_name(&small[0]);
    let direct = client_driver(&fleet, &["latency", &format!("{good}/{name}"), "2000"]);
    let via = client_driver(
        &fleet,
        &["latency", &format!("{}/{name}", ferry_url()), "2000"],
    );
    let (d50, f50) = (json_num(&direct, "p50_us"), json_num(&via, "p50_us"));
    let (d99, f99) = (json_num(&direct, "p99_us"), json_num(&via, "p99_us"));
    eprintln!(
        "warm narinfo p50: direct {d50:.0} µs, Ferry {f50:.0} µs (ratio {:.2}); p99: direct {d99:.0} µs, Ferry {f99:.0} µs (ratio {:.2})",
        f50 / d50,
        f99 / d99
    );

    // 3. NAR pass-through.
    let narinfo = std::fs::read_to_string(dir.join(narinfo_name(&big_leaf))).expect("narinfo");
    let nar = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL")
        .to_owned();
    let direct = client_driver(&fleet, &["throughput", &format!("{good}/{nar}"), "5"]);
    let via = client_driver(
        &fleet,
        &["throughput", &format!("{}/{nar}", ferry_url()), "5"],
    );
    let (d, f) = (json_num(&direct, "mib_s"), json_num(&via, "mib_s"));
    eprintln!(
        "NAR 64 MiB pass-through: direct {d:.0} MiB/s, Ferry {f:.0} MiB/s (ratio {:.2})",
        f / d
    );
    drop(ferry);

    // 2. A black-holed first upstream: cold lookups of distinct paths, one after another.
    let _ferry = start_ferry_with(
        &fleet,
        &[hole, good.clone()],
        "",
        "breaker-cooldown-ms = 60000\n",
    );
    let urls: Vec<String> = small
        .iter()
        .map(|p| format!("{}/{}", ferry_url(), narinfo_name(p)))
        .collect();
    let direct_urls: Vec<String> = small
        .iter()
        .map(|p| format!("{good}/{}", narinfo_name(p)))
        .collect();
    let mut args = vec!["each"];
    args.extend(urls.iter().map(String::as_str));
    let via = client_driver(&fleet, &args);
    let mut args = vec!["each"];
    args.extend(direct_urls.iter().map(String::as_str));
    let direct = client_driver(&fleet, &args);
    let ms = |j: &str| -> Vec<f64> {
        j.split("\"ms\": ")
            .skip(1)
            .filter_map(|r| r.split(',').next()?.parse().ok())
            .collect()
    };
    let (via, direct) = (ms(&via), ms(&direct));
    let direct_mean = direct.iter().sum::<f64>() / direct.len() as f64;
    let open: Vec<f64> = via[3..].to_vec();
    let open_mean = open.iter().sum::<f64>() / open.len() as f64;
    eprintln!(
        "black-holed first upstream, cold narinfo: direct to the healthy upstream {direct_mean:.2} ms; \
         Ferry with the breaker closed {:.0} ms, {:.0} ms, {:.0} ms; after it opened {open_mean:.2} ms \
         (ratio {:.2}); stock Nix 2.8 with such a substituter: 10–25 min per narinfo (docs/binary-cache.md §2.2)",
        via[0],
        via[1],
        via[2],
        open_mean / direct_mean
    );
}

/// Runs `nix-store --realise paths` on `host` with a time limit; `None` if it was still
/// running at `limit` (then killed), else the time and whether it succeeded.
fn timed_realise(
    host: &ferry_integration::Host,
    paths: &[String],
    limit: Duration,
) -> Option<(Duration, bool)> {
    let mut c = host.nix_command("nix-store");
    c.arg("--realise")
        .args(paths)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let t = Instant::now();
    let mut child = c.spawn().expect("nix-store --realise");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some((t.elapsed(), status.success()));
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Benchmark, per Nix version (`FERRY_NIX`; `dev/bench` runs each): 9 paths substituted by a
/// fresh client whose first cache is black-holed, stock Nix (the cache list in its own
/// `substituters`, untuned and tuned with `connect-timeout = 2`) against the same client
/// behind Ferry (upstreams black-holed then healthy), and the healthy cache alone as the
/// floor, in the same run.
pub fn bench_dead_first_cache_stock_vs_ferry() {
    let (mut fleet, key, _keys) = producer_fleet();
    let dir = fleet.root.path().join("cache-good");
    let mut paths = Vec::new();
    for _ in 0..3 {
        let top = build_on_producer(&fleet, &producer_only_drv(&nonce(), 1000));
        copy_to_cache(&fleet, &top, &dir, &key.secret, "none");
        paths.extend(paths_of_closure_on(&fleet, "producer", &top[0]));
    }
    let good = serve_cache(&mut fleet, "cache-good", "good", &dir);
    let hole = serve_cache(&mut fleet, "cache-hole", "good", &dir);
    blackhole_port(fleet.host("cache-hole"), CACHE_PORT).expect("blackhole");
    let limit = Duration::from_secs(60);
    let mut stock_client = |role: &str, substituters: &str, extra: &str| {
        let h = fleet.add_client(role).expect("client host");
        h.write_nix_conf(&format!(
            "substituters = {substituters}\ntrusted-public-keys = {}\nrequire-sigs = true\nmax-jobs = 0\n{extra}",
            key.public
        ))
        .expect("nix.conf");
        h.start_nix_daemon(&[]).expect("daemon");
    };
    stock_client("direct", &good, "");
    stock_client("stock", &format!("{hole} {good}"), "");
    stock_client("tuned", &format!("{hole} {good}"), "connect-timeout = 2\n");
    let run = |role: &str| timed_realise(fleet.host(role), &paths, limit);
    let direct = run("direct");
    let stock = run("stock");
    let tuned = run("tuned");
    let _ferry = start_ferry(&fleet, &[hole, good], "");
    let via = timed_realise(&fleet.client, &paths, limit);
    let show = |r: Option<(Duration, bool)>| match r {
        None => format!("> {} s (stopped)", limit.as_secs()),
        Some((d, true)) => format!("{:.2} s", d.as_secs_f64()),
        Some((d, false)) => format!("failed after {:.2} s", d.as_secs_f64()),
    };
    let secs =
        |r: Option<(Duration, bool)>| r.map_or(limit.as_secs_f64(), |(d, _)| d.as_secs_f64());
    assert!(via.is_some_and(|(_, ok)| ok), "Ferry: {}", show(via));
    eprintln!(
        "{}: {} paths, first cache black-holed: healthy cache alone {}; stock {}; stock tuned (connect-timeout = 2) {}; \
         Ferry {} (Ferry/tuned {:.3}, Ferry/untuned <= {:.3})",
        ferry_integration::Nix::under_test(),
        paths.len(),
        show(direct),
        show(stock),
        show(tuned),
        show(via),
        secs(via) / secs(tuned),
        secs(via) / secs(stock),
    );
}
