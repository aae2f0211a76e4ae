//! What a VM's RAM costs the host, from `/proc/self/smaps` for the VM's own address ranges
//! (`smaps_rollup` is per process and cannot tell apart several clones in one process).
//!
//! For a RAM range that maps a snapshot's memory file `MAP_PRIVATE`, the clean file pages are the
//! page cache's (shared with every VM mapping the same file), and anonymous pages are the ones the
//! guest (or the VMM) made private by writing. PSS divides each page among its mappers, so the PSS
//! of all clones of one template sums to the page cache's pages once plus every clone's own.

use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Bytes of guest RAM by kind, for one VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryUsage {
    /// Pages present in the VM's RAM ranges.
    pub resident_bytes: u64,
    /// Resident pages still backed by the snapshot file (clean page-cache pages).
    pub file_bytes: u64,
    /// Pages private to this VM: anonymous memory, including copies made by writes.
    pub private_bytes: u64,
    /// Proportional set size: each page divided by the number of mappings sharing it.
    pub pss_bytes: u64,
}

impl std::ops::AddAssign for MemoryUsage {
    fn add_assign(&mut self, other: Self) {
        self.resident_bytes += other.resident_bytes;
        self.file_bytes += other.file_bytes;
        self.private_bytes += other.private_bytes;
        self.pss_bytes += other.pss_bytes;
    }
}

/// `/proc/self/smaps` could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read /proc/self/smaps for memory accounting: {0}")]
pub struct AccountingError(#[source] std::io::Error);

/// The usage of `memory`'s host ranges, read from this process's smaps.
pub fn usage(memory: &GuestMemory) -> Result<MemoryUsage, AccountingError> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").map_err(AccountingError)?;
    let ranges: Vec<(u64, u64)> = memory
        .iter()
        .map(|r| (r.as_ptr() as u64, r.as_ptr() as u64 + r.len()))
        .collect();
    Ok(usage_in(&smaps, &ranges))
}

/// Sums the smaps entries of mappings that lie inside `ranges` (host addresses, end exclusive).
pub fn usage_in(smaps: &str, ranges: &[(u64, u64)]) -> MemoryUsage {
    let mut usage = MemoryUsage::default();
    let mut inside = false;
    let (mut rss, mut anonymous) = (0, 0);
    let finish = |usage: &mut MemoryUsage, inside: bool, rss: u64, anonymous: u64| {
        if inside {
            usage.resident_bytes += rss;
            usage.private_bytes += anonymous;
            usage.file_bytes += rss.saturating_sub(anonymous);
        }
    };
    for line in smaps.lines() {
        if let Some((start, end)) = mapping_header(line) {
            finish(&mut usage, inside, rss, anonymous);
            (rss, anonymous) = (0, 0);
            inside = ranges.iter().any(|&(lo, hi)| start >= lo && end <= hi);
            continue;
        }
        if !inside {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib = value
            .trim()
            .strip_suffix(" kB")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        match key {
            "Rss" => rss = kib * 1024,
            "Pss" => usage.pss_bytes += kib * 1024,
            "Anonymous" => anonymous = kib * 1024,
            _ => {}
        }
    }
    finish(&mut usage, inside, rss, anonymous);
    usage
}

/// `(start, end)` of an smaps mapping header line (`7f00-7f80 rw-p 00000000 00:00 0  [heap]`).
fn mapping_header(line: &str) -> Option<(u64, u64)> {
    let range = line.split_ascii_whitespace().next()?;
    let (start, end) = range.split_once('-')?;
    if !start.bytes().all(|b| b.is_ascii_hexdigit()) || start.is_empty() {
        return None;
    }
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
1000-3000 rw-p 00000000 08:01 42     /snap/memory
Size:                  8 kB
Rss:                   8 kB
Pss:                   5 kB
Anonymous:             4 kB
VmFlags: rd wr mr mw me ac
3000-4000 rw-p 00000000 00:00 0
Rss:                   4 kB
Pss:                   4 kB
Anonymous:             4 kB
9000-a000 r--p 00000000 00:00 0      [heap]
Rss:                   4 kB
Pss:                   4 kB
Anonymous:             4 kB
";

    #[test]
    fn only_mappings_inside_the_ranges_count() {
        let usage = usage_in(SMAPS, &[(0x1000, 0x4000)]);
        assert_eq!(
            usage,
            MemoryUsage {
                resident_bytes: 12 << 10,
                file_bytes: 4 << 10,
                private_bytes: 8 << 10,
                pss_bytes: 9 << 10,
            }
        );
        assert_eq!(usage_in(SMAPS, &[(0x3000, 0x4000)]).resident_bytes, 4 << 10);
        assert_eq!(
            usage_in(SMAPS, &[(0x20000, 0x30000)]),
            MemoryUsage::default()
        );
    }

    #[test]
    fn this_process_sees_its_own_guest_ram() {
        let memory = crate::memory::create_guest_memory(8 << 20).unwrap();
        use vm_memory::{Bytes, GuestAddress};
        for page in 0..16u64 {
            memory.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
        }
        let usage = usage(&memory).unwrap();
        // 16 pages written; transparent huge pages may back them with a whole 2 MiB page.
        assert!(
            usage.private_bytes >= 16 * 4096 && usage.private_bytes <= 2 << 20,
            "{usage:?}"
        );
        assert_eq!(usage.file_bytes, 0, "anonymous memory");
    }
}
