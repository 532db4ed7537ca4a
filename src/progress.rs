//! What the user sees while a command works: bars on a terminal, plain lines otherwise,
//! nothing with `-q`. Everything goes to stderr; stdout is kept for results.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    quiet: bool,
    verbose: bool,
    bars: Option<MultiProgress>,
    /// Put before every line (`[ntfy] `) when several containers share the terminal.
    prefix: String,
}

impl Progress {
    pub fn new(quiet: bool, verbose: bool) -> Progress {
        let bars = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Progress { quiet, verbose, bars, prefix: String::new() }
    }

    /// The same output, each line marked as being about `name`.
    pub fn for_item(&self, name: &str) -> Progress {
        Progress { prefix: format!("{}[{name}] ", self.prefix), ..self.clone() }
    }

    pub fn verbose(&self) -> bool {
        self.verbose
    }

    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// A status line (`pulling nixos/nix:2.33.3`).
    pub fn info(&self, msg: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        self.always(format!("{}{}", self.prefix, msg.as_ref()));
    }

    /// A warning: shown even with `-q`, since it is about the result.
    pub fn warn(&self, msg: impl AsRef<str>) {
        self.always(format!("{}warning: {}", self.prefix, msg.as_ref()));
    }

    /// One item's error in a run that goes on: shown even with `-q`.
    pub fn error(&self, msg: impl AsRef<str>) {
        self.always(format!("{}error: {}", self.prefix, msg.as_ref()));
    }

    fn always(&self, line: String) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(line);
            }
            None => {
                use std::io::Write;
                // stderr gone (a closed pipe) is no reason to fail the work.
                let _ = writeln!(std::io::stderr(), "{line}");
            }
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

/// A byte count as people write it, in IEC units (the one size format nixctr prints).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_like_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
