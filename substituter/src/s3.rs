//! `s3://` upstreams: a private bucket (AWS, Garage, MinIO, Ceph) read with signed requests.
//!
//! The URL is Nix's own S3 store URL, `s3://BUCKET?region=…&endpoint=…&scheme=…&profile=…`
//! (<https://github.com/NixOS/nix/blob/2.8.0/src/libstore/s3-binary-cache-store.cc>), parsed
//! into a [`S3Location`] by `ferry-s3`, which also signs (SigV4) and finds the credentials.
//! This module holds what is particular to reading a cache: the URL's parameters, the object
//! path of a key Nix asked Ferry for, the headers of a GET or HEAD, and which 403 answers are
//! a refusal of the credentials rather than a missing key.
//!
//! S3 answers 403 `AccessDenied`, not 404, for a missing key when the credentials may not
//! list the bucket. Nix's S3 store takes `NO_SUCH_KEY` and `ACCESS_DENIED` alike as "not here"
//! and throws on every other error (`S3Helper::getObject` in
//! <https://github.com/NixOS/nix/blob/2.8.0/src/libstore/s3-binary-cache-store.cc>). Ferry does
//! the same: a 403 `AccessDenied` is a miss, while the codes that refuse the request itself
//! (`SignatureDoesNotMatch`, `InvalidAccessKeyId`, …) are failures, counted against the
//! upstream's breaker and never remembered as misses.

use ferry_s3::{CredentialSources, CredentialsError, S3Request, S3UrlError};
use std::path::Path;
use std::time::SystemTime;
use thiserror::Error;

pub(crate) use ferry_s3::{Credentials, S3Location};

/// SHA-256 of the empty body: what `x-amz-content-sha256` says for GET and HEAD.
pub(crate) const EMPTY_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The parameters of an `s3://` URL Nix's S3 store reads and Ferry honours.
const PARAMS: [&str; 4] = ["region", "endpoint", "scheme", "profile"];

#[derive(Debug, Error)]
pub enum S3ConfigError {
    #[error(transparent)]
    Url(#[from] S3UrlError),
    #[error("bad percent-encoding in parameter {0:?}")]
    Encoding(String),
    #[error("unknown parameter {0:?} (known: region, endpoint, scheme, profile)")]
    UnknownParam(String),
    #[error(
        "credentials do not go in an s3:// URL: use access-key-id-file and secret-access-key-file"
    )]
    UserInfo,
    #[error("{set} is set but {missing} is not (set both, or neither to use AWS_* or a profile)")]
    HalfFiles {
        set: &'static str,
        missing: &'static str,
    },
    #[error("access-key-id-file and secret-access-key-file are only for s3:// upstreams")]
    NotS3,
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(s.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses `s3://BUCKET[?k=v&…]`. Unknown parameters are refused rather than ignored: a typo
/// in `endpoint` must not send requests, signed with the LAN bucket's keys, to AWS.
pub(crate) fn parse_url(url: &str) -> Result<S3Location, S3ConfigError> {
    let rest = url.strip_prefix("s3://").unwrap_or(url);
    let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
    if bucket.contains('@') {
        return Err(S3ConfigError::UserInfo);
    }
    let mut params = Vec::new();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if !PARAMS.contains(&k) {
            return Err(S3ConfigError::UnknownParam(k.to_owned()));
        }
        let v = percent_decode(v).ok_or_else(|| S3ConfigError::Encoding(k.to_owned()))?;
        params.push((k.to_owned(), v));
    }
    Ok(S3Location::new(url, bucket.trim_end_matches('/'), &params)?)
}

