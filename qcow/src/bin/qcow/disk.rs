//! An opened disk for the `io` and `bench` commands: a qcow2 image or a raw file.

use std::fs::OpenOptions as FsOpenOptions;
use std::path::Path;

use anyhow::{bail, Context, Result};
use qcow::{FileStorage, Image, OpenOptions, Storage};

/// A qcow2 image or a raw file, opened for I/O.
pub enum Disk {
    Qcow(Box<Image<FileStorage>>),
    Raw { file: FileStorage, size: u64 },
}

impl Disk {
    /// Opens `path` as `format` (`None` probes the qcow2 magic).
    pub fn open(path: &Path, format: Option<&str>, read_only: bool, sync: bool) -> Result<Disk> {
        let format = match format {
            Some(f) => f.to_string(),
            None => probe(path)?,
        };
        match format.as_str() {
            "qcow2" => {
                let options = OpenOptions {
                    read_only,
                    sync,
                    ..OpenOptions::default()
                };
                let image =
                    Image::open(path, &options).with_context(|| format!("{}", path.display()))?;
                Ok(Disk::Qcow(Box::new(image)))
            }
            "raw" => {
                let file = FsOpenOptions::new()
                    .read(true)
                    .write(!read_only)
                    .open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                let mut file = FileStorage::new(file);
                file.set_sync(sync);
                let size = file.len().with_context(|| format!("{}", path.display()))?;
                Ok(Disk::Raw { file, size })
            }
            other => bail!(
                "{}: unsupported format '{other}' (qcow2 or raw)",
                path.display()
            ),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow(image) => image.size(),
            Disk::Raw { size, .. } => *size,
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            bail!(
                "request at offset {offset} length {len} is past the end of the disk ({} bytes)",
                self.size()
            );
        }
        Ok(())
    }

    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Disk::Qcow(image) => Ok(image.read_at(buf, offset)?),
            Disk::Raw { .. } => {
                self.check_range(offset, buf.len() as u64)?;
                if let Disk::Raw { file, .. } = self {
                    file.read_at(buf, offset)?;
                }
                Ok(())
            }
        }
    }

    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Disk::Qcow(image) => Ok(image.write_at(buf, offset)?),
            Disk::Raw { .. } => {
                self.check_range(offset, buf.len() as u64)?;
                if let Disk::Raw { file, .. } = self {
                    file.write_at(buf, offset)?;
                }
                Ok(())
            }
        }
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        match self {
            Disk::Qcow(image) => Ok(image.write_zeroes_with(offset, len, may_unmap)?),
            Disk::Raw { .. } => self.write_at(&vec![0u8; len as usize], offset),
        }
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            Disk::Qcow(image) => Ok(image.discard(offset, len)?),
            Disk::Raw { .. } => self.check_range(offset, len),
        }
    }

    pub fn flush(&mut self) -> Result<()> {
        match self {
            Disk::Qcow(image) => Ok(image.flush()?),
            Disk::Raw { file, .. } => Ok(file.flush()?),
        }
    }
}

/// "qcow2" if the file starts with the qcow2 magic, else "raw".
pub fn probe(path: &Path) -> Result<String> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut storage = FileStorage::new(file);
    let mut magic = [0u8; 4];
    storage
        .read_at(&mut magic, 0)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(if u32::from_be_bytes(magic) == qcow::header::MAGIC {
        "qcow2"
    } else {
        "raw"
    }
    .to_string())
}
