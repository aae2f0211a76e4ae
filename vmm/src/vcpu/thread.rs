//! The vCPU thread: an explicit state machine (Running → Paused → Running …, → Finished) driven by
//! tagged requests from the VMM thread, and the VMM thread's handle on it.
//!
//! Every request carries a ticket and every reply names the ticket it answers, so a reply that
//! arrives after the VMM gave up waiting (a vCPU stuck in a slow device write) is recognised as
//! stale and dropped instead of answering the next request.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Once;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::exit::{handle_exit, ExitAction};
use super::{Vcpu, VcpuError, VcpuEvent};
use crate::snapshot::state::VcpuState;

/// How long the VMM waits for a vCPU to answer a request, unless the caller says otherwise.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A message to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRequest {
    Pause,
    Resume,
    /// Save the vCPU's state (only while paused or finished).
    SaveState,
    Stop,
}

/// A vCPU thread's answer to a request.
#[derive(Debug)]
pub enum VcpuResponse {
    /// The state after a pause or resume.
    State(RunState),
    Saved(Box<Result<VcpuState, VcpuError>>),
}

/// The state of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// Halted or failed: it answers requests but never enters the guest again.
    Finished,
}

/// A request and the ticket its reply will carry.
type Tagged<T> = (u64, T);

thread_local! {
    /// The `immediate_exit` byte of the `kvm_run` area of the vCPU this thread runs.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal that kicks a vCPU out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|flag| {
        let flag = flag.get();
        if !flag.is_null() {
            // SAFETY: the pointer was set by this thread to its own vCPU's kvm_run mapping and is
            // cleared before that mapping goes away. A volatile byte store is async-signal-safe.
            // Setting immediate_exit makes the next (or the current, once interrupted) KVM_RUN
            // return EINTR, so a kick that lands just before KVM_RUN is not lost.
            unsafe { flag.write_volatile(1) };
        }
    });
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), handle_kick) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

