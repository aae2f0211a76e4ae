//! Creating, applying and deleting internal snapshots, byte-compatible with QEMU: the snapshot
//! owns a copy of the L1 table, every cluster it reaches counts one reference for it, and OFLAG_COPIED
//! in the active tables is cleared wherever a cluster became shared, so later writes copy it.
//!
//! An optional VM-state blob is stored like QEMU's: in clusters mapped past the end of the
//! virtual disk, reachable from the snapshot's L1 table only.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{encode_table, Snapshot, MAX_TABLE_BYTES};
use crate::error::{Error, Result};
use crate::header::MAX_SNAPSHOTS;
use crate::image::Image;
use crate::l2::{Mapping, COPIED, OFFSET_MASK};
use crate::raw::Storage;

/// What a new snapshot records besides the disk.
#[derive(Debug, Clone, Default)]
pub struct NewSnapshot<'a> {
    pub name: String,
    /// Opaque VM state stored with the snapshot (QEMU's vmstate area); empty for none.
    pub vm_state: &'a [u8],
    /// Guest run time at the snapshot.
    pub vm_clock_nsec: u64,
    /// Instruction count (`None`: icount not in use). `qemu-img snapshot -c` records 0.
    pub icount: Option<u64>,
}

/// Snapshot lookups and errors of the snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot '{0}' not found")]
    NotFound(String),
    #[error("the snapshot table is full ({0} snapshots, QEMU's limit)")]
    TableFull(u64),
    #[error("snapshot names and ids are limited to 65535 bytes")]
    NameTooLong,
}

