//! The name the tool was invoked as, and qemu-img's three ways of ending a command with an error.
//!
//! qemu-img prefixes its messages with the base name of `argv[0]` (`qemu-img: …`), while glibc's
//! option errors and the `Try '… --help'` hint use `argv[0]` as given. Installed or linked as
//! `qemu-img`, `qcow` therefore prints exactly what qemu-img prints.

use std::process::ExitCode;
use std::sync::OnceLock;

static ARGV0: OnceLock<String> = OnceLock::new();

/// Records `argv[0]`; later calls are ignored.
pub fn init(argv0: &str) {
    let _ = ARGV0.set(argv0.to_string());
}

/// `argv[0]` as given.
pub fn argv0() -> &'static str {
    ARGV0.get().map(String::as_str).unwrap_or("qcow")
}

/// The base name of `argv[0]`: the prefix of every error message.
pub fn name() -> &'static str {
    let argv0 = argv0();
    argv0
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(argv0)
}

/// How a command failed, which decides how the message is printed. Every failure exits 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fail {
    /// `name: message` (qemu's `error_report`).
    Report(String),
    /// `name: message` then the `Try '… --help'` hint (qemu-img's `error_exit`).
    Usage(String),
    /// glibc's option-parser message, `argv0 command: message`, then the hint.
    Getopt(String),
}

impl Fail {
    /// Prints the failure for `command` (`None` at the top level) and returns exit code 1.
    pub fn print(&self, command: Option<&str>) -> ExitCode {
        let hint_target = match command {
            Some(command) => format!("{} {command}", argv0()),
            None => argv0().to_string(),
        };
        match self {
            Fail::Report(message) => eprintln!("{}: {message}", name()),
            Fail::Usage(message) => {
                eprintln!("{}: {message}", name());
                eprintln!("Try '{hint_target} --help' for more info");
            }
            Fail::Getopt(message) => {
                eprintln!("{hint_target}: {message}");
                eprintln!("Try '{hint_target} --help' for more info");
            }
        }
        ExitCode::from(1)
    }
}

impl From<String> for Fail {
    fn from(message: String) -> Fail {
        Fail::Report(message)
    }
}
