//! `ferry-build-hook`: a drop-in for Nix's `build-hook` (stock `build-remote`) that builds
//! derivations on `ssh://` builders over the serve protocol.
//!
//! Layers, outermost first:
//! - [`protocol`]: the hook protocol adapter (argv, settings, `try`, replies, `@nix` logs);
//! - [`run`]: orchestration of one hook process;
//! - [`select`]: the pure selection policy; [`slots`]: the shared slot locks;
//! - [`ssh`]: the transport to a builder; [`remote`]: copy, build and fetch over the serve
//!   protocol; [`local`]: the local store through the `nix-store` / `nix` CLI.

pub mod protocol;
pub mod select;
pub mod slots;
pub mod ssh;
pub mod local;
pub mod remote;
pub mod run;
