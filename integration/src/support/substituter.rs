//! Fixtures for `ferry-substituter` tests: a producer host that builds paths and `nix copy`s
//! them into signed `file://` binary caches, upstream cache hosts (healthy, black-holed, 500,
//! garbage 200, slow drip, reset mid-NAR: `fault_server.py`), Ferry itself in the client's
//! namespace as the client daemon's only substituter, and HTTP probes run inside the fleet.
//!
//! No test here ever starts Ferry with its default upstream (cache.nixos.org): every start
//! passes explicit upstreams on the fleet's LAN or in local directories.

use crate::{Fleet, FleetConfig, Host, SYSTEM, check, ferry_bin, out_paths};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Ferry's port in the client's namespace (private to the namespace, so always free).
pub const FERRY_PORT: u16 = 37515;
/// Port of every upstream cache server on its host.
pub const CACHE_PORT: u16 = 8080;
/// A file that exists only in the producer's `/etc/nix`: derivations built anywhere else fail.
pub const PRODUCER_MARKER: &str = "/etc/nix/ferry-producer";

pub fn ferry_url() -> String {
    format!("http://127.0.0.1:{FERRY_PORT}")
}

/// A binary-cache signing key pair made by Nix itself.
pub struct Key {
    pub secret: PathBuf,
    pub public: String,
}

pub fn generate_key(dir: &Path, name: &str) -> Key {
    let secret = dir.join(format!("{name}.sk"));
    let public = dir.join(format!("{name}.pk"));
    let out = Command::new("nix-store")
        .arg("--generate-binary-cache-key")
        .arg(name)
        .arg(&secret)
        .arg(&public)
        .output()
        .expect("nix-store --generate-binary-cache-key");
    check(&out, "generating a cache key").unwrap_or_else(|e| panic!("{e}"));
    Key {
        secret,
        public: std::fs::read_to_string(&public)
            .expect("public key")
            .trim()
            .to_owned(),
    }
}

/// A new key pair `name` in a temporary directory, which is returned too: the key files
/// last as long as it does.
pub fn temp_key(name: &str) -> (Key, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    (generate_key(dir.path(), name), dir)
}

/// The start of most substituter tests: a new key `ferry-test-cache-1` ([`temp_key`]; keep
/// its directory, the third value), a fleet whose client trusts only it ([`fleet`]), and the
/// producer host ([`add_producer`]).
pub fn producer_fleet() -> (Fleet, Key, tempfile::TempDir) {
    let (key, keys_dir) = temp_key("ferry-test-cache-1");
    let mut fleet = fleet(&key.public);
    add_producer(&mut fleet);
    (fleet, key, keys_dir)
}

/// The client daemon's nix.conf additions: Ferry as the only substituter, signatures required,
/// short daemon-side download time-outs so a hang would fail a test quickly (docs/testing.md §2: the 2.8
/// daemon ignores these from clients).
pub fn client_conf(trusted_keys: &str) -> String {
    format!(
        "substituters = {url}\ntrusted-substituters = {url}\ntrusted-public-keys = {trusted_keys}\n\
         require-sigs = true\nconnect-timeout = 5\nstalled-download-timeout = 10\n",
        url = ferry_url()
    )
}

/// A fleet with no builders whose client daemon substitutes only from Ferry and trusts `keys`.
pub fn fleet(trusted_keys: &str) -> Fleet {
    Fleet::start(FleetConfig {
        builders: 0,
        max_jobs_per_builder: 1,
        client_conf: client_conf(trusted_keys),
        daemon_env: Vec::new(),
        ..Default::default()
    })
    .expect("fleet")
}

/// Adds the producer: a host with its own daemon and the marker that lets its builds succeed.
pub fn add_producer(fleet: &mut Fleet) {
    let h = fleet.add_client("producer").expect("producer host");
    h.write_nix_conf("").expect("producer nix.conf");
    std::fs::write(h.dir.join("etc-nix/ferry-producer"), "1\n").expect("marker");
    h.start_nix_daemon(&[]).expect("producer daemon");
}

/// A three-path closure (`top` → `mid` → `leaf`) whose builders fail unless they run on the
/// producer. `leaf` holds `blob_bytes` random bytes, so NARs can be made large. The client
/// evaluates the same expression, so it asks for the same output paths: it gets them only by
/// substitution.
pub fn producer_only_drv(nonce: &str, blob_bytes: usize) -> String {
    producer_only_chain(nonce, &format!("head -c {blob_bytes} /dev/urandom > $out"))
}

