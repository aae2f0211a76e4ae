//! Live snapshots and live forks: the VMM process `fork()`s while the vCPUs are paused, and the
//! child's copy-on-write view of guest RAM is either written to disk (a live snapshot) or becomes
//! a new running VM (a live fork), while the parent's guest runs on at once.
//!
//! Guest RAM is private memory (anonymous, or a `MAP_PRIVATE` snapshot file), so after `fork()`
//! parent and child share every page until one of them writes it; the kernel then copies that
//! page for the writer. The parent pays for copying its page tables (with transparent huge pages
//! one entry per 2 MiB) and, while the child lives, for a copy of each page its guest writes.
//!
//! # What the child may touch (fork safety)
//!
//! Only the thread that calls `fork()` exists in the child. A lock another thread held at that
//! moment stays held forever there, so the child must not take any lock another thread could
//! have held. The parent forks from the VMM thread with every vCPU paused; the other threads are
//! the control socket's (blocked in `accept`, reading a request, or waiting for the VMM thread's
//! reply) and the monitor threads of earlier children (blocked in `read` or `waitpid`). So:
//!
//! - **Allocator.** glibc's `fork()` takes every malloc arena lock first and resets them in the
//!   child, so the child may allocate (Rust's default allocator is glibc malloc).
//! - **stdout.** The serial device writes the guest's output to stdout from a vCPU thread, under
//!   std's stdout lock and into its line buffer. A paused vCPU is outside any device access, so
//!   the lock is free, but the buffer may hold the parent's pending output: a child never writes
//!   to stdout and leaves with `_exit`, which flushes nothing, so that output is not repeated.
//! - **stderr and tracing.** Written by the VMM thread (the forking thread, not inside a write)
//!   and by vCPU threads only inside device accesses or on failures (none is running). A snapshot
//!   writer child writes nothing to stderr: it reports over a pipe. A forked VM child logs like
//!   any VMM once it runs.
//! - **The serial device's mutex.** Held by a vCPU only during a port access; the state is
//!   captured under it before the fork, and a forked VM child builds a new device from that state
//!   instead of touching the parent's.
//! - **Channels.** The parent's vCPU and event channels lead to threads that do not exist in the
//!   child; the child never uses them (a forked VM gets new ones).
//! - **The parent's objects.** The child never drops the parent's `Machine` (that would signal and
//!   join threads it does not have): it never returns from the code below and leaves with `_exit`.
//!   It closes every inherited descriptor but stdin/stdout/stderr, its report pipe and the mapped
//!   snapshot memory file (so the parent's VM, vCPUs and sockets are not kept alive by it), and
//!   unmaps the parent's vCPU `kvm_run` areas.
//!
//! # Generation ids of forked children
//!
//! A forked child runs with generation id `1 << 63 | parent pid << 32 | n`, where `n` counts the
//! children this process has forked (`stats` reports it as `forks_made`). Clones get small ids
//! (1, 2, …), which never have the top bit set; two forking processes differ in their pid.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use cowvm_guest_abi::boot_info::GENERATION_OFFSET;
use cowvm_guest_abi::layout::BOOT_INFO_ADDR;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::api::{self, ApiError, ApiServer};
use crate::builder::{self, BuildError, SavedMachine};
use crate::disk::freeze::OverlayPlace;
use crate::kvm::{open_kvm, KvmError};
use crate::machine::{Machine, VmEvent};
use crate::memory::GuestMemory;
use crate::snapshot::staging::StagingDir;
use crate::snapshot::state::{ParentRef, SnapshotKind, SnapshotState};
use crate::snapshot::{self, format, MappedFile, STATE_FILE};
use crate::vcpu::RunState;
use crate::vm::{EmptyVm, MemoryOrigin, VmError};

/// Set in every forked child's generation id (never in a clone's).
pub const FORK_GENERATION_FLAG: u64 = 1 << 63;
/// Most children one fork request makes (each adds a `fork()` to the pause).
pub const MAX_FORK_COUNT: u32 = 64;
/// Longest path a Unix socket can be bound at.
const MAX_SOCKET_PATH: usize = 107;

/// The generation id of the `n`th child forked by process `pid`.
pub fn fork_generation(pid: u32, n: u64) -> u64 {
    FORK_GENERATION_FLAG | u64::from(pid) << 32 | (n & 0xffff_ffff)
}

