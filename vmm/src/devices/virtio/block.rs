//! virtio-blk (virtio 1.2 §5.2) over a [`BlockBackend`]: read, write, flush, get-id, discard and
//! write-zeroes requests; read-only disks. A request the device cannot carry out completes with
//! `VIRTIO_BLK_S_IOERR` (bad buffers, sectors past the end, backend errors, writes to a
//! read-only disk) or `VIRTIO_BLK_S_UNSUPP` (unknown or not negotiated types); a chain with no
//! status byte to report through is a queue fault.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Address;

use super::request::{self, Chain, Segment};
use super::{QueueFault, VirtioDevice};
use crate::disk::{BlockBackend, ID_BYTES, SECTOR_SIZE};
use crate::memory::GuestMemory;

/// Entries in the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest buffer in a request (`size_max`).
const SIZE_MAX: u32 = 1 << 20;
/// Most data buffers in a request (`seg_max`): the queue less the header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest discard or write-zeroes range, in sectors (about 2 GiB).
const MAX_RANGE_SECTORS: u32 = 0x3f_ffff;
/// Most ranges in one discard or write-zeroes request.
const MAX_RANGES: u32 = 16;
/// Bytes of the request header: type (u32), reserved (u32), sector (u64).
const HEADER_LEN: u64 = 16;
/// Bytes of one discard / write-zeroes range: sector (u64), sectors (u32), flags (u32).
const RANGE_LEN: u64 = 16;
/// Data is moved between guest RAM and the backend in pieces of at most this size.
const CHUNK: usize = 1 << 20;

/// What the device has done, for `cowvm stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub io_errors: u64,
    pub unsupported: u64,
}

/// The device's own part of a snapshot (the transport's registers are saved beside it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub id: String,
    pub read_only: bool,
    pub capacity_sectors: u64,
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct VirtioBlock {
    backend: Box<dyn BlockBackend>,
    id: String,
    read_only: bool,
    capacity_sectors: u64,
    /// Features the driver accepted (set when it reaches DRIVER_OK).
    acked: u64,
    /// Bounce buffer between guest RAM and the backend, page-aligned: the kernel copies into
    /// and out of aligned memory several times faster (measured: it was most of a 4 KiB
    /// request's cost when unaligned).
    buffer: qcow::raw::AlignedBuf,
    stats: BlockStats,
    /// Where failures are logged as: the disk's index.
    index: usize,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    IoError,
    Unsupported,
}

