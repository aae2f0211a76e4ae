//! The fuzz target: everything a user may do with an untrusted image, on an in-memory file.
//! Errors are fine; panics, hangs and huge allocations are the findings.

use std::io;

use qcow::{CreateOptions, Image, OpenOptions, Repair, Storage};

/// Largest file the target lets an image grow to: a hostile L2 entry pointing at 2^55 must get an
/// error from the storage, not a 32 PiB `Vec`.
pub const STORAGE_CAP: u64 = 64 << 20;
/// Clusters read per pass (spread over the whole disk when it has more).
const MAX_READS: u64 = 512;

/// A growable in-memory file with a size cap.
#[derive(Debug, Default, Clone)]
pub struct CappedStorage {
    pub data: Vec<u8>,
}

impl CappedStorage {
    fn check_end(offset: u64, len: usize) -> io::Result<usize> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= STORAGE_CAP => Ok(end as usize),
            _ => Err(io::Error::other("fuzz storage cap reached")),
        }
    }
}

impl Storage for CappedStorage {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let len = self.data.len() as u64;
        if offset < len {
            let start = offset as usize;
            let n = buf.len().min(self.data.len() - start);
            buf[..n].copy_from_slice(&self.data[start..start + n]);
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = Self::check_end(offset, buf.len())?;
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn len(&mut self) -> io::Result<u64> {
        Ok(self.data.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let end = Self::check_end(len, 0)?;
        self.data.resize(end, 0);
        Ok(())
    }
}

/// What a case got through (for statistics; any outcome without a panic is a pass).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub opened: bool,
    pub reads_ok: u64,
    pub checked: bool,
    pub wrote: bool,
}

/// Opens `data` read-only, reads clusters across the disk, maps and checks it; then opens a
/// copy read-write, writes, zeroes, discards, flushes and checks again.
pub fn exercise(data: &[u8]) -> Outcome {
    let mut outcome = Outcome::default();
    let read_only = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let storage = CappedStorage {
        data: data.to_vec(),
    };
    let Ok(mut image) = Image::open_storage(storage, None, &read_only) else {
        return outcome;
    };
    outcome.opened = true;
    outcome.reads_ok = read_across(&mut image);
    let _ = qcow::map(&mut image);
    outcome.checked = qcow::check(&mut image, Repair::None).is_ok();
    drop(image);

    let writable = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let storage = CappedStorage {
        data: data.to_vec(),
    };
    let Ok(mut image) = Image::open_storage(storage, None, &writable) else {
        return outcome;
    };
    let size = image.size();
    let cluster = image.cluster_size();
    let pattern = vec![0x5au8; (cluster as usize).min(64 << 10)];
    for guest in [0, size / 2, size.saturating_sub(1)] {
        let len = (pattern.len() as u64).min(size - guest.min(size)) as usize;
        if len > 0 && image.write_at(&pattern[..len], guest).is_ok() {
            outcome.wrote = true;
        }
    }
    if size > 0 {
        let _ = image.write_zeroes(size / 4, cluster.min(size - size / 4));
        let _ = image.discard(0, cluster.min(size));
        let _ = image.write_at(&pattern[..1.min(pattern.len())], size / 3);
    }
    let _ = image.flush();
    let _ = read_across(&mut image);
    let _ = qcow::check(&mut image, Repair::None);
    outcome
}

/// Reads up to `MAX_READS` clusters spread over the disk; returns how many succeeded.
fn read_across<S: Storage>(image: &mut Image<S>) -> u64 {
    let size = image.size();
    let cluster = image.cluster_size().max(1);
    let clusters = size.div_ceil(cluster);
    let stride = clusters.div_ceil(MAX_READS).max(1);
    let mut buf = vec![0u8; cluster as usize];
    let mut ok = 0;
    let mut index = 0;
    while index < clusters {
        let offset = index * cluster;
        let len = cluster.min(size - offset) as usize;
        if image.read_at(&mut buf[..len], offset).is_ok() {
            ok += 1;
        }
        index += stride;
    }
    ok
}

/// Seeds made with the library itself, so the fuzzer runs without qemu-img: several cluster
/// sizes, refcount widths, v2/v3, with data, zero clusters and a discard.
pub fn builtin_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (cluster_size, refcount_bits, version, size) in [
        (512u64, 16u32, 3u32, 256u64 << 10),
        (4096, 1, 3, 1 << 20),
        (4096, 64, 3, 2 << 20),
        (65536, 16, 3, 4 << 20),
        (65536, 16, 2, 4 << 20),
    ] {
        let options = CreateOptions {
            size,
            cluster_size,
            refcount_bits,
            version,
            ..CreateOptions::default()
        };
        let mut storage = CappedStorage::default();
        if qcow::create_on(&mut storage, &options).is_err() {
            continue;
        }
        let Ok(mut image) = Image::open_storage(storage, None, &OpenOptions::default()) else {
            continue;
        };
        let data = vec![0xa5u8; (cluster_size * 3) as usize];
        let _ = image.write_at(&data, 0);
        let _ = image.write_at(&data[..1000], size / 2 + 7);
        let _ = image.write_zeroes(size / 4, cluster_size);
        let _ = image.discard(cluster_size, cluster_size);
        let _ = image.flush();
        seeds.push(image.storage_mut().data.clone());
    }
    seeds
}
