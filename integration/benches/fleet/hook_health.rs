//! Dead and busy builders: untuned stock, tuned stock and Ferry on the same scenarios (goals
//! A–C of docs/goals.md), and `max-jobs = 0` per Nix version.

use ferry_integration::support::hook as hook_health_support;
use ferry_integration::{check, nonce, trivial_drv};
use hook_health_support::{Hook, many, settled_row, start, timed_build, write_machines};
use std::time::Duration;

/// A warm-up build that takes longer than this is a broken fixture, not a measurement.
const LIMIT: Duration = Duration::from_secs(50);

/// The scenarios: label, builders, which of them are blackholed, `-j`, and whether the
/// build must succeed (otherwise: fail, and the time to the error is measured).
const SCENARIOS: &[(&str, usize, &[usize], &str, bool)] = &[
    // All healthy, the reference for B.
    ("healthy, -j0", 2, &[], "-j0", true),
    // Local builds allowed.
    ("A: 1 blackholed, -j1", 1, &[0], "-j1", true),
    // Remote only.
    ("B: 1 blackholed + 1 healthy, -j0", 2, &[0], "-j0", true),
    (
        "C: all blackholed, -j0 (to failure)",
        2,
        &[0, 1],
        "-j0",
        false,
    ),
];

/// Benchmark, stock untuned vs stock tuned (`NIX_SSHOPTS="-o ConnectTimeout=2"`) vs Ferry on
/// fresh fleets in the same run, 5 trivial derivations per build (goals of docs/goals.md):
/// - A: one blackholed builder, `-j1` (local fallback); goal: Ferry ≤ 3 s;
/// - B: one blackholed + one healthy builder, `-j0`; goal: within 1.2× of the all-healthy
///   time (also measured);
/// - C: every builder blackholed, `-j0`: time to a clear error; goal ≤ 2 s.
///
/// Untuned stock waits for the kernel's TCP time-out (~135 s per attempt, docs/testing.md §5), so its
/// runs are capped at `FERRY_BENCH_CAP_SECS` (default 30) and reported as "> cap".
/// `dev/bench dead_builders`.
pub fn bench_dead_builders_stock_vs_ferry() {
    let cap = Duration::from_secs(ferry_integration::env_number("FERRY_BENCH_CAP_SECS", 0, 30));
    let hooks = [Hook::Stock, Hook::StockTuned, Hook::Ferry];
    // (scenario, hook) → seconds, None when capped.
    let mut results: Vec<(&str, Hook, Option<f64>)> = Vec::new();
    let secs = |o: &Option<std::process::Output>, t: Duration| o.as_ref().map(|_| t.as_secs_f64());

    for hook in hooks {
        for &(label, builders, dead, jobs, builds) in SCENARIOS {
            let tf = start(hook, builders, 2, "");
            for &b in dead {
                tf.blackhole(b).expect("blackhole");
            }
            let (o, t) = timed_build(&tf, &many(&nonce(), 5), &[jobs], cap);
            if let Some(o) = &o {
                if builds {
                    check(o, label).unwrap_or_else(|e| panic!("{hook:?}: {e}"));
                } else {
                    assert!(
                        !o.status.success(),
                        "{hook:?}: {label} built with every builder dead"
                    );
                }
            }
            results.push((label, hook, secs(&o, t)));
        }
    }

    let get = |s: &str, h: Hook| {
        results
            .iter()
            .find(|(x, y, _)| *x == s && *y == h)
            .and_then(|r| r.2)
    };
    let show = |v: Option<f64>| v.map_or(format!("> {} s", cap.as_secs()), |t| format!("{t:.2} s"));
    let ratio = |f: Option<f64>, s: Option<f64>| match (f, s) {
        (Some(f), Some(s)) => format!("{:.3}", f / s),
        (Some(f), None) => format!("< {:.3}", f / cap.as_secs_f64()),
        _ => "n/a".to_owned(),
    };
    println!(
        "\n{:<40} {:>12} {:>12} {:>10} {:>16} {:>16}",
        "scenario", "stock", "stock tuned", "ferry", "ferry/stock", "ferry/tuned"
    );
    for &(s, ..) in SCENARIOS {
        let (st, tu, fe) = (
            get(s, Hook::Stock),
            get(s, Hook::StockTuned),
            get(s, Hook::Ferry),
        );
        println!(
            "{s:<40} {:>12} {:>12} {:>10} {:>16} {:>16}",
            show(st),
            show(tu),
            show(fe),
            ratio(fe, st),
            ratio(fe, tu)
        );
    }
    let healthy = get("healthy, -j0", Hook::Ferry);
    let b = get("B: 1 blackholed + 1 healthy, -j0", Hook::Ferry);
    if let (Some(h), Some(b)) = (healthy, b) {
        println!(
            "goal B: ferry with a dead builder / ferry all healthy = {:.2} (goal <= 1.2)",
            b / h
        );
    }
    println!(
        "goal A: ferry {} (goal <= 3 s); goal C: ferry {} (goal <= 2 s)",
        show(get("A: 1 blackholed, -j1", Hook::Ferry)),
        show(get("C: all blackholed, -j0 (to failure)", Hook::Ferry))
    );
}

/// The states `bench_max_jobs_zero_per_nix_version` measures, each on a fresh fleet of two
/// builders with two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No health state: nothing known about either builder.
    Fresh,
    /// An earlier build went to b0 alone (b1 was not configured yet): b0 known up, b1
    /// unknown, the everyday state.
    OneKnown,
    /// An earlier build of five went to both, and both are known up.
    Warm,
    /// b0 blackholed, b1 healthy, no health state.
    OneBlackholed,
    /// Both blackholed: time until the build fails.
    AllDead,
}

