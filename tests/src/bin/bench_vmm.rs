//! Benchmark: `cowvm run` start-up (process start → first serial byte, VM create → first guest
//! exit) and guest workload throughput on 1 and 2 vCPUs, against `/bin/true` as the floor of any
//! process start; prints a table and saves it with `report` (`target/bench/bench_vmm.md`).
//!
//! Run: `cargo run --release -p cowvm-tests --bin bench_vmm` (or `make bench`, which builds
//! `cowvm` first). Knobs: `BENCH_STARTUP_RUNS` (default 15), `BENCH_THROUGHPUT_RUNS` (default 5),
//! `BENCH_MEM` and `BENCH_ARGS` (the throughput workload; defaults below), `COWVM_BIN` (a prebuilt
//! `cowvm`; default: the one next to this program). Every figure is the median of its runs.

use std::ffi::{c_char, c_int, CString};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cowvm_guest_abi::{workload, WorkloadArgs};
use cowvm_tests::bench_util;
use cowvm_tests::bench_util::{command_line, cowvm_binary, env_count, load_average, ms, Row};
use cowvm_tests::report::BenchReport;

/// Guest RAM for the throughput workload (the workload's pages plus the fixed low 4 MiB).
const THROUGHPUT_MEM: &str = "320M";
/// About 262 000 page writes: 0.3–1 s on one vCPU, long enough that start-up is noise.
const THROUGHPUT_ARGS: &str = "pages=65536 rounds=8 seed=1 write=50";

/// What one `cowvm run` looked like from the outside, times measured from just before `spawn()`.
#[derive(Debug)]
struct CowvmRun {
    first_byte: Duration,
    /// When the banner line's newline arrived.
    banner: Duration,
    /// When the 16th hex digit after `DONE ` arrived.
    done: Duration,
    exit: Duration,
    /// `--timings` figures, µs.
    start_to_create_us: f64,
    create_to_first_exit_us: f64,
}

