//! The qcow2 header (first cluster): parsing with QEMU's sanity limits, header extensions, encoding.

use byteorder::{BigEndian, ByteOrder};

use crate::error::{Error, HeaderProblem, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest and largest cluster_bits QEMU accepts.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits on table sizes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u64 = 65536;
pub const MAX_BACKING_NAME: u64 = 1023;
/// Largest host offset a descriptor can hold.
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible bits this implementation handles.
pub const INCOMPAT_SUPPORTED: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Autoclear bit 1: the external data file is valid as a raw image on its own.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const V2_HEADER_LEN: u32 = 72;
const V3_MIN_HEADER_LEN: u32 = 104;
/// What QEMU writes for v3 (104 + compression type + padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Compression algorithm of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Deflate,
    Zstd,
}

impl CompressionType {
    /// The name qemu-img prints.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// One entry of the feature-name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The decoded header plus its extensions, enough to re-encode it byte-for-byte compatible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Header bytes from 112 up to `header_length` that this version does not know; kept verbatim.
    pub unknown_header_fields: Vec<u8>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Name of the external data file (header extension `DATA`).
    pub data_file: Option<String>,
    pub feature_names: Vec<FeatureName>,
    /// Extensions this version does not understand; rewritten verbatim.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

impl Header {
    /// A fresh header for `create`.
    pub fn new(version: u32, cluster_bits: u32, refcount_order: u32, size: u64) -> Header {
        Header {
            version,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order,
            header_length: if version >= 3 {
                V3_HEADER_LEN
            } else {
                V2_HEADER_LEN
            },
            compression_type: CompressionType::Deflate,
            unknown_header_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            unknown_extensions: Vec::new(),
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Number of L1 entries needed to map `size` bytes with standard (8-byte) L2 entries.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        Header::l1_entries_with(size, cluster_bits, cluster_bits - 3)
    }

    /// Number of L1 entries needed to map `size` bytes with `1 << l2_bits` entries per L2 table.
    pub fn l1_entries_with(size: u64, cluster_bits: u32, l2_bits: u32) -> u64 {
        let bytes_per_l2 = 1u64 << (cluster_bits + l2_bits);
        size.div_ceil(bytes_per_l2)
    }

    /// Whether L2 entries are extended (128 bits, 32 subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Whether guest data lives in an external data file (incompatible bit 2).
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// Whether the external data file is kept valid as a raw image of the disk (autoclear bit 1).
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// log2 of the entries per L2 table (a cluster of 8- or 16-byte entries).
    pub fn l2_bits(&self) -> u32 {
        if self.extended_l2() {
            self.cluster_bits - 4
        } else {
            self.cluster_bits - 3
        }
    }

    /// Number of L1 entries this image needs to map `size` bytes.
    pub fn l1_entries_needed(&self, size: u64) -> u64 {
        Header::l1_entries_with(size, self.cluster_bits, self.l2_bits())
    }

    /// Decodes and validates the header cluster `buf` (at least the first 104 bytes; the whole first
    /// cluster for extensions and the backing name). `file_len` bounds table offsets.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        Self::parse_with(buf, false)
    }

    /// Like [`Header::parse`], but lets through what QEMU's check-mode open lets through so that
    /// `check` can report (and repair) it: an empty refcount table, and a snapshot table pointer
    /// that is unusable (too many entries, bad offset).
    pub fn parse_for_check(buf: &[u8]) -> Result<Header> {
        Self::parse_with(buf, true)
    }

