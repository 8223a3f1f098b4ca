//! The NixOS module (`nix/module.nix`) evaluated with the real Nix under test and nixpkgs'
//! `lib` (vendored at `../shared/vendor/nixpkgs-lib.tar.gz`, unpacked into a temporary
//! directory; nixpkgs itself is out of reach here), with minimal declarations of the NixOS
//! options it sets (`nix/tests/nixos-stubs.nix`). For the seed setups (`nix/tests/scenarios/`)
//! and for configurations made on the fly, the tests check the assertions, render
//! `ferry.toml`, the nix settings and every service's command line and environment, feed the
//! rendered configuration to the binaries' `check-config`, and run the rendered services on
//! the fleet: the substituter serves (a NAS for the LAN and a laptop's loopback proxy in front
//! of it), the hook offloads to a builder whose SSH key is restricted as the `builder` role
//! renders it, and the uploader signs and uploads.
//!
//! What is emulated, and how: systemd's `LoadCredential` (the credential files are copied into
//! a temporary directory that stands in for `/run/credentials/<unit>`), and `/etc/ferry/ferry.toml`
//! (the rendered file is passed with `FERRY_CONFIG`, which the services also set, to its path in
//! /etc). The NixOS VM tests in `vm-tests/` run the real thing in users' CI.
//!
//! Without the vendored tarball, these tests print SKIPPED and pass.