/// A live snapshot or fork could not be started, or a forked VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error("a live snapshot into {path} is being written by process {pid}; wait for its reply before taking another snapshot or forking")]
    SnapshotInFlight { path: PathBuf, pid: i32 },
    #[error("a fork request is still waiting for its children to start; wait for its reply")]
    ForkInFlight,
    #[error("fork count {0} is out of range: 1 to {MAX_FORK_COUNT} children per request")]
    BadCount(u32),
    #[error("{what} {path} is not a directory: create it first")]
    NotADirectory { what: &'static str, path: PathBuf },
    #[error("control socket path {0} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter --api-socket-dir")]
    SocketPathTooLong(PathBuf),
    #[error("cannot create a pipe to the child process: {0}")]
    Pipe(#[source] std::io::Error),
    #[error("fork() failed: {0}")]
    Fork(#[source] std::io::Error),
    #[error("cannot start the thread that waits for child process {pid}: {source}")]
    Monitor {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Build(Box<BuildError>),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("cannot write the generation id into guest RAM: {0}")]
    Generation(#[source] vm_memory::GuestMemoryError),
    #[error("cannot create the serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<BuildError> for ForkError {
    fn from(error: BuildError) -> Self {
        Self::Build(Box::new(error))
    }
}

/// What the monitor thread of a child process reports to the VMM thread's event loop.
#[derive(Debug)]
pub enum ChildEvent {
    /// The child's report line (a writer's result, a forked VM's set-up), or `None` if the pipe
    /// closed without one.
    Reported { pid: i32, line: Option<String> },
    /// The child process ended.
    Exited { pid: i32, status: ChildStatus },
}

/// How a child process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildStatus {
    Exited(i32),
    Signaled(i32),
    /// `waitpid` failed (someone else reaped it).
    Unknown,
}

impl std::fmt::Display for ChildStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Exited(code) => write!(f, "exited with status {code}"),
            Self::Signaled(signal) => {
                write!(f, "was killed by signal {signal}{}", signal_name(signal))
            }
            Self::Unknown => write!(f, "ended (its status is unknown)"),
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGXFSZ => " (SIGXFSZ: file size limit exceeded)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGBUS => " (SIGBUS)",
        libc::SIGABRT => " (SIGABRT)",
        _ => "",
    }
}

/// Forks this process. The child runs `child` with the write end of a pipe and then ends (it
/// is never back in the caller's code); in the parent, a monitor thread turns the child's first line on that pipe into
/// [`ChildEvent::Reported`] and its end into [`ChildEvent::Exited`]. Returns the child's pid.
fn spawn<F: FnOnce(OwnedFd)>(events: &Sender<VmEvent>, child: F) -> Result<i32, ForkError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(ForkError::Pipe(std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors nothing else owns.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child runs only `child`, which by the rules in this module's docs takes no
    // lock another thread may hold, never returns and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(ForkError::Fork(std::io::Error::last_os_error())),
        0 => {
            drop(read);
            child(write);
            exit_now(127)
        }
        pid => {
            // Ordering: the parent's copy of the write end is closed before the monitor reads,
            // so the read sees end-of-file when the child exits.
            drop(write);
            let events = events.clone();
            std::thread::Builder::new()
                .name(format!("child-{pid}"))
                .spawn(move || monitor(pid, read, &events))
                .map_err(|source| {
                    // Nobody would reap it or read its report: end it now.
                    // SAFETY: kill and waitpid on our own child's pid.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, std::ptr::null_mut(), 0);
                    }
                    ForkError::Monitor { pid, source }
                })?;
            Ok(pid)
        }
    }
}

/// The parent's side of one child: its report line, then its exit status.
fn monitor(pid: i32, read: OwnedFd, events: &Sender<VmEvent>) {
    let mut line = String::new();
    let reported = BufReader::new(File::from(read))
        .read_line(&mut line)
        .is_ok_and(|n| n > 0 && line.ends_with('\n'));
    let line = reported.then(|| line.trim_end().to_string());
    // The receiver is gone only when the VMM is exiting; the child then runs on its own.
    let _ = events.send(VmEvent::Child(ChildEvent::Reported { pid, line }));
    let status = wait_for(pid);
    let _ = events.send(VmEvent::Child(ChildEvent::Exited { pid, status }));
}

