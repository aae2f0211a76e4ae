//! Creating images: qcow2 (v2/v3, any cluster size and refcount width, optional backing file and
//! metadata preallocation) and raw.

use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder};

use crate::error::{Error, Result};
use crate::header::{
    Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_EXTL2, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS,
};
use crate::image::{open_backing, resolve_backing_path, Image, OpenOptions};
use crate::raw::{FileStorage, Storage};
use crate::refcount::set_entry;

/// Preallocation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocation {
    Off,
    Metadata,
}

/// Parameters of a new qcow2 image (qemu-img's `-o` options).
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    pub lazy_refcounts: bool,
    pub preallocation: Preallocation,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Extended L2 entries (32 subclusters per cluster; v3, clusters of 16 KiB or more).
    pub extended_l2: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            extended_l2: false,
        }
    }
}

impl CreateOptions {
    /// Applies one `key=value` option of qemu-img's qcow2 `-o` list.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |what: &str| Error::InvalidOption(format!("{key}={value}: {what}"));
        match key {
            "cluster_size" => self.cluster_size = crate::parse_size(value).map_err(|e| bad(&e.to_string()))?,
            "refcount_bits" => {
                self.refcount_bits = value.parse().map_err(|_| bad("not a number"))?
            }
            "lazy_refcounts" => {
                self.lazy_refcounts =
                    parse_on_off(value).ok_or_else(|| bad("expected on or off"))?
            }
            "compat" => {
                self.version = match value {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(bad("expected 0.10 or 1.1")),
                }
            }
            "preallocation" => {
                self.preallocation = match value {
                    "off" => Preallocation::Off,
                    "metadata" => Preallocation::Metadata,
                    _ => return Err(bad("supported modes are off and metadata")),
                }
            }
            "backing_file" => self.backing_file = Some(value.to_string()),
            "backing_fmt" => self.backing_format = Some(value.to_string()),
            "size" => self.size = crate::parse_size(value).map_err(|e| bad(&e.to_string()))?,
            "compression_type" if value == "zlib" => {}
            "extended_l2" => {
                self.extended_l2 = parse_on_off(value).ok_or_else(|| bad("expected on or off"))?
            }
            _ => {
                return Err(Error::InvalidOption(format!(
                    "unsupported option '{key}={value}'"
                )))
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<u32> {
        if !self.cluster_size.is_power_of_two() {
            return Err(Error::InvalidOption(format!(
                "cluster size {} must be a power of two between 512 and 2M",
                self.cluster_size
            )));
        }
        let cluster_bits = self.cluster_size.trailing_zeros();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::InvalidOption(format!(
                "cluster size {} must be a power of two between 512 and 2M",
                self.cluster_size
            )));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::InvalidOption(
                "refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        if self.version < 3 && self.refcount_bits != 16 {
            return Err(Error::InvalidOption(
                "different refcount widths than 16 bits require compatibility level 1.1 or above"
                    .into(),
            ));
        }
        if self.extended_l2 && self.version < 3 {
            return Err(Error::InvalidOption(
                "Extended L2 entries are only supported with compatibility level 1.1 and above"
                    .into(),
            ));
        }
        if self.extended_l2 && self.cluster_size < 16384 {
            return Err(Error::InvalidOption(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                    .into(),
            ));
        }
        // With extended L2 entries a preallocated cluster's subclusters stay unallocated and
        // read from the backing file, so the two can go together (as in QEMU).
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(Error::InvalidOption(
                "backing file and preallocation cannot be used at the same time (preallocated \
                 clusters would hide the backing file's data)"
                    .into(),
            ));
        }
        if self.version < 3 && self.lazy_refcounts {
            return Err(Error::InvalidOption(
                "lazy refcounts only supported with compatibility level 1.1 and above".into(),
            ));
        }
        if Header::l1_entries_with(self.size, cluster_bits, self.l2_bits(cluster_bits)) * 8
            > MAX_L1_BYTES
        {
            return Err(Error::InvalidOption(format!(
                "image size {} is too big for cluster size {}",
                self.size, self.cluster_size
            )));
        }
        Ok(cluster_bits)
    }
}

