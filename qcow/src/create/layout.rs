//! The clusters of a new qcow2 image, placed where qemu-img places them: the empty image, the
//! identity-mapped L2 tables of a preallocated external data file, and the contiguous data area
//! of `preallocation=falloc|full` (with the refcount table moved behind the old end, as QEMU does).

use byteorder::{BigEndian, ByteOrder};

use crate::error::{Error, Result};
use crate::l2::COPIED;
use crate::raw::Storage;
use crate::refcount::set_entry;

/// Every table of a new image, in memory, with the refcount of every cluster.
#[derive(Debug)]
pub(super) struct Layout {
    pub cluster_bits: u32,
    pub refcount_order: u32,
    /// Refcount of each host cluster.
    pub refcounts: Vec<u64>,
    pub reftable_cluster: u64,
    pub reftable_clusters: u64,
    /// Refcount block cluster per refcount table index (0 = none).
    pub refblocks: Vec<u64>,
    pub l1_cluster: u64,
    pub l1: Vec<u64>,
    /// (cluster, entries) of every L2 table.
    pub l2s: Vec<(u64, Vec<u64>)>,
    /// 1 for standard L2 entries, 2 for extended ones.
    pub entry_words: u64,
    /// Host clusters of guest data written by qemu-img as zeros or reserved (falloc/full).
    pub data_area: Option<(u64, u64)>,
    /// A refcount table that was replaced: (cluster, its entries). QEMU frees it without wiping
    /// it, so its old contents stay in the file.
    pub old_reftable: Option<(u64, Vec<u64>)>,
}

/// The fixed point QEMU computes for refcount metadata covering `clusters` clusters plus itself:
/// (refcount blocks, refcount table clusters).
fn refcount_metadata(clusters: u64, cluster_size: u64, order: u32) -> (u64, u64) {
    let per_block = (cluster_size * 8) >> order;
    let per_table_cluster = cluster_size / 8;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let new_blocks = (clusters + table + blocks).div_ceil(per_block);
        let new_table = new_blocks.div_ceil(per_table_cluster);
        if new_blocks == blocks && new_table == table {
            return (blocks, table);
        }
        blocks = new_blocks;
        table = new_table;
    }
}

/// QEMU's cluster allocator (`alloc_clusters_noref` + `update_refcount`) over a [`Layout`].
struct FirstFit {
    free_index: u64,
}

impl FirstFit {
    fn refcount(layout: &Layout, cluster: u64) -> u64 {
        layout.refcounts.get(cluster as usize).copied().unwrap_or(0)
    }

    /// `count` free clusters in a row, searching on from the free index.
    fn find(&mut self, layout: &Layout, count: u64) -> u64 {
        let mut run = 0;
        while run < count {
            let cluster = self.free_index;
            self.free_index += 1;
            run = if Self::refcount(layout, cluster) == 0 {
                run + 1
            } else {
                0
            };
        }
        self.free_index - count
    }

    /// Allocates `count` clusters, creating refcount blocks as QEMU does; `None` if the refcount
    /// table is too small.
    fn alloc(&mut self, layout: &mut Layout, count: u64) -> Option<u64> {
        let per_block = (layout.cluster_size() * 8) >> layout.refcount_order;
        'retry: loop {
            let start = self.find(layout, count);
            for cluster in start..start + count {
                let index = (cluster / per_block) as usize;
                if layout.refblocks.get(index).copied().unwrap_or(0) == 0 {
                    let block = self.find(layout, 1);
                    let table_entries =
                        (layout.reftable_clusters * layout.cluster_size() / 8) as usize;
                    if block / per_block != cluster / per_block || index >= table_entries {
                        return None;
                    }
                    if layout.refblocks.len() <= index {
                        layout.refblocks.resize(index + 1, 0);
                    }
                    layout.refblocks[index] = block;
                    layout.set_refcount(block, 1);
                    // Undo this attempt's increments; the search starts again.
                    for undo in start..cluster {
                        layout.set_refcount(undo, 0);
                        self.free_index = self.free_index.min(undo);
                    }
                    continue 'retry;
                }
                layout.set_refcount(cluster, 1);
            }
            return Some(start);
        }
    }
}

