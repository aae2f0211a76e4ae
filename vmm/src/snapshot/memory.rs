//! Guest RAM in snapshot files: full dumps (zero pages left as holes), diff dumps of dirty
//! pages, and loading — lazily with a `MAP_PRIVATE` mapping of the file, or eagerly by copying.
//!
//! The file has the same offsets as the RAM layout with the MMIO hole squeezed out: region 0 at
//! offset 0, region 1 right after it (as Firecracker does).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use cowvm_guest_abi::layout::PAGE_SIZE;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::mapped::MappedFile;
use crate::memory::{create_guest_memory, ram_ranges, GuestMemory, MemoryError};

/// Snapshot memory could not be written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotMemoryError {
    #[error("cannot write snapshot memory: {0}")]
    Write(#[source] std::io::Error),
    #[error("cannot read snapshot memory {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot memory {path} is {actual} bytes but the VM has {expected} bytes of RAM — the file was truncated or resized")]
    WrongSize {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("cannot map snapshot memory {path}: {reason}")]
    Map { path: String, reason: String },
    #[error(transparent)]
    Allocate(#[from] MemoryError),
    #[error("snapshot memory run at page {first} (+{count}) lies outside the {pages}-page RAM")]
    RunOutOfRange { first: u64, count: u64, pages: u64 },
}

/// `(file offset, host address, length)` of every RAM region.
fn regions(memory: &GuestMemory) -> Vec<(u64, *mut u8, usize)> {
    let mut offset = 0;
    memory
        .iter()
        .map(|region| {
            let entry = (offset, region.as_ptr(), region.len() as usize);
            offset += region.len();
            entry
        })
        .collect()
}

/// # Safety
/// No vCPU may run (nothing else writes guest RAM) while the returned slice lives.
unsafe fn region_bytes<'a>(addr: *mut u8, len: usize) -> &'a [u8] {
    // SAFETY: `addr..addr + len` is a live guest RAM mapping; the caller guarantees no writers.
    unsafe { std::slice::from_raw_parts(addr, len) }
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to handles any misalignment.
        unsafe { page.align_to::<u64>() }
    };
    // OR-ing blocks of words (instead of stopping at the first nonzero one) lets the compiler
    // vectorize the scan; most pages either are zero or differ early in their first block.
    head.iter().all(|&b| b == 0)
        && words
            .chunks(32)
            .all(|block| block.iter().fold(0, |acc, &w| acc | w) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Pages per `pwrite`: the pages just checked for zeros are still in the CPU cache when the
/// kernel copies them, and page-cache allocation and dirty throttling proceed in step with the
/// copy (one write of all of RAM measured slower than the same data in pieces).
const WRITE_PAGES: u64 = 512;

/// Writes the pages of `memory` whose bit is set in `selected` (one bit per file page), leaving
/// out zero pages if `skip_zero`, at their file offsets. Returns the runs written, coalesced.
fn write_pages(
    file: &File,
    memory: &GuestMemory,
    selected: &[u64],
    skip_zero: bool,
) -> Result<Vec<(u64, u64)>, SnapshotMemoryError> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let page_size = PAGE_SIZE as usize;
    for (file_offset, addr, len) in regions(memory) {
        // SAFETY: snapshots are written with every vCPU paused (or, for a live snapshot, from a
        // forked child whose copy of RAM nothing else writes).
        let bytes = unsafe { region_bytes(addr, len) };
        let first_page = file_offset / PAGE_SIZE;
        let pages = (len / page_size) as u64;
        let write = |from: u64, to: u64| {
            let data = &bytes[from as usize * page_size..to as usize * page_size];
            file.write_all_at(data, file_offset + from * PAGE_SIZE)
                .map_err(SnapshotMemoryError::Write)
        };
        // Pages of this region checked and kept but not yet written.
        let mut unwritten: Option<u64> = None;
        let mut index = 0;
        while index < pages {
            let page = first_page + index;
            let word = selected.get((page / 64) as usize).copied().unwrap_or(0);
            if word == 0 && page % 64 == 0 && index + 64 <= pages {
                if let Some(from) = unwritten.take() {
                    write(from, index)?;
                }
                index += 64;
                continue;
            }
            let keep = word >> (page % 64) & 1 == 1 && {
                let at = index as usize * page_size;
                !(skip_zero && is_zero(&bytes[at..at + page_size]))
            };
            if keep {
                let from = *unwritten.get_or_insert(index);
                match runs.last_mut() {
                    Some((start, count)) if *start + *count == page => *count += 1,
                    _ => runs.push((page, 1)),
                }
                if index + 1 - from >= WRITE_PAGES {
                    write(from, index + 1)?;
                    unwritten = None;
                }
            } else if let Some(from) = unwritten.take() {
                write(from, index)?;
            }
            index += 1;
        }
        if let Some(from) = unwritten {
            write(from, pages)?;
        }
    }
    Ok(runs)
}

/// Dumps all of RAM to `file`, leaving zero pages as holes. Only pages that can hold data are
/// read (see [`super::residency`]): RAM the guest never touched is not faulted in. Returns the
/// pages written. The caller syncs the file (see [`super::staging::StagingDir::commit`]).
pub fn dump_full(
    file: &File,
    memory: &GuestMemory,
    mem_size: u64,
) -> Result<u64, SnapshotMemoryError> {
    let candidates = super::residency::pages_with_data(memory);
    let runs = write_pages(file, memory, &candidates, true)?;
    set_length(file, mem_size)?;
    Ok(runs.iter().map(|(_, count)| count).sum())
}

/// Dumps the pages whose bit is set in `dirty` (one bit per file page) to `file`.
pub fn dump_diff(
    file: &File,
    memory: &GuestMemory,
    mem_size: u64,
    dirty: &[u64],
) -> Result<Vec<(u64, u64)>, SnapshotMemoryError> {
    let runs = write_pages(file, memory, dirty, false)?;
    set_length(file, mem_size)?;
    Ok(runs)
}

/// Ordering: the length is set after the data, so a dump cut short (full disk, a file-size
/// limit, a killed writer) leaves a file shorter than RAM, which no reader takes for complete.
fn set_length(file: &File, mem_size: u64) -> Result<(), SnapshotMemoryError> {
    file.set_len(mem_size).map_err(SnapshotMemoryError::Write)
}

fn open_checked(path: &Path, mem_size: u64) -> Result<File, SnapshotMemoryError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| SnapshotMemoryError::Read {
        path: name.clone(),
        source,
    })?;
    let actual = file
        .metadata()
        .map_err(|source| SnapshotMemoryError::Read {
            path: name.clone(),
            source,
        })?
        .len();
    if actual != mem_size {
        return Err(SnapshotMemoryError::WrongSize {
            path: name,
            expected: mem_size,
            actual,
        });
    }
    Ok(file)
}

