//! Crash test: the image runs on a storage layer that records every write, resize and flush. For
//! every point of a random workload, power loss is simulated: everything before the last flush is
//! kept, and of the operations after it a random subset survives — some torn at 512-byte sector
//! granularity, in random order. Every crashed image must open, have no corruption under the
//! library's check (and, on a sample, under `qemu-img check`), accept new writes, and return the
//! content of every write acknowledged by a completed `flush`.
#![allow(clippy::unwrap_used)]

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use qcow::{CreateOptions, Image, MemStorage, OpenOptions, Repair, Storage};

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Flush,
}

/// Storage that applies operations to memory and logs them.
#[derive(Debug, Clone)]
struct Recording {
    mem: MemStorage,
    log: Arc<Mutex<Vec<Op>>>,
}

impl Storage for Recording {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.log.lock().unwrap().push(Op::Write {
            offset,
            data: buf.to_vec(),
        });
        self.mem.write_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.log.lock().unwrap().push(Op::Flush);
        Ok(())
    }
    fn len(&mut self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.log.lock().unwrap().push(Op::SetLen(len));
        self.mem.set_len(len)
    }
}

fn apply(mem: &mut MemStorage, op: &Op) {
    match op {
        Op::Write { offset, data } => mem.write_at(data, *offset).unwrap(),
        Op::SetLen(len) => {
            if mem.data.len() < *len as usize {
                mem.set_len(*len).unwrap();
            }
        }
        Op::Flush => {}
    }
}

/// A guest-visible operation of the workload and where it sits in the log.
struct GuestOp {
    /// Log length when the operation started.
    log_start: usize,
    range: (u64, u64),
}

/// A completed explicit flush: log length when it returned, and the guest content then.
struct Durable {
    log_end: usize,
    model: Vec<u8>,
    ops_done: usize,
}

struct Workload {
    base: MemStorage,
    log: Vec<Op>,
    guest_ops: Vec<GuestOp>,
    durable: Vec<Durable>,
    initial_model: Vec<u8>,
}

#[derive(Clone, Copy)]
struct Config {
    cluster_size: u64,
    refcount_bits: u32,
    size: u64,
    backing: bool,
    /// Start from an image with data and an internal snapshot made by `qemu-img snapshot -c`, so
    /// writes copy shared L2 tables and data clusters.
    snapshot: bool,
    /// Mix internal snapshot creates, applies and deletes into the workload.
    snapshot_ops: bool,
    /// Extended L2 entries (subcluster allocation).
    extended_l2: bool,
    ops: usize,
    /// Crash images per crash point.
    variants: usize,
    qemu_samples: usize,
}

fn options() -> OpenOptions {
    // Tiny caches force evictions, which must respect the same ordering as flushes.
    OpenOptions {
        l2_cache_bytes: 0,
        refcount_cache_bytes: 0,
        ..OpenOptions::default()
    }
}