fn wait_for(pid: i32) -> ChildStatus {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status of our own child into `status`.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            break;
        }
        if ret < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return ChildStatus::Unknown;
    }
    if libc::WIFEXITED(status) {
        ChildStatus::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ChildStatus::Signaled(libc::WTERMSIG(status))
    } else {
        ChildStatus::Unknown
    }
}

/// Ends the child process at once: no destructors, no atexit handlers, no buffer flushes.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// A child's first steps: close every inherited descriptor but stdin, stdout, stderr and
/// `keep`, and unmap the parent's vCPU `kvm_run` areas, so the child holds nothing of the
/// parent's VM, vCPUs, sockets or files open.
fn leave_parent_behind(keep: &[RawFd]) {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: the parent's objects that own these descriptors are never used or dropped
            // in the child (see the module docs); closing an already closed one is harmless.
            unsafe { libc::close(fd) };
        }
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for line in maps.lines() {
        if !line.ends_with("anon_inode:kvm-vcpu") && !line.contains("anon_inode:kvm-vcpu:") {
            continue;
        }
        let Some((start, end)) = line
            .split_whitespace()
            .next()
            .and_then(|range| range.split_once('-'))
            .and_then(|(s, e)| {
                Some((
                    usize::from_str_radix(s, 16).ok()?,
                    usize::from_str_radix(e, 16).ok()?,
                ))
            })
        else {
            continue;
        };
        // SAFETY: a vCPU's kvm_run area, used only by the parent's vCPU threads, which do not
        // exist in the child.
        unsafe { libc::munmap(start as *mut libc::c_void, end - start) };
    }
}

/// Sends one line to the parent.
fn report(pipe: OwnedFd, value: &Value) {
    let mut file = File::from(pipe);
    // If the parent is gone nobody reads it; the child's work is done either way.
    let _ = file.write_all(format!("{value}\n").as_bytes());
}

/// Bytes of process `pid`'s guest RAM mappings that are private and dirty (`Private_Dirty` in
/// `/proc/PID/smaps`). Right after a `fork()` every page of guest RAM is shared with the child,
/// so in the parent this counts the pages its guest wrote since — each one copied (or, for a
/// page untouched before the fork, allocated) because the child was alive: Redis'
/// `rdb_last_cow_size`, measured on the side that pays it.
fn private_dirty(pid: u32, memory: &GuestMemory) -> std::io::Result<u64> {
    let ram: Vec<(u64, u64)> = memory
        .iter()
        .map(|r| (r.as_ptr() as u64, r.as_ptr() as u64 + r.len()))
        .collect();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(sum_private_dirty(&smaps, &ram))
}

fn sum_private_dirty(smaps: &str, ram: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut in_ram = false;
    for line in smaps.lines() {
        if let Some(value) = line.strip_prefix("Private_Dirty:") {
            if in_ram {
                let kib: u64 = value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                total += kib * 1024;
            }
            continue;
        }
        let range = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'));
        if let Some((start, end)) = range {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                in_ram = ram.iter().any(|&(s, e)| start < e && end > s);
            }
        }
    }
    total
}

/// What a live snapshot's writer child needs, all captured while the guest was paused.
#[derive(Debug)]
pub struct WriterJob<'a> {
    pub staging: &'a StagingDir,
    pub state: SnapshotState,
    pub memory: &'a GuestMemory,
    /// The pages to store, for a diff.
    pub diff: Option<&'a [u64]>,
    pub mapped: Option<&'a MappedFile>,
}

