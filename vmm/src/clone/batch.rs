//! `cowvm clone`: N clones of one template in this process, at most `slots` at a time, each with
//! its own serial output and, when asked, its own control socket; an outcome per clone and a
//! summary (memory, pool reuse, the process's fds and RSS) at the end.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::pool::{Pool, PoolStats};
use super::slot::Shape;
use super::{start, CloneError, Template};
use crate::accounting::MemoryUsage;
use crate::kvm::open_kvm;

/// Default number of clones running at once.
pub const DEFAULT_SLOTS: usize = 8;

/// What `cowvm clone` was asked to do.
#[derive(Clone, Debug)]
pub struct CloneRun {
    pub template: PathBuf,
    pub count: u64,
    /// Clones running at once. The pool holds up to twice as many VMs, so that a ready, armed
    /// one is waiting while those just returned are re-armed in the background.
    pub slots: usize,
    /// Where each clone's serial output goes (`clone-<id>.serial`); kept in memory otherwise.
    pub serial_dir: Option<PathBuf>,
    /// Where each clone serves its control socket (`clone-<id>.sock`).
    pub api_socket_dir: Option<PathBuf>,
    /// Keep starting clones after one failed.
    pub keep_going: bool,
    /// Check the template's memory checksums first.
    pub verify: bool,
    /// Keep every clone's memory until the last one stops and measure them together (each
    /// clone then needs its own slot: `slots` becomes `count`).
    pub hold: bool,
    pub kvm_device: PathBuf,
}

/// How one clone ended.
#[derive(Clone, Debug, Serialize)]
pub struct CloneOutcome {
    pub generation: u64,
    /// The guest's exit status (or 1 when the VMM stopped the clone with an error).
    pub status: u8,
    /// Why the VMM stopped the clone, if it did.
    pub error: Option<String>,
    /// The last line of its serial output (the workload's `DONE` line).
    pub last_line: String,
    /// Its RAM's cost when it stopped.
    pub memory: Option<MemoryUsage>,
    /// Start request → the guest's first exit (its first serial access) after resume.
    pub start_latency_us: Option<u64>,
}

/// What a whole run came to.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub clones: u64,
    pub exited_zero: u64,
    pub worst_status: u8,
    /// Each clone's memory when it stopped, summed.
    pub memory: MemoryUsage,
    pub pool: PoolStats,
    /// Open file descriptors and RSS of this process after the first wave of clones and at
    /// the end (with the pool's slots still held): a leak shows as growth.
    pub fds_after_first_wave: u64,
    pub fds_at_end: u64,
    pub rss_after_first_wave: u64,
    pub rss_at_end: u64,
    /// With `hold`: every clone's memory measured together once the last one stopped (their
    /// PSS sums to the host memory they take, the shared file pages counted once).
    pub held: Option<MemoryUsage>,
}

