//! The `nixctr` binary: parse the command line, run it, print the error chain, pick the exit code.

fn main() -> std::process::ExitCode {
    let cli = nixctr::cli::parse();
    // A panic is a bug: exit 2 ("unexpected") rather than Rust's 101. The panic message is
    // already on stderr, and guards have cleaned up while unwinding.
    match std::panic::catch_unwind(|| nixctr::run(cli)) {
        Ok(result) => nixctr::exit::report(result),
        Err(_) => std::process::ExitCode::from(nixctr::exit::ERROR),
    }
}
