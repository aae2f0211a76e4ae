//! The `state` container: magic, format version, JSON payload, CRC32.
//!
//! Versions: 1 (the first), 2 (snapshot ids, parents named by id, memory checksums), 3 (disks:
//! device state and frozen image chains). Readers
//! take every version from [`OLDEST_READABLE`] to [`FORMAT_VERSION`]; fields a version lacks get
//! the defaults documented on [`super::state::SnapshotState`].

use std::path::{Path, PathBuf};

/// `COWVMSNP`.
pub const MAGIC: [u8; 8] = *b"COWVMSNP";
/// Written by this cowvm; bumped on every change to [`super::state::SnapshotState`].
pub const FORMAT_VERSION: u32 = 3;
/// The oldest version this cowvm still reads.
pub const OLDEST_READABLE: u32 = 1;
/// Largest `state` file accepted: a few KiB per vCPU plus 2 MiB-chunk checksums of RAM
/// (~20 bytes of JSON per chunk, so about 10 MiB at 1 TiB).
pub const MAX_STATE_LEN: u64 = 64 << 20;
const HEADER_LEN: usize = 8 + 4 + 8;

/// A `state` file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {len} bytes, more than the {MAX_STATE_LEN}-byte limit for a state file")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path} is not a cowvm snapshot state file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path} has snapshot format version {found}; this cowvm reads versions {OLDEST_READABLE} to {FORMAT_VERSION} — use the cowvm that wrote it, or take the snapshot again with this one")]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path} is truncated or has trailing bytes (payload length {declared}, file {actual} bytes)")]
    BadLength {
        path: PathBuf,
        declared: u64,
        actual: u64,
    },
    #[error("{path} is corrupted: checksum {found:#010x} does not match the contents ({computed:#010x})")]
    BadChecksum {
        path: PathBuf,
        found: u32,
        computed: u32,
    },
    #[error("{path}: payload does not decode: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the snapshot state: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Encodes `value` as a state file; returns the bytes and their CRC (which children record).
pub fn encode<T: serde::Serialize>(value: &T) -> Result<(Vec<u8>, u32), FormatError> {
    let payload = serde_json::to_vec(value).map_err(FormatError::Encode)?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&payload);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok((bytes, crc))
}

/// A checked state file.
#[derive(Debug)]
pub struct Decoded<T> {
    pub value: T,
    /// CRC32 of the file (header and payload).
    pub crc: u32,
    pub version: u32,
}

/// Reads and checks a state file (size cap, magic, length, checksum, version — before any of
/// the payload is used).
pub fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Decoded<T>, FormatError> {
    let read_err = |source| FormatError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_STATE_LEN {
        return Err(FormatError::TooLarge {
            path: path.to_owned(),
            len,
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    decode(path, &bytes)
}

fn decode<T: serde::de::DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
) -> Result<Decoded<T>, FormatError> {
    let path = || path.to_owned();
    if bytes.len() < HEADER_LEN + 4 || bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic { path: path() });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    let declared = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let actual = bytes.len() as u64;
    if declared.checked_add((HEADER_LEN + 4) as u64) != Some(actual) {
        // Checked before the version so a flipped length bit is reported as corruption.
        let computed = crc32fast::hash(&bytes[..bytes.len() - 4]);
        let found = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap_or_default());
        if computed != found {
            return Err(FormatError::BadChecksum {
                path: path(),
                found,
                computed,
            });
        }
        return Err(FormatError::BadLength {
            path: path(),
            declared,
            actual,
        });
    }
    let body_end = bytes.len() - 4;
    let found = u32::from_le_bytes(bytes[body_end..].try_into().unwrap_or_default());
    let computed = crc32fast::hash(&bytes[..body_end]);
    if computed != found {
        return Err(FormatError::BadChecksum {
            path: path(),
            found,
            computed,
        });
    }
    if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&version) {
        return Err(FormatError::UnsupportedVersion {
            path: path(),
            found: version,
        });
    }
    let value = serde_json::from_slice(&bytes[HEADER_LEN..body_end]).map_err(|source| {
        FormatError::Decode {
            path: path(),
            source,
        }
    })?;
    Ok(Decoded {
        value,
        crc: found,
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_bit_is_caught() {
        let value = vec![1u32, 2, 3];
        let (bytes, crc) = encode(&value).unwrap();
        let back: Decoded<Vec<u32>> = decode(Path::new("s"), &bytes).unwrap();
        assert_eq!(
            (back.value, back.crc, back.version),
            (value, crc, FORMAT_VERSION)
        );
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let result: Result<Decoded<Vec<u32>>, _> = decode(Path::new("s"), &bad);
            assert!(result.is_err(), "flipped bit {bit} went unnoticed");
        }
    }

    #[test]
    fn version_and_truncation_are_named() {
        let with_version = |version: u32| {
            let (mut bytes, _) = encode(&7u8).unwrap();
            bytes[8..12].copy_from_slice(&version.to_le_bytes());
            let body_end = bytes.len() - 4;
            let crc = crc32fast::hash(&bytes[..body_end]);
            bytes[body_end..].copy_from_slice(&crc.to_le_bytes());
            decode::<u8>(Path::new("s"), &bytes)
        };
        for unreadable in [0, 9] {
            let err = with_version(unreadable).unwrap_err();
            assert!(
                matches!(err, FormatError::UnsupportedVersion { found, .. } if found == unreadable),
                "{err}"
            );
        }
        assert_eq!(
            with_version(1).unwrap().version,
            1,
            "version 1 is still read"
        );
        let (bytes, _) = encode(&7u8).unwrap();
        let err = decode::<u8>(Path::new("s"), &bytes[..bytes.len() - 1]).unwrap_err();
        assert!(matches!(err, FormatError::BadChecksum { .. }), "{err}");
        let err = decode::<u8>(Path::new("s"), b"hello").unwrap_err();
        assert!(matches!(err, FormatError::BadMagic { .. }));
    }
}
