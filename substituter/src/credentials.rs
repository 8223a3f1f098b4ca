//! Upstream credentials: taken out of `user:password@` URLs or read from a netrc file, never
//! shown again.
//!
//! Nix itself reads credentials for binary caches from `netrc-file` (curl's `CURLOPT_NETRC`,
//! <https://github.com/NixOS/nix/blob/2.8.0/src/libstore/filetransfer.cc#L306-L307>), so a
//! netrc file is the form users already have. A URL with `user:password@` still works, but the
//! URL Ferry logs, exports in `/metrics` and shows on the status page is the redacted one.

/// Basic credentials for one upstream. `Debug` never prints the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub(crate) user: String,
    pub(crate) password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// Shared with the uploader through ferry-nix.
pub(crate) use ferry_nix::url::redact;
use ferry_nix::url::split_authority;

/// Decodes `%XX` escapes (RFC 3986 userinfo); invalid escapes are kept as they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (
                (b[i + 1] as char).to_digit(16),
                (b[i + 2] as char).to_digit(16),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL without `user:password@`, and the credentials it carried.
pub(crate) fn split_credentials(url: &str) -> (String, Option<Credentials>) {
    match split_authority(url) {
        Some((scheme, Some(userinfo), host, rest)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (
                format!("{scheme}{host}{rest}"),
                Some(Credentials {
                    user: percent_decode(user),
                    password: percent_decode(password),
                }),
            )
        }
        _ => (url.to_owned(), None),
    }
}

/// The host of an http(s) URL without port and userinfo (what netrc's `machine` names).
pub(crate) fn host_of(url: &str) -> Option<&str> {
    let (_, _, host, _) = split_authority(url)?;
    if let Some(v6) = host.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h);
    }
    Some(host.rsplit_once(':').map_or(host, |(h, _)| h))
}

/// One `machine` (or `default`) entry of a netrc file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetrcEntry {
    /// None for `default`.
    machine: Option<String>,
    credentials: Credentials,
}

/// A parsed netrc file (the format of curl and ftp: whitespace-separated tokens `machine`,
/// `login`, `password`, `default`; `macdef` bodies are skipped to the next blank line).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Netrc {
    entries: Vec<NetrcEntry>,
}

impl Netrc {
    pub(crate) fn parse(text: &str) -> Netrc {
        let mut entries: Vec<NetrcEntry> = Vec::new();
        let mut cur: Option<NetrcEntry> = None;
        let mut lines = text.lines();
        let mut pending: Vec<String> = Vec::new();
        loop {
            if pending.is_empty() {
                let Some(line) = lines.next() else { break };
                pending = line.split_whitespace().rev().map(str::to_owned).collect();
                continue;
            }
            let Some(tok) = pending.pop() else { continue };
            match tok.as_str() {
                "machine" | "default" => {
                    entries.extend(cur.take());
                    let machine = if tok == "machine" {
                        match pending.pop() {
                            Some(m) => Some(m),
                            None => lines
                                .next()
                                .and_then(|l| l.split_whitespace().next().map(str::to_owned)),
                        }
                    } else {
                        None
                    };
                    cur = Some(NetrcEntry {
                        machine,
                        credentials: Credentials {
                            user: String::new(),
                            password: String::new(),
                        },
                    });
                }
                "login" | "password" => {
                    let v = pending.pop().unwrap_or_default();
                    if let Some(e) = &mut cur {
                        if tok == "login" {
                            e.credentials.user = v;
                        } else {
                            e.credentials.password = v;
                        }
                    }
                }
                "macdef" => {
                    pending.clear();
                    for l in lines.by_ref() {
                        if l.trim().is_empty() {
                            break;
                        }
                    }
                }
                _ => {}
            }
        }
        entries.extend(cur);
        Netrc { entries }
    }

    /// The credentials for `host`: its `machine` entry, else `default` (curl's rule).
    pub(crate) fn lookup(&self, host: &str) -> Option<Credentials> {
        self.entries
            .iter()
            .find(|e| e.machine.as_deref() == Some(host))
            .or_else(|| self.entries.iter().find(|e| e.machine.is_none()))
            .map(|e| e.credentials.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url() {
        let (url, c) = split_credentials("https://alice:s%40cret@cache.lan:8443/base");
        assert_eq!(url, "https://cache.lan:8443/base");
        let c = c.expect("credentials");
        assert_eq!((c.user.as_str(), c.password.as_str()), ("alice", "s@cret"));
        assert_eq!(format!("{c:?}"), "Credentials(<redacted>)");
        assert_eq!(split_credentials("http://h:1/x").1, None);
        assert_eq!(
            redact("https://alice:secret@cache.lan/base"),
            "https://***@cache.lan/base"
        );
        assert_eq!(redact("http://h:1/x"), "http://h:1/x");
        assert_eq!(host_of("http://u:p@h.lan:80/x"), Some("h.lan"));
        assert_eq!(host_of("http://[::1]:80/x"), Some("::1"));
    }

    #[test]
    fn netrc_entries_and_default() {
        let n = Netrc::parse(
            "machine a.lan login alice password one\n\
             macdef init\ncd /\n\n\
             machine b.lan\n  login bob\n  password two\ndefault login anon password three\n",
        );
        let get = |h| n.lookup(h).map(|c| (c.user, c.password));
        assert_eq!(get("a.lan"), Some(("alice".into(), "one".into())));
        assert_eq!(get("b.lan"), Some(("bob".into(), "two".into())));
        assert_eq!(get("c.lan"), Some(("anon".into(), "three".into())));
        assert_eq!(
            Netrc::parse("machine x login y password z").lookup("q"),
            None
        );
    }
}
