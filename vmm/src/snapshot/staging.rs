//! Writing a directory under a temporary name beside its final one and publishing it whole:
//! every file is fsynced, then the directory, then it is renamed into place (or atomically
//! exchanged with the directory it replaces), then the parent is fsynced. A crash leaves either
//! the old directory or the new one under the real name, never a half-written one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{renameat_with, RenameFlags, CWD};

/// A staging directory could not be created or published.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("snapshot directory {0} exists and is not empty; choose a new path")]
    DirNotEmpty(PathBuf),
    #[error("cannot create snapshot directory {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot sync {path} to disk: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot publish {target}: {source}")]
    Publish {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A directory being filled under a temporary name; removed on drop unless committed.
#[derive(Debug)]
pub struct StagingDir {
    tmp: PathBuf,
    target: PathBuf,
}

/// Tells apart staging directories of the same process (several snapshots, clones).
static NEXT_STAGING: AtomicU64 = AtomicU64::new(0);

impl StagingDir {
    /// Stages a new directory for `target`, which must not exist or be empty.
    pub fn new(target: &Path) -> Result<Self, StagingError> {
        if let Ok(mut entries) = std::fs::read_dir(target) {
            if entries.next().is_some() {
                return Err(StagingError::DirNotEmpty(target.to_owned()));
            }
        }
        Self::beside(target)
    }

    /// Stages a directory that will replace `target` (which exists) with
    /// [`StagingDir::commit_replacing`].
    pub fn replacing(target: &Path) -> Result<Self, StagingError> {
        Self::beside(target)
    }

    fn beside(target: &Path) -> Result<Self, StagingError> {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = target.with_file_name(format!(
            ".{name}.tmp-{}-{}",
            std::process::id(),
            NEXT_STAGING.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|source| StagingError::Create {
            path: tmp.clone(),
            source,
        })?;
        Ok(Self {
            tmp,
            target: target.to_owned(),
        })
    }

    /// The staging and final paths, for a process that finishes this directory (a live
    /// snapshot's writer, see `fork.rs`), which takes it over with [`StagingDir::adopt`].
    pub fn paths(&self) -> (PathBuf, PathBuf) {
        (self.tmp.clone(), self.target.clone())
    }

    /// Takes over a staging directory another process created: this handle publishes it or,
    /// dropped unpublished, removes it. The creator keeps its own handle and drops it only once
    /// this one is done (removing a directory that was published is a no-op).
    pub fn adopt((tmp, target): (PathBuf, PathBuf)) -> Self {
        Self { tmp, target }
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final name.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Publishes the directory under its final name (an empty directory there is replaced).
    pub fn commit(self) -> Result<(), StagingError> {
        self.sync_contents()?;
        std::fs::rename(&self.tmp, &self.target).map_err(|source| self.publish_err(source))?;
        self.sync_parent()
    }

    /// Atomically swaps the directory with the existing `target` (`renameat2(RENAME_EXCHANGE)`),
    /// then removes the old contents: at every instant the target name holds one complete
    /// directory, old or new.
    pub fn commit_replacing(self) -> Result<(), StagingError> {
        self.sync_contents()?;
        renameat_with(CWD, &self.tmp, CWD, &self.target, RenameFlags::EXCHANGE)
            .map_err(|errno| self.publish_err(errno.into()))?;
        // The old directory now sits under the temporary name; Drop removes it after the
        // exchange is durable.
        self.sync_parent()
    }

    /// Ordering: file data first, then the directory's entries, so that the rename can never
    /// publish names whose contents are not on disk yet.
    fn sync_contents(&self) -> Result<(), StagingError> {
        let entries =
            std::fs::read_dir(&self.tmp).map_err(|source| self.sync_err(&self.tmp, source))?;
        for entry in entries {
            let path = entry
                .map_err(|source| self.sync_err(&self.tmp, source))?
                .path();
            File::open(&path)
                .and_then(|file| file.sync_data())
                .map_err(|source| self.sync_err(&path, source))?;
        }
        sync_dir(&self.tmp).map_err(|source| self.sync_err(&self.tmp, source))
    }

    /// Makes the rename itself durable.
    fn sync_parent(&self) -> Result<(), StagingError> {
        let parent = self
            .target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        sync_dir(parent).map_err(|source| self.sync_err(parent, source))
    }

    fn sync_err(&self, path: &Path, source: std::io::Error) -> StagingError {
        StagingError::Sync {
            path: path.to_owned(),
            source,
        }
    }

    fn publish_err(&self, source: std::io::Error) -> StagingError {
        StagingError::Publish {
            target: self.target.clone(),
            source,
        }
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        // Not published: a failed write. Published by exchange: the replaced directory. Published
        // by rename: nothing is left under the temporary name.
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// fsyncs a directory so that renames inside it are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn commit_publishes_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("snap");
        let staging = StagingDir::new(&target).unwrap();
        std::fs::write(staging.path().join("state"), b"new").unwrap();
        assert!(
            !target.exists(),
            "nothing under the real name before commit"
        );
        staging.commit().unwrap();
        assert_eq!(std::fs::read(target.join("state")).unwrap(), b"new");
        assert!(leftovers(dir.path()).is_empty());

        assert!(matches!(
            StagingDir::new(&target),
            Err(StagingError::DirNotEmpty(_))
        ));
        let abandoned = StagingDir::new(&dir.path().join("other")).unwrap();
        std::fs::write(abandoned.path().join("memory"), b"half").unwrap();
        drop(abandoned);
        assert!(
            leftovers(dir.path()).is_empty(),
            "a failed write leaves nothing"
        );
        assert!(!dir.path().join("other").exists());
    }

    #[test]
    fn replacing_swaps_atomically_and_removes_the_old_directory() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("snap");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("state"), b"old").unwrap();
        std::fs::write(target.join("extra"), b"old only").unwrap();
        let staging = StagingDir::replacing(&target).unwrap();
        std::fs::write(staging.path().join("state"), b"new").unwrap();
        staging.commit_replacing().unwrap();
        assert_eq!(std::fs::read(target.join("state")).unwrap(), b"new");
        assert!(!target.join("extra").exists());
        assert!(leftovers(dir.path()).is_empty());
    }
}