/// [`producer_only_drv`] with `leaf_script` building the leaf.
pub fn producer_only_chain(nonce: &str, leaf_script: &str) -> String {
    format!(
        r#"let
  mk = name: script: builtins.derivation {{ name = "ferry-sub-${{name}}-{nonce}"; system = "{SYSTEM}"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    args = [ "-c" ("if [ ! -e {PRODUCER_MARKER} ]; then echo 'ferry-test: built locally, not substituted' >&2; exit 1; fi; " + script) ]; }};
  leaf = mk "leaf" "{leaf_script}";
  mid = mk "mid" "mkdir $out; echo ${{leaf}} > $out/leaf";
in mk "top" "mkdir $out; echo ${{mid}} > $out/mid""#
    )
}

/// Builds `expr` on the producer and returns its output paths.
pub fn build_on_producer(fleet: &Fleet, expr: &str) -> Vec<String> {
    let out = fleet
        .host("producer")
        .nix_command("nix-build")
        .args(["--no-out-link", "-E", expr])
        .stdin(Stdio::null())
        .output()
        .expect("nix-build on the producer");
    check(&out, "nix-build on the producer").unwrap_or_else(|e| panic!("{e}"));
    out_paths(&out)
}

/// Copies the closure of `paths` from the producer into the `file://` cache at `dir`, signed
/// with `key` (`nix copy --to file://…?secret-key=…`).
pub fn copy_to_cache(fleet: &Fleet, paths: &[String], dir: &Path, key: &Path, compression: &str) {
    std::fs::create_dir_all(dir).expect("cache dir");
    let to = format!(
        "file://{}?secret-key={}&compression={compression}",
        dir.display(),
        key.display()
    );
    let out = fleet
        .host("producer")
        .nix_command("nix")
        .args(["copy", "--to", &to])
        .args(paths)
        .stdin(Stdio::null())
        .output()
        .expect("nix copy");
    check(&out, "nix copy to the cache").unwrap_or_else(|e| panic!("{e}"));
}

