//! Block status: what a range of a disk holds (data, zeros, or nothing at this layer) and how far
//! that lasts, per layer and through a backing chain — QEMU's `bdrv_block_status_above`, which
//! convert, compare, commit and rebase use to skip what needs no copying.

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::l2::Mapping;
use crate::raw::Storage;

/// What a range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored at this layer (or in a raw file).
    Data,
    /// Reads as zeros, decided at this layer (zero clusters, holes of raw files, past the end of
    /// a backing file).
    Zero,
    /// Not decided by the layers looked at: read from below, or zeros if nothing is below.
    Unallocated,
}

/// A run of one [`Allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub allocation: Allocation,
    pub len: u64,
    /// The layer that decided (0 = the disk itself).
    pub depth: usize,
}

impl<S: Storage> Image<S> {
    /// The run of guest clusters from `offset` that read the same way: the mapping of `offset`'s
    /// cluster (a host offset moved to `offset` itself) and how many bytes, up to `max_len`, the
    /// end of the disk and the end of the L2 table, share its kind — for allocated clusters also
    /// lying back to back on the host (QEMU's `count_contiguous_subclusters`). Without an L2
    /// table the run is unallocated to the table's end; otherwise, with extended L2 entries and
    /// for compressed clusters, a run is one granule or cluster.
    pub fn mapping_run(&mut self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let first = self.mapping(offset)?;
        let cluster_size = self.cluster_size;
        let in_cluster = offset % cluster_size;
        let table_span = cluster_size << self.l2_bits;
        let end = offset
            .saturating_add(max_len)
            .min((offset / table_span + 1) * table_span)
            .min(self.size());
        let at_offset = match first {
            Mapping::Normal { host, copied } => Mapping::Normal {
                host: host + in_cluster,
                copied,
            },
            Mapping::ZeroAlloc { host } => Mapping::ZeroAlloc {
                host: host + in_cluster,
            },
            other => other,
        };
        let l2_offset = self.l2_offset_of(self.l1_index(offset))?;
        if l2_offset == 0 {
            return Ok((at_offset, end - offset));
        }
        let granule = self.granule();
        let first_len = (granule - offset % granule).min(end - offset);
        if self.header.extended_l2() || matches!(first, Mapping::Compressed { .. }) {
            return Ok((at_offset, first_len));
        }
        let (cluster_bits, data_file) = (self.cluster_bits, self.header.has_data_file());
        let start_index = self.l2_index(offset);
        // `mapping` just loaded the table; it is only missing if the cache holds nothing.
        let Some(table) = self.l2_cache.get(l2_offset) else {
            return Ok((at_offset, first_len));
        };
        let clusters = (end - offset + in_cluster).div_ceil(cluster_size) as usize;
        let mut same = 1;
        for &entry in &table[start_index + 1..start_index + clusters] {
            // A bad entry ends the run; `mapping` reports it when the next run starts there.
            let Ok(mut next) = Mapping::decode(entry, cluster_bits) else {
                break;
            };
            if data_file {
                next = crate::image::data_file_cluster(entry, next);
            }
            let shift = same as u64 * cluster_size;
            let continues = match (first, next) {
                (Mapping::Normal { host: a, .. }, Mapping::Normal { host: b, .. })
                | (Mapping::ZeroAlloc { host: a }, Mapping::ZeroAlloc { host: b }) => {
                    a + shift == b
                }
                (Mapping::Unallocated, Mapping::Unallocated)
                | (Mapping::ZeroPlain, Mapping::ZeroPlain) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            same += 1;
        }
        let len = (same as u64 * cluster_size - in_cluster).min(end - offset);
        Ok((at_offset, len))
    }

    /// Status of this image's own layer at `offset`: like QEMU, a run never crosses an L2 table
    /// and a data run ends where its host clusters stop being contiguous.
    pub fn layer_status(&mut self, offset: u64, max_len: u64) -> Result<(Allocation, u64)> {
        let cluster_size = self.cluster_size;
        let table_span = cluster_size << self.l2_bits;
        let table_end = (offset / table_span + 1) * table_span;
        let end = offset
            .saturating_add(max_len)
            .min(table_end)
            .min(self.size());
        let granule = self.granule();
        let mut guest = offset;
        let mut kind = None;
        let mut next_host = 0;
        while guest < end {
            let mapping = self.mapping(guest)?;
            let in_cluster = guest % cluster_size - guest % granule;
            let (this, host, compressed) = match mapping {
                Mapping::Normal { host, .. } => (Allocation::Data, host + in_cluster, false),
                Mapping::Compressed { host, .. } => (Allocation::Data, host, true),
                Mapping::ZeroPlain | Mapping::ZeroAlloc { .. } => (Allocation::Zero, 0, false),
                Mapping::Unallocated => (Allocation::Unallocated, 0, false),
            };
            match kind {
                None => kind = Some(this),
                Some(k) if k != this => break,
                Some(Allocation::Data) if compressed || host != next_host => break,
                Some(_) => {}
            }
            next_host = host + granule;
            if compressed {
                // A compressed cluster is a run of its own.
                guest = (guest / cluster_size + 1) * cluster_size;
                break;
            }
            guest = (guest / granule + 1) * granule;
        }
        let len = guest.min(end) - offset;
        Ok((kind.unwrap_or(Allocation::Unallocated), len.max(1)))
    }
}

impl Disk {
    /// Status at `offset` looking through at most `layers` layers of the backing chain (1 = this
    /// disk only); a run is at most `max_len` long. Past the end of a backing file reads as
    /// zeros, decided by that layer.
    pub fn status(&mut self, offset: u64, max_len: u64, layers: usize) -> Result<Extent> {
        self.status_at_depth(offset, max_len, layers, 0)
    }

