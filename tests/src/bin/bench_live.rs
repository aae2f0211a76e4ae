//! Benchmark: how long the guest is paused by a live snapshot, a live fork and a stop-and-copy
//! snapshot, side by side in one run, for 256 MiB, 1 GiB and 4 GiB guests writing continuously;
//! the total time of each snapshot kind; the copy-on-write bytes a live snapshot cost against
//! what the guest wrote meanwhile; and `cp --sparse=always` (and `cp` + `sync`) of the
//! stop-and-copy snapshot's own memory file as the peer. Prints a table and saves the run
//! (`target/bench/bench_live.md`, `.json`, plots of the pauses and of the copy-on-write bytes
//! against RAM size).
//!
//! Run: `cargo run --release -p cowvm-tests --bin bench_live` (needs `cowvm` built next to it:
//! `cargo build --release -p vmm -p cowvm-tests`). Knobs: `BENCH_LIVE_SIZES` (default
//! `256M,1G,4G`), `BENCH_LIVE_RUNS` (default 3), `BENCH_SCRATCH` (where snapshots go; default the
//! temp dir), `COWVM_BIN` (a prebuilt `cowvm`). Every figure is the median of its runs.
//!
//! Each size runs one VM with the workload `write=100` over all of RAM (every step writes a
//! page, round after round) and waits until every page was touched. Then, per run and in this
//! order: a live full snapshot, a live fork of one child (shut down at once through its own
//! socket, and waited for, so that its copies of the guest's pages are freed), a stop-and-copy
//! full snapshot, `cp --sparse=always` of that snapshot's memory file, and the same copy plus
//! `sync`. Before each snapshot or fork the guest completes a full round over its RAM (or runs
//! 60 s), so that each one meets the same state: every page mapped and recently written. A
//! second VM of the same size whose workload covers only 16 MiB shows what the live pause costs
//! when the guest touches little of its RAM. Requests go as the JSON lines `cowvm snapshot create [--live]` and `cowvm fork` send,
//! straight to the control socket (rows marked ≙); pause times are the VMM's own figures (pause →
//! capture → fork or copy → resume). Snapshot directories are removed as soon as they are
//! measured, and every `cowvm` this program starts is killed by its pid when its guard drops.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cowvm_tests::bench_util::{
    command_line, cowvm_binary, env_count, load_average, median, ms, Row, ScratchDir,
};
use cowvm_tests::bench_vm::{
    allocated_bytes, api, for_each_size, guest_steps, path_str, require_kvm, sizes_from_env,
    start_filled, start_vm,
};
use cowvm_tests::report::{BenchReport, Plot, PlotKind, Series};
use serde_json::{json, Value};

const DEFAULT_SIZES: &str = "256M,1G,4G";
/// Workload pages of the small-working-set VM (16 MiB).
const SMALL_PAGES: u64 = 4096;
/// Longest wait for the guest to complete a round before the next measurement.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
const MIB: f64 = 1024.0 * 1024.0;
const PAGE: f64 = 4096.0;

/// One live snapshot, as the VMM reported it.
#[derive(Debug)]
struct Live {
    paused_ms: f64,
    fork_ms: f64,
    write_ms: f64,
    total_ms: f64,
    cow_bytes: f64,
    /// Guest page writes per second from the request to the reply (write=100: one per step).
    guest_rate: f64,
}

/// Everything measured for one RAM size.
#[derive(Debug)]
struct SizeResult {
    label: String,
    mem: u64,
    pages: u64,
    run_command: String,
    fill_time: Duration,
    live: Vec<Live>,
    fork_paused_ms: Vec<f64>,
    fork_fork_ms: Vec<f64>,
    stop_paused_ms: Vec<f64>,
    stop_total_ms: Vec<f64>,
    stop_bytes: u64,
    cp_ms: Vec<f64>,
    cp_sync_ms: Vec<f64>,
    /// Live snapshot and live fork pauses of the VM with a 16 MiB working set.
    small_live_ms: Vec<f64>,
    small_fork_ms: Vec<f64>,
    small_run_command: String,
    /// Rounds the guest completed before each measurement (fractions when cut off at 10 s).
    settle_rounds: Vec<f64>,
    commands: Commands,
}

#[derive(Debug)]
struct Commands {
    live: String,
    fork: String,
    stop: String,
    cp: String,
    cp_sync: String,
}

