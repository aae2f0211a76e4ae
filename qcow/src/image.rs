//! `Image`: an open qcow2 image — byte-granular read/write/zero/discard/flush over L1/L2 tables,
//! with copy-on-write from backing files, compressed and shared clusters, and ordered metadata writes.
//!
//! The work is split by concern: `open` (header and tables in), `read`, `write` (allocation and
//! copy-on-write), `zero` (zeroing, discard, preallocation), `flush` (ordered metadata write-back),
//! `data_file` (guest clusters kept in an external data file).

use std::path::{Path, PathBuf};

pub use crate::backing::{open_backing, resolve_backing_path, Backing, MAX_BACKING_DEPTH};
use crate::cache::TableCache;
use crate::error::{Error, Result};
use crate::header::{Header, COMPAT_LAZY_REFCOUNTS};
use crate::raw::{AlignedBuf, FileStorage, Storage};
use crate::refcount::Refcounts;
use crate::snapshot::Snapshot;

mod compressed;
mod data_file;
pub(crate) use data_file::data_file_cluster;
mod flush;
mod meta;
mod open;
mod read;
mod resize;
mod subcluster;
mod tree;
mod write;
mod zero;

pub use compressed::Compressor;
pub(crate) use flush::write_l2;
pub use resize::ResizeError;

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
    /// Bypass the host page cache (`O_DIRECT`, qemu's `cache=none`).
    pub direct: bool,
    /// Most images a backing chain may hold below this one ([`MAX_BACKING_DEPTH`] by default;
    /// the VMM raises it for the chains its snapshots build, one overlay per snapshot).
    pub max_backing_depth: usize,
    /// The external data file to use instead of the one the header names (qemu's `data-file`
    /// option). Only for images with an external data file; never passed on to backing files.
    pub data_file: Option<PathBuf>,
    /// Open the external data file (default). `false` opens the metadata alone, as `qemu-img
    /// info` does (qemu's `BDRV_O_NO_IO`): guest data then cannot be read or written.
    pub open_data_file: bool,
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
            direct: false,
            max_backing_depth: MAX_BACKING_DEPTH,
            data_file: None,
            open_data_file: true,
        }
    }
}

/// An open qcow2 image over storage `S`.
#[derive(Debug)]
pub struct Image<S: Storage = FileStorage> {
    pub(crate) file: S,
    pub(crate) header: Header,
    pub(crate) path: Option<PathBuf>,
    pub(crate) read_only: bool,
    pub(crate) cluster_bits: u32,
    pub(crate) cluster_size: u64,
    pub(crate) l2_bits: u32,
    pub(crate) l1: Vec<u64>,
    pub(crate) l1_dirty: Option<(usize, usize)>,
    pub(crate) l2_cache: TableCache<Vec<u64>>,
    pub(crate) refcounts: Refcounts,
    pub(crate) backing: Option<Box<Backing>>,
    /// The external data file guest clusters live in (incompatible bit 2); `None` without one, or
    /// when opened metadata-only (see [`OpenOptions::open_data_file`]).
    pub(crate) data: Option<S>,
    /// The name the data file was opened by (what `map` prints as its file).
    pub(crate) data_path: Option<PathBuf>,
    /// Guest data reached the data file since its last flush.
    pub(crate) data_dirty: bool,
    /// Host ranges whose refcount drops once the tables that stopped referencing them are durable.
    pub(crate) pending_frees: Vec<(u64, u64)>,
    /// End of the highest cluster allocated since open.
    pub(crate) alloc_end: u64,
    /// Known file length (at least).
    pub(crate) known_len: u64,
    pub(crate) decompressed: Option<(u64, Vec<u8>)>,
    pub(crate) scratch: AlignedBuf,
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) snapshot_table_len: u64,
    /// Why the snapshot table was not read (check-mode opens only).
    pub(crate) snapshot_pointer_problem: Option<crate::check::SnapshotPointerProblem>,
    /// Cached result of [`Image::metadata_preallocated`]; reset by allocations.
    pub(crate) metadata_preallocated: Option<bool>,
    /// Next free byte after the last compressed cluster written, inside a host cluster that has
    /// room left (see `compressed.rs`).
    pub(crate) compress_next: Option<u64>,
    /// Set by [`Image::close`]: the final flush has run, `Drop` has nothing left to do.
    pub(crate) closed: bool,
}

impl<S: Storage> Image<S> {
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

