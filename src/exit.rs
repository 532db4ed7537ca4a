//! Exit codes and error reporting: 0 ok, 1 failed or bad input, 2 usage or unexpected,
//! 130 interrupted. Errors print as `error: …` then one `caused by: …` line per cause.

use std::process::ExitCode;

/// The command was stopped by Ctrl-C or SIGTERM (the signal's name inside).
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {0}")]
pub struct Interrupted(pub &'static str);

/// A bug or an engine answer nixctr cannot make sense of: exit code 2 rather than 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unexpected(pub String);

/// The command line asks for something that cannot be: exit code 2, as the parser's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

pub const SUCCESS: u8 = 0;
pub const FAILURE: u8 = 1;
pub const ERROR: u8 = 2;
pub const INTERRUPTED: u8 = 130;

/// Waits for Ctrl-C or SIGTERM and names the one that came.
pub async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term.recv() => "SIGTERM",
    }
}

/// Prints the error chain on stderr and maps the outcome to an exit code.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    let Err(err) = result else {
        return ExitCode::from(SUCCESS);
    };
    // A closed stdout (`nixctr version x | head -0`) is not worth a message.
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        if io.kind() == std::io::ErrorKind::BrokenPipe {
            return ExitCode::from(SUCCESS);
        }
    }
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if err.downcast_ref::<Interrupted>().is_some() {
        ExitCode::from(INTERRUPTED)
    } else if err.downcast_ref::<Unexpected>().is_some() || err.downcast_ref::<Usage>().is_some() {
        ExitCode::from(ERROR)
    } else {
        ExitCode::from(FAILURE)
    }
}
