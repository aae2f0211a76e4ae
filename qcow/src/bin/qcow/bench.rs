//! `qcow bench`: qemu-img bench's request loop. Requests run one after another on one thread;
//! `-d DEPTH` is accepted and reported but does not add parallelism.

use std::time::Instant;

use anyhow::{bail, Result};

use qcow::Disk;

/// Parameters, named after qemu-img bench's options.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub count: u64,
    pub depth: u64,
    pub offset: u64,
    pub buffer_size: u64,
    pub step: Option<u64>,
    pub write: bool,
    pub pattern: u8,
    pub flush_interval: u64,
    pub flush_each_write: bool,
    pub drain: bool,
    pub quiet: bool,
}

/// Runs the benchmark and returns the elapsed seconds.
pub fn run(disk: &mut Disk, options: &BenchOptions) -> Result<f64> {
    let size = disk.size();
    let buffer_size = options.buffer_size;
    let step = options.step.unwrap_or(buffer_size);
    if buffer_size == 0 || buffer_size > size {
        bail!("buffer size {buffer_size} must be between 1 and the image size {size}");
    }
    if !options.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            options.count,
            if options.write { "write" } else { "read" },
            buffer_size,
            options.depth,
            options.offset,
            step
        );
        if options.flush_interval > 0 {
            println!("Sending flush every {} requests", options.flush_interval);
        }
    }
    // A page-aligned buffer, like qemu's: the kernel copies into aligned memory much faster.
    let mut storage = vec![options.pattern; buffer_size as usize + 4096];
    let misalignment = storage.as_ptr() as usize % 4096;
    let start = (4096 - misalignment) % 4096;
    let buf = &mut storage[start..start + buffer_size as usize];
    let span = size - buffer_size;
    let mut offset = options.offset % (span + 1);
    let started = Instant::now();
    for i in 0..options.count {
        if options.write {
            disk.write_at(buf, offset)?;
            if options.flush_each_write
                || (options.flush_interval > 0 && (i + 1) % options.flush_interval == 0)
            {
                disk.flush()?;
            }
        } else {
            disk.read_at(buf, offset)?;
        }
        // qemu-img 10.0 wraps at the image size; a request that would then run past the end
        // starts over inside the image instead of failing.
        offset = (offset + step) % size;
        if offset > span {
            offset %= span + 1;
        }
    }
    // Like qemu-img bench, the time covers the requests; the final flush happens at close.
    let secs = started.elapsed().as_secs_f64();
    if !options.quiet {
        println!("Run completed in {secs:.3} seconds.");
    }
    Ok(secs)
}
