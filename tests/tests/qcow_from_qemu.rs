//! qemu-img → qcow: images made by qemu-img/qemu-io read back by `qcow` (the library's
//! `Image::read_at` over the whole disk, and the CLI's `io -c "read -P"`) byte for byte as
//! `qemu-img convert -O raw` sees them, with the same map, a clean check and the same info.

use std::path::{Path, PathBuf};

use cowvm_tests::qcow_harness::{
    assert_chain_info_agrees, assert_info_agrees, assert_maps_agree, assert_qcow_check_clean,
    assert_qcow_reads, full_format_matrix, full_matrix, library_read_all, qemu_img, qemu_io,
    qemu_raw_bytes, random_ops, skip_without_qemu, DiskModel, DiskOp, ImageSpec, Rng,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// `qemu-img create -f qcow2 -o SPEC [-b BACKING -F FMT] dir/name SIZE`; `backing` is a file name
/// relative to `dir` (qemu resolves it against the overlay's directory, as qcow must).
fn qemu_create(
    dir: &Path,
    name: &str,
    spec: &ImageSpec,
    size: u64,
    backing: Option<(&str, &str)>,
) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        spec.options(),
    ];
    if let Some((file, format)) = backing {
        args.extend(["-b".into(), file.into(), "-F".into(), format.into()]);
    }
    args.extend([path.display().to_string(), size.to_string()]);
    qemu_img(&args).ok();
    path
}

/// Applies `ops` with qemu-io and to the model.
fn qemu_apply(image: &Path, model: &mut DiskModel, ops: &[DiskOp]) {
    let commands: Vec<String> = ops.iter().map(DiskOp::command).collect();
    qemu_io(image, "qcow2", &commands);
    for op in ops {
        model.apply(op);
    }
}

/// Everything `qcow` must agree with qemu on for one image.
fn verify(image: &Path, model: &DiskModel, context: &str) {
    let scratch = image.with_extension("check.raw");
    let raw = qemu_raw_bytes(image, &scratch);
    if let Some(at) = model.first_difference(&raw) {
        panic!(
            "{context}: harness model disagrees with qemu-img convert at byte {at} (a test bug, not a qcow bug)"
        );
    }
    let through_library = library_read_all(image);
    if let Some(at) = model.first_difference(&through_library) {
        panic!(
            "{context}: the qcow library reads byte {at} as {:?}, qemu-img convert as {:?} (sizes {} and {})",
            through_library.get(at),
            raw.get(at),
            through_library.len(),
            raw.len()
        );
    }
    assert_qcow_reads(image, model, context);
    assert_maps_agree(image, model.size(), context);
    assert_qcow_check_clean(image, context);
    assert_info_agrees(image, context);
    assert_chain_info_agrees(image, context);
}

fn plain_matrix() -> Vec<ImageSpec> {
    if full_matrix() {
        return full_format_matrix();
    }
    let mut lazy = ImageSpec::new(64 * KIB, 64, "1.1");
    lazy.lazy_refcounts = true;
    let mut prealloc = ImageSpec::new(4 * KIB, 16, "1.1");
    prealloc.preallocation_metadata = true;
    vec![
        ImageSpec::new(512, 16, "1.1"),
        ImageSpec::new(4 * KIB, 1, "1.1"),
        ImageSpec::new(64 * KIB, 16, "1.1"),
        ImageSpec::new(64 * KIB, 16, "0.10"),
        ImageSpec::new(2 * MIB, 16, "1.1"),
        ImageSpec::new(512, 16, "0.10"),
        lazy,
        prealloc,
    ]
}