fn main() -> Result<()> {
    let cowvm = cowvm_binary()?;
    require_kvm("live snapshot")?;
    let runs = env_count("BENCH_LIVE_RUNS", 3)?;
    let sizes = sizes_from_env("BENCH_LIVE_SIZES", DEFAULT_SIZES)?;
    let scratch = ScratchDir::create("cowvm-bench-live")?;
    let load_before = load_average();
    let started = Instant::now();

    let results = for_each_size(&scratch, &sizes, |dir, label, mem| {
        bench_size(&cowvm, dir, label, mem, runs)
    })?;

    let rows = table_rows(&results);
    let checks = checks(&results);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut context = format!(
        "Host: {cpus} CPUs, load average before {load_before}, after {}; bench took {:.0} s. \
         1 vCPU per VM; workload `write=100` over all of RAM (every step writes a page, round \
         after round), all pages touched before the first measurement. {runs} runs per size, each \
         a live full snapshot, a live fork of one child (shut down at once), a stop-and-copy full \
         snapshot, `cp --sparse=always` of its memory file and the same copy with `sync`, in that \
         order. Requests (rows marked ≙) are the JSON lines the commands shown send, written \
         straight to the control socket; pauses are the VMM's own figures. Copy-on-write bytes \
         are the parent's private dirty guest RAM when the writer finished (each page the guest \
         wrote while the child was alive, copied once). Snapshots live in {}.\n",
        load_average(),
        started.elapsed().as_secs_f64(),
        scratch.0.display()
    );
    for r in &results {
        let _ =
            write!(
            context,
            "\n- {}: `{}` — {} workload pages; all touched after {:.2} s (RSS); rounds completed \
             before the measurements (at most 60 s each): median {:.2}, least {:.2}. Small \
             working set: `{}`.",
            r.label,
            r.run_command,
            r.pages,
            r.fill_time.as_secs_f64(),
            median(&r.settle_rounds),
            r.settle_rounds.iter().copied().fold(f64::INFINITY, f64::min),
            r.small_run_command,
        );
    }
    BenchReport {
        name: "bench_live".into(),
        title: "cowvm live snapshots and forks against stop-and-copy".into(),
        command: "cargo run --release -p cowvm-tests --bin bench_live".into(),
        context,
        rows,
        checks,
        plots: plots(&results),
    }
    .save()?;
    drop(scratch);
    Ok(())
}

