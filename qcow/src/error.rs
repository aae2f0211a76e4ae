//! The crate's error type: one variant per operation that can fail, each naming what to do, with
//! typed details (`HeaderProblem`, `SnapshotTableProblem`, `Corruption`) that callers can match;
//! `qemu_text` (in `error/qemu_text.rs`) gives the words qemu-img uses for each.

use std::io;
use std::path::PathBuf;

mod qemu_text;

/// Everything that can go wrong while opening, creating, reading, writing or checking an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}: {source}")]
    OpenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {path}: {source}")]
    CreateFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the qcow2 header: {0}")]
    ReadHeader(#[source] io::Error),
    #[error("cannot write the qcow2 header: {0}")]
    WriteHeader(#[source] io::Error),
    #[error("not a qcow2 image (bad magic {0:#010x})")]
    BadMagic(u32),
    #[error("unsupported qcow2 version {0} (only 2 and 3 are supported)")]
    UnsupportedVersion(u32),
    #[error("invalid cluster_bits {0}: must be between 9 and 21 (512 B to 2 MiB clusters)")]
    InvalidClusterBits(u32),
    #[error("invalid header: {0}")]
    InvalidHeader(#[from] HeaderProblem),
    /// QEMU's wording: the feature-table names of the unsupported bits, then the unnamed ones.
    #[error("Unsupported qcow2 feature(s): {}", unsupported_features(names, *unnamed))]
    UnknownIncompatibleFeature { names: Vec<String>, unnamed: u64 },
    #[error("image is corrupt (corrupt bit set); it can only be opened read-only — run `qcow check -r all` to repair it")]
    CorruptImage,
    #[error("unsupported refcount_order {0}: must be 0..=6 (1 to 64 bit refcounts)")]
    InvalidRefcountOrder(u32),
    #[error("refcount table too large: {0} clusters exceeds the 8 MiB limit")]
    RefcountTableTooLarge(u64),
    #[error("L1 table too large: {0} entries exceeds the 32 MiB limit")]
    L1TableTooLarge(u64),
    #[error("L1 table too small: {have} entries but the virtual size needs {need}")]
    L1TableTooSmall { have: u64, need: u64 },
    #[error("{what} offset {offset:#x} invalid: {why}")]
    InvalidTableOffset {
        what: &'static str,
        offset: u64,
        why: &'static str,
    },
    #[error("too many snapshots: {0} exceeds the limit of 65536")]
    TooManySnapshots(u64),
    #[error("invalid snapshot table: {0}")]
    InvalidSnapshotTable(#[from] SnapshotTableProblem),
    #[error("backing file name too long ({0} bytes; the limit is 1023)")]
    BackingNameTooLong(u64),
    #[error("header extension {ext_type:#010x} is too large ({len} bytes) for the header cluster")]
    HeaderExtensionTooLarge { ext_type: u32, len: u64 },
    #[error("cannot read L1 table: {0}")]
    ReadL1Table(#[source] io::Error),
    #[error("cannot write L1 table: {0}")]
    WriteL1Table(#[source] io::Error),
    #[error("cannot read L2 table at {offset:#x}: {source}")]
    ReadL2Table {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot write L2 table at {offset:#x}: {source}")]
    WriteL2Table {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot read refcount table: {0}")]
    ReadRefcountTable(#[source] io::Error),
    #[error("cannot write refcount table: {0}")]
    WriteRefcountTable(#[source] io::Error),
    #[error("cannot read refcount block at {offset:#x}: {source}")]
    ReadRefcountBlock {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot write refcount block at {offset:#x}: {source}")]
    WriteRefcountBlock {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("corrupt image: {0} — run `qcow check` for details")]
    Corrupt(#[from] Corruption),
    #[error("cannot read guest data at host offset {offset:#x}: {source}")]
    ReadData {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot write guest data at host offset {offset:#x}: {source}")]
    WriteData {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot decompress cluster at host offset {offset:#x}: {why}")]
    Decompress { offset: u64, why: String },
    #[error("cannot compress a cluster: {0}")]
    Compress(String),
    #[error("cannot flush image: {0}")]
    Flush(#[source] io::Error),
    #[error("cannot resize image file: {0}")]
    SetLen(#[source] io::Error),
    #[error("request at offset {offset} length {len} is past the end of the disk ({size} bytes)")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("image is opened read-only")]
    ReadOnly,
    #[error("the image file is full: no cluster offset left below the qcow2 limit")]
    NoSpace,
    #[error("cannot open the external data file {path}: {source}")]
    OpenDataFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the image keeps its data in an external data file, but its header names none: give one (json: `data-file`)")]
    DataFileRequired,
    #[error("a data file was given, but the image does not use an external data file")]
    DataFileNotExternal,
    #[error("the image says its data file is raw (autoclear bit 1) but uses no external data file — run `qcow check -r all` or clear the bit")]
    DataFileRawWithoutDataFile,
    #[error("the image was opened without its external data file (metadata only), so guest data cannot be read or written")]
    DataFileNotOpen,
    #[error("{0}: not supported with an external data file")]
    NotWithDataFile(&'static str),
    #[error("cannot open backing file {path}: {source}")]
    OpenBacking {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },
    #[error("cannot read backing file: {0}")]
    ReadBacking(#[source] io::Error),
    #[error("backing chain is deeper than {0} images (loop?)")]
    BackingChainTooDeep(usize),
    #[error("unsupported image format '{0}' (qcow2 or raw)")]
    UnsupportedFormat(String),
    #[error("{0}")]
    InvalidOption(crate::create::CreateProblem),
    #[error("refcount of cluster {cluster} would overflow the {bits}-bit refcount width")]
    RefcountOverflow { cluster: u64, bits: u32 },
    #[error("cannot allocate {clusters} contiguous clusters with {per_block} refcounts per refcount block (use larger clusters or narrower refcounts)")]
    ContiguousAllocation { clusters: u64, per_block: u64 },
    #[error("image file has {clusters} clusters; checking more than {limit} is not supported")]
    CheckTooLarge { clusters: u64, limit: u64 },
    #[error(transparent)]
    Amend(#[from] crate::amend::AmendError),
    #[error(transparent)]
    Commit(#[from] crate::commit::CommitError),
    #[error(transparent)]
    Measure(#[from] crate::measure::MeasureError),
    #[error(transparent)]
    Rebase(#[from] crate::rebase::RebaseError),
    #[error(transparent)]
    Convert(#[from] crate::convert::ConvertError),
    #[error(transparent)]
    Resize(#[from] crate::image::ResizeError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("interrupted")]
    Interrupted,
    #[error("cache mode 'none' needs O_DIRECT, which the file system of {path} does not support: {source}")]
    DirectIoUnsupported {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An I/O error's text without Rust's " (os error N)" suffix, as C's `strerror` prints it.
pub fn strerror(error: &io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_string(),
        _ => text,
    }
}

/// Why a header was refused (beyond the checks with their own `Error` variant).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderProblem {
    #[error("file is only {0} bytes long")]
    FileTooShort(u64),
    #[error("file is shorter than a qcow2 header")]
    ShorterThanV2Header,
    #[error("file is shorter than a qcow2 v3 header")]
    ShorterThanV3Header,
    #[error("header_length {0} is too short (at least 104)")]
    HeaderLengthTooShort(u32),
    #[error("header_length {length} exceeds the cluster size {cluster_size}")]
    HeaderLengthExceedsCluster { length: u32, cluster_size: u64 },
    #[error("header_length is past the end of the file")]
    HeaderLengthPastEnd,
    #[error("unknown compression type {0}")]
    UnknownCompressionType(u8),
    #[error("compression type field and incompatible bit 3 disagree")]
    CompressionBitMismatch,
    #[error("backing file offset {0:#x} is outside the header cluster")]
    BackingOffsetOutsideCluster(u64),
    #[error("backing file name is past the end of the file")]
    BackingNamePastEnd,
    #[error("backing format extension is {0} bytes (at most 15)")]
    BackingFormatTooLong(usize),
    #[error("encrypted images (crypt_method {0}) are not supported")]
    Encrypted(u32),
    #[error("refcount table has zero clusters")]
    RefcountTableEmpty,
    #[error("virtual size {size} is too big for cluster size {cluster_size}")]
    SizeTooBig { size: u64, cluster_size: u64 },
    #[error(
        "header and backing file name need {need} bytes but a cluster holds only {cluster_size}"
    )]
    DoesNotFitCluster { need: u64, cluster_size: u64 },
    #[error("extended L2 entries need clusters of at least 16 KiB (cluster_bits {0})")]
    ExtendedL2ClustersTooSmall(u32),
}

/// Why a snapshot table was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotTableProblem {
    #[error("table exceeds {limit} bytes at entry {index}")]
    TableTooLarge { index: u32, limit: u64 },
    #[error("entry {index} at {offset:#x} is past the end of the file")]
    EntryPastEndOfFile { index: u32, offset: u64 },
    #[error("entry {index} at {offset:#x} runs past the end of the table or file")]
    EntryRunsPastEnd { index: u32, offset: u64 },
    #[error("entry {index} has {len} bytes of extra data (at most 1024)")]
    ExtraDataTooLarge { index: u32, len: u64 },
    #[error("snapshot {index} L1 table has {entries} entries (too large)")]
    L1TooLarge { index: u32, entries: u32 },
    #[error("cannot read the table: {0}")]
    Read(#[source] io::Error),
}

/// Inconsistent metadata met while using an image (the image opened fine).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Corruption {
    #[error(
        "L2 table offset {entry:#x} (L1 index {l1_index}) is unaligned or has reserved bits set"
    )]
    L2OffsetInvalid { l1_index: usize, entry: u64 },
    #[error("L2 table at {offset:#x} is past the end of the file")]
    L2TablePastEnd { offset: u64 },
    #[error("L2 table at {offset:#x} vanished from the cache")]
    L2TableNotCached { offset: u64 },
    #[error("L2 entry {entry:#x} points at unaligned host offset {host:#x}")]
    DataOffsetUnaligned { entry: u64, host: u64 },
    #[error("L2 entry {entry:#x} has an invalid subcluster bitmap {bitmap:#018x}")]
    InvalidSubclusterBitmap { entry: u64, bitmap: u64 },
    #[error("L2 entry points at metadata (host offset {host:#x})")]
    DataOverlapsMetadata { host: u64 },
    #[error("L2 entry points past the end of the file (host offset {host:#x})")]
    DataPastEnd { host: u64 },
    #[error(
        "refcount block offset {entry:#x} (refcount table index {index}) is not cluster aligned"
    )]
    RefblockUnaligned { index: u64, entry: u64 },
    #[error("refcount block offset {offset:#x} is out of range")]
    RefblockOutOfRange { offset: u64 },
    #[error(
        "refcount block offset {offset:#x} (refcount table index {index}) overlaps the header, \
         L1 table, refcount table or snapshot table"
    )]
    RefblockOverlapsMetadata { index: u64, offset: u64 },
    #[error("refcount block at {offset:#x} is past the end of the file")]
    RefblockPastEnd { offset: u64 },
    #[error("cluster {cluster} has no refcount block but its refcount is being changed")]
    NoRefcountBlock { cluster: u64 },
    #[error("refcount of cluster {cluster} would drop below zero")]
    RefcountBelowZero { cluster: u64 },
    #[error(
        "refcount table entry {index} is empty although the clusters it covers are inside the \
         file; run `qcow check -r all`"
    )]
    RefcountTableEntryMissing { index: u64 },
    #[error("could not repair dirty image: {remaining} corruptions remain")]
    DirtyRepairFailed { remaining: u64 },
    #[error("snapshot L1 table at {offset:#x} is past the end of the file")]
    SnapshotL1PastEnd { offset: u64 },
    #[error(
        "external data file host cluster offset {host:#x} does not match guest cluster offset \
         {guest:#x}, but it must"
    )]
    DataFileOffsetMismatch { host: u64, guest: u64 },
    #[error("compressed cluster entry {entry:#x} found in an image with an external data file")]
    CompressedWithDataFile { entry: u64 },
}

fn unsupported_features(names: &[String], unnamed: u64) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .map(|name| name.chars().take(46).collect())
        .collect();
    if unnamed != 0 {
        parts.push(format!("Unknown incompatible feature: {unnamed:x}"));
    }
    parts.join(", ")
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;
