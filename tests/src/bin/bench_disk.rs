//! Benchmark: guest-visible 4 KiB disk throughput (sequential and random writes and reads, as the
//! guest's `disk_bench` sees them through virtio-blk) on a preallocated raw file — the peer — and
//! on preallocated and fresh qcow2 images, in one run; and the pause of a snapshot of a VM with a
//! disk against the same snapshot of the same VM without one. Prints a table and saves the
//! report (`target/bench/bench_disk.md`, gathered by `bench_report`).
//!
//! Run: `cargo run --release -p cowvm-tests --bin bench_disk` (or `make bench`). Knobs:
//! `BENCH_DISK_RUNS` (boots per image kind, default 3), `BENCH_DISK_OPS` (4 KiB requests per
//! phase, default 16384 = 64 MiB), `BENCH_DISK_BATCH` (requests per notification, default 128),
//! `BENCH_PAUSE_RUNS` (snapshots per kind, default 7), `BENCH_SCRATCH` (where the images go;
//! default the system temp directory), `BENCH_RAW_SPARSE=1` (the raw peer is a sparse file the
//! guest fills in 4 KiB writes, as it fills the qcow2 images, instead of one written full of
//! zeros first), `COWVM_BIN`. Figures are medians.
//!
//! Timing: the guest prints `bench <phase>` as each phase starts and `bench end` after the last;
//! this program timestamps the lines as they arrive on the pipe from `cowvm`'s stdout, so a phase
//! is the gap between two lines (the ~20 port writes of a line are inside it, under 1 %).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cowvm_tests::bench_util::{
    command_line, cowvm_binary, env_count, load_average, median, KillOnDrop, Row, ScratchDir,
};
use cowvm_tests::report::BenchReport;
use serde_json::Value;

const PHASES: [&str; 4] = ["seq-write", "seq-read", "rand-write", "rand-read"];

/// An image kind the guest's benchmark runs on.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A raw file written full of zeros first (no file-system allocation during the run).
    Raw,
    /// qcow2 with `preallocation=metadata`: every cluster mapped, nothing to allocate.
    Qcow2Preallocated,
    /// An empty qcow2 image: every first write to a cluster allocates it.
    Qcow2Fresh,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Raw => "raw (preallocated)",
            Kind::Qcow2Preallocated => "qcow2 preallocated",
            Kind::Qcow2Fresh => "qcow2 fresh",
        }
    }

    /// Creates the image at `path`; returns the `--disk` value.
    fn create(self, path: &Path, size: u64) -> Result<String> {
        let _ = std::fs::remove_file(path);
        let name = path.display().to_string();
        match self {
            Kind::Raw if std::env::var_os("BENCH_RAW_SPARSE").is_some() => {
                std::fs::File::create(path)?.set_len(size)?;
                Ok(format!("{name},format=raw"))
            }
            Kind::Raw => {
                let zeros = vec![0u8; 1 << 20];
                let mut file = std::fs::File::create(path)?;
                for _ in 0..size >> 20 {
                    std::io::Write::write_all(&mut file, &zeros)?;
                }
                file.sync_all()?;
                Ok(format!("{name},format=raw"))
            }
            Kind::Qcow2Preallocated | Kind::Qcow2Fresh => {
                let mut args = vec!["create", "-q", "-f", "qcow2"];
                if matches!(self, Kind::Qcow2Preallocated) {
                    args.extend(["-o", "preallocation=metadata"]);
                }
                let size = size.to_string();
                args.extend([name.as_str(), size.as_str()]);
                let status = Command::new("qemu-img").args(&args).status()?;
                ensure!(status.success(), "qemu-img {args:?} failed");
                Ok(format!("{name},format=qcow2"))
            }
        }
    }
}

