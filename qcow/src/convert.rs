//! `convert`: copies a disk (raw or qcow2, through its backing chain) into a new raw or qcow2
//! image, sparse-aware like `qemu-img convert`: ranges that read as zeros are not written,
//! optionally compressing every cluster (on all cores) or leaving to a new backing file (`-B`)
//! what the source's own backing chain holds.

use std::path::Path;

use crate::create::{create_raw, create_with, CreateOptions};
use crate::disk::{Disk, Format};
use crate::error::{Error, Result};
use crate::image::{Compressor, OpenOptions};
use crate::monitor::{checkpoint, Monitor};
use crate::status::Allocation;

/// Bytes handled per step (a whole number of clusters of any size).
const CHUNK: u64 = 2 << 20;

/// What `convert` writes.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub format: Format,
    /// qcow2 creation options of the target (its size is the source's; `backing_file` /
    /// `backing_format` are `-B` / `-F`).
    pub create: CreateOptions,
    /// Write compressed clusters (qcow2 only).
    pub compress: bool,
    /// Zero runs at least this long are not written (`-S`; 0 writes everything).
    pub min_sparse: u64,
    /// Flushes reach the disk (`false` = qemu's cache=unsafe for the target).
    pub sync: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            format: Format::Raw,
            create: CreateOptions::default(),
            compress: false,
            min_sparse: 4096,
            sync: true,
        }
    }
}

/// Why `convert` refuses its options.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("Compression not supported for this file format")]
    CompressionNotSupported,
    #[error("Backing file not supported for file format '{0}'")]
    BackingNotSupported(&'static str),
}

/// What one target unit (a qcow2 cluster, or a sparse-detection block of a raw file) needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Reads as the target already does (zeros, or its backing file): nothing to write.
    Skip,
    /// Must read as zeros over a backing file (or be allocated with `-S 0`).
    Zero,
    /// Holds data: read it from the source.
    Data,
}

/// Copies `source` into a new image at `target`. The target is created here; if this fails or is
/// interrupted, the caller decides what to do with the partial target.
pub fn convert(
    source: &mut Disk,
    target: &Path,
    options: &ConvertOptions,
    monitor: &mut dyn Monitor,
) -> Result<()> {
    let size = source.size();
    let with_backing = options.create.backing_file.is_some();
    match options.format {
        Format::Raw if options.compress => {
            return Err(Error::Convert(ConvertError::CompressionNotSupported))
        }
        Format::Raw if with_backing => {
            return Err(Error::Convert(ConvertError::BackingNotSupported("raw")))
        }
        Format::Raw => create_raw(target, size)?,
        // QEMU creates the target and fails at its first write; refusing first leaves nothing.
        Format::Qcow2 if options.compress && options.create.data_file.is_some() => {
            return Err(Error::NotWithDataFile("compressed writes"))
        }
        Format::Qcow2 => {
            let create = CreateOptions {
                size,
                ..options.create.clone()
            };
            create_with(target, &create, true)?;
        }
    }
    let open = OpenOptions {
        no_backing: true,
        sync: options.sync,
        ..OpenOptions::default()
    };
    let mut out = Disk::open(target, Some(options.format), &open)?;
    let unit = match &out {
        Disk::Qcow2(image) => image.cluster_size(),
        Disk::Raw(_) => options.min_sparse.div_ceil(512).max(1) * 512,
    };
    let compressor = match &mut out {
        Disk::Qcow2(image) if options.compress => Some(image.compressor()),
        _ => None,
    };
    // With -B the target's backing file shows what the source's backing chain holds, so only the
    // source's top layer is looked at.
    let layers = if with_backing { 1 } else { usize::MAX };
    let settings = Settings {
        unit,
        with_backing,
        write_zeros: options.min_sparse == 0,
        compressor,
    };
    monitor.start(size);
    // Pipeline: this thread plans, reads and compresses chunk N+1 while the writer thread writes
    // chunk N (the two files' page-cache work then overlaps, as QEMU's coroutines make it).
    let (jobs, incoming) = std::sync::mpsc::sync_channel::<Job>(1);
    let (recycle, spare) = std::sync::mpsc::channel::<Vec<u8>>();
    let written = std::thread::scope(|scope| {
        let writer = scope.spawn(|| -> Result<()> {
            for job in incoming {
                settings.write_job(&mut out, &job)?;
                let _ = recycle.send(job.buf);
            }
            Ok(())
        });
        let read = (|| -> Result<()> {
            let mut offset = 0;
            while offset < size {
                checkpoint(monitor)?;
                let len = CHUNK.min(size - offset);
                let buf = spare
                    .try_recv()
                    .unwrap_or_else(|_| vec![0u8; CHUNK as usize]);
                let job = settings.read_job(source, offset, len, layers, buf)?;
                if jobs.send(job).is_err() {
                    // The writer stopped on an error: it reports it.
                    break;
                }
                offset += len;
                monitor.advance(offset);
            }
            Ok(())
        })();
        drop(jobs);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Compress("the writer thread panicked".into())));
        read.and(written)
    });
    // Ordering: the target is closed (flushed) only after every chunk was written.
    let closed = out.close();
    written.and(closed)
}

