//! `amend`: changes the options of an existing qcow2 image — `qemu-img amend -o`: `compat`
//! (upgrading to 1.1, or downgrading to 0.10 with its zero clusters written out), `refcount_bits`
//! (a new refcount structure of the new width), `lazy_refcounts`, `size`, `backing_file`,
//! `backing_fmt`, and the external data file's name (`data_file`) and raw bit (`data_file_raw`,
//! which can only be cleared).

use crate::check::rebuild_refcounts;
use crate::error::{Error, Result};
use crate::header::{
    CompressionType, Header, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_EXTL2,
    V3_HEADER_LEN,
};
use crate::image::Image;
use crate::l2::{Mapping, COPIED, OFFSET_MASK};
use crate::raw::Storage;

/// Why `amend` refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AmendError {
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    #[error("Invalid parameter '{0}'\nThis option is only supported for image creation")]
    CreationOnly(String),
    #[error("Unknown compatibility level {0}")]
    UnknownCompat(String),
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    ExpectsOnOff(String),
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountWidth,
    #[error("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")]
    RefcountNeedsV3,
    #[error("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")]
    LazyNeedsV3,
    #[error("Cannot downgrade an image with extended L2 entries")]
    DowngradeExtendedL2,
    #[error("Cannot downgrade an image whose compression type is not zlib")]
    DowngradeCompression,
    #[error("Cannot decrease refcount entry width to {bits} bits: Cluster at offset {offset:#x} has a refcount of {refcount}")]
    RefcountTooNarrow {
        bits: u32,
        offset: u64,
        refcount: u64,
    },
    #[error("Invalid size '{0}'")]
    InvalidSize(String),
    #[error("data-file can only be set for images that use an external data file")]
    DataFileNotExternal,
    #[error("data-file-raw cannot be set on existing images")]
    DataFileRawOnExisting,
    #[error("Cannot downgrade an image with a data file")]
    DowngradeDataFile,
}

/// The requested changes (`None`: unchanged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    pub version: Option<u32>,
    pub refcount_bits: Option<u32>,
    pub lazy_refcounts: Option<bool>,
    pub size: Option<u64>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// A new name for the external data file (`""` removes the name).
    pub data_file: Option<String>,
    /// `false` clears the raw data file bit (setting it is refused, as in QEMU).
    pub data_file_raw: Option<bool>,
}

impl AmendOptions {
    /// Applies one `key=value` of the `-o` list.
    pub fn set(&mut self, key: &str, value: &str) -> std::result::Result<(), AmendError> {
        match key {
            "compat" => {
                self.version = Some(match value {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    other => return Err(AmendError::UnknownCompat(other.to_string())),
                })
            }
            "refcount_bits" => {
                let bits: u32 = value.parse().map_err(|_| AmendError::RefcountWidth)?;
                if !bits.is_power_of_two() || bits > 64 {
                    return Err(AmendError::RefcountWidth);
                }
                self.refcount_bits = Some(bits);
            }
            "lazy_refcounts" => {
                self.lazy_refcounts = Some(match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(AmendError::ExpectsOnOff(key.to_string())),
                })
            }
            "size" => {
                self.size = Some(
                    crate::parse_size(value)
                        .map_err(|_| AmendError::InvalidSize(value.to_string()))?,
                )
            }
            "backing_file" => self.backing_file = Some(value.to_string()),
            "backing_fmt" => self.backing_format = Some(value.to_string()),
            "data_file" => self.data_file = Some(value.to_string()),
            "data_file_raw" => {
                self.data_file_raw = Some(match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(AmendError::ExpectsOnOff(key.to_string())),
                })
            }
            "cluster_size" | "preallocation" | "compression_type" | "extended_l2"
            | "encryption" | "nocow" | "extent_size_hint" => {
                return Err(AmendError::CreationOnly(key.to_string()))
            }
            other => return Err(AmendError::InvalidParameter(other.to_string())),
        }
        Ok(())
    }
}

