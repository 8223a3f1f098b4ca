//! The fleet fixture itself, and the stock-Nix baseline every Ferry hook test compares with:
//! a real Nix 2.8 daemon offloading through the stock `build-remote` to builders over sshd.
//!
//! These tests need root (network and mount namespaces); CI runs them as root.

use ferry_integration::support::hook::build_chain_remotely;
use ferry_integration::{Fleet, FleetConfig, check, nonce, out_paths, trivial_drv};
use std::process::Command;

fn namespaces() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned()
}

#[test]
fn stock_build_remote_offloads_a_two_level_closure() {
    let fleet = Fleet::start(FleetConfig::default()).expect("fleet");
    // -j0: the client may not build locally, so the build must go through the stock hook;
    // built on the builder: the output and its whole closure exist in the builder's store.
    let top = &build_chain_remotely(&fleet, "nix-build through stock build-remote");
    // Valid on the client, with the references the build recorded.
    let refs = fleet
        .client_command("nix-store")
        .args(["-q", "--references", top])
        .output()
        .expect("nix-store -q");
    check(&refs, "nix-store -q --references").expect("references");
    let refs = String::from_utf8_lossy(&refs.stdout).into_owned();
    assert!(
        refs.lines().any(|l| l.contains("-ferry-mid-")),
        "references: {refs}"
    );
    let verify = fleet
        .client_command("nix-store")
        .args(["--verify-path", top])
        .output()
        .expect("verify");
    check(&verify, "nix-store --verify-path on the client").expect("valid on client");
    let copy =
        std::fs::read_to_string(fleet.client.nix_path(&format!("{top}/copy"))).expect("copy");
    assert_eq!(copy, "leaf\n");
}

#[test]
fn stock_build_remote_fails_with_max_jobs_0_when_the_builder_refuses() {
    let mut fleet = Fleet::start(FleetConfig::default()).expect("fleet");
    fleet.stop_sshd(0).expect("stop sshd");
    let out = fleet.nix_build(&trivial_drv(&nonce(), "x"), &["-j0"]);
    assert!(!out.status.success(), "built with no builder and -j0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Failed to find a machine for remote build"),
        "{err}"
    );
    // Healing brings the builder back.
    fleet.start_sshd(0).expect("restart sshd");
    let out = fleet.nix_build(&trivial_drv(&nonce(), "y"), &["-j0"]);
    check(&out, "build after healing").expect("healed");
}

#[test]
fn two_fleets_run_side_by_side_without_colliding() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Fleet::start(FleetConfig::default()).expect("fleet a"));
        let b = s.spawn(|| Fleet::start(FleetConfig::default()).expect("fleet b"));
        (a.join().expect("a"), b.join().expect("b"))
    });
    let na = a.namespaces();
    let nb = b.namespaces();
    assert!(na.iter().all(|n| !nb.contains(n)), "{na:?} {nb:?}");
    assert_ne!(a.builders[0].addr, b.builders[0].addr);
    let nonce = nonce();
    // The same derivation text in both fleets gives the same store path; each must be built by
    // its own builder and be valid on its own client only.
    let expr = trivial_drv(&nonce, "same");
    let (oa, ob) = std::thread::scope(|s| {
        let (ea, eb) = (&expr, &expr);
        let ta = s.spawn(|| a.nix_build(ea, &["-j0"]));
        let tb = s.spawn(|| b.nix_build(eb, &["-j0"]));
        (ta.join().expect("a"), tb.join().expect("b"))
    });
    check(&oa, "fleet a build").expect("a");
    check(&ob, "fleet b build").expect("b");
    let pa = out_paths(&oa);
    assert_eq!(pa, out_paths(&ob));
    assert!(a.builders[0].has_store_path(&pa[0]) && a.client.has_store_path(&pa[0]));
    assert!(b.builders[0].has_store_path(&pa[0]) && b.client.has_store_path(&pa[0]));
    // A third build only in fleet a stays in fleet a.
    let only_a = a.nix_build(&trivial_drv(&format!("{nonce}-a"), "a"), &["-j0"]);
    check(&only_a, "fleet a only").expect("a only");
    let p = &out_paths(&only_a)[0];
    assert!(!b.client.has_store_path(p) && !b.builders[0].has_store_path(p));
}

