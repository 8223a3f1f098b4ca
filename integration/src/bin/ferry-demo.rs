//! Ferry's main job on a throwaway fleet of real Nix hosts: a laptop-like client offloading to
//! builders, one of which is dead. Grows into the full demo (hook, uploader, substituter) as the
//! binaries land; parts that are not built yet are reported as such, never faked.

use anyhow::{Context, Result};
use ferry_integration::{Fleet, FleetConfig, check, nonce, out_paths, trivial_drv};
use std::time::Instant;

fn main() -> Result<()> {
    ferry_integration::reap_stale();
    println!(
        "Starting a fleet: a client nix-daemon and 2 builders (each in its own namespaces)..."
    );
    let hook = ferry_integration::ferry_bin("ferry-build-hook");
    let fleet = Fleet::start(FleetConfig {
        builders: 2,
        client_conf: format!("build-hook = {}", hook.display()),
        // As careful users tune it: a 2 s SSH connect time-out.
        daemon_env: vec![("NIX_SSHOPTS".into(), "-o ConnectTimeout=2".into())],
        ..Default::default()
    })
    .context("starting the fleet")?;
    fleet.blackhole(1).context("blackholing b1")?;
    println!(
        "b1 ({}) is dead: every packet to its sshd is dropped.",
        fleet.builders[1].addr
    );

    let exprs: Vec<String> = (0..3)
        .map(|i| trivial_drv(&nonce(), &format!("demo{i}")))
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
    println!(
        "ferry-build-hook: {} derivations built, {remote} on b0 (b1 is dead), in {secs:.2} s",
        paths.len()
    );
    anyhow::ensure!(
        remote == paths.len(),
        "only {remote} of {} derivations were built on b0",
        paths.len()
    );
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
