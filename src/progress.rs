//! What the user sees while a command works: bars on a terminal, plain lines otherwise,
//! nothing with `-q`. Everything goes to stderr; stdout is kept for results.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    quiet: bool,
    verbose: bool,
    bars: Option<MultiProgress>,
}

impl Progress {
    pub fn new(quiet: bool, verbose: bool) -> Progress {
        let bars = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Progress { quiet, verbose, bars }
    }

    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// A status line (`pulling nixos/nix:2.33.3`).
    pub fn info(&self, msg: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(msg.as_ref());
            }
            None => eprintln!("{}", msg.as_ref()),
        }
    }

    /// A line shown only with `-v`.
    pub fn debug(&self, msg: impl AsRef<str>) {
        if self.verbose {
            self.info(msg);
        }
    }

    /// A byte counter for one transfer; hidden unless on a terminal.
    pub fn bar(&self, label: &str, total: Option<u64>) -> ProgressBar {
        let Some(bars) = &self.bars else {
            return ProgressBar::hidden();
        };
        let bar = match total {
            Some(total) => ProgressBar::new(total).with_style(
                ProgressStyle::with_template("{prefix:>20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            ),
            None => ProgressBar::no_length().with_style(
                ProgressStyle::with_template("{prefix:>20} {spinner} {bytes} {bytes_per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        bar.set_prefix(label.to_string());
        bars.add(bar)
    }
}
