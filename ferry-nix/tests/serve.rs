//! The serve-protocol client against the real `nix-store --serve --write` (Nix 2.8.0 on this
//! machine), and the real CLI to check what it did.
//!
//! Store setup, and why not a chroot store: each test gets a throwaway store under a
//! tempdir through `NIX_STORE_DIR`/`NIX_STATE_DIR`/`NIX_LOG_DIR` (plus `NIX_CONF_DIR` with
//! `sandbox = false`, `build-users-group =`, `substituters =`), so the store directory is
//! `<tmp>/store`, not `/nix/store`. A chroot store (`--store local?root=…`) would be simpler
//! for adding and dumping paths, but Nix 2.8 forces a chroot for every build in a store whose
//! real directory differs from its logical one (`useChroot = true` in
//! `local-derivation-goal.cc`), even with `sandbox = false`, and that chroot has no
//! `/bin/sh`: the build fails with "executing '/bin/sh': No such file or directory"
//! (checked with Nix 2.8.0). A real store directory under the tempdir builds `/bin/sh`
//! derivations directly, and as a bonus exercises the client with a store directory other
//! than `/nix/store`.

use ferry_nix::derivation::Derivation;
use ferry_nix::hash::Hash;
use ferry_nix::nar::{self, NarEncoder};
use ferry_nix::serve::{
    BuildOptions, BuildStatus, PROTOCOL_VERSION, PathInfo, ServeClient, ServeError,
};
use ferry_nix::store_path::{StoreDir, StorePath};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

type Client = ServeClient<ChildStdout, ChildStdin>;

/// A throwaway Nix store under a tempdir.
struct TestStore {
    tmp: tempfile::TempDir,
    store_dir: StoreDir,
}

impl TestStore {
    fn new() -> TestStore {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("conf")).expect("conf dir");
        std::fs::write(
            tmp.path().join("conf/nix.conf"),
            "substituters =\nsandbox = false\nbuild-users-group =\n",
        )
        .expect("nix.conf");
        let store_dir = StoreDir::new(tmp.path().join("store").to_str().expect("utf-8 path"))
            .expect("store dir");
        TestStore { tmp, store_dir }
    }

    fn env(&self) -> Vec<(&'static str, PathBuf)> {
        let t = self.tmp.path();
        vec![
            ("NIX_STORE_DIR", t.join("store")),
            ("NIX_STATE_DIR", t.join("state")),
            ("NIX_LOG_DIR", t.join("log")),
            ("NIX_CONF_DIR", t.join("conf")),
            ("NIX_USER_CONF_FILES", PathBuf::new()),
            ("NIX_REMOTE", PathBuf::from("local")),
            ("HOME", t.to_path_buf()),
            ("XDG_CACHE_HOME", t.join("cache")),
        ]
    }

    /// Runs a Nix CLI command against this store; returns stdout, panics on failure.
    fn cli(&self, prog: &str, args: &[&str]) -> String {
        let out = std::process::Command::new(prog)
            .args(args)
            .envs(self.env())
            .env_remove("NIX_CONFIG")
            .output()
            .expect("run nix");
        assert!(
            out.status.success(),
            "{prog} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    fn spawn_server(&self) -> Child {
        let log = std::fs::File::create(self.tmp.path().join("serve.log")).expect("log file");
        Command::new("nix-store")
            .args(["--serve", "--write"])
            .envs(self.env())
            .env_remove("NIX_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nix-store --serve")
    }

    async fn connect(&self) -> (Client, Child) {
        let mut child = self.spawn_server();
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let client = ServeClient::handshake(stdout, stdin, self.store_dir.clone(), "test-remote")
            .await
            .expect("handshake");
        (client, child)
    }

    /// Waits for the server to end and checks that it logged a hash mismatch.
    async fn check_server_refused_the_hash(&self, child: &mut Child) {
        let _ = child.wait().await;
        let log = self.server_log();
        assert!(log.contains("hash mismatch"), "{log}");
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("serve.log")).unwrap_or_default()
    }

    fn show(&self, p: &StorePath) -> String {
        self.store_dir.display(p)
    }

    /// Writes `expr` to a file and instantiates it; returns the `.drv` path.
    fn instantiate(&self, name: &str, expr: &str) -> StorePath {
        let file = self.tmp.path().join(format!("{name}.nix"));
        std::fs::write(&file, expr).expect("write expression");
        let drv = self.cli(
            "nix-instantiate",
            &[
                file.to_str().expect("utf-8"),
                "--option",
                "sandbox",
                "false",
            ],
        );
        self.store_dir.parse(drv.trim()).expect("drv path")
    }

    fn read_drv(&self, drv: &StorePath) -> Derivation {
        let f = std::fs::File::open(self.show(drv)).expect("open drv");
        Derivation::read_from(f, &self.store_dir).expect("parse drv")
    }
}

