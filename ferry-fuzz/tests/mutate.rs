//! The short mutation run of every fuzz target (fuzz/README.md): seeds from the golden files,
//! a fixed mutator seed, about 2 s per target (`FERRY_FUZZ_SECS`). It fails on a panic, a
//! hang or an input that grows live memory beyond 256 MiB. This binary holds this one test
//! only: the memory counts are process-wide.

#[global_allocator]
static ALLOC: ferry_fuzz::alloc::Counting = ferry_fuzz::alloc::Counting;

#[test]
fn fuzz_every_target() {
    ferry_fuzz::alloc::Counting::mark_installed();
    let cfg = ferry_fuzz::runner::Config::from_env();
    match ferry_fuzz::runner::run_all(&cfg) {
        Ok(stats) => {
            let total: u64 = stats.iter().map(|s| s.execs).sum();
            eprintln!("ferry-fuzz: {total} inputs over {} targets", stats.len());
        }
        Err(e) => panic!("{e}"),
    }
}