    fn status_at_depth(
        &mut self,
        offset: u64,
        max_len: u64,
        layers: usize,
        depth: usize,
    ) -> Result<Extent> {
        let max_len = max_len.min(self.size().saturating_sub(offset)).max(1);
        match self {
            Disk::Raw(raw) => {
                let (is_data, len) = raw
                    .storage_mut()
                    .extent_at(offset, max_len)
                    .map_err(|source| Error::ReadData { offset, source })?;
                let allocation = if is_data {
                    Allocation::Data
                } else {
                    Allocation::Zero
                };
                Ok(Extent {
                    allocation,
                    len: len.clamp(1, max_len),
                    depth,
                })
            }
            Disk::Qcow2(image) => {
                let (allocation, len) = image.layer_status(offset, max_len)?;
                if allocation != Allocation::Unallocated || layers <= 1 {
                    return Ok(Extent {
                        allocation,
                        len,
                        depth,
                    });
                }
                match image.backing.as_deref_mut() {
                    None => Ok(Extent {
                        allocation,
                        len,
                        depth,
                    }),
                    Some(backing) if offset >= backing.size() => Ok(Extent {
                        allocation: Allocation::Zero,
                        len,
                        depth: depth + 1,
                    }),
                    Some(backing) => {
                        let len = len.min(backing.size() - offset);
                        backing.status_at_depth(offset, len, layers - 1, depth + 1)
                    }
                }
            }
        }
    }

    /// The backing disk of a qcow2 image, if it has one open.
    pub fn backing_mut(&mut self) -> Option<&mut Disk> {
        match self {
            Disk::Qcow2(image) => image.backing.as_deref_mut(),
            Disk::Raw(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::image::OpenOptions;
    use crate::raw::MemStorage;

    /// A 4 MiB image of 4 KiB clusters: an L2 table maps 2 MiB.
    fn image_4m() -> Image<MemStorage> {
        let mut storage = MemStorage::default();
        let options = CreateOptions {
            size: 4 << 20,
            cluster_size: 4096,
            ..CreateOptions::default()
        };
        create_on(&mut storage, &options).unwrap();
        Image::open_storage(storage, None, &OpenOptions::default()).unwrap()
    }

    #[test]
    fn runs_follow_cluster_kinds_and_table_boundaries() {
        let mut image = image_4m();
        image.write_at(&[1u8; 8192], 4096).unwrap();
        image.write_zeroes(16384, 4096).unwrap();
        assert_eq!(
            image.layer_status(0, 1 << 20).unwrap(),
            (Allocation::Unallocated, 4096)
        );
        assert_eq!(
            image.layer_status(4096, 1 << 20).unwrap(),
            (Allocation::Data, 8192)
        );
        assert_eq!(
            image.layer_status(16384, 1 << 20).unwrap(),
            (Allocation::Zero, 4096)
        );
        // One L2 table of 4 KiB clusters maps 2 MiB: runs stop there.
        assert_eq!(
            image.layer_status(20480, 4 << 20).unwrap(),
            (Allocation::Unallocated, (2 << 20) - 20480)
        );
    }

    #[test]
    fn mapping_runs_follow_host_contiguity_and_tables() {
        let mut image = image_4m();
        // Clusters 1 to 3, written at once, lie back to back; cluster 4, written first, lies
        // before them on the host.
        image.write_at(&[2u8; 4096], 16384).unwrap();
        image.write_at(&[1u8; 12288], 4096).unwrap();
        let Mapping::Normal { host, .. } = image.mapping(4096).unwrap() else {
            panic!("cluster 1 is not data");
        };
        let (run, len) = image.mapping_run(4096 + 100, 1 << 20).unwrap();
        assert_eq!(len, 12288 - 100);
        assert!(matches!(run, Mapping::Normal { host: h, .. } if h == host + 100));
        // `max_len` and the disk's end cut a run short.
        assert_eq!(image.mapping_run(4096, 5000).unwrap().1, 5000);
        assert_eq!(image.mapping_run(12288, 1 << 30).unwrap().1, 4096);
        // Unallocated up to the end of the first table, and without a table to the end of its own.
        assert_eq!(
            image.mapping_run(20480, 1 << 30).unwrap(),
            (Mapping::Unallocated, (2 << 20) - 20480)
        );
        assert_eq!(
            image.mapping_run(3 << 20, 1 << 30).unwrap(),
            (Mapping::Unallocated, 1 << 20)
        );
    }
}