/// Maps `path` copy-on-write as guest RAM: pages load on first touch, writes stay private to
/// this process, and the file is never modified (so it must not change while mapped: the
/// returned [`MappedFile`] checks that).
pub fn map_private(
    path: &Path,
    mem_size: u64,
) -> Result<(GuestMemory, MappedFile), SnapshotMemoryError> {
    let file = Arc::new(open_checked(path, mem_size)?);
    let map_err = |reason: String| SnapshotMemoryError::Map {
        path: path.display().to_string(),
        reason,
    };
    let mapped =
        MappedFile::new(path, file.clone()).map_err(|source| SnapshotMemoryError::Read {
            path: path.display().to_string(),
            source,
        })?;
    let mut offset = 0;
    let mut regions = Vec::new();
    for (guest_addr, len) in ram_ranges(mem_size) {
        let len = len as usize;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(mapping, guest_addr)
                .ok_or_else(|| map_err("region overflows the address space".into()))?,
        );
        offset += len as u64;
    }
    let memory = GuestMemory::from_regions(regions).map_err(|e| map_err(e.to_string()))?;
    Ok((memory, mapped))
}

/// Copies `path` into fresh anonymous RAM, skipping the file's holes.
pub fn load_eager(path: &Path, mem_size: u64) -> Result<GuestMemory, SnapshotMemoryError> {
    let file = open_checked(path, mem_size)?;
    let memory = create_guest_memory(mem_size)?;
    let runs = data_extents(&file, mem_size);
    apply_runs(&file, path, &memory, &runs)?;
    Ok(memory)
}

/// The file's data extents as page runs (SEEK_DATA/SEEK_HOLE; the whole file if unsupported).
pub fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut runs = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error();
            if errno != Some(libc::ENXIO) && pos == 0 {
                return vec![(0, len / PAGE_SIZE)];
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { len as i64 } else { hole };
        let first = data as u64 / PAGE_SIZE;
        let end = (hole as u64).div_ceil(PAGE_SIZE);
        runs.push((first, end - first));
        pos = hole;
    }
    runs
}

