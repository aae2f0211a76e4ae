//! A snapshot's `memory` file while a VM maps it `MAP_PRIVATE`.
//!
//! Pages the guest has not written yet are the file's pages, so the file must not change: a
//! modified file changes what the guest reads, a truncated one turns guest accesses into `EFAULT`
//! from `KVM_RUN` and VMM-side reads into `SIGBUS`. The VMM records the file's identity when it
//! maps it and checks it before every VMM-side read of guest RAM (snapshots, stats) and
//! periodically while the VM runs; a change stops the VM with an error that names the file.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What identifies the file's contents: inode, size and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl Identity {
    fn of(metadata: &std::fs::Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.len(),
            mtime_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
        }
    }
}

/// The mapped file changed under the VM.
#[derive(Debug, thiserror::Error)]
#[error("snapshot memory file {path} was {what} while in use by this VM (it must not change while any VM maps it); the VM was stopped — restore the snapshot from an intact copy")]
pub struct MappedFileChanged {
    pub path: PathBuf,
    pub what: &'static str,
}

/// A memory file mapped as guest RAM, and its identity when it was mapped.
#[derive(Debug, Clone)]
pub struct MappedFile {
    path: PathBuf,
    file: Arc<File>,
    identity: Identity,
}

impl MappedFile {
    /// Records `file` (open at `path`) as mapped now.
    pub fn new(path: &Path, file: Arc<File>) -> std::io::Result<Self> {
        let identity = Identity::of(&file.metadata()?);
        Ok(Self {
            path: path.to_owned(),
            file,
            identity,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open descriptor of the file (a forked child keeps it open).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }

    /// Checks that the mapped inode still has the size and modification time it had when it
    /// was mapped (the open descriptor sees the inode even if the name was replaced).
    pub fn check(&self) -> Result<(), MappedFileChanged> {
        let changed = |what| MappedFileChanged {
            path: self.path.clone(),
            what,
        };
        let now = match self.file.metadata() {
            Ok(metadata) => Identity::of(&metadata),
            Err(_) => return Err(changed("made unreadable")),
        };
        if now.size < self.identity.size {
            Err(changed("truncated"))
        } else if now.size != self.identity.size {
            Err(changed("resized"))
        } else if now.mtime_ns != self.identity.mtime_ns || now.ino != self.identity.ino {
            Err(changed("modified"))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn truncation_and_writes_are_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let mapped = MappedFile::new(&path, Arc::new(File::open(&path).unwrap())).unwrap();
        mapped.check().unwrap();
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // Make sure the modification time can differ from the recorded one.
        std::thread::sleep(std::time::Duration::from_millis(10));
        writer.write_all_at(b"x", 100).unwrap();
        let err = mapped.check().unwrap_err();
        assert_eq!(err.what, "modified");
        assert!(
            err.to_string().contains("was modified while in use"),
            "{err}"
        );
        let mapped = MappedFile::new(&path, Arc::new(File::open(&path).unwrap())).unwrap();
        writer.set_len(4096).unwrap();
        assert_eq!(mapped.check().unwrap_err().what, "truncated");
    }
}
