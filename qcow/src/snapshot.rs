//! The internal snapshot table: parsing with QEMU's limits, and encoding. Creating, applying and
//! deleting snapshots is in `snapshot/ops.rs`.

use byteorder::{BigEndian, ByteOrder};

use crate::error::{Error, Result, SnapshotTableProblem as Problem};
use crate::header::{check_table_offset, MAX_L1_BYTES, MAX_SNAPSHOTS};
use crate::raw::Storage;

mod ops;

pub use ops::{NewSnapshot, SnapshotError};

/// QEMU's cap on the whole table and on one entry's extra data.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
pub const MAX_EXTRA_DATA: u64 = 1024;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    pub icount: Option<u64>,
    /// Extra data past the fields this version knows (kept verbatim when the table is rewritten).
    pub unknown_extra: Vec<u8>,
}

/// Size of the extra data QEMU writes: VM state size, disk size, icount.
const KNOWN_EXTRA: usize = 24;

impl Snapshot {
    /// Length of this entry in the table, padding included.
    pub fn encoded_len(&self) -> u64 {
        let unpadded =
            40 + KNOWN_EXTRA + self.unknown_extra.len() + self.id.len() + self.name.len();
        unpadded.div_ceil(8) as u64 * 8
    }

    /// Appends this entry (padded to 8 bytes) to `out`, as QEMU writes it.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let mut fixed = [0u8; 40];
        BigEndian::write_u64(&mut fixed[0..], self.l1_table_offset);
        BigEndian::write_u32(&mut fixed[8..], self.l1_size);
        BigEndian::write_u16(&mut fixed[12..], self.id.len() as u16);
        BigEndian::write_u16(&mut fixed[14..], self.name.len() as u16);
        BigEndian::write_u32(&mut fixed[16..], self.date_sec);
        BigEndian::write_u32(&mut fixed[20..], self.date_nsec);
        BigEndian::write_u64(&mut fixed[24..], self.vm_clock_nsec);
        // The 32-bit field is the legacy copy; the 64-bit one in the extra data is the real one.
        BigEndian::write_u32(&mut fixed[32..], self.vm_state_size as u32);
        BigEndian::write_u32(
            &mut fixed[36..],
            (KNOWN_EXTRA + self.unknown_extra.len()) as u32,
        );
        out.extend_from_slice(&fixed);
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&self.unknown_extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + self.encoded_len() as usize, 0);
    }
}

/// The encoded table of `snapshots`.
pub fn encode_table(snapshots: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for snapshot in snapshots {
        snapshot.encode_into(&mut out);
    }
    out
}

