//! Counting references like QEMU's `calculate_refcounts`: the header, every L1 and L2 table (active
//! and snapshots') and what they map, the snapshot table, the refcount table and blocks, and the
//! bitmap directory — each problem reported with qemu-img's message.

use byteorder::{BigEndian, ByteOrder};

use super::refs::{read_padded, Counted};
use super::Findings;
use crate::error::{Error, Result};
use crate::header::INCOMPAT_EXTL2;
use crate::image::Image;
use crate::l2::{COMPRESSED, COPIED, L1_RESERVED_MASK, OFFSET_MASK, ZERO};
use crate::raw::Storage;
use crate::refcount::REFTABLE_OFFSET_MASK;

/// Reserved bits of a standard (not compressed) L2 entry.
const L2_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry.
const REFTABLE_RESERVED_MASK: u64 = 0x1ff;
/// How far past the end of the file `-r all` extends it to take in a refcount block.
const MAX_REFBLOCK_GROWTH: u64 = 16 << 20;
/// Largest L1 table QEMU accepts, in entries.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

/// The kind of an L2 entry (QEMU's `QCow2ClusterType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

pub(super) fn kind(entry: u64, extended: bool, data_file: bool) -> Kind {
    if entry & COMPRESSED != 0 {
        Kind::Compressed
    } else if entry & ZERO != 0 && !extended {
        if entry & OFFSET_MASK != 0 {
            Kind::ZeroAlloc
        } else {
            Kind::ZeroPlain
        }
    } else if entry & OFFSET_MASK == 0 {
        if data_file && entry & COPIED != 0 {
            Kind::Normal
        } else {
            Kind::Unallocated
        }
    } else {
        Kind::Normal
    }
}

/// Host byte range of a compressed cluster (QEMU's `qcow2_parse_compressed_l2_entry`).
pub(super) fn compressed_range(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let size_shift = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << size_shift) - 1);
    let sectors = ((entry >> size_shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * 512 - (offset & 511))
}

/// Whether the image keeps its guest data in an external data file.
pub(super) fn has_data_file<S: Storage>(image: &Image<S>) -> bool {
    image.header.incompatible_features & crate::header::INCOMPAT_DATA_FILE != 0
}

/// One pass over the metadata.
pub(super) struct Walk<'a, S: Storage> {
    pub image: &'a mut Image<S>,
    pub findings: &'a mut Findings,
    pub counted: Counted,
    pub file_len: u64,
    /// `-r all`: fix what QEMU fixes while counting (misaligned preallocated clusters, refcount
    /// blocks past the end of the file).
    pub fix_errors: bool,
    /// The refcount structure must be rebuilt.
    pub rebuild: bool,
    /// Progress, one unit per L2 table of the active L1 table; a check without repairs stops
    /// when it asks to.
    pub monitor: &'a mut dyn crate::monitor::Monitor,
    pub tables_done: u64,
}