fn main() -> Result<()> {
    let cowvm = cowvm_binary()?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("/dev/kvm is not usable: the disk benchmark needs KVM")?;
    let runs = env_count("BENCH_DISK_RUNS", 3)?;
    let ops = env_count("BENCH_DISK_OPS", 16384)? as u64;
    let batch = env_count("BENCH_DISK_BATCH", 128)?;
    let pause_runs = env_count("BENCH_PAUSE_RUNS", 7)?;
    let base = std::env::var_os("BENCH_SCRATCH").map_or_else(std::env::temp_dir, PathBuf::from);
    let scratch = ScratchDir(base.join(format!("cowvm-bench-disk-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)
        .with_context(|| format!("create {}", scratch.0.display()))?;
    let load_before = load_average();
    let started = Instant::now();

    // Two regions of `ops` blocks (sequential, then random) plus room.
    let size = (2 * ops * 4096).div_ceil(1 << 20) * (1 << 20) + (1 << 20);
    let args = format!("pages=1 rounds=0 disk_bench={ops} disk_blocks={ops} disk_batch={batch}");
    let kinds = [Kind::Raw, Kind::Qcow2Preallocated, Kind::Qcow2Fresh];
    // [kind][phase] → IOPS of each run; kinds interleaved so load hits them alike.
    let mut iops = vec![vec![Vec::new(); PHASES.len()]; kinds.len()];
    let mut commands = vec![String::new(); kinds.len()];
    for run in 0..runs {
        for (k, kind) in kinds.iter().enumerate() {
            let image = scratch.0.join(format!("disk-{k}.img"));
            let disk = kind.create(&image, size)?;
            let argv = ["run", "--mem", "64M", "--disk", &disk, "--args", &args];
            commands[k] = command_line(&cowvm, &argv);
            let phases =
                run_phases(&cowvm, &argv).with_context(|| format!("{} run {run}", kind.label()))?;
            for (p, duration) in phases.iter().enumerate() {
                iops[k][p].push(ops as f64 / duration.as_secs_f64());
            }
        }
    }
    let mut rows = Vec::new();
    for (p, phase) in PHASES.iter().enumerate() {
        for (k, kind) in kinds.iter().enumerate() {
            let what = format!("4 KiB {phase}, {}", kind.label());
            rows.push(Row::new(&what, "IOPS", iops[k][p].clone(), &commands[k]));
        }
    }
    let mut ratios = Vec::new();
    for (p, phase) in PHASES.iter().enumerate() {
        let raw = median(&iops[0][p]);
        for (k, target) in [(1, 0.9), (2, 0.7)] {
            let ratio = median(&iops[k][p]) / raw;
            ratios.push((
                format!("{phase}: {} / raw (target ≥ {target})", kinds[k].label()),
                ratio,
                ratio >= target,
            ));
        }
    }

    // Snapshot pause: the same VM and memory workload, with and without a disk the guest uses.
    let pause = pause_rows(&cowvm, &scratch.0, pause_runs)?;
    for (label, with, without) in &pause.ratios {
        let ratio = with / without;
        ratios.push((
            format!("{label}: pause with / without (target ≤ 1.1)"),
            ratio,
            ratio <= 1.1,
        ));
    }
    rows.extend(pause.rows);

    let context = format!(
        "{ops} requests of 4 KiB per phase, {batch} per notification, {runs} boots per image \
         kind; load average before: {load_before}, after: {}; {:.0} s in all",
        load_average(),
        started.elapsed().as_secs_f64()
    );
    drop(scratch);
    BenchReport {
        name: "bench_disk".into(),
        title: "cowvm disks: guest-visible 4 KiB throughput and snapshot pause".into(),
        command: "cargo run --release -p cowvm-tests --bin bench_disk".into(),
        context,
        rows,
        checks: ratios
            .iter()
            .map(|(what, ratio, met)| (what.clone(), format!("{ratio:.2}×  {}", verdict(*met))))
            .collect(),
        plots: Vec::new(),
    }
    .save()?;
    Ok(())
}

/// Runs `cowvm argv…`, timestamping the guest's `bench` lines; returns each phase's duration.
fn run_phases(cowvm: &Path, argv: &[&str]) -> Result<Vec<Duration>> {
    let mut child = KillOnDrop(
        Command::new(cowvm)
            .args(argv)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn cowvm")?,
    );
    let stdout = child.0.stdout.take().context("stdout is piped")?;
    let mut marks = Vec::new();
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if line.starts_with("bench ") {
            marks.push(Instant::now());
        }
        lines.push(line);
    }
    let status = child.0.wait()?;
    if !status.success() || marks.len() != PHASES.len() + 1 {
        let mut err = String::new();
        if let Some(mut pipe) = child.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut err);
        }
        bail!("cowvm exited with {status}:\n{}\n{err}", lines.join("\n"));
    }
    Ok(marks.windows(2).map(|w| w[1] - w[0]).collect())
}

