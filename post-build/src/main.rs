//! Nix runs this with no arguments as `post-build-hook`; people run its subcommands.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = ferry_post_build::cli::Cli::parse();
    ferry_post_build::cli::main(cli)
}
