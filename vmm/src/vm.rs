//! The KVM VM object and the guest RAM registered with it.
//!
//! Creating the VM, registering memory and loading state are separate steps so that later code
//! (restore, clone pools) can do them at different times.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

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
    register_time: std::time::Duration,
}

impl Vm {
    /// Creates an empty KVM VM and registers `memory` as its RAM, one slot per region, with
    /// dirty logging (manual-protect mode where the kernel offers it).
    pub fn new(kvm: &Kvm, memory: GuestMemory, origin: MemoryOrigin) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(VmError::SetTssAddress)?;
        let supported = fd.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) as u32;
        let manual_protect = supported & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0;
        if manual_protect {
            let mut flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
            if origin == MemoryOrigin::Boot {
                flags |= supported & KVM_DIRTY_LOG_INITIALLY_SET;
            }
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = u64::from(flags);
            // Ordering: the mode must be set before any slot is registered with dirty logging.
            fd.enable_cap(&cap).map_err(VmError::EnableManualProtect)?;
        }
        let mut vm = Self {
            fd,
            memory,
            manual_protect,
            register_time: Default::default(),
        };
        let started = std::time::Instant::now();
        vm.register_memory()?;
        vm.register_time = started.elapsed();
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
            let mut log = self
                .fd
                .get_dirty_log(slot, region.len() as usize)
                .map_err(|source| VmError::GetDirtyLog { slot, source })?;
            if self.manual_protect {
                self.clear_dirty_log(slot, pages, &mut log)?;
            }
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

    /// Clears (and write-protects again) exactly the pages set in `log`: pages written between
    /// the GET and this CLEAR stay dirty, and clean pages are not touched.
    fn clear_dirty_log(&self, slot: u32, pages: u64, log: &mut [u64]) -> Result<(), VmError> {
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

    /// How long `KVM_SET_USER_MEMORY_REGION` (with dirty logging) took for all slots.
    pub fn register_time(&self) -> std::time::Duration {
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
