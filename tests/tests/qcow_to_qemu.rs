//! qcow → qemu-img: images created and written by `qcow` pass `qemu-img check` with no corruptions
//! or leaks, `qemu-img compare` equals a raw reference written with the same operations, and
//! `qcow info` reports what `qemu-img info` reports.

use std::path::{Path, PathBuf};

use cowvm_tests::qcow_harness::{
    assert_chain_info_agrees, assert_info_agrees, assert_maps_agree, assert_qcow_check_clean,
    assert_qemu_check_clean, full_format_matrix, full_matrix, qcow, qcow_io, qemu_img, qemu_io,
    qemu_raw_bytes, random_ops, skip_without_qemu, DiskModel, DiskOp, ImageSpec, Rng,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// `qcow create -f qcow2 -o SPEC [-b BACKING -F FMT] dir/name [SIZE]`.
fn qcow_create(
    dir: &Path,
    name: &str,
    spec: &ImageSpec,
    size: Option<&str>,
    backing: Option<(&str, &str)>,
) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec![
        "create".to_string(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        spec.options(),
    ];
    if let Some((file, format)) = backing {
        args.extend(["-b".into(), file.into(), "-F".into(), format.into()]);
    }
    args.push(path.display().to_string());
    args.extend(size.map(str::to_string));
    let out = qcow(&args);
    assert!(out.success(), "qcow create failed\n{}", out.describe());
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
    path
}

/// Applies `ops` through `qcow io`, in `sessions` separate processes (so metadata must survive a
/// close and re-open), and to the model.
fn qcow_apply(image: &Path, model: &mut DiskModel, ops: &[DiskOp], sessions: usize, context: &str) {
    let per_session = ops.len().div_ceil(sessions.max(1)).max(1);
    for batch in ops.chunks(per_session) {
        let commands: Vec<String> = batch.iter().map(DiskOp::command).collect();
        for out in qcow_io(image, &commands) {
            assert!(
                out.success() && !out.stderr.contains("panicked"),
                "{context}: qcow io failed\n{}",
                out.describe()
            );
        }
        for op in batch {
            model.apply(op);
        }
    }
}

/// Unaligned discards leave their range undefined (qemu ignores partial clusters), so each one is
/// followed, at the end, by a write over the same range: the test then checks that the discard
/// damaged nothing else.
fn with_unaligned_discards(rng: &mut Rng, ops: &mut Vec<DiskOp>, size: u64, count: usize) {
    for _ in 0..count {
        let offset = rng.below(size - 1);
        let len = 1 + rng.below((200 * KIB).min(size - offset));
        let at = rng.below(ops.len() as u64 + 1) as usize;
        ops.insert(at, DiskOp::Discard { offset, len });
        ops.push(DiskOp::Write {
            offset,
            len,
            pattern: rng.pattern(),
        });
    }
}

/// qemu-img's verdicts on a qcow-written image: clean check, `compare` equal to the raw
/// reference, `convert -O raw` byte-identical, and the same info and map as qcow reports.
fn judge(image: &Path, model: &DiskModel, context: &str) {
    assert_qemu_check_clean(image, context);
    let reference = image.with_extension("reference.raw");
    std::fs::write(&reference, &model.bytes).expect("write raw reference");
    let compare = qemu_img(&[
        "compare".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        reference.as_os_str(),
        image.as_os_str(),
    ]);
    let scratch = image.with_extension("converted.raw");
    let raw = qemu_raw_bytes(image, &scratch);
    let difference = model.first_difference(&raw);
    assert!(
        compare.success() && difference.is_none(),
        "{context}: qemu-img sees other bytes than were written (first difference at {difference:?}, \
         expected byte {:?}, qemu-img read {:?})\n{}",
        difference.and_then(|at| model.bytes.get(at)),
        difference.and_then(|at| raw.get(at)),
        compare.describe()
    );
    std::fs::remove_file(&reference).expect("remove reference");
    assert_info_agrees(image, context);
    assert_chain_info_agrees(image, context);
    assert_maps_agree(image, model.size(), context);
    assert_qcow_check_clean(image, context);
}

/// qemu-io writes on top of a qcow-written image must leave it consistent too: this exercises the
/// refcount structures qcow left behind with qemu's allocator.
fn qemu_writes_after(
    image: &Path,
    model: &mut DiskModel,
    rng: &mut Rng,
    cluster_size: u64,
    context: &str,
) {
    let ops = random_ops(rng, 12, model.size(), cluster_size, 128 * KIB, true, false);
    let commands: Vec<String> = ops.iter().map(DiskOp::command).collect();
    qemu_io(image, "qcow2", &commands);
    for op in &ops {
        model.apply(op);
    }
    judge(image, model, &format!("{context}, then written by qemu-io"));
}

fn plain_matrix() -> Vec<ImageSpec> {
    if full_matrix() {
        return full_format_matrix();
    }
    let mut lazy = ImageSpec::new(4 * KIB, 16, "1.1");
    lazy.lazy_refcounts = true;
    let mut prealloc = ImageSpec::new(64 * KIB, 16, "1.1");
    prealloc.preallocation_metadata = true;
    vec![
        ImageSpec::new(512, 1, "1.1"),
        ImageSpec::new(4 * KIB, 64, "1.1"),
        ImageSpec::new(64 * KIB, 16, "1.1"),
        ImageSpec::new(64 * KIB, 16, "0.10"),
        ImageSpec::new(2 * MIB, 16, "1.1"),
        lazy,
        prealloc,
    ]
}

#[test]
fn qcow_written_images_pass_qemu_img_check_and_compare() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for (index, spec) in plain_matrix().iter().enumerate() {
        let seed = 0x70_0000 + index as u64;
        let context = format!("qcow-made {} seed {seed:#x}", spec.label());
        let size = 3 * MIB
            + 1536
            + if spec.cluster_size >= 2 * MIB {
                2 * MIB
            } else {
                0
            };
        let image = qcow_create(
            dir.path(),
            &format!("{}.qcow2", spec.label()),
            spec,
            Some(&size.to_string()),
            None,
        );
        let mut model = DiskModel::zeroed(size);
        // Fresh image: what qcow create wrote must already be a valid, empty image.
        judge(&image, &model, &format!("{context}, fresh"));
        let mut rng = Rng::new(seed);
        let max_len = (3 * spec.cluster_size).clamp(16 * KIB, 512 * KIB);
        let mut ops = random_ops(&mut rng, 60, size, spec.cluster_size, max_len, true, true);
        with_unaligned_discards(&mut rng, &mut ops, size, 3);
        qcow_apply(&image, &mut model, &ops, 3, &context);
        judge(&image, &model, &context);
        qemu_writes_after(&image, &mut model, &mut rng, spec.cluster_size, &context);
        std::fs::remove_file(&image).expect("remove image");
    }
}

