//! A disk's image chain as a snapshot records it: every image from the top down, with its format
//! and a checksum of its metadata (qcow2: the header cluster and the L1 table; raw: its size and
//! modification time), and the path rules that keep recorded names valid when a directory of
//! snapshots moves as a whole.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use super::{DiskFormat, DISK_CHAIN_LIMIT};

/// One image of a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub path: PathBuf,
    pub format: DiskFormat,
    /// XXH3-64 of the metadata that says what the image holds.
    pub checksum: u64,
    /// Virtual size in bytes (a raw file's length).
    pub size: u64,
}

/// A chain could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("cannot read disk image {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is not a usable qcow2 image: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: qcow::Error,
    },
    #[error("disk image {path} has an L1 table of {bytes} bytes, more than qcow's 32 MiB limit")]
    L1TooLarge { path: PathBuf, bytes: u64 },
    #[error("disk image {image} names its backing file {backing} without a format; cowvm never probes a backing file's format")]
    BackingFormatMissing { image: PathBuf, backing: String },
    #[error(
        "disk image {image} names a backing file of format `{format}`, which cowvm does not open"
    )]
    BackingFormatUnknown { image: PathBuf, format: String },
    #[error("the image chain under {0} is deeper than {DISK_CHAIN_LIMIT} images (or loops)")]
    TooDeep(PathBuf),
}

/// The chain from `top` (of `format`) down, top first, with canonical paths.
pub fn describe(top: &Path, format: DiskFormat) -> Result<Vec<Layer>, ChainError> {
    let mut layers = Vec::new();
    let mut next = Some((top.to_owned(), format));
    while let Some((path, format)) = next.take() {
        if layers.len() >= DISK_CHAIN_LIMIT {
            return Err(ChainError::TooDeep(top.to_owned()));
        }
        let path = std::fs::canonicalize(&path).map_err(read_error(&path))?;
        let (checksum, size, below) = match format {
            DiskFormat::Qcow2 => qcow2_metadata(&path)?,
            DiskFormat::Raw => {
                let (checksum, size) = raw_metadata(&path)?;
                (checksum, size, None)
            }
        };
        layers.push(Layer {
            path,
            format,
            checksum,
            size,
        });
        next = below;
    }
    Ok(layers)
}

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> ChainError + '_ {
    move |source| ChainError::Read {
        path: path.to_owned(),
        source,
    }
}

/// What a layer's metadata says: its checksum, virtual size, and the image below it.
type Metadata = (u64, u64, Option<(PathBuf, DiskFormat)>);

/// The checksum of a qcow2 image's header cluster and L1 table, its size and backing file.
fn qcow2_metadata(path: &Path) -> Result<Metadata, ChainError> {
    let file = File::open(path).map_err(read_error(path))?;
    let mut first = [0u8; 104];
    let len = file.metadata().map_err(read_error(path))?.len();
    let head = first.len().min(len as usize);
    file.read_exact_at(&mut first[..head], 0)
        .map_err(read_error(path))?;
    let cluster_bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
    let cluster_len = if (9..=21).contains(&cluster_bits) {
        (1usize << cluster_bits).min(len as usize)
    } else {
        head
    };
    let mut metadata = vec![0u8; cluster_len];
    file.read_exact_at(&mut metadata, 0)
        .map_err(read_error(path))?;
    let header = qcow::header::Header::parse(&metadata).map_err(|source| ChainError::Header {
        path: path.to_owned(),
        source,
    })?;
    let l1_bytes = u64::from(header.l1_size) * 8;
    if l1_bytes > 32 << 20 {
        return Err(ChainError::L1TooLarge {
            path: path.to_owned(),
            bytes: l1_bytes,
        });
    }
    let mut l1 = vec![0u8; l1_bytes as usize];
    file.read_exact_at(&mut l1, header.l1_table_offset)
        .map_err(read_error(path))?;
    metadata.extend_from_slice(&l1);
    let checksum = xxhash_rust::xxh3::xxh3_64(&metadata);
    let below = match (&header.backing_file, &header.backing_format) {
        (None, _) => None,
        (Some(name), None) => {
            return Err(ChainError::BackingFormatMissing {
                image: path.to_owned(),
                backing: name.clone(),
            })
        }
        (Some(name), Some(format)) => {
            let format = match format.as_str() {
                "qcow2" => DiskFormat::Qcow2,
                "raw" => DiskFormat::Raw,
                other => {
                    return Err(ChainError::BackingFormatUnknown {
                        image: path.to_owned(),
                        format: other.to_string(),
                    })
                }
            };
            Some((
                qcow::backing::resolve_backing_path(Some(path), name),
                format,
            ))
        }
    };
    Ok((checksum, header.size, below))
}

