//! `ferry-build-hook`'s in-process SSH transport (russh) against real sshd and Nix 2.8 on the
//! fleet: probes over russh find a blackholed builder down within the deadline (naming the
//! step), refuse a builder whose pinned host key is wrong, and find a healthy one up; builds
//! over russh copy inputs, build, fetch outputs and forward the remote log.
//!
//! These tests need root (network and mount namespaces); CI runs them as root.

use ferry_integration::support::hook as hook_health_support;

use ferry_integration::{SYSTEM, chain_drv, check, nonce, out_paths, trivial_drv};
use hook_health_support::{
    Hook, TestFleet, hook_command, machine_line_with, row, settled_row, start, status, timed_build,
    timed_build_ok, write_machines,
};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(50);

/// Control sockets of OpenSSH masters the hook started on the client.
fn control_sockets(tf: &TestFleet) -> usize {
    std::fs::read_dir(tf.client.nix_path("/nix/var/nix/ferry/ssh"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
                .count()
        })
        .unwrap_or(0)
}

/// Builder `i`'s machines line pinned to builder `j`'s host key.
fn pinned_to(tf: &TestFleet, i: usize, j: usize) -> String {
    let li = tf.machine_line(i).expect("line");
    let lj = tf.machine_line(j).expect("line");
    let mut f: Vec<&str> = li.split_whitespace().collect();
    f[7] = lj.split_whitespace().nth(7).expect("host key");
    f.join(" ")
}

