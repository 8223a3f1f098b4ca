//! Builder health in `ferry-build-hook`, against a real Nix 2.8 daemon on the fleet: dead
//! builders (blackholed, refused, slow) are found within the probe budget, remembered on
//! disk across derivations and `nix-build` runs, retried by one probe when their back-off
//! ends, and reported; with `max-jobs = 0` and nothing alive the build fails fast with the
//! reasons; a builder that breaks after the accept is replaced by another.
//!
//! The bug class: the stock hook forgets a dead builder with every accept (a new hook
//! process per build, docs/hook-protocol.md §1.9), so each derivation pays its SSH time-out
//! again (NixOS/nix#13513, #1712; docs/testing.md §5: 676 s for 5 derivations).
//!
//! These tests need root (network and mount namespaces); CI runs them as root.

use ferry_integration::support::hook as hook_health_support;

use ferry_integration::{check, nonce, out_paths, trivial_drv};
use hook_health_support::{
    Hook, assert_built_on, hook_command, install_script, machine_line_with, many, many_slow, row,
    settled_row, start, status, timed_build, timed_build_ok, write_machines,
};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(50);

fn built_on(f: &ferry_integration::Fleet, paths: &[String]) -> Vec<Vec<usize>> {
    paths
        .iter()
        .map(|p| {
            (0..f.builders.len())
                .filter(|&i| f.builders[i].has_store_path(p))
                .collect()
        })
        .collect()
}

/// One blackholed and one healthy builder, `-j0`: every derivation goes to the healthy
/// one, the dead one is probed once (within the 1 s budget) and then skipped — by the
/// later derivations of the run and by a second `nix-build`, which must not probe it again
/// while it backs off.
#[test]
fn blackholed_builder_is_skipped_and_remembered_across_runs() {
    let tf = start(Hook::Ferry, 2, 2, "backoff-base-secs = 120");
    tf.blackhole(0).expect("blackhole");
    let (out, t1) = timed_build_ok(&tf, &many(&nonce(), 5), &["-j0"], LIMIT, "first run");
    let paths = out_paths(&out);
    assert_eq!(paths.len(), 5);
    assert!(
        built_on(&tf, &paths).iter().all(|on| on == &[1]),
        "not all on b1"
    );
    // Stock pays the SSH time-out per derivation (676 s); one probe budget is the bound here
    // (plus the builds, with slack for a loaded CI machine).
    assert!(t1 < Duration::from_secs(20), "first run took {t1:?}");

    let b0 = settled_row(&tf, 0);
    let rows = status(&tf);
    assert_eq!(b0["state"], "down", "{b0}");
    assert_eq!(b0["consecutive-failures"], 1, "{b0}");
    assert!(
        b0["last-error"]
            .as_str()
            .unwrap_or("")
            .contains("no answer within 1000 ms"),
        "{b0}"
    );
    let attempts = b0["attempts"].clone();
    assert_eq!(row(&tf, &rows, 1)["state"], "up");

    let (out, t2) = timed_build_ok(&tf, &many(&nonce(), 5), &["-j0"], LIMIT, "second run");
    assert!(built_on(&tf, &out_paths(&out)).iter().all(|on| on == &[1]));
    let b0 = row(&tf, &status(&tf), 0);
    assert_eq!(
        b0["attempts"], attempts,
        "the second run probed the dead builder: {b0}"
    );
    assert_eq!(b0["consecutive-failures"], 1, "{b0}");
    println!("blackholed + healthy, -j0, 5 derivations: first run {t1:?}, second {t2:?}");
}

