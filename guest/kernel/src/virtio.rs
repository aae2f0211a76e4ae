//! A virtio-blk driver over virtio-mmio, written for this host's KVM (PVM), where every MMIO
//! access is an exit costing tens of microseconds: device registers are read at set-up only, a
//! batch of requests costs one notification (one exit), and completions are found by polling
//! the used ring in memory (no interrupts are delivered).
//!
//! Memory (the disk area after the workload pages): descriptor table, available ring and used
//! ring in the first three pages, then [`SLOTS`] request slots of [`SLOT_SIZE`] bytes, each
//! `[header 16][data 4096][status 1]`. A request takes two descriptors: a read or flush puts the
//! header alone in the device-readable one, a write its header and data together; the
//! device-writable one holds the data (for reads) and the status byte.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use cowvm_guest_abi::args::MAX_DISK_BATCH;
use cowvm_guest_abi::disk::{BLOCK_SIZE, SECTORS_PER_BLOCK};
use cowvm_guest_abi::workload::WORDS_PER_PAGE;

/// Request slots (and so the largest batch).
pub const SLOTS: usize = MAX_DISK_BATCH as usize;
const SLOT_SIZE: u64 = 4160;
const HEADER_LEN: u64 = 16;
/// Entries the driver asks the queue to have: two descriptors per slot.
const QUEUE_SIZE: u16 = 2 * SLOTS as u16;
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;
const SLOTS_OFFSET: u64 = 0x3000;

// virtio-mmio registers (virtio 1.2 §4.2.2).
const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG: u64 = 0x100;

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

const F_FLUSH: u64 = 1 << 9;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_VERSION_1: u64 = 1 << 32;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_WRITE_ZEROES: u32 = 13;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// A request for one slot.
#[derive(Clone, Copy)]
pub enum Request {
    /// Read the block at this sector into the slot's data.
    Read(u64),
    /// Write the slot's data to the block at this sector.
    Write(u64),
    /// Zero the block at this sector.
    Zero(u64),
    Flush,
    /// The device id into the slot's data.
    GetId,
}

/// A failed request: its slot and status byte.
pub struct Failed {
    pub slot: usize,
    pub status: u8,
}

/// An initialized device with one queue.
pub struct Blk {
    mmio: u64,
    area: u64,
    avail_idx: u16,
    used_idx: u16,
    /// Sectors of 512 bytes.
    pub capacity: u64,
}

fn mmio_read(addr: u64) -> u32 {
    // SAFETY: the VMM listed this window in the boot-info page; reads of device registers have
    // no effect on guest memory.
    unsafe { read_volatile(addr as *const u32) }
}

fn mmio_write(addr: u64, value: u32) {
    // SAFETY: as for `mmio_read`; the device reads guest memory only where the queue says.
    unsafe { write_volatile(addr as *mut u32, value) }
}

impl Blk {
    /// Brings up the device at `mmio` with its queue in `area` (virtio 1.2 §3.1.1).
    pub fn init(mmio: u64, area: u64) -> Result<Self, &'static str> {
        let reg = |offset| mmio_read(mmio + offset);
        if reg(MAGIC_VALUE) != 0x7472_6976 || reg(VERSION) != 2 {
            return Err("not a virtio-mmio version 2 device");
        }
        if reg(DEVICE_ID) != 2 {
            return Err("not a block device");
        }
        let set = |offset, value| mmio_write(mmio + offset, value);
        set(STATUS, 0);
        set(STATUS, ACKNOWLEDGE);
        set(STATUS, ACKNOWLEDGE | DRIVER);
        set(DEVICE_FEATURES_SEL, 0);
        let low = u64::from(reg(DEVICE_FEATURES));
        set(DEVICE_FEATURES_SEL, 1);
        let offered = low | u64::from(reg(DEVICE_FEATURES)) << 32;
        let needed = F_VERSION_1 | F_FLUSH;
        if offered & needed != needed {
            return Err("the device lacks VERSION_1 or FLUSH");
        }
        // A read-only disk offers no WRITE_ZEROES; its writes fail with IOERR instead.
        let wanted = needed | (offered & F_WRITE_ZEROES);
        set(DRIVER_FEATURES_SEL, 0);
        set(DRIVER_FEATURES, wanted as u32);
        set(DRIVER_FEATURES_SEL, 1);
        set(DRIVER_FEATURES, (wanted >> 32) as u32);
        set(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if reg(STATUS) & FEATURES_OK == 0 {
            return Err("the device refused the features");
        }
        set(QUEUE_SEL, 0);
        if reg(QUEUE_NUM_MAX) < u32::from(QUEUE_SIZE) {
            return Err("the queue is smaller than 256 entries");
        }
        // SAFETY: the rings lie in the disk area, which the VMM sized for them and which only
        // this vCPU uses.
        unsafe { core::ptr::write_bytes(area as *mut u8, 0, SLOTS_OFFSET as usize) };
        set(QUEUE_NUM, u32::from(QUEUE_SIZE));
        for (register, addr) in [
            (QUEUE_DESC, area),
            (QUEUE_DRIVER, area + AVAIL_OFFSET),
            (QUEUE_DEVICE, area + USED_OFFSET),
        ] {
            set(register, addr as u32);
            set(register + 4, (addr >> 32) as u32);
        }
        set(QUEUE_READY, 1);
        if reg(QUEUE_READY) != 1 {
            return Err("the device refused the queue");
        }
        set(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        let capacity = u64::from(reg(CONFIG)) | u64::from(reg(CONFIG + 4)) << 32;
        Ok(Self {
            mmio,
            area,
            avail_idx: 0,
            used_idx: 0,
            capacity,
        })
    }

    fn slot(&self, slot: usize) -> u64 {
        self.area + SLOTS_OFFSET + slot as u64 * SLOT_SIZE
    }

    /// The data of `slot` as words.
    ///
    /// # Safety
    /// No other reference to the slot's data may be live, and no request on it in flight.
    pub unsafe fn data(&self, slot: usize) -> &'static mut [u64; WORDS_PER_PAGE] {
        // SAFETY: the data starts 16 bytes into the slot (8-byte aligned) and holds 4096 bytes
        // of the disk area; exclusivity is the caller's promise.
        unsafe { &mut *((self.slot(slot) + HEADER_LEN) as *mut [u64; WORDS_PER_PAGE]) }
    }