impl Layout {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / (8 * self.entry_words)
    }

    fn set_refcount(&mut self, cluster: u64, value: u64) {
        let index = cluster as usize;
        if self.refcounts.len() <= index {
            self.refcounts.resize(index + 1, 0);
        }
        self.refcounts[index] = value;
    }

    /// The empty image: header, refcount table, refcount blocks, L1 table (with `extra` more
    /// clusters to be covered by the refcount blocks).
    pub fn empty(
        cluster_bits: u32,
        refcount_order: u32,
        l1_entries: u64,
        entry_words: u64,
        extra: u64,
    ) -> Layout {
        let cluster_size = 1u64 << cluster_bits;
        let l1_clusters = (l1_entries * 8).div_ceil(cluster_size);
        let per_block = (cluster_size * 8) >> refcount_order;
        let mut table = 1u64;
        let mut blocks = 1u64;
        loop {
            let total = 1 + table + blocks + l1_clusters + extra;
            let need_blocks = total.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cluster_size);
            if need_blocks <= blocks && need_table <= table {
                break;
            }
            blocks = blocks.max(need_blocks);
            table = table.max(need_table);
        }
        let mut layout = Layout {
            cluster_bits,
            refcount_order,
            refcounts: Vec::new(),
            reftable_cluster: 1,
            reftable_clusters: table,
            refblocks: (0..blocks).map(|b| 1 + table + b).collect(),
            l1_cluster: 1 + table + blocks,
            l1: vec![0; l1_entries as usize],
            l2s: Vec::new(),
            entry_words,
            data_area: None,
            old_reftable: None,
        };
        for cluster in 0..1 + table + blocks + l1_clusters {
            layout.set_refcount(cluster, 1);
        }
        layout
    }

    fn end_cluster(&self) -> u64 {
        self.refcounts
            .iter()
            .rposition(|&r| r > 0)
            .map_or(0, |i| i as u64 + 1)
    }

    fn first_free(&self) -> u64 {
        self.refcounts
            .iter()
            .position(|&r| r == 0)
            .map_or(self.refcounts.len() as u64, |i| i as u64)
    }

    /// L2 tables right after the L1 table mapping every guest cluster to the same offset of an
    /// external data file.
    pub fn map_identity(&mut self, guest_clusters: u64) {
        let tables = guest_clusters.div_ceil(self.l2_entries());
        let first = self.end_cluster();
        for index in 0..tables {
            self.set_refcount(first + index, 1);
            self.add_l2(index, first + index, 0, guest_clusters);
        }
    }

    /// Enters L2 table `index` at `l2_cluster`, mapping its guest clusters (below
    /// `guest_clusters`) to consecutive host clusters from `data_start` plus the guest cluster.
    /// Extended entries keep an empty subcluster bitmap, as QEMU writes them.
    fn add_l2(&mut self, index: u64, l2_cluster: u64, data_start: u64, guest_clusters: u64) {
        let per_l2 = self.l2_entries();
        let mut entries = vec![0u64; (per_l2 * self.entry_words) as usize];
        for slot in 0..per_l2 {
            let cluster = index * per_l2 + slot;
            if cluster >= guest_clusters {
                break;
            }
            entries[(slot * self.entry_words) as usize] =
                ((data_start + cluster) << self.cluster_bits) | COPIED;
        }
        self.l1[index as usize] = (l2_cluster << self.cluster_bits) | COPIED;
        self.l2s.push((l2_cluster, entries));
    }

    /// QEMU's `falloc`/`full` preallocation of an empty image: new self-covering refcount
    /// structures at the end (the old table is freed), then one contiguous data area, then the L2
    /// tables in the first free clusters.
    pub fn preallocate_data(&mut self, guest_clusters: u64) -> Result<()> {
        let cluster_size = self.cluster_size();
        let per_l2 = self.l2_entries();
        let old_end = self.end_cluster();
        let l2_tables = guest_clusters.div_ceil(per_l2) + 1;
        let (blocks, _) = refcount_metadata(
            old_end + guest_clusters + l2_tables,
            cluster_size,
            self.refcount_order,
        );
        let table_entries = blocks.div_ceil(cluster_size / 8) * (cluster_size / 8);
        let table_clusters = table_entries * 8 / cluster_size;
        if table_clusters * cluster_size > crate::header::MAX_REFTABLE_BYTES {
            return Err(crate::create::CreateProblem::TooLarge.into());
        }
        let per_block = (cluster_size * 8) >> self.refcount_order;
        let area_index = old_end / per_block;
        let mut refblocks = self.refblocks.clone();
        refblocks.resize(blocks.max(refblocks.len() as u64) as usize, 0);
        let mut next = old_end;
        for entry in refblocks
            .iter_mut()
            .take(blocks as usize)
            .skip(area_index as usize)
        {
            if *entry == 0 {
                *entry = next;
                next += 1;
            }
        }
        let table_cluster = next;
        let data_start = table_cluster + table_clusters;
        for cluster in old_end..data_start {
            self.set_refcount(cluster, 1);
        }
        // The old refcount table is freed once the header points at the new one.
        for cluster in self.reftable_cluster..self.reftable_cluster + self.reftable_clusters {
            self.set_refcount(cluster, 0);
        }
        self.old_reftable = Some((self.reftable_cluster, self.refblocks.clone()));
        self.refblocks = refblocks;
        self.reftable_cluster = table_cluster;
        self.reftable_clusters = table_clusters;
        for cluster in data_start..data_start + guest_clusters {
            self.set_refcount(cluster, 1);
        }
        self.data_area = Some((data_start, guest_clusters));
        for index in 0..guest_clusters.div_ceil(per_l2) {
            let l2_cluster = self.first_free();
            self.set_refcount(l2_cluster, 1);
            self.add_l2(index, l2_cluster, data_start, guest_clusters);
        }
        Ok(())
    }

    /// QEMU's metadata preallocation of an empty image, replayed: for each L2 range, the L2 table
    /// and then one run of data clusters are taken first-fit from a moving free-cluster index; a
    /// run that reaches past the refcount blocks gets a new self-describing block at the first
    /// free cluster and is searched for again. `false` when the refcount table itself would have
    /// to grow (QEMU then relocates it; the caller falls back to the library's allocator).
    pub fn preallocate_metadata(&mut self, guest_clusters: u64) -> bool {
        let per_l2 = self.l2_entries();
        let mut allocator = FirstFit { free_index: 0 };
        let mut end = 0u64;
        for index in 0..guest_clusters.div_ceil(per_l2) {
            let Some(l2_cluster) = allocator.alloc(self, 1) else {
                return false;
            };
            let count = (guest_clusters - index * per_l2).min(per_l2);
            let Some(data) = allocator.alloc(self, count) else {
                return false;
            };
            let mut entries = vec![0u64; (per_l2 * self.entry_words) as usize];
            for slot in 0..count {
                entries[(slot * self.entry_words) as usize] =
                    ((data + slot) << self.cluster_bits) | COPIED;
            }
            self.l1[index as usize] = (l2_cluster << self.cluster_bits) | COPIED;
            self.l2s.push((l2_cluster, entries));
            end = data + count;
        }
        if guest_clusters > 0 {
            // QEMU extends the file to the end of the last data run (a hole).
            self.data_area = Some((end, 0));
        }
        true
    }

    /// Bytes the file must have: every used cluster, but the L1 table only up to its last entry
    /// when it is the last thing in the file (as qemu-img writes it).
    pub fn file_len(&self) -> u64 {
        let end = self.end_cluster() * self.cluster_size();
        let l1_end = self.l1_cluster * self.cluster_size() + self.l1.len() as u64 * 8;
        let l1_clusters = (self.l1.len() as u64 * 8).div_ceil(self.cluster_size());
        let data_end = self
            .data_area
            .map_or(0, |(start, count)| (start + count) * self.cluster_size());
        if self.l1_cluster + l1_clusters == self.end_cluster() && data_end < end {
            l1_end.max(self.l1_cluster * self.cluster_size())
        } else {
            end
        }
    }

    /// Writes every table; `cluster0` (the header) goes last.
    pub fn write<S: Storage + ?Sized>(&self, storage: &mut S, mut cluster0: Vec<u8>) -> Result<()> {
        let cluster_size = self.cluster_size();
        let write = |storage: &mut S, data: &[u8], at: u64| {
            storage.write_at(data, at).map_err(Error::WriteHeader)
        };
        let per_block = (cluster_size * 8) >> self.refcount_order;
        if let Some((cluster, blocks)) = &self.old_reftable {
            let mut old = vec![0u8; blocks.len() * 8];
            for (index, block) in blocks.iter().enumerate() {
                BigEndian::write_u64(&mut old[index * 8..], block << self.cluster_bits);
            }
            write(storage, &old, cluster << self.cluster_bits)?;
        }
        let mut table = vec![0u8; (self.reftable_clusters * cluster_size) as usize];
        for (index, &cluster) in self.refblocks.iter().enumerate() {
            if cluster == 0 {
                continue;
            }
            BigEndian::write_u64(&mut table[index * 8..], cluster << self.cluster_bits);
            let mut block = vec![0u8; cluster_size as usize];
            for slot in 0..per_block {
                let covered = index as u64 * per_block + slot;
                if let Some(&refcount) = self.refcounts.get(covered as usize) {
                    set_entry(&mut block, slot as usize, self.refcount_order, refcount);
                }
            }
            write(storage, &block, cluster << self.cluster_bits)?;
        }
        write(storage, &table, self.reftable_cluster << self.cluster_bits)?;
        for (cluster, entries) in &self.l2s {
            let mut raw = vec![0u8; cluster_size as usize];
            for (i, entry) in entries.iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *entry);
            }
            write(storage, &raw, cluster << self.cluster_bits)?;
        }
        let mut l1 = vec![0u8; self.l1.len() * 8];
        for (i, entry) in self.l1.iter().enumerate() {
            BigEndian::write_u64(&mut l1[i * 8..], *entry);
        }
        write(storage, &l1, self.l1_cluster << self.cluster_bits)?;
        let len = self.file_len();
        if storage.len().map_err(Error::WriteHeader)? < len {
            match storage.set_len(len) {
                Ok(()) => {}
                // A device cannot be resized (and qemu-img never tries): what was written is
                // judged by reopening it.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
                Err(e) => return Err(Error::SetLen(e)),
            }
        }
        // Ordering: every table is durable before the header that points at them.
        flush(storage)?;
        cluster0.resize(cluster_size as usize, 0);
        write(storage, &cluster0, 0)?;
        flush(storage)
    }
}

