//! `ferry-store`: the local Nix store, through Nix's own command-line tools, for the build
//! hook (input NARs, output import) and the uploader (path infos, NARs). The formats these
//! tools read and print are pure code in `ferry-nix` (`path_info`, `nix_version`, `export`).
//!
//! Why the CLI and not the daemon socket or the SQLite database: the hook runs as the
//! daemon's user with the daemon's environment, so `nix-store` / `nix` open exactly the
//! store the daemon uses (a direct local store as root), whatever its layout; and the one
//! operation that must bypass the daemon, importing outputs whose locks the daemon holds
//! (docs/hook-protocol.md §3.4), is only possible in a process that opens the store itself.
//! Costs: one process per query batch and one per NAR, a few milliseconds each.
//!
//! - path infos: `nix path-info --json PATHS…` (one process for a whole closure);
//! - NARs: written in-process from the file system ([`ferry_nix::nar::dump_path`], as the
//!   stock hook's `LocalFSStore::narFromPath` does) when the store is a local one this
//!   process can read, else `nix-store --dump PATH` streamed from its stdout;
//! - derivations: the `.drv` file read and parsed with [`ferry_nix::derivation`];
//! - import: [`AnyImporter`], either [`HeldLocksImporter`] (`NIX_HELD_LOCKS` + `nix-store
//!   --import`, Nix 2.0–2.28 and every Lix) or [`RestoreImporter`] (`nix-store --restore`
//!   then `--register-validity`, every version);
//!   [`ferry_nix::nix_version::held_locks_supported`] picks one from `nix-store --version`
//!   for `import-method = "auto"`, asked once per [`LocalStore`].

mod error;
mod import;
mod nar;
mod restore;
mod store;
#[cfg(test)]
mod test_util;
mod tool;

pub use error::LocalError;
pub use import::{AnyImporter, HELD_LOCKS_MAX_NAR, HeldLocksImporter, ImportBatch, ImportMethod};
pub use nar::NarStream;
pub use restore::RestoreImporter;
pub use store::{LocalStore, store_dir_from_env};