/// Reads the page runs `runs` of `file` into guest RAM at the same offsets.
pub fn apply_runs(
    file: &File,
    path: &Path,
    memory: &GuestMemory,
    runs: &[(u64, u64)],
) -> Result<(), SnapshotMemoryError> {
    let regions = regions(memory);
    let total_pages: u64 = regions.iter().map(|r| r.2 as u64 / PAGE_SIZE).sum();
    for &(first, count) in runs {
        if first.checked_add(count).is_none_or(|end| end > total_pages) {
            return Err(SnapshotMemoryError::RunOutOfRange {
                first,
                count,
                pages: total_pages,
            });
        }
        let (mut page, end) = (first, first + count);
        while page < end {
            let offset = page * PAGE_SIZE;
            let Some(&(region_offset, addr, len)) = regions
                .iter()
                .find(|(o, _, l)| offset >= *o && offset < o + *l as u64)
            else {
                break;
            };
            let in_region = (offset - region_offset) as usize;
            let bytes = ((end - page) * PAGE_SIZE).min((len - in_region) as u64) as usize;
            // SAFETY: [addr + in_region, + bytes) lies inside a live RAM region (checked above),
            // and no vCPU runs while a snapshot is being loaded.
            let target = unsafe { std::slice::from_raw_parts_mut(addr.add(in_region), bytes) };
            file.read_exact_at(target, offset)
                .map_err(|source| SnapshotMemoryError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
            page += bytes as u64 / PAGE_SIZE;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn full_dump_is_sparse_and_maps_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let memory = create_guest_memory(8 << 20).unwrap();
        memory
            .write_obj(0x1234_u64, GuestAddress(0x40_0000))
            .unwrap();
        memory
            .write_obj(0x5678_u64, GuestAddress(0x7f_f000))
            .unwrap();
        let file = File::create(&path).unwrap();
        assert_eq!(dump_full(&file, &memory, 8 << 20).unwrap(), 2);
        let file = File::open(&path).unwrap();
        assert_eq!(
            data_extents(&file, 8 << 20)
                .iter()
                .map(|r| r.1)
                .sum::<u64>(),
            2
        );
        let (mapped, _) = map_private(&path, 8 << 20).unwrap();
        assert_eq!(
            mapped.read_obj::<u64>(GuestAddress(0x7f_f000)).unwrap(),
            0x5678
        );
        mapped.write_obj(1u64, GuestAddress(0x40_0000)).unwrap();
        let (reread, _) = map_private(&path, 8 << 20).unwrap();
        assert_eq!(
            reread.read_obj::<u64>(GuestAddress(0x40_0000)).unwrap(),
            0x1234,
            "file untouched"
        );
        let eager = load_eager(&path, 8 << 20).unwrap();
        assert_eq!(
            eager.read_obj::<u64>(GuestAddress(0x40_0000)).unwrap(),
            0x1234
        );
    }

    #[test]
    fn diff_dump_stores_exactly_the_dirty_pages() {
        let dir = tempfile::tempdir().unwrap();
        let memory = create_guest_memory(8 << 20).unwrap();
        let mut dirty = vec![0u64; 32];
        dirty[0] = 0b1011; // pages 0, 1, 3 (page 3 is zero but dirty: stored anyway)
        memory.write_obj(7u64, GuestAddress(0x1000)).unwrap();
        let file = File::create(dir.path().join("m")).unwrap();
        let runs = dump_diff(&file, &memory, 8 << 20, &dirty).unwrap();
        assert_eq!(runs, vec![(0, 2), (3, 1)]);
        let target = create_guest_memory(8 << 20).unwrap();
        apply_runs(
            &File::open(dir.path().join("m")).unwrap(),
            Path::new("m"),
            &target,
            &runs,
        )
        .unwrap();
        assert_eq!(target.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 7);
        let bad = apply_runs(&file, Path::new("m"), &target, &[(2047, 2)]);
        assert!(matches!(
            bad,
            Err(SnapshotMemoryError::RunOutOfRange { .. })
        ));
    }

    #[test]
    fn wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let err = map_private(&path, 8 << 20).unwrap_err();
        assert!(
            matches!(err, SnapshotMemoryError::WrongSize { actual: 4096, .. }),
            "{err}"
        );
    }
}
