//! Fixtures for `ferry-post-build` tests: a fleet whose client daemon runs Ferry's
//! post-build hook, its configuration, an uploader process, an nginx WebDAV cache on a LAN
//! host, and checks on cache directories.

use crate::{Fleet, FleetConfig, Host, SYSTEM, check, ferry_bin, nonce, run};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use super::s3::*;
pub use super::substitution::*;

pub const NGINX_PORT: u16 = 8080;

/// What `ferry-post-build status` says once every job is done and none is dead-lettered.
pub const QUEUE_DONE: &str = "queued jobs: 0 (0 retrying), dead letters: 0";

/// The `ferry-post-build` under test: `FERRY_POST_BUILD_BIN` (benchmarks point it at a
/// release build) or this build's.
pub fn post_build_bin() -> PathBuf {
    std::env::var_os("FERRY_POST_BUILD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| ferry_bin("ferry-post-build"))
}

/// Ferry's files for one test: config, state, signing key, a `file://` cache.
pub struct Ferry {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state: PathBuf,
    pub file_cache: PathBuf,
    pub secret_key: PathBuf,
    pub public_key: String,
}

impl Ferry {
    /// New directories and a new key pair (made by Nix): side effects, so no `Default`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Ferry {
        let dir = tempfile::Builder::new()
            .prefix("ferry-post-")
            .tempdir()
            .expect("tempdir");
        let secret_key = dir.path().join("cache.sec");
        let public_key = keygen("ferry-test-1", &secret_key);
        let f = Ferry {
            config: dir.path().join("ferry.toml"),
            state: dir.path().join("state"),
            file_cache: dir.path().join("file-cache"),
            secret_key,
            public_key,
            dir,
        };
        f.write_config(&[]);
        f
    }

    /// Writes the config with the file cache plus `extra_targets`. The hook reads it on
    /// every run; an uploader reads it when it starts.
    pub fn write_config(&self, extra_targets: &[String]) {
        self.write_config_with(extra_targets, "");
    }

    /// `write_config` plus `extra` lines in `[post-build]`.
    pub fn write_config_with(&self, extra_targets: &[String], extra: &str) {
        let mut targets = vec![format!("\"file://{}\"", self.file_cache.display())];
        targets.extend(extra_targets.iter().map(|t| format!("\"{t}\"")));
        let text = format!(
            "[post-build]\ntargets = [{}]\nsecret-key-files = [\"{}\"]\nstate-dir = \"{}\"\n\
             concurrency = 3\nretry-initial-ms = 200\nretry-max-secs = 2\nconnect-timeout-secs = 1\npoll-ms = 50\n{extra}",
            targets.join(", "),
            self.secret_key.display(),
            self.state.display()
        );
        std::fs::write(&self.config, text).expect("config");
    }

    /// A fleet whose client daemon runs `ferry-post-build` as its post-build hook (with this
    /// config in its environment) and Ferry's build hook.
    pub fn fleet(&self, builders: usize) -> Fleet {
        Fleet::start(self.fleet_config(builders)).expect("fleet")
    }

    /// The configuration [`Ferry::fleet`] starts, to change (another Nix, say) first.
    pub fn fleet_config(&self, builders: usize) -> FleetConfig {
        FleetConfig {
            builders,
            max_jobs_per_builder: 2,
            client_conf: format!(
                "post-build-hook = {}\nbuild-hook = {}",
                post_build_bin().display(),
                ferry_bin("ferry-build-hook").display()
            ),
            daemon_env: vec![("FERRY_CONFIG".into(), self.config.display().to_string())],
            ..Default::default()
        }
    }

    /// `ferry-post-build ARGS` on `host` (its store, its network), with this config.
    pub fn command(&self, host: &Host, args: &[&str]) -> Command {
        let mut c = host.nix_command(&post_build_bin().to_string_lossy());
        c.args(args)
            .env("FERRY_CONFIG", &self.config)
            .env("RUST_LOG", "info");
        c
    }

    /// `ferry-post-build daemon --drain` on the client: uploads what is queued, then exits.
    pub fn drain(&self, fleet: &Fleet) {
        let mut d = self.command(&fleet.client, &["daemon", "--drain"]);
        run(&mut d).expect("ferry-post-build daemon --drain");
    }

    /// Starts the uploader on the client; its log goes to `state/../uploader.log`.
    pub fn start_uploader(&self, fleet: &Fleet) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("uploader.log"))
            .expect("log");
        self.command(&fleet.client, &["daemon"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("uploader")
    }

    pub fn uploader_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("uploader.log")).unwrap_or_default()
    }

    pub fn status(&self, fleet: &Fleet) -> String {
        let out = self
            .command(&fleet.client, &["status"])
            .output()
            .expect("status");
        check(&out, "ferry-post-build status").unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `status` shows an empty queue and no dead letters ([`QUEUE_DONE`]).
    pub fn wait_queue_done(&self, fleet: &Fleet, what: &str, timeout: Duration) {
        wait_for(what, timeout, || self.status(fleet).contains(QUEUE_DONE));
    }

    pub fn gc_roots(&self, fleet: &Fleet) -> Vec<String> {
        std::fs::read_dir(fleet.client.nix_path("/nix/var/nix/gcroots/ferry"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `ferry-post-build keygen NAME --secret-file SECRET_FILE`; returns the public key it
/// prints.
pub fn keygen(name: &str, secret_file: &Path) -> String {
    let out = Command::new(post_build_bin())
        .args(["keygen", name, "--secret-file"])
        .arg(secret_file)
        .output()
        .expect("keygen");
    check(&out, "ferry-post-build keygen").unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A LAN host `cache` running [`start_nginx`]; returns its `www` directory and its URL.
pub fn add_nginx_cache(fleet: &mut Fleet) -> (PathBuf, String) {
    let www = start_nginx(fleet.add_host("cache").expect("cache host"));
    let url = format!("http://{}:{NGINX_PORT}", fleet.host("cache").addr);
    (www, url)
}

/// nginx with WebDAV PUT on `host`, serving and storing under `<host dir>/www`.
pub fn start_nginx(host: &mut Host) -> PathBuf {
    let www = host.dir.join("nginx").join("www");
    crate::start_nginx(host, NGINX_PORT, &www, true).expect("nginx");
    www
}

/// Waits until something listens on TCP `port` in `host`'s network namespace.
pub fn wait_listening(host: &Host, port: u16, what: &str) {
    wait_for(
        &format!("{what} to listen on port {port}"),
        Duration::from_secs(20),
        || crate::listening(host, port),
    );
}

/// Whether `status` shows a success for the target `url` (its line says `last success never`
/// until the first one).
pub fn target_succeeded(status: &str, url: &str) -> bool {
    status.lines().any(|l| {
        l.strip_prefix(&format!("target {url}: last success "))
            .is_some_and(|rest| !rest.starts_with("never"))
    })
}

pub fn wait_for(what: &str, timeout: Duration, ok: impl FnMut() -> bool) {
    crate::wait_until(what, timeout, ok).unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until every path of `paths` has a narinfo in each cache directory of `dirs`.
pub fn wait_uploaded<'a>(
    what: &str,
    timeout: Duration,
    dirs: &[&Path],
    paths: impl IntoIterator<Item = &'a String> + Clone,
) {
    wait_for(what, timeout, || {
        dirs.iter()
            .all(|d| missing_narinfos(d, paths.clone()).is_empty())
    });
}

/// Checks that `status` lists every path of `paths` as a dead letter (a line
/// `  PATH: dead since …`) whose line holds each of `needles`; `what` says what the line
/// should show in a failure.
pub fn assert_dead_letters<'a>(
    status: &str,
    paths: impl IntoIterator<Item = &'a String>,
    needles: &[&str],
    what: &str,
) {
    for p in paths {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(&format!("  {p}: dead since "))
                    && needles.iter().all(|n| l.contains(n))),
            "{p} is not a dead letter with {what}:\n{status}"
        );
    }
}

/// Runs `nix-store --gc` on the client and checks that every path of `paths` survived it
/// (the uploader's GC roots hold them while they are `why`).
pub fn gc_keeps<'a>(fleet: &Fleet, paths: impl IntoIterator<Item = &'a String>, why: &str) {
    let mut gc = fleet.client_command("nix-store");
    gc.arg("--gc");
    run(&mut gc).expect("nix-store --gc");
    for p in paths {
        assert!(
            fleet.client.has_store_path(p),
            "{p} was collected while {why}"
        );
    }
}

/// The closure of `paths` in the client's store.
pub fn closure(fleet: &Fleet, paths: &[String]) -> BTreeSet<String> {
    let mut c = fleet.client_command("nix-store");
    c.arg("-qR").args(paths);
    let out = run(&mut c).expect("nix-store -qR");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn hash_part(store_path: &str) -> &str {
    let base = store_path.rsplit('/').next().unwrap_or_default();
    &base[..32.min(base.len())]
}

/// The narinfo of `store_path` in the cache directory `dir`.
pub fn read_narinfo(dir: &Path, store_path: &str) -> String {
    let file = dir.join(format!("{}.narinfo", hash_part(store_path)));
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// Which of `paths` have a narinfo in the cache directory `dir`.
pub fn missing_narinfos<'a>(
    dir: &Path,
    paths: impl IntoIterator<Item = &'a String>,
) -> Vec<String> {
    paths
        .into_iter()
        .filter(|p| !dir.join(format!("{}.narinfo", hash_part(p))).exists())
        .cloned()
        .collect()
}

/// Checks a cache directory's consistency: only final names are visible (no temporary or
/// partial files), every narinfo's `URL` exists and every NAR is referenced by a narinfo
/// (so none was written twice under different names), every narinfo's references have
/// narinfos. Returns the number of narinfos.
pub fn check_cache_dir(dir: &Path) -> usize {
    let mut narinfos = Vec::new();
    for e in std::fs::read_dir(dir).expect("cache dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "nix-cache-info" || name == "nar" || name == ".ferry-tmp" {
            continue;
        }
        assert!(
            name.len() == 32 + ".narinfo".len() && name.ends_with(".narinfo"),
            "unexpected file {name:?} in {}",
            dir.display()
        );
        narinfos.push(name);
    }
    let mut urls = BTreeSet::new();
    let hashes: BTreeSet<String> = narinfos.iter().map(|n| n[..32].to_owned()).collect();
    for n in &narinfos {
        let text = std::fs::read_to_string(dir.join(n)).expect("narinfo");
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("{n} has no {k}:\n{text}"))
                .to_owned()
        };
        let url = field("URL: ");
        let size: u64 = field("FileSize: ").parse().expect("FileSize");
        let nar = dir.join(&url);
        let len = std::fs::metadata(&nar)
            .unwrap_or_else(|e| panic!("{n} points at {url}: {e}"))
            .len();
        assert_eq!(
            len, size,
            "{url}: size on disk differs from the narinfo's FileSize"
        );
        for r in field("References: ").split_whitespace() {
            assert!(
                hashes.contains(&r[..32]),
                "{n} references {r}, which has no narinfo"
            );
        }
        assert!(
            text.contains("\nSig: ferry-test-1:"),
            "{n} is not signed by Ferry's key:\n{text}"
        );
        urls.insert(url);
    }
    let nars: BTreeSet<String> = std::fs::read_dir(dir.join("nar"))
        .map(|rd| {
            rd.flatten()
                .map(|e| format!("nar/{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        nars,
        urls,
        "NAR files and narinfo URLs differ in {}",
        dir.display()
    );
    narinfos.len()
}

/// Whether a [`GuardedNginx`] takes uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uploads {
    /// WebDAV `PUT` accepted, as [`start_nginx`]'s.
    Accepted,
    /// Reads allowed, every `PUT` answered `403 Forbidden` (`limit_except GET { deny all; }`):
    /// a cache whose operator has not (yet) let this uploader in.
    Forbidden,
}

/// A real nginx serving a binary cache on `host`, refusing or taking uploads; it restarts
/// with the other policy to turn a refusing cache into a working one.
pub struct GuardedNginx {
    pub www: PathBuf,
    pub url: String,
    dir: PathBuf,
    addr: String,
}

impl GuardedNginx {
    pub fn start(host: &mut Host, uploads: Uploads) -> GuardedNginx {
        let dir = host.dir.join("nginx-guarded");
        let www = dir.join("www");
        for d in [dir.join("tmp"), www.clone()] {
            std::fs::create_dir_all(&d).expect("nginx dirs");
        }
        let n = GuardedNginx {
            url: format!("http://{}:{NGINX_PORT}", host.addr),
            www,
            dir,
            addr: host.addr.clone(),
        };
        n.write_conf(uploads);
        n.spawn(host);
        n
    }

    fn write_conf(&self, uploads: Uploads) {
        // `limit_except GET` also allows HEAD; `deny all` answers 403.
        let guard = match uploads {
            Uploads::Accepted => "",
            Uploads::Forbidden => "limit_except GET { deny all; }\n",
        };
        let location = format!(
            "dav_methods PUT;\n      create_full_put_path on;\n      dav_access user:rw group:r all:r;\n      {guard}"
        );
        let conf = crate::net::nginx_conf(&self.dir, &self.addr, NGINX_PORT, &self.www, &location);
        std::fs::write(self.dir.join("nginx.conf"), conf).expect("nginx.conf");
    }

    fn spawn(&self, host: &mut Host) {
        let child = host
            .command("nginx")
            .arg("-e")
            .arg(self.dir.join("error.log"))
            .arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx");
        host.adopt(child);
        wait_listening(host, NGINX_PORT, "nginx");
    }

    /// Restarts nginx on `host` with another upload policy, as an operator fixing the cache
    /// would. A stop and a start rather than `nginx -s reload`: after a reload the old
    /// worker may still accept a connection or two with the old policy.
    pub fn set_uploads(&self, host: &mut Host, uploads: Uploads) {
        let mut c = host.command("nginx");
        c.arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .args(["-s", "stop"]);
        run(&mut c).expect("nginx -s stop");
        wait_for("nginx to stop", Duration::from_secs(10), || {
            crate::net::not_listening(host, NGINX_PORT)
        });
        self.write_conf(uploads);
        self.spawn(host);
    }

    /// `PUT` requests nginx has answered so far, by status code.
    pub fn puts(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"PUT /"))
            .filter_map(|l| l.split("HTTP/1.1\" ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next().map(str::to_owned))
            .collect()
    }
}

/// A host added with `Fleet::add_host`, to change what it runs.
pub fn host_mut<'a>(fleet: &'a mut Fleet, role: &str) -> &'a mut Host {
    fleet
        .others
        .iter_mut()
        .find(|h| h.role == role)
        .unwrap_or_else(|| panic!("no host '{role}' in the fleet"))
}

