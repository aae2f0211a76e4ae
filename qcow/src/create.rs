//! Creating images: qcow2 (v2/v3, any cluster size and refcount width, extended L2 entries, zstd
//! compression, an external data file, a backing file, every preallocation mode) and raw — the
//! same empty image `qemu-img create` writes, refused with the same reasons in the same order.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::header::{
    CompressionType, Header, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS,
};
use crate::image::{open_backing, resolve_backing_path, Image, OpenOptions};
use crate::raw::{FileStorage, Storage};

mod layout;
use layout::Layout;

/// Preallocation modes (qemu-img's `preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocation {
    /// Only the tables of an empty image.
    Off,
    /// Every L2 table and data cluster is allocated; the data clusters stay holes in the file.
    Metadata,
    /// Like `Metadata`, and the data clusters' space is reserved with `fallocate`.
    Falloc,
    /// Like `Metadata`, and the data clusters are written with zeros.
    Full,
}

impl Preallocation {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// Why qcow2 create options were refused, in qemu-img's words (they say what to change).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreateProblem {
    #[error("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    ExtendedL2NeedsV3,
    #[error("Cluster size must be a power of two between 512 and 2048k")]
    ClusterSize,
    #[error("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")]
    ExtendedL2ClusterSize,
    #[error(
        "Backing file and preallocation can only be used at the same time if extended_l2 is on"
    )]
    BackingWithPreallocation,
    #[error("Backing format cannot be used without backing file")]
    BackingFormatWithoutFile,
    #[error("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    LazyRefcountsNeedV3,
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountWidth,
    #[error("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")]
    RefcountWidthNeedsV3,
    #[error("data-file-raw requires data-file")]
    DataFileRawWithoutDataFile,
    #[error("Backing file and data-file-raw cannot be used at the same time")]
    BackingWithDataFileRaw,
    #[error("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    DataFileNeedsV3,
    #[error("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    CompressionTypeNeedsV3,
    #[error(
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
    )]
    TooLarge,
    #[error("Image creation needs a size parameter")]
    SizeMissing,
}

/// Parameters of a new qcow2 image (qemu-img's `-o` options).
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    pub lazy_refcounts: bool,
    pub preallocation: Preallocation,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// 128-bit L2 entries with 32 subclusters per cluster.
    pub extended_l2: bool,
    pub compression_type: CompressionType,
    /// External data file holding the guest data (a relative name is relative to the working
    /// directory, as in QEMU).
    pub data_file: Option<String>,
    /// The data file stays a valid raw image of the disk (implies metadata preallocation).
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            extended_l2: false,
            compression_type: CompressionType::Deflate,
            data_file: None,
            data_file_raw: false,
        }
    }
}

impl CreateOptions {
    /// Checks the options in the order qemu-img does, so the first problem reported is the same.
    pub fn validate(&self) -> std::result::Result<u32, CreateProblem> {
        if self.extended_l2 && self.version < 3 {
            return Err(CreateProblem::ExtendedL2NeedsV3);
        }
        let cluster_bits = self.cluster_size.trailing_zeros();
        if !self.cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits)
        {
            return Err(CreateProblem::ClusterSize);
        }
        if self.extended_l2 && self.cluster_size < 16384 {
            return Err(CreateProblem::ExtendedL2ClusterSize);
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(CreateProblem::BackingWithPreallocation);
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(CreateProblem::BackingFormatWithoutFile);
        }
        if self.version < 3 && self.lazy_refcounts {
            return Err(CreateProblem::LazyRefcountsNeedV3);
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(CreateProblem::RefcountWidth);
        }
        if self.version < 3 && self.refcount_bits != 16 {
            return Err(CreateProblem::RefcountWidthNeedsV3);
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(CreateProblem::DataFileRawWithoutDataFile);
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(CreateProblem::BackingWithDataFileRaw);
        }
        if self.data_file.is_some() && self.version < 3 {
            return Err(CreateProblem::DataFileNeedsV3);
        }
        if self.compression_type != CompressionType::Deflate && self.version < 3 {
            return Err(CreateProblem::CompressionTypeNeedsV3);
        }
        if self.l1_entries(cluster_bits) * 8 > MAX_L1_BYTES {
            return Err(CreateProblem::TooLarge);
        }
        Ok(cluster_bits)
    }

    /// The virtual size: like qemu-img, whole 512-byte sectors.
    pub fn rounded_size(&self) -> u64 {
        self.size.div_ceil(512) * 512
    }

    fn l1_entries(&self, cluster_bits: u32) -> u64 {
        let entry_bits = if self.extended_l2 { 4 } else { 3 };
        let bytes_per_l2 = 1u64 << (cluster_bits + cluster_bits - entry_bits);
        self.rounded_size().div_ceil(bytes_per_l2)
    }

    /// Data clusters are preallocated (explicitly, or because the data file must stay raw).
    fn preallocates(&self) -> bool {
        self.preallocation != Preallocation::Off || self.data_file_raw
    }
}

