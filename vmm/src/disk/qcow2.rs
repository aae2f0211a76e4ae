//! [`BlockBackend`] for qcow2 images, through the `qcow` library.

use std::path::{Path, PathBuf};

use qcow::{FileStorage, Image};

use super::{BackendError, BlockBackend};

/// An open qcow2 image (with its backing chain).
#[derive(Debug)]
pub struct Qcow2Backend {
    image: Image<FileStorage>,
    path: PathBuf,
    id: String,
}

impl Qcow2Backend {
    pub fn new(image: Image<FileStorage>, path: &Path, id: String) -> Self {
        Self {
            image,
            path: path.to_owned(),
            id,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn image_mut(&mut self) -> &mut Image<FileStorage> {
        &mut self.image
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

fn boxed(e: qcow::Error) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

impl BlockBackend for Qcow2Backend {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let len = buf.len() as u64;
        self.image
            .read_at(buf, offset)
            .map_err(|e| BackendError::Read {
                path: self.name(),
                offset,
                len,
                source: boxed(e),
            })
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        if self.image.is_read_only() {
            return Err(BackendError::ReadOnly { path: self.name() });
        }
        self.image
            .write_at(buf, offset)
            .map_err(|e| BackendError::Write {
                path: self.name(),
                offset,
                len: buf.len() as u64,
                source: boxed(e),
            })
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        if self.image.is_read_only() {
            return Ok(());
        }
        self.image.flush().map_err(|e| BackendError::Flush {
            path: self.name(),
            source: boxed(e),
        })
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        if self.image.is_read_only() {
            return Err(BackendError::ReadOnly { path: self.name() });
        }
        self.image
            .discard(offset, len)
            .map_err(|e| BackendError::Discard {
                path: self.name(),
                offset,
                len,
                source: boxed(e),
            })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BackendError> {
        if self.image.is_read_only() {
            return Err(BackendError::ReadOnly { path: self.name() });
        }
        self.image
            .write_zeroes_with(offset, len, may_unmap)
            .map_err(|e| BackendError::WriteZeroes {
                path: self.name(),
                offset,
                len,
                source: boxed(e),
            })
    }

    fn size(&self) -> u64 {
        self.image.size()
    }

    fn id(&self) -> String {
        self.id.clone()
    }

    fn read_only(&self) -> bool {
        self.image.is_read_only()
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn supports_write_zeroes(&self) -> bool {
        true
    }

    fn close(self: Box<Self>) -> Result<(), BackendError> {
        let path = self.name();
        self.image.close().map_err(|e| BackendError::Flush {
            path,
            source: boxed(e),
        })
    }
}
