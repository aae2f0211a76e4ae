//! Live snapshots and live forks: the VMM process `fork()`s while the vCPUs are paused, and the
//! child's copy-on-write view of guest RAM is either written to disk (a live snapshot) or becomes
//! a new running VM (a live fork), while the parent's guest runs on at once.
//!
//! Guest RAM is private memory (anonymous, or a `MAP_PRIVATE` snapshot file), so after `fork()`
//! parent and child share every page until one of them writes it; the kernel then copies that
//! page for the writer. The parent pays for copying its page tables (with transparent huge pages
//! one entry per 2 MiB) and, while the child lives, for a copy of each page its guest writes.
//!
//! The process mechanics are here; `child.rs` is what runs in a child, `ops.rs` the parent's
//! bookkeeping of children and of the requests waiting for them.
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
//! - **Device mutexes** (the serial UART, virtio-blk). Held by a vCPU only during a device
//!   access; the state is captured under them before the fork, and a forked VM child builds new
//!   devices from that state (its disks on its own overlays over the frozen images, opened by
//!   path) instead of touching the parent's. No device has a thread of its own.
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

mod child;
mod ops;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::ApiError;
use crate::builder::BuildError;
use crate::kvm::KvmError;
use crate::machine::VmEvent;
use crate::vm::VmError;

pub use child::{spawn_vm, spawn_writer, Captured, ChildPlan, WriterJob};
pub use ops::{merge, LiveOps, LiveWriter, Settled};

/// Set in every forked child's generation id (never in a clone's).
pub const FORK_GENERATION_FLAG: u64 = 1 << 63;
/// Most children one fork request makes (each adds a `fork()` to the pause).
pub const MAX_FORK_COUNT: u32 = 64;
/// Longest path a Unix socket can be bound at.
pub(super) const MAX_SOCKET_PATH: usize = 107;

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
pub(super) fn spawn<F: FnOnce(OwnedFd)>(
    events: &Sender<VmEvent>,
    child: F,
) -> Result<i32, ForkError> {
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
pub(super) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
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
}