/// A raw file has no metadata: its size and modification time stand in for it. Returns the
/// checksum and the size.
fn raw_metadata(path: &Path) -> Result<(u64, u64), ChainError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(read_error(path))?;
    let mut bytes = Vec::with_capacity(24);
    bytes.extend_from_slice(&meta.len().to_le_bytes());
    bytes.extend_from_slice(&meta.mtime().to_le_bytes());
    bytes.extend_from_slice(&meta.mtime_nsec().to_le_bytes());
    Ok((xxhash_rust::xxh3::xxh3_64(&bytes), meta.len()))
}

/// How a file at `from_dir` names `target`: relative when both lie under `anchor` (so the names
/// stay valid when `anchor` moves as a whole), else absolute. Both paths must be absolute.
pub fn name_from(from_dir: &Path, target: &Path, anchor: &Path) -> String {
    if let (Ok(_), Ok(_)) = (from_dir.strip_prefix(anchor), target.strip_prefix(anchor)) {
        return relative(from_dir, target).display().to_string();
    }
    target.display().to_string()
}

/// `target` relative to the directory `from_dir` (both absolute and normalized).
fn relative(from_dir: &Path, target: &Path) -> PathBuf {
    let from: Vec<Component> = from_dir.components().collect();
    let to: Vec<Component> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to[common..] {
        path.push(part.as_os_str());
    }
    path
}

/// `path` made absolute with its parent directory (which must exist) resolved, as records
/// name it; the last component need not exist yet.
pub fn absolute_dir(path: &Path) -> std::io::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => Ok(std::fs::canonicalize(parent)?.join(name)),
        _ => Ok(absolute),
    }
}

/// A recorded name resolved against the directory it was recorded from.
pub fn resolve(from_dir: &Path, name: &str) -> PathBuf {
    let path = Path::new(name);
    if path.is_absolute() {
        path.to_owned()
    } else {
        from_dir.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_relative_inside_the_anchor() {
        let anchor = Path::new("/s");
        assert_eq!(
            name_from(
                Path::new("/s/snap1"),
                Path::new("/s/cowvm-disks/a.qcow2"),
                anchor
            ),
            "../cowvm-disks/a.qcow2"
        );
        assert_eq!(
            name_from(
                Path::new("/s/cowvm-disks"),
                Path::new("/s/cowvm-disks/a.qcow2"),
                anchor
            ),
            "a.qcow2"
        );
        assert_eq!(
            name_from(Path::new("/s/snap1"), Path::new("/data/base.qcow2"), anchor),
            "/data/base.qcow2"
        );
        assert_eq!(
            resolve(Path::new("/s/snap1"), "../cowvm-disks/a.qcow2"),
            Path::new("/s/snap1/../cowvm-disks/a.qcow2")
        );
        assert_eq!(resolve(Path::new("/s/x"), "/abs"), Path::new("/abs"));
    }

    #[test]
    fn chains_are_described_top_first_with_metadata_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
        let top = dir.path().join("top.qcow2");
        let options = qcow::CreateOptions {
            size: 1 << 20,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..qcow::CreateOptions::default()
        };
        qcow::create(&top, &options).unwrap();
        let layers = describe(&top, DiskFormat::Qcow2).unwrap();
        assert_eq!(layers.len(), 2);
        let base = std::fs::canonicalize(base).unwrap();
        assert_eq!(
            (layers[1].path.clone(), layers[1].format),
            (base, DiskFormat::Raw)
        );
        let mut image = qcow::Image::open(&top, &qcow::OpenOptions::default()).unwrap();
        image.write_at(&[7u8; 4096], 0).unwrap();
        image.close().unwrap();
        let after = describe(&top, DiskFormat::Qcow2).unwrap();
        assert_ne!(
            after[0].checksum, layers[0].checksum,
            "a new L2 table changes L1"
        );
        assert_eq!(after[1], layers[1]);
        let mut no_format = qcow::Image::open(&top, &qcow::OpenOptions::default()).unwrap();
        no_format.set_backing_file(Some("base.raw"), None).unwrap();
        no_format.close().unwrap();
        assert!(matches!(
            describe(&top, DiskFormat::Qcow2),
            Err(ChainError::BackingFormatMissing { .. })
        ));
        // An image that names itself as its backing file: a loop, cut at the chain limit.
        let mut looping = qcow::Image::open(&top, &qcow::OpenOptions::default()).unwrap();
        looping
            .set_backing_file(Some("top.qcow2"), Some("qcow2"))
            .unwrap();
        looping.close().unwrap();
        assert!(matches!(
            describe(&top, DiskFormat::Qcow2),
            Err(ChainError::TooDeep(_))
        ));
    }
}
