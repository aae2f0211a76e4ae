//! The exit device, two ports: a byte written to the first stops the VM and becomes the
//! process's exit status (like QEMU's isa-debug-exit, without its `(value << 1) | 1` encoding);
//! a write to the second parks the writing vCPU (the guest's `hlt`, see [`VcpuAction::Park`]).

use std::sync::mpsc::Sender;

use super::{BusDevice, VcpuAction};
use crate::vcpu::VmEvent;

/// Port-mapped exit device.
#[derive(Debug)]
pub struct ExitDevice {
    events: Sender<VmEvent>,
}

impl ExitDevice {
    pub fn new(events: Sender<VmEvent>) -> Self {
        Self { events }
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        match (offset, data.first()) {
            (0, Some(&status)) => {
                // The receiver is gone only while the VMM is already shutting down.
                let _ = self.events.send(VmEvent::GuestExit(status));
                VcpuAction::Continue
            }
            (1, _) => VcpuAction::Park,
            _ => VcpuAction::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_sends_the_status() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut device = ExitDevice::new(tx);
        assert_eq!(device.write(0, &[42, 0]), VcpuAction::Continue);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::GuestExit(42))));
        assert_eq!(device.write(1, &[0]), VcpuAction::Park);
        assert!(rx.try_recv().is_err());
    }
}
