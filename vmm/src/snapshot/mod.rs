//! VM snapshots: a directory with `state` (vCPUs, VM, devices, memory layout and checksums) and
//! `memory` (raw RAM, sparse), full or diff, and the code that writes, checks and loads them.
//!
//! Writing has two halves so that the guest is paused only for the first: [`write_memory`] copies
//! RAM into the staging directory's `memory` file (guest paused), then
//! [`PendingSnapshot::publish`] checksums that file, writes `state`, fsyncs everything and
//! renames the directory into place (guest running again).

pub mod checksum;
pub mod disks;
pub mod format;
mod inspect;
pub mod mapped;
pub mod memory;
mod merge;
pub mod persist;
mod residency;
pub mod staging;
pub mod state;

use std::fs::File;
use std::path::{Path, PathBuf};

use checksum::ChecksumError;
use staging::{StagingDir, StagingError};
use state::{crc_id, ParentRef, SnapshotKind, SnapshotState};

pub use inspect::{inspect, InspectReport};
pub use mapped::{MappedFile, MappedFileChanged};
pub use merge::merge;

use crate::memory::GuestMemory;

/// Name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Longest diff chain followed (guards against a parent loop).
const MAX_CHAIN: usize = 256;

/// A snapshot could not be taken, read or merged.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error("cannot write snapshot {path}: {source}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error(transparent)]
    Memory(#[from] memory::SnapshotMemoryError),
    #[error(transparent)]
    Checksum(#[from] ChecksumError),
    #[error("a diff snapshot needs an earlier snapshot of this VM to build on; take a full snapshot first")]
    NoParent,
    #[error("{child} builds on {parent}, which is missing; keep a diff's parents next to it (or merge the chain first)")]
    MissingParent { child: PathBuf, parent: PathBuf },
    #[error("{child} builds on {parent}, but that snapshot's id is {found}, not the recorded {expected}: the parent was replaced")]
    ParentMismatch {
        child: PathBuf,
        parent: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{0}: diff chain longer than 256 snapshots (or a loop)")]
    ChainTooLong(PathBuf),
    #[error("{path}: a {kind:?} snapshot {problem}")]
    Inconsistent {
        path: PathBuf,
        kind: SnapshotKind,
        problem: &'static str,
    },
    /// Boxed: it is far larger than the other variants.
    #[error(transparent)]
    Disk(Box<disks::DiskStateError>),
    #[error("{0} records no memory checksums (it was written by an older cowvm, format version 1), so it cannot be verified; run without --verify, or `cowvm snapshot merge` it to record them")]
    NoChecksums(PathBuf),
}

impl From<disks::DiskStateError> for SnapshotError {
    fn from(error: disks::DiskStateError) -> Self {
        Self::Disk(Box::new(error))
    }
}

/// One snapshot of a chain, as read from disk.
#[derive(Debug)]
pub struct LoadedSnapshot {
    pub dir: PathBuf,
    pub state: SnapshotState,
    /// CRC32 of the `state` file.
    pub crc: u32,
    pub version: u32,
    /// The id diffs name it by: `state.id`, or for version 1 the CRC stand-in.
    pub id: String,
}

impl LoadedSnapshot {
    /// Checks every disk's frozen chain (see [`disks::DiskState::verify`]); returns the chains.
    pub fn verify_disks(&self) -> Result<Vec<Vec<crate::disk::chain::Layer>>, SnapshotError> {
        self.state
            .disks
            .iter()
            .map(|disk| disk.verify(&self.dir).map_err(SnapshotError::from))
            .collect()
    }

    /// How a diff built on this snapshot names it.
    pub fn as_parent(&self) -> ParentRef {
        let path = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        ParentRef {
            path: path.display().to_string(),
            id: Some(self.id.clone()),
            state_crc: None,
        }
    }
}

/// A new random snapshot id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A snapshot whose memory is written and whose state is not yet.
#[derive(Debug)]
pub struct PendingSnapshot {
    staging: StagingDir,
    state: SnapshotState,
}

/// Writes `memory` (all of it, or the pages set in `dirty` for a diff) into the staging
/// directory and fills in `state.memory`. Guest RAM must not change meanwhile.
pub fn write_memory(
    staging: StagingDir,
    mut state: SnapshotState,
    memory: &GuestMemory,
    dirty: Option<&[u64]>,
) -> Result<PendingSnapshot, SnapshotError> {
    let memory_path = staging.path().join(MEMORY_FILE);
    let file = File::create(&memory_path).map_err(|source| SnapshotError::WriteFile {
        path: memory_path.clone(),
        source,
    })?;
    match dirty {
        None => {
            state.memory.pages_stored = memory::dump_full(&file, memory, state.mem_size)?;
            state.memory.runs.clear();
        }
        Some(dirty) => {
            let runs = memory::dump_diff(&file, memory, state.mem_size, dirty)?;
            state.memory.pages_stored = runs.iter().map(|(_, n)| n).sum();
            state.memory.runs = runs;
        }
    }
    // The memory file is immutable once written: restored VMs map it.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&memory_path, std::fs::Permissions::from_mode(0o444));
    Ok(PendingSnapshot { staging, state })
}

impl PendingSnapshot {
    pub fn state(&self) -> &SnapshotState {
        &self.state
    }

    /// Checksums the memory file, writes `state`, fsyncs every file and the directory, and
    /// renames it to its final name. Returns the published snapshot.
    pub fn publish(self) -> Result<LoadedSnapshot, SnapshotError> {
        let (staging, loaded) = self.finish()?;
        staging.commit()?;
        Ok(loaded)
    }

    /// As [`PendingSnapshot::publish`], but atomically replaces the existing directory.
    pub fn publish_replacing(self) -> Result<LoadedSnapshot, SnapshotError> {
        let (staging, loaded) = self.finish()?;
        staging.commit_replacing()?;
        Ok(loaded)
    }

    fn finish(mut self) -> Result<(StagingDir, LoadedSnapshot), SnapshotError> {
        let memory_path = self.staging.path().join(MEMORY_FILE);
        let file = File::open(&memory_path).map_err(|source| SnapshotError::WriteFile {
            path: memory_path.clone(),
            source,
        })?;
        self.state.memory.checksums =
            Some(checksum::compute(&file, &memory_path, self.state.mem_size)?);
        let (bytes, crc) = format::encode(&self.state)?;
        let state_path = self.staging.path().join(STATE_FILE);
        std::fs::write(&state_path, &bytes).map_err(|source| SnapshotError::WriteFile {
            path: state_path,
            source,
        })?;
        let id = self.state.id.clone().unwrap_or_else(|| crc_id(crc));
        let loaded = LoadedSnapshot {
            dir: self.staging.target().to_owned(),
            state: self.state,
            crc,
            version: format::FORMAT_VERSION,
            id,
        };
        Ok((self.staging, loaded))
    }
}

/// Reads `dir` and, for a diff, its parents; returns the chain root first. Every state file
/// and every parent's id is checked before anything is used.
pub fn load_chain(dir: &Path) -> Result<Vec<LoadedSnapshot>, SnapshotError> {
    let mut chain = Vec::new();
    let mut next = Some((dir.to_owned(), None::<(PathBuf, String)>));
    while let Some((dir, expected)) = next.take() {
        if chain.len() >= MAX_CHAIN {
            return Err(SnapshotError::ChainTooLong(dir));
        }
        let decoded = format::read::<SnapshotState>(&dir.join(STATE_FILE))?;
        let state = decoded.value;
        let id = state.id.clone().unwrap_or_else(|| crc_id(decoded.crc));
        if let Some((child, expected)) = expected {
            if id != expected {
                return Err(SnapshotError::ParentMismatch {
                    child,
                    parent: dir,
                    expected,
                    found: id,
                });
            }
        }
        let inconsistent = |problem| SnapshotError::Inconsistent {
            path: dir.clone(),
            kind: state.kind,
            problem,
        };
        match (state.kind, &state.parent) {
            (SnapshotKind::Full, Some(_)) => return Err(inconsistent("names a parent")),
            (SnapshotKind::Diff, None) => return Err(inconsistent("has no parent")),
            (SnapshotKind::Full, None) if !state.memory.runs.is_empty() => {
                return Err(inconsistent("lists page runs"))
            }
            _ => {}
        }
        if let Some(parent_ref) = &state.parent {
            let Some(expected) = parent_ref.expected_id() else {
                return Err(inconsistent("names a parent without an id"));
            };
            let parent = resolve_parent(&dir, Path::new(&parent_ref.path));
            if !parent.join(STATE_FILE).exists() {
                return Err(SnapshotError::MissingParent {
                    child: dir.clone(),
                    parent,
                });
            }
            next = Some((parent, Some((dir.clone(), expected))));
        }
        chain.push(LoadedSnapshot {
            dir,
            state,
            crc: decoded.crc,
            version: decoded.version,
            id,
        });
    }
    chain.reverse();
    Ok(chain)
}

/// A parent is found where it was recorded, or else beside the child (for moved chains).
fn resolve_parent(child: &Path, recorded: &Path) -> PathBuf {
    if recorded.join(STATE_FILE).exists() {
        return recorded.to_owned();
    }
    match (child.parent(), recorded.file_name()) {
        (Some(dir), Some(name)) => dir.join(name),
        _ => recorded.to_owned(),
    }
}

/// Checks every memory file of `chain` against the checksums recorded in its state.
pub fn verify_chain(chain: &[LoadedSnapshot]) -> Result<(), SnapshotError> {
    for snapshot in chain {
        let Some(recorded) = &snapshot.state.memory.checksums else {
            return Err(SnapshotError::NoChecksums(snapshot.dir.clone()));
        };
        let path = snapshot.dir.join(MEMORY_FILE);
        checksum::verify(&path, snapshot.state.mem_size, recorded)?;
    }
    Ok(())
}

/// Guest RAM built from a chain, and the file it maps (none when it was copied).
#[derive(Debug)]
pub struct LoadedMemory {
    pub memory: GuestMemory,
    pub mapped: Option<MappedFile>,
}

/// Builds guest RAM from a loaded chain: the root's memory mapped `MAP_PRIVATE` (or copied with
/// `eager`), then each diff's pages read on top, oldest first.
pub fn load_memory(chain: &[LoadedSnapshot], eager: bool) -> Result<LoadedMemory, SnapshotError> {
    let Some(root) = chain.first() else {
        return Err(SnapshotError::NoParent);
    };
    let mem_size = root.state.mem_size;
    let root_memory = root.dir.join(MEMORY_FILE);
    let (guest, mapped) = if eager {
        (memory::load_eager(&root_memory, mem_size)?, None)
    } else {
        let (guest, mapped) = memory::map_private(&root_memory, mem_size)?;
        (guest, Some(mapped))
    };
    for diff in &chain[1..] {
        if diff.state.mem_size != mem_size {
            return Err(SnapshotError::Inconsistent {
                path: diff.dir.clone(),
                kind: diff.state.kind,
                problem: "has a different RAM size than its parent",
            });
        }
        let path = diff.dir.join(MEMORY_FILE);
        let file = File::open(&path).map_err(|source| memory::SnapshotMemoryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len != mem_size {
            return Err(memory::SnapshotMemoryError::WrongSize {
                path: path.display().to_string(),
                expected: mem_size,
                actual: len,
            }
            .into());
        }
        memory::apply_runs(&file, &path, &guest, &diff.state.memory.runs)?;
    }
    Ok(LoadedMemory {
        memory: guest,
        mapped,
    })
}
