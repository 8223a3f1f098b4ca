//! `ferry-fuzz`: long stable-Rust mutation runs and seed export for `cargo fuzz`.
//!
//! ```text
//! cargo run --release -p ferry-fuzz -- run [TARGET...]     # FERRY_FUZZ_* as in the test
//! cargo run -p ferry-fuzz -- replay TARGET FILE...          # run inputs once, e.g. a saved failure
//! cargo run -p ferry-fuzz -- seeds DIR                      # DIR/<target>/<n>: the seeds
//! cargo run -p ferry-fuzz -- list
//! ```

use std::process::ExitCode;

#[global_allocator]
static ALLOC: ferry_fuzz::alloc::Counting = ferry_fuzz::alloc::Counting;

fn main() -> ExitCode {
    ferry_fuzz::alloc::Counting::mark_installed();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("list") => {
            for t in ferry_fuzz::TARGETS {
                println!("{}", t.name);
            }
            ExitCode::SUCCESS
        }
        Some("run") => {
            let mut cfg = ferry_fuzz::runner::Config::from_env();
            if args.len() > 1 {
                cfg.targets = Some(args[1..].to_vec());
            }
            match ferry_fuzz::runner::run_all(&cfg) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("replay") if args.len() >= 3 => {
            let Some(t) = ferry_fuzz::target(&args[1]) else {
                eprintln!("unknown target {:?}", args[1]);
                return ExitCode::FAILURE;
            };
            for f in &args[2..] {
                match std::fs::read(f) {
                    Ok(b) => println!("{f}: accepted={}", (t.run)(&b)),
                    Err(e) => {
                        eprintln!("{f}: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Some("seeds") if args.len() == 2 => {
            for t in ferry_fuzz::TARGETS {
                let dir = std::path::Path::new(&args[1]).join(t.name);
                let mut seeds = (t.seeds)();
                seeds.extend(ferry_fuzz::extra_seeds(t.name));
                let written = std::fs::create_dir_all(&dir).and_then(|()| {
                    seeds
                        .iter()
                        .enumerate()
                        .try_for_each(|(i, s)| std::fs::write(dir.join(format!("seed-{i:03}")), s))
                });
                if let Err(e) = written {
                    eprintln!("{}: {e}", dir.display());
                    return ExitCode::FAILURE;
                }
                println!("{}: {} seeds", dir.display(), seeds.len());
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "usage: ferry-fuzz list | run [TARGET...] | replay TARGET FILE... | seeds DIR"
            );
            ExitCode::from(2)
        }
    }
}
