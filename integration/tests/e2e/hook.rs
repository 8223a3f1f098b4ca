//! `ferry-build-hook` against a real Nix 2.8 daemon on the fleet, each scenario run twice:
//! once with the stock `build-remote` (so the fixture is known good) and once with Ferry's.
//!
//! These tests need root (network and mount namespaces); CI runs them as root.

use ferry_integration::support::hook::{assert_built_on, build_chain_remotely, build_one};
use ferry_integration::{
    Fleet, FleetConfig, SYSTEM, chain_drv, check, ferry_bin, nonce, out_paths, stdout_of,
    trivial_drv,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    Stock,
    Ferry,
}

fn fleet(hook: Hook, builders: usize, slots: u32) -> Fleet {
    let client_conf = match hook {
        Hook::Stock => String::new(),
        Hook::Ferry => format!("build-hook = {}", ferry_bin("ferry-build-hook").display()),
    };
    Fleet::start(FleetConfig {
        builders,
        max_jobs_per_builder: slots,
        client_conf,
        daemon_env: Vec::new(),
        ..Default::default()
    })
    .expect("fleet")
}

fn chain_closure_builds_remotely(hook: Hook) {
    let fleet = fleet(hook, 1, 2);
    let top = &build_chain_remotely(
        &fleet,
        &format!("{hook:?}: nix-build of a two-level closure"),
    );

    // Same NAR hash on both sides.
    let mut q = fleet.client_command("nix-store");
    q.args(["-q", "--hash", top]);
    let client_hash = stdout_of(q, "client nix-store -q --hash");
    let mut q = fleet.builders[0].command("nix-store");
    q.args(["-q", "--hash", top]);
    let builder_hash = stdout_of(q, "builder nix-store -q --hash");
    assert_eq!(client_hash, builder_hash, "{hook:?}: NAR hash differs");

    // Built from a BasicDerivation (serve BuildDerivation), as the stock hook does on 2.8:
    // the .drv is never copied to the builder.
    let mut q = fleet.client_command("nix-store");
    q.args(["-q", "--deriver", top]);
    let drv = stdout_of(q, "nix-store -q --deriver");
    assert!(drv.ends_with(".drv"), "{drv}");
    assert!(
        !fleet.builders[0].has_store_path(&drv),
        "{hook:?}: {drv} was copied to b0"
    );

    // References recorded on the client, and the closure is complete there.
    let mut q = fleet.client_command("nix-store");
    q.args(["-q", "--references", top]);
    let refs = stdout_of(q, "nix-store -q --references");
    assert!(
        refs.lines().any(|l| l.contains("-ferry-mid-")),
        "{hook:?}: references: {refs}"
    );
    let mut v = fleet.client_command("nix-store");
    v.args(["--verify-path", top]);
    stdout_of(v, "nix-store --verify-path");
    let copy =
        std::fs::read_to_string(fleet.client.nix_path(&format!("{top}/copy"))).expect("copy");
    assert_eq!(copy, "leaf\n");

    // The build log is stored on the client (the chain prints nothing: use a build that logs).
    let marker = format!("ferry-log-marker-{}", nonce());
    let expr = format!(
        r#"builtins.derivation {{ name = "ferry-logs-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "echo {marker}; echo done > $out" ]; PATH = "/usr/bin:/bin"; }}"#,
        n = nonce()
    );
    let p = &build_one(&fleet, &expr, &["-j0"], "build that logs");
    assert!(fleet.builders[0].has_store_path(p));
    let mut l = fleet.client_command("nix-store");
    l.args(["-l", p]);
    let log = stdout_of(l, "nix-store -l");
    assert!(
        log.contains(&marker),
        "{hook:?}: build log on the client: {log:?}"
    );
}

#[test]
fn chain_closure_builds_remotely_stock() {
    chain_closure_builds_remotely(Hook::Stock);
}

#[test]
fn chain_closure_builds_remotely_ferry() {
    chain_closure_builds_remotely(Hook::Ferry);
}

