//! Twin runs for the drop-in tests: one command line through `qemu-img` and through `qcow`, each
//! in its own scratch directory holding the same files, compared byte for byte (stdout, stderr
//! with the program name normalised, exit status, and the files left behind).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::qcow_harness::{run_with_timeout, RunOutput, TOOL_TIMEOUT};

/// The name `qcow` is invoked as in twin runs (its messages start with it).
pub const QCOW_NAME: &str = "qcow";

/// Replaces the program name where qemu-img prints it — `NAME: …` (error reports),
/// `NAME COMMAND: …` (option errors) and `Try 'NAME …` (the help hint) — with `PROG`.
pub fn normalise(text: &str, name: &str) -> String {
    text.split_inclusive('\n')
        .map(|raw| {
            let (line, end) = match raw.strip_suffix('\n') {
                Some(line) => (line, "\n"),
                None => (raw, ""),
            };
            let mut line = line.to_string();
            if let Some(rest) = line.strip_prefix(&format!("{name}: ")) {
                line = format!("PROG: {rest}");
            } else if let Some(rest) = line.strip_prefix(&format!("{name} ")) {
                if rest
                    .split_once(": ")
                    .is_some_and(|(word, _)| !word.contains(' '))
                {
                    line = format!("PROG {rest}");
                }
            }
            line.replace(&format!("Try '{name} "), "Try 'PROG ") + end
        })
        .collect()
}

/// Two scratch directories with the same contents, one per tool.
#[derive(Debug)]
pub struct Twin {
    qemu: tempfile::TempDir,
    qcow: tempfile::TempDir,
}

/// What one tool printed and returned, with its program name normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Seen {
    fn from(out: &RunOutput, name: &str) -> Seen {
        Seen {
            code: out.code,
            stdout: normalise(&out.stdout, name),
            stderr: normalise(&out.stderr, name),
        }
    }
}

impl Default for Twin {
    fn default() -> Self {
        Twin::new()
    }
}

impl Twin {
    pub fn new() -> Twin {
        Twin {
            qemu: tempfile::tempdir().expect("scratch dir"),
            qcow: tempfile::tempdir().expect("scratch dir"),
        }
    }

    /// The qemu-img side's directory.
    pub fn qemu_dir(&self) -> &Path {
        self.qemu.path()
    }

    /// The qcow side's directory.
    pub fn qcow_dir(&self) -> &Path {
        self.qcow.path()
    }

    /// Runs `prepare` once per directory (to create the same starting files in both).
    pub fn prepare(&self, prepare: impl Fn(&Path)) {
        prepare(self.qemu.path());
        prepare(self.qcow.path());
    }

    /// Runs `qemu-img ARGS` in the qemu directory and `qcow ARGS` in the qcow one.
    pub fn run(&self, args: &[&str]) -> (RunOutput, RunOutput) {
        let qemu = run_with_timeout(
            Command::new("qemu-img")
                .args(args)
                .current_dir(self.qemu.path()),
            TOOL_TIMEOUT,
        );
        let qcow = run_with_timeout(
            Command::new(crate::bin_path("qcow"))
                .arg0(QCOW_NAME)
                .args(args)
                .current_dir(self.qcow.path()),
            TOOL_TIMEOUT,
        );
        (qemu, qcow)
    }

    /// Runs `args` through both tools and returns a description of every difference in output,
    /// exit status or files left behind (empty when the tools agree).
    pub fn differences(&self, args: &[&str]) -> Vec<String> {
        let (qemu, qcow) = self.run(args);
        let expected = Seen::from(&qemu, "qemu-img");
        let actual = Seen::from(&qcow, QCOW_NAME);
        let mut differences = Vec::new();
        let line = args.join(" ");
        if expected.code != actual.code {
            differences.push(format!(
                "`{line}`: exit {:?} (qemu-img) vs {:?} (qcow)",
                expected.code, actual.code
            ));
        }
        for (what, want, got) in [
            ("stdout", &expected.stdout, &actual.stdout),
            ("stderr", &expected.stderr, &actual.stderr),
        ] {
            if want != got {
                differences.push(format!(
                    "`{line}`: {what} differs\n--- qemu-img\n{want}--- qcow\n{got}---"
                ));
            }
        }
        differences.extend(self.file_differences(&line));
        differences
    }

