//! Benchmark: cowvm snapshots — pause time and on-disk size of full snapshots and of diffs after
//! ~1 % and ~10 % of the pages were dirtied, and restore time (MAP_PRIVATE vs `--eager`), for
//! 256 MiB, 1 GiB and 4 GiB guests, against `cp --sparse=always` of the snapshot's memory file as
//! the peer; prints a table and saves it with `report` (`target/bench/bench_snapshot.md`).
//!
//! Run: `cargo run --release -p cowvm-tests --bin bench_snapshot` (needs `cowvm` built next to it:
//! `cargo build --release -p vmm -p cowvm-tests`). Knobs: `BENCH_SNAPSHOT_SIZES` (default
//! `256M,1G,4G`), `BENCH_DIFF_RUNS` (default 3), `BENCH_RESTORE_RUNS` (default 5),
//! `BENCH_SCRATCH` (where snapshots go; default the temp dir), `COWVM_BIN` (a prebuilt `cowvm`).
//! Every figure is the median of its runs. The page cache is warm for every restore and copy (the
//! files were just written); nothing drops it.
//!
//! Each size runs one VM with the workload `write=100` (every round rewrites every workload page
//! in order), waits until its RSS shows that all workload pages were touched, and takes a full
//! snapshot with `cowvm snapshot create`. Then diffs: the pages a diff holds are set by how long
//! the guest runs after the previous snapshot, so the bench fits pages ≈ floor + rate × run time
//! over the diffs it has seen (the first diff after the full snapshot is discarded, two more
//! calibrate) and sleeps accordingly; a diff more than 1.5× off its target is retaken (at most 3
//! tries, the closest kept, the discards counted in the table). To keep that run time free of a
//! process start, diffs are requested by writing the JSON line `cowvm snapshot create --diff`
//! sends straight to the control socket. The pause time is the VMM's own figure (pause → save →
//! resume) either way. Snapshot directories are removed at the end (each size's as soon as it is
//! done), and every `cowvm` this program starts is killed by its pid when its guard drops, also
//! on error.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cowvm_tests::bench_util::{
    command_line, cowvm_binary, env_count, load_average, median, ms, timing_field, KillOnDrop, Row,
    ScratchDir,
};
use cowvm_tests::bench_vm::{
    allocated_bytes, api, for_each_size, path_str, require_kvm, sizes_from_env, start_filled,
    FilledVm,
};
use cowvm_tests::report::{BenchReport, Plot, PlotKind, Series};
use serde_json::{json, Value};

const DEFAULT_SIZES: &str = "256M,1G,4G";
/// A guess at the guest's page-write rate on one vCPU (bench_vmm measures ~290 000/s); only used
/// to size the calibration diff.
const GUESSED_RATE: f64 = 290_000.0;
const MIB: f64 = 1024.0 * 1024.0;

/// What one snapshot cost and holds.
#[derive(Debug, Clone)]
struct Snap {
    pause_ms: f64,
    /// Request to published directory, fsyncs included (the CLI's "on disk after").
    total_ms: f64,
    pages_stored: u64,
    /// `pages_allocated_on_disk` from `cowvm snapshot inspect --json`.
    pages_allocated: u64,
    /// st_blocks × 512 summed over the directory's files.
    disk_bytes: u64,
    /// How long the guest ran between the previous snapshot's reply and this request.
    ran_for: Duration,
    /// Diffs taken to land this one near its target dirty fraction (the others are discarded).
    attempts: usize,
}

/// A diff as the VMM reported it, inspected later (after the VM is gone).
#[derive(Debug)]
struct RawDiff {
    dir: PathBuf,
    total_ms: f64,
    pages_stored: u64,
    pause_ms: f64,
    ran_for: Duration,
    attempts: usize,
}

/// pages in a diff ≈ floor + rate × guest run time since the previous snapshot, fitted by least
/// squares over the diffs seen so far.
#[derive(Debug)]
struct DirtyModel {
    points: Vec<(f64, f64)>,
    floor: f64,
    rate: f64,
}