#[test]
fn plain_images_read_back_identically() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for (index, spec) in plain_matrix().iter().enumerate() {
        let seed = 0x5eed_0000 + index as u64;
        let context = format!("{} seed {seed:#x}", spec.label());
        // Not a multiple of the cluster size, so the last cluster is partial.
        let size = 3 * MIB
            + 1536
            + if spec.cluster_size >= 2 * MIB {
                2 * MIB
            } else {
                0
            };
        let image = qemu_create(
            dir.path(),
            &format!("{}.qcow2", spec.label()),
            spec,
            size,
            None,
        );
        let mut model = DiskModel::zeroed(size);
        let mut rng = Rng::new(seed);
        let max_len = (3 * spec.cluster_size).clamp(16 * KIB, 512 * KIB);
        let ops = random_ops(&mut rng, 40, size, spec.cluster_size, max_len, true, true);
        qemu_apply(&image, &mut model, &ops);
        verify(&image, &model, &context);
        std::fs::remove_file(&image).expect("remove image");
    }
}

/// raw base ← qcow2 v2 (4 KiB clusters) ← qcow2 v3 (64 KiB), each layer written, each larger than
/// the one below (reads past a backing file's end are zeros); then an all-qcow2 chain with
/// different cluster sizes.
#[test]
fn backing_chains_of_depth_three_read_back_identically() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = Rng::new(0xc4a1_0001);

    // Chain A: raw → v2 → v3.
    let base_size = 2 * MIB + 512;
    let base = dir.path().join("base.raw");
    let mut base_model = DiskModel::zeroed(base_size);
    for op in random_ops(&mut rng, 20, base_size, 4 * KIB, 64 * KIB, false, false) {
        base_model.apply(&op);
    }
    std::fs::write(&base, &base_model.bytes).expect("write raw base");

    let mid_spec = ImageSpec::new(4 * KIB, 16, "0.10");
    let mid_size = 3 * MIB;
    let mid = qemu_create(
        dir.path(),
        "mid.qcow2",
        &mid_spec,
        mid_size,
        Some(("base.raw", "raw")),
    );
    let mut mid_model = DiskModel::over_v2(&base_model, mid_size);
    let ops = random_ops(&mut rng, 30, mid_size, 4 * KIB, 64 * KIB, true, true);
    qemu_apply(&mid, &mut mid_model, &ops);
    verify(&mid, &mid_model, "chain A mid (v2 over raw)");

    let top_spec = ImageSpec::new(64 * KIB, 16, "1.1");
    let top_size = 4 * MIB + 512;
    let top = qemu_create(
        dir.path(),
        "top.qcow2",
        &top_spec,
        top_size,
        Some(("mid.qcow2", "qcow2")),
    );
    let mut top_model = DiskModel::over(&mid_model, top_size);
    let ops = random_ops(&mut rng, 30, top_size, 64 * KIB, 256 * KIB, true, true);
    qemu_apply(&top, &mut top_model, &ops);
    verify(&top, &top_model, "chain A top (v3 over v2 over raw)");

    // Chain B: qcow2 64 KiB → 512 B → 2 MiB clusters, all v3 with zero clusters hiding backing data.
    let specs = [
        ImageSpec::new(64 * KIB, 16, "1.1"),
        ImageSpec::new(512, 64, "1.1"),
        ImageSpec::new(2 * MIB, 1, "1.1"),
    ];
    let sizes = [3 * MIB, 3 * MIB + 4096, 6 * MIB];
    let mut model = DiskModel::zeroed(0);
    let mut below: Option<String> = None;
    for (layer, (spec, size)) in specs.iter().zip(sizes).enumerate() {
        let name = format!("chain-b-{layer}.qcow2");
        let backing = below.as_deref().map(|file| (file, "qcow2"));
        let image = qemu_create(dir.path(), &name, spec, size, backing);
        model = DiskModel::over(&model, size);
        let ops = random_ops(&mut rng, 25, size, spec.cluster_size, 256 * KIB, true, true);
        qemu_apply(&image, &mut model, &ops);
        verify(
            &image,
            &model,
            &format!("chain B layer {layer} ({})", spec.label()),
        );
        below = Some(name);
    }
}

