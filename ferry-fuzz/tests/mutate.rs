//! The short mutation run of every fuzz target (fuzz/README.md): seeds from the golden files,
//! a fixed mutator seed, 2 s per target by default (`FERRY_FUZZ_SECS`). It fails on a panic, a
//! hang or an input that grows live memory by more than 256 MiB. This binary holds this one
//! test only: the memory counts are process-wide.

use ferry_fuzz::Target;
use ferry_fuzz::runner::{Config, run_all, run_target};
use std::time::Duration;

#[global_allocator]
static ALLOC: ferry_fuzz::alloc::Counting = ferry_fuzz::alloc::Counting;

fn seeds() -> Vec<Vec<u8>> {
    vec![b"seed".to_vec()]
}

/// Misbehaves on inputs that start with `x` (the mutator makes one quickly from `seed`).
fn bad(data: &[u8], what: fn()) -> bool {
    if data.first() == Some(&b'x') {
        what();
    }
    true
}

static PANICS: Target = Target {
    name: "self_test_panic",
    run: |d| bad(d, || panic!("boom")),
    seeds,
    dict: &[b"x"],
    max_len: 64,
};
static HANGS: Target = Target {
    name: "self_test_hang",
    run: |d| bad(d, || std::thread::sleep(Duration::from_secs(6))),
    seeds,
    dict: &[b"x"],
    max_len: 64,
};
static ALLOCATES: Target = Target {
    name: "self_test_memory",
    run: |d| {
        bad(d, || {
            drop(std::hint::black_box(Vec::<u8>::with_capacity(300 << 20)))
        })
    },
    seeds,
    dict: &[b"x"],
    max_len: 64,
};

/// The runner notices each kind of failure it promises to.
fn check_the_checks(cfg: &Config) {
    let mut quick = cfg.clone();
    quick.secs = 5.0;
    // Generous for a first panic backtrace (symbolising takes a while in a debug build).
    quick.input_limit = Duration::from_millis(2000);
    quick.out_dir = std::env::temp_dir();
    for (t, kind) in [
        (&PANICS, "(panic)"),
        (&HANGS, "(hang)"),
        (&ALLOCATES, "(memory)"),
    ] {
        let e = run_target(t, &quick).expect_err(t.name);
        assert!(e.contains(kind), "{}: {e}", t.name);
        // The saved input is not wanted here.
        if let Some(p) = e
            .split("saved as ")
            .nth(1)
            .and_then(|r| r.split(';').next())
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[test]
fn fuzz_every_target() {
    ferry_fuzz::alloc::Counting::mark_installed();
    let cfg = Config::from_env();
    check_the_checks(&cfg);
    match run_all(&cfg) {
        Ok(stats) => {
            let total: u64 = stats.iter().map(|s| s.execs).sum();
            eprintln!("ferry-fuzz: {total} inputs over {} targets", stats.len());
        }
        Err(e) => panic!("{e}"),
    }
}
