//! Credentials in URLs: `scheme://user:password@host/…` is how Nix users write a binary cache
//! or upload target with Basic credentials, and such a URL must never reach a log, a metric or
//! a status page as written (issue 12 item 7). Shared by the substituter (upstreams) and the
//! uploader (targets).

/// `(scheme://, userinfo, host[:port], rest)` of a URL with an authority; `None` without
/// `://`. The userinfo ends at the last `@` before the path, as RFC 3986 has it (a password
/// may itself contain `@` only percent-encoded, but real URLs break that rule).
pub fn split_authority(url: &str) -> Option<(&str, Option<&str>, &str, &str)> {
    let scheme_end = url.find("://")? + 3;
    let (scheme, after) = url.split_at(scheme_end);
    let auth_end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(auth_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => Some((scheme, Some(userinfo), host, rest)),
        None => Some((scheme, None, authority, rest)),
    }
}

/// `url` with any `user:password@` replaced by `***@`, for logs, metrics and status output.
pub fn redact(url: &str) -> String {
    match split_authority(url) {
        Some((scheme, Some(_), host, rest)) => format!("{scheme}***@{host}{rest}"),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_redacted_and_the_rest_kept() {
        assert_eq!(
            redact("https://alice:secret@cache.lan/base?x=1"),
            "https://***@cache.lan/base?x=1"
        );
        assert_eq!(redact("https://tok@h"), "https://***@h");
        // The `@` of a path or query is not userinfo.
        assert_eq!(redact("http://h:1/x@y?z=@"), "http://h:1/x@y?z=@");
        assert_eq!(redact("file:///var/cache"), "file:///var/cache");
        assert_eq!(redact("no scheme"), "no scheme");
        assert_eq!(
            split_authority("s3://b?endpoint=e"),
            Some(("s3://", None, "b", "?endpoint=e"))
        );
    }
}
