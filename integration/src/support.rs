//! Fixtures shared by the end-to-end tests (`tests/e2e/`) and the fleet benchmarks
//! (`benches/fleet/`): a fleet set up for each binary under test, its configuration files,
//! the processes it runs and the checks on what they leave behind.

pub mod hook;
pub mod post_build;
pub mod s3;
pub mod substituter;
pub mod substitution;