fn bench_size(cowvm: &Path, dir: &Path, label: &str, mem: u64, runs: usize) -> Result<SizeResult> {
    let vm = start_filled(cowvm, dir, mem).with_context(|| format!("{label}: start the guest"))?;
    let socket = vm.socket.clone();
    let socket_arg = path_str(&socket)?;
    let dir_arg = path_str(dir)?;
    let commands = Commands {
        live: format!(
            "≙ {}",
            command_line(
                cowvm,
                &[
                    "snapshot",
                    "create",
                    "--live",
                    "--api-socket",
                    socket_arg,
                    "DIR"
                ]
            )
        ),
        fork: format!(
            "≙ {}",
            command_line(
                cowvm,
                &[
                    "fork",
                    "--api-socket",
                    socket_arg,
                    "--count",
                    "1",
                    "--serial-dir",
                    dir_arg
                ]
            )
        ),
        stop: format!(
            "≙ {}",
            command_line(
                cowvm,
                &["snapshot", "create", "--api-socket", socket_arg, "DIR"]
            )
        ),
        cp: command_line(Path::new("cp"), &["--sparse=always", "DIR/memory", "COPY"]),
        cp_sync: format!(
            "{} && sync COPY",
            command_line(Path::new("cp"), &["--sparse=always", "DIR/memory", "COPY"])
        ),
    };
    let mut result = SizeResult {
        label: label.to_string(),
        mem,
        pages: vm.pages,
        run_command: vm.run_command.clone(),
        fill_time: vm.fill_time,
        live: Vec::new(),
        fork_paused_ms: Vec::new(),
        fork_fork_ms: Vec::new(),
        stop_paused_ms: Vec::new(),
        stop_total_ms: Vec::new(),
        stop_bytes: 0,
        cp_ms: Vec::new(),
        cp_sync_ms: Vec::new(),
        small_live_ms: Vec::new(),
        small_fork_ms: Vec::new(),
        small_run_command: String::new(),
        settle_rounds: Vec::new(),
        commands,
    };
    for run in 0..runs {
        // Live snapshot.
        result.settle_rounds.push(settle(&socket, vm.pages)?);
        result
            .live
            .push(measure_live(&socket, &dir.join(format!("live-{run}")))?);

        // Live fork of one child, shut down at once.
        result.settle_rounds.push(settle(&socket, vm.pages)?);
        let (paused, fork) = measure_fork(&socket, dir)?;
        result.fork_paused_ms.push(paused);
        result.fork_fork_ms.push(fork);

        // Stop-and-copy snapshot, and the peer: a copy of its memory file.
        result.settle_rounds.push(settle(&socket, vm.pages)?);
        let stop_dir = dir.join(format!("stop-{run}"));
        let reply = api(
            &socket,
            &json!({"cmd": "snapshot", "path": path_str(&stop_dir)?}),
        )?;
        result.stop_paused_ms.push(us_as_ms(&reply, "paused_us")?);
        result.stop_total_ms.push(us_as_ms(&reply, "total_us")?);
        let memory = stop_dir.join("memory");
        result.stop_bytes = allocated_bytes(&memory)?;
        let copy = dir.join("memory.copy");
        result.cp_ms.push(copy_file(&memory, &copy, false)?);
        std::fs::remove_file(&copy)?;
        result.cp_sync_ms.push(copy_file(&memory, &copy, true)?);
        std::fs::remove_file(&copy)?;
        std::fs::remove_dir_all(&stop_dir)?;
    }
    drop(vm);

    // The same RAM, 16 MiB of it written.
    let small_dir = dir.join("small");
    std::fs::create_dir_all(&small_dir)?;
    let small = start_vm(cowvm, &small_dir, mem, SMALL_PAGES)?;
    result.small_run_command = small.run_command.clone();
    for run in 0..runs {
        settle(&small.socket, SMALL_PAGES)?;
        let live = measure_live(&small.socket, &small_dir.join(format!("live-{run}")))?;
        result.small_live_ms.push(live.paused_ms);
        settle(&small.socket, SMALL_PAGES)?;
        result
            .small_fork_ms
            .push(measure_fork(&small.socket, &small_dir)?.0);
    }
    Ok(result)
}

fn us_as_ms(reply: &Value, key: &str) -> Result<f64> {
    Ok(reply[key]
        .as_f64()
        .with_context(|| format!("reply without {key}: {reply}"))?
        / 1e3)
}

