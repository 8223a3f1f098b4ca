//! The hook binary driven as the daemon drives it: bytes on stdin, replies on stderr, no
//! builder contacted (every scenario here is decided before connecting).

use ferry_nix::wire::WireWriter;
use std::io::Write;
use std::process::{Command, Stdio};

fn stdin_bytes(builders: &str, max_jobs_willing: bool, system: &str, features: &[&str]) -> Vec<u8> {
    let mut w = WireWriter::new(Vec::new());
    w.write_settings(&[("builders", builders), ("system", "x86_64-linux")])
        .expect("w");
    for _ in 0..2 {
        w.write_str("try").expect("w");
        w.write_bool(max_jobs_willing).expect("w");
        w.write_str(system).expect("w");
        w.write_str("/nix/store/00000000000000000000000000000000-x.drv")
            .expect("w");
        w.write_strings(features.iter().copied()).expect("w");
    }
    w.into_inner()
}

/// Runs the hook with Nix 2.8's argv (`[path, verbosity]`) and returns (status, stderr).
fn run_hook(input: &[u8], argv_extra: &[&str]) -> (i32, String, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(tmp.path().join("conf")).expect("conf");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-build-hook"))
        .args(argv_extra)
        .env("NIX_CONF_DIR", tmp.path().join("conf"))
        .env("NIX_STATE_DIR", tmp.path().join("state"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hook");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        tmp,
    )
}

#[test]
fn empty_builders_decline_permanently() {
    let (code, err, _t) = run_hook(&stdin_bytes("", false, "x86_64-linux", &[]), &["3"]);
    assert_eq!(code, 0);
    assert_eq!(err, "# decline-permanently\n");
}

#[test]
fn no_machine_of_the_right_type_declines_with_a_message() {
    // 2.10+ argv form: extra words, verbosity last.
    let (code, err, _t) = run_hook(
        &stdin_bytes("ssh://h aarch64-linux", true, "x86_64-linux", &[]),
        &["__build-remote", "5"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.matches("# decline\n").count(), 2, "{err}");
    assert!(err.contains("@nix {\"action\":\"msg\""), "{err}");
    assert!(
        err.contains("Failed to find a machine for remote build!"),
        "{err}"
    );
}

#[test]
fn busy_machines_and_busy_local_slots_decline_so_nix_waits_for_a_slot() {
    // One slot on h, held from here as another hook would hold it; amWilling is 0 with the
    // default max-jobs (1), so the local slot is taken by a running build. The stock hook
    // would postpone (asked again in 5 s); a decline makes Nix wait for a build slot and ask
    // again as soon as any build ends.
    let tmp_state = tempfile::tempdir().expect("tmp");
    let load = tmp_state.path().join("current-load");
    std::fs::create_dir_all(&load).expect("dir");
    let slot = std::fs::File::create(load.join("ssh:__h-0")).expect("slot");
    slot.lock().expect("lock");
    // h is known healthy (Ferry only postpones for healthy builders, never for dead ones).
    ferry_build_hook::health_store::HealthStore::open(&tmp_state.path().join("ferry"))
        .expect("health")
        .update("ssh://h", |h| {
            h.record_success(ferry_build_hook::health::now_ms(), None)
        })
        .expect("record");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-build-hook"))
        .arg("3")
        .env("NIX_CONF_DIR", tmp_state.path().join("conf"))
        .env("NIX_STATE_DIR", tmp_state.path())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&stdin_bytes(
            "ssh://h x86_64-linux - 1",
            false,
            "x86_64-linux",
            &[],
        ))
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err, "# decline\n# decline\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn missing_verbosity_is_an_error() {
    let (code, err, _t) = run_hook(&[], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("without the verbosity"), "{err}");
}