impl Default for DirtyModel {
    fn default() -> Self {
        Self {
            points: Vec::new(),
            floor: 0.0,
            rate: GUESSED_RATE,
        }
    }
}

impl DirtyModel {
    fn observe(&mut self, diff: &RawDiff) {
        self.points
            .push((diff.ran_for.as_secs_f64(), diff.pages_stored as f64));
        let n = self.points.len() as f64;
        let mean_t = self.points.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_p = self.points.iter().map(|p| p.1).sum::<f64>() / n;
        let var = self
            .points
            .iter()
            .map(|p| (p.0 - mean_t).powi(2))
            .sum::<f64>();
        let cov = self
            .points
            .iter()
            .map(|p| (p.0 - mean_t) * (p.1 - mean_p))
            .sum::<f64>();
        if var > 1e-9 {
            self.rate = (cov / var).max(1000.0);
        }
        self.floor = (mean_p - self.rate * mean_t).max(0.0);
    }

    fn wait_for(&self, pages: f64) -> Duration {
        Duration::from_secs_f64(((pages - self.floor) / self.rate).max(0.0))
    }
}

/// Everything measured for one RAM size.
#[derive(Debug)]
struct SizeResult {
    label: String,
    mem: u64,
    pages: u64,
    run_command: String,
    fill_time: Duration,
    full: Snap,
    full_command: String,
    diff_command: String,
    diff1: Vec<Snap>,
    diff10: Vec<Snap>,
    dirty_model: String,
    copy_ms: Vec<f64>,
    copy_bytes: u64,
    copy_command: String,
    copy_sync_ms: Vec<f64>,
    copy_sync_command: String,
    verify_ms: Vec<f64>,
    verify_command: String,
    private_vmm_ms: Vec<f64>,
    private_start_ms: Vec<f64>,
    eager_vmm_ms: Vec<f64>,
    eager_start_ms: Vec<f64>,
    private_command: String,
    eager_command: String,
}

#[derive(Debug, Clone, Copy)]
struct Knobs {
    diff_runs: usize,
    restore_runs: usize,
}

fn main() -> Result<()> {
    let cowvm = cowvm_binary()?;
    require_kvm("snapshot")?;
    let knobs = Knobs {
        diff_runs: env_count("BENCH_DIFF_RUNS", 3)?,
        restore_runs: env_count("BENCH_RESTORE_RUNS", 5)?,
    };
    let sizes = sizes_from_env("BENCH_SNAPSHOT_SIZES", DEFAULT_SIZES)?;
    let scratch = ScratchDir::create("cowvm-bench-snapshot")?;
    let load_before = load_average();
    let started = Instant::now();

    let results = for_each_size(&scratch, &sizes, |dir, label, mem| {
        bench_size(&cowvm, dir, label, mem, knobs)
    })?;

    let rows = table_rows(&results);
    let checks = checks(&results);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut context = format!(
        "Host: {cpus} CPUs, load average before {load_before}, after {}; bench took {:.0} s. \
         1 vCPU per VM; workload `write=100` (each round rewrites every workload page in order). \
         Runs: 1 full snapshot, {} diff pairs (~1 %, ~10 %) and {} restores per mode per size \
         (after 1 discarded warm-up restore). The page cache is warm for every restore and copy \
         (the files were just written; it is never dropped). Snapshots live in {}.\n\n\
         Full snapshots are taken with the `cowvm snapshot create` command shown. Diffs (rows \
         marked ≙) send the same JSON request that command sends straight to the control socket, \
         so the guest's run time since the previous snapshot — which sets the dirty fraction — \
         holds no process start; the bench fits pages ≈ floor + rate × run time to the diffs it \
         has seen (the first after the full snapshot is discarded, two more calibrate) and \
         retakes a diff more than 1.5× off its target (at most 3 tries, the closest kept); the \
         pause time is the VMM's own figure (pause → save → resume) either way. On-disk sizes \
         are allocated bytes (st_blocks × 512) of the whole snapshot directory.\n",
        load_average(),
        started.elapsed().as_secs_f64(),
        knobs.diff_runs,
        knobs.restore_runs,
        scratch.0.display()
    );
    for r in &results {
        let _ = write!(
            context,
            "\n- {}: `{}` — {} workload pages; all touched after {:.2} s (RSS); {}.",
            r.label,
            r.run_command,
            r.pages,
            r.fill_time.as_secs_f64(),
            r.dirty_model
        );
    }
    let plots = plots(&results);
    BenchReport {
        name: "bench_snapshot".into(),
        title: "cowvm snapshots: pause, size and restore".into(),
        command: "cargo run --release -p cowvm-tests --bin bench_snapshot".into(),
        context,
        rows,
        checks,
        plots,
    }
    .save()?;
    drop(scratch);
    Ok(())
}