    fn parse_with(buf: &[u8], check_mode: bool) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(HeaderProblem::ShorterThanV2Header.into());
        }
        let be32 = |off: usize| BigEndian::read_u32(&buf[off..off + 4]);
        let be64 = |off: usize| BigEndian::read_u64(&buf[off..off + 8]);
        let magic = be32(0);
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = be32(4);
        if !(2..=3).contains(&version) {
            return Err(Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::InvalidClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut header = Header::new(version, cluster_bits, 4, be64(24));
        let backing_file_offset = be64(8);
        let backing_file_size = u64::from(be32(16));
        header.crypt_method = be32(32);
        header.l1_size = be32(36);
        header.l1_table_offset = be64(40);
        header.refcount_table_offset = be64(48);
        header.refcount_table_clusters = be32(56);
        header.nb_snapshots = be32(60);
        header.snapshots_offset = be64(64);
        if version >= 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(HeaderProblem::ShorterThanV3Header.into());
            }
            header.incompatible_features = be64(72);
            header.compatible_features = be64(80);
            header.autoclear_features = be64(88);
            header.refcount_order = be32(96);
            header.header_length = be32(100);
            if header.header_length < V3_MIN_HEADER_LEN {
                return Err(HeaderProblem::HeaderLengthTooShort(header.header_length).into());
            }
            if u64::from(header.header_length) > cluster_size {
                return Err(HeaderProblem::HeaderLengthExceedsCluster {
                    length: header.header_length,
                    cluster_size,
                }
                .into());
            }
            if header.header_length as usize > buf.len() {
                return Err(HeaderProblem::HeaderLengthPastEnd.into());
            }
            let compression = if header.header_length > 104 {
                buf[104]
            } else {
                0
            };
            header.compression_type = match compression {
                0 => CompressionType::Deflate,
                1 => CompressionType::Zstd,
                other => {
                    return Err(HeaderProblem::UnknownCompressionType(other).into());
                }
            };
            let has_bit = header.incompatible_features & INCOMPAT_COMPRESSION != 0;
            if has_bit != (compression != 0) {
                return Err(HeaderProblem::CompressionBitMismatch.into());
            }
            if header.header_length > V3_HEADER_LEN {
                header.unknown_header_fields =
                    buf[V3_HEADER_LEN as usize..header.header_length as usize].to_vec();
            }
        }
        if backing_file_offset > cluster_size {
            return Err(HeaderProblem::BackingOffsetOutsideCluster(backing_file_offset).into());
        }
        if backing_file_offset != 0 {
            let room = cluster_size - backing_file_offset;
            if backing_file_size > MAX_BACKING_NAME.min(room) {
                return Err(Error::BackingNameTooLong(backing_file_size));
            }
            let start = backing_file_offset as usize;
            let end = start + backing_file_size as usize;
            if end > buf.len() {
                return Err(HeaderProblem::BackingNamePastEnd.into());
            }
            header.backing_file = Some(String::from_utf8_lossy(&buf[start..end]).into_owned());
        }
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset as usize
        } else {
            (cluster_size as usize).min(buf.len())
        };
        header.parse_extensions(buf, ext_end)?;
        header.validate_features()?;
        header.validate_tables(check_mode)?;
        Ok(header)
    }

    fn parse_extensions(&mut self, buf: &[u8], end: usize) -> Result<()> {
        let mut off = self.header_length as usize;
        while off + 8 <= end {
            let ext_type = BigEndian::read_u32(&buf[off..off + 4]);
            let len = BigEndian::read_u32(&buf[off + 4..off + 8]) as usize;
            off += 8;
            if ext_type == EXT_END {
                return Ok(());
            }
            if len > end - off {
                return Err(Error::HeaderExtensionTooLarge {
                    ext_type,
                    len: len as u64,
                });
            }
            let data = &buf[off..off + len];
            match ext_type {
                EXT_BACKING_FORMAT => {
                    if len > 15 {
                        return Err(HeaderProblem::BackingFormatTooLong(len).into());
                    }
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_DATA_FILE => {
                    self.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    self.feature_names = data
                        .chunks_exact(48)
                        .map(|entry| {
                            let name_bytes = &entry[2..];
                            let name_len = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                            FeatureName {
                                kind: entry[0],
                                bit: entry[1],
                                name: String::from_utf8_lossy(&name_bytes[..name_len]).into_owned(),
                            }
                        })
                        .collect();
                }
                _ => self.unknown_extensions.push((ext_type, data.to_vec())),
            }
            off += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn validate_features(&self) -> Result<()> {
        let mut unsupported = self.incompatible_features & !INCOMPAT_SUPPORTED;
        if unsupported != 0 {
            // Like QEMU: the names the image's own feature table gives these bits (in table
            // order, up to the first unnamed entry), then whatever bits remain unnamed.
            let mut names = Vec::new();
            for feature in self.feature_names.iter().take_while(|f| !f.name.is_empty()) {
                let bit = 1u64.checked_shl(u32::from(feature.bit)).unwrap_or(0);
                if feature.kind == 0 && unsupported & bit != 0 {
                    names.push(feature.name.clone());
                    unsupported &= !bit;
                }
            }
            return Err(Error::UnknownIncompatibleFeature {
                names,
                unnamed: unsupported,
            });
        }
        if self.crypt_method != 0 {
            return Err(HeaderProblem::Encrypted(self.crypt_method).into());
        }
        if self.refcount_order > 6 {
            return Err(Error::InvalidRefcountOrder(self.refcount_order));
        }
        Ok(())
    }

    fn validate_tables(&self, check_mode: bool) -> Result<()> {
        let cluster_size = self.cluster_size();
        if self.refcount_table_clusters == 0 && !check_mode {
            return Err(HeaderProblem::RefcountTableEmpty.into());
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::RefcountTableTooLarge(u64::from(
                self.refcount_table_clusters,
            )));
        }
        check_table_offset(
            "refcount table",
            self.refcount_table_offset,
            reftable_bytes,
            cluster_size,
        )?;
        if u64::from(self.nb_snapshots) > MAX_SNAPSHOTS && !check_mode {
            return Err(Error::TooManySnapshots(u64::from(self.nb_snapshots)));
        }
        if self.nb_snapshots > 0 && !check_mode {
            check_table_offset("snapshot table", self.snapshots_offset, 0, cluster_size)?;
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::L1TableTooLarge(u64::from(self.l1_size)));
        }
        if self.l1_size > 0 {
            check_table_offset("L1 table", self.l1_table_offset, l1_bytes, cluster_size)?;
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(HeaderProblem::ExtendedL2ClustersTooSmall(self.cluster_bits).into());
        }
        let need = self.l1_entries_needed(self.size);
        if need > MAX_L1_BYTES / 8 {
            return Err(HeaderProblem::SizeTooBig {
                size: self.size,
                cluster_size,
            }
            .into());
        }
        if u64::from(self.l1_size) < need {
            return Err(Error::L1TableTooSmall {
                have: u64::from(self.l1_size),
                need,
            });
        }
        if self.version < 3 && self.refcount_order != 4 {
            return Err(Error::InvalidRefcountOrder(self.refcount_order));
        }
        Ok(())
    }

    /// Encodes the header, its extensions and the backing name into the bytes of cluster 0.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.header_length as usize];
        BigEndian::write_u32(&mut buf[0..], MAGIC);
        BigEndian::write_u32(&mut buf[4..], self.version);
        BigEndian::write_u32(&mut buf[20..], self.cluster_bits);
        BigEndian::write_u64(&mut buf[24..], self.size);
        BigEndian::write_u32(&mut buf[32..], self.crypt_method);
        BigEndian::write_u32(&mut buf[36..], self.l1_size);
        BigEndian::write_u64(&mut buf[40..], self.l1_table_offset);
        BigEndian::write_u64(&mut buf[48..], self.refcount_table_offset);
        BigEndian::write_u32(&mut buf[56..], self.refcount_table_clusters);
        BigEndian::write_u32(&mut buf[60..], self.nb_snapshots);
        BigEndian::write_u64(&mut buf[64..], self.snapshots_offset);
        if self.version >= 3 {
            BigEndian::write_u64(&mut buf[72..], self.incompatible_features);
            BigEndian::write_u64(&mut buf[80..], self.compatible_features);
            BigEndian::write_u64(&mut buf[88..], self.autoclear_features);
            BigEndian::write_u32(&mut buf[96..], self.refcount_order);
            BigEndian::write_u32(&mut buf[100..], self.header_length);
            if self.header_length > 104 {
                buf[104] = match self.compression_type {
                    CompressionType::Deflate => 0,
                    CompressionType::Zstd => 1,
                };
            }
            if self.header_length > V3_HEADER_LEN {
                buf[V3_HEADER_LEN as usize..].copy_from_slice(&self.unknown_header_fields);
            }
        }
        let push_ext = |buf: &mut Vec<u8>, ext_type: u32, data: &[u8]| {
            let mut head = [0u8; 8];
            BigEndian::write_u32(&mut head[0..], ext_type);
            BigEndian::write_u32(&mut head[4..], data.len() as u32);
            buf.extend_from_slice(&head);
            buf.extend_from_slice(data);
            buf.resize(buf.len().div_ceil(8) * 8, 0);
        };
        if let Some(format) = &self.backing_format {
            push_ext(&mut buf, EXT_BACKING_FORMAT, format.as_bytes());
        }
        if let Some(name) = &self.data_file {
            push_ext(&mut buf, EXT_DATA_FILE, name.as_bytes());
        }
        if !self.feature_names.is_empty() {
            let mut table = Vec::with_capacity(self.feature_names.len() * 48);
            for feature in &self.feature_names {
                let mut entry = [0u8; 48];
                entry[0] = feature.kind;
                entry[1] = feature.bit;
                let name = feature.name.as_bytes();
                let n = name.len().min(46);
                entry[2..2 + n].copy_from_slice(&name[..n]);
                table.extend_from_slice(&entry);
            }
            push_ext(&mut buf, EXT_FEATURE_TABLE, &table);
        }
        for (ext_type, data) in &self.unknown_extensions {
            push_ext(&mut buf, *ext_type, data);
        }
        push_ext(&mut buf, EXT_END, &[]);
        if let Some(backing) = &self.backing_file {
            let name = backing.as_bytes();
            if name.len() as u64 > MAX_BACKING_NAME {
                return Err(Error::BackingNameTooLong(name.len() as u64));
            }
            let offset = buf.len() as u64;
            BigEndian::write_u64(&mut buf[8..], offset);
            BigEndian::write_u32(&mut buf[16..], name.len() as u32);
            buf.extend_from_slice(name);
        }
        if buf.len() as u64 > self.cluster_size() {
            return Err(HeaderProblem::DoesNotFitCluster {
                need: buf.len() as u64,
                cluster_size: self.cluster_size(),
            }
            .into());
        }
        Ok(buf)
    }

    /// The feature-name table QEMU writes for v3 images with clusters larger than 4 KiB.
    pub fn default_feature_names() -> Vec<FeatureName> {
        [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ]
        .into_iter()
        .map(|(kind, bit, name)| FeatureName {
            kind,
            bit,
            name: name.into(),
        })
        .collect()
    }
}

