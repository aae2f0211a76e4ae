//! Benchmark: `qcow bench` against `qemu-img bench` on the same workloads, same files, same flags;
//! prints a table and saves it with `report` (`target/bench/bench_qcow.md`). Two times per run: the
//! "Run completed" figure both tools print (the requests only; it stops before the final flush,
//! where qcow writes its deferred L2 and refcount updates) and the whole process, start to exit,
//! including that flush. Both are reported side by side; the whole-run ratio is the honest one.
//!
//! Run: `cargo run --release -p cowvm-tests --bin bench_qcow` (or `make bench`). Knobs:
//! `BENCH_REPS` (repetitions, median reported; default 3), `BENCH_DEPTH` (`-d` for both tools;
//! default 1 because `qcow bench` issues requests one at a time), `BENCH_DIR` (scratch directory,
//! default the system temp dir), `QCOW_BIN` (a prebuilt `qcow`; default: build it in release).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cowvm_tests::bench_util::{median, Row as BenchRow};
use cowvm_tests::qcow_harness::run_with_timeout;
use cowvm_tests::report::BenchReport;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Virtual size of the images for the scattered 4 KiB workloads.
const SCATTER_DISK: u64 = 4 * GIB;
/// Stride of the scattered workloads: 127 × 4 KiB, larger than a 64 KiB cluster and not a multiple
/// of it, so every request lands in a new cluster at a varying offset inside it. qemu-img bench has
/// no random mode; a large stride over a large disk stands in for random I/O. Counts stay below
/// `SCATTER_DISK / SCATTER_STEP` so offsets never wrap (qemu-img 10.0 and later wrap differently).
const SCATTER_STEP: u64 = 127 * 4 * KIB;
/// Blocks of the filled image written at the scattered offsets (and read back by the read workload).
const SCATTER_FILLED: u64 = 8000;
const _: () = assert!(
    SCATTER_FILLED * SCATTER_STEP < SCATTER_DISK,
    "scattered offsets must not wrap"
);
/// Size of the images for the sequential 1 MiB read workload.
const SEQ_READ_DISK: u64 = 512 * MIB;
const TOOL_LIMIT: Duration = Duration::from_secs(300);

/// Which program runs a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    /// qemu-img bench at the same depth as qcow (`BENCH_DEPTH`).
    QemuImg,
    /// qemu-img bench at its own default depth (64), for reference.
    QemuImgDefaultDepth,
    Qcow,
}

/// One workload's results.
#[derive(Debug)]
struct Row {
    workload: Workload,
    qemu: Measurement,
    qemu_deep: Measurement,
    qcow: Measurement,
}

/// The raw-file baseline for sequential reads.
#[derive(Debug)]
struct RawRow {
    qemu: Measurement,
}

/// One workload: what to pass to both tools, and how to prepare a fresh image for each run.
#[derive(Debug, Clone)]
struct Workload {
    name: &'static str,
    write: bool,
    count: u64,
    buffer: u64,
    step: u64,
    /// Invocations per measurement, timings summed (reads repeat the same offsets, so a short
    /// disk still gives a run long enough to time).
    passes: u64,
    /// Image to use; `Fresh*` ones are recreated before every run.
    image: ImageKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageKind {
    /// Empty qcow2 of `SCATTER_DISK`.
    FreshEmpty,
    /// Empty qcow2 overlay over the filled backing image.
    FreshOverlay,
    /// The filled image (read-only workloads).
    Filled,
    /// A qcow2 holding `SEQ_READ_DISK` of data written sequentially.
    SequentialQcow2,
    /// The same data as a raw file.
    SequentialRaw,
}

/// A measured run: median seconds over the repetitions.
#[derive(Debug, Clone)]
struct Measurement {
    /// "Run completed" seconds (requests only).
    seconds: f64,
    all: Vec<f64>,
    /// Whole-process seconds, start to exit (includes the final flush).
    whole: f64,
    whole_all: Vec<f64>,
}

impl Measurement {
    fn iops(&self, workload: &Workload) -> f64 {
        (workload.count * workload.passes) as f64 / self.seconds
    }

