//! The KVM VM object and the guest RAM registered with it.
//!
//! A VM comes to life in three steps that later code (restore, clone pools, live fork) runs at
//! different times: [`EmptyVm::create`] (`KVM_CREATE_VM`), [`EmptyVm::set_dirty_log_mode`], and
//! [`EmptyVm::register_memory`], which turns it into a [`Vm`] with guest RAM.

use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::dirty::{self, DirtyLog, Harvest};
use crate::memory::GuestMemory;

vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_clear_dirty_log
);

/// How guest RAM came to be, which decides how dirty logging starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryOrigin {
    /// A fresh boot: the first snapshot is always full, so every page may start out "dirty"
    /// (`KVM_DIRTY_LOG_INITIALLY_SET`) and nothing is write-protected until that snapshot.
    Boot,
    /// A restore: the first diff builds on the restored snapshot, so logging starts clean.
    Restore,
}

/// Where KVM may put the three pages of the TSS that VMX needs (below the 4 GiB MMIO top).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// A VM-level KVM call failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    #[error("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2) failed: {0}")]
    EnableManualProtect(#[source] kvm_ioctls::Error),
    #[error("KVM_CLEAR_DIRTY_LOG for slot {slot} failed: {source}")]
    ClearDirtyLog {
        slot: u32,
        #[source]
        source: std::io::Error,
    },
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

/// A KVM VM that has no guest RAM yet.
#[derive(Debug)]
pub struct EmptyVm {
    fd: VmFd,
    manual_protect: bool,
}

impl EmptyVm {
    /// `KVM_CREATE_VM` and the TSS address; nothing else.
    pub fn create(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(VmError::SetTssAddress)?;
        Ok(Self {
            fd,
            manual_protect: false,
        })
    }

    /// Turns on manual-protect dirty logging (`KVM_CLEAR_DIRTY_LOG`) where the kernel offers it,
    /// with every page initially dirty for a booted VM and clean for a restored one.
    ///
    /// Ordering: the mode must be set before any slot is registered with dirty logging.
    pub fn set_dirty_log_mode(&mut self, origin: MemoryOrigin) -> Result<(), VmError> {
        let supported = self
            .fd
            .check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
            as u32;
        if supported & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
            return Ok(());
        }
        let mut flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
        if origin == MemoryOrigin::Boot {
            flags |= supported & KVM_DIRTY_LOG_INITIALLY_SET;
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = u64::from(flags);
        self.fd
            .enable_cap(&cap)
            .map_err(VmError::EnableManualProtect)?;
        self.manual_protect = true;
        Ok(())
    }

    /// Registers `memory` as the VM's RAM, one slot per region, with dirty logging on.
    pub fn register_memory(self, memory: GuestMemory) -> Result<Vm, VmError> {
        let started = Instant::now();
        for (slot, region) in memory.iter().enumerate() {
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
            // SAFETY: the region is a live mapping of exactly `size` bytes owned by `memory`,
            // which the returned `Vm` keeps and drops after the VM fd (see the field order of
            // `Vm`); slots do not overlap because the regions of a GuestMemoryMmap do not.
            unsafe { self.fd.set_user_memory_region(descriptor) }.map_err(|source| {
                VmError::SetMemoryRegion {
                    slot,
                    guest_addr,
                    size,
                    source,
                }
            })?;
        }
        Ok(Vm {
            fd: self.fd,
            memory,
            manual_protect: self.manual_protect,
            register_time: started.elapsed(),
        })
    }
}

/// A KVM VM and its guest RAM.
#[derive(Debug)]
pub struct Vm {
    // Field order matters: `fd` is dropped (the VM destroyed) before `memory` is unmapped.
    fd: VmFd,
    memory: GuestMemory,
    /// Whether `KVM_CLEAR_DIRTY_LOG` re-protects pages (manual protect) instead of
    /// `KVM_GET_DIRTY_LOG` doing it for the whole slot.
    manual_protect: bool,
    /// How long registering the RAM slots (with dirty logging) took.
    register_time: Duration,
}

impl Vm {
    /// The three steps at once: create, set the dirty-log mode, register `memory`.
    pub fn new(kvm: &Kvm, memory: GuestMemory, origin: MemoryOrigin) -> Result<Self, VmError> {
        let mut vm = EmptyVm::create(kvm)?;
        vm.set_dirty_log_mode(origin)?;
        vm.register_memory(memory)
    }

    /// Takes the dirty-page bitmap — pages the guest wrote (KVM's log) or the VMM wrote for it
    /// (device emulation, through the memory's own bitmap) since the last harvest — one bit per
    /// page in snapshot-file order (slot 0's pages, then slot 1's). See [`dirty::harvest`] for
    /// what happens to the bits when a step fails.
    pub fn take_dirty_bitmap(&self) -> Harvest<VmError> {
        let mut harvest = dirty::harvest(self);
        let vmm_side = dirty::take_vmm_writes(&self.memory);
        for (word, vmm) in harvest.bitmap.iter_mut().zip(vmm_side) {
            *word |= vmm;
        }
        harvest
    }

    /// How long `KVM_SET_USER_MEMORY_REGION` (with dirty logging) took for all slots.
    pub fn register_time(&self) -> Duration {
        self.register_time
    }

    /// Whether dirty logging runs in manual-protect mode.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }
}

impl DirtyLog for Vm {
    type Error = VmError;

    fn slot_pages(&self) -> Vec<u64> {
        self.memory.iter().map(|r| r.len() / 4096).collect()
    }

    fn get(&self, slot: u32, pages: u64) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot, (pages * 4096) as usize)
            .map_err(|source| VmError::GetDirtyLog { slot, source })
    }

    fn clears_on_get(&self) -> bool {
        !self.manual_protect
    }

    /// Clears (and write-protects again) exactly the pages set in `log`: pages written between
    /// the GET and this CLEAR stay dirty, and clean pages are not touched.
    fn clear(&self, slot: u32, pages: u64, log: &mut [u64]) -> Result<(), VmError> {
        let mut clear = kvm_clear_dirty_log {
            slot,
            num_pages: pages as u32,
            first_page: 0,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = log.as_mut_ptr().cast();
        // SAFETY: `clear` describes this VM's slot `slot` of `pages` pages and points at a bitmap
        // of at least `pages` bits (KVM_GET_DIRTY_LOG sized it for the slot) that outlives the
        // call; the kernel only reads the bitmap.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(VmError::ClearDirtyLog {
                slot,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}