impl<S: Storage> Walk<'_, S> {
    fn cluster_size(&self) -> u64 {
        self.image.cluster_size
    }

    fn add(&mut self, offset: u64, size: u64) {
        self.counted.add(self.findings, self.file_len, offset, size);
    }

    /// QEMU's `calculate_refcounts`.
    pub fn run(&mut self) -> Result<()> {
        self.add(0, self.cluster_size());
        let (l1_offset, l1_size) = (
            self.image.header.l1_table_offset,
            u64::from(self.image.header.l1_size),
        );
        self.l1(l1_offset, l1_size, true)?;
        let snapshots = self.image.snapshots.clone();
        if has_data_file(self.image) && !snapshots.is_empty() {
            self.findings.corruption(format!(
                "ERROR {} snapshots in image with data file",
                snapshots.len()
            ));
        }
        for snapshot in &snapshots {
            if snapshot.l1_table_offset % self.cluster_size() != 0 {
                self.findings.corruption(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    snapshot.id, snapshot.name, snapshot.l1_table_offset
                ));
                continue;
            }
            if u64::from(snapshot.l1_size) > MAX_L1_ENTRIES {
                self.findings.corruption(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot \
                     table entry corrupted",
                    snapshot.id, snapshot.name, snapshot.l1_size
                ));
                continue;
            }
            self.l1(snapshot.l1_table_offset, u64::from(snapshot.l1_size), false)?;
        }
        let (snapshots_offset, snapshots_len) = (
            self.image.header.snapshots_offset,
            self.image.snapshot_table_len,
        );
        self.add(snapshots_offset, snapshots_len);
        let (table_offset, table_bytes) = (
            self.image.header.refcount_table_offset,
            u64::from(self.image.header.refcount_table_clusters) * self.cluster_size(),
        );
        self.add(table_offset, table_bytes);
        self.bitmaps()?;
        self.refblocks()
    }

    /// QEMU's `check_refcounts_l1`: the table itself, then every L2 table it points at.
    fn l1(&mut self, offset: u64, entries: u64, active: bool) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        self.add(offset, entries * 8);
        let mut raw = vec![0u8; (entries * 8) as usize];
        if read_padded(&mut self.image.file, &mut raw, offset).is_err() {
            self.findings
                .message("ERROR: I/O error in check_refcounts_l1".into());
            self.findings.tally.check_errors += 1;
            return Err(Error::ReadL1Table(std::io::ErrorKind::Other.into()));
        }
        for chunk in raw.chunks_exact(8) {
            let entry = BigEndian::read_u64(chunk);
            if entry == 0 {
                continue;
            }
            if entry & L1_RESERVED_MASK != 0 {
                self.findings.corruption(format!(
                    "ERROR found L1 entry with reserved bits set: {entry:x}"
                ));
            }
            let l2_offset = entry & OFFSET_MASK;
            self.add(l2_offset, self.cluster_size());
            if l2_offset % self.cluster_size() != 0 {
                self.findings.corruption(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry \
                     corrupted"
                ));
            }
            if active {
                if !self.fix_errors {
                    crate::monitor::checkpoint(self.monitor)?;
                }
                self.tables_done += 1;
                self.monitor.advance(self.tables_done);
            }
            self.l2(l2_offset, active)?;
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l2`.
    fn l2(&mut self, l2_offset: u64, active: bool) -> Result<()> {
        let cluster_size = self.cluster_size();
        let cluster_bits = self.image.cluster_bits;
        let extended = self.image.header.incompatible_features & INCOMPAT_EXTL2 != 0;
        let data_file = has_data_file(self.image);
        let words = if extended { 2 } else { 1 };
        let mut raw = vec![0u8; cluster_size as usize];
        if read_padded(&mut self.image.file, &mut raw, l2_offset).is_err() {
            self.findings
                .message("ERROR: I/O error in check_refcounts_l2".into());
            self.findings.tally.check_errors += 1;
            return Err(Error::ReadL2Table {
                offset: l2_offset,
                source: std::io::ErrorKind::Other.into(),
            });
        }
        let mut next_contiguous = 0u64;
        for (index, slot) in raw.chunks_exact(8 * words).enumerate() {
            let entry = BigEndian::read_u64(slot);
            let bitmap = if extended {
                BigEndian::read_u64(&slot[8..])
            } else {
                0
            };
            let kind = kind(entry, extended, data_file);
            if kind != Kind::Compressed && entry & L2_STD_RESERVED_MASK != 0 {
                self.findings.corruption(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
            }
            match kind {
                Kind::Compressed => {
                    let (offset, size) = compressed_range(entry, cluster_bits);
                    if entry & COPIED != 0 {
                        self.findings.corruption(format!(
                            "ERROR: coffset={offset:#x}: copied flag must never be set for \
                             compressed clusters"
                        ));
                    }
                    if data_file {
                        self.findings.corruption(format!(
                            "ERROR compressed cluster {index} with data file, entry={entry:#x}"
                        ));
                        continue;
                    }
                    if bitmap != 0 {
                        self.findings.corruption(format!(
                            "ERROR compressed cluster {index} with non-zero subcluster \
                             allocation bitmap, entry={entry:#x}"
                        ));
                        continue;
                    }
                    self.add(offset, size);
                    if active {
                        let tally = &mut self.findings.tally;
                        tally.allocated_clusters += 1;
                        tally.compressed_clusters += 1;
                        // Compressed clusters are fragmented by nature.
                        tally.fragmented_clusters += 1;
                    }
                }
                Kind::ZeroAlloc | Kind::Normal => {
                    let offset = entry & OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.findings.corruption(format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster \
                             allocation bitmap"
                        ));
                    }
                    if offset % cluster_size != 0 {
                        let contains_data = if extended {
                            bitmap & crate::l2::ALL_ALLOCATED != 0
                        } else {
                            entry & ZERO == 0
                        };
                        self.findings.tally.corruptions += 1;
                        if contains_data {
                            self.findings.message(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; \
                                 L2 entry corrupted."
                            ));
                        } else {
                            let verb = if self.fix_errors {
                                "Repairing"
                            } else {
                                "ERROR"
                            };
                            self.findings.message(format!(
                                "{verb} offset={offset:x}: Preallocated cluster is not properly \
                                 aligned; L2 entry corrupted."
                            ));
                            if self.fix_errors {
                                let at = l2_offset + (index * 8 * words) as u64;
                                match self.zero_entry(at, extended) {
                                    Ok(()) => {
                                        self.findings.tally.corruptions -= 1;
                                        self.findings.tally.corruptions_fixed += 1;
                                        continue;
                                    }
                                    Err(e) => {
                                        self.findings.message(format!(
                                            "ERROR: Failed to overwrite L2 table entry: {e}"
                                        ));
                                        self.findings.tally.check_errors += 1;
                                    }
                                }
                            }
                        }
                    }
                    if active {
                        let tally = &mut self.findings.tally;
                        tally.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            tally.fragmented_clusters += 1;
                        }
                        next_contiguous = offset + cluster_size;
                    }
                    if !data_file {
                        self.add(offset, cluster_size);
                    }
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if bitmap & crate::l2::ALL_ALLOCATED != 0 {
                        self.findings.corruption(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// QEMU's `fix_l2_entry_by_zero`: the entry becomes a plain zero cluster.
    fn zero_entry(&mut self, at: u64, extended: bool) -> Result<()> {
        let mut raw = [0u8; 16];
        let len = if extended {
            // All subclusters read as zeros.
            BigEndian::write_u64(&mut raw[8..], crate::l2::ALL_ALLOCATED << 32);
            16
        } else {
            BigEndian::write_u64(&mut raw, ZERO);
            8
        };
        self.image
            .file
            .write_at(&raw[..len], at)
            .map_err(|source| Error::WriteL2Table { offset: at, source })?;
        self.image.file.flush().map_err(Error::Flush)
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`: the directory, each bitmap table and its clusters.
    fn bitmaps(&mut self) -> Result<()> {
        let header = self.image.header.clone();
        let Some(directory) = crate::bitmap::directory(&header) else {
            return Ok(());
        };
        self.add(directory.offset, directory.size);
        let bitmaps = match crate::bitmap::read_bitmaps(&mut self.image.file, &header) {
            Ok(bitmaps) => bitmaps,
            Err(_) => {
                self.findings.tally.corruptions += 1;
                return Ok(());
            }
        };
        for bitmap in bitmaps {
            let table_bytes = u64::from(bitmap.table_size) * 8;
            if bitmap.table_offset.saturating_add(table_bytes) > self.file_len {
                // A table past the end of the file cannot be read: the directory is corrupt.
                self.findings.tally.corruptions += 1;
                break;
            }
            self.add(bitmap.table_offset, table_bytes);
            let mut raw = vec![0u8; bitmap.table_size as usize * 8];
            if read_padded(&mut self.image.file, &mut raw, bitmap.table_offset).is_err() {
                self.findings.tally.corruptions += 1;
                break;
            }
            for chunk in raw.chunks_exact(8) {
                let entry = BigEndian::read_u64(chunk);
                let offset = entry & 0x00ff_ffff_ffff_fe00;
                // Reserved bits, or an offset with the all-ones flag, or an unaligned offset.
                if entry & 0xff00_0000_0000_01fe != 0
                    || (offset != 0 && (entry & 1 != 0 || offset % self.cluster_size() != 0))
                {
                    self.findings.tally.corruptions += 1;
                    continue;
                }
                if offset != 0 {
                    self.add(offset, self.cluster_size());
                }
            }
        }
        Ok(())
    }

    /// QEMU's `check_refblocks`.
    fn refblocks(&mut self) -> Result<()> {
        let cluster_size = self.cluster_size();
        let table = super::refs::Stored::load(
            &mut self.image.file,
            self.image.header.refcount_table_offset,
            self.image.header.refcount_table_clusters,
            self.image.header.refcount_order,
            self.image.cluster_bits,
        )?
        .table;
        for (index, &entry) in table.iter().enumerate() {
            let offset = entry & REFTABLE_OFFSET_MASK;
            let cluster = offset >> self.image.cluster_bits;
            if entry & REFTABLE_RESERVED_MASK != 0 {
                self.findings.corruption(format!(
                    "ERROR refcount table entry {index} has reserved bits set"
                ));
                self.rebuild = true;
                continue;
            }
            if offset % cluster_size != 0 {
                self.findings.corruption(format!(
                    "ERROR refcount block {index} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                self.rebuild = true;
                continue;
            }
            if cluster >= self.counted.len() {
                self.findings.tally.corruptions += 1;
                let verb = if self.fix_errors {
                    "Repairing"
                } else {
                    "ERROR"
                };
                self.findings
                    .message(format!("{verb} refcount block {index} is outside image"));
                // QEMU grows the file to any length; this tool only a little (a block just past a
                // truncated end), so a hostile offset cannot make it write a huge file.
                let within_limits = offset
                    .checked_add(cluster_size)
                    .is_some_and(|end| end <= self.file_len + MAX_REFBLOCK_GROWTH);
                if self.fix_errors && !within_limits {
                    self.findings
                        .message("ERROR could not resize image: File too large".into());
                    self.rebuild = true;
                } else if self.fix_errors {
                    // QEMU grows the file over the block (which then reads as zeros).
                    let end = offset + cluster_size;
                    self.image.file.set_len(end).map_err(Error::SetLen)?;
                    self.image.file.flush().map_err(Error::Flush)?;
                    self.file_len = end;
                    self.counted.set(cluster, self.counted.get(cluster));
                    self.findings.tally.corruptions -= 1;
                    self.findings.tally.corruptions_fixed += 1;
                    self.add(offset, cluster_size);
                }
                continue;
            }
            if offset != 0 {
                self.add(offset, cluster_size);
                let count = self.counted.get(cluster);
                if count != 1 {
                    self.findings
                        .corruption(format!("ERROR refcount block {index} refcount={count}"));
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }
}
