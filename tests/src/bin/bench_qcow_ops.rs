//! Benchmark: the image operations of `qcow` against `qemu-img` in the same run, whole-run time
//! of each process (start to exit, so including the flushes each tool does before it exits):
//! `convert` of a 4 GiB image half full of data (to qcow2, to raw, compressed), `commit` of a
//! 1 GiB overlay, `snapshot -c` on an image with 100k allocated clusters, and `map` (JSON and
//! human) of a 100 GiB `preallocation=metadata` image (1.6M clusters over the file's holes) and of
//! a 4 GiB image with 20k clusters written in random order. Prints a table and saves it with
//! `report` (`target/bench/bench_qcow_ops.md`).
//!
//! Run: `cargo run --release -p cowvm-tests --bin bench_qcow_ops` (or `make bench`). Knobs:
//! `BENCH_REPS` (repetitions, median reported; default 3), `BENCH_DIR` (scratch directory),
//! `QCOW_BIN` (a prebuilt `qcow`; default: the release `qcow` next to this program),
//! `BENCH_ONLY` (run only the workloads whose name contains this text; only their images are made).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cowvm_tests::bench_util::{command_line, env_count, load_average, Row};
use cowvm_tests::qcow_harness::run_with_timeout;
use cowvm_tests::report::BenchReport;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// Virtual size of the convert source; every other MiB holds data.
const SOURCE_SIZE: u64 = 4 * GIB;
/// Size of the commit overlay (all of it written) and of its base.
const OVERLAY_SIZE: u64 = GIB;
/// Allocated clusters of the snapshot image (64 KiB clusters, metadata preallocation).
const SNAPSHOT_CLUSTERS: u64 = 100_000;
/// Virtual size of the metadata-preallocated image `map` reads.
const MAP_SIZE: u64 = 100 * GIB;
/// Virtual size of the scattered image `map` reads, and its 64 KiB clusters written in random
/// order (so few of them lie back to back on the host).
const SCATTERED_SIZE: u64 = 4 * GIB;
const SCATTERED_CLUSTERS: u64 = 20_000;
const LIMIT: Duration = Duration::from_secs(900);

/// One workload: how to set up a run (not timed) and the arguments of the timed command.
struct Workload {
    name: &'static str,
    /// Arguments after the program name; `{dir}` is the scratch directory, `{out}` the output.
    args: &'static [&'static str],
    setup: Setup,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// The output file is removed before each run.
    FreshOutput,
    /// The commit pair is copied from its template before each run.
    CommitPair,
    /// The snapshot image is copied from its template before each run.
    SnapshotImage,
    /// Nothing changes; the two tools' outputs must be identical.
    ReadOnly,
}

struct Bench {
    qcow: PathBuf,
    dir: tempfile::TempDir,
    reps: usize,
}