/// Forks a child that writes and publishes the snapshot from its copy-on-write view of guest
/// RAM, reports on its pipe and exits. Returns its pid.
pub fn spawn_writer(events: &Sender<VmEvent>, job: WriterJob<'_>) -> Result<i32, ForkError> {
    let parent = std::process::id();
    let paths = job.staging.paths();
    spawn(events, move |pipe| {
        let mut keep = vec![pipe.as_raw_fd()];
        keep.extend(job.mapped.map(MappedFile::raw_fd));
        leave_parent_behind(&keep);
        let started = Instant::now();
        let written = job
            .mapped
            .map_or(Ok(()), MappedFile::check)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let staging = StagingDir::adopt(paths);
                snapshot::write_memory(staging, job.state, job.memory, job.diff)
                    .and_then(snapshot::PendingSnapshot::publish)
                    .map_err(|e| e.to_string())
            });
        let write_us = started.elapsed().as_micros() as u64;
        let cow_bytes = private_dirty(parent, job.memory).ok();
        let (value, code) = match written {
            Ok(published) => (
                json!({
                    "ok": true,
                    "id": published.id,
                    "pages_stored": published.state.memory.pages_stored,
                    "write_us": write_us,
                    "cow_bytes": cow_bytes,
                }),
                0,
            ),
            Err(error) => (
                json!({"ok": false, "error": error, "write_us": write_us}),
                1,
            ),
        };
        report(pipe, &value);
        exit_now(code)
    })
}

/// The steps of a live snapshot's or fork's pause, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Every vCPU acknowledged the pause.
    Stop,
    /// Dirty bitmap (live snapshot) and vCPU, VM and device state captured.
    Capture,
    /// `fork()` returned (all children's, for a fork request).
    Fork,
    /// Every vCPU acknowledged the resume.
    Resume,
}

/// How long each step of a pause took: the guest-visible pause is from the pause request to the
/// last vCPU's acknowledgement of the resume.
#[derive(Clone, Debug)]
pub struct PausePhases {
    started: Instant,
    marks: Vec<(Phase, Instant)>,
}

impl PausePhases {
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            marks: Vec::with_capacity(4),
        }
    }

    /// `phase` ended now.
    pub fn mark(&mut self, phase: Phase) {
        self.marks.push((phase, Instant::now()));
    }

    /// Start to the last mark.
    pub fn total(&self) -> Duration {
        self.marks
            .last()
            .map_or(Duration::ZERO, |(_, at)| at.duration_since(self.started))
    }

    /// How long `phase` took (zero if it was not reached).
    pub fn of(&self, phase: Phase) -> Duration {
        let mut previous = self.started;
        for &(marked, at) in &self.marks {
            if marked == phase {
                return at.duration_since(previous);
            }
            previous = at;
        }
        Duration::ZERO
    }

    /// `{"stop": µs, "capture": µs, "fork": µs, "resume": µs}`.
    pub fn to_json(&self) -> Value {
        let us = |phase| self.of(phase).as_micros() as u64;
        json!({
            "stop": us(Phase::Stop),
            "capture": us(Phase::Capture),
            "fork": us(Phase::Fork),
            "resume": us(Phase::Resume),
        })
    }
}

/// A live snapshot being written by a child process.
#[derive(Debug)]
pub struct LiveWriter {
    pub pid: i32,
    /// The parent's handle on the staging directory: dropped (removing what is left of it)
    /// only once the child is gone.
    pub staging: StagingDir,
    pub id: String,
    pub kind: SnapshotKind,
    /// The dirty bits harvested for this snapshot: back into the next diff if it fails.
    pub dirty: Vec<u64>,
    pub reply: Sender<Value>,
    pub started: Instant,
    pub phases: PausePhases,
    pub report: Option<Value>,
}

/// A finished live snapshot, for the machine to take in.
#[derive(Debug)]
pub struct Settled {
    /// What the next diff builds on, if the snapshot was published.
    pub published: Option<ParentRef>,
    pub dirty: Vec<u64>,
}

/// Where one forked child goes.
#[derive(Clone, Debug)]
pub struct ChildPlan {
    pub generation: u64,
    pub serial: PathBuf,
    pub socket: PathBuf,
}

/// What a forked VM child starts from, captured while the guest was paused.
#[derive(Debug)]
pub struct Captured<'a> {
    pub state: &'a SnapshotState,
    pub memory: &'a GuestMemory,
    pub mapped: Option<&'a MappedFile>,
    pub kvm_device: &'a Path,
}

