//! Helpers shared by the benchmark programs (`src/bin/bench_*.rs`): medians, command lines,
//! the machine's load, and where the built `cowvm` is.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

/// A `cowvm` process that is killed (by its pid) and reaped when this drops.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory removed with everything in it when this drops.
#[derive(Debug)]
pub struct ScratchDir(pub PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl ScratchDir {
    /// `BENCH_SCRATCH` (or the temp dir) / `NAME-PID`, created.
    pub fn create(name: &str) -> Result<Self> {
        let base = std::env::var_os("BENCH_SCRATCH").map_or_else(std::env::temp_dir, PathBuf::from);
        let dir = base.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

/// One table row: a label, its runs, an optional note, and the command that produced them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub what: String,
    pub unit: String,
    pub values: Vec<f64>,
    pub note: String,
    pub command: String,
}

impl Row {
    pub fn new(what: &str, unit: &str, values: Vec<f64>, command: &str) -> Self {
        Self::noted(
            what.to_string(),
            unit,
            values,
            String::new(),
            command.to_string(),
        )
    }

    pub fn noted(
        what: String,
        unit: &str,
        values: Vec<f64>,
        note: String,
        command: String,
    ) -> Self {
        Self {
            what,
            unit: unit.to_string(),
            values,
            note,
            command,
        }
    }

    pub fn median(&self) -> f64 {
        median(&self.values)
    }

    pub fn min(&self) -> f64 {
        self.values.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.values
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn command_line<S: AsRef<str>>(program: &Path, argv: &[S]) -> String {
    let mut line = program.display().to_string();
    for arg in argv {
        let arg = arg.as_ref();
        if arg.contains(' ') {
            let _ = write!(line, " \"{arg}\"");
        } else {
            let _ = write!(line, " {arg}");
        }
    }
    line
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_string(),
        |text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

pub fn env_count(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(text) => {
            let n: usize = text
                .parse()
                .with_context(|| format!("{name}={text} is not a number"))?;
            ensure!(n > 0, "{name} must be at least 1");
            Ok(n)
        }
        Err(_) => Ok(default),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `COWVM_BIN`, or `cowvm` next to this program (target/<profile>/; one level up from deps/ if
/// run from there).
pub fn cowvm_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("COWVM_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().context("bench binary has no directory")?;
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir = dir.parent().context("deps/ has no parent")?;
    }
    let path = dir.join("cowvm");
    ensure!(
        path.exists(),
        "{} is not built: run `cargo build --release -p vmm -p cowvm-tests` (make bench does) first",
        path.display()
    );
    Ok(path)
}

/// One `key=value` figure of a `timings:` line.
pub fn timing_field(line: &str, key: &str) -> Result<f64> {
    let value = line
        .split_ascii_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .with_context(|| format!("no {key} in {line:?}"))?;
    value
        .parse()
        .with_context(|| format!("{key}={value} is not a number"))
}
