//! `ferry-post-build`: a Nix `post-build-hook` that never blocks or fails a build, and the
//! uploader daemon that signs and pushes built paths to binary caches.
//!
//! - [`hook`]: hook mode (no arguments): GC root + one durable [`spool`] record, exit 0;
//! - [`daemon`]: spool → [`queue`] (SQLite) → [`upload`] workers → [`target`]s;
//! - pure pieces: [`spool`] record format, [`drv`] outputs, [`queue::transition`],
//!   [`retry`] policy, [`target`] file naming and URLs, [`s3`] SigV4 signing, [`config`].
//!
//! See `docs/upload.md` for the hook semantics and the cache format this follows.

// Only main.rs, the tests and ferry-fuzz use this library: its documentation is about the
// crate-private modules (`cargo doc --document-private-items`), which it links to.
#![allow(rustdoc::private_intra_doc_links)]

pub mod cli;
pub(crate) mod compress;
pub(crate) mod config;
pub(crate) mod daemon;
pub(crate) mod drv;
pub(crate) mod failure;
pub(crate) mod gcroot;
pub mod hook;
pub(crate) mod multipart;
pub(crate) mod queue;
pub(crate) mod retry;
pub(crate) use ferry_s3 as s3;
pub mod spool;
pub mod target;
pub(crate) mod upload;