#[test]
fn sizes_with_suffixes_and_raw_create() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for (text, bytes) in [
        ("3M", 3 * MIB),
        ("1G", 1024 * MIB),
        ("64k", 64 * KIB),
        ("2T", 2 * 1024 * 1024 * MIB),
        // qemu-img rounds a size up to whole 512-byte sectors.
        ("1000", 1024),
        ("513", 1024),
        ("100000", 100_352),
    ] {
        let spec = ImageSpec::new(64 * KIB, 16, "1.1");
        let image = qcow_create(
            dir.path(),
            &format!("s{text}.qcow2"),
            &spec,
            Some(text),
            None,
        );
        let info = qemu_img(&["info".as_ref(), "--output=json".as_ref(), image.as_os_str()]).ok();
        let json: serde_json::Value =
            serde_json::from_str(&info.stdout).expect("qemu-img info JSON");
        assert_eq!(json["virtual-size"].as_u64(), Some(bytes), "size {text}");
        assert_qemu_check_clean(&image, &format!("empty image of {text}"));
        assert_info_agrees(&image, &format!("empty image of {text}"));
    }
    let raw = dir.path().join("plain.raw");
    let out = qcow(&[
        "create".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        raw.as_os_str(),
        "5M".as_ref(),
    ]);
    assert!(out.success(), "qcow create -f raw\n{}", out.describe());
    assert_eq!(std::fs::metadata(&raw).expect("raw file").len(), 5 * MIB);
    // Raw sizes are rounded up to whole sectors as well (qemu-img create -f raw f 1000 → 1024).
    let odd = dir.path().join("odd.raw");
    let out = qcow(&[
        "create".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        odd.as_os_str(),
        "1000".as_ref(),
    ]);
    assert!(out.success(), "qcow create -f raw\n{}", out.describe());
    assert_eq!(std::fs::metadata(&odd).expect("raw file").len(), 1024);
}

