//! The exit device, two ports: a byte written to the first stops the VM and becomes the
//! process's exit status (like QEMU's isa-debug-exit, without its `(value << 1) | 1` encoding);
//! a write to the second parks the writing vCPU (the guest's `hlt`, see [`VcpuAction::Park`]).

use super::{BusDevice, VcpuAction};
use crate::vcpu::{EventSink, VcpuEvent};

/// Port-mapped exit device.
pub struct ExitDevice {
    events: EventSink,
}

impl std::fmt::Debug for ExitDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitDevice").finish_non_exhaustive()
    }
}

impl ExitDevice {
    pub fn new(events: EventSink) -> Self {
        Self { events }
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        match (offset, data.first()) {
            (0, Some(&status)) => {
                (self.events)(VcpuEvent::GuestExit(status));
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
        let mut device = ExitDevice::new(std::sync::Arc::new(move |event| {
            let _ = tx.send(event);
        }));
        assert_eq!(device.write(0, &[42, 0]), VcpuAction::Continue);
        assert!(matches!(rx.try_recv(), Ok(VcpuEvent::GuestExit(42))));
        assert_eq!(device.write(1, &[0]), VcpuAction::Park);
        assert!(rx.try_recv().is_err());
    }
}
