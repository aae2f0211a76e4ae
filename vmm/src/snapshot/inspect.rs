//! `cowvm snapshot inspect`: checking a snapshot and its chain and describing it.

use std::fs::File;
use std::path::Path;

use super::memory::{data_extents, SnapshotMemoryError};
use super::state::SnapshotKind;
use super::{load_chain, verify_chain, SnapshotError, MEMORY_FILE};

/// What `cowvm snapshot inspect` reports.
#[derive(Debug, serde::Serialize)]
pub struct InspectReport {
    pub path: String,
    pub id: String,
    pub format_version: u32,
    pub kind: SnapshotKind,
    pub parent: Option<String>,
    pub chain_length: usize,
    pub mem_size: u64,
    pub vcpus: usize,
    pub pages_stored: u64,
    pub pages_allocated_on_disk: u64,
    pub state_crc32: String,
    /// Whether the memory files were read and compared with their recorded checksums.
    pub memory_verified: bool,
    /// Each disk's frozen chain, top first, as recorded.
    pub disks: Vec<Vec<String>>,
    pub checks: String,
}

/// Checks a snapshot and its chain (magic, version, state checksums, parent ids, memory file
/// sizes; with `verify`, every memory file against its recorded checksums) and describes it.
pub fn inspect(dir: &Path, verify: bool) -> Result<InspectReport, SnapshotError> {
    let chain = load_chain(dir)?;
    for snapshot in &chain {
        let path = snapshot.dir.join(MEMORY_FILE);
        let len = std::fs::metadata(&path)
            .map_err(|source| SnapshotMemoryError::Read {
                path: path.display().to_string(),
                source,
            })?
            .len();
        if len != snapshot.state.mem_size {
            return Err(SnapshotMemoryError::WrongSize {
                path: path.display().to_string(),
                expected: snapshot.state.mem_size,
                actual: len,
            }
            .into());
        }
    }
    if verify {
        verify_chain(&chain)?;
    }
    let top = chain.last().ok_or(SnapshotError::NoParent)?;
    for disk in &top.state.disks {
        disk.verify(&top.dir)?;
    }
    let memory_path = top.dir.join(MEMORY_FILE);
    let file = File::open(&memory_path).map_err(|source| SnapshotMemoryError::Read {
        path: memory_path.display().to_string(),
        source,
    })?;
    let allocated = data_extents(&file, top.state.mem_size)
        .iter()
        .map(|(_, n)| n)
        .sum();
    let mut checks = "magic, version, state checksums, parent ids, memory sizes".to_string();
    if !top.state.disks.is_empty() {
        checks.push_str(", disk image chains and metadata checksums");
    }
    if verify {
        checks.push_str(", memory checksums");
    }
    Ok(InspectReport {
        path: dir.display().to_string(),
        id: top.id.clone(),
        format_version: top.version,
        kind: top.state.kind,
        parent: top.state.parent.as_ref().map(|p| p.path.clone()),
        chain_length: chain.len(),
        mem_size: top.state.mem_size,
        vcpus: top.state.vcpus.len(),
        pages_stored: top.state.memory.pages_stored,
        pages_allocated_on_disk: allocated,
        state_crc32: format!("{:08x}", top.crc),
        memory_verified: verify,
        disks: top
            .state
            .disks
            .iter()
            .map(|d| d.layers.iter().map(|l| l.path.clone()).collect())
            .collect(),
        checks,
    })
}
