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

use ferry_integration::support::hook as support;

use ferry_integration::{check, nonce, out_paths, stdout_of, zeros_drv};
use std::process::Command;
use support::{Hook, TestFleet, start};

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