/// Applies `options` to `image`, in QEMU's order: upgrade, refcount width, backing file, lazy
/// refcounts, size, downgrade.
pub fn amend<S: Storage>(image: &mut Image<S>, options: &AmendOptions) -> Result<()> {
    let old_version = image.header.version;
    let version = options.version.unwrap_or(old_version);
    let refcount_bits = options
        .refcount_bits
        .unwrap_or(image.header.refcount_bits());
    if version < 3 && refcount_bits != 16 {
        return Err(Error::Amend(AmendError::RefcountNeedsV3));
    }
    let lazy = options.lazy_refcounts.unwrap_or(image.lazy_refcounts());
    if version < 3 && lazy {
        return Err(Error::Amend(AmendError::LazyNeedsV3));
    }
    if options.data_file.is_some() && !image.header.has_data_file() {
        return Err(Error::Amend(AmendError::DataFileNotExternal));
    }
    if options.data_file_raw == Some(true) && !image.header.data_file_raw() {
        return Err(Error::Amend(AmendError::DataFileRawOnExisting));
    }
    if version < old_version {
        if image.header.has_data_file() {
            return Err(Error::Amend(AmendError::DowngradeDataFile));
        }
        if image.header.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(Error::Amend(AmendError::DowngradeExtendedL2));
        }
        if image.header.compression_type != CompressionType::Deflate {
            return Err(Error::Amend(AmendError::DowngradeCompression));
        }
    }
    image.flush()?;
    if version > old_version {
        image.header.version = version;
        image.header.header_length = V3_HEADER_LEN;
        image.header.refcount_order = 4;
        if image.cluster_size > 4096 {
            image.header.feature_names = Header::default_feature_names();
        }
        image.rewrite_header()?;
    }
    if refcount_bits != image.header.refcount_bits() {
        let refs = image.count_references()?;
        let max = crate::refcount::max_refcount(refcount_bits.trailing_zeros());
        if let Some(cluster) = refs.iter().position(|&r| r > max) {
            return Err(Error::Amend(AmendError::RefcountTooNarrow {
                bits: refcount_bits,
                offset: cluster as u64 * image.cluster_size,
                refcount: refs[cluster],
            }));
        }
        let old_order = image.header.refcount_order;
        image.header.refcount_order = refcount_bits.trailing_zeros();
        if let Err(e) = rebuild_refcounts(image, refs) {
            image.header.refcount_order = old_order;
            return Err(e);
        }
    }
    if options.backing_file.is_some() || options.backing_format.is_some() {
        let name = options
            .backing_file
            .clone()
            .or_else(|| image.header.backing_file.clone());
        let format = options
            .backing_format
            .clone()
            .or_else(|| image.header.backing_format.clone());
        image.set_backing_file(name.as_deref(), format.as_deref())?;
    }
    if let Some(name) = &options.data_file {
        // The image keeps using the data file it was opened with; the name is for later opens.
        image.header.data_file = (!name.is_empty()).then(|| name.clone());
        image.rewrite_header()?;
    }
    if options.data_file_raw == Some(false) && image.header.data_file_raw() {
        image.header.autoclear_features &= !AUTOCLEAR_DATA_FILE_RAW;
        image.rewrite_header()?;
    }
    if lazy != image.lazy_refcounts() {
        if lazy {
            image.header.compatible_features |= COMPAT_LAZY_REFCOUNTS;
        } else {
            image.header.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
        }
        image.rewrite_header()?;
    }
    if let Some(size) = options.size {
        image.resize(size, true)?;
    }
    if version < old_version {
        expand_zero_clusters(image)?;
        let header = &mut image.header;
        header.version = version;
        header.header_length = 72;
        header.incompatible_features = 0;
        header.compatible_features = 0;
        header.autoclear_features = 0;
        header.unknown_header_fields.clear();
        header.feature_names.clear();
        image.rewrite_header()?;
    }
    image.flush()
}

/// v2 has no zero flag: every zero cluster of every L1 table (active and snapshots) becomes
/// unallocated (no backing file) or a cluster of zeros. Shared L2 tables are rewritten in place;
/// a new cluster gets as many references as its L2 table has.
fn expand_zero_clusters<S: Storage>(image: &mut Image<S>) -> Result<()> {
    let mut tables = vec![image.l1.clone()];
    for snapshot in image.snapshots.clone() {
        tables.push(image.read_l1_table(snapshot.l1_table_offset, snapshot.l1_size)?);
    }
    let has_backing = image.header.backing_file.is_some();
    let cluster_size = image.cluster_size;
    let zeros = vec![0u8; cluster_size as usize];
    let mut seen = std::collections::HashSet::new();
    for l1 in tables {
        for entry in l1 {
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 || !seen.insert(l2_offset) {
                continue;
            }
            let table_refs = image
                .refcounts
                .get(&mut image.file, l2_offset >> image.cluster_bits)?;
            let table = image.l2_table(l2_offset)?;
            for (index, word) in image.l2_words(&table).into_iter().enumerate() {
                let new = match image.decode(word)? {
                    Mapping::ZeroPlain if !has_backing => 0,
                    Mapping::ZeroPlain => {
                        let host = image.alloc_cluster()?;
                        if table_refs > 1 {
                            image.refcounts.update_range(
                                &mut image.file,
                                host,
                                cluster_size,
                                table_refs as i64 - 1,
                            )?;
                        }
                        image.write_host(&zeros, host)?;
                        if table_refs == 1 {
                            host | COPIED
                        } else {
                            host
                        }
                    }
                    Mapping::ZeroAlloc { host } => {
                        image.write_host(&zeros, host)?;
                        word & (OFFSET_MASK | COPIED)
                    }
                    _ => continue,
                };
                // Ordering: the zeros (and the new clusters' refcounts) reach the disk in the
                // flush before this L2 table does.
                image.set_l2_entry(l2_offset, index, new)?;
            }
        }
    }
    image.flush()
}