/// Waits until the guest has completed a round over its `pages` workload pages (or for
/// [`SETTLE_LIMIT`]); returns the rounds completed.
fn settle(socket: &Path, pages: u64) -> Result<f64> {
    let started = Instant::now();
    let from = guest_steps(socket)?;
    loop {
        let done = guest_steps(socket)?.saturating_sub(from);
        if done >= pages || started.elapsed() >= SETTLE_LIMIT {
            return Ok(done as f64 / pages as f64);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A live full snapshot into `dir` (removed afterwards).
fn measure_live(socket: &Path, dir: &Path) -> Result<Live> {
    let steps_before = guest_steps(socket)?;
    let asked = Instant::now();
    let reply = api(
        socket,
        &json!({"cmd": "snapshot", "path": path_str(dir)?, "live": true}),
    )?;
    let elapsed = asked.elapsed().as_secs_f64();
    let steps_after = guest_steps(socket)?;
    std::fs::remove_dir_all(dir)?;
    Ok(Live {
        paused_ms: us_as_ms(&reply, "paused_us")?,
        fork_ms: us_as_ms(&reply, "fork_us")?,
        write_ms: us_as_ms(&reply, "write_us")?,
        total_ms: us_as_ms(&reply, "total_us")?,
        cow_bytes: reply["cow_bytes"].as_f64().unwrap_or(f64::NAN),
        guest_rate: steps_after.saturating_sub(steps_before) as f64 / elapsed,
    })
}

/// A live fork of one child (files in `dir`), shut down at once and waited for; the pause and
/// the `fork()` in it, in ms.
fn measure_fork(socket: &Path, dir: &Path) -> Result<(f64, f64)> {
    let dir_arg = path_str(dir)?;
    let reply = api(
        socket,
        &json!({"cmd": "fork", "count": 1, "serial_dir": dir_arg, "socket_dir": dir_arg}),
    )?;
    let paused = us_as_ms(&reply, "paused_us")?;
    let fork = reply["fork_us"][0]
        .as_f64()
        .context("fork reply without fork_us")?
        / 1e3;
    let child = &reply["children"][0];
    let child_socket = Path::new(child["api_socket"].as_str().context("no child socket")?);
    api(child_socket, &json!({"cmd": "shutdown"}))?;
    wait_until_reaped(socket, child["pid"].as_i64().context("no child pid")?)?;
    let _ = std::fs::remove_file(child["serial"].as_str().unwrap_or_default());
    Ok((paused, fork))
}

/// `cp --sparse=always FROM TO` (then `sync TO`); milliseconds.
fn copy_file(from: &Path, to: &Path, sync: bool) -> Result<f64> {
    let started = Instant::now();
    let status = Command::new("cp")
        .args(["--sparse=always", path_str(from)?, path_str(to)?])
        .status()
        .context("spawn cp")?;
    ensure!(status.success(), "cp {}: {status}", from.display());
    if sync {
        let status = Command::new("sync")
            .arg(to)
            .status()
            .context("spawn sync")?;
        ensure!(status.success(), "sync {}: {status}", to.display());
    }
    Ok(ms(started.elapsed()))
}

/// Waits until the parent's `stats` shows its forked child `pid` ended.
fn wait_until_reaped(socket: &Path, pid: i64) -> Result<()> {
    let started = Instant::now();
    loop {
        let stats = api(socket, &json!({"cmd": "stats"}))?;
        let ended = stats["forked_children"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["pid"] == pid && c["state"] != "running");
        if ended {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "forked child {pid} still running 60 s after its shutdown"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn table_rows(results: &[SizeResult]) -> Vec<Row> {
    let mut rows = Vec::new();
    for r in results {
        let l = &r.label;
        let c = &r.commands;
        let live = |f: fn(&Live) -> f64| r.live.iter().map(f).collect::<Vec<f64>>();
        rows.push(Row::noted(
            format!("{l}: live snapshot, guest paused"),
            "ms",
            live(|s| s.paused_ms),
            format!(
                "of which fork() {:.3} ms (median)",
                median(&live(|s| s.fork_ms))
            ),
            c.live.clone(),
        ));
        rows.push(Row::noted(
            format!("{l}: live fork (1 child), guest paused"),
            "ms",
            r.fork_paused_ms.clone(),
            format!("of which fork() {:.3} ms (median)", median(&r.fork_fork_ms)),
            c.fork.clone(),
        ));
        rows.push(Row::noted(
            format!("{l}: stop-and-copy snapshot, guest paused"),
            "ms",
            r.stop_paused_ms.clone(),
            format!("{:.1} MiB on disk", r.stop_bytes as f64 / MIB),
            c.stop.clone(),
        ));
        rows.push(Row::noted(
            format!("{l}: peer: cp --sparse=always of that memory file"),
            "ms",
            r.cp_ms.clone(),
            "warm cache, no fsync".to_string(),
            c.cp.clone(),
        ));
        rows.push(Row::noted(
            format!("{l}: live snapshot, request to published on disk"),
            "ms",
            live(|s| s.total_ms),
            format!(
                "the child wrote for {:.1} ms (median) while the guest ran",
                median(&live(|s| s.write_ms))
            ),
            c.live.clone(),
        ));
        rows.push(Row::noted(
            format!("{l}: stop-and-copy snapshot, request to published on disk"),
            "ms",
            r.stop_total_ms.clone(),
            "checksummed, every file and the directory fsynced, renamed".to_string(),
            c.stop.clone(),
        ));
        rows.push(Row::noted(
            format!("{l}: peer: cp --sparse=always + sync"),
            "ms",
            r.cp_sync_ms.clone(),
            String::new(),
            c.cp_sync.clone(),
        ));
        rows.push(Row::noted(
            format!("{l}: live snapshot, guest paused, 16 MiB working set"),
            "ms",
            r.small_live_ms.clone(),
            "the same RAM size; the guest writes 4096 pages round after round".to_string(),
            c.live.clone(),
        ));
        rows.push(Row::noted(
            format!("{l}: live fork (1 child), guest paused, 16 MiB working set"),
            "ms",
            r.small_fork_ms.clone(),
            String::new(),
            c.fork.clone(),
        ));
        let written_mib: Vec<f64> = r
            .live
            .iter()
            .map(|s| {
                (s.guest_rate * s.write_ms / 1e3 * PAGE / MIB).min(r.pages as f64 * PAGE / MIB)
            })
            .collect();
        rows.push(Row::noted(
            format!("{l}: live snapshot, copy-on-write"),
            "MiB",
            live(|s| s.cow_bytes / MIB),
            format!(
                "guest wrote {:.0} pages/s ({:.0} MiB/s) meanwhile: at most {:.0} MiB of distinct \
                 pages could be copied during the child's write (median)",
                median(&live(|s| s.guest_rate)),
                median(&live(|s| s.guest_rate)) * PAGE / MIB,
                median(&written_mib)
            ),
            c.live.clone(),
        ));
    }
    rows
}

fn checks(results: &[SizeResult]) -> Vec<(String, String)> {
    let mut checks = Vec::new();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    for r in results {
        let l = &r.label;
        let live = median(&r.live.iter().map(|s| s.paused_ms).collect::<Vec<_>>());
        let fork = median(&r.fork_paused_ms);
        let stop = median(&r.stop_paused_ms);
        let cp = median(&r.cp_ms);
        checks.push((
            format!("{l}: stop-and-copy pause / live snapshot pause"),
            format!(
                "{:.0}× (target ≥ 100×: {})",
                stop / live,
                verdict(stop / live >= 100.0)
            ),
        ));
        checks.push((
            format!("{l}: stop-and-copy pause / live fork pause"),
            format!("{:.0}×", stop / fork),
        ));
        checks.push((
            format!("{l}: stop-and-copy pause / cp --sparse=always"),
            format!(
                "{:.2}× (target ≤ 1.5×: {})",
                stop / cp,
                verdict(stop / cp <= 1.5)
            ),
        ));
        checks.push((
            format!("{l}: stop-and-copy total / (cp + sync)"),
            format!("{:.2}×", median(&r.stop_total_ms) / median(&r.cp_sync_ms)),
        ));
        if r.mem == 1 << 30 {
            checks.push((
                format!("{l}: live snapshot pause ≤ 3 ms"),
                format!("{} ({live:.3} ms)", verdict(live <= 3.0)),
            ));
            let small = median(&r.small_live_ms);
            checks.push((
                format!("{l}: live snapshot pause ≤ 3 ms, 16 MiB working set"),
                format!("{} ({small:.3} ms)", verdict(small <= 3.0)),
            ));
        }
    }
    checks
}

/// By RAM size: the guest-visible pause of each kind of snapshot and of a fork against `cp` of
/// the same data, and the copy-on-write bytes against what the guest wrote meanwhile.
fn plots(results: &[SizeResult]) -> Vec<Plot> {
    let gib = |r: &SizeResult| r.mem as f64 / f64::from(1 << 30);
    let series = |name: &str, value: &dyn Fn(&SizeResult) -> f64| Series {
        name: name.to_string(),
        points: results.iter().map(|r| (gib(r), value(r))).collect(),
    };
    let live =
        |r: &SizeResult, f: fn(&Live) -> f64| median(&r.live.iter().map(f).collect::<Vec<_>>());
    vec![
        Plot {
            title: "Guest paused, by guest RAM (guest writing all of it)".into(),
            x_label: "guest RAM (GiB)".into(),
            y_label: "ms".into(),
            kind: PlotKind::Line,
            series: vec![
                series("live snapshot", &|r| live(r, |s| s.paused_ms)),
                series("live fork", &|r| median(&r.fork_paused_ms)),
                series("live snapshot, 16 MiB working set", &|r| {
                    median(&r.small_live_ms)
                }),
                series("stop-and-copy snapshot", &|r| median(&r.stop_paused_ms)),
                series("cp --sparse=always", &|r| median(&r.cp_ms)),
            ],
        },
        Plot {
            title: "Live snapshot copy-on-write, by guest RAM".into(),
            x_label: "guest RAM (GiB)".into(),
            y_label: "MiB".into(),
            kind: PlotKind::Line,
            series: vec![
                series("copied (parent's private dirty guest RAM)", &|r| {
                    live(r, |s| s.cow_bytes) / MIB
                }),
                series(
                    "written by the guest meanwhile (rate × write time)",
                    &|r| live(r, |s| s.guest_rate * s.write_ms / 1e3 * PAGE / MIB),
                ),
            ],
        },
    ]
}
