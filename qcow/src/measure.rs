//! `measure`: how big a new image must be — `qemu-img measure`. For qcow2 the fully allocated
//! size is QEMU's `qcow2_calc_prealloc_size` (header, L2 tables, L1 table and the refcount
//! structure's fixed point); the required size swaps the virtual size for the clusters the
//! source actually holds data in.

use crate::create::CreateOptions;
use crate::disk::{Disk, Format};
use crate::error::{Error, Result};
use crate::header::MAX_L1_BYTES;
use crate::status::Allocation;

/// The sizes `measure` reports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    pub required: u64,
    pub fully_allocated: u64,
    /// Space for persistent bitmaps (reported when both images could hold them).
    pub bitmaps: Option<u64>,
}

/// Why `measure` refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeasureError {
    #[error("The image size is too large (try using a larger cluster size)")]
    TooLarge,
}

/// Refcount table and block bytes needed to count `clusters` clusters plus themselves
/// (QEMU's `qcow2_refcount_metadata_size`).
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let blocks_per_table_cluster = cluster_size / 8;
    let refcounts_per_block = (cluster_size * 8) >> refcount_order;
    let (mut table, mut blocks, mut total) = (0u64, 0u64, 0u64);
    loop {
        let last = total;
        blocks = (clusters + table + blocks).div_ceil(refcounts_per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        total = clusters + blocks + table;
        if total == last {
            return (blocks + table) * cluster_size;
        }
    }
}

/// Bytes of a fully allocated qcow2 image of `size` bytes (QEMU's `qcow2_calc_prealloc_size`).
pub fn fully_allocated_size(
    size: u64,
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> u64 {
    let aligned = size.div_ceil(cluster_size) * cluster_size;
    let l2_entry = if extended_l2 { 16 } else { 8 };
    let mut meta = cluster_size;
    let l2_entries =
        (aligned / cluster_size).div_ceil(cluster_size / l2_entry) * (cluster_size / l2_entry);
    meta += l2_entries * l2_entry;
    let l1_entries =
        (l2_entries * l2_entry / cluster_size).div_ceil(cluster_size / 8) * (cluster_size / 8);
    meta += l1_entries * 8;
    meta += refcount_metadata_size(
        (meta + aligned) / cluster_size,
        cluster_size,
        refcount_order,
    );
    meta + aligned
}

/// Measures a new `format` image made with `create` holding `source` (or, without a source, of
/// `create.size` bytes).
pub fn measure(
    source: Option<&mut Disk>,
    format: Format,
    create: &CreateOptions,
) -> Result<Measurement> {
    if format == Format::Raw {
        let size = source.as_ref().map_or(create.size, |s| s.size());
        return Ok(Measurement {
            required: size,
            fully_allocated: size,
            bitmaps: None,
        });
    }
    let cluster_size = create.cluster_size;
    let extended_l2 = create.extended_l2;
    let l2_entry = if extended_l2 { 16 } else { 8 };
    let refcount_order = create.refcount_bits.trailing_zeros();
    let size = source.as_ref().map_or(create.size, |s| s.size());
    let virtual_size = size.div_ceil(cluster_size) * cluster_size;
    let l2_tables = (virtual_size / cluster_size).div_ceil(cluster_size / l2_entry);
    if l2_tables * 8 > MAX_L1_BYTES {
        return Err(Error::Measure(MeasureError::TooLarge));
    }
    let mut bitmaps = None;
    let mut data = 0;
    if let Some(source) = source {
        if let Disk::Qcow2(image) = &*source {
            if image.header().version >= 3 && create.version >= 3 {
                bitmaps = Some(0);
            }
        }
        data = if create.backing_file.is_some() {
            // Nothing is known about what the new backing file shares: count everything.
            virtual_size
        } else {
            data_clusters(source, cluster_size)? * cluster_size
        };
    }
    let fully_allocated =
        fully_allocated_size(virtual_size, cluster_size, refcount_order, extended_l2);
    Ok(Measurement {
        required: fully_allocated - virtual_size + data,
        fully_allocated,
        bitmaps,
    })
}

/// Clusters of `cluster_size` that hold data somewhere in `source`'s chain.
fn data_clusters(source: &mut Disk, cluster_size: u64) -> Result<u64> {
    let size = source.size();
    let mut clusters = 0;
    let mut offset = 0;
    while offset < size {
        let extent = source.status(offset, size - offset, usize::MAX)?;
        if extent.allocation == Allocation::Data {
            let first = offset / cluster_size;
            let end = (offset + extent.len).div_ceil(cluster_size);
            clusters += end - first;
            // Like QEMU, the rest of the last cluster is counted already.
            offset = end * cluster_size;
        } else {
            offset += extent.len;
        }
    }
    Ok(clusters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_qemu_img_measure() {
        // qemu-img measure --size 1G -O qcow2 (with the options noted).
        assert_eq!(
            fully_allocated_size(1 << 30, 65536, 4, false),
            1_074_135_040
        );
        assert_eq!(fully_allocated_size(1 << 30, 512, 0, false), 1_091_053_056);
        assert_eq!(fully_allocated_size(1 << 30, 65536, 4, true), 1_074_266_112);
        assert_eq!(fully_allocated_size(64 << 20, 4096, 4, false), 67_289_088);
    }
}