    fn mb_per_s(&self, workload: &Workload) -> f64 {
        (workload.count * workload.passes * workload.buffer) as f64 / self.seconds / 1e6
    }

    /// The row for `bench_util`'s report: whole-run seconds of every repetition.
    fn row(&self, workload: &Workload, tool: &str) -> BenchRow {
        BenchRow::noted(
            format!("{} — {tool}, whole run", workload.name),
            "s",
            self.whole_all.clone(),
            format!(
                "\"Run completed\" median {:.3} s (requests only, before the final flush)",
                self.seconds
            ),
            format!("{tool} bench (see the table for the flags)"),
        )
    }
}

struct Bench {
    qcow: PathBuf,
    dir: tempfile::TempDir,
    reps: usize,
    depth: u64,
}

fn main() -> Result<()> {
    if !cowvm_tests::have_qemu_img() {
        println!("SKIP: qemu-img not installed");
        return Ok(());
    }
    let started = Instant::now();
    let reps = env_number("BENCH_REPS", 3)? as usize;
    let depth = env_number("BENCH_DEPTH", 1)?;
    let qcow = qcow_binary()?;
    let dir = match std::env::var_os("BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .context("create the scratch directory")?;
    let bench = Bench {
        qcow,
        dir,
        reps,
        depth,
    };
    println!(
        "scratch {} · {} repetitions (median) · depth {} · cache writeback for both",
        bench.dir.path().display(),
        reps,
        depth
    );
    bench.prepare()?;
    println!(
        "images prepared in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let workload = |name, write, count, buffer, step, passes, image| Workload {
        name,
        write,
        count,
        buffer,
        step,
        passes,
        image,
    };
    let workloads = [
        workload(
            "4 KiB scattered writes, fresh image",
            true,
            5_000,
            4 * KIB,
            SCATTER_STEP,
            1,
            ImageKind::FreshEmpty,
        ),
        workload(
            "4 KiB sequential writes, fresh image",
            true,
            15_000,
            4 * KIB,
            4 * KIB,
            1,
            ImageKind::FreshEmpty,
        ),
        workload(
            "4 KiB scattered writes, fresh overlay on filled backing",
            true,
            2_000,
            4 * KIB,
            SCATTER_STEP,
            1,
            ImageKind::FreshOverlay,
        ),
        workload(
            "4 KiB sequential writes, fresh overlay on filled backing",
            true,
            15_000,
            4 * KIB,
            4 * KIB,
            1,
            ImageKind::FreshOverlay,
        ),
        workload(
            "4 KiB scattered reads, allocated image",
            false,
            SCATTER_FILLED,
            4 * KIB,
            SCATTER_STEP,
            6,
            ImageKind::Filled,
        ),
        workload(
            "1 MiB sequential reads, allocated image",
            false,
            SEQ_READ_DISK / MIB,
            MIB,
            MIB,
            6,
            ImageKind::SequentialQcow2,
        ),
    ];

    let mut rows = Vec::new();
    for workload in &workloads {
        let row = Row {
            qemu: bench.measure(Tool::QemuImg, workload)?,
            qemu_deep: bench.measure(Tool::QemuImgDefaultDepth, workload)?,
            qcow: bench.measure(Tool::Qcow, workload)?,
            workload: workload.clone(),
        };
        println!(
            "{:<58} run completed: qemu-img {:>8.0} IOPS, qcow {:>8.0} IOPS, ratio {:.2} (vs -d 64: {:.2}) | whole run incl. flush: qemu-img {:.3} s, qcow {:.3} s, ratio {:.2} (vs -d 64: {:.2})",
            workload.name,
            row.qemu.iops(workload),
            row.qcow.iops(workload),
            row.qemu.seconds / row.qcow.seconds,
            row.qemu_deep.seconds / row.qcow.seconds,
            row.qemu.whole,
            row.qcow.whole,
            row.qemu.whole / row.qcow.whole,
            row.qemu_deep.whole / row.qcow.whole,
        );
        rows.push(row);
    }
    // Sequential reads against the raw file holding the same bytes, through qemu-img -f raw.
    let seq = &rows[rows.len() - 1];
    let raw_workload = Workload {
        image: ImageKind::SequentialRaw,
        ..seq.workload.clone()
    };
    let raw = RawRow {
        qemu: bench.measure(Tool::QemuImg, &raw_workload)?,
    };
    println!(
        "{:<58} raw via qemu-img {:>7.1} MB/s | qcow on qcow2 {:>7.1} MB/s | qcow/raw {:.2}",
        "1 MiB sequential reads vs the raw file",
        raw.qemu.mb_per_s(&raw_workload),
        seq.qcow.mb_per_s(&raw_workload),
        raw.qemu.seconds / seq.qcow.seconds,
    );

    let report = markdown(&bench, &rows, &raw_workload, &raw, started.elapsed());
    // The detailed tables above become the report's context; its rows are the whole-run times
    // of both tools, which the report plots.
    let context = report
        .split_once('\n')
        .map_or(report.as_str(), |(_, rest)| rest)
        .trim()
        .to_string();
    let mut table = Vec::new();
    let mut checks = Vec::new();
    for row in &rows {
        let name = row.workload.name;
        for (tool, measured) in [("qemu-img", &row.qemu), ("qcow", &row.qcow)] {
            table.push(measured.row(&row.workload, tool));
        }
        checks.push((
            format!("{name}: qemu-img / qcow, whole run"),
            format!("{:.2}×", row.qemu.whole / row.qcow.whole),
        ));
    }
    BenchReport {
        name: "bench_qcow".into(),
        title: "qcow bench vs qemu-img bench".into(),
        command: "cargo run --release -p cowvm-tests --bin bench_qcow".into(),
        context,
        rows: table,
        checks,
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

    /// Builds the shared read-only images once: the filled image (sequential data in the first
    /// 128 MiB plus one 4 KiB block at each of the first `SCATTER_FILLED` scattered offsets) and
    /// the sequential-read pair.
    fn prepare(&self) -> Result<()> {
        let filled = self.path("filled.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            path_str(&filled)?,
            &SCATTER_DISK.to_string(),
        ])?;
        qemu_img(&[
            "bench",
            "-q",
            "-f",
            "qcow2",
            "-w",
            "--pattern",
            "90",
            "-t",
            "writeback",
            "-c",
            "128",
            "-s",
            "1M",
            "-S",
            "1M",
            path_str(&filled)?,
        ])?;
        qemu_img(&[
            "bench",
            "-q",
            "-f",
            "qcow2",
            "-w",
            "--pattern",
            "91",
            "-t",
            "writeback",
            "-c",
            &SCATTER_FILLED.to_string(),
            "-s",
            "4096",
            "-S",
            &SCATTER_STEP.to_string(),
            path_str(&filled)?,
        ])?;
        let seq = self.path("sequential.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            path_str(&seq)?,
            &SEQ_READ_DISK.to_string(),
        ])?;
        qemu_img(&[
            "bench",
            "-q",
            "-f",
            "qcow2",
            "-w",
            "--pattern",
            "92",
            "-t",
            "writeback",
            "-c",
            &(SEQ_READ_DISK / MIB).to_string(),
            "-s",
            "1M",
            "-S",
            "1M",
            path_str(&seq)?,
        ])?;
        let raw = self.path("sequential.raw");
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            "-S",
            "0",
            path_str(&seq)?,
            path_str(&raw)?,
        ])?;
        Ok(())
    }

    /// The image a run of `workload` uses, recreated when the workload writes.
    fn image_for(&self, workload: &Workload) -> Result<(PathBuf, &'static str)> {
        let fresh = self.path("fresh.qcow2");
        let _ = std::fs::remove_file(&fresh);
        match workload.image {
            ImageKind::FreshEmpty => {
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    path_str(&fresh)?,
                    &SCATTER_DISK.to_string(),
                ])?;
                Ok((fresh, "qcow2"))
            }
            ImageKind::FreshOverlay => {
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "filled.qcow2",
                    "-F",
                    "qcow2",
                    path_str(&fresh)?,
                ])?;
                Ok((fresh, "qcow2"))
            }
            ImageKind::Filled => Ok((self.path("filled.qcow2"), "qcow2")),
            ImageKind::SequentialQcow2 => Ok((self.path("sequential.qcow2"), "qcow2")),
            ImageKind::SequentialRaw => Ok((self.path("sequential.raw"), "raw")),
        }
    }

    /// Median of `reps` runs (plus one unrecorded warm-up run for read workloads, so both tools
    /// read from a warm page cache).
    fn measure(&self, tool: Tool, workload: &Workload) -> Result<Measurement> {
        let mut all = Vec::new();
        let mut whole_all = Vec::new();
        let warmups = usize::from(!workload.write);
        for rep in 0..self.reps + warmups {
            let mut seconds = 0.0;
            let mut whole = 0.0;
            for _ in 0..workload.passes {
                let (image, format) = self.image_for(workload)?;
                let (completed, process) = self.run_once(tool, workload, &image, format)?;
                seconds += completed;
                whole += process;
            }
            if rep >= warmups {
                all.push(seconds);
                whole_all.push(whole);
            }
        }
        Ok(Measurement {
            seconds: median(&all),
            all,
            whole: median(&whole_all),
            whole_all,
        })
    }

    /// One run: ("Run completed" seconds, whole-process seconds).
    fn run_once(
        &self,
        tool: Tool,
        workload: &Workload,
        image: &Path,
        format: &str,
    ) -> Result<(f64, f64)> {
        let mut command = match tool {
            Tool::QemuImg | Tool::QemuImgDefaultDepth => Command::new("qemu-img"),
            Tool::Qcow => Command::new(&self.qcow),
        };
        let depth = match tool {
            Tool::QemuImgDefaultDepth => 64,
            Tool::QemuImg | Tool::Qcow => self.depth,
        };
        command.args([
            "bench",
            "-f",
            format,
            "-t",
            "writeback",
            "-d",
            &depth.to_string(),
            "-c",
            &workload.count.to_string(),
            "-s",
            &workload.buffer.to_string(),
            "-S",
            &workload.step.to_string(),
        ]);
        if workload.write {
            command.args(["-w", "--pattern", "165"]);
        }
        command.arg(image);
        if workload.write {
            // Dirty pages of the image setup must not be flushed on the clock.
            let synced = Command::new("sync").status().context("sync")?;
            ensure!(synced.success(), "sync failed");
        }
        // Waited for without polling, so that the whole-run time is exact.
        let started = Instant::now();
        let out = command.output().context("run the benchmark")?;
        let whole = started.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "benchmark run failed: {command:?}\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let completed = parse_seconds(&stdout)
            .with_context(|| format!("no timing in {command:?}: {stdout}"))?;
        Ok((completed, whole))
    }
}

