//! Whole-tree metadata work shared by snapshots, resize and the image operations: counting an L1
//! tree's references up or down, recomputing OFLAG_COPIED, and replacing the active L1 table.

use byteorder::{BigEndian, ByteOrder};

use super::Image;
use crate::error::{Corruption, Error, Result};
use crate::header::check_table_offset;
use crate::l2::{Mapping, COPIED, L1_RESERVED_MASK, OFFSET_MASK, SUBCLUSTERS};
use crate::raw::Storage;

impl<S: Storage> Image<S> {
    /// Allocates `count` contiguous clusters and returns the offset of the first.
    pub(crate) fn alloc_clusters(&mut self, count: u64) -> Result<u64> {
        self.metadata_preallocated = None;
        let offset = self.refcounts.alloc(&mut self.file, count)?;
        self.alloc_end = self.alloc_end.max(offset + count * self.cluster_size);
        Ok(offset)
    }

    /// The host ranges the allocator must never hand out: header, refcount table, active L1,
    /// snapshot table.
    pub(crate) fn refresh_protected(&mut self) {
        let cluster_size = self.cluster_size;
        let mut protected = vec![
            (0, cluster_size),
            (
                self.refcounts.table_offset,
                u64::from(self.refcounts.table_clusters) * cluster_size,
            ),
        ];
        if !self.l1.is_empty() {
            protected.push((self.header.l1_table_offset, self.l1.len() as u64 * 8));
        }
        if self.snapshot_table_len > 0 {
            protected.push((self.header.snapshots_offset, self.snapshot_table_len));
        }
        self.refcounts.set_protected(protected);
    }

    /// Reads an L1 table that is not the active one (a snapshot's), after checking it lies in the
    /// file.
    pub(crate) fn read_l1_table(&mut self, offset: u64, entries: u32) -> Result<Vec<u64>> {
        if entries == 0 {
            return Ok(Vec::new());
        }
        let bytes = u64::from(entries) * 8;
        check_table_offset("snapshot L1 table", offset, bytes, self.cluster_size)?;
        let file_len = self.file.len().map_err(Error::ReadL1Table)?;
        if offset + bytes > file_len {
            return Err(Corruption::SnapshotL1PastEnd { offset }.into());
        }
        let mut raw = vec![0u8; bytes as usize];
        self.file
            .read_at(&mut raw, offset)
            .map_err(Error::ReadL1Table)?;
        Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
    }

    /// The entries of the L2 table at `offset` (through the cache).
    pub(crate) fn l2_table(&mut self, offset: u64) -> Result<Vec<u64>> {
        self.load_l2(offset)?;
        self.l2_cache
            .get(offset)
            .cloned()
            .ok_or_else(|| Corruption::L2TableNotCached { offset }.into())
    }

    fn valid_l2_offset(&self, l1_index: usize, entry: u64) -> Result<u64> {
        let offset = entry & OFFSET_MASK;
        if offset % self.cluster_size != 0 || entry & L1_RESERVED_MASK != 0 {
            return Err(Corruption::L2OffsetInvalid { l1_index, entry }.into());
        }
        Ok(offset)
    }

    /// Adds `delta` (±1) to the refcount of every cluster the L1 table `l1` references: its L2
    /// tables and, once per L1 entry that reaches them, their data clusters (QEMU counts a
    /// cluster once per snapshot that uses it).
    pub(crate) fn adjust_tree(&mut self, l1: &[u64], delta: i64) -> Result<()> {
        let mut ranges = Vec::new();
        self.walk_tree(l1, |host, len| ranges.push((host, len)))?;
        for (host, len) in ranges {
            self.refcounts
                .update_range(&mut self.file, host, len, delta)?;
        }
        Ok(())
    }

    /// Calls `visit(host, len)` for every host range the L1 table `l1` references: each L2
    /// table, and each data or compressed cluster once per L1 entry that reaches it (data
    /// clusters in an external data file have no refcounts and are left out).
    pub(crate) fn walk_tree(&mut self, l1: &[u64], mut visit: impl FnMut(u64, u64)) -> Result<()> {
        for (l1_index, &entry) in l1.iter().enumerate() {
            if entry & OFFSET_MASK == 0 {
                continue;
            }
            let l2_offset = self.valid_l2_offset(l1_index, entry)?;
            if self.header.has_data_file() {
                visit(l2_offset, self.cluster_size);
                continue;
            }
            let table = self.l2_table(l2_offset)?;
            for l2_entry in self.l2_words(&table) {
                if let Some((host, len)) = self.decode(l2_entry)?.host_range(self.cluster_size) {
                    visit(host, len);
                }
            }
            visit(l2_offset, self.cluster_size);
        }
        Ok(())
    }

