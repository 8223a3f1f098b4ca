//! Fixtures for `ferry-post-build` tests: a fleet whose client daemon runs Ferry's
//! post-build hook, its configuration, an uploader process, an nginx WebDAV cache on a LAN
//! host, and checks on cache directories.

#![allow(dead_code)]

use ferry_integration::{Fleet, FleetConfig, Host, check, ferry_bin, run};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const NGINX_PORT: u16 = 8080;

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
    pub fn new() -> Ferry {
        let dir = tempfile::Builder::new()
            .prefix("ferry-post-")
            .tempdir()
            .expect("tempdir");
        let secret_key = dir.path().join("cache.sec");
        let out = Command::new(post_build_bin())
            .args(["keygen", "ferry-test-1", "--secret-file"])
            .arg(&secret_key)
            .output()
            .expect("keygen");
        check(&out, "ferry-post-build keygen").unwrap_or_else(|e| panic!("{e}"));
        let public_key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
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
        Fleet::start(FleetConfig {
            builders,
            max_jobs_per_builder: 2,
            client_conf: format!(
                "post-build-hook = {}\nbuild-hook = {}",
                post_build_bin().display(),
                ferry_bin("ferry-build-hook").display()
            ),
            daemon_env: vec![("FERRY_CONFIG".into(), self.config.display().to_string())],
            ..Default::default()
        })
        .expect("fleet")
    }

    /// `ferry-post-build ARGS` on `host` (its store, its network), with this config.
    pub fn command(&self, host: &Host, args: &[&str]) -> Command {
        let mut c = host.nix_command(&post_build_bin().to_string_lossy());
        c.args(args)
            .env("FERRY_CONFIG", &self.config)
            .env("RUST_LOG", "info");
        c
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

/// nginx with WebDAV PUT on `host`, serving and storing under `<host dir>/www`.
pub fn start_nginx(host: &mut Host) -> PathBuf {
    let www = host.dir.join("nginx").join("www");
    ferry_integration::start_nginx(host, NGINX_PORT, &www, true).expect("nginx");
    www
}

/// Waits until something listens on TCP `port` in `host`'s network namespace.
pub fn wait_listening(host: &Host, port: u16, what: &str) {
    let netns = host.netns.clone();
    wait_for(
        &format!("{what} to listen on port {port}"),
        Duration::from_secs(20),
        || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &netns,
                    "ss",
                    "-Hltn",
                    "sport",
                    "=",
                    &format!(":{port}"),
                ])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false)
        },
    );
}

pub const MOTO_PORT: u16 = 5000;

/// A Python that can run moto's S3 server (`moto[server]`): dev/setup's venv first, then
/// the `python3` on `PATH`. Returns the interpreter's real path (it runs in another mount
/// namespace, where shims may not resolve).
pub fn moto_python() -> Option<PathBuf> {
    for py in ["/opt/ferry-venv/bin/python3", "python3"] {
        let out = Command::new(py)
            .args([
                "-c",
                "import sys, moto.server, boto3, flask; print(sys.executable)",
            ])
            .stderr(Stdio::null())
            .output();
        if let Ok(o) = out
            && o.status.success()
        {
            let exe = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if !exe.is_empty() {
                return Some(PathBuf::from(exe));
            }
        }
    }
    None
}

/// Creates an IAM user allowed `s3:*` with an access key, and a public-read bucket, on a fresh moto
/// server (which starts with authentication off), then turns authentication on: from then
/// on moto checks every request's SigV4 signature (with botocore's code) and refuses a bad
/// one with `SignatureDoesNotMatch`. Prints `<access key id> <secret>`.
const MOTO_SETUP: &str = r#"
import sys, json, boto3, urllib.request
endpoint, bucket = sys.argv[1], sys.argv[2]
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="ferry")
iam.put_user_policy(UserName="ferry", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="ferry")["AccessKey"]
s3 = boto3.client("s3", **kw)
s3.create_bucket(Bucket=bucket)
# Public read, like a real public cache bucket: anonymous GETs are allowed by policy.
# (moto checks HEAD as an "s3:HeadObject" action, which AWS folds into s3:GetObject.)
s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:HeadObject"],
     "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