/// Overlays created by qcow on bases made by qemu-img (qcow2 and raw) and by qcow, three deep.
#[test]
fn qcow_overlays_on_qemu_and_qcow_backing_files() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = Rng::new(0x0e71a7);

    // Base made by qemu-img + qemu-io.
    let base_size = 2 * MIB + 512;
    let qemu_base = dir.path().join("qemu-base.qcow2");
    qemu_img(&[
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        "cluster_size=4096".into(),
        qemu_base.display().to_string(),
        base_size.to_string(),
    ])
    .ok();
    let mut base_model = DiskModel::zeroed(base_size);
    let ops = random_ops(&mut rng, 25, base_size, 4 * KIB, 64 * KIB, true, false);
    qemu_io(
        &qemu_base,
        "qcow2",
        &ops.iter().map(DiskOp::command).collect::<Vec<_>>(),
    );
    for op in &ops {
        base_model.apply(op);
    }

    // qcow overlay on the qemu-made qcow2 base, the size taken from the backing file.
    let spec = ImageSpec::new(64 * KIB, 16, "1.1");
    let overlay = qcow_create(
        dir.path(),
        "over-qemu.qcow2",
        &spec,
        None,
        Some(("qemu-base.qcow2", "qcow2")),
    );
    let mut model = DiskModel::over(&base_model, base_size);
    judge(&overlay, &model, "fresh qcow overlay on a qemu base");
    let mut ops = random_ops(&mut rng, 40, base_size, 64 * KIB, 200 * KIB, true, true);
    with_unaligned_discards(&mut rng, &mut ops, base_size, 2);
    qcow_apply(&overlay, &mut model, &ops, 2, "qcow overlay on a qemu base");
    judge(&overlay, &model, "qcow overlay on a qemu base");
    qemu_writes_after(
        &overlay,
        &mut model,
        &mut rng,
        64 * KIB,
        "qcow overlay on a qemu base",
    );

    // qcow overlay (v2, larger than its base) on a raw base.
    let raw_base = dir.path().join("base.raw");
    std::fs::write(&raw_base, &base_model.bytes).expect("write raw base");
    let spec_v2 = ImageSpec::new(4 * KIB, 16, "0.10");
    let size = 3 * MIB;
    let overlay = qcow_create(
        dir.path(),
        "over-raw.qcow2",
        &spec_v2,
        Some(&size.to_string()),
        Some(("base.raw", "raw")),
    );
    let mut model = DiskModel::over_v2(&base_model, size);
    let ops = random_ops(&mut rng, 40, size, 4 * KIB, 64 * KIB, true, true);
    qcow_apply(
        &overlay,
        &mut model,
        &ops,
        2,
        "qcow v2 overlay on a raw base",
    );
    judge(&overlay, &model, "qcow v2 overlay on a raw base");

    // A chain of three made by qcow alone, each layer with its own cluster size.
    let specs = [
        ImageSpec::new(64 * KIB, 16, "1.1"),
        ImageSpec::new(512, 16, "1.1"),
        ImageSpec::new(4 * KIB, 1, "1.1"),
    ];
    let sizes = [MIB + 512, 2 * MIB, 2 * MIB + 4096];
    let mut model = DiskModel::zeroed(0);
    let mut below: Option<String> = None;
    for (layer, (spec, size)) in specs.iter().zip(sizes).enumerate() {
        let name = format!("qcow-chain-{layer}.qcow2");
        let backing = below.as_deref().map(|file| (file, "qcow2"));
        let image = qcow_create(dir.path(), &name, spec, Some(&size.to_string()), backing);
        model = DiskModel::over(&model, size);
        let context = format!("qcow chain layer {layer} ({})", spec.label());
        let ops = random_ops(&mut rng, 30, size, spec.cluster_size, 128 * KIB, true, true);
        qcow_apply(&image, &mut model, &ops, 2, &context);
        judge(&image, &model, &context);
        below = Some(name);
    }
}

