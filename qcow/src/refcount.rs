//! Refcounts: the refcount table, a cache of refcount blocks, packing of 1..64-bit entries, and the
//! cluster allocator (which creates refcount blocks and grows the table as needed).

use byteorder::{BigEndian, ByteOrder};

use crate::cache::TableCache;
use crate::error::{Corruption, Error, Result};
use crate::header::{MAX_HOST_OFFSET, MAX_REFTABLE_BYTES};
use crate::raw::Storage;

/// Bits 9..63 of a refcount table entry.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Reads entry `index` of a refcount block with `1 << order`-bit entries.
pub fn get_entry(block: &[u8], index: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = index * bits;
            (u64::from(block[bit / 8]) >> (bit % 8)) & ((1u64 << bits) - 1)
        }
        3 => u64::from(block[index]),
        4 => u64::from(BigEndian::read_u16(&block[index * 2..])),
        5 => u64::from(BigEndian::read_u32(&block[index * 4..])),
        _ => BigEndian::read_u64(&block[index * 8..]),
    }
}

/// Writes entry `index` of a refcount block; `value` must fit the width.
pub fn set_entry(block: &mut [u8], index: usize, order: u32, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = index * bits;
            let mask = ((1u16 << bits) - 1) as u8;
            let byte = &mut block[bit / 8];
            *byte = (*byte & !(mask << (bit % 8))) | (((value as u8) & mask) << (bit % 8));
        }
        3 => block[index] = value as u8,
        4 => BigEndian::write_u16(&mut block[index * 2..], value as u16),
        5 => BigEndian::write_u32(&mut block[index * 4..], value as u32),
        _ => BigEndian::write_u64(&mut block[index * 8..], value),
    }
}

/// Largest refcount a `1 << order`-bit entry holds.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// The refcount structures of an open image.
#[derive(Debug)]
pub struct Refcounts {
    /// Refcount table entries (host offsets of refcount blocks, 0 = none).
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u32,
    blocks: TableCache<Vec<u8>>,
    order: u32,
    cluster_bits: u32,
    entries_per_block: u64,
    /// Lowest cluster index that may be free.
    free_hint: u64,
    /// Host byte ranges the allocator must never hand out (active L1, snapshot table).
    protected: Vec<(u64, u64)>,
}

impl Refcounts {
    /// Loads the refcount table described by the header fields.
    pub fn load<S: Storage + ?Sized>(
        file: &mut S,
        table_offset: u64,
        table_clusters: u32,
        order: u32,
        cluster_bits: u32,
        cache_blocks: usize,
    ) -> Result<Refcounts> {
        let cluster_size = 1u64 << cluster_bits;
        let bytes = u64::from(table_clusters) * cluster_size;
        if bytes > MAX_REFTABLE_BYTES {
            return Err(Error::RefcountTableTooLarge(u64::from(table_clusters)));
        }
        let mut raw = vec![0u8; bytes as usize];
        file.read_at(&mut raw, table_offset)
            .map_err(Error::ReadRefcountTable)?;
        let table = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        Ok(Refcounts {
            table,
            table_offset,
            table_clusters,
            blocks: TableCache::new(cache_blocks),
            order,
            cluster_bits,
            entries_per_block: (cluster_size * 8) >> order,
            free_hint: 1,
            protected: Vec::new(),
        })
    }

    pub fn order(&self) -> u32 {
        self.order
    }

