//! The guest-physical memory map and the I/O ports the guest uses.

/// Size of a guest page; the workload, dirty logging and snapshots all count in these.
pub const PAGE_SIZE: u64 = 4096;

/// Boot information page written by the VMM before the first instruction (see [`crate::BootInfo`]).
pub const BOOT_INFO_ADDR: u64 = 0x5000;
/// Global descriptor table: null, 64-bit code, data.
pub const GDT_ADDR: u64 = 0x6000;
/// Per-vCPU progress counters, one `u64` each (guest-owned): the workload steps a vCPU has
/// completed (see [`crate::workload::step_target`]). `cowvm stats` reports them, and tests read
/// them from snapshots to know exactly which pages a diff must hold.
pub const PROGRESS_ADDR: u64 = 0x7000;
/// First page of the identity-mapping page tables (PML4, then PDPT, then page directories).
pub const PAGE_TABLES_ADDR: u64 = 0x9000;
/// End (exclusive) of the area the page tables may use.
pub const PAGE_TABLES_END: u64 = 0x10_0000;
/// Where the flat guest image is loaded and where execution starts.
pub const GUEST_IMAGE_ADDR: u64 = 0x10_0000;
/// Largest flat guest image the VMM accepts (the stacks start right after).
pub const GUEST_IMAGE_MAX: u64 = 0x10_0000;
/// Per-vCPU stacks grow down from `STACKS_END - index * STACK_SIZE`.
pub const STACKS_START: u64 = GUEST_IMAGE_ADDR + GUEST_IMAGE_MAX;
/// End (exclusive) of the stack area; the workload pages start here.
pub const STACKS_END: u64 = WORKLOAD_ADDR;
/// Stack size of one vCPU.
pub const STACK_SIZE: u64 = 16 * 1024;
/// Most vCPUs the memory map has stacks for.
pub const MAX_VCPUS: u32 = ((STACKS_END - STACKS_START) / STACK_SIZE) as u32;
/// First workload page.
pub const WORKLOAD_ADDR: u64 = 0x40_0000;
/// Start of the hole below 4 GiB where no RAM is mapped (room for virtio-mmio devices).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End (exclusive) of the MMIO hole; RAM beyond the hole continues from here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Smallest RAM that holds the fixed areas above and one workload page.
pub const MIN_RAM: u64 = WORKLOAD_ADDR + PAGE_SIZE;

/// First virtio-mmio device window, at the start of the MMIO hole; device `i` is at
/// `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE` (the boot-info page lists them).
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio window (registers, then the device's config space from 0x100).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most devices the boot-info page lists.
pub const MAX_DEVICES: usize = 8;
/// Pages the guest's disk driver uses right after the workload pages when the disk workload
/// runs: the virtqueue (3 pages) and 128 request slots (see `guest/kernel/src/virtio.rs`).
pub const DISK_AREA_PAGES: u64 = 136;

/// COM1: a 16550 UART register block of 8 ports.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Exit device (as QEMU's isa-debug-exit): a byte written here ends the VM with that status.
pub const EXIT_PORT: u16 = 0x501;
/// A write here parks the writing vCPU for good: the guest's `hlt`, which CPL 3 cannot execute.
pub const PARK_PORT: u16 = EXIT_PORT + 1;

/// Initial stack pointer of vCPU `index`: 8 below a 16-byte boundary, as if `call` had pushed
/// a return address, which is what the System V ABI expects at a function's first instruction.
pub const fn stack_pointer(index: u32) -> u64 {
    STACKS_END - index as u64 * STACK_SIZE - 8
}

/// Guest-physical address of vCPU `index`'s progress counter.
pub const fn progress_addr(index: u32) -> u64 {
    PROGRESS_ADDR + index as u64 * 8
}

/// Guest-physical address of workload page `page`.
pub const fn workload_page_addr(page: u64) -> u64 {
    WORKLOAD_ADDR + page * PAGE_SIZE
}

/// Guest-physical address of the guest's disk driver area, after `pages` workload pages.
pub const fn disk_area_addr(pages: u64) -> u64 {
    workload_page_addr(pages)
}

/// Guest-physical address of virtio-mmio device window `index`.
pub const fn virtio_mmio_addr(index: u64) -> u64 {
    VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE
}

/// Number of workload pages that fit in `ram_size` bytes of RAM laid out as above.
pub const fn max_workload_pages(ram_size: u64) -> u64 {
    let below_gap = if ram_size < MMIO_GAP_START {
        ram_size
    } else {
        MMIO_GAP_START
    };
    if below_gap <= WORKLOAD_ADDR {
        0
    } else {
        (below_gap - WORKLOAD_ADDR) / PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_are_aligned_and_disjoint() {
        for i in 0..MAX_VCPUS {
            let sp = stack_pointer(i);
            assert_eq!(sp % 16, 8);
            assert!(sp > STACKS_START && sp < STACKS_END);
        }
        assert_eq!(MAX_VCPUS, 128);
        const {
            assert!(progress_addr(MAX_VCPUS - 1) + 8 <= PROGRESS_ADDR + PAGE_SIZE);
            assert!(PROGRESS_ADDR >= GDT_ADDR + PAGE_SIZE && PROGRESS_ADDR < PAGE_TABLES_ADDR);
        }
    }

    #[test]
    fn workload_pages_stop_at_the_mmio_gap() {
        assert_eq!(max_workload_pages(MIN_RAM), 1);
        assert_eq!(max_workload_pages(WORKLOAD_ADDR), 0);
        assert_eq!(
            max_workload_pages(8 << 30),
            (MMIO_GAP_START - WORKLOAD_ADDR) / PAGE_SIZE
        );
    }
}
