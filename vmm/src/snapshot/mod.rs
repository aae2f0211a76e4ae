//! VM snapshots: a directory with `state` (vCPUs, VM, devices, memory layout) and `memory`
//! (raw RAM, sparse), full or diff, and the code that writes, checks, loads and merges them.

pub mod format;
pub mod memory;
pub mod persist;
pub mod state;

use std::fs::File;
use std::path::{Path, PathBuf};

use state::{ParentRef, SnapshotKind, SnapshotState};

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
    #[error("snapshot directory {0} exists and is not empty; choose a new path")]
    DirNotEmpty(PathBuf),
    #[error("cannot create snapshot directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    #[error("a diff snapshot needs an earlier snapshot of this VM to build on; take a full snapshot first")]
    NoParent,
    #[error("{child} builds on {parent}, which is missing; keep a diff's parents next to it (or merge the chain first)")]
    MissingParent { child: PathBuf, parent: PathBuf },
    #[error("{child} builds on {parent}, but that snapshot's state checksum is {found:#010x}, not the recorded {expected:#010x}: the parent was replaced")]
    ParentMismatch {
        child: PathBuf,
        parent: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{0}: diff chain longer than 256 snapshots (or a loop)")]
    ChainTooLong(PathBuf),
    #[error("{path}: a {kind:?} snapshot {problem}")]
    Inconsistent {
        path: PathBuf,
        kind: SnapshotKind,
        problem: &'static str,
    },
}

/// One snapshot of a chain, as read from disk.
#[derive(Debug)]
pub struct LoadedSnapshot {
    pub dir: PathBuf,
    pub state: SnapshotState,
    pub crc: u32,
}

/// Checks that `dir` can receive a snapshot and returns the temporary directory to fill.
pub fn begin_dir(dir: &Path) -> Result<PathBuf, SnapshotError> {
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        if entries.next().is_some() {
            return Err(SnapshotError::DirNotEmpty(dir.to_owned()));
        }
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|source| SnapshotError::CreateDir {
        path: tmp.clone(),
        source,
    })?;
    Ok(tmp)
}