/// "Run completed in 1.234 seconds." → 1.234
fn parse_seconds(stdout: &str) -> Option<f64> {
    let line = stdout.lines().find(|l| l.starts_with("Run completed in"))?;
    line.trim_start_matches("Run completed in")
        .trim()
        .trim_end_matches("seconds.")
        .trim()
        .parse()
        .ok()
}

fn qemu_img(args: &[&str]) -> Result<()> {
    let out = run_with_timeout(Command::new("qemu-img").args(args), TOOL_LIMIT);
    if !out.success() {
        bail!("qemu-img failed\n{}", out.describe());
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("scratch path is not UTF-8")
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .with_context(|| format!("{name}={text} is not a number")),
        Err(_) => Ok(default),
    }
}

/// `QCOW_BIN`, or the release `qcow` next to this program, built first (cargo is a no-op when it
/// is up to date).
fn qcow_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("QCOW_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("binary directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--release", "-p", "qcow", "--bin", "qcow"]);
    let out = run_with_timeout(&mut build, Duration::from_secs(1800));
    if !out.success() {
        bail!("cannot build qcow in release mode\n{}", out.describe());
    }
    let path = dir.join("qcow");
    if !path.exists() {
        bail!("{} not found after cargo build --release", path.display());
    }
    Ok(path)
}

