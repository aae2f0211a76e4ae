//! `Image`: an open qcow2 image — byte-granular read/write/zero/discard/flush over L1/L2 tables,
//! with copy-on-write from backing files, compressed and shared clusters, and ordered metadata writes.

use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder};

pub use crate::backing::{open_backing, resolve_backing_path, Backing, MAX_BACKING_DEPTH};
use crate::cache::TableCache;
use crate::error::{Error, Result};
use crate::header::{
    CompressionType, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
    MAX_HOST_OFFSET,
};
use crate::l2::{Mapping, COPIED, L1_RESERVED_MASK, OFFSET_MASK};
use crate::raw::{AlignedBuf, FileStorage, Storage};
use crate::refcount::Refcounts;
use crate::snapshot::{self, Snapshot};

mod zero;

/// Deferred frees beyond which a write forces a flush (bounds memory).
const MAX_PENDING_FREES: usize = 4096;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Bytes of L2 tables to cache (default covers 32 GiB of disk at 64 KiB clusters).
    pub l2_cache_bytes: u64,
    /// Bytes of refcount blocks to cache.
    pub refcount_cache_bytes: u64,
    /// Open for checking/repair: a corrupt image may be opened read-write and a dirty one is not
    /// repaired automatically.
    pub check_mode: bool,
    /// Flushes reach the disk (false = qemu's cache=unsafe).
    pub sync: bool,
    /// Do not open the backing file (for info and check, like qemu-img): unallocated clusters then
    /// read as zeros.
    pub no_backing: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            l2_cache_bytes: 4 << 20,
            refcount_cache_bytes: 1 << 20,
            check_mode: false,
            sync: true,
            no_backing: false,
        }
    }
}

/// An open qcow2 image over storage `S`.
#[derive(Debug)]
pub struct Image<S: Storage = FileStorage> {
    pub(crate) file: S,
    pub(crate) header: Header,
    pub(crate) path: Option<PathBuf>,
    read_only: bool,
    pub(crate) cluster_bits: u32,
    pub(crate) cluster_size: u64,
    l2_bits: u32,
    pub(crate) l1: Vec<u64>,
    l1_dirty: Option<(usize, usize)>,
    l2_cache: TableCache<Vec<u64>>,
    pub(crate) refcounts: Refcounts,
    pub(crate) backing: Option<Box<Backing>>,
    /// Host ranges whose refcount drops once the tables that stopped referencing them are durable.
    pending_frees: Vec<(u64, u64)>,
    /// End of the highest cluster allocated since open.
    alloc_end: u64,
    /// Known file length (at least).
    known_len: u64,
    decompressed: Option<(u64, Vec<u8>)>,
    scratch: AlignedBuf,
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) snapshot_table_len: u64,
    /// Cached result of [`Image::metadata_preallocated`]; reset by allocations.
    metadata_preallocated: Option<bool>,
}

impl Image<FileStorage> {
    /// Opens the image file at `path`.
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Self> {
        Self::open_depth(path.as_ref(), options, 0)
    }

    fn open_depth(path: &Path, options: &OpenOptions, depth: usize) -> Result<Self> {
        let file = FsOpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(path)
            .map_err(|source| Error::OpenFile {
                path: path.to_path_buf(),
                source,
            })?;
        let mut storage = FileStorage::new(file);
        storage.set_sync(options.sync);
        Image::open_storage_depth(storage, Some(path.to_path_buf()), options, depth)
    }
}

impl<S: Storage> Image<S> {
    /// Opens an image on arbitrary storage. `path` locates relative backing file names.
    pub fn open_storage(file: S, path: Option<PathBuf>, options: &OpenOptions) -> Result<Self> {
        Self::open_storage_depth(file, path, options, 0)
    }