urllib.request.urlopen(urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})).read()
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;

/// A moto S3 server on `host`; returns its endpoint URL.
pub fn start_moto(host: &mut Host, python: &Path) -> String {
    let log = std::fs::File::create(host.dir.join("moto.log")).expect("moto log");
    let child = host
        .command(&python.to_string_lossy())
        .args([
            "-m",
            "moto.server",
            "-H",
            &host.addr,
            "-p",
            &MOTO_PORT.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("moto server");
    host.adopt(child);
    wait_listening(host, MOTO_PORT, "moto");
    format!("http://{}:{MOTO_PORT}", host.addr)
}

/// Runs [`MOTO_SETUP`]; returns the access key id and secret.
pub fn moto_setup(host: &Host, python: &Path, endpoint: &str, bucket: &str) -> (String, String) {
    let mut c = host.command(&python.to_string_lossy());
    c.args(["-c", MOTO_SETUP, endpoint, bucket]);
    let out = run(&mut c).expect("moto setup");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = text.split_whitespace();
    match (it.next(), it.next()) {
        (Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
        _ => panic!("moto setup printed {text:?}"),
    }
}

/// Turns moto's request authentication off again: with it on, moto's server answers an
/// unsigned request with a 500 before looking at the bucket policy; with it off, anonymous
/// GETs are allowed by the bucket's public-read policy (and would be refused without it),
/// so Nix can read the bucket as a plain HTTP binary cache.
pub fn moto_allow_anonymous(host: &Host, python: &Path, endpoint: &str) {
    let mut c = host.command(&python.to_string_lossy());
    c.args([
        "-c",
        "import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1] + '/moto-api/reset-auth', data=b'inf', method='POST', headers={'Content-Type': 'text/plain'})).read()",
        endpoint,
    ]);
    run(&mut c).expect("moto reset-auth");
}

pub fn wait_for(what: &str, timeout: Duration, ok: impl FnMut() -> bool) {
    ferry_integration::wait_until(what, timeout, ok).unwrap_or_else(|e| panic!("{e}"));
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
        let conf = format!(
            "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
             \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
             \x20 server {{\n    listen {addr}:{NGINX_PORT};\n    root {www};\n    client_max_body_size 0;\n\
             \x20   location / {{\n      dav_methods PUT;\n      create_full_put_path on;\n      dav_access user:rw group:r all:r;\n      {guard}    }}\n  }}\n}}\n",
            d = self.dir.display(),
            www = self.www.display(),
            addr = self.addr,
        );
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
        let netns = host.netns.clone();
        wait_for("nginx to stop", Duration::from_secs(10), || {
            Command::new("ip")
                .args(["netns", "exec", &netns, "ss", "-Hltn", "sport", "="])
                .arg(format!(":{NGINX_PORT}"))
                .output()
                .map(|o| o.status.success() && o.stdout.is_empty())
                .unwrap_or(false)
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
    let out = Command::new("ip")
        .args(["netns", "pids", &host.netns])
        .output()
        .expect("ip netns pids");
    let comm = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let parent = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                // Fields after the command name, which is in parentheses: state, ppid, …
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned))
            })
            .unwrap_or_default()
    };
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .filter(|p| comm(p) == "nix-daemon" && comm(&parent(p)) != "nix-daemon")
        .collect();
    assert_eq!(
        pids.len(),
        1,
        "listening nix-daemons of {}: {pids:?}",
        host.role
    );
    let pid = &pids[0];
    run(Command::new("kill").args(["-TERM", pid])).expect("kill nix-daemon");
    // Gone or a zombie (the fleet reaps it at teardown).
    wait_for("the nix-daemon to exit", Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
                    .unwrap_or(true)
            })
            .unwrap_or(true)
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
