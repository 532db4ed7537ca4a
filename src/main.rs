//! The `nixctr` binary: parse the command line, run it, print the error chain, pick the exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = nixctr::cli::Cli::parse();
    nixctr::exit::report(nixctr::run(cli))
}
