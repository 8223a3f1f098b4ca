//! `ferry-post-build`: a Nix `post-build-hook` that never blocks or fails a build, and the
//! uploader daemon that signs and pushes built paths to binary caches.
//!
//! - [`hook`]: hook mode (no arguments): GC root + one durable [`spool`] record, exit 0;
//! - [`daemon`]: spool → [`queue`] (SQLite) → [`upload`] workers → [`target`]s;
//! - pure pieces: [`spool`] record format, [`drv`] outputs, [`queue::transition`],
//!   [`retry`] policy, [`target`] file naming and URLs, [`s3`] SigV4 signing, [`config`].
//!
//! See `docs/upload.md` for the hook semantics and the cache format this follows.

pub mod cli;
pub mod compress;
pub mod config;
pub mod daemon;
pub mod drv;
pub mod failure;
pub mod gcroot;
pub mod hook;
pub mod queue;
pub mod retry;
pub mod s3;
pub mod spool;
pub mod target;
pub mod upload;
