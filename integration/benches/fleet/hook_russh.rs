//! One cold probe of a builder over each transport: the built-in russh client and OpenSSH.

use ferry_integration::support::hook as hook_health_support;
use hook_health_support::{Hook, start};
use std::time::Instant;

/// Benchmark: one probe of one healthy builder over russh and over OpenSSH, cold (a new
/// process and state directory each time, no ControlMaster: a hook's first contact),
/// alternating in the same run; plus OpenSSH with its master warm, which is what the build
/// connection costs after a russh probe once the first build opened the master.
/// `dev/bench probe_latency`;
/// `FERRY_HOOK_BIN=target/release/ferry-build-hook` measures a release build of the hook.
pub fn bench_probe_latency_russh_vs_openssh() {
    let rounds: usize = ferry_integration::env_number("FERRY_BENCH_ROUNDS", 0, 20);
    let dir = tempfile::tempdir().expect("tmp");
    let config = |t: &str| {
        let p = dir.path().join(format!("{t}.toml"));
        std::fs::write(
            &p,
            format!("[build-hook]\nprobe-transport = \"{t}\"\nbuild-transport = \"{t}\"\nprobe-timeout-ms = 5000\n"),
        )
        .expect("toml");
        p
    };
    let (russh, openssh) = (config("russh"), config("openssh"));
    let tf = start(Hook::Ferry, 1, 1, "");
    // One `probe --json`: (wall ms of the process, connect + serve handshake ms it recorded).
    let bin = std::env::var("FERRY_HOOK_BIN").unwrap_or_else(|_| {
        ferry_integration::ferry_bin("ferry-build-hook")
            .display()
            .to_string()
    });
    println!("hook: {bin}");
    let probe = |cfg: &std::path::Path, state: &str| -> (f64, f64) {
        let mut c = tf.client.command(&bin);
        c.args(["probe", "--json"])
            .env("FERRY_CONFIG", cfg)
            .env("FERRY_STATE_DIR", state)
            .env_remove("NIX_CONF_DIR")
            .env_remove("NIX_STATE_DIR")
            .stdin(std::process::Stdio::null());
        let t = Instant::now();
        let out = c.output().expect("probe");
        let wall = t.elapsed().as_secs_f64() * 1000.0;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
        (wall, rows[0]["latency-ms"].as_f64().expect("latency"))
    };
    // Stops the masters a run left in `state` (their sockets), then forgets it.
    let stop_masters = |state: &str| {
        let ssh_dir = tf.client.nix_path(&format!("{state}/ssh"));
        for e in std::fs::read_dir(&ssh_dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().ends_with(".sock") {
                let sock = format!("{state}/ssh/{}", e.file_name().to_string_lossy());
                let _ = tf
                    .client
                    .command("ssh")
                    .args([&format!("-oControlPath={sock}"), "-O", "exit", "x"])
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(tf.client.nix_path(state));
    };
    // [russh cold, openssh cold, openssh warm] × (wall, recorded)
    let mut series: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); 3];
    for r in 0..=rounds {
        let s_r = format!("/nix/var/nix/bench-russh-{r}");
        let cold_r = probe(&russh, &s_r);
        stop_masters(&s_r);
        let s_o = format!("/nix/var/nix/bench-openssh-{r}");
        let cold_o = probe(&openssh, &s_o);
        // Keep the master (ssh/), forget the health (its latency is a moving average).
        for e in std::fs::read_dir(tf.client.nix_path(&s_o))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name() != "ssh" {
                let _ =
                    std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            }
        }
        let warm_o = probe(&openssh, &s_o);
        stop_masters(&s_o);
        if r == 0 {
            continue; // warm-up
        }
        for (k, (w, l)) in [cold_r, cold_o, warm_o].into_iter().enumerate() {
            series[k].0.push(w);
            series[k].1.push(l);
        }
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("\none healthy builder, median of {rounds} rounds (after one warm-up), ms:");
    println!(
        "{:<34} {:>10} {:>14} {:>14} {:>16}",
        "", "russh cold", "openssh cold", "openssh warm", "russh/openssh"
    );
    for (name, pick) in [
        ("connect + serve handshake", 1usize),
        ("`probe` process end to end", 0usize),
    ] {
        let v: Vec<f64> = series
            .iter()
            .map(|s| med(if pick == 0 { &s.0 } else { &s.1 }))
            .collect();
        println!(
            "{name:<34} {:>10.1} {:>14.1} {:>14.1} {:>16.3}",
            v[0],
            v[1],
            v[2],
            v[0] / v[1]
        );
    }
}
