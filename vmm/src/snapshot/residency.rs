//! Which pages of guest RAM can hold data, found without touching them: a full snapshot checks
//! only those for zeros. Reading a page the guest never touched would fault it in (a zero page,
//! or for a `MAP_PRIVATE` snapshot file a read of that file) only to find zeros.
//!
//! A page can hold data if it is mapped (present) or swapped out (`/proc/self/pagemap`, bits 63
//! and 62, which need no privilege), or — in a region that maps a snapshot memory file — if the
//! file has data there (`SEEK_DATA`): an unmapped page of such a region reads the file. Any page
//! that cannot be classified counts as holding data, so the answer is never "empty" wrongly.

use std::fs::File;
use std::os::unix::fs::FileExt;

use cowvm_guest_abi::layout::PAGE_SIZE;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::data_extents;
use crate::dirty::{empty_bitmap, or_bits};
use crate::memory::GuestMemory;

/// `pagemap` entry bits: page present in RAM, page swapped out.
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
/// Pagemap entries read per `pread` (512 KiB of entries for 256 MiB of RAM).
const ENTRIES_PER_READ: usize = 64 * 1024;

/// One bit per page of `memory` in snapshot-file order (region 0's pages, then region 1's): set
/// for every page that may hold data.
pub fn pages_with_data(memory: &GuestMemory) -> Vec<u64> {
    let total: u64 = memory.iter().map(|r| r.len() / PAGE_SIZE).sum();
    let mut bitmap = empty_bitmap(total);
    let pagemap = File::open("/proc/self/pagemap").ok();
    let mut first_page = 0;
    for region in memory.iter() {
        let pages = region.len() / PAGE_SIZE;
        let mut region_bits = pagemap
            .as_ref()
            .and_then(|pagemap| mapped_pages(pagemap, region.as_ptr() as u64, pages).ok())
            .unwrap_or_else(|| all_set(pages));
        if let Some(file_offset) = region.file_offset() {
            let start_page = file_offset.start() / PAGE_SIZE;
            let extents = data_extents(file_offset.file(), file_offset.start() + region.len());
            for (first, count) in extents {
                // Extents are pages of the file; keep the part inside this region's window.
                let from = first.max(start_page);
                let to = (first + count).min(start_page + pages);
                for page in from..to {
                    let bit = page - start_page;
                    region_bits[(bit / 64) as usize] |= 1 << (bit % 64);
                }
            }
        }
        or_bits(&mut bitmap, first_page, &region_bits, pages);
        first_page += pages;
    }
    bitmap
}

/// Present-or-swapped bits of the `pages` pages mapped at `addr`.
fn mapped_pages(pagemap: &File, addr: u64, pages: u64) -> std::io::Result<Vec<u64>> {
    let mut bits = empty_bitmap(pages);
    let mut entries = vec![0u8; ENTRIES_PER_READ * 8];
    let mut page = 0;
    while page < pages {
        let count = (pages - page).min(ENTRIES_PER_READ as u64) as usize;
        let buf = &mut entries[..count * 8];
        pagemap.read_exact_at(buf, (addr / PAGE_SIZE + page) * 8)?;
        for (index, entry) in buf.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(entry);
            if u64::from_le_bytes(word) & (PRESENT | SWAPPED) != 0 {
                let bit = page + index as u64;
                bits[(bit / 64) as usize] |= 1 << (bit % 64);
            }
        }
        page += count as u64;
    }
    Ok(bits)
}

fn all_set(pages: u64) -> Vec<u64> {
    let mut bits = empty_bitmap(pages);
    for bit in 0..pages {
        bits[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::set_pages;
    use crate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn only_touched_pages_of_anonymous_ram_can_hold_data() {
        let memory = create_guest_memory(8 << 20).unwrap();
        memory.write_obj(1u64, GuestAddress(0x3000)).unwrap();
        memory.write_obj(1u64, GuestAddress(0x7f_f000)).unwrap();
        let pages: Vec<u64> = set_pages(&pages_with_data(&memory)).collect();
        // With transparent huge pages a write maps its whole 2 MiB; either way the two pages
        // written are in, and nothing outside their huge pages is.
        assert!(pages.contains(&3) && pages.contains(&0x7ff), "{pages:?}");
        assert!(
            pages.iter().all(|p| !(512..0x600).contains(p)),
            "untouched pages are out: {pages:?}"
        );
    }

    #[test]
    fn a_mapped_file_counts_its_data_extents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let file = File::create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[7; 4096], 0x20_0000).unwrap();
        drop(file);
        let (memory, _) = super::super::memory::map_private(&path, 8 << 20).unwrap();
        let pages: Vec<u64> = set_pages(&pages_with_data(&memory)).collect();
        assert_eq!(
            pages,
            vec![0x200],
            "the file's one data page, nothing mapped yet"
        );
        memory.write_obj(1u64, GuestAddress(0x5000)).unwrap();
        let pages: Vec<u64> = set_pages(&pages_with_data(&memory)).collect();
        assert!(pages.contains(&5) && pages.contains(&0x200), "{pages:?}");
    }
}
