//! Integrity checksums of a snapshot's `memory` file: XXH3-64 over every 2 MiB chunk of the file
//! as it reads (holes read as zeros), recorded in `state` and checked by `--verify`.
//!
//! XXH3 because it hashes at memory speed (checking must stay cheap next to reading the file),
//! 2 MiB chunks because a bad chunk is then small enough to name and hole-only chunks (most of a
//! diff, the untouched RAM of a full snapshot) are recognised from `SEEK_DATA` without reading.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::memory::data_extents;

/// Bytes covered by one checksum.
pub const CHUNK_SIZE: u64 = 2 << 20;
/// The only algorithm written so far.
pub const ALGORITHM: &str = "xxh3-64";

/// The checksums recorded in `state` for the `memory` file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryChecksums {
    pub algorithm: String,
    pub chunk_size: u64,
    /// One per chunk, in file order; the last chunk may be shorter.
    pub chunks: Vec<u64>,
}

/// The memory file does not match its recorded checksums, or cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ChecksumError {
    #[error("cannot read {path} to check it: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupted: the {len}-byte chunk at offset {offset:#x} has checksum {found:#018x}, but {expected:#018x} was recorded when the snapshot was taken — the file changed on disk; restore it from a copy or take the snapshot again")]
    Mismatch {
        path: String,
        offset: u64,
        len: u64,
        expected: u64,
        found: u64,
    },
    #[error("{path}: the recorded checksums cover {recorded} chunks of {chunk_size} bytes, but the file has {actual}")]
    WrongCount {
        path: String,
        chunk_size: u64,
        recorded: usize,
        actual: usize,
    },
    #[error("{path}: checksum algorithm `{algorithm}` with {chunk_size}-byte chunks is not one this cowvm knows ({ALGORITHM}, {CHUNK_SIZE})")]
    Unsupported {
        path: String,
        algorithm: String,
        chunk_size: u64,
    },
}

/// Hashes the first `len` bytes of `file` chunk by chunk.
pub fn compute(file: &File, path: &Path, len: u64) -> Result<MemoryChecksums, ChecksumError> {
    let read_err = |source| ChecksumError::Read {
        path: path.display().to_string(),
        source,
    };
    let extents = data_extents(file, len);
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    let zero_chunk = xxh3_64(&buf);
    let mut chunks = Vec::with_capacity(len.div_ceil(CHUNK_SIZE) as usize);
    // Extents come sorted by offset: walk them alongside the chunks.
    let mut extents = extents
        .iter()
        .map(|&(first, count)| (first * 4096, (first + count) * 4096))
        .peekable();
    let mut offset = 0;
    while offset < len {
        let chunk_len = CHUNK_SIZE.min(len - offset);
        while extents.next_if(|&(_, end)| end <= offset).is_some() {}
        let holds_data = extents
            .peek()
            .is_some_and(|&(start, _)| start < offset + chunk_len);
        let digest = if !holds_data && chunk_len == CHUNK_SIZE {
            zero_chunk
        } else {
            let chunk = &mut buf[..chunk_len as usize];
            file.read_exact_at(chunk, offset).map_err(read_err)?;
            xxh3_64(chunk)
        };
        chunks.push(digest);
        offset += chunk_len;
    }
    Ok(MemoryChecksums {
        algorithm: ALGORITHM.to_string(),
        chunk_size: CHUNK_SIZE,
        chunks,
    })
}

/// Recomputes the checksums of `path` and compares them with `recorded`; the first chunk that
/// differs is named by its offset.
pub fn verify(path: &Path, len: u64, recorded: &MemoryChecksums) -> Result<(), ChecksumError> {
    let name = || path.display().to_string();
    if recorded.algorithm != ALGORITHM || recorded.chunk_size != CHUNK_SIZE {
        return Err(ChecksumError::Unsupported {
            path: name(),
            algorithm: recorded.algorithm.clone(),
            chunk_size: recorded.chunk_size,
        });
    }
    let file = File::open(path).map_err(|source| ChecksumError::Read {
        path: name(),
        source,
    })?;
    let actual = compute(&file, path, len)?;
    if actual.chunks.len() != recorded.chunks.len() {
        return Err(ChecksumError::WrongCount {
            path: name(),
            chunk_size: CHUNK_SIZE,
            recorded: recorded.chunks.len(),
            actual: actual.chunks.len(),
        });
    }
    let bad = actual
        .chunks
        .iter()
        .zip(&recorded.chunks)
        .position(|(found, expected)| found != expected);
    match bad {
        None => Ok(()),
        Some(index) => {
            let offset = index as u64 * CHUNK_SIZE;
            Err(ChecksumError::Mismatch {
                path: name(),
                offset,
                len: CHUNK_SIZE.min(len - offset),
                expected: recorded.chunks[index],
                found: actual.chunks[index],
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_byte_is_named_by_its_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let len = 5 * CHUNK_SIZE + 8192;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(len).unwrap();
        file.write_all_at(&[0xab; 4096], 3 * CHUNK_SIZE + 4096)
            .unwrap();
        file.write_all_at(&[1; 4096], 5 * CHUNK_SIZE).unwrap();
        let recorded = compute(&file, &path, len).unwrap();
        assert_eq!(recorded.chunks.len(), 6);
        assert_eq!(recorded.chunks[0], recorded.chunks[1], "hole chunks");
        assert_eq!(recorded.chunks[0], xxh3_64(&vec![0; CHUNK_SIZE as usize]));
        verify(&path, len, &recorded).unwrap();

        // One bit, in a chunk that holds data, and one in a chunk that was a hole.
        for at in [
            3 * CHUNK_SIZE + 5000,
            CHUNK_SIZE + 17,
            5 * CHUNK_SIZE + 8191,
        ] {
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, at).unwrap();
            file.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
            let err = verify(&path, len, &recorded).unwrap_err();
            let chunk = at / CHUNK_SIZE * CHUNK_SIZE;
            assert!(
                matches!(err, ChecksumError::Mismatch { offset, .. } if offset == chunk),
                "{err}"
            );
            assert!(
                err.to_string()
                    .contains(&format!("chunk at offset {chunk:#x}")),
                "{err}"
            );
            file.write_all_at(&byte, at).unwrap();
        }
        verify(&path, len, &recorded).unwrap();
    }

    #[test]
    fn unknown_algorithms_are_refused() {
        let recorded = MemoryChecksums {
            algorithm: "md5".into(),
            chunk_size: CHUNK_SIZE,
            chunks: vec![],
        };
        let err = verify(Path::new("m"), 0, &recorded).unwrap_err();
        assert!(matches!(err, ChecksumError::Unsupported { .. }), "{err}");
    }
}