impl From<CreateProblem> for Error {
    fn from(problem: CreateProblem) -> Error {
        Error::InvalidOption(problem)
    }
}

/// The size of the backing file named by `options`, opened relative to `image_path`.
pub fn backing_size(image_path: &Path, options: &CreateOptions) -> Result<u64> {
    let name = options
        .backing_file
        .as_deref()
        .ok_or(CreateProblem::SizeMissing)?;
    let path = resolve_backing_path(Some(image_path), name);
    Ok(open_backing(&path, options.backing_format.as_deref(), 0)?.size())
}

/// Creates a qcow2 image file at `path` (truncating an existing file).
pub fn create(path: &Path, options: &CreateOptions) -> Result<()> {
    create_with(path, options, true)
}

/// Like [`create`]; with `check_backing` false the backing file is recorded without being opened
/// (qemu-img's `create -u`).
pub fn create_with(path: &Path, options: &CreateOptions, check_backing: bool) -> Result<()> {
    // Refuse bad options before touching the file.
    options.validate()?;
    if let (Some(name), true) = (&options.backing_file, check_backing) {
        // The backing file must open (QEMU checks it too); its size is the default virtual size.
        let backing_path = resolve_backing_path(Some(path), name);
        open_backing(&backing_path, options.backing_format.as_deref(), 0)?;
    }
    let file = create_file(path)?;
    let mut storage = FileStorage::new(file);
    if let Some(name) = &options.data_file {
        // Like QEMU, the name is used as given: a relative one is relative to the working
        // directory, not to the image.
        let data_path = PathBuf::from(name);
        let data = create_file(&data_path)?;
        // Preallocated clusters are whole clusters of the data file (QEMU's length too).
        let end = if options.preallocates() {
            options.rounded_size().div_ceil(options.cluster_size) * options.cluster_size
        } else {
            options.rounded_size()
        };
        preallocate_file(&data, &data_path, 0, end, options.preallocation)?;
    }
    let created = create_on(&mut storage, options)?;
    drop(storage);
    if let (Some((start, end)), true) = (
        created.data_area,
        matches!(
            options.preallocation,
            Preallocation::Falloc | Preallocation::Full
        ),
    ) {
        let file = FsOpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|source| Error::CreateFile {
                path: path.to_path_buf(),
                source,
            })?;
        preallocate_file(&file, path, start, end, options.preallocation)?;
    } else if created.needs_metadata_preallocation {
        let mut image = Image::open(path, &OpenOptions::default())?;
        image.preallocate_metadata()?;
        image.close()?;
    }
    Ok(())
}

fn create_file(path: &Path) -> Result<File> {
    FsOpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| Error::CreateFile {
            path: path.to_path_buf(),
            source,
        })
}