    /// Data-or-hole state at `host` of the file guest clusters live in (see
    /// [`Storage::extent_at`]).
    pub fn host_extent(&mut self, host: u64, len: u64) -> Result<(bool, u64)> {
        self.data_storage()?
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

    pub(crate) fn check_range(&self, offset: u64, len: usize) -> Result<()> {
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

    pub(crate) fn l1_index(&self, guest: u64) -> usize {
        (guest >> (self.cluster_bits + self.l2_bits)) as usize
    }

    pub(crate) fn l2_index(&self, guest: u64) -> usize {
        ((guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) as usize
    }
}

impl<S: Storage> Image<S> {
    /// Flushes everything and closes the image, returning the final flush's error. Dropping an
    /// image flushes too but has nowhere to report a failure.
    pub fn close(mut self) -> Result<()> {
        let result = self.flush();
        self.closed = true;
        result
    }
}

impl<S: Storage> Drop for Image<S> {
    fn drop(&mut self) {
        if !self.closed {
            // Best effort: callers that care about errors use `close` (or `flush`) first.
            let _ = self.flush();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::l2::Mapping;
    use crate::raw::MemStorage;

    /// A fresh 1 MiB in-memory image with `cluster_size` clusters (the unit tests' scratch disk).
    pub(crate) fn new_image(cluster_size: u64) -> Image<MemStorage> {
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

    /// Storage whose flushes fail once `fail` is set.
    #[derive(Debug, Clone, Default)]
    struct FailingFlush {
        mem: MemStorage,
        fail: bool,
    }

    impl Storage for FailingFlush {
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.mem.write_at(buf, offset)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            if self.fail {
                return Err(std::io::Error::other("disk gone"));
            }
            Ok(())
        }
        fn len(&mut self) -> std::io::Result<u64> {
            self.mem.len()
        }
        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            self.mem.set_len(len)
        }
    }

    #[test]
    fn close_reports_the_final_flush_error() {
        let mut storage = FailingFlush::default();
        let options = CreateOptions {
            size: 1 << 20,
            ..CreateOptions::default()
        };
        create_on(&mut storage, &options).unwrap();
        let mut image =
            Image::open_storage(storage.clone(), None, &OpenOptions::default()).unwrap();
        image.write_at(&[1u8; 4096], 0).unwrap();
        image.storage_mut().fail = true;
        assert!(matches!(image.close(), Err(Error::Flush(_))));
        let mut image = Image::open_storage(storage, None, &OpenOptions::default()).unwrap();
        image.write_at(&[1u8; 4096], 0).unwrap();
        image.close().unwrap();
    }

    #[test]
    fn corruption_is_reported_with_a_typed_variant() {
        let mut image = new_image(4096);
        image.write_at(&[1u8; 4096], 0).unwrap();
        image.flush().unwrap();
        let mut storage = image.storage_mut().clone();
        drop(image);
        let l1_offset = crate::header::Header::parse(&storage.data)
            .unwrap()
            .l1_table_offset;
        // An L2 table offset that is not cluster aligned.
        storage
            .write_at(&0x8000_0000_0000_1200u64.to_be_bytes(), l1_offset)
            .unwrap();
        let mut image = Image::open_storage(storage, None, &OpenOptions::default()).unwrap();
        let mut buf = [0u8; 16];
        match image.read_at(&mut buf, 0) {
            Err(Error::Corrupt(crate::error::Corruption::L2OffsetInvalid {
                l1_index: 0,
                entry,
            })) => {
                assert_eq!(entry, 0x8000_0000_0000_1200)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn long_writes_with_few_refcounts_per_block() {
        // 512-byte clusters with 64-bit refcounts: 64 refcounts per block, a block in every 64
        // clusters, so whole-cluster runs must stay short.
        let mut storage = MemStorage::default();
        let options = CreateOptions {
            size: 4 << 20,
            cluster_size: 512,
            refcount_bits: 64,
            ..CreateOptions::default()
        };
        create_on(&mut storage, &options).unwrap();
        let mut image = Image::open_storage(storage, None, &OpenOptions::default()).unwrap();
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 253) as u8).collect();
        image.write_at(&data, 4096).unwrap();
        let mut back = vec![0u8; data.len()];
        image.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        let report = crate::check(&mut image, crate::Repair::None).unwrap();
        assert!(report.is_clean(), "{report:?}");
        // An L1 table longer than a block's coverage cannot be contiguous: a clear error.
        assert!(matches!(
            image.resize(1 << 30, false),
            Err(Error::ContiguousAllocation { .. })
        ));
    }
}
