//! Device-level tests: a driver written here drives the transport and the queue in guest RAM,
//! against real qcow2 and raw images; a fuzzer throws malformed descriptor tables and register
//! writes at it. Guest RAM is two regions with a hole between them and `PROT_NONE` guard pages
//! around each, so an access outside the guest-memory object would crash the test.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress, GuestRegionMmap};

use super::block::QUEUE_SIZE;
use super::*;
use crate::devices::BusDevice;
use crate::disk::{BlockBackend, Qcow2Backend, RawBackend};
use crate::memory::GuestMemory;

const REGION: usize = 1 << 20;
const GUARD: usize = 64 << 10;
/// Guest RAM: [0, 1 MiB) and [2 MiB, 3 MiB).
const SECOND: u64 = 2 << 20;

/// Guest RAM whose regions sit between inaccessible guard pages (leaked: tests are short).
fn guarded_memory() -> GuestMemory {
    let regions = [GuestAddress(0), GuestAddress(SECOND)]
        .into_iter()
        .map(|base| {
            let total = REGION + 2 * GUARD;
            // SAFETY: a fresh anonymous mapping owned by nobody else; the guest part is made
            // accessible below and handed to vm-memory, the guards stay PROT_NONE.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    total,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            // SAFETY: inside the mapping just created.
            let guest = unsafe { ptr.cast::<u8>().add(GUARD) };
            // SAFETY: `guest..guest + REGION` lies inside the mapping.
            let ret =
                unsafe { libc::mprotect(guest.cast(), REGION, libc::PROT_READ | libc::PROT_WRITE) };
            assert_eq!(ret, 0);
            // SAFETY: `guest` points at REGION readable and writable bytes that stay mapped for
            // the rest of the process (never unmapped).
            let mapping = unsafe {
                MmapRegionBuilder::new_with_bitmap(REGION, AtomicBitmap::with_len(REGION))
                    .with_raw_mmap_pointer(guest)
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
                    .build()
                    .unwrap()
            };
            GuestRegionMmap::new(mapping, base).unwrap()
        })
        .collect();
    GuestMemory::from_regions(regions).unwrap()
}