/// A raw source of runs of bytes (run lengths 1..512, some zero runs and whole zero clusters).
fn compressible_source(rng: &mut Rng, size: u64, cluster_size: u64) -> DiskModel {
    let mut model = DiskModel::zeroed(size);
    let mut offset = 0;
    while offset < size {
        let len = (1 + rng.below(512)).min(size - offset);
        let value = if rng.below(8) == 0 { 0 } else { rng.pattern() };
        model.bytes[offset as usize..(offset + len) as usize].fill(value);
        offset += len;
    }
    // Whole zero clusters, which convert leaves unallocated.
    for cluster in (0..size / cluster_size).step_by(5) {
        let start = (cluster * cluster_size) as usize;
        model.bytes[start..start + cluster_size as usize].fill(0);
    }
    model
}

#[test]
fn compressed_images_read_back_identically() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cases = vec![(64 * KIB, "zlib"), (4 * KIB, "zstd")];
    if full_matrix() {
        cases.extend([
            (512, "zlib"),
            (512, "zstd"),
            (4 * KIB, "zlib"),
            (64 * KIB, "zstd"),
            (2 * MIB, "zlib"),
            (2 * MIB, "zstd"),
        ]);
    }
    for (index, (cluster_size, compression)) in cases.into_iter().enumerate() {
        let context = format!("convert -c cluster {cluster_size} {compression}");
        let mut rng = Rng::new(0xc0_3355 + index as u64);
        let size = if cluster_size >= 2 * MIB {
            6 * MIB
        } else {
            MIB + 512
        };
        let source = dir.path().join(format!("source-{index}.raw"));
        let mut model = compressible_source(&mut rng, size, cluster_size);
        std::fs::write(&source, &model.bytes).expect("write raw source");
        let image = dir.path().join(format!("compressed-{index}.qcow2"));
        qemu_img(&[
            "convert".to_string(),
            "-c".into(),
            "-O".into(),
            "qcow2".into(),
            "-o".into(),
            format!("cluster_size={cluster_size},compression_type={compression}"),
            source.display().to_string(),
            image.display().to_string(),
        ])
        .ok();
        verify(&image, &model, &context);
        // Partial overwrites of compressed clusters: qemu decompresses and COWs them.
        let ops = random_ops(&mut rng, 15, size, cluster_size, 8 * KIB, true, false);
        qemu_apply(&image, &mut model, &ops);
        verify(&image, &model, &format!("{context}, then overwritten"));
    }
}

#[test]
fn image_with_internal_snapshots_reads_its_active_state() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = Rng::new(0x5a_a95);
    for spec in [
        ImageSpec::new(64 * KIB, 16, "1.1"),
        ImageSpec::new(4 * KIB, 16, "0.10"),
    ] {
        let size = 2 * MIB;
        let image = qemu_create(
            dir.path(),
            &format!("snap-{}.qcow2", spec.label()),
            &spec,
            size,
            None,
        );
        let mut model = DiskModel::zeroed(size);
        for snapshot in ["first", "second"] {
            let ops = random_ops(
                &mut rng,
                20,
                size,
                spec.cluster_size,
                128 * KIB,
                true,
                false,
            );
            qemu_apply(&image, &mut model, &ops);
            qemu_img(&[
                "snapshot".as_ref(),
                "-c".as_ref(),
                snapshot.as_ref(),
                image.as_os_str(),
            ])
            .ok();
        }
        // Straight after `snapshot -c` the snapshot table is the last thing in the file.
        verify(
            &image,
            &model,
            &format!("snapshots {}, just taken", spec.label()),
        );
        // Writes after the snapshots hit shared clusters (refcount 2): qemu copies them.
        let ops = random_ops(&mut rng, 20, size, spec.cluster_size, 128 * KIB, true, true);
        qemu_apply(&image, &mut model, &ops);
        verify(&image, &model, &format!("snapshots {}", spec.label()));
    }
}
