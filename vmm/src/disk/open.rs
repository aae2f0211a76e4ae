//! Opening a `--disk`: probe the format when it is not named, open the image (and its backing
//! chain, whose formats must be recorded, never probed), and wrap it as a [`BlockBackend`].

use std::path::{Path, PathBuf};

use super::{id_from_path, BlockBackend, DiskFormat, DiskSpec, Qcow2Backend, RawBackend};

/// Deepest image chain a disk may have: one overlay per snapshot along the longest snapshot
/// chain cowvm follows (256), over a user image with a chain as deep as qcow allows by default.
pub const DISK_CHAIN_LIMIT: usize = 256 + qcow::image::MAX_BACKING_DEPTH;

/// A disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenDiskError {
    #[error("--disk {path}: cannot read it to probe its format: {source}")]
    Probe {
        path: PathBuf,
        #[source]
        source: qcow::Error,
    },
    #[error("--disk {path}: cannot open it as {format}: {source}")]
    Open {
        path: PathBuf,
        format: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("--disk {path}: its image {image} names the backing file {backing} without a backing format; cowvm never probes a backing file's format (a guest could make a raw file look like qcow2) — record it with `qemu-img rebase -u -b {backing} -F qcow2|raw {image}`")]
    BackingFormatMissing {
        path: PathBuf,
        image: PathBuf,
        backing: String,
    },
    #[error("--disk {path}: {size} bytes is smaller than one 512-byte sector")]
    TooSmall { path: PathBuf, size: u64 },
}

/// An open disk and how it was opened.
#[derive(Debug)]
pub struct OpenedDisk {
    pub backend: Box<dyn BlockBackend>,
    pub format: DiskFormat,
    /// The format was probed (and came out raw): QEMU's write restriction on block 0 applies.
    pub probed_raw: bool,
}

/// qcow open options for a disk image (or an image of a disk's chain).
pub fn qcow_options(read_only: bool) -> qcow::OpenOptions {
    qcow::OpenOptions {
        read_only,
        max_backing_depth: DISK_CHAIN_LIMIT,
        ..qcow::OpenOptions::default()
    }
}

/// Opens the disk `spec` describes.
pub fn open_disk(spec: &DiskSpec) -> Result<OpenedDisk, OpenDiskError> {
    let path = &spec.path;
    let (format, probed) = match spec.format {
        Some(format) => (format, false),
        None => {
            let probed = qcow::Format::probe(path).map_err(|source| OpenDiskError::Probe {
                path: path.clone(),
                source,
            })?;
            (DiskFormat::from(probed), true)
        }
    };
    let id = id_from_path(path);
    let open_error = |source: Box<dyn std::error::Error + Send + Sync>| OpenDiskError::Open {
        path: path.clone(),
        format: format.name(),
        source,
    };
    let backend: Box<dyn BlockBackend> = match format {
        DiskFormat::Qcow2 => {
            let image = qcow::Image::open(path, &qcow_options(spec.read_only))
                .map_err(|e| open_error(Box::new(e)))?;
            check_backing_formats(path, &image)?;
            Box::new(Qcow2Backend::new(image, path, id))
        }
        DiskFormat::Raw => {
            let mut raw =
                RawBackend::open(path, spec.read_only, id).map_err(|e| open_error(Box::new(e)))?;
            if probed {
                tracing::warn!(
                    "Image format was not specified for '{}' and probing guessed raw. Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted. Specify the 'raw' format explicitly to remove the restrictions.",
                    path.display()
                );
                raw.restrict_first_sector();
            }
            Box::new(raw)
        }
    };
    if backend.size() < super::SECTOR_SIZE {
        return Err(OpenDiskError::TooSmall {
            path: path.clone(),
            size: backend.size(),
        });
    }
    Ok(OpenedDisk {
        backend,
        format,
        probed_raw: probed && format == DiskFormat::Raw,
    })
}

/// Every qcow2 image of the chain must record its backing file's format.
fn check_backing_formats(
    path: &Path,
    image: &qcow::Image<qcow::FileStorage>,
) -> Result<(), OpenDiskError> {
    let mut current = Some((image.path().unwrap_or(path).to_owned(), image));
    while let Some((image_path, image)) = current.take() {
        let header = image.header();
        if let (Some(backing), None) = (&header.backing_file, &header.backing_format) {
            return Err(OpenDiskError::BackingFormatMissing {
                path: path.to_owned(),
                image: image_path,
                backing: backing.clone(),
            });
        }
        if let Some(qcow::Disk::Qcow2(below)) = image.backing() {
            let below_path = below.path().unwrap_or(&image_path).to_owned();
            current = Some((below_path, &**below));
        }
    }
    Ok(())
}
