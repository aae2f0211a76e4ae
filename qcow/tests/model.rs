//! Model-based random test: thousands of random writes, zero-writes, discards, reads, flushes,
//! reopens and internal snapshot creates/applies/deletes against an in-memory `Vec<u8>` model (one
//! per snapshot too), over several cluster sizes, refcount widths, versions, backing files and
//! extended L2 entries (subcluster writes), external data files (raw ones must equal the model
//! byte for byte at the end). Every read must equal the model; at the end the library's own check
//! must be clean, and (when qemu-img is installed) `qemu-img check` must be clean and
//! `qemu-img compare` must find the image identical to a raw dump of the model.
//!
//! The seed is printed; rerun a failure with `QCOW_MODEL_SEED=<seed>`.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow::{CreateOptions, Image, OpenOptions, Repair};

#[derive(Debug, Clone, Copy, PartialEq)]
enum BaseKind {
    None,
    Qcow,
    Raw,
    /// Compressed qcow2 made by `qemu-img convert -c` (the image itself, not a backing file).
    Compressed,
    /// Image with an internal snapshot made by `qemu-img snapshot -c` before the random ops.
    Snapshot,
}

#[derive(Debug, Clone, Copy)]
struct Config {
    cluster_size: u64,
    refcount_bits: u32,
    version: u32,
    size: u64,
    base: BaseKind,
    /// Backing file shorter than the image (tests zeros past its end).
    base_size: u64,
    ops: usize,
    /// Minimal L2 and refcount caches, so that evictions happen all the time.
    tiny_cache: bool,
    /// Mix internal snapshot creates, applies and deletes into the operations.
    snapshots: bool,
    /// Extended L2 entries (32 subclusters per cluster).
    extended_l2: bool,
    /// Guest data in an external data file (and whether it must stay a raw image of the disk).
    data_file: DataFile,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum DataFile {
    None,
    External,
    /// `data_file_raw`: at the end the data file itself must equal the model.
    Raw,
}

fn have_qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qcow-model-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn random_bytes(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    // Runs of one byte value compress well (for the compressed base) yet differ everywhere.
    let mut i = 0;
    while i < len {
        let run = rng.usize(1..64).min(len - i);
        buf[i..i + run].fill(rng.u8(..));
        i += run;
    }
    buf
}

/// Makes the base file (if any) and the image; returns the image path and the initial model.
fn prepare(
    dir: &Path,
    config: &Config,
    rng: &mut fastrand::Rng,
    qemu: bool,
) -> Option<(PathBuf, Vec<u8>)> {
    let image = dir.join("image.qcow2");
    let mut model = vec![0u8; config.size as usize];
    let mut options = CreateOptions {
        size: config.size,
        cluster_size: config.cluster_size,
        refcount_bits: config.refcount_bits,
        version: config.version,
        extended_l2: config.extended_l2,
        // An absolute name: QEMU opens a relative one from the working directory.
        data_file: (config.data_file != DataFile::None)
            .then(|| data_file_path(dir).to_str().unwrap().to_string()),
        data_file_raw: config.data_file == DataFile::Raw,
        ..CreateOptions::default()
    };
    match config.base {
        BaseKind::None => {}
        BaseKind::Raw => {
            let data = random_bytes(rng, config.base_size as usize);
            std::fs::write(dir.join("base.raw"), &data).unwrap();
            model[..data.len()].copy_from_slice(&data);
            options.backing_file = Some("base.raw".into());
            options.backing_format = Some("raw".into());
        }
        BaseKind::Qcow => {
            let base = dir.join("base.qcow2");
            let base_options = CreateOptions {
                size: config.base_size,
                cluster_size: 65536,
                ..CreateOptions::default()
            };
            qcow::create(&base, &base_options).unwrap();
            let mut base_image = Image::open(&base, &OpenOptions::default()).unwrap();
            // Fill every other 48 KiB stretch, leaving holes that read through as zeros.
            let mut offset = 0;
            while offset < config.base_size {
                let len = (48 * 1024).min(config.base_size - offset);
                let data = random_bytes(rng, len as usize);
                base_image.write_at(&data, offset).unwrap();
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                offset += 96 * 1024;
            }
            base_image.flush().unwrap();
            options.backing_file = Some("base.qcow2".into());
            options.backing_format = Some("qcow2".into());
        }
        BaseKind::Compressed => {
            if !qemu {
                return None;
            }
            let raw = dir.join("source.raw");
            let data = random_bytes(rng, config.size as usize);
            std::fs::write(&raw, &data).unwrap();
            model.copy_from_slice(&data);
            let cluster = format!("cluster_size={}", config.cluster_size);
            let (ok, text) = qemu_img(&[
                "convert",
                "-q",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &cluster,
                raw.to_str().unwrap(),
                image.to_str().unwrap(),
            ]);
            assert!(ok, "qemu-img convert -c failed: {text}");
            return Some((image, model));
        }
        BaseKind::Snapshot => {
            if !qemu {
                return None;
            }
            qcow::create(&image, &options).unwrap();
            let mut img = Image::open(&image, &OpenOptions::default()).unwrap();
            let data = random_bytes(rng, (config.size / 2) as usize);
            img.write_at(&data, 0).unwrap();
            img.flush().unwrap();
            drop(img);
            model[..data.len()].copy_from_slice(&data);
            let (ok, text) = qemu_img(&["snapshot", "-c", "snap1", image.to_str().unwrap()]);
            assert!(ok, "qemu-img snapshot -c failed: {text}");
            return Some((image, model));
        }
    }
    qcow::create(&image, &options).unwrap();
    Some((image, model))
}

/// Where a data-file configuration keeps its guest data.
fn data_file_path(dir: &Path) -> PathBuf {
    dir.join("image.data")
}

/// The content the model gets for discarded whole clusters.
fn discarded_content(config: &Config, backing: &[u8], start: usize, end: usize) -> Vec<u8> {
    let mut out = vec![0u8; end - start];
    let has_backing = matches!(config.base, BaseKind::Qcow | BaseKind::Raw);
    if config.version < 3 && has_backing {
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = backing.get(start + i).copied().unwrap_or(0);
        }
    }
    out
}