fn str_of(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Three builders probed over russh: b0 blackholed, b1 pinned to another host's key, b2
/// healthy. A `-j0` build probes them (in parallel, 1 s budget), builds on b2 over OpenSSH
/// (the default build transport: the russh probe's connection is closed, and the build
/// opens a ControlMaster), and records b0 down at the TCP connect and b1 down for its host
/// key. `probe --json` then checks all three again within the deadline.
#[test]
fn russh_probes_find_dead_wrong_key_and_healthy_builders() {
    let tf = start(Hook::Ferry, 3, 1, "probe-transport = \"russh\"");
    tf.blackhole(0).expect("blackhole");
    let lines = vec![
        tf.machine_line(0).expect("l0"),
        pinned_to(&tf, 1, 2),
        tf.machine_line(2).expect("l2"),
    ];
    write_machines(&tf, &lines);

    let (out, t) = timed_build_ok(&tf, &trivial_drv(&nonce(), "rp"), &["-j0"], LIMIT, "build");
    let p = &out_paths(&out)[0];
    assert!(tf.builders[2].has_store_path(p), "not built on b2");
    assert!(tf.client.has_store_path(p));
    assert!(t < Duration::from_secs(15), "took {t:?}");
    assert_eq!(control_sockets(&tf), 1, "the build did not go over OpenSSH");

    // b0 and b1 may still be being probed in the detached process when the build is done.
    let (b0, b1) = (settled_row(&tf, 0), settled_row(&tf, 1));
    let b2 = row(&tf, &status(&tf), 2);
    assert_eq!(b0["state"], "down", "{b0}");
    assert!(
        str_of(&b0["last-error"]).contains("no answer within 1000 ms (still in the TCP connect)"),
        "{b0}"
    );
    assert_eq!(b1["state"], "down", "{b1}");
    assert!(str_of(&b1["last-error"]).contains("host key"), "{b1}");
    assert!(str_of(&b1["last-error"]).contains("mismatch"), "{b1}");
    assert_eq!(b2["state"], "up", "{b2}");
    assert!(b2["latency-ms"].as_f64().is_some_and(|l| l > 0.0), "{b2}");

    // On demand, in the client's namespace, with the same configuration.
    let start = Instant::now();
    let probe = hook_command(&tf, &["probe", "--json"]);
    let took = start.elapsed();
    assert_eq!(
        probe.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&probe.stdout).expect("json");
    assert_eq!(row(&tf, &rows, 2)["state"], "up", "{rows:?}");
    assert_eq!(row(&tf, &rows, 0)["state"], "down", "{rows:?}");
    assert!(
        str_of(&row(&tf, &rows, 1)["last-error"]).contains("host key"),
        "{rows:?}"
    );
    // One probe budget (1 s) plus the process, with slack for a loaded machine.
    assert!(took < Duration::from_secs(4), "probe took {took:?}");
    println!("build {t:?}, probe of 3 builders (1 blackholed) {took:?}");
}

/// `build-transport = "russh"`: a two-level closure goes to the builder and back over the
/// in-process client (no OpenSSH master appears), with the same NAR hash on both sides and a
/// valid, verified path on the client; a failing build's remote log (SSH extended data)
/// reaches `nix-build`'s stderr.
#[test]
fn builds_over_russh_copy_build_fetch_and_forward_the_log() {
    let tf = start(
        Hook::Ferry,
        1,
        2,
        "build-transport = \"russh\"\nprobe-transport = \"russh\"",
    );
    let out = tf.nix_build(&chain_drv(&nonce()), &["-j0"]);
    check(&out, "chain over russh").unwrap_or_else(|e| panic!("{e}\n{}", tf.daemon_log()));
    let top = &out_paths(&out)[0];
    assert!(tf.builders[0].has_store_path(top), "not built on b0");
    let hash = |mut c: std::process::Command| {
        let o = c.output().expect("nix-store");
        check(&o, "nix-store -q --hash").unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let mut c = tf.client_command("nix-store");
    c.args(["-q", "--hash", top]);
    let mut b = tf.builders[0].command("nix-store");
    b.args(["-q", "--hash", top]);
    assert_eq!(hash(c), hash(b), "NAR hash differs");
    let mut v = tf.client_command("nix-store");
    v.args(["--verify-path", top]);
    check(&v.output().expect("verify"), "verify-path").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(control_sockets(&tf), 0, "an OpenSSH master was started");

    let marker = format!("ferry-russh-fail-{}", nonce());
    let expr = format!(
        r#"builtins.derivation {{ name = "ferry-fails-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "echo {marker} >&2; exit 1" ]; PATH = "/usr/bin:/bin"; }}"#,
        n = nonce()
    );
    let out = tf.nix_build(&expr, &["-j0"]);
    assert!(!out.status.success(), "a failing build succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&marker), "no remote log in:\n{err}");
    assert!(
        err.contains(tf.builders[0].addr.as_str()),
        "builder not named in:\n{err}"
    );
    assert_eq!(
        row(&tf, &status(&tf), 0)["state"],
        "up",
        "a build failure is not a builder fault"
    );

    // A builder without that Nix program: the remote shell's complaint (stderr, carried as
    // SSH extended data) is the reason recorded.
    let line = machine_line_with(&tf, 0, "?remote-program=/nonexistent/nix-store", 1);
    write_machines(&tf, &[line]);
    let probe = hook_command(&tf, &["probe", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&probe.stdout).expect("json");
    let r = &rows[0];
    assert_eq!(r["state"], "down", "{r}");
    assert!(
        str_of(&r["last-error"]).contains("/nonexistent/nix-store"),
        "{r}"
    );
}

/// The builder's `nix-store --serve` dies in the middle of a build (the derivation kills
/// its parent): over russh the channel closes, and the hook must report the failure rather
/// than wait for more bytes forever.
#[test]
fn a_serve_process_dying_mid_build_over_russh_fails_the_build_promptly() {
    let tf = start(
        Hook::Ferry,
        1,
        1,
        "build-transport = \"russh\"\nprobe-transport = \"russh\"",
    );
    let expr = format!(
        r#"builtins.derivation {{ name = "ferry-kills-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "echo about-to-kill >&2; sleep 1; kill -9 $PPID; sleep 30; echo > $out" ]; PATH = "/usr/bin:/bin"; }}"#,
        n = nonce()
    );
    let (out, t) = timed_build(&tf, &expr, &["-j0"], Duration::from_secs(40));
    let out = out.unwrap_or_else(|| {
        panic!(
            "the hook hung after the builder's nix-store died\n{}",
            tf.daemon_log()
        )
    });
    assert!(
        !out.status.success(),
        "built although the serve process died"
    );
    assert!(t < Duration::from_secs(25), "took {t:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("about-to-kill"), "{err}");
}
