//! Store URIs as Nix writes them in `store`, `builders` and machines files:
//! `scheme://authority/path?key=value&…`, or a bare name with an optional query (`auto`,
//! `daemon`, `local?root=/r`). Nix 2.34 renders the `store` it hands the hook as a URI
//! (`local://?root=/r` for `local?root=/r`, ferry-nix/tests/golden/wire/nix-2.34/hook-stdin.bin).
//!
//! The query is read the way Nix reads it
//! (<https://github.com/NixOS/nix/blob/2.8.0/src/libutil/url.cc> `decodeQuery`): pairs
//! separated by `&`, an entry without `=` ignored, and the first of several equal keys wins.
//! Values are taken as written (no percent-decoding: the parameters Ferry reads are paths
//! and program names).

/// A store URI, borrowed from its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreUri<'a> {
    base: &'a str,
    query: &'a str,
}

impl<'a> StoreUri<'a> {
    pub fn parse(uri: &'a str) -> Self {
        let (base, query) = uri.split_once('?').unwrap_or((uri, ""));
        StoreUri { base, query }
    }

    /// Everything before the query.
    pub fn base(&self) -> &'a str {
        self.base
    }

    /// The scheme (`ssh`, `ssh-ng`, `local`, `unix`, …) when the URI has a `://`; `None`
    /// for `auto`, `daemon`, `local?…` and paths.
    pub fn scheme(&self) -> Option<&'a str> {
        self.base.split_once("://").map(|(s, _)| s)
    }

    /// What follows `scheme://` up to the first `/` (`user@host:port` of an SSH store),
    /// `None` when empty or without a scheme.
    pub fn authority(&self) -> Option<&'a str> {
        let (_, rest) = self.base.split_once("://")?;
        let end = rest.find('/').unwrap_or(rest.len());
        rest.get(..end).filter(|a| !a.is_empty())
    }

    /// The query's `key=value` pairs, in order (entries without `=` left out).
    pub fn params(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.query.split('&').filter_map(|kv| kv.split_once('='))
    }

    /// The value of `key` (the first, as in Nix), if any.
    pub fn param(&self, key: &str) -> Option<&'a str> {
        self.params().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The value of `key` when set and not empty (an empty value means the default).
    pub fn param_set(&self, key: &str) -> Option<&'a str> {
        self.param(key).filter(|v| !v.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::StoreUri;

    #[test]
    fn parts_of_store_uris() {
        let u = StoreUri::parse("ssh://root@b1:22?remote-program=/bin/nix-store&x&ssh-key=");
        assert_eq!(u.scheme(), Some("ssh"));
        assert_eq!(u.authority(), Some("root@b1:22"));
        assert_eq!(u.base(), "ssh://root@b1:22");
        assert_eq!(u.param_set("remote-program"), Some("/bin/nix-store"));
        assert_eq!(u.param("ssh-key"), Some(""));
        assert_eq!(u.param_set("ssh-key"), None);
        assert_eq!(u.param("x"), None);

        let l = StoreUri::parse("local?root=/r&root=/s");
        assert_eq!((l.scheme(), l.base()), (None, "local"));
        assert_eq!(l.param("root"), Some("/r"));
        let l = StoreUri::parse("local://?root=/r");
        assert_eq!((l.scheme(), l.authority()), (Some("local"), None));
        assert_eq!(l.param("root"), Some("/r"));

        let d = StoreUri::parse("daemon");
        assert_eq!(
            (d.scheme(), d.base(), d.params().count()),
            (None, "daemon", 0)
        );
        assert_eq!(StoreUri::parse("unix:///run/s").scheme(), Some("unix"));
    }
}
