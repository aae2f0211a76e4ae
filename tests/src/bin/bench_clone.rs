//! Benchmark: clones from a pool against `cowvm restore` as a new process, and what clones cost
//! in memory against full copies.
//!
//! - start latency (request → the clone's first guest exit after resume), pool clones of 256 MiB
//!   and 4 GiB templates against `cowvm restore --generation N` of the same template;
//! - private memory per idle clone;
//! - host memory (PSS, page cache counted once) of 1, 10 and 100 clones that each dirty 1 % of a
//!   filled 256 MiB template, against that many full copies of it;
//! - 1000 clone start/finish cycles in one process: rate, and fds/RSS growth.
//!
//! Run: `cargo run --release -p cowvm-tests --bin bench_clone` (`make bench`). Knobs:
//! `BENCH_CLONE_STARTS` (default 200 pool clones per size), `BENCH_RESTORES` (default 20),
//! `BENCH_CLONE_SIZES` (default `256M,4G`), `COWVM_BIN`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cowvm_guest_abi::layout::max_workload_pages;
use cowvm_tests::bench_util::{
    command_line, cowvm_binary, env_count, load_average, median, timing_field, Row,
};
use cowvm_tests::report::{BenchReport, Plot, PlotKind, Series};
use serde_json::Value;

const MIB: f64 = (1 << 20) as f64;

