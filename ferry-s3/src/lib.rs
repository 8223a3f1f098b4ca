//! `s3://` targets: Nix's S3 URL parameters, AWS Signature Version 4, credentials.
//!
//! The URL follows Nix's `S3BinaryCacheStore` (`s3-binary-cache-store.cc`, Nix 2.8):
//! `s3://BUCKET?region=…&endpoint=…&scheme=…&profile=…`. With `endpoint` the requests go
//! path-style to `<scheme>://<endpoint>/<bucket>/<key>` (Nix passes `useVirtualAddressing =
//! endpoint.empty()` to aws-sdk-cpp), which is what MinIO, Ceph, Garage and moto expect;
//! without it they go virtual-hosted to `https://<bucket>.s3.<region>.amazonaws.com/<key>`.
//!
//! Signing follows the AWS SigV4 specification ("Create a signed AWS API request"; for S3,
//! "Authenticating Requests: Using the Authorization Header"): a canonical request, a string
//! to sign, a key derived by HMAC-SHA256 chaining from the secret, and an `Authorization`
//! header. S3 also requires `x-amz-content-sha256`; Ferry always sends the real payload
//! hash (for NARs it is the FileHash it computed anyway), never `UNSIGNED-PAYLOAD`.
//!
//! Multipart uploads (plans, S3's XML answers, ETags) are in [`multipart`].
//!
//! Secrets come from files named in the config, the standard `AWS_*` environment variables
//! or the shared credentials file; they are never logged (`Credentials`' `Debug` hides them).

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;

pub mod multipart;

type HmacSha256 = hmac::Hmac<Sha256>;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum S3UrlError {
    #[error("{0}: no bucket name")]
    NoBucket(String),
    #[error("{url}: bad bucket name {bucket:?} (3–63 characters: a-z, 0-9, '.', '-')")]
    BadBucket { url: String, bucket: String },
    #[error("{url}: scheme={scheme:?} (use http or https)")]
    BadScheme { url: String, scheme: String },
    #[error("{url}: bad endpoint {endpoint:?}")]
    BadEndpoint { url: String, endpoint: String },
}

/// Where the objects of an `s3://` target live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    pub region: String,
    /// `scheme://host[:port]`, without a default port, without a trailing slash.
    pub base: String,
    /// The `Host` header value (what is signed): `host[:port]`.
    pub host: String,
    /// Path-style (`/<bucket>/<key>`) or virtual-hosted (`/<key>` on `<bucket>.s3…`).
    pub path_style: bool,
    /// Shared-credentials profile (`profile=`), if given.
    pub profile: Option<String>,
}

impl S3Location {
    /// From the bucket and the URL's S3 parameters (`region`, `endpoint`, `scheme`,
    /// `profile`); `url` is only for messages.
    pub fn new(
        url: &str,
        bucket: &str,
        params: &[(String, String)],
    ) -> Result<S3Location, S3UrlError> {
        let get = |k: &str| {
            params
                .iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        if bucket.is_empty() {
            return Err(S3UrlError::NoBucket(url.to_owned()));
        }
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            return Err(S3UrlError::BadBucket {
                url: url.to_owned(),
                bucket: bucket.to_owned(),
            });
        }
        // aws-sdk-cpp's default region, which Nix 2.8 keeps (`region` defaults to us-east-1).
        let region = get("region")
            .filter(|r| !r.is_empty())
            .unwrap_or("us-east-1")
            .to_owned();
        let scheme = get("scheme").filter(|s| !s.is_empty()).unwrap_or("https");
        if scheme != "http" && scheme != "https" {
            return Err(S3UrlError::BadScheme {
                url: url.to_owned(),
                scheme: scheme.to_owned(),
            });
        }
        let profile = get("profile").filter(|p| !p.is_empty()).map(str::to_owned);
        let (base_scheme, authority, path_style) = match get("endpoint").filter(|e| !e.is_empty()) {
            Some(ep) => {
                // An endpoint with its own scheme wins over `scheme=` (as in aws-sdk-cpp).
                let (s, rest) = match ep.split_once("://") {
                    Some((s, rest)) => (s, rest),
                    None => (scheme, ep),
                };
                let authority = rest.trim_end_matches('/');
                let bad = || S3UrlError::BadEndpoint {
                    url: url.to_owned(),
                    endpoint: ep.to_owned(),
                };
                if (s != "http" && s != "https")
                    || authority.is_empty()
                    || authority.contains(['/', '?', '#', '@', ' '])
                {
                    return Err(bad());
                }
                (s.to_owned(), authority.to_owned(), true)
            }
            // Bucket names with dots do not match the `*.s3…` certificate: path-style then.
            None if bucket.contains('.') => (
                scheme.to_owned(),
                format!("s3.{region}.amazonaws.com"),
                true,
            ),
            None => (
                scheme.to_owned(),
                format!("{bucket}.s3.{region}.amazonaws.com"),
                false,
            ),
        };
        // The URL parser drops a default port and hyper then sends `Host` without it: sign
        // exactly that.
        let host = match (base_scheme.as_str(), authority.rsplit_once(':')) {
            ("http", Some((h, "80"))) | ("https", Some((h, "443"))) => h.to_owned(),
            _ => authority,
        };
        Ok(S3Location {
            bucket: bucket.to_owned(),
            region,
            base: format!("{base_scheme}://{host}"),
            host,
            path_style,
            profile,
        })
    }

