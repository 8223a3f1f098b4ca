//! A real Nix fleet on one machine, for Ferry's end-to-end tests and demo.
//!
//! Each host (one client, N builders, later caches) gets its own network namespace and its
//! own mount namespace in which a host directory is bind-mounted over `/nix` and another over
//! `/etc/nix`: every host has its own store and its own `nix.conf`, and nothing is written to
//! the machine's global `/etc/nix`. Builders run their own `sshd`; the client runs a real
//! `nix-daemon`. See `docs/testing.md` for the recipe and the rules that keep it safe:
//! fleet addresses exist only inside the namespaces, and every command that may reach them
//! runs inside the client's namespace.
//!
//! A [`Fleet`] tears everything down on drop, also when a test panics: it kills every process
//! in its namespaces, which releases the private mounts, and deletes the namespaces.
//! Names embed the creating process id, so [`reap_stale`] can remove what a killed test run
//! left behind without touching fleets of live processes.

pub mod drv;
pub mod fleet;
pub mod garage;
pub mod host;
pub mod net;
pub mod nix;
pub mod process;
pub mod support;

pub use drv::{chain_drv, nonce, out_paths, trivial_drv, zeros_drv};
pub use fleet::{Fleet, FleetConfig, reap_stale};
pub use host::Host;
pub use net::{
    blackhole_host, blackhole_port, heal_host, listening, start_nginx, throttle_host,
    wait_listening,
};
pub use nix::Nix;
pub use process::{
    check, ferry_bin, proc_stat, process_ended, rss_of, rss_of_in, run, stdout_of, wait_until,
};

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;

/// Prefix of every namespace a fleet creates: `fy<pid>n<seq><host>`.
pub(crate) const NS_PREFIX: &str = "fy";

pub(crate) static SEQ: AtomicU32 = AtomicU32::new(0);

/// The system string of this machine, as Nix calls it.
pub const SYSTEM: &str = "x86_64-linux";

/// The number in the environment variable `name` (a test's or benchmark's size knob) when it
/// is set, parses and is at least `min`; `default` otherwise.
pub fn env_number<T: std::str::FromStr + PartialOrd>(name: &str, min: T, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v >= min)
        .unwrap_or(default)
}

/// The workspace's root directory (the parent of `integration/`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.to_path_buf())
}
