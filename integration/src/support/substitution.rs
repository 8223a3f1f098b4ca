//! The substituting side of the upload tests: a host whose daemon substitutes only from one
//! cache with signatures required, and the checks that what it realised came from there
//! intact (`nix-store --realise`, `--verify-path`, `nix store verify`).

use crate::{Fleet, Host, check, run};
use std::ffi::OsStr;
use std::process::{Command, Output};

/// A `nix.conf` for a host that substitutes only from `url`, with signatures required and
/// `public_key` trusted.
fn substituting_conf(url: &str, public_key: &str) -> String {
    format!(
        "substituters = {url}\ntrusted-substituters = {url}\nrequire-sigs = true\n\
         trusted-public-keys = {public_key}\nconnect-timeout = 5\nstalled-download-timeout = 30\n"
    )
}

/// Points `host`'s daemon at `url` alone (see [`substituting_conf`]) and starts it.
pub fn substitute_only_from(host: &mut Host, url: &str, public_key: &str) {
    host.write_nix_conf(&substituting_conf(url, public_key))
        .expect("nix.conf");
    host.start_nix_daemon(&[]).expect("client daemon");
}

/// Adds a client host `role` whose daemon substitutes only from `url` (a Ferry on its own
/// 127.0.0.1, or a cache), with signatures required and `public_key` trusted.
pub fn add_substituting_client(fleet: &mut Fleet, role: &str, url: &str, public_key: &str) {
    let h = fleet.add_client(role).expect("client host");
    substitute_only_from(h, url, public_key);
}

/// `nix-store --realise PATHS` on `host`, unchecked.
pub fn realise<I, S>(host: &Host, paths: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut r = host.nix_command("nix-store");
    r.arg("--realise").args(paths);
    r.output().expect("nix-store --realise")
}

/// Realises `outputs` on `host` (from its substituters: nothing builds there) and checks that
/// every path of `expected` is in its store; `what` names the step in a failure.
pub fn realise_on<'a>(
    host: &Host,
    outputs: &[String],
    expected: impl IntoIterator<Item = &'a String>,
    what: &str,
) {
    let out = realise(host, outputs);
    check(&out, what).unwrap_or_else(|e| panic!("{e}"));
    for p in expected {
        assert!(host.has_store_path(p), "{what}: {p} not substituted");
    }
}

/// [`realise_on`], and every path of `expected` passes `nix-store --verify-path`.
pub fn realise_and_verify<'a>(
    host: &Host,
    outputs: &[String],
    expected: impl IntoIterator<Item = &'a String> + Clone,
    what: &str,
) {
    realise_on(host, outputs, expected.clone(), what);
    for p in expected {
        let mut v = host.nix_command("nix-store");
        v.args(["--verify-path", p]);
        run(&mut v).unwrap_or_else(|e| panic!("{what}: verify {p}: {e}"));
    }
}

/// `nix store verify --store STORE` of `paths` with `nix` (a `nix` command on some host),
/// trusting only `public_key`: Nix checks the cache's NAR hashes and signatures. `what`
/// names the cache in a failure.
pub fn verify_cache<I, S>(mut nix: Command, store: &str, public_key: &str, paths: I, what: &str)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    nix.args([
        "--extra-experimental-features",
        "nix-command",
        "store",
        "verify",
        "--store",
        store,
    ])
    .args(["--trusted-public-keys", public_key])
    .args(paths);
    run(&mut nix).unwrap_or_else(|e| panic!("nix store verify of {what}: {e}"));
}
