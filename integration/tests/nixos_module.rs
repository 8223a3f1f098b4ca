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

#[path = "substituter_support/mod.rs"]
mod substituter_support;

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

/// Kebab-case names of the `pub` fields of `struct name` in a Rust file.
fn struct_fields(file: &str, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(workspace_root().join(file)).expect(file);
    let start = text
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("no struct {name} in {file}"));
    let body = &text[start..];
    let end = body.find("\n}").expect("end of struct");
    body[..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
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
            "substituter/src/config.rs",
            "SubstituterConfig",
        ),
        ("upstream", "substituter/src/config.rs", "UpstreamConfig"),
        ("local", "substituter/src/config.rs", "LocalConfig"),
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

/// A NAS serves the LAN with the substituter exactly as the module renders it (listening on
/// every address, a loopback upstream: a signed cache on the NAS itself), and a laptop runs
/// the module's loopback substituter in front of the NAS with the rendered nix.conf (Ferry as
/// its only substituter, signatures required): `nix-store -r` substitutes the closure through
/// both, with no warning or retry.
#[test]
fn rendered_substituters_serve_a_laptop_through_a_nas() {
    use substituter_support::{add_producer, build_on_producer, copy_to_cache, generate_key};
    let h = harness_or_skip!("rendered_substituters_serve_a_laptop_through_a_nas");
    let ev = Evaluator::Native;
    let keys = tempfile::tempdir().expect("tempdir");
    let key = generate_key(keys.path(), "nas.lan-1");
    let mut fleet = Fleet::start(FleetConfig {
        builders: 0,
        ..Default::default()
    })
    .expect("fleet");
    add_producer(&mut fleet);
    let expr = substituter_support::producer_only_drv(&nonce(), 2000);
    let paths = build_on_producer(&fleet, &expr);
    let cache_dir = fleet.root.path().join("nas-cache");
    copy_to_cache(&fleet, &paths, &cache_dir, &key.secret, "zstd");

    // The NAS: its own cache served on 127.0.0.1:5000, Ferry on 0.0.0.0:37515 for the LAN.
    let nas = fleet.add_host("nas").expect("nas");
    let server = workspace_root().join("integration/tests/substituter_support/fault_server.py");
    let child = nas
        .command("/usr/bin/python3")
        .arg(&server)
        .args(["good", "127.0.0.1", "5000"])
        .arg(&cache_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cache server");
    nas.adopt(child);
    wait_listening(nas, 5000).expect("cache server listens");
    let nas_conf = format!(
        "{{ services.ferry.substituter = {{ enable = true; address = \"0.0.0.0\"; openFirewall = true;\n\
         addToNixSettings = false; settings.trusted-public-keys = [ \"{k}\" ];\n\
         upstreams = [ {{ url = \"http://127.0.0.1:5000\"; priority = 30; publicKeys = [ \"{k}\" ]; }} ]; }}; }}",
        k = key.public
    );
    let r = eval_with(&ev, h, &nas_conf);
    no_failed_assertions(&r, "nas");
    assert_eq!(r["firewallTCP"], serde_json::json!([37515]));
    assert!(
        r["nixSettings"]["substituters"]
            .as_array()
            .is_some_and(|s| !s.iter().any(|u| u == "http://127.0.0.1:37515"))
    );
    let nas_addr = nas.addr.clone();
    let nas_ferry = start_rendered(&mut fleet, "nas", &r, h, "nas");

    // The laptop: the module's defaults (loopback), the NAS as its upstream, Ferry only.
    let laptop_conf = format!(
        "{{ services.ferry.substituter = {{ enable = true; replaceNixSubstituters = true;\n\
         upstreams = [ {{ url = \"http://{nas_addr}:37515\"; priority = 10; publicKeys = [ \"{k}\" ]; }} ]; }}; }}",
        k = key.public
    );
    let r = eval_with(&ev, h, &laptop_conf);
    no_failed_assertions(&r, "laptop");
    let nix_conf = r["nixConf"].as_str().expect("nixConf").to_owned();
    assert!(
        nix_conf.contains("substituters = http://127.0.0.1:37515\n"),
        "{nix_conf}"
    );
    assert!(nix_conf.contains(&key.public), "{nix_conf}");
    let laptop = fleet.add_client("laptop").expect("laptop");
    laptop
        .write_nix_conf(&format!("{nix_conf}require-sigs = true\n"))
        .expect("nix.conf");
    laptop.start_nix_daemon(&[]).expect("laptop daemon");
    let laptop_ferry = start_rendered(&mut fleet, "laptop", &r, h, "laptop");

    let laptop = fleet.host("laptop");
    let mut c = laptop.nix_command("nix-store");
    c.arg("-r").args(&paths);
    let t = Instant::now();
    let out = c.stdin(Stdio::null()).output().expect("nix-store -r");
    check(&out, "nix-store -r on the laptop").unwrap_or_else(|e| {
        panic!(
            "{e}\nnas ferry:\n{}\nlaptop ferry:\n{}",
            read(&nas_ferry),
            read(&laptop_ferry)
        )
    });
    // nix-store -r's reminder about GC roots is not about substitution.
    let stderr: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("you did not specify '--add-root'"))
        .map(|l| format!("{l}\n"))
        .collect();
    substituter_support::assert_quiet(&stderr, "substitution through the rendered substituters");
    for p in &paths {
        assert!(laptop.has_store_path(p), "{p} not on the laptop");
        let mut v = laptop.nix_command("nix-store");
        v.args(["--verify-path", p]);
        run(&mut v).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        stderr.contains("from 'http://127.0.0.1:37515'"),
        "not substituted from the laptop's Ferry:\n{stderr}"
    );
    eprintln!(
        "laptop substituted the closure of {} through two rendered Ferrys in {:?}",
        paths[0],
        t.elapsed()
    );
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Starts the rendered `ferry-substituter` service of `r` on host `role` (the NAS or a
/// laptop): its ExecStart and environment, with FERRY_CONFIG at the rendered file. Returns
/// the log path; the process belongs to the host and dies with the fleet.
fn start_rendered(fleet: &mut Fleet, role: &str, r: &Value, h: &Harness, tag: &str) -> PathBuf {
    let conf = h.dir.path().join(format!("ferry-{tag}-{}.toml", nonce()));
    std::fs::write(&conf, toml_text(r)).expect("ferry.toml");
    let argv = exec_start(r, "ferry-substituter");
    let host = fleet
        .others
        .iter_mut()
        .find(|x| x.role == role)
        .expect("host");
    let log = h.dir.path().join(format!("ferry-{tag}.log"));
    let logf = std::fs::File::create(&log).expect("log");
    let mut c = host.command(&argv[0]);
    c.args(&argv[1..]);
    for (k, v) in r["services"]["ferry-substituter"]["environment"]
        .as_object()
        .expect("environment")
    {
        c.env(k, v.as_str().unwrap_or_default());
    }
    assert_eq!(
        r["services"]["ferry-substituter"]["environment"]["FERRY_CONFIG"],
        "/etc/ferry/ferry.toml"
    );
    c.env("FERRY_CONFIG", &conf)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf);
    let child = c.spawn().expect("ferry-substituter");
    host.adopt(child);
    let port = r["ferryToml"]["substituter"]["listen"]
        .as_str()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("port");
    wait_listening(host, port).unwrap_or_else(|e| panic!("{e}\n{}", read(&log)));
    log
}

/// The client side and the builder side as the module renders them, on the fleet: the client
/// daemon gets `build-hook` and `post-build-hook` from the rendered nix settings and the daemon
/// environment (NIX_CONFIG, which Nix 2.25–2.33 need), the machines file from
/// `lib.mkMachinesFile`, ferry.toml from the module; the builder accepts the client's key only
/// for the forced command the `builder` role renders; the rendered uploader signs and
/// uploads what the builder built to a `file://` cache.
#[test]
fn rendered_hook_builder_and_uploader_work_on_the_fleet() {
    let h = harness_or_skip!("rendered_hook_builder_and_uploader_work_on_the_fleet");
    let ev = Evaluator::Native;
    let work = tempfile::Builder::new()
        .prefix("ferry-nixos-fleet-")
        .tempdir()
        .expect("tempdir");
    let key = work.path().join("cache.sec");
    let out = Command::new(ferry_bin("ferry-post-build"))
        .args(["keygen", "ferry-nixos-test-1", "--secret-file"])
        .arg(&key)
        .output()
        .expect("keygen");
    check(&out, "keygen").unwrap_or_else(|e| panic!("{e}"));
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let cache = work.path().join("cache");
    let state = work.path().join("state");
    let client_conf = format!(
        "{{ services.ferry.buildHook = {{ enable = true; settings.probe-timeout-ms = 2000; }};\n\
         services.ferry.postBuild = {{ enable = true; targets = [ \"file://{cache}\" ];\n\
           secretKeyFiles = [ \"{key}\" ]; settings = {{ state-dir = \"{state}\"; poll-ms = 50; }}; }}; }}",
        cache = cache.display(),
        key = key.display(),
        state = state.display()
    );
    let r = eval_with(&ev, h, &client_conf);
    no_failed_assertions(&r, "client");
    let toml = with_credentials(&r, &toml_text(&r), &work.path().join("credentials"));
    let conf = work.path().join("ferry.toml");
    std::fs::write(&conf, &toml).expect("ferry.toml");
    // The settings the module owns, as nix.conf lines.
    let settings = &r["nixSettings"];
    let nix_lines = format!(
        "build-hook = {}\npost-build-hook = {}\n",
        settings["build-hook"].as_str().expect("build-hook"),
        settings["post-build-hook"]
            .as_str()
            .expect("post-build-hook")
    );
    let mut daemon_env: Vec<(String, String)> = r["services"]["nix-daemon"]["environment"]
        .as_object()
        .expect("nix-daemon environment")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    daemon_env.push(("FERRY_CONFIG".into(), conf.display().to_string()));
    let mut fleet = Fleet::start(FleetConfig {
        builders: 1,
        client_conf: nix_lines,
        daemon_env,
        ..Default::default()
    })
    .expect("fleet");

    // The builder as the `builder` role renders it: the client's key, forced command.
    let client_pub = std::fs::read_to_string(fleet.client_key.with_extension("pub")).expect("pub");
    let b = eval_with(
        &ev,
        h,
        &format!(
            "{{ services.ferry.builder = {{ enable = true; authorizedKeys = [ \"{}\" ]; }}; }}",
            client_pub.trim()
        ),
    );
    no_failed_assertions(&b, "builder");
    assert_eq!(b["sshd"], true);
    let user = &b["users"]["nix-builder"];
    assert_eq!(user["isSystemUser"], true);
    assert!(strs(&b["nixSettings"]["trusted-users"]).contains(&"nix-builder".to_owned()));
    let auth = strs(&user["openssh"]["authorizedKeys"]["keys"]).join("\n");
    assert!(
        auth.starts_with("restrict,command=\"/usr/bin/nix-store --serve --write\" "),
        "{auth}"
    );
    let bdir = fleet.builders[0].dir.clone();
    std::fs::write(bdir.join("authorized_keys"), format!("{auth}\n")).expect("authorized_keys");
    let sshd = std::fs::read_to_string(bdir.join("sshd_config")).expect("sshd_config");
    let sshd: String = sshd
        .lines()
        .map(|l| {
            if l.starts_with("AuthorizedKeysFile") {
                format!(
                    "AuthorizedKeysFile {}",
                    bdir.join("authorized_keys").display()
                )
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(bdir.join("sshd_config"), format!("{sshd}\n")).expect("sshd_config");
    fleet.stop_sshd(0).expect("stop sshd");
    fleet.start_sshd(0).expect("start sshd");

    // The machines file from lib.mkMachinesFile, with the builder's pinned host key.
    let line = fleet.machine_line(0).expect("machine line");
    let f: Vec<&str> = line.split_whitespace().collect();
    let m = eval_with(
        &ev,
        h,
        &format!(
            "{{ nix.distributedBuilds = true; nix.buildMachines = [ {{ hostName = \"{host}\"; sshUser = \"root\";\n\
             sshKey = \"{key}\"; system = \"{SYSTEM}\"; maxJobs = 2; publicHostKey = \"{pk}\"; }} ]; }}",
            host = fleet.builders[0].addr,
            key = f[2],
            pk = f[7]
        ),
    );
    std::fs::write(
        fleet.client.dir.join("etc-nix/machines"),
        m["machines"].as_str().expect("machines"),
    )
    .expect("machines");

    // The rendered uploader on the client.
    let argv = exec_start(&r, "ferry-post-build");
    let log = work.path().join("uploader.log");
    let logf = std::fs::File::create(&log).expect("log");
    let mut c = fleet.client.command(&argv[0]);
    c.args(&argv[1..]);
    for (k, v) in r["services"]["ferry-post-build"]["environment"]
        .as_object()
        .expect("environment")
    {
        c.env(k, v.as_str().unwrap_or_default());
    }
    let path: Vec<String> = strs(&r["services"]["ferry-post-build"]["path"])
        .iter()
        .map(|p| format!("{p}/bin"))
        .collect();
    c.env("PATH", format!("{}:/usr/bin:/bin", path.join(":")))
        .env("FERRY_CONFIG", &conf)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf);
    let mut uploader = c.spawn().expect("uploader");

    let expr = trivial_drv(&nonce(), "nixos-module");
    let out = fleet.nix_build(&expr, &["-j0"]);
    let result = check(&out, "remote build through the rendered hook");
    if let Err(e) = result {
        let _ = uploader.kill();
        let _ = uploader.wait();
        panic!(
            "{e}\ndaemon log:\n{}\nsshd log:\n{}",
            fleet.daemon_log(),
            read(&bdir.join("log/sshd.log"))
        );
    }
    let built = out_paths(&out);
    assert!(
        fleet.builders[0].has_store_path(&built[0]),
        "not built on the builder"
    );
    let narinfo = cache.join(format!(
        "{}.narinfo",
        &built[0]["/nix/store/".len()..][..32]
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !narinfo.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = uploader.kill();
    let _ = uploader.wait();
    let text = std::fs::read_to_string(&narinfo)
        .unwrap_or_else(|e| panic!("{}: {e}\nuploader log:\n{}", narinfo.display(), read(&log)));
    assert!(text.contains("Sig: ferry-nixos-test-1:"), "{text}");
    // Nix checks the cache: NAR hash and the signature of the key the credential carried.
    let mut v = fleet.client_command("nix");
    v.args([
        "--extra-experimental-features",
        "nix-command",
        "store",
        "verify",
        "--store",
    ])
    .arg(format!("file://{}", cache.display()))
    .args(["--trusted-public-keys", &public])
    .arg(&built[0]);
    run(&mut v).unwrap_or_else(|e| panic!("nix store verify: {e}"));
}