    pub fn entries_per_block(&self) -> u64 {
        self.entries_per_block
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Sets host ranges the allocator must never return (defence against wrong refcounts).
    pub fn set_protected(&mut self, ranges: Vec<(u64, u64)>) {
        self.protected = ranges;
    }

    /// Host offset of the refcount block covering `cluster`, or 0 if there is none.
    fn block_offset(&self, cluster: u64) -> Result<u64> {
        let index = cluster / self.entries_per_block;
        let Some(&entry) = self.table.get(index as usize) else {
            return Ok(0);
        };
        let offset = entry & REFTABLE_OFFSET_MASK;
        if offset == 0 {
            return Ok(0);
        }
        if offset % self.cluster_size() != 0 || entry & !REFTABLE_OFFSET_MASK != 0 {
            return Err(Corruption::RefblockUnaligned { index, entry }.into());
        }
        if offset > MAX_HOST_OFFSET {
            return Err(Corruption::RefblockOutOfRange { offset }.into());
        }
        if self.overlaps_protected(offset) {
            return Err(Corruption::RefblockOverlapsMetadata { index, offset }.into());
        }
        Ok(offset)
    }

    fn load_block<S: Storage + ?Sized>(&mut self, file: &mut S, offset: u64) -> Result<()> {
        if self.blocks.contains(offset) {
            return Ok(());
        }
        let file_len = file
            .len()
            .map_err(|source| Error::ReadRefcountBlock { offset, source })?;
        if offset + self.cluster_size() > file_len {
            return Err(Corruption::RefblockPastEnd { offset }.into());
        }
        let mut block = vec![0u8; self.cluster_size() as usize];
        file.read_at(&mut block, offset)
            .map_err(|source| Error::ReadRefcountBlock { offset, source })?;
        self.blocks.insert(offset, block, false, |off, data| {
            write_block(file, off, data)
        })
    }

    /// Refcount of host cluster `cluster`.
    pub fn get<S: Storage + ?Sized>(&mut self, file: &mut S, cluster: u64) -> Result<u64> {
        let offset = self.block_offset(cluster)?;
        if offset == 0 {
            return Ok(0);
        }
        self.load_block(file, offset)?;
        let index = (cluster % self.entries_per_block) as usize;
        let order = self.order;
        Ok(self
            .blocks
            .get(offset)
            .map(|block| get_entry(block, index, order))
            .unwrap_or(0))
    }

    /// Sets the refcount of `cluster`, whose refcount block must exist.
    pub fn set<S: Storage + ?Sized>(
        &mut self,
        file: &mut S,
        cluster: u64,
        value: u64,
    ) -> Result<()> {
        if value > max_refcount(self.order) {
            return Err(Error::RefcountOverflow {
                cluster,
                bits: 1 << self.order,
            });
        }
        let offset = self.block_offset(cluster)?;
        if offset == 0 {
            return Err(Corruption::NoRefcountBlock { cluster }.into());
        }
        self.load_block(file, offset)?;
        let index = (cluster % self.entries_per_block) as usize;
        let order = self.order;
        if let Some(block) = self.blocks.get_mut(offset) {
            set_entry(block, index, order, value);
        }
        if value == 0 && cluster < self.free_hint {
            self.free_hint = cluster.max(1);
        }
        Ok(())
    }

    /// Adds `delta` (±1) to the refcount of every cluster touched by `[offset, offset + len)`.
    pub fn update_range<S: Storage + ?Sized>(
        &mut self,
        file: &mut S,
        offset: u64,
        len: u64,
        delta: i64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for cluster in first..=last {
            let current = self.get(file, cluster)?;
            let new = if delta < 0 {
                current
                    .checked_sub(delta.unsigned_abs())
                    .ok_or(Corruption::RefcountBelowZero { cluster })?
            } else {
                current + delta as u64
            };
            self.set(file, cluster, new)?;
        }
        Ok(())
    }

    /// Writes every dirty refcount block (no flush).
    pub fn write_dirty<S: Storage + ?Sized>(&mut self, file: &mut S) -> Result<()> {
        self.blocks
            .flush_dirty(|offset, data| write_block(file, offset, data))
    }

    pub fn has_dirty(&self) -> bool {
        self.blocks.has_dirty()
    }

    /// Forgets all cached blocks (after a rebuild replaced them).
    pub fn drop_cache(&mut self) {
        self.blocks.clear();
        self.free_hint = 1;
    }

    fn is_protected(&self, cluster: u64) -> bool {
        self.overlaps_protected(cluster << self.cluster_bits)
    }

    /// Whether the cluster at byte `start` overlaps the header or a protected table.
    pub fn overlaps_protected(&self, start: u64) -> bool {
        let end = start + self.cluster_size();
        start < self.cluster_size()
            || self
                .protected
                .iter()
                .any(|&(off, len)| start < off + len && off < end)
    }

    /// Allocates `count` contiguous free clusters, sets their refcounts to 1 and returns the host
    /// offset of the first. May create refcount blocks and grow the refcount table (header is updated).
    pub fn alloc<S: Storage + ?Sized>(&mut self, file: &mut S, count: u64) -> Result<u64> {
        // A new refcount block lands inside the range it covers, so a run never spans a range
        // that needs one: a longer run could be searched for forever.
        if count >= self.entries_per_block {
            return Err(Error::ContiguousAllocation {
                clusters: count,
                per_block: self.entries_per_block,
            });
        }
        let mut cluster = self.free_hint.max(1);
        let mut run_start = cluster;
        loop {
            if (cluster + count) << self.cluster_bits > MAX_HOST_OFFSET {
                return Err(Error::NoSpace);
            }
            if self.block_offset(cluster)? == 0 {
                // The whole refcount range of `cluster` has no block: every cluster in it is free.
                let index = cluster / self.entries_per_block;
                if index as usize >= self.table.len() {
                    cluster = self.grow_table(file, cluster)?;
                } else {
                    cluster = self.create_block(file, cluster)?;
                }
                run_start = cluster;
                continue;
            }
            if self.is_protected(cluster) || self.get(file, cluster)? != 0 {
                cluster += 1;
                run_start = cluster;
                continue;
            }
            cluster += 1;
            if cluster - run_start == count {
                break;
            }
        }
        for c in run_start..run_start + count {
            self.set(file, c, 1)?;
        }
        if count == 1 || run_start == self.free_hint {
            self.free_hint = run_start + count;
        }
        Ok(run_start << self.cluster_bits)
    }

    /// First cluster index past the end of the file.
    fn file_end_cluster<S: Storage + ?Sized>(&self, file: &mut S) -> Result<u64> {
        let len = file.len().map_err(Error::ReadRefcountTable)?;
        Ok(len.div_ceil(self.cluster_size()))
    }

    /// Creates a self-describing refcount block for the range of `cluster` (the first cluster
    /// needed in a range without a block) and hooks it into the table. Returns the next cluster to
    /// consider. Clusters of the range that already lie inside the file are counted as used: in a
    /// consistent image there are none, and otherwise they are leftovers of a crash (now leaks) or
    /// live data of a damaged image that must not be overwritten.
    fn create_block<S: Storage + ?Sized>(&mut self, file: &mut S, cluster: u64) -> Result<u64> {
        let index = cluster / self.entries_per_block;
        let range_start = index * self.entries_per_block;
        let range_end = range_start + self.entries_per_block;
        let file_end = self.file_end_cluster(file)?;
        let block_cluster = cluster.max(file_end);
        let (start_byte, end_byte) = (
            range_start << self.cluster_bits,
            range_end << self.cluster_bits,
        );
        let covers_metadata = self
            .protected
            .iter()
            .any(|&(off, len)| off < end_byte && start_byte < off + len);
        if covers_metadata || block_cluster >= range_end {
            return Err(Corruption::RefcountTableEntryMissing { index }.into());
        }
        let offset = block_cluster << self.cluster_bits;
        let mut block = vec![0u8; self.cluster_size() as usize];
        for used in range_start..block_cluster.min(file_end) {
            set_entry(&mut block, (used - range_start) as usize, self.order, 1);
        }
        let own_index = (block_cluster - range_start) as usize;
        set_entry(&mut block, own_index, self.order, 1);
        write_block(file, offset, &block)?;
        // Ordering: the block (which counts itself) must be durable before the table entry points at
        // it; a crash in between leaves an unreferenced cluster, never a garbage refcount block.
        file.flush().map_err(Error::Flush)?;
        self.table[index as usize] = offset;
        let mut entry = [0u8; 8];
        BigEndian::write_u64(&mut entry, offset);
        file.write_at(&entry, self.table_offset + index * 8)
            .map_err(Error::WriteRefcountTable)?;
        // Ordering: the table entry must be durable before any L2 entry relies on refcounts in it.
        file.flush().map_err(Error::Flush)?;
        self.blocks.insert(offset, block, false, |off, data| {
            write_block(file, off, data)
        })?;
        Ok(block_cluster + 1)
    }

    /// Grows the refcount table so that it covers `uncovered` (the first cluster past the covered
    /// area). The new blocks and table go past the end of the file; clusters between `uncovered`
    /// and the end of the file are counted as used (see `create_block`). Returns the first cluster
    /// after the new metadata.
    fn grow_table<S: Storage + ?Sized>(&mut self, file: &mut S, uncovered: u64) -> Result<u64> {
        let area_start = uncovered.max(self.file_end_cluster(file)?);
        let cluster_size = self.cluster_size();
        let per_table_cluster = cluster_size / 8;
        let old_len = self.table.len() as u64;
        let first_new_index = uncovered / self.entries_per_block;
        let mut new_blocks = 1u64;
        let mut table_clusters;
        loop {
            let wanted = (first_new_index + new_blocks).max(old_len + old_len / 2);
            table_clusters = wanted.div_ceil(per_table_cluster);
            let area_end = area_start + new_blocks + table_clusters;
            let blocks_needed = area_end.div_ceil(self.entries_per_block) - first_new_index;
            if blocks_needed <= new_blocks {
                break;
            }
            new_blocks = blocks_needed;
        }
        if table_clusters * cluster_size > MAX_REFTABLE_BYTES {
            return Err(Error::RefcountTableTooLarge(table_clusters));
        }
        let area_end = area_start + new_blocks + table_clusters;
        let new_table_offset = (area_start + new_blocks) << self.cluster_bits;
        let mut new_table = self.table.clone();
        new_table.resize((table_clusters * per_table_cluster) as usize, 0);
        for i in 0..new_blocks {
            let block_cluster = area_start + i;
            let index = first_new_index + i;
            let mut block = vec![0u8; cluster_size as usize];
            let range_start = index * self.entries_per_block;
            let range_end = range_start + self.entries_per_block;
            for c in uncovered.max(range_start)..area_end.min(range_end) {
                set_entry(&mut block, (c - range_start) as usize, self.order, 1);
            }
            write_block(file, block_cluster << self.cluster_bits, &block)?;
            new_table[index as usize] = block_cluster << self.cluster_bits;
        }
        let mut raw = vec![0u8; (table_clusters * cluster_size) as usize];
        for (i, entry) in new_table.iter().enumerate() {
            BigEndian::write_u64(&mut raw[i * 8..], *entry);
        }
        file.write_at(&raw, new_table_offset)
            .map_err(Error::WriteRefcountTable)?;
        self.write_dirty(file)?;
        // Ordering: new blocks and table are durable before the header switches to them.
        file.flush().map_err(Error::Flush)?;
        let mut fields = [0u8; 12];
        BigEndian::write_u64(&mut fields[0..], new_table_offset);
        BigEndian::write_u32(&mut fields[8..], table_clusters as u32);
        file.write_at(&fields, 48).map_err(Error::WriteHeader)?;
        // Ordering: the header switch is durable before the old table's clusters can be reused.
        file.flush().map_err(Error::Flush)?;
        let old_offset = self.table_offset;
        let old_clusters = u64::from(self.table_clusters);
        let new_range = (new_table_offset, table_clusters * cluster_size);
        for range in &mut self.protected {
            if *range == (old_offset, old_clusters * cluster_size) {
                *range = new_range;
            }
        }
        self.table = new_table;
        self.table_offset = new_table_offset;
        self.table_clusters = table_clusters as u32;
        self.update_range(file, old_offset, old_clusters * cluster_size, -1)?;
        Ok(area_end)
    }
}

fn write_block<S: Storage + ?Sized>(file: &mut S, offset: u64, data: &[u8]) -> Result<()> {
    file.write_at(data, offset)
        .map_err(|source| Error::WriteRefcountBlock { offset, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::MemStorage;

    #[test]
    fn packing_round_trips_for_every_width() {
        for order in 0..=6u32 {
            let max = max_refcount(order);
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            for i in 0..entries {
                set_entry(&mut block, i, order, (i as u64 * 7 + 3) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    get_entry(&block, i, order),
                    (i as u64 * 7 + 3) & max,
                    "order {order} index {i}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_entries_are_lsb_first() {
        let mut block = vec![0u8; 4];
        set_entry(&mut block, 0, 0, 1);
        set_entry(&mut block, 3, 0, 1);
        assert_eq!(block[0], 0b1001);
        let mut block = vec![0u8; 4];
        set_entry(&mut block, 1, 2, 0xa);
        assert_eq!(block[0], 0xa0);
        set_entry(&mut block, 0, 1, 3);
        assert_eq!(block[0], 0xa3);
    }

    #[test]
    fn sixteen_bit_entries_are_big_endian() {
        let mut block = vec![0u8; 8];
        set_entry(&mut block, 1, 4, 0x1234);
        assert_eq!(&block[2..4], &[0x12, 0x34]);
        assert_eq!(max_refcount(4), 0xffff);
        assert_eq!(max_refcount(0), 1);
        assert_eq!(max_refcount(6), u64::MAX);
    }

    #[test]
    fn allocator_creates_blocks_and_grows_the_table() {
        // 512-byte clusters, 64-bit refcounts: 64 clusters per block, 64 blocks per table cluster.
        let mut file = MemStorage::default();
        let mut block = vec![0u8; 512];
        for c in 0..3 {
            set_entry(&mut block, c, 6, 1);
        }
        file.write_at(&block, 1024).unwrap();
        let mut table = vec![0u8; 512];
        BigEndian::write_u64(&mut table, 1024);
        file.write_at(&table, 512).unwrap();
        let mut refcounts = Refcounts::load(&mut file, 512, 1, 6, 9, 4).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5000 {
            let offset = refcounts.alloc(&mut file, 1).unwrap();
            assert!(offset >= 3 * 512);
            assert!(seen.insert(offset), "offset {offset:#x} handed out twice");
        }
        assert!(refcounts.table_clusters > 1, "the table grew");
        refcounts.write_dirty(&mut file).unwrap();
        let reloaded_offset = BigEndian::read_u64(&file.data[48..56]);
        assert_eq!(reloaded_offset, refcounts.table_offset);
        for &offset in &seen {
            assert_eq!(refcounts.get(&mut file, offset / 512).unwrap(), 1);
        }
    }
}