/// Starts `fault_server.py MODE` on a new LAN host `role` serving `dir`; returns its URL.
pub fn serve_cache(fleet: &mut Fleet, role: &str, mode: &str, dir: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fault_server.py");
    let h = fleet.add_host(role).expect("cache host");
    let log = std::fs::File::create(h.dir.join("log/server.log")).expect("log");
    let child = h
        .command("/usr/bin/python3")
        .arg(&script)
        .arg(mode)
        .arg(&h.addr)
        .arg(CACHE_PORT.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("starting the cache server");
    h.adopt(child);
    let url = format!("http://{}:{CACHE_PORT}", h.addr);
    wait_listening(h, CACHE_PORT);
    url
}

fn wait_listening(h: &Host, port: u16) {
    crate::wait_listening(h, port).unwrap_or_else(|e| panic!("{e}"));
}

/// A running ferry-substituter (in the client's namespace, or a host's); killed on drop.
pub struct Ferry {
    child: Child,
    pub log: PathBuf,
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ferry {
    /// Takes charge of a started `ferry-substituter` whose output goes to `log`.
    pub(crate) fn adopt(child: Child, log: PathBuf) -> Ferry {
        Ferry { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts Ferry on the client's 127.0.0.1 with these upstreams (in priority order) and
/// `extra_toml` in its `[substituter]` section; waits until `nix-cache-info` answers.
pub fn start_ferry(fleet: &Fleet, upstreams: &[String], extra_toml: &str) -> Ferry {
    start_ferry_with(fleet, upstreams, extra_toml, "")
}

/// [`start_ferry`] with `upstream_toml` added to every `[[substituter.upstream]]` table.
pub fn start_ferry_with(
    fleet: &Fleet,
    upstreams: &[String],
    extra_toml: &str,
    upstream_toml: &str,
) -> Ferry {
    let dir = fleet.root.path();
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let conf = dir.join(format!("ferry-{n}.toml"));
    let mut toml = format!("[substituter]\nlisten = \"127.0.0.1:{FERRY_PORT}\"\n{extra_toml}\n");
    for (i, u) in upstreams.iter().enumerate() {
        toml.push_str(&format!(
            "[[substituter.upstream]]\nurl = \"{u}\"\npriority = {}\n{upstream_toml}\n",
            10 * (i + 1)
        ));
    }
    std::fs::write(&conf, toml).expect("ferry.toml");
    let log = dir.join(format!("ferry-{n}.log"));
    let child = spawn_substituter(&fleet.client, &conf, &log);
    let ferry = Ferry { child, log };
    let start = Instant::now();
    loop {
        let (code, _) = http_get(fleet, &format!("{}/nix-cache-info", ferry_url()), &[]);
        if code == 200 {
            return ferry;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "ferry-substituter did not start:\n{}",
            ferry.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET (or with `-I`, HEAD) `url` from the client's namespace with curl. Returns the status
/// (0 when curl failed before a status) and the body; curl's exit code is in `curl_exit`.
pub fn http_get(fleet: &Fleet, url: &str, extra: &[&str]) -> (u16, Vec<u8>) {
    let r = http_get_full(fleet, url, extra);
    (r.status, r.body)
}

pub struct HttpResult {
    pub status: u16,
    pub body: Vec<u8>,
    pub curl_exit: i32,
}

pub fn http_get_full(fleet: &Fleet, url: &str, extra: &[&str]) -> HttpResult {
    let body_file = tempfile::NamedTempFile::new_in(fleet.root.path()).expect("temp file");
    let out: Output = fleet
        .client
        .command("curl")
        .args(["-s", "--max-time", "30", "-o"])
        .arg(body_file.path())
        .args(["-w", "%{http_code}"])
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    HttpResult {
        status: String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        body: std::fs::read(body_file.path()).unwrap_or_default(),
        curl_exit: out.status.code().unwrap_or(-1),
    }
}

/// Ferry's `/metrics`.
pub fn metrics(fleet: &Fleet) -> String {
    let (code, body) = http_get(fleet, &format!("{}/metrics", ferry_url()), &[]);
    assert_eq!(code, 200, "/metrics");
    String::from_utf8_lossy(&body).into_owned()
}

/// The value of one sample line (`name` including labels, exactly).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// Checks that metric `name` (labels included, see [`metric`]) is `want` in `/metrics` text
/// `m`; a failure shows the value and every metric.
pub fn assert_metric_eq(m: &str, name: &str, want: f64) {
    let got = metric(m, name);
    assert_eq!(got, want, "{name}:\n{m}");
}

/// Checks that metric `name` (labels included, see [`metric`]) is at least `min` in
/// `/metrics` text `m`; a failure shows the value and every metric.
pub fn assert_metric_at_least(m: &str, name: &str, min: f64) {
    let got = metric(m, name);
    assert!(got >= min, "{name} is {got}, below {min}:\n{m}");
}

/// Fails if nix-build's stderr shows any sign of trouble with the substituter.
pub fn assert_quiet(stderr: &str, what: &str) {
    let lower = stderr.to_lowercase();
    for bad in [
        "warning",
        "retrying",
        "error",
        "disabling",
        "ignoring substitute",
    ] {
        assert!(
            !lower.contains(bad),
            "{what}: nix-build printed {bad:?}:\n{stderr}"
        );
    }
}

/// `nix-build` on the client; returns (output, stderr, elapsed).
pub fn client_build(fleet: &Fleet, expr: &str) -> (Output, String, Duration) {
    let t = Instant::now();
    let out = fleet.nix_build(expr, &["-j1"]);
    let elapsed = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr, elapsed)
}

/// `nix-build` of `expr` on the client through Ferry: it must succeed (else the daemon's and
/// Ferry's logs are shown; `what` names the build), substitute from Ferry, and print no
/// warning or error (`quiet` names the case). Returns the output and the time it took.
pub fn substitute_through_ferry(
    fleet: &Fleet,
    ferry: &Ferry,
    expr: &str,
    what: &str,
    quiet: &str,
) -> (Output, Duration) {
    let (out, stderr, elapsed) = client_build(fleet, expr);
    check(&out, what).unwrap_or_else(|e| {
        panic!(
            "{e}\ndaemon log:\n{}\nferry log:\n{}",
            fleet.daemon_log(),
            ferry.log_text()
        )
    });
    assert!(
        substituted_from_ferry(&stderr),
        "{what}: not substituted from Ferry:\n{stderr}"
    );
    assert_quiet(&stderr, quiet);
    (out, elapsed)
}

/// Whether nix-build's stderr says it copied a path from Ferry.
pub fn substituted_from_ferry(stderr: &str) -> bool {
    stderr.contains(&format!("from '{}'", ferry_url()))
}

/// The narinfo file name of a store path: `<hash part>.narinfo`.
pub fn narinfo_name(store_path: &str) -> String {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    format!("{}.narinfo", &base[..32])
}

// A NAS serving its own store over the LAN (`[local-store]`), and a laptop on the LAN.

/// The NAS's URL as the laptop sees it.
pub fn nas_url(fleet: &Fleet) -> String {
    format!("http://{}:{FERRY_PORT}", fleet.host("producer").addr)
}

/// A fleet with a NAS (the producer: builds, serves its store) and no laptop yet.
pub fn nas_fleet() -> Fleet {
    let mut fleet = Fleet::start(FleetConfig {
        builders: 0,
        client_conf: String::new(),
        ..Default::default()
    })
    .expect("fleet");
    add_producer(&mut fleet);
    fleet
}

/// A NAS serving its store signed with a new key `nas-1` ([`start_nas_ferry`]) and a laptop
/// trusting that key ([`add_laptop`]). Returns the fleet, the key, the key's directory
/// (keep it) and the NAS's Ferry log.
pub fn nas_and_laptop() -> (Fleet, Key, tempfile::TempDir, PathBuf) {
    let (key, keys_dir) = temp_key("nas-1");
    let mut fleet = nas_fleet();
    let nas_log = start_nas_ferry(&mut fleet, &key.secret);
    add_laptop(&mut fleet, &key.public);
    (fleet, key, keys_dir, nas_log)
}

/// Ferry on the NAS, on its LAN address, serving its store signed with `secret`.
pub fn start_nas_ferry(fleet: &mut Fleet, secret: &Path) -> PathBuf {
    let dir = fleet.root.path().to_path_buf();
    let conf = dir.join("ferry-nas.toml");
    let nas = fleet.host("producer");
    std::fs::write(
        &conf,
        format!(
            "[substituter]\nlisten = \"{}:{FERRY_PORT}\"\n\n[substituter.local]\nsecret-key-files = [\"{}\"]\n",
            nas.addr,
            secret.display()
        ),
    )
    .expect("ferry.toml");
    let log = dir.join("ferry-nas.log");
    let child = spawn_substituter(nas, &conf, &log);
    let nas = fleet
        .others
        .iter_mut()
        .find(|h| h.role == "producer")
        .expect("nas");
    nas.adopt(child);
    crate::wait_listening(nas, FERRY_PORT)
        .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    log
}

/// GET `url` with curl from `host`: (status, body).
pub fn get_on(host: &Host, url: &str) -> (u16, Vec<u8>) {
    let out = host
        .command("curl")
        .args(["-s", "--max-time", "30", "-w", "\n%{http_code}", url])
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    let mut body = out.stdout;
    let nl = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&body[nl + 1..])
        .trim()
        .parse()
        .unwrap_or(0);
    body.truncate(nl);
    (code, body)
}

pub fn nas_metrics(fleet: &Fleet) -> String {
    let (code, body) = get_on(fleet.host("laptop"), &format!("{}/metrics", nas_url(fleet)));
    assert_eq!(code, 200);
    String::from_utf8_lossy(&body).into_owned()
}

pub fn laptop_build(fleet: &Fleet, expr: &str) -> std::process::Output {
    fleet
        .host("laptop")
        .nix_command("nix-build")
        .args(["--no-out-link", "-j1", "-E", expr])
        .stdin(Stdio::null())
        .output()
        .expect("nix-build on the laptop")
}

/// A laptop whose only substituter is the NAS, trusting `public_key`, signatures required.
pub fn add_laptop(fleet: &mut Fleet, public_key: &str) {
    let url = nas_url(fleet);
    let h = fleet.add_client("laptop").expect("laptop");
    h.write_nix_conf(&format!(
        "substituters = {url}\ntrusted-substituters = {url}\ntrusted-public-keys = {public_key}\n\
         require-sigs = true\nconnect-timeout = 5\nstalled-download-timeout = 10\n"
    ))
    .expect("laptop nix.conf");
    h.start_nix_daemon(&[]).expect("laptop daemon");
}

pub fn paths_of_closure_on(fleet: &crate::Fleet, role: &str, top: &str) -> Vec<String> {
    let mut q = fleet.host(role).nix_command("nix-store");
    q.args(["-qR", top]);
    crate::stdout_of(q, "nix-store -qR")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Starts `ferry-substituter` on `host` with the configuration `conf`, logging (debug) to
/// `log`.
pub fn spawn_substituter(host: &Host, conf: &Path, log: &Path) -> Child {
    let logf = std::fs::File::create(log).expect("log");
    host.command(ferry_bin("ferry-substituter").to_str().expect("utf-8 path"))
        .env("FERRY_CONFIG", conf)
        .env("RUST_LOG", "ferry_substituter=debug,info")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf)
        .spawn()
        .expect("starting ferry-substituter")
}