/// A blackholed builder with local builds allowed: the build falls back to local at once;
/// once the builder is healed and its (shortened) back-off is over, one probe brings it
/// back and it builds again.
#[test]
fn builder_that_comes_back_is_used_again() {
    let tf = start(
        Hook::Ferry,
        1,
        1,
        "backoff-base-secs = 1\nbackoff-cap-secs = 1",
    );
    tf.blackhole(0).expect("blackhole");
    let (out, t) = timed_build_ok(&tf, &many(&nonce(), 3), &["-j1"], LIMIT, "local fallback");
    for p in out_paths(&out) {
        assert!(
            !tf.builders[0].has_store_path(&p),
            "built on the dead builder"
        );
        assert!(tf.client.has_store_path(&p));
    }
    assert!(t < Duration::from_secs(15), "local fallback took {t:?}");
    assert_eq!(row(&tf, &status(&tf), 0)["state"], "down");

    tf.heal(0).expect("heal");
    std::thread::sleep(Duration::from_millis(1500));
    let (out, _) = timed_build_ok(
        &tf,
        &trivial_drv(&nonce(), "back"),
        &["-j0"],
        LIMIT,
        "build after recovery",
    );
    let p = &out_paths(&out)[0];
    assert!(
        tf.builders[0].has_store_path(p),
        "recovered builder not used"
    );
    let b0 = row(&tf, &status(&tf), 0);
    assert_eq!(b0["state"], "up", "{b0}");
    assert_eq!(b0["consecutive-failures"], 0, "{b0}");
    assert!(b0["latency-ms"].as_f64().is_some(), "{b0}");
}

/// A builder refusing connections and one whose Nix answers too slowly (its serve program
/// sleeps past the probe budget) are both marked down with their reason; the healthy third
/// builder takes every derivation.
#[test]
fn refused_and_slow_builders_are_marked_down_with_the_reason() {
    let mut tf = start(Hook::Ferry, 3, 2, "");
    tf.stop_sshd(0).expect("stop sshd");
    install_script(
        &tf,
        1,
        "/nix/var/ferry-slow-serve",
        "sleep 5; exec nix-store \"$@\"",
    );
    let lines = vec![
        tf.machine_line(0).expect("l0"),
        machine_line_with(&tf, 1, "?remote-program=/nix/var/ferry-slow-serve", 1),
        tf.machine_line(2).expect("l2"),
    ];
    write_machines(&tf, &lines);
    let (out, t) = timed_build_ok(&tf, &many(&nonce(), 4), &["-j0"], LIMIT, "build");
    assert!(built_on(&tf, &out_paths(&out)).iter().all(|on| on == &[2]));
    assert!(t < Duration::from_secs(20), "took {t:?}");
    let (b0, b1) = (settled_row(&tf, 0), settled_row(&tf, 1));
    let rows = status(&tf);
    assert_eq!(b0["state"], "down", "{b0}");
    assert!(
        b0["last-error"]
            .as_str()
            .unwrap_or("")
            .contains("Connection refused"),
        "{b0}"
    );
    assert_eq!(b1["state"], "down", "{b1}");
    assert!(
        b1["last-error"]
            .as_str()
            .unwrap_or("")
            .contains("no answer within"),
        "{b1}"
    );
    assert_eq!(row(&tf, &rows, 2)["state"], "up");
    // The human table names them too.
    let table = hook_command(&tf, &["status"]);
    let text = String::from_utf8_lossy(&table.stdout);
    // The table follows the line about which build hook the daemon runs.
    assert!(
        text.lines().any(|l| l.starts_with("BUILDER")) && text.contains("Connection refused"),
        "{text}"
    );
}

