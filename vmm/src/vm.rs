//! The KVM VM object and the guest RAM registered with it.
//!
//! Creating the VM, registering memory and loading state are separate steps so that later code
//! (restore, clone pools) can do them at different times.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Where KVM may put the three pages of the TSS that VMX needs (below the 4 GiB MMIO top).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// A VM-level KVM call failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed: {source}")]
    GetDirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} ({size} bytes at {guest_addr:#x}) failed: {source}")]
    SetMemoryRegion {
        slot: u32,
        guest_addr: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM and its guest RAM.
#[derive(Debug)]
pub struct Vm {
    // Field order matters: `fd` is dropped (the VM destroyed) before `memory` is unmapped.
    fd: VmFd,
    memory: GuestMemory,
}

impl Vm {
    /// Creates an empty KVM VM and registers `memory` as its RAM, one slot per region.
    pub fn new(kvm: &Kvm, memory: GuestMemory) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(VmError::SetTssAddress)?;
        let vm = Self { fd, memory };
        vm.register_memory()?;
        Ok(vm)
    }

    fn register_memory(&self) -> Result<(), VmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let guest_addr = region.start_addr().0;
            let size = region.len();
            let descriptor = kvm_userspace_memory_region {
                slot,
                // Dirty logging is always on: diff snapshots need it from the first write.
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: guest_addr,
                memory_size: size,
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of exactly `size` bytes owned by `self.memory`,
            // which outlives the VM fd (see the field order of `Vm`), and slots do not overlap
            // because the regions of a GuestMemoryMmap do not.
            unsafe { self.fd.set_user_memory_region(descriptor) }.map_err(|source| {
                VmError::SetMemoryRegion {
                    slot,
                    guest_addr,
                    size,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Takes KVM's dirty-page bitmap of every slot (which clears it): one bit per page in
    /// snapshot-file order (slot 0's pages, then slot 1's).
    pub fn take_dirty_bitmap(&self) -> Result<Vec<u64>, VmError> {
        let total_pages: u64 = self.memory.iter().map(|r| r.len() / 4096).sum();
        let mut bitmap = vec![0u64; total_pages.div_ceil(64) as usize];
        let mut first_page = 0u64;
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let pages = region.len() / 4096;
            let log = self
                .fd
                .get_dirty_log(slot, region.len() as usize)
                .map_err(|source| VmError::GetDirtyLog { slot, source })?;
            for page in 0..pages {
                if log[(page / 64) as usize] >> (page % 64) & 1 == 1 {
                    let at = first_page + page;
                    bitmap[(at / 64) as usize] |= 1 << (at % 64);
                }
            }
            first_page += pages;
        }
        Ok(bitmap)
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }
}
