//! vCPU threads. Each owns one KVM vCPU and runs an explicit state machine
//! (Running → Paused → Running …, → Finished) driven by messages from the VMM thread; KVM exits
//! are turned into bus accesses or VM events by [`handle_exit`], which unit tests call with
//! synthetic exits. A vCPU thread never exits the process: it reports to the VMM thread.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::snapshot::state::FpuState;
use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot;
use crate::devices::{Bus, VcpuAction};
use crate::snapshot::state::VcpuState;

/// How long the VMM waits for a vCPU to acknowledge a pause or resume.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Something the VMM thread must act on.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest wrote its exit status to the exit device.
    GuestExit(u8),
    /// A vCPU executed `hlt` with nothing to wake it (no interrupts are delivered).
    VcpuHalted(u32),
    /// A vCPU stopped with an error (triple fault, unexpected exit, failed ioctl).
    VcpuFailed(u32, VcpuError),
    /// A control-socket request and where to send the reply.
    Api(crate::api::ApiRequest, Sender<serde_json::Value>),
}

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

/// MSRs saved with a vCPU (the guest uses none of the others). KVM stops reading at the first
/// one the host does not support; only those read are saved and restored.
const SAVED_MSRS: [u32; 8] = [
    0x10,        // IA32_TSC
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// The state of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// Halted or failed: it answers requests but never enters the guest again.
    Finished,
}

