//! The crate's error type: one variant per operation that can fail, each naming what to do.

use std::io;
use std::path::PathBuf;

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
    InvalidHeader(String),
    #[error("unsupported qcow2 feature: incompatible feature bit {bit} ({name}) is set; this image cannot be opened")]
    UnknownIncompatibleFeature { bit: u32, name: String },
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
    InvalidSnapshotTable(String),
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
    Corrupt(String),
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
    #[error("invalid create option: {0}")]
    InvalidOption(String),
    #[error("refcount of cluster {cluster} would overflow the {bits}-bit refcount width")]
    RefcountOverflow { cluster: u64, bits: u32 },
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;
