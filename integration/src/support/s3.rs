//! S3 fixtures: moto (an S3 API in Python) on a fleet host, with buckets and keys, Garage's
//! availability, credentials written as key files, and multipart progress read from the
//! uploader's status.

use super::post_build::wait_listening;
use crate::{Fleet, Host, run};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const MOTO_PORT: u16 = 5000;

/// moto's Python, or `None` (after saying the test is skipped) where moto is not installed;
/// under CI a missing moto fails the test instead.
pub fn moto_or_skip(test: &str) -> Option<PathBuf> {
    let python = moto_python();
    if python.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "moto is not installed (dev/setup installs it in /opt/ferry-venv); CI must run {test}"
        );
        eprintln!("SKIPPED {test}: moto[server] not installed (run dev/setup)");
    }
    python
}

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

/// Creates an IAM user allowed `s3:*` with an access key, and a bucket, on a fresh moto
/// server (which starts with authentication off); makes the bucket public-read when asked;
/// uploads every file under a directory (if one is given) with its relative path as the key;
/// then turns authentication on: from then on moto checks every request's SigV4 signature
/// (with botocore's code) and refuses a bad one with `SignatureDoesNotMatch`. Arguments:
/// endpoint, bucket, `public` or `private`, and the directory or nothing. Prints
/// `<access key id> <secret>`.
const MOTO_SETUP: &str = r#"
import sys, os, json, boto3, urllib.request
endpoint, bucket, access = sys.argv[1], sys.argv[2], sys.argv[3]
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="ferry")
iam.put_user_policy(UserName="ferry", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="ferry")["AccessKey"]
s3 = boto3.client("s3", **kw)
s3.create_bucket(Bucket=bucket)
if access == "public":
    # Public read, like a real public cache bucket: anonymous GETs are allowed by policy.
    # (moto checks HEAD as an "s3:HeadObject" action, which AWS folds into s3:GetObject.)
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:HeadObject"],
         "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
if len(sys.argv) > 4:
    root = sys.argv[4]
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            s3.upload_file(p, bucket, os.path.relpath(p, root))
urllib.request.urlopen(urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})).read()
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;

/// Who may read a bucket [`moto_setup`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketAccess {
    /// Anonymous GETs allowed by a bucket policy (a public cache bucket).
    Public,
    /// No policy: only the key [`moto_setup`] returns may read.
    Private,
}

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

/// Runs [`MOTO_SETUP`]: a user with a key and `bucket` readable as `access` says, holding
/// the files under `upload` (if given); returns the access key id and secret.
pub fn moto_setup(
    host: &Host,
    python: &Path,
    endpoint: &str,
    bucket: &str,
    access: BucketAccess,
    upload: Option<&Path>,
) -> (String, String) {
    let mut c = host.command(&python.to_string_lossy());
    let access = match access {
        BucketAccess::Public => "public",
        BucketAccess::Private => "private",
    };
    c.args(["-c", MOTO_SETUP, endpoint, bucket, access]);
    c.args(upload);
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

/// `access-key-id-file`/`secret-access-key-file` lines for a `[post-build]` or
/// `[[substituter.upstream]]` table.
pub fn s3_key_files_toml(id_file: &Path, secret_file: &Path) -> String {
    format!(
        "access-key-id-file = \"{}\"\nsecret-access-key-file = \"{}\"\n",
        id_file.display(),
        secret_file.display()
    )
}

/// `url = URL` and `extra` lines, then the key files ([`s3_key_files_toml`]): the body of a
/// `[[substituter.upstream]]` table for an S3 bucket.
pub fn s3_upstream_toml(url: &str, extra: &str, id_file: &Path, secret_file: &Path) -> String {
    format!(
        "url = \"{url}\"\n{extra}{}",
        s3_key_files_toml(id_file, secret_file)
    )
}

/// Writes `dir/s3-id` and `dir/s3-secret` (each value and a newline); returns their paths.
pub fn write_s3_key_files(dir: &Path, key_id: &str, secret: &str) -> (PathBuf, PathBuf) {
    let id_file = dir.join("s3-id");
    let secret_file = dir.join("s3-secret");
    std::fs::write(&id_file, format!("{key_id}\n")).expect("id");
    std::fs::write(&secret_file, format!("{secret}\n")).expect("secret");
    (id_file, secret_file)
}

/// A moto bucket on its own LAN host `s3` ([`start_moto_bucket`]).
pub struct MotoBucket {
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
}

/// Adds a LAN host `s3` running moto ([`start_moto`]) and sets up `bucket` there
/// ([`moto_setup`]).
pub fn start_moto_bucket(
    fleet: &mut Fleet,
    python: &Path,
    bucket: &str,
    access: BucketAccess,
    upload: Option<&Path>,
) -> MotoBucket {
    let endpoint = start_moto(fleet.add_host("s3").expect("s3 host"), python);
    let (key_id, secret) = moto_setup(fleet.host("s3"), python, &endpoint, bucket, access, upload);
    MotoBucket {
        endpoint,
        key_id,
        secret,
    }
}

/// `(parts done, parts)` of the multipart upload `ferry-post-build status` lists, if any.
pub fn multipart_progress(status: &str) -> Option<(usize, usize)> {
    let line = status
        .lines()
        .find(|l| l.starts_with("multipart upload to "))?;
    let frac = line.split(", ").find(|s| s.ends_with(" parts done"))?;
    let (done, total) = frac.trim_end_matches(" parts done").split_once('/')?;
    Some((done.parse().ok()?, total.parse().ok()?))
}

/// Garage is built (`dev/garage`); otherwise says the test is skipped, or fails it under CI.
pub fn garage_or_skip(test: &str) -> bool {
    if crate::garage::garage_bin().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "garage is not built (dev/setup runs dev/garage); CI must run {test}"
    );
    eprintln!("SKIPPED {test}: garage not built (run dev/garage)");
    false
}