impl Vcpu {
    /// Starts the vCPU thread in `state` (Running, or Paused to wait for a resume).
    pub fn start(self, state: RunState) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler();
        let index = self.index;
        let (request_tx, request_rx) = mpsc::channel();
        let (response_tx, response_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run_thread(state, request_rx, response_tx))
            .map_err(|source| VcpuError::SpawnThread { index, source })?;
        Ok(VcpuHandle {
            index,
            requests: request_tx,
            responses: response_rx,
            next_ticket: 0,
            thread: Some(thread),
            returned: None,
        })
    }

    /// The thread's body; returns the vCPU's fd so that a clone-pool slot can run it again.
    fn run_thread(
        mut self,
        mut state: RunState,
        requests: Receiver<Tagged<VcpuRequest>>,
        responses: Sender<Tagged<VcpuResponse>>,
    ) -> VcpuFd {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: `run` points at this vCPU's kvm_run mapping, alive as long as `self.fd`.
        let immediate_exit: *mut u8 = unsafe { &raw mut (*run).immediate_exit };
        IMMEDIATE_EXIT.with(|flag| flag.set(immediate_exit));
        // A VM built from a snapshot may hold device requests its source paused before.
        if state == RunState::Running {
            self.mmio.resume_devices();
        }
        loop {
            let request = if state == RunState::Running {
                match requests.try_recv() {
                    Ok(request) => Some(request),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match requests.recv() {
                    Ok(request) => Some(request),
                    Err(_) => break,
                }
            };
            // The VMM may have given up waiting on a reply; it drops stale ones by ticket.
            match request {
                Some((_, VcpuRequest::Stop)) => break,
                Some((ticket, VcpuRequest::SaveState)) => {
                    let saved = match state {
                        RunState::Running => Err(VcpuError::NotPaused { index: self.index }),
                        _ => self.save_state(),
                    };
                    let _ = responses.send((ticket, VcpuResponse::Saved(Box::new(saved))));
                }
                Some((ticket, request)) => {
                    let was = state;
                    state = self.transition(state, request, run);
                    let _ = responses.send((ticket, VcpuResponse::State(state)));
                    // Ordering: after the reply, so the VM counts as running (the pause has
                    // ended) while this vCPU finishes the device requests the pause held back.
                    if was == RunState::Paused && state == RunState::Running {
                        self.mmio.resume_devices();
                    }
                }
                None => state = self.run_once(run),
            }
        }
        IMMEDIATE_EXIT.with(|flag| flag.set(std::ptr::null_mut()));
        self.fd
    }

    fn transition(&mut self, state: RunState, request: VcpuRequest, run: *mut kvm_run) -> RunState {
        match (state, request) {
            (RunState::Running, VcpuRequest::Pause) => self.complete_pending_io(run),
            (RunState::Paused, VcpuRequest::Resume) => RunState::Running,
            (state, _) => state,
        }
    }

    /// Ordering: an exit for port or MMIO input is only finished by the next KVM_RUN, which
    /// copies the data into the guest register. Entering with `immediate_exit` set completes
    /// it and returns EINTR at once, so the saved registers of a paused vCPU are never
    /// mid-instruction. Completing one access may produce another exit (the next items of a
    /// string instruction, the other half of a split MMIO access): each is handled like any exit,
    /// until KVM returns EINTR. Returns Paused, or Finished if one of those exits ended the vCPU.
    fn complete_pending_io(&mut self, run: *mut kvm_run) -> RunState {
        loop {
            self.fd.set_kvm_immediate_exit(1);
            match self.step(run) {
                Step::Interrupted => break,
                Step::Continue => continue,
                Step::Finished => {
                    self.fd.set_kvm_immediate_exit(0);
                    return RunState::Finished;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        RunState::Paused
    }

    fn run_once(&mut self, run: *mut kvm_run) -> RunState {
        match self.step(run) {
            Step::Interrupted => {
                // A kick: clear it and go back to the top of the loop to read the request.
                self.fd.set_kvm_immediate_exit(0);
                RunState::Running
            }
            Step::Continue => RunState::Running,
            Step::Finished => RunState::Finished,
        }
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn step(&mut self, run: *mut kvm_run) -> Step {
        let index = self.index;
        let result = self.fd.run().map(|exit| {
            // SAFETY: `run` is this vCPU's kvm_run mapping. Only the `io` header inside the
            // kvm_run struct is read, which the live `exit` (borrowing the data page at
            // `io.data_offset`, outside the struct) does not cover; for other exits the value is
            // unused.
            let io_size = unsafe { (*run).__bindgen_anon_1.io.size };
            handle_exit(exit, usize::from(io_size), &self.pio, &self.mmio)
        });
        let action = match result {
            Ok(action) => action,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Step::Interrupted
            }
            Err(source) => {
                let error = VcpuError::Ioctl {
                    index,
                    op: "KVM_RUN",
                    source,
                };
                return self.finish(VcpuEvent::Failed(index, error));
            }
        };
        match action {
            ExitAction::Continue => Step::Continue,
            ExitAction::Halt => self.finish(VcpuEvent::Halted(index)),
            ExitAction::Shutdown => {
                let registers = self.registers();
                self.finish(VcpuEvent::Failed(
                    index,
                    VcpuError::GuestShutdown { index, registers },
                ))
            }
            ExitAction::Unexpected(mut exit) => {
                if exit == "KVM_EXIT_INTERNAL_ERROR" {
                    exit.push_str(&self.internal_error_details());
                }
                let registers = self.registers();
                let error = VcpuError::UnexpectedExit {
                    index,
                    exit,
                    registers,
                };
                self.finish(VcpuEvent::Failed(index, error))
            }
        }
    }

    fn finish(&self, event: VcpuEvent) -> Step {
        (self.events)(event);
        Step::Finished
    }
}

/// What one `KVM_RUN` came to.
enum Step {
    /// `immediate_exit` or a signal: KVM returned EINTR without running the guest further.
    Interrupted,
    Continue,
    Finished,
}

/// The VMM thread's side of a running vCPU.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u32,
    requests: Sender<Tagged<VcpuRequest>>,
    responses: Receiver<Tagged<VcpuResponse>>,
    next_ticket: u64,
    thread: Option<JoinHandle<VcpuFd>>,
    /// The vCPU's fd once its thread has ended.
    returned: Option<VcpuFd>,
}

/// A request that was sent and whose reply is awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Ticket {
    id: u64,
    request: VcpuRequest,
    sent_at: Instant,
}

impl VcpuHandle {
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Sends `request` and interrupts `KVM_RUN` so the thread reads it.
    pub fn send(&mut self, request: VcpuRequest) -> Result<Ticket, VcpuError> {
        let id = self.next_ticket;
        self.next_ticket += 1;
        self.requests
            .send((id, request))
            .map_err(|_| VcpuError::ThreadGone { index: self.index })?;
        if let Some(thread) = &self.thread {
            // Ordering: the request is queued before the kick, so the woken thread finds it.
            if let Err(e) = thread.kill(kick_signal()) {
                tracing::debug!("kick of vCPU {}: {e}", self.index);
            }
        }
        Ok(Ticket {
            id,
            request,
            sent_at: Instant::now(),
        })
    }

    /// Waits until `deadline` for the reply to `ticket`, dropping replies to earlier requests
    /// that arrived after their waiter gave up.
    pub fn wait(&self, ticket: Ticket, deadline: Instant) -> Result<VcpuResponse, VcpuError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                Ok((id, response)) if id == ticket.id => return Ok(response),
                Ok((id, response)) if id < ticket.id => {
                    tracing::debug!(
                        "vCPU {}: dropping a late reply to request {id}: {response:?}",
                        self.index
                    );
                }
                Ok((id, _)) => {
                    return Err(VcpuError::ReplyMismatch {
                        index: self.index,
                        expected: ticket.id,
                        found: id,
                    })
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::NoResponse {
                        index: self.index,
                        request: ticket.request,
                        waited: ticket.sent_at.elapsed(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(VcpuError::ThreadGone { index: self.index })
                }
            }
        }
    }

    /// Stops the thread and waits for it. A thread that does not stop within
    /// [`RESPONSE_TIMEOUT`] (stuck in a device, e.g. writing to a pipe nobody reads) is left
    /// behind rather than hanging the VMM: it ends with the process.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if self.requests.send((u64::MAX, VcpuRequest::Stop)).is_ok() {
            // Ordering: queued before the kick, as in `send`.
            let _ = thread.kill(kick_signal());
        }
        // The thread drops its reply sender when it ends: wait for that, not for a reply.
        let deadline = Instant::now() + RESPONSE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        "vCPU {} did not stop within {RESPONSE_TIMEOUT:?}; leaving its thread behind",
                        self.index
                    );
                    return;
                }
            }
        }
        match thread.join() {
            Ok(fd) => self.returned = Some(fd),
            Err(_) => tracing::error!("the thread of vCPU {} panicked", self.index),
        }
    }

    /// Stops the thread and hands back the vCPU's fd, or `None` if the thread did not end.
    pub fn into_fd(mut self) -> Option<VcpuFd> {
        self.stop();
        self.returned.take()
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