use ferry_integration::{
    Fleet, FleetConfig, Nix, SYSTEM, check, ferry_bin, nonce, out_paths, run, trivial_drv,
    wait_listening, workspace_root,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferry_integration::support::substituter as substituter_support;

const CRED_DIR: &str = "/run/credentials/ferry-post-build.service";
const SUB_CRED_DIR: &str = "/run/credentials/ferry-substituter.service";

/// The unpacked nixpkgs lib and a fake Ferry package (`bin/` links to this build's binaries).
struct Harness {
    /// `ferry-nixos-<pid>` in the temporary directory. A static is never dropped, so a
    /// `TempDir` here would never be removed: each run removes the directories of test
    /// processes that are gone instead.
    dir: HarnessDir,
    lib_dir: PathBuf,
    package: PathBuf,
}

fn harness() -> Option<&'static Harness> {
    static H: OnceLock<Option<Harness>> = OnceLock::new();
    H.get_or_init(|| {
        let tarball = workspace_root().join("../shared/vendor/nixpkgs-lib.tar.gz");
        if !tarball.exists() {
            return None;
        }
        remove_stale_harness_dirs();
        let dir =
            HarnessDir(std::env::temp_dir().join(format!("ferry-nixos-{}", std::process::id())));
        std::fs::create_dir_all(dir.path()).expect("harness dir");
        run(Command::new("tar")
            .arg("xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir.path()))
        .expect("unpacking nixpkgs-lib");
        let lib_dir = dir.path().join("nixpkgs-lib/lib");
        assert!(
            lib_dir.join("default.nix").exists(),
            "no lib/ in {tarball:?}"
        );
        let package = dir.path().join("ferry");
        std::fs::create_dir_all(package.join("bin")).expect("bin");
        for b in ["ferry-build-hook", "ferry-post-build", "ferry-substituter"] {
            std::os::unix::fs::symlink(ferry_bin(b), package.join("bin").join(b)).expect("link");
        }
        Some(Harness {
            dir,
            lib_dir,
            package,
        })
    })
    .as_ref()
}

/// The harness directory of this test process.
struct HarnessDir(PathBuf);

impl HarnessDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

/// Removes `ferry-nixos-<pid>` directories whose process is gone (earlier runs).
fn remove_stale_harness_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("ferry-nixos-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

macro_rules! harness_or_skip {
    ($name:literal) => {
        match harness() {
            Some(h) => h,
            None => {
                eprintln!(
                    "SKIPPED {}: ../shared/vendor/nixpkgs-lib.tar.gz (nixpkgs' lib, next to the repository) is absent",
                    $name
                );
                return;
            }
        }
    };
}

/// Where `nix-instantiate` runs: this machine's Nix, or a fleet host of the Nix under test.
enum Evaluator {
    Native,
    Host(Box<Fleet>),
}

impl Evaluator {
    fn for_nix_under_test() -> Evaluator {
        let nix = Nix::under_test();
        if nix.suite.is_none() {
            return Evaluator::Native;
        }
        let fleet = Fleet::start(FleetConfig {
            builders: 0,
            ..Default::default()
        })
        .expect("fleet");
        Evaluator::Host(Box::new(fleet))
    }

    fn command(&self, program: &str) -> Command {
        match self {
            Evaluator::Native => Command::new(program),
            Evaluator::Host(f) => f.client.command(program),
        }
    }
}

/// Evaluates the module under `config` (the text of a NixOS module) and returns what it renders.
fn eval_with(ev: &Evaluator, h: &Harness, config: &str) -> Value {
    let n = nonce();
    let file = h.dir.path().join(format!("config-{n}.nix"));
    std::fs::write(&file, config).expect("config");
    eval_file(ev, h, &file)
}

fn eval_file(ev: &Evaluator, h: &Harness, file: &Path) -> Value {
    let eval_nix = workspace_root().join("nix/tests/eval.nix");
    let out = ev
        .command("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(&eval_nix)
        .arg("--argstr")
        .arg("libDir")
        .arg(&h.lib_dir)
        .arg("--argstr")
        .arg("config")
        .arg(file)
        .arg("--argstr")
        .arg("ferry")
        .arg(&h.package)
        .args(["--argstr", "nixPrefix", "/usr"])
        .stdin(Stdio::null())
        .output()
        .expect("nix-instantiate");
    check(
        &out,
        &format!("evaluating the module with {}", file.display()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_slice(&out.stdout).expect("JSON from nix-instantiate")
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn no_failed_assertions(r: &Value, what: &str) {
    assert_eq!(
        strs(&r["failedAssertions"]),
        Vec::<String>::new(),
        "{what}: assertions failed"
    );
}

/// The rendered ferry.toml, as pkgs.formats.toml would write it.
fn toml_text(r: &Value) -> String {
    toml::to_string(&r["ferryToml"]).expect("ferry.toml renders as TOML")
}

/// Emulates `LoadCredential=` of the uploader: each `id:file` is copied into `dir` (a signing
/// key `ferry-post-build keygen` makes when the file does not exist here, as in the seed
/// setups' paths), and the credentials directory in the TOML is replaced by `dir`.
fn with_credentials(r: &Value, toml: &str, dir: &Path) -> String {
    std::fs::create_dir_all(dir).expect("credentials dir");
    let mut creds = strs(&r["services"]["ferry-post-build"]["serviceConfig"]["LoadCredential"]);
    creds.extend(strs(
        &r["services"]["ferry-substituter"]["serviceConfig"]["LoadCredential"],
    ));
    for c in creds {
        let (id, src) = c.split_once(':').expect("id:file");
        let dst = dir.join(id);
        if Path::new(src).exists() {
            std::fs::copy(src, &dst).expect("copy credential");
        } else if id.contains("signing-key") {
            let out = Command::new(ferry_bin("ferry-post-build"))
                .args(["keygen", &format!("test-{id}"), "--secret-file"])
                .arg(&dst)
                .output()
                .expect("keygen");
            check(&out, "keygen").unwrap_or_else(|e| panic!("{e}"));
        } else {
            std::fs::write(&dst, format!("test-{id}\n")).expect("credential");
        }
    }
    toml.replace(CRED_DIR, &dir.display().to_string())
        .replace(SUB_CRED_DIR, &dir.display().to_string())
}

/// The words of an `ExecStart=` line (the module never quotes).
fn exec_start(r: &Value, unit: &str) -> Vec<String> {
    let line = r["services"][unit]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap_or_else(|| panic!("no ExecStart for {unit}: {r}"));
    line.split_whitespace().map(str::to_owned).collect()
}

fn scenario_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("nix/tests/scenarios"))
        .expect("scenarios")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "nix"))
        .collect();
    v.sort();
    v
}

/// Runs `cmd` and returns its stdout, failing with both streams.
fn stdout_ok(mut cmd: Command, what: &str) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect(what);
    check(&out, what).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every seed setup evaluates without failed assertions, and what it renders is accepted by
/// the real binaries: ferry.toml by each `check-config`, the services' command lines by the
/// binaries' argument parsers, the hook's settings in both nix.conf and the daemon's
/// environment, the machines file by the hook, and the key generation unit runs.
#[test]
fn seed_setups_render_what_the_binaries_accept() {
    let h = harness_or_skip!("seed_setups_render_what_the_binaries_accept");
    let ev = Evaluator::for_nix_under_test();
    let scenarios = scenario_files();
    assert!(scenarios.len() >= 4, "{scenarios:?}");
    for file in scenarios {
        let name = file
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let r = eval_file(&ev, h, &file);
        no_failed_assertions(&r, &name);
        let work = h.dir.path().join(format!("scenario-{name}"));
        std::fs::create_dir_all(&work).expect("work dir");
        let toml = with_credentials(&r, &toml_text(&r), &work.join("credentials"));
        let conf = work.join("ferry.toml");
        std::fs::write(&conf, &toml).expect("ferry.toml");
        let sections = r["ferryToml"]
            .as_object()
            .expect("ferry.toml table")
            .clone();

        if sections.contains_key("build-hook") {
            // The hook is set in nix.conf and in the daemon's environment (Nix 2.25-2.33).
            let hook = r["nixSettings"]["build-hook"].as_str().expect("build-hook");
            assert_eq!(
                hook,
                format!("{}/bin/ferry-build-hook", h.package.display())
            );
            assert_eq!(
                r["services"]["nix-daemon"]["environment"]["NIX_CONFIG"],
                format!("build-hook = {hook}"),
                "{name}"
            );
            assert!(
                strs(&r["tmpfiles"])
                    .iter()
                    .any(|l| l.starts_with("d /nix/var/nix/ferry ")),
                "{name}: health directory"
            );
            // check-config reads nix.conf's builders: the rendered machines file.
            let nix_dir = work.join("etc-nix");
            std::fs::create_dir_all(&nix_dir).expect("etc-nix");
            let machines = r["machines"].as_str().unwrap_or_default();
            std::fs::write(nix_dir.join("machines"), machines).expect("machines");
            let mut nix_conf = r["nixConf"].as_str().expect("nixConf").to_owned();
            if !machines.is_empty() {
                nix_conf.push_str(&format!(
                    "builders = @{}\n",
                    nix_dir.join("machines").display()
                ));
            }
            std::fs::write(nix_dir.join("nix.conf"), nix_conf).expect("nix.conf");
            let mut c = Command::new(hook);
            c.arg("check-config")
                .env("FERRY_CONFIG", &conf)
                .env("NIX_CONF_DIR", &nix_dir);
            let out = stdout_ok(c, &format!("{name}: ferry-build-hook check-config"));
            let n = machines.lines().count();
            assert!(
                out.contains(&format!(": {n} ({n} ssh://")),
                "{name}: the hook did not read the {n} rendered machines:\n{out}"
            );
        }

        if sections.contains_key("post-build") {
            assert_eq!(
                r["nixSettings"]["post-build-hook"],
                format!("{}/bin/ferry-post-build", h.package.display())
            );
            let argv = exec_start(&r, "ferry-post-build");
            assert_eq!(argv[1..], ["daemon"], "{name}");
            let env = &r["services"]["ferry-post-build"]["environment"];
            assert_eq!(env["NIX_REMOTE"], "daemon");
            assert_eq!(env["FERRY_CONFIG"], "/etc/ferry/ferry.toml");
            let mut c = Command::new(&argv[0]);
            c.arg("check-config").env("FERRY_CONFIG", &conf);
            let out = stdout_ok(c, &format!("{name}: ferry-post-build check-config"));
            assert!(out.contains("[post-build] OK"), "{out}");
            // The same arguments parse (daemon --help exits 0 only if `daemon` is a command).
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]).arg("--help");
            stdout_ok(c, &format!("{name}: {argv:?} --help"));
            let cfg = &r["services"]["ferry-post-build"]["serviceConfig"];
            assert_eq!(cfg["ProtectSystem"], "strict");
            assert_eq!(cfg["StateDirectory"], "ferry/post-build");
            assert!(
                !toml.contains("/nix/store/"),
                "{name}: a secret in the store?\n{toml}"
            );
            if let Some(kg) = r["services"].get("ferry-post-build-keygen") {
                // Run the key generation as rendered, into a temporary directory.
                let line = kg["serviceConfig"]["ExecStart"].as_str().expect("keygen");
                let keys = work.join("keys");
                std::fs::create_dir_all(&keys).expect("keys");
                let line = line.replace("/var/lib/ferry/keys", &keys.display().to_string());
                let words: Vec<&str> = line.split_whitespace().collect();
                let mut c = Command::new(words[0]);
                c.args(&words[1..]);
                let public = stdout_ok(c, "rendered keygen");
                let sec = std::fs::read_dir(&keys).expect("keys").count();
                assert_eq!(sec, 2, "secret and public key files");
                assert!(public.contains(':'), "{public}");
            }
        }

        if sections.contains_key("substituter") {
            let argv = exec_start(&r, "ferry-substituter");
            assert_eq!(argv[1], "serve", "{name}");
            // Serving the local store reads Nix's database: root without capabilities.
            let local = sections["substituter"].get("local").is_some();
            assert_eq!(
                r["services"]["ferry-substituter"]["serviceConfig"]["DynamicUser"], !local,
                "{name}"
            );
            // check-config with the same flags as the service.
            let mut c = Command::new(&argv[0]);
            c.arg("check-config")
                .args(&argv[2..])
                .env("FERRY_CONFIG", &conf);
            let out = stdout_ok(c, &format!("{name}: ferry-substituter check-config"));
            let listen = r["ferryToml"]["substituter"]["listen"]
                .as_str()
                .expect("listen");
            assert!(out.contains(&format!("listen {listen}")), "{out}");
        }
        eprintln!("{name}: rendered and accepted ({})", Nix::under_test());
    }
}

/// Contradictory or unsafe settings stop the evaluation with a message that says what to fix.
#[test]
fn assertions_fire_with_clear_messages() {
    let h = harness_or_skip!("assertions_fire_with_clear_messages");
    let ev = Evaluator::Native;
    let cases: &[(&str, &str)] = &[
        (
            "{ services.ferry.postBuild = { enable = true; secretKeyFiles = [ \"/etc/nix/k.sec\" ]; }; }",
            "services.ferry.postBuild is enabled with no targets",
        ),
        (
            "{ services.ferry.postBuild = { enable = true; targets = [ \"file:///c\" ]; }; }",
            "services.ferry.postBuild has no signing key",
        ),
        (
            "{ services.ferry.postBuild = { enable = true; targets = [ \"file:///c\" ]; secretKeyFiles = [ \"/nix/store/00000000000000000000000000000000-k.sec\" ]; }; }",
            "is in the Nix store, which every user can read",
        ),
        (
            "{ services.ferry.postBuild = { enable = true; targets = [ \"ftp://c\" ]; secretKeyFiles = [ \"/k\" ]; }; }",
            "every target must start with file:///, http://, https:// or s3://",
        ),
        (
            "{ services.ferry.postBuild = { enable = true; targets = [ \"file:///c\" ]; generateKey.enable = true; }; }",
            "generateKey.enable needs generateKey.name",
        ),
        (
            "{ services.ferry.postBuild = { enable = true; targets = [ \"file:///c\" ]; secretKeyFiles = [ \"/k\" ]; settings.targets = [ \"file:///d\" ]; }; }",
            "services.ferry.postBuild.settings: targets is set by the module's own options",
        ),
        (
            "{ services.ferry.postBuild = { enable = true; targets = [ \"s3://b\" ]; secretKeyFiles = [ \"/k\" ]; s3.accessKeyIdFile = \"/id\"; }; }",
            "set both accessKeyIdFile and secretAccessKeyFile, or neither",
        ),
        (
            "{ services.ferry.substituter = { enable = true; upstreams = [ { url = \"http://127.0.0.1:37515\"; } ]; }; }",
            "http://127.0.0.1:37515 is this substituter's own listen address (127.0.0.1:37515); it would ask itself",
        ),
        (
            "{ services.ferry.substituter = { enable = true; address = \"0.0.0.0\"; port = 8080; upstreams = [ { url = \"http://localhost:8080/\"; } ]; }; }",
            "is this substituter's own listen address (0.0.0.0:8080)",
        ),
        (
            "{ services.ferry.substituter = { enable = true; upstreams = [ ]; }; }",
            "services.ferry.substituter.upstreams is empty",
        ),
        (
            "{ services.ferry.substituter = { enable = true; openFirewall = true; }; }",
            "openFirewall is set but address is 127.0.0.1, which only this host can reach",
        ),
        (
            "{ services.ferry.substituter = { enable = true; settings.narinfo-timeout-ms = 5; }; }",
            "services.ferry.substituter.settings: ferry-substituter does not accept narinfo-timeout-ms in [substituter]",
        ),
        (
            "{ services.ferry.substituter = { enable = true; upstreams = [ { url = \"http://a\"; timeout = 3; } ]; }; }",
            "services.ferry.substituter.upstreams (http://a): ferry-substituter does not accept timeout",
        ),
        (
            "{ services.ferry.substituter = { enable = true; settings.listen = \"0.0.0.0:1\"; }; }",
            "listen is set by the module's own options",
        ),
        (
            "{ services.ferry.buildHook = { enable = true; settings.probe-timeout = 5; }; }",
            "services.ferry.buildHook.settings: ferry-build-hook does not accept probe-timeout in [build-hook]",
        ),
        (
            "{ services.ferry.buildHook = { enable = true; settings = { probe-timeout-ms = 100; probe-grace-ms = 200; }; }; }",
            "probe-grace-ms must not be above probe-timeout-ms",
        ),
        (
            "{ services.ferry.builder.enable = true; }",
            "services.ferry.builder.authorizedKeys is empty",
        ),
    ];
    for (config, message) in cases {
        let r = eval_with(&ev, h, config);
        let failed = strs(&r["failedAssertions"]);
        assert!(
            failed.iter().any(|m| m.contains(message)),
            "{config}\nexpected an assertion saying {message:?}, got {failed:#?}"
        );
    }
    // A wrong type is the module system's own error, at evaluation.
    let file = h.dir.path().join("bad-type.nix");
    std::fs::write(
        &file,
        "{ services.ferry.buildHook = { enable = true; settings.import-method = \"copy\"; }; }",
    )
    .expect("config");
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(workspace_root().join("nix/tests/eval.nix"))
        .arg("--argstr")
        .arg("libDir")
        .arg(&h.lib_dir)
        .arg("--argstr")
        .arg("config")
        .arg(&file)
        .arg("--argstr")
        .arg("ferry")
        .arg(&h.package)
        .output()
        .expect("nix-instantiate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("import-method"), "{err}");
    // Nothing is on unless enabled.
    let r = eval_with(&ev, h, "{ }");
    assert_eq!(r["ferryToml"], Value::Null, "{r}");
    assert!(
        r["services"].as_object().is_some_and(|s| s.is_empty()),
        "{r}"
    );
}

/// Kebab-case names of the `pub` or `pub(crate)` fields of `struct name` in a Rust file (the
/// binaries' config types are crate-private).
fn struct_fields(file: &str, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(workspace_root().join(file)).expect(file);
    let start = ["pub struct", "pub(crate) struct"]
        .iter()
        .find_map(|vis| text.find(&format!("{vis} {name} {{")))
        .unwrap_or_else(|| panic!("no struct {name} in {file}"));
    let body = &text[start..];
    let end = body.find("\n}").expect("end of struct");
    body[..end]
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("pub(crate) ")
                .or_else(|| l.strip_prefix("pub "))
        })
        .filter_map(|l| l.split_once(':').map(|(f, _)| f.trim().replace('_', "-")))
        .filter(|f| !f.starts_with("struct"))
        .collect()
}

