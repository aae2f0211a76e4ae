//! Replacing the refcount structure wholesale: a new table and blocks describing given counts
//! (and themselves), written past everything in use — for `amend`, which changes the refcount
//! width. (`check -r all` rebuilds the way QEMU does, in `rebuild`.)

use byteorder::{BigEndian, ByteOrder};

use crate::error::{Error, Result};
use crate::header::MAX_REFTABLE_BYTES;
use crate::image::Image;
use crate::raw::Storage;
use crate::refcount::{max_refcount, set_entry};

/// Writes a brand-new refcount table and blocks describing `refs` (plus themselves) past the end of
/// everything in use, then switches the header to them.
pub(crate) fn rebuild_refcounts<S: Storage>(
    image: &mut Image<S>,
    mut refs: Vec<u64>,
) -> Result<()> {
    let cluster_size = image.cluster_size;
    let order = image.header.refcount_order;
    let entries_per_block = (cluster_size * 8) >> order;
    let used_end = refs
        .iter()
        .rposition(|&r| r > 0)
        .map_or(1, |i| i as u64 + 1);
    let file_clusters = image
        .file
        .len()
        .map_err(Error::ReadHeader)?
        .div_ceil(cluster_size);
    let area = used_end.max(file_clusters);
    let mut blocks = 1u64;
    let mut table_clusters = 1u64;
    loop {
        let end = area + blocks + table_clusters;
        let need_blocks = end.div_ceil(entries_per_block);
        let need_table = (need_blocks * 8).div_ceil(cluster_size);
        if need_blocks == blocks && need_table == table_clusters {
            break;
        }
        blocks = need_blocks.max(blocks);
        table_clusters = need_table.max(table_clusters);
    }
    if table_clusters * cluster_size > MAX_REFTABLE_BYTES {
        return Err(Error::RefcountTableTooLarge(table_clusters));
    }
    let end = area + blocks + table_clusters;
    refs.resize(end as usize, 0);
    for r in &mut refs[area as usize..end as usize] {
        *r = 1;
    }
    let max = max_refcount(order);
    if let Some(cluster) = refs.iter().position(|&r| r > max) {
        return Err(Error::RefcountOverflow {
            cluster: cluster as u64,
            bits: 1 << order,
        });
    }
    let mut table = vec![0u8; (table_clusters * cluster_size) as usize];
    for block_index in 0..blocks {
        let mut block = vec![0u8; cluster_size as usize];
        let start = block_index * entries_per_block;
        for i in 0..entries_per_block {
            if let Some(&r) = refs.get((start + i) as usize) {
                set_entry(&mut block, i as usize, order, r);
            }
        }
        let offset = (area + block_index) * cluster_size;
        image
            .file
            .write_at(&block, offset)
            .map_err(|source| Error::WriteRefcountBlock { offset, source })?;
        BigEndian::write_u64(&mut table[(block_index * 8) as usize..], offset);
    }
    let table_offset = (area + blocks) * cluster_size;
    image
        .file
        .write_at(&table, table_offset)
        .map_err(Error::WriteRefcountTable)?;
    // Ordering: the new structure is durable before the header points at it.
    image.file.flush().map_err(Error::Flush)?;
    // One write inside the first sector switches the table and (for `amend refcount_bits`)
    // the refcount width together.
    let mut fields = [0u8; 52];
    BigEndian::write_u64(&mut fields[0..], table_offset);
    BigEndian::write_u32(&mut fields[8..], table_clusters as u32);
    BigEndian::write_u32(&mut fields[12..], image.header.nb_snapshots);
    BigEndian::write_u64(&mut fields[16..], image.header.snapshots_offset);
    let v3 = image.header.version >= 3;
    let length = if v3 { 52 } else { 24 };
    if v3 {
        BigEndian::write_u64(&mut fields[24..], image.header.incompatible_features);
        BigEndian::write_u64(&mut fields[32..], image.header.compatible_features);
        BigEndian::write_u64(&mut fields[40..], image.header.autoclear_features);
        BigEndian::write_u32(&mut fields[48..], order);
    }
    image
        .file
        .write_at(&fields[..length], 48)
        .map_err(Error::WriteHeader)?;
    image.file.flush().map_err(Error::Flush)?;
    image.header.refcount_table_offset = table_offset;
    image.header.refcount_table_clusters = table_clusters as u32;
    image.reload_refcounts()
}