/// Runs the clones; `report` sees each outcome as it comes.
pub fn run(spec: &CloneRun, mut report: impl FnMut(&CloneOutcome)) -> Result<Summary, CloneError> {
    if spec.count == 0 {
        return Err(CloneError::Limit(
            "--count 0: nothing to clone; give at least 1".into(),
        ));
    }
    if spec.slots == 0 {
        return Err(CloneError::Limit(
            "--slots 0: at least one clone must be able to run".into(),
        ));
    }
    let kvm = open_kvm(&spec.kvm_device).map_err(crate::builder::BuildError::from)?;
    let template = Arc::new(Template::load(
        &spec.template,
        spec.verify,
        &spec.kvm_device,
    )?);
    let shape = template.shape();
    let slots = if spec.hold {
        spec.count as usize
    } else {
        spec.slots.min(spec.count as usize)
    };
    // Spare VMs: a clone never waits for the slot of the one before it to be re-armed.
    let pool_size = if spec.hold {
        slots
    } else {
        (2 * slots).min(spec.count as usize)
    };
    check_limits(shape, slots, pool_size, spec.api_socket_dir.is_some())?;
    let pool = Arc::new(Pool::new(kvm)?);
    // Registering RAM and mapping the template are the slow part of a VM start: both happen
    // before the first clone.
    pool.fill(shape, pool_size, Some(&template.arming()))?;

    let (done_tx, done_rx) = mpsc::channel::<Finished>();
    let mut held = Vec::new();
    let mut summary = Summary::default();
    let (mut next, mut running, mut finished) = (1u64, 0usize, 0u64);
    let mut stop_launching = false;
    while finished < next - 1 || (next <= spec.count && !stop_launching) {
        // The first wave runs alone, so that the process can be measured with every slot idle
        // once it is over (leaks show against the end of the run).
        let first_wave_open = next <= slots as u64 || finished >= slots as u64;
        while running < slots && next <= spec.count && !stop_launching && first_wave_open {
            let generation = next;
            next += 1;
            match launch(spec, &pool, &template, generation, done_tx.clone()) {
                Ok(()) => running += 1,
                Err(e) => {
                    finished += 1;
                    let outcome = failed(generation, &e.to_string());
                    stop_launching |= !spec.keep_going;
                    record(&mut summary, &outcome, &mut report);
                }
            }
        }
        if running == 0 {
            break;
        }
        let Ok((outcome, clone)) = done_rx.recv() else {
            break;
        };
        held.extend(clone);
        running -= 1;
        finished += 1;
        stop_launching |= outcome.status != 0 && !spec.keep_going;
        record(&mut summary, &outcome, &mut report);
        if finished == slots as u64 {
            pool.wait_idle();
            (summary.fds_after_first_wave, summary.rss_after_first_wave) = process_resources();
        }
    }
    if spec.hold {
        let mut total = MemoryUsage::default();
        for clone in &mut held {
            if let Ok(usage) = clone.machine().memory_usage() {
                total += usage;
            }
        }
        summary.held = Some(total);
        for clone in held {
            clone.retire(&pool);
        }
    }
    pool.wait_idle();
    (summary.fds_at_end, summary.rss_at_end) = process_resources();
    if summary.fds_after_first_wave == 0 {
        (summary.fds_after_first_wave, summary.rss_after_first_wave) =
            (summary.fds_at_end, summary.rss_at_end);
    }
    summary.pool = pool.stats();
    Ok(summary)
}

fn record(summary: &mut Summary, outcome: &CloneOutcome, report: &mut impl FnMut(&CloneOutcome)) {
    summary.clones += 1;
    summary.exited_zero += u64::from(outcome.status == 0 && outcome.error.is_none());
    summary.worst_status = summary.worst_status.max(outcome.status);
    if let Some(memory) = outcome.memory {
        summary.memory += memory;
    }
    report(outcome);
}

fn failed(generation: u64, error: &str) -> CloneOutcome {
    CloneOutcome {
        generation,
        status: 1,
        error: Some(error.to_string()),
        last_line: String::new(),
        memory: None,
        start_latency_us: None,
    }
}

/// A clone's outcome, and the clone itself when its memory is held to the end.
type Finished = (CloneOutcome, Option<super::CloneVm>);

