//! COM1: vm-superio's 16550 UART behind the bus, writing to stdout or a file.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

use vm_superio::{serial::NoEvents, Serial, Trigger};

use super::{BusDevice, VcpuAction};
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

/// When the guest first touched the serial port: its first exit, a few instructions after
/// entry (for start-up measurements).
pub static FIRST_ACCESS_AT: OnceLock<Instant> = OnceLock::new();

/// A 16550 UART on the port bus.
pub struct SerialDevice {
    uart: Serial<NoInterrupt, NoEvents, Box<dyn Write + Send>>,
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
        }
    }

    /// Restores the UART registers saved in a snapshot.
    pub fn from_state(state: &SerialState, out: Box<dyn Write + Send>) -> Self {
        let state = vm_superio::serial::SerialState::from(state);
        match Serial::from_state(&state, NoInterrupt, NoEvents, out) {
            Ok(uart) => Self { uart },
            // Only an over-long input buffer is refused; the guest never reads input.
            Err(_) => Self::new(Box::new(std::io::sink())),
        }
    }

    /// The UART registers, for a snapshot.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        FIRST_ACCESS_AT.get_or_init(Instant::now);
        if let (Ok(offset), [first, ..]) = (u8::try_from(offset), data) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        FIRST_ACCESS_AT.get_or_init(Instant::now);
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(offset, value) {
                tracing::warn!("serial output failed: {e}");
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