fn main() -> Result<()> {
    let cowvm = cowvm_binary()?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("/dev/kvm is not usable: the VMM benchmark needs KVM")?;
    let startup_runs = env_count("BENCH_STARTUP_RUNS", 15)?;
    let throughput_runs = env_count("BENCH_THROUGHPUT_RUNS", 5)?;
    let mem = std::env::var("BENCH_MEM").unwrap_or_else(|_| THROUGHPUT_MEM.to_string());
    let args_text = std::env::var("BENCH_ARGS").unwrap_or_else(|_| THROUGHPUT_ARGS.to_string());
    let load_before = load_average();

    // Start-up: the default guest with --timings, interleaved with the two /bin/true peers so
    // that load from other processes on the machine hits all three alike.
    let default_args = WorkloadArgs::default();
    let default_digest = workload::expected_digest(&default_args);
    let startup_argv = ["run", "--timings"];
    let startup_cmd = command_line(&cowvm, &startup_argv);
    run_cowvm(&cowvm, &startup_argv, default_digest).context("warm-up run")?;
    let true_path = Path::new("/bin/true");
    let mut true_std = Vec::new();
    let mut true_fork = Vec::new();
    let mut startups = Vec::new();
    for i in 0..startup_runs {
        true_std.push(ms(spawn_exit_std(true_path)?));
        true_fork.push(ms(spawn_exit_fork(true_path)?));
        startups.push(
            run_cowvm(&cowvm, &startup_argv, default_digest)
                .with_context(|| format!("start-up run {i}"))?,
        );
    }

    // Throughput: the same workload on 1 and 2 vCPUs, alternating.
    let args = WorkloadArgs::parse(&args_text)
        .map_err(|e| anyhow::anyhow!("BENCH_ARGS={args_text:?}: {e}"))?;
    let writes = workload::expected_page_writes(&args, 0..args.rounds);
    ensure!(
        writes > 0,
        "BENCH_ARGS={args_text:?} performs no page writes"
    );
    let digest = workload::expected_digest(&args);
    let argv_for = |vcpus: &str| {
        [
            "run",
            "--mem",
            mem.as_str(),
            "--vcpus",
            vcpus,
            "--args",
            args_text.as_str(),
        ]
        .map(str::to_string)
    };
    let (argv1, argv2) = (argv_for("1"), argv_for("2"));
    let mut rates = [Vec::new(), Vec::new()];
    for i in 0..throughput_runs {
        for (slot, argv) in [&argv1, &argv2].into_iter().enumerate() {
            let run = run_cowvm(&cowvm, argv, digest)
                .with_context(|| format!("throughput run {i}, {} vCPU(s)", slot + 1))?;
            let busy = run.done.saturating_sub(run.banner).as_secs_f64();
            ensure!(busy > 0.0, "DONE arrived together with the banner");
            rates[slot].push(writes as f64 / busy);
        }
    }

    let [rate1, rate2] = rates;
    let mut rows = vec![
        Row::new(
            "/bin/true spawn → exit, std::process::Command (posix_spawn)",
            "ms",
            true_std,
            "/bin/true",
        ),
        Row::new(
            "/bin/true spawn → exit, fork() + execv() + waitpid()",
            "ms",
            true_fork,
            "/bin/true",
        ),
        Row::new(
            "cowvm: spawn → first serial byte on stdout",
            "ms",
            startups.iter().map(|r| ms(r.first_byte)).collect(),
            &startup_cmd,
        ),
        Row::new(
            "cowvm: spawn → process exit (default guest)",
            "ms",
            startups.iter().map(|r| ms(r.exit)).collect(),
            &startup_cmd,
        ),
        Row::new(
            "cowvm --timings: process start → VM create",
            "ms",
            startups
                .iter()
                .map(|r| r.start_to_create_us / 1e3)
                .collect(),
            &startup_cmd,
        ),
        Row::new(
            "cowvm --timings: VM create → first guest exit",
            "ms",
            startups
                .iter()
                .map(|r| r.create_to_first_exit_us / 1e3)
                .collect(),
            &startup_cmd,
        ),
        Row::new(
            "guest workload, 1 vCPU",
            "page writes/s",
            rate1,
            &command_line(&cowvm, &argv1),
        ),
        Row::new(
            "guest workload, 2 vCPUs",
            "page writes/s",
            rate2,
            &command_line(&cowvm, &argv2),
        ),
    ];
    // Dirty logging is always on: registering guest RAM with KVM_MEM_LOG_DIRTY_PAGES is part of
    // every start. Reported per GiB for 1 GiB and 4 GiB guests.
    for gib in [1u64, 4] {
        let argv = [
            "run".to_string(),
            "--mem".into(),
            format!("{gib}G"),
            "--timings".into(),
        ];
        let mut per_gib = Vec::new();
        for _ in 0..3 {
            let output = Command::new(&cowvm)
                .args(&argv)
                .output()
                .context("run cowvm for the dirty-logging row")?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            per_gib.push(timing_field(&stderr, "register_memory_us")? / 1e3 / gib as f64);
        }
        rows.push(Row::new(
            &format!("register {gib} GiB of RAM with dirty logging, per GiB"),
            "ms",
            per_gib,
            &command_line(&cowvm, &argv),
        ));
    }
    let first_byte = rows[2].median();
    let ratios = [
        (
            "cowvm first serial byte / /bin/true fork+exec",
            first_byte / rows[1].median(),
        ),
        (
            "cowvm first serial byte / /bin/true posix_spawn",
            first_byte / rows[0].median(),
        ),
        (
            "throughput 2 vCPUs / 1 vCPU",
            rows[7].median() / rows[6].median(),
        ),
    ];

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let context = format!(
        "Host: {cpus} CPUs, load average before {load_before}, after {}. Runs: {startup_runs} \
         start-up (after 1 warm-up), {throughput_runs} per throughput configuration. Throughput \
         workload: {writes} page writes (`{args_text}`), timed on stdout from the banner line to \
         `DONE`; every run's digest matched the host oracle.",
        load_average()
    );
    BenchReport {
        name: "bench_vmm".into(),
        title: "cowvm start-up and guest throughput".into(),
        command: "cargo run --release -p cowvm-tests --bin bench_vmm".into(),
        context,
        rows,
        checks: ratios
            .iter()
            .map(|(what, ratio)| (what.to_string(), format!("{ratio:.2}×")))
            .collect(),
        plots: Vec::new(),
    }
    .save()?;
    Ok(())
}

