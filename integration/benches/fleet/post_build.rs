//! The post-build hook on a chain of builds (no hook, a `nix copy` hook, Ferry's), and the
//! uploader against `nix copy --to file://`.

use ferry_integration::support::post_build as post_build_support;
use ferry_integration::{SYSTEM, check, nonce, run};
use post_build_support::*;
use std::time::{Duration, Instant};

/// A chain of `n` derivations, each depending on the previous one: the post-build hook's
/// latency adds up along it (docs/upload.md §1.2).
fn chain(n: usize) -> String {
    format!(
        r#"let mk = prev: i: builtins.derivation {{ name = "ferry-bench-${{toString i}}-{nonce}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "echo ${{prev}} ${{toString i}} > $out" ]; PATH = "/usr/bin:/bin"; }};
in builtins.foldl' mk "" (builtins.genList (x: x) {n})"#,
        nonce = nonce()
    )
}

fn timed_chain(client_conf: String, env: Vec<(String, String)>, n: usize) -> Duration {
    let fleet = ferry_integration::Fleet::start(ferry_integration::FleetConfig {
        builders: 0,
        max_jobs_per_builder: 1,
        client_conf,
        daemon_env: env,
        ..Default::default()
    })
    .expect("fleet");
    let t = Instant::now();
    let out = fleet.nix_build(&chain(n), &["-j1"]);
    let d = t.elapsed();
    check(&out, "chain").unwrap_or_else(|e| panic!("{e}\n{}", fleet.daemon_log()));
    d
}

/// Benchmark (`dev/bench chain_of_builds`): a chain of 50 derivations with no hook, with the
/// seeds' synchronous `nix copy --to file://` hook and with Ferry's hook, same run.
pub fn bench_hook_on_a_chain_of_builds() {
    let n = 50;
    let dir = tempfile::tempdir().expect("dir");
    // The seeds' recipe; on Nix 2.8 OUT_PATHS is empty, so it asks for the outputs.
    let script = dir.path().join("copy-hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -eu\nOUTS=\"${{OUT_PATHS:-$(nix-store -q --outputs \"$DRV_PATH\")}}\"\nexec nix --extra-experimental-features nix-command copy --to 'file://{}/cache?compression=zstd' $OUTS\n",
            dir.path().display()
        ),
    )
    .expect("script");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ferry = Ferry::new();
    let none = timed_chain(String::new(), vec![], n);
    let copy = timed_chain(format!("post-build-hook = {}", script.display()), vec![], n);
    let fy = timed_chain(
        format!("post-build-hook = {}", post_build_bin().display()),
        vec![("FERRY_CONFIG".into(), ferry.config.display().to_string())],
        n,
    );
    let per = |d: Duration| (d.as_secs_f64() - none.as_secs_f64()) * 1000.0 / n as f64;
    eprintln!(
        "chain of {n}: no hook {:.2} s, nix copy hook {:.2} s (+{:.1} ms/drv), Ferry hook {:.2} s (+{:.1} ms/drv); \
         nix-copy/Ferry wall ratio {:.2}, added-time ratio {:.1}",
        none.as_secs_f64(),
        copy.as_secs_f64(),
        per(copy),
        fy.as_secs_f64(),
        per(fy),
        copy.as_secs_f64() / fy.as_secs_f64(),
        per(copy) / per(fy).max(0.01)
    );
}

/// Benchmark: the same closure (8 paths of 8 MB of compressible text) uploaded by
/// `nix copy --to 'file://…?compression=zstd'` and by Ferry's uploader (`push` + `daemon
/// --drain`, zstd −3, 3 workers) to a cold `file://` cache, same run.
pub fn bench_upload_vs_nix_copy() {
    let ferry = Ferry::new();
    let fleet = ferry.fleet(0);
    let n = nonce();
    let drvs: Vec<String> = (0..8)
        .map(|i| {
            format!(
                r#"(builtins.derivation {{ name = "ferry-bench-up-{i}-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "mkdir $out; seq {i} 1300000 > $out/a; head -c 2000000 /dev/urandom | od -x > $out/b" ]; PATH = "/usr/bin:/bin"; }})"#
            )
        })
        .collect();
    // Built with the hook, but the uploader has not run: the measured part starts cold.
    let paths = build(
        &fleet,
        &format!("[ {} ]", drvs.join(" ")),
        &["-j2"],
        "bench paths",
    );
    let nar_bytes: u64 = paths
        .iter()
        .map(|p| {
            let mut c = fleet.client_command("nix-store");
            c.args(["-q", "--size", p]);
            String::from_utf8_lossy(&run(&mut c).expect("size").stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum();
    let copy_dir = ferry.dir.path().join("nix-copy-cache");
    let mut c = fleet.client_command("nix");
    c.args([
        "--extra-experimental-features",
        "nix-command",
        "copy",
        "--to",
    ])
    .arg(format!("file://{}?compression=zstd", copy_dir.display()))
    .args(&paths);
    let t = Instant::now();
    run(&mut c).expect("nix copy");
    let nix_copy = t.elapsed();

    let t = Instant::now();
    ferry.drain(&fleet);
    let fy = t.elapsed();
    assert!(missing_narinfos(&ferry.file_cache, &paths).is_empty());
    let mib = nar_bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "{} paths, {mib:.1} MiB of NAR: nix copy zstd {:.2} s ({:.0} MiB/s), Ferry {:.2} s ({:.0} MiB/s); Ferry/nix-copy time ratio {:.2}",
        paths.len(),
        nix_copy.as_secs_f64(),
        mib / nix_copy.as_secs_f64(),
        fy.as_secs_f64(),
        mib / fy.as_secs_f64(),
        fy.as_secs_f64() / nix_copy.as_secs_f64()
    );
}
