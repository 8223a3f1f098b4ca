//! Fixtures for the health tests: a fleet whose daemon runs `ferry-build-hook` (or the stock
//! hook) with a Ferry configuration file, timed builds, and `ferry-build-hook status`.

use crate::{Fleet, FleetConfig, chain_drv, check, ferry_bin, nonce, out_paths, trivial_drv};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Stock `build-remote`, as installed.
    Stock,
    /// Stock, tuned the way careful users tune it (`NIX_SSHOPTS="-o ConnectTimeout=2"`).
    StockTuned,
    Ferry,
}

pub struct TestFleet {
    pub fleet: Fleet,
    pub config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TestFleet {
    type Target = Fleet;
    fn deref(&self) -> &Fleet {
        &self.fleet
    }
}

impl std::ops::DerefMut for TestFleet {
    fn deref_mut(&mut self) -> &mut Fleet {
        &mut self.fleet
    }
}

/// [`timed_build`] that must finish within `limit` and succeed (else the daemon's log is
/// shown); `what` names the build in a failure.
pub fn timed_build_ok(
    f: &Fleet,
    expr: &str,
    args: &[&str],
    limit: Duration,
    what: &str,
) -> (Output, Duration) {
    let (out, t) = timed_build(f, expr, args, limit);
    let out = out.unwrap_or_else(|| panic!("{what} timed out"));
    check(&out, what).unwrap_or_else(|e| panic!("{e}\n{}", f.daemon_log()));
    (out, t)
}

/// `nix-build ARGS` of `expr` on the client: it must succeed (else the daemon's log is shown;
/// `what` names the build). Returns its first output.
pub fn build_one(fleet: &Fleet, expr: &str, args: &[&str], what: &str) -> String {
    let out = fleet.nix_build(expr, args);
    check(&out, what).unwrap_or_else(|e| panic!("{e}\n{}", fleet.daemon_log()));
    out_paths(&out).remove(0)
}

/// Checks that `path` was built on builder `on` and not on builder `off`; `what` names the
/// build in a failure (`{what} not on b{on}`, `{what} on b{off}`).
pub fn assert_built_on(fleet: &Fleet, path: &str, on: usize, off: usize, what: &str) {
    assert!(
        fleet.builders[on].has_store_path(path),
        "{what} not on b{on}"
    );
    assert!(
        !fleet.builders[off].has_store_path(path),
        "{what} on b{off}"
    );
}

/// `nix-build -j0` of a new two-level chain on the client (the client may not build, so the
/// hook must offload it): it must succeed (else the daemon's log is shown; `what` names the
/// build), give one output, and that output must be in builder 0's store. Returns it.
pub fn build_chain_remotely(fleet: &Fleet, what: &str) -> String {
    let out = fleet.nix_build(&chain_drv(&nonce()), &["-j0"]);
    check(&out, what).unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", fleet.daemon_log()));
    let mut paths = out_paths(&out);
    assert_eq!(paths.len(), 1, "{paths:?}");
    let top = paths.remove(0);
    assert!(
        fleet.builders[0].has_store_path(&top),
        "{what}: {top} not built on b0"
    );
    top
}

/// A fleet with `builders` builders of `slots` slots; `ferry_toml` is the `[build-hook]`
/// section's body (the file is passed to the daemon with `FERRY_CONFIG`).
pub fn start(hook: Hook, builders: usize, slots: u32, ferry_toml: &str) -> TestFleet {
    start_on(hook, builders, slots, ferry_toml, None)
}

/// A fleet whose client nix.conf gets `client_conf` and nothing else from the fixture (no
/// `build-hook`, so nothing is copied into the daemon's `NIX_CONFIG` either).
pub fn start_plain(builders: usize, slots: u32, client_conf: &str) -> TestFleet {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, "[build-hook]\n").expect("ferry.toml");
    let fleet = Fleet::start(FleetConfig {
        builders,
        max_jobs_per_builder: slots,
        client_conf: client_conf.to_owned(),
        daemon_env: vec![("FERRY_CONFIG".to_owned(), config.display().to_string())],
        ..Default::default()
    })
    .expect("fleet");
    TestFleet {
        fleet,
        config,
        _dir: dir,
    }
}

