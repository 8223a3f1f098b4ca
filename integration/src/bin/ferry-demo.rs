//! Ferry's main job on a throwaway fleet of real Nix hosts: a laptop-like client offloading to
//! builders, one of which is dead. Grows into the full demo (hook, uploader, substituter) as the
//! binaries land; parts that are not built yet are reported as such, never faked.

use anyhow::{Context, Result, ensure};
use ferry_integration::{Fleet, FleetConfig, check, nonce, out_paths, trivial_drv};
use std::time::Instant;

/// Builds `n` fresh trivial derivations in one `nix-build -j0` and returns how many ran on b0
/// and the wall time.
fn build_batch(fleet: &Fleet, n: usize, tag: &str) -> Result<(usize, usize, f64)> {
    let exprs: Vec<String> = (0..n)
        .map(|i| trivial_drv(&nonce(), &format!("{tag}{i}")))
        .collect();
    let expr = format!(
        "[ {} ]",
        exprs
            .iter()
            .map(|e| format!("({e})"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let t = Instant::now();
    let out = fleet.nix_build(&expr, &["-j0"]);
    let secs = t.elapsed().as_secs_f64();
    check(&out, "nix-build through ferry-build-hook")
        .map_err(|e| anyhow::anyhow!("{e}\n{}", fleet.daemon_log()))?;
    let paths = out_paths(&out);
    let remote = paths
        .iter()
        .filter(|p| fleet.builders[0].has_store_path(p))
        .count();
    Ok((paths.len(), remote, secs))
}

fn main() -> Result<()> {
    ferry_integration::reap_stale();
    println!("Starting a fleet: a client nix-daemon and 2 builders, each in its own namespaces...");
    let hook = ferry_integration::ferry_bin("ferry-build-hook");
    let fleet = Fleet::start(FleetConfig {
        builders: 2,
        client_conf: format!("build-hook = {}", hook.display()),
        ..Default::default()
    })
    .context("starting the fleet")?;
    fleet.blackhole(1).context("blackholing b1")?;
    println!(
        "b1 ({}) is dead: every packet to its sshd is dropped (stock Nix pays ~135 s per derivation for that).",
        fleet.builders[1].addr
    );

    for (run, tag) in [(1, "first"), (2, "second")] {
        let (n, remote, secs) = build_batch(&fleet, 5, tag)?;
        println!(
            "run {run}: {n} derivations, {remote} built on b0, {secs:.2} s (nix-build -j0, through ferry-build-hook)"
        );
        ensure!(
            remote == n,
            "only {remote} of {n} derivations were built on b0"
        );
    }
    println!("\n$ ferry-build-hook status");
    let status = fleet
        .client
        .command(&hook.display().to_string())
        .arg("status")
        .output()?;
    print!("{}", String::from_utf8_lossy(&status.stdout));

    for bin in ["ferry-post-build", "ferry-substituter"] {
        let p = ferry_integration::ferry_bin(bin);
        let st = std::process::Command::new(&p)
            .stderr(std::process::Stdio::null())
            .status()?;
        println!(
            "{bin}: {}",
            if st.success() {
                "ok"
            } else {
                "not implemented yet (exits non-zero)"
            }
        );
    }
    Ok(())
}
