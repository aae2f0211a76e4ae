//! Rebuilding the refcount structure from counted references, as QEMU's
//! `rebuild_refcount_structure` does: each refcount block goes into the first free cluster at or
//! after the start of its own range, the table into the first free run big enough, repeated until
//! the table stops growing; the old structure is left behind as leaks for the caller to repair.

use byteorder::{BigEndian, ByteOrder};

use super::refs::Counted;
use crate::error::{Error, Result};
use crate::header::MAX_REFTABLE_BYTES;
use crate::image::Image;
use crate::raw::Storage;
use crate::refcount::set_entry;

/// First-fit allocation in the counted references (`alloc_clusters_imrt`).
fn alloc(counted: &mut Counted, count: u64, first_free: &mut u64) -> u64 {
    let mut cluster = *first_free;
    let mut run = 0;
    let mut first_gap = true;
    while cluster < counted.len() && run < count {
        if counted.get(cluster) == 0 {
            run += 1;
            if first_gap {
                *first_free = cluster;
                first_gap = false;
            }
        } else {
            run = 0;
        }
        cluster += 1;
    }
    // Not enough room inside: the run continues past the end.
    let start = cluster - run;
    for c in start..start + count {
        counted.set(c, 1);
    }
    start
}

struct Rebuild {
    cluster_bits: u32,
    order: u32,
    per_block: u64,
    /// Refcount block cluster per table index.
    table: Vec<u64>,
}

impl Rebuild {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// `rebuild_refcounts_write_refblocks`: a block for every range with a non-zero count in
    /// `[first, end)`, written from the counts. Returns whether the table had to grow.
    fn write_blocks<S: Storage + ?Sized>(
        &mut self,
        file: &mut S,
        counted: &mut Counted,
        first: u64,
        end: u64,
    ) -> Result<bool> {
        let mut grown = false;
        let mut first_free = 0u64;
        let mut cluster = first;
        // (Rewriting a block of an earlier pass allocates nothing.)
        while cluster < end {
            if counted.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster / self.per_block;
            let range_start = index * self.per_block;
            let existing = self.table.get(index as usize).copied().unwrap_or(0);
            // A range that already has a new block (this is a rerun for the table's clusters)
            // just gets it rewritten with the updated counts.
            let block = if existing != 0 {
                existing
            } else {
                first_free = first_free.max(range_start);
                alloc(counted, 1, &mut first_free)
            };
            if index as usize >= self.table.len() {
                let per_table_cluster = self.cluster_size() / 8;
                let entries = (index + 1).div_ceil(per_table_cluster) * per_table_cluster;
                self.table.resize(entries as usize, 0);
                grown = true;
            }
            self.table[index as usize] = block;
            let mut raw = vec![0u8; self.cluster_size() as usize];
            for slot in 0..self.per_block {
                let count = counted.get(range_start + slot);
                if count != 0 {
                    set_entry(&mut raw, slot as usize, self.order, count);
                }
            }
            let offset = block << self.cluster_bits;
            file.write_at(&raw, offset)
                .map_err(|source| Error::WriteRefcountBlock { offset, source })?;
            cluster = range_start + self.per_block;
        }
        Ok(grown)
    }
}

/// Replaces the image's refcount structure by one built from `counted` (which gains the new
/// structure's own references).
pub(super) fn rebuild<S: Storage>(image: &mut Image<S>, counted: &mut Counted) -> Result<()> {
    let cluster_bits = image.cluster_bits;
    let order = image.header.refcount_order;
    let mut state = Rebuild {
        cluster_bits,
        order,
        per_block: (8u64 << cluster_bits) >> order,
        table: Vec::new(),
    };
    let end = counted.len();
    state.write_blocks(&mut image.file, counted, 0, end)?;
    let (table_offset, table_clusters) = loop {
        let bytes = state.table.len() as u64 * 8;
        let clusters = bytes.div_ceil(state.cluster_size());
        if bytes > MAX_REFTABLE_BYTES {
            return Err(Error::RefcountTableTooLarge(clusters));
        }
        let mut first_free = 0;
        let start = alloc(counted, clusters, &mut first_free);
        let grown = state.write_blocks(&mut image.file, counted, start, start + clusters)?;
        if !grown {
            break (start << cluster_bits, clusters);
        }
    };
    let mut raw = vec![0u8; state.table.len() * 8];
    for (i, block) in state.table.iter().enumerate() {
        if *block != 0 {
            BigEndian::write_u64(&mut raw[i * 8..], block << cluster_bits);
        }
    }
    image
        .file
        .write_at(&raw, table_offset)
        .map_err(Error::WriteRefcountTable)?;
    // Ordering: the new blocks and table are durable before the header points at them.
    image.file.flush().map_err(Error::Flush)?;
    let mut fields = [0u8; 12];
    BigEndian::write_u64(&mut fields[0..], table_offset);
    BigEndian::write_u32(&mut fields[8..], table_clusters as u32);
    image
        .file
        .write_at(&fields, 48)
        .map_err(Error::WriteHeader)?;
    image.file.flush().map_err(Error::Flush)?;
    image.header.refcount_table_offset = table_offset;
    image.header.refcount_table_clusters = table_clusters as u32;
    image.reload_refcounts()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_reuses_gaps_and_extends_past_the_end() {
        let mut counted = Counted::new(6, 16, 4);
        for cluster in [0, 1, 3, 5] {
            counted.set(cluster, 1);
        }
        let mut first_free = 0;
        assert_eq!(alloc(&mut counted, 1, &mut first_free), 2);
        assert_eq!(alloc(&mut counted, 2, &mut first_free), 6);
        assert_eq!(counted.len(), 8);
    }
}
