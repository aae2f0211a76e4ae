//! Raw byte I/O on the file under an image: the `Storage` trait and its `std::fs::File` implementation.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The file an image lives in. Implemented by [`FileStorage`]; tests implement it to record or drop
/// writes (crash simulation).
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send {
    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zero.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (a write barrier).
    fn flush(&mut self) -> io::Result<()>;
    /// Current file length in bytes.
    fn len(&mut self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Bytes the file occupies on the host (for `actual-size`); `None` if unknown.
    fn allocated_size(&mut self) -> Option<u64> {
        None
    }
    /// Whether the bytes at `offset` are data (`true`) or a hole that reads as zeros, and how many
    /// bytes (at most `len`, at least 1 when `len > 0`) share that state — SEEK_DATA/SEEK_HOLE, used
    /// by `map` exactly as qemu-img does. The default says "all data".
    fn extent_at(&mut self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let _ = offset;
        Ok((true, len))
    }
}

/// A [`Storage`] over a regular file. `sync` makes `flush` call `fdatasync` (the default); without it
/// flushes are no-ops (qemu's `cache=unsafe`).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    sync: bool,
}

impl FileStorage {
    /// Wraps `file`; flushes call `fdatasync`.
    pub fn new(file: File) -> Self {
        FileStorage { file, sync: true }
    }

    /// Chooses whether `flush` reaches the disk (`false` = qemu's `cache=unsafe`).
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.sync {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }

    fn len(&mut self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocated_size(&mut self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn extent_at(&mut self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        use rustix::fs::{seek, SeekFrom};
        // Only pread/pwrite are used on this file, so moving its offset is harmless.
        match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(data) if data == offset => {
                let hole = seek(&self.file, SeekFrom::Hole(offset))?;
                Ok((true, hole.saturating_sub(offset).clamp(1, len.max(1))))
            }
            Ok(data) => Ok((false, (data - offset).min(len))),
            // Past the last data: a hole up to (and beyond) the end of the file.
            Err(rustix::io::Errno::NXIO) => Ok((false, len)),
            // No SEEK_DATA support: report data, as qemu does.
            Err(_) => Ok((true, len)),
        }
    }
}

/// A page-aligned byte buffer: the kernel copies to and from aligned memory much faster, which
/// matters for cluster-sized copy-on-write buffers.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + Self::ALIGN];
        let start = (Self::ALIGN - storage.as_ptr() as usize % Self::ALIGN) % Self::ALIGN;
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// An in-memory [`Storage`], handy for tests.
#[derive(Debug, Default, Clone)]
pub struct MemStorage {
    /// The file's bytes.
    pub data: Vec<u8>,
}

impl Storage for MemStorage {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let len = self.data.len() as u64;
        if offset < len {
            let start = offset as usize;
            let n = buf.len().min(self.data.len() - start);
            buf[..n].copy_from_slice(&self.data[start..start + n]);
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset as usize + buf.len();
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn len(&mut self) -> io::Result<u64> {
        Ok(self.data.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.data.resize(len as usize, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_storage_reads_zeros_past_end() {
        let mut storage = MemStorage::default();
        storage.write_at(&[1, 2, 3], 2).unwrap();
        let mut buf = [9u8; 8];
        storage.read_at(&mut buf, 1).unwrap();
        assert_eq!(buf, [0, 1, 2, 3, 0, 0, 0, 0]);
    }
}