fn bench_size(cowvm: &Path, dir: &Path, label: &str, mem: u64, knobs: Knobs) -> Result<SizeResult> {
    let FilledVm {
        process: vm,
        socket,
        run_command,
        pages,
        fill_time,
    } = start_filled(cowvm, dir, mem).with_context(|| format!("{label}: start the guest"))?;

    // Full snapshot through the CLI.
    let full_dir = dir.join("full");
    let full_argv = [
        "snapshot",
        "create",
        "--api-socket",
        path_str(&socket)?,
        path_str(&full_dir)?,
    ];
    let full_command = command_line(cowvm, &full_argv);
    let output = Command::new(cowvm)
        .args(full_argv)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {full_command}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "{full_command}: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut last_reply = Instant::now();
    let (full_pages, full_pause, full_total) = parse_create_line(&stdout)
        .with_context(|| format!("unexpected output of {full_command}: {stdout:?}"))?;
    let mut full = describe_snapshot(cowvm, &full_dir, full_pause, full_pages, fill_time, "full")?;
    full.total_ms = full_total;

    // Diffs: calibrate the dirtying rate, then aim at 1 % and 10 % of the workload pages.
    let diff_command = format!(
        "≙ {}",
        command_line(
            cowvm,
            &[
                "snapshot",
                "create",
                "--api-socket",
                path_str(&socket)?,
                "--diff",
                path_str(&dir.join("diff-…"))?,
            ],
        )
    );
    let mut taken = 0;
    // Sleeps what is left of `wait` since the previous snapshot's reply, then takes a diff.
    let mut take_diff = |wait: Duration| -> Result<RawDiff> {
        if let Some(left) = wait.checked_sub(last_reply.elapsed()) {
            std::thread::sleep(left);
        }
        taken += 1;
        let dir = dir.join(format!("diff-{taken}"));
        let ran_for = last_reply.elapsed();
        let reply = api(
            &socket,
            &json!({"cmd": "snapshot", "path": path_str(&dir)?, "kind": "diff"}),
        )?;
        last_reply = Instant::now();
        Ok(RawDiff {
            dir,
            total_ms: reply["total_us"].as_f64().unwrap_or(0.0) / 1e3,
            pages_stored: reply["pages_stored"]
                .as_u64()
                .context("snapshot reply without pages_stored")?,
            pause_ms: reply["paused_us"]
                .as_f64()
                .context("snapshot reply without paused_us")?
                / 1e3,
            ran_for,
            attempts: 1,
        })
    };
    // The first diff after a full snapshot is not representative; then fit
    // pages = floor + rate × time to a back-to-back diff and one after a short run.
    take_diff(Duration::ZERO).context("first diff")?;
    let mut model = DirtyModel::default();
    for wait in [0.0, 0.03 * pages as f64 / GUESSED_RATE] {
        model.observe(&take_diff(Duration::from_secs_f64(wait)).context("calibration diff")?);
    }
    let (mut raw1, mut raw10) = (Vec::new(), Vec::new());
    for _ in 0..knobs.diff_runs {
        for (fraction, list) in [(0.01, &mut raw1), (0.10, &mut raw10)] {
            let target = fraction * pages as f64;
            let mut best: Option<RawDiff> = None;
            for attempt in 1..=3 {
                let mut diff = take_diff(model.wait_for(target))?;
                model.observe(&diff);
                diff.attempts = attempt;
                let miss = (diff.pages_stored.max(1) as f64 / target).ln().abs();
                let best_miss = best.as_ref().map_or(f64::INFINITY, |b| {
                    (b.pages_stored.max(1) as f64 / target).ln().abs()
                });
                if miss < best_miss {
                    best = Some(diff);
                }
                // Within 1.5× of the target, or unreachable (the floor is above it).
                if miss <= 1.5_f64.ln() || model.floor > 1.5 * target {
                    break;
                }
            }
            list.extend(best);
        }
    }
    // The guest's CPU is freed for the rest.
    drop(vm);
    let describe_all = |raws: Vec<RawDiff>| -> Result<Vec<Snap>> {
        raws.into_iter()
            .map(|raw| {
                let mut snap = describe_snapshot(
                    cowvm,
                    &raw.dir,
                    raw.pause_ms,
                    raw.pages_stored,
                    raw.ran_for,
                    "diff",
                )?;
                snap.attempts = raw.attempts;
                snap.total_ms = raw.total_ms;
                Ok(snap)
            })
            .collect()
    };
    let (diff1, diff10) = (describe_all(raw1)?, describe_all(raw10)?);
    let dirty_model = format!(
        "diffs held ≈ {:.0} pages + {:.0} pages/s × guest run time (fit over {} diffs)",
        model.floor,
        model.rate,
        model.points.len()
    );

    // Peer: a full copy of the memory file.
    let memory = full_dir.join("memory");
    let copy = dir.join("memory.copy");
    let copy_argv = ["--sparse=always", path_str(&memory)?, path_str(&copy)?];
    let copy_command = command_line(Path::new("cp"), &copy_argv);
    let mut copy_ms = Vec::new();
    let mut copy_bytes = 0;
    for _ in 0..(if mem > 2 << 30 { 1 } else { 3 }) {
        let _ = std::fs::remove_file(&copy);
        let started = Instant::now();
        let status = Command::new("cp")
            .args(copy_argv)
            .status()
            .with_context(|| format!("spawn {copy_command}"))?;
        copy_ms.push(ms(started.elapsed()));
        ensure!(status.success(), "{copy_command}: {status}");
        copy_bytes = allocated_bytes(&copy)?;
    }
    // The same copy made durable: what the snapshot's total time compares with.
    let sync_argv = [path_str(&copy)?];
    let copy_sync_command = format!(
        "{copy_command} && {}",
        command_line(Path::new("sync"), &sync_argv)
    );
    let mut copy_sync_ms = Vec::new();
    for _ in 0..(if mem > 2 << 30 { 1 } else { 3 }) {
        let _ = std::fs::remove_file(&copy);
        let started = Instant::now();
        let copied = Command::new("cp").args(copy_argv).status()?;
        let synced = Command::new("sync").args(sync_argv).status()?;
        copy_sync_ms.push(ms(started.elapsed()));
        ensure!(
            copied.success() && synced.success(),
            "{copy_sync_command} failed"
        );
    }
    std::fs::remove_file(&copy).with_context(|| format!("remove {}", copy.display()))?;

    // What --verify costs: reading and hashing every memory file of the chain (warm cache).
    let verify_argv = ["snapshot", "inspect", "--verify", path_str(&full_dir)?];
    let verify_command = command_line(cowvm, &verify_argv);
    let mut verify_ms = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let output = Command::new(cowvm).args(verify_argv).output()?;
        verify_ms.push(ms(started.elapsed()));
        ensure!(
            output.status.success(),
            "{verify_command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // Restores of the full snapshot, alternating the two modes.
    let restore_serial = dir.join("restore-serial.txt");
    let argv_for = |eager: bool| -> Result<Vec<String>> {
        let mut argv = vec!["restore".to_string(), path_str(&full_dir)?.to_string()];
        if eager {
            argv.push("--eager".to_string());
        }
        argv.extend(["--timings", "--serial", path_str(&restore_serial)?].map(str::to_string));
        Ok(argv)
    };
    let (private_argv, eager_argv) = (argv_for(false)?, argv_for(true)?);
    restore_once(cowvm, &private_argv).context("warm-up restore")?;
    let (mut private_vmm_ms, mut private_start_ms) = (Vec::new(), Vec::new());
    let (mut eager_vmm_ms, mut eager_start_ms) = (Vec::new(), Vec::new());
    for _ in 0..knobs.restore_runs {
        let (vmm, start) = restore_once(cowvm, &private_argv)?;
        private_vmm_ms.push(vmm);
        private_start_ms.push(start);
        let (vmm, start) = restore_once(cowvm, &eager_argv)?;
        eager_vmm_ms.push(vmm);
        eager_start_ms.push(start);
    }

    Ok(SizeResult {
        label: label.to_string(),
        mem,
        pages,
        run_command,
        fill_time,
        full,
        full_command,
        diff_command,
        diff1,
        diff10,
        dirty_model,
        copy_ms,
        copy_bytes,
        copy_command,
        copy_sync_ms,
        copy_sync_command,
        verify_ms,
        verify_command,
        private_vmm_ms,
        private_start_ms,
        eager_vmm_ms,
        eager_start_ms,
        private_command: command_line(cowvm, &private_argv),
        eager_command: command_line(cowvm, &eager_argv),
    })
}

/// Inspects a fresh snapshot (`cowvm snapshot inspect --json`) and measures its directory.
fn describe_snapshot(
    cowvm: &Path,
    dir: &Path,
    pause_ms: f64,
    pages_stored: u64,
    ran_for: Duration,
    kind: &str,
) -> Result<Snap> {
    let output = Command::new(cowvm)
        .args(["snapshot", "inspect", "--json"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .context("spawn cowvm snapshot inspect")?;
    ensure!(
        output.status.success(),
        "cowvm snapshot inspect --json {}: {}: {}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_slice(&output.stdout).context("snapshot inspect printed no JSON")?;
    let inspected = report["pages_stored"].as_u64();
    ensure!(
        inspected == Some(pages_stored),
        "{}: the VMM reported {pages_stored} pages stored, inspect {inspected:?}",
        dir.display()
    );
    let found_kind = report["kind"].as_str().unwrap_or_default().to_lowercase();
    ensure!(
        found_kind == kind,
        "{}: inspect says kind {found_kind:?}, expected {kind}",
        dir.display()
    );
    let mut disk_bytes = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        disk_bytes += allocated_bytes(&entry?.path())?;
    }
    Ok(Snap {
        pause_ms,
        total_ms: 0.0,
        pages_stored,
        pages_allocated: report["pages_allocated_on_disk"].as_u64().unwrap_or(0),
        disk_bytes,
        ran_for,
        attempts: 1,
    })
}

/// One `cowvm restore … --timings`: `(vmm_restore_us, process_start_to_running_us)` in ms, read
/// from stderr as soon as the VM runs; the process is killed right after.
fn restore_once(cowvm: &Path, argv: &[String]) -> Result<(f64, f64)> {
    let described = command_line(cowvm, argv);
    let mut child = KillOnDrop(
        Command::new(cowvm)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {described}"))?,
    );
    let stderr = child.0.stderr.take().context("stderr is piped")?;
    let mut seen = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.with_context(|| format!("read stderr of {described}"))?;
        if line.starts_with("timings: ") {
            let vmm = timing_field(&line, "vmm_restore_us")?;
            let start = timing_field(&line, "process_start_to_running_us")?;
            return Ok((vmm / 1e3, start / 1e3));
        }
        seen.push_str(&line);
        seen.push('\n');
    }
    let status = child.0.wait()?;
    bail!("{described} printed no timings line ({status}); stderr:\n{seen}")
}

/// `(pages stored, pause ms, total ms)` from
/// `snapshot DIR: N pages stored, guest paused X.XXX ms, on disk after Y.YYY ms`.
fn parse_create_line(stdout: &str) -> Option<(u64, f64, f64)> {
    let line = stdout.lines().find(|l| l.starts_with("snapshot "))?;
    let (_, rest) = line.rsplit_once(": ")?;
    let (pages, rest) = rest.split_once(" pages stored, guest paused ")?;
    let (pause, total) = rest.split_once(" ms, on disk after ")?;
    let total = total.strip_suffix(" ms")?;
    Some((
        pages.trim().parse().ok()?,
        pause.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

fn table_rows(results: &[SizeResult]) -> Vec<Row> {
    let mut rows = Vec::new();
    for r in results {
        let l = &r.label;
        let full = &r.full;
        rows.push(Row::noted(
            format!("{l}: full snapshot, guest paused"),
            "ms",
            vec![full.pause_ms],
            format!(
                "{} pages stored ({:.1} % of {} workload pages), {} allocated; {:.1} MiB on disk",
                full.pages_stored,
                100.0 * full.pages_stored as f64 / r.pages as f64,
                r.pages,
                full.pages_allocated,
                full.disk_bytes as f64 / MIB
            ),
            r.full_command.clone(),
        ));
        for (what, snaps) in [("~1 %", &r.diff1), ("~10 %", &r.diff10)] {
            let pages: Vec<f64> = snaps.iter().map(|s| s.pages_stored as f64).collect();
            let disk: Vec<f64> = snaps.iter().map(|s| s.disk_bytes as f64 / MIB).collect();
            let ran: Vec<f64> = snaps.iter().map(|s| ms(s.ran_for)).collect();
            let min_pages = pages.iter().copied().fold(f64::INFINITY, f64::min);
            let max_pages = pages.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            rows.push(Row::noted(
                format!("{l}: diff after {what} dirtied, guest paused"),
                "ms",
                snaps.iter().map(|s| s.pause_ms).collect(),
                format!(
                    "median {:.0} pages stored = {:.2} % of the workload (range {:.0}–{:.0}); \
                     {:.2} MiB on disk; guest ran {:.1} ms since the previous snapshot; \
                     {} off-target diffs discarded",
                    median(&pages),
                    100.0 * median(&pages) / r.pages as f64,
                    min_pages,
                    max_pages,
                    median(&disk),
                    median(&ran),
                    snaps.iter().map(|s| s.attempts - 1).sum::<usize>()
                ),
                r.diff_command.clone(),
            ));
        }
        rows.push(Row::noted(
            format!("{l}: full snapshot, request to published on disk"),
            "ms",
            vec![full.total_ms],
            "checksummed, every file and the directory fsynced, renamed".to_string(),
            r.full_command.clone(),
        ));
        rows.push(Row::noted(
            format!("{l}: peer: cp --sparse=always + sync of the memory file"),
            "ms",
            r.copy_sync_ms.clone(),
            "warm cache".to_string(),
            r.copy_sync_command.clone(),
        ));
        rows.push(Row::noted(
            format!("{l}: snapshot inspect --verify (read + XXH3 of the memory file)"),
            "ms",
            r.verify_ms.clone(),
            format!(
                "{:.0} ms per GiB of RAM, warm cache",
                median(&r.verify_ms) / (r.mem as f64 / (1u64 << 30) as f64)
            ),
            r.verify_command.clone(),
        ));
        rows.push(Row::noted(
            format!("{l}: peer: cp --sparse=always of the full memory file"),
            "ms",
            r.copy_ms.clone(),
            format!(
                "copy allocates {:.1} MiB; warm cache, no fsync",
                r.copy_bytes as f64 / MIB
            ),
            r.copy_command.clone(),
        ));
        for (mode, vmm, start, command) in [
            (
                "MAP_PRIVATE",
                &r.private_vmm_ms,
                &r.private_start_ms,
                &r.private_command,
            ),
            (
                "--eager",
                &r.eager_vmm_ms,
                &r.eager_start_ms,
                &r.eager_command,
            ),
        ] {
            rows.push(Row::noted(
                format!("{l}: restore {mode}, vmm_restore_us"),
                "ms",
                vmm.clone(),
                String::new(),
                command.clone(),
            ));
            rows.push(Row::noted(
                format!("{l}: restore {mode}, process_start_to_running_us"),
                "ms",
                start.clone(),
                String::new(),
                command.clone(),
            ));
        }
    }
    rows
}

fn checks(results: &[SizeResult]) -> Vec<(String, String)> {
    let mut checks = Vec::new();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    for r in results {
        let l = &r.label;
        let full = r.full.pause_ms;
        let d1 = median(&r.diff1.iter().map(|s| s.pause_ms).collect::<Vec<_>>());
        let d10 = median(&r.diff10.iter().map(|s| s.pause_ms).collect::<Vec<_>>());
        checks.push((
            format!("{l}: diff ~1 % pause / full pause"),
            format!(
                "{:.2} % (target ≤ 5 %: {})",
                100.0 * d1 / full,
                verdict(d1 / full <= 0.05)
            ),
        ));
        checks.push((
            format!("{l}: diff ~10 % pause / full pause"),
            format!("{:.2} %", 100.0 * d10 / full),
        ));
        let copy = median(&r.copy_ms);
        checks.push((
            format!("{l}: cp --sparse=always / full snapshot pause"),
            format!("{:.2}×", copy / full),
        ));
        checks.push((
            format!("{l}: full snapshot total / (cp --sparse=always + sync)"),
            format!("{:.2}×", r.full.total_ms / median(&r.copy_sync_ms)),
        ));
        let private = median(&r.private_vmm_ms);
        checks.push((
            format!("{l}: restore --eager / MAP_PRIVATE (vmm_restore_us)"),
            format!("{:.1}×", median(&r.eager_vmm_ms) / private),
        ));
        checks.push((
            format!("{l}: restore --eager / MAP_PRIVATE (process start → running)"),
            format!(
                "{:.1}×",
                median(&r.eager_start_ms) / median(&r.private_start_ms)
            ),
        ));
        checks.push((
            format!("{l}: MAP_PRIVATE vmm_restore_us under 5 ms"),
            format!(
                "{} ({private:.3} ms)",
                if private < 5.0 { "yes" } else { "NO" }
            ),
        ));
    }
    let smallest = results.iter().min_by_key(|r| r.mem);
    let largest = results.iter().max_by_key(|r| r.mem);
    if let (Some(small), Some(large)) = (smallest, largest) {
        if large.mem > small.mem {
            let vmm = median(&large.private_vmm_ms) / median(&small.private_vmm_ms);
            checks.push((
                format!(
                    "MAP_PRIVATE vmm_restore_us {} / {}",
                    large.label, small.label
                ),
                format!("{vmm:.2}× (target ≤ 1.5: {})", verdict(vmm <= 1.5)),
            ));
            let start = median(&large.private_start_ms) / median(&small.private_start_ms);
            checks.push((
                format!(
                    "MAP_PRIVATE process start → running {} / {}",
                    large.label, small.label
                ),
                format!("{start:.2}× (target ≤ 1.5: {})", verdict(start <= 1.5)),
            ));
        }
    }
    checks
}

/// Where a snapshot's time goes, by RAM size: pause and total of a full snapshot against `cp`
/// and `cp` + `sync`, and the pause of the diffs.
fn plots(results: &[SizeResult]) -> Vec<Plot> {
    let gib = |r: &SizeResult| r.mem as f64 / f64::from(1 << 30);
    let series = |name: &str, value: &dyn Fn(&SizeResult) -> f64| Series {
        name: name.to_string(),
        points: results.iter().map(|r| (gib(r), value(r))).collect(),
    };
    let diff_pause = |snaps: &[Snap]| median(&snaps.iter().map(|s| s.pause_ms).collect::<Vec<_>>());
    vec![Plot {
        title: "Snapshot time by guest RAM".into(),
        x_label: "guest RAM (GiB)".into(),
        y_label: "ms".into(),
        kind: PlotKind::Line,
        series: vec![
            series("full snapshot: guest paused", &|r| r.full.pause_ms),
            series("full snapshot: on disk (fsynced)", &|r| r.full.total_ms),
            series("cp --sparse=always", &|r| median(&r.copy_ms)),
            series("cp --sparse=always + sync", &|r| median(&r.copy_sync_ms)),
            series("~1 % diff: guest paused", &|r| diff_pause(&r.diff1)),
            series("~10 % diff: guest paused", &|r| diff_pause(&r.diff10)),
        ],
    }]
}
