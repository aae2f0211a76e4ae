//! Extended L2 entries (incompatible bit 4): 32 subclusters per cluster, each allocated, zero or
//! unallocated (read from the backing file) on its own. A write allocates only the subclusters it
//! touches, copying in the untouched part of a partly written subcluster; zeroing whole
//! subclusters only flips bitmap bits — what QEMU does.

use super::Image;
use crate::error::Result;
use crate::l2::{Mapping, ALL_ALLOCATED, ALL_ZEROES, COPIED, SUBCLUSTERS};
use crate::raw::{AlignedBuf, Storage};

/// Bitmap bits of subclusters `first..last` (allocation bits; shift by 32 for zero bits).
fn sub_range(first: u32, last: u32) -> u64 {
    ((1u64 << (last - first)) - 1) << first
}

impl<S: Storage> Image<S> {
    /// Writes `len` bytes (`data`, or zeros when `None`) inside one subcluster that cannot be
    /// written in place: a new or copied cluster, or an unallocated or zero subcluster of a
    /// cluster the image owns.
    pub(crate) fn write_sub(&mut self, guest: u64, data: Option<&[u8]>, len: usize) -> Result<()> {
        let granule = self.granule();
        let cluster_start = guest & !(self.cluster_size - 1);
        let sub = self.subcluster(guest);
        let sub_start = cluster_start + u64::from(sub) * granule;
        let (l2_offset, index) = self.l2_for_write(guest)?;
        let (entry, bitmap) = self.l2_pair(l2_offset, index);
        let mut cluster = self.decode(entry)?;
        if self.header.has_data_file() {
            cluster = self.check_data_file_mapping(cluster, entry, guest)?;
        }
        let old_sub = Mapping::sub_of(cluster, entry, bitmap, sub)?;
        let (host, mut new_bitmap, replaced) = match cluster {
            Mapping::Normal { host, copied: true } => {
                self.check_in_place(host)?;
                (host, bitmap, false)
            }
            Mapping::Normal { host: old, .. } => {
                // Shared with a snapshot: the cluster is copied whole (its allocated subclusters
                // are what matters), keeping the bitmap.
                let new = self.alloc_data(cluster_start, 1)?;
                let mut whole = vec![0u8; self.cluster_size as usize];
                self.read_host(&mut whole, old)?;
                self.write_host(&whole, new)?;
                (new, bitmap, true)
            }
            Mapping::Compressed { .. } => {
                let new = self.alloc_data(cluster_start, 1)?;
                let mut whole = vec![0u8; self.cluster_size as usize];
                self.read_unmapped(cluster, cluster_start, &mut whole)?;
                self.write_host(&whole, new)?;
                (new, ALL_ALLOCATED, true)
            }
            _ => (self.alloc_data(cluster_start, 1)?, bitmap, false),
        };
        let at = host + (sub_start - cluster_start);
        if len as u64 == granule && data.is_some() {
            if let Some(data) = data {
                self.write_host(data, at)?;
            }
        } else {
            let mut scratch = std::mem::take(&mut self.scratch);
            if scratch.len() != granule as usize {
                scratch = AlignedBuf::new(granule as usize);
            }
            let buf = scratch.as_mut_slice();
            // The untouched part of the subcluster keeps what it read as before.
            let old = self.read_unmapped(old_sub, sub_start, buf);
            let range = (guest - sub_start) as usize..(guest - sub_start) as usize + len;
            match data {
                Some(data) => buf[range].copy_from_slice(data),
                None => buf[range].fill(0),
            }
            let written = old.and_then(|()| self.write_host(buf, at));
            self.scratch = scratch;
            written?;
        }
        new_bitmap |= 1 << sub;
        new_bitmap &= !(1 << (32 + sub));
        // Ordering: the bitmap and entry publishing the data sit in the cached L2 table, written
        // only after the refcount barrier that also makes this data durable.
        self.set_l2_pair(l2_offset, index, host | COPIED, new_bitmap)?;
        if replaced {
            self.release(cluster);
        }
        Ok(())
    }

