//! L1 and L2 table entries: masks, flags and decoding of a guest cluster's mapping.

use crate::error::{Corruption, Result};

/// Host offset bits of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Set when the table or cluster has refcount exactly 1 (may be written in place).
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
/// v3 zero flag of standard L2 entries.
pub const ZERO: u64 = 1;
/// Subcluster bitmap of an extended L2 entry with every subcluster allocated.
pub const ALL_ALLOCATED: u64 = 0xffff_ffff;
/// Subcluster bitmap of an extended L2 entry with every subcluster reading as zeros.
pub const ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;

/// What a guest cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: read through to the backing file (or zeros).
    Unallocated,
    /// Reads as zeros; no host cluster.
    ZeroPlain,
    /// Reads as zeros; a (preallocated) host cluster is still referenced.
    ZeroAlloc { host: u64 },
    /// Data at `host`; `copied` = refcount is exactly 1 (can be overwritten in place).
    Normal { host: u64, copied: bool },
    /// Compressed data: `len` bytes starting at host byte `host`, spanning `sectors` 512-byte sectors.
    Compressed { host: u64, len: u64, sectors: u64 },
}

impl Mapping {
    /// Decodes a standard (64-bit) L2 entry.
    pub fn decode(entry: u64, cluster_bits: u32) -> Result<Mapping> {
        if entry & COMPRESSED != 0 {
            let size_shift = 62 - (cluster_bits - 8);
            let size_mask = (1u64 << (cluster_bits - 8)) - 1;
            let host = entry & ((1u64 << size_shift) - 1);
            let sectors = ((entry >> size_shift) & size_mask) + 1;
            let len = sectors * 512 - (host & 511);
            return Ok(Mapping::Compressed { host, len, sectors });
        }
        let host = entry & OFFSET_MASK;
        let cluster_size = 1u64 << cluster_bits;
        if host % cluster_size != 0 {
            return Err(Corruption::DataOffsetUnaligned { entry, host }.into());
        }
        if entry & ZERO != 0 {
            return Ok(if host == 0 {
                Mapping::ZeroPlain
            } else {
                Mapping::ZeroAlloc { host }
            });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Normal {
            host,
            copied: entry & COPIED != 0,
        })
    }

    /// Decodes the mapping word of an L2 entry: with extended L2 entries bit 0 is not a zero
    /// flag, and the subcluster bitmap (see [`Mapping::decode_sub`]) says what reads as what.
    pub fn decode_cluster(entry: u64, cluster_bits: u32, extended: bool) -> Result<Mapping> {
        if extended && entry & COMPRESSED == 0 {
            return Mapping::decode(entry & !ZERO, cluster_bits);
        }
        Mapping::decode(entry, cluster_bits)
    }

    /// The mapping of subcluster `index` (0..32) of an extended L2 entry `(entry, bitmap)`:
    /// `Normal` for an allocated subcluster (at the cluster's `host`), `ZeroPlain`/`ZeroAlloc`
    /// for one that reads as zeros, `Unallocated` for one read from the backing file.
    pub fn decode_sub(entry: u64, bitmap: u64, cluster_bits: u32, index: u32) -> Result<Mapping> {
        let cluster = Mapping::decode_cluster(entry, cluster_bits, true)?;
        Mapping::sub_of(cluster, entry, bitmap, index)
    }