/// [`start`] with every host on `nix` (`None`: the version under test).
pub fn start_on(
    hook: Hook,
    builders: usize,
    slots: u32,
    ferry_toml: &str,
    nix: Option<crate::Nix>,
) -> TestFleet {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, format!("[build-hook]\n{ferry_toml}\n")).expect("ferry.toml");
    let mut daemon_env = vec![("FERRY_CONFIG".to_owned(), config.display().to_string())];
    let client_conf = match hook {
        Hook::Ferry => format!("build-hook = {}", ferry_bin("ferry-build-hook").display()),
        Hook::Stock => String::new(),
        Hook::StockTuned => {
            daemon_env.push(("NIX_SSHOPTS".to_owned(), "-o ConnectTimeout=2".to_owned()));
            String::new()
        }
    };
    let fleet = Fleet::start(FleetConfig {
        builders,
        max_jobs_per_builder: slots,
        client_conf,
        daemon_env,
        client_nix: nix.clone(),
        builder_nix: nix,
    })
    .expect("fleet");
    TestFleet {
        fleet,
        config,
        _dir: dir,
    }
}

/// `n` trivial derivations in one expression.
pub fn many(nonce: &str, n: usize) -> String {
    let drvs: Vec<String> = (0..n)
        .map(|k| format!("({})", trivial_drv(&format!("{nonce}-{k}"), "h")))
        .collect();
    format!("[ {} ]", drvs.join(" "))
}

/// `n` derivations in one expression whose builds take `secs` seconds each (`sleep`), so
/// that a builder's slots stay taken while the daemon asks about the next ones.
pub fn many_slow(nonce: &str, n: usize, secs: u32) -> String {
    let drvs: Vec<String> = (0..n)
        .map(|k| {
            format!(
                r#"(builtins.derivation {{ name = "ferry-slow-{nonce}-{k}"; system = "{}"; builder = "/bin/sh"; args = [ "-c" "sleep {secs}; echo {k} > $out" ]; PATH = "/usr/bin:/bin"; }})"#,
                crate::SYSTEM
            )
        })
        .collect();
    format!("[ {} ]", drvs.join(" "))
}

/// `nix-build` with a time limit: `None` if it was still running at `limit` (then killed).
pub fn timed_build(
    f: &Fleet,
    expr: &str,
    args: &[&str],
    limit: Duration,
) -> (Option<Output>, Duration) {
    let mut c = f.client_command("nix-build");
    c.args(["--no-out-link", "-E", expr])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = c.spawn().expect("spawn nix-build");
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().expect("output");
            return (Some(out), start.elapsed());
        }
        if start.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            return (None, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `ferry-build-hook <args>` on the client (its /etc/nix and state), with the fleet's
/// Ferry configuration.
pub fn hook_command(tf: &TestFleet, args: &[&str]) -> Output {
    let mut c = tf
        .client
        .command(&ferry_bin("ferry-build-hook").display().to_string());
    c.args(args)
        .env("FERRY_CONFIG", &tf.config)
        .env_remove("NIX_CONF_DIR")
        .env_remove("NIX_STATE_DIR")
        .env_remove("FERRY_STATE_DIR")
        .stdin(Stdio::null());
    c.output().expect("ferry-build-hook")
}

/// `status --json`, as builder URI → its row.
pub fn status(tf: &TestFleet) -> Vec<serde_json::Value> {
    let out = hook_command(tf, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The status row of builder `i`.
pub fn row(tf: &TestFleet, rows: &[serde_json::Value], i: usize) -> serde_json::Value {
    let addr = &tf.builders[i].addr;
    rows.iter()
        .find(|r| {
            r["builder"]
                .as_str()
                .is_some_and(|b| b.contains(&format!("@{addr}")))
        })
        .cloned()
        .unwrap_or_else(|| panic!("no status row for b{i} in {rows:?}"))
}

/// Builder `i`'s status row once its state is known: a probe the hook did not wait for
/// (it answered from another, healthy builder) finishes in a detached process within the
/// probe budget, possibly after the build that started it.
pub fn settled_row(tf: &TestFleet, i: usize) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let settled = crate::wait_until("a builder's probe result", Duration::from_secs(5), || {
        last = row(tf, &status(tf), i);
        last["state"] != "unknown"
    });
    settled.unwrap_or_else(|e| panic!("{e}: {last}"));
    last
}

/// Installs an executable script at `path` (under /nix) on builder `i`.
pub fn install_script(f: &Fleet, i: usize, path: &str, body: &str) {
    let p = f.builders[i].nix_path(path);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Builder `i`'s machines line with `query` appended to its URI and speed factor `sf`.
pub fn machine_line_with(f: &Fleet, i: usize, query: &str, sf: u32) -> String {
    let l = f.machine_line(i).expect("line");
    let mut fields: Vec<String> = l.split_whitespace().map(str::to_owned).collect();
    fields[0].push_str(query);
    fields[4] = sf.to_string();
    fields.join(" ")
}

pub fn write_machines(f: &Fleet, lines: &[String]) {
    std::fs::write(
        f.client.dir.join("etc-nix/machines"),
        lines.join("\n") + "\n",
    )
    .expect("machines");
}