#[test]
fn teardown_leaves_no_namespace_mount_or_process() {
    let fleet = Fleet::start(FleetConfig {
        builders: 2,
        ..Default::default()
    })
    .expect("fleet");
    let names = fleet.namespaces();
    let dir = fleet.root.path().to_owned();
    let listed = namespaces();
    assert!(names.iter().all(|n| listed.contains(n.as_str())));
    // A process the fixture did not start itself (as an SSH session's `nix-store --serve`
    // would be), detached from us: teardown must find it through the namespace.
    let out = fleet.builders[1]
        .command("sh")
        .args(["-c", "sleep 1000 >/dev/null 2>&1 & echo $!"])
        .output()
        .expect("stray process");
    let stray: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("pid");
    assert!(std::path::Path::new(&format!("/proc/{stray}")).exists());
    // Teardown also runs when a test panics: unwind through a panic with the fleet alive.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _f = fleet;
        panic!("simulated test failure");
    }));
    assert!(r.is_err());
    let listed = namespaces();
    for n in &names {
        assert!(!listed.contains(n.as_str()), "namespace {n} left behind");
    }
    let ps = String::from_utf8_lossy(
        &Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .expect("ps")
            .stdout,
    )
    .into_owned();
    let d = dir.display().to_string();
    assert!(!ps.contains(&d), "process left behind:\n{ps}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&d), "mount left behind");
    // Gone, or a zombie: on some machines pid 1 does not reap the orphans it inherits.
    let stray_gone = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        ferry_integration::process_ended(&stray.to_string())
    });
    assert!(
        stray_gone,
        "process {stray} in a builder's namespace outlived the fleet"
    );
    assert!(!dir.exists(), "fleet directory left behind");
}

#[test]
fn fault_helpers_break_and_heal_a_builder() {
    // Stock hook tuned as careful users tune it (docs/testing.md §5): a 2 s connect time-out.
    let config = FleetConfig {
        daemon_env: vec![("NIX_SSHOPTS".into(), "-o ConnectTimeout=2".into())],
        ..Default::default()
    };
    let fleet = Fleet::start(config).expect("fleet");
    fleet.blackhole(0).expect("blackhole");
    // -j1: the client may build locally; with the builder dropping packets, the stock hook
    // gives up after its connect time-out and the build falls back to the client.
    let out = fleet.nix_build(&trivial_drv(&nonce(), "local"), &["-j1"]);
    check(&out, "build with a blackholed builder").expect("local fallback");
    let p = &out_paths(&out)[0];
    assert!(fleet.client.has_store_path(p));
    assert!(
        !fleet.builders[0].has_store_path(p),
        "built remotely through a blackhole"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("timed out") || err.contains("cannot build on"),
        "{err}"
    );

    fleet.heal(0).expect("heal");
    // A slow link: 64 kbit/s from the builder. Copying a 64 KiB output back takes > 5 s.
    fleet.throttle(0, "64kbit").expect("throttle");
    let big = format!(
        r#"builtins.derivation {{ name = "ferry-big-{}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "head -c 65536 /dev/zero > $out" ]; PATH = "/usr/bin:/bin"; }}"#,
        nonce()
    );
    let t = std::time::Instant::now();
    let out = fleet.nix_build(&big, &["-j0"]);
    check(&out, "build over a slow link").expect("slow link");
    let p = &out_paths(&out)[0];
    assert!(
        fleet.builders[0].has_store_path(p),
        "not built remotely over the slow link"
    );
    assert!(
        t.elapsed() >= std::time::Duration::from_secs(5),
        "link not throttled: {:?}",
        t.elapsed()
    );
    fleet.heal(0).expect("heal throttle");
    // A lossy link still carries a build (TCP retransmits).
    fleet.lossy(0, 0.1).expect("lossy");
    let out = fleet.nix_build(&trivial_drv(&nonce(), "lossy"), &["-j0"]);
    check(&out, "build over a lossy link").expect("lossy link");
    fleet.heal(0).expect("heal loss");
    let out = fleet.nix_build(&trivial_drv(&nonce(), "healed"), &["-j0"]);
    check(&out, "build after healing").expect("healed");
    assert!(fleet.builders[0].has_store_path(&out_paths(&out)[0]));
}

