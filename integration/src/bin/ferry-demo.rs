//! Ferry's main job on a throwaway fleet of real Nix hosts, end to end:
//!
//! 1. a laptop (the fleet's client) offloads builds through `ferry-build-hook` to two builders,
//!    one of which is dead;
//! 2. its `post-build-hook` is `ferry-post-build`, whose uploader signs the outputs and writes
//!    them to a `file://` cache that a LAN host serves with nginx;
//! 3. a second laptop with no builders and `max-jobs = 0` gets every output through
//!    `ferry-substituter`, whose first upstream is a dead cache, with `require-sigs = true`.
//!
//! Every step checks what it claims and the demo fails otherwise.

use anyhow::{Context, Result, anyhow, ensure};
use ferry_integration::{
    Fleet, FleetConfig, Host, blackhole_port, check, ferry_bin, nonce, out_paths, run, start_nginx,
    trivial_drv,
};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CACHE_PORT: u16 = 8080;
const SUBSTITUTER: &str = "127.0.0.1:37515";
/// The port of [`SUBSTITUTER`].
const SUBSTITUTER_PORT: u16 = 37515;

fn list_expr(exprs: &[String]) -> String {
    format!(
        "[ {} ]",
        exprs
            .iter()
            .map(|e| format!("({e})"))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn build(fleet_host: &Host, expr: &str) -> Result<(Vec<String>, f64)> {
    let t = Instant::now();
    let out = fleet_host
        .nix_command("nix-build")
        .args(["--no-out-link", "-j0", "-E", expr])
        .stdin(Stdio::null())
        .output()?;
    let secs = t.elapsed().as_secs_f64();
    check(&out, &format!("nix-build on {}", fleet_host.role))?;
    Ok((out_paths(&out), secs))
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !ok() {
        ensure!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A builder's state from `ferry-build-hook status --json` (`up`, `down`, `unknown`).
fn builder_state(client: &ferry_integration::Host, hook: &Path, uri_part: &str) -> Result<String> {
    let out = client
        .command(&hook.display().to_string())
        .args(["status", "--json"])
        .output()?;
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    rows.iter()
        .find(|r| r["builder"].as_str().is_some_and(|b| b.contains(uri_part)))
        .and_then(|r| r["state"].as_str().map(str::to_owned))
        .ok_or_else(|| anyhow!("no status row for {uri_part}"))
}

fn narinfo_name(store_path: &str) -> String {
    let base = Path::new(store_path)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{}.narinfo", &base[..32.min(base.len())])
}

fn main() -> Result<()> {
    ferry_integration::reap_stale();
    let work = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
    let hook = ferry_bin("ferry-build-hook");
    let post = ferry_bin("ferry-post-build");
    let subst = ferry_bin("ferry-substituter");

    // Signing key and the uploader's configuration.
    let secret = work.path().join("cache.sec");
    let out = Command::new(&post)
        .args(["keygen", "ferry-demo-1", "--secret-file"])
        .arg(&secret)
        .output()?;
    check(&out, "ferry-post-build keygen")?;
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    println!(
        "Starting a fleet of real Nix hosts on this machine (network and mount namespaces)..."
    );
    let config = work.path().join("ferry.toml");
    let mut fleet = Fleet::start(FleetConfig {
        builders: 2,
        max_jobs_per_builder: 2,
        client_conf: format!(
            "build-hook = {}\npost-build-hook = {}",
            hook.display(),
            post.display()
        ),
        daemon_env: vec![("FERRY_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    })
    .context("starting the fleet")?;

    // The LAN cache: a directory the uploader writes to (file://), served over HTTP.
    let cache = fleet.add_host("cache")?;
    let www = cache.dir.join("www");
    std::fs::create_dir_all(&www)?;
    start_nginx(cache, CACHE_PORT, &www, false)?;
    let cache_url = format!("http://{}:{CACHE_PORT}", cache.addr);
    // A second cache that is dead: packets to it are dropped.
    let dead = fleet.add_host("deadcache")?;
    let dead_url = format!("http://{}:{CACHE_PORT}", dead.addr);
    blackhole_port(fleet.host("deadcache"), CACHE_PORT)?;
    fleet.blackhole(1).context("blackholing b1")?;
    println!(
        "  builders: b0 {} (up), b1 {} (dead: packets dropped)",
        fleet.builders[0].addr, fleet.builders[1].addr
    );
    println!("  caches:   {cache_url} (up), {dead_url} (dead: packets dropped)");

    let state = work.path().join("uploader-state");
    std::fs::write(
        &config,
        format!(
            "[post-build]\ntargets = [\"file://{}\"]\nsecret-key-files = [\"{}\"]\nstate-dir = \"{}\"\n",
            www.display(),
            secret.display(),
            state.display()
        ),
    )?;
    let log = std::fs::File::create(work.path().join("uploader.log"))?;
    let uploader = fleet
        .client
        .nix_command(&post.display().to_string())
        .arg("daemon")
        .env("FERRY_CONFIG", &config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    fleet.client.adopt(uploader);

    // 1. Offload through ferry-build-hook, twice: the dead builder is probed once, then remembered.
    let mut all = Vec::new();
    let mut exprs_all = Vec::new();
    for run_no in 1..=2 {
        let exprs: Vec<String> = (0..5)
            .map(|i| trivial_drv(&nonce(), &format!("demo{run_no}-{i}")))
            .collect();
        let (paths, secs) = build(&fleet.client, &list_expr(&exprs))?;
        let remote = paths
            .iter()
            .filter(|p| fleet.builders[0].has_store_path(p))
            .count();
        println!(
            "laptop: run {run_no}, {} derivations built on b0 in {secs:.2} s (nix-build -j0 through ferry-build-hook)",
            paths.len()
        );
        ensure!(
            remote == paths.len(),
            "only {remote} of {} derivations were built on b0",
            paths.len()
        );
        all.extend(paths);
        exprs_all.extend(exprs);
        if run_no == 1 {
            // The hook did not wait for the dead builder: a detached probe records it as down
            // within the 1 s probe budget, and run 2 skips it without probing.
            let dead = format!("@{}", fleet.builders[1].addr);
            let mut state = String::new();
            wait_for("b1's probe result", Duration::from_secs(5), || {
                state = builder_state(&fleet.client, &hook, &dead).unwrap_or_default();
                !state.is_empty() && state != "unknown"
            })?;
            ensure!(state == "down", "b1 is {state}, not down");
        }
    }
    let status = fleet
        .client
        .command(&hook.display().to_string())
        .arg("status")
        .output()?;
    println!(
        "\n$ ferry-build-hook status\n{}",
        String::from_utf8_lossy(&status.stdout)
    );

    // 2. The uploader signs and uploads every output to the LAN cache.
    let t = Instant::now();
    wait_for("the uploads", Duration::from_secs(60), || {
        all.iter().all(|p| www.join(narinfo_name(p)).exists())
    })
    .map_err(|e| {
        anyhow!(
            "{e}\n{}",
            std::fs::read_to_string(work.path().join("uploader.log")).unwrap_or_default()
        )
    })?;
    println!(
        "ferry-post-build: {} outputs signed and uploaded to the LAN cache ({:.2} s after the builds)",
        all.len(),
        t.elapsed().as_secs_f64()
    );

    // 3. A second laptop substitutes everything through ferry-substituter, dead cache first.
    let laptop2 = fleet.add_client("laptop2")?;
    laptop2.write_nix_conf(&format!(
        "substituters = http://{SUBSTITUTER}\ntrusted-public-keys = {public}\nrequire-sigs = true\nbuilders =\nmax-jobs = 0\n"
    ))?;
    laptop2.start_nix_daemon(&[])?;
    let slog = std::fs::File::create(work.path().join("substituter.log"))?;
    let substituter = laptop2
        .command(&subst.display().to_string())
        .args([
            "--listen",
            SUBSTITUTER,
            "--upstream",
            &dead_url,
            "--upstream",
            &cache_url,
        ])
        .env("FERRY_CONFIG", work.path().join("none.toml"))
        .env("RUST_LOG", "ferry_substituter=debug,info")
        .stdin(Stdio::null())
        .stdout(slog.try_clone()?)
        .stderr(slog)
        .spawn()?;
    laptop2.adopt(substituter);
    let laptop2 = fleet.host("laptop2");
    // Ready once it listens (checked from outside: the host may run another Debian, without
    // the machine's tools).
    ferry_integration::wait_listening(laptop2, SUBSTITUTER_PORT)?;
    let (paths, secs) = build(laptop2, &list_expr(&exprs_all)).map_err(|e| {
        let log = std::fs::read_to_string(work.path().join("substituter.log")).unwrap_or_default();
        anyhow!("{e}\nferry-substituter log:\n{log}")
    })?;
    ensure!(
        paths == all,
        "laptop2 got other paths than the laptop built"
    );
    for p in &paths {
        run(laptop2.nix_command("nix-store").args(["--verify-path", p]))?;
    }
    println!(
        "laptop2: {} outputs substituted through ferry-substituter in {secs:.2} s (max-jobs 0, require-sigs, first upstream dead)",
        paths.len()
    );
    println!(
        "\nDone: offloaded past a dead builder, uploaded and signed, substituted past a dead cache."
    );
    Ok(())
}