/// "[0.123, 0.130]" with millisecond precision.
fn seconds_list(all: &[f64]) -> String {
    let items: Vec<String> = all.iter().map(|s| format!("{s:.3}")).collect();
    format!("[{}]", items.join(", "))
}

fn markdown(
    bench: &Bench,
    rows: &[Row],
    raw_workload: &Workload,
    raw: &RawRow,
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
    let _ = writeln!(md, "# qcow bench vs qemu-img bench\n");
    let _ = writeln!(
        md,
        "Produced by `cargo run --release -p cowvm-tests --bin bench_qcow` ({qemu_version}; {} \
         repetitions, median; `-t writeback -d {}` for both tools; {} s in all).\n",
        bench.reps,
        bench.depth,
        elapsed.as_secs()
    );
    let _ = writeln!(
        md,
        "Both tools run on the same files in one scratch directory. Write workloads get a fresh \
         image (made by qemu-img) per run; read workloads get one warm-up run first. \"Scattered\" \
         = qemu-img bench's step set to {} KiB over a {} GiB disk (qemu-img bench has no random \
         mode), so each request hits a new cluster; scattered reads make 6 passes over the {} \
         blocks written at those offsets. Cache mode writeback for both: qemu-img's default, and \
         `qcow bench` has no O_DIRECT, so both go through the page cache. Depth {}: `qcow bench` \
         issues one request at a time, so qemu-img gets the same depth; the qemu-img -d 64 column \
         is qemu-img at its default depth, for reference. Ratio = qemu-img time / qcow time \
         (> 1: qcow faster); target ≥ 1.0, and sequential reads ≥ 0.9 of the raw file.\n",
        SCATTER_STEP / KIB,
        SCATTER_DISK / GIB,
        SCATTER_FILLED,
        bench.depth
    );
    let _ = writeln!(
        md,
        "| workload | requests | qemu-img IOPS (run completed) | qcow IOPS (run completed) | ratio | qemu-img whole run (s) | qcow whole run (s) | ratio, whole run | whole-run ratio vs qemu-img -d 64 |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let workload = &row.workload;
        let _ = writeln!(
            md,
            "| {} | {} × {} KiB | {:.0} | {:.0} | {:.2} | {:.3} | {:.3} | {:.2} | {:.2} |",
            workload.name,
            workload.count * workload.passes,
            workload.buffer / KIB,
            row.qemu.iops(workload),
            row.qcow.iops(workload),
            row.qemu.seconds / row.qcow.seconds,
            row.qemu.whole,
            row.qcow.whole,
            row.qemu.whole / row.qcow.whole,
            row.qemu_deep.whole / row.qcow.whole
        );
    }
    let _ = writeln!(
        md,
        "\n\"Run completed\" is what both tools print: the requests only. The whole run is the \
         process from start to exit, which includes the final flush — where qcow writes the L2 \
         and refcount updates it deferred — and process start-up. Ratios are qemu-img time / \
         qcow time (> 1: qcow faster).\n"
    );
    let seq = &rows[rows.len() - 1];
    let _ = writeln!(
        md,
        "\n| sequential 1 MiB reads | raw file via qemu-img -f raw MB/s | qcow on qcow2 MB/s | qcow/raw |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    let _ = writeln!(
        md,
        "| {} × 1 MiB | {:.1} | {:.1} | {:.2} |",
        raw_workload.count * raw_workload.passes,
        raw.qemu.mb_per_s(raw_workload),
        seq.qcow.mb_per_s(raw_workload),
        raw.qemu.seconds / seq.qcow.seconds
    );
    let _ = writeln!(md, "\nAll runs (whole-run seconds):\n");
    for row in rows {
        let workload = &row.workload;
        for bench_row in [
            row.qemu.row(workload, "qemu-img"),
            row.qemu_deep.row(workload, "qemu-img -d 64"),
            row.qcow.row(workload, "qcow"),
        ] {
            let _ = writeln!(
                md,
                "- {}: {} ({})",
                bench_row.what,
                seconds_list(&bench_row.values),
                bench_row.note
            );
        }
    }
    let _ = writeln!(
        md,
        "- 1 MiB sequential reads of the raw file, qemu-img -f raw: {}",
        seconds_list(&raw.qemu.all)
    );
    md
}