/// qcow writing into images with internal snapshots made by qemu: shared clusters must be copied
/// before they are written, so the snapshot keeps its data.
#[test]
fn qcow_writes_under_qemu_snapshots() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut failures = Vec::new();
    for (index, spec) in [
        ImageSpec::new(64 * KIB, 16, "1.1"),
        ImageSpec::new(4 * KIB, 16, "0.10"),
        // 2-bit refcounts: a shared cluster sits at 2 of a maximum of 3.
        ImageSpec::new(512, 2, "1.1"),
    ]
    .into_iter()
    .enumerate()
    {
        // The snapshot table is the last thing in the file straight after `snapshot -c`; a qemu
        // write after it grows the file past the table. Both states must work.
        for qemu_writes_first in [false, true] {
            let seed = 0x5_4a7e + 2 * index as u64 + u64::from(qemu_writes_first);
            let outcome = std::panic::catch_unwind(|| {
                snapshot_case(dir.path(), &spec, qemu_writes_first, seed)
            });
            if let Err(panic) = outcome {
                let text = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "non-string panic".into());
                failures.push(text);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// qemu writes A, takes a snapshot, (optionally writes once more), then qcow writes B; qemu-img
/// must find the image clean with B, and with A after `snapshot -a`.
fn snapshot_case(dir: &Path, spec: &ImageSpec, qemu_writes_first: bool, seed: u64) {
    let mut rng = Rng::new(seed);
    let size = 2 * MIB;
    let context = format!(
        "qcow writes under a qemu snapshot ({}, qemu wrote after the snapshot: {qemu_writes_first}, seed {seed:#x})",
        spec.label()
    );
    let image = dir.join(format!("snap-{}-{qemu_writes_first}.qcow2", spec.label()));
    qemu_img(&[
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        spec.options(),
        image.display().to_string(),
        size.to_string(),
    ])
    .ok();
    let mut model = DiskModel::zeroed(size);
    let ops = random_ops(
        &mut rng,
        25,
        size,
        spec.cluster_size,
        256 * KIB,
        true,
        false,
    );
    qemu_io(
        &image,
        "qcow2",
        &ops.iter().map(DiskOp::command).collect::<Vec<_>>(),
    );
    for op in &ops {
        model.apply(op);
    }
    let snapshot_model = model.clone();
    qemu_img(&[
        "snapshot".as_ref(),
        "-c".as_ref(),
        "before".as_ref(),
        image.as_os_str(),
    ])
    .ok();
    if qemu_writes_first {
        let op = DiskOp::Write {
            offset: 0,
            len: 512,
            pattern: 0x42,
        };
        qemu_io(&image, "qcow2", &[op.command()]);
        model.apply(&op);
    }
    let ops = random_ops(&mut rng, 40, size, spec.cluster_size, 256 * KIB, true, true);
    qcow_apply(&image, &mut model, &ops, 2, &context);
    judge(&image, &model, &context);
    // Going back to the snapshot (qemu-img snapshot -a) must find A intact.
    qemu_img(&[
        "snapshot".as_ref(),
        "-a".as_ref(),
        "before".as_ref(),
        image.as_os_str(),
    ])
    .ok();
    judge(
        &image,
        &snapshot_model,
        &format!("{context}, snapshot applied"),
    );
}

/// qcow writing over compressed clusters made by `qemu-img convert -c` (deflate and zstd).
#[test]
fn qcow_writes_over_compressed_clusters() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = Rng::new(0xc0_4a7e);
    let size = 2 * MIB;
    for compression in ["zlib", "zstd"] {
        let context = format!("qcow writes over {compression} compressed clusters");
        let source = dir.path().join(format!("source-{compression}.raw"));
        let mut model = DiskModel::zeroed(size);
        for op in random_ops(&mut rng, 40, size, 64 * KIB, 128 * KIB, false, false) {
            model.apply(&op);
        }
        std::fs::write(&source, &model.bytes).expect("write raw source");
        let image = dir.path().join(format!("compressed-{compression}.qcow2"));
        qemu_img(&[
            "convert".to_string(),
            "-c".into(),
            "-O".into(),
            "qcow2".into(),
            "-o".into(),
            format!("cluster_size=65536,compression_type={compression}"),
            source.display().to_string(),
            image.display().to_string(),
        ])
        .ok();
        let ops = random_ops(&mut rng, 30, size, 64 * KIB, 100 * KIB, true, true);
        qcow_apply(&image, &mut model, &ops, 2, &context);
        judge(&image, &model, &context);
    }
}

/// Writes through the library with caches of two tables each, so every few operations evict L2
/// tables and refcount blocks (the write-back ordering paths); 512 B clusters with 64-bit
/// refcounts also make the refcount table grow several times.
#[test]
fn library_writes_with_tiny_caches_pass_qemu_img_check() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for (index, spec) in [
        ImageSpec::new(512, 64, "1.1"),
        ImageSpec::new(4 * KIB, 16, "0.10"),
        ImageSpec::new(64 * KIB, 2, "1.1"),
    ]
    .iter()
    .enumerate()
    {
        let seed = 0x71_4e00 + index as u64;
        let context = format!("library, tiny caches, {} seed {seed:#x}", spec.label());
        let size = 6 * MIB + 512;
        let image = qcow_create(
            dir.path(),
            &format!("tiny-{}.qcow2", spec.label()),
            spec,
            Some(&size.to_string()),
            None,
        );
        let mut model = DiskModel::zeroed(size);
        let mut rng = Rng::new(seed);
        let ops = random_ops(&mut rng, 150, size, spec.cluster_size, 96 * KIB, true, true);
        for session in ops.chunks(50) {
            let options = qcow::OpenOptions {
                l2_cache_bytes: 2 * spec.cluster_size,
                refcount_cache_bytes: 2 * spec.cluster_size,
                ..qcow::OpenOptions::default()
            };
            let mut opened = qcow::Image::open(&image, &options)
                .unwrap_or_else(|err| panic!("{context}: open: {err}"));
            for op in session {
                let result = match *op {
                    DiskOp::Write {
                        offset,
                        len,
                        pattern,
                    } => opened.write_at(&vec![pattern; len as usize], offset),
                    DiskOp::Zero { offset, len } => opened.write_zeroes(offset, len),
                    DiskOp::Discard { offset, len } => opened.discard(offset, len),
                };
                result.unwrap_or_else(|err| panic!("{context}: {op:?}: {err}"));
                model.apply(op);
            }
            opened
                .flush()
                .unwrap_or_else(|err| panic!("{context}: flush: {err}"));
        }
        judge(&image, &model, &context);
    }
}

