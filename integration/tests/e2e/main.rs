//! Ferry's end-to-end tests: every binary against real nix-daemons, sshd, nginx, moto and
//! Garage on a fleet of network and mount namespaces (`ferry_integration`). One test binary,
//! one module per area; the fixtures live in the library (`ferry_integration::support`) so
//! the fleet benchmarks (`benches/fleet/`) share them. `dev/test` runs this once per Nix
//! version of `integration/nix-versions` (`FERRY_NIX`). Needs root.

mod demo;
mod fleet;
mod hook;
mod hook_health;
mod hook_hostile;
mod hook_import;
mod hook_russh;
mod large_outputs;
mod mixed;
mod nix_files;
mod nixos_module;
mod post_build;
mod post_build_failures;
mod post_build_journal;
mod s3_garage;
mod s3_multipart;
mod substituter;
mod substituter_local;
mod substituter_s3;
