//! `ferry-build-hook`: Nix runs it as its `build-hook` (see the crate docs); people run its
//! subcommands (`status`, `probe`, `check-config`).
use ferry_build_hook::protocol::Verbosity;
use ferry_build_hook::run::{Env, Logger, run};

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if ferry_build_hook::cli::is_command(&argv) {
        std::process::exit(ferry_build_hook::cli::main(&argv));
    }
    // The verbosity filters our `@nix` messages; an argv error is reported by `run`.
    let verbosity = ferry_build_hook::protocol::parse_args(&argv).unwrap_or(Verbosity::INFO);
    let logger = Logger::new(verbosity, Box::new(std::io::stderr()));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            logger.log(
                Verbosity::ERROR,
                format!("ferry-build-hook: starting the runtime: {e}"),
            );
            std::process::exit(1);
        }
    };
    let env = Env::from_process();
    let code = runtime.block_on(run(&argv, &env, tokio::io::stdin(), &logger));
    // Background readers (stdin, remote logs) must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    std::process::exit(code);
}
