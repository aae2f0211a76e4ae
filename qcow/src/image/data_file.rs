//! The external data file (incompatible bit 2): guest clusters live in a second file, each at its
//! own guest offset and without refcounts, while the image file holds only metadata. With the raw
//! bit (autoclear bit 1) the data file must also stay a valid raw image of the disk, so zeroing
//! and discarding reach it too — QEMU's rules from `block/qcow2-cluster.c`.

use std::path::Path;

use super::Image;
use crate::error::{Corruption, Error, Result};
use crate::l2::{Mapping, COPIED};
use crate::raw::Storage;

/// QEMU's reading of an L2 entry in an image with a data file: offset 0 with OFLAG_COPIED is a
/// data cluster at offset 0 (not an unallocated one), since every data cluster has refcount 1.
/// A free function so that code holding a borrowed L2 table can decode with it.
pub(crate) fn data_file_cluster(entry: u64, mapping: Mapping) -> Mapping {
    if mapping == Mapping::Unallocated && entry & COPIED != 0 {
        return Mapping::Normal {
            host: 0,
            copied: true,
        };
    }
    mapping
}

impl<S: Storage> Image<S> {
    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.header.has_data_file()
    }

    /// The name the external data file was opened by (`None` without one, or when the image was
    /// opened without it).
    pub fn data_file_path(&self) -> Option<&Path> {
        self.data_path.as_deref()
    }

    /// The file guest clusters are read from and written to: the data file, or the image itself.
    pub(crate) fn data_storage(&mut self) -> Result<&mut S> {
        if !self.header.has_data_file() {
            return Ok(&mut self.file);
        }
        self.data.as_mut().ok_or(Error::DataFileNotOpen)
    }

    /// Length of the file guest clusters live in.
    pub(crate) fn data_len(&mut self) -> Result<u64> {
        self.data_storage()?.len().map_err(Error::SetLen)
    }

    /// Host offset of `count` new data clusters for the guest clusters from `guest` (cluster
    /// aligned): a data file maps every cluster at its guest offset and needs no allocation;
    /// otherwise they come from the refcounted allocator.
    pub(crate) fn alloc_data(&mut self, guest: u64, count: u64) -> Result<u64> {
        if self.header.has_data_file() {
            return Ok(guest & !(self.cluster_size - 1));
        }
        if count == 1 {
            self.alloc_cluster()
        } else {
            self.alloc_clusters(count)
        }
    }

    /// Refuses what QEMU refuses in a data file image: compressed clusters, and data clusters
    /// anywhere but at their guest offset.
    pub(crate) fn check_data_file_mapping(
        &self,
        mapping: Mapping,
        entry: u64,
        guest: u64,
    ) -> Result<Mapping> {
        let cluster = guest & !(self.cluster_size - 1);
        match mapping {
            Mapping::Compressed { .. } => Err(Corruption::CompressedWithDataFile { entry }.into()),
            Mapping::Normal { host, .. } | Mapping::ZeroAlloc { host } if host != cluster => {
                Err(Corruption::DataFileOffsetMismatch {
                    host,
                    guest: cluster,
                }
                .into())
            }
            other => Ok(other),
        }
    }

    /// The guest range of `mapping` was unmapped (discard, zeroing with unmap): like QEMU, the
    /// discard is passed on to the data file. Its clusters hold no references, so nothing waits
    /// for a flush, and the range is nobody else's to lose: a crash before the L2 entry changes
    /// leaves a cluster that reads as zeros, which is what was asked for.
    pub(crate) fn discard_data(&mut self, mapping: Mapping) -> Result<()> {
        let (Mapping::Normal { host, .. } | Mapping::ZeroAlloc { host }) = mapping else {
            return Ok(());
        };
        self.clear_data(host, self.cluster_size, true)
    }

    /// With the raw bit, makes `[guest, guest + len)` of the data file read as zeros before the
    /// L2 entries say so (QEMU's `qcow2_subcluster_zeroize`); a no-op otherwise.
    pub(crate) fn zero_raw_data(&mut self, guest: u64, len: u64, unmap: bool) -> Result<()> {
        if !self.header.data_file_raw() || !self.header.has_data_file() {
            return Ok(());
        }
        self.clear_data(guest, len, unmap)
    }

    /// Makes the part of `[offset, offset + len)` inside the data file read as zeros: a hole
    /// punched (`unmap`) or zeros written in place.
    fn clear_data(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let data_len = self.data_len()?;
        let len = len.min(data_len.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        let storage = self.data_storage()?;
        let result = if unmap {
            storage.discard(offset, len)
        } else {
            storage.write_zeroes(offset, len)
        };
        result.map_err(|source| Error::WriteData { offset, source })?;
        self.data_dirty = true;
        Ok(())
    }

    /// Maps every guest cluster overlapping `[from, to)` at its own offset of the data file (what
    /// QEMU's metadata preallocation does for a raw data file); zero flags are dropped, since
    /// a raw data file reads as the disk does.
    pub(crate) fn map_data_file(&mut self, from: u64, to: u64) -> Result<()> {
        let mut guest = from & !(self.cluster_size - 1);
        while guest < to {
            let (l2_offset, index) = self.l2_for_write(guest)?;
            self.set_l2_entry(l2_offset, index, guest | COPIED)?;
            guest += self.cluster_size;
        }
        Ok(())
    }

    /// Sets the data file's length with the virtual size (QEMU truncates it on resize).
    pub(crate) fn resize_data_file(&mut self, len: u64) -> Result<()> {
        if !self.header.has_data_file() {
            return Ok(());
        }
        self.data_storage()?.set_len(len).map_err(Error::SetLen)?;
        self.data_dirty = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::error::Corruption;
    use crate::image::OpenOptions;
    use crate::raw::MemStorage;

    const CLUSTER: u64 = 4096;

    fn options(raw: bool) -> CreateOptions {
        CreateOptions {
            size: 16 << 20,
            cluster_size: CLUSTER,
            data_file: Some("d.raw".into()),
            data_file_raw: raw,
            ..CreateOptions::default()
        }
    }

    fn new_image(raw: bool) -> Image<MemStorage> {
        let mut file = MemStorage::default();
        create_on(&mut file, &options(raw)).unwrap();
        let data = MemStorage {
            data: vec![0; 16 << 20],
        };
        Image::open_storage_with_data(file, data, None, &OpenOptions::default()).unwrap()
    }

    fn data_bytes(image: &Image<MemStorage>) -> &[u8] {
        &image.data.as_ref().unwrap().data
    }

    #[test]
    fn clusters_live_at_their_guest_offset_without_refcounts() {
        let mut image = new_image(false);
        let metadata_len = image.file.data.len();
        image.write_at(&[7u8; 8192], 3 * CLUSTER).unwrap();
        image.write_at(&[9u8; 100], 10).unwrap();
        image.flush().unwrap();
        let data = data_bytes(&image);
        assert!(data[3 * CLUSTER as usize..5 * CLUSTER as usize]
            .iter()
            .all(|&b| b == 7));
        assert!(data[10..110].iter().all(|&b| b == 9));
        // Only an L2 table joined the metadata; no data cluster was allocated in the image.
        assert_eq!(
            image.file.data.len() as u64,
            (metadata_len as u64).div_ceil(CLUSTER) * CLUSTER + CLUSTER
        );
        assert_eq!(
            image.mapping(3 * CLUSTER).unwrap(),
            Mapping::Normal {
                host: 3 * CLUSTER,
                copied: true
            }
        );
        // Offset 0 with OFLAG_COPIED is guest cluster 0 (not unallocated), also after a reopen.
        let (file, data) = (image.file.clone(), image.data.clone().unwrap());
        drop(image);
        let mut image =
            Image::open_storage_with_data(file, data, None, &OpenOptions::default()).unwrap();
        assert_eq!(
            image.mapping(0).unwrap(),
            Mapping::Normal {
                host: 0,
                copied: true
            }
        );
        let mut buf = [0u8; 120];
        image.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[10..110], &[9u8; 100][..]);
        assert_eq!(buf[0], 0);
        let report = crate::check(&mut image, crate::Repair::None).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.allocated_clusters, 3);
    }

    #[test]
    fn a_raw_data_file_follows_zeroing_and_discards() {
        let mut image = new_image(true);
        image.write_at(&[5u8; 4 * CLUSTER as usize], 0).unwrap();
        image.write_zeroes_with(0, CLUSTER, false).unwrap();
        image.write_zeroes_with(CLUSTER, CLUSTER, true).unwrap();
        image.discard(2 * CLUSTER, CLUSTER).unwrap();
        image.write_zeroes(3 * CLUSTER + 100, 50).unwrap();
        image.flush().unwrap();
        let data = data_bytes(&image);
        assert!(data[..3 * CLUSTER as usize].iter().all(|&b| b == 0));
        let last = &data[3 * CLUSTER as usize..4 * CLUSTER as usize];
        assert!(last[..100].iter().all(|&b| b == 5));
        assert!(last[100..150].iter().all(|&b| b == 0));
        assert!(last[150..].iter().all(|&b| b == 5));
        // Zeroing without unmap keeps the cluster mapped at its offset, as QEMU does.
        assert_eq!(
            image.mapping(0).unwrap(),
            Mapping::ZeroPlain,
            "offset 0 with the zero flag reads as a plain zero cluster"
        );
        assert_eq!(image.mapping(CLUSTER).unwrap(), Mapping::ZeroPlain);
    }

    #[test]
    fn what_qemu_refuses_is_refused() {
        let mut image = new_image(false);
        image.write_at(&[1u8; 4096], CLUSTER).unwrap();
        assert!(matches!(
            image.write_compressed(0, &[0u8; 4096]),
            Err(Error::NotWithDataFile(_))
        ));
        assert!(matches!(
            image.create_snapshot(&crate::NewSnapshot::default()),
            Err(Error::NotWithDataFile(_))
        ));
        // An L2 entry that maps guest cluster 1 anywhere but at its own offset.
        let l2_offset = image.l1[0] & crate::l2::OFFSET_MASK;
        image
            .set_l2_entry(l2_offset, 1, (5 * CLUSTER) | COPIED)
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(
            image.read_at(&mut buf, CLUSTER),
            Err(Error::Corrupt(Corruption::DataFileOffsetMismatch {
                host: 20480,
                guest: 4096
            }))
        ));
        assert!(image.write_at(&buf, CLUSTER).is_err());
        image
            .set_l2_entry(l2_offset, 1, crate::l2::COMPRESSED | CLUSTER)
            .unwrap();
        assert!(matches!(
            image.read_at(&mut buf, CLUSTER),
            Err(Error::Corrupt(Corruption::CompressedWithDataFile { .. }))
        ));
    }

    #[test]
    fn opening_needs_the_data_file_unless_metadata_only() {
        let mut file = MemStorage::default();
        create_on(&mut file, &options(false)).unwrap();
        let err = Image::open_storage(file.clone(), None, &OpenOptions::default()).unwrap_err();
        assert!(matches!(err, Error::OpenDataFile { .. }), "{err:?}");
        let metadata_only = OpenOptions {
            read_only: true,
            open_data_file: false,
            ..OpenOptions::default()
        };
        let mut image = Image::open_storage(file.clone(), None, &metadata_only).unwrap();
        assert!(image.data_file_path().is_none());
        assert_eq!(image.header().data_file.as_deref(), Some("d.raw"));
        image.mapping(0).unwrap();
        let mut plain = MemStorage::default();
        create_on(&mut plain, &CreateOptions::default()).unwrap();
        let err = Image::open_storage_with_data(
            plain,
            MemStorage::default(),
            None,
            &OpenOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::DataFileNotExternal), "{err:?}");
    }

    /// What happened to which file, in order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        Write { data_file: bool, offset: u64 },
        Flush { data_file: bool },
    }

    /// A storage that logs its writes and flushes to a log shared with its sibling.
    #[derive(Debug, Clone)]
    struct Logged {
        mem: MemStorage,
        data_file: bool,
        log: Arc<Mutex<Vec<Event>>>,
    }

    impl Storage for Logged {
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            let data_file = self.data_file;
            self.log
                .lock()
                .unwrap()
                .push(Event::Write { data_file, offset });
            self.mem.write_at(buf, offset)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            let data_file = self.data_file;
            self.log.lock().unwrap().push(Event::Flush { data_file });
            Ok(())
        }
        fn len(&mut self) -> std::io::Result<u64> {
            self.mem.len()
        }
        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            self.mem.set_len(len)
        }
    }

    #[test]
    fn data_is_durable_before_the_l2_entry_that_publishes_it() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut mem = MemStorage::default();
        create_on(&mut mem, &options(false)).unwrap();
        let file = Logged {
            mem,
            data_file: false,
            log: log.clone(),
        };
        let data = Logged {
            mem: MemStorage::default(),
            data_file: true,
            log: log.clone(),
        };
        // The smallest L2 cache (four tables): writes spread over six tables evict dirty ones,
        // and the final flush writes the rest — both paths must flush the data file first.
        let tiny = OpenOptions {
            l2_cache_bytes: 0,
            ..OpenOptions::default()
        };
        let mut image = Image::open_storage_with_data(file, data, None, &tiny).unwrap();
        let table_span = CLUSTER * (CLUSTER / 8);
        log.lock().unwrap().clear();
        for step in 0..18 {
            let guest = (step % 6) * table_span + step * CLUSTER;
            image.write_at(&[step as u8 + 1; 512], guest).unwrap();
        }
        image.flush().unwrap();
        let events = log.lock().unwrap().clone();
        let table_of =
            |guest: u64| image.l1[(guest / table_span) as usize] & crate::l2::OFFSET_MASK;
        let mut checked = 0;
        for (at, event) in events.iter().enumerate() {
            let Event::Write {
                data_file: false,
                offset: table,
            } = *event
            else {
                continue;
            };
            // Every data write this table publishes that happened before the table write must
            // have been followed by a data file flush before it.
            for (before, earlier) in events[..at].iter().enumerate() {
                let Event::Write {
                    data_file: true,
                    offset: guest,
                } = *earlier
                else {
                    continue;
                };
                if table_of(guest) != table {
                    continue;
                }
                checked += 1;
                assert!(
                    events[before..at].contains(&Event::Flush { data_file: true }),
                    "L2 table {table:#x} written before the data at {guest:#x} was flushed: \
                     {events:?}"
                );
            }
        }
        assert!(
            checked >= 18,
            "only {checked} publications seen: {events:?}"
        );
    }
}
