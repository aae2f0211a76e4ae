//! Backing files: resolving their names, opening them (qcow2 or raw, read-only, bounded depth)
//! and reading through them.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use crate::raw::{FileStorage, Storage};

/// Deepest backing chain followed.
pub const MAX_BACKING_DEPTH: usize = 16;
/// The image underneath unallocated clusters.
#[derive(Debug)]
pub enum Backing {
    Raw {
        file: FileStorage,
        size: u64,
        path: PathBuf,
    },
    Qcow {
        image: Box<Image<FileStorage>>,
        path: PathBuf,
    },
}

impl Backing {
    /// Virtual size of the backing image.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Raw { size, .. } => *size,
            Backing::Qcow { image, .. } => image.size(),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Backing::Raw { path, .. } | Backing::Qcow { path, .. } => path,
        }
    }

    pub fn format(&self) -> &'static str {
        match self {
            Backing::Raw { .. } => "raw",
            Backing::Qcow { .. } => "qcow2",
        }
    }

    /// Reads at a guest offset; the part past the backing image's end reads as zeros.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail == 0 {
            return Ok(());
        }
        match self {
            Backing::Raw { file, .. } => file
                .read_at(&mut buf[..avail], offset)
                .map_err(Error::ReadBacking),
            Backing::Qcow { image, .. } => image.read_at(&mut buf[..avail], offset),
        }
    }
}

/// Resolves a backing file name against the directory of the image that names it.
pub fn resolve_backing_path(image_path: Option<&Path>, name: &str) -> PathBuf {
    let name_path = Path::new(name);
    if name_path.is_absolute() {
        return name_path.to_path_buf();
    }
    match image_path.and_then(|p| p.parent()) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name_path),
        _ => name_path.to_path_buf(),
    }
}

/// Opens a backing image read-only; `format` `None` probes the magic.
pub fn open_backing(path: &Path, format: Option<&str>, depth: usize) -> Result<Backing> {
    let wrap = |source: Error| Error::OpenBacking {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    if depth >= MAX_BACKING_DEPTH {
        return Err(Error::BackingChainTooDeep(MAX_BACKING_DEPTH));
    }
    let file = File::open(path).map_err(|source| {
        wrap(Error::OpenFile {
            path: path.to_path_buf(),
            source,
        })
    })?;
    let mut storage = FileStorage::new(file);
    let is_qcow = match format {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(other) => {
            return Err(wrap(Error::InvalidHeader(format!(
                "unsupported backing format '{other}'"
            ))))
        }
        None => {
            let mut magic = [0u8; 4];
            storage
                .read_at(&mut magic, 0)
                .map_err(|e| wrap(Error::ReadHeader(e)))?;
            u32::from_be_bytes(magic) == crate::header::MAGIC
        }
    };
    if is_qcow {
        let options = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let image =
            Image::open_storage_depth(storage, Some(path.to_path_buf()), &options, depth + 1)
                .map_err(wrap)?;
        Ok(Backing::Qcow {
            image: Box::new(image),
            path: path.to_path_buf(),
        })
    } else {
        let size = storage.len().map_err(|e| wrap(Error::ReadHeader(e)))?;
        Ok(Backing::Raw {
            file: storage,
            size,
            path: path.to_path_buf(),
        })
    }
}