// Where the test driver keeps its queue and buffers.
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFFERS: u64 = 0x10_0000 - 0x8_0000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A driver for one device, written from the virtio spec.
struct Driver {
    device: MmioTransport<VirtioBlock>,
    memory: GuestMemory,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn new(backend: Box<dyn BlockBackend>, read_only: bool) -> Self {
        let memory = guarded_memory();
        let device = MmioTransport::new(VirtioBlock::new(0, backend, read_only), memory.clone());
        Self {
            device,
            memory,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        self.device.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn write_reg(&mut self, offset: u32, value: u32) {
        let _ = self.device.write(u64::from(offset), &value.to_le_bytes());
    }

    fn features(&mut self) -> u64 {
        self.write_reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = self.read_reg(VIRTIO_MMIO_DEVICE_FEATURES);
        self.write_reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = self.read_reg(VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(low) | u64::from(high) << 32
    }

    /// The initialization sequence of §3.1.1 with the queue at DESC/AVAIL/USED.
    fn set_up(&mut self, size: u16) -> u32 {
        assert_eq!(self.read_reg(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.read_reg(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(self.read_reg(VIRTIO_MMIO_DEVICE_ID), 2);
        self.write_reg(VIRTIO_MMIO_STATUS, 0);
        self.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write_reg(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        let features = self.features();
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        let status =
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write_reg(VIRTIO_MMIO_STATUS, status);
        assert_eq!(self.read_reg(VIRTIO_MMIO_STATUS), status);
        self.write_reg(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(
            self.read_reg(VIRTIO_MMIO_QUEUE_NUM_MAX),
            u32::from(QUEUE_SIZE)
        );
        self.write_reg(VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        for (low, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, DESC),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL),
            (VIRTIO_MMIO_QUEUE_USED_LOW, USED),
        ] {
            self.write_reg(low, addr as u32);
            self.write_reg(low + 4, (addr >> 32) as u32);
        }
        self.write_reg(VIRTIO_MMIO_QUEUE_READY, 1);
        self.write_reg(VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
        self.read_reg(VIRTIO_MMIO_STATUS)
    }

    fn config_u64(&mut self, offset: u64) -> u64 {
        let mut data = [0u8; 8];
        self.device.read(0x100 + offset, &mut data);
        u64::from_le_bytes(data)
    }

    fn put_descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + u64::from(index) * 16);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.memory.write_slice(&raw, at).unwrap();
    }

    /// Makes `head` available and notifies; returns the used entries that appeared.
    fn submit(&mut self, heads: &[u16], size: u16) -> Vec<(u32, u32)> {
        for &head in heads {
            let slot = u64::from(self.avail_idx % size);
            self.memory
                .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.memory
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.write_reg(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let used: u16 = self.memory.read_obj(GuestAddress(USED + 2)).unwrap();
        let mut entries = Vec::new();
        while self.used_seen != used {
            let slot = u64::from(self.used_seen % size);
            let at = USED + 4 + 8 * slot;
            let id: u32 = self.memory.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.memory.read_obj(GuestAddress(at + 4)).unwrap();
            entries.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        entries
    }

    /// One request: header, optional data, status, in descriptors `first..`; returns
    /// (status byte, used length).
    fn request(&mut self, kind: u32, sector: u64, data: Option<(u64, u32, bool)>) -> (u8, u32) {
        let header = BUFFERS;
        let status = BUFFERS + 0x100;
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.memory.write_slice(&raw, GuestAddress(header)).unwrap();
        self.memory.write_obj(0xffu8, GuestAddress(status)).unwrap();
        self.put_descriptor(0, header, 16, F_NEXT, 1);
        match data {
            Some((addr, len, device_writes)) => {
                let flags = F_NEXT | if device_writes { F_WRITE } else { 0 };
                self.put_descriptor(1, addr, len, flags, 2);
                self.put_descriptor(2, status, 1, F_WRITE, 0);
            }
            None => self.put_descriptor(1, status, 1, F_WRITE, 0),
        }
        let used = self.submit(&[0], QUEUE_SIZE);
        assert_eq!(used.len(), 1, "one request, one used entry");
        let byte: u8 = self.memory.read_obj(GuestAddress(status)).unwrap();
        (byte, used[0].1)
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn temp_qcow2(size: u64) -> (tempfile::TempDir, Box<dyn BlockBackend>) {
    temp_qcow2_with(size, true)
}

/// A fresh qcow2 image; `sync` false makes flushes skip the disk (the fuzzer's many flushes).
fn temp_qcow2_with(size: u64, sync: bool) -> (tempfile::TempDir, Box<dyn BlockBackend>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    let options = qcow::CreateOptions {
        size,
        ..qcow::CreateOptions::default()
    };
    qcow::create(&path, &options).unwrap();
    let options = qcow::OpenOptions {
        sync,
        ..qcow::OpenOptions::default()
    };
    let image = qcow::Image::open(&path, &options).unwrap();
    (
        dir,
        Box::new(Qcow2Backend::new(image, &path, "disk.qcow2".into())),
    )
}

#[test]
fn a_driver_reads_writes_flushes_and_gets_the_id() {
    let (dir, backend) = temp_qcow2(1 << 20);
    let mut driver = Driver::new(backend, false);
    let status = driver.set_up(QUEUE_SIZE);
    assert_eq!(
        status & VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_DRIVER_OK
    );
    assert_eq!(driver.config_u64(0), (1 << 20) / 512, "capacity in sectors");
    let features = driver.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);

    // Data in the second region, across a page boundary.
    let data = SECOND + 0x800;
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    driver
        .memory
        .write_slice(&pattern, GuestAddress(data))
        .unwrap();
    assert_eq!(
        driver.request(VIRTIO_BLK_T_OUT, 8, Some((data, 8192, false))),
        (OK, 1)
    );
    assert_eq!(driver.request(VIRTIO_BLK_T_FLUSH, 0, None), (OK, 1));
    let back = SECOND + 0x4000;
    assert_eq!(
        driver.request(VIRTIO_BLK_T_IN, 8, Some((back, 8192, true))),
        (OK, 8193)
    );
    let mut read = vec![0u8; 8192];
    driver
        .memory
        .read_slice(&mut read, GuestAddress(back))
        .unwrap();
    assert_eq!(read, pattern);
    assert_eq!(
        driver.request(VIRTIO_BLK_T_GET_ID, 0, Some((back, 20, true))),
        (OK, 21)
    );
    let mut id = [0u8; 20];
    driver
        .memory
        .read_slice(&mut id, GuestAddress(back))
        .unwrap();
    assert_eq!(&id[..11], b"disk.qcow2\0");

    // Zeroing and discarding ranges.
    let range = |sector: u64, sectors: u32, flags: u32| {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&sectors.to_le_bytes());
        raw[12..].copy_from_slice(&flags.to_le_bytes());
        raw
    };
    driver
        .memory
        .write_slice(&range(8, 8, 0), GuestAddress(data))
        .unwrap();
    assert_eq!(
        driver.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((data, 16, false))),
        (OK, 1)
    );
    assert_eq!(
        driver.request(VIRTIO_BLK_T_IN, 8, Some((back, 4096, true))),
        (OK, 4097)
    );
    driver
        .memory
        .read_slice(&mut read[..4096], GuestAddress(back))
        .unwrap();
    assert!(read[..4096].iter().all(|&b| b == 0));
    driver
        .memory
        .write_slice(&range(0, 128, 0), GuestAddress(data))
        .unwrap();
    assert_eq!(
        driver.request(VIRTIO_BLK_T_DISCARD, 0, Some((data, 16, false))),
        (OK, 1)
    );
    driver
        .memory
        .write_slice(&range(0, 8, 1), GuestAddress(data))
        .unwrap();
    assert_eq!(
        driver.request(VIRTIO_BLK_T_DISCARD, 0, Some((data, 16, false))),
        (UNSUPP, 1),
        "discard has no flags"
    );
    let stats = driver.device.device().stats();
    assert_eq!((stats.reads, stats.writes, stats.flushes), (2, 1, 1));
    drop(driver);
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(dir.path().join("disk.qcow2"))
        .status();
    if let Ok(status) = check {
        assert!(status.success(), "qemu-img check");
    }
}

#[test]
fn read_only_disks_refuse_writes_and_offer_ro() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.raw");
    std::fs::write(&path, vec![5u8; 1 << 20]).unwrap();
    let backend = RawBackend::open(&path, true, "ro".into()).unwrap();
    let mut driver = Driver::new(Box::new(backend), true);
    driver.set_up(QUEUE_SIZE);
    let features = driver.features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(
        driver.request(VIRTIO_BLK_T_OUT, 0, Some((BUFFERS + 0x1000, 512, false))),
        (IOERR, 1)
    );
    assert_eq!(
        driver.request(VIRTIO_BLK_T_IN, 0, Some((BUFFERS + 0x1000, 512, true))),
        (OK, 513)
    );
    assert_eq!(driver.request(VIRTIO_BLK_T_FLUSH, 0, None), (OK, 1));
    assert_eq!(std::fs::read(&path).unwrap(), vec![5u8; 1 << 20]);
}

#[test]
fn hostile_requests_complete_with_an_error_status() {
    let (_dir, backend) = temp_qcow2(1 << 20);
    let mut driver = Driver::new(backend, false);
    driver.set_up(QUEUE_SIZE);
    let buf = BUFFERS + 0x1000;
    type Case = (&'static str, u32, u64, Option<(u64, u32, bool)>, u8);
    let cases: &[Case] = &[
        (
            "data in the hole between regions",
            VIRTIO_BLK_T_IN,
            0,
            Some((REGION as u64 + 4096, 512, true)),
            IOERR,
        ),
        (
            "data straddling the end of a region",
            VIRTIO_BLK_T_OUT,
            0,
            Some((REGION as u64 - 256, 512, false)),
            IOERR,
        ),
        (
            "data past the end of RAM",
            VIRTIO_BLK_T_IN,
            0,
            Some((u64::MAX - 100, 512, true)),
            IOERR,
        ),
        (
            "sector past the end of the disk",
            VIRTIO_BLK_T_IN,
            2048,
            Some((buf, 512, true)),
            IOERR,
        ),
        (
            "sector whose byte offset overflows",
            VIRTIO_BLK_T_OUT,
            u64::MAX / 256,
            Some((buf, 512, false)),
            IOERR,
        ),
        (
            "length not whole sectors",
            VIRTIO_BLK_T_IN,
            0,
            Some((buf, 100, true)),
            IOERR,
        ),
        (
            "length of more than one request may have",
            VIRTIO_BLK_T_IN,
            0,
            Some((buf, 0x8000_0000, true)),
            IOERR,
        ),
        ("unknown type", 77, 0, None, UNSUPP),
        (
            "read into a device-readable buffer",
            VIRTIO_BLK_T_IN,
            0,
            Some((buf, 512, false)),
            IOERR,
        ),
    ];
    for (what, kind, sector, data, expected) in cases {
        let (status, _) = driver.request(*kind, *sector, *data);
        assert_eq!(status, *expected, "{what}");
    }
    // A device-readable buffer after a device-writable one.
    driver.put_descriptor(0, BUFFERS, 16, F_NEXT, 1);
    driver.put_descriptor(1, buf, 512, F_NEXT | F_WRITE, 2);
    driver.put_descriptor(2, buf + 512, 512, F_NEXT, 3);
    driver.put_descriptor(3, BUFFERS + 0x100, 1, F_WRITE, 0);
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    driver
        .memory
        .write_slice(&header, GuestAddress(BUFFERS))
        .unwrap();
    assert_eq!(driver.submit(&[0], QUEUE_SIZE).len(), 1);
    assert_eq!(
        driver
            .memory
            .read_obj::<u8>(GuestAddress(BUFFERS + 0x100))
            .unwrap(),
        IOERR
    );
    assert!(
        driver.device.fault().is_none(),
        "all completed, no reset needed"
    );
    assert_eq!(
        driver.request(VIRTIO_BLK_T_FLUSH, 0, None),
        (OK, 1),
        "still serving"
    );
    // A chain longer than 4 GiB in total is illegal (virtio 1.2 §2.7.5.2): virtio-queue cuts
    // it short, so no status byte is left to report through.
    driver.put_descriptor(0, BUFFERS, 16, F_NEXT, 1);
    driver.put_descriptor(1, buf, u32::MAX, F_NEXT | F_WRITE, 2);
    driver.put_descriptor(2, BUFFERS + 0x100, 1, F_WRITE, 0);
    assert!(driver.submit(&[0], QUEUE_SIZE).is_empty());
    assert_eq!(driver.device.fault(), Some(&QueueFault::NoStatus));
}

#[test]
fn broken_chains_and_rings_make_the_device_need_a_reset() {
    let (_dir, backend) = temp_qcow2(1 << 20);
    let mut driver = Driver::new(backend, false);
    driver.set_up(QUEUE_SIZE);
    // A chain that loops on itself.
    driver.put_descriptor(0, BUFFERS, 16, F_NEXT, 1);
    driver.put_descriptor(1, BUFFERS + 16, 16, F_NEXT, 0);
    assert!(driver.submit(&[0], QUEUE_SIZE).is_empty());
    let status = driver.read_reg(VIRTIO_MMIO_STATUS);
    assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_ne!(
        driver.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0
    );
    // Ignored until reset; then it works again.
    assert!(driver.submit(&[0], QUEUE_SIZE).is_empty());
    let mut driver = Driver::new(Box::new(DiscardAll::default()), false);
    assert_ne!(driver.set_up(QUEUE_SIZE) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    assert_eq!(driver.request(VIRTIO_BLK_T_FLUSH, 0, None), (OK, 1));
    // An available index far ahead of the device.
    driver.avail_idx = driver.avail_idx.wrapping_add(QUEUE_SIZE + 1);
    assert!(driver.submit(&[], QUEUE_SIZE).is_empty());
    assert_eq!(driver.device.fault(), Some(&QueueFault::AvailIndexTooFar));
    driver.avail_idx = 0;
    driver.used_seen = 0;
    driver
        .memory
        .write_obj(0u16, GuestAddress(USED + 2))
        .unwrap();
    assert_ne!(
        driver.set_up(QUEUE_SIZE) & VIRTIO_CONFIG_S_DRIVER_OK,
        0,
        "reset and set up again"
    );
    assert!(driver.device.fault().is_none());
    assert_eq!(driver.request(VIRTIO_BLK_T_FLUSH, 0, None), (OK, 1));
}

#[test]
fn bad_queue_sizes_and_rings_are_never_made_ready() {
    for (what, size, used) in [
        ("size not a power of two", 100u16, USED),
        ("size above the maximum", 512, USED),
        ("used ring not 4-byte aligned", 16, USED + 2),
        ("used ring past the end of RAM", 16, 3 << 20),
    ] {
        let mut driver = Driver::new(Box::new(DiscardAll::default()), false);
        driver.write_reg(VIRTIO_MMIO_STATUS, 0);
        driver.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        driver.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1
        driver.write_reg(VIRTIO_MMIO_STATUS, 1 | 2 | VIRTIO_CONFIG_S_FEATURES_OK);
        driver.write_reg(VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        driver.write_reg(VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
        driver.write_reg(VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
        driver.write_reg(VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
        driver.write_reg(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(driver.read_reg(VIRTIO_MMIO_QUEUE_READY), 0, "{what}");
        assert_ne!(
            driver.read_reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0,
            "{what}"
        );
    }
    // Features without VERSION_1 (a legacy driver) are refused.
    let mut driver = Driver::new(Box::new(DiscardAll::default()), false);
    driver.write_reg(VIRTIO_MMIO_STATUS, 1 | 2);
    driver.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
    driver.write_reg(VIRTIO_MMIO_STATUS, 1 | 2 | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(
        driver.read_reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
        0
    );
    // Registers want 32-bit accesses.
    let mut byte = [0u8; 1];
    driver.device.read(0, &mut byte);
    assert_eq!(
        byte,
        [0],
        "a 1-byte read of the magic register reads nothing"
    );
}

#[test]
fn device_writes_into_guest_ram_are_marked_dirty() {
    let (_dir, backend) = temp_qcow2(1 << 20);
    let mut driver = Driver::new(backend, false);
    driver.set_up(QUEUE_SIZE);
    crate::dirty::take_vmm_writes(&driver.memory);
    let target = SECOND + 0x5000;
    assert_eq!(
        driver.request(VIRTIO_BLK_T_IN, 0, Some((target, 8192, true))),
        (OK, 8193)
    );
    let dirty: Vec<u64> =
        crate::dirty::set_pages(&crate::dirty::take_vmm_writes(&driver.memory)).collect();
    // Page numbers in snapshot-file order: region 0 has 256 pages, then region 1.
    let data_pages = [256 + 5, 256 + 6];
    for page in [USED / 4096, BUFFERS / 4096] {
        assert!(
            dirty.contains(&page),
            "page {page} (used ring / request) in {dirty:?}"
        );
    }
    for page in data_pages {
        assert!(dirty.contains(&page), "data page {page} in {dirty:?}");
    }
}

#[test]
fn transport_state_survives_save_and_restore() {
    let (_dir, backend) = temp_qcow2(1 << 20);
    let mut driver = Driver::new(backend, false);
    driver.set_up(16);
    assert_eq!(driver.request(VIRTIO_BLK_T_FLUSH, 0, None).0, OK);
    let saved = driver.device.save();
    let json = serde_json::to_string(&saved).unwrap();
    let back: MmioState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);
    assert_eq!((back.queues[0].size, back.queues[0].next_avail), (16, 1));
    let block = driver.device.device().save();
    let mut restored = MmioTransport::new(
        VirtioBlock::restore(0, Box::new(DiscardAll::default()), &block),
        driver.memory.clone(),
    );
    restored.restore(&back).unwrap();
    driver.device = restored;
    assert_eq!(
        driver.request(VIRTIO_BLK_T_FLUSH, 0, None),
        (OK, 1),
        "continues at index 1"
    );
    let mut broken = back.clone();
    broken.queues[0].desc_table = 3;
    assert!(
        driver.device.restore(&broken).is_err(),
        "unaligned ring in a snapshot"
    );
}

/// Writes the requests of a batch into the ring: request `k` writes 512 bytes at sector `8k`
/// (descriptors `3k..3k+3`, status byte at `BUFFERS + 0x100 + 0x200k`).
fn put_write_batch(driver: &Driver, count: u16) -> Vec<u16> {
    (0..count)
        .map(|k| {
            let header = BUFFERS + 0x200 * u64::from(k);
            let status = header + 0x100;
            let mut raw = [0u8; 16];
            raw[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            raw[8..].copy_from_slice(&(8 * u64::from(k)).to_le_bytes());
            driver
                .memory
                .write_slice(&raw, GuestAddress(header))
                .unwrap();
            driver
                .memory
                .write_obj(0xffu8, GuestAddress(status))
                .unwrap();
            let first = 3 * k;
            driver.put_descriptor(first, header, 16, F_NEXT, first + 1);
            driver.put_descriptor(first + 1, BUFFERS + 0x8000, 512, F_NEXT, first + 2);
            driver.put_descriptor(first + 2, status, 1, F_WRITE, 0);
            first
        })
        .collect()
}

#[test]
fn a_pause_stops_a_batch_between_requests_and_a_restored_device_finishes_it() {
    let hold = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Mutex::new(Vec::new()));
    // The backend raises the hold during the first write, as a pause arriving then would.
    let backend = DiscardAll {
        written: Some(written.clone()),
        raise: Some(hold.clone()),
    };
    let mut driver = Driver::new(Box::new(backend), false);
    driver.set_up(QUEUE_SIZE);
    driver.device.set_hold(hold.clone());
    let heads = put_write_batch(&driver, 3);
    let used = driver.submit(&heads, QUEUE_SIZE);
    assert_eq!(
        used,
        vec![(0, 1)],
        "the request under way completes, the rest wait"
    );
    assert_eq!(*written.lock().unwrap(), vec![0]);
    assert_eq!(driver.device.pending_requests(), 2);

    // A snapshot now holds the two waiting requests in guest RAM and next_avail = 1; the
    // device restored from it (paused: the hold is up) leaves them until the VM runs.
    let saved = driver.device.save();
    assert_eq!(saved.queues[0].next_avail, 1);
    let block = driver.device.device().save();
    let after = Arc::new(Mutex::new(Vec::new()));
    let backend = DiscardAll {
        written: Some(after.clone()),
        raise: None,
    };
    let mut restored = MmioTransport::new(
        VirtioBlock::restore(0, Box::new(backend), &block),
        driver.memory.clone(),
    );
    restored.restore(&saved).unwrap();
    restored.set_hold(hold.clone());
    restored.resume();
    assert!(after.lock().unwrap().is_empty(), "nothing runs while held");
    hold.store(false, Ordering::Release);
    restored.resume();
    assert_eq!(*after.lock().unwrap(), vec![8, 16]);
    assert_eq!(restored.pending_requests(), 0);
    let used: u16 = driver.memory.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 3);
    for k in 1..3u64 {
        let status: u8 = driver
            .memory
            .read_obj(GuestAddress(BUFFERS + 0x200 * k + 0x100))
            .unwrap();
        assert_eq!(status, OK, "request {k}");
    }
    // Nothing left: a second resume changes nothing.
    restored.resume();
    assert_eq!(after.lock().unwrap().len(), 2);
}

/// A backend that accepts everything and stores nothing (for queue-level tests). It can record
/// the sector of every write, and raise a hold flag on each (as a pause arriving then would).
#[derive(Debug, Default)]
struct DiscardAll {
    written: Option<Arc<Mutex<Vec<u64>>>>,
    raise: Option<Arc<AtomicBool>>,
}

impl BlockBackend for DiscardAll {
    fn read(&mut self, _: u64, buf: &mut [u8]) -> Result<(), crate::disk::BackendError> {
        buf.fill(0);
        Ok(())
    }
    fn write(&mut self, offset: u64, _: &[u8]) -> Result<(), crate::disk::BackendError> {
        if let Some(written) = &self.written {
            written.lock().unwrap().push(offset / 512);
        }
        if let Some(hold) = &self.raise {
            hold.store(true, Ordering::Release);
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), crate::disk::BackendError> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> Result<(), crate::disk::BackendError> {
        Ok(())
    }
    fn write_zeroes(&mut self, _: u64, _: u64, _: bool) -> Result<(), crate::disk::BackendError> {
        Ok(())
    }
    fn size(&self) -> u64 {
        1 << 20
    }
    fn id(&self) -> String {
        "discard".into()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn supports_discard(&self) -> bool {
        true
    }
    fn supports_write_zeroes(&self) -> bool {
        true
    }
    fn close(self: Box<Self>) -> Result<(), crate::disk::BackendError> {
        Ok(())
    }
}

/// xorshift64*: the fuzzer's deterministic randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// An address that is often inside RAM, sometimes near its edges, sometimes anywhere.
    fn address(&mut self) -> u64 {
        match self.below(6) {
            0 => self.next(),
            1 => REGION as u64 - self.below(64),
            2 => SECOND + REGION as u64 - self.below(64),
            3 => SECOND + self.below(REGION as u64),
            _ => self.below(REGION as u64),
        }
    }
}

/// Random descriptor tables, rings and register writes: the device must never panic, never
/// touch memory outside guest RAM (the guard pages would fault), and keep working after a reset.
/// Most requests start valid and get a few random mutations, so they reach every check.
#[test]
fn fuzz_queues_and_registers() {
    let seed = std::env::var("COWVM_VIRTIO_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x005e_ed0f_c077_u64);
    let rounds: u64 = std::env::var("COWVM_VIRTIO_FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    eprintln!("virtio fuzz seed {seed} (COWVM_VIRTIO_FUZZ_SEED), {rounds} rounds");
    let (_dir, backend) = temp_qcow2_with(1 << 20, false);
    let mut driver = Driver::new(backend, false);
    let mut rng = Rng(seed | 1);
    let registers = [
        VIRTIO_MMIO_DEVICE_FEATURES_SEL,
        VIRTIO_MMIO_DRIVER_FEATURES,
        VIRTIO_MMIO_DRIVER_FEATURES_SEL,
        VIRTIO_MMIO_QUEUE_SEL,
        VIRTIO_MMIO_QUEUE_NUM,
        VIRTIO_MMIO_QUEUE_READY,
        VIRTIO_MMIO_QUEUE_NOTIFY,
        VIRTIO_MMIO_INTERRUPT_ACK,
        VIRTIO_MMIO_STATUS,
        VIRTIO_MMIO_QUEUE_DESC_LOW,
        VIRTIO_MMIO_QUEUE_DESC_HIGH,
        VIRTIO_MMIO_QUEUE_AVAIL_LOW,
        VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
        VIRTIO_MMIO_QUEUE_USED_LOW,
        VIRTIO_MMIO_QUEUE_USED_HIGH,
    ];
    let (mut size, mut resets) = (QUEUE_SIZE, 0u64);
    let mut statuses = [0u64; 3];
    let status_at = BUFFERS + 0x100;
    for _ in 0..rounds {
        let healthy = driver.read_reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && driver.device.fault().is_none();
        if !healthy {
            resets += 1;
            driver.avail_idx = 0;
            driver.used_seen = 0;
            driver
                .memory
                .write_obj(0u16, GuestAddress(USED + 2))
                .unwrap();
            size = 1u16 << rng.below(9);
            driver.set_up(size);
        }
        match rng.below(40) {
            0 => {
                let register = registers[rng.below(registers.len() as u64) as usize];
                let value = if rng.below(2) == 0 {
                    rng.next() as u32
                } else {
                    rng.below(300) as u32
                };
                driver.write_reg(register, value);
                continue;
            }
            1 => {
                // Any access size at any offset of the window, reads and writes.
                let offset = rng.below(0x1100);
                let len = [1usize, 2, 4, 8][rng.below(4) as usize];
                let mut data = vec![0u8; len];
                driver.device.read(offset, &mut data);
                let _ = driver
                    .device
                    .write(offset, &rng.next().to_le_bytes()[..len]);
                continue;
            }
            _ => {}
        }
        // A valid request in 2-4 descriptors, then 0-3 mutations.
        let kind = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            rng.below(32) as u32,
        ][rng.below(7) as usize];
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&rng.below(2100).to_le_bytes());
        driver
            .memory
            .write_slice(&header, GuestAddress(BUFFERS))
            .unwrap();
        let range = [
            rng.below(2100).to_le_bytes().to_vec(),
            (rng.below(64) as u32).to_le_bytes().to_vec(),
            (rng.below(3) as u32).to_le_bytes().to_vec(),
        ]
        .concat();
        driver
            .memory
            .write_slice(&range, GuestAddress(SECOND))
            .unwrap();
        let device_writes = kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID;
        let data_len = 512 * (rng.below(16) as u32 + 1);
        let mut chain: Vec<(u64, u32, u16)> = vec![(BUFFERS, 16, F_NEXT)];
        if kind != VIRTIO_BLK_T_FLUSH {
            let flags = F_NEXT | if device_writes { F_WRITE } else { 0 };
            let len = if device_writes || kind == VIRTIO_BLK_T_OUT {
                data_len
            } else {
                16
            };
            if rng.below(2) == 0 {
                chain.push((SECOND, len, flags));
            } else {
                chain.push((SECOND, len / 2, flags));
                chain.push((SECOND + u64::from(len / 2), len - len / 2, flags));
            }
        }
        chain.push((status_at, 1, F_WRITE));
        for _ in 0..rng.below(4) {
            let at = rng.below(chain.len() as u64) as usize;
            match rng.below(5) {
                0 => chain[at].0 = rng.address(),
                1 => {
                    chain[at].1 = [rng.next() as u32, 0, 1, u32::MAX, rng.below(9000) as u32]
                        [rng.below(5) as usize]
                }
                2 => chain[at].2 ^= 1 << rng.below(3),
                3 => {
                    let other = rng.below(chain.len() as u64) as usize;
                    chain.swap(at, other);
                }
                _ => chain.truncate(at.max(1)),
            }
        }
        let last = chain.len() - 1;
        for (index, &(addr, len, flags)) in chain.iter().enumerate() {
            let mut next = index as u16 + 1;
            if rng.below(30) == 0 {
                next = rng.below(u64::from(size) + 3) as u16;
            }
            let flags = if index == last && rng.below(10) != 0 {
                flags & !F_NEXT
            } else {
                flags
            };
            driver.put_descriptor(index as u16, addr, len, flags, next);
        }
        let head = if rng.below(40) == 0 {
            rng.below(u64::from(size) + 3) as u16
        } else {
            0
        };
        if rng.below(100) == 0 {
            driver.avail_idx = driver.avail_idx.wrapping_add(rng.next() as u16);
        }
        driver
            .memory
            .write_obj(0xeeu8, GuestAddress(status_at))
            .unwrap();
        let used = driver.submit(&[head], size);
        if !used.is_empty() {
            let status: u8 = driver.memory.read_obj(GuestAddress(status_at)).unwrap();
            if let Some(count) = statuses.get_mut(usize::from(status)) {
                *count += 1;
            }
        }
    }
    eprintln!("virtio fuzz: statuses ok/ioerr/unsupp {statuses:?}, {resets} resets");
    // The fuzzer must reach every outcome, or it tests nothing.
    assert!(
        statuses.iter().all(|&n| n > 0) && resets > 1,
        "{statuses:?} {resets}"
    );
    driver.avail_idx = 0;
    driver.used_seen = 0;
    driver
        .memory
        .write_obj(0u16, GuestAddress(USED + 2))
        .unwrap();
    assert_ne!(driver.set_up(QUEUE_SIZE) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    assert_eq!(driver.request(VIRTIO_BLK_T_FLUSH, 0, None), (OK, 1));
}