impl CreateOptions {
    /// log2 of the entries per L2 table.
    fn l2_bits(&self, cluster_bits: u32) -> u32 {
        if self.extended_l2 {
            cluster_bits - 4
        } else {
            cluster_bits - 3
        }
    }
}

fn parse_on_off(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" => Some(true),
        "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

/// The size of the backing file named by `options`, opened relative to `image_path`.
pub fn backing_size(image_path: &Path, options: &CreateOptions) -> Result<u64> {
    let name = options.backing_file.as_deref().ok_or_else(|| {
        Error::InvalidOption("image size is required without a backing file".into())
    })?;
    let path = resolve_backing_path(Some(image_path), name);
    Ok(open_backing(&path, options.backing_format.as_deref(), 0)?.size())
}

/// Creates a qcow2 image file at `path` (truncating an existing file).
pub fn create(path: &Path, options: &CreateOptions) -> Result<()> {
    create_with(path, options, true)
}

/// Like [`create`]; with `check_backing` false the backing file is recorded without being opened
/// (qemu-img's `create -u`).
pub fn create_with(path: &Path, options: &CreateOptions, check_backing: bool) -> Result<()> {
    // Refuse bad options before touching the file.
    options.validate()?;
    if let (Some(name), true) = (&options.backing_file, check_backing) {
        // The backing file must open (QEMU checks it too); its size is the default virtual size.
        let backing_path = resolve_backing_path(Some(path), name);
        open_backing(&backing_path, options.backing_format.as_deref(), 0)?;
    }
    let file = FsOpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| Error::CreateFile {
            path: path.to_path_buf(),
            source,
        })?;
    let mut storage = FileStorage::new(file);
    create_on(&mut storage, options)?;
    drop(storage);
    if options.preallocation == Preallocation::Metadata {
        let mut image = Image::open(path, &OpenOptions::default())?;
        image.preallocate_metadata()?;
    }
    Ok(())
}

/// Writes an empty qcow2 image onto `storage`: header, refcount table, refcount block(s), L1 table
/// — QEMU's layout for the common case.
pub fn create_on<S: Storage + ?Sized>(storage: &mut S, options: &CreateOptions) -> Result<()> {
    let cluster_bits = options.validate()?;
    let cluster_size = options.cluster_size;
    let refcount_order = options.refcount_bits.trailing_zeros();
    // Like qemu-img, the virtual size is a whole number of 512-byte sectors.
    let size = options.size.div_ceil(512) * 512;
    let mut header = Header::new(options.version, cluster_bits, refcount_order, size);
    if options.version >= 3 && cluster_size > 4096 {
        header.feature_names = Header::default_feature_names();
    }
    if options.lazy_refcounts {
        header.compatible_features |= COMPAT_LAZY_REFCOUNTS;
    }
    if options.extended_l2 {
        header.incompatible_features |= INCOMPAT_EXTL2;
    }
    header.backing_file = options.backing_file.clone();
    header.backing_format = options.backing_format.clone();
    let l1_entries = Header::l1_entries_with(size, cluster_bits, options.l2_bits(cluster_bits));
    let l1_clusters = (l1_entries * 8).div_ceil(cluster_size);
    let entries_per_block = (cluster_size * 8) >> refcount_order;
    // Fixed point: header + table + blocks + L1 must all be covered by the blocks.
    let mut table_clusters = 1u64;
    let mut blocks = 1u64;
    loop {
        let total = 1 + table_clusters + blocks + l1_clusters;
        let need_blocks = total.div_ceil(entries_per_block);
        let need_table = (need_blocks * 8).div_ceil(cluster_size);
        if need_blocks <= blocks && need_table <= table_clusters {
            break;
        }
        blocks = blocks.max(need_blocks);
        table_clusters = table_clusters.max(need_table);
    }
    let total = 1 + table_clusters + blocks + l1_clusters;
    header.refcount_table_offset = cluster_size;
    header.refcount_table_clusters = table_clusters as u32;
    header.l1_table_offset = (1 + table_clusters + blocks) * cluster_size;
    header.l1_size = l1_entries as u32;
    let mut cluster0 = header.encode()?;
    cluster0.resize(cluster_size as usize, 0);
    let write = |storage: &mut S, data: &[u8], at: u64| {
        storage.write_at(data, at).map_err(Error::WriteHeader)
    };
    let mut table = vec![0u8; (table_clusters * cluster_size) as usize];
    for b in 0..blocks {
        let offset = (1 + table_clusters + b) * cluster_size;
        BigEndian::write_u64(&mut table[(b * 8) as usize..], offset);
        let mut block = vec![0u8; cluster_size as usize];
        for i in 0..entries_per_block {
            if b * entries_per_block + i < total {
                set_entry(&mut block, i as usize, refcount_order, 1);
            }
        }
        write(storage, &block, offset)?;
    }
    write(storage, &table, cluster_size)?;
    let l1 = vec![0u8; (l1_clusters * cluster_size) as usize];
    write(storage, &l1, header.l1_table_offset)?;
    // Ordering: tables first, the header that points at them last.
    storage.flush().map_err(Error::Flush)?;
    write(storage, &cluster0, 0)?;
    storage.flush().map_err(Error::Flush)
}

