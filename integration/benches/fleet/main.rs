//! The fleet benchmarks: Ferry against the stock Nix tools (and nginx, `nix copy`) on the same
//! fleet in the same run, printed as ratios. Each benchmark builds its own fleet with the
//! fixtures of `ferry_integration::support`, on the Nix version `FERRY_NIX` names.
//!
//! `cargo bench -p ferry-integration --bench fleet [-- FILTER...]` runs those whose name
//! contains a filter (all without one); `dev/bench` runs them on release builds, once per Nix
//! version. A benchmark that panics (a build failed, a goal's precondition broke) is reported
//! and the others still run; the exit status says whether any failed. Needs root.

mod driver;
mod hook;
mod hook_health;
mod hook_hostile;
mod hook_russh;
mod post_build;
mod substituter;
mod substituter_local;
mod upload_throughput;

use std::process::ExitCode;
use std::time::Instant;

const BENCHES: &[(&str, fn())] = &[
    (
        "bench_ten_derivations_on_two_builders",
        hook::bench_ten_derivations_on_two_builders,
    ),
    ("bench_closure_copy", hook::bench_closure_copy),
    (
        "bench_dead_builders_stock_vs_ferry",
        hook_health::bench_dead_builders_stock_vs_ferry,
    ),
    (
        "bench_max_jobs_zero_per_nix_version",
        hook_health::bench_max_jobs_zero_per_nix_version,
    ),
    (
        "bench_large_output_imports_with_flat_memory",
        hook_hostile::bench_large_output_imports_with_flat_memory,
    ),
    (
        "bench_probe_latency_russh_vs_openssh",
        hook_russh::bench_probe_latency_russh_vs_openssh,
    ),
    (
        "bench_hook_on_a_chain_of_builds",
        post_build::bench_hook_on_a_chain_of_builds,
    ),
    (
        "bench_upload_vs_nix_copy",
        post_build::bench_upload_vs_nix_copy,
    ),
    (
        "bench_upload_throughput_vs_nix_copy",
        upload_throughput::bench_upload_throughput_vs_nix_copy,
    ),
    (
        "bench_substituter_against_direct_upstream",
        substituter::bench_substituter_against_direct_upstream,
    ),
    (
        "bench_dead_first_cache_stock_vs_ferry",
        substituter::bench_dead_first_cache_stock_vs_ferry,
    ),
    (
        "bench_local_store_against_nginx_and_nix_copy",
        substituter_local::bench_local_store_against_nginx_and_nix_copy,
    ),
];

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; anything else not starting with '-' is a filter.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let chosen: Vec<_> = BENCHES
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    if chosen.is_empty() {
        // Not an error: `dev/bench FILTER` passes the same filter to every bench target.
        println!("no fleet benchmark matches {filters:?}; there are:");
        for (name, _) in BENCHES {
            println!("  {name}");
        }
    }
    let mut failed = Vec::new();
    for (name, bench) in chosen {
        println!("== {name}");
        let start = Instant::now();
        // Fleets tear themselves down on unwinding, so one failed benchmark leaves nothing
        // behind for the next.
        let ok = std::panic::catch_unwind(bench).is_ok();
        println!(
            "== {name}: {} in {:.1} s",
            if ok { "done" } else { "FAILED" },
            start.elapsed().as_secs_f64()
        );
        if !ok {
            failed.push(*name);
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("failed benchmarks: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}
