//! COM1: vm-superio's 16550 UART behind the bus, writing to stdout or a file.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

use vm_superio::{serial::NoEvents, Serial, Trigger};

use super::{BusDevice, VcpuAction};
use crate::snapshot::persist::Persist;
use crate::snapshot::state::SerialState;

/// The serial interrupt line: the guest polls, so there is nothing to trigger.
#[derive(Debug)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A 16550 UART on the port bus.
pub struct SerialDevice {
    uart: Serial<NoInterrupt, NoEvents, Box<dyn Write + Send>>,
    /// Output errors so far (only the first is logged: a closed pipe fails every byte).
    output_errors: u64,
    /// When the guest first touched the port: its first exit after entry or resume, a few
    /// instructions in (for start-up and clone-start measurements).
    first_access: OnceLock<Instant>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(NoInterrupt, out),
            output_errors: 0,
            first_access: OnceLock::new(),
        }
    }

    /// When the guest first accessed the port, if it has.
    pub fn first_access(&self) -> Option<Instant> {
        self.first_access.get().copied()
    }
}

/// A saved UART state that vm-superio refuses (its input buffer is longer than the FIFO).
#[derive(Debug, thiserror::Error)]
#[error("the snapshot's serial state is invalid: {0}")]
pub struct SerialRestoreError(String);

impl Persist for SerialDevice {
    type State = SerialState;
    type ConstructorArgs = Box<dyn Write + Send>;
    type Error = SerialRestoreError;

    fn save(&self) -> SerialState {
        SerialState::from(&self.uart.state())
    }

    fn restore(
        out: Box<dyn Write + Send>,
        state: &SerialState,
    ) -> Result<Self, SerialRestoreError> {
        let state = vm_superio::serial::SerialState::from(state);
        Serial::from_state(&state, NoInterrupt, NoEvents, out)
            .map(|uart| Self {
                uart,
                output_errors: 0,
                first_access: OnceLock::new(),
            })
            .map_err(|e| SerialRestoreError(format!("{e:?}")))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.first_access.get_or_init(Instant::now);
        if let (Ok(offset), [first, ..]) = (u8::try_from(offset), data) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        self.first_access.get_or_init(Instant::now);
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(offset, value) {
                if self.output_errors == 0 {
                    tracing::warn!("serial output failed: {e}; further failures are not logged");
                }
                self.output_errors += 1;
            }
        }
        VcpuAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn save_restore_round_trip_keeps_registers() {
        let mut serial = SerialDevice::new(Box::new(std::io::sink()));
        assert_eq!(serial.write(3, &[0x83]), VcpuAction::Continue); // LCR with DLAB
        assert_eq!(serial.write(0, &[0x0c]), VcpuAction::Continue); // divisor low
        assert_eq!(serial.write(3, &[0x03]), VcpuAction::Continue);
        assert_eq!(serial.write(7, &[0x5a]), VcpuAction::Continue); // scratch
        let saved = serial.save();
        assert_eq!(
            (saved.line_control, saved.baud_divisor_low, saved.scratch),
            (3, 0x0c, 0x5a)
        );
        let mut restored = SerialDevice::restore(Box::new(std::io::sink()), &saved).unwrap();
        assert_eq!(restored.save(), saved);
        let mut scratch = [0u8];
        restored.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        let too_long = SerialState {
            in_buffer: vec![0; 1000],
            ..saved
        };
        assert!(SerialDevice::restore(Box::new(std::io::sink()), &too_long).is_err());
    }

    #[test]
    fn transmitted_bytes_reach_the_output_and_lsr_reports_empty() {
        let out = Shared::default();
        let mut serial = SerialDevice::new(Box::new(out.clone()));
        for b in b"hi\n" {
            assert_eq!(serial.write(0, &[*b]), VcpuAction::Continue);
        }
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x20, 0x20, "transmit holding register empty");
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }
}
