//! A disk attached to a VM: its virtio-blk device on the MMIO bus, and which image file is the
//! writable top of its chain now (the user's image until the first snapshot, then an overlay).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use cowvm_guest_abi::boot_info::DeviceWindow;
use cowvm_guest_abi::layout::{virtio_mmio_addr, VIRTIO_MMIO_SIZE};
use serde_json::{json, Value};

use super::DiskFormat;
use crate::devices::virtio::{MmioTransport, VirtioBlock};

/// The device as the bus and the VMM share it.
pub type BlockDevice = Arc<Mutex<MmioTransport<VirtioBlock>>>;

/// One `--disk` of a running VM.
#[derive(Debug)]
pub struct AttachedDisk {
    pub index: usize,
    pub device: BlockDevice,
    /// The image the guest's writes go to (for a read-only disk: the image it reads).
    pub top: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
    /// `top` is an overlay cowvm created after a snapshot or for a restore (its name and place
    /// are cowvm's), not an image the user named.
    pub overlay: bool,
}

impl AttachedDisk {
    /// Where disk `index`'s registers are in guest-physical memory.
    pub fn window(index: usize) -> DeviceWindow {
        DeviceWindow {
            base: virtio_mmio_addr(index as u64),
            size: VIRTIO_MMIO_SIZE as u32,
            device_id: virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
        }
    }

    /// Locks the device (a poisoned lock is taken over: the device's state is plain data).
    pub fn lock(&self) -> MutexGuard<'_, MmioTransport<VirtioBlock>> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `cowvm stats` shows of the disk.
    pub fn stats(&self) -> Value {
        let device = self.lock();
        json!({
            "index": self.index,
            "path": self.top.display().to_string(),
            "format": self.format.name(),
            "read_only": self.read_only,
            "overlay": self.overlay,
            "needs_reset": device.fault().map(|f| f.to_string()),
            "requests": device.device().stats(),
        })
    }
}