/// Stops `host`'s nix-daemon (the listening one, not its per-connection children), as a
/// `systemctl restart nix-daemon` or an upgrade would for a moment. Returns once it no
/// longer runs; [`Host::start_nix_daemon`] starts it again.
pub fn stop_nix_daemon(host: &Host) {
    let pid = &host
        .nix_daemon_pid()
        .unwrap_or_else(|| panic!("no single listening nix-daemon on {}", host.role));
    run(Command::new("kill").args(["-TERM", pid])).expect("kill nix-daemon");
    // Gone or a zombie (the fleet reaps it at teardown).
    wait_for("the nix-daemon to exit", Duration::from_secs(10), || {
        crate::process_ended(pid)
    });
}

/// The spool records waiting in `state/spool/new/`, as text.
pub fn spool_records(state: &Path) -> Vec<String> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(state.join("spool/new"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("spool record"))
        .collect()
}

/// `ferry-post-build status --json`.
pub fn status_json(ferry: &Ferry, fleet: &Fleet) -> serde_json::Value {
    let out = ferry
        .command(&fleet.client, &["status", "--json"])
        .output()
        .expect("status --json");
    check(&out, "ferry-post-build status --json").unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// A derivation whose output is `mib` MiB of random bytes (incompressible).
pub fn random_blob(mib: u64, tag: &str) -> String {
    format!(
        r#"builtins.derivation {{ name = "ferry-blob-{tag}-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "head -c {bytes} /dev/urandom > $out" ]; PATH = "/usr/bin:/bin"; }}"#,
        n = crate::nonce(),
        bytes = mib << 20
    )
}

/// Shapes the client's traffic towards the LAN host `role` to `rate` (tc token bucket on the
/// client's bridge port), or removes the shaping (`None`), so that an upload takes long
/// enough to be interrupted.
pub fn shape_towards(fleet: &Fleet, role: &str, rate: Option<&str>) {
    let dev = format!("to-{role}");
    let ns = &fleet.client.netns;
    match rate {
        Some(rate) => {
            run(Command::new("ip").args([
                "netns", "exec", ns, "tc", "qdisc", "replace", "dev", &dev, "root", "tbf", "rate",
                rate, "burst", "64kb", "latency", "2s",
            ]))
            .expect("tc");
        }
        None => {
            let _ = Command::new("ip")
                .args([
                    "netns", "exec", ns, "tc", "qdisc", "del", "dev", &dev, "root",
                ])
                .output();
        }
    }
}

/// Port of the substituter [`add_client_behind_substituter`] starts (private to the
/// client's namespace).
pub const SUBSTITUTER_PORT: u16 = 37516;

/// A client host `role` that substitutes only through its own `ferry-substituter` with one
/// upstream (`upstream_toml`, see [`start_substituter`]), signatures required.
pub fn add_client_behind_substituter(
    fleet: &mut Fleet,
    role: &str,
    public_key: &str,
    dir: &Path,
    upstream_toml: &str,
) -> Substituter {
    let url = format!("http://127.0.0.1:{SUBSTITUTER_PORT}");
    add_substituting_client(fleet, role, &url, public_key);
    start_substituter(fleet.host(role), dir, SUBSTITUTER_PORT, upstream_toml)
}

/// A `ferry-substituter` running in a host's namespaces; killed on drop.
pub type Substituter = super::substituter::Ferry;

/// Starts a `ferry-substituter` on `host`'s 127.0.0.1:`port` with one upstream
/// (`upstream_toml`: the body of its `[[substituter.upstream]]` table); config and log go in
/// `dir`. Waits until it listens.
fn start_substituter(host: &Host, dir: &Path, port: u16, upstream_toml: &str) -> Substituter {
    let conf = dir.join(format!("substituter-{port}.toml"));
    std::fs::write(
        &conf,
        format!(
            "[substituter]\nlisten = \"127.0.0.1:{port}\"\n[[substituter.upstream]]\n{upstream_toml}"
        ),
    )
    .expect("substituter config");
    let log = dir.join(format!("substituter-{port}.log"));
    let logf = std::fs::File::create(&log).expect("log");
    let child = host
        .command(&ferry_bin("ferry-substituter").to_string_lossy())
        .env("FERRY_CONFIG", &conf)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf)
        .spawn()
        .expect("ferry-substituter");
    let s = Substituter::adopt(child, log);
    wait_for("the substituter to listen", Duration::from_secs(10), || {
        crate::listening(host, port)
    });
    s
}

