//! Nix formats and protocols, written for Ferry from the Nix sources (2.8 to current).
//!
//! Pure code only: parsers, encoders and their errors. Everything that owns sockets,
//! processes or the filesystem beyond a NAR tree lives in the binaries.
//! The store directory is always a parameter ([`store_path::StoreDir`]).

pub mod civil;
pub mod config;
pub mod derivation;
pub mod hash;
pub mod machines;
pub mod nar;
pub mod narinfo;
pub mod nixconf;
pub mod serve;
pub mod signing;
pub mod store_path;
pub mod store_uri;
pub mod wire;