async fn finish(client: Client, mut child: Child) {
    client.close().await.expect("close");
    let status = child.wait().await.expect("wait");
    assert!(status.success(), "nix-store --serve exited with {status}");
}

fn store_path(name: &str) -> StorePath {
    let h = Hash::sha256_of(name.as_bytes());
    let mut digest = [0u8; 20];
    digest.copy_from_slice(&h.bytes()[..20]);
    StorePath::from_parts(digest, name).expect("store path")
}

fn info_for(path: StorePath, nar: &[u8], references: BTreeSet<StorePath>) -> PathInfo {
    PathInfo {
        path,
        deriver: None,
        references,
        nar_size: nar.len() as u64,
        nar_hash: Hash::sha256_of(nar),
        ca: None,
        sigs: BTreeSet::new(),
    }
}

/// A directory with a file, an executable and a symlink.
fn dep_nar() -> Vec<u8> {
    let mut e = NarEncoder::new(Vec::new()).expect("nar");
    e.begin_directory().expect("dir");
    e.entry(b"bin").expect("entry");
    e.begin_directory().expect("dir");
    e.entry(b"tool").expect("entry");
    e.regular_bytes(true, b"#!/bin/sh\necho tool\n")
        .expect("file");
    e.end_directory().expect("end");
    e.entry(b"hello.txt").expect("entry");
    e.regular_bytes(false, b"hello from the dependency\n")
        .expect("file");
    e.entry(b"link").expect("entry");
    e.symlink(b"hello.txt").expect("symlink");
    e.end_directory().expect("end");
    e.finish().expect("finish").0
}

/// [`dep_nar`] and its info as the path `name`, with a NAR hash that does not match it.
fn wrong_hash(name: &str) -> (Vec<u8>, PathInfo) {
    let nar = dep_nar();
    let mut info = info_for(store_path(name), &nar, BTreeSet::new());
    info.nar_hash = Hash::sha256_of(b"something else");
    (nar, info)
}

/// A single file that mentions `dep`, so the reference is real.
fn user_nar(dep_shown: &str) -> Vec<u8> {
    let mut e = NarEncoder::new(Vec::new()).expect("nar");
    e.regular_bytes(false, format!("uses {dep_shown}/hello.txt\n").as_bytes())
        .expect("file");
    e.finish().expect("finish").0
}

#[tokio::test]
async fn handshake_negotiates_2_7() {
    let store = TestStore::new();
    let (client, child) = store.connect().await;
    // Nix 2.8 answers with its own 2.7 and we use min(remote, 2.7).
    assert_eq!(client.remote_version(), 0x207);
    assert_eq!(client.version(), PROTOCOL_VERSION);
    assert_eq!(client.remote(), "test-remote");
    finish(client, child).await;
}

#[tokio::test]
async fn add_query_and_dump_paths() {
    let store = TestStore::new();
    let (mut client, child) = store.connect().await;

    let dep = store_path("ferry-dep");
    let user = store_path("ferry-user");
    let missing = store_path("ferry-missing");
    let dep_nar = dep_nar();
    let user_nar = user_nar(&store.show(&dep));
    let dep_info = info_for(dep.clone(), &dep_nar, BTreeSet::new());
    let user_info = info_for(user.clone(), &user_nar, BTreeSet::from([dep.clone()]));

    let all = BTreeSet::from([dep.clone(), user.clone(), missing.clone()]);
    let valid = client
        .query_valid_paths(true, false, &all)
        .await
        .expect("query_valid_paths");
    assert!(valid.is_empty());

    // Topological order: the dependency first. The NAR is streamed from a reader.
    client
        .add_to_store_nar(&dep_info, &dep_nar[..])
        .await
        .expect("add dep");
    // Unhashed on this side: the remote still checks it.
    client
        .add_to_store_nar_unhashed(&user_info, &user_nar[..])
        .await
        .expect("add user");

    let valid = client
        .query_valid_paths(false, false, &all)
        .await
        .expect("query_valid_paths");
    assert_eq!(valid, BTreeSet::from([dep.clone(), user.clone()]));

    let infos = client
        .query_path_infos(&all)
        .await
        .expect("query_path_infos");
    assert_eq!(infos.len(), 2, "the missing path is left out: {infos:?}");
    for want in [&dep_info, &user_info] {
        let got = infos
            .iter()
            .find(|i| i.path == want.path)
            .expect("info for each added path");
        assert_eq!(got.path, want.path);
        assert_eq!(got.nar_hash, want.nar_hash);
        assert_eq!(got.nar_size, want.nar_size);
        assert_eq!(got.references, want.references);
        assert_eq!(got.deriver, None);
        assert_eq!(got.ca, None);
    }

    // The real CLI agrees.
    let user_shown = store.show(&user);
    let dep_shown = store.show(&dep);
    store.cli("nix-store", &["--verify-path", &user_shown]);
    store.cli("nix-store", &["--verify-path", &dep_shown]);
    assert_eq!(
        store.cli("nix-store", &["-q", "--references", &user_shown]),
        format!("{dep_shown}\n")
    );
    assert_eq!(
        store
            .cli("nix-store", &["-q", "--hash", &user_shown])
            .trim(),
        user_info.nar_hash.to_nix32_prefixed()
    );

    // The closure from the remote's point of view.
    let closure = client
        .query_closure(false, &BTreeSet::from([user.clone()]))
        .await
        .expect("query_closure");
    assert_eq!(closure, BTreeSet::from([dep.clone(), user.clone()]));

    // DumpStorePath gives exactly what `nix-store --dump` prints, and the connection stays
    // usable afterwards (the client read nothing past the NAR).
    for p in [&dep, &user] {
        let mut got = Vec::new();
        let size = client
            .dump_store_path(p, &mut got)
            .await
            .expect("dump_store_path");
        let want = std::process::Command::new("nix-store")
            .args(["--dump", &store.show(p)])
            .output()
            .expect("nix-store --dump");
        assert!(want.status.success());
        assert_eq!(got, want.stdout, "NAR of {p}");
        assert_eq!(size, got.len() as u64);
    }
    let again = client
        .query_valid_paths(false, false, &BTreeSet::from([dep.clone()]))
        .await
        .expect("still in sync after the dumps");
    assert_eq!(again.len(), 1);

    finish(client, child).await;
}

