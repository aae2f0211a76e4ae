//! Guest RAM: private anonymous memory (so a `fork()` shares it copy-on-write), laid out around
//! the MMIO hole below 4 GiB, with transparent huge pages requested.

use cowvm_guest_abi::layout::{MMIO_GAP_END, MMIO_GAP_START};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The guest RAM type used across the VMM. Its bitmap records the pages the VMM itself writes
/// through vm-memory (device emulation), which KVM's dirty log cannot see; see `dirty.rs`.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {size} bytes of guest RAM: {source}")]
    Allocate {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The guest-physical ranges `(start, length)` that hold `mem_size` bytes of RAM.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
        ]
    }
}

/// One past the highest guest-physical RAM address.
pub fn ram_end(mem_size: u64) -> u64 {
    ram_ranges(mem_size)
        .last()
        .map_or(0, |(start, len)| start.0 + len)
}

/// Allocates guest RAM as private anonymous memory and asks for transparent huge pages, which
/// make the page-table copy of a `fork()` about ten times cheaper.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    let memory = GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        size: mem_size,
        source,
    })?;
    for region in memory.iter() {
        advise_huge_pages(region.as_ptr(), region.len() as usize);
    }
    Ok(memory)
}

fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: [addr, addr + len) is a mapping this process owns (a guest RAM region); the advice
    // changes only how the kernel backs it, never its contents.
    let ret = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        // Not fatal: kernels without THP still run guests, just with slower forks.
        tracing::debug!(
            "madvise(MADV_HUGEPAGE) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Makes a `SIGBUS` end the process with a message and exit status 1 instead of a core dump.
///
/// Guest RAM may map a snapshot memory file; if that file is truncated under the VMM between
/// the identity check that precedes every VMM-side read and the read itself, the read faults
/// with `SIGBUS`. Nothing can be recovered at that point, but the user gets told why.
pub fn install_sigbus_handler() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MESSAGE: &[u8] = b"cowvm: error: SIGBUS while reading guest RAM: a snapshot memory file it maps was truncated while in use; restore the snapshot from an intact copy\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MESSAGE is a static buffer.
        unsafe {
            libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
            libc::_exit(1);
        }
    }
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler above only
    // calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            tracing::debug!(
                "cannot install the SIGBUS handler: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// This host's physical RAM in bytes.
pub fn host_ram_bytes() -> u64 {
    // SAFETY: sysinfo only writes into the zeroed struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    info.totalram.saturating_mul(u64::from(info.mem_unit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
        let four_gib = ram_ranges(4 << 30);
        assert_eq!(four_gib[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            four_gib[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
        assert_eq!(ram_end(4 << 30), MMIO_GAP_END + (4 << 30) - MMIO_GAP_START);
    }

    #[test]
    fn memory_is_zeroed_and_writable() {
        let memory = create_guest_memory(8 << 20).unwrap();
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x40_0000)).unwrap(), 0);
        memory
            .write_obj(0xdead_beef_u64, GuestAddress(0x40_0000))
            .unwrap();
        assert_eq!(
            memory.read_obj::<u64>(GuestAddress(0x40_0000)).unwrap(),
            0xdead_beef
        );
        assert!(host_ram_bytes() > 1 << 20);
    }
}