fn make_backing(dir: &Path, size: u64, rng: &mut fastrand::Rng) -> Vec<u8> {
    let path = dir.join("base.qcow2");
    qcow::create(
        &path,
        &CreateOptions {
            size,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let mut base = Image::open(&path, &OpenOptions::default()).unwrap();
    let mut data = vec![0u8; size as usize];
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        if i % 3 != 2 {
            chunk.fill(rng.u8(1..));
        }
    }
    base.write_at(&data, 0).unwrap();
    base.flush().unwrap();
    data
}

fn run_workload(config: &Config, dir: &Path, rng: &mut fastrand::Rng) -> Workload {
    let mut model = vec![0u8; config.size as usize];
    let mut create = CreateOptions {
        size: config.size,
        cluster_size: config.cluster_size,
        refcount_bits: config.refcount_bits,
        extended_l2: config.extended_l2,
        ..CreateOptions::default()
    };
    if config.backing {
        let data = make_backing(dir, config.size, rng);
        model.copy_from_slice(&data);
        create.backing_file = Some("base.qcow2".into());
        create.backing_format = Some("qcow2".into());
    }
    let mut base = MemStorage::default();
    if config.snapshot {
        let file = dir.join("snap.qcow2");
        qcow::create(&file, &create).unwrap();
        let mut image = Image::open(&file, &OpenOptions::default()).unwrap();
        for (i, chunk) in model.chunks_mut(3000).enumerate() {
            if i % 4 != 3 {
                chunk.fill(rng.u8(1..));
            }
        }
        image.write_at(&model, 0).unwrap();
        image.flush().unwrap();
        drop(image);
        let out = Command::new("qemu-img")
            .args(["snapshot", "-c", "before", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-img snapshot -c failed");
        base.data = std::fs::read(&file).unwrap();
    } else {
        qcow::create_on(&mut base, &create).unwrap();
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let storage = Recording {
        mem: base.clone(),
        log: log.clone(),
    };
    let image_path = dir.join("overlay.qcow2");
    let mut image = Image::open_storage(storage, Some(image_path), &options()).unwrap();
    let initial_model = model.clone();
    let mut guest_ops = Vec::new();
    let mut durable = Vec::new();
    let cluster = config.cluster_size;
    let mut snapshots: Vec<(String, Vec<u8>)> = Vec::new();
    for _ in 0..config.ops {
        let log_start = log.lock().unwrap().len();
        if config.snapshot_ops && rng.u8(0..12) == 0 {
            // Snapshot operations flush: what they leave is durable when they return.
            let range = match (rng.u8(0..3), snapshots.is_empty()) {
                (0, _) | (_, true) if snapshots.len() < 3 => {
                    let new = qcow::NewSnapshot {
                        name: format!("s{}", snapshots.len()),
                        ..qcow::NewSnapshot::default()
                    };
                    let snapshot = image.create_snapshot(&new).unwrap();
                    snapshots.push((snapshot.id, model.clone()));
                    (0, 0)
                }
                (1, false) => {
                    let pick = rng.usize(0..snapshots.len());
                    let index = image.find_snapshot(&snapshots[pick].0).unwrap();
                    image.apply_snapshot(index).unwrap();
                    model = snapshots[pick].1.clone();
                    (0, config.size)
                }
                (_, false) => {
                    let pick = rng.usize(0..snapshots.len());
                    let index = image.find_snapshot(&snapshots[pick].0).unwrap();
                    image.delete_snapshot(index).unwrap();
                    snapshots.remove(pick);
                    (0, 0)
                }
                _ => continue,
            };
            guest_ops.push(GuestOp { log_start, range });
            durable.push(Durable {
                log_end: log.lock().unwrap().len(),
                model: model.clone(),
                ops_done: guest_ops.len(),
            });
            continue;
        }
        let len = rng.u64(1..=cluster * 2).min(config.size);
        let offset = rng.u64(0..=config.size - len);
        match rng.u8(0..10) {
            0..=5 => {
                let byte = rng.u8(1..);
                image.write_at(&vec![byte; len as usize], offset).unwrap();
                model[offset as usize..(offset + len) as usize].fill(byte);
            }
            6 => {
                image.write_zeroes(offset, len).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            7 => {
                // v3 discard: whole clusters read as zeros afterwards.
                image.discard(offset, len).unwrap();
                let end = offset + len;
                let mut start = offset.div_ceil(cluster) * cluster;
                while start < end && (start + cluster).min(config.size) <= end {
                    let stop = (start + cluster).min(config.size);
                    model[start as usize..stop as usize].fill(0);
                    start += cluster;
                }
            }
            _ => {
                image.flush().unwrap();
                durable.push(Durable {
                    log_end: log.lock().unwrap().len(),
                    model: model.clone(),
                    ops_done: guest_ops.len(),
                });
                continue;
            }
        }
        guest_ops.push(GuestOp {
            log_start,
            range: (offset, offset + len),
        });
    }
    image.flush().unwrap();
    durable.push(Durable {
        log_end: log.lock().unwrap().len(),
        model: model.clone(),
        ops_done: guest_ops.len(),
    });
    drop(image);
    let log = log.lock().unwrap().clone();
    Workload {
        base,
        log,
        guest_ops,
        durable,
        initial_model,
    }
}

/// The crashed file for power loss right before log position `point`.
fn crash_image(
    workload: &Workload,
    point: usize,
    rng: &mut fastrand::Rng,
    variant: usize,
) -> MemStorage {
    let mut mem = workload.base.clone();
    let last_flush = workload.log[..point]
        .iter()
        .rposition(|op| matches!(op, Op::Flush))
        .map_or(0, |i| i + 1);
    for op in &workload.log[..last_flush] {
        apply(&mut mem, op);
    }
    let mut in_flight: Vec<&Op> = workload.log[last_flush..point].iter().collect();
    if variant == 0 {
        // Everything issued made it, in order.
        for op in in_flight {
            apply(&mut mem, op);
        }
        return mem;
    }
    rng.shuffle(&mut in_flight);
    for op in in_flight {
        match (op, rng.u8(0..3)) {
            (_, 0) => {}
            (Op::Write { offset, data }, 1) if data.len() > 512 => {
                // Torn: a random subset of its sectors.
                let mut at = 0;
                while at < data.len() {
                    let sector_end = (((*offset as usize + at) / 512 + 1) * 512 - *offset as usize)
                        .min(data.len());
                    if rng.bool() {
                        mem.write_at(&data[at..sector_end], *offset + at as u64)
                            .unwrap();
                    }
                    at = sector_end;
                }
            }
            (op, _) => apply(&mut mem, op),
        }
    }
    mem
}

fn have_qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn verify(
    workload: &Workload,
    config: &Config,
    dir: &Path,
    point: usize,
    crashed: MemStorage,
    qemu_file: Option<PathBuf>,
    context: &str,
) {
    // A crash inside a multi-step metadata change (snapshots) leaves the dirty bit set: every
    // reader repairs such an image on its next read-write open, as QEMU does with lazy refcounts.
    let dirty = crashed.data.get(79).is_some_and(|byte| byte & 1 != 0);
    let crashed = if dirty {
        let path = dir.join("overlay.qcow2");
        let mut image = Image::open_storage(crashed, Some(path), &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{context}: dirty crashed image is not repaired: {e}"));
        image.flush().unwrap();
        image.storage_mut().clone()
    } else {
        crashed
    };
    if let Some(file) = &qemu_file {
        std::fs::write(file, &crashed.data).unwrap();
        let out = Command::new("qemu-img")
            .args(["check", file.to_str().unwrap()])
            .output()
            .unwrap();
        let code = out.status.code();
        assert!(
            code == Some(0) || code == Some(3),
            "{context}: qemu-img check found corruption (exit {code:?}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = dir.join("overlay.qcow2");
    let read_only = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let mut image = Image::open_storage(crashed.clone(), Some(path.clone()), &read_only)
        .unwrap_or_else(|e| panic!("{context}: crashed image does not open: {e}"));
    let report = qcow::check(&mut image, Repair::None)
        .unwrap_or_else(|e| panic!("{context}: check failed: {e}"));
    assert!(
        report.corruptions == 0 && report.check_errors == 0,
        "{context}: library check found corruption: {report:?}\n{}",
        report.messages.join("\n")
    );
    // Acknowledged data: the model at the last completed flush, except ranges written after it.
    let done = workload.durable.iter().rev().find(|d| d.log_end <= point);
    let (expected, first_unacked) = match done {
        Some(d) => (&d.model, d.ops_done),
        None => (&workload.initial_model, 0),
    };
    let mut undefined: Vec<(u64, u64)> = workload.guest_ops[first_unacked..]
        .iter()
        .filter(|op| op.log_start < point)
        .map(|op| op.range)
        .collect();
    undefined.sort();
    let mut actual = vec![0u8; config.size as usize];
    image
        .read_at(&mut actual, 0)
        .unwrap_or_else(|e| panic!("{context}: read failed: {e}"));
    let mut at = 0u64;
    for (start, end) in undefined
        .iter()
        .copied()
        .chain([(config.size, config.size)])
    {
        if start > at {
            let (a, e) = (
                &actual[at as usize..start as usize],
                &expected[at as usize..start as usize],
            );
            if a != e {
                let i = a.iter().zip(e).position(|(x, y)| x != y).unwrap_or(0);
                panic!(
                    "{context}: acknowledged byte {} reads {:#04x}, expected {:#04x}",
                    at + i as u64,
                    a[i],
                    e[i]
                );
            }
        }
        at = at.max(end);
    }
    drop(image);
    // The crashed image stays usable: writes after recovery keep it free of corruption.
    let mut image = Image::open_storage(crashed, Some(path), &OpenOptions::default())
        .unwrap_or_else(|e| panic!("{context}: crashed image does not open read-write: {e}"));
    image
        .write_at(
            &vec![0x5a; config.cluster_size as usize + 700],
            config.size / 3,
        )
        .unwrap_or_else(|e| panic!("{context}: write after crash: {e}"));
    let report = qcow::check(&mut image, Repair::None).unwrap();
    assert!(
        report.corruptions == 0,
        "{context}: corruption after writing to the recovered image: {report:?}"
    );
}

fn run(name: &str, config: Config) {
    if config.snapshot && !have_qemu_img() {
        println!("SKIP {name}: qemu-img is not installed (needed to make the snapshot)");
        return;
    }
    let seed = std::env::var("QCOW_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{name}: crash test seed {seed} (rerun with QCOW_CRASH_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = std::env::temp_dir().join(format!("qcow-crash-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let workload = run_workload(&config, &dir, &mut rng);
    let qemu = have_qemu_img();
    if !qemu {
        println!("SKIP qemu-img check on crash samples: qemu-img is not installed");
    }
    let points = workload.log.len() + 1;
    let sample_every = (points / config.qemu_samples.max(1)).max(1);
    println!(
        "{name}: {} logged operations, {} crash points",
        workload.log.len(),
        points
    );
    for point in 0..points {
        for variant in 0..config.variants {
            let crashed = crash_image(&workload, point, &mut rng, variant);
            let qemu_file = (qemu && variant == 1 && point % sample_every == 0)
                .then(|| dir.join("crashed.qcow2"));
            let context =
                format!("{name} seed {seed} crash point {point}/{points} variant {variant}");
            verify(
                &workload, &config, &dir, point, crashed, qemu_file, &context,
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn crash_with_small_clusters_and_cache_evictions() {
    run(
        "c512-r16",
        Config {
            cluster_size: 512,
            refcount_bits: 16,
            size: 256 * 1024,
            backing: false,
            snapshot: false,
            snapshot_ops: false,
            extended_l2: false,
            ops: 250,
            variants: 3,
            qemu_samples: 12,
        },
    );
}

#[test]
fn crash_with_64bit_refcounts_growing_the_table() {
    run(
        "c512-r64",
        Config {
            cluster_size: 512,
            refcount_bits: 64,
            size: 512 * 1024,
            backing: false,
            snapshot: false,
            snapshot_ops: false,
            extended_l2: false,
            ops: 200,
            variants: 2,
            qemu_samples: 8,
        },
    );
}

#[test]
fn crash_on_an_overlay_with_copy_on_write_from_backing() {
    run(
        "c4k-backing",
        Config {
            cluster_size: 4096,
            refcount_bits: 16,
            size: 1 << 20,
            backing: true,
            snapshot: false,
            snapshot_ops: false,
            extended_l2: false,
            ops: 200,
            variants: 3,
            qemu_samples: 10,
        },
    );
}

#[test]
fn crash_while_copying_clusters_shared_with_an_internal_snapshot() {
    run(
        "c4k-snapshot",
        Config {
            cluster_size: 4096,
            refcount_bits: 16,
            size: 512 * 1024,
            backing: false,
            snapshot: true,
            snapshot_ops: false,
            extended_l2: false,
            ops: 250,
            variants: 3,
            qemu_samples: 10,
        },
    );
}

#[test]
fn crash_during_snapshot_create_apply_delete() {
    run(
        "c4k-snapshot-ops",
        Config {
            cluster_size: 4096,
            refcount_bits: 16,
            size: 256 * 1024,
            backing: true,
            snapshot: false,
            snapshot_ops: true,
            extended_l2: false,
            ops: 150,
            variants: 2,
            qemu_samples: 8,
        },
    );
}

#[test]
fn crash_during_subcluster_writes_and_snapshots() {
    run(
        "c16k-extl2",
        Config {
            cluster_size: 16384,
            refcount_bits: 16,
            size: 512 * 1024,
            backing: true,
            snapshot: false,
            snapshot_ops: true,
            extended_l2: true,
            ops: 150,
            variants: 2,
            qemu_samples: 8,
        },
    );
}