    /// `write_zeroes` with extended L2 entries: whole clusters and whole subclusters become
    /// zero in the bitmap, partial subclusters get zeros written.
    pub(crate) fn write_zeroes_ext(
        &mut self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<()> {
        let granule = self.granule();
        let end = offset + len;
        let mut guest = offset;
        while guest < end {
            let in_cluster = guest & (self.cluster_size - 1);
            let cluster_end = (guest - in_cluster + self.cluster_size).min(end);
            if in_cluster == 0 && cluster_end - guest == self.cluster_size {
                self.zero_cluster_ext(guest, may_unmap)?;
                guest = cluster_end;
                continue;
            }
            // Whole subclusters of this cluster in the range, then the partial ones.
            let first = guest.div_ceil(granule) * granule;
            let last = cluster_end / granule * granule;
            if first < last {
                self.zero_subclusters(first, last)?;
            }
            for (start, stop) in [
                (guest, first.min(cluster_end)),
                (last.max(first), cluster_end),
            ] {
                if start < stop {
                    self.zero_partial_subcluster(start, stop)?;
                }
            }
            guest = cluster_end;
        }
        Ok(())
    }

    /// Zeroes `[start, stop)`, part of one subcluster. Like QEMU: if the subcluster is
    /// unallocated or zero and the rest of it reads as zeros, the whole subcluster becomes zero
    /// in the bitmap; otherwise zeros are written as data.
    fn zero_partial_subcluster(&mut self, start: u64, stop: u64) -> Result<()> {
        let granule = self.granule();
        let sub_start = start / granule * granule;
        let sub_end = sub_start + granule;
        let metadata_only = match self.mapping(start)? {
            Mapping::ZeroPlain | Mapping::ZeroAlloc { .. } => true,
            Mapping::Unallocated => {
                self.backing_reads_zero(sub_start, start)?
                    && self.backing_reads_zero(stop, sub_end)?
            }
            _ => false,
        };
        if metadata_only {
            self.zero_subclusters(sub_start, sub_end)
        } else {
            self.write_sub(start, None, (stop - start) as usize)
        }
    }

    /// Whether `[start, end)` reads as zeros from the backing chain, judged by block status
    /// (QEMU's `is_zero`, which reads no data).
    fn backing_reads_zero(&mut self, start: u64, end: u64) -> Result<bool> {
        let Some(backing) = self.backing.as_deref_mut() else {
            return Ok(true);
        };
        let end = end.min(backing.size());
        let mut at = start;
        while at < end {
            let extent = backing.status(at, end - at, usize::MAX)?;
            if extent.allocation == crate::status::Allocation::Data {
                return Ok(false);
            }
            at += extent.len;
        }
        Ok(true)
    }

    /// Makes a whole cluster read as zeros: every subcluster zero; the host cluster is let go
    /// if `may_unmap` (or it was compressed).
    fn zero_cluster_ext(&mut self, guest: u64, may_unmap: bool) -> Result<()> {
        // Ordering: a raw data file reads as zeros before the entry says the cluster does.
        self.zero_raw_data(guest, self.cluster_size, may_unmap)?;
        let (l2_offset, index) = self.l2_for_write(guest)?;
        let (entry, _) = self.l2_pair(l2_offset, index);
        let mut cluster = self.decode(entry)?;
        if self.header.has_data_file() {
            cluster = self.check_data_file_mapping(cluster, entry, guest)?;
        }
        let unmap = match cluster {
            Mapping::Compressed { .. } => true,
            Mapping::Normal { .. } => may_unmap,
            _ => false,
        };
        let new_entry = if unmap { 0 } else { entry };
        self.set_l2_pair(l2_offset, index, new_entry, ALL_ZEROES)?;
        if unmap {
            self.unmap_cluster(cluster)?;
        }
        Ok(())
    }

    /// Makes the whole subclusters of `[start, end)` (inside one cluster) read as zeros.
    fn zero_subclusters(&mut self, start: u64, end: u64) -> Result<()> {
        let granule = self.granule();
        self.zero_raw_data(start, end - start, false)?;
        let (l2_offset, index) = self.l2_for_write(start)?;
        let (entry, bitmap) = self.l2_pair(l2_offset, index);
        if let Mapping::Compressed { .. } = self.decode(entry)? {
            // A compressed cluster has no subclusters: it becomes a normal one first.
            let mut at = start;
            while at < end {
                self.write_sub(at, None, granule as usize)?;
                at += granule;
            }
            return Ok(());
        }
        let first = self.subcluster(start);
        let last = first + ((end - start) / granule) as u32;
        debug_assert!(last <= SUBCLUSTERS);
        let bits = sub_range(first, last);
        let new_bitmap = (bitmap | bits << 32) & !bits;
        self.set_l2_pair(l2_offset, index, entry, new_bitmap)
    }

    /// `discard` of one whole cluster with extended L2 entries: it reads as zeros and its host
    /// cluster is let go (QEMU's `discard_in_l2_slice`).
    pub(crate) fn discard_cluster_ext(&mut self, guest: u64) -> Result<()> {
        let l2_offset = self.l2_offset_of(self.l1_index(guest))?;
        if l2_offset == 0 && self.backing.is_none() {
            return Ok(());
        }
        let (l2_offset, index) = self.l2_for_write(guest)?;
        let (entry, bitmap) = self.l2_pair(l2_offset, index);
        let mut cluster = self.decode(entry)?;
        if self.header.has_data_file() {
            cluster = self.check_data_file_mapping(cluster, entry, guest)?;
        }
        let allocated = !matches!(cluster, Mapping::Unallocated);
        if (!allocated && self.backing.is_none()) || (entry, bitmap) == (0, ALL_ZEROES) {
            return Ok(());
        }
        self.set_l2_pair(l2_offset, index, 0, ALL_ZEROES)?;
        self.unmap_cluster(cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subcluster_ranges() {
        assert_eq!(sub_range(0, 1), 1);
        assert_eq!(sub_range(2, 5), 0b11100);
        assert_eq!(sub_range(0, 32), ALL_ALLOCATED);
    }
}