/// A lazy-refcounts image left dirty by a crashed qemu (qemu-io's `abort`): qcow must read it
/// right, repair it before its first write (as qemu does on a read-write open), keep
/// lazy_refcounts on, and leave an image qemu-img finds clean; `qcow check -r all` repairs it too.
#[test]
fn dirty_image_from_a_crashed_qemu_is_repaired() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let size = 4 * MIB;
    let dirty = dir.path().join("dirty.qcow2");
    qemu_img(&[
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        "cluster_size=4096,lazy_refcounts=on".into(),
        dirty.display().to_string(),
        size.to_string(),
    ])
    .ok();
    let mut rng = Rng::new(0xd1_47e);
    let mut model = DiskModel::zeroed(size);
    let ops = random_ops(&mut rng, 30, size, 4 * KIB, 64 * KIB, true, false);
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
    for op in &ops {
        args.extend(["-c".into(), op.command()]);
        model.apply(op);
    }
    args.extend(["-c".into(), "abort".into(), dirty.display().to_string()]);
    // qemu-io aborts on purpose: its exit status is the signal, not a failure of the test.
    let _ = cowvm_tests::qcow_harness::run("qemu-io", &args);
    let info = qemu_img(&["info".as_ref(), "--output=json".as_ref(), dirty.as_os_str()]).ok();
    assert!(
        info.stdout.contains("\"dirty-flag\": true"),
        "qemu-io abort leaves the image dirty\n{}",
        info.describe()
    );
    let qemu_check = qemu_img(&["check".as_ref(), dirty.as_os_str()]);
    assert_eq!(
        qemu_check.code,
        Some(2),
        "the dirty image has stale refcounts\n{}",
        qemu_check.describe()
    );

    // Reads see the data as written.
    let repaired = dir.path().join("repaired.qcow2");
    std::fs::copy(&dirty, &repaired).expect("copy");
    let commands = model.read_commands(0, size);
    for out in qcow_io(&repaired, &commands) {
        assert!(
            out.success(),
            "reads of the dirty image\n{}",
            out.describe()
        );
    }
    // A write repairs first.
    let op = DiskOp::Write {
        offset: 3 * MIB,
        len: 10_000,
        pattern: 0x3c,
    };
    qcow_apply(&repaired, &mut model, &[op], 1, "write to a dirty image");
    judge(&repaired, &model, "dirty image after a qcow write");
    let info = qemu_img(&[
        "info".as_ref(),
        "--output=json".as_ref(),
        repaired.as_os_str(),
    ])
    .ok();
    let json: serde_json::Value = serde_json::from_str(&info.stdout).expect("info JSON");
    assert_eq!(
        json["dirty-flag"],
        serde_json::Value::Bool(false),
        "{}",
        info.stdout
    );
    assert_eq!(
        json.pointer("/format-specific/data/lazy-refcounts"),
        Some(&serde_json::Value::Bool(true)),
        "lazy_refcounts must survive the repair\n{}",
        info.stdout
    );

    // `qcow check -r all` on another copy: exit 0 after repairing, then qemu-img agrees.
    let checked = dir.path().join("checked.qcow2");
    std::fs::copy(&dirty, &checked).expect("copy");
    let out = qcow(&[
        "check".as_ref(),
        "-r".as_ref(),
        "all".as_ref(),
        checked.as_os_str(),
    ]);
    assert_eq!(out.code, Some(0), "qcow check -r all\n{}", out.describe());
    let mut unrepaired_model = DiskModel::zeroed(size);
    for op in &ops {
        unrepaired_model.apply(op);
    }
    judge(
        &checked,
        &unrepaired_model,
        "dirty image after qcow check -r all",
    );
}