/// Forks a child that builds a new KVM VM over its copy-on-write view of guest RAM, restores
/// the captured state with its own generation id, serial file and control socket, and runs it
/// until its guest exits. Returns its pid.
pub fn spawn_vm(
    events: &Sender<VmEvent>,
    plan: &ChildPlan,
    captured: &Captured<'_>,
) -> Result<i32, ForkError> {
    spawn(events, |pipe| {
        let mut keep = vec![pipe.as_raw_fd()];
        keep.extend(captured.mapped.map(MappedFile::raw_fd));
        leave_parent_behind(&keep);
        match build_forked_vm(plan, captured) {
            Err(e) => {
                report(pipe, &json!({"ok": false, "error": e.to_string()}));
                exit_now(1)
            }
            Ok((mut machine, server)) => {
                report(pipe, &json!({"ok": true}));
                let status = match machine.wait() {
                    Ok(status) => i32::from(status),
                    Err(e) => {
                        eprintln!(
                            "cowvm: error: forked VM (pid {}, generation {:#x}): {e}",
                            std::process::id(),
                            plan.generation
                        );
                        1
                    }
                };
                // The child's own objects: its vCPU threads stopped, then its socket file
                // removed once the last replies are written.
                drop(machine);
                drop(server);
                exit_now(status)
            }
        }
    })
}