    /// Like [`Mapping::decode_sub`], for an entry whose cluster-level mapping `cluster` is known.
    pub fn sub_of(cluster: Mapping, entry: u64, bitmap: u64, index: u32) -> Result<Mapping> {
        let invalid = || -> Result<Mapping> {
            Err(Corruption::InvalidSubclusterBitmap { entry, bitmap }.into())
        };
        let (alloc, zero) = (bitmap >> index & 1 != 0, bitmap >> (32 + index) & 1 != 0);
        match cluster {
            Mapping::Compressed { .. } if bitmap != 0 => invalid(),
            Mapping::Compressed { .. } => Ok(cluster),
            Mapping::Unallocated if bitmap & ALL_ALLOCATED != 0 => invalid(),
            Mapping::Unallocated if zero => Ok(Mapping::ZeroPlain),
            Mapping::Unallocated => Ok(Mapping::Unallocated),
            Mapping::Normal { .. } if (bitmap >> 32) & bitmap & ALL_ALLOCATED != 0 => invalid(),
            Mapping::Normal { .. } if alloc => Ok(cluster),
            Mapping::Normal { host, .. } if zero => Ok(Mapping::ZeroAlloc { host }),
            _ => Ok(Mapping::Unallocated),
        }
    }

    /// The host range this mapping holds a reference on: (offset, length) in bytes.
    pub fn host_range(self, cluster_size: u64) -> Option<(u64, u64)> {
        match self {
            Mapping::Unallocated | Mapping::ZeroPlain => None,
            Mapping::ZeroAlloc { host } | Mapping::Normal { host, .. } => {
                Some((host, cluster_size))
            }
            Mapping::Compressed { host, sectors, .. } => Some((host & !511, sectors * 512)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_standard_entries() {
        assert_eq!(Mapping::decode(0, 16).unwrap(), Mapping::Unallocated);
        assert_eq!(Mapping::decode(1, 16).unwrap(), Mapping::ZeroPlain);
        assert_eq!(
            Mapping::decode(COPIED | 0x50000, 16).unwrap(),
            Mapping::Normal {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            Mapping::decode(0x50000 | ZERO, 16).unwrap(),
            Mapping::ZeroAlloc { host: 0x50000 }
        );
        assert!(Mapping::decode(COPIED | 0x50200, 16).is_err());
    }

    #[test]
    fn decodes_subclusters() {
        let host = COPIED | 0x50000;
        // Subcluster 0 allocated, 1 zero, 2 unallocated.
        let bitmap = 1 | (1 << 33);
        assert_eq!(
            Mapping::decode_sub(host, bitmap, 16, 0).unwrap(),
            Mapping::Normal {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            Mapping::decode_sub(host, bitmap, 16, 1).unwrap(),
            Mapping::ZeroAlloc { host: 0x50000 }
        );
        assert_eq!(
            Mapping::decode_sub(host, bitmap, 16, 2).unwrap(),
            Mapping::Unallocated
        );
        assert_eq!(
            Mapping::decode_sub(0, ALL_ZEROES, 16, 7).unwrap(),
            Mapping::ZeroPlain
        );
        // Allocated and zero at once, or allocated without a host cluster: corrupt.
        assert!(Mapping::decode_sub(host, 1 | (1 << 32), 16, 5).is_err());
        assert!(Mapping::decode_sub(0, 1, 16, 3).is_err());
        // Bit 0 of the entry is no zero flag with extended L2 entries.
        assert_eq!(
            Mapping::decode_cluster(0x50001, 16, true).unwrap(),
            Mapping::Normal {
                host: 0x50000,
                copied: false
            }
        );
    }

    #[test]
    fn decodes_compressed_entries() {
        // 64 KiB clusters: offset in bits 0..53, additional sectors in bits 54..61.
        let entry = COMPRESSED | (3u64 << 54) | 0x12_3456;
        let mapping = Mapping::decode(entry, 16).unwrap();
        assert_eq!(
            mapping,
            Mapping::Compressed {
                host: 0x12_3456,
                len: 4 * 512 - 0x56,
                sectors: 4
            }
        );
        assert_eq!(mapping.host_range(65536), Some((0x12_3400, 2048)));
        // 2 MiB clusters: offset in bits 0..48.
        let entry = COMPRESSED | (1u64 << 49) | 0x1000;
        assert_eq!(
            Mapping::decode(entry, 21).unwrap(),
            Mapping::Compressed {
                host: 0x1000,
                len: 1024,
                sectors: 2
            }
        );
    }
}
