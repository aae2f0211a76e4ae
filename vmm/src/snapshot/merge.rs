//! `cowvm snapshot merge`: squashing a diff chain into one full snapshot.
//!
//! The merged snapshot holds the same VM state as the top of the chain, so it keeps the top's
//! id: diffs that name the top (or, merged in place, any snapshot merged into) stay valid.
//!
//! Disks keep their chain: the merged snapshot records the same frozen images as the top (their
//! names rewritten for `--output`'s directory). Committing the overlays into one image would
//! rewrite images that other snapshots of the chain, diffs built on the merged one and VMs
//! restored from them still read.

use std::path::Path;

use super::staging::StagingDir;
use super::state::SnapshotKind;
use super::{load_chain, load_memory, write_memory, LoadedSnapshot, SnapshotError};

/// Squashes the chain ending at `dir` into one full snapshot at `out`, or in place when `out`
/// is `None` (an atomic exchange: `dir` holds the old chain top or the merged snapshot at
/// every instant, never neither).
pub fn merge(dir: &Path, out: Option<&Path>) -> Result<LoadedSnapshot, SnapshotError> {
    let mut chain = load_chain(dir)?;
    let memory = load_memory(&chain, true)?.memory;
    let top = chain.pop().ok_or(SnapshotError::NoParent)?;
    for disk in &top.state.disks {
        disk.verify(&top.dir)?;
    }
    let mut state = top.state;
    state.kind = SnapshotKind::Full;
    state.parent = None;
    state.id = Some(top.id);
    let staging = match out {
        Some(out) => StagingDir::new(out)?,
        None => StagingDir::replacing(dir)?,
    };
    if out.is_some() {
        let to = crate::disk::chain::absolute_dir(staging.target()).map_err(|source| {
            SnapshotError::WriteFile {
                path: staging.target().to_owned(),
                source,
            }
        })?;
        state.disks = state.disks.iter().map(|d| d.moved(&top.dir, &to)).collect();
    }
    let pending = write_memory(staging, state, &memory, None)?;
    match out {
        Some(_) => pending.publish(),
        None => pending.publish_replacing(),
    }
}