/// The same three steps as a restore, over the inherited memory, then the captured state.
fn build_forked_vm(
    plan: &ChildPlan,
    captured: &Captured<'_>,
) -> Result<(Machine, ApiServer), ForkError> {
    let kvm = open_kvm(captured.kvm_device)?;
    let serial = File::create(&plan.serial).map_err(|source| ForkError::SerialFile {
        path: plan.serial.clone(),
        source,
    })?;
    let created_at = Instant::now();
    let mut vm = EmptyVm::create(&kvm)?;
    // A new VM: its first snapshot is a full one (it has no snapshot to build a diff on).
    vm.set_dirty_log_mode(MemoryOrigin::Boot)?;
    let memory = captured.memory.clone();
    // Ordering: the id is in this child's copy of RAM before any of its vCPUs runs, and
    // written through vm-memory so that this VM's dirty bitmap records the page.
    memory
        .write_obj(
            plan.generation,
            GuestAddress(BOOT_INFO_ADDR + GENERATION_OFFSET),
        )
        .map_err(ForkError::Generation)?;
    let vm = vm.register_memory(memory)?;
    // The parent froze the disks at the pause and recorded their chains by absolute path.
    let disk_chains = captured
        .state
        .disks
        .iter()
        .map(|disk| disk.verify(Path::new("/")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ForkError::Build(Box::new(crate::snapshot::SnapshotError::from(e).into())))?;
    let machine = builder::from_state(SavedMachine {
        kvm: &kvm,
        vm,
        vcpu_fds: None,
        state: captured.state,
        serial_out: Box::new(serial),
        parent: None,
        mapped: captured.mapped.cloned(),
        initial: RunState::Running,
        created_at,
        kvm_device: captured.kvm_device.to_owned(),
        disk_chains,
        overlays: OverlayPlace::Image {
            prefix: format!("fork-{:016x}", plan.generation),
        },
    })?;
    let server = api::serve(&plan.socket, machine.event_sender())?;
    Ok((machine, server))
}

/// One forked VM child, as the parent tracks it.
#[derive(Debug)]
struct ForkedChild {
    pid: i32,
    plan: ChildPlan,
    /// `None` while it runs.
    status: Option<ChildStatus>,
}

/// A fork request waiting for its children to report that they run.
#[derive(Debug)]
struct PendingFork {
    reply: Sender<Value>,
    /// Pids still to report, and each child's outcome so far.
    waiting: Vec<i32>,
    failures: Vec<String>,
    phases: PausePhases,
    fork_times: Vec<Duration>,
    progress: Vec<u64>,
    pids: Vec<i32>,
}

/// The live snapshots and forks of one VM: what is in flight, the children, the last results.
#[derive(Debug, Default)]
pub struct LiveOps {
    writer: Option<LiveWriter>,
    fork: Option<PendingFork>,
    children: Vec<ForkedChild>,
    forks_made: u64,
    last_snapshot: Option<Value>,
}

impl LiveOps {
    /// Refuses to start a snapshot or fork while a live snapshot or fork is in flight.
    pub fn ensure_idle(&self) -> Result<(), ForkError> {
        if let Some(writer) = &self.writer {
            return Err(ForkError::SnapshotInFlight {
                path: writer.staging.target().to_owned(),
                pid: writer.pid,
            });
        }
        if self.fork.is_some() {
            return Err(ForkError::ForkInFlight);
        }
        Ok(())
    }

    /// Whether a request is waiting for a child.
    pub fn busy(&self) -> bool {
        self.writer.is_some() || self.fork.is_some()
    }

    pub fn start_writer(&mut self, writer: LiveWriter) {
        self.writer = Some(writer);
    }

    /// Names and generation ids for `count` children, after checking where they go.
    pub fn plan(
        &mut self,
        count: u32,
        serial_dir: &Path,
        socket_dir: &Path,
    ) -> Result<Vec<ChildPlan>, ForkError> {
        if count == 0 || count > MAX_FORK_COUNT {
            return Err(ForkError::BadCount(count));
        }
        for (what, dir) in [
            ("--serial-dir", serial_dir),
            ("--api-socket-dir", socket_dir),
        ] {
            if !dir.is_dir() {
                return Err(ForkError::NotADirectory {
                    what,
                    path: dir.to_owned(),
                });
            }
        }
        let pid = std::process::id();
        let mut plans = Vec::with_capacity(count as usize);
        for _ in 0..count {
            self.forks_made += 1;
            let generation = fork_generation(pid, self.forks_made);
            let socket = socket_dir.join(format!("fork-{generation:016x}.sock"));
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(ForkError::SocketPathTooLong(socket));
            }
            plans.push(ChildPlan {
                generation,
                serial: serial_dir.join(format!("fork-{generation:016x}.serial")),
                socket,
            });
        }
        Ok(plans)
    }

    /// Records children forked by one request; the reply goes out once each has reported.
    #[allow(clippy::too_many_arguments)]
    pub fn start_fork(
        &mut self,
        reply: Sender<Value>,
        forked: Vec<(i32, ChildPlan)>,
        failure: Option<String>,
        phases: PausePhases,
        fork_times: Vec<Duration>,
        progress: Vec<u64>,
    ) {
        let pids: Vec<i32> = forked.iter().map(|(pid, _)| *pid).collect();
        for (pid, plan) in forked {
            self.children.push(ForkedChild {
                pid,
                plan,
                status: None,
            });
        }
        let pending = PendingFork {
            reply,
            waiting: pids.clone(),
            failures: failure.into_iter().collect(),
            phases,
            fork_times,
            progress,
            pids,
        };
        self.fork = Some(pending);
        self.finish_fork_if_done();
    }

    /// Takes in a child's report or exit; returns a finished live snapshot for the machine to
    /// take in (the reply has been sent).
    pub fn on_event(&mut self, event: ChildEvent) -> Option<Settled> {
        match event {
            ChildEvent::Reported { pid, line } => {
                if let Some(writer) = self.writer.as_mut().filter(|w| w.pid == pid) {
                    writer.report = line.and_then(|l| serde_json::from_str(&l).ok());
                } else {
                    self.child_reported(pid, line);
                }
                None
            }
            ChildEvent::Exited { pid, status } => {
                if self.writer.as_ref().is_some_and(|w| w.pid == pid) {
                    return self.writer.take().map(|w| self.settle_writer(w, status));
                }
                if let Some(child) = self.children.iter_mut().find(|c| c.pid == pid) {
                    child.status = Some(status);
                }
                // A child that ends before reporting has failed to start.
                self.child_reported(pid, None);
                None
            }
        }
    }

    fn child_reported(&mut self, pid: i32, line: Option<String>) {
        let Some(fork) = self.fork.as_mut() else {
            return;
        };
        let Some(at) = fork.waiting.iter().position(|&p| p == pid) else {
            return;
        };
        fork.waiting.remove(at);
        let report: Option<Value> = line.as_deref().and_then(|l| serde_json::from_str(l).ok());
        match report {
            Some(report) if report["ok"] == Value::Bool(true) => {}
            Some(report) => fork.failures.push(format!(
                "child {pid}: {}",
                report["error"].as_str().unwrap_or("set-up failed")
            )),
            None => fork
                .failures
                .push(format!("child {pid} ended before it ran")),
        }
        self.finish_fork_if_done();
    }

    /// Replies to a fork request once every child has reported: all running, or (if any
    /// failed) none — the others are killed, so a request forks all its children or none.
    fn finish_fork_if_done(&mut self) {
        if self.fork.as_ref().is_none_or(|f| !f.waiting.is_empty()) {
            return;
        }
        let Some(fork) = self.fork.take() else {
            return;
        };
        let us = |d: Duration| d.as_micros() as u64;
        let reply = if fork.failures.is_empty() {
            let children: Vec<Value> = self
                .children
                .iter()
                .filter(|c| fork.pids.contains(&c.pid))
                .map(|c| {
                    json!({
                        "pid": c.pid,
                        "generation": c.plan.generation,
                        "api_socket": c.plan.socket,
                        "serial": c.plan.serial,
                    })
                })
                .collect();
            json!({
                "ok": true,
                "children": children,
                "paused_us": us(fork.phases.total()),
                "pause_phases_us": fork.phases.to_json(),
                "fork_us": fork.fork_times.iter().map(|&d| us(d)).collect::<Vec<_>>(),
                "guest_progress": fork.progress,
            })
        } else {
            for &pid in &fork.pids {
                if self
                    .children
                    .iter()
                    .any(|c| c.pid == pid && c.status.is_none())
                {
                    // SAFETY: kill of our own child, which its monitor thread reaps.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            json!({
                "ok": false,
                "error": format!(
                    "fork failed, no child was left running: {}",
                    fork.failures.join("; ")
                ),
            })
        };
        let _ = fork.reply.send(reply);
    }

    /// Replies to a live snapshot whose writer has ended and says what the machine keeps.
    fn settle_writer(&mut self, writer: LiveWriter, status: ChildStatus) -> Settled {
        let us = |d: Duration| d.as_micros() as u64;
        let target = writer.staging.target().to_owned();
        let report = writer.report.unwrap_or(Value::Null);
        let published = report["ok"] == Value::Bool(true) && report["id"] == writer.id.as_str();
        let reply = if published {
            let summary = json!({
                "path": target,
                "id": writer.id,
                "kind": writer.kind,
                "pages_stored": report["pages_stored"],
                "paused_us": us(writer.phases.total()),
                "pause_phases_us": writer.phases.to_json(),
                "fork_us": us(writer.phases.of(Phase::Fork)),
                "write_us": report["write_us"],
                "cow_bytes": report["cow_bytes"],
                "total_us": us(writer.started.elapsed()),
                "writer_pid": writer.pid,
            });
            self.last_snapshot = Some(summary.clone());
            let mut reply = json!({"ok": true, "live": true});
            merge(&mut reply, &summary);
            reply
        } else {
            // A writer killed after its rename may have published: take that back, so an error
            // reply always means nothing under the snapshot's name.
            let removed = remove_if_ours(&target, &writer.id);
            let why = match report["error"].as_str() {
                Some(error) => error.to_string(),
                None => format!(
                    "its writer process {} {status} before reporting",
                    writer.pid
                ),
            };
            json!({
                "ok": false,
                "error": format!(
                    "live snapshot {} not taken: {why}; {}nothing is published, and the pages written since the last snapshot go into the next diff",
                    target.display(),
                    if removed { "the directory it had renamed into place was removed; " } else { "" }
                ),
            })
        };
        let _ = writer.reply.send(reply);
        let parent = published.then(|| ParentRef {
            path: std::fs::canonicalize(&target)
                .unwrap_or_else(|_| target.clone())
                .display()
                .to_string(),
            id: Some(writer.id.clone()),
            state_crc: None,
        });
        // `writer.staging` drops here: it removes the staging directory a failed child left.
        Settled {
            published: parent,
            dirty: writer.dirty,
        }
    }

    /// What `stats` shows of live snapshots and forks.
    pub fn stats(&self) -> Value {
        json!({
            "forks_made": self.forks_made,
            "forked_children": self.children.iter().map(|c| json!({
                "pid": c.pid,
                "generation": c.plan.generation,
                "api_socket": c.plan.socket,
                "state": c.status.map_or_else(|| "running".to_string(), |s| s.to_string()),
            })).collect::<Vec<_>>(),
            "live_snapshot_in_flight": self.writer.as_ref().map(|w| json!({
                "pid": w.pid,
                "path": w.staging.target(),
                "running_us": w.started.elapsed().as_micros() as u64,
            })),
            "last_live_snapshot": self.last_snapshot,
        })
    }
}

