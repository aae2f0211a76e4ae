//! `rebase`: gives an overlay a new backing file — `qemu-img rebase`. Safe mode first copies into
//! the overlay every cluster it does not hold itself whose content differs between the old and
//! the new backing chain, so the guest sees the same disk; unsafe mode (`-u`) only rewrites the
//! name.

use std::path::Path;

use crate::backing::resolve_backing_path;
use crate::disk::{Disk, Format};
use crate::error::{Error, Result};
use crate::image::OpenOptions;
use crate::monitor::{checkpoint, Monitor};
use crate::status::Allocation;

/// Bytes handled per step.
const CHUNK: u64 = 2 << 20;

/// Why a rebase is refused.
#[derive(Debug, thiserror::Error)]
pub enum RebaseError {
    #[error("Could not open new backing file '{name}': {reason}")]
    OpenNewBacking { name: String, reason: String },
    #[error("Could not change the backing file to '{0}': backing format must be specified")]
    FormatRequired(String),
    #[error("rebase works on qcow2 images only")]
    NotQcow2,
}

/// What the overlay's new backing file is: `None` (or an empty name) detaches it.
#[derive(Debug, Clone, Default)]
pub struct NewBacking {
    pub name: Option<String>,
    pub format: Option<Format>,
}

/// Rebases the qcow2 image at `top_path` onto `new`. With `unsafe_mode` only the header changes.
pub fn rebase(
    top_path: &Path,
    new: &NewBacking,
    unsafe_mode: bool,
    monitor: &mut dyn Monitor,
) -> Result<()> {
    let name = new.name.as_deref().filter(|n| !n.is_empty());
    if let (Some(name), None) = (name, new.format) {
        return Err(Error::Rebase(RebaseError::FormatRequired(name.to_string())));
    }
    let options = OpenOptions {
        no_backing: unsafe_mode,
        ..OpenOptions::default()
    };
    let mut top = Disk::open(top_path, Some(Format::Qcow2), &options)?;
    if !unsafe_mode {
        let mut new_disk = match name {
            Some(name) => {
                let path = resolve_backing_path(Some(top_path), name);
                let read_only = OpenOptions {
                    read_only: true,
                    ..OpenOptions::default()
                };
                Some(Disk::open(&path, new.format, &read_only).map_err(|source| {
                    Error::Rebase(RebaseError::OpenNewBacking {
                        name: name.to_string(),
                        reason: source.qemu_text(),
                    })
                })?)
            }
            None => None,
        };
        copy_differences(&mut top, new_disk.as_mut(), monitor)?;
    }
    let image = top.as_qcow2().ok_or(Error::Rebase(RebaseError::NotQcow2))?;
    image.set_backing_file(name, new.format.map(Format::name))?;
    top.close()
}

/// Writes into `top` every cluster it leaves to its backing chain whose content the new backing
/// file (`None`: zeros) does not have.
fn copy_differences(
    top: &mut Disk,
    mut new: Option<&mut Disk>,
    monitor: &mut dyn Monitor,
) -> Result<()> {
    let size = top.size();
    let cluster = match top.as_qcow2() {
        Some(image) => image.cluster_size(),
        None => return Err(Error::Rebase(RebaseError::NotQcow2)),
    };
    let mut old = vec![0u8; CHUNK as usize];
    let mut fresh = vec![0u8; CHUNK as usize];
    monitor.start(size);
    let mut offset = 0;
    while offset < size {
        checkpoint(monitor)?;
        let extent = top.status(offset, CHUNK.min(size - offset), 1)?;
        let len = extent.len;
        if extent.allocation == Allocation::Unallocated {
            let n = len as usize;
            top.read_at(&mut old[..n], offset)?;
            match new.as_deref_mut() {
                Some(disk) => disk.read_padded(&mut fresh[..n], offset)?,
                None => fresh[..n].fill(0),
            }
            // Whole clusters, as QEMU writes them: runs are cluster aligned inside the image.
            let mut at = 0usize;
            while at < n {
                let guest = offset + at as u64;
                let stop = (((guest / cluster) + 1) * cluster - offset).min(len) as usize;
                if old[at..stop] != fresh[at..stop] {
                    top.write_at(&old[at..stop], guest)?;
                }
                at = stop;
            }
        }
        offset += len;
        monitor.advance(offset);
    }
    top.flush()
}