/// `max-jobs = 0` and every builder blackholed: the build fails within seconds (stock: 133 s)
/// with a message naming each builder, its state and reason, and the way to build locally.
/// `probe` then checks every builder on demand.
#[test]
fn all_builders_dead_fails_fast_with_reasons() {
    let tf = start(Hook::Ferry, 2, 1, "");
    tf.blackhole(0).expect("blackhole b0");
    tf.blackhole(1).expect("blackhole b1");
    let (out, t) = timed_build(&tf, &trivial_drv(&nonce(), "dead"), &["-j0"], LIMIT);
    let out = out.expect("timed out");
    assert!(!out.status.success(), "built with every builder dead");
    assert!(t < Duration::from_secs(6), "failing took {t:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for b in &tf.builders {
        assert!(
            err.contains(&format!("ssh://root@{}: down since", b.addr)),
            "{err}"
        );
    }
    assert!(err.contains("no answer within 1000 ms"), "{err}");
    assert!(
        err.contains("max-jobs = 0") && err.contains("--max-jobs 1"),
        "{err}"
    );

    // Again: now from the remembered state, without waiting for any probe.
    let (out, t2) = timed_build(&tf, &trivial_drv(&nonce(), "dead2"), &["-j0"], LIMIT);
    let out = out.expect("timed out");
    assert!(!out.status.success());
    assert!(t2 < Duration::from_secs(3), "second failure took {t2:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 failure"));

    // `probe` ignores the back-off: b1 healed is up, b0 still down (exit 1).
    tf.heal(1).expect("heal");
    let p = hook_command(&tf, &["probe", "--json"]);
    assert_eq!(
        p.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&p.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&p.stdout).expect("json");
    assert_eq!(row(&tf, &rows, 1)["state"], "up", "{rows:?}");
    assert_eq!(row(&tf, &rows, 0)["state"], "down", "{rows:?}");
    let (out, _) = timed_build_ok(
        &tf,
        &trivial_drv(&nonce(), "alive"),
        &["-j0"],
        LIMIT,
        "build on the healed builder",
    );
    assert!(tf.builders[1].has_store_path(&out_paths(&out)[0]));
}

/// Failover after the accept: b0 (speed factor 2, so chosen first) passes the probe — its
/// serve handshake works — but its `nix-store --serve` stops reading right after the
/// handshake (its stdin is cut to the 16 handshake bytes), so the copy fails after the
/// hook accepted. The hook records b0 down and builds on b1 in the same run.
#[test]
fn copy_failure_after_accept_fails_over_to_another_builder() {
    let tf = start(Hook::Ferry, 2, 1, "");
    install_script(
        &tf,
        0,
        "/nix/var/ferry-cut-serve",
        "head -c 16 | nix-store \"$@\"",
    );
    let lines = vec![
        machine_line_with(&tf, 0, "?remote-program=/nix/var/ferry-cut-serve", 2),
        tf.machine_line(1).expect("l1"),
    ];
    write_machines(&tf, &lines);
    let (out, _) = timed_build_ok(
        &tf,
        &trivial_drv(&nonce(), "over"),
        &["-j0"],
        LIMIT,
        "build with failover",
    );
    let p = &out_paths(&out)[0];
    assert_built_on(&tf, p, 1, 0, "the build with failover");
    let err = String::from_utf8_lossy(&out.stderr);
    let b0 = &tf.builders[0].addr;
    assert!(
        err.contains(&format!("copying to 'ssh://root@{b0}")),
        "{err}"
    );
    assert!(err.contains("building on"), "{err}");
    let rows = status(&tf);
    let r0 = row(&tf, &rows, 0);
    assert_eq!(r0["state"], "down", "{r0}");
    assert!(
        r0["last-error"]
            .as_str()
            .unwrap_or("")
            .contains("query_valid_paths"),
        "{r0}"
    );
    let r1 = row(&tf, &rows, 1);
    assert_eq!(r1["state"], "up", "{r1}");
    assert!(
        !r1["mean-build-secs"].is_null(),
        "build time not recorded: {r1}"
    );
}