/// Copies the fields of `from` (an object) into `into` (an object).
pub fn merge(into: &mut Value, from: &Value) {
    if let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) {
        for (key, value) in from {
            into.insert(key.clone(), value.clone());
        }
    }
}

/// Removes `dir` if it is a snapshot with id `id`; whether it did.
fn remove_if_ours(dir: &Path, id: &str) -> bool {
    let ours = format::read::<SnapshotState>(&dir.join(STATE_FILE))
        .is_ok_and(|decoded| decoded.value.id.as_deref() == Some(id));
    ours && std::fs::remove_dir_all(dir).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_generations_never_look_like_clone_ids() {
        let first = fork_generation(1234, 1);
        assert_eq!(first, 0x8000_04d2_0000_0001);
        assert_ne!(first, fork_generation(1234, 2));
        assert_ne!(first, fork_generation(1235, 1));
        for clone_id in [1u64, 2, 1000, u32::MAX as u64] {
            assert_eq!(clone_id & FORK_GENERATION_FLAG, 0);
        }
        assert_ne!(
            fork_generation(1, 0),
            0,
            "a forked child never gets generation 0"
        );
    }

    #[test]
    fn private_dirty_counts_only_guest_ram_mappings() {
        let smaps = "\
00400000-00600000 r-xp 00000000 08:01 1 /usr/bin/cowvm
Private_Dirty:        12 kB
7f0000000000-7f0040000000 rw-p 00000000 00:00 0
Size:            1048576 kB
Private_Dirty:       256 kB
VmFlags: rd wr mr mw me ac hg
7f0040000000-7f0040021000 rw-p 00000000 00:00 0
Private_Dirty:        64 kB
7f0080000000-7f00c0000000 rw-p 00000000 00:00 0
Private_Dirty:         8 kB
";
        let ram = [
            (0x7f00_0000_0000, 0x7f00_4000_0000),
            (0x7f00_8000_0000, 0x7f00_c000_0000),
        ];
        assert_eq!(sum_private_dirty(smaps, &ram), (256 + 8) * 1024);
        assert_eq!(sum_private_dirty(smaps, &[]), 0);
    }

    #[test]
    fn pause_phases_add_up() {
        let mut phases = PausePhases::start();
        for phase in [Phase::Stop, Phase::Capture, Phase::Fork, Phase::Resume] {
            std::thread::sleep(Duration::from_millis(2));
            phases.mark(phase);
        }
        let json = phases.to_json();
        let sum: u64 = ["stop", "capture", "fork", "resume"]
            .iter()
            .map(|key| json[key].as_u64().unwrap())
            .sum();
        // Each phase is truncated to whole microseconds on its own.
        assert!(
            sum.abs_diff(phases.total().as_micros() as u64) < 4,
            "{json}"
        );
        assert!(phases.of(Phase::Fork) >= Duration::from_millis(2));
        assert_eq!(PausePhases::start().total(), Duration::ZERO);
    }

    #[test]
    fn statuses_say_how_a_child_ended() {
        assert_eq!(ChildStatus::Exited(3).to_string(), "exited with status 3");
        assert_eq!(
            ChildStatus::Signaled(libc::SIGKILL).to_string(),
            "was killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn plans_check_directories_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut ops = LiveOps::default();
        assert!(matches!(
            ops.plan(0, dir.path(), dir.path()),
            Err(ForkError::BadCount(0))
        ));
        assert!(matches!(
            ops.plan(MAX_FORK_COUNT + 1, dir.path(), dir.path()),
            Err(ForkError::BadCount(_))
        ));
        let missing = dir.path().join("missing");
        let err = ops.plan(1, &missing, dir.path()).unwrap_err();
        assert!(err.to_string().contains("--serial-dir"), "{err}");
        let plans = ops.plan(3, dir.path(), dir.path()).unwrap();
        let generations: Vec<u64> = plans.iter().map(|p| p.generation).collect();
        assert_eq!(
            generations,
            (1..=3)
                .map(|n| fork_generation(std::process::id(), n))
                .collect::<Vec<_>>()
        );
        assert!(plans[0]
            .socket
            .ends_with(format!("fork-{:016x}.sock", generations[0])));
        let long = dir.path().join("x".repeat(120));
        std::fs::create_dir(&long).unwrap();
        assert!(matches!(
            ops.plan(1, dir.path(), &long),
            Err(ForkError::SocketPathTooLong(_))
        ));
    }
}