/// A vCPU-level failure.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {index} failed: {source}")]
    Create {
        index: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {op} failed: {source}")]
    Ioctl {
        index: u32,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: the guest shut down (triple fault: an exception with no usable handler)\n{registers}")]
    GuestShutdown { index: u32, registers: String },
    #[error("vCPU {index}: unexpected exit {exit}\n{registers}")]
    UnexpectedExit {
        index: u32,
        exit: String,
        registers: String,
    },
    #[error("cannot start the thread of vCPU {index}: {source}")]
    SpawnThread {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("vCPU {index} did not answer {request:?} within {RESPONSE_TIMEOUT:?}")]
    NoResponse { index: u32, request: VcpuRequest },
    #[error("the thread of vCPU {index} is gone")]
    ThreadGone { index: u32 },
    #[error("vCPU {index} must be paused to save its state")]
    NotPaused { index: u32 },
    #[error("vCPU {index}: the saved state has a bad {what}")]
    BadState { index: u32, what: &'static str },
    #[error("vCPU {index}: KVM_SET_MSRS set {set} of {wanted} MSRs")]
    PartialMsrs {
        index: u32,
        set: usize,
        wanted: usize,
    },
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    Halt,
    Shutdown,
    Unexpected(String),
}

impl From<VcpuAction> for ExitAction {
    fn from(action: VcpuAction) -> Self {
        match action {
            VcpuAction::Continue => Self::Continue,
            VcpuAction::Park => Self::Halt,
        }
    }
}

/// Dispatches one KVM exit. Port and MMIO accesses go to the buses (which zero read buffers
/// and log unmapped addresses); everything else becomes an action for the run loop.
pub fn handle_exit(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            pio.read(u64::from(port), data);
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => pio.write(u64::from(port), data).into(),
        VcpuExit::MmioRead(addr, data) => {
            mmio.read(addr, data);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => mmio.write(addr, data).into(),
        VcpuExit::Hlt => ExitAction::Halt,
        VcpuExit::Shutdown => ExitAction::Shutdown,
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Unexpected(format!(
            "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x} on host cpu {cpu})"
        )),
        VcpuExit::InternalError => ExitAction::Unexpected("KVM_EXIT_INTERNAL_ERROR".into()),
        other => ExitAction::Unexpected(format!("{other:?}")),
    }
}

/// Formats the registers a user needs to see where a guest died.
pub fn format_registers(regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    format!(
        "  rip={:#018x} rsp={:#018x} rbp={:#018x} rflags={:#x}\n  \
         rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  \
         rsi={:#018x} rdi={:#018x} r8={:#018x} r9={:#018x}\n  \
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
        regs.rip,
        regs.rsp,
        regs.rbp,
        regs.rflags,
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        regs.r8,
        regs.r9,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.cs.selector
    )
}

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

/// One vCPU before its thread starts.
#[derive(Debug)]
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: Sender<VmEvent>,
}

impl Vcpu {
    pub fn new(
        index: u32,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: Sender<VmEvent>,
    ) -> Self {
        Self {
            index,
            fd,
            pio,
            mmio,
            events,
        }
    }

    fn ioctl<T>(
        &self,
        op: &'static str,
        result: Result<T, kvm_ioctls::Error>,
    ) -> Result<T, VcpuError> {
        result.map_err(|source| VcpuError::Ioctl {
            index: self.index,
            op,
            source,
        })
    }

    /// Sets CPUID (with this vCPU's APIC id), long mode, FPU and the entry registers.
    pub fn configure_boot(&self, cpuid: &CpuId, entry: u64, cr3: u64) -> Result<(), VcpuError> {
        let mut cpuid = cpuid.clone();
        for leaf in cpuid.as_mut_slice() {
            match leaf.function {
                // EBX[31:24] is the initial APIC id.
                1 => leaf.ebx = (leaf.ebx & 0x00ff_ffff) | (self.index << 24),
                // EDX of the extended topology leaves is the x2APIC id.
                0xb | 0x1f => leaf.edx = self.index,
                _ => {}
            }
        }
        self.ioctl("KVM_SET_CPUID2", self.fd.set_cpuid2(&cpuid))?;
        let mut sregs = self.ioctl("KVM_GET_SREGS", self.fd.get_sregs())?;
        boot::configure_long_mode(&mut sregs, cr3);
        self.ioctl("KVM_SET_SREGS", self.fd.set_sregs(&sregs))?;
        self.ioctl("KVM_SET_FPU", self.fd.set_fpu(&boot::initial_fpu()))?;
        self.ioctl(
            "KVM_SET_REGS",
            self.fd.set_regs(&boot::initial_regs(self.index, entry)),
        )?;
        Ok(())
    }

    /// Reads the vCPU's state in Firecracker's order.
    ///
    /// Ordering: MP state first (reading it can change pending LAPIC events), vCPU events last.
    /// State a host does not support (e.g. XSAVE under some nested hypervisors) is left out and
    /// skipped on restore.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let mp_state = self.optional("KVM_GET_MP_STATE", self.fd.get_mp_state());
        let regs = self.ioctl("KVM_GET_REGS", self.fd.get_regs())?;
        let sregs = self.ioctl("KVM_GET_SREGS", self.fd.get_sregs())?;
        let xsave = self.optional("KVM_GET_XSAVE", self.fd.get_xsave());
        let fpu = match xsave {
            Some(_) => None,
            None => Some(FpuState::from(
                &self.ioctl("KVM_GET_FPU", self.fd.get_fpu())?,
            )),
        };
        let xcrs = self.optional("KVM_GET_XCRS", self.fd.get_xcrs());
        let debug_regs = self.optional("KVM_GET_DEBUGREGS", self.fd.get_debug_regs());
        let cpuid = self.ioctl("KVM_GET_CPUID2", self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?;
        let cpuid = cpuid.as_slice().to_vec();
        let entries: Vec<kvm_msr_entry> = SAVED_MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::PartialMsrs {
            index: self.index,
            set: 0,
            wanted: entries.len(),
        })?;
        let read = self.ioctl("KVM_GET_MSRS", self.fd.get_msrs(&mut msrs))?;
        let msrs = msrs.as_slice()[..read].to_vec();
        let vcpu_events = self.optional("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events());
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            fpu,
            xcrs,
            debug_regs,
            cpuid,
            msrs,
            vcpu_events,
        })
    }

    fn optional<T>(&self, op: &'static str, result: Result<T, kvm_ioctls::Error>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                tracing::debug!("vCPU {}: {op} unavailable: {e}", self.index);
                None
            }
        }
    }

    /// Loads a saved state into this (new, not yet running) vCPU.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        // Ordering (Firecracker's, with its reasons): CPUID before anything that depends on
        // features; REGS before VCPU_EVENTS because SET_REGS clears pending exceptions; SREGS
        // before MSRs; VCPU_EVENTS last.
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::BadState {
            index: self.index,
            what: "CPUID entry count",
        })?;
        self.ioctl("KVM_SET_CPUID2", self.fd.set_cpuid2(&cpuid))?;
        if let Some(mp_state) = state.mp_state {
            self.ioctl("KVM_SET_MP_STATE", self.fd.set_mp_state(mp_state))?;
        }
        self.ioctl("KVM_SET_REGS", self.fd.set_regs(&state.regs))?;
        self.ioctl("KVM_SET_SREGS", self.fd.set_sregs(&state.sregs))?;
        if let Some(xsave) = &state.xsave {
            // SAFETY: the buffer came from KVM_GET_XSAVE on a vCPU with the same CPUID, so it
            // is a well-formed legacy-size XSAVE area.
            self.ioctl("KVM_SET_XSAVE", unsafe { self.fd.set_xsave(xsave) })?;
        }
        if let Some(fpu) = &state.fpu {
            self.ioctl("KVM_SET_FPU", self.fd.set_fpu(&fpu.into()))?;
        }
        if let Some(xcrs) = &state.xcrs {
            self.ioctl("KVM_SET_XCRS", self.fd.set_xcrs(xcrs))?;
        }
        if let Some(debug_regs) = &state.debug_regs {
            self.ioctl("KVM_SET_DEBUGREGS", self.fd.set_debug_regs(debug_regs))?;
        }
        let msrs = Msrs::from_entries(&state.msrs).map_err(|_| VcpuError::BadState {
            index: self.index,
            what: "MSR count",
        })?;
        let wanted = state.msrs.len();
        let set = self.ioctl("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
        if set != wanted {
            return Err(VcpuError::PartialMsrs {
                index: self.index,
                set,
                wanted,
            });
        }
        if let Some(events) = &state.vcpu_events {
            self.ioctl("KVM_SET_VCPU_EVENTS", self.fd.set_vcpu_events(events))?;
        }
        Ok(())
    }

    /// KVM's sub-error code and data words of the last `KVM_EXIT_INTERNAL_ERROR`.
    fn internal_error_details(&mut self) -> String {
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled in; ndata is clamped to the array length.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let count = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..count]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        format!(
            " (suberror {}, data [{}])",
            internal.suberror,
            data.join(", ")
        )
    }

    fn registers(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => format_registers(&regs, &sregs),
            (Err(e), _) | (_, Err(e)) => format!("  (registers unavailable: {e})"),
        }
    }

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
            thread: Some(thread),
        })
    }

    fn run_thread(
        mut self,
        mut state: RunState,
        requests: Receiver<VcpuRequest>,
        responses: Sender<VcpuResponse>,
    ) {
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|flag| flag.set(immediate_exit));
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
            match request {
                Some(VcpuRequest::Stop) => break,
                Some(VcpuRequest::SaveState) => {
                    let saved = match state {
                        RunState::Running => Err(VcpuError::NotPaused { index: self.index }),
                        _ => self.save_state(),
                    };
                    let _ = responses.send(VcpuResponse::Saved(Box::new(saved)));
                }
                Some(request) => {
                    state = self.transition(state, request);
                    // The VMM may have given up waiting; nothing else to tell it then.
                    let _ = responses.send(VcpuResponse::State(state));
                }
                None => state = self.run_once(),
            }
        }
        IMMEDIATE_EXIT.with(|flag| flag.set(std::ptr::null_mut()));
    }

    fn transition(&mut self, state: RunState, request: VcpuRequest) -> RunState {
        match (state, request) {
            (RunState::Running, VcpuRequest::Pause) => {
                self.complete_pending_io();
                RunState::Paused
            }
            (RunState::Paused, VcpuRequest::Resume) => RunState::Running,
            (state, _) => state,
        }
    }

    /// Ordering: an exit for port or MMIO input is only finished by the next KVM_RUN, which
    /// copies the data into the guest register. Entering with `immediate_exit` set completes
    /// it and returns at once, so the saved registers of a paused vCPU are never mid-instruction.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => tracing::warn!("vCPU {}: completing pending I/O: {e}", self.index),
            Ok(exit) => tracing::warn!("vCPU {}: unexpected {exit:?} while pausing", self.index),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    fn run_once(&mut self) -> RunState {
        let action = match self.fd.run() {
            Ok(exit) => handle_exit(exit, &self.pio, &self.mmio),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: clear it and go back to the top of the loop to read the request.
                self.fd.set_kvm_immediate_exit(0);
                return RunState::Running;
            }
            Err(source) => {
                let error = VcpuError::Ioctl {
                    index: self.index,
                    op: "KVM_RUN",
                    source,
                };
                return self.finish(VmEvent::VcpuFailed(self.index, error));
            }
        };
        let index = self.index;
        match action {
            ExitAction::Continue => RunState::Running,
            ExitAction::Halt => self.finish(VmEvent::VcpuHalted(index)),
            ExitAction::Shutdown => {
                let registers = self.registers();
                self.finish(VmEvent::VcpuFailed(
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
                self.finish(VmEvent::VcpuFailed(index, error))
            }
        }
    }

    fn finish(&self, event: VmEvent) -> RunState {
        let _ = self.events.send(event);
        RunState::Finished
    }
}