/// Pause figures and the (label, with disk, without disk) medians to compare.
struct Pause {
    rows: Vec<Row>,
    ratios: Vec<(String, f64, f64)>,
}

/// How the snapshotted VM uses a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DiskUse {
    None,
    /// Attached; the guest does not touch it.
    Idle,
    /// The guest's disk workload writes and flushes it all the time (`disk=1`).
    Busy,
}

/// Full and diff snapshots of a 256 MiB VM running a memory workload: without a disk, with a
/// qcow2 disk it leaves alone, and with one its guest writes and flushes all the time.
fn pause_rows(cowvm: &Path, scratch: &Path, runs: usize) -> Result<Pause> {
    let memory_args = "pages=60000 rounds=1000000000 seed=3 write=20";
    let mut rows = Vec::new();
    let mut medians = Vec::new();
    for disk_use in [DiskUse::None, DiskUse::Idle, DiskUse::Busy] {
        let with_disk = disk_use != DiskUse::None;
        let dir = scratch.join(format!("pause-{disk_use:?}"));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("api.sock");
        let mut argv: Vec<String> = ["run", "--mem", "256M", "--serial", "/dev/null"]
            .map(String::from)
            .to_vec();
        argv.extend(["--api-socket".into(), socket.display().to_string()]);
        if with_disk {
            let image = dir.join("disk.qcow2");
            Kind::Qcow2Fresh.create(&image, 64 << 20)?;
            argv.extend(["--disk".into(), image.display().to_string()]);
        }
        let guest_args = match disk_use {
            DiskUse::Busy => format!("{memory_args} disk=1 disk_blocks=4096"),
            _ => memory_args.to_string(),
        };
        argv.extend(["--args".into(), guest_args]);
        let command = command_line(cowvm, &argv);
        let _vm = KillOnDrop(
            Command::new(cowvm)
                .args(&argv)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            ensure!(
                Instant::now() < deadline,
                "{} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(500));
        let label = match disk_use {
            DiskUse::None => "without a disk",
            DiskUse::Idle => "with an idle qcow2 disk",
            DiskUse::Busy => "with a qcow2 disk the guest writes and flushes",
        };
        for kind in ["full", "diff"] {
            let mut paused = Vec::new();
            let mut freeze = Vec::new();
            for i in 0..runs {
                if kind == "diff" || i > 0 {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let target = dir.join(format!("{kind}-{i}"));
                let reply = snapshot(&socket, &target, kind)?;
                paused.push(reply["paused_us"].as_f64().unwrap_or(f64::NAN) / 1e3);
                freeze.push(reply["disk_freeze_us"].as_f64().unwrap_or(f64::NAN) / 1e3);
                if kind == "full" && i + 1 < runs {
                    std::fs::remove_dir_all(&target)?;
                }
            }
            medians.push((kind, disk_use, median(&paused)));
            rows.push(Row::new(
                &format!("256 MiB {kind} snapshot, guest paused, {label}"),
                "ms",
                paused,
                &command,
            ));
            if with_disk {
                rows.push(Row::new(
                    &format!("  of which freezing the disk ({kind})"),
                    "ms",
                    freeze,
                    &command,
                ));
            }
        }
    }
    let pick = |kind: &str, disk: DiskUse| {
        medians
            .iter()
            .find(|(k, d, _)| *k == kind && *d == disk)
            .map_or(f64::NAN, |m| m.2)
    };
    let mut ratios = Vec::new();
    for kind in ["full", "diff"] {
        for (disk_use, what) in [(DiskUse::Idle, "idle"), (DiskUse::Busy, "busy")] {
            ratios.push((
                format!("{kind} snapshot, {what} disk"),
                pick(kind, disk_use),
                pick(kind, DiskUse::None),
            ));
        }
    }
    Ok(Pause { rows, ratios })
}

/// One snapshot request on the control socket; its reply, which must be ok.
fn snapshot(socket: &Path, target: &Path, kind: &str) -> Result<Value> {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    writeln!(
        stream,
        r#"{{"cmd":"snapshot","path":"{}","kind":"{kind}"}}"#,
        target.display()
    )?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let reply: Value = serde_json::from_str(&line)?;
    ensure!(
        reply["ok"] == true,
        "snapshot {}: {reply}",
        target.display()
    );
    Ok(reply)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_name_a_missed_target() {
        assert_eq!((verdict(true), verdict(false)), ("met", "MISSED"));
    }
}