    fn put_descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = (self.area + u64::from(index) * 16) as *mut u8;
        // SAFETY: descriptor `index` < QUEUE_SIZE lies in the table page; the device reads it
        // only after the notification below.
        unsafe {
            write_volatile(at as *mut u64, addr);
            write_volatile(at.add(8) as *mut u32, len);
            write_volatile(at.add(12) as *mut u16, flags);
            write_volatile(at.add(14) as *mut u16, next);
        }
    }

    /// Runs `requests` (request `i` in slot `i`) as one batch: one notification, then polls
    /// the used ring until all are back. Returns the first failure.
    pub fn run(&mut self, requests: &[Request]) -> Result<(), Failed> {
        for (slot, request) in requests.iter().enumerate() {
            let base = self.slot(slot);
            let (kind, sector) = match *request {
                Request::Read(sector) => (T_IN, sector),
                Request::Write(sector) => (T_OUT, sector),
                Request::Zero(sector) => (T_WRITE_ZEROES, sector),
                Request::Flush => (T_FLUSH, 0),
                Request::GetId => (T_GET_ID, 0),
            };
            let status = base + HEADER_LEN + BLOCK_SIZE;
            // SAFETY: header, range and status lie in this slot, not in flight.
            unsafe {
                write_volatile(base as *mut u32, kind);
                write_volatile((base + 4) as *mut u32, 0);
                write_volatile((base + 8) as *mut u64, sector);
                write_volatile(status as *mut u8, 0xff);
                if let Request::Zero(sector) = *request {
                    write_volatile((base + HEADER_LEN) as *mut u64, sector);
                    write_volatile((base + HEADER_LEN + 8) as *mut u32, SECTORS_PER_BLOCK as u32);
                    write_volatile((base + HEADER_LEN + 12) as *mut u32, 0);
                }
            }
            let first = 2 * slot as u16;
            let readable = match request {
                Request::Write(_) => HEADER_LEN + BLOCK_SIZE,
                Request::Zero(_) => HEADER_LEN + 16,
                _ => HEADER_LEN,
            };
            self.put_descriptor(first, base, readable as u32, DESC_F_NEXT, first + 1);
            let (writable_at, writable_len) = match request {
                Request::Read(_) | Request::GetId => (base + HEADER_LEN, BLOCK_SIZE + 1),
                _ => (status, 1),
            };
            self.put_descriptor(first + 1, writable_at, writable_len as u32, DESC_F_WRITE, 0);
            let ring_slot = u64::from(self.avail_idx % QUEUE_SIZE);
            // SAFETY: an entry of the available ring, in the disk area.
            unsafe {
                write_volatile((self.area + AVAIL_OFFSET + 4 + 2 * ring_slot) as *mut u16, first)
            };
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        // Ordering: descriptors and ring entries are in memory before the index that publishes
        // them, and the index before the notification.
        fence(Ordering::Release);
        // SAFETY: the available ring's index field.
        unsafe { write_volatile((self.area + AVAIL_OFFSET + 2) as *mut u16, self.avail_idx) };
        fence(Ordering::SeqCst);
        mmio_write(self.mmio + QUEUE_NOTIFY, 0);
        let target = self.avail_idx;
        loop {
            // SAFETY: the used ring's index field, written by the device.
            let used = unsafe { read_volatile((self.area + USED_OFFSET + 2) as *const u16) };
            if used == target {
                break;
            }
            core::hint::spin_loop();
        }
        fence(Ordering::Acquire);
        self.used_idx = target;
        for slot in 0..requests.len() {
            let status_at = self.slot(slot) + HEADER_LEN + BLOCK_SIZE;
            // SAFETY: the slot's status byte, written by the device before the used index.
            let status = unsafe { read_volatile(status_at as *const u8) };
            if status != 0 {
                return Err(Failed { slot, status });
            }
        }
        Ok(())
    }
}
