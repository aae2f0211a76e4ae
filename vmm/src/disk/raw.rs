//! [`BlockBackend`] for raw image files: positioned reads and writes, `fdatasync` for flushes,
//! `fallocate` hole punching for discards and zeroing.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{fallocate, FallocateFlags};

use super::{BackendError, BlockBackend};

/// An open raw image file.
#[derive(Debug)]
pub struct RawBackend {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    id: String,
    /// QEMU's rule for a raw format that was probed, not named: the guest may not write
    /// something that would make the file probe as another format next time (a qcow2 header
    /// written by the guest would otherwise let it name any host file as its backing file).
    restrict_first_sector: bool,
}

impl RawBackend {
    pub fn open(path: &Path, read_only: bool, id: String) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            read_only,
            id,
            restrict_first_sector: false,
        })
    }

    /// Refuse guest writes that put an image-format magic into the first bytes (see the field).
    pub fn restrict_first_sector(&mut self) {
        self.restrict_first_sector = true;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn writable(&self) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly { path: self.name() });
        }
        Ok(())
    }

    /// Writes zeros the slow way, for file systems without hole punching.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Whether `data` at `offset` would make the file probe as qcow2.
fn looks_like_qcow2(offset: u64, data: &[u8]) -> bool {
    const MAGIC: [u8; 4] = *b"QFI\xfb";
    offset == 0 && data.len() >= MAGIC.len() && data[..MAGIC.len()] == MAGIC
}

impl BlockBackend for RawBackend {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| BackendError::Read {
                path: self.name(),
                offset,
                len: buf.len() as u64,
                source: Box::new(e),
            })
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        self.writable()?;
        let error = |source: std::io::Error| BackendError::Write {
            path: self.name(),
            offset,
            len: buf.len() as u64,
            source: Box::new(source),
        };
        if self.restrict_first_sector && looks_like_qcow2(offset, buf) {
            return Err(error(std::io::Error::other(
                "the format of this raw image was probed, so writes that make block 0 look like a qcow2 header are refused; name it with format=raw to lift this",
            )));
        }
        self.file.write_all_at(buf, offset).map_err(error)
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| BackendError::Flush {
            path: self.name(),
            source: Box::new(e),
        })
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.writable()?;
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match fallocate(&self.file, punch, offset, len) {
            // A file system that cannot punch holes simply keeps the data: discard is a hint.
            Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
            Err(e) => Err(BackendError::Discard {
                path: self.name(),
                offset,
                len,
                source: Box::new(std::io::Error::from(e)),
            }),
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BackendError> {
        self.writable()?;
        let flags = if may_unmap {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        };
        let result = match fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => self.write_zero_bytes(offset, len),
            Err(e) => Err(e.into()),
        };
        result.map_err(|e| BackendError::WriteZeroes {
            path: self.name(),
            offset,
            len,
            source: Box::new(e),
        })
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn id(&self) -> String {
        self.id.clone()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn supports_write_zeroes(&self) -> bool {
        true
    }

    fn close(mut self: Box<Self>) -> Result<(), BackendError> {
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_file(len: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0xaa; len]).unwrap();
        (dir, path)
    }

    #[test]
    fn read_write_zero_discard() {
        let (_dir, path) = raw_file(1 << 20);
        let mut disk = RawBackend::open(&path, false, "d".into()).unwrap();
        assert_eq!(disk.size(), 1 << 20);
        disk.write(4096, &[1; 512]).unwrap();
        disk.write_zeroes(8192, 4096, false).unwrap();
        disk.discard(65536, 65536).unwrap();
        disk.write_zeroes(131072, 8192, true).unwrap();
        disk.flush().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        disk.read(0, &mut buf).unwrap();
        assert_eq!(&buf[4096..4608], &[1; 512]);
        assert_eq!(&buf[4608..8192], &[0xaa; 3584][..]);
        assert!(buf[8192..12288].iter().all(|&b| b == 0));
        assert!(buf[131072..139264].iter().all(|&b| b == 0));
        assert!(buf[139264..].iter().all(|&b| b == 0xaa));
        Box::new(disk).close().unwrap();
    }

    #[test]
    fn read_only_and_probed_raw_refuse_writes() {
        let (_dir, path) = raw_file(4096);
        let mut disk = RawBackend::open(&path, true, "d".into()).unwrap();
        assert!(matches!(
            disk.write(0, &[0; 512]),
            Err(BackendError::ReadOnly { .. })
        ));
        assert!(matches!(
            disk.discard(0, 512),
            Err(BackendError::ReadOnly { .. })
        ));
        let mut disk = RawBackend::open(&path, false, "d".into()).unwrap();
        disk.restrict_first_sector();
        let mut header = [0u8; 512];
        header[..4].copy_from_slice(b"QFI\xfb");
        let err = disk.write(0, &header).unwrap_err();
        assert!(err.to_string().contains("format=raw"), "{err}");
        disk.write(512, &header).unwrap();
        disk.write(0, &[0; 512]).unwrap();
        assert!(disk.read(4000, &mut [0; 512]).is_err(), "past the end");
    }
}