#[tokio::test]
async fn add_with_wrong_hash_is_reported_and_poisons_the_connection() {
    let store = TestStore::new();
    let (mut client, mut child) = store.connect().await;
    let (nar, info) = wrong_hash("ferry-bad-hash");
    let err = client
        .add_to_store_nar(&info, &nar[..])
        .await
        .expect_err("hash mismatch");
    assert!(matches!(err, ServeError::NarHashMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("ferry-bad-hash") && msg.contains("test-remote"),
        "{msg}"
    );

    let err = client
        .query_valid_paths(false, false, &BTreeSet::new())
        .await
        .expect_err("broken");
    assert!(matches!(err, ServeError::Broken { .. }), "{err}");
    // The server rejected the path as well.
    store.check_server_refused_the_hash(&mut child).await;
}

#[tokio::test]
async fn unhashed_add_with_wrong_hash_is_refused_by_the_remote() {
    let store = TestStore::new();
    let (mut client, mut child) = store.connect().await;
    let (nar, info) = wrong_hash("ferry-bad-hash-2");
    let err = client
        .add_to_store_nar_unhashed(&info, &nar[..])
        .await
        .expect_err("the remote refuses it");
    // Not our check: the remote's, which ends the connection.
    assert!(!matches!(err, ServeError::NarHashMismatch { .. }), "{err}");
    store.check_server_refused_the_hash(&mut child).await;
}

#[tokio::test]
async fn add_with_short_nar_source_fails_cleanly() {
    let store = TestStore::new();
    let (mut client, _child) = store.connect().await;
    let nar = dep_nar();
    let info = info_for(store_path("ferry-short"), &nar, BTreeSet::new());
    let err = client
        .add_to_store_nar(&info, &nar[..nar.len() - 8])
        .await
        .expect_err("short source");
    let msg = err.to_string();
    assert!(matches!(err, ServeError::NarSource { .. }), "{msg}");
    assert!(msg.contains(&format!("of {} bytes", nar.len())), "{msg}");
}

const HELLO: &str = r#"builtins.derivation {
  name = "ferry-hello"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo hello > $out" ]; PATH = "/usr/bin:/bin";
}"#;

#[tokio::test]
async fn build_derivation_builds() {
    let store = TestStore::new();
    let drv_path = store.instantiate("hello", HELLO);
    let drv = store.read_drv(&drv_path);
    let out = drv.outputs["out"].path.clone().expect("output path");

    let (mut client, child) = store.connect().await;
    let result = client
        .build_derivation(&drv_path, &drv.to_basic(), &BuildOptions::default())
        .await
        .expect("build_derivation");
    assert_eq!(result.status, BuildStatus::Built, "{result:?}");
    assert!(result.status.is_success());
    assert_eq!(result.error_msg, "");
    assert_eq!(result.times_built, 1);
    assert!(result.start_time > 0 && result.stop_time >= result.start_time);
    // Nix 2.8 fills builtOutputs for every output, input-addressed ones included.
    let names: Vec<_> = result
        .built_outputs
        .iter()
        .filter_map(|b| b.output_name())
        .collect();
    assert_eq!(names, ["out"], "{result:?}");
    assert!(
        result.built_outputs[0]
            .realisation_json
            .contains(out.as_str())
    );

    let infos = client
        .query_path_infos(&BTreeSet::from([out.clone()]))
        .await
        .expect("query_path_infos");
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].path, out);
    assert_eq!(infos[0].deriver.as_ref(), Some(&drv_path));
    let (hash, size) =
        nar::dump_path_hashed(Path::new(&store.show(&out)), std::io::sink()).expect("dump");
    assert_eq!(infos[0].nar_hash, hash);
    assert_eq!(infos[0].nar_size, size);
    assert_eq!(
        std::fs::read_to_string(store.show(&out)).expect("output"),
        "hello\n"
    );
    finish(client, child).await;
}