fn main() -> Result<()> {
    let cowvm = cowvm_binary()?;
    let starts = env_count("BENCH_CLONE_STARTS", 200)?;
    let restores = env_count("BENCH_RESTORES", 20)?;
    let sizes_text = std::env::var("BENCH_CLONE_SIZES").unwrap_or_else(|_| "256M,4G".into());
    let scratch = tempfile::Builder::new()
        .prefix("cowvm-bench-clone-")
        .tempdir()
        .context("scratch directory")?;
    let load_before = load_average();
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut checks = Vec::new();
    let mut latency_series = Vec::new();
    let mut p50s = Vec::new();

    for size in sizes_text.split(',').map(str::trim) {
        let mem = qcow::parse_size(size).map_err(|e| anyhow::anyhow!("BENCH_CLONE_SIZES: {e}"))?;
        let dir = scratch.path().join(size);
        std::fs::create_dir_all(&dir)?;
        // A template that waits for its id, then reads its 1000 pages and prints DONE: the clone's
        // run is short, its start is what is measured.
        let template = make_template(&cowvm, &dir, size, "pages=1000 rounds=1 write=100 wait=1")?;
        let (latencies, clone_command) = pool_latencies(&cowvm, &template, starts)?;
        let (restore_latencies, restore_command) = restore_latencies(&cowvm, &template, restores)?;
        let p = |values: &[f64], q: f64| percentile(values, q);
        rows.push(Row::noted(
            format!("{size}: pool clone, request → first guest exit"),
            "ms",
            latencies.clone(),
            format!(
                "p50 {:.3} ms, p99 {:.3} ms over {} clones, 2 slots",
                p(&latencies, 50.0),
                p(&latencies, 99.0),
                latencies.len()
            ),
            clone_command,
        ));
        rows.push(Row::noted(
            format!("{size}: cowvm restore, process start → first guest exit"),
            "ms",
            restore_latencies.clone(),
            format!(
                "p50 {:.3} ms, p99 {:.3} ms; fork+exec of the process not included",
                p(&restore_latencies, 50.0),
                p(&restore_latencies, 99.0)
            ),
            restore_command,
        ));
        checks.push((
            format!("{size}: pool clone p50 (target ≤ 1 ms)"),
            verdict(p(&latencies, 50.0), 1.0, "ms"),
        ));
        checks.push((
            format!("{size}: cowvm restore p50 / pool clone p50"),
            format!("{:.1}×", p(&restore_latencies, 50.0) / p(&latencies, 50.0)),
        ));
        p50s.push((size.to_string(), mem, p(&latencies, 50.0)));
        latency_series.push(cdf(&format!("pool clone {size}"), &latencies));
        latency_series.push(cdf(&format!("cowvm restore {size}"), &restore_latencies));
    }
    if let (Some(small), Some(large)) = (
        p50s.iter().min_by_key(|s| s.1),
        p50s.iter().max_by_key(|s| s.1),
    ) {
        if large.1 > small.1 {
            let ratio = large.2 / small.2;
            checks.push((
                format!("pool clone p50 {} / {} (target ≤ 1.2)", large.0, small.0),
                format!(
                    "{ratio:.2}× ({})",
                    if ratio <= 1.2 { "met" } else { "NOT met" }
                ),
            ));
        }
    }

    // Memory: idle clones, and 1/10/100 clones each dirtying 1 % of a filled 256 MiB template.
    let mem_dir = scratch.path().join("memory");
    std::fs::create_dir_all(&mem_dir)?;
    let pages = max_workload_pages(256 << 20);
    let idle_template = make_template(
        &cowvm,
        &mem_dir.join("idle"),
        "256M",
        &format!("pages={pages} rounds=1 write=100 gen_rounds=1 gen_write=0 wait=1"),
    )?;
    let (idle, idle_command) =
        clone_run(&cowvm, &idle_template, &["--count", "10", "--slots", "10"])?;
    let idle_private: Vec<f64> = idle
        .0
        .iter()
        .map(|o| o["memory"]["private_bytes"].as_f64().unwrap_or(0.0) / 1024.0)
        .collect();
    rows.push(Row::noted(
        "256M filled template: private memory per idle clone".into(),
        "KiB",
        idle_private.clone(),
        "each clone reads every page (its digest) and writes none".into(),
        idle_command,
    ));
    checks.push((
        "private memory per idle clone (target ≤ 512 KiB)".into(),
        verdict(median(&idle_private), 512.0, "KiB"),
    ));

    let dirty_template = make_template(
        &cowvm,
        &mem_dir.join("dirty"),
        "256M",
        &format!("pages={pages} rounds=1 write=100 gen_rounds=1 gen_write=1 wait=1"),
    )?;
    let template_bytes = allocated_bytes(&dirty_template.join("memory"))? as f64;
    let mut clone_points = Vec::new();
    let mut copy_points = Vec::new();
    let mut budget_points = Vec::new();
    for count in [1u64, 10, 100] {
        let count_arg = count.to_string();
        let ((outcomes, summary), command) =
            clone_run(&cowvm, &dirty_template, &["--count", &count_arg, "--hold"])?;
        let held = summary["held"]["pss_bytes"]
            .as_f64()
            .context("no held memory in the summary")?;
        let private: f64 = outcomes
            .iter()
            .map(|o| o["memory"]["private_bytes"].as_f64().unwrap_or(0.0))
            .sum::<f64>()
            / count as f64;
        rows.push(Row::noted(
            format!("{count} clones dirtying 1 % of a 256 MiB template: host memory (PSS)"),
            "MiB",
            vec![held / MIB],
            format!(
                "{:.2} MiB private per clone; {count} full copies would take {:.0} MiB",
                private / MIB,
                count as f64 * template_bytes / MIB
            ),
            command,
        ));
        let budget = template_bytes + count as f64 * 0.01 * template_bytes;
        if count == 100 {
            checks.push((
                "100 clones × 1 % dirty / (template + 100 × 1 % of it) (target ≤ 1.5)".into(),
                format!(
                    "{:.2}× ({})",
                    held / budget,
                    if held / budget <= 1.5 {
                        "met"
                    } else {
                        "NOT met"
                    }
                ),
            ));
            checks.push((
                "100 full copies / 100 clones × 1 % dirty".into(),
                format!("{:.1}×", 100.0 * template_bytes / held),
            ));
        }
        clone_points.push((count as f64, held / MIB));
        copy_points.push((count as f64, count as f64 * template_bytes / MIB));
        budget_points.push((count as f64, budget / MIB));
    }

    // A thousand start/finish cycles.
    let tiny = make_template(
        &cowvm,
        &mem_dir.join("tiny"),
        "64M",
        "pages=1 rounds=1 wait=1",
    )?;
    let cycles_started = Instant::now();
    let ((_, summary), command) = clone_run(&cowvm, &tiny, &["--count", "1000", "--slots", "4"])?;
    let took = cycles_started.elapsed().as_secs_f64();
    ensure!(
        summary["exited_zero"] == 1000,
        "not every clone exited 0: {summary}"
    );
    rows.push(Row::noted(
        "1000 clone start/finish cycles, 4 slots: clones per second".into(),
        "clones/s",
        vec![1000.0 / took],
        format!(
            "open fds {} after the first wave, {} at the end; RSS {:.1} → {:.1} MiB",
            summary["fds_after_first_wave"],
            summary["fds_at_end"],
            summary["rss_after_first_wave"].as_f64().unwrap_or(0.0) / MIB,
            summary["rss_at_end"].as_f64().unwrap_or(0.0) / MIB
        ),
        command,
    ));

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let context = format!(
        "Host: {cpus} CPUs, load average before {load_before}, after {}; bench took {:.0} s. \
         1 vCPU per VM. Pool clone latency is `start_latency_us` of `cowvm clone --json`: from \
         the start request (taking a VM the pool already armed with the template, writing the \
         generation id, loading vCPU and device state, starting the vCPU thread) to the guest's \
         first serial access, its first exit after leaving the wait loop. `cowvm restore` is \
         timed from its own process start to the same first exit (`--timings`). Memory is PSS of \
         every clone's RAM together (`--hold`), so the template's page-cache pages count once; \
         full copies are the template's allocated bytes times the count.",
        load_average(),
        started.elapsed().as_secs_f64()
    );
    BenchReport {
        name: "bench_clone".into(),
        title: "cowvm clones: start latency and memory".into(),
        command: "cargo run --release -p cowvm-tests --bin bench_clone".into(),
        context,
        rows,
        checks,
        plots: vec![
            Plot {
                title: "Start latency distribution".into(),
                x_label: "percentile".into(),
                y_label: "ms (request → first guest exit)".into(),
                kind: PlotKind::Line,
                series: latency_series,
            },
            Plot {
                title: "Host memory of N clones dirtying 1 % of a 256 MiB template".into(),
                x_label: "clones".into(),
                y_label: "MiB".into(),
                kind: PlotKind::Line,
                series: vec![
                    Series {
                        name: "clones (PSS)".into(),
                        points: clone_points,
                    },
                    Series {
                        name: "target: 1.5 × (template + N × 1 %)".into(),
                        points: budget_points.iter().map(|&(n, b)| (n, 1.5 * b)).collect(),
                    },
                    Series {
                        name: "full copies".into(),
                        points: copy_points,
                    },
                ],
            },
        ],
    }
    .save()?;
    Ok(())
}

