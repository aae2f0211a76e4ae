//! Opening an image: header, L1 and refcount tables, snapshot table, backing file, and the
//! repairs QEMU makes on a read-write open (dirty bit, autoclear bits).

use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder};

use super::{Image, OpenOptions};
use crate::backing::{open_backing_with, resolve_backing_path};
use crate::cache::TableCache;
use crate::disk::open_error;
use crate::error::{Corruption, Error, Result};
use crate::header::{Header, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::raw::{open_options_direct, AlignedBuf, FileStorage, Storage};
use crate::refcount::Refcounts;
use crate::snapshot;

impl Image<FileStorage> {
    /// Opens the image file at `path` (and its external data file, if it has one).
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Self> {
        Self::open_depth(path.as_ref(), options, 0)
    }

    /// Opens the image at `path`, `depth` images below the top of a backing chain.
    pub(crate) fn open_depth(path: &Path, options: &OpenOptions, depth: usize) -> Result<Self> {
        let storage = open_file_storage(path, options, !options.read_only)
            .map_err(|source| open_error(path, options, source))?;
        let open_data = |name: &Path| {
            open_file_storage(name, options, !options.read_only).map_err(|source| match open_error(
                name, options, source,
            ) {
                Error::OpenFile { path, source } => Error::OpenDataFile { path, source },
                other => other,
            })
        };
        Image::open_with(
            storage,
            Some(path.to_path_buf()),
            options,
            depth,
            DataSource::Open(&open_data),
        )
    }
}

/// Opens `path` as the image's storage with the cache mode of `options` (`O_DIRECT`, sync).
fn open_file_storage(
    path: &Path,
    options: &OpenOptions,
    write: bool,
) -> std::io::Result<FileStorage> {
    let file = if options.direct {
        open_options_direct(write).open(path)?
    } else {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)?
    };
    let mut storage = if options.direct {
        FileStorage::new_direct(file)
    } else {
        FileStorage::new(file)
    };
    storage.set_sync(options.sync);
    Ok(storage)
}

/// Where the storage of an image's external data file comes from.
pub(crate) enum DataSource<'a, S> {
    /// Opened by name (the header's, or [`OpenOptions::data_file`]).
    Open(&'a dyn Fn(&Path) -> Result<S>),
    /// Given by the caller.
    Given(S),
    /// None can be had (an image on caller-supplied storage without one).
    Unavailable,
}

/// The name of the data file to open: the caller's (`data-file`), else the header's; with QEMU's
/// refusals. Relative names are relative to the working directory, as in QEMU (which opens the
/// name as given, not relative to the image).
fn data_file_name(header: &Header, options: &OpenOptions) -> Result<Option<PathBuf>> {
    if !options.open_data_file {
        // Metadata only (qemu's BDRV_O_NO_IO): QEMU skips the data file and its checks.
        return Ok(None);
    }
    if header.has_data_file() {
        return match (&options.data_file, &header.data_file) {
            (Some(given), _) => Ok(Some(given.clone())),
            (None, Some(name)) => Ok(Some(PathBuf::from(name))),
            (None, None) => Err(Error::DataFileRequired),
        };
    }
    if options.data_file.is_some() {
        return Err(Error::DataFileNotExternal);
    }
    if header.data_file_raw() {
        return Err(Error::DataFileRawWithoutDataFile);
    }
    Ok(None)
}

impl<S: Storage> Image<S> {
    /// Opens an image on arbitrary storage. `path` locates relative backing file names. An image
    /// with an external data file needs [`Image::open_storage_with_data`].
    pub fn open_storage(file: S, path: Option<PathBuf>, options: &OpenOptions) -> Result<Self> {
        Self::open_with(file, path, options, 0, DataSource::Unavailable)
    }

    /// Opens an image whose guest clusters live in the external data file `data`.
    pub fn open_storage_with_data(
        file: S,
        data: S,
        path: Option<PathBuf>,
        options: &OpenOptions,
    ) -> Result<Self> {
        Self::open_with(file, path, options, 0, DataSource::Given(data))
    }