    /// How many references every host cluster of the file has from the header, the active and
    /// snapshot L1 tables and their trees, and the snapshot table — everything but the refcount
    /// structure itself (what a new refcount structure must describe).
    pub(crate) fn count_references(&mut self) -> Result<Vec<u64>> {
        self.flush()?;
        let file_len = self.file.len().map_err(Error::ReadHeader)?;
        let cluster_size = self.cluster_size;
        let mut refs = vec![0u64; file_len.div_ceil(cluster_size) as usize];
        let mut ranges = vec![(0, cluster_size)];
        if !self.l1.is_empty() {
            ranges.push((self.header.l1_table_offset, self.l1.len() as u64 * 8));
        }
        if self.snapshot_table_len > 0 {
            ranges.push((self.header.snapshots_offset, self.snapshot_table_len));
        }
        let active = self.l1.clone();
        self.walk_tree(&active, |host, len| ranges.push((host, len)))?;
        for snapshot in self.snapshots.clone() {
            let l1 = self.read_l1_table(snapshot.l1_table_offset, snapshot.l1_size)?;
            if !l1.is_empty() {
                ranges.push((snapshot.l1_table_offset, l1.len() as u64 * 8));
            }
            self.walk_tree(&l1, |host, len| ranges.push((host, len)))?;
        }
        for (offset, len) in ranges {
            if len == 0 {
                continue;
            }
            let first = offset / cluster_size;
            let last = (offset + len - 1) / cluster_size;
            if last as usize >= refs.len() {
                return Err(Corruption::DataPastEnd { host: offset }.into());
            }
            for cluster in first..=last {
                refs[cluster as usize] += 1;
            }
        }
        Ok(refs)
    }

    /// 64-bit words per L2 entry: 2 with extended L2 entries (mapping + subcluster bitmap).
    pub(crate) fn l2_stride(&self) -> usize {
        if self.header.extended_l2() {
            2
        } else {
            1
        }
    }

    /// The mapping words of an L2 table (one per guest cluster).
    pub(crate) fn l2_words(&self, table: &[u64]) -> Vec<u64> {
        table.iter().step_by(self.l2_stride()).copied().collect()
    }

    /// Decodes one L2 mapping word at cluster level (for extended L2 entries, whether the cluster
    /// has a host cluster, not what its subclusters read as).
    pub(crate) fn decode(&self, entry: u64) -> Result<Mapping> {
        let mapping = Mapping::decode_cluster(entry, self.cluster_bits, self.header.extended_l2())?;
        if self.header.has_data_file() {
            return Ok(super::data_file::data_file_cluster(entry, mapping));
        }
        Ok(mapping)
    }

    /// The unit of allocation state: a subcluster with extended L2 entries, else a cluster.
    pub fn granule(&self) -> u64 {
        if self.header.extended_l2() {
            self.cluster_size / u64::from(SUBCLUSTERS)
        } else {
            self.cluster_size
        }
    }

    /// Bytes from `guest` to the end of its granule.
    pub(crate) fn to_granule_end(&self, guest: u64) -> usize {
        let granule = self.granule();
        (granule - guest % granule) as usize
    }

    /// Host offset of `guest` when it lies in an unallocated subcluster of an allocated cluster
    /// (extended L2 entries; QEMU reports it in `map`).
    pub fn unallocated_host(&mut self, guest: u64) -> Result<Option<u64>> {
        if !self.header.extended_l2() {
            return Ok(None);
        }
        let l2_offset = self.l2_offset_of(self.l1_index(guest))?;
        if l2_offset == 0 {
            return Ok(None);
        }
        self.load_l2(l2_offset)?;
        let (entry, _) = self.l2_pair(l2_offset, self.l2_index(guest));
        Ok(match self.decode(entry)? {
            Mapping::Normal { host, .. } => Some(host + (guest & (self.cluster_size - 1))),
            _ => None,
        })
    }

    /// Index of the subcluster containing `guest` in its cluster.
    pub(crate) fn subcluster(&self, guest: u64) -> u32 {
        ((guest & (self.cluster_size - 1)) / self.granule()) as u32
    }

    /// Mapping word and subcluster bitmap of entry `index` of the cached extended L2 table at
    /// `l2_offset`.
    pub(crate) fn l2_pair(&mut self, l2_offset: u64, index: usize) -> (u64, u64) {
        self.l2_cache
            .get(l2_offset)
            .map_or((0, 0), |table| (table[index * 2], table[index * 2 + 1]))
    }

