//! A running VM: its vCPU threads, its buses, and the VMM thread's event loop that waits for the
//! guest to exit or fail.

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use crate::devices::Bus;
use crate::vcpu::{RunState, VcpuError, VcpuHandle, VcpuRequest, VmEvent};
use crate::vm::Vm;

/// The VM stopped without the guest writing an exit status.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("every vCPU halted without the guest writing the exit device; nothing can wake them (no interrupts are delivered)")]
    AllHalted,
}

/// A booted VM.
#[derive(Debug)]
pub struct Machine {
    // Field order matters: vCPU threads are stopped (handles dropped) before the VM goes away.
    vcpus: Vec<VcpuHandle>,
    vm: Vm,
    events: Receiver<VmEvent>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    /// When KVM_CREATE_VM was called.
    pub created_at: Instant,
}

impl Machine {
    pub(crate) fn new(
        vcpus: Vec<VcpuHandle>,
        vm: Vm,
        events: Receiver<VmEvent>,
        buses: (Arc<Bus>, Arc<Bus>),
        created_at: Instant,
    ) -> Self {
        Self {
            vcpus,
            vm,
            events,
            pio: buses.0,
            mmio: buses.1,
            created_at,
        }
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Unmapped guest accesses seen on (port I/O, MMIO).
    pub fn unmapped_accesses(&self) -> (u64, u64) {
        (self.pio.unmapped_accesses(), self.mmio.unmapped_accesses())
    }

    /// Sends `request` to every vCPU, then waits for all to answer, so they pause together.
    fn broadcast(&self, request: VcpuRequest) -> Result<Vec<RunState>, VcpuError> {
        for vcpu in &self.vcpus {
            vcpu.send(request)?;
        }
        self.vcpus
            .iter()
            .map(|vcpu| vcpu.wait_response(request))
            .collect()
    }

    /// Stops every vCPU outside KVM_RUN; returns once all are paused (or finished).
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.broadcast(VcpuRequest::Pause).map(drop)
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.broadcast(VcpuRequest::Resume).map(drop)
    }

    /// Runs the event loop until the guest exits (its status) or the VM fails.
    pub fn wait(&mut self) -> Result<u8, MachineError> {
        let mut halted = 0;
        let result = loop {
            let Ok(event) = self.events.recv() else {
                break Err(MachineError::AllHalted);
            };
            match event {
                VmEvent::GuestExit(status) => break Ok(status),
                VmEvent::VcpuFailed(_, error) => break Err(error.into()),
                VmEvent::VcpuHalted(index) => {
                    tracing::debug!("vCPU {index} halted");
                    halted += 1;
                    if halted == self.vcpus.len() {
                        break Err(MachineError::AllHalted);
                    }
                }
            }
        };
        self.stop();
        result
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&mut self) {
        for vcpu in &mut self.vcpus {
            vcpu.stop();
        }
    }
}
