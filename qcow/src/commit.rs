//! `commit`: folds what an overlay (and the layers between it and the base) holds into a backing
//! file down its chain, then empties the overlay — `qemu-img commit`.
//!
//! The base is written first and flushed; the overlay is emptied only after that, so an
//! interruption at any point leaves two valid images with the overlay's content intact.

use std::path::{Path, PathBuf};

use crate::disk::{Disk, Format};
use crate::error::{Error, Result};
use crate::image::OpenOptions;
use crate::monitor::{checkpoint, Monitor};
use crate::status::Allocation;

/// Bytes handled per step.
const CHUNK: u64 = 2 << 20;

/// Why a commit is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommitError {
    #[error("Image does not have a backing file")]
    NoBackingFile,
    #[error("Did not find '{base}' in the backing chain of '{top}'")]
    BaseNotInChain { base: String, top: String },
}

/// Which layer of `top`'s chain is the base: 1 = its backing file.
struct Target {
    depth: usize,
    path: PathBuf,
    format: Format,
}

/// Finds `base` (or the backing file when `None`) in the chain under `top`.
fn find_base(top: &mut Disk, top_path: &Path, base: Option<&Path>) -> Result<Target> {
    let wanted = base.map(|b| std::fs::canonicalize(b).unwrap_or_else(|_| b.to_path_buf()));
    let mut depth = 0;
    let mut layer = top;
    while let Some(below) = layer.backing_mut() {
        depth += 1;
        let path = below.path().map(Path::to_path_buf).unwrap_or_default();
        let matches = match &wanted {
            None => true,
            Some(wanted) => {
                std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone()) == *wanted
            }
        };
        if matches {
            return Ok(Target {
                depth,
                path,
                format: below.format(),
            });
        }
        layer = below;
    }
    Err(match base {
        Some(base) if depth > 0 => Error::Commit(CommitError::BaseNotInChain {
            base: base.display().to_string(),
            top: top_path.display().to_string(),
        }),
        _ => Error::Commit(CommitError::NoBackingFile),
    })
}

/// Copies what `top` and the layers above `base` hold into `base` (default: `top`'s backing
/// file) and, unless `keep_top`, empties `top` afterwards. A base smaller than `top` grows.
pub fn commit(
    top_path: &Path,
    base: Option<&Path>,
    keep_top: bool,
    monitor: &mut dyn Monitor,
) -> Result<()> {
    let read_only = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let mut top = Disk::open(top_path, None, &read_only)?;
    let target = find_base(&mut top, top_path, base)?;
    let size = top.size();
    let mut base_disk = Disk::open(&target.path, Some(target.format), &OpenOptions::default())?;
    if base_disk.size() < size {
        base_disk.resize(size.div_ceil(512) * 512, false)?;
    }
    monitor.start(size);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut offset = 0;
    let copied = (|| -> Result<()> {
        while offset < size {
            checkpoint(monitor)?;
            let extent = top.status(offset, CHUNK.min(size - offset), target.depth)?;
            let len = extent.len;
            match extent.allocation {
                Allocation::Data => {
                    let part = &mut buf[..len as usize];
                    top.read_at(part, offset)?;
                    base_disk.write_at(part, offset)?;
                }
                Allocation::Zero => base_disk.write_zeroes(offset, len, true)?,
                Allocation::Unallocated => {}
            }
            offset += len;
            monitor.advance(offset);
        }
        Ok(())
    })();
    // Ordering: the base is durable before the top loses anything (and also when the copy
    // stopped half-way: the base then holds a mix that the top still covers).
    let closed = base_disk.close();
    copied?;
    closed?;
    drop(top);
    if !keep_top && base.is_none() {
        let mut image = Disk::open(
            top_path,
            Some(Format::Qcow2),
            &OpenOptions {
                no_backing: true,
                ..OpenOptions::default()
            },
        )?;
        if let Some(image) = image.as_qcow2() {
            image.make_empty()?;
        }
        image.close()?;
    }
    Ok(())
}