/// A writer must keep header extensions it does not know and clear autoclear bits it does not
/// know (qcow2 spec); a 6 MiB write into 512 B clusters with 64-bit refcounts also grows the
/// refcount table, so the header's table fields are rewritten meanwhile.
#[test]
fn unknown_header_extension_kept_and_unknown_autoclear_bit_cleared() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("extension.qcow2");
    let size = 8 * MIB;
    qemu_img(&[
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        "cluster_size=512,refcount_bits=64,lazy_refcounts=on".into(),
        image.display().to_string(),
        size.to_string(),
    ])
    .ok();
    let mut bytes = std::fs::read(&image).expect("read image");
    let header_length = u32::from_be_bytes(bytes[100..104].try_into().expect("4 bytes")) as usize;
    // Unknown extension 0x12345678 with 8 bytes of data, then the end marker.
    let extension: Vec<u8> = [0x12, 0x34, 0x56, 0x78, 0, 0, 0, 8]
        .into_iter()
        .chain(*b"ABCDEFGH")
        .chain([0; 8])
        .collect();
    bytes[header_length..header_length + extension.len()].copy_from_slice(&extension);
    bytes[88..96].copy_from_slice(&(1u64 << 5).to_be_bytes());
    std::fs::write(&image, &bytes).expect("write image");
    let reftable_before = bytes[48..60].to_vec();

    let mut model = DiskModel::zeroed(size);
    let ops = [DiskOp::Write {
        offset: 0,
        len: 6 * MIB,
        pattern: 0x61,
    }];
    qcow_apply(&image, &mut model, &ops, 1, "6 MiB write");
    judge(&image, &model, "after the 6 MiB write");
    let after = std::fs::read(&image).expect("read image");
    assert_ne!(
        after[48..60],
        reftable_before[..],
        "the refcount table was expected to move (the test's premise)"
    );
    assert_eq!(
        after[header_length..header_length + extension.len()],
        extension[..],
        "the unknown header extension must be kept"
    );
    assert_eq!(
        after[88..96],
        [0; 8],
        "an unknown autoclear bit must be cleared by a writer"
    );
}

/// An overlay with `preallocation=metadata` would map every cluster in the overlay and hide the
/// backing file's data. qemu-img refuses the combination ("Backing file and preallocation can only
/// be used at the same time if extended_l2 is on"); qcow must refuse it too, or at least produce an
/// overlay that still shows the backing data.
#[test]
fn overlay_with_metadata_preallocation_never_hides_the_backing_data() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let size = MIB;
    let base = dir.path().join("base.qcow2");
    qemu_img(&[
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        base.display().to_string(),
        size.to_string(),
    ])
    .ok();
    let op = DiskOp::Write {
        offset: 0,
        len: size,
        pattern: 9,
    };
    qemu_io(&base, "qcow2", &[op.command()]);
    let mut model = DiskModel::zeroed(size);
    model.apply(&op);
    let overlay = dir.path().join("overlay.qcow2");
    let out = qcow(&[
        "create".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        "base.qcow2".as_ref(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        "preallocation=metadata".as_ref(),
        overlay.as_os_str(),
    ]);
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
    if out.success() {
        judge(
            &overlay,
            &model,
            "overlay created with preallocation=metadata",
        );
    } else {
        assert!(
            out.stderr.contains("preallocation"),
            "the refusal should say why\n{}",
            out.describe()
        );
    }
}