/// A barrier; a device that cannot sync (`EINVAL`, e.g. /dev/null) counts as synced, as in QEMU.
fn flush<S: Storage + ?Sized>(storage: &mut S) -> Result<()> {
    match storage.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::InvalidInput => Err(Error::Flush(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falloc_layout_matches_qemu_img() {
        // qemu-img create -f qcow2 -o preallocation=full x 1M: new refcount table at 0x40000,
        // data at 0x50000..0x150000, the L2 table where the old refcount table was.
        let mut layout = Layout::empty(16, 4, 1, 1, 0);
        layout.preallocate_data(16).unwrap();
        assert_eq!(layout.reftable_cluster, 4);
        assert_eq!(layout.data_area, Some((5, 16)));
        assert_eq!(layout.l2s[0].0, 1);
        assert_eq!(layout.file_len(), 0x150000);
        // 8 MiB with 4 KiB clusters: a second refcount block at cluster 4, the table at 5, data
        // from cluster 6, four L2 tables (one in the old table's place, three after the data).
        let mut layout = Layout::empty(12, 4, 4, 1, 0);
        layout.preallocate_data(2048).unwrap();
        assert_eq!(layout.refblocks, vec![2, 4]);
        assert_eq!(layout.data_area, Some((6, 2048)));
        let l2: Vec<u64> = layout.l2s.iter().map(|(c, _)| *c).collect();
        assert_eq!(l2, vec![1, 2054, 2055, 2056]);
        assert_eq!(layout.file_len(), 8_425_472);
    }

    #[test]
    fn empty_image_ends_after_the_l1_entries() {
        let layout = Layout::empty(16, 4, 2, 1, 0);
        assert_eq!(layout.file_len(), 0x30000 + 16);
    }
}