    /// The canonical (URI-encoded) path of `key` — also the request path.
    pub fn object_path(&self, key: &str) -> String {
        let key = uri_encode(key, false);
        if self.path_style {
            format!("/{}/{key}", uri_encode(&self.bucket, true))
        } else {
            format!("/{key}")
        }
    }

    /// The path of the bucket itself (for creating it).
    pub fn bucket_path(&self) -> String {
        if self.path_style {
            format!("/{}", uri_encode(&self.bucket, true))
        } else {
            "/".to_owned()
        }
    }
}

/// AWS credentials. `Debug` never shows the secret or the session token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<hidden>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

#[derive(Debug, Error)]
pub enum CredentialsError {
    /// Names the file, never its contents.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is empty")]
    Empty(PathBuf),
    #[error("access-key-id-file and secret-access-key-file must be set together")]
    Half,
    #[error("profile {profile:?} not found (or incomplete) in {path}")]
    NoProfile { profile: String, path: PathBuf },
    #[error(
        "no S3 credentials: set access-key-id-file and secret-access-key-file, \
         or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in {0}"
    )]
    None(String),
}

/// Where credentials may come from; `env` and `home` are parameters so that the order is
/// testable without touching the process environment.
pub struct CredentialSources<'a> {
    pub access_key_id_file: Option<&'a Path>,
    pub secret_access_key_file: Option<&'a Path>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

fn read_secret_file(path: &Path) -> Result<String, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Err(CredentialsError::Empty(path.to_owned()));
    }
    Ok(text)
}

/// The shared credentials file: `AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`.
fn shared_credentials_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(p) = env("AWS_SHARED_CREDENTIALS_FILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    env("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| Path::new(&h).join(".aws/credentials"))
}

/// Reads `[profile]` from an AWS shared credentials file (INI: `key = value`, `#`/`;`
/// comments).
pub fn parse_profile(text: &str, profile: &str) -> Option<Credentials> {
    let mut in_section = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = name.trim() == profile;
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_owned();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    Some(Credentials {
        access_key_id: id.filter(|s| !s.is_empty())?,
        secret_access_key: secret.filter(|s| !s.is_empty())?,
        session_token: token.filter(|s| !s.is_empty()),
    })
}

/// Credentials for a target: the config's files; else with `profile=` that profile of the
/// shared credentials file (as Nix uses aws-sdk-cpp's profile provider then); else the
/// environment variables, then the shared file's `AWS_PROFILE` or `default` profile (the
/// front of aws-sdk-cpp's default chain, which Nix uses without `profile=`).
pub fn resolve_credentials(
    src: &CredentialSources<'_>,
    profile: Option<&str>,
) -> Result<Credentials, CredentialsError> {
    let env = src.env;
    match (src.access_key_id_file, src.secret_access_key_file) {
        (Some(id), Some(secret)) => {
            return Ok(Credentials {
                access_key_id: read_secret_file(id)?,
                secret_access_key: read_secret_file(secret)?,
                session_token: None,
            });
        }
        (None, None) => {}
        _ => return Err(CredentialsError::Half),
    }
    let shared = shared_credentials_path(env);
    let from_file = |name: &str| -> Result<Option<Credentials>, CredentialsError> {
        let Some(path) = &shared else { return Ok(None) };
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(parse_profile(&text, name)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CredentialsError::Read {
                path: path.clone(),
                source,
            }),
        }
    };
    if let Some(p) = profile {
        return from_file(p)?.ok_or_else(|| CredentialsError::NoProfile {
            profile: p.to_owned(),
            path: shared
                .clone()
                .unwrap_or_else(|| PathBuf::from("~/.aws/credentials")),
        });
    }
    if let (Some(id), Some(secret)) = (
        env("AWS_ACCESS_KEY_ID").filter(|s| !s.is_empty()),
        env("AWS_SECRET_ACCESS_KEY").filter(|s| !s.is_empty()),
    ) {
        return Ok(Credentials {
            access_key_id: id,
            secret_access_key: secret,
            session_token: env("AWS_SESSION_TOKEN").filter(|s| !s.is_empty()),
        });
    }
    let name = env("AWS_PROFILE")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "default".into());
    from_file(&name)?.ok_or_else(|| {
        CredentialsError::None(
            shared
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "~/.aws/credentials".into()),
        )
    })
}

/// RFC 3986 percent-encoding of everything but the unreserved characters, as SigV4
/// requires; `/` is kept unless `encode_slash` (S3 object keys keep it: S3 does not
/// double-encode paths).
pub fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

/// `YYYYMMDDTHHMMSSZ` (UTC) for `x-amz-date`.
pub fn amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d, hh, mm, ss) = ferry_nix::civil::utc(secs);
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