    pub(crate) fn open_storage_depth(
        mut file: S,
        path: Option<PathBuf>,
        options: &OpenOptions,
        depth: usize,
    ) -> Result<Self> {
        let file_len = file.len().map_err(Error::ReadHeader)?;
        let mut first = vec![0u8; 104];
        file.read_at(&mut first, 0).map_err(Error::ReadHeader)?;
        if file_len < 72 {
            return Err(Error::InvalidHeader(format!(
                "file is only {file_len} bytes long"
            )));
        }
        // Learn the cluster size, then read the whole header cluster (bounded by cluster_bits ≤ 21).
        let cluster_bits = BigEndian::read_u32(&first[20..]);
        let header_bytes = if (9..=21).contains(&cluster_bits) {
            1usize << cluster_bits
        } else {
            104
        };
        let mut cluster0 = vec![0u8; header_bytes];
        file.read_at(&mut cluster0, 0).map_err(Error::ReadHeader)?;
        let header = Header::parse(&cluster0)?;
        let read_only = options.read_only;
        if header.incompatible_features & INCOMPAT_CORRUPT != 0 && !read_only && !options.check_mode
        {
            return Err(Error::CorruptImage);
        }
        let cluster_size = header.cluster_size();
        // Tables must lie inside the file (QEMU allows them anywhere; a table past EOF is garbage).
        let l1_bytes = u64::from(header.l1_size) * 8;
        if header.l1_size > 0 && header.l1_table_offset + l1_bytes > file_len {
            return Err(Error::InvalidTableOffset {
                what: "L1 table",
                offset: header.l1_table_offset,
                why: "past the end of the file",
            });
        }
        let reftable_bytes = u64::from(header.refcount_table_clusters) * cluster_size;
        if header.refcount_table_offset + reftable_bytes > file_len {
            return Err(Error::InvalidTableOffset {
                what: "refcount table",
                offset: header.refcount_table_offset,
                why: "past the end of the file",
            });
        }
        let mut l1_raw = vec![0u8; l1_bytes as usize];
        file.read_at(&mut l1_raw, header.l1_table_offset)
            .map_err(Error::ReadL1Table)?;
        let l1: Vec<u64> = l1_raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        let (snapshots, snapshot_table_len) = snapshot::read_table(
            &mut file,
            header.snapshots_offset,
            header.nb_snapshots,
            cluster_size,
        )?;
        let refcount_blocks = (options.refcount_cache_bytes / cluster_size).max(4) as usize;
        let mut refcounts = Refcounts::load(
            &mut file,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            header.refcount_order,
            header.cluster_bits,
            refcount_blocks,
        )?;
        let mut protected = vec![
            (0, cluster_size),
            (header.refcount_table_offset, reftable_bytes),
        ];
        if l1_bytes > 0 {
            protected.push((header.l1_table_offset, l1_bytes));
        }
        if snapshot_table_len > 0 {
            protected.push((header.snapshots_offset, snapshot_table_len));
        }
        refcounts.set_protected(protected);
        let backing = match &header.backing_file {
            Some(name) if !name.is_empty() && !options.no_backing => {
                let backing_path = resolve_backing_path(path.as_deref(), name);
                Some(Box::new(open_backing(
                    &backing_path,
                    header.backing_format.as_deref(),
                    depth,
                )?))
            }
            _ => None,
        };
        let l2_tables = (options.l2_cache_bytes / cluster_size).max(4) as usize;
        let mut image = Image {
            file,
            cluster_bits: header.cluster_bits,
            cluster_size,
            l2_bits: header.cluster_bits - 3,
            header,
            path,
            read_only,
            l1,
            l1_dirty: None,
            l2_cache: TableCache::new(l2_tables),
            refcounts,
            backing,
            pending_frees: Vec::new(),
            alloc_end: 0,
            known_len: file_len,
            decompressed: None,
            scratch: AlignedBuf::default(),
            snapshots,
            snapshot_table_len,
            metadata_preallocated: None,
        };
        if !read_only && !options.check_mode {
            if image.header.incompatible_features & INCOMPAT_DIRTY != 0 {
                // Lazy refcounts (or a crash with them) left refcounts stale: rebuild from the tables.
                let report = crate::check::check(&mut image, crate::check::Repair::All)?;
                if report.corruptions > 0 || report.check_errors > 0 {
                    return Err(Error::Corrupt(format!(
                        "could not repair dirty image: {} corruptions remain",
                        report.corruptions + report.check_errors
                    )));
                }
                image.set_incompatible(image.header.incompatible_features & !INCOMPAT_DIRTY)?;
            }
            if image.header.autoclear_features != 0 {
                // We do not maintain bitmaps or other autoclear features: clearing the bits tells
                // other tools the corresponding data is stale.
                image.header.autoclear_features = 0;
                image
                    .file
                    .write_at(&[0u8; 8], 88)
                    .map_err(Error::WriteHeader)?;
                image.file.flush().map_err(Error::Flush)?;
            }
        }
        Ok(image)
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn backing(&self) -> Option<&Backing> {
        self.backing.as_deref()
    }

    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.header.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Data-or-hole state of the host file at `host` (see [`Storage::extent_at`]).
    pub fn host_extent(&mut self, host: u64, len: u64) -> Result<(bool, u64)> {
        self.file
            .extent_at(host, len)
            .map_err(|source| Error::ReadData {
                offset: host,
                source,
            })
    }

    /// Bytes the image file occupies on the host.
    pub fn allocated_size(&mut self) -> Option<u64> {
        self.file.allocated_size()
    }

    /// Length of the image file.
    pub fn file_len(&mut self) -> Result<u64> {
        self.file.len().map_err(Error::ReadHeader)
    }

    /// The underlying storage.
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.file
    }

