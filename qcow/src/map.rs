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

/// Appends `entry` to `out`, merged into the last entry where qemu-img would merge them.
fn push(out: &mut Vec<MapEntry>, entry: MapEntry) {
    match out.last_mut() {
        Some(last) if last.mergeable(&entry) => last.length += entry.length,
        _ => out.push(entry),
    }
}

/// Appends to `out` the entries for the start of `[offset, offset + max_len)` in `image` and
/// below — one run of clusters that read alike (see [`Image::mapping_run`]) — and returns how
/// many bytes they cover (at least one).
fn status<S: Storage>(
    image: &mut Image<S>,
    offset: u64,
    max_len: u64,
    depth: u32,
    out: &mut Vec<MapEntry>,
) -> Result<u64> {
    // Guest clusters live in the data file, if the image has one.
    let file = if image.has_data_file() {
        image.data_file_path()
    } else {
        image.path()
    }
    .map(|p| p.to_path_buf());
    let (mapping, length) = image.mapping_run(offset, max_len)?;
    let entry = |present, zero, data, compressed, host: Option<u64>, file| MapEntry {
        start: offset,
        length,
        depth,
        present,
        zero,
        data,
        compressed,
        offset: host,
        file,
    };
    match mapping {
        Mapping::Normal { host, .. } if image.metadata_preallocated()? => {
            // Like qemu-img, look through to the file's holes only in a metadata-preallocated
            // image: one look per extent of the run.
            let mut done = 0;
            while done < length {
                let (is_data, run) = image.host_extent(host + done, length - done)?;
                let run = run.clamp(1, length - done);
                push(
                    out,
                    MapEntry {
                        start: offset + done,
                        length: run,
                        ..entry(true, !is_data, true, false, Some(host + done), file.clone())
                    },
                );
                done += run;
            }
        }
        Mapping::Normal { host, .. } => {
            push(out, entry(true, false, true, false, Some(host), file))
        }
        Mapping::ZeroPlain => push(out, entry(true, true, false, false, None, None)),
        Mapping::ZeroAlloc { host } => push(out, entry(true, true, false, false, Some(host), file)),
        Mapping::Compressed { .. } => push(out, entry(true, false, true, true, None, None)),
        Mapping::Unallocated => {
            let backing_size = image.backing().map(Backing::size);
            match (image.backing.as_deref_mut(), backing_size) {
                (Some(backing), Some(size)) if offset < size => {
                    let covered = length.min(size - offset);
                    let mut done = 0;
                    while done < covered {
                        let at = offset + done;
                        done += match backing {
                            Disk::Qcow2(lower) => {
                                status(lower, at, covered - done, depth + 1, out)?
                            }
                            Disk::Raw(raw) => raw_status(raw, at, covered - done, depth + 1, out)?,
                        };
                    }
                    return Ok(covered);
                }
                // Past the end of the backing file qemu-img reports this layer (with the host
                // offset of an unallocated subcluster of an allocated cluster).
                _ => {
                    let host = image.unallocated_host(offset)?;
                    push(out, entry(false, true, false, false, host, host.and(file)));
                }
            }
        }
    }
    Ok(length)
}

/// [`status`] for a raw backing file: its data and holes, at their own offsets.
fn raw_status(
    raw: &mut crate::disk::RawDisk,
    offset: u64,
    max_len: u64,
    depth: u32,
    out: &mut Vec<MapEntry>,
) -> Result<u64> {
    let path = raw.path().to_path_buf();
    let (is_data, run) = raw
        .storage_mut()
        .extent_at(offset, max_len)
        .map_err(Error::ReadBacking)?;
    let length = run.clamp(1, max_len);
    push(
        out,
        MapEntry {
            start: offset,
            length,
            depth,
            present: true,
            zero: !is_data,
            data: is_data,
            compressed: false,
            offset: Some(offset),
            file: Some(path),
        },
    );
    Ok(length)
}

/// The merged map of the whole virtual disk.
pub fn map<S: Storage>(image: &mut Image<S>) -> Result<Vec<MapEntry>> {
    // The file must cover every allocated cluster before holes are looked at.
    image.flush()?;
    let size = image.size();
    let mut entries: Vec<MapEntry> = Vec::new();
    let mut offset = 0;
    while offset < size {
        offset += status(image, offset, size - offset, 0, &mut entries)?;
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
