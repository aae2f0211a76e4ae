//! virtio devices (virtio 1.x, split virtqueues) on the virtio-mmio transport (register layout
//! version 2), and the virtio-blk device.
//!
//! There is no in-kernel irqchip on this host's KVM (PVM), so no interrupt is ever injected: the
//! guest notifies a queue with one MMIO write per batch of requests and polls the used ring in
//! memory. The device handles the batch inside that MMIO exit, on the notifying vCPU's thread, so
//! when every vCPU is paused no request is in flight, which is what lets a snapshot freeze the
//! disk at the instant it pauses the guest. A pause does not wait for the whole batch: the VMM
//! raises a hold flag first, the device stops after the request it is doing, and the requests
//! left in the available ring are handled once the VM runs again (or, from a snapshot taken
//! meanwhile, once the restored VM runs) by [`MmioTransport::resume_pending`].
//!
//! Every access to guest RAM goes through vm-memory: bounds-checked, and writes are recorded in
//! the memory's dirty bitmap so diff snapshots include the pages a device wrote.

pub mod block;
pub mod mmio;
mod request;

pub use block::{BlockState, BlockStats, VirtioBlock};
pub use mmio::{MmioState, MmioTransport, QueueSnapshot};

use std::sync::atomic::AtomicBool;

use crate::memory::GuestMemory;

/// Size of one virtio-mmio device window (registers at 0x000–0x0ff, config space from 0x100).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// A virtqueue-level fault the driver caused: the device stops and sets `DEVICE_NEEDS_RESET`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueFault {
    #[error("the available ring index is more than a queue size ahead of the device")]
    AvailIndexTooFar,
    #[error("the rings are not in guest RAM or the queue is not set up")]
    RingsUnusable,
    #[error("a request has no writable status byte at the end of its descriptor chain")]
    NoStatus,
    #[error("cannot write the used ring: {0}")]
    UsedRing(String),
}

/// The device side of a virtio device: what the transport does not know.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device id (2 for a block device).
    fn device_type(&self) -> u32;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space (`data` is zeroed by the caller).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Driver writes to the configuration space (ignored by devices without writable fields).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set `DRIVER_OK` with these accepted features.
    fn activate(&mut self, features: u64);
    /// Handles the available requests of queue `index`, stopping before the next one once
    /// `hold` is set (the VM is pausing: the rest wait in the ring for
    /// [`MmioTransport::resume_pending`]). Returns whether any was completed.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut virtio_queue::Queue,
        memory: &GuestMemory,
        hold: &AtomicBool,
    ) -> Result<bool, QueueFault>;
    /// The driver reset the device.
    fn reset(&mut self);
}

#[cfg(test)]
mod tests;
