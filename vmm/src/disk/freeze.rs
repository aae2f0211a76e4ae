//! Freezing disks at a snapshot, and the fresh overlays that restored VMs (and a VM after its
//! snapshot) write to.
//!
//! Before the pause a fresh qcow2 overlay is created over the image each writable disk is
//! writing (creating one takes two fsyncs, kept off the pause). With the VM paused, each disk is
//! flushed, its image chain is recorded (paths and metadata checksums) and the overlay is
//! opened; once the memory is written too, the device switches to the overlay and the old image
//! is closed. The frozen image never changes again: overlays cowvm made are made read-only
//! (mode 0444); an image the user named is left as it is, and a restore checks its checksum.
//!
//! Overlays live in a `cowvm-disks/` directory ([`OverlayPlace`]): beside the snapshot directory
//! for snapshots and restores, beside the frozen image for live forks. They are never moved or
//! renamed: the names inside their headers stay valid, and every name that points into the
//! directory holding `cowvm-disks/` is relative, so that directory can move as a whole.

use std::path::{Path, PathBuf};

use super::chain::{self, ChainError};
use super::open::qcow_options;
use super::{
    AttachedDisk, BackendError, BlockBackend, DiskFormat, Qcow2Backend, RawBackend,
    DISK_CHAIN_LIMIT,
};
use crate::snapshot::disks::{DiskState, LayerRecord};

/// Directory, beside the snapshot directories, that holds the overlays cowvm creates.
pub const OVERLAY_DIR: &str = "cowvm-disks";

/// A disk could not be frozen or given its overlay.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("disk {index}: flushing before the snapshot failed: {source}")]
    Flush {
        index: usize,
        #[source]
        source: BackendError,
    },
    #[error("disk {index}: {source}")]
    Chain {
        index: usize,
        #[source]
        source: ChainError,
    },
    #[error("disk {index}: its image chain is {depth} images deep, and a snapshot adds one; the limit is {DISK_CHAIN_LIMIT}")]
    TooDeep { index: usize, depth: usize },
    #[error("cannot create the overlay directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the overlay {path}: {source}")]
    CreateOverlay {
        path: PathBuf,
        #[source]
        source: qcow::Error,
    },
    #[error("cannot open the disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Where the fresh overlays of a snapshot, a restore or a live fork go.
#[derive(Clone, Debug)]
pub enum OverlayPlace {
    /// In `cowvm-disks/` beside this snapshot directory (absolute; it need not exist yet),
    /// named after it.
    Snapshot(PathBuf),
    /// In `cowvm-disks/` beside each disk's frozen image (in its own directory if that is a
    /// `cowvm-disks/` already), named `<prefix>.disk<i>.<8 hex>.qcow2`.
    Image { prefix: String },
}

impl OverlayPlace {
    /// The directory (to create) and the name prefix of an overlay over `below` (absolute).
    fn dir_and_prefix(&self, below: &Path) -> (PathBuf, String) {
        match self {
            OverlayPlace::Snapshot(snapshot_dir) => {
                let anchor = snapshot_dir.parent().unwrap_or(snapshot_dir);
                let name = snapshot_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (anchor.join(OVERLAY_DIR), name)
            }
            OverlayPlace::Image { prefix } => {
                let dir = below.parent().unwrap_or(below);
                let dir = if dir.file_name().is_some_and(|n| n == OVERLAY_DIR) {
                    dir.to_owned()
                } else {
                    dir.join(OVERLAY_DIR)
                };
                (dir, prefix.clone())
            }
        }
    }
}

/// A disk's snapshot record and the overlay that will take the disk over.
#[derive(Debug)]
pub struct Prepared {
    pub state: DiskState,
    /// The new overlay (none for a read-only disk, which keeps its image).
    overlay: Option<(PathBuf, Box<dyn BlockBackend>)>,
}