fn main() -> Result<()> {
    if !cowvm_tests::have_qemu_img() {
        println!("SKIP: qemu-img not installed");
        return Ok(());
    }
    let started = Instant::now();
    let reps = env_count("BENCH_REPS", 3)?;
    let qcow = qcow_binary()?;
    let dir = match std::env::var_os("BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .context("create the scratch directory")?;
    let bench = Bench { qcow, dir, reps };
    println!(
        "scratch {} · {reps} repetitions (median) · load {}",
        bench.dir.path().display(),
        load_average()
    );
    let workloads = [
        Workload {
            name: "convert 4 GiB (2 GiB data) → qcow2",
            args: &["convert", "-O", "qcow2", "{dir}/source.qcow2", "{out}"],
            setup: Setup::FreshOutput,
        },
        Workload {
            name: "convert 4 GiB (2 GiB data) → raw",
            args: &["convert", "-O", "raw", "{dir}/source.qcow2", "{out}"],
            setup: Setup::FreshOutput,
        },
        Workload {
            name: "convert 4 GiB (2 GiB data) → compressed qcow2 (-c)",
            args: &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "{dir}/source.qcow2",
                "{out}",
            ],
            setup: Setup::FreshOutput,
        },
        Workload {
            name: "commit 1 GiB overlay into its base",
            args: &["commit", "{dir}/run-top.qcow2"],
            setup: Setup::CommitPair,
        },
        Workload {
            name: "snapshot -c, 100k allocated clusters",
            args: &["snapshot", "-c", "bench", "{dir}/run-snap.qcow2"],
            setup: Setup::SnapshotImage,
        },
        Workload {
            name: "map --output=json, 100 GiB preallocation=metadata",
            args: &["map", "--output=json", "{dir}/map.qcow2"],
            setup: Setup::ReadOnly,
        },
        Workload {
            name: "map, 100 GiB preallocation=metadata",
            args: &["map", "{dir}/map.qcow2"],
            setup: Setup::ReadOnly,
        },
        Workload {
            name: "map --output=json, 4 GiB, 20k scattered clusters",
            args: &["map", "--output=json", "{dir}/scattered.qcow2"],
            setup: Setup::ReadOnly,
        },
        Workload {
            name: "map, 4 GiB, 20k scattered clusters",
            args: &["map", "{dir}/scattered.qcow2"],
            setup: Setup::ReadOnly,
        },
    ];
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let workloads: Vec<&Workload> = workloads
        .iter()
        .filter(|w| w.name.contains(only.as_str()))
        .collect();
    ensure!(
        !workloads.is_empty(),
        "BENCH_ONLY={only} matches no workload"
    );
    for setup in [
        Setup::FreshOutput,
        Setup::CommitPair,
        Setup::SnapshotImage,
        Setup::ReadOnly,
    ] {
        if workloads.iter().any(|w| w.setup == setup) {
            bench.prepare(setup)?;
        }
    }
    println!(
        "images prepared in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let mut rows = Vec::new();
    let mut lines = Vec::new();
    for workload in workloads {
        let qemu = bench.measure(Path::new("qemu-img"), workload)?;
        let ours = bench.measure(&bench.qcow, workload)?;
        let ratio = qemu.median() / ours.median();
        let line = format!(
            "{:<52} qemu-img {:>8.3} s | qcow {:>8.3} s | qcow/qemu-img speed {ratio:.2}",
            workload.name,
            qemu.median(),
            ours.median()
        );
        println!("{line}");
        lines.push((workload.name, qemu.median(), ours.median(), ratio));
        rows.push(qemu);
        rows.push(ours);
    }
    let report = markdown(&bench, &rows, &lines, started.elapsed());
    let context = report
        .split_once('\n')
        .map_or(report.as_str(), |(_, rest)| rest)
        .trim()
        .to_string();
    BenchReport {
        name: "bench_qcow_ops".into(),
        title: "qcow image operations vs qemu-img".into(),
        command: "cargo run --release -p cowvm-tests --bin bench_qcow_ops".into(),
        context,
        rows,
        checks: lines
            .iter()
            .map(|(name, _, _, ratio)| {
                (
                    format!("{name}: qcow speed / qemu-img (target ≥ 1.0)"),
                    format!("{ratio:.2}"),
                )
            })
            .collect(),
        plots: Vec::new(),
    }
    .save()?;
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What the workloads of `setup` start from, made by qemu-img: the source of the
    /// conversions (semi-compressible data in every other MiB of 4 GiB), the commit pair
    /// template, the snapshot image template, or the images `map` reads.
    fn prepare(&self, setup: Setup) -> Result<()> {
        match setup {
            Setup::FreshOutput => self.prepare_source(),
            Setup::CommitPair => self.prepare_commit(),
            Setup::SnapshotImage => self.prepare_snapshot(),
            Setup::ReadOnly => self.prepare_map(),
        }
    }

    fn prepare_map(&self) -> Result<()> {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            path_str(&self.path("map.qcow2"))?,
            &MAP_SIZE.to_string(),
        ])?;
        let scattered = self.path("scattered.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            path_str(&scattered)?,
            &SCATTERED_SIZE.to_string(),
        ])?;
        // Distinct clusters in a fixed pseudo-random order: a step coprime to the cluster count.
        let clusters = SCATTERED_SIZE / 65536;
        let mut commands = String::new();
        for i in 0..SCATTERED_CLUSTERS {
            let cluster = (i * 40_503 + 7) % clusters;
            writeln!(commands, "write -P {} {} 64k", i % 250 + 1, cluster * 65536)?;
        }
        // `-t unsafe`: no flush per write; this is setup, not the thing measured.
        let mut child = Command::new("qemu-io")
            .args(["-t", "unsafe", "-f", "qcow2", path_str(&scattered)?])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("run qemu-io")?;
        std::io::Write::write_all(
            child.stdin.as_mut().context("qemu-io's stdin")?,
            commands.as_bytes(),
        )
        .context("feed qemu-io")?;
        drop(child.stdin.take());
        let status = child.wait().context("wait for qemu-io")?;
        ensure!(
            status.success(),
            "qemu-io failed writing the scattered image"
        );
        Ok(())
    }

    fn prepare_source(&self) -> Result<()> {
        let raw = self.path("source.raw");
        write_half_full(&raw, SOURCE_SIZE)?;
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            path_str(&raw)?,
            path_str(&self.path("source.qcow2"))?,
        ])?;
        std::fs::remove_file(&raw).context("remove the raw source")
    }

    fn prepare_commit(&self) -> Result<()> {
        let base = self.path("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base)?, "1G"])?;
        let top = self.path("top.qcow2");
        let top_raw = self.path("top.raw");
        write_full(&top_raw, OVERLAY_SIZE)?;
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            path_str(&top)?,
        ])?;
        // Fill the overlay through qemu-img convert -n into the existing overlay.
        qemu_img(&[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "qcow2",
            path_str(&top_raw)?,
            path_str(&top)?,
        ])?;
        std::fs::remove_file(&top_raw).context("remove the raw overlay data")
    }

    fn prepare_snapshot(&self) -> Result<()> {
        let snap = self.path("snap.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            path_str(&snap)?,
            &(SNAPSHOT_CLUSTERS * 65536).to_string(),
        ])
    }

    fn setup(&self, setup: Setup) -> Result<()> {
        match setup {
            Setup::FreshOutput => {
                let _ = std::fs::remove_file(self.path("out.img"));
            }
            Setup::CommitPair => {
                copy_sparse(&self.path("base.qcow2"), &self.path("run-base.qcow2"))?;
                copy_sparse(&self.path("top.qcow2"), &self.path("run-top.qcow2"))?;
                // The copy points at base.qcow2: rewrite the name to the run's base.
                qemu_img(&[
                    "rebase",
                    "-u",
                    "-b",
                    "run-base.qcow2",
                    "-F",
                    "qcow2",
                    path_str(&self.path("run-top.qcow2"))?,
                ])?;
            }
            Setup::SnapshotImage => {
                copy_sparse(&self.path("snap.qcow2"), &self.path("run-snap.qcow2"))?;
            }
            Setup::ReadOnly => {}
        }
        // Dirty pages of the setup (or of the previous run) must not be flushed on the clock.
        let status = Command::new("sync").status().context("sync")?;
        ensure!(status.success(), "sync failed");
        Ok(())
    }

    /// Median of `reps` whole-process runs of `program` (one unrecorded warm-up run first, so
    /// both tools read from a warm page cache).
    fn measure(&self, program: &Path, workload: &Workload) -> Result<Row> {
        let dir = path_str(self.dir.path())?.to_string();
        let out = path_str(&self.path("out.img"))?.to_string();
        let args: Vec<String> = workload
            .args
            .iter()
            .map(|a| a.replace("{dir}", &dir).replace("{out}", &out))
            .collect();
        let mut values = Vec::new();
        for rep in 0..=self.reps {
            self.setup(workload.setup)?;
            let started = Instant::now();
            let result = run_with_timeout(Command::new(program).args(&args), LIMIT);
            let seconds = started.elapsed().as_secs_f64();
            if !result.success() {
                bail!("benchmark run failed\n{}", result.describe());
            }
            if rep > 0 {
                values.push(seconds);
            }
        }
        self.verify(workload, &args)?;
        let tool = if program == Path::new("qemu-img") {
            "qemu-img"
        } else {
            "qcow"
        };
        Ok(Row::noted(
            format!("{} — {tool}", workload.name),
            "s",
            values,
            String::new(),
            command_line(program, &args),
        ))
    }

    /// The last run's result is what it should be: the conversion equals the source, the commit
    /// put the overlay's data into the base, the snapshot exists, `map` prints what qemu-img prints;
    /// every qcow2 result is clean.
    fn verify(&self, workload: &Workload, args: &[String]) -> Result<()> {
        let check = |path: &Path| -> Result<()> {
            let out = run_with_timeout(
                Command::new("qemu-img").args(["check", path_str(path)?]),
                LIMIT,
            );
            ensure!(out.success(), "qemu-img check failed\n{}", out.describe());
            Ok(())
        };
        match workload.setup {
            Setup::FreshOutput => {
                let out = self.path("out.img");
                let compare = run_with_timeout(
                    Command::new("qemu-img").args([
                        "compare",
                        path_str(&self.path("source.qcow2"))?,
                        path_str(&out)?,
                    ]),
                    LIMIT,
                );
                ensure!(
                    compare.success(),
                    "converted image differs\n{}",
                    compare.describe()
                );
                if workload.args.contains(&"qcow2") {
                    check(&out)?;
                }
            }
            Setup::CommitPair => {
                let base = self.path("run-base.qcow2");
                check(&base)?;
                check(&self.path("run-top.qcow2"))?;
                let compare = run_with_timeout(
                    Command::new("qemu-img").args([
                        "compare",
                        path_str(&base)?,
                        path_str(&self.path("top.qcow2"))?,
                    ]),
                    LIMIT,
                );
                ensure!(
                    compare.success(),
                    "committed base differs\n{}",
                    compare.describe()
                );
            }
            Setup::SnapshotImage => {
                let snap = self.path("run-snap.qcow2");
                check(&snap)?;
                let list = run_with_timeout(
                    Command::new("qemu-img").args(["snapshot", "-l", path_str(&snap)?]),
                    LIMIT,
                );
                ensure!(
                    list.stdout.contains(" bench "),
                    "no snapshot\n{}",
                    list.describe()
                );
            }
            Setup::ReadOnly => {
                let qemu = run_with_timeout(Command::new("qemu-img").args(args), LIMIT);
                let ours = run_with_timeout(Command::new(&self.qcow).args(args), LIMIT);
                ensure!(
                    qemu.success() && ours.success() && qemu.stdout == ours.stdout,
                    "qcow's output differs from qemu-img's\n{}\n{}",
                    qemu.describe(),
                    ours.describe()
                );
            }
        }
        Ok(())
    }
}

