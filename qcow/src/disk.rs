//! `Disk`: the one place that tells raw files from qcow2 images. Backing files, the CLI's I/O
//! commands and the image operations (convert, compare, commit, rebase) all go through it.

use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use crate::raw::{open_options_direct, FileStorage, Storage};

/// An image file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// `Qcow2` if the file starts with the qcow2 magic, else `Raw` (what qemu probes to).
    pub fn probe(path: &Path) -> Result<Format> {
        let file = std::fs::File::open(path).map_err(|source| Error::OpenFile {
            path: path.to_path_buf(),
            source,
        })?;
        let mut storage = FileStorage::new(file);
        let mut magic = [0u8; 4];
        storage.read_at(&mut magic, 0).map_err(Error::ReadHeader)?;
        Ok(if u32::from_be_bytes(magic) == crate::header::MAGIC {
            Format::Qcow2
        } else {
            Format::Raw
        })
    }
}

impl FromStr for Format {
    type Err = Error;

    fn from_str(text: &str) -> Result<Format> {
        match text {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(Error::UnsupportedFormat(other.to_string())),
        }
    }
}

/// A raw image file.
#[derive(Debug)]
pub struct RawDisk {
    pub(crate) file: FileStorage,
    size: u64,
    path: PathBuf,
    read_only: bool,
}

impl RawDisk {
    /// Opens the raw file at `path`.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<RawDisk> {
        let opened = if options.direct {
            open_options_direct(!options.read_only).open(path)
        } else {
            FsOpenOptions::new()
                .read(true)
                .write(!options.read_only)
                .open(path)
        };
        let file = opened.map_err(|source| open_error(path, options, source))?;
        let mut file = if options.direct {
            FileStorage::new_direct(file)
        } else {
            FileStorage::new(file)
        };
        file.set_sync(options.sync);
        let size = file.len().map_err(Error::ReadHeader)?;
        Ok(RawDisk {
            file,
            size,
            path: path.to_path_buf(),
            read_only: options.read_only,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying file.
    pub fn storage_mut(&mut self) -> &mut FileStorage {
        &mut self.file
    }
}

/// The error for a failed open; `O_DIRECT` refused by the file system gets its own message.
pub(crate) fn open_error(path: &Path, options: &OpenOptions, source: std::io::Error) -> Error {
    if options.direct && source.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) {
        return Error::DirectIoUnsupported {
            path: path.to_path_buf(),
            source,
        };
    }
    Error::OpenFile {
        path: path.to_path_buf(),
        source,
    }
}

/// A qcow2 image or a raw file.
#[derive(Debug)]
pub enum Disk {
    Qcow2(Box<Image<FileStorage>>),
    Raw(RawDisk),
}

impl Disk {
    /// Opens `path` as `format` (`None` probes the qcow2 magic).
    pub fn open(path: &Path, format: Option<Format>, options: &OpenOptions) -> Result<Disk> {
        let format = match format {
            Some(format) => format,
            None => Format::probe(path)?,
        };
        Ok(match format {
            Format::Qcow2 => Disk::Qcow2(Box::new(Image::open(path, options)?)),
            Format::Raw => Disk::Raw(RawDisk::open(path, options)?),
        })
    }

    pub fn format(&self) -> Format {
        match self {
            Disk::Qcow2(_) => Format::Qcow2,
            Disk::Raw(_) => Format::Raw,
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow2(image) => image.size(),
            Disk::Raw(raw) => raw.size,
        }
    }

