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
    /// Gives `[offset, offset + len)` (inside the file) back to the host: it reads as zeros
    /// afterwards. The default writes zeros.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
    /// Makes `[offset, offset + len)` read as zeros, keeping it allocated. The default writes
    /// zeros.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        write_zero_buffers(self, offset, len)
    }
}

/// Writes zeros over `[offset, offset + len)` from a page-aligned buffer of at most 1 MiB.
fn write_zero_buffers<S: Storage + ?Sized>(
    storage: &mut S,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let zeros = AlignedBuf::new(len.min(1 << 20) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        storage.write_at(&zeros.as_slice()[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A [`Storage`] over a regular file. `sync` makes `flush` call `fdatasync` (the default); without it
/// flushes are no-ops (qemu's `cache=unsafe`). In direct mode (qemu's `cache=none`, the file opened
/// with `O_DIRECT`) requests that are not aligned in memory, offset and length go through an
/// aligned bounce buffer, read-modify-write for writes.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    sync: bool,
    direct: bool,
    bounce: AlignedBuf,
}

/// Alignment of memory, offsets and lengths for `O_DIRECT` (covers 512- and 4096-byte devices).
pub const DIRECT_ALIGN: usize = 4096;
/// Largest bounce window of one direct request; longer unaligned requests are split.
const BOUNCE_MAX: usize = 4 << 20;

impl FileStorage {
    /// Wraps `file`; flushes call `fdatasync`.
    pub fn new(file: File) -> Self {
        FileStorage {
            file,
            sync: true,
            direct: false,
            bounce: AlignedBuf::new(DIRECT_ALIGN),
        }
    }

    /// Wraps a file opened with `O_DIRECT` (see [`open_options_direct`]).
    pub fn new_direct(file: File) -> Self {
        FileStorage {
            direct: true,
            ..FileStorage::new(file)
        }
    }

    /// Chooses whether `flush` reaches the disk (`false` = qemu's `cache=unsafe`).
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// Whether the file bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn read_exact_or_zero(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
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

    fn aligned(ptr: *const u8, offset: u64, len: usize) -> bool {
        let align = DIRECT_ALIGN as u64;
        (ptr as usize) % DIRECT_ALIGN == 0 && offset % align == 0 && len as u64 % align == 0
    }

    /// The aligned window `[start, start + len)` around `[offset, offset + want)`, at most
    /// `BOUNCE_MAX` long past `offset`.
    fn window(offset: u64, want: usize) -> (u64, usize, usize) {
        let align = DIRECT_ALIGN as u64;
        let start = offset - offset % align;
        let lead = (offset - start) as usize;
        let take = want.min(BOUNCE_MAX - lead);
        let len = (lead + take).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        (start, lead, take.min(len - lead))
    }

    /// The bounce buffer, at least `len` bytes, and the file.
    fn bounce(&mut self, len: usize) -> (&mut [u8], &File) {
        if self.bounce.len() < len {
            self.bounce.resize(len);
        }
        (&mut self.bounce.as_mut_slice()[..len], &self.file)
    }

    fn direct_read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let (start, lead, take) = Self::window(offset + done as u64, buf.len() - done);
            let len = (lead + take).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            let (bounce, file) = self.bounce(len);
            Self::read_exact_or_zero(file, bounce, start)?;
            buf[done..done + take].copy_from_slice(&bounce[lead..lead + take]);
            done += take;
        }
        Ok(())
    }

    fn direct_write(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let old_len = self.file.metadata()?.len();
        let mut done = 0;
        while done < buf.len() {
            let (start, lead, take) = Self::window(offset + done as u64, buf.len() - done);
            let len = (lead + take).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            let (bounce, file) = self.bounce(len);
            // Read-modify-write: only the first and last aligned blocks keep old bytes.
            Self::read_exact_or_zero(file, &mut bounce[..DIRECT_ALIGN], start)?;
            if len > DIRECT_ALIGN {
                let tail = len - DIRECT_ALIGN;
                Self::read_exact_or_zero(file, &mut bounce[tail..], start + tail as u64)?;
            }
            bounce[lead..lead + take].copy_from_slice(&buf[done..done + take]);
            file.write_all_at(bounce, start)?;
            done += take;
        }
        // The aligned writes may have extended the file past the requested end: cut it back.
        let end = offset + buf.len() as u64;
        if self.file.metadata()?.len() > old_len.max(end) {
            self.file.set_len(old_len.max(end))?;
        }
        Ok(())
    }
}

/// `std::fs::OpenOptions` for a file that bypasses the page cache (`O_DIRECT`).
pub fn open_options_direct(write: bool) -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options
        .read(true)
        .write(write)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
    options
}