/// Sizes `file` to `end` and reserves (`Falloc`) or zero-fills (`Full`) `[start, end)`.
fn preallocate_file(
    file: &File,
    path: &Path,
    start: u64,
    end: u64,
    mode: Preallocation,
) -> Result<()> {
    let fail = |source: std::io::Error| Error::CreateFile {
        path: path.to_path_buf(),
        source,
    };
    if file.metadata().map_err(fail)?.len() < end {
        file.set_len(end).map_err(fail)?;
    }
    match mode {
        Preallocation::Off | Preallocation::Metadata => Ok(()),
        Preallocation::Falloc => rustix::fs::fallocate(
            file,
            rustix::fs::FallocateFlags::empty(),
            start,
            end - start,
        )
        .map_err(|e| fail(e.into())),
        Preallocation::Full => {
            use std::os::unix::fs::FileExt;
            let zeros = vec![0u8; 1 << 20];
            let mut at = start;
            while at < end {
                let n = (end - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at).map_err(fail)?;
                at += n as u64;
            }
            file.sync_all().map_err(fail)
        }
    }
}

/// Writes a new qcow2 image onto `storage` in QEMU's layout: header, refcount table, refcount
/// block(s), the L1 table (only its own bytes, so the file ends where qemu-img's does), plus
/// whatever preallocation adds to the tables (metadata preallocation of an image without a data
/// file is done afterwards through [`Image`]). Returns the data area `falloc`/`full` must fill.
pub fn create_on<S: Storage + ?Sized>(storage: &mut S, options: &CreateOptions) -> Result<Created> {
    let cluster_bits = options.validate()?;
    let cluster_size = options.cluster_size;
    let refcount_order = options.refcount_bits.trailing_zeros();
    let size = options.rounded_size();
    let mut header = Header::new(options.version, cluster_bits, refcount_order, size);
    if options.version >= 3 && cluster_size > 4096 {
        header.feature_names = Header::default_feature_names();
    }
    if options.lazy_refcounts {
        header.compatible_features |= COMPAT_LAZY_REFCOUNTS;
    }
    if options.extended_l2 {
        header.incompatible_features |= INCOMPAT_EXTL2;
    }
    if options.compression_type != CompressionType::Deflate {
        header.incompatible_features |= INCOMPAT_COMPRESSION;
        header.compression_type = options.compression_type;
    }
    if options.data_file.is_some() {
        header.incompatible_features |= INCOMPAT_DATA_FILE;
        header.data_file = options.data_file.clone();
        if options.data_file_raw {
            header.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW;
        }
    }
    header.backing_file = options.backing_file.clone();
    header.backing_format = options.backing_format.clone();
    let l1_entries = options.l1_entries(cluster_bits);
    let entry_words = if options.extended_l2 { 2 } else { 1 };
    let guest_clusters = size.div_ceil(cluster_size);
    let identity = options.data_file.is_some() && options.preallocates();
    let extra = if identity { l1_entries } else { 0 };
    let mut layout = Layout::empty(cluster_bits, refcount_order, l1_entries, entry_words, extra);
    let mut prealloc_done = true;
    if identity {
        layout.map_identity(guest_clusters);
    } else if options.preallocation == Preallocation::Metadata {
        prealloc_done = layout.preallocate_metadata(guest_clusters);
    } else if matches!(
        options.preallocation,
        Preallocation::Falloc | Preallocation::Full
    ) {
        layout.preallocate_data(guest_clusters)?;
    }
    header.refcount_table_offset = layout.reftable_cluster << cluster_bits;
    header.refcount_table_clusters = layout.reftable_clusters as u32;
    // An empty disk has no L1 table at all.
    header.l1_table_offset = if l1_entries == 0 {
        0
    } else {
        layout.l1_cluster << cluster_bits
    };
    header.l1_size = l1_entries as u32;
    if !prealloc_done {
        layout = Layout::empty(cluster_bits, refcount_order, l1_entries, entry_words, 0);
    }
    layout.write(storage, header.encode()?)?;
    Ok(Created {
        data_area: layout
            .data_area
            .map(|(start, count)| (start << cluster_bits, (start + count) << cluster_bits)),
        needs_metadata_preallocation: !prealloc_done,
    })
}