/// A transient builder error after the accept is retried: b0's first serve session does the
/// handshake, then ends the way Nix ends it when its database is busy (`error: SQLite
/// database '…' is busy` on stderr, connection closed). The hook classifies that as
/// transient, waits a moment, connects again and builds on b0; b0 is not marked down. The
/// same ending without a cause on stderr stays a builder failure (see the failover test).
#[test]
fn transient_builder_error_after_accept_is_retried() {
    let tf = start(Hook::Ferry, 1, 1, "");
    install_script(
        &tf,
        0,
        "/nix/var/ferry-busy-once",
        "if [ ! -e /nix/var/ferry-busy-once.done ]; then touch /nix/var/ferry-busy-once.done; \
         head -c 16 | nix-store \"$@\"; \
         echo \"error: SQLite database '/nix/var/nix/db/db.sqlite' is busy\" >&2; exit 1; fi; \
         exec nix-store \"$@\"",
    );
    write_machines(
        &tf,
        &[machine_line_with(
            &tf,
            0,
            "?remote-program=/nix/var/ferry-busy-once",
            1,
        )],
    );
    let (out, _) = timed_build_ok(
        &tf,
        &trivial_drv(&nonce(), "busy"),
        &["-j0"],
        LIMIT,
        "build after a busy database",
    );
    assert!(tf.builders[0].has_store_path(&out_paths(&out)[0]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("database was busy") && err.contains("trying again on"),
        "{err}"
    );
    assert!(
        tf.builders[0]
            .nix_path("/nix/var/ferry-busy-once.done")
            .exists()
    );
    let r0 = row(&tf, &status(&tf), 0);
    assert_eq!(r0["state"], "up", "{r0}");
}

/// Every builder busy and `max-jobs = 0`: the stock answer, `# postpone`, makes Nix 2.8 ask
/// again only every `build-poll-interval` (5 s), however soon a slot frees. Ferry declines
/// while the daemon's worker has builds running, which makes Nix ask again as soon as one
/// ends: four derivations through one slot, none of them "waiting for a machine".
#[test]
fn busy_builders_are_asked_again_when_a_build_ends_not_after_the_poll_interval() {
    let tf = start(Hook::Ferry, 1, 1, "");
    let (out, _) = timed_build_ok(&tf, &many(&nonce(), 4), &["-j0"], LIMIT, "build");
    let paths = out_paths(&out);
    assert_eq!(paths.len(), 4);
    assert!(built_on(&tf, &paths).iter().all(|on| on == &[0]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("waiting for a machine"), "postponed: {err}");
}

/// The everyday state under `max-jobs = 0`: b0 is known up (an earlier build used only it)
/// and b1 has never been reached. Five derivations of one second each fill b0's two slots
/// (shorter builds could free them before the daemon asks about the third); the third must not
/// be postponed while b1 is merely unknown (a postponed goal is asked again only after
/// `build-poll-interval`, 5 s, on every Nix version), so the hook probes b1 then and there,
/// and a derivation that finds every slot taken waits briefly for one inside the hook
/// rather than `# postpone` (Nix ≥ 2.33 fails a declined derivation under `max-jobs = 0`).
/// Nix must never print "waiting for a machine", and both builders must build.
#[test]
fn known_full_builder_next_to_unknown_one_never_waits_for_a_machine() {
    let tf = start(Hook::Ferry, 2, 2, "");
    let (l0, l1) = (
        tf.machine_line(0).expect("l0"),
        tf.machine_line(1).expect("l1"),
    );
    write_machines(&tf, std::slice::from_ref(&l0));
    let (out, _) = timed_build(&tf, &trivial_drv(&nonce(), "warm"), &["-j0"], LIMIT);
    check(&out.expect("warm-up timed out"), "warm-up")
        .unwrap_or_else(|e| panic!("{e}\n{}", tf.daemon_log()));
    write_machines(&tf, &[l0, l1]);
    let rows = status(&tf);
    assert_eq!(row(&tf, &rows, 0)["state"], "up");
    assert_eq!(row(&tf, &rows, 1)["state"], "unknown");

    let (out, t) = timed_build_ok(&tf, &many_slow(&nonce(), 5, 1), &["-j0"], LIMIT, "build");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("waiting for a machine"), "postponed: {err}");
    let on = built_on(&tf, &out_paths(&out));
    assert!(on.iter().any(|o| o == &[0]), "b0 unused: {on:?}");
    assert!(on.iter().any(|o| o == &[1]), "b1 unused: {on:?}");
    println!(
        "{}: b0 known up, b1 unknown, -j0, 5 derivations: {t:?}",
        ferry_integration::Nix::under_test()
    );
}

/// One blackholed and one healthy builder (two slots), no health state, `max-jobs = 0`,
/// three derivations: the third finds b1 full while b0's probe is still running. It must
/// neither be postponed nor fail: the hook waits, within its bound, for b0's verdict or a
/// free slot on b1, whichever comes first.
#[test]
fn blackholed_and_full_healthy_builder_never_waits_for_a_machine() {
    let tf = start(Hook::Ferry, 2, 2, "");
    tf.blackhole(0).expect("blackhole");
    let (out, t) = timed_build_ok(&tf, &many(&nonce(), 3), &["-j0"], LIMIT, "build");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("waiting for a machine"), "postponed: {err}");
    assert!(built_on(&tf, &out_paths(&out)).iter().all(|on| on == &[1]));
    println!(
        "{}: 1 blackholed + 1 healthy, -j0, 3 derivations: {t:?}",
        ferry_integration::Nix::under_test()
    );
}