/// What stays the same for every chunk of a conversion.
struct Settings {
    /// Target granularity: qcow2 cluster or raw sparse block.
    unit: u64,
    with_backing: bool,
    /// `-S 0`: zero ranges are written too.
    write_zeros: bool,
    compressor: Option<Compressor>,
}

/// One chunk, read and planned, on its way to the writer.
struct Job {
    offset: u64,
    len: u64,
    plan: Vec<Action>,
    buf: Vec<u8>,
    packed: Vec<Option<Vec<u8>>>,
}

impl Settings {
    /// Classifies every unit of `[offset, offset + len)` from the source's block status.
    fn plan(&self, source: &mut Disk, offset: u64, len: u64, layers: usize) -> Result<Vec<Action>> {
        let units = len.div_ceil(self.unit) as usize;
        let mut plan = vec![Action::Skip; units];
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let extent = source.status(pos, end - pos, layers)?;
            let action = match extent.allocation {
                Allocation::Data => Action::Data,
                Allocation::Zero if self.with_backing || self.write_zeros => Action::Zero,
                Allocation::Unallocated if !self.with_backing && self.write_zeros => Action::Zero,
                Allocation::Zero | Allocation::Unallocated => Action::Skip,
            };
            let first = ((pos - offset) / self.unit) as usize;
            let last = ((pos + extent.len - 1 - offset) / self.unit) as usize;
            for slot in &mut plan[first..=last] {
                // A unit that is partly data is copied whole; partly zero over a backing file
                // is zeroed.
                *slot = (*slot).max_with(action);
            }
            pos += extent.len;
        }
        Ok(plan)
    }

    /// Plans a chunk, reads its data (units that turn out all zero are skipped) and compresses
    /// it when asked.
    fn read_job(
        &self,
        source: &mut Disk,
        offset: u64,
        len: u64,
        layers: usize,
        mut buf: Vec<u8>,
    ) -> Result<Job> {
        let mut plan = self.plan(source, offset, len, layers)?;
        let data = &mut buf[..len as usize];
        if plan.contains(&Action::Data) {
            source.read_at(data, offset)?;
            for (index, action) in plan.iter_mut().enumerate() {
                if *action != Action::Data {
                    continue;
                }
                let start = index * self.unit as usize;
                let stop = (start + self.unit as usize).min(data.len());
                if !self.write_zeros && is_zero(&data[start..stop]) {
                    *action = if self.with_backing {
                        Action::Zero
                    } else {
                        Action::Skip
                    };
                }
            }
        }
        let packed = match self.compressor {
            Some(compressor) => compress_all(compressor, data, &plan, self.unit as usize)?,
            None => Vec::new(),
        };
        Ok(Job {
            offset,
            len,
            plan,
            buf,
            packed,
        })
    }

    /// Writes a chunk's data and zeros into the target.
    fn write_job(&self, target: &mut Disk, job: &Job) -> Result<()> {
        let (offset, len, plan) = (job.offset, job.len, &job.plan);
        let buf = &job.buf[..len as usize];
        let mut index = 0;
        while index < plan.len() {
            let action = plan[index];
            let run = plan[index..].iter().take_while(|&&a| a == action).count();
            let start = index as u64 * self.unit;
            let stop = ((index + run) as u64 * self.unit).min(len);
            match action {
                Action::Skip => {}
                // `-S 0` allocates zeros too; otherwise zero ranges may stay unallocated.
                Action::Zero => {
                    target.write_zeroes(offset + start, stop - start, !self.write_zeros)?
                }
                Action::Data if self.compressor.is_some() => {
                    let image = target.as_qcow2().ok_or(Error::ReadOnly)?;
                    for (i, unit_index) in (index..index + run).enumerate() {
                        let at = start as usize + i * self.unit as usize;
                        let data = &buf[at..(at + self.unit as usize).min(buf.len())];
                        let blob = job.packed.get(unit_index).cloned().flatten();
                        image.write_packed(offset + at as u64, data, blob)?;
                    }
                }
                Action::Data => {
                    target.write_at(&buf[start as usize..stop as usize], offset + start)?
                }
            }
            index += run;
        }
        Ok(())
    }
}