/// Runs `cowvm <argv>` with stdout and stderr piped, timing its stdout as it arrives, and checks
/// that it printed the banner and `DONE <expected>`, exited 0 and (with `--timings`) reported.
fn run_cowvm<S: AsRef<str>>(cowvm: &Path, argv: &[S], expected: u64) -> Result<CowvmRun> {
    let described = command_line(cowvm, argv);
    let mut command = Command::new(cowvm);
    command
        .args(argv.iter().map(AsRef::as_ref))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("spawn {described}"))?;
    let mut stdout = child.stdout.take().context("stdout is piped")?;
    let mut stderr = child.stderr.take().context("stderr is piped")?;
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let mut out = Vec::new();
    let mut chunk = [0u8; 64];
    let (mut first_byte, mut banner, mut done) = (None, None, None);
    loop {
        let n = match stdout.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("read stdout of {described}")),
        };
        let now = started.elapsed();
        first_byte.get_or_insert(now);
        out.extend_from_slice(&chunk[..n]);
        if banner.is_none() && out.contains(&b'\n') {
            banner = Some(now);
        }
        if done.is_none() && done_digest(&out).is_some() {
            done = Some(now);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("wait for {described}"))?;
    let exit = started.elapsed();
    let err_text = stderr_reader
        .join()
        .map_err(|_| anyhow::anyhow!("stderr reader panicked"))?;
    let out_text = String::from_utf8_lossy(&out);
    let explain = || format!("{described}\nstdout:\n{out_text}\nstderr:\n{err_text}");

    ensure!(status.success(), "{status}: {}", explain());
    ensure!(
        out_text.starts_with("cowvm guest: "),
        "no banner line: {}",
        explain()
    );
    let digest = done_digest(&out).with_context(|| format!("no DONE line: {}", explain()))?;
    if digest != expected {
        bail!(
            "WRONG DIGEST: guest printed DONE {digest:016x}, the oracle expects {expected:016x}: {}",
            explain()
        );
    }
    let (start_to_create_us, create_to_first_exit_us) =
        if argv.iter().any(|a| a.as_ref() == "--timings") {
            parse_timings(&err_text)
                .with_context(|| format!("bad --timings line: {}", explain()))?
        } else {
            (f64::NAN, f64::NAN)
        };
    Ok(CowvmRun {
        first_byte: first_byte.context("no stdout")?,
        banner: banner.context("no banner newline")?,
        done: done.context("no DONE")?,
        exit,
        start_to_create_us,
        create_to_first_exit_us,
    })
}

/// The digest of the first complete `DONE <16 hex>` in `out` (the guest prints no newline after it).
fn done_digest(out: &[u8]) -> Option<u64> {
    const MARK: &[u8] = b"DONE ";
    let at = out.windows(MARK.len()).position(|w| w == MARK)? + MARK.len();
    let hex = out.get(at..at + 16)?;
    let hex = std::str::from_utf8(hex).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

/// `(process_start_to_vm_create_us, vm_create_to_first_guest_exit_us)` from cowvm's stderr.
fn parse_timings(stderr: &str) -> Result<(f64, f64)> {
    Ok((
        timing_field(stderr, "process_start_to_vm_create_us")?,
        timing_field(stderr, "vm_create_to_first_guest_exit_us")?,
    ))
}

/// One figure of cowvm's `timings:` line in `stderr`.
fn timing_field(stderr: &str, key: &str) -> Result<f64> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("timings: "))
        .context("no `timings:` line")?;
    bench_util::timing_field(line, key)
}

/// `/bin/true` through `std::process::Command`, with stdio piped like the cowvm runs.
fn spawn_exit_std(program: &Path) -> Result<Duration> {
    let started = Instant::now();
    let status = Command::new(program)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", program.display()))?
        .wait()
        .context("wait for /bin/true")?;
    let elapsed = started.elapsed();
    ensure!(status.success(), "{} failed: {status}", program.display());
    Ok(elapsed)
}

extern "C" {
    fn fork() -> c_int;
    fn execv(path: *const c_char, argv: *const *const c_char) -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    fn _exit(status: c_int) -> !;
}

/// `program` through a literal `fork()` + `execv()` + `waitpid()`.
fn spawn_exit_fork(program: &Path) -> Result<Duration> {
    let path = CString::new(program.as_os_str().as_encoded_bytes()).context("path with NUL")?;
    let argv = [path.as_ptr(), std::ptr::null()];
    let started = Instant::now();
    // SAFETY: fork has no preconditions. In the child only async-signal-safe calls follow
    // (execv, _exit), on memory prepared before the fork.
    let pid = unsafe { fork() };
    if pid == 0 {
        // SAFETY: `path` is a NUL-terminated string and `argv` a null-terminated array of such,
        // both alive until execv replaces the process image; _exit never returns.
        unsafe {
            execv(path.as_ptr(), argv.as_ptr());
            _exit(127)
        }
    }
    ensure!(pid > 0, "fork failed: {}", std::io::Error::last_os_error());
    let mut status: c_int = 0;
    loop {
        // SAFETY: `pid` is our child and `status` a valid, writable c_int.
        let waited = unsafe { waitpid(pid, &mut status, 0) };
        if waited == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("waitpid");
        }
    }
    let elapsed = started.elapsed();
    ensure!(
        status == 0,
        "{} via fork+execv: wait status {status:#x}",
        program.display()
    );
    Ok(elapsed)
}
