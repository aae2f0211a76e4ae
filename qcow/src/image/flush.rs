//! Flushing: cached metadata reaches the disk in the order that keeps a crashed image consistent
//! (refcounts, then L2 tables, then the L1 table, then refcount decrements).

use byteorder::{BigEndian, ByteOrder};

use super::Image;
use crate::error::{Error, Result};
use crate::header::INCOMPAT_DIRTY;
use crate::raw::Storage;
use crate::refcount::Refcounts;

impl<S: Storage> Image<S> {
    /// Writes dirty refcount blocks, extends the file over every allocated cluster and flushes.
    pub(crate) fn refcount_barrier(&mut self) -> Result<()> {
        flush_data(self.data.as_mut(), &mut self.data_dirty)?;
        refcount_barrier(
            &mut self.file,
            &mut self.refcounts,
            self.alloc_end,
            &mut self.known_len,
        )
    }

    pub(crate) fn set_incompatible(&mut self, bits: u64) -> Result<()> {
        self.header.incompatible_features = bits;
        let mut field = [0u8; 8];
        BigEndian::write_u64(&mut field, bits);
        // Ordering: everything the bit change vouches for is flushed first, the bit itself after.
        self.file.flush().map_err(Error::Flush)?;
        self.file.write_at(&field, 72).map_err(Error::WriteHeader)?;
        self.file.flush().map_err(Error::Flush)
    }

    /// Before a multi-step metadata change whose intermediate states are not all consistent
    /// (snapshot create/apply/delete raise refcounts and clear OFLAG_COPIED in separate tables):
    /// sets the dirty bit, so that a crash in the middle leaves an image every reader repairs on
    /// its next read-write open (QEMU's lazy-refcounts mechanism). v2 has no dirty bit.
    pub(crate) fn begin_unsafe_update(&mut self) -> Result<bool> {
        self.flush()?;
        let bits = self.header.incompatible_features;
        if self.header.version < 3 || bits & INCOMPAT_DIRTY != 0 {
            return Ok(false);
        }
        self.set_incompatible(bits | INCOMPAT_DIRTY)?;
        Ok(true)
    }

    /// Ends what [`Image::begin_unsafe_update`] began: everything is flushed, then the dirty bit
    /// is cleared.
    pub(crate) fn end_unsafe_update(&mut self, began: bool) -> Result<()> {
        self.flush()?;
        if began {
            let bits = self.header.incompatible_features;
            self.set_incompatible(bits & !INCOMPAT_DIRTY)?;
        }
        Ok(())
    }

    /// Writes all cached metadata in the safe order and makes everything durable.
    pub fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Ordering, step 1: refcount increments and guest data (in the image file or the data
        // file) become durable before any L2 entry that relies on them.
        self.refcount_barrier()?;
        // Step 2: L2 tables become durable before L1 entries that point at new tables.
        if self.l2_cache.has_dirty() {
            let file = &mut self.file;
            self.l2_cache
                .flush_dirty(|offset, table| write_l2(file, offset, table))?;
            self.file.flush().map_err(Error::Flush)?;
        }
        // Step 3: the L1 table.
        if let Some((lo, hi)) = self.l1_dirty.take() {
            let mut raw = vec![0u8; (hi - lo) * 8];
            for (i, entry) in self.l1[lo..hi].iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *entry);
            }
            let at = self.header.l1_table_offset + lo as u64 * 8;
            self.file.write_at(&raw, at).map_err(Error::WriteL1Table)?;
            self.file.flush().map_err(Error::Flush)?;
        }
        // Step 4: only now that no durable table references them, drop the released refcounts.
        if !self.pending_frees.is_empty() {
            // A freed cluster may be the one compressed data was being packed into.
            self.compress_next = None;
            let frees = std::mem::take(&mut self.pending_frees);
            for (offset, len) in frees {
                self.refcounts
                    .update_range(&mut self.file, offset, len, -1)?;
            }
            self.refcounts.write_dirty(&mut self.file)?;
            self.file.flush().map_err(Error::Flush)?;
        }
        Ok(())
    }
}

/// Makes the guest data written to an external data file durable (the image file's own data is
/// flushed by [`refcount_barrier`]).
pub(crate) fn flush_data<S: Storage>(data: Option<&mut S>, dirty: &mut bool) -> Result<()> {
    if let (Some(data), true) = (data, *dirty) {
        data.flush().map_err(Error::Flush)?;
        *dirty = false;
    }
    Ok(())
}

/// Writes dirty refcount blocks, extends the file over every allocated cluster and flushes.
pub(crate) fn refcount_barrier<S: Storage + ?Sized>(
    file: &mut S,
    refcounts: &mut Refcounts,
    alloc_end: u64,
    known_len: &mut u64,
) -> Result<()> {
    refcounts.write_dirty(file)?;
    if alloc_end > *known_len {
        let len = file.len().map_err(Error::SetLen)?;
        if len < alloc_end {
            file.set_len(alloc_end).map_err(Error::SetLen)?;
        }
        *known_len = len.max(alloc_end);
    }
    file.flush().map_err(Error::Flush)
}

pub(crate) fn write_l2<S: Storage + ?Sized>(
    file: &mut S,
    offset: u64,
    table: &[u64],
) -> Result<()> {
    let mut raw = vec![0u8; table.len() * 8];
    for (i, entry) in table.iter().enumerate() {
        BigEndian::write_u64(&mut raw[i * 8..], *entry);
    }
    file.write_at(&raw, offset)
        .map_err(|source| Error::WriteL2Table { offset, source })
}
