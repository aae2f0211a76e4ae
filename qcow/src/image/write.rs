//! Writing: in-place writes to clusters the image owns alone, and allocation with copy-on-write
//! for unallocated, zero, compressed and shared clusters.

use super::Image;
use crate::error::{Corruption, Error, Result};
use crate::l2::{Mapping, COPIED};
use crate::raw::{AlignedBuf, Storage};

/// Deferred frees beyond which a write forces a flush (bounds memory).
const MAX_PENDING_FREES: usize = 4096;
/// Most clusters allocated and written together by one write.
const MAX_FRESH_RUN: u64 = 512;

impl<S: Storage> Image<S> {
    /// Writes guest data at host offset `host` (of the data file, if the image has one).
    pub(crate) fn write_host(&mut self, buf: &[u8], host: u64) -> Result<()> {
        self.data_storage()?
            .write_at(buf, host)
            .map_err(|source| Error::WriteData {
                offset: host,
                source,
            })?;
        if self.data.is_some() {
            self.data_dirty = true;
        }
        Ok(())
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Writes `buf` at guest offset `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len())?;
        let mut done = 0usize;
        // Clusters that can be overwritten in place and lie back to back on the host are written
        // with one call: (host offset, buffer start, length).
        let mut run: Option<(u64, usize, usize)> = None;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_cluster = guest & (self.cluster_size - 1);
            let n = self.to_granule_end(guest).min(buf.len() - done);
            if let Mapping::Normal { host, copied: true } = self.mapping(guest)? {
                self.check_in_place(host)?;
                let host = host + in_cluster;
                run = match run {
                    Some((start, at, len)) if start + len as u64 == host => {
                        Some((start, at, len + n))
                    }
                    Some((start, at, len)) => {
                        self.write_host(&buf[at..at + len], start)?;
                        Some((host, done, n))
                    }
                    None => Some((host, done, n)),
                };
            } else {
                if let Some((start, at, len)) = run.take() {
                    self.write_host(&buf[at..at + len], start)?;
                }
                let fresh = self.fresh_clusters_ahead(guest, buf.len() - done)?;
                if fresh > 0 {
                    let len = (fresh * self.cluster_size) as usize;
                    self.write_fresh_clusters(guest, &buf[done..done + len])?;
                    done += len;
                    continue;
                }
                if self.header.extended_l2() {
                    self.write_sub(guest, Some(&buf[done..done + n]), n)?;
                } else {
                    self.write_cluster(guest, Some(&buf[done..done + n]), n)?;
                }
            }
            done += n;
        }
        if let Some((start, at, len)) = run {
            self.write_host(&buf[at..at + len], start)?;
        }
        self.bound_pending()
    }

    /// How many whole clusters from `guest` (cluster aligned, at most `len` bytes, inside one
    /// L2 table) hold nothing the write must keep: unallocated or zero without a host cluster.
    fn fresh_clusters_ahead(&mut self, guest: u64, len: usize) -> Result<u64> {
        if self.header.extended_l2() || guest % self.cluster_size != 0 {
            return Ok(0);
        }
        let table_span = self.cluster_size << self.l2_bits;
        // A contiguous run cannot cross into a refcount block's range that needs a new block
        // (the block lands inside it), so runs stay well below a block's coverage.
        let limit = (len as u64 / self.cluster_size)
            .min((table_span - guest % table_span) / self.cluster_size)
            .min(MAX_FRESH_RUN)
            .min((self.refcounts.entries_per_block() / 4).max(1));
        let mut count = 0;
        while count < limit {
            let at = guest + count * self.cluster_size;
            if !matches!(self.mapping(at)?, Mapping::Unallocated | Mapping::ZeroPlain) {
                break;
            }
            count += 1;
        }
        Ok(count)
    }

    /// Writes whole clusters that hold nothing to keep into contiguous new host clusters with
    /// one write.
    fn write_fresh_clusters(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        let count = data.len() as u64 / self.cluster_size;
        let (l2_offset, index) = self.l2_for_write(guest)?;
        let host = self.alloc_data(guest, count)?;
        self.write_host(data, host)?;
        // Ordering: like any new data, the entries sit in the cached L2 table, written only
        // after the refcount barrier that also makes this data durable.
        for i in 0..count {
            self.set_l2_entry(
                l2_offset,
                index + i as usize,
                (host + i * self.cluster_size) | COPIED,
            )?;
        }
        Ok(())
    }

    /// Refuses in-place writes to a data cluster that overlaps metadata or lies past the file
    /// (an external data file holds no metadata and may be shorter than the disk).
    pub(crate) fn check_in_place(&mut self, host: u64) -> Result<()> {
        if self.header.has_data_file() {
            return Ok(());
        }
        if self.refcounts.overlaps_protected(host) {
            return Err(Corruption::DataOverlapsMetadata { host }.into());
        }
        if host >= self.known_len {
            self.known_len = self.file.len().map_err(|source| Error::WriteData {
                offset: host,
                source,
            })?;
            if host >= self.known_len {
                return Err(Corruption::DataPastEnd { host }.into());
            }
        }
        Ok(())
    }

    pub(crate) fn bound_pending(&mut self) -> Result<()> {
        if self.pending_frees.len() > MAX_PENDING_FREES {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes the L2 table covering `guest` writable (allocating or copying it) and cached; returns
    /// its offset and the entry index.
    pub(crate) fn l2_for_write(&mut self, guest: u64) -> Result<(u64, usize)> {
        let l1_index = self.l1_index(guest);
        if l1_index >= self.l1.len() {
            return Err(Error::OutOfBounds {
                offset: guest,
                len: 0,
                size: self.header.size,
            });
        }
        let entry = self.l1[l1_index];
        let old_offset = self.l2_offset_of(l1_index)?;
        let index = self.l2_index(guest);
        if old_offset != 0 && entry & COPIED != 0 {
            self.load_l2(old_offset)?;
            return Ok((old_offset, index));
        }
        let table = if old_offset == 0 {
            vec![0u64; (self.cluster_size / 8) as usize]
        } else {
            // Shared with a snapshot: copy it (its clusters stay shared, so entries keep COPIED clear).
            self.load_l2(old_offset)?;
            let table = self.l2_cache.get(old_offset).cloned().unwrap_or_default();
            self.l2_cache.remove(old_offset);
            self.pending_frees.push((old_offset, self.cluster_size));
            table
        };
        let new_offset = self.alloc_cluster()?;
        // Ordering: the new table is only written back after the refcount barrier (eviction or
        // flush), and the L1 entry below only reaches the disk after the table did (flush step 3).
        self.insert_l2(new_offset, table, true)?;
        self.set_l1(l1_index, new_offset | COPIED);
        Ok((new_offset, index))
    }

    pub(crate) fn set_l1(&mut self, index: usize, value: u64) {
        self.l1[index] = value;
        self.l1_dirty = Some(match self.l1_dirty {
            Some((lo, hi)) => (lo.min(index), hi.max(index + 1)),
            None => (index, index + 1),
        });
    }

    pub(crate) fn alloc_cluster(&mut self) -> Result<u64> {
        self.metadata_preallocated = None;
        let offset = self.refcounts.alloc(&mut self.file, 1)?;
        self.alloc_end = self.alloc_end.max(offset + self.cluster_size);
        Ok(offset)
    }

    pub(crate) fn set_l2_entry(&mut self, l2_offset: u64, index: usize, value: u64) -> Result<()> {
        let stride = self.l2_stride();
        match self.l2_cache.get_mut(l2_offset) {
            Some(table) => {
                table[index * stride] = value;
                Ok(())
            }
            None => Err(Corruption::L2TableNotCached { offset: l2_offset }.into()),
        }
    }

    /// Writes `len` bytes inside one guest cluster: `data`, or zeros when `None`.
    pub(crate) fn write_cluster(
        &mut self,
        guest: u64,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<()> {
        let in_cluster = guest & (self.cluster_size - 1);
        let cluster_start = guest - in_cluster;
        let (l2_offset, index) = self.l2_for_write(guest)?;
        let entry = self.l2_entry(l2_offset, index);
        let mapping = self.decode(entry)?;
        if self.header.has_data_file() {
            self.check_data_file_mapping(mapping, entry, guest)?;
        }
        if let Mapping::Normal { host, copied: true } = mapping {
            self.check_in_place(host)?;
            let at = host + in_cluster;
            return match data {
                Some(data) => self.write_host(data, at),
                None => self.write_host(&vec![0u8; len], at),
            };
        }
        // A preallocated zero cluster that is ours alone is reused in place (filled with zeros
        // around the new data); anything else gets a new cluster.
        let reuse = match mapping {
            Mapping::ZeroAlloc { host } if self.header.has_data_file() => Some(host),
            Mapping::ZeroAlloc { host }
                if entry & COPIED != 0
                    && host < self.known_len
                    && !self.refcounts.overlaps_protected(host) =>
            {
                Some(host)
            }
            _ => None,
        };
        let new_host = match reuse {
            Some(host) => host,
            None => self.alloc_data(cluster_start, 1)?,
        };
        // Every write extends the file, so a cluster starting at or past its end has never been
        // written and reads as zeros (a freed and reused cluster is always below the end; a data
        // file cluster past its end was never written either).
        let fresh = reuse.is_none() && new_host >= self.data_len()?;
        let old_reads_zero = match mapping {
            Mapping::ZeroPlain | Mapping::ZeroAlloc { .. } => true,
            Mapping::Unallocated => self
                .backing
                .as_ref()
                .is_none_or(|b| b.size() <= cluster_start),
            _ => false,
        };
        if len as u64 == self.cluster_size && data.is_some() {
            if let Some(data) = data {
                self.write_host(data, new_host)?;
            }
        } else if old_reads_zero && fresh {
            // The new cluster reads as zeros already: write only the new bytes.
            if let Some(data) = data {
                self.write_host(data, new_host + in_cluster)?;
            }
        } else {
            let mut scratch = std::mem::take(&mut self.scratch);
            if scratch.len() != self.cluster_size as usize {
                scratch = AlignedBuf::new(self.cluster_size as usize);
            }
            let buf = scratch.as_mut_slice();
            let read = if old_reads_zero {
                buf.fill(0);
                Ok(())
            } else {
                self.read_unmapped(mapping, cluster_start, buf)
            };
            let range = in_cluster as usize..in_cluster as usize + len;
            match data {
                Some(data) => buf[range].copy_from_slice(data),
                None => buf[range].fill(0),
            }
            let result = read.and_then(|()| self.write_host(buf, new_host));
            self.scratch = scratch;
            result?;
        }
        // Ordering: the entry publishing the new cluster sits in the cached L2 table, which is only
        // written after the refcount barrier that also makes this data durable.
        self.set_l2_entry(l2_offset, index, new_host | COPIED)?;
        if reuse.is_none() {
            self.release(mapping);
        }
        Ok(())
    }

    /// Queues the reference `mapping` held for release after the next metadata flush. Data file
    /// clusters hold no reference (and a replaced one is the same cluster): nothing to release.
    pub(crate) fn release(&mut self, mapping: Mapping) {
        if self.header.has_data_file() {
            return;
        }
        if let Some(range) = mapping.host_range(self.cluster_size) {
            self.pending_frees.push(range);
        }
        if let (Mapping::Compressed { host, .. }, Some((cached, _))) = (mapping, &self.decompressed)
        {
            if *cached == host {
                self.decompressed = None;
            }
        }
    }
}