/// `nix/keys.nix` (what the module accepts) is exactly what the binaries accept.
#[test]
fn module_keys_are_the_binaries_keys() {
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(workspace_root().join("nix/keys.nix"))
        .output()
        .expect("nix-instantiate");
    check(&out, "nix/keys.nix").unwrap_or_else(|e| panic!("{e}"));
    let keys: Value = serde_json::from_slice(&out.stdout).expect("json");
    for (section, file, st) in [
        ("build-hook", "hook/src/config.rs", "HookConfig"),
        ("post-build", "post-build/src/config.rs", "PostBuildConfig"),
        (
            "substituter",
            "substituter/src/config/raw.rs",
            "SubstituterConfig",
        ),
        (
            "upstream",
            "substituter/src/config/raw.rs",
            "UpstreamConfig",
        ),
        ("local", "substituter/src/config/raw.rs", "LocalConfig"),
    ] {
        let mut rust = struct_fields(file, st);
        let mut nix = strs(&keys[section]);
        rust.sort();
        nix.sort();
        assert_eq!(
            nix, rust,
            "nix/keys.nix [{section}] differs from {st} in {file}"
        );
    }
}

/// The flake's `lib` outputs evaluate (with nixpkgs' lib for the flake input) and render
/// what NixOS would; the other outputs have the expected shape; the VM tests evaluate in form
/// (with a stand-in for `pkgs.testers.runNixOSTest`) and each names its fleet counterpart.
#[test]
fn flake_outputs_and_vm_tests_evaluate() {
    let h = harness_or_skip!("flake_outputs_and_vm_tests_evaluate");
    let root = workspace_root();
    // A stand-in nixpkgs: only lib is real.
    let stub_pkgs = h.dir.path().join("stub-pkgs");
    std::fs::create_dir_all(stub_pkgs.join("nixos/tests")).expect("stub");
    let expr = format!(
        r#"
let
  lib = import {lib};
  nixpkgs = {{ inherit lib; legacyPackages = {{ }}; }};
  flake = import {root}/flake.nix;
  self = flake.outputs {{ inherit self nixpkgs; }};
  machines = self.lib.mkMachinesFile [
    {{ hostName = "desktop.lan"; sshUser = "nix-builder"; sshKey = "/etc/nix/builder_key"; system = "x86_64-linux"; maxJobs = 8; speedFactor = 2; supportedFeatures = [ "kvm" ]; mandatoryFeatures = [ "benchmark" ]; }}
    {{ hostName = "opi01"; protocol = "ssh-ng"; systems = [ "aarch64-linux" ]; publicHostKey = "c3NoLWVkMjU1MTkgQUFBQQ=="; }}
  ];
  conf = self.lib.mkNixConf {{ max-jobs = 0; builders = "@/etc/nix/machines"; builders-use-substitutes = true; substituters = [ "http://127.0.0.1:37515" "https://cache.nixos.org" ]; build-hook = "/usr/bin/ferry-build-hook"; unset = null; }};
  fakePkgs = {{
    path = "{stub}";
    stdenv.hostPlatform.system = "x86_64-linux";
    testers.runNixOSTest = t: t;
    writeText = name: text: text;
  }};
  vm = name: import ({root}/vm-tests + "/${{name}}.nix") {{ pkgs = fakePkgs; inherit self; }};
  vmForm = t: {{ inherit (t) name; nodes = builtins.attrNames t.nodes; script = t.testScript; }};
in {{
  inherit machines conf;
  outputs = builtins.attrNames self;
  modules = builtins.attrNames self.nixosModules;
  overlay = builtins.isFunction self.overlays.default;
  vms = map (n: vmForm (vm n)) [ "build-hook" "post-build" "substituter" ];
}}"#,
        lib = h.lib_dir.display(),
        root = root.display(),
        stub = stub_pkgs.display(),
    );
    std::fs::write(
        stub_pkgs.join("nixos/tests/ssh-keys.nix"),
        "pkgs: { snakeOilPrivateKey = \"/stub/key\"; snakeOilPublicKey = \"ssh-ed25519 AAAA stub\"; }\n",
    )
    .expect("stub");
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", &expr])
        .output()
        .expect("nix-instantiate");
    check(&out, "evaluating the flake's outputs").unwrap_or_else(|e| panic!("{e}"));
    let r: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        r["machines"],
        "ssh://nix-builder@desktop.lan x86_64-linux /etc/nix/builder_key 8 2 kvm,benchmark benchmark -\n\
         ssh-ng://opi01 aarch64-linux - 1 1 - - c3NoLWVkMjU1MTkgQUFBQQ==\n"
    );
    assert_eq!(
        r["conf"],
        "build-hook = /usr/bin/ferry-build-hook\nbuilders = @/etc/nix/machines\nbuilders-use-substitutes = true\n\
         max-jobs = 0\nsubstituters = http://127.0.0.1:37515 https://cache.nixos.org\n"
    );
    let outputs = strs(&r["outputs"]);
    for o in [
        "packages",
        "overlays",
        "nixosModules",
        "lib",
        "checks",
        "devShells",
    ] {
        assert!(outputs.iter().any(|x| x == o), "no {o} in {outputs:?}");
    }
    assert!(strs(&r["modules"]).iter().any(|m| m == "default"));
    assert_eq!(r["overlay"], true);
    // The machines file the hook parses is what mkMachinesFile writes.
    let dir = h.dir.path().join("flake-machines");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("machines"),
        r["machines"].as_str().expect("machines"),
    )
    .expect("m");
    std::fs::write(
        dir.join("nix.conf"),
        format!("builders = @{}\n", dir.join("machines").display()),
    )
    .expect("conf");
    let mut c = Command::new(ferry_bin("ferry-build-hook"));
    c.arg("check-config")
        .env("NIX_CONF_DIR", &dir)
        .env("FERRY_CONFIG", dir.join("none.toml"));
    let out = stdout_ok(c, "check-config of mkMachinesFile's output");
    assert!(out.contains(": 2 (1 ssh://"), "{out}");
    for vm in r["vms"].as_array().expect("vms") {
        let script = vm["script"].as_str().unwrap_or_default();
        assert!(
            script.contains("integration/tests/"),
            "VM test {} names no fleet test",
            vm["name"]
        );
        assert!(strs(&vm["nodes"]).len() >= 2, "{vm}");
    }
}

// After the macros above: `macro_rules!` are in scope only below their definition.
mod fleet;