#[tokio::test]
async fn build_derivation_reports_failure() {
    let store = TestStore::new();
    let drv_path = store.instantiate(
        "fail",
        r#"builtins.derivation {
  name = "ferry-fail"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo failing >&2; exit 1" ];
}"#,
    );
    let drv = store.read_drv(&drv_path);
    let (mut client, child) = store.connect().await;
    let result = client
        .build_derivation(&drv_path, &drv.to_basic(), &BuildOptions::default())
        .await
        .expect("a failed build is a result, not an error");
    assert!(!result.status.is_success(), "{result:?}");
    // An input-addressed derivation is "sandboxed" in Nix's sense, so exit 1 is permanent.
    assert_eq!(result.status, BuildStatus::PermanentFailure, "{result:?}");
    assert!(
        result.plain_error_msg().contains(&format!(
            "builder for '{}' failed with exit code 1",
            store.show(&drv_path)
        )),
        "{}",
        result.error_msg
    );
    // The connection is still usable after a failed build.
    assert!(!client.is_broken());
    let valid = client
        .query_valid_paths(false, false, &BTreeSet::from([drv_path.clone()]))
        .await
        .expect("query after failure");
    assert_eq!(valid.len(), 1);
    finish(client, child).await;
}

#[tokio::test]
async fn build_derivation_times_out() {
    let store = TestStore::new();
    let drv_path = store.instantiate(
        "sleep",
        r#"builtins.derivation {
  name = "ferry-sleep"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "sleep 5; echo late > $out" ]; PATH = "/usr/bin:/bin";
}"#,
    );
    let drv = store.read_drv(&drv_path);
    let (mut client, child) = store.connect().await;
    for options in [
        BuildOptions {
            build_timeout: 1,
            ..BuildOptions::default()
        },
        BuildOptions {
            max_silent_time: 1,
            ..BuildOptions::default()
        },
    ] {
        let started = std::time::Instant::now();
        let result = client
            .build_derivation(&drv_path, &drv.to_basic(), &options)
            .await
            .expect("build_derivation");
        assert_eq!(
            result.status,
            BuildStatus::TimedOut,
            "{options:?}: {result:?}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(4),
            "{options:?} did not stop the build early"
        );
        assert!(
            result.error_msg.contains("timed out"),
            "{}",
            result.error_msg
        );
    }
    finish(client, child).await;
}

/// Handshakes with `sh -c script` standing in for the remote `nix-store --serve`, which
/// must fail; returns the shell (still running, if the script waits) and the error.
async fn failed_handshake(script: &str, host: &str) -> (Child, ServeError) {
    let store = TestStore::new();
    let mut child = Command::new("/bin/sh")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sh");
    let stdout = child.stdout.take().expect("stdout");
    let stdin = child.stdin.take().expect("stdin");
    let err = ServeClient::handshake(stdout, stdin, store.store_dir.clone(), host)
        .await
        .err()
        .expect("the handshake should fail");
    (child, err)
}

#[tokio::test]
async fn bad_magic_shows_the_banner() {
    let (mut child, err) =
        failed_handshake("echo 'Welcome to the build box!'; cat", "bannerhost").await;
    let msg = err.to_string();
    assert!(matches!(err, ServeError::BadMagic { .. }), "{msg}");
    assert!(
        msg.contains("Welcome to the build box!") && msg.contains("bannerhost"),
        "{msg}"
    );
    // The client closed its side, so `cat` ended.
    assert!(child.wait().await.is_ok());
}

#[tokio::test]
async fn silent_exit_before_greeting() {
    let (_child, err) =
        failed_handshake("echo 'sh: nix-store: not found' >&2; exit 127", "emptyhost").await;
    let msg = err.to_string();
    assert!(
        matches!(err, ServeError::NoGreeting { .. } | ServeError::Send { .. }),
        "{msg}"
    );
    assert!(msg.contains("emptyhost"), "{msg}");
}