    pub(crate) fn open_with(
        mut file: S,
        path: Option<PathBuf>,
        options: &OpenOptions,
        depth: usize,
        data_source: DataSource<'_, S>,
    ) -> Result<Self> {
        let file_len = file.len().map_err(Error::ReadHeader)?;
        let mut first = vec![0u8; 104];
        file.read_at(&mut first, 0).map_err(Error::ReadHeader)?;
        // A file shorter than a header reads as zeros past its end (as in QEMU), so it fails the
        // header's own checks (bad magic, header too short, ...).
        // Learn the cluster size, then read the whole header cluster (bounded by cluster_bits ≤ 21).
        let cluster_bits = BigEndian::read_u32(&first[20..]);
        let header_bytes = if (9..=21).contains(&cluster_bits) {
            1usize << cluster_bits
        } else {
            104
        };
        let mut cluster0 = vec![0u8; header_bytes];
        file.read_at(&mut cluster0, 0).map_err(Error::ReadHeader)?;
        let header = if options.check_mode {
            Header::parse_for_check(&cluster0)?
        } else {
            Header::parse(&cluster0)?
        };
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
        // Like QEMU: the data file is opened after the header and L1 table, before the snapshot
        // table and the backing file.
        let (data, data_path) = match (data_file_name(&header, options)?, data_source) {
            (None, DataSource::Given(_)) if options.open_data_file => {
                return Err(Error::DataFileNotExternal)
            }
            (None, _) => (None, None),
            (Some(name), DataSource::Given(data)) => (Some(data), Some(name)),
            (Some(name), DataSource::Open(open)) => (Some(open(&name)?), Some(name)),
            (Some(name), DataSource::Unavailable) => {
                return Err(Error::OpenDataFile {
                    path: name,
                    source: std::io::Error::new(
                        std::io::ErrorKind::Unsupported,
                        "no storage was given for it (Image::open_storage_with_data)",
                    ),
                })
            }
        };
        // A check-mode open leaves an unusable snapshot table pointer for `check` to report.
        let snapshot_pointer_problem = if options.check_mode {
            crate::check::snapshot_pointer_problem(&header)
        } else {
            None
        };
        let (snapshots, snapshot_table_len) = if snapshot_pointer_problem.is_some() {
            (Vec::new(), 0)
        } else {
            snapshot::read_table(
                &mut file,
                header.snapshots_offset,
                header.nb_snapshots,
                cluster_size,
            )?
        };
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
                Some(Box::new(open_backing_with(
                    &backing_path,
                    header.backing_format.as_deref(),
                    depth,
                    options,
                )?))
            }
            _ => None,
        };
        let l2_tables = (options.l2_cache_bytes / cluster_size).max(4) as usize;
        let mut image = Image {
            snapshot_pointer_problem,
            file,
            cluster_bits: header.cluster_bits,
            cluster_size,
            l2_bits: header.l2_bits(),
            header,
            path,
            read_only,
            l1,
            l1_dirty: None,
            l2_cache: TableCache::new(l2_tables),
            refcounts,
            backing,
            data,
            data_path,
            data_dirty: false,
            pending_frees: Vec::new(),
            alloc_end: 0,
            known_len: file_len,
            decompressed: None,
            scratch: AlignedBuf::default(),
            snapshots,
            snapshot_table_len,
            metadata_preallocated: None,
            compress_next: None,
            closed: false,
        };
        if !read_only && !options.check_mode {
            if image.header.incompatible_features & INCOMPAT_DIRTY != 0 {
                // Lazy refcounts (or a crash with them) left refcounts stale: rebuild from the tables.
                let report = crate::check::check(&mut image, crate::check::Repair::All)?;
                if report.corruptions > 0 || report.check_errors > 0 {
                    return Err(Corruption::DirtyRepairFailed {
                        remaining: report.corruptions + report.check_errors,
                    }
                    .into());
                }
                image.set_incompatible(image.header.incompatible_features & !INCOMPAT_DIRTY)?;
            }
            // The raw data file bit is kept (writes keep the data file a raw image of the disk);
            // bitmaps and unknown autoclear features are not maintained: clearing their bits
            // tells other tools the corresponding data is stale.
            let kept = image.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW;
            if image.header.autoclear_features != kept {
                image.header.autoclear_features = kept;
                image
                    .file
                    .write_at(&kept.to_be_bytes(), 88)
                    .map_err(Error::WriteHeader)?;
                image.file.flush().map_err(Error::Flush)?;
            }
        }
        Ok(image)
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