impl Status {
    fn byte(self) -> u8 {
        match self {
            Status::Ok => VIRTIO_BLK_S_OK as u8,
            Status::IoError => VIRTIO_BLK_S_IOERR as u8,
            Status::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

impl VirtioBlock {
    /// A device for disk `index` over `backend`; `read_only` also holds when the backend is.
    pub fn new(index: usize, backend: Box<dyn BlockBackend>, read_only: bool) -> Self {
        let state = BlockState {
            id: backend.id(),
            read_only: read_only || backend.read_only(),
            capacity_sectors: backend.size() / SECTOR_SIZE,
        };
        Self::restore(index, backend, &state)
    }

    /// A device with a saved identity (its id stays the same across snapshots, whatever the
    /// file the backend now is).
    pub fn restore(index: usize, backend: Box<dyn BlockBackend>, state: &BlockState) -> Self {
        Self {
            read_only: state.read_only || backend.read_only(),
            backend,
            id: state.id.clone(),
            capacity_sectors: state.capacity_sectors,
            acked: 0,
            buffer: qcow::raw::AlignedBuf::default(),
            stats: BlockStats::default(),
            index,
        }
    }

    pub fn save(&self) -> BlockState {
        BlockState {
            id: self.id.clone(),
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
        }
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    pub fn backend_mut(&mut self) -> &mut dyn BlockBackend {
        self.backend.as_mut()
    }

    /// Puts `backend` in place of the current one (a snapshot moving the disk onto a fresh
    /// overlay) and returns the old one.
    pub fn replace_backend(&mut self, backend: Box<dyn BlockBackend>) -> Box<dyn BlockBackend> {
        std::mem::replace(&mut self.backend, backend)
    }

    /// Flushes and closes the backend (reporting the final flush's error); the device fails
    /// every request from then on.
    pub fn close(&mut self) -> Result<(), crate::disk::BackendError> {
        self.replace_backend(Box::new(crate::disk::ClosedBackend))
            .close()
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors * SECTOR_SIZE
    }

    fn negotiated(&self, feature: u32) -> bool {
        self.acked & (1 << feature) != 0
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut config = [0u8; 60];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_RANGES.to_le_bytes()); // max_discard_seg
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
        put(48, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        config
    }

    /// Carries out one request; returns its status and the bytes written into the guest's
    /// device-writable buffers before the status byte.
    fn execute(&mut self, chain: &Chain, memory: &GuestMemory) -> (Status, u64) {
        if chain.outside_ram || chain.misordered {
            return (Status::IoError, 0);
        }
        let mut header = [0u8; HEADER_LEN as usize];
        if request::read_stream(memory, &chain.readable, 0, &mut header).is_err() {
            return (Status::IoError, 0);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let readable_data = request::total_len(&chain.readable) - HEADER_LEN;
        // The status byte is the last writable byte; data comes before it.
        let writable_data = request::total_len(&chain.writable).saturating_sub(1);
        match kind {
            // Data flows one way: a read has nothing after its header for the device to read,
            // a write nothing before its status byte for the device to write.
            VIRTIO_BLK_T_IN if readable_data > 0 => (Status::IoError, 0),
            VIRTIO_BLK_T_OUT if writable_data > 0 => (Status::IoError, 0),
            VIRTIO_BLK_T_IN => self.read(chain, memory, sector, writable_data),
            VIRTIO_BLK_T_OUT => (self.write(chain, memory, sector, readable_data), 0),
            VIRTIO_BLK_T_FLUSH => (self.flush(), 0),
            VIRTIO_BLK_T_GET_ID => self.get_id(chain, memory, writable_data),
            VIRTIO_BLK_T_DISCARD if self.negotiated(VIRTIO_BLK_F_DISCARD) => {
                (self.ranges(chain, memory, readable_data, false), 0)
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.negotiated(VIRTIO_BLK_F_WRITE_ZEROES) => {
                (self.ranges(chain, memory, readable_data, true), 0)
            }
            _ => (Status::Unsupported, 0),
        }
    }

    /// The byte range `len` bytes from `sector`, if it is whole sectors inside the disk and not
    /// larger than a request may be.
    fn byte_range(&self, sector: u64, len: u64) -> Option<u64> {
        let max = u64::from(SIZE_MAX) * u64::from(SEG_MAX);
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let fits = len % SECTOR_SIZE == 0
            && len <= max
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.capacity_bytes());
        fits.then_some(offset)
    }

    fn read(
        &mut self,
        chain: &Chain,
        memory: &GuestMemory,
        sector: u64,
        len: u64,
    ) -> (Status, u64) {
        let Some(offset) = self.byte_range(sector, len) else {
            return (Status::IoError, 0);
        };
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.buffer.resize(n);
            let buffer = &mut self.buffer.as_mut_slice()[..n];
            if let Err(e) = self.backend.read(offset + done, buffer) {
                self.log_error(&e);
                return (Status::IoError, done);
            }
            if request::write_stream(memory, &chain.writable, done, buffer).is_err() {
                return (Status::IoError, done);
            }
            done += n as u64;
        }
        self.stats.reads += 1;
        self.stats.bytes_read += len;
        (Status::Ok, len)
    }

    fn write(&mut self, chain: &Chain, memory: &GuestMemory, sector: u64, len: u64) -> Status {
        if self.read_only {
            return Status::IoError;
        }
        let Some(offset) = self.byte_range(sector, len) else {
            return Status::IoError;
        };
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.buffer.resize(n);
            let buffer = &mut self.buffer.as_mut_slice()[..n];
            let from = HEADER_LEN + done;
            if request::read_stream(memory, &chain.readable, from, buffer).is_err() {
                return Status::IoError;
            }
            if let Err(e) = self.backend.write(offset + done, buffer) {
                self.log_error(&e);
                return Status::IoError;
            }
            done += n as u64;
        }
        self.stats.writes += 1;
        self.stats.bytes_written += len;
        Status::Ok
    }

    fn flush(&mut self) -> Status {
        match self.backend.flush() {
            Ok(()) => {
                self.stats.flushes += 1;
                Status::Ok
            }
            Err(e) => {
                self.log_error(&e);
                Status::IoError
            }
        }
    }

    fn get_id(&mut self, chain: &Chain, memory: &GuestMemory, len: u64) -> (Status, u64) {
        let mut id = [0u8; ID_BYTES];
        let bytes = self.id.as_bytes();
        let n = bytes.len().min(ID_BYTES);
        id[..n].copy_from_slice(&bytes[..n]);
        let n = (len as usize).min(ID_BYTES);
        match request::write_stream(memory, &chain.writable, 0, &id[..n]) {
            Ok(()) => (Status::Ok, n as u64),
            Err(_) => (Status::IoError, 0),
        }
    }

    /// Discard (`zero` false) or write-zeroes (`zero` true) of every range in the request.
    fn ranges(&mut self, chain: &Chain, memory: &GuestMemory, len: u64, zero: bool) -> Status {
        if self.read_only {
            return Status::IoError;
        }
        let count = len / RANGE_LEN;
        if len % RANGE_LEN != 0 || count == 0 || count > u64::from(MAX_RANGES) {
            return Status::IoError;
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for i in 0..count {
            let mut raw = [0u8; RANGE_LEN as usize];
            let from = HEADER_LEN + i * RANGE_LEN;
            if request::read_stream(memory, &chain.readable, from, &mut raw).is_err() {
                return Status::IoError;
            }
            let field = |at: usize, n: usize| {
                raw[at..at + n]
                    .iter()
                    .rev()
                    .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
            };
            let (sector, sectors, flags) = (field(0, 8), field(8, 4), field(12, 4) as u32);
            let allowed_flags = if zero {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed_flags != 0 {
                return Status::Unsupported;
            }
            let bytes = sectors * SECTOR_SIZE;
            let in_disk = sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|offset| offset.checked_add(bytes))
                .is_some_and(|end| end <= self.capacity_bytes());
            if sectors > u64::from(MAX_RANGE_SECTORS) || !in_disk {
                return Status::IoError;
            }
            ranges.push((sector * SECTOR_SIZE, bytes, flags != 0));
        }
        for (offset, bytes, unmap) in ranges {
            let result = if zero {
                self.stats.write_zeroes += 1;
                self.backend.write_zeroes(offset, bytes, unmap)
            } else {
                self.stats.discards += 1;
                self.backend.discard(offset, bytes)
            };
            if let Err(e) = result {
                self.log_error(&e);
                return Status::IoError;
            }
        }
        Status::Ok
    }

    fn log_error(&self, error: &crate::disk::BackendError) {
        tracing::warn!("disk {}: {error}", self.index);
    }
}

/// The status byte of a chain: the last byte of its last descriptor, which must be writable.
fn status_byte(chain: &Chain, memory: &GuestMemory) -> Option<vm_memory::GuestAddress> {
    let last: &Segment = chain.writable.last()?;
    if last.len == 0 {
        return None;
    }
    let addr = last.addr.checked_add(u64::from(last.len) - 1)?;
    vm_memory::GuestMemoryBackend::check_range(memory, addr, 1).then_some(addr)
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            if self.backend.supports_discard() {
                features |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            if self.backend.supports_write_zeroes() {
                features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        let start = offset as usize;
        if let Some(src) = start
            .checked_add(data.len())
            .and_then(|end| config.get(start..end))
        {
            data.copy_from_slice(src);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in virtio-blk's config space is writable without CONFIG_WCE, not offered.
    }

    fn activate(&mut self, features: u64) {
        self.acked = features;
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
        hold: &AtomicBool,
    ) -> Result<bool, QueueFault> {
        let mut completed = false;
        loop {
            // Ordering: the VMM raises `hold` before it asks the vCPUs to pause; a request not
            // started yet stays in the ring, so the pause waits for one request at most.
            if hold.load(Ordering::Acquire) {
                return Ok(completed);
            }
            let chain = match queue.iter(memory) {
                Ok(mut available) => available.next(),
                Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                    return Err(QueueFault::AvailIndexTooFar)
                }
                Err(_) => return Err(QueueFault::RingsUnusable),
            };
            let Some(chain) = chain else {
                return Ok(completed);
            };
            let head = chain.head_index();
            let parsed = request::collect(chain, memory).map_err(|_| QueueFault::NoStatus)?;
            let status_at = status_byte(&parsed, memory).ok_or(QueueFault::NoStatus)?;
            let (status, data_written) = self.execute(&parsed, memory);
            match status {
                Status::IoError => self.stats.io_errors += 1,
                Status::Unsupported => self.stats.unsupported += 1,
                Status::Ok => {}
            }
            vm_memory::Bytes::write_obj(memory, status.byte(), status_at)
                .map_err(|e| QueueFault::UsedRing(e.to_string()))?;
            let used_len = u32::try_from(data_written + 1).unwrap_or(u32::MAX);
            queue
                .add_used(memory, head, used_len)
                .map_err(|e| QueueFault::UsedRing(e.to_string()))?;
            completed = true;
        }
    }

    fn reset(&mut self) {
        self.acked = 0;
    }
}