    /// The file the disk was opened from (an image opened on other storage has none).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Disk::Qcow2(image) => image.path(),
            Disk::Raw(raw) => Some(&raw.path),
        }
    }

    /// The qcow2 image, if this is one.
    pub fn as_qcow2(&mut self) -> Option<&mut Image<FileStorage>> {
        match self {
            Disk::Qcow2(image) => Some(image),
            Disk::Raw(_) => None,
        }
    }

    fn check_raw_range(raw: &RawDisk, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > raw.size) {
            return Err(Error::OutOfBounds {
                offset,
                len,
                size: raw.size,
            });
        }
        Ok(())
    }

    fn check_raw_writable(raw: &RawDisk) -> Result<()> {
        if raw.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (inside the disk).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Disk::Qcow2(image) => image.read_at(buf, offset),
            Disk::Raw(raw) => {
                Self::check_raw_range(raw, offset, buf.len() as u64)?;
                raw.file
                    .read_at(buf, offset)
                    .map_err(|source| Error::ReadData { offset, source })
            }
        }
    }

    /// Reads at `offset` as a backing file is read: the part past the end of the disk reads as
    /// zeros.
    pub fn read_padded(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let avail = self.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail == 0 {
            return Ok(());
        }
        match self {
            Disk::Raw(raw) => raw
                .file
                .read_at(&mut buf[..avail], offset)
                .map_err(Error::ReadBacking),
            Disk::Qcow2(image) => image.read_at(&mut buf[..avail], offset),
        }
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Disk::Qcow2(image) => image.write_at(buf, offset),
            Disk::Raw(raw) => {
                Self::check_raw_writable(raw)?;
                Self::check_raw_range(raw, offset, buf.len() as u64)?;
                raw.file
                    .write_at(buf, offset)
                    .map_err(|source| Error::WriteData { offset, source })
            }
        }
    }

    /// Makes the range read as zeros; with `may_unmap` a qcow2 image may deallocate whole
    /// clusters (qemu-io's `write -z -u`).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        match self {
            Disk::Qcow2(image) => image.write_zeroes_with(offset, len, may_unmap),
            Disk::Raw(raw) => {
                Self::check_raw_writable(raw)?;
                Self::check_raw_range(raw, offset, len)?;
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64);
                    raw.file
                        .write_at(&zeros[..n as usize], offset + done)
                        .map_err(|source| Error::WriteData { offset, source })?;
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Discards whole clusters of a qcow2 image; a no-op on raw files (after the range check).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            Disk::Qcow2(image) => image.discard(offset, len),
            Disk::Raw(raw) => {
                Self::check_raw_writable(raw)?;
                Self::check_raw_range(raw, offset, len)
            }
        }
    }

    /// Sets the virtual size (a raw file is truncated or extended; see [`Image::resize`]).
    pub fn resize(&mut self, new_size: u64, shrink: bool) -> Result<()> {
        match self {
            Disk::Qcow2(image) => image.resize(new_size, shrink),
            Disk::Raw(raw) => {
                Self::check_raw_writable(raw)?;
                if new_size < raw.size && !shrink {
                    return Err(crate::image::ResizeError::ShrinkNotAllowed.into());
                }
                raw.file.set_len(new_size).map_err(Error::SetLen)?;
                raw.size = new_size;
                Ok(())
            }
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<()> {
        match self {
            Disk::Qcow2(image) => image.flush(),
            Disk::Raw(raw) if raw.read_only => Ok(()),
            Disk::Raw(raw) => raw.file.flush().map_err(Error::Flush),
        }
    }

    /// Flushes and closes, returning the final flush's error (dropping a disk swallows it).
    pub fn close(self) -> Result<()> {
        match self {
            Disk::Qcow2(image) => image.close(),
            mut raw @ Disk::Raw(_) => raw.flush(),
        }
    }
}

/// A backing file: any [`Disk`], opened read-only.
pub type Backing = Disk;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_name_themselves() {
        assert_eq!("qcow2".parse::<Format>().unwrap(), Format::Qcow2);
        assert_eq!("raw".parse::<Format>().unwrap(), Format::Raw);
        assert!(matches!(
            "vmdk".parse::<Format>(),
            Err(Error::UnsupportedFormat(name)) if name == "vmdk"
        ));
        assert_eq!(Format::Qcow2.name(), "qcow2");
    }
}