impl Action {
    /// The stronger of two actions for one unit (data beats zero beats skip).
    fn max_with(self, other: Action) -> Action {
        match (self, other) {
            (Action::Data, _) | (_, Action::Data) => Action::Data,
            (Action::Zero, _) | (_, Action::Zero) => Action::Zero,
            _ => Action::Skip,
        }
    }
}

/// Whether every byte of `buf` is zero.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let (words, tail) = buf.split_at(buf.len() / 16 * 16);
    words
        .chunks_exact(16)
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// A unit's index and its compressed bytes (`None`: did not compress).
type Packed = (usize, Option<Vec<u8>>);

/// Compresses the data units of `buf` on every core; entry `i` is unit `i`'s compressed bytes.
fn compress_all(
    compressor: Compressor,
    buf: &[u8],
    plan: &[Action],
    unit: usize,
) -> Result<Vec<Option<Vec<u8>>>> {
    let jobs: Vec<usize> = (0..plan.len())
        .filter(|&i| plan[i] == Action::Data)
        .collect();
    let mut out = vec![None; plan.len()];
    if jobs.is_empty() {
        return Ok(out);
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len());
    let per_thread = jobs.len().div_ceil(threads);
    let results: Vec<Result<Vec<Packed>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks(per_thread)
            .map(|share| {
                scope.spawn(move || {
                    share
                        .iter()
                        .map(|&i| {
                            let start = i * unit;
                            let data = &buf[start..(start + unit).min(buf.len())];
                            compressor.compress(data).map(|blob| (i, blob))
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle.join().unwrap_or_else(|_| {
                    Err(Error::Compress("a compression thread panicked".into()))
                })
            })
            .collect()
    });
    for result in results {
        for (i, blob) in result? {
            out[i] = blob;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 100]));
        let mut buf = [0u8; 100];
        buf[99] = 1;
        assert!(!is_zero(&buf));
        buf[99] = 0;
        buf[3] = 1;
        assert!(!is_zero(&buf));
        assert!(is_zero(&[]));
    }

    #[test]
    fn data_beats_zero_beats_skip() {
        assert_eq!(Action::Skip.max_with(Action::Zero), Action::Zero);
        assert_eq!(Action::Zero.max_with(Action::Data), Action::Data);
        assert_eq!(Action::Skip.max_with(Action::Skip), Action::Skip);
    }
}
