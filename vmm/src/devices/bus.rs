//! One `Bus` type serves both port I/O and MMIO: devices register an address range and see
//! offsets into it, never absolute addresses.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus. Reads get a zeroed buffer and fill what they emulate.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write; the result tells the writing vCPU whether to keep running.
    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction;
    /// The VM runs again after a pause (or starts from a snapshot): work the pause held back
    /// may go on. Called on a vCPU thread, outside any exit.
    fn resume(&mut self) {}
}

/// What a device write asks of the vCPU that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum VcpuAction {
    Continue,
    /// Stop running this vCPU, as `hlt` with no interrupt to come would (the guest runs at
    /// CPL 3, where `hlt` is not allowed, so it parks through a device register instead).
    Park,
}

/// A registration that overlaps one already on the bus.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{bus} range {base:#x}+{len:#x} overlaps a device already registered")]
pub struct OverlapError {
    pub bus: &'static str,
    pub base: u64,
    pub len: u64,
}

/// How many unmapped accesses per bus get their own log line before they are only counted.
const UNMAPPED_LOG_LIMIT: u64 = 16;

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space (PIO or MMIO) with devices at fixed ranges.
pub struct Bus {
    name: &'static str,
    devices: BTreeMap<u64, Entry>,
    unmapped: AtomicU64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("name", &self.name)
            .field(
                "ranges",
                &self
                    .devices
                    .iter()
                    .map(|(b, e)| (*b, e.len))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Bus {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            devices: BTreeMap::new(),
            unmapped: AtomicU64::new(0),
        }
    }

    /// Registers `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), OverlapError> {
        let overlap = OverlapError {
            bus: self.name,
            base,
            len,
        };
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(overlap.clone())?;
        let before = self.devices.range(..end).next_back();
        if before.is_some_and(|(b, e)| b + e.len > base) {
            return Err(overlap);
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Entry)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + size as u64 <= entry.len).then_some((offset, entry))
    }

    /// Reads from the device at `addr`; returns false (and logs) if nothing is mapped there.
    /// `data` is zeroed first so no stale bytes reach the guest.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        data.fill(0);
        match self.find(addr, data.len()) {
            Some((offset, entry)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => {
                self.log_unmapped("read", addr, data.len());
                false
            }
        }
    }

    /// Tells every device that the VM runs again ([`BusDevice::resume`]).
    pub fn resume_devices(&self) {
        for entry in self.devices.values() {
            lock(&entry.device).resume();
        }
    }

    /// Writes to the device at `addr`; a write to an unmapped address is logged and ignored.
    pub fn write(&self, addr: u64, data: &[u8]) -> VcpuAction {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => lock(&entry.device).write(offset, data),
            None => {
                self.log_unmapped("write", addr, data.len());
                VcpuAction::Continue
            }
        }
    }

    /// Unmapped accesses seen so far.
    pub fn unmapped_accesses(&self) -> u64 {
        self.unmapped.load(Ordering::Relaxed)
    }

    fn log_unmapped(&self, op: &str, addr: u64, size: usize) {
        let seen = self.unmapped.fetch_add(1, Ordering::Relaxed);
        if seen < UNMAPPED_LOG_LIMIT {
            tracing::warn!(
                "guest {op} of {size} bytes at unmapped {} address {addr:#x}",
                self.name
            );
        } else if seen == UNMAPPED_LOG_LIMIT {
            tracing::warn!(
                "further unmapped {} accesses are counted, not logged",
                self.name
            );
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device panicking on one vCPU must not
/// wedge the others (the panic itself is reported by that vCPU's thread).
fn lock<'a>(
    device: &'a Mutex<dyn BusDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = offset as u8 + 0x10;
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
            self.writes.push((offset, data.to_vec()));
            VcpuAction::Continue
        }
    }

    #[test]
    fn devices_see_offsets() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new("PIO");
        bus.insert(0x3f8, 8, device.clone()).unwrap();
        assert_eq!(bus.write(0x3fa, &[7]), VcpuAction::Continue);
        let mut data = [0xff; 2];
        assert!(bus.read(0x3fb, &mut data));
        assert_eq!(data, [0x13, 0]);
        assert_eq!(device.lock().unwrap().writes, vec![(2, vec![7])]);
    }

    #[test]
    fn unmapped_accesses_are_counted_and_read_zero() {
        let mut bus = Bus::new("MMIO");
        bus.insert(0x1000, 0x100, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut data = [0xff; 4];
        assert!(!bus.read(0x2000, &mut data));
        assert_eq!(data, [0; 4]);
        assert_eq!(
            bus.write(0x10fe, &[0; 4]),
            VcpuAction::Continue,
            "straddles the end"
        );
        assert_eq!(bus.unmapped_accesses(), 2);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new("PIO");
        let dev = || Arc::new(Mutex::new(Recorder::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(0x10, 0x10, dev()).unwrap();
        assert!(bus.insert(0x18, 0x10, dev()).is_err());
        assert!(bus.insert(0x08, 0x09, dev()).is_err());
        assert!(bus.insert(0x0, 0x0, dev()).is_err());
        bus.insert(0x20, 0x10, dev()).unwrap();
        bus.insert(0x08, 0x08, dev()).unwrap();
    }
}
