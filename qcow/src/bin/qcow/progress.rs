//! Progress and interruption for the long commands (convert, commit, rebase, check): an indicatif
//! bar on stderr when it is a terminal, qemu-img's `(NN.NN/100%)` lines on stdout when `-p` is
//! given and stderr is not a terminal, nothing otherwise; Ctrl-C asks the running operation to
//! stop at its next consistent point.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qcow::monitor::Monitor;

/// Set by the Ctrl-C handler.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Exit code after an interruption (128 + SIGINT, what a shell reports for Ctrl-C).
pub const INTERRUPTED_EXIT: u8 = 130;

/// Installs the Ctrl-C handler: the first Ctrl-C asks the operation to stop cleanly, a second one
/// ends the process at once.
pub fn catch_interrupts() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(i32::from(INTERRUPTED_EXIT));
        }
    });
}

/// How progress is shown.
enum Display {
    None,
    Bar(ProgressBar),
    /// qemu-img -p's lines: `    (12.34/100%)\r`, printed at every whole percent.
    Qemu {
        last: f64,
    },
}

/// The CLI's [`Monitor`].
pub struct CliMonitor {
    display: Display,
    total: u64,
}

impl CliMonitor {
    /// `progress` is `-p`; `quiet` is `-q` (which wins).
    pub fn new(progress: bool, quiet: bool) -> CliMonitor {
        let display = if quiet {
            Display::None
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{wide_bar} {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            Display::Bar(bar)
        } else if progress {
            Display::Qemu { last: -1.0 }
        } else {
            Display::None
        };
        CliMonitor { display, total: 0 }
    }

    /// Ends the display (qemu-img ends its progress lines with a newline).
    pub fn finish(&mut self) {
        match &mut self.display {
            Display::None => {}
            Display::Bar(bar) => bar.finish_and_clear(),
            Display::Qemu { .. } => {
                print_qemu(100.0);
                println!();
            }
        }
        self.display = Display::None;
    }
}

fn print_qemu(percent: f64) {
    print!("    ({percent:.2}/100%)\r");
    let _ = std::io::stdout().flush();
}

impl Monitor for CliMonitor {
    fn start(&mut self, total: u64) {
        self.total = total;
        match &mut self.display {
            Display::None => {}
            Display::Bar(bar) => bar.set_length(total),
            Display::Qemu { last } => {
                *last = 0.0;
                print_qemu(0.0);
            }
        }
    }

    fn advance(&mut self, done: u64) {
        match &mut self.display {
            Display::None => {}
            Display::Bar(bar) => bar.set_position(done),
            Display::Qemu { last } => {
                let percent = if self.total == 0 {
                    100.0
                } else {
                    done as f64 * 100.0 / self.total as f64
                };
                if percent - *last >= 1.0 {
                    *last = percent;
                    print_qemu(percent);
                }
            }
        }
    }

    fn cancelled(&self) -> bool {
        INTERRUPTED.load(Ordering::Relaxed)
    }
}

impl Drop for CliMonitor {
    fn drop(&mut self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish_and_clear();
        }
    }
}
