//! `ferry-build-hook`'s importers on a real Nix 2.8 fleet: `import-method = "restore"`
//! (`nix-store --restore` + `--register-validity`, the method for Nix ≥ 2.29) makes remotely
//! built outputs valid on the client with the builder's NAR hash and references, for a
//! closure and for a multi-output derivation; `auto` picks `held-locks` on Nix 2.8.

use ferry_integration::support::hook as support;

use ferry_integration::{Host, SYSTEM, chain_drv, check, nonce, out_paths, trivial_drv};
use std::process::Command;
use support::{Hook, TestFleet, start};

fn stdout_of(mut c: Command, what: &str) -> String {
    let out = c.output().expect(what);
    check(&out, what).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn query(c: Command, args: &[&str], what: &str) -> String {
    let mut c = c;
    c.args(args);
    stdout_of(c, what)
}

/// NAR hash and sorted references of `path` on the client and on builder 0 agree, and the
/// client's copy verifies.
fn same_on_both_sides(tf: &TestFleet, path: &str) {
    let b0: &Host = &tf.builders[0];
    assert!(b0.has_store_path(path), "{path} not built on b0");
    let client_hash = query(
        tf.client_command("nix-store"),
        &["-q", "--hash", path],
        "client -q --hash",
    );
    let builder_hash = query(
        b0.command("nix-store"),
        &["-q", "--hash", path],
        "builder -q --hash",
    );
    assert_eq!(client_hash, builder_hash, "{path}: NAR hash differs");
    let sorted = |s: String| {
        let mut v: Vec<String> = s.lines().map(str::to_owned).collect();
        v.sort();
        v
    };
    let client_refs = sorted(query(
        tf.client_command("nix-store"),
        &["-q", "--references", path],
        "client -q --references",
    ));
    let builder_refs = sorted(query(
        b0.command("nix-store"),
        &["-q", "--references", path],
        "builder -q --references",
    ));
    assert_eq!(client_refs, builder_refs, "{path}: references differ");
    query(
        tf.client_command("nix-store"),
        &["--verify-path", path],
        "client --verify-path",
    );
    // The deriver is recorded too.
    let deriver = query(
        tf.client_command("nix-store"),
        &["-q", "--deriver", path],
        "client -q --deriver",
    );
    assert!(deriver.ends_with(".drv"), "{path}: deriver {deriver:?}");
}

/// No temporary restore names are left in the client's store directory.
fn no_leftovers(tf: &TestFleet) {
    let dir = tf.client.nix_path("/nix/store");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .expect("client store")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".ferry-import-"))
        .collect();
    assert!(left.is_empty(), "left in the store: {left:?}");
}

fn assert_method(out: &std::process::Output, method: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("with import-method {method}")),
        "not imported with {method}:\n{err}"
    );
}

#[test]
fn restore_imports_a_chain_and_auto_picks_the_method_by_nix_version() {
    let tf = start(Hook::Ferry, 1, 2, "import-method = \"restore\"");
    let out = tf.nix_build(&chain_drv(&nonce()), &["-j0", "-v"]);
    check(
        &out,
        "nix-build of a two-level closure with import-method restore",
    )
    .unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", tf.daemon_log()));
    assert_method(&out, "restore");
    let paths = out_paths(&out);
    assert_eq!(paths.len(), 1, "{paths:?}");
    let top = &paths[0];
    same_on_both_sides(&tf, top);
    let refs = query(
        tf.client_command("nix-store"),
        &["-q", "--references", top],
        "references",
    );
    assert!(refs.lines().any(|l| l.contains("-ferry-mid-")), "{refs}");
    let copy = std::fs::read_to_string(tf.client.nix_path(&format!("{top}/copy"))).expect("copy");
    assert_eq!(copy, "leaf\n");
    no_leftovers(&tf);

    // The hook reads its configuration per process: `auto` is held-locks where Nix still
    // honours NIX_HELD_LOCKS (before 2.29), restore + register-validity after.
    std::fs::write(&tf.config, "[build-hook]\nimport-method = \"auto\"\n").expect("config");
    let out = tf.nix_build(&trivial_drv(&nonce(), "auto"), &["-j0", "-v"]);
    check(&out, "nix-build with import-method auto")
        .unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", tf.daemon_log()));
    let want = if tf.client.nix.minor() < (2, 29) {
        "held-locks"
    } else {
        "restore"
    };
    assert_method(&out, want);
    same_on_both_sides(&tf, &out_paths(&out)[0]);
}

#[test]
fn restore_imports_both_outputs_of_a_multi_output_derivation() {
    let tf = start(Hook::Ferry, 1, 1, "import-method = \"restore\"");
    let n = nonce();
    let expr = format!(
        r#"let d = builtins.derivation {{ name = "ferry-multi-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; outputs = [ "out" "dev" ]; args = [ "-c" "mkdir $out $dev; echo lib > $out/lib; echo $out > $dev/out-path" ]; PATH = "/usr/bin:/bin"; }}; in [ d.out d.dev ]"#
    );
    let out = tf.nix_build(&expr, &["-j0", "-v"]);
    check(
        &out,
        "nix-build of a multi-output derivation with import-method restore",
    )
    .unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", tf.daemon_log()));
    assert_method(&out, "restore");
    let paths = out_paths(&out);
    assert_eq!(paths.len(), 2, "{paths:?}");
    let (o, dev) = (&paths[0], &paths[1]);
    assert!(dev.ends_with("-dev"), "{paths:?}");
    for p in [o, dev] {
        same_on_both_sides(&tf, p);
    }
    let dev_refs = query(
        tf.client_command("nix-store"),
        &["-q", "--references", dev],
        "dev references",
    );
    assert!(
        dev_refs.lines().any(|l| l == o),
        "dev → out missing: {dev_refs}"
    );
    let text =
        std::fs::read_to_string(tf.client.nix_path(&format!("{dev}/out-path"))).expect("out-path");
    assert_eq!(text.trim(), o);
    no_leftovers(&tf);
}