impl Prepared {
    /// Gives up: the overlay is removed and the disk stays as it was.
    pub fn abandon(self) {
        if let Some((path, backend)) = self.overlay {
            let _ = backend.close();
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Overlay files created before a pause (making one takes two fsyncs, which stay off the
/// pause) and opened in it; any not taken over by a disk are removed when this drops.
#[derive(Debug, Default)]
pub struct PendingOverlays(Vec<Option<PathBuf>>);

impl PendingOverlays {
    /// Creates, for every writable disk, the overlay it will move onto, over its current image.
    pub fn create(disks: &[AttachedDisk], place: &OverlayPlace) -> Result<Self, FreezeError> {
        let mut pending = Self::default();
        for disk in disks {
            if disk.read_only {
                pending.0.push(None);
                continue;
            }
            let size = disk.lock().device_mut().backend_mut().size();
            let path = create_overlay_file(place, disk.index, &disk.top, disk.format, size)?;
            pending.0.push(Some(path));
        }
        Ok(pending)
    }

    /// The overlay made for disk `index`, now owned by the caller.
    fn take(&mut self, index: usize) -> Option<PathBuf> {
        self.0.get_mut(index).and_then(Option::take)
    }
}

impl Drop for PendingOverlays {
    fn drop(&mut self) {
        for path in self.0.iter().flatten() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// With the VM paused: flushes `disk`, records its chain (relative to `snapshot_dir`, an
/// absolute path that need not exist yet; absolute without one) and opens the overlay made for
/// it in `pending`, which the VM continues on.
pub fn prepare(
    disk: &AttachedDisk,
    snapshot_dir: Option<&Path>,
    pending: &mut PendingOverlays,
) -> Result<Prepared, FreezeError> {
    let index = disk.index;
    let started = std::time::Instant::now();
    let mut device = disk.lock();
    let (transport, block) = (device.save(), device.device().save());
    let backend = device.device_mut().backend_mut();
    backend
        .flush()
        .map_err(|source| FreezeError::Flush { index, source })?;
    let id = backend.id();
    drop(device);
    let flushed = started.elapsed();
    let layers = chain::describe(&disk.top, disk.format)
        .map_err(|source| FreezeError::Chain { index, source })?;
    if !disk.read_only && layers.len() >= DISK_CHAIN_LIMIT {
        return Err(FreezeError::TooDeep {
            index,
            depth: layers.len(),
        });
    }
    let state = DiskState {
        index,
        read_only: disk.read_only,
        block,
        transport,
        layers: layers
            .iter()
            .map(|layer| match snapshot_dir {
                Some(dir) => LayerRecord::new(layer, dir),
                None => LayerRecord::absolute(layer),
            })
            .collect(),
    };
    let Some(path) = pending.take(index) else {
        return Ok(Prepared {
            state,
            overlay: None,
        });
    };
    let described = started.elapsed();
    // Ordering: the overlay is opened (reading the frozen image's metadata through a new
    // handle) only after the flush above put that metadata in the file.
    let backend = open_image(&path, DiskFormat::Qcow2, false, id).inspect_err(|_| {
        let _ = std::fs::remove_file(&path);
    })?;
    tracing::debug!(
        "disk {index} frozen: flush {flushed:?}, chain recorded at {described:?}, overlay open at {:?}",
        started.elapsed()
    );
    Ok(Prepared {
        state,
        overlay: Some((path, backend)),
    })
}

/// An image a snapshot froze, switched away from and not closed yet.
#[derive(Debug)]
pub struct Frozen {
    index: usize,
    backend: Box<dyn BlockBackend>,
}

impl Frozen {
    /// Closes the image. Ordering: it was flushed before the snapshot (while the guest was
    /// paused) and nothing has written to it since, so this close needs no pause — it may wait
    /// on the file system (its final flush), which must not hold the guest.
    pub fn close(self) {
        if let Err(e) = self.backend.close() {
            tracing::warn!("disk {}: closing the frozen image: {e}", self.index);
        }
    }
}

/// Switches `disk` to its prepared overlay; returns the image it was writing, frozen, for the
/// caller to close once the guest runs again.
pub fn commit(disk: &mut AttachedDisk, prepared: Prepared) -> Option<Frozen> {
    let (path, backend) = prepared.overlay?;
    let old = disk.lock().device_mut().replace_backend(backend);
    if disk.overlay {
        // An overlay cowvm made is frozen for good now; the user's own image keeps its mode.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&disk.top, std::fs::Permissions::from_mode(0o444));
    }
    disk.top = path;
    disk.format = DiskFormat::Qcow2;
    disk.overlay = true;
    Some(Frozen {
        index: disk.index,
        backend: old,
    })
}

/// Creates and opens a fresh qcow2 overlay over `below` (of `format`) for disk `index`, in
/// `place`.
pub fn create_overlay(
    place: &OverlayPlace,
    index: usize,
    below: &Path,
    format: DiskFormat,
    size: u64,
    id: String,
) -> Result<(PathBuf, Box<dyn BlockBackend>), FreezeError> {
    let path = create_overlay_file(place, index, below, format, size)?;
    let backend = open_image(&path, DiskFormat::Qcow2, false, id).inspect_err(|_| {
        let _ = std::fs::remove_file(&path);
    })?;
    Ok((path, backend))
}

/// Creates (does not open) a fresh qcow2 overlay over `below` for disk `index`, in `place`.
fn create_overlay_file(
    place: &OverlayPlace,
    index: usize,
    below: &Path,
    format: DiskFormat,
    size: u64,
) -> Result<PathBuf, FreezeError> {
    let below = std::fs::canonicalize(below).map_err(|e| FreezeError::Open {
        path: below.to_owned(),
        source: Box::new(e),
    })?;
    let (dir, prefix) = place.dir_and_prefix(&below);
    let dir_error = |source| FreezeError::CreateDir {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(dir_error)?;
    let dir = std::fs::canonicalize(&dir).map_err(dir_error)?;
    let anchor = dir.parent().unwrap_or(&dir).to_owned();
    let unique = &crate::snapshot::new_id()[..8];
    let path = dir.join(format!("{prefix}.disk{index}.{unique}.qcow2"));
    let options = qcow::CreateOptions {
        size,
        backing_file: Some(chain::name_from(&dir, &below, &anchor)),
        backing_format: Some(format.name().to_string()),
        ..qcow::CreateOptions::default()
    };
    // The backing image is opened when the overlay is, with the chain limit the VMM allows.
    qcow::create::create_with(&path, &options, false).map_err(|source| {
        FreezeError::CreateOverlay {
            path: path.clone(),
            source,
        }
    })?;
    Ok(path)
}

/// Opens one image of a disk as a backend.
pub fn open_image(
    path: &Path,
    format: DiskFormat,
    read_only: bool,
    id: String,
) -> Result<Box<dyn BlockBackend>, FreezeError> {
    let error = |source: Box<dyn std::error::Error + Send + Sync>| FreezeError::Open {
        path: path.to_owned(),
        source,
    };
    Ok(match format {
        DiskFormat::Qcow2 => {
            let image = qcow::Image::open(path, &qcow_options(read_only))
                .map_err(|e| error(Box::new(e)))?;
            Box::new(Qcow2Backend::new(image, path, id))
        }
        DiskFormat::Raw => {
            Box::new(RawBackend::open(path, read_only, id).map_err(|e| error(Box::new(e)))?)
        }
    })
}
