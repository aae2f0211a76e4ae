//! `compare`: whether two disks read the same, and the first 512-byte sector where they do not,
//! like `qemu-img compare` (a size difference is allowed if the longer disk's tail reads as
//! zeros; strict mode also wants equal sizes and the same allocation).

use crate::disk::Disk;
use crate::error::Result;
use crate::monitor::{checkpoint, Monitor};
use crate::status::{Allocation, Extent};

/// Bytes compared per read.
const CHUNK: u64 = 1 << 20;
const SECTOR: usize = 512;

/// The verdict of [`compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Identical,
    /// The sector at this offset differs.
    ContentMismatch(u64),
    /// Strict mode: the sizes differ.
    SizeMismatch,
    /// Strict mode: allocation differs in the run starting at this offset.
    StatusMismatch(u64),
}

/// The outcome of [`compare`]: the verdict and whether the sizes differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareReport {
    pub comparison: Comparison,
    pub sizes_differ: bool,
}

/// What QEMU's block status says about a run, as strict mode compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status {
    allocated: bool,
    zero: bool,
    /// The run reaches the end of the disk (QEMU's `BDRV_BLOCK_EOF`, part of what strict mode
    /// compares).
    eof: bool,
}

fn status_of(extent: &Extent, offset: u64, size: u64) -> Status {
    Status {
        allocated: extent.allocation != Allocation::Unallocated,
        zero: extent.allocation != Allocation::Data,
        eof: offset + extent.len >= size,
    }
}

/// Compares `a` and `b` through their backing chains.
pub fn compare(
    a: &mut Disk,
    b: &mut Disk,
    strict: bool,
    monitor: &mut dyn Monitor,
) -> Result<CompareReport> {
    let (size_a, size_b) = (a.size(), b.size());
    let sizes_differ = size_a != size_b;
    let report = |comparison| CompareReport {
        comparison,
        sizes_differ,
    };
    if strict && sizes_differ {
        return Ok(report(Comparison::SizeMismatch));
    }
    let common = size_a.min(size_b);
    monitor.start(size_a.max(size_b));
    let mut buf_a = vec![0u8; CHUNK as usize];
    let mut buf_b = vec![0u8; CHUNK as usize];
    let mut offset = 0;
    while offset < common {
        checkpoint(monitor)?;
        let extent_a = a.status(offset, common - offset, usize::MAX)?;
        let extent_b = b.status(offset, common - offset, usize::MAX)?;
        let (status_a, status_b) = (
            status_of(&extent_a, offset, size_a),
            status_of(&extent_b, offset, size_b),
        );
        if strict && status_a != status_b {
            return Ok(report(Comparison::StatusMismatch(offset)));
        }
        let len = extent_a.len.min(extent_b.len).min(CHUNK);
        if !(status_a.zero && status_b.zero) {
            let n = len as usize;
            a.read_at(&mut buf_a[..n], offset)?;
            b.read_at(&mut buf_b[..n], offset)?;
            if let Some(sector) = first_different_sector(&buf_a[..n], &buf_b[..n]) {
                return Ok(report(Comparison::ContentMismatch(offset + sector)));
            }
        }
        offset += len;
        monitor.advance(offset);
    }
    // The longer disk's tail must read as zeros.
    let (longer, size) = if size_a > size_b {
        (a, size_a)
    } else {
        (b, size_b)
    };
    while offset < size {
        checkpoint(monitor)?;
        let extent = longer.status(offset, size - offset, usize::MAX)?;
        let len = extent.len.min(CHUNK);
        if extent.allocation == Allocation::Data {
            let n = len as usize;
            longer.read_at(&mut buf_a[..n], offset)?;
            buf_b[..n].fill(0);
            if let Some(sector) = first_different_sector(&buf_a[..n], &buf_b[..n]) {
                return Ok(report(Comparison::ContentMismatch(offset + sector)));
            }
        }
        offset += len;
        monitor.advance(offset);
    }
    Ok(report(Comparison::Identical))
}

/// Offset of the first 512-byte sector where `a` and `b` differ.
fn first_different_sector(a: &[u8], b: &[u8]) -> Option<u64> {
    if a == b {
        return None;
    }
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
        .map(|sector| (sector * SECTOR) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatches_are_reported_per_sector() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        assert_eq!(first_different_sector(&a, &b), None);
        b[1500] = 1;
        assert_eq!(first_different_sector(&a, &b), Some(1024));
    }
}
