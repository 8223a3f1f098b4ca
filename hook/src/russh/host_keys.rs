//! Who a builder is and which keys it may show: the `user@host[:port]` of its URI, the host
//! keys it is allowed to present (the machines file's 8th field, else known_hosts), and the
//! identity file to log in with.

use super::RusshError;
use ::russh::Preferred;
use ::russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};
use std::path::{Path, PathBuf};

/// `user@host[:port]` of an `ssh://` URI. The user defaults to the hook's own user, as with
/// `ssh`; the port to 22. `[v6addr]:port` and bare `v6addr` are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) user: String,
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl Target {
    pub(crate) fn parse(spec: &str, default_user: &str) -> Result<Target, RusshError> {
        let (user, rest) = match spec.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (u.to_owned(), r),
            Some((_, r)) => (default_user.to_owned(), r),
            None => (default_user.to_owned(), spec),
        };
        let bad = || RusshError::BadPort {
            target: spec.to_owned(),
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(p) => (h, p.parse().map_err(|_| bad())?),
                None if after.is_empty() => (h, 22),
                None => return Err(bad()),
            }
        } else if rest.matches(':').count() == 1 {
            let (h, p) = rest.split_once(':').ok_or_else(bad)?;
            (h, p.parse().map_err(|_| bad())?)
        } else {
            (rest, 22)
        };
        if host.is_empty() {
            return Err(RusshError::NoHost {
                uri: spec.to_owned(),
            });
        }
        Ok(Target {
            user,
            host: host.to_owned(),
            port,
        })
    }

    /// The name known_hosts files use: `host`, or `[host]:port` off port 22.
    pub(crate) fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }
}

/// Which server keys are accepted, decided before connecting.
#[derive(Debug, Clone)]
pub(crate) enum HostKeyPolicy {
    /// The machines file's 8th field: only these keys.
    Pinned(Vec<PublicKey>),
    /// Entries for the host in known_hosts files: `(file, line, key)`, plus the files read.
    Known {
        entries: Vec<(PathBuf, usize, PublicKey)>,
        files: Vec<PathBuf>,
    },
}

/// The keys in the 8th field's decoded text: an OpenSSH `.pub` line (`type base64 comment`),
/// possibly several lines, possibly prefixed with host names as in known_hosts.
pub(crate) fn pinned_keys(decoded: &str) -> Result<Vec<PublicKey>, RusshError> {
    let keys: Vec<PublicKey> = decoded
        .split_whitespace()
        .filter(|w| w.starts_with("AAAA"))
        .filter_map(|w| ::russh::keys::parse_public_key_base64(w).ok())
        .collect();
    if keys.is_empty() {
        return Err(RusshError::HostKey(format!(
            "the machines file's host key field (8th) holds no public host key I can read: '{}'",
            decoded.trim()
        )));
    }
    Ok(keys)
}

/// The known_hosts entries for `target` in `files` (missing files are skipped; an entry
/// that does not parse is an error naming its file).
pub(crate) fn known_entries(
    target: &Target,
    files: &[PathBuf],
) -> Result<HostKeyPolicy, RusshError> {
    let mut entries = Vec::new();
    for f in files {
        let found = ::russh::keys::known_hosts::known_host_keys_path(&target.host, target.port, f)
            .map_err(|e| {
                RusshError::HostKey(format!(
                    "cannot read the host keys for {} in {}: {e}",
                    target.known_hosts_name(),
                    f.display()
                ))
            })?;
        let text = std::fs::read_to_string(f).unwrap_or_default();
        entries.extend(
            found
                .into_iter()
                .map(|(n, k)| (f.clone(), file_line(&text, n), k)),
        );
    }
    Ok(HostKeyPolicy::Known {
        entries,
        files: files.to_vec(),
    })
}

/// The file line of russh's `n`th entry: russh numbers only the lines that are not
/// comments (`#` first), so a file with comments would be misquoted.
fn file_line(text: &str, n: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.starts_with('#'))
        .nth(n.saturating_sub(1))
        .map_or(n, |(i, _)| i + 1)
}

fn describe(k: &PublicKey) -> String {
    format!("{} {}", k.algorithm(), k.fingerprint(HashAlg::Sha256))
}

impl HostKeyPolicy {
    /// Accepts `offered` or says why not (every message contains "host key").
    pub(crate) fn check(&self, target: &Target, offered: &PublicKey) -> Result<(), String> {
        let name = target.known_hosts_name();
        match self {
            HostKeyPolicy::Pinned(keys) => {
                if keys.iter().any(|k| k.key_data() == offered.key_data()) {
                    return Ok(());
                }
                let pinned: Vec<String> = keys.iter().map(describe).collect();
                Err(format!(
                    "host key mismatch for {name}: the builder offers {}, the machines file pins {}",
                    describe(offered),
                    pinned.join(", ")
                ))
            }
            HostKeyPolicy::Known { entries, files } => {
                if entries
                    .iter()
                    .any(|(_, _, k)| k.key_data() == offered.key_data())
                {
                    return Ok(());
                }
                if let Some((f, line, _)) = entries
                    .iter()
                    .find(|(_, _, k)| k.algorithm().as_str() == offered.algorithm().as_str())
                {
                    return Err(format!(
                        "host key for {name} has CHANGED: the builder offers {}, {} line {line} has another key (remove that line if the change is expected)",
                        describe(offered),
                        f.display()
                    ));
                }
                let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                Err(format!(
                    "host key for {name} is not known: the builder offers {}, which is not in {}; pin it in the machines file's 8th field or add it to known_hosts",
                    describe(offered),
                    files.join(" or ")
                ))
            }
        }
    }

