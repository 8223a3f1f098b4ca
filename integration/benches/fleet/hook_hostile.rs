//! The hook's memory while it imports a large output from a builder (it must stay flat).

use ferry_integration::support::hook as support;
use ferry_integration::{SYSTEM, check, nonce, out_paths, zeros_drv};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{Hook, TestFleet, start};

/// Builds `expr` with `-j0` while sampling the hook's memory every 100 ms; returns the
/// output path, the time, and the highest peak RSS (KiB) any hook process reached.
fn build_sampling_hook(tf: &TestFleet, expr: &str) -> (String, f64, u64) {
    let exe = ferry_integration::ferry_bin("ferry-build-hook");
    let mut c = tf.client_command("nix-build");
    c.args(["--no-out-link", "-j0", "-E", expr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let t = Instant::now();
    let mut child = c.spawn().expect("nix-build");
    let mut peak = 0;
    while child.try_wait().expect("wait").is_none() {
        if let Some((_, hwm)) = ferry_integration::rss_of_in(&exe, &tf.fleet.client.netns) {
            peak = peak.max(hwm);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let secs = t.elapsed().as_secs_f64();
    check(&out, "bench build").unwrap_or_else(|e| panic!("{e}\n{}", tf.daemon_log()));
    (out_paths(&out).remove(0), secs, peak)
}

/// Benchmark (issue 12 item 5): a builder output of `FERRY_BENCH_GIB` GiB (default 4; a sparse
/// file made with `truncate`, so the builder's disk is spared) is fetched and imported with
/// the hook's memory flat: its peak RSS with a 4 KiB output and with the large one are
/// printed and compared. The client's copy is a real file of that size in the fleet's
/// directory under `$TMPDIR`: point `TMPDIR` at a tmpfs with room for it (the test checks the
/// free space first). `import-method = "restore"` (streams on every version; held-locks
/// switches to it above 64 MiB anyway).
pub fn bench_large_output_imports_with_flat_memory() {
    let gib: u64 = ferry_integration::env_number("FERRY_BENCH_GIB", 1, 4);
    let bytes = gib << 30;
    let tf = start(Hook::Ferry, 1, 1, "import-method = \"restore\"");
    let free = fs_free(&tf.client.nix_path("/nix/store"));
    assert!(
        free > bytes + (1 << 30),
        "{} GiB free under the fleet's directory, {gib} GiB needed: set TMPDIR to a tmpfs",
        free >> 30
    );
    let small = zeros_drv(&nonce(), 4096);
    let (_, small_secs, small_peak) = build_sampling_hook(&tf, &small);
    let big = format!(
        r#"builtins.derivation {{ name = "ferry-sparse-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "truncate -s {bytes} $out" ]; PATH = "/usr/bin:/bin"; }}"#,
        n = nonce()
    );
    let (path, secs, peak) = build_sampling_hook(&tf, &big);
    let size = std::fs::metadata(tf.client.nix_path(&path))
        .expect("imported")
        .len();
    assert_eq!(size, bytes);
    println!(
        "hook peak RSS: {small_peak} KiB importing a 4 KiB output ({small_secs:.1} s), \
         {peak} KiB importing a {gib} GiB output ({secs:.1} s, {:.0} MiB/s end to end)",
        bytes as f64 / (1 << 20) as f64 / secs
    );
    // Flat: the large import costs at most a few MiB more than the small one.
    assert!(
        peak < small_peak + 16 * 1024,
        "the hook's memory grew with the output: {small_peak} KiB → {peak} KiB"
    );
    // The client's copy takes `bytes` of the tmpfs: free it before the fleet goes.
    let mut rm = tf.client_command("nix-store");
    rm.args(["--delete", &path]);
    let _ = rm.output();
}

/// Free bytes of the file system holding `p`.
fn fs_free(p: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(p)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}
