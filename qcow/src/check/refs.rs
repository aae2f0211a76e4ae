//! The two sides `check` compares: references counted from the tables (QEMU's in-memory refcount
//! table) and the refcounts stored in the image, read and repaired the way QEMU does.

use std::collections::{BTreeSet, HashMap};

use byteorder::{BigEndian, ByteOrder};

use super::Findings;
use crate::error::{Error, Result};
use crate::raw::Storage;
use crate::refcount::{get_entry, max_refcount, set_entry, REFTABLE_OFFSET_MASK};

/// References per host cluster, as counted from the metadata.
#[derive(Debug, Clone)]
pub(super) struct Counted {
    pub counts: Vec<u64>,
    cluster_bits: u32,
    max: u64,
}

impl Counted {
    pub fn new(clusters: u64, cluster_bits: u32, refcount_order: u32) -> Counted {
        Counted {
            counts: vec![0; clusters as usize],
            cluster_bits,
            max: max_refcount(refcount_order),
        }
    }

    pub fn get(&self, cluster: u64) -> u64 {
        self.counts.get(cluster as usize).copied().unwrap_or(0)
    }

    pub fn len(&self) -> u64 {
        self.counts.len() as u64
    }

    pub fn set(&mut self, cluster: u64, value: u64) {
        let index = cluster as usize;
        if self.counts.len() <= index {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] = value;
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`: one more reference to every cluster of
    /// `[offset, offset + size)`, refused when it reaches a cluster or more past the file's end.
    pub fn add(&mut self, findings: &mut Findings, file_len: u64, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let cluster_size = 1u64 << self.cluster_bits;
        let end = i128::from(offset) + i128::from(size);
        if end - i128::from(file_len) >= i128::from(cluster_size) {
            findings.corruption(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            ));
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + size - 1) >> self.cluster_bits;
        for cluster in first..=last {
            let current = self.get(cluster);
            if current == self.max {
                findings.corruption(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    cluster << self.cluster_bits
                ));
                findings.message(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert \
                     to create a clean copy if the image cannot be opened for writing"
                        .into(),
                );
                continue;
            }
            self.set(cluster, current + 1);
        }
    }
}

/// The refcounts stored in the image (refcount table and blocks), read like QEMU: a block past
/// the end of the file reads as zeros, an unaligned block entry is an I/O error.
#[derive(Debug)]
pub(super) struct Stored {
    pub table: Vec<u64>,
    order: u32,
    cluster_bits: u32,
    per_block: u64,
    blocks: HashMap<u64, Vec<u8>>,
    dirty: BTreeSet<u64>,
}

/// A refcount that cannot be read (QEMU's `-EIO` from `qcow2_get_refcount`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unreadable;

impl Stored {
    pub fn load<S: Storage + ?Sized>(
        file: &mut S,
        table_offset: u64,
        table_clusters: u32,
        order: u32,
        cluster_bits: u32,
    ) -> Result<Stored> {
        let bytes = u64::from(table_clusters) << cluster_bits;
        let mut raw = vec![0u8; bytes as usize];
        read_padded(file, &mut raw, table_offset).map_err(Error::ReadRefcountTable)?;
        Ok(Stored {
            table: raw.chunks_exact(8).map(BigEndian::read_u64).collect(),
            order,
            cluster_bits,
            per_block: (8u64 << cluster_bits) >> order,
            blocks: HashMap::new(),
            dirty: BTreeSet::new(),
        })
    }

    fn block_offset(&self, cluster: u64) -> std::result::Result<u64, Unreadable> {
        let entry = self
            .table
            .get((cluster / self.per_block) as usize)
            .copied()
            .unwrap_or(0);
        let offset = entry & REFTABLE_OFFSET_MASK;
        if offset % (1u64 << self.cluster_bits) != 0 {
            return Err(Unreadable);
        }
        Ok(offset)
    }

    fn block<S: Storage + ?Sized>(&mut self, file: &mut S, offset: u64) -> Result<&mut Vec<u8>> {
        if !self.blocks.contains_key(&offset) {
            let mut block = vec![0u8; 1 << self.cluster_bits];
            read_padded(file, &mut block, offset)
                .map_err(|source| Error::ReadRefcountBlock { offset, source })?;
            self.blocks.insert(offset, block);
        }
        self.blocks
            .get_mut(&offset)
            .ok_or(Error::ReadRefcountBlock {
                offset,
                source: std::io::ErrorKind::NotFound.into(),
            })
    }

    /// The stored refcount of `cluster` (0 without a refcount block).
    pub fn get<S: Storage + ?Sized>(
        &mut self,
        file: &mut S,
        cluster: u64,
    ) -> Result<std::result::Result<u64, Unreadable>> {
        let offset = match self.block_offset(cluster) {
            Ok(0) => return Ok(Ok(0)),
            Ok(offset) => offset,
            Err(e) => return Ok(Err(e)),
        };
        let index = (cluster % self.per_block) as usize;
        let order = self.order;
        Ok(Ok(get_entry(self.block(file, offset)?, index, order)))
    }

    /// Sets the stored refcount of `cluster`, whose block exists; written by [`Stored::flush`].
    pub fn set<S: Storage + ?Sized>(
        &mut self,
        file: &mut S,
        cluster: u64,
        value: u64,
    ) -> Result<()> {
        let offset = match self.block_offset(cluster) {
            Ok(offset) if offset != 0 => offset,
            _ => {
                return Err(crate::error::Corruption::NoRefcountBlock { cluster }.into());
            }
        };
        let index = (cluster % self.per_block) as usize;
        let order = self.order;
        set_entry(self.block(file, offset)?, index, order, value);
        self.dirty.insert(offset);
        Ok(())
    }

    /// Writes the changed refcount blocks and makes them durable.
    pub fn flush<S: Storage + ?Sized>(&mut self, file: &mut S) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        for offset in std::mem::take(&mut self.dirty) {
            if let Some(block) = self.blocks.get(&offset) {
                file.write_at(block, offset)
                    .map_err(|source| Error::WriteRefcountBlock { offset, source })?;
            }
        }
        file.flush().map_err(Error::Flush)
    }
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros (as QEMU's
/// block layer returns them).
pub(super) fn read_padded<S: Storage + ?Sized>(
    file: &mut S,
    buf: &mut [u8],
    offset: u64,
) -> std::io::Result<()> {
    let len = file.len()?;
    buf.fill(0);
    if offset >= len {
        return Ok(());
    }
    let avail = ((len - offset) as usize).min(buf.len());
    file.read_at(&mut buf[..avail], offset)
}