    /// Host-key algorithms to ask for, known ones first (as OpenSSH orders
    /// `HostKeyAlgorithms` by the keys it already has for the host), so a server with several
    /// keys presents one we can check.
    pub(crate) fn preferred_algorithms(&self) -> Vec<Algorithm> {
        let known: Vec<&PublicKey> = match self {
            HostKeyPolicy::Pinned(k) => k.iter().collect(),
            HostKeyPolicy::Known { entries, .. } => entries.iter().map(|(_, _, k)| k).collect(),
        };
        let defaults = Preferred::DEFAULT.key.to_vec();
        let mut out: Vec<Algorithm> = Vec::new();
        for k in known {
            // RSA host keys are negotiated by signature algorithm: take the default's RSA
            // entries in their order.
            let alg = k.algorithm();
            for d in &defaults {
                let same = match (&alg, d) {
                    (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
                    (a, d) => a == d,
                };
                if same && !out.contains(d) {
                    out.push(d.clone());
                }
            }
        }
        for d in defaults {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }
}

/// Loads an OpenSSH private key; the error names the file. Encrypted keys are refused (the
/// hook has no terminal to ask for a passphrase, like `ssh -oBatchMode=yes`).
pub(crate) fn load_key(path: &Path) -> Result<PrivateKey, RusshError> {
    ::russh::keys::load_secret_key(path, None).map_err(|e| RusshError::KeyFile {
        path: path.to_owned(),
        reason: match e {
            ::russh::keys::Error::KeyIsEncrypted => {
                "it is encrypted and the hook cannot ask for its passphrase".to_owned()
            }
            ::russh::keys::Error::IO(io) => io.to_string(),
            other => other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6WBW6Q7E+z9lfqr3ChtmMvBQ71YLRDg/IrLFd9KWNY";
    const K2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6ignflF9oSCIPSZN4nVXjQ6Vru5xgGZGb5fWJ2CMwG";

    fn key(line: &str) -> PublicKey {
        pinned_keys(line).expect("key").remove(0)
    }

    fn target(s: &str) -> Target {
        Target::parse(s, "me").expect("target")
    }

    #[test]
    fn targets_parse_user_host_and_port() {
        assert_eq!(
            target("root@10.0.0.1"),
            Target {
                user: "root".into(),
                host: "10.0.0.1".into(),
                port: 22
            }
        );
        let t = target("h:2222");
        assert_eq!((t.user.as_str(), t.port), ("me", 2222));
        assert_eq!(t.known_hosts_name(), "[h]:2222");
        assert_eq!(target("u@[fe80::1]:23").host, "fe80::1");
        assert_eq!(target("fe80::1").port, 22);
        assert!(Target::parse("h:x", "me").is_err());
    }

    #[test]
    fn pinned_host_key_is_matched_and_a_wrong_one_is_named() {
        let t = target("root@b1");
        let policy = HostKeyPolicy::Pinned(pinned_keys(&format!("{K1} root@b1\n")).expect("k"));
        assert!(policy.check(&t, &key(K1)).is_ok());
        let e = policy.check(&t, &key(K2)).expect_err("wrong key");
        assert!(e.contains("host key mismatch for b1"), "{e}");
        assert!(
            e.contains("SHA256:TwwyrvyMkN90XvNcLrBrq9E5dbKbxGYsIhL+jKTPa54"),
            "{e}"
        );
        // A known_hosts-style line (host names first) works too.
        assert_eq!(pinned_keys(&format!("b1,b1.lan {K1}")).expect("k").len(), 1);
        let e = pinned_keys("not a key").expect_err("garbage");
        assert!(e.to_string().contains("host key field"), "{e}");
    }

    #[test]
    fn known_hosts_accepts_refuses_changed_and_unknown_keys() {
        let dir = tempfile::tempdir().expect("tmp");
        let kh = dir.path().join("known_hosts");
        std::fs::write(
            &kh,
            format!("# comment\nother {K2}\nb1 {K1}\n[b2]:2222 {K2}\n"),
        )
        .expect("write");
        let files = vec![kh.clone(), dir.path().join("missing")];
        let t = target("root@b1");
        let p = known_entries(&t, &files).expect("read");
        assert!(p.check(&t, &key(K1)).is_ok());
        let e = p.check(&t, &key(K2)).expect_err("changed");
        assert!(e.contains("host key for b1 has CHANGED"), "{e}");
        assert!(e.contains(&format!("{} line 3", kh.display())), "{e}");
        let t2 = target("b2:2222");
        let p2 = known_entries(&t2, &files).expect("read");
        assert!(p2.check(&t2, &key(K2)).is_ok());
        let t3 = target("b3");
        let p3 = known_entries(&t3, &files).expect("read");
        let e = p3.check(&t3, &key(K1)).expect_err("unknown");
        assert!(e.contains("host key for b3 is not known"), "{e}");
        assert!(e.contains("8th field"), "{e}");
    }

    #[test]
    fn known_key_algorithms_come_first() {
        let p = HostKeyPolicy::Pinned(vec![key(K1)]);
        assert_eq!(p.preferred_algorithms().first(), Some(&Algorithm::Ed25519));
        assert_eq!(p.preferred_algorithms().len(), Preferred::DEFAULT.key.len());
    }

    #[test]
    fn key_file_errors_name_the_file() {
        let e = load_key(Path::new("/nonexistent/id_test")).expect_err("missing");
        let s = e.to_string();
        assert!(s.contains("/nonexistent/id_test"), "{s}");
        let dir = tempfile::tempdir().expect("tmp");
        let bad = dir.path().join("id_bad");
        std::fs::write(&bad, "not a key\n").expect("write");
        let s = load_key(&bad).expect_err("garbage").to_string();
        assert!(s.contains("id_bad"), "{s}");
    }
}