pub fn build(fleet: &crate::Fleet, expr: &str, args: &[&str], what: &str) -> Vec<String> {
    let out = fleet.nix_build(expr, args);
    check(&out, what).unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", fleet.daemon_log()));
    crate::out_paths(&out)
}

/// `nix-build` arguments that build on the client itself: one job, no builders.
pub const LOCAL_ONLY: [&str; 3] = ["-j1", "--builders", ""];

/// Builds each `(expression, what)` in turn on the client alone ([`LOCAL_ONLY`]); returns
/// every output of the derivations built ([`all_outputs`]) and the closure of those.
pub fn build_locally(fleet: &Fleet, exprs: &[(String, &str)]) -> (Vec<String>, BTreeSet<String>) {
    let mut built = Vec::new();
    for (expr, what) in exprs {
        built.extend(build(fleet, expr, &LOCAL_ONLY, what));
    }
    let outputs = all_outputs(fleet, &built);
    let expected = closure(fleet, &outputs);
    (outputs, expected)
}

/// `n` trivial derivations in one list expression, named after `tag`.
pub fn trivial_list(n: usize, tag: &str) -> String {
    let drvs: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"(builtins.derivation {{ name = "ferry-pb-{tag}-{i}-{n}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "echo {tag} {i} > $out" ]; PATH = "/usr/bin:/bin"; }})"#,
                n = nonce()
            )
        })
        .collect();
    format!("[ {} ]", drvs.join(" "))
}