/// The upstream's credentials: both files, else exactly `ferry_s3::resolve_credentials`
/// (the `AWS_*` variables, then the shared credentials file's profile: `profile=`,
/// `AWS_PROFILE` or `default`). `env` is the process environment outside tests.
pub(crate) fn credentials(
    loc: &S3Location,
    access_key_id_file: Option<&Path>,
    secret_access_key_file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Credentials, S3ConfigError> {
    match (access_key_id_file, secret_access_key_file) {
        (Some(_), None) => {
            return Err(S3ConfigError::HalfFiles {
                set: "access-key-id-file",
                missing: "secret-access-key-file",
            });
        }
        (None, Some(_)) => {
            return Err(S3ConfigError::HalfFiles {
                set: "secret-access-key-file",
                missing: "access-key-id-file",
            });
        }
        _ => {}
    }
    Ok(ferry_s3::resolve_credentials(
        &CredentialSources {
            access_key_id_file,
            secret_access_key_file,
            env,
        },
        loc.profile.as_deref(),
    )?)
}

/// The request path of `key` (a key as Nix asked Ferry for it: percent-encoded, possibly with
/// a query) in the bucket, or `None` when the key is not safe ([`crate::paths::is_safe_key`]:
/// no dot segments, no encoded separators) and no request may be sent. The object key is the
/// decoded key, query included, as Nix's S3 store takes a narinfo's `URL:` as the key itself.
pub(crate) fn object_path(loc: &S3Location, key: &str) -> Option<String> {
    if !crate::paths::is_safe_key(key) {
        return None;
    }
    let object = percent_decode(key)?;
    let path = loc.object_path(&object);
    // By construction (safe segments, every byte but the unreserved ones and '/' encoded):
    // checked anyway, as for HTTP upstreams, because a mistake here sends signed requests
    // elsewhere in the account.
    let prefix = loc.object_path("");
    let rest = path.strip_prefix(&prefix)?;
    let stays = !rest.is_empty()
        && rest
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
    stays.then_some(path)
}

/// The signed headers of a `method` (GET or HEAD) request for `path`, at `now`. A `Range`
/// header may be added: it is not signed (S3 does not require it to be).
pub(crate) fn request_headers(
    loc: &S3Location,
    creds: &Credentials,
    method: &str,
    path: &str,
    now: SystemTime,
) -> Vec<(&'static str, String)> {
    ferry_s3::s3_headers(
        loc,
        creds,
        &S3Request {
            method,
            path,
            query: &[],
            content_type: None,
            content_md5: None,
            payload_sha256: EMPTY_SHA256,
        },
        now,
    )
}

/// The S3 error codes of a 403 that refuse the request itself (credentials, signature, clock),
/// as opposed to `AccessDenied`, which S3 also answers for a missing key.
const REFUSALS: [&str; 6] = [
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "ExpiredToken",
    "InvalidToken",
    "RequestTimeTooSkewed",
    "AuthorizationHeaderMalformed",
];

/// The error code of a 403 body when it refuses the credentials (never a miss).
pub(crate) fn refusal(body: &str) -> Option<String> {
    ferry_s3::error_code(body).filter(|c| REFUSALS.contains(&c.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn garage() -> S3Location {
        parse_url("s3://nix-cache?endpoint=http://10.0.0.5:3900&region=garage").expect("url")
    }

    #[test]
    fn urls_as_nix_writes_them() {
        let l = garage();
        assert_eq!(
            (
                l.bucket.as_str(),
                l.region.as_str(),
                l.base.as_str(),
                l.path_style
            ),
            ("nix-cache", "garage", "http://10.0.0.5:3900", true)
        );
        let l = parse_url("s3://nix-cache?endpoint=minio.lan%3A9000&scheme=http&profile=ci")
            .expect("encoded");
        assert_eq!(l.base, "http://minio.lan:9000");
        assert_eq!(l.profile.as_deref(), Some("ci"));
        let aws = parse_url("s3://nix-cache").expect("aws");
        assert_eq!(aws.base, "https://nix-cache.s3.us-east-1.amazonaws.com");
        assert!(!aws.path_style);
        for (bad, what) in [
            ("s3://", "no bucket"),
            ("s3://Bucket", "bad bucket"),
            ("s3://b12?endpont=http://h", "unknown parameter"),
            (
                "s3://b12?endpoint=http://h&compression=xz",
                "unknown parameter",
            ),
            ("s3://b12?scheme=ftp", "scheme"),
            ("s3://b12?endpoint=h%zz", "percent-encoding"),
            ("s3://id:secret@b12", "credentials do not go"),
        ] {
            let e = parse_url(bad).expect_err(bad).to_string();
            assert!(e.contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn object_paths_stay_in_the_bucket() {
        let l = garage();
        assert_eq!(
            object_path(&l, "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig.narinfo").as_deref(),
            Some("/nix-cache/0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig.narinfo")
        );
        assert_eq!(
            object_path(&l, "nar/x.nar?hash=1").as_deref(),
            Some("/nix-cache/nar/x.nar%3Fhash%3D1")
        );
        // An escape in the request is the byte in the object key (encoded once again).
        assert_eq!(
            object_path(&l, "log/a%20b.drv").as_deref(),
            Some("/nix-cache/log/a%20b.drv")
        );
        for bad in [
            "nar/../x",
            "nar/%2e%2e/%2e%2e/other-bucket/x",
            "nar/a%2fb",
            "../other/x",
            "nar//x",
            "",
        ] {
            assert_eq!(object_path(&l, bad), None, "{bad}");
        }
        let aws = parse_url("s3://nix-cache?region=eu-west-1").expect("aws");
        assert_eq!(
            object_path(&aws, "nix-cache-info").as_deref(),
            Some("/nix-cache-info")
        );
    }

    /// A narinfo GET as Ferry sends it, at a fixed time: the signature is deterministic.
    /// The expected `Authorization` was computed with botocore's `S3SigV4Auth` for the same
    /// request (`GET http://10.0.0.5:3900/nix-cache/<hash>.narinfo`, region garage).
    #[test]
    fn narinfo_get_is_signed() {
        let l = garage();
        let creds = Credentials {
            access_key_id: "GKexample".into(),
            secret_access_key: "secret-example".into(),
            session_token: None,
        };
        let path = object_path(&l, "0c5bkdzpsq0kbl4wbamr6aa1g4jxv0ig.narinfo").expect("path");
        let t = UNIX_EPOCH + Duration::from_secs(1_767_225_600); // 2026-01-01T00:00:00Z
        let h = request_headers(&l, &creds, "GET", &path, t);
        let get = |k: &str| {
            h.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.as_str())
                .expect(k)
        };
        assert_eq!(get("x-amz-content-sha256"), EMPTY_SHA256);
        assert_eq!(get("x-amz-date"), "20260101T000000Z");
        assert_eq!(get("authorization"), EXPECTED_AUTH);
        assert!(!format!("{h:?}").contains("secret-example"));
        // HEAD signs differently.
        let head = request_headers(&l, &creds, "HEAD", &path, t);
        assert_ne!(head, h);
    }

    const EXPECTED_AUTH: &str = "AWS4-HMAC-SHA256 Credential=GKexample/20260101/garage/s3/aws4_request, \
         SignedHeaders=host;x-amz-content-sha256;x-amz-date, \
         Signature=0c8ff8c36ebc005867f7321bceff5f2f982d8694b540a33486c10f53d6009db2";

    #[test]
    fn refusals_are_not_misses() {
        let body = |c: &str| format!("<?xml version=\"1.0\"?><Error><Code>{c}</Code></Error>");
        assert_eq!(
            refusal(&body("SignatureDoesNotMatch")).as_deref(),
            Some("SignatureDoesNotMatch")
        );
        assert_eq!(
            refusal(&body("InvalidAccessKeyId")).as_deref(),
            Some("InvalidAccessKeyId")
        );
        assert_eq!(refusal(&body("AccessDenied")), None);
        assert_eq!(refusal(""), None);
    }

    #[test]
    fn credentials_from_files_or_a_clear_error() {
        let d = tempfile::tempdir().expect("dir");
        let id = d.path().join("id");
        let secret = d.path().join("secret");
        std::fs::write(&id, "GKfile\n").expect("w");
        std::fs::write(&secret, "file-secret\n").expect("w");
        let no_env = |_: &str| None;
        let l = garage();
        let c = credentials(&l, Some(&id), Some(&secret), &no_env).expect("files");
        assert_eq!(c.access_key_id, "GKfile");
        let e = credentials(&l, Some(&id), None, &no_env).expect_err("half");
        assert!(
            e.to_string()
                .starts_with("access-key-id-file is set but secret-access-key-file is not"),
            "{e}"
        );
        let e = credentials(&l, None, Some(&secret), &no_env).expect_err("half");
        assert!(e.to_string().contains("access-key-id-file is not"), "{e}");
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("GKenv".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("env-secret".to_owned()),
            _ => None,
        };
        assert_eq!(
            credentials(&l, None, None, &env)
                .expect("env")
                .access_key_id,
            "GKenv"
        );
        let nothing = |k: &str| (k == "HOME").then(|| d.path().join("none").display().to_string());
        let e = credentials(&l, None, None, &nothing).expect_err("none");
        assert!(e.to_string().contains("no S3 credentials"), "{e}");
    }
}
