//! A `cowvm` under benchmark: started with a guest that has touched all of its RAM, driven by
//! JSON requests on its control socket, killed when its guard drops (also on error).

use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cowvm_guest_abi::layout::{max_workload_pages, PAGE_SIZE, WORKLOAD_ADDR};
use serde_json::Value;

use crate::bench_util::{command_line, KillOnDrop, ScratchDir};

/// Rounds for the workload: far more than a bench lasts; the VM is killed at the end.
pub const ENDLESS_ROUNDS: u64 = 1_000_000_000;

/// A running VM whose guest writes every workload page in every round (`write=100`) and has
/// touched all of them.
#[derive(Debug)]
pub struct FilledVm {
    pub process: KillOnDrop,
    pub socket: PathBuf,
    pub run_command: String,
    /// Workload pages (all of RAM but the first 4 MiB).
    pub pages: u64,
    /// Spawn → every workload page touched.
    pub fill_time: Duration,
}

/// Starts `cowvm run --mem MEM --vcpus 1` with an endless `write=100` workload over all of RAM,
/// its socket, serial output and stderr in `dir`, and waits until its RSS shows every workload
/// page touched.
pub fn start_filled(cowvm: &Path, dir: &Path, mem: u64) -> Result<FilledVm> {
    let pages = max_workload_pages(mem);
    ensure!(pages > 0, "{mem} bytes of RAM hold no workload page");
    start_vm(cowvm, dir, mem, pages)
}

/// As [`start_filled`], with an endless `write=100` workload over `pages` pages.
pub fn start_vm(cowvm: &Path, dir: &Path, mem: u64, pages: u64) -> Result<FilledVm> {
    let socket = dir.join("api.sock");
    let serial = dir.join("serial.txt");
    let args = format!("pages={pages} rounds={ENDLESS_ROUNDS} seed=1 write=100");
    let mem_arg = mem.to_string();
    let run_argv = [
        "run",
        "--mem",
        mem_arg.as_str(),
        "--vcpus",
        "1",
        "--args",
        args.as_str(),
        "--api-socket",
        path_str(&socket)?,
        "--serial",
        path_str(&serial)?,
    ];
    let run_command = command_line(cowvm, &run_argv);
    let log = dir.join("cowvm-run.stderr");
    let mut process = KillOnDrop(
        Command::new(cowvm)
            .args(run_argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).with_context(|| format!("create {}", log.display()))?)
            .spawn()
            .with_context(|| format!("spawn {run_command}"))?,
    );
    let spawned = Instant::now();
    wait_for_socket(&mut process, &socket, &log)?;

    // Wait until the guest has touched all its pages: its RSS covers the workload.
    let want_rss = pages * PAGE_SIZE + WORKLOAD_ADDR / 2;
    let pid = process.0.id();
    loop {
        let rss = rss_bytes(pid)?;
        if rss >= want_rss {
            break;
        }
        if let Some(status) = process.0.try_wait()? {
            bail!("{run_command} exited ({status}): {}", read_log(&log));
        }
        ensure!(
            spawned.elapsed() < Duration::from_secs(180),
            "guest touched only {rss} of {want_rss} bytes in 180 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // RSS also counts the VMM itself: give the guest a margin to finish the round.
    std::thread::sleep(Duration::from_millis(100));
    Ok(FilledVm {
        process,
        socket,
        run_command,
        pages,
        fill_time: spawned.elapsed(),
    })
}

/// One request on the control socket, as `cowvm` sends it: a JSON line, a JSON line back, which
/// must say `"ok": true`.
pub fn api(socket: &Path, request: &Value) -> Result<Value> {
    let mut stream =
        UnixStream::connect(socket).with_context(|| format!("connect to {}", socket.display()))?;
    writeln!(stream, "{request}").context("send request")?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .context("read reply")?;
    let reply: Value =
        serde_json::from_str(&line).with_context(|| format!("reply is not JSON: {line:?}"))?;
    ensure!(
        reply["ok"] == Value::Bool(true),
        "{request} was refused: {reply}"
    );
    Ok(reply)
}

/// The guest's workload steps so far, summed over vCPUs.
pub fn guest_steps(socket: &Path) -> Result<u64> {
    let stats = api(socket, &serde_json::json!({"cmd": "stats"}))?;
    let progress = stats["guest_progress"]
        .as_array()
        .context("stats without guest_progress")?;
    Ok(progress.iter().filter_map(Value::as_u64).sum())
}

pub fn wait_for_socket(vm: &mut KillOnDrop, socket: &Path, log: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        if socket.exists() && UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if let Some(status) = vm.0.try_wait()? {
            bail!(
                "cowvm run exited ({status}) before serving its socket: {}",
                read_log(log)
            );
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "{} did not appear within 30 s",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib * 1024)
}

/// Allocated bytes of a file (st_blocks × 512).
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .blocks()
        * 512)
}

pub fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Fails unless `/dev/kvm` can be opened: `bench` needs it.
pub fn require_kvm(bench: &str) -> Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .with_context(|| format!("/dev/kvm is not usable: the {bench} benchmark needs KVM"))?;
    Ok(())
}

/// Runs `bench` once per RAM size, each in its own directory under `scratch` that is removed as
/// soon as that size is done (several GB each), and reports progress on stderr.
pub fn for_each_size<T>(
    scratch: &ScratchDir,
    sizes: &[(String, u64)],
    mut bench: impl FnMut(&Path, &str, u64) -> Result<T>,
) -> Result<Vec<T>> {
    let started = Instant::now();
    let mut results = Vec::with_capacity(sizes.len());
    for (label, mem) in sizes {
        let dir = scratch.0.join(label);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let result = bench(&dir, label, *mem).with_context(|| format!("guest RAM {label}"))?;
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        eprintln!("[{:6.1} s] {label}: done", started.elapsed().as_secs_f64());
        results.push(result);
    }
    Ok(results)
}

/// The sizes in `var` (comma-separated, bytes or with a K/M/G suffix), or `default`'s.
pub fn sizes_from_env(var: &str, default: &str) -> Result<Vec<(String, u64)>> {
    let text = std::env::var(var).unwrap_or_else(|_| default.to_string());
    let sizes = text
        .split(',')
        .map(|s| {
            let s = s.trim();
            qcow::parse_size(s)
                .map(|bytes| (s.to_string(), bytes))
                .map_err(|e| anyhow::anyhow!("{var}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(!sizes.is_empty(), "{var} is empty");
    Ok(sizes)
}
