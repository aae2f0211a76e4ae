//! The virtio-mmio transport, register layout version 2 (virtio 1.2 §4.2.2): feature
//! negotiation, device status, queue set-up and notification, and the config space window.
//!
//! The driver is untrusted: accesses of the wrong size are ignored, a queue whose size or ring
//! addresses are unusable is never made ready, and a queue fault sets `DEVICE_NEEDS_RESET`
//! (after which notifications are ignored until the driver resets the device).

use std::num::Wrapping;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;

use super::{QueueFault, VirtioDevice};
use crate::devices::{BusDevice, VcpuAction};
use crate::memory::GuestMemory;

/// "virt", little endian.
const MAGIC: u32 = 0x7472_6976;
/// The modern (non-legacy) register layout.
const VERSION: u32 = 2;
/// "CWVM".
const VENDOR_ID: u32 = 0x4d56_5743;

/// Where the config space starts; below it, the registers (virtio 1.2 §4.2.2, Table 4.1, named
/// by virtio-bindings' `VIRTIO_MMIO_*` offsets).
const CONFIG: u64 = VIRTIO_MMIO_CONFIG as u64;

/// A virtqueue's registers and indices, as saved in a snapshot (`virtio_queue::QueueState`,
/// which has no serde support).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: false,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The transport's registers, as saved in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
}

/// A saved transport state that does not fit the device it is restored onto.
#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    #[error("the snapshot has {saved} virtqueues, the device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("virtqueue {index} in the snapshot is invalid: {reason}")]
    Queue { index: usize, reason: String },
}

