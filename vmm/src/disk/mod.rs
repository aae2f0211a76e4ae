//! Disks: the [`BlockBackend`] trait that the virtio-blk device talks to, its qcow2 and raw
//! implementations, and how `--disk` specifications become open backends.
//!
//! One request at a time: the device runs a virtqueue's requests in order on the vCPU thread that
//! notified it, holding the device's lock, so a backend needs `&mut self` and no lock of its own.
//! The qcow library's reads take `&mut` because they fill its L2-table cache; a shared read path
//! would need locking inside the library for no gain here (one queue per disk, one consumer).

mod attached;
pub mod chain;
pub mod freeze;
mod open;
mod qcow2;
mod raw;
mod spec;

pub use attached::{AttachedDisk, BlockDevice};
pub use open::{open_disk, qcow_options, OpenDiskError, OpenedDisk, DISK_CHAIN_LIMIT};
pub use qcow2::Qcow2Backend;
pub use raw::RawBackend;
pub use spec::{DiskFormat, DiskSpec, DiskSpecError};

/// Bytes in a virtio-blk sector: offsets and lengths of requests count in these.
pub const SECTOR_SIZE: u64 = 512;
/// Length of a virtio-blk device id (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

/// What a disk image must do for the virtio-blk device.
pub trait BlockBackend: Send + std::fmt::Debug {
    /// Reads `buf.len()` bytes at `offset` (the caller keeps requests inside [`size`]).
    ///
    /// [`size`]: BlockBackend::size
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), BackendError>;
    /// Lets the backend forget the range; it may read as zeros or as before afterwards.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError>;
    /// Makes the range read as zeros; with `may_unmap` the backend may deallocate it.
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BackendError>;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// The id the guest reads with `VIRTIO_BLK_T_GET_ID` (at most [`ID_BYTES`] bytes are used).
    fn id(&self) -> String;
    fn read_only(&self) -> bool;
    /// Whether [`discard`](BlockBackend::discard) frees space (else the feature is not offered).
    fn supports_discard(&self) -> bool;
    /// Whether [`write_zeroes`](BlockBackend::write_zeroes) is cheaper than writing zeros.
    fn supports_write_zeroes(&self) -> bool;
    /// Flushes and closes, returning the final flush's error.
    fn close(self: Box<Self>) -> Result<(), BackendError>;
}

/// A backend operation failed; the guest sees `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("reading {len} bytes at {offset:#x} of {path}: {source}")]
    Read {
        path: String,
        offset: u64,
        len: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("writing {len} bytes at {offset:#x} of {path}: {source}")]
    Write {
        path: String,
        offset: u64,
        len: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("flushing {path}: {source}")]
    Flush {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("discarding {len} bytes at {offset:#x} of {path}: {source}")]
    Discard {
        path: String,
        offset: u64,
        len: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("zeroing {len} bytes at {offset:#x} of {path}: {source}")]
    WriteZeroes {
        path: String,
        offset: u64,
        len: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{path} is read-only")]
    ReadOnly { path: String },
    #[error("the disk was closed when the VM stopped")]
    Closed,
}

/// What a device holds once its disk is closed: every request fails.
#[derive(Debug)]
pub struct ClosedBackend;

impl BlockBackend for ClosedBackend {
    fn read(&mut self, _: u64, _: &mut [u8]) -> Result<(), BackendError> {
        Err(BackendError::Closed)
    }
    fn write(&mut self, _: u64, _: &[u8]) -> Result<(), BackendError> {
        Err(BackendError::Closed)
    }
    fn flush(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> Result<(), BackendError> {
        Err(BackendError::Closed)
    }
    fn write_zeroes(&mut self, _: u64, _: u64, _: bool) -> Result<(), BackendError> {
        Err(BackendError::Closed)
    }
    fn size(&self) -> u64 {
        0
    }
    fn id(&self) -> String {
        String::new()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn supports_discard(&self) -> bool {
        false
    }
    fn supports_write_zeroes(&self) -> bool {
        false
    }
    fn close(self: Box<Self>) -> Result<(), BackendError> {
        Ok(())
    }
}

/// The id of a disk opened from `path`: its file name, cut to [`ID_BYTES`] bytes (QEMU takes
/// the `serial=` property; a file name is what a user recognizes).
pub fn id_from_path(path: &std::path::Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut end = name.len().min(ID_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_file_names_cut_at_a_character_boundary() {
        assert_eq!(id_from_path("/a/b/disk.qcow2".as_ref()), "disk.qcow2");
        assert_eq!(
            id_from_path("/x/a-very-long-disk-image-name.qcow2".as_ref()),
            "a-very-long-disk-ima"
        );
        let accented = "ééééééééééé.raw"; // 2-byte characters: 20 bytes end on a boundary
        assert_eq!(id_from_path(accented.as_ref()).len(), 20);
        assert_eq!(id_from_path("/x/aéééééééééé".as_ref()).len(), 19);
    }
}
