//! The boot-info page: what the VMM tells the guest before its first instruction.
//!
//! Layout (little endian, offsets in bytes from [`crate::layout::BOOT_INFO_ADDR`]):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `COWVMBI1` |
//! | 8 | 4 | ABI version |
//! | 12 | 4 | vCPU count |
//! | 16 | 8 | RAM size in bytes |
//! | 24 | 8 | clone generation id (0 for a fresh boot) |
//! | 32 | 4 | argument string length |
//! | 40 | 256 | argument string (UTF-8) |
//! | 0x130 | 4 | number of devices listed below (at most [`MAX_DEVICES`]) |
//! | 0x138 | 16 × 8 | devices: guest-physical base (u64), window size (u32), virtio device id (u32) |
//! | 0x800 | 8 | sync: number of vCPUs that finished (guest-owned) |
//! | 0x808 | 8 × 128 | sync: per-vCPU digests (guest-owned) |

/// `COWVMBI1` as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"COWVMBI1");
/// Bumped whenever this layout or the workload algorithm changes.
pub const ABI_VERSION: u32 = 4;
/// Longest argument string the page holds.
pub const MAX_ARGS_LEN: usize = 256;
/// Offset of the device count; the device table follows at [`DEVICES_OFFSET`].
pub const DEVICE_COUNT_OFFSET: usize = 0x130;
/// Offset of the device table.
pub const DEVICES_OFFSET: usize = 0x138;
/// Bytes of one device table entry.
pub const DEVICE_ENTRY_LEN: usize = 16;
/// Bytes of the page the VMM writes.
pub const ENCODED_LEN: usize = DEVICES_OFFSET + MAX_DEVICES * DEVICE_ENTRY_LEN;
/// Offset of the generation id, which the VMM rewrites when it starts a clone or a forked child
/// (the guest reads it again when it reaches its generation rounds, or while it waits).
pub const GENERATION_OFFSET: u64 = 24;
/// Offset of the guest's completion counter.
pub const SYNC_DONE_OFFSET: u64 = 0x800;
/// Offset of the guest's per-vCPU digest array.
pub const SYNC_DIGESTS_OFFSET: u64 = 0x808;

pub use crate::layout::MAX_DEVICES;

/// A device's MMIO window, as the guest learns it from the boot-info page (no discovery by
/// probing: the guest reads registers only of devices listed here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceWindow {
    pub base: u64,
    pub size: u32,
    /// The virtio device id (2: block).
    pub device_id: u32,
}

/// What the VMM tells the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo<'a> {
    pub vcpu_count: u32,
    pub ram_size: u64,
    pub clone_generation: u64,
    pub args: &'a str,
    /// The first `device_count` entries are valid.
    pub devices: [DeviceWindow; MAX_DEVICES],
    pub device_count: u32,
}

/// Why a boot-info page could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    BadMagic(u64),
    UnsupportedVersion(u32),
    ArgsTooLong(usize),
    ArgsNotUtf8,
    TooManyDevices(u32),
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "boot info has magic {m:#x}, expected {MAGIC:#x}"),
            Self::UnsupportedVersion(v) => {
                write!(
                    f,
                    "boot info ABI version {v}, this guest speaks {ABI_VERSION}"
                )
            }
            Self::ArgsTooLong(n) => {
                write!(f, "argument string of {n} bytes exceeds {MAX_ARGS_LEN}")
            }
            Self::ArgsNotUtf8 => write!(f, "argument string is not UTF-8"),
            Self::TooManyDevices(n) => {
                write!(
                    f,
                    "{n} devices listed, the page holds at most {MAX_DEVICES}"
                )
            }
        }
    }
}

