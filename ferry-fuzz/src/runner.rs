//! The stable-Rust mutation run: each target is fed its seeds, then mutants of them (and of
//! accepted mutants) for a bounded time, in a worker thread. The run fails on the first
//! panic, on an input that takes longer than the per-input limit (a hang), or on an input
//! that makes live memory grow by more than the bound (needs [`crate::alloc::Counting`]
//! installed as the global allocator). The failing input is written to a file and shown.
//!
//! Environment (all optional):
//! - `FERRY_FUZZ_SECS`: seconds per target (default 2; fractions allowed)
//! - `FERRY_FUZZ_ITERS`: also stop a target after this many inputs
//! - `FERRY_FUZZ_SEED`: the mutator's seed (default fixed, so runs repeat)
//! - `FERRY_FUZZ_TARGETS`: comma-separated target names (default all)
//! - `FERRY_FUZZ_INPUT_MS`: time limit for one input (default 10000, for debug builds on a
//!   loaded machine; a hang is forever)
//! - `FERRY_FUZZ_MEM_MB`: live-memory growth allowed for one input (default 256)
//! - `FERRY_FUZZ_OUT`: where failing inputs go (default the system temp dir)

use crate::Target;
use crate::mutate::{Rng, mutate};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const DEFAULT_SEED: u64 = 0x00fe_7277_f022_2026;

#[derive(Debug, Clone)]
pub struct Config {
    pub secs: f64,
    pub iters: Option<u64>,
    pub seed: u64,
    pub targets: Option<Vec<String>>,
    pub input_limit: Duration,
    pub mem_limit: usize,
    pub out_dir: PathBuf,
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(x) => Some(x),
        Err(_) => panic!("{name}={v:?} is not a valid value"),
    }
}