/// A virtio device behind its MMIO register window.
#[derive(Debug)]
pub struct MmioTransport<D> {
    device: D,
    memory: GuestMemory,
    state: MmioState,
    queues: Vec<Queue>,
    /// A queue register write the driver made was refused (bad size, unaligned ring): that
    /// queue cannot be made ready.
    queue_config_error: Vec<bool>,
    /// Why the device needs a reset, if it does.
    fault: Option<QueueFault>,
    /// Raised by the VMM while it pauses the VM: queue processing stops between requests.
    hold: Arc<AtomicBool>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, memory: GuestMemory) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        let count = queues.len();
        Self {
            device,
            memory,
            state: MmioState::default(),
            queues,
            queue_config_error: vec![false; count],
            fault: None,
            hold: Arc::default(),
        }
    }

    /// Makes the device stop between requests whenever `hold` is raised (one flag per VM, shared
    /// by all its devices).
    pub fn set_hold(&mut self, hold: Arc<AtomicBool>) {
        self.hold = hold;
    }

    /// Requests the driver made available that the device has not taken yet, over all ready
    /// queues (a paused VM's count is what a snapshot of it carries over).
    pub fn pending_requests(&self) -> u64 {
        self.queues
            .iter()
            .filter(|queue| queue.ready())
            .filter_map(|queue| {
                let avail = queue
                    .avail_idx(&self.memory, std::sync::atomic::Ordering::Acquire)
                    .ok()?;
                Some(u64::from((avail - Wrapping(queue.next_avail())).0))
            })
            .sum()
    }

    /// Handles the requests a pause (or a snapshot taken meanwhile) left in the available rings:
    /// the driver notified once for them and will not again. Does nothing while the hold flag is
    /// up, or for queues that are not ready.
    pub fn resume_pending(&mut self) {
        for index in 0..self.queues.len() {
            self.notify(index);
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Why the device stopped (`DEVICE_NEEDS_RESET`), if it did.
    pub fn fault(&self) -> Option<&QueueFault> {
        self.fault.as_ref()
    }

    pub fn save(&self) -> MmioState {
        MmioState {
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            ..self.state.clone()
        }
    }

    /// Puts the registers and queues back as saved. The device itself is restored separately.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), MmioRestoreError> {
        if state.queues.len() != self.queues.len() {
            return Err(MmioRestoreError::QueueCount {
                saved: state.queues.len(),
                device: self.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, saved) in state.queues.iter().enumerate() {
            let queue =
                Queue::try_from(QueueState::from(*saved)).map_err(|e| MmioRestoreError::Queue {
                    index,
                    reason: e.to_string(),
                })?;
            queues.push(queue);
        }
        self.queues = queues;
        self.state = MmioState {
            queues: Vec::new(),
            ..state.clone()
        };
        if self.state.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.device.activate(self.state.driver_features);
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<(usize, &mut Queue)> {
        let index = self.state.queue_sel as usize;
        self.queues.get_mut(index).map(|q| (index, q))
    }

    fn needs_reset(&mut self, fault: QueueFault) {
        if self.fault.is_none() {
            tracing::warn!(
                "virtio device {}: {fault}; it needs a reset",
                self.device.device_type()
            );
        }
        self.fault = Some(fault);
        self.state.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.state.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = new_queues(self.device.queue_max_sizes());
        self.queue_config_error.iter_mut().for_each(|e| *e = false);
        self.fault = None;
        self.state = MmioState {
            config_generation: self.state.config_generation,
            ..MmioState::default()
        };
    }

    fn read_register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.state.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.state.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.state.interrupt_status,
            VIRTIO_MMIO_STATUS => self.state.status,
            // No shared memory regions: a length of all ones says so (§4.2.2).
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.state.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.state.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.state.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.state.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                self.write_queue(|q| value <= 0xffff && q.try_set_size(value as u16).is_ok())
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_address(offset, value),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value as usize),
            VIRTIO_MMIO_INTERRUPT_ACK => self.state.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.write_status(value),
            _ => tracing::debug!(
                "virtio-mmio: write {value:#x} to read-only or unknown register {offset:#x}"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are fixed once FEATURES_OK is set.
        if self.state.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            return;
        }
        let shift = match self.state.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.state.driver_features &= !(0xffff_ffff_u64 << shift);
        self.state.driver_features |= u64::from(value) << shift;
    }

    /// Applies `set` to the selected queue while it is not ready; a refused value marks the
    /// queue's configuration as broken.
    fn write_queue(&mut self, set: impl FnOnce(&mut Queue) -> bool) {
        if self.state.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return;
        }
        let Some((index, queue)) = self.selected_queue() else {
            return;
        };
        if queue.ready() {
            return;
        }
        if !set(queue) {
            self.queue_config_error[index] = true;
        }
    }

    fn write_queue_address(&mut self, offset: u32, value: u32) {
        let high = offset % 8 == 4;
        let merge = |old: u64| {
            if high {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        self.write_queue(|queue| match offset & !7 {
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue
                .try_set_desc_table_address(GuestAddress(merge(queue.desc_table())))
                .is_ok(),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue
                .try_set_avail_ring_address(GuestAddress(merge(queue.avail_ring())))
                .is_ok(),
            _ => queue
                .try_set_used_ring_address(GuestAddress(merge(queue.used_ring())))
                .is_ok(),
        });
    }

    fn write_queue_ready(&mut self, value: u32) {
        if self.state.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return;
        }
        let memory = self.memory.clone();
        let Some((index, queue)) = self.selected_queue() else {
            return;
        };
        if value == 0 {
            queue.set_ready(false);
            return;
        }
        queue.set_ready(true);
        let broken = self.queue_config_error[index];
        let Some((_, queue)) = self.selected_queue() else {
            return;
        };
        if broken || !queue.is_valid(&memory) {
            queue.set_ready(false);
            self.needs_reset(QueueFault::RingsUnusable);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.state.status;
        // The device owns NEEDS_RESET; the driver cannot set or clear it.
        let mut new = (value & !VIRTIO_CONFIG_S_NEEDS_RESET) | (old & VIRTIO_CONFIG_S_NEEDS_RESET);
        let added = new & !old;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads the status back and sees FEATURES_OK missing (§3.1.1).
            new &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                new &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else {
                self.device.activate(self.state.driver_features);
            }
        }
        self.state.status = new;
    }

    /// The driver accepted only offered features, and the modern interface.
    fn features_acceptable(&self) -> bool {
        let accepted = self.state.driver_features;
        accepted & !self.device.features() == 0 && accepted & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn notify(&mut self, index: usize) {
        let status = self.state.status;
        if status & VIRTIO_CONFIG_S_DRIVER_OK == 0 || status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        match self
            .device
            .process_queue(index, queue, &self.memory, &self.hold)
        {
            Ok(true) => self.state.interrupt_status |= VIRTIO_MMIO_INT_VRING,
            Ok(false) => {}
            Err(fault) => self.needs_reset(fault),
        }
    }
}

fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and read with 32-bit accesses only (§4.2.2.2); below
        // CONFIG the offset fits in 32 bits.
        if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset as u32).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        if offset >= CONFIG {
            self.device.write_config(offset - CONFIG, data);
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset % 4 == 0) {
            self.write_register(offset as u32, u32::from_le_bytes(bytes));
        }
        VcpuAction::Continue
    }

    fn resume(&mut self) {
        self.resume_pending();
    }
}