fn get_u32(buf: &[u8; ENCODED_LEN], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn get_u64(buf: &[u8; ENCODED_LEN], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

impl<'a> BootInfo<'a> {
    /// Encodes into the first [`ENCODED_LEN`] bytes of the page. The caller has checked
    /// `args.len() <= MAX_ARGS_LEN`; longer strings are an error.
    pub fn encode(&self, buf: &mut [u8; ENCODED_LEN]) -> Result<(), DecodeError> {
        if self.args.len() > MAX_ARGS_LEN {
            return Err(DecodeError::ArgsTooLong(self.args.len()));
        }
        buf.fill(0);
        buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        buf[8..12].copy_from_slice(&ABI_VERSION.to_le_bytes());
        buf[12..16].copy_from_slice(&self.vcpu_count.to_le_bytes());
        buf[16..24].copy_from_slice(&self.ram_size.to_le_bytes());
        buf[24..32].copy_from_slice(&self.clone_generation.to_le_bytes());
        buf[32..36].copy_from_slice(&(self.args.len() as u32).to_le_bytes());
        buf[40..40 + self.args.len()].copy_from_slice(self.args.as_bytes());
        if self.device_count as usize > MAX_DEVICES {
            return Err(DecodeError::TooManyDevices(self.device_count));
        }
        buf[DEVICE_COUNT_OFFSET..DEVICE_COUNT_OFFSET + 4]
            .copy_from_slice(&self.device_count.to_le_bytes());
        for (i, device) in self.devices[..self.device_count as usize]
            .iter()
            .enumerate()
        {
            let at = DEVICES_OFFSET + i * DEVICE_ENTRY_LEN;
            buf[at..at + 8].copy_from_slice(&device.base.to_le_bytes());
            buf[at + 8..at + 12].copy_from_slice(&device.size.to_le_bytes());
            buf[at + 12..at + 16].copy_from_slice(&device.device_id.to_le_bytes());
        }
        Ok(())
    }

    /// Decodes a page written by [`BootInfo::encode`], checking magic, version and bounds.
    pub fn decode(buf: &'a [u8; ENCODED_LEN]) -> Result<Self, DecodeError> {
        let magic = get_u64(buf, 0);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let version = get_u32(buf, 8);
        if version != ABI_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let args_len = get_u32(buf, 32) as usize;
        if args_len > MAX_ARGS_LEN {
            return Err(DecodeError::ArgsTooLong(args_len));
        }
        let args =
            core::str::from_utf8(&buf[40..40 + args_len]).map_err(|_| DecodeError::ArgsNotUtf8)?;
        let device_count = get_u32(buf, DEVICE_COUNT_OFFSET);
        if device_count as usize > MAX_DEVICES {
            return Err(DecodeError::TooManyDevices(device_count));
        }
        let mut devices = [DeviceWindow::default(); MAX_DEVICES];
        for (i, device) in devices[..device_count as usize].iter_mut().enumerate() {
            let at = DEVICES_OFFSET + i * DEVICE_ENTRY_LEN;
            *device = DeviceWindow {
                base: get_u64(buf, at),
                size: get_u32(buf, at + 8),
                device_id: get_u32(buf, at + 12),
            };
        }
        Ok(Self {
            vcpu_count: get_u32(buf, 12),
            ram_size: get_u64(buf, 16),
            clone_generation: get_u64(buf, 24),
            args,
            devices,
            device_count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let mut devices = [DeviceWindow::default(); MAX_DEVICES];
        devices[1] = DeviceWindow {
            base: 0xd000_1000,
            size: 0x1000,
            device_id: 2,
        };
        let info = BootInfo {
            vcpu_count: 4,
            ram_size: 256 << 20,
            clone_generation: 7,
            args: "pages=10 rounds=2",
            devices,
            device_count: 2,
        };
        let mut buf = [0xaa; ENCODED_LEN];
        info.encode(&mut buf).unwrap();
        assert_eq!(&buf[0..8], b"COWVMBI1");
        assert_eq!(buf[12], 4);
        assert_eq!(&buf[40..57], b"pages=10 rounds=2");
        assert_eq!(buf[57], 0);
        assert_eq!(buf[DEVICE_COUNT_OFFSET], 2);
        assert_eq!(
            &buf[DEVICES_OFFSET + 16..DEVICES_OFFSET + 24],
            &0xd000_1000u64.to_le_bytes()
        );
        assert_eq!(BootInfo::decode(&buf).unwrap(), info);
        const { assert!(ENCODED_LEN <= SYNC_DONE_OFFSET as usize) };
    }

    #[test]
    fn decode_rejects_bad_pages() {
        let mut buf = [0u8; ENCODED_LEN];
        assert_eq!(BootInfo::decode(&buf), Err(DecodeError::BadMagic(0)));
        let info = BootInfo {
            vcpu_count: 1,
            ram_size: 1,
            clone_generation: 0,
            args: "",
            devices: [DeviceWindow::default(); MAX_DEVICES],
            device_count: 0,
        };
        info.encode(&mut buf).unwrap();
        buf[8] = 9;
        assert_eq!(
            BootInfo::decode(&buf),
            Err(DecodeError::UnsupportedVersion(9))
        );
        info.encode(&mut buf).unwrap();
        buf[32..36].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(BootInfo::decode(&buf), Err(DecodeError::ArgsTooLong(1000)));
        let long = [b'x'; MAX_ARGS_LEN + 1];
        let long = core::str::from_utf8(&long).unwrap();
        let info = BootInfo { args: long, ..info };
        assert_eq!(
            info.encode(&mut buf),
            Err(DecodeError::ArgsTooLong(MAX_ARGS_LEN + 1))
        );
        let info = BootInfo { args: "", ..info };
        info.encode(&mut buf).unwrap();
        buf[DEVICE_COUNT_OFFSET] = 9;
        assert_eq!(BootInfo::decode(&buf), Err(DecodeError::TooManyDevices(9)));
    }
}