fn verdict(value: f64, target: f64, unit: &str) -> String {
    format!(
        "{value:.3} {unit} ({})",
        if value <= target { "met" } else { "NOT met" }
    )
}

/// Boots a template guest with `args`, waits for it to wait, snapshots it into `dir/template`.
fn make_template(cowvm: &Path, dir: &Path, mem: &str, args: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let argv = [
        "run",
        "--mem",
        mem,
        "--args",
        args,
        "--api-socket",
        path_str(&socket)?,
        "--serial",
        path_str(&serial)?,
    ];
    let mut vm = Command::new(cowvm)
        .args(argv)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", command_line(cowvm, &argv)))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("waiting for a generation id")
    {
        if let Some(status) = vm.try_wait()? {
            bail!("{} exited early: {status}", command_line(cowvm, &argv));
        }
        ensure!(
            Instant::now() < deadline,
            "the template never started waiting"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let template = dir.join("template");
    run_ok(
        cowvm,
        &[
            "snapshot",
            "create",
            "--api-socket",
            path_str(&socket)?,
            path_str(&template)?,
        ],
    )?;
    run_ok(cowvm, &["shutdown", "--api-socket", path_str(&socket)?])?;
    vm.wait()?;
    Ok(template)
}

fn run_ok(cowvm: &Path, argv: &[&str]) -> Result<String> {
    let output = Command::new(cowvm).args(argv).output()?;
    ensure!(
        output.status.success(),
        "{}: {}",
        command_line(cowvm, argv),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

type CloneLines = (Vec<Value>, Value);

/// `cowvm clone TEMPLATE --json EXTRA…`: the per-clone lines and the summary.
fn clone_run(cowvm: &Path, template: &Path, extra: &[&str]) -> Result<(CloneLines, String)> {
    let mut argv = vec!["clone", path_str(template)?, "--json", "--no-verify"];
    argv.extend_from_slice(extra);
    let stdout = run_ok(cowvm, &argv)?;
    let mut lines: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("cowvm clone --json printed a line that is not JSON")?;
    let summary = lines.pop().context("no summary line")?;
    for outcome in &lines {
        ensure!(outcome["status"] == 0, "a clone failed: {outcome}");
    }
    Ok(((lines, summary), command_line(cowvm, &argv)))
}

/// Start latencies (ms) of `count` pool clones, two slots (one clone starts while the other
/// slot is reset).
fn pool_latencies(cowvm: &Path, template: &Path, count: usize) -> Result<(Vec<f64>, String)> {
    let count_arg = count.to_string();
    let ((outcomes, _), command) =
        clone_run(cowvm, template, &["--count", &count_arg, "--slots", "2"])?;
    let latencies = outcomes
        .iter()
        .map(|o| {
            o["start_latency_us"]
                .as_f64()
                .map(|us| us / 1e3)
                .context("a clone without a start latency")
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((latencies, command))
}

/// `cowvm restore TEMPLATE --generation N --timings`: process start → first guest exit (ms).
fn restore_latencies(cowvm: &Path, template: &Path, count: usize) -> Result<(Vec<f64>, String)> {
    let mut latencies = Vec::with_capacity(count);
    let mut command = String::new();
    for generation in 0..=count {
        let generation = (generation + 1).to_string();
        let argv = [
            "restore",
            path_str(template)?,
            "--generation",
            &generation,
            "--timings",
            "--serial",
            "/dev/null",
        ];
        command = command_line(cowvm, &argv);
        let output = Command::new(cowvm).args(argv).output()?;
        ensure!(
            output.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        let line = stderr
            .lines()
            .find(|l| l.contains("process_start_to_first_guest_exit_us="))
            .with_context(|| format!("{command} printed no first-exit timing: {stderr}"))?;
        // The first run warms the page cache and is not counted.
        if generation != "1" {
            latencies.push(timing_field(line, "process_start_to_first_guest_exit_us")? / 1e3);
        }
    }
    Ok((latencies, command))
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The distribution as (percentile, value) points.
fn cdf(name: &str, values: &[f64]) -> Series {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len().max(2) - 1;
    Series {
        name: name.to_string(),
        points: sorted
            .iter()
            .enumerate()
            .map(|(i, &v)| (100.0 * i as f64 / n as f64, v))
            .collect(),
    }
}

fn allocated_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .blocks()
        * 512)
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}