    pub(crate) fn set_incompatible(&mut self, bits: u64) -> Result<()> {
        self.header.incompatible_features = bits;
        let mut field = [0u8; 8];
        BigEndian::write_u64(&mut field, bits);
        // Ordering: everything the bit change vouches for is flushed first, the bit itself after.
        self.file.flush().map_err(Error::Flush)?;
        self.file.write_at(&field, 72).map_err(Error::WriteHeader)?;
        self.file.flush().map_err(Error::Flush)
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        let len = len as u64;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.header.size)
        {
            return Err(Error::OutOfBounds {
                offset,
                len,
                size: self.header.size,
            });
        }
        Ok(())
    }

    fn l1_index(&self, guest: u64) -> usize {
        (guest >> (self.cluster_bits + self.l2_bits)) as usize
    }

    fn l2_index(&self, guest: u64) -> usize {
        ((guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) as usize
    }

    /// Validated L2 table offset from an L1 entry (0 = none).
    fn l2_offset_of(&self, l1_index: usize) -> Result<u64> {
        let entry = self.l1.get(l1_index).copied().unwrap_or(0);
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(0);
        }
        if offset % self.cluster_size != 0 || entry & L1_RESERVED_MASK != 0 {
            return Err(Error::Corrupt(format!(
                "L2 table offset {entry:#x} (L1 index {l1_index}) is unaligned or has reserved bits set"
            )));
        }
        Ok(offset)
    }

    /// Loads the L2 table at `offset` into the cache (evicting, with ordered write-back, if full).
    fn load_l2(&mut self, offset: u64) -> Result<()> {
        if self.l2_cache.contains(offset) {
            return Ok(());
        }
        if offset + self.cluster_size > self.known_len {
            self.known_len = self
                .file
                .len()
                .map_err(|source| Error::ReadL2Table { offset, source })?;
            if offset + self.cluster_size > self.known_len {
                return Err(Error::Corrupt(format!(
                    "L2 table at {offset:#x} is past the end of the file"
                )));
            }
        }
        let mut raw = vec![0u8; self.cluster_size as usize];
        self.file
            .read_at(&mut raw, offset)
            .map_err(|source| Error::ReadL2Table { offset, source })?;
        let table: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        self.insert_l2(offset, table, false)
    }

    fn insert_l2(&mut self, offset: u64, table: Vec<u64>, dirty: bool) -> Result<()> {
        let file = &mut self.file;
        let refcounts = &mut self.refcounts;
        let alloc_end = self.alloc_end;
        let known_len = &mut self.known_len;
        self.l2_cache
            .insert(offset, table, dirty, |victim, victim_table| {
                // Ordering: refcounts (and data) for every entry of the evicted table reach the disk
                // before the table does.
                refcount_barrier(file, refcounts, alloc_end, known_len)?;
                write_l2(file, victim, victim_table)
            })
    }

    /// The mapping of the guest cluster containing `guest`.
    pub fn mapping(&mut self, guest: u64) -> Result<Mapping> {
        let l2_offset = self.l2_offset_of(self.l1_index(guest))?;
        if l2_offset == 0 {
            return Ok(Mapping::Unallocated);
        }
        self.load_l2(l2_offset)?;
        let index = self.l2_index(guest);
        let entry = self.l2_cache.get(l2_offset).map(|t| t[index]).unwrap_or(0);
        Mapping::decode(entry, self.cluster_bits)
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
            let n = ((self.cluster_size - in_cluster) as usize).min(buf.len() - done);
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

    fn write_host(&mut self, buf: &[u8], host: u64) -> Result<()> {
        self.file
            .write_at(buf, host)
            .map_err(|source| Error::WriteData {
                offset: host,
                source,
            })
    }

    fn read_host(&mut self, buf: &mut [u8], host: u64) -> Result<()> {
        self.file
            .read_at(buf, host)
            .map_err(|source| Error::ReadData {
                offset: host,
                source,
            })
    }

    /// Reads a part of one cluster that is not plain data.
    fn read_unmapped(&mut self, mapping: Mapping, guest: u64, buf: &mut [u8]) -> Result<()> {
        let in_cluster = (guest & (self.cluster_size - 1)) as usize;
        match mapping {
            Mapping::Unallocated => match self.backing.as_mut() {
                Some(backing) => backing.read_at(buf, guest),
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
    fn decompress(&mut self, host: u64, len: u64) -> Result<()> {
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

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Writes `buf` at guest offset `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len())?;
        let mut done = 0usize;
        // Clusters that can be overwritten in place and lie back to back on the host are written
        // with one call: (host offset, buffer start, length).
        let mut run: Option<(u64, usize, usize)> = None;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_cluster = guest & (self.cluster_size - 1);
            let n = ((self.cluster_size - in_cluster) as usize).min(buf.len() - done);
            if let Mapping::Normal { host, copied: true } = self.mapping(guest)? {
                self.check_in_place(host)?;
                let host = host + in_cluster;
                run = match run {
                    Some((start, at, len)) if start + len as u64 == host => {
                        Some((start, at, len + n))
                    }
                    Some((start, at, len)) => {
                        self.write_host(&buf[at..at + len], start)?;
                        Some((host, done, n))
                    }
                    None => Some((host, done, n)),
                };
            } else {
                if let Some((start, at, len)) = run.take() {
                    self.write_host(&buf[at..at + len], start)?;
                }
                self.write_cluster(guest, Some(&buf[done..done + n]), n)?;
            }
            done += n;
        }
        if let Some((start, at, len)) = run {
            self.write_host(&buf[at..at + len], start)?;
        }
        self.bound_pending()
    }

    /// Refuses in-place writes to a data cluster that overlaps metadata or lies past the file.
    fn check_in_place(&mut self, host: u64) -> Result<()> {
        if self.refcounts.overlaps_protected(host) {
            return Err(Error::Corrupt(format!(
                "L2 entry points at metadata (host offset {host:#x})"
            )));
        }
        if host >= self.known_len {
            self.known_len = self.file.len().map_err(|source| Error::WriteData {
                offset: host,
                source,
            })?;
            if host >= self.known_len {
                return Err(Error::Corrupt(format!(
                    "L2 entry points past the end of the file (host offset {host:#x})"
                )));
            }
        }
        Ok(())
    }

    fn bound_pending(&mut self) -> Result<()> {
        if self.pending_frees.len() > MAX_PENDING_FREES {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes the L2 table covering `guest` writable (allocating or copying it) and cached; returns
    /// its offset and the entry index.
    fn l2_for_write(&mut self, guest: u64) -> Result<(u64, usize)> {
        let l1_index = self.l1_index(guest);
        if l1_index >= self.l1.len() {
            return Err(Error::OutOfBounds {
                offset: guest,
                len: 0,
                size: self.header.size,
            });
        }
        let entry = self.l1[l1_index];
        let old_offset = self.l2_offset_of(l1_index)?;
        let index = self.l2_index(guest);
        if old_offset != 0 && entry & COPIED != 0 {
            self.load_l2(old_offset)?;
            return Ok((old_offset, index));
        }
        let table = if old_offset == 0 {
            vec![0u64; 1 << self.l2_bits]
        } else {
            // Shared with a snapshot: copy it (its clusters stay shared, so entries keep COPIED clear).
            self.load_l2(old_offset)?;
            let table = self.l2_cache.get(old_offset).cloned().unwrap_or_default();
            self.l2_cache.remove(old_offset);
            self.pending_frees.push((old_offset, self.cluster_size));
            table
        };
        let new_offset = self.alloc_cluster()?;
        // Ordering: the new table is only written back after the refcount barrier (eviction or
        // flush), and the L1 entry below only reaches the disk after the table did (flush step 3).
        self.insert_l2(new_offset, table, true)?;
        self.set_l1(l1_index, new_offset | COPIED);
        Ok((new_offset, index))
    }

    fn set_l1(&mut self, index: usize, value: u64) {
        self.l1[index] = value;
        self.l1_dirty = Some(match self.l1_dirty {
            Some((lo, hi)) => (lo.min(index), hi.max(index + 1)),
            None => (index, index + 1),
        });
    }

    fn alloc_cluster(&mut self) -> Result<u64> {
        self.metadata_preallocated = None;
        let offset = self.refcounts.alloc(&mut self.file, 1)?;
        self.alloc_end = self.alloc_end.max(offset + self.cluster_size);
        Ok(offset)
    }

    fn set_l2_entry(&mut self, l2_offset: u64, index: usize, value: u64) -> Result<()> {
        match self.l2_cache.get_mut(l2_offset) {
            Some(table) => {
                table[index] = value;
                Ok(())
            }
            None => Err(Error::Corrupt(format!(
                "L2 table at {l2_offset:#x} vanished from the cache"
            ))),
        }
    }

    /// Writes `len` bytes inside one guest cluster: `data`, or zeros when `None`.
    fn write_cluster(&mut self, guest: u64, data: Option<&[u8]>, len: usize) -> Result<()> {
        let in_cluster = guest & (self.cluster_size - 1);
        let cluster_start = guest - in_cluster;
        let (l2_offset, index) = self.l2_for_write(guest)?;
        let entry = self.l2_cache.get(l2_offset).map(|t| t[index]).unwrap_or(0);
        let mapping = Mapping::decode(entry, self.cluster_bits)?;
        if let Mapping::Normal { host, copied: true } = mapping {
            self.check_in_place(host)?;
            let at = host + in_cluster;
            return match data {
                Some(data) => self.file.write_at(data, at),
                None => self.file.write_at(&vec![0u8; len], at),
            }
            .map_err(|source| Error::WriteData { offset: at, source });
        }
        // A preallocated zero cluster that is ours alone is reused in place (filled with zeros
        // around the new data); anything else gets a new cluster.
        let reuse = match mapping {
            Mapping::ZeroAlloc { host }
                if entry & COPIED != 0
                    && host < self.known_len
                    && !self.refcounts.overlaps_protected(host) =>
            {
                Some(host)
            }
            _ => None,
        };
        let new_host = match reuse {
            Some(host) => host,
            None => self.alloc_cluster()?,
        };
        // Every write extends the file, so a cluster starting at or past its end has never been
        // written and reads as zeros (a freed and reused cluster is always below the end).
        let fresh = reuse.is_none()
            && new_host
                >= self.file.len().map_err(|source| Error::WriteData {
                    offset: new_host,
                    source,
                })?;
        let old_reads_zero = match mapping {
            Mapping::ZeroPlain | Mapping::ZeroAlloc { .. } => true,
            Mapping::Unallocated => self
                .backing
                .as_ref()
                .is_none_or(|b| b.size() <= cluster_start),
            _ => false,
        };
        if len as u64 == self.cluster_size && data.is_some() {
            if let Some(data) = data {
                self.file
                    .write_at(data, new_host)
                    .map_err(|source| Error::WriteData {
                        offset: new_host,
                        source,
                    })?;
            }
        } else if old_reads_zero && fresh {
            // The new cluster reads as zeros already: write only the new bytes.
            if let Some(data) = data {
                let at = new_host + in_cluster;
                self.file
                    .write_at(data, at)
                    .map_err(|source| Error::WriteData { offset: at, source })?;
            }
        } else {
            let mut scratch = std::mem::take(&mut self.scratch);
            if scratch.len() != self.cluster_size as usize {
                scratch = AlignedBuf::new(self.cluster_size as usize);
            }
            let buf = scratch.as_mut_slice();
            let read = if old_reads_zero {
                buf.fill(0);
                Ok(())
            } else {
                self.read_unmapped(mapping, cluster_start, buf)
            };
            let range = in_cluster as usize..in_cluster as usize + len;
            match data {
                Some(data) => buf[range].copy_from_slice(data),
                None => buf[range].fill(0),
            }
            let result = match read {
                Ok(()) => self.file.write_at(buf, new_host),
                Err(e) => {
                    self.scratch = scratch;
                    return Err(e);
                }
            };
            self.scratch = scratch;
            result.map_err(|source| Error::WriteData {
                offset: new_host,
                source,
            })?;
        }
        // Ordering: the entry publishing the new cluster sits in the cached L2 table, which is only
        // written after the refcount barrier that also makes this data durable.
        self.set_l2_entry(l2_offset, index, new_host | COPIED)?;
        if reuse.is_none() {
            self.release(mapping);
        }
        Ok(())
    }

    /// Queues the reference `mapping` held for release after the next metadata flush.
    fn release(&mut self, mapping: Mapping) {
        if let Some(range) = mapping.host_range(self.cluster_size) {
            self.pending_frees.push(range);
        }
        if let (Mapping::Compressed { host, .. }, Some((cached, _))) = (mapping, &self.decompressed)
        {
            if *cached == host {
                self.decompressed = None;
            }
        }
    }

    /// Writes all cached metadata in the safe order and makes everything durable.
    pub fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Ordering, step 1: refcount increments and guest data become durable before any L2 entry
        // that relies on them.
        refcount_barrier(
            &mut self.file,
            &mut self.refcounts,
            self.alloc_end,
            &mut self.known_len,
        )?;
        // Step 2: L2 tables become durable before L1 entries that point at new tables.
        if self.l2_cache.has_dirty() {
            let file = &mut self.file;
            self.l2_cache
                .flush_dirty(|offset, table| write_l2(file, offset, table))?;
            self.file.flush().map_err(Error::Flush)?;
        }
        // Step 3: the L1 table.
        if let Some((lo, hi)) = self.l1_dirty.take() {
            let mut raw = vec![0u8; (hi - lo) * 8];
            for (i, entry) in self.l1[lo..hi].iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *entry);
            }
            let at = self.header.l1_table_offset + lo as u64 * 8;
            self.file.write_at(&raw, at).map_err(Error::WriteL1Table)?;
            self.file.flush().map_err(Error::Flush)?;
        }
        // Step 4: only now that no durable table references them, drop the released refcounts.
        if !self.pending_frees.is_empty() {
            let frees = std::mem::take(&mut self.pending_frees);
            for (offset, len) in frees {
                self.refcounts
                    .update_range(&mut self.file, offset, len, -1)?;
            }
            self.refcounts.write_dirty(&mut self.file)?;
            self.file.flush().map_err(Error::Flush)?;
        }
        Ok(())
    }

    /// Drops all cached tables (after a repair rewrote metadata) and reloads the refcount table.
    pub(crate) fn reload_refcounts(&mut self) -> Result<()> {
        let protected = vec![
            (0, self.cluster_size),
            (self.header.l1_table_offset, self.l1.len() as u64 * 8),
            (
                self.header.refcount_table_offset,
                u64::from(self.header.refcount_table_clusters) * self.cluster_size,
            ),
            (self.header.snapshots_offset, self.snapshot_table_len),
        ];
        let mut refcounts = Refcounts::load(
            &mut self.file,
            self.header.refcount_table_offset,
            self.header.refcount_table_clusters,
            self.header.refcount_order,
            self.cluster_bits,
            16,
        )?;
        refcounts.set_protected(protected);
        self.refcounts = refcounts;
        self.l2_cache.clear();
        Ok(())
    }
}

impl<S: Storage> Drop for Image<S> {
    fn drop(&mut self) {
        // Best effort: callers that care about errors call `flush` first.
        let _ = self.flush();
    }
}

/// Writes dirty refcount blocks, extends the file over every allocated cluster and flushes.
fn refcount_barrier<S: Storage + ?Sized>(
    file: &mut S,
    refcounts: &mut Refcounts,
    alloc_end: u64,
    known_len: &mut u64,
) -> Result<()> {
    refcounts.write_dirty(file)?;
    if alloc_end > *known_len {
        let len = file.len().map_err(Error::SetLen)?;
        if len < alloc_end {
            file.set_len(alloc_end).map_err(Error::SetLen)?;
        }
        *known_len = len.max(alloc_end);
    }
    file.flush().map_err(Error::Flush)
}

fn write_l2<S: Storage + ?Sized>(file: &mut S, offset: u64, table: &[u64]) -> Result<()> {
    let mut raw = vec![0u8; table.len() * 8];
    for (i, entry) in table.iter().enumerate() {
        BigEndian::write_u64(&mut raw[i * 8..], *entry);
    }
    file.write_at(&raw, offset)
        .map_err(|source| Error::WriteL2Table { offset, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::raw::MemStorage;

    fn new_image(cluster_size: u64) -> Image<MemStorage> {
        let mut storage = MemStorage::default();
        let options = CreateOptions {
            size: 1 << 20,
            cluster_size,
            ..CreateOptions::default()
        };
        create_on(&mut storage, &options).unwrap();
        Image::open_storage(storage, None, &OpenOptions::default()).unwrap()
    }

    #[test]
    fn unaligned_write_spanning_clusters_reads_back() {
        let mut image = new_image(4096);
        let data: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8).collect();
        image.write_at(&data, 3000).unwrap();
        let mut buf = vec![0xffu8; 16000];
        image.read_at(&mut buf, 0).unwrap();
        assert!(buf[..3000].iter().all(|&b| b == 0));
        assert_eq!(&buf[3000..13000], &data[..]);
        assert!(buf[13000..].iter().all(|&b| b == 0));
        assert_eq!(image.mapping(0).unwrap(), image.mapping(100).unwrap());
        assert!(matches!(
            image.mapping(0).unwrap(),
            Mapping::Normal { copied: true, .. }
        ));
    }

    #[test]
    fn zeroes_and_discard_use_the_zero_flag_on_v3() {
        let mut image = new_image(4096);
        image.write_at(&[7u8; 8192], 0).unwrap();
        image.write_zeroes(0, 4096).unwrap();
        assert_eq!(image.mapping(0).unwrap(), Mapping::ZeroPlain);
        image.write_zeroes_with(4096, 4096, false).unwrap();
        assert!(matches!(
            image.mapping(4096).unwrap(),
            Mapping::ZeroAlloc { .. }
        ));
        image.discard(4096, 4096).unwrap();
        assert_eq!(image.mapping(4096).unwrap(), Mapping::ZeroPlain);
        let mut buf = [1u8; 8192];
        image.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0u8; 8192]);
    }

    #[test]
    fn freed_clusters_are_reused_after_a_flush() {
        let mut image = new_image(4096);
        image.write_at(&[1u8; 4096], 0).unwrap();
        let Mapping::Normal { host: first, .. } = image.mapping(0).unwrap() else {
            panic!("not allocated");
        };
        image.discard(0, 4096).unwrap();
        image.flush().unwrap();
        image.write_at(&[2u8; 4096], 8192).unwrap();
        assert_eq!(
            image.mapping(8192).unwrap(),
            Mapping::Normal {
                host: first,
                copied: true
            }
        );
    }

    #[test]
    fn out_of_bounds_and_read_only_are_refused() {
        let mut image = new_image(65536);
        assert!(matches!(
            image.write_at(&[0], 1 << 20),
            Err(Error::OutOfBounds { .. })
        ));
        let mut buf = [0u8; 2];
        assert!(matches!(
            image.read_at(&mut buf, (1 << 20) - 1),
            Err(Error::OutOfBounds { .. })
        ));
        let storage = image.storage_mut().clone();
        let options = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let mut image = Image::open_storage(storage, None, &options).unwrap();
        assert!(matches!(image.write_at(&[0], 0), Err(Error::ReadOnly)));
    }
}
