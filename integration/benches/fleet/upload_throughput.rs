//! Benchmark (issue 14): upload throughput of `ferry-post-build` against `nix copy --to` the
//! same `file://` target with the same compression (zstd), on one core and on all cores, for
//! a closure of many small paths and for one large path. Rounds alternate Ferry and
//! `nix copy`, each into a fresh cache directory; the ratio is Ferry's throughput over
//! `nix copy`'s (higher is better), printed with its range over the rounds.
//!
//! One core: the client's nix-daemon (which dumps the NARs for `nix copy`), `nix copy` and the
//! uploader are all pinned to CPU 0 with `taskset`. All cores: nothing is pinned.
//!
//! `FERRY_BENCH_SMALL_MIB` (default 1024) sets the many-small-paths closure, built as 4 MiB
//! paths; `FERRY_BENCH_LARGE_MIB` (default 2048) the single path; `FERRY_BENCH_ROUNDS`
//! (default 5) the rounds. Run by `dev/bench upload_throughput`.

use ferry_integration::support::post_build as post_build_support;

use ferry_integration::{Fleet, SYSTEM, check, nonce, out_paths, run};
use post_build_support::*;
use std::process::Command;
use std::time::Instant;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

/// `n` paths of `mib` MiB each: half random bytes shown as hex (compresses about 2:1, like
/// typical binaries), built locally.
fn build_paths(fleet: &Fleet, n: u64, mib: u64) -> Vec<String> {
    let tag = nonce();
    let drvs: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"(builtins.derivation {{ name = "ferry-tp-{i}-{tag}"; system = "{SYSTEM}"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "head -c {half} /dev/urandom | od -An -x | head -c {bytes} > $out" ]; }})"#,
                half = (mib << 20) / 2,
                bytes = mib << 20
            )
        })
        .collect();
    let out = fleet.nix_build(
        &format!("[ {} ]", drvs.join(" ")),
        &["-j2", "--builders", ""],
    );
    check(&out, "benchmark paths").unwrap_or_else(|e| panic!("{e}"));
    out_paths(&out)
}

fn pin_daemon(fleet: &Fleet, cpus: &str) {
    if let Some(pid) = fleet.client.nix_daemon_pid() {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid])
            .output();
    }
}

/// CPU seconds of process `pid` and of its children it has reaped (`/proc/<pid>/stat`
/// fields 14–17: utime, stime, cutime, cstime).
fn cpu_of(pid: &str) -> f64 {
    let ticks: f64 = ferry_integration::proc_stat(pid)
        .unwrap_or_default()
        .iter()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU of this process's reaped children (the `nix copy` or uploader of a round, through
/// `ip netns exec` and `taskset`) and of the client's nix-daemon with its reaped workers
/// (they dump the NARs for `nix copy` and answer the uploader's `nix path-info`).
fn cpu_now(fleet: &Fleet) -> f64 {
    // Only the children's fields grow here: this process does no work meanwhile.
    cpu_of("self") + fleet.client.nix_daemon_pid().map_or(0.0, |p| cpu_of(&p))
}

/// Wall-clock and CPU seconds of one side of a round.
#[derive(Clone, Copy)]
struct Cost {
    wall: f64,
    cpu: f64,
}

/// Runs `c`, measuring its wall-clock time and the CPU it and the daemon used.
fn measured(fleet: &Fleet, c: &mut Command, what: &str) -> Cost {
    let cpu0 = cpu_now(fleet);
    let t = Instant::now();
    run(c).unwrap_or_else(|e| panic!("{what}: {e}"));
    let wall = t.elapsed().as_secs_f64();
    Cost {
        wall,
        cpu: cpu_now(fleet) - cpu0,
    }
}

/// One round: `nix copy` and Ferry's uploader (`daemon --drain` after `push`), each into a
/// fresh directory.
fn round(
    ferry: &Ferry,
    fleet: &Fleet,
    paths: &[String],
    cpus: Option<&str>,
    k: usize,
) -> (Cost, Cost) {
    let all = "0-1023".to_owned();
    pin_daemon(fleet, cpus.unwrap_or(&all));
    let dir = ferry.dir.path().join(format!("nix-copy-{k}"));
    let mut c = fleet.client_command("taskset");
    c.args([
        "-c",
        cpus.unwrap_or(&all),
        "nix",
        "--extra-experimental-features",
        "nix-command",
        "copy",
        "--to",
    ])
    .arg(format!("file://{}?compression=zstd", dir.display()))
    .args(paths);
    let nix = measured(fleet, &mut c, "nix copy");
    let _ = std::fs::remove_dir_all(&dir);

    let _ = std::fs::remove_dir_all(&ferry.file_cache);
    let _ = std::fs::remove_dir_all(&ferry.state);
    let mut p = ferry.command(&fleet.client, &["push"]);
    p.args(paths);
    run(&mut p).expect("push");
    let mut d = fleet.client_command("taskset");
    d.args(["-c", cpus.unwrap_or(&all)])
        .arg(post_build_bin())
        .args(["daemon", "--drain"])
        .env("FERRY_CONFIG", &ferry.config);
    let fy = measured(fleet, &mut d, "ferry-post-build daemon --drain");
    assert!(missing_narinfos(&ferry.file_cache, paths).is_empty());
    (nix, fy)
}

fn report(what: &str, mib: f64, rounds: &[(Cost, Cost)]) {
    let ratios: Vec<f64> = rounds.iter().map(|(n, f)| n.wall / f.wall).collect();
    let lo = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().cloned().fold(0.0, f64::max);
    let mean =
        |f: &dyn Fn(&(Cost, Cost)) -> f64| rounds.iter().map(f).sum::<f64>() / rounds.len() as f64;
    let (wall_n, wall_f) = (mean(&|r| r.0.wall), mean(&|r| r.1.wall));
    let (cpu_n, cpu_f) = (mean(&|r| r.0.cpu), mean(&|r| r.1.cpu));
    println!(
        "upload {what}: {mib:.0} MiB, nix copy {:.0} MiB/s, Ferry {:.0} MiB/s (means); \
         Ferry/nix-copy throughput {lo:.2}–{hi:.2}× over {} rounds; CPU s/GiB (with the \
         daemon's): nix copy {:.2}, Ferry {:.2}",
        mib / wall_n,
        mib / wall_f,
        rounds.len(),
        cpu_n * 1024.0 / mib,
        cpu_f * 1024.0 / mib,
    );
}

pub fn bench_upload_throughput_vs_nix_copy() {
    let small_mib = env_u64("FERRY_BENCH_SMALL_MIB", 1024);
    let large_mib = env_u64("FERRY_BENCH_LARGE_MIB", 2048);
    let rounds = env_u64("FERRY_BENCH_ROUNDS", 5) as usize;
    let ferry = Ferry::new();
    // The fixture's config: the file:// target, zstd, 3 jobs at once, zstd workers per core.
    let fleet = ferry.fleet(0);
    let small = build_paths(&fleet, small_mib / 4, 4);
    let large = build_paths(&fleet, 1, large_mib);
    let mut k = 0;
    for (what, paths, mib) in [
        ("many small paths", &small, small_mib as f64),
        ("one large path", &large, large_mib as f64),
    ] {
        for (cores, cpus) in [("1 core", Some("0")), ("all cores", None)] {
            let mut rs = Vec::new();
            for _ in 0..rounds {
                k += 1;
                rs.push(round(&ferry, &fleet, paths, cpus, k));
            }
            report(&format!("{what}, {cores}"), mib, &rs);
        }
    }
}