fn run_config(name: &str, config: Config, seed: u64, qemu: bool) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = scratch_dir(name);
    let Some((path, mut model)) = prepare(&dir, &config, &mut rng, qemu) else {
        println!("SKIP {name}: qemu-img is not installed");
        return;
    };
    let backing_model = model.clone();
    let open_options = if config.tiny_cache {
        OpenOptions {
            l2_cache_bytes: 0,
            refcount_cache_bytes: 0,
            ..OpenOptions::default()
        }
    } else {
        OpenOptions::default()
    };
    let mut image = Image::open(&path, &open_options).unwrap();
    let size = config.size;
    let cluster = config.cluster_size;
    // Concentrate on a hot region so operations overlap, with occasional far-away ones.
    let hot = (size / 4).max(cluster * 4).min(size);
    // Models of the snapshots taken during the run: (id, bytes).
    let mut snapshots: Vec<(String, Vec<u8>)> = Vec::new();
    for step in 0..config.ops {
        let max_len = (cluster * 3).min(size);
        let len = match rng.u8(0..4) {
            0 => rng.u64(1..=512.min(max_len)),
            1 => cluster.min(size),
            _ => rng.u64(1..=max_len),
        };
        let region = if rng.u8(0..8) == 0 { size } else { hot };
        let mut offset = rng.u64(0..=region.saturating_sub(len).min(size - len));
        if rng.bool() {
            offset -= offset % 512;
        }
        let context =
            |op: &str| format!("{name} seed {seed} step {step}: {op} offset {offset} len {len}");
        let trace = std::env::var_os("QCOW_MODEL_TRACE").is_some();
        if config.snapshots && rng.u8(0..40) == 0 {
            if trace {
                eprintln!("step {step}: snapshot op (snapshots: {})", snapshots.len());
            }
            snapshot_op(
                &mut image,
                &mut model,
                &mut snapshots,
                &mut rng,
                &context("snapshot"),
            );
            continue;
        }
        let kind = rng.u8(0..20);
        if trace && !(12..=17).contains(&kind) {
            eprintln!("step {step}: op {kind} offset {offset} len {len}");
        }
        match kind {
            0..=7 => {
                let data = random_bytes(&mut rng, len as usize);
                image
                    .write_at(&data, offset)
                    .unwrap_or_else(|e| panic!("{}: {e}", context("write")));
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            8..=9 => {
                image
                    .write_zeroes(offset, len)
                    .unwrap_or_else(|e| panic!("{}: {e}", context("write_zeroes")));
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            10..=11 => {
                image
                    .discard(offset, len)
                    .unwrap_or_else(|e| panic!("{}: {e}", context("discard")));
                let end = offset + len;
                let mut start = offset.div_ceil(cluster) * cluster;
                while start < end {
                    let cluster_end = (start + cluster).min(size);
                    if cluster_end > end {
                        break;
                    }
                    let content = discarded_content(
                        &config,
                        &backing_model,
                        start as usize,
                        cluster_end as usize,
                    );
                    model[start as usize..cluster_end as usize].copy_from_slice(&content);
                    start += cluster;
                }
            }
            12..=17 => {
                let mut buf = vec![0u8; len as usize];
                image
                    .read_at(&mut buf, offset)
                    .unwrap_or_else(|e| panic!("{}: {e}", context("read")));
                let expected = &model[offset as usize..(offset + len) as usize];
                if buf != expected {
                    let at = buf
                        .iter()
                        .zip(expected)
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    panic!(
                        "{}: byte {} differs: image {:#04x} model {:#04x}",
                        context("read"),
                        offset + at as u64,
                        buf[at],
                        expected[at]
                    );
                }
            }
            18 => image
                .flush()
                .unwrap_or_else(|e| panic!("{}: {e}", context("flush"))),
            _ => {
                image.flush().unwrap();
                drop(image);
                image = Image::open(&path, &open_options)
                    .unwrap_or_else(|e| panic!("{}: {e}", context("reopen")));
            }
        }
    }
    // Whole-disk comparison through the library.
    let mut whole = vec![0u8; size as usize];
    image.read_at(&mut whole, 0).unwrap();
    assert!(
        whole == model,
        "{name} seed {seed}: final full read differs from the model"
    );
    let map = qcow::map(&mut image).unwrap();
    let report = qcow::check(&mut image, Repair::None).unwrap();
    assert!(
        report.is_clean(),
        "{name} seed {seed}: library check not clean: {report:?}\n{}",
        report.messages.join("\n")
    );
    drop(image);
    if qemu {
        let (ok, text) = qemu_img(&["check", path.to_str().unwrap()]);
        assert!(
            ok && text.contains("No errors were found"),
            "{name} seed {seed}: qemu-img check: {text}"
        );
        // The allocation statistics agree with qemu-img's too.
        let (ok, text) = qemu_img(&["check", "--output=json", path.to_str().unwrap()]);
        assert!(
            ok,
            "{name} seed {seed}: qemu-img check --output=json: {text}"
        );
        let stats: serde_json::Value = serde_json::from_str(&text).unwrap();
        let field = |key: &str| stats.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
        let ours = (
            report.image_end_offset,
            report.total_clusters,
            report.allocated_clusters,
            report.fragmented_clusters,
            report.compressed_clusters,
        );
        let theirs = (
            field("image-end-offset"),
            field("total-clusters"),
            field("allocated-clusters"),
            field("fragmented-clusters"),
            field("compressed-clusters"),
        );
        assert_eq!(ours, theirs, "{name} seed {seed}: check statistics (end, total, allocated, fragmented, compressed) differ from qemu-img's");
        let (ok, text) = qemu_img(&["map", "--output=json", path.to_str().unwrap()]);
        assert!(ok, "{name} seed {seed}: qemu-img map: {text}");
        let theirs: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ours = serde_json::to_value(&map).unwrap();
        if ours != theirs {
            let (ours, theirs) = (ours.as_array().unwrap(), theirs.as_array().unwrap());
            let at = ours
                .iter()
                .zip(theirs)
                .position(|(a, b)| a != b)
                .unwrap_or(ours.len().min(theirs.len()));
            panic!(
                "{name} seed {seed}: map differs from qemu-img map at entry {at} ({} vs {} entries):\nours:   {:?}\nqemu's: {:?}",
                ours.len(),
                theirs.len(),
                ours.get(at),
                theirs.get(at)
            );
        }
        let raw = dir.join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        let (ok, text) = qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        assert!(
            ok && text.contains("Images are identical"),
            "{name} seed {seed}: qemu-img compare: {text}"
        );
    }
    if config.data_file == DataFile::Raw {
        // A raw data file is the disk: byte for byte the model, past its end only zeros.
        let data = std::fs::read(data_file_path(&dir)).unwrap();
        assert!(
            data.len() >= model.len()
                && data[..model.len()] == model[..]
                && data[model.len()..].iter().all(|&b| b == 0),
            "{name} seed {seed}: the raw data file is not the disk's raw image"
        );
    }
    if qemu {
        // Every snapshot taken during the run still holds its bytes, as qemu-img reads them.
        for (id, bytes) in &snapshots {
            let raw = dir.join("taken.raw");
            let (ok, text) = qemu_img(&[
                "convert",
                "-l",
                &format!("snapshot.id={id}"),
                "-O",
                "raw",
                path.to_str().unwrap(),
                raw.to_str().unwrap(),
            ]);
            assert!(ok, "{name} seed {seed}: qemu-img convert -l {id}: {text}");
            assert!(
                std::fs::read(&raw).unwrap() == *bytes,
                "{name} seed {seed}: snapshot {id} does not hold the bytes it was taken with"
            );
        }
    }
    if qemu && config.base == BaseKind::Snapshot {
        // The snapshot still holds the data from before the random operations.
        let raw = dir.join("snapshot.raw");
        let (ok, text) = qemu_img(&[
            "convert",
            "-l",
            "snapshot.name=snap1",
            "-O",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        assert!(ok, "{name} seed {seed}: qemu-img convert -l: {text}");
        let snapshot = std::fs::read(&raw).unwrap();
        assert!(
            snapshot == backing_model,
            "{name} seed {seed}: the internal snapshot's data changed"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Creates, applies or deletes a snapshot (at most four at a time), keeping the models in step.
fn snapshot_op(
    image: &mut Image,
    model: &mut Vec<u8>,
    snapshots: &mut Vec<(String, Vec<u8>)>,
    rng: &mut fastrand::Rng,
    context: &str,
) {
    let choice = if snapshots.is_empty() {
        0
    } else {
        rng.u8(0..3)
    };
    if std::env::var_os("QCOW_MODEL_TRACE").is_some() {
        eprintln!("  snapshot choice {choice}");
    }
    match choice {
        0 if snapshots.len() < 4 => {
            let new = qcow::NewSnapshot {
                name: format!("s{}", snapshots.len()),
                ..qcow::NewSnapshot::default()
            };
            let snapshot = image
                .create_snapshot(&new)
                .unwrap_or_else(|e| panic!("{context}: create: {e}"));
            snapshots.push((snapshot.id, model.clone()));
        }
        1 => {
            let pick = rng.usize(0..snapshots.len());
            let index = image.find_snapshot(&snapshots[pick].0).unwrap();
            image
                .apply_snapshot(index)
                .unwrap_or_else(|e| panic!("{context}: apply: {e}"));
            *model = snapshots[pick].1.clone();
        }
        _ if !snapshots.is_empty() => {
            let pick = rng.usize(0..snapshots.len());
            let index = image.find_snapshot(&snapshots[pick].0).unwrap();
            image
                .delete_snapshot(index)
                .unwrap_or_else(|e| panic!("{context}: delete: {e}"));
            snapshots.remove(pick);
        }
        _ => {}
    }
}

fn seed() -> u64 {
    let seed = std::env::var("QCOW_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("model test seed: {seed} (rerun with QCOW_MODEL_SEED={seed})");
    seed
}

fn run(name: &str, config: Config) {
    let qemu = have_qemu_img();
    if !qemu {
        println!("SKIP qemu-img parts of {name}: qemu-img is not installed");
    }
    run_config(name, config, seed(), qemu);
}

const MIB: u64 = 1 << 20;

#[test]
fn v3_64k_clusters_16bit_no_backing() {
    run(
        "v3-64k-16",
        Config {
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            size: 8 * MIB,
            base: BaseKind::None,
            base_size: 0,
            ops: 2500,
            tiny_cache: false,
            snapshots: false,
            extended_l2: false,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn v3_512b_clusters_64bit_refcounts_grow_the_refcount_table() {
    run(
        "v3-512-64",
        Config {
            cluster_size: 512,
            refcount_bits: 64,
            version: 3,
            size: 3 * MIB,
            base: BaseKind::None,
            base_size: 0,
            ops: 2500,
            tiny_cache: false,
            snapshots: false,
            extended_l2: false,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn v3_4k_clusters_4bit_qcow_backing() {
    run(
        "v3-4k-4-qcow",
        Config {
            cluster_size: 4096,
            refcount_bits: 4,
            version: 3,
            size: 4 * MIB,
            base: BaseKind::Qcow,
            base_size: 3 * MIB,
            ops: 2500,
            tiny_cache: false,
            snapshots: false,
            extended_l2: false,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn v3_2m_clusters_8bit_raw_backing() {
    run(
        "v3-2m-8-raw",
        Config {
            cluster_size: 2 * MIB,
            refcount_bits: 8,
            version: 3,
            size: 12 * MIB + 4096,
            base: BaseKind::Raw,
            base_size: 7 * MIB,
            ops: 400,
            tiny_cache: false,
            snapshots: false,
            extended_l2: false,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn v2_8k_clusters_qcow_backing() {
    run(
        "v2-8k-16-qcow",
        Config {
            cluster_size: 8192,
            refcount_bits: 16,
            version: 2,
            size: 2 * MIB,
            base: BaseKind::Qcow,
            base_size: 2 * MIB,
            ops: 2500,
            tiny_cache: false,
            snapshots: false,
            extended_l2: false,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn v3_16k_clusters_1bit_refcounts() {
    run(
        "v3-16k-1",
        Config {
            cluster_size: 16384,
            refcount_bits: 1,
            version: 3,
            size: 4 * MIB,
            base: BaseKind::None,
            base_size: 0,
            ops: 2500,
            tiny_cache: false,
            snapshots: false,
            extended_l2: false,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn compressed_image_made_by_qemu_img() {
    run(
        "compressed-64k",
        Config {
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            size: 4 * MIB,
            base: BaseKind::Compressed,
            base_size: 0,
            ops: 1500,
            tiny_cache: false,
            snapshots: false,
            extended_l2: false,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn image_with_internal_snapshot_made_by_qemu_img() {
    run(
        "snapshot-32k",
        Config {
            cluster_size: 32768,
            refcount_bits: 16,
            version: 3,
            size: 4 * MIB,
            base: BaseKind::Snapshot,
            base_size: 0,
            ops: 1500,
            tiny_cache: false,
            snapshots: false,
            extended_l2: false,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn v3_1k_clusters_tiny_caches_qcow_backing() {
    run(
        "v3-1k-tiny-qcow",
        Config {
            cluster_size: 1024,
            refcount_bits: 16,
            version: 3,
            size: 2 * MIB,
            base: BaseKind::Qcow,
            base_size: 2 * MIB - 4096,
            ops: 2500,
            tiny_cache: true,
            snapshots: false,
            extended_l2: false,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn v3_64k_clusters_with_snapshot_create_apply_delete() {
    run(
        "v3-64k-snapshots",
        Config {
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            size: 8 * MIB,
            base: BaseKind::None,
            base_size: 0,
            ops: 2500,
            tiny_cache: false,
            snapshots: true,
            extended_l2: false,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn v2_4k_clusters_tiny_caches_with_snapshots_over_a_backing_file() {
    run(
        "v2-4k-tiny-snapshots-qcow",
        Config {
            cluster_size: 4096,
            refcount_bits: 16,
            version: 2,
            size: 2 * MIB,
            base: BaseKind::Qcow,
            base_size: 2 * MIB,
            ops: 2000,
            tiny_cache: true,
            snapshots: true,
            extended_l2: false,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn extended_l2_64k_subcluster_writes_over_a_qcow_backing_file() {
    run(
        "extl2-64k-qcow",
        Config {
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            size: 6 * MIB,
            base: BaseKind::Qcow,
            base_size: 5 * MIB,
            ops: 2500,
            tiny_cache: false,
            snapshots: false,
            extended_l2: true,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn extended_l2_16k_tiny_caches_with_snapshots() {
    run(
        "extl2-16k-tiny-snapshots",
        Config {
            cluster_size: 16384,
            refcount_bits: 8,
            version: 3,
            size: 3 * MIB,
            base: BaseKind::Raw,
            base_size: 2 * MIB,
            ops: 2500,
            tiny_cache: true,
            snapshots: true,
            extended_l2: true,
            data_file: DataFile::None,
        },
    );
}

#[test]
fn data_file_64k_tiny_caches_over_a_qcow_backing_file() {
    run(
        "datafile-64k-tiny-qcow",
        Config {
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            size: 4 * MIB,
            base: BaseKind::Qcow,
            base_size: 3 * MIB,
            ops: 2000,
            tiny_cache: true,
            snapshots: false,
            extended_l2: false,
            data_file: DataFile::External,
        },
    );
}

#[test]
fn raw_data_file_4k_clusters() {
    run(
        "rawdata-4k",
        Config {
            cluster_size: 4096,
            refcount_bits: 16,
            version: 3,
            size: 2 * MIB,
            base: BaseKind::None,
            base_size: 0,
            ops: 2000,
            tiny_cache: false,
            snapshots: false,
            extended_l2: false,
            data_file: DataFile::Raw,
        },
    );
}

#[test]
fn raw_data_file_32k_extended_l2() {
    run(
        "rawdata-32k-extl2",
        Config {
            cluster_size: 32768,
            refcount_bits: 16,
            version: 3,
            size: 3 * MIB,
            base: BaseKind::None,
            base_size: 0,
            ops: 2000,
            tiny_cache: true,
            snapshots: false,
            extended_l2: true,
            data_file: DataFile::Raw,
        },
    );
}