fn remote_failure_is_reported(hook: Hook) {
    let fleet = fleet(hook, 1, 2);
    let ok = build_one(
        &fleet,
        &trivial_drv(&nonce(), "fine"),
        &["-j0"],
        "healthy -j0 build",
    );
    assert!(fleet.builders[0].has_store_path(&ok), "not built remotely");

    let marker = format!("ferry-fail-marker-{}", nonce());
    let expr = format!(
        r#"builtins.derivation {{ name = "ferry-fails-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "echo {marker}; exit 1" ]; PATH = "/usr/bin:/bin"; }}"#,
        n = nonce()
    );
    let out = fleet.nix_build(&expr, &["-j0"]);
    assert!(!out.status.success(), "{hook:?}: a failing build succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&marker), "{hook:?}: no remote log in:\n{err}");
    let addr = &fleet.builders[0].addr;
    assert!(
        err.contains(addr.as_str()),
        "{hook:?}: builder {addr} not named in:\n{err}"
    );
}

#[test]
fn remote_failure_is_reported_stock() {
    remote_failure_is_reported(Hook::Stock);
}

#[test]
fn remote_failure_is_reported_ferry() {
    remote_failure_is_reported(Hook::Ferry);
}

/// Rewrites the client's machines file: builder 0 gets `systems` and builder 1 gets
/// mandatory feature `f`.
fn route_by_system_and_features(hook: Hook) {
    let fleet = fleet(hook, 2, 2);
    let line = |i: usize, systems: &str, supported: &str, mandatory: &str| {
        let l = fleet.machine_line(i).expect("line");
        let mut f: Vec<String> = l.split_whitespace().map(str::to_owned).collect();
        f[1] = systems.to_owned();
        f[5] = supported.to_owned();
        f[6] = mandatory.to_owned();
        f.join(" ")
    };
    let machines = format!(
        "{}\n{}\n",
        line(0, &format!("{SYSTEM},aarch64-linux"), "-", "-"),
        line(1, SYSTEM, "-", "ferry-feature"),
    );
    std::fs::write(fleet.client.dir.join("etc-nix/machines"), machines).expect("machines");
    // The builder itself must also have the feature to run such a build.
    let conf = fleet.builders[1].dir.join("etc-nix/nix.conf");
    let mut text = std::fs::read_to_string(&conf).expect("b1 nix.conf");
    text.push_str("system-features = ferry-feature\n");
    std::fs::write(&conf, text).expect("b1 nix.conf");

    let n = nonce();
    let with_feature = format!(
        r#"builtins.derivation {{ name = "ferry-feat-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "echo f > $out" ]; PATH = "/usr/bin:/bin"; requiredSystemFeatures = [ "ferry-feature" ]; }}"#
    );
    let p = build_one(&fleet, &with_feature, &["-j0"], "feature build");
    assert_built_on(&fleet, &p, 1, 0, &format!("{hook:?}: feature build"));

    // Without the feature, b1 (mandatory) is not eligible: everything goes to b0.
    for k in 0..2 {
        let expr = trivial_drv(&format!("{n}-plain{k}"), "p");
        let p = build_one(&fleet, &expr, &["-j0"], "plain build");
        assert_built_on(&fleet, &p, 0, 1, &format!("{hook:?}: plain build"));
    }

    // A system only b0 has, built with `-j0` and no way to run it: the stock test for
    // routing by system is that the right machine is *chosen*; an aarch64 build cannot run
    // here, so it must fail on b0 (named in the error), not be declined.
    let other = format!(
        r#"builtins.derivation {{ name = "ferry-arm-{n}"; system = "aarch64-linux"; builder = "/bin/sh"; args = [ "-c" "echo a > $out" ]; PATH = "/usr/bin:/bin"; }}"#
    );
    let out = fleet.nix_build(&other, &["-j0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let b0 = &fleet.builders[0].addr;
    assert!(
        err.contains(b0.as_str()),
        "{hook:?}: aarch64 build not sent to b0:\n{err}"
    );
    let b1 = &fleet.builders[1].addr;
    assert!(
        !err.contains(b1.as_str()),
        "{hook:?}: aarch64 build sent to b1:\n{err}"
    );
}

#[test]
fn route_by_system_and_features_stock() {
    route_by_system_and_features(Hook::Stock);
}

#[test]
fn route_by_system_and_features_ferry() {
    route_by_system_and_features(Hook::Ferry);
}

/// Six derivations in one `nix-build -j0` on two builders with one slot each: all built
/// remotely, on both builders, and never two at once on one builder (each build records its
/// start and end in a directory on the builder; overlapping intervals would show up).
fn spread_over_builders(hook: Hook) {
    let fleet = fleet(hook, 2, 1);
    let n = nonce();
    // Under /nix: each host has its own (the machine's /tmp is shared by all hosts).
    let trace = "/nix/var/ferry-slot-trace";
    for b in &fleet.builders {
        let mut c = b.command("mkdir");
        c.args(["-p", trace]);
        stdout_of(c, "mkdir trace");
    }
    let drvs: Vec<String> = (0..6)
        .map(|k| {
            format!(
                r#"(builtins.derivation {{ name = "ferry-spread-{n}-{k}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "if ! mkdir {trace}/busy; then echo overlap > {trace}/overlap-{k}; fi; sleep 0.3; rmdir {trace}/busy; echo {k} > $out" ]; PATH = "/usr/bin:/bin"; }})"#
            )
        })
        .collect();
    let expr = format!("[ {} ]", drvs.join(" "));
    let out = fleet.nix_build(&expr, &["-j0"]);
    check(&out, "six derivations").unwrap_or_else(|e| panic!("{e}\n{}", fleet.daemon_log()));
    let paths = out_paths(&out);
    assert_eq!(paths.len(), 6, "{paths:?}");
    let mut used = [0usize; 2];
    for p in &paths {
        let on: Vec<usize> = (0..2)
            .filter(|&i| fleet.builders[i].has_store_path(p))
            .collect();
        assert_eq!(on.len(), 1, "{hook:?}: {p} built on {on:?}");
        used[on[0]] += 1;
        assert!(fleet.client.has_store_path(p));
    }
    assert!(
        used.iter().all(|&u| u > 0),
        "{hook:?}: only one builder used: {used:?}"
    );
    for b in &fleet.builders {
        let listing: Vec<String> = std::fs::read_dir(b.nix_path(trace))
            .expect("trace dir")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        assert!(
            listing.is_empty(),
            "{hook:?}: two builds at once on {}: {listing:?}",
            b.role
        );
    }
}

#[test]
fn spread_over_builders_stock() {
    spread_over_builders(Hook::Stock);
}

#[test]
fn spread_over_builders_ferry() {
    spread_over_builders(Hook::Ferry);
}

/// A builder whose pinned host key is wrong, and one that refuses our key, are named with
/// the reason (Ferry only: the stock hook's wording differs and is covered in fleet.rs).
#[test]
fn connect_failures_name_the_builder_and_the_reason() {
    let fleet = fleet(Hook::Ferry, 2, 1);
    // b0 pinned to b1's host key: host key verification fails.
    let wrong_key = {
        let l0 = fleet.machine_line(0).expect("line");
        let l1 = fleet.machine_line(1).expect("line");
        let mut f: Vec<&str> = l0.split_whitespace().collect();
        f[7] = l1.split_whitespace().nth(7).expect("host key");
        f.join(" ")
    };
    std::fs::write(
        fleet.client.dir.join("etc-nix/machines"),
        format!("{wrong_key}\n"),
    )
    .expect("machines");
    let out = fleet.nix_build(&trivial_drv(&nonce(), "k"), &["-j0"]);
    assert!(
        !out.status.success(),
        "built through a builder with the wrong host key"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let b0 = &fleet.builders[0].addr;
    assert!(
        err.contains(&format!("cannot build on 'ssh://root@{b0}'")),
        "{err}"
    );
    assert!(err.contains("Host key verification failed"), "{err}");

    // b1 with a client key its sshd does not accept.
    let other_key = fleet.root.path().join("other_key");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other_key)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    let refused = {
        let l1 = fleet.machine_line(1).expect("line");
        let mut f: Vec<String> = l1.split_whitespace().map(str::to_owned).collect();
        f[2] = other_key.display().to_string();
        f.join(" ")
    };
    std::fs::write(
        fleet.client.dir.join("etc-nix/machines"),
        format!("{refused}\n"),
    )
    .expect("machines");
    let out = fleet.nix_build(&trivial_drv(&nonce(), "r"), &["-j0"]);
    assert!(!out.status.success(), "built with a refused key");
    let err = String::from_utf8_lossy(&out.stderr);
    let b1 = &fleet.builders[1].addr;
    assert!(
        err.contains(&format!("cannot build on 'ssh://root@{b1}'")),
        "{err}"
    );
    assert!(err.contains("Permission denied"), "{err}");
}

/// `--builders ''` (allowed even for untrusted users) makes the hook decline permanently, and
/// the build runs locally.
#[test]
fn empty_builders_declines_permanently() {
    for hook in [Hook::Stock, Hook::Ferry] {
        let fleet = fleet(hook, 1, 1);
        let out = fleet.nix_build(&trivial_drv(&nonce(), "local"), &["-j1", "--builders", ""]);
        check(&out, "local build").unwrap_or_else(|e| panic!("{hook:?}: {e}"));
        let p = &out_paths(&out)[0];
        assert!(fleet.client.has_store_path(p));
        assert!(
            !fleet.builders[0].has_store_path(p),
            "{hook:?}: built remotely"
        );
    }
}

/// An `ssh-ng://` builder (`nix-daemon --stdio` on the builder, root with a local store).
/// Ferry speaks only the serve protocol, so it hands the derivation to the stock hook (with
/// `builders` narrowed to the non-ssh machines) when no `ssh://` builder can take it.
fn ssh_ng_builder_builds(hook: Hook) {
    let fleet = fleet(hook, 1, 1);
    let line = fleet
        .machine_line(0)
        .expect("line")
        .replacen("ssh://", "ssh-ng://", 1);
    std::fs::write(
        fleet.client.dir.join("etc-nix/machines"),
        format!("{line}\n"),
    )
    .expect("machines");
    let out = fleet.nix_build(&chain_drv(&nonce()), &["-j0", "-v"]);
    check(&out, &format!("{hook:?}: ssh-ng build"))
        .unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", fleet.daemon_log()));
    let top = &out_paths(&out)[0];
    assert!(
        fleet.builders[0].has_store_path(top),
        "{hook:?}: {top} not built on b0"
    );
    assert!(fleet.client.has_store_path(top));
    if hook == Hook::Ferry {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("handing it to the stock hook"),
            "not through Ferry:\n{err}"
        );
    }
}

#[test]
fn ssh_ng_builder_builds_stock() {
    ssh_ng_builder_builds(Hook::Stock);
}

#[test]
fn ssh_ng_builder_builds_ferry() {
    ssh_ng_builder_builds(Hook::Ferry);
}

/// Ferry keeps what it can build: with an `ssh://` builder eligible, the `ssh-ng://` one is
/// not used; with only `ssh-ng://` and a `stock-hook` that does not exist, the derivation is
/// declined with the reason (and `-j0` makes that a failure).
#[test]
fn stock_hook_only_when_no_ssh_builder_can_build() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("ferry.toml");
    let fleet = Fleet::start(FleetConfig {
        builders: 2,
        max_jobs_per_builder: 2,
        client_conf: format!("build-hook = {}", ferry_bin("ferry-build-hook").display()),
        daemon_env: vec![("FERRY_CONFIG".to_owned(), config.display().to_string())],
        ..Default::default()
    })
    .expect("fleet");
    let ng = fleet
        .machine_line(0)
        .expect("line")
        .replacen("ssh://", "ssh-ng://", 1);
    let plain = fleet.machine_line(1).expect("line");
    let machines = fleet.client.dir.join("etc-nix/machines");
    std::fs::write(&machines, format!("{ng}\n{plain}\n")).expect("machines");
    for k in 0..2 {
        let out = fleet.nix_build(&trivial_drv(&format!("{}-{k}", nonce()), "m"), &["-j0"]);
        check(&out, "mixed builders").unwrap_or_else(|e| panic!("{e}\n{}", fleet.daemon_log()));
        let p = &out_paths(&out)[0];
        assert!(
            fleet.builders[1].has_store_path(p),
            "not built on the ssh:// builder"
        );
        assert!(
            !fleet.builders[0].has_store_path(p),
            "built on the ssh-ng:// builder"
        );
    }

    std::fs::write(&machines, format!("{ng}\n")).expect("machines");
    std::fs::write(
        &config,
        "[build-hook]\nstock-hook = \"/nonexistent/build-remote\"\n",
    )
    .expect("config");
    let out = fleet.nix_build(&trivial_drv(&nonce(), "n"), &["-j0"]);
    assert!(!out.status.success(), "built without a stock hook");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/build-remote"), "{err}");
    let b0 = &fleet.builders[0].addr;
    assert!(err.contains(&format!("ssh-ng://root@{b0}")), "{err}");
}

/// A builder without Nix (here: `remote-program` pointing nowhere): the error names the
/// builder and says the remote command was not found (Ferry only: the stock hook reports a
/// protocol mismatch).
#[test]
fn builder_without_nix_is_named() {
    let fleet = fleet(Hook::Ferry, 1, 1);
    let line = fleet.machine_line(0).expect("line");
    let mut f: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    f[0].push_str("?remote-program=/nonexistent/nix-store");
    std::fs::write(
        fleet.client.dir.join("etc-nix/machines"),
        f.join(" ") + "\n",
    )
    .expect("machines");
    let out = fleet.nix_build(&trivial_drv(&nonce(), "nonix"), &["-j0"]);
    assert!(!out.status.success(), "built on a builder without Nix");
    let err = String::from_utf8_lossy(&out.stderr);
    let b0 = &fleet.builders[0].addr;
    assert!(
        err.contains(&format!(
            "ssh://root@{b0}?remote-program=/nonexistent/nix-store"
        )),
        "{err}"
    );
    assert!(
        err.contains("the remote command /nonexistent/nix-store was not found"),
        "{err}"
    );
}
