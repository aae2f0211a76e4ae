//! Emulated devices and the bus that routes guest port I/O and MMIO to them.

pub mod bus;
pub mod exit;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, VcpuAction};
