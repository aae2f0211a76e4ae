//! The disk workload (`disk=1`) and benchmark (`disk_bench=N`) on the first disk, run by vCPU 0:
//! see `cowvm_guest_abi::disk` for the algorithm the host oracle replays.

use cowvm_guest_abi::boot_info::BootInfo;
use cowvm_guest_abi::disk::{block_contribution, block_op, fill_block, BlockOp, SECTORS_PER_BLOCK};
use cowvm_guest_abi::layout::disk_area_addr;
use cowvm_guest_abi::workload::{mix64, page_digest};
use cowvm_guest_abi::WorkloadArgs;

use crate::io::Serial;
use crate::virtio::{Blk, Failed, Request, SLOTS};

/// What went wrong, for the guest's error line.
pub enum DiskError {
    Setup(&'static str),
    NoDisk,
    TooSmall { capacity: u64 },
    Request { block: u64, status: u8 },
    Verify { block: u64, round: u64 },
}

/// The first block device listed in the boot-info page, initialized.
pub fn open(info: &BootInfo<'_>, args: &WorkloadArgs) -> Result<Blk, DiskError> {
    let device = info.devices[..info.device_count as usize]
        .iter()
        .find(|d| d.device_id == 2)
        .ok_or(DiskError::NoDisk)?;
    let mut blk = Blk::init(device.base, disk_area_addr(args.pages)).map_err(DiskError::Setup)?;
    // The benchmark's random phases use a second region of disk_blocks blocks.
    let regions = if args.disk_bench > 0 { 2 } else { 1 };
    if blk.capacity < regions * args.disk_blocks * SECTORS_PER_BLOCK {
        return Err(DiskError::TooSmall { capacity: blk.capacity });
    }
    blk.run(&[Request::GetId]).map_err(|f| request_error(f, 0))?;
    Serial.str("disk0: ").dec(blk.capacity).str(" sectors, id ");
    // SAFETY: slot 0's request is complete.
    let id = unsafe { blk.data(0) };
    for word in id.iter().take(3) {
        for byte in word.to_le_bytes() {
            if byte != 0 {
                Serial.byte(byte);
            }
        }
    }
    Serial.str("\n");
    Ok(blk)
}

fn request_error(failed: Failed, first_block: u64) -> DiskError {
    DiskError::Request {
        block: first_block + failed.slot as u64,
        status: failed.status,
    }
}

/// Round `round` of the disk workload: write and zero this round's blocks, flush, read them
/// back and check them.
pub fn round(
    blk: &mut Blk,
    args: &WorkloadArgs,
    round: u64,
    generation: u64,
) -> Result<(), DiskError> {
    let batch = (args.disk_batch as usize).min(SLOTS);
    let mut blocks = [0u64; SLOTS];
    let mut ops = [BlockOp::Zero; SLOTS];
    let mut requests = [Request::Flush; SLOTS];
    let mut next = 0;
    // Writes, then (after a flush) the read-back, in batches of this round's blocks.
    while next < args.disk_blocks {
        let mut n = 0;
        while n < batch && next < args.disk_blocks {
            if let Some(op) = block_op(args, next, round, generation) {
                blocks[n] = next;
                ops[n] = op;
                requests[n] = match op {
                    BlockOp::Write(key) => {
                        // SAFETY: slot n is not in flight.
                        fill_block(unsafe { blk.data(n) }, key);
                        Request::Write(next * SECTORS_PER_BLOCK)
                    }
                    BlockOp::Zero => Request::Zero(next * SECTORS_PER_BLOCK),
                };
                n += 1;
            }
            next += 1;
        }
        if n == 0 {
            continue;
        }
        blk.run(&requests[..n]).map_err(|f| DiskError::Request {
            block: blocks[f.slot],
            status: f.status,
        })?;
        blk.run(&[Request::Flush]).map_err(|f| request_error(f, blocks[0]))?;
        for i in 0..n {
            // Clear the data so a read that writes nothing is caught.
            // SAFETY: slot i is not in flight.
            unsafe { blk.data(i) }.fill(0x5a5a_5a5a_5a5a_5a5a);
            requests[i] = Request::Read(blocks[i] * SECTORS_PER_BLOCK);
        }
        blk.run(&requests[..n]).map_err(|f| DiskError::Request {
            block: blocks[f.slot],
            status: f.status,
        })?;
        for i in 0..n {
            // SAFETY: slot i's read is complete.
            let words = unsafe { blk.data(i) };
            let good = match ops[i] {
                BlockOp::Write(key) => words.iter().enumerate().all(|(w, &word)| {
                    word == mix64(key ^ (w as u64).wrapping_mul(0xa076_1d64_78bd_642f))
                }),
                BlockOp::Zero => words.iter().all(|&word| word == 0),
            };
            if !good {
                return Err(DiskError::Verify {
                    block: blocks[i],
                    round,
                });
            }
        }
    }
    Ok(())
}

/// Reads every workload block and sums their contributions to the digest.
pub fn digest(blk: &mut Blk, args: &WorkloadArgs) -> Result<u64, DiskError> {
    let batch = (args.disk_batch as usize).min(SLOTS) as u64;
    let mut requests = [Request::Flush; SLOTS];
    let mut digest = 0u64;
    let mut first = 0;
    while first < args.disk_blocks {
        let n = batch.min(args.disk_blocks - first);
        for i in 0..n {
            requests[i as usize] = Request::Read((first + i) * SECTORS_PER_BLOCK);
        }
        blk.run(&requests[..n as usize]).map_err(|f| request_error(f, first))?;
        for i in 0..n {
            // SAFETY: slot i's read is complete.
            let words = unsafe { blk.data(i as usize) };
            digest = digest.wrapping_add(block_contribution(first + i, page_digest(words)));
        }
        first += n;
    }
    Ok(digest)
}

/// The benchmark: `disk_bench` 4 KiB requests per phase, in batches of `disk_batch`. Each phase
/// starts with a line `bench <phase>` (the host times the gaps between lines); writes end with
/// a flush, so the time covers making them durable. The sequential phases use the first
/// `disk_blocks` blocks, the random ones the next `disk_blocks`, so random writes to a fresh
/// image allocate as sequential ones do.
pub fn bench(blk: &mut Blk, args: &WorkloadArgs) -> Result<(), DiskError> {
    let batch = (args.disk_batch as usize).min(SLOTS) as u64;
    let phases: [(&str, bool, bool); 4] = [
        ("seq-write", true, false),
        ("seq-read", false, false),
        ("rand-write", true, true),
        ("rand-read", false, true),
    ];
    let mut requests = [Request::Flush; SLOTS];
    for (name, write, random) in phases {
        Serial.str("bench ").str(name).str("\n");
        let mut done = 0;
        while done < args.disk_bench {
            let n = batch.min(args.disk_bench - done);
            for i in 0..n {
                let op = done + i;
                let block = if random {
                    args.disk_blocks + mix64(args.seed ^ op ^ 0x7261_6e64) % args.disk_blocks
                } else {
                    op % args.disk_blocks
                };
                let sector = block * SECTORS_PER_BLOCK;
                requests[i as usize] = if write {
                    // SAFETY: slot i is not in flight.
                    let words = unsafe { blk.data(i as usize) };
                    words[0] = op;
                    Request::Write(sector)
                } else {
                    Request::Read(sector)
                };
            }
            blk.run(&requests[..n as usize]).map_err(|f| request_error(f, done))?;
            done += n;
        }
        if write {
            blk.run(&[Request::Flush]).map_err(|f| request_error(f, 0))?;
        }
    }
    Serial.str("bench end\n");
    Ok(())
}