/// Reads and validates `count` snapshot entries at `offset`. Returns the snapshots and the table's
/// length in bytes.
pub fn read_table<S: Storage + ?Sized>(
    file: &mut S,
    offset: u64,
    count: u32,
    cluster_size: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    if count == 0 {
        return Ok((Vec::new(), 0));
    }
    if u64::from(count) > MAX_SNAPSHOTS {
        return Err(Error::TooManySnapshots(u64::from(count)));
    }
    check_table_offset("snapshot table", offset, 0, cluster_size)?;
    let file_len = file.len().map_err(Problem::Read)?;
    let mut snapshots = Vec::new();
    let mut pos = offset;
    for i in 0..count {
        if pos - offset + 40 > MAX_TABLE_BYTES {
            return Err(Problem::TableTooLarge {
                index: i,
                limit: MAX_TABLE_BYTES,
            }
            .into());
        }
        if pos + 40 > file_len {
            return Err(Problem::EntryPastEndOfFile {
                index: i,
                offset: pos,
            }
            .into());
        }
        let mut fixed = [0u8; 40];
        file.read_at(&mut fixed, pos).map_err(Problem::Read)?;
        let l1_table_offset = BigEndian::read_u64(&fixed[0..]);
        let l1_size = BigEndian::read_u32(&fixed[8..]);
        let id_len = u64::from(BigEndian::read_u16(&fixed[12..]));
        let name_len = u64::from(BigEndian::read_u16(&fixed[14..]));
        let extra_len = u64::from(BigEndian::read_u32(&fixed[36..]));
        if extra_len > MAX_EXTRA_DATA {
            return Err(Problem::ExtraDataTooLarge {
                index: i,
                len: extra_len,
            }
            .into());
        }
        let unpadded_len = 40 + extra_len + id_len + name_len;
        let entry_len = unpadded_len.div_ceil(8) * 8;
        // The padding after the last entry may lie past the end of the file.
        if pos - offset + entry_len > MAX_TABLE_BYTES || pos + unpadded_len > file_len {
            return Err(Problem::EntryRunsPastEnd {
                index: i,
                offset: pos,
            }
            .into());
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(Problem::L1TooLarge {
                index: i,
                entries: l1_size,
            }
            .into());
        }
        if l1_size > 0 {
            check_table_offset(
                "snapshot L1 table",
                l1_table_offset,
                u64::from(l1_size) * 8,
                cluster_size,
            )?;
        }
        let mut rest = vec![0u8; (entry_len - 40) as usize];
        file.read_at(&mut rest, pos + 40).map_err(Problem::Read)?;
        let extra = &rest[..extra_len as usize];
        let read_extra =
            |at: usize| (extra.len() >= at + 8).then(|| BigEndian::read_u64(&extra[at..]));
        let id_start = extra_len as usize;
        let name_start = id_start + id_len as usize;
        snapshots.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(&rest[id_start..name_start]).into_owned(),
            name: String::from_utf8_lossy(&rest[name_start..name_start + name_len as usize])
                .into_owned(),
            date_sec: BigEndian::read_u32(&fixed[16..]),
            date_nsec: BigEndian::read_u32(&fixed[20..]),
            vm_clock_nsec: BigEndian::read_u64(&fixed[24..]),
            vm_state_size: read_extra(0).unwrap_or(u64::from(BigEndian::read_u32(&fixed[32..]))),
            disk_size: read_extra(8),
            icount: read_extra(16).filter(|&v| v != u64::MAX),
            unknown_extra: extra.get(KNOWN_EXTRA..).unwrap_or_default().to_vec(),
        });
        pos += entry_len;
    }
    Ok((snapshots, pos - offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::MemStorage;

    fn entry(l1_offset: u64, l1_size: u32, id: &str, name: &str) -> Vec<u8> {
        let mut buf = vec![0u8; 40];
        BigEndian::write_u64(&mut buf[0..], l1_offset);
        BigEndian::write_u32(&mut buf[8..], l1_size);
        BigEndian::write_u16(&mut buf[12..], id.len() as u16);
        BigEndian::write_u16(&mut buf[14..], name.len() as u16);
        BigEndian::write_u32(&mut buf[36..], 16);
        buf.extend_from_slice(&[0; 8]);
        buf.extend_from_slice(&4096u64.to_be_bytes());
        buf.extend_from_slice(id.as_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.resize(buf.len().div_ceil(8) * 8, 0);
        buf
    }

    #[test]
    fn parses_entries() {
        let mut file = MemStorage::default();
        let mut table = entry(0x30000, 1, "1", "first");
        table.extend(entry(0x40000, 1, "2", "second"));
        file.write_at(&table, 0x10000).unwrap();
        let (snapshots, len) = read_table(&mut file, 0x10000, 2, 65536).unwrap();
        assert_eq!(len, table.len() as u64);
        assert_eq!(snapshots[1].name, "second");
        assert_eq!(snapshots[1].disk_size, Some(4096));
    }

    #[test]
    fn encoding_round_trips() {
        let snapshot = Snapshot {
            l1_table_offset: 0x50000,
            l1_size: 3,
            id: "12".into(),
            name: "before upgrade".into(),
            date_sec: 1_700_000_000,
            date_nsec: 123_000,
            vm_clock_nsec: 5_000_000_001,
            vm_state_size: 1 << 33,
            disk_size: Some(1 << 30),
            icount: None,
            unknown_extra: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        let second = Snapshot {
            id: "13".into(),
            name: "x".into(),
            icount: Some(0),
            unknown_extra: Vec::new(),
            ..snapshot.clone()
        };
        let table = encode_table(&[snapshot.clone(), second.clone()]);
        assert_eq!(
            table.len() as u64,
            snapshot.encoded_len() + second.encoded_len()
        );
        assert_eq!(table.len() % 8, 0);
        let mut file = MemStorage::default();
        file.write_at(&table, 0x10000).unwrap();
        let (read, len) = read_table(&mut file, 0x10000, 2, 65536).unwrap();
        assert_eq!(len, table.len() as u64);
        assert_eq!(read, vec![snapshot, second]);
    }

    #[test]
    fn rejects_bad_entries() {
        let mut file = MemStorage::default();
        file.write_at(&entry(0x30001, 1, "1", "x"), 0x10000)
            .unwrap();
        assert!(matches!(
            read_table(&mut file, 0x10000, 1, 65536),
            Err(Error::InvalidTableOffset {
                what: "snapshot L1 table",
                ..
            })
        ));
        assert!(matches!(
            read_table(&mut file, 0x10000, 70000, 65536),
            Err(Error::TooManySnapshots(70000))
        ));
        assert!(read_table(&mut file, 0x10000, 2, 65536).is_err());
    }
}