/// What [`create_on`] left for the caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Created {
    /// Host byte range of the data clusters `falloc`/`full` must reserve or zero.
    pub data_area: Option<(u64, u64)>,
    /// Metadata preallocation needs a bigger refcount table than QEMU's replay covers: run the
    /// library's allocator over the written image instead.
    pub needs_metadata_preallocation: bool,
}

/// Creates a raw image of `size` bytes (rounded up to whole sectors, like qemu-img), preallocated
/// as asked (`Metadata` is not a raw mode; callers refuse it).
pub fn create_raw(path: &Path, size: u64) -> Result<()> {
    create_raw_with(path, size, Preallocation::Off)
}

/// [`create_raw`] with a preallocation mode (`Off`, `Falloc` or `Full`).
pub fn create_raw_with(path: &Path, size: u64, preallocation: Preallocation) -> Result<()> {
    let file = FsOpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| Error::CreateFile {
            path: PathBuf::from(path),
            source,
        })?;
    let end = size.div_ceil(512) * 512;
    preallocate_file(&file, path, 0, end, preallocation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::MemStorage;

    #[test]
    fn default_layout_matches_qemu_img() {
        let mut storage = MemStorage::default();
        let options = CreateOptions {
            size: 4 << 20,
            ..CreateOptions::default()
        };
        create_on(&mut storage, &options).unwrap();
        let header = Header::parse(&storage.data).unwrap();
        assert_eq!(header.refcount_table_offset, 0x10000);
        assert_eq!(header.l1_table_offset, 0x30000);
        assert_eq!(header.l1_size, 1);
        assert_eq!(header.header_length, 112);
        // qemu-img writes only the L1 table's own 8 bytes.
        assert_eq!(storage.data.len(), 3 * 0x10000 + 8);
        // Refcount block at cluster 2 counts clusters 0..=3.
        let block = &storage.data[0x20000..0x20010];
        assert_eq!(block, &[0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn small_clusters_and_wide_refcounts_need_several_blocks() {
        let mut storage = MemStorage::default();
        let options = CreateOptions {
            size: 64 << 20,
            cluster_size: 512,
            refcount_bits: 64,
            ..CreateOptions::default()
        };
        create_on(&mut storage, &options).unwrap();
        let header = Header::parse(&storage.data).unwrap();
        // 64 MiB / 32 KiB per L2 = 2048 L1 entries = 32 clusters; 64 refcounts per block.
        assert_eq!(header.l1_size, 2048);
        let mut image = Image::open_storage(storage, None, &OpenOptions::default()).unwrap();
        let report = crate::check(&mut image, crate::Repair::None).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    #[test]
    fn problems_are_found_in_qemu_img_order() {
        let base = CreateOptions {
            size: 1 << 20,
            ..CreateOptions::default()
        };
        let problem = |options: CreateOptions| options.validate().unwrap_err();
        assert_eq!(
            problem(CreateOptions {
                cluster_size: 3000,
                ..base.clone()
            }),
            CreateProblem::ClusterSize
        );
        // Both wrong: the refcount width is judged before the compatibility level.
        assert_eq!(
            problem(CreateOptions {
                version: 2,
                refcount_bits: 3,
                ..base.clone()
            }),
            CreateProblem::RefcountWidth
        );
        assert_eq!(
            problem(CreateOptions {
                version: 2,
                extended_l2: true,
                cluster_size: 512,
                ..base.clone()
            }),
            CreateProblem::ExtendedL2NeedsV3
        );
        assert_eq!(
            problem(CreateOptions {
                size: 1 << 50,
                cluster_size: 512,
                ..base.clone()
            }),
            CreateProblem::TooLarge
        );
        assert_eq!(
            problem(CreateOptions {
                data_file_raw: true,
                ..base
            }),
            CreateProblem::DataFileRawWithoutDataFile
        );
    }
}