/// A sparse raw file of `size` bytes with data in every other MiB: per 4 KiB, half
/// pseudo-random bytes and half a repeated text line, so it compresses to about half.
fn write_half_full(path: &Path, size: u64) -> Result<()> {
    write_pattern(path, size, 2)
}

/// A raw file of `size` bytes of the same data in every MiB.
fn write_full(path: &Path, size: u64) -> Result<()> {
    write_pattern(path, size, 1)
}

fn write_pattern(path: &Path, size: u64, every: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    file.set_len(size).context("size the raw file")?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let text = b"qcow2 benchmark data: a line of text that repeats and compresses well. ";
    let mut chunk = vec![0u8; MIB as usize];
    for index in 0..size / MIB {
        if index % every != 0 {
            continue;
        }
        for block in chunk.chunks_mut(4096) {
            let (random, repeated) = block.split_at_mut(2048);
            for byte in random.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            for (i, byte) in repeated.iter_mut().enumerate() {
                *byte = text[i % text.len()];
            }
        }
        file.write_all_at(&chunk, index * MIB)
            .context("write the raw file")?;
    }
    Ok(())
}

fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp")
        .args(["--sparse=always", path_str(from)?, path_str(to)?])
        .status()
        .context("cp")?;
    ensure!(status.success(), "cp {} failed", from.display());
    Ok(())
}

