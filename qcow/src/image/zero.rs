//! Zeroing, discarding and preallocating clusters through L2 entries, and QEMU's
//! metadata-preallocation heuristic.

use super::Image;
use crate::error::{Error, Result};
use crate::l2::{Mapping, COPIED, ZERO};
use crate::raw::Storage;

impl<S: Storage> Image<S> {
    /// Makes `[offset, offset + len)` read as zeros, deallocating whole clusters where possible.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes_with(offset, len, true)
    }

    /// Like [`Image::write_zeroes`]; with `may_unmap` false (qemu-io's `write -z` without `-u`),
    /// whole clusters that are allocated and unshared keep their host cluster and only gain the
    /// zero flag, as QEMU does.
    pub fn write_zeroes_with(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len as usize)?;
        if self.header.extended_l2() {
            self.write_zeroes_ext(offset, len, may_unmap)?;
            return self.bound_pending();
        }
        let mut guest = offset;
        let end = offset + len;
        while guest < end {
            let in_cluster = guest & (self.cluster_size - 1);
            let n = (self.cluster_size - in_cluster).min(end - guest);
            if n == self.cluster_size && self.zero_whole_cluster(guest, may_unmap)? {
                // done by metadata
            } else {
                let mapping = self.mapping(guest)?;
                let already_zero = match mapping {
                    Mapping::ZeroPlain | Mapping::ZeroAlloc { .. } => true,
                    Mapping::Unallocated => self
                        .backing
                        .as_ref()
                        .is_none_or(|b| b.size() <= guest - in_cluster),
                    _ => false,
                };
                if !already_zero {
                    self.write_cluster(guest, None, n as usize)?;
                }
            }
            guest += n;
        }
        self.bound_pending()
    }

    /// Turns a whole guest cluster into zeros via its L2 entry; false if the format can't (v2 with a
    /// backing file).
    fn zero_whole_cluster(&mut self, guest: u64, may_unmap: bool) -> Result<bool> {
        // Ordering: a raw data file reads as zeros before the entry says the cluster does.
        self.zero_raw_data(guest, self.cluster_size, may_unmap)?;
        if !may_unmap && self.header.version >= 3 {
            if let Mapping::Normal { host, copied: true } = self.mapping(guest)? {
                let (l2_offset, index) = self.l2_for_write(guest)?;
                self.set_l2_entry(l2_offset, index, host | COPIED | ZERO)?;
                return Ok(true);
            }
        }
        let new_entry = if self.header.version >= 3 {
            ZERO
        } else if self.backing.is_none() {
            0
        } else {
            return Ok(false);
        };
        self.replace_entry(guest, new_entry)?;
        Ok(true)
    }

    /// Sets the L2 entry of the cluster containing `guest`, releasing what the old one referenced.
    pub(crate) fn replace_entry(&mut self, guest: u64, new_entry: u64) -> Result<()> {
        let l1_index = self.l1_index(guest);
        if new_entry == 0 && self.l2_offset_of(l1_index)? == 0 {
            return Ok(());
        }
        let (l2_offset, index) = self.l2_for_write(guest)?;
        let (old_entry, old_bitmap) = if self.header.extended_l2() {
            self.l2_pair(l2_offset, index)
        } else {
            (self.l2_entry(l2_offset, index), 0)
        };
        if (old_entry, old_bitmap) == (new_entry, 0) {
            return Ok(());
        }
        let mut mapping = self.decode(old_entry)?;
        if self.header.has_data_file() {
            mapping = self.check_data_file_mapping(mapping, old_entry, guest)?;
        }
        if self.header.extended_l2() {
            self.set_l2_pair(l2_offset, index, new_entry, 0)?;
        } else {
            self.set_l2_entry(l2_offset, index, new_entry)?;
        }
        self.unmap_cluster(mapping)
    }

    /// The guest cluster that `mapping` described was unmapped (discarded, or zeroed with
    /// unmap): its host cluster is released, or in a data file, the discard passed on to it.
    pub(crate) fn unmap_cluster(&mut self, mapping: Mapping) -> Result<()> {
        if self.header.has_data_file() {
            return self.discard_data(mapping);
        }
        self.release(mapping);
        Ok(())
    }

    /// Discards whole clusters in the range (QEMU semantics: they read as zeros afterwards on v3, or
    /// from the backing file on v2); partial clusters are left alone.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len as usize)?;
        let end = offset + len;
        let mut guest = offset.div_ceil(self.cluster_size) * self.cluster_size;
        while guest < end {
            let cluster_end = (guest + self.cluster_size).min(self.header.size);
            if cluster_end > end {
                break;
            }
            if self.header.extended_l2() {
                self.discard_cluster_ext(guest)?;
                guest += self.cluster_size;
                continue;
            }
            let mapping = self.mapping(guest)?;
            let new_entry = match mapping {
                Mapping::Unallocated if self.backing.is_none() => None,
                Mapping::ZeroPlain => None,
                _ if self.header.version >= 3 => Some(ZERO),
                _ => Some(0),
            };
            if let Some(new_entry) = new_entry {
                self.replace_entry(guest, new_entry)?;
            }
            guest += self.cluster_size;
        }
        self.bound_pending()
    }

    /// QEMU's heuristic for "this image was preallocated with metadata": the file occupies clearly
    /// fewer clusters on the host than the refcounts claim. Only then does `qemu-img map` look
    /// through data clusters at the file's holes, so `map` does the same.
    pub fn metadata_preallocated(&mut self) -> Result<bool> {
        if let Some(known) = self.metadata_preallocated {
            return Ok(known);
        }
        let file_len = self.file.len().map_err(Error::ReadHeader)?;
        let Some(real_allocation) = self.file.allocated_size() else {
            return Ok(false);
        };
        let real_clusters = real_allocation / self.cluster_size;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = file_len.div_ceil(self.cluster_size);
        let mut used = 0;
        let mut cluster = 0;
        while cluster < end_cluster && used < threshold {
            used += u64::from(self.refcounts.get(&mut self.file, cluster)? != 0);
            cluster += 1;
        }
        let preallocated = used >= threshold;
        self.metadata_preallocated = Some(preallocated);
        Ok(preallocated)
    }

    /// Preallocates every cluster (`preallocation=metadata`): L2 tables and data clusters whose
    /// content is the file's holes (zeros).
    pub fn preallocate_metadata(&mut self) -> Result<()> {
        self.check_writable()?;
        let mut guest = 0;
        while guest < self.header.size {
            let (l2_offset, index) = self.l2_for_write(guest)?;
            let entry = self.l2_entry(l2_offset, index);
            if entry == 0 {
                let host = self.alloc_data(guest, 1)?;
                self.set_l2_entry(l2_offset, index, host | COPIED)?;
            }
            guest += self.cluster_size;
        }
        self.flush()
    }
}
