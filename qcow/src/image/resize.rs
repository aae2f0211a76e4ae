//! Changing the virtual size: growing (a bigger L1 table when needed; a backing file that is
//! longer than the old size stays hidden behind zeros) and shrinking (clusters past the new end
//! are released and the file is cut after the last cluster still in use).

use byteorder::{BigEndian, ByteOrder};

use super::Image;
use crate::error::{Error, Result};
use crate::header::MAX_L1_BYTES;
use crate::l2::OFFSET_MASK;
use crate::raw::Storage;

/// Why a resize is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResizeError {
    #[error("The new size must be a multiple of 512")]
    Unaligned,
    #[error("Use the --shrink option to perform a shrink operation.")]
    ShrinkNotAllowed,
    #[error("The image size is too large for the cluster size (try using a larger cluster size)")]
    TooLarge,
}

impl<S: Storage> Image<S> {
    /// Sets the virtual size to `new_size` (a multiple of 512). Shrinking needs `shrink`.
    pub fn resize(&mut self, new_size: u64, shrink: bool) -> Result<()> {
        self.check_writable()?;
        let old_size = self.header.size;
        if new_size < old_size && !shrink {
            return Err(Error::Resize(ResizeError::ShrinkNotAllowed));
        }
        if new_size % 512 != 0 {
            return Err(Error::Resize(ResizeError::Unaligned));
        }
        let needed = self.header.l1_entries_needed(new_size);
        if needed * 8 > MAX_L1_BYTES {
            return Err(Error::Resize(ResizeError::TooLarge));
        }
        self.flush()?;
        if new_size >= old_size {
            self.grow(old_size, new_size, needed as usize)
        } else {
            self.shrink(new_size, needed as usize)
        }
    }

    fn grow(&mut self, old_size: u64, new_size: u64, needed: usize) -> Result<()> {
        // Ordering: the data file is long enough before the header says the disk is.
        let raw = self.header.data_file_raw();
        let data_len = if raw {
            new_size.div_ceil(self.cluster_size) * self.cluster_size
        } else {
            new_size
        };
        self.resize_data_file(data_len)?;
        if needed > self.l1.len() {
            let mut l1 = self.l1.clone();
            l1.resize(needed, 0);
            self.replace_l1(l1, new_size)?;
            self.flush()?;
        } else {
            self.write_size(new_size)?;
        }
        if raw {
            // A raw data file stays the disk's raw image: like QEMU, the new area is mapped
            // (metadata preallocation) onto the data file's new, zero-reading end.
            self.map_data_file(old_size, new_size)?;
            self.flush()?;
        }
        // A backing file longer than the old disk must not show through the new area (what the
        // disk held there is gone): make it read as zeros, as QEMU does.
        let backing_size = self.backing.as_ref().map_or(0, |b| b.size());
        if backing_size > old_size {
            let end = backing_size.min(new_size);
            self.write_zeroes(old_size, end - old_size)?;
            self.flush()?;
        }
        Ok(())
    }

    fn shrink(&mut self, new_size: u64, needed: usize) -> Result<()> {
        // Whole clusters past the new end are released; the L2 tables past it too.
        let cluster_size = self.cluster_size;
        let first_dropped = new_size.div_ceil(cluster_size) * cluster_size;
        let table_span = cluster_size << self.l2_bits;
        let mut guest = first_dropped;
        while guest < self.header.size {
            let next = ((guest / table_span) + 1) * table_span;
            if self.l2_offset_of(self.l1_index(guest))? != 0 {
                let end = next.min(self.header.size);
                let mut at = guest;
                while at < end {
                    self.replace_entry(at, 0)?;
                    at += cluster_size;
                }
            }
            guest = next;
        }
        // Like QEMU, the L1 table keeps its place and size: the entries past the new end are
        // cleared in place.
        let mut dropped_tables = Vec::new();
        for index in needed..self.l1.len() {
            let entry = self.l1[index];
            if entry & OFFSET_MASK != 0 {
                dropped_tables.push(entry & OFFSET_MASK);
                self.set_l1(index, 0);
            }
        }
        // Ordering: the emptied L2 tables and the cleared L1 entries are written before the
        // tables' clusters are freed (the next flush), and the header shrinks last.
        self.flush()?;
        for table in dropped_tables {
            self.l2_cache.remove(table);
            self.pending_frees.push((table, cluster_size));
        }
        self.flush()?;
        self.truncate_unused()?;
        self.write_size(new_size)?;
        // Like QEMU, the data file is cut to the new size exactly.
        self.resize_data_file(new_size)?;
        self.flush()
    }

    /// Writes the virtual size field alone.
    fn write_size(&mut self, size: u64) -> Result<()> {
        let mut field = [0u8; 8];
        BigEndian::write_u64(&mut field, size);
        self.file.write_at(&field, 24).map_err(Error::WriteHeader)?;
        self.file.flush().map_err(Error::Flush)?;
        self.header.size = size;
        Ok(())
    }

    /// Cuts the file after the last cluster with a non-zero refcount (as QEMU does after a
    /// shrink).
    fn truncate_unused(&mut self) -> Result<()> {
        let file_len = self.file.len().map_err(Error::SetLen)?;
        let mut cluster = file_len.div_ceil(self.cluster_size);
        while cluster > 0 && self.refcounts.get(&mut self.file, cluster - 1)? == 0 {
            cluster -= 1;
        }
        let end = cluster * self.cluster_size;
        if end < file_len {
            self.file.set_len(end).map_err(Error::SetLen)?;
            self.known_len = end;
            self.alloc_end = self.alloc_end.min(end);
        }
        Ok(())
    }
}