/// Starts clone `generation` and a thread that runs it to the end and reports.
fn launch(
    spec: &CloneRun,
    pool: &Arc<Pool>,
    template: &Arc<Template>,
    generation: u64,
    done: mpsc::Sender<Finished>,
) -> Result<(), CloneError> {
    let hold = spec.hold;
    let last_line = LastLine::default();
    let serial: Box<dyn Write + Send> = match &spec.serial_dir {
        Some(dir) => {
            let path = dir.join(format!("clone-{generation}.serial"));
            let file = std::fs::File::create(&path).map_err(|source| {
                crate::builder::BuildError::SerialFile {
                    path: path.clone(),
                    source,
                }
            })?;
            Box::new(Tee(file, last_line.clone()))
        }
        None => Box::new(last_line.clone()),
    };
    let mut clone = start(pool, template, generation, serial)?;
    let server = match &spec.api_socket_dir {
        Some(dir) => {
            let path = dir.join(format!("clone-{generation}.sock"));
            match crate::api::serve(&path, clone.machine().event_sender()) {
                Ok(server) => Some(server),
                Err(e) => {
                    clone.machine().stop();
                    clone.retire(pool);
                    return Err(CloneError::Limit(e.to_string()));
                }
            }
        }
        None => None,
    };
    let pool = pool.clone();
    std::thread::Builder::new()
        .name(format!("clone{generation}"))
        .spawn(move || {
            let result = clone.machine().wait();
            drop(server);
            let memory = clone.machine().memory_usage().ok();
            let start_latency_us = clone
                .machine()
                .first_serial_access()
                .map(|t| t.saturating_duration_since(clone.requested_at).as_micros() as u64);
            let (status, error) = match result {
                Ok(status) => (status, None),
                Err(e) => (1, Some(e.to_string())),
            };
            let outcome = CloneOutcome {
                generation,
                status,
                error,
                last_line: last_line.get(),
                memory,
                start_latency_us,
            };
            let kept = if hold {
                Some(clone)
            } else {
                clone.retire(&pool);
                None
            };
            let _ = done.send((outcome, kept));
        })
        .map(drop)
        .map_err(CloneError::Thread)
}

/// Fails early, with what to change, when the host cannot hold `slots` clones at once in a pool
/// of `pool_size` VMs.
fn check_limits(
    shape: Shape,
    slots: usize,
    pool_size: usize,
    sockets: bool,
) -> Result<(), CloneError> {
    // Per VM in the pool: the VM and its vCPUs; per running clone also the serial file and, with
    // a socket, its listener and a connection or two; plus what the process itself keeps open.
    let per_vm = u64::from(shape.vcpus) + 1;
    let per_clone = 1 + if sockets { 3 } else { 0 };
    let needed = pool_size as u64 * per_vm + slots as u64 * per_clone + 64;
    let limit = raise_nofile_limit();
    if needed > limit {
        return Err(CloneError::Limit(format!(
            "{slots} clones at once need about {needed} open files, more than this process may open ({limit}, RLIMIT_NOFILE); lower --slots or raise the limit (ulimit -n)"
        )));
    }
    // The kernel memory KVM needs per memory slot before a clone writes anything: reverse-map
    // and dirty-log arrays, about 8.25 bytes per 4 KiB page, plus per-vCPU state.
    let per_slot = shape.mem_size / 4096 * 33 / 4 + u64::from(shape.vcpus) * (256 << 10);
    let needed = per_slot * pool_size as u64;
    let available = mem_available();
    if needed > available {
        return Err(CloneError::Limit(format!(
            "{pool_size} pooled VMs for a {} MiB template need about {} MiB of kernel memory for their KVM memory slots before any clone writes anything; this host has {} MiB available — lower --slots",
            shape.mem_size >> 20,
            needed >> 20,
            available >> 20
        )));
    }
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (as many servers do) and returns it.
fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib * 1024)
}

/// Open fds and RSS (bytes) of this process.
fn process_resources() -> (u64, u64) {
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    (fds, rss * 1024)
}

/// Keeps the last complete line written (serial output kept in memory).
#[derive(Clone, Debug, Default)]
struct LastLine(Arc<Mutex<(String, String)>>);

impl LastLine {
    fn get(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.1.is_empty() {
            lines.0.clone()
        } else {
            lines.1.clone()
        }
    }
}

impl Write for LastLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for &byte in buf {
            if byte == b'\n' {
                lines.0 = std::mem::take(&mut lines.1);
            } else if lines.1.len() < 4096 {
                lines.1.push(char::from(byte));
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes to a file and remembers the last line.
struct Tee(std::fs::File, LastLine);

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.0.write(buf)?;
        self.1.write_all(&buf[..written])?;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_line_keeps_the_last_complete_line() {
        let mut line = LastLine::default();
        line.write_all(b"banner\nround 1/2\nDONE 00").unwrap();
        assert_eq!(
            line.get(),
            "DONE 00",
            "a partial line wins once it has text"
        );
        line.write_all(b"ff\n").unwrap();
        assert_eq!(line.get(), "DONE 00ff");
    }
}