/// `check-config` and `status` report whether the running daemon runs Ferry's hook. Nix
/// 2.25–2.33 ignore `build-hook` in nix.conf (NixOS/nix#15083), so a hook set only there is
/// not in effect: reported with the fix (`NIX_CONFIG` in the daemon's environment), and
/// proven by a build that leaves no trace in Ferry's health state. On other versions the
/// same nix.conf works. The fleet's usual set-up (the hook also in the daemon's
/// `NIX_CONFIG` on those versions) is reported in effect everywhere.
#[test]
fn check_config_says_whether_the_daemon_runs_this_hook() {
    let nix = ferry_integration::Nix::under_test();
    let ferry = ferry_integration::ferry_bin("ferry-build-hook");
    // Set through an include, which the fleet does not copy into NIX_CONFIG.
    let inc = tempfile::tempdir().expect("tmp");
    let inc_file = inc.path().join("hook.conf");
    std::fs::write(&inc_file, format!("build-hook = {}\n", ferry.display())).expect("write");
    let tf = hook_health_support::start_plain(1, 1, &format!("include {}", inc_file.display()));
    let out = hook_command(&tf, &["check-config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let status_text = String::from_utf8_lossy(&hook_command(&tf, &["status"]).stdout).into_owned();
    let (out2, _) = timed_build(&tf, &trivial_drv(&nonce(), "which"), &["-j0"], LIMIT);
    check(&out2.expect("timed out"), "build").unwrap_or_else(|e| panic!("{e}"));
    let state = row(&tf, &status(&tf), 0)["state"].clone();
    println!("{nix}, build-hook in nix.conf only:\n{text}");
    if nix.ignores_build_hook_in_conf() {
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(text.contains("NOT in effect"), "{text}");
        assert!(text.contains("ignores build-hook in nix.conf"), "{text}");
        assert!(
            text.contains(&format!(
                "Environment=\"NIX_CONFIG=build-hook = {}\"",
                ferry.display()
            )),
            "{text}"
        );
        assert!(status_text.contains("NOT in effect"), "{status_text}");
        // The daemon really ran the stock hook: Ferry recorded nothing.
        assert_eq!(state, "unknown", "{nix}: Ferry's hook ran");
    } else {
        assert_eq!(out.status.code(), Some(0), "{text}");
        assert!(text.contains("build hook: in effect"), "{text}");
        assert!(text.contains("hook.conf:1"), "{text}");
        assert!(
            status_text.contains("build hook: in effect"),
            "{status_text}"
        );
        assert_eq!(state, "up", "{nix}: Ferry's hook did not run");
    }
    drop(tf);

    let tf = start(Hook::Ferry, 1, 1, "");
    let out = hook_command(&tf, &["check-config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("build hook: in effect"), "{text}");
    if nix.ignores_build_hook_in_conf() {
        assert!(text.contains("NIX_CONFIG:"), "{text}");
    }
    println!("{nix}, the fleet's usual set-up:\n{text}");
}