#[test]
fn hosts_on_the_lan_reach_each_other_and_faults_apply_to_them() {
    use ferry_integration::{blackhole_port, heal_host};
    let mut fleet = Fleet::start(FleetConfig::default()).expect("fleet");
    let cache = fleet.add_host("cache").expect("cache host");
    let www = cache.dir.join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("nix-cache-info"), "StoreDir: /nix/store\n").expect("write");
    let server = cache
        .command("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            &cache.addr.clone(),
            "8080",
            "--directory",
        ])
        .arg(&www)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("http server");
    cache.adopt(server);
    let cache_addr = fleet.host("cache").addr.clone();
    let second = fleet.add_client("client2").expect("second client");
    second.write_nix_conf("").expect("conf");
    second.start_nix_daemon(&[]).expect("daemon");
    let fetch = |h: &ferry_integration::Host| {
        // bash's /dev/tcp: on this machine and in every Nix root file system the fleet uses.
        h.command("timeout")
            .args(["2", "bash", "-c", r#"exec 3<>"/dev/tcp/$1/8080" && printf 'GET /nix-cache-info HTTP/1.0\r\n\r\n' >&3 && cat <&3 | sed '1,/^\r$/d'"#, "fetch", &cache_addr])
            .output()
            .expect("fetch")
    };
    let mut ok = false;
    for _ in 0..50 {
        let out = fetch(fleet.host("client2"));
        if out.status.success() {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "StoreDir: /nix/store\n"
            );
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ok, "client2 never reached the cache host");
    assert!(
        fetch(&fleet.client).status.success(),
        "client cannot reach the cache"
    );
    // The second host has its own nix-daemon and store.
    let out = fleet
        .host("client2")
        .nix_command("nix-store")
        .args([
            "-q",
            "--hash",
            "/nix/store/00000000000000000000000000000000-x",
        ])
        .output()
        .expect("nix-store");
    assert!(!out.status.success());
    blackhole_port(fleet.host("cache"), 8080).expect("blackhole");
    assert!(
        !fetch(fleet.host("client2")).status.success(),
        "blackholed cache still answers"
    );
    heal_host(fleet.host("cache")).expect("heal");
    assert!(
        fetch(fleet.host("client2")).status.success(),
        "healed cache does not answer"
    );
}

/// SSH commands on fleet hosts do not run root's shell start-up files (Debian's bash runs
/// ~/.bashrc for every SSH command; this machine's may start pyenv, which made logins slow
/// and, after a killed login left its lock, a minute long).
#[test]
fn logins_on_fleet_hosts_skip_the_machines_shell_rc_files() {
    let fleet = Fleet::start(FleetConfig::default()).expect("fleet");
    let b = &fleet.builders[0];
    let mut c = fleet.client.command("ssh");
    c.args(["-i"]).arg(&fleet.client_key).args([
        "-oUserKnownHostsFile=/dev/null",
        "-oStrictHostKeyChecking=no",
        "-oBatchMode=yes",
        &format!("root@{}", b.addr),
        "echo \"rc:${PYENV_ROOT-}:$(cat /root/.bashrc 2>/dev/null | wc -c)\"",
    ]);
    let out = c.output().expect("ssh");
    check(&out, "ssh to b0").expect("ssh works");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "rc::0");
}

#[test]
fn hosts_run_the_nix_under_test() {
    let want = ferry_integration::Nix::under_test();
    let fleet = Fleet::start(FleetConfig::default()).expect("fleet");
    for h in [&fleet.client, &fleet.builders[0]] {
        let out = h
            .command("nix-store")
            .arg("--version")
            .output()
            .expect("nix-store");
        check(&out, "nix-store --version").expect("version");
        let v = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            v.contains(&format!(" {}.", want.label)),
            "{} runs {v:?}, expected {want}",
            h.role
        );
    }
}
