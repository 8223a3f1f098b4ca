//! `ferry-build-hook`: a drop-in for Nix's `build-hook` (stock `build-remote`) that builds
//! derivations on `ssh://` builders over the serve protocol.
//!
//! Layers, outermost first:
//! - [`protocol`]: the hook protocol adapter (argv, settings, `try`, replies, `@nix` logs);
//! - [`run`]: orchestration of one hook process: decide, connect, transfer, and the one
//!   mapping of a [`run::HookError`] to a reply and an exit status;
//! - [`select`]: the pure selection policy; [`slots`]: the shared slot locks;
//! - [`health`]: the builders' health state machine (pure); [`health_store`]: that state on
//!   disk, shared by every hook; [`probe`]: reaching builders within a deadline;
//! - [`config`]: the `[build-hook]` section of `ferry.toml`; [`cli`]: `status`, `probe`,
//!   `check-config`; [`daemon_check`]: whether the running daemon uses this hook;
//! - [`ssh`]: the transport to a builder (OpenSSH), [`russh`]: the in-process one;
//!   [`remote`]: copy, build and fetch over the serve protocol; the local store (through
//!   the `nix-store` / `nix` CLI) is the `ferry-store` crate;
//! - [`delegate`]: hands a derivation for a non-`ssh://` builder (`ssh-ng://`, …) to the
//!   stock hook, which then is this hook process.

// Only main.rs, the tests and ferry-fuzz use this library: its documentation is about the
// crate-private modules (`cargo doc --document-private-items`), which it links to.
#![allow(rustdoc::private_intra_doc_links)]

pub mod cli;
pub(crate) mod config;
pub(crate) mod daemon_check;
pub(crate) mod delegate;
pub(crate) mod fault;
pub mod health;
pub mod health_store;
pub(crate) mod probe;
pub mod protocol;
pub(crate) mod remote;
pub mod run;
pub(crate) mod russh;
pub(crate) mod select;
pub(crate) mod siblings;
pub(crate) mod slots;
pub(crate) mod ssh;