impl Config {
    pub fn from_env() -> Config {
        Config {
            secs: env("FERRY_FUZZ_SECS").unwrap_or(2.0),
            iters: env("FERRY_FUZZ_ITERS"),
            seed: env("FERRY_FUZZ_SEED").unwrap_or(DEFAULT_SEED),
            targets: std::env::var("FERRY_FUZZ_TARGETS").ok().map(|s| {
                s.split(',')
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .collect()
            }),
            input_limit: Duration::from_millis(env("FERRY_FUZZ_INPUT_MS").unwrap_or(10_000)),
            mem_limit: env::<usize>("FERRY_FUZZ_MEM_MB").unwrap_or(256) << 20,
            out_dir: std::env::var_os("FERRY_FUZZ_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        }
    }

    /// The targets selected, in table order; an unknown name is an error.
    pub fn selected(&self) -> Result<Vec<&'static Target>, String> {
        match &self.targets {
            None => Ok(crate::TARGETS.iter().collect()),
            Some(names) => names
                .iter()
                .map(|n| {
                    crate::target(n).ok_or_else(|| {
                        let all: Vec<&str> = crate::TARGETS.iter().map(|t| t.name).collect();
                        format!("unknown fuzz target {n:?} (targets: {})", all.join(", "))
                    })
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub target: &'static str,
    pub seeds: usize,
    pub execs: u64,
    pub accepted: u64,
    pub elapsed: Duration,
    pub slowest: Duration,
    pub max_growth: usize,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<18} {:>8} inputs ({:>6} accepted, {} seeds) in {:>5.2}s, slowest {:>6.1}ms, peak growth {:>7} KiB",
            self.target,
            self.execs,
            self.accepted,
            self.seeds,
            self.elapsed.as_secs_f64(),
            self.slowest.as_secs_f64() * 1e3,
            self.max_growth >> 10,
        )
    }
}

type Outcome = Result<bool, String>;

/// Runs inputs in a thread of its own, so a hang can be noticed and a panic caught.
struct Worker {
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Outcome>,
}

impl Worker {
    fn spawn(t: &'static Target) -> Worker {
        let (tx, in_rx) = mpsc::channel::<Vec<u8>>();
        let (out_tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("fuzz-{}", t.name))
            .spawn(move || {
                for input in in_rx {
                    let r = std::panic::catch_unwind(AssertUnwindSafe(|| (t.run)(&input)));
                    drop(input);
                    let r = r.map_err(|p| {
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                            .unwrap_or_else(|| "a panic".to_owned())
                    });
                    if out_tx.send(r).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the fuzz worker");
        Worker { tx, rx }
    }
}

/// Fuzzes one target; `Err` describes the first failure (and where its input was saved).
pub fn run_target(t: &'static Target, cfg: &Config) -> Result<Stats, String> {
    let start = Instant::now();
    let mut rng = Rng::new(cfg.seed ^ fnv(t.name.as_bytes()));
    let mut seeds = (t.seeds)();
    seeds.extend(crate::extra_seeds(t.name));
    if seeds.is_empty() {
        return Err(format!("{}: no seeds", t.name));
    }
    let worker = Worker::spawn(t);
    let measure_mem = crate::alloc::installed();
    let mut stats = Stats {
        target: t.name,
        seeds: seeds.len(),
        execs: 0,
        accepted: 0,
        elapsed: Duration::ZERO,
        slowest: Duration::ZERO,
        max_growth: 0,
    };
    // Accepted mutants, mutated further: a poor man's coverage feedback.
    let mut pool: Vec<Vec<u8>> = Vec::new();
    const POOL: usize = 256;
    let deadline = Duration::from_secs_f64(cfg.secs.max(0.0));
    let mut i = 0usize;
    loop {
        let input = if i < seeds.len() {
            seeds[i].clone()
        } else {
            if start.elapsed() >= deadline || cfg.iters.is_some_and(|n| stats.execs >= n) {
                break;
            }
            let mut d = if !pool.is_empty() && rng.chance(2) {
                pool[rng.below(pool.len())].clone()
            } else {
                seeds[rng.below(seeds.len())].clone()
            };
            let partners = if rng.chance(2) { &seeds } else { &pool };
            mutate(&mut rng, &mut d, partners, t.dict, t.max_len);
            d
        };
        i += 1;
        let base = crate::alloc::reset_peak();
        let began = Instant::now();
        worker
            .tx
            .send(input.clone())
            .map_err(|_| format!("{}: the worker thread is gone", t.name))?;
        let outcome = match worker.rx.recv_timeout(cfg.input_limit) {
            Ok(o) => o,
            Err(_) => {
                // The worker is stuck; it is left behind (the process ends with the failure).
                return Err(failure(
                    t,
                    cfg,
                    "hang",
                    &input,
                    &format!(
                        "no result after {:?} (FERRY_FUZZ_INPUT_MS)",
                        cfg.input_limit
                    ),
                ));
            }
        };
        let took = began.elapsed();
        stats.slowest = stats.slowest.max(took);
        stats.execs += 1;
        if measure_mem {
            let growth = crate::alloc::peak().saturating_sub(base);
            stats.max_growth = stats.max_growth.max(growth);
            if growth > cfg.mem_limit {
                return Err(failure(
                    t,
                    cfg,
                    "memory",
                    &input,
                    &format!(
                        "live memory grew by {} MiB, over the bound of {} MiB (FERRY_FUZZ_MEM_MB)",
                        growth >> 20,
                        cfg.mem_limit >> 20
                    ),
                ));
            }
        }
        match outcome {
            Ok(true) => {
                stats.accepted += 1;
                if i > seeds.len() {
                    if pool.len() < POOL {
                        pool.push(input);
                    } else {
                        let k = rng.below(POOL);
                        pool[k] = input;
                    }
                }
            }
            Ok(false) => {}
            Err(msg) => return Err(failure(t, cfg, "panic", &input, &msg)),
        }
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// Saves the input and describes the failure.
fn failure(t: &Target, cfg: &Config, kind: &str, input: &[u8], msg: &str) -> String {
    let name = format!("ferry-fuzz-{}-{kind}-{:016x}", t.name, fnv(input));
    let path = cfg.out_dir.join(name);
    let saved = match std::fs::write(&path, input) {
        Ok(()) => format!("saved as {}", path.display()),
        Err(e) => format!("could not save it to {}: {e}", path.display()),
    };
    let shown: String = input.iter().take(512).map(|b| format!("{b:02x}")).collect();
    format!(
        "fuzz target {} failed ({kind}): {msg}\ninput ({} bytes, {saved}; replay: cargo run -p ferry-fuzz -- replay {} FILE; \
         keep it as a regression seed in ferry-fuzz/seeds/{}/):\n{shown}{}\n{:?}",
        t.name,
        input.len(),
        t.name,
        t.name,
        if input.len() > 512 { "…" } else { "" },
        String::from_utf8_lossy(&input[..input.len().min(512)]),
    )
}

/// FNV-1a, for per-target seeds and file names.
fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs every selected target; prints a line per target; `Err` on the first failure.
pub fn run_all(cfg: &Config) -> Result<Vec<Stats>, String> {
    let mut all = Vec::new();
    for t in cfg.selected()? {
        let s = run_target(t, cfg)?;
        eprintln!("ferry-fuzz: {s}");
        all.push(s);
    }
    Ok(all)
}
