//! Nix formats and protocols, written for Ferry from the Nix sources (2.8 to current).
//!
//! Pure code only: parsers, encoders and their errors. The one exception is the `tokio`
//! feature (on by default): the async wire front end and the serve client, which take any
//! byte stream and own no process, socket or timer. Everything that owns sockets,
//! processes or the filesystem beyond a NAR tree lives in `ferry-store` (the local store) and
//! the binaries.
//! The store directory is always a parameter ([`store_path::StoreDir`]).

pub mod civil;
#[cfg(test)]
mod cli_golden;
pub mod config;
pub mod derivation;
pub mod export;
pub mod hash;
pub mod machines;
pub mod nar;
pub mod narinfo;
pub mod nix_version;
pub mod nixconf;
pub mod path_info;
pub mod serve;
pub mod signing;
pub mod store_path;
pub mod store_uri;
#[cfg(test)]
mod test_fs;
pub mod url;
pub mod wire;

/// An error and its sources, `outer: inner: …`: for errors whose own message leaves the
/// cause to its source (reqwest's "error sending request" over "connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_names_every_source() {
        let inner = std::io::Error::other("connection refused");
        assert_eq!(
            super::error_chain(&Wrap(inner)),
            "sending: connection refused"
        );
    }

    #[derive(Debug)]
    struct Wrap(std::io::Error);
    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("sending")
        }
    }
    impl std::error::Error for Wrap {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