/// Moves a complete temporary directory to its final name.
///
/// Ordering: the files inside were fsynced by their writers; the rename publishes the whole
/// snapshot at once, and the parent directory's fsync makes the rename durable.
pub fn commit_dir(tmp: &Path, dir: &Path) -> Result<(), SnapshotError> {
    let write_err = |source| SnapshotError::WriteFile {
        path: dir.to_owned(),
        source,
    };
    format::sync_dir(tmp).map_err(write_err)?;
    if dir.exists() {
        std::fs::remove_dir(dir).map_err(write_err)?;
    }
    std::fs::rename(tmp, dir).map_err(write_err)?;
    format::sync_dir(
        dir.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
    .map_err(write_err)
}

/// Writes `memory` (all of it, or the pages set in `dirty` for a diff) and `state` into the
/// fresh directory `tmp`; fills in `state.memory` and returns the state file's CRC.
pub fn write_into(
    tmp: &Path,
    state: &mut SnapshotState,
    memory: &GuestMemory,
    dirty: Option<&[u64]>,
) -> Result<u32, SnapshotError> {
    let memory_path = tmp.join(MEMORY_FILE);
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
    let (bytes, crc) = format::encode(state)?;
    // A plain write: the whole directory is published by `commit_dir`'s rename after fsync.
    std::fs::write(tmp.join(STATE_FILE), &bytes).map_err(|source| SnapshotError::WriteFile {
        path: tmp.join(STATE_FILE),
        source,
    })?;
    Ok(crc)
}

/// Reads `dir` and, for a diff, its parents; returns the chain root first. Every state file
/// and every parent checksum is checked before anything is used.
pub fn load_chain(dir: &Path) -> Result<Vec<LoadedSnapshot>, SnapshotError> {
    let mut chain = Vec::new();
    let mut next = Some((dir.to_owned(), None::<(PathBuf, u32)>));
    while let Some((dir, expected)) = next.take() {
        if chain.len() >= MAX_CHAIN {
            return Err(SnapshotError::ChainTooLong(dir));
        }
        let (state, crc): (SnapshotState, u32) = format::read(&dir.join(STATE_FILE))?;
        if let Some((child, expected)) = expected {
            if crc != expected {
                return Err(SnapshotError::ParentMismatch {
                    child,
                    parent: dir,
                    expected,
                    found: crc,
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
        if let Some(ParentRef { path, state_crc }) = &state.parent {
            let parent = resolve_parent(&dir, Path::new(path));
            if !parent.join(STATE_FILE).exists() {
                return Err(SnapshotError::MissingParent {
                    child: dir.clone(),
                    parent,
                });
            }
            next = Some((parent, Some((dir.clone(), *state_crc))));
        }
        chain.push(LoadedSnapshot { dir, state, crc });
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

/// Builds guest RAM from a loaded chain: the root's memory mapped `MAP_PRIVATE` (or copied with
/// `eager`), then each diff's pages read on top, oldest first.
pub fn load_memory(chain: &[LoadedSnapshot], eager: bool) -> Result<GuestMemory, SnapshotError> {
    let Some(root) = chain.first() else {
        return Err(SnapshotError::NoParent);
    };
    let mem_size = root.state.mem_size;
    let root_memory = root.dir.join(MEMORY_FILE);
    let guest = if eager {
        memory::load_eager(&root_memory, mem_size)?
    } else {
        memory::map_private(&root_memory, mem_size)?
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
    Ok(guest)
}

/// Squashes the chain ending at `dir` into one full snapshot at `out` (`dir` itself when
/// `out` is `None`, replaced atomically).
pub fn merge(dir: &Path, out: Option<&Path>) -> Result<LoadedSnapshot, SnapshotError> {
    let mut chain = load_chain(dir)?;
    let memory = load_memory(&chain, true)?;
    let top = chain.pop().ok_or(SnapshotError::NoParent)?;
    let mut state = top.state;
    state.kind = SnapshotKind::Full;
    state.parent = None;
    let target = out.unwrap_or(dir).to_owned();
    let staging = target.with_file_name(format!(
        ".{}.merge-{}",
        target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|source| SnapshotError::CreateDir {
        path: staging.clone(),
        source,
    })?;
    let crc = write_into(&staging, &mut state, &memory, None)?;
    if out.is_none() {
        // Replace in place: the old directory goes only after the new one is complete.
        let old = dir.with_file_name(format!(
            ".{}.old-{}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        std::fs::rename(dir, &old).map_err(|source| SnapshotError::WriteFile {
            path: dir.to_owned(),
            source,
        })?;
        commit_dir(&staging, dir)?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        if let Ok(mut entries) = std::fs::read_dir(&target) {
            if entries.next().is_some() {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(SnapshotError::DirNotEmpty(target));
            }
        }
        commit_dir(&staging, &target)?;
    }
    Ok(LoadedSnapshot {
        dir: target,
        state,
        crc,
    })
}

/// What `cowvm snapshot inspect` reports.
#[derive(Debug, serde::Serialize)]
pub struct InspectReport {
    pub path: String,
    pub kind: SnapshotKind,
    pub parent: Option<String>,
    pub chain_length: usize,
    pub mem_size: u64,
    pub vcpus: usize,
    pub pages_stored: u64,
    pub pages_allocated_on_disk: u64,
    pub state_crc32: String,
    pub checks: &'static str,
}

/// Checks a snapshot and its chain (magic, version, checksums, parents, memory file sizes) and
/// describes it.
pub fn inspect(dir: &Path) -> Result<InspectReport, SnapshotError> {
    let chain = load_chain(dir)?;
    for snapshot in &chain {
        let path = snapshot.dir.join(MEMORY_FILE);
        let len = std::fs::metadata(&path)
            .map_err(|source| memory::SnapshotMemoryError::Read {
                path: path.display().to_string(),
                source,
            })?
            .len();
        if len != snapshot.state.mem_size {
            return Err(memory::SnapshotMemoryError::WrongSize {
                path: path.display().to_string(),
                expected: snapshot.state.mem_size,
                actual: len,
            }
            .into());
        }
    }
    let top = chain.last().ok_or(SnapshotError::NoParent)?;
    let memory_path = top.dir.join(MEMORY_FILE);
    let file = File::open(&memory_path).map_err(|source| memory::SnapshotMemoryError::Read {
        path: memory_path.display().to_string(),
        source,
    })?;
    let allocated = memory::data_extents(&file, top.state.mem_size)
        .iter()
        .map(|(_, n)| n)
        .sum();
    Ok(InspectReport {
        path: dir.display().to_string(),
        kind: top.state.kind,
        parent: top.state.parent.as_ref().map(|p| p.path.clone()),
        chain_length: chain.len(),
        mem_size: top.state.mem_size,
        vcpus: top.state.vcpus.len(),
        pages_stored: top.state.memory.pages_stored,
        pages_allocated_on_disk: allocated,
        state_crc32: format!("{:08x}", top.crc),
        checks: "ok",
    })
}
