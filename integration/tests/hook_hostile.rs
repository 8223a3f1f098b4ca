//! `ferry-build-hook` against a builder that lies (issue 12 item 5 and 10), on a real fleet.
//!
//! The lying builder is a real Nix whose database says something else than its store holds:
//! the output is built on the builder first, then its `ValidPaths` row is edited with
//! `sqlite3` (from this machine, on the builder's database file while no Nix runs there).
//! When the client then builds the same derivation, the builder answers `AlreadyValid`,
//! `QueryPathInfos` repeats the edited `narSize`/`narHash`, and `DumpStorePath` sends the real
//! NAR: exactly what a hostile or broken builder can do through the serve protocol.
//!
//! The benchmark `bench_large_output_imports_with_flat_memory` shows the hook's memory while
//! it imports a multi-GiB output (`FERRY_BENCH_GIB`, default 4).

#[path = "hook_health_support/mod.rs"]
#[allow(dead_code)]
mod support;

use ferry_integration::{SYSTEM, check, nonce, out_paths};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{Hook, TestFleet, start};

fn stdout_of(mut c: Command, what: &str) -> String {
    let out = c.output().expect(what);
    check(&out, what).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A derivation whose output is one file of `bytes` zero bytes (`head -c` from /dev/zero:
/// real, not sparse, for the small sizes of the tests).
fn zeros_drv(n: &str, bytes: u64) -> String {
    format!(
        r#"builtins.derivation {{ name = "ferry-zeros-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "head -c {bytes} /dev/zero > $out" ]; PATH = "/usr/bin:/bin"; }}"#
    )
}

/// Builds `expr` on builder 0 itself (its own store, no daemon) and returns the output path.
fn build_on_builder(tf: &TestFleet, expr: &str) -> String {
    let mut c = tf.builders[0].command("nix-build");
    c.args(["--no-out-link", "-E", expr]);
    stdout_of(c, "nix-build on the builder")
}

/// Makes builder 0's database lie about `path`: `set` is an SQL assignment on `ValidPaths`.
fn lie(tf: &TestFleet, path: &str, set: &str) {
    let db = tf.builders[0].nix_path("/nix/var/nix/db/db.sqlite");
    let mut c = Command::new("sqlite3");
    c.arg(&db).arg(format!(
        "update ValidPaths set {set} where path = '{path}';"
    ));
    stdout_of(c, "sqlite3 on the builder's database");
}

/// The NAR hash of `path` on builder 0 in `algo`, Nix base-32 with the algorithm prefix.
fn nar_hash_on_builder(tf: &TestFleet, path: &str, algo: &str) -> String {
    let mut c = tf.builders[0].command("nix-hash");
    c.args(["--type", algo, "--base32", path]);
    format!("{algo}:{}", stdout_of(c, "nix-hash on the builder"))
}

fn client_has_valid(tf: &TestFleet, path: &str) -> bool {
    let mut c = tf.client_command("nix-store");
    c.args(["--check-validity", path]);
    c.output().map(|o| o.status.success()).unwrap_or(false)
}

/// Builds `expr` with `-j0` on a fleet whose builder lies about its output as `set` says
/// (after `prepare` saw the output path); the build must fail with `message` and leave the
/// output invalid on the client. One fleet per lie: the refused builder is recorded down.
fn refused(expr: &str, set: impl FnOnce(&TestFleet, &str) -> String, message: &str) {
    let tf = start(Hook::Ferry, 1, 1, "import-method = \"auto\"");
    let path = build_on_builder(&tf, expr);
    let assignment = set(&tf, &path);
    lie(&tf, &path, &assignment);
    let out = tf.nix_build(expr, &["-j0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "imported despite `{assignment}`");
    assert!(err.contains(message), "{err}");
    assert!(!client_has_valid(&tf, &path));
}

/// The builder declares 4096 bytes and sends 8 MiB. Before the fix the hook read it all
/// into memory and imported it (the size was never checked); now it stops reading at 4096
/// bytes.
#[test]
fn a_builder_that_sends_more_than_it_declared_is_refused() {
    refused(
        &zeros_drv(&nonce(), 8 << 20),
        |_, _| "narSize = 4096".to_owned(),
        "declared a NAR of 4096 bytes and sent more",
    );
}

/// The builder declares a SHA-512 `narHash` that is not its NAR's. Before the fix SHA-512
/// hashes were not checked at all and the output was imported.
#[test]
fn a_builder_with_a_wrong_sha512_nar_hash_is_refused() {
    refused(
        &zeros_drv(&nonce(), 4096),
        |tf, _| {
            let wrong = nar_hash_on_builder(tf, "/bin/sh", "sha512");
            format!("hash = '{wrong}'")
        },
        "the remote declared sha512:",
    );
}

/// A builder whose database holds a correct SHA-512 `narHash`: the output imports with
/// either importer and is registered with its SHA-256, as Nix records it. Before the fix
/// the restore importer compared the registered SHA-256 with the SHA-512 and failed.
#[test]
fn an_honest_sha512_nar_hash_imports() {
    let tf = start(Hook::Ferry, 1, 1, "import-method = \"auto\"");
    for method in ["auto", "restore"] {
        std::fs::write(
            &tf.config,
            format!("[build-hook]\nimport-method = \"{method}\"\n"),
        )
        .expect("config");
        let expr = zeros_drv(&nonce(), 4096);
        let path = build_on_builder(&tf, &expr);
        let sha256 = nar_hash_on_builder(&tf, &path, "sha256");
        let sha512 = nar_hash_on_builder(&tf, &path, "sha512");
        lie(&tf, &path, &format!("hash = '{sha512}'"));
        let out = tf.nix_build(&expr, &["-j0"]);
        check(&out, &format!("build with a SHA-512 narHash, {method}"))
            .unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", tf.daemon_log()));
        assert_eq!(out_paths(&out), std::slice::from_ref(&path));
        let mut q = tf.client_command("nix-store");
        q.args(["-q", "--hash", &path]);
        assert_eq!(stdout_of(q, "client -q --hash"), sha256, "{method}");
    }
}

/// Resident memory of the processes whose executable is `exe`: (current, peak) in KiB
/// summed over them, from `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
fn rss_of(exe: &std::path::Path) -> Option<(u64, u64)> {
    let mut found = None;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = e.path();
        // A binary rebuilt while the bench runs shows as `<path> (deleted)`.
        let Ok(link) = std::fs::read_link(pid.join("exe")) else {
            continue;
        };
        let link = link.to_string_lossy();
        let shown = exe.to_string_lossy();
        if link != shown && link != format!("{shown} (deleted)") {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(pid.join("status")) else {
            continue;
        };
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let (rss, hwm) = found.unwrap_or((0, 0));
        found = Some((rss + field("VmRSS:"), hwm.max(field("VmHWM:"))));
    }
    found
}

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
        if let Some((_, hwm)) = rss_of(&exe) {
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
#[test]
#[ignore]
fn bench_large_output_imports_with_flat_memory() {
    let gib: u64 = std::env::var("FERRY_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&g| g > 0)
        .unwrap_or(4);
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

/// Issue 12 item 10: `remote-store` reaches the builder's `nix-store` as one word. `auto`
/// still works quoted; `auto$(touch${IFS}/nix/ferry-pwned)` used to run `touch` on the builder
/// (and then build with `--store auto`); now it is a store URI the builder refuses.
#[test]
fn remote_store_is_one_word_on_the_builder() {
    let tf = start(Hook::Ferry, 1, 1, "");
    let line = tf.machine_line(0).expect("line");
    let with_store = |store: &str| {
        let mut f: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        f[0].push_str(&format!("?remote-store={store}"));
        std::fs::write(tf.client.dir.join("etc-nix/machines"), f.join(" ") + "\n")
            .expect("machines");
    };
    with_store("auto");
    let out = tf.nix_build(&zeros_drv(&nonce(), 16), &["-j0"]);
    check(&out, "build with remote-store=auto")
        .unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", tf.daemon_log()));

    let marker = tf.builders[0].nix_path("/nix/ferry-pwned");
    with_store("auto$(touch${IFS}/nix/ferry-pwned)");
    let out = tf.nix_build(&zeros_drv(&nonce(), 16), &["-j0"]);
    assert!(
        !marker.exists(),
        "the remote shell ran a command from remote-store"
    );
    assert!(
        !out.status.success(),
        "built with a store URI that is not one"
    );
}