impl<S: Storage> Image<S> {
    /// Index of the snapshot whose id is `key`, else the first whose name is `key` (QEMU's
    /// `find_snapshot_by_id_or_name`, used to apply snapshots).
    pub fn find_snapshot(&self, key: &str) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == key)
            .or_else(|| self.snapshot_by_name(key))
    }

    /// Index of the first snapshot named `name` (what `qemu-img snapshot -d` matches).
    pub fn snapshot_by_name(&self, name: &str) -> Option<usize> {
        self.snapshots.iter().position(|s| s.name == name)
    }

    /// Guest offset where a snapshot's VM state starts: the first L1 entry past the disk.
    fn vm_state_offset(&self, disk_size: u64) -> (usize, u64) {
        let index = self.header.l1_entries_needed(disk_size) as usize;
        let per_l1_entry = self.cluster_size << self.l2_bits;
        (index, index as u64 * per_l1_entry)
    }

    /// Creates a snapshot of the current disk (and `new.vm_state`), QEMU-style: the active tables
    /// keep working and every shared cluster is copied on its next write.
    pub fn create_snapshot(&mut self, new: &NewSnapshot) -> Result<Snapshot> {
        self.check_writable()?;
        if self.header.has_data_file() {
            return Err(Error::NotWithDataFile("internal snapshots"));
        }
        if self.snapshots.len() as u64 >= MAX_SNAPSHOTS {
            return Err(Error::Snapshot(SnapshotError::TableFull(MAX_SNAPSHOTS)));
        }
        if new.name.len() > usize::from(u16::MAX) {
            return Err(Error::Snapshot(SnapshotError::NameTooLong));
        }
        let dirty = self.begin_unsafe_update()?;
        let disk_size = self.header.size;
        let (vm_index, _) = self.vm_state_offset(disk_size);
        let mut l1 = self.l1.clone();
        if !new.vm_state.is_empty() {
            // The VM state takes the L1 entries past the disk; the active table never uses them.
            l1.resize(vm_index, 0);
        }
        self.adjust_tree(&l1, 1)?;
        if !new.vm_state.is_empty() {
            let vm_l1 = self.write_vm_state(new.vm_state)?;
            l1.extend(vm_l1);
        }
        let l1_offset = if l1.is_empty() {
            0
        } else {
            let bytes = l1.len() as u64 * 8;
            let offset = self.alloc_clusters(bytes.div_ceil(self.cluster_size))?;
            let mut raw = vec![0u8; bytes as usize];
            for (i, entry) in l1.iter().enumerate() {
                raw[i * 8..i * 8 + 8].copy_from_slice(&entry.to_be_bytes());
            }
            self.write_host(&raw, offset)?;
            offset
        };
        // Shared clusters lose OFLAG_COPIED in the active tables.
        self.update_copied_flags()?;
        // Ordering: the snapshot's L1 copy, the raised refcounts and the cleared COPIED flags are
        // durable before the snapshot table that makes the snapshot exist; a crash before that
        // only leaks clusters.
        self.flush()?;
        let (date_sec, date_nsec) = now();
        let id = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let snapshot = Snapshot {
            l1_table_offset: l1_offset,
            l1_size: l1.len() as u32,
            id: id.to_string(),
            name: new.name.clone(),
            date_sec,
            date_nsec,
            vm_clock_nsec: new.vm_clock_nsec,
            vm_state_size: new.vm_state.len() as u64,
            disk_size: Some(disk_size),
            icount: new.icount,
            unknown_extra: Vec::new(),
        };
        let mut table = self.snapshots.clone();
        table.push(snapshot.clone());
        self.write_snapshot_table(table)?;
        self.end_unsafe_update(dirty)?;
        self.drop_caches();
        Ok(snapshot)
    }

    /// Writes `state` into fresh clusters and L2 tables and returns the L1 entries mapping it
    /// (to follow the disk's entries in the snapshot's L1 table).
    fn write_vm_state(&mut self, state: &[u8]) -> Result<Vec<u64>> {
        let cluster_size = self.cluster_size as usize;
        let entries_per_l2 = 1usize << self.l2_bits;
        let mut l1 = Vec::new();
        for l2_chunk in state.chunks(cluster_size * entries_per_l2) {
            let mut table = vec![0u64; entries_per_l2 * self.l2_stride()];
            for (i, data) in l2_chunk.chunks(cluster_size).enumerate() {
                let host = self.alloc_cluster()?;
                self.write_host(data, host)?;
                table[i * self.l2_stride()] = host;
                if self.l2_stride() == 2 {
                    table[i * 2 + 1] = crate::l2::ALL_ALLOCATED;
                }
            }
            let l2_offset = self.alloc_cluster()?;
            crate::image::write_l2(&mut self.file, l2_offset, &table)?;
            l1.push(l2_offset);
        }
        Ok(l1)
    }

    /// Reads the VM state stored with snapshot `index`.
    pub fn snapshot_vm_state(&mut self, index: usize) -> Result<Vec<u8>> {
        let snapshot = self.snapshot_at(index)?.clone();
        let disk_size = snapshot.disk_size.unwrap_or(self.header.size);
        let (_, start) = self.vm_state_offset(disk_size);
        let l1 = self.read_l1_table(snapshot.l1_table_offset, snapshot.l1_size)?;
        let mut state = vec![0u8; snapshot.vm_state_size as usize];
        self.read_via_l1(&l1, start, &mut state)?;
        Ok(state)
    }

    fn snapshot_at(&self, index: usize) -> Result<&Snapshot> {
        self.snapshots
            .get(index)
            .ok_or_else(|| Error::Snapshot(SnapshotError::NotFound(index.to_string())))
    }

    /// Reads guest bytes at `offset` through the L1 table `l1` (not the active one); unmapped
    /// ranges read as zeros.
    pub(crate) fn read_via_l1(&mut self, l1: &[u64], offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_cluster = guest & (self.cluster_size - 1);
            let n = ((self.cluster_size - in_cluster) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            let l1_index = self.l1_index(guest);
            let entry = l1.get(l1_index).copied().unwrap_or(0);
            let mapping = if entry & OFFSET_MASK == 0 {
                Mapping::Unallocated
            } else {
                let l2_offset = entry & OFFSET_MASK;
                let table = self.l2_table(l2_offset)?;
                let word = table[self.l2_index(guest) * self.l2_stride()];
                self.decode(word)?
            };
            match mapping {
                Mapping::Unallocated | Mapping::ZeroPlain | Mapping::ZeroAlloc { .. } => {
                    part.fill(0)
                }
                other => self.read_unmapped(other, guest, part)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Makes the disk what it was when snapshot `index` was taken (also its virtual size). The
    /// snapshot stays; both now share every cluster until one of them is written.
    pub fn apply_snapshot(&mut self, index: usize) -> Result<()> {
        self.check_writable()?;
        let snapshot = self.snapshot_at(index)?.clone();
        let dirty = self.begin_unsafe_update()?;
        let disk_size = snapshot.disk_size.unwrap_or(self.header.size);
        let (vm_index, _) = self.vm_state_offset(disk_size);
        let snapshot_l1 = self.read_l1_table(snapshot.l1_table_offset, snapshot.l1_size)?;
        let mut l1 = vec![0u64; vm_index.max(self.l1.len())];
        for (slot, entry) in l1.iter_mut().zip(snapshot_l1.iter().take(vm_index)) {
            *slot = entry & !COPIED;
        }
        let old_l1 = self.l1.clone();
        // Ordering: the snapshot's tree gains the new active table's references first, the
        // header switches to the new table, and only then does the old tree lose its references.
        self.adjust_tree(&l1, 1)?;
        self.replace_l1(l1, disk_size)?;
        self.drop_caches();
        self.adjust_tree(&old_l1, -1)?;
        self.update_copied_flags()?;
        self.end_unsafe_update(dirty)?;
        self.drop_caches();
        Ok(())
    }

    /// Deletes snapshot `index`, freeing the clusters only it used.
    pub fn delete_snapshot(&mut self, index: usize) -> Result<()> {
        self.check_writable()?;
        let snapshot = self.snapshot_at(index)?.clone();
        let l1 = self.read_l1_table(snapshot.l1_table_offset, snapshot.l1_size)?;
        let dirty = self.begin_unsafe_update()?;
        let mut table = self.snapshots.clone();
        table.remove(index);
        // Ordering: the table without the snapshot is durable before its clusters lose their
        // references.
        self.write_snapshot_table(table)?;
        self.adjust_tree(&l1, -1)?;
        if !l1.is_empty() {
            self.refcounts.update_range(
                &mut self.file,
                snapshot.l1_table_offset,
                u64::from(snapshot.l1_size) * 8,
                -1,
            )?;
        }
        // Clusters now used by the active disk alone may be written in place again.
        self.update_copied_flags()?;
        self.end_unsafe_update(dirty)?;
        self.drop_caches();
        Ok(())
    }

    /// Writes `snapshots` as the new snapshot table in fresh clusters, switches the header to it
    /// and queues the old table for freeing.
    pub(crate) fn write_snapshot_table(&mut self, snapshots: Vec<Snapshot>) -> Result<()> {
        let raw = encode_table(&snapshots);
        if raw.len() as u64 > MAX_TABLE_BYTES {
            return Err(Error::Snapshot(SnapshotError::TableFull(
                snapshots.len() as u64 - 1,
            )));
        }
        let offset = if raw.is_empty() {
            0
        } else {
            let offset = self.alloc_clusters((raw.len() as u64).div_ceil(self.cluster_size))?;
            self.write_host(&raw, offset)?;
            offset
        };
        // Ordering: the new table (and its clusters' refcounts) is durable before the header
        // points at it.
        self.refcount_barrier()?;
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(snapshots.len() as u32).to_be_bytes());
        fields[4..].copy_from_slice(&offset.to_be_bytes());
        self.file
            .write_at(&fields, 60)
            .map_err(Error::WriteHeader)?;
        self.file.flush().map_err(Error::Flush)?;
        let old = (self.header.snapshots_offset, self.snapshot_table_len);
        if old.1 > 0 {
            self.pending_frees.push(old);
        }
        self.header.nb_snapshots = snapshots.len() as u32;
        self.header.snapshots_offset = offset;
        self.snapshot_table_len = raw.len() as u64;
        self.snapshots = snapshots;
        self.refresh_protected();
        Ok(())
    }
}

/// Wall-clock time as QEMU records it (microsecond precision).
fn now() -> (u32, u32) {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (since.as_secs() as u32, since.subsec_micros() * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tests::new_image as image;
    use crate::image::OpenOptions;
    use crate::raw::MemStorage;

    fn read_all(image: &mut Image<MemStorage>) -> Vec<u8> {
        let mut buf = vec![0u8; image.size() as usize];
        image.read_at(&mut buf, 0).unwrap();
        buf
    }

    fn assert_clean(image: &mut Image<MemStorage>) {
        let report = crate::check(image, crate::Repair::None).unwrap();
        assert!(
            report.is_clean(),
            "{report:?}\n{}",
            report.messages.join("\n")
        );
    }

    fn named(name: &str) -> NewSnapshot<'static> {
        NewSnapshot {
            name: name.into(),
            ..NewSnapshot::default()
        }
    }

    #[test]
    fn create_write_apply_delete() {
        let mut image = image(4096);
        image.write_at(&[1u8; 10_000], 2000).unwrap();
        let before = read_all(&mut image);
        let first = image.create_snapshot(&named("first")).unwrap();
        assert_eq!((first.id.as_str(), first.disk_size), ("1", Some(1 << 20)));
        assert_clean(&mut image);
        image.write_at(&[2u8; 6000], 5000).unwrap();
        let after = read_all(&mut image);
        assert_ne!(before, after);
        assert_clean(&mut image);
        let second = image.create_snapshot(&named("second")).unwrap();
        assert_eq!(second.id, "2");
        image.apply_snapshot(0).unwrap();
        assert_eq!(read_all(&mut image), before);
        assert_clean(&mut image);
        image.delete_snapshot(0).unwrap();
        assert_eq!(read_all(&mut image), before);
        assert_clean(&mut image);
        image
            .apply_snapshot(image.find_snapshot("second").unwrap())
            .unwrap();
        assert_eq!(read_all(&mut image), after);
        image.delete_snapshot(0).unwrap();
        assert!(image.snapshots().is_empty());
        assert_clean(&mut image);
        // With no snapshot left, every cluster is the active disk's alone again.
        let storage = image.storage_mut().clone();
        drop(image);
        let mut image = Image::open_storage(storage, None, &OpenOptions::default()).unwrap();
        assert!(matches!(
            image.mapping(4096).unwrap(),
            Mapping::Normal { copied: true, .. }
        ));
        assert_eq!(read_all(&mut image), after);
    }

    #[test]
    fn vm_state_round_trips_and_stays_out_of_the_disk() {
        let mut image = image(65536);
        image.write_at(&[9u8; 70_000], 0).unwrap();
        let state: Vec<u8> = (0..200_000u32).map(|i| (i % 13) as u8).collect();
        let new = NewSnapshot {
            name: "vm".into(),
            vm_state: &state,
            ..NewSnapshot::default()
        };
        let snapshot = image.create_snapshot(&new).unwrap();
        assert_eq!(snapshot.vm_state_size, state.len() as u64);
        assert_clean(&mut image);
        assert_eq!(image.snapshot_vm_state(0).unwrap(), state);
        image.write_at(&[3u8; 1000], 0).unwrap();
        image.apply_snapshot(0).unwrap();
        let disk = read_all(&mut image);
        assert!(disk[..70_000].iter().all(|&b| b == 9));
        assert!(disk[70_000..].iter().all(|&b| b == 0));
        assert_clean(&mut image);
        image.delete_snapshot(0).unwrap();
        assert_clean(&mut image);
    }

    #[test]
    fn missing_snapshots_are_reported() {
        let mut image = image(4096);
        assert_eq!(image.find_snapshot("x"), None);
        assert!(matches!(
            image.apply_snapshot(3),
            Err(Error::Snapshot(SnapshotError::NotFound(_)))
        ));
    }
}
