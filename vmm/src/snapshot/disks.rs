//! The disks of a snapshot (format version 3): for each disk its device state and the frozen
//! image chain the snapshot's guest saw at the instant of the snapshot.
//!
//! A snapshot freezes a disk the way QEMU's external snapshots do: the image the VM was writing
//! becomes read-only and the VM continues on a fresh qcow2 overlay over it. The snapshot records
//! the frozen chain, top first, with a checksum of each image's metadata; a restore checks them
//! and puts its own fresh overlay on top, so nothing writable is ever shared.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::virtio::{BlockState, MmioState};
use crate::disk::chain::{self, Layer};
use crate::disk::DiskFormat;

/// One disk in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// Its virtio-mmio window (disk `i` is window `i`).
    pub index: usize,
    pub read_only: bool,
    pub block: BlockState,
    pub transport: MmioState,
    /// The frozen chain, top first.
    pub layers: Vec<LayerRecord>,
}

/// One image of a frozen chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Relative to the snapshot directory when the image lies in the directory that holds the
    /// snapshot (so a directory of snapshots can move as a whole), else absolute.
    pub path: String,
    pub format: DiskFormat,
    /// XXH3-64 of the image's header cluster and L1 table (raw: of its size and mtime).
    pub checksum: u64,
}

/// A recorded chain does not match the images on disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskStateError {
    #[error("{snapshot}: disk {index}'s image {path} is missing: {source}; keep the disk images a snapshot names next to it")]
    Missing {
        snapshot: PathBuf,
        index: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{snapshot}: disk {index}'s frozen image {path} was modified after the snapshot (its metadata checksum differs); restore needs the image as it was")]
    Modified {
        snapshot: PathBuf,
        index: usize,
        path: PathBuf,
    },
    #[error("{snapshot}: disk {index}'s image chain is not what the snapshot recorded: {why}")]
    ChainChanged {
        snapshot: PathBuf,
        index: usize,
        why: String,
    },
    #[error("{snapshot}: disk {index}: {source}")]
    Chain {
        snapshot: PathBuf,
        index: usize,
        #[source]
        source: chain::ChainError,
    },
}

impl LayerRecord {
    /// The record of `layer` in a snapshot written to `snapshot_dir` (absolute).
    pub fn new(layer: &Layer, snapshot_dir: &Path) -> Self {
        let anchor = snapshot_dir.parent().unwrap_or(snapshot_dir);
        Self {
            path: chain::name_from(snapshot_dir, &layer.path, anchor),
            format: layer.format,
            checksum: layer.checksum,
        }
    }

    /// The record of `layer` by its absolute path (a live fork's state, never written).
    pub fn absolute(layer: &Layer) -> Self {
        Self {
            path: layer.path.display().to_string(),
            format: layer.format,
            checksum: layer.checksum,
        }
    }

    /// Where the image is, for a snapshot read from `snapshot_dir`.
    pub fn path_in(&self, snapshot_dir: &Path) -> PathBuf {
        chain::resolve(snapshot_dir, &self.path)
    }
}

impl DiskState {
    /// The frozen top image, for a snapshot read from `snapshot_dir`.
    pub fn top(&self, snapshot_dir: &Path) -> Option<(PathBuf, DiskFormat)> {
        self.layers
            .first()
            .map(|layer| (layer.path_in(snapshot_dir), layer.format))
    }

    /// Checks that every recorded image exists with the metadata it had, and that the chain
    /// on disk is the recorded one; returns the chain.
    pub fn verify(&self, snapshot_dir: &Path) -> Result<Vec<Layer>, DiskStateError> {
        let Some((top, format)) = self.top(snapshot_dir) else {
            return Err(DiskStateError::ChainChanged {
                snapshot: snapshot_dir.to_owned(),
                index: self.index,
                why: "no image recorded".into(),
            });
        };
        for layer in &self.layers {
            let path = layer.path_in(snapshot_dir);
            if let Err(source) = std::fs::metadata(&path) {
                return Err(DiskStateError::Missing {
                    snapshot: snapshot_dir.to_owned(),
                    index: self.index,
                    path,
                    source,
                });
            }
        }
        let actual = chain::describe(&top, format).map_err(|source| DiskStateError::Chain {
            snapshot: snapshot_dir.to_owned(),
            index: self.index,
            source,
        })?;
        if actual.len() != self.layers.len() {
            return Err(DiskStateError::ChainChanged {
                snapshot: snapshot_dir.to_owned(),
                index: self.index,
                why: format!(
                    "{} images recorded, {} found under {}",
                    self.layers.len(),
                    actual.len(),
                    top.display()
                ),
            });
        }
        for (recorded, found) in self.layers.iter().zip(&actual) {
            let path = recorded.path_in(snapshot_dir);
            let same_file = same_file(&path, &found.path);
            if !same_file || recorded.format != found.format {
                return Err(DiskStateError::ChainChanged {
                    snapshot: snapshot_dir.to_owned(),
                    index: self.index,
                    why: format!(
                        "recorded {} ({}), the chain names {} ({})",
                        path.display(),
                        recorded.format.name(),
                        found.path.display(),
                        found.format.name()
                    ),
                });
            }
            if recorded.checksum != found.checksum {
                return Err(DiskStateError::Modified {
                    snapshot: snapshot_dir.to_owned(),
                    index: self.index,
                    path,
                });
            }
        }
        Ok(actual)
    }

    /// The same records for a snapshot written to `to_dir` instead of `from_dir` (a merge
    /// into another directory keeps the chain).
    pub fn moved(&self, from_dir: &Path, to_dir: &Path) -> Self {
        let anchor = to_dir.parent().unwrap_or(to_dir);
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                let path = layer.path_in(from_dir);
                let absolute = std::fs::canonicalize(&path).unwrap_or(path);
                LayerRecord {
                    path: chain::name_from(to_dir, &absolute, anchor),
                    ..layer.clone()
                }
            })
            .collect();
        Self {
            layers,
            ..self.clone()
        }
    }
}

/// Whether two paths name the same file (device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
