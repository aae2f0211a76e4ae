//! The external data file (incompatible bit 2): guest clusters live in a second file, each at its
//! own guest offset and without refcounts, while the image file holds only metadata. With the raw
//! bit (autoclear bit 1) the data file must also stay a valid raw image of the disk, so zeroing
//! and discarding reach it too — QEMU's rules from `block/qcow2-cluster.c`.

use std::path::Path;

use super::Image;
use crate::error::{Corruption, Error, Result};
use crate::l2::{Mapping, COPIED};
use crate::raw::Storage;

impl<S: Storage> Image<S> {
    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.header.has_data_file()
    }

    /// The name the external data file was opened by (`None` without one, or when the image was
    /// opened without it).
    pub fn data_file_path(&self) -> Option<&Path> {
        self.data_path.as_deref()
    }

    /// The file guest clusters are read from and written to: the data file, or the image itself.
    pub(crate) fn data_storage(&mut self) -> Result<&mut S> {
        if !self.header.has_data_file() {
            return Ok(&mut self.file);
        }
        self.data.as_mut().ok_or(Error::DataFileNotOpen)
    }

    /// Length of the file guest clusters live in.
    pub(crate) fn data_len(&mut self) -> Result<u64> {
        self.data_storage()?.len().map_err(Error::SetLen)
    }

    /// Host offset of `count` new data clusters for the guest clusters from `guest` (cluster
    /// aligned): a data file maps every cluster at its guest offset and needs no allocation;
    /// otherwise they come from the refcounted allocator.
    pub(crate) fn alloc_data(&mut self, guest: u64, count: u64) -> Result<u64> {
        if self.header.has_data_file() {
            return Ok(guest & !(self.cluster_size - 1));
        }
        if count == 1 {
            self.alloc_cluster()
        } else {
            self.alloc_clusters(count)
        }
    }

    /// QEMU's reading of an L2 entry with a data file: offset 0 with OFLAG_COPIED is a data
    /// cluster at offset 0 (not an unallocated one), since every data cluster has refcount 1.
    pub(crate) fn data_file_cluster(&self, entry: u64, mapping: Mapping) -> Mapping {
        if mapping == Mapping::Unallocated && entry & COPIED != 0 && self.header.has_data_file() {
            return Mapping::Normal {
                host: 0,
                copied: true,
            };
        }
        mapping
    }

    /// Refuses what QEMU refuses in a data file image: compressed clusters, and data clusters
    /// anywhere but at their guest offset.
    pub(crate) fn check_data_file_mapping(
        &self,
        mapping: Mapping,
        entry: u64,
        guest: u64,
    ) -> Result<Mapping> {
        let cluster = guest & !(self.cluster_size - 1);
        match mapping {
            Mapping::Compressed { .. } => Err(Corruption::CompressedWithDataFile { entry }.into()),
            Mapping::Normal { host, .. } | Mapping::ZeroAlloc { host } if host != cluster => {
                Err(Corruption::DataFileOffsetMismatch {
                    host,
                    guest: cluster,
                }
                .into())
            }
            other => Ok(other),
        }
    }

    /// The guest range of `mapping` was unmapped (discard, zeroing with unmap): like QEMU, the
    /// discard is passed on to the data file. Its clusters hold no references, so nothing waits
    /// for a flush, and the range is nobody else's to lose: a crash before the L2 entry changes
    /// leaves a cluster that reads as zeros, which is what was asked for.
    pub(crate) fn discard_data(&mut self, mapping: Mapping) -> Result<()> {
        let (Mapping::Normal { host, .. } | Mapping::ZeroAlloc { host }) = mapping else {
            return Ok(());
        };
        self.clear_data(host, self.cluster_size, true)
    }

    /// With the raw bit, makes `[guest, guest + len)` of the data file read as zeros before the
    /// L2 entries say so (QEMU's `qcow2_subcluster_zeroize`); a no-op otherwise.
    pub(crate) fn zero_raw_data(&mut self, guest: u64, len: u64, unmap: bool) -> Result<()> {
        if !self.header.data_file_raw() || !self.header.has_data_file() {
            return Ok(());
        }
        self.clear_data(guest, len, unmap)
    }

    /// Makes the part of `[offset, offset + len)` inside the data file read as zeros: a hole
    /// punched (`unmap`) or zeros written in place.
    fn clear_data(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let data_len = self.data_len()?;
        let len = len.min(data_len.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        let storage = self.data_storage()?;
        let result = if unmap {
            storage.discard(offset, len)
        } else {
            storage.write_zeroes(offset, len)
        };
        result.map_err(|source| Error::WriteData { offset, source })?;
        self.data_dirty = true;
        Ok(())
    }

    /// Maps every guest cluster overlapping `[from, to)` at its own offset of the data file (what
    /// QEMU's metadata preallocation does for a raw data file); zero flags are dropped, since
    /// a raw data file reads as the disk does.
    pub(crate) fn map_data_file(&mut self, from: u64, to: u64) -> Result<()> {
        let mut guest = from & !(self.cluster_size - 1);
        while guest < to {
            let (l2_offset, index) = self.l2_for_write(guest)?;
            self.set_l2_entry(l2_offset, index, guest | COPIED)?;
            guest += self.cluster_size;
        }
        Ok(())
    }

    /// Sets the data file's length with the virtual size (QEMU truncates it on resize).
    pub(crate) fn resize_data_file(&mut self, len: u64) -> Result<()> {
        if !self.header.has_data_file() {
            return Ok(());
        }
        self.data_storage()?.set_len(len).map_err(Error::SetLen)?;
        self.data_dirty = true;
        Ok(())
    }
}