/// Creates a raw image of `size` bytes.
pub fn create_raw(path: &Path, size: u64) -> Result<()> {
    let file = FsOpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| Error::CreateFile {
            path: path.to_path_buf(),
            source,
        })?;
    // Whole 512-byte sectors, like qemu-img.
    file.set_len(size.div_ceil(512) * 512)
        .map_err(|source| Error::CreateFile {
            path: PathBuf::from(path),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::MemStorage;

    #[test]
    fn default_layout_matches_qemu_img() {
        let mut storage = MemStorage::default();
        let options = CreateOptions {
            size: 4 << 20,
            ..CreateOptions::default()
        };
        create_on(&mut storage, &options).unwrap();
        let header = Header::parse(&storage.data).unwrap();
        assert_eq!(header.refcount_table_offset, 0x10000);
        assert_eq!(header.l1_table_offset, 0x30000);
        assert_eq!(header.l1_size, 1);
        assert_eq!(header.header_length, 112);
        assert_eq!(storage.data.len(), 4 * 0x10000);
        // Refcount block at cluster 2 counts clusters 0..=3.
        let block = &storage.data[0x20000..0x20010];
        assert_eq!(block, &[0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn small_clusters_and_wide_refcounts_need_several_blocks() {
        let mut storage = MemStorage::default();
        let options = CreateOptions {
            size: 64 << 20,
            cluster_size: 512,
            refcount_bits: 64,
            ..CreateOptions::default()
        };
        create_on(&mut storage, &options).unwrap();
        let header = Header::parse(&storage.data).unwrap();
        // 64 MiB / 32 KiB per L2 = 2048 L1 entries = 32 clusters; 64 refcounts per block.
        assert_eq!(header.l1_size, 2048);
        let mut image = Image::open_storage(storage, None, &OpenOptions::default()).unwrap();
        let report = crate::check(&mut image, crate::Repair::None).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    #[test]
    fn rejects_bad_options() {
        let mut options = CreateOptions {
            size: 1 << 20,
            ..CreateOptions::default()
        };
        assert!(options.set("cluster_size", "3000").is_ok());
        assert!(options.validate().is_err());
        let mut options = CreateOptions {
            size: 1 << 20,
            ..CreateOptions::default()
        };
        options.set("compat", "0.10").unwrap();
        options.set("refcount_bits", "8").unwrap();
        assert!(options.validate().is_err());
        assert!(options.set("preallocation", "full").is_err());
        assert!(options.set("nonsense", "1").is_err());
    }
}
