//! One pool slot: a KVM VM whose RAM is registered once, over a placeholder mapping, and its
//! vCPUs. A slot is *armed* for a template by mapping the template's memory file over that same
//! host range with `mmap(MAP_FIXED | MAP_PRIVATE)`: KVM follows the host mapping (its MMU
//! notifiers drop the old translations), so the guest sees the file's pages without the memslot
//! being registered again. Arming replaces whatever the last clone left (its private pages go;
//! a slot that already maps the template only drops them, with `MADV_DONTNEED`), so the pool arms
//! returned slots in the background and a clone's start maps nothing.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::CloneError;
use crate::memory::create_guest_memory;
use crate::snapshot::state::SnapshotState;
use crate::vm::{EmptyVm, MemoryOrigin, Vm};

/// The shape a snapshot needs of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub mem_size: u64,
    pub vcpus: u32,
}

/// A template's memory file, as the pool maps it over slots.
#[derive(Clone, Debug)]
pub struct Arming {
    /// The template snapshot's id.
    pub id: String,
    pub file: Arc<File>,
}

/// A VM ready to take a clone.
#[derive(Debug)]
pub struct Slot {
    pub(super) vm: Vm,
    pub(super) vcpus: Vec<VcpuFd>,
    pub(super) shape: Shape,
    /// Clones this slot has run.
    pub(super) runs: u64,
    /// The template whose clean mapping covers the slot's RAM, if any (else a placeholder, or
    /// pages a clone wrote).
    pub(super) armed_for: Option<String>,
    /// The template whose memory file is mapped over the slot's RAM, clean or with a clone's
    /// private pages on top.
    pub(super) mapped: Option<String>,
}

impl Slot {
    /// Creates the VM, registers a placeholder RAM of `shape.mem_size` and creates the vCPUs.
    pub fn create(kvm: &Kvm, shape: Shape) -> Result<Self, CloneError> {
        let memory = create_guest_memory(shape.mem_size).map_err(CloneError::Memory)?;
        let mut vm = EmptyVm::create(kvm).map_err(CloneError::Vm)?;
        // A clone's first diff builds on its template: logging starts clean.
        vm.set_dirty_log_mode(MemoryOrigin::Restore)
            .map_err(CloneError::Vm)?;
        let vm = vm.register_memory(memory).map_err(CloneError::Vm)?;
        let vcpus = (0..shape.vcpus)
            .map(|index| {
                vm.fd()
                    .create_vcpu(u64::from(index))
                    .map_err(|source| CloneError::CreateVcpu { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            vm,
            vcpus,
            shape,
            runs: 0,
            armed_for: None,
            mapped: None,
        })
    }

    /// Maps the template over the slot's RAM (dropping a previous clone's pages) and clears the
    /// dirty logs, so that a clone of that template can start without mapping anything.
    pub fn arm(&mut self, arming: &Arming) -> Result<(), CloneError> {
        self.armed_for = None;
        if self.mapped.as_deref() == Some(arming.id.as_str()) {
            self.drop_private_pages()?;
        } else {
            self.mapped = None;
            self.map_snapshot(&arming.file)?;
            self.mapped = Some(arming.id.clone());
        }
        self.clear_dirty_logs()?;
        self.armed_for = Some(arming.id.clone());
        Ok(())
    }

    /// Re-arms a slot whose RAM already maps the template: `madvise(MADV_DONTNEED)` drops the
    /// last clone's private copies (the next access reads the file's page again), which is what
    /// mapping the file afresh would do, but under the process's `mmap_lock` taken for reading:
    /// `mmap(MAP_FIXED)` takes it for writing while it tears down gigabytes of page tables, and
    /// every other clone of the process waits for it on its next page fault.
    fn drop_private_pages(&self) -> Result<(), CloneError> {
        for region in self.vm.memory().iter() {
            // SAFETY: the slot's own RAM region, a mapping its GuestMemory owns; the slot is idle
            // (no vCPU runs, no reference into its pages is alive), and MADV_DONTNEED on a
            // private file mapping only discards pages that are re-read from the file on the next
            // access: the mapping and every pointer into it stay valid.
            let result = unsafe {
                libc::madvise(
                    region.as_ptr().cast(),
                    region.len() as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if result != 0 {
                return Err(CloneError::Reset(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// Maps `file` (a full snapshot's memory, regions concatenated) over the slot's RAM,
    /// copy-on-write: the clone's writes stay private to it and never reach the file.
    fn map_snapshot(&self, file: &File) -> Result<(), CloneError> {
        let mut offset = 0;
        for region in self.vm.memory().iter() {
            let len = region.len() as usize;
            // SAFETY: [addr, addr + len) is this slot's RAM region, a mapping the slot's
            // GuestMemory owns for the slot's lifetime; MAP_FIXED replaces it in place with a
            // mapping of the same size, so every pointer vm-memory and KVM hold stays valid. No
            // vCPU runs and no reference into the old pages is alive while a slot is idle.
            let mapped = unsafe {
                libc::mmap(
                    region.as_ptr().cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if mapped == libc::MAP_FAILED {
                return Err(CloneError::MapSnapshot(std::io::Error::last_os_error()));
            }
            offset += len as u64;
        }
        Ok(())
    }

    /// Whether every vCPU takes the CPUID of `state`'s vCPUs (KVM refuses a changed CPUID on a
    /// vCPU that has run).
    pub fn accepts_cpuid(&self, state: &SnapshotState) -> bool {
        self.vcpus.iter().zip(&state.vcpus).all(|(fd, vcpu)| {
            CpuId::from_entries(&vcpu.cpuid).is_ok_and(|cpuid| fd.set_cpuid2(&cpuid).is_ok())
        })
    }

    /// Drops what the last clone left: a fresh anonymous placeholder over its RAM (freeing its
    /// private pages — the slow part, 11–16 ms at 4 GiB, done off the start path) and clean dirty
    /// logs (KVM's and the VMM's).
    pub fn reset(&mut self) -> Result<(), CloneError> {
        self.armed_for = None;
        self.mapped = None;
        for region in self.vm.memory().iter() {
            // SAFETY: as in `map_snapshot`: the slot's own region, replaced in place while idle.
            let mapped = unsafe {
                libc::mmap(
                    region.as_ptr().cast(),
                    region.len() as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if mapped == libc::MAP_FAILED {
                return Err(CloneError::Reset(std::io::Error::last_os_error()));
            }
        }
        self.clear_dirty_logs()
    }

    /// Takes and drops the dirty bits a previous clone left, in KVM and in the VMM's bitmap.
    fn clear_dirty_logs(&self) -> Result<(), CloneError> {
        self.vm
            .take_dirty_bitmap()
            .into_result()
            .map(drop)
            .map_err(|(e, _)| CloneError::Vm(e))
    }
}