/// QEMU's `qcow2_validate_table`: aligned and not overflowing.
pub fn check_table_offset(
    what: &'static str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
) -> Result<()> {
    if offset % cluster_size != 0 {
        return Err(Error::InvalidTableOffset {
            what,
            offset,
            why: "not cluster aligned",
        });
    }
    if offset == 0 {
        return Err(Error::InvalidTableOffset {
            what,
            offset,
            why: "points into the header",
        });
    }
    if offset
        .checked_add(bytes)
        .is_none_or(|end| end > MAX_HOST_OFFSET)
    {
        return Err(Error::InvalidTableOffset {
            what,
            offset,
            why: "beyond the largest qcow2 offset",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(version: u32) -> Header {
        let mut header = Header::new(version, 16, 4, 1 << 30);
        header.l1_size = 2;
        header.l1_table_offset = 3 << 16;
        header.refcount_table_offset = 1 << 16;
        header.refcount_table_clusters = 1;
        header.backing_file = Some("base.qcow2".into());
        header.backing_format = Some("qcow2".into());
        if version >= 3 {
            header.feature_names = Header::default_feature_names();
            header.compatible_features = COMPAT_LAZY_REFCOUNTS;
            header.unknown_extensions.push((0x1234_5678, vec![1, 2, 3]));
        }
        header
    }

    #[test]
    fn v3_round_trip() {
        let header = sample(3);
        let bytes = header.encode().unwrap();
        assert_eq!(Header::parse(&bytes).unwrap(), header);
        assert_eq!(BigEndian::read_u32(&bytes[100..]), 112);
    }

    #[test]
    fn v2_round_trip() {
        let header = sample(2);
        let bytes = header.encode().unwrap();
        assert_eq!(&bytes[72..76], &EXT_BACKING_FORMAT.to_be_bytes());
        assert_eq!(Header::parse(&bytes).unwrap(), header);
    }

    #[test]
    fn v3_header_of_104_bytes_parses_as_deflate() {
        let mut header = sample(3);
        header.header_length = 104;
        let bytes = header.encode().unwrap();
        assert_eq!(&bytes[104..108], &EXT_BACKING_FORMAT.to_be_bytes());
        let parsed = Header::parse(&bytes).unwrap();
        assert_eq!(parsed.header_length, 104);
        assert_eq!(parsed.compression_type, CompressionType::Deflate);
        assert_eq!(parsed.backing_format.as_deref(), Some("qcow2"));
    }

    #[test]
    fn zstd_needs_the_incompatible_bit() {
        let mut header = sample(3);
        header.compression_type = CompressionType::Zstd;
        let bytes = header.encode().unwrap();
        assert!(matches!(
            Header::parse(&bytes),
            Err(Error::InvalidHeader(HeaderProblem::CompressionBitMismatch))
        ));
        header.incompatible_features |= INCOMPAT_COMPRESSION;
        let bytes = header.encode().unwrap();
        assert_eq!(
            Header::parse(&bytes).unwrap().compression_type,
            CompressionType::Zstd
        );
    }

    #[test]
    fn unknown_header_fields_are_preserved() {
        let mut header = sample(3);
        header.header_length = 120;
        header.unknown_header_fields = vec![7; 8];
        let bytes = header.encode().unwrap();
        assert_eq!(
            Header::parse(&bytes).unwrap().unknown_header_fields,
            vec![7; 8]
        );
    }

    #[test]
    fn unknown_incompatible_bit_is_named() {
        let mut header = sample(3);
        header.incompatible_features = 1 << 9;
        let bytes = header.encode().unwrap();
        match Header::parse(&bytes) {
            Err(e @ Error::UnknownIncompatibleFeature { .. }) => assert_eq!(
                e.to_string(),
                "Unsupported qcow2 feature(s): Unknown incompatible feature: 200"
            ),
            other => panic!("unexpected {other:?}"),
        }
        header.incompatible_features = (1 << 9) | (1 << 40) | (1 << 63);
        header.feature_names.push(FeatureName {
            kind: 0,
            bit: 40,
            name: "future feature".into(),
        });
        let bytes = header.encode().unwrap();
        assert_eq!(
            Header::parse(&bytes).unwrap_err().to_string(),
            "Unsupported qcow2 feature(s): future feature, Unknown incompatible feature: \
             8000000000000200"
        );
    }

    #[test]
    fn limits_are_enforced() {
        let mut header = sample(3);
        header.l1_size = (MAX_L1_BYTES / 8 + 1) as u32;
        assert!(matches!(
            Header::parse(&header.encode().unwrap()),
            Err(Error::L1TableTooLarge(_))
        ));
        let mut header = sample(3);
        header.refcount_table_clusters = 129;
        assert!(matches!(
            Header::parse(&header.encode().unwrap()),
            Err(Error::RefcountTableTooLarge(129))
        ));
        let mut header = sample(3);
        header.l1_table_offset = 12345;
        assert!(matches!(
            Header::parse(&header.encode().unwrap()),
            Err(Error::InvalidTableOffset {
                what: "L1 table",
                ..
            })
        ));
        let mut bytes = sample(3).encode().unwrap();
        BigEndian::write_u32(&mut bytes[20..], 22);
        assert!(matches!(
            Header::parse(&bytes),
            Err(Error::InvalidClusterBits(22))
        ));
    }
}