    /// Sets both words of extended L2 entry `index` of the cached table at `l2_offset`.
    pub(crate) fn set_l2_pair(
        &mut self,
        l2_offset: u64,
        index: usize,
        entry: u64,
        bitmap: u64,
    ) -> Result<()> {
        match self.l2_cache.get_mut(l2_offset) {
            Some(table) => {
                table[index * 2] = entry;
                table[index * 2 + 1] = bitmap;
                Ok(())
            }
            None => Err(Corruption::L2TableNotCached { offset: l2_offset }.into()),
        }
    }

    /// Sets OFLAG_COPIED in the active L1 and L2 tables exactly where the refcount is 1 (as
    /// QEMU's `qcow2_update_snapshot_refcount` with addend 0 does). Changed tables are written by
    /// the next flush, after the refcounts they describe.
    pub(crate) fn update_copied_flags(&mut self) -> Result<()> {
        for l1_index in 0..self.l1.len() {
            let entry = self.l1[l1_index];
            if entry & OFFSET_MASK == 0 {
                continue;
            }
            let l2_offset = self.valid_l2_offset(l1_index, entry)?;
            let refcount = self
                .refcounts
                .get(&mut self.file, l2_offset >> self.cluster_bits)?;
            let wanted = if refcount == 1 {
                entry | COPIED
            } else {
                entry & !COPIED
            };
            if wanted != entry {
                self.set_l1(l1_index, wanted);
            }
            let table = self.l2_table(l2_offset)?;
            let mut changes = Vec::new();
            for (index, l2_entry) in self.l2_words(&table).into_iter().enumerate() {
                let wanted = match self.decode(l2_entry)? {
                    // Data file clusters have refcount 1 by definition.
                    Mapping::Normal { .. } | Mapping::ZeroAlloc { .. }
                        if self.header.has_data_file() =>
                    {
                        l2_entry | COPIED
                    }
                    Mapping::Normal { host, .. } | Mapping::ZeroAlloc { host } => {
                        let refcount = self
                            .refcounts
                            .get(&mut self.file, host >> self.cluster_bits)?;
                        if refcount == 1 {
                            l2_entry | COPIED
                        } else {
                            l2_entry & !COPIED
                        }
                    }
                    Mapping::Compressed { .. } => l2_entry & !COPIED,
                    _ => l2_entry,
                };
                if wanted != l2_entry {
                    changes.push((index, wanted));
                }
            }
            for (index, value) in changes {
                self.set_l2_entry(l2_offset, index, value)?;
            }
        }
        Ok(())
    }

    /// Replaces the active L1 table with `entries`, written to new clusters, and switches the
    /// header to it (with the virtual size `size`). The old table is freed by the next flush.
    pub(crate) fn replace_l1(&mut self, entries: Vec<u64>, size: u64) -> Result<()> {
        let bytes = entries.len() as u64 * 8;
        let old = (self.header.l1_table_offset, self.l1.len() as u64 * 8);
        let offset = if entries.is_empty() {
            0
        } else {
            let clusters = bytes.div_ceil(self.cluster_size);
            let offset = self.alloc_clusters(clusters)?;
            let mut raw = vec![0u8; (clusters * self.cluster_size) as usize];
            for (i, entry) in entries.iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *entry);
            }
            self.file
                .write_at(&raw, offset)
                .map_err(Error::WriteL1Table)?;
            offset
        };
        // Ordering: the new table and the refcounts of everything it references are durable
        // before the header points at it.
        self.refcount_barrier()?;
        let mut fields = [0u8; 24];
        BigEndian::write_u64(&mut fields[0..], size);
        BigEndian::write_u32(&mut fields[8..], self.header.crypt_method);
        BigEndian::write_u32(&mut fields[12..], entries.len() as u32);
        BigEndian::write_u64(&mut fields[16..], offset);
        // One 24-byte write inside the first sector: the size, L1 size and L1 offset switch
        // together.
        self.file
            .write_at(&fields, 24)
            .map_err(Error::WriteHeader)?;
        self.file.flush().map_err(Error::Flush)?;
        self.header.size = size;
        self.header.l1_size = entries.len() as u32;
        self.header.l1_table_offset = offset;
        self.l1 = entries;
        self.l1_dirty = None;
        if old.1 > 0 {
            self.pending_frees.push(old);
        }
        self.refresh_protected();
        Ok(())
    }

    /// Forgets cached tables and decompressed data (after metadata was rewritten underneath).
    pub(crate) fn drop_caches(&mut self) {
        self.l2_cache.clear();
        self.decompressed = None;
    }
}
