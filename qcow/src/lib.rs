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
pub mod snapshot;
pub mod status;

pub use check::{check, check_monitored, CheckReport, Repair};
pub use create::{create, create_on, create_raw, CreateOptions, Preallocation};
pub use disk::{Disk, Format, RawDisk};
pub use error::{Corruption, Error, HeaderProblem, Result, SnapshotTableProblem};
pub use image::{Backing, Image, OpenOptions};
pub use map::{map, MapEntry};
pub use raw::{FileStorage, MemStorage, Storage};
pub use snapshot::{NewSnapshot, Snapshot, SnapshotError};

/// Parses a size the way qemu-img does: a number with an optional `k`/`K`, `M`, `G`, `T`, `P`, `E`
/// (binary) or `b` suffix; fractions are allowed with a suffix (`1.5G`).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let bad = || {
        format!(
            "invalid size '{text}': expected a number with an optional k, M, G, T, P or E suffix"
        )
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(bad()),
    };
    if number.is_empty() {
        return Err(bad());
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(1u64 << shift).ok_or_else(bad);
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let bytes = value * (1u64 << shift) as f64;
    if shift == 0 || !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn parses_sizes_like_qemu_img() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("512b"), Ok(512));
        assert!(parse_size("12x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999E").is_err());
    }
}
