//! qcow2 disk images: the real QEMU format, checked by `qemu-img`.
//!
//! Layers, bottom up: [`raw`] (byte I/O on the file) → [`cache`] (bounded table caches that write
//! back through the caller) → [`refcount`] (refcounts and the cluster allocator) → [`l2`] (mapping
//! entries) → [`image`] (`Image`: byte-granular read/write/zero/discard/flush) → [`disk`] (`Disk`:
//! a qcow2 image or a raw file) → [`check`], [`create`], [`map`] (what the `qcow` CLI exposes).
//!
//! Errors are one [`Error`] enum with typed details ([`Corruption`], [`HeaderProblem`],
//! [`SnapshotTableProblem`]). The `cli` feature (on by default) builds the `qcow` binary and brings
//! its dependencies (clap, anyhow, …); the library itself never uses them.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod amend;
pub mod backing;
pub mod bitmap;
pub mod cache;
pub mod check;
pub mod commit;
pub mod compare;
mod compress;
pub mod convert;
pub mod create;
pub mod disk;
pub mod error;
pub mod header;
pub mod image;
pub mod l2;
pub mod map;
pub mod measure;
pub mod monitor;
pub mod raw;
pub mod rebase;
pub mod refcount;
pub mod size;
pub mod snapshot;
pub mod status;

pub use check::{check, check_monitored, CheckReport, Repair};
pub use create::{create, create_on, create_raw, CreateOptions, Preallocation};
pub use disk::{Disk, Format, RawDisk};
pub use error::{Corruption, Error, HeaderProblem, Result, SnapshotTableProblem};
pub use image::{Backing, Image, OpenOptions};
pub use map::{map, MapEntry};
pub use raw::{FileStorage, MemStorage, Storage};
pub use size::{parse_size, ParseSizeError};
pub use snapshot::{NewSnapshot, Snapshot, SnapshotError};