    /// Files whose bytes differ between the two directories (or exist in one only).
    pub fn file_differences(&self, context: &str) -> Vec<String> {
        let mut names: Vec<PathBuf> = Vec::new();
        for dir in [self.qemu.path(), self.qcow.path()] {
            for entry in std::fs::read_dir(dir).expect("read scratch dir").flatten() {
                let name = PathBuf::from(entry.file_name());
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names.sort();
        let mut differences = Vec::new();
        for name in names {
            let qemu = std::fs::read(self.qemu.path().join(&name)).ok();
            let qcow = std::fs::read(self.qcow.path().join(&name)).ok();
            if qemu != qcow {
                let describe = |bytes: &Option<Vec<u8>>| match bytes {
                    Some(b) => format!("{} bytes", b.len()),
                    None => "missing".to_string(),
                };
                differences.push(format!(
                    "`{context}`: file {} differs: {} (qemu-img) vs {} (qcow)",
                    name.display(),
                    describe(&qemu),
                    describe(&qcow)
                ));
            }
        }
        differences
    }

    /// Panics with every difference unless both tools behaved identically.
    pub fn assert_same(&self, args: &[&str]) {
        let differences = self.differences(args);
        assert!(differences.is_empty(), "{}", differences.join("\n"));
    }
}

/// Runs every command line of `table` (whitespace-separated arguments) through a fresh twin
/// prepared by `prepare`, and panics listing all that differ.
pub fn assert_table(table: &[&str], prepare: impl Fn(&Path)) {
    let mut failures = Vec::new();
    for line in table {
        let twin = Twin::new();
        twin.prepare(&prepare);
        let args: Vec<&str> = line.split_whitespace().collect();
        failures.extend(twin.differences(&args));
    }
    assert_no_failures(&failures, table.len());
}

impl Twin {
    /// [`assert_table`] for command lines that change no file, so that one prepared twin serves
    /// them all.
    pub fn assert_table_read_only(&self, table: &[&str]) {
        let failures: Vec<String> = table
            .iter()
            .flat_map(|line| self.differences(&line.split_whitespace().collect::<Vec<_>>()))
            .collect();
        assert_no_failures(&failures, table.len());
    }
}

fn assert_no_failures(failures: &[String], lines: usize) {
    assert!(
        failures.is_empty(),
        "{} of {lines} command lines differ from qemu-img:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Runs `qemu-img ARGS` in `dir` and panics unless it succeeds (to prepare scratch files).
pub fn qemu_img_in(dir: &Path, args: &[&str]) {
    let out = run_with_timeout(
        Command::new("qemu-img").args(args).current_dir(dir),
        TOOL_TIMEOUT,
    );
    assert!(
        out.success(),
        "preparing with qemu-img failed\n{}",
        out.describe()
    );
}

/// Runs `qemu-io -f FORMAT -c CMD… IMAGE` in `dir` and panics unless it succeeds.
pub fn qemu_io_in(dir: &Path, format: &str, image: &str, commands: &[&str]) {
    let mut command = Command::new("qemu-io");
    command.arg("-f").arg(format);
    for c in commands {
        command.arg("-c").arg(c);
    }
    let out = run_with_timeout(command.arg(image).current_dir(dir), TOOL_TIMEOUT);
    assert!(out.success(), "qemu-io failed\n{}", out.describe());
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn program_names_are_normalised_only_where_qemu_img_prints_them() {
        assert_eq!(
            normalise(
                "qcow: x.qcow2: bad\nqcow info: invalid option -- 'z'\nTry 'qcow info --help' for more info\nqcow2 is a format\n",
                "qcow"
            ),
            "PROG: x.qcow2: bad\nPROG info: invalid option -- 'z'\nTry 'PROG info --help' for more info\nqcow2 is a format\n"
        );
    }
}