impl State {
    const ALL: [State; 5] = [
        State::Fresh,
        State::OneKnown,
        State::Warm,
        State::OneBlackholed,
        State::AllDead,
    ];

    fn label(self) -> &'static str {
        match self {
            State::Fresh => "2 healthy, no health state",
            State::OneKnown => "2 healthy, b0 known, b1 unknown",
            State::Warm => "2 healthy, both known (warm)",
            State::OneBlackholed => "1 blackholed + 1 healthy",
            State::AllDead => "all blackholed (to failure)",
        }
    }
}

/// One measurement: seconds for `nix-build -j0` of five trivial derivations in `state`, or
/// `None` when it was still running at `cap`.
fn measure(hook: Hook, nix: &ferry_integration::Nix, state: State, cap: Duration) -> Option<f64> {
    let tf = hook_health_support::start_on(hook, 2, 2, "", Some(nix.clone()));
    let warm_up = |expr: &str| {
        let (o, _) = timed_build(&tf, expr, &["-j0"], LIMIT);
        check(&o.expect("warm-up timed out"), "warm-up").unwrap_or_else(|e| panic!("{e}"));
    };
    match state {
        State::Fresh => {}
        State::OneKnown => {
            let (l0, l1) = (
                tf.machine_line(0).expect("l0"),
                tf.machine_line(1).expect("l1"),
            );
            write_machines(&tf, std::slice::from_ref(&l0));
            warm_up(&trivial_drv(&nonce(), "warm"));
            write_machines(&tf, &[l0, l1]);
        }
        State::Warm => {
            warm_up(&many(&nonce(), 5));
            if hook == Hook::Ferry {
                settled_row(&tf, 0);
                settled_row(&tf, 1);
            }
        }
        State::OneBlackholed => tf.blackhole(0).expect("blackhole"),
        State::AllDead => {
            tf.blackhole(0).expect("blackhole");
            tf.blackhole(1).expect("blackhole");
        }
    }
    let (o, t) = timed_build(&tf, &many(&nonce(), 5), &["-j0"], cap);
    let o = o?;
    if state == State::AllDead {
        assert!(
            !o.status.success(),
            "{hook:?} {nix}: built with every builder dead"
        );
    } else {
        check(&o, state.label()).unwrap_or_else(|e| panic!("{hook:?} {nix}: {e}"));
    }
    Some(t.as_secs_f64())
}

/// Benchmark, per Nix version, stock (tuned: `NIX_SSHOPTS="-o ConnectTimeout=2"`, the bar
/// of docs/testing.md §5) against Ferry in the same run: `max-jobs = 0`, five trivial derivations,
/// two builders with two slots, in each [`State`]. Rounds alternate which hook goes first;
/// the medians and Ferry/stock ratios are printed. Runs on the version under test
/// (`FERRY_NIX`; `dev/bench` runs every version), or on each of `FERRY_BENCH_NIX=2.8,2.34`;
/// `FERRY_BENCH_ROUNDS` sets the rounds (default 3), `FERRY_BENCH_CAP_SECS` the cap per
/// build (default 60).
pub fn bench_max_jobs_zero_per_nix_version() {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let versions: Vec<ferry_integration::Nix> = match env("FERRY_BENCH_NIX") {
        Some(list) => list
            .split(',')
            .map(|l| ferry_integration::Nix::by_label(l.trim()).expect("FERRY_BENCH_NIX"))
            .collect(),
        None => vec![ferry_integration::Nix::under_test()],
    };
    let rounds: usize = env("FERRY_BENCH_ROUNDS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let cap = Duration::from_secs(
        env("FERRY_BENCH_CAP_SECS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let median = |v: &[Option<f64>]| -> Option<f64> {
        let mut xs: Vec<f64> = v.iter().map(|x| x.unwrap_or(cap.as_secs_f64())).collect();
        xs.sort_by(f64::total_cmp);
        xs.get(xs.len() / 2).copied()
    };
    for nix in &versions {
        // Per state: the stock and the Ferry times of each round (`None`: over the cap).
        type Times = (State, Vec<Option<f64>>, Vec<Option<f64>>);
        let mut times: Vec<Times> = State::ALL
            .iter()
            .map(|&s| (s, Vec::new(), Vec::new()))
            .collect();
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                [Hook::StockTuned, Hook::Ferry]
            } else {
                [Hook::Ferry, Hook::StockTuned]
            };
            for hook in order {
                for (state, stock, ferry) in times.iter_mut() {
                    let t = measure(hook, nix, *state, cap);
                    if hook == Hook::Ferry {
                        ferry.push(t);
                    } else {
                        stock.push(t);
                    }
                }
            }
        }
        println!(
            "\n{nix}, -j0, 5 trivial derivations, 2 builders x 2 slots, median of {rounds}\n{:<34} {:>12} {:>10} {:>12}",
            "state", "stock tuned", "ferry", "ferry/stock"
        );
        for (state, stock, ferry) in &times {
            let (s, f) = (median(stock), median(ferry));
            let show = |x: Option<f64>| {
                x.map_or("-".to_owned(), |t| {
                    if t >= cap.as_secs_f64() {
                        format!(">= {} s", cap.as_secs())
                    } else {
                        format!("{t:.2} s")
                    }
                })
            };
            let ratio = match (s, f) {
                (Some(s), Some(f)) if s > 0.0 => format!("{:.2}", f / s),
                _ => "n/a".to_owned(),
            };
            println!(
                "{:<34} {:>12} {:>10} {:>12}",
                state.label(),
                show(s),
                show(f),
                ratio
            );
            println!("    stock {stock:.2?}\n    ferry {ferry:.2?}");
        }
    }
}