/// The VMM thread's side of a running vCPU.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u32,
    requests: Sender<VcpuRequest>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends `request` and interrupts `KVM_RUN` so the thread reads it.
    pub fn send(&self, request: VcpuRequest) -> Result<(), VcpuError> {
        self.requests
            .send(request)
            .map_err(|_| VcpuError::ThreadGone { index: self.index })?;
        if let Some(thread) = &self.thread {
            // Ordering: the request is queued before the kick, so the woken thread finds it.
            if let Err(e) = thread.kill(kick_signal()) {
                tracing::debug!("kick of vCPU {}: {e}", self.index);
            }
        }
        Ok(())
    }

    /// Waits for the thread's answer to a request.
    pub fn wait_response(&self, request: VcpuRequest) -> Result<VcpuResponse, VcpuError> {
        self.responses
            .recv_timeout(RESPONSE_TIMEOUT)
            .map_err(|e| match e {
                RecvTimeoutError::Timeout => VcpuError::NoResponse {
                    index: self.index,
                    request,
                },
                RecvTimeoutError::Disconnected => VcpuError::ThreadGone { index: self.index },
            })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.send(VcpuRequest::Stop);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the thread of vCPU {} panicked", self.index);
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::BusDevice;
    use std::sync::Mutex;

    struct Echo(Vec<u8>);

    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = offset as u8 + 1;
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
            self.0.extend_from_slice(data);
            if offset == 7 {
                VcpuAction::Park
            } else {
                VcpuAction::Continue
            }
        }
    }

    fn buses() -> (Bus, Bus, Arc<Mutex<Echo>>) {
        let echo = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut pio = Bus::new("PIO");
        pio.insert(0x3f8, 8, echo.clone()).unwrap();
        let mut mmio = Bus::new("MMIO");
        mmio.insert(0xd000_0000, 0x1000, echo.clone()).unwrap();
        (pio, mmio, echo)
    }

    #[test]
    fn port_and_mmio_exits_reach_devices() {
        let (pio, mmio, echo) = buses();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"A"), &pio, &mmio),
            ExitAction::Continue
        );
        let mut data = [0xee; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3fd, &mut data), &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(data, [6]);
        handle_exit(VcpuExit::MmioWrite(0xd000_0010, b"BC"), &pio, &mmio);
        let mut data = [0xee; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0002, &mut data), &pio, &mmio);
        assert_eq!(data, [3, 0, 0, 0]);
        assert_eq!(echo.lock().unwrap().0, b"ABC");
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3ff, b"P"), &pio, &mmio),
            ExitAction::Halt
        );
    }

    #[test]
    fn unmapped_accesses_continue_and_read_zero() {
        let (pio, mmio, _) = buses();
        let mut data = [0xee; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x80, &mut data), &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(data, [0, 0]);
        assert_eq!(
            handle_exit(VcpuExit::MmioWrite(0x1234, b"x"), &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(pio.unmapped_accesses() + mmio.unmapped_accesses(), 2);
    }

    #[test]
    fn other_exits_stop_the_vcpu() {
        let (pio, mmio, _) = buses();
        assert_eq!(handle_exit(VcpuExit::Hlt, &pio, &mmio), ExitAction::Halt);
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &pio, &mmio),
            ExitAction::Shutdown
        );
        assert_eq!(
            handle_exit(VcpuExit::FailEntry(0x21, 3), &pio, &mmio),
            ExitAction::Unexpected(
                "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason 0x21 on host cpu 3)".into()
            )
        );
        assert_eq!(
            handle_exit(VcpuExit::InternalError, &pio, &mmio),
            ExitAction::Unexpected("KVM_EXIT_INTERNAL_ERROR".into())
        );
        assert_eq!(
            handle_exit(VcpuExit::Nmi, &pio, &mmio),
            ExitAction::Unexpected("Nmi".into())
        );
    }

    #[test]
    fn vcpu_state_round_trips_through_json_into_a_new_vcpu() {
        let Ok(kvm) = crate::kvm::open_kvm(std::path::Path::new("/dev/kvm")) else {
            println!(
                "SKIP: vcpu_state_round_trips_through_json_into_a_new_vcpu: no usable /dev/kvm"
            );
            return;
        };
        let memory = crate::memory::create_guest_memory(8 << 20).unwrap();
        let vm = crate::vm::Vm::new(&kvm, memory, crate::vm::MemoryOrigin::Boot).unwrap();
        let (pio, mmio, _) = buses();
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let (tx, _rx) = mpsc::channel();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let first = Vcpu::new(
            0,
            vm.fd().create_vcpu(0).unwrap(),
            pio.clone(),
            mmio.clone(),
            tx.clone(),
        );
        first.configure_boot(&cpuid, 0x10_0000, 0x9000).unwrap();
        let mut regs = first.fd.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.r15 = 42;
        first.fd.set_regs(&regs).unwrap();
        let saved = first.save_state().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let loaded: VcpuState = serde_json::from_str(&json).unwrap();
        let second = Vcpu::new(1, vm.fd().create_vcpu(1).unwrap(), pio, mmio, tx);
        second.restore_state(&loaded).unwrap();
        let again = second.save_state().unwrap();
        assert_eq!(
            (again.regs.rax, again.regs.r15, again.regs.rip),
            (0x1234_5678, 42, 0x10_0000)
        );
        assert_eq!(again.sregs.cr3, saved.sregs.cr3);
        assert_eq!(again.sregs.cs.selector, saved.sregs.cs.selector);
        assert_eq!(again.cpuid.len(), saved.cpuid.len());
        let indices = |msrs: &[kvm_msr_entry]| msrs.iter().map(|m| m.index).collect::<Vec<_>>();
        assert_eq!(indices(&again.msrs), indices(&saved.msrs));
    }

    #[test]
    fn register_dump_names_rip_and_control_registers() {
        let regs = kvm_regs {
            rip: 0x10_0042,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            cr3: 0x9000,
            ..Default::default()
        };
        let dump = format_registers(&regs, &sregs);
        assert!(dump.contains("rip=0x0000000000100042"), "{dump}");
        assert!(dump.contains("cr3=0x9000"), "{dump}");
    }
}
