//! Compressed-cluster writes (`qemu-img convert -c`): whole clusters compressed with the image's
//! compression type, packed back to back into host clusters like QEMU's byte allocator, each host
//! cluster's refcount counting the compressed clusters that touch it.

use super::Image;
use crate::compress::compress_cluster;
use crate::error::{Error, Result};
use crate::l2::COMPRESSED;
use crate::raw::Storage;

/// A cluster's compressed form, made off the image (on any thread) by [`Image::compressor`].
#[derive(Debug, Clone, Copy)]
pub struct Compressor {
    kind: crate::header::CompressionType,
    cluster_size: usize,
}

impl Compressor {
    /// The compressed bytes of one cluster (`data` at most a cluster, zero-padded), or `None`
    /// when compression does not make it smaller than a cluster.
    pub fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut padded;
        let input = if data.len() == self.cluster_size {
            data
        } else {
            padded = data.to_vec();
            padded.resize(self.cluster_size, 0);
            &padded
        };
        compress_cluster(self.kind, input, self.cluster_size - 1).map_err(Error::Compress)
    }
}

impl<S: Storage> Image<S> {
    /// A compressor for this image's clusters.
    pub fn compressor(&self) -> Compressor {
        Compressor {
            kind: self.header.compression_type,
            cluster_size: self.cluster_size as usize,
        }
    }

    /// Writes the guest cluster at `guest` (cluster aligned) compressed. `data` is the whole
    /// cluster, or the tail of the disk for its last cluster. Falls back to a normal write when
    /// the data does not compress.
    pub fn write_compressed(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        let packed = self.compressor().compress(data)?;
        self.write_packed(guest, data, packed)
    }

    /// Like [`Image::write_compressed`] with the compression already done by a [`Compressor`].
    pub fn write_packed(&mut self, guest: u64, data: &[u8], packed: Option<Vec<u8>>) -> Result<()> {
        self.check_writable()?;
        if self.header.has_data_file() {
            // QEMU refuses these too: a data file maps every cluster at its guest offset.
            return Err(Error::NotWithDataFile("compressed writes"));
        }
        self.check_range(guest, data.len())?;
        let Some(packed) = packed else {
            return self.write_at(data, guest);
        };
        if guest % self.cluster_size != 0
            || (data.len() as u64 != self.cluster_size && guest + data.len() as u64 != self.size())
        {
            return Err(Error::OutOfBounds {
                offset: guest,
                len: data.len() as u64,
                size: self.size(),
            });
        }
        let (l2_offset, index) = self.l2_for_write(guest)?;
        let old_entry = self.l2_entry(l2_offset, index);
        let old = self.decode(old_entry)?;
        let host = self.alloc_bytes(packed.len() as u64)?;
        self.write_host(&packed, host)?;
        let size_shift = 62 - (self.cluster_bits - 8);
        let extra_sectors = (host + packed.len() as u64 - 1) / 512 - host / 512;
        // Ordering: like any new data, the entry sits in the cached L2 table, written only after
        // the refcount barrier that also makes the compressed bytes durable.
        let entry = COMPRESSED | (extra_sectors << size_shift) | host;
        if self.header.extended_l2() {
            // A compressed cluster has no subclusters: its bitmap is zero.
            self.set_l2_pair(l2_offset, index, entry, 0)?;
        } else {
            self.set_l2_entry(l2_offset, index, entry)?;
        }
        self.release(old);
        self.bound_pending()
    }

    /// The mapping word of entry `index` of the cached L2 table at `l2_offset`.
    pub(crate) fn l2_entry(&mut self, l2_offset: u64, index: usize) -> u64 {
        let stride = self.l2_stride();
        self.l2_cache
            .get(l2_offset)
            .map(|table| table[index * stride])
            .unwrap_or(0)
    }

    /// Allocates `len` bytes for compressed data right after the previous compressed cluster
    /// when it fits (or spills into the cluster that follows, if that is the next one the
    /// allocator hands out), else at the start of a fresh cluster. Every host cluster the range
    /// touches gains one reference.
    fn alloc_bytes(&mut self, len: u64) -> Result<u64> {
        let cluster_size = self.cluster_size;
        if let Some(next) = self.compress_next.take() {
            let room = cluster_size - next % cluster_size;
            let current = next - next % cluster_size;
            if len <= room {
                self.refcounts.update_range(&mut self.file, current, 1, 1)?;
                self.note_compress_end(next + len);
                return Ok(next);
            }
            let fresh = self.alloc_cluster()?;
            if fresh == current + cluster_size {
                self.refcounts.update_range(&mut self.file, current, 1, 1)?;
                self.note_compress_end(next + len);
                return Ok(next);
            }
            self.note_compress_end(fresh + len);
            return Ok(fresh);
        }
        let fresh = self.alloc_cluster()?;
        self.note_compress_end(fresh + len);
        Ok(fresh)
    }

    fn note_compress_end(&mut self, end: u64) {
        self.compress_next = (end % self.cluster_size != 0).then_some(end);
    }
}
