//! Persistent dirty bitmaps: the bitmap directory is read (for `info`), never written. Bitmaps are
//! valid only while autoclear bit 0 is set; a read-write open by this library clears it.

use byteorder::{BigEndian, ByteOrder};

use crate::header::Header;
use crate::raw::Storage;

/// Header extension naming the bitmap directory.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Autoclear bit 0: the bitmaps extension is consistent with the image.
pub const AUTOCLEAR_BITMAPS: u64 = 1;
/// QEMU's limits.
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;

const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;

/// One bitmap of the directory, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    pub in_use: bool,
    pub auto: bool,
    /// Host offset and entry count of the bitmap's table.
    pub table_offset: u64,
    pub table_size: u32,
}

/// Where the bitmap directory is (when the bitmaps extension is valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Directory {
    pub count: u32,
    pub size: u64,
    pub offset: u64,
}

/// The bitmap directory named by a valid bitmaps extension (autoclear bit 0 set), if any.
pub fn directory(header: &Header) -> Option<Directory> {
    if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return None;
    }
    let (_, ext) = header
        .unknown_extensions
        .iter()
        .find(|(kind, _)| *kind == EXT_BITMAPS)?;
    (ext.len() == 24).then(|| Directory {
        count: BigEndian::read_u32(&ext[0..]),
        size: BigEndian::read_u64(&ext[8..]),
        offset: BigEndian::read_u64(&ext[16..]),
    })
}

/// Why the bitmap directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error("bitmaps_ext: Invalid extension length")]
    ExtensionLength,
    #[error("bitmaps_ext: Image has {0} bitmaps, exceeding the QEMU supported maximum of 65535")]
    TooMany(u32),
    #[error(
        "bitmaps_ext: bitmap directory size ({0}) exceeds the maximum supported size (67108864)"
    )]
    DirectoryTooLarge(u64),
    #[error("bitmaps_ext: invalid bitmap directory offset")]
    DirectoryOffset,
    #[error("Failed to read bitmap directory: {0}")]
    ReadDirectory(#[source] std::io::Error),
    #[error("Bitmap directory is corrupted")]
    Corrupt,
}

/// The bitmaps listed in the image's directory; empty when there is no valid bitmaps extension.
pub fn read_bitmaps<S: Storage + ?Sized>(
    file: &mut S,
    header: &Header,
) -> Result<Vec<BitmapInfo>, BitmapError> {
    if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(Vec::new());
    }
    let Some((_, ext)) = header
        .unknown_extensions
        .iter()
        .find(|(kind, _)| *kind == EXT_BITMAPS)
    else {
        return Ok(Vec::new());
    };
    if ext.len() != 24 {
        return Err(BitmapError::ExtensionLength);
    }
    let count = BigEndian::read_u32(&ext[0..]);
    let size = BigEndian::read_u64(&ext[8..]);
    let offset = BigEndian::read_u64(&ext[16..]);
    if count > MAX_BITMAPS {
        return Err(BitmapError::TooMany(count));
    }
    if offset % header.cluster_size() != 0 {
        return Err(BitmapError::DirectoryOffset);
    }
    if size > MAX_DIRECTORY_BYTES {
        return Err(BitmapError::DirectoryTooLarge(size));
    }
    let mut directory = vec![0u8; size as usize];
    file.read_at(&mut directory, offset)
        .map_err(BitmapError::ReadDirectory)?;
    let mut bitmaps = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        if at + 24 > directory.len() {
            return Err(BitmapError::Corrupt);
        }
        let entry = &directory[at..];
        let flags = BigEndian::read_u32(&entry[12..]);
        let granularity_bits = u32::from(entry[17]);
        let name_len = usize::from(BigEndian::read_u16(&entry[18..]));
        let extra_len = BigEndian::read_u32(&entry[20..]) as usize;
        let name_start = 24 + extra_len;
        if at + name_start + name_len > directory.len() || !(9..=31).contains(&granularity_bits) {
            return Err(BitmapError::Corrupt);
        }
        bitmaps.push(BitmapInfo {
            name: String::from_utf8_lossy(&entry[name_start..name_start + name_len]).into_owned(),
            granularity: 1u64 << granularity_bits,
            in_use: flags & FLAG_IN_USE != 0,
            auto: flags & FLAG_AUTO != 0,
            table_offset: BigEndian::read_u64(&entry[0..]),
            table_size: BigEndian::read_u32(&entry[8..]),
        });
        at += (name_start + name_len).div_ceil(8) * 8;
    }
    Ok(bitmaps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::MemStorage;

    #[test]
    fn reads_a_directory() {
        let mut header = Header::new(3, 16, 4, 1 << 20);
        header.autoclear_features = AUTOCLEAR_BITMAPS;
        let mut entry = vec![0u8; 24];
        BigEndian::write_u32(&mut entry[12..], FLAG_AUTO);
        entry[16] = 1;
        entry[17] = 17;
        BigEndian::write_u16(&mut entry[18..], 2);
        entry.extend_from_slice(b"b1");
        entry.resize(32, 0);
        let mut ext = vec![0u8; 24];
        BigEndian::write_u32(&mut ext[0..], 1);
        BigEndian::write_u64(&mut ext[8..], entry.len() as u64);
        BigEndian::write_u64(&mut ext[16..], 0x10000);
        header.unknown_extensions.push((EXT_BITMAPS, ext));
        let mut file = MemStorage::default();
        file.write_at(&entry, 0x10000).unwrap();
        let bitmaps = read_bitmaps(&mut file, &header).unwrap();
        assert_eq!(
            bitmaps,
            vec![BitmapInfo {
                name: "b1".into(),
                granularity: 131072,
                in_use: false,
                auto: true,
                table_offset: 0,
                table_size: 0,
            }]
        );
        header.autoclear_features = 0;
        assert!(read_bitmaps(&mut file, &header).unwrap().is_empty());
    }
}
