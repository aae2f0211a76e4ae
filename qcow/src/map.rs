//! Allocation map of the whole backing chain, merged like `qemu-img map --output=json`.

use std::path::PathBuf;

use serde::Serialize;

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::image::{Backing, Image};
use crate::l2::Mapping;
use crate::raw::Storage;

/// One extent of the map (qemu-img's `MapEntry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// File holding the data (human output only).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

impl MapEntry {
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.file == next.file
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Status of `[offset, offset + max_len)` in `image` and below; returns the entry for its first
/// part (whose length may be shorter).
fn status<S: Storage>(
    image: &mut Image<S>,
    offset: u64,
    max_len: u64,
    depth: u32,
) -> Result<MapEntry> {
    let cluster_size = image.cluster_size();
    let in_cluster = offset % cluster_size;
    // A subcluster with extended L2 entries.
    let granule = image.granule();
    let length = (granule - offset % granule).min(max_len);
    // Guest clusters live in the data file, if the image has one.
    let file = if image.has_data_file() {
        image.data_file_path()
    } else {
        image.path()
    }
    .map(|p| p.to_path_buf());
    let entry = |present, zero, data, compressed, offset: Option<u64>, file| MapEntry {
        start: 0,
        length,
        depth,
        present,
        zero,
        data,
        compressed,
        offset,
        file,
    };
    Ok(match image.mapping(offset)? {
        Mapping::Normal { host, .. } => {
            // Like qemu-img, look through to the file's holes only in a metadata-preallocated image.
            let host = host + in_cluster;
            let (is_data, run) = if image.metadata_preallocated()? {
                image.host_extent(host, length)?
            } else {
                (true, length)
            };
            MapEntry {
                length: run.max(1),
                ..entry(true, !is_data, true, false, Some(host), file)
            }
        }
        Mapping::ZeroPlain => entry(true, true, false, false, None, None),
        Mapping::ZeroAlloc { host } => {
            entry(true, true, false, false, Some(host + in_cluster), file)
        }
        Mapping::Compressed { .. } => entry(true, false, true, true, None, None),
        Mapping::Unallocated => {
            let backing_size = image.backing().map(Backing::size);
            match (image.backing.as_deref_mut(), backing_size) {
                (Some(backing), Some(size)) if offset < size => {
                    let len = length.min(size - offset);
                    match backing {
                        Disk::Qcow2(lower) => status(lower, offset, len, depth + 1)?,
                        Disk::Raw(raw) => {
                            let path = raw.path().to_path_buf();
                            let (is_data, run) = raw
                                .storage_mut()
                                .extent_at(offset, len)
                                .map_err(Error::ReadBacking)?;
                            MapEntry {
                                start: 0,
                                length: run.max(1),
                                depth: depth + 1,
                                present: true,
                                zero: !is_data,
                                data: is_data,
                                compressed: false,
                                offset: Some(offset),
                                file: Some(path),
                            }
                        }
                    }
                }
                // Past the end of the backing file qemu-img reports this layer (with the host
                // offset of an unallocated subcluster of an allocated cluster).
                _ => {
                    let host = image.unallocated_host(offset)?;
                    entry(false, true, false, false, host, host.and(file))
                }
            }
        }
    })
}

/// The merged map of the whole virtual disk.
pub fn map<S: Storage>(image: &mut Image<S>) -> Result<Vec<MapEntry>> {
    // The file must cover every allocated cluster before holes are looked at.
    image.flush()?;
    let size = image.size();
    let mut entries: Vec<MapEntry> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let mut entry = status(image, offset, size - offset, 0)?;
        entry.start = offset;
        offset += entry.length;
        match entries.last_mut() {
            Some(last) if last.mergeable(&entry) => last.length += entry.length,
            _ => entries.push(entry),
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::image::OpenOptions;
    use crate::raw::MemStorage;

    #[test]
    fn merges_contiguous_extents() {
        let mut storage = MemStorage::default();
        let options = CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            ..CreateOptions::default()
        };
        create_on(&mut storage, &options).unwrap();
        let mut image = Image::open_storage(storage, None, &OpenOptions::default()).unwrap();
        image.write_at(&[1u8; 8192], 0).unwrap();
        image.write_zeroes(8192, 4096).unwrap();
        let entries = map(&mut image).unwrap();
        let summary: Vec<_> = entries
            .iter()
            .map(|e| (e.start, e.length, e.data, e.zero, e.present))
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, 8192, true, false, true),
                (8192, 4096, false, true, true),
                (12288, (1 << 20) - 12288, false, true, false),
            ]
        );
        assert_eq!(entries[0].offset.map(|o| o % 4096), Some(0));
    }
}