/// One request to sign. Header names may be in any case; values are trimmed and inner
/// runs of spaces collapsed, as the canonical form requires.
pub struct SignRequest<'a> {
    pub method: &'a str,
    /// Already URI-encoded path (`/bucket/key`).
    pub canonical_uri: &'a str,
    /// Decoded query parameters.
    pub query: &'a [(&'a str, &'a str)],
    /// Headers to sign; must include `host` and `x-amz-date`.
    pub headers: &'a [(&'a str, &'a str)],
    /// Hex SHA-256 of the body (or `UNSIGNED-PAYLOAD`).
    pub payload_sha256: &'a str,
}

pub struct Signed {
    pub canonical_request: String,
    pub string_to_sign: String,
    pub signature: String,
    pub authorization: String,
}

/// SigV4: canonical request → string to sign → signature. `amz_date` must equal the
/// `x-amz-date` header.
pub fn sign(
    req: &SignRequest<'_>,
    creds: &Credentials,
    amz_date: &str,
    region: &str,
    service: &str,
) -> Signed {
    let canonical_query = canonical_query(req.query);
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "{}\n{}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{}",
        req.method, req.canonical_uri, req.payload_sha256
    );
    let date = &amz_date[..amz_date.len().min(8)];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let k_date = hmac(
        format!("AWS4{}", creds.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let signature = hex(&hmac(&k_signing, string_to_sign.as_bytes()));
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        creds.access_key_id
    );
    Signed {
        canonical_request,
        string_to_sign,
        signature,
        authorization,
    }
}

/// One S3 request as it is signed: what [`s3_headers`] needs besides the location and the
/// credentials.
pub struct S3Request<'a> {
    pub method: &'a str,
    /// Already URI-encoded path ([`S3Location::object_path`] or [`S3Location::bucket_path`]).
    pub path: &'a str,
    /// Decoded query parameters (`uploads`, `partNumber`, `uploadId`…).
    pub query: &'a [(&'a str, &'a str)],
    pub content_type: Option<&'a str>,
    /// Base64 MD5 of the body: S3 refuses a body that does not match it (`BadDigest`).
    pub content_md5: Option<&'a str>,
    /// Hex SHA-256 of the body: S3 refuses a body that does not match it either.
    pub payload_sha256: &'a str,
}

impl S3Request<'_> {
    /// `path` plus the query string, encoded exactly as it was signed.
    pub fn path_and_query(&self) -> String {
        let q = canonical_query(self.query);
        if q.is_empty() {
            self.path.to_owned()
        } else {
            format!("{}?{q}", self.path)
        }
    }
}

/// The sorted, encoded query string of SigV4's canonical request (also the one sent).
pub fn canonical_query(query: &[(&str, &str)]) -> String {
    let mut query: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, true), uri_encode(v, true)))
        .collect();
    query.sort();
    query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The headers of a signed S3 request: `x-amz-date`, `x-amz-content-sha256`, the session
/// token if any, `Content-MD5` if given, and `Authorization` (the caller adds the body's
/// `Content-Length`, and the `Content-Type` it passed here).
pub fn s3_headers(
    loc: &S3Location,
    creds: &Credentials,
    req: &S3Request<'_>,
    now: SystemTime,
) -> Vec<(&'static str, String)> {
    let date = amz_date(now);
    let mut to_sign: Vec<(&str, &str)> = vec![
        ("host", &loc.host),
        ("x-amz-content-sha256", req.payload_sha256),
        ("x-amz-date", &date),
    ];
    if let Some(t) = &creds.session_token {
        to_sign.push(("x-amz-security-token", t));
    }
    if let Some(ct) = req.content_type {
        to_sign.push(("content-type", ct));
    }
    if let Some(md5) = req.content_md5 {
        to_sign.push(("content-md5", md5));
    }
    let signed = sign(
        &SignRequest {
            method: req.method,
            canonical_uri: req.path,
            query: req.query,
            headers: &to_sign,
            payload_sha256: req.payload_sha256,
        },
        creds,
        &date,
        &loc.region,
        "s3",
    );
    let mut out = vec![
        ("x-amz-content-sha256", req.payload_sha256.to_owned()),
        ("x-amz-date", date.clone()),
        ("authorization", signed.authorization),
    ];
    if let Some(t) = &creds.session_token {
        out.push(("x-amz-security-token", t.clone()));
    }
    if let Some(md5) = req.content_md5 {
        out.push(("content-md5", md5.to_owned()));
    }
    out
}

/// The `<Code>` of an S3 XML error body (`SignatureDoesNotMatch`, `NoSuchBucket`,
/// `SlowDown`…), for error messages.
pub fn error_code(body: &str) -> Option<String> {
    let start = body.find("<Code>")? + "<Code>".len();
    let len = body[start..].find("</Code>")?;
    let code = body[start..start + len].trim();
    (!code.is_empty() && code.len() < 100).then(|| code.to_owned())
}

#[cfg(test)]
mod tests;
