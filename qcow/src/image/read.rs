//! Reading: L2 table lookup through the cache, mapping a guest offset, reading data, unallocated
//! ranges (backing file or zeros) and compressed clusters.

use byteorder::{BigEndian, ByteOrder};

use super::flush::{flush_data, refcount_barrier, write_l2};
use super::Image;
use crate::error::{Corruption, Error, Result};
use crate::header::{CompressionType, MAX_HOST_OFFSET};
use crate::l2::{Mapping, L1_RESERVED_MASK, OFFSET_MASK};
use crate::raw::Storage;

impl<S: Storage> Image<S> {
    /// Validated L2 table offset from an L1 entry (0 = none).
    pub(crate) fn l2_offset_of(&self, l1_index: usize) -> Result<u64> {
        let entry = self.l1.get(l1_index).copied().unwrap_or(0);
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(0);
        }
        if offset % self.cluster_size != 0 || entry & L1_RESERVED_MASK != 0 {
            return Err(Corruption::L2OffsetInvalid { l1_index, entry }.into());
        }
        Ok(offset)
    }

    /// Loads the L2 table at `offset` into the cache (evicting, with ordered write-back, if full).
    pub(crate) fn load_l2(&mut self, offset: u64) -> Result<()> {
        if self.l2_cache.contains(offset) {
            return Ok(());
        }
        if offset + self.cluster_size > self.known_len {
            self.known_len = self
                .file
                .len()
                .map_err(|source| Error::ReadL2Table { offset, source })?;
            if offset + self.cluster_size > self.known_len {
                return Err(Corruption::L2TablePastEnd { offset }.into());
            }
        }
        let mut raw = vec![0u8; self.cluster_size as usize];
        self.file
            .read_at(&mut raw, offset)
            .map_err(|source| Error::ReadL2Table { offset, source })?;
        let table: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        self.insert_l2(offset, table, false)
    }

    pub(crate) fn insert_l2(&mut self, offset: u64, table: Vec<u64>, dirty: bool) -> Result<()> {
        let file = &mut self.file;
        let refcounts = &mut self.refcounts;
        let alloc_end = self.alloc_end;
        let known_len = &mut self.known_len;
        let data = &mut self.data;
        let data_dirty = &mut self.data_dirty;
        self.l2_cache
            .insert(offset, table, dirty, |victim, victim_table| {
                // Ordering: refcounts (and data) for every entry of the evicted table reach the disk
                // before the table does.
                flush_data(data.as_mut(), data_dirty)?;
                refcount_barrier(file, refcounts, alloc_end, known_len)?;
                write_l2(file, victim, victim_table)
            })
    }

    /// The mapping of the guest cluster containing `guest` — with extended L2 entries, of the
    /// subcluster containing it (see [`Image::granule`]).
    pub fn mapping(&mut self, guest: u64) -> Result<Mapping> {
        let l2_offset = self.l2_offset_of(self.l1_index(guest))?;
        if l2_offset == 0 {
            return Ok(Mapping::Unallocated);
        }
        self.load_l2(l2_offset)?;
        let index = self.l2_index(guest);
        let (entry, mapping) = if self.header.extended_l2() {
            let (entry, bitmap) = self.l2_pair(l2_offset, index);
            let cluster = self.decode(entry)?;
            let sub = self.subcluster(guest);
            (entry, Mapping::sub_of(cluster, entry, bitmap, sub)?)
        } else {
            let entry = self.l2_cache.get(l2_offset).map(|t| t[index]).unwrap_or(0);
            (entry, self.decode(entry)?)
        };
        if self.header.has_data_file() {
            return self.check_data_file_mapping(mapping, entry, guest);
        }
        Ok(mapping)
    }

    /// Reads `buf.len()` bytes at guest offset `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        let mut done = 0usize;
        // A run of contiguous host data, read with one call: (host offset, buffer start, length).
        let mut run: Option<(u64, usize, usize)> = None;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_cluster = guest & (self.cluster_size - 1);
            let n = self.to_granule_end(guest).min(buf.len() - done);
            let mapping = self.mapping(guest)?;
            if let Mapping::Normal { host, .. } = mapping {
                let host = host + in_cluster;
                run = match run {
                    Some((start, at, len)) if start + len as u64 == host => {
                        Some((start, at, len + n))
                    }
                    Some((start, at, len)) => {
                        self.read_host(&mut buf[at..at + len], start)?;
                        Some((host, done, n))
                    }
                    None => Some((host, done, n)),
                };
            } else {
                if let Some((start, at, len)) = run.take() {
                    self.read_host(&mut buf[at..at + len], start)?;
                }
                self.read_unmapped(mapping, guest, &mut buf[done..done + n])?;
            }
            done += n;
        }
        if let Some((start, at, len)) = run {
            self.read_host(&mut buf[at..at + len], start)?;
        }
        Ok(())
    }

    /// Reads guest data at host offset `host` (of the data file, if the image has one).
    pub(crate) fn read_host(&mut self, buf: &mut [u8], host: u64) -> Result<()> {
        self.data_storage()?
            .read_at(buf, host)
            .map_err(|source| Error::ReadData {
                offset: host,
                source,
            })
    }

    /// Reads a part of one cluster that is not plain data.
    pub(crate) fn read_unmapped(
        &mut self,
        mapping: Mapping,
        guest: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let in_cluster = (guest & (self.cluster_size - 1)) as usize;
        match mapping {
            Mapping::Unallocated => match self.backing.as_mut() {
                Some(backing) => backing.read_padded(buf, guest),
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
            Mapping::ZeroPlain | Mapping::ZeroAlloc { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Normal { host, .. } => self.read_host(buf, host + in_cluster as u64),
            Mapping::Compressed { host, len, .. } => {
                self.decompress(host, len)?;
                if let Some((_, data)) = &self.decompressed {
                    buf.copy_from_slice(&data[in_cluster..in_cluster + buf.len()]);
                }
                Ok(())
            }
        }
    }

    /// Decompresses the cluster at host byte `host` into `self.decompressed`.
    pub(crate) fn decompress(&mut self, host: u64, len: u64) -> Result<()> {
        if matches!(&self.decompressed, Some((cached, _)) if *cached == host) {
            return Ok(());
        }
        if host == 0 || host + len > MAX_HOST_OFFSET || len > 2 * self.cluster_size + 512 {
            return Err(Error::Decompress {
                offset: host,
                why: "compressed cluster descriptor out of range".into(),
            });
        }
        let mut input = vec![0u8; len as usize];
        self.file
            .read_at(&mut input, host)
            .map_err(|source| Error::ReadData {
                offset: host,
                source,
            })?;
        let mut output = match self.decompressed.take() {
            Some((_, buf)) => buf,
            None => Vec::new(),
        };
        output.clear();
        output.resize(self.cluster_size as usize, 0);
        let result = match self.header.compression_type {
            CompressionType::Deflate => crate::compress::inflate_raw(&input, &mut output),
            CompressionType::Zstd => crate::compress::unzstd(&input, &mut output),
        };
        result.map_err(|why| Error::Decompress { offset: host, why })?;
        self.decompressed = Some((host, output));
        Ok(())
    }
}
