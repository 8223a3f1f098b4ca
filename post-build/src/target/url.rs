//! Target URLs taken apart: `file://`, `http(s)://`, `s3://` and Nix's store parameters.

use super::TargetError;
use crate::compress::Compression;
use crate::s3::S3Location;
use ferry_nix::url::redact;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetUrl {
    File(PathBuf),
    /// Base URL without a trailing slash.
    Http(String),
    S3(S3Location),
}

/// A target URL taken apart: where, and the per-target store parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUrl {
    pub location: TargetUrl,
    /// `?compression=`; `None` means the configured default.
    pub(crate) compression: Option<Compression>,
}

/// Percent-decoding of a URL query value (Nix decodes its store URL parameters).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Parses a target URL. Unknown parameters are refused rather than ignored: a typo in
/// `endpoint` must not send the cache to AWS.
pub fn parse_url(url: &str) -> Result<ParsedUrl, TargetError> {
    let bad = || TargetError::BadUrl(redact(url));
    let bad_param = |message: String| TargetError::BadParam {
        url: redact(url),
        message,
    };
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut params = Vec::new();
    for kv in query
        .unwrap_or_default()
        .split('&')
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v =
            percent_decode(v).ok_or_else(|| bad_param(format!("bad percent-encoding in {k}")))?;
        params.push((k.to_owned(), v));
    }
    let is_s3 = base.starts_with("s3://");
    let mut compression = None;
    for (k, v) in &params {
        match k.as_str() {
            "compression" => {
                compression =
                    Some(Compression::from_name(v).ok_or_else(|| {
                        bad_param(format!("compression={v} (use zstd, xz or none)"))
                    })?)
            }
            "endpoint" | "region" | "scheme" | "profile" if is_s3 => {}
            _ => {
                let known = if is_s3 {
                    "compression, endpoint, region, scheme, profile"
                } else {
                    "compression"
                };
                return Err(bad_param(format!(
                    "unknown parameter {k:?} (known: {known})"
                )));
            }
        }
    }
    let location = if let Some(rest) = base.strip_prefix("file://") {
        // Only slashes (`file:////`) would be the empty path: the current directory.
        let dir = rest.trim_end_matches('/');
        if !rest.starts_with('/') || dir.is_empty() {
            return Err(bad());
        }
        TargetUrl::File(PathBuf::from(dir))
    } else if base.starts_with("http://") || base.starts_with("https://") {
        let trimmed = base.trim_end_matches('/');
        if trimmed.split("://").nth(1).is_none_or(|h| h.is_empty()) {
            return Err(bad());
        }
        TargetUrl::Http(trimmed.to_owned())
    } else if let Some(bucket) = base.strip_prefix("s3://") {
        let bucket = bucket.trim_end_matches('/');
        TargetUrl::S3(S3Location::new(url, bucket, &params).map_err(|source| {
            TargetError::S3Url {
                url: redact(url),
                source,
            }
        })?)
    } else {
        return Err(bad());
    };
    Ok(ParsedUrl {
        location,
        compression,
    })
}