impl Storage for FileStorage {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.direct && !Self::aligned(buf.as_ptr(), offset, buf.len()) {
            return self.direct_read(buf, offset);
        }
        Self::read_exact_or_zero(&self.file, buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.direct && !Self::aligned(buf.as_ptr(), offset, buf.len()) {
            return self.direct_write(buf, offset);
        }
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

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        // Like QEMU's discard on a file: punch a hole; without hole support, write zeros.
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zeroes(offset, len),
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        if fallocate(
            &self.file,
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .is_ok()
        {
            return Ok(());
        }
        write_zero_buffers(self, offset, len)
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

/// A page-aligned, zero-initialised byte buffer (over `aligned-vec`): the kernel copies to and
/// from aligned memory much faster, and `O_DIRECT` requires it.
#[derive(Debug, Clone)]
pub struct AlignedBuf(aligned_vec::AVec<u8, aligned_vec::ConstAlign<DIRECT_ALIGN>>);

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let mut buf = AlignedBuf::default();
        buf.resize(len);
        buf
    }

    /// Grows or shrinks the buffer; new bytes are zero.
    pub fn resize(&mut self, len: usize) {
        self.0.resize(len, 0);
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf(aligned_vec::AVec::new(DIRECT_ALIGN))
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
    fn aligned_buffers_are_page_aligned() {
        let buf = AlignedBuf::new(10_000);
        assert_eq!(buf.len(), 10_000);
        assert_eq!(buf.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
    }

    #[test]
    fn direct_windows_cover_the_request() {
        assert_eq!(FileStorage::window(5000, 100), (4096, 904, 100));
        assert_eq!(FileStorage::window(0, 4096), (0, 0, 4096));
        let (start, lead, take) = FileStorage::window(100, 10 << 20);
        assert_eq!((start, lead), (0, 100));
        assert_eq!(take, BOUNCE_MAX - 100);
    }

    #[test]
    fn direct_io_reads_and_writes_unaligned_requests() {
        let dir = std::env::temp_dir().join(format!("qcow-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("direct.img");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let file = match open_options_direct(true).open(&path) {
            Ok(file) => file,
            Err(e) => {
                println!("SKIP: O_DIRECT not supported here: {e}");
                return;
            }
        };
        let mut storage = FileStorage::new_direct(file);
        storage.write_at(&[1, 2, 3], 4095).unwrap();
        storage.write_at(&[9u8; 5000], 9000).unwrap();
        assert_eq!(storage.len().unwrap(), 14_000);
        let mut aligned = AlignedBuf::new(4096);
        storage.write_at(aligned.as_slice(), 16384).unwrap();
        aligned.as_mut_slice().fill(5);
        storage.read_at(aligned.as_mut_slice(), 0).unwrap();
        assert_eq!(&aligned.as_slice()[4094..4096], &[7, 1]);
        let mut buf = [0u8; 6];
        storage.read_at(&mut buf, 4094).unwrap();
        assert_eq!(buf, [7, 1, 2, 3, 7, 7]);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 20_480);
        assert_eq!(&bytes[8999..9001], &[7, 9]);
        assert!(bytes[14_000..].iter().all(|&b| b == 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mem_storage_reads_zeros_past_end() {
        let mut storage = MemStorage::default();
        storage.write_at(&[1, 2, 3], 2).unwrap();
        let mut buf = [9u8; 8];
        storage.read_at(&mut buf, 1).unwrap();
        assert_eq!(buf, [0, 1, 2, 3, 0, 0, 0, 0]);
    }
}