/// A derivation with two outputs, `out` and `dev`.
pub fn multi_output(tag: &str) -> String {
    format!(
        r#"builtins.derivation {{ name = "ferry-pb-multi-{tag}-{n}"; outputs = [ "out" "dev" ]; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" "echo out > $out; mkdir $dev; echo dev > $dev/h" ]; PATH = "/usr/bin:/bin"; }}"#,
        n = nonce()
    )
}

/// All outputs of the derivations that produced `paths` (the `dev` of a multi-output one too).
pub fn all_outputs(fleet: &crate::Fleet, paths: &[String]) -> Vec<String> {
    let mut c = fleet.client_command("nix-store");
    c.args(["-q", "--deriver"]).args(paths);
    let drvs = String::from_utf8_lossy(&run(&mut c).expect("deriver").stdout).to_string();
    let mut c = fleet.client_command("nix-store");
    c.args(["-q", "--outputs"]).args(drvs.lines());
    String::from_utf8_lossy(&run(&mut c).expect("outputs").stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The uploader process of a test, killed and reaped when dropped.
pub struct Uploader(pub std::process::Child);

impl Drop for Uploader {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `wait_for`, failing with the uploader's status and log.
pub fn wait_or_explain(
    ferry: &Ferry,
    fleet: &crate::Fleet,
    what: &str,
    timeout: Duration,
    ok: impl FnMut() -> bool,
) {
    if let Err(e) = crate::wait_until(what, timeout, ok) {
        panic!(
            "{e}\nstatus:\n{}\nuploader log:\n{}",
            ferry.status(fleet),
            ferry.uploader_log()
        );
    }
}

/// Waits (15 s at most) until the queue is empty and every GC root of the uploader is gone.
pub fn wait_for_done(ferry: &Ferry, fleet: &crate::Fleet) {
    let start = Instant::now();
    loop {
        let status = ferry.status(fleet);
        let roots = ferry.gc_roots(fleet);
        if status.contains(QUEUE_DONE) && roots.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "queue not empty or GC roots left after 15 s:\n{status}\nroots: {roots:?}\nuploader log:\n{}",
            ferry.uploader_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
