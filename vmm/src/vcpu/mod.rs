//! vCPUs. Each owns one KVM vCPU; [`thread`] runs it as an explicit state machine driven by
//! messages from the VMM thread, and [`exit`] turns KVM exits into bus accesses or events. A vCPU
//! thread never exits the process: it reports to the VMM thread through its [`EventSink`].
//!
//! This module knows nothing of the control API: the VMM thread's own event type wraps
//! [`VcpuEvent`] (see `machine.rs`).

pub mod exit;
pub mod thread;

use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;

use crate::boot;
use crate::devices::Bus;
use crate::snapshot::state::{FpuState, VcpuState};

pub use exit::{format_registers, handle_exit, ExitAction};
pub use thread::{RunState, Ticket, VcpuHandle, VcpuRequest, VcpuResponse, RESPONSE_TIMEOUT};

/// Something a vCPU, or a device acting for the guest, reports to the VMM thread.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The guest wrote its exit status to the exit device.
    GuestExit(u8),
    /// A vCPU parked (the guest's `hlt`) with nothing to wake it (no interrupts are delivered).
    Halted(u32),
    /// A vCPU stopped with an error (triple fault, unexpected exit, failed ioctl).
    Failed(u32, VcpuError),
}

/// Where vCPUs and devices send their events; the VMM thread's loop decides what they become.
pub type EventSink = Arc<dyn Fn(VcpuEvent) + Send + Sync>;

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
    #[error("vCPU {index} did not answer {request:?} within {waited:?} (is it stuck in a device, e.g. writing serial output to a pipe nobody reads?)")]
    NoResponse {
        index: u32,
        request: VcpuRequest,
        waited: Duration,
    },
    #[error("vCPU {index} answered request {found} while request {expected} was awaited")]
    ReplyMismatch {
        index: u32,
        expected: u64,
        found: u64,
    },
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

/// One vCPU before its thread starts.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: EventSink,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    pub fn new(index: u32, fd: VcpuFd, pio: Arc<Bus>, mmio: Arc<Bus>, events: EventSink) -> Self {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_state_round_trips_through_json_into_a_new_vcpu() {
        let Some(kvm) =
            crate::kvm::kvm_for_test("vcpu_state_round_trips_through_json_into_a_new_vcpu")
        else {
            return;
        };
        let memory = crate::memory::create_guest_memory(8 << 20).unwrap();
        let vm = crate::vm::Vm::new(&kvm, memory, crate::vm::MemoryOrigin::Boot).unwrap();
        let (pio, mmio) = (Arc::new(Bus::new("PIO")), Arc::new(Bus::new("MMIO")));
        let tx: EventSink = Arc::new(|_| {});
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
}