fn qemu_img(args: &[&str]) -> Result<()> {
    let out = run_with_timeout(Command::new("qemu-img").args(args), LIMIT);
    if !out.success() {
        bail!("qemu-img failed\n{}", out.describe());
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("scratch path is not UTF-8")
}

/// `QCOW_BIN`, or the release `qcow` next to this program (`make bench` builds it first).
fn qcow_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("QCOW_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let path = exe.parent().context("binary directory")?.join("qcow");
    ensure!(
        path.exists(),
        "{} is not built: run `cargo build --release -p qcow` (make bench does) first",
        path.display()
    );
    Ok(path)
}

fn markdown(
    bench: &Bench,
    rows: &[Row],
    lines: &[(&str, f64, f64, f64)],
    elapsed: Duration,
) -> String {
    let qemu_version = Command::new("qemu-img")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|text| text.lines().next().map(str::to_string))
        .unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "# qcow image operations vs qemu-img\n");
    let _ = writeln!(
        md,
        "Produced by `cargo run --release -p cowvm-tests --bin bench_qcow_ops` ({qemu_version}; \
         {} repetitions after a warm-up run, median; {} s in all). Times are whole processes, \
         start to exit, so they include the flushes each tool makes before exiting (qemu-img \
         convert's default cache mode is `unsafe`, no final flush; qcow convert's too). \
         `sync` runs before every timed run. Every result is checked: conversions \
         `qemu-img compare`-equal to the source, commits equal to the overlay, qcow2 results \
         `qemu-img check` clean, `map` output identical to qemu-img's.\n",
        bench.reps,
        elapsed.as_secs()
    );
    let _ = writeln!(
        md,
        "| workload | qemu-img (s) | qcow (s) | qcow speed / qemu-img |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (name, qemu, ours, ratio) in lines {
        let _ = writeln!(md, "| {name} | {qemu:.3} | {ours:.3} | {ratio:.2} |");
    }
    let _ = writeln!(md, "\nAll runs (seconds) and commands:\n");
    for row in rows {
        let values: Vec<String> = row.values.iter().map(|v| format!("{v:.3}")).collect();
        let _ = writeln!(
            md,
            "- {}: [{}] — `{}`",
            row.what,
            values.join(", "),
            row.command
        );
    }
    md
}
