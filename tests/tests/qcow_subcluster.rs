//! Extended L2 entries (subclusters), qcow ↔ qemu-img: images made with
//! `qemu-img create -o extended_l2=on` are read and written correctly by qcow; random subcluster
//! writes pass `qemu-img check` and match a model; the L2 entries qcow writes are bit for bit the
//! ones qemu writes for the same operations (only touched subclusters are allocated).

use std::path::Path;

use cowvm_tests::qcow_harness::{
    assert_maps_agree, assert_qcow_check_clean, assert_qcow_reads, assert_qemu_check_clean, qcow,
    qcow_io, qemu_img, qemu_io, qemu_raw_bytes, random_ops, skip_without_qemu, DiskModel, DiskOp,
    Rng, RunOutput,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn arg(path: &Path) -> String {
    path.display().to_string()
}

fn qemu_ok(args: &[&str], context: &str) -> RunOutput {
    let out = qemu_img(args);
    assert!(
        out.success(),
        "{context}: qemu-img {args:?}\n{}",
        out.describe()
    );
    out
}

/// The L2 tables of `image` as raw bytes, in L1 order (for comparing two images' metadata).
fn l2_tables(image: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(image).expect("read image");
    let be = |at: usize, width: usize| {
        let mut value = 0u64;
        for byte in &bytes[at..at + width] {
            value = value << 8 | u64::from(*byte);
        }
        value
    };
    let cluster_size = 1usize << be(20, 4);
    let l1_size = be(36, 4) as usize;
    let l1_offset = be(40, 8) as usize;
    (0..l1_size)
        .filter_map(|i| {
            let l2 = (be(l1_offset + i * 8, 8) & 0x00ff_ffff_ffff_fe00) as usize;
            (l2 != 0).then(|| bytes[l2..l2 + cluster_size].to_vec())
        })
        .collect()
}

/// Writes into twin overlays (one by `qcow io`, one by `qemu-io`) leave identical L2 tables,
/// identical content and clean images: subcluster allocation, zeroing and discards as QEMU does.
#[test]
fn subcluster_writes_match_qemu_bit_for_bit() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let base = dir.path().join("base.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", &arg(&base), "3M"], "base");
    qemu_io(&base, "qcow2", &["write -P 7 0 3M".into()]);
    let commands: Vec<String> = [
        "write -P 1 1k 3k",
        "write -z 8k 4k",
        "write -P 2 70000 100",
        "write -z 131072 65536",
        "write -P 3 200000 5000",
        "discard 327680 65536",
        "write -z 400000 3000",
        "write -P 4 458752 65536",
        "write -z 600k 20k",
        "write -P 5 1020k 40k",
        "write -P 6 2047k 1k",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for backing in [true, false] {
        for options in ["extended_l2=on", "extended_l2=on,cluster_size=16k"] {
            let context = format!("{options}, backing {backing}");
            let mut images = Vec::new();
            for tool in ["qcow", "qemu"] {
                let image = dir
                    .path()
                    .join(format!("{tool}-{backing}-{}.qcow2", options.len()));
                let mut args = vec!["create", "-q", "-f", "qcow2", "-o", options];
                if backing {
                    args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
                }
                let path = arg(&image);
                args.push(&path);
                args.push("3M");
                qemu_ok(&args, &context);
                if tool == "qcow" {
                    for out in qcow_io(&image, &commands) {
                        assert!(out.success(), "{context}: qcow io\n{}", out.describe());
                    }
                } else {
                    qemu_io(&image, "qcow2", &commands);
                }
                images.push(image);
            }
            let (ours, theirs) = (&images[0], &images[1]);
            assert_eq!(
                l2_tables(ours),
                l2_tables(theirs),
                "{context}: the L2 tables differ from qemu's"
            );
            let compare = qemu_img(&["compare", &arg(ours), &arg(theirs)]);
            assert!(compare.success(), "{context}\n{}", compare.describe());
            assert_qemu_check_clean(ours, &context);
            assert_qcow_check_clean(ours, &context);
            assert_maps_agree(ours, 3 * MIB, &context);
        }
    }
}

/// Random subcluster-sized and unaligned writes, zero writes and discards on extended-L2 images
/// (made by qemu-img, with and without a backing file), alternating between qcow and qemu-io:
/// every byte matches the model, both tools check the image clean, the maps agree.
#[test]
fn random_subcluster_writes_match_the_model() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let size = 4 * MIB;
    let base = dir.path().join("base.qcow2");
    qemu_ok(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            &arg(&base),
            &size.to_string(),
        ],
        "base",
    );
    let mut base_model = DiskModel::zeroed(size);
    let mut rng = Rng::new(0x0005_abc1);
    let ops = random_ops(&mut rng, 20, size, 64 * KIB, 512 * KIB, false, false);
    qemu_io(
        &base,
        "qcow2",
        &ops.iter().map(DiskOp::command).collect::<Vec<_>>(),
    );
    for op in &ops {
        base_model.apply(op);
    }
    for (index, (cluster_size, backing)) in [(16 * KIB, false), (64 * KIB, true), (2 * MIB, true)]
        .into_iter()
        .enumerate()
    {
        let seed = 0x5abc_0000 + index as u64;
        let context =
            format!("extended L2, {cluster_size}-byte clusters, backing {backing}, seed {seed:#x}");
        let mut rng = Rng::new(seed);
        let image = dir.path().join(format!("ext-{index}.qcow2"));
        let options = format!("extended_l2=on,cluster_size={cluster_size}");
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &options];
        if backing {
            args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
        }
        let path = arg(&image);
        args.push(&path);
        let size_text = size.to_string();
        args.push(&size_text);
        qemu_ok(&args, &context);
        let mut model = if backing {
            base_model.clone()
        } else {
            DiskModel::zeroed(size)
        };
        let subcluster = cluster_size / 32;
        for round in 0..4 {
            // Subcluster-aligned writes and zero writes, plus whole-cluster discards (qemu
            // ignores discards of partial clusters).
            let mut ops = random_ops(
                &mut rng,
                50,
                size,
                subcluster,
                cluster_size * 2,
                true,
                false,
            );
            let discards = random_ops(
                &mut rng,
                20,
                size,
                cluster_size,
                cluster_size * 2,
                true,
                true,
            );
            for (i, op) in discards.into_iter().enumerate() {
                ops.insert((i * 3).min(ops.len()), op);
            }
            let commands: Vec<String> = ops.iter().map(DiskOp::command).collect();
            if round % 2 == 0 {
                for out in qcow_io(&image, &commands) {
                    assert!(out.success(), "{context}: qcow io\n{}", out.describe());
                }
            } else {
                qemu_io(&image, "qcow2", &commands);
            }
            for op in &ops {
                model.apply(op);
            }
            let round_context = format!("{context}, round {round}");
            assert_qemu_check_clean(&image, &round_context);
            assert_qcow_check_clean(&image, &round_context);
            assert_qcow_reads(&image, &model, &round_context);
            let raw = qemu_raw_bytes(&image, &image.with_extension("raw"));
            assert_eq!(
                model.first_difference(&raw),
                None,
                "{round_context}: qemu-img reads other bytes"
            );
            assert_maps_agree(&image, size, &round_context);
        }
    }
}

/// `qcow create -o extended_l2=on` makes what qemu-img makes; snapshots, compressed clusters and
/// conversion work on extended-L2 images.
#[test]
fn extended_l2_images_from_qcow() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("made.qcow2");
    let out = qcow(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        &arg(&image),
        "2M",
    ]);
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.contains("extended_l2=on"), "{}", out.stdout);
    let info = qemu_ok(&["info", "--output=json", &arg(&image)], "info");
    let info: serde_json::Value = serde_json::from_str(&info.stdout).expect("json");
    assert_eq!(info["format-specific"]["data"]["extended-l2"], true);
    let refused = qcow(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=4k",
        &arg(&dir.path().join("small.qcow2")),
        "1M",
    ]);
    assert_eq!(refused.code, Some(1), "{}", refused.describe());
    let mut model = DiskModel::zeroed(2 * MIB);
    let op = DiskOp::Write {
        offset: 5000,
        len: 70_000,
        pattern: 9,
    };
    qcow_io(&image, &[op.command()]);
    model.apply(&op);
    let snapshot = model.clone();
    let out = qcow(&["snapshot", "-c", "s", &arg(&image)]);
    assert!(out.success(), "{}", out.describe());
    let op = DiskOp::Write {
        offset: 6000,
        len: 1000,
        pattern: 3,
    };
    qcow_io(&image, &[op.command()]);
    model.apply(&op);
    assert_qemu_check_clean(&image, "after a subcluster write over a snapshot");
    assert_qcow_reads(&image, &model, "after a subcluster write over a snapshot");
    let out = qcow(&["snapshot", "-a", "s", &arg(&image)]);
    assert!(out.success(), "{}", out.describe());
    assert_qcow_reads(&image, &snapshot, "snapshot applied");
    assert_qemu_check_clean(&image, "snapshot applied");
    // Compressed conversion into an extended-L2 image, and back.
    let packed = dir.path().join("packed.qcow2");
    let out = qcow(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on",
        &arg(&image),
        &arg(&packed),
    ]);
    assert!(out.success(), "{}", out.describe());
    assert_qemu_check_clean(&packed, "compressed extended L2");
    let compare = qemu_img(&["compare", &arg(&image), &arg(&packed)]);
    assert!(compare.success(), "{}", compare.describe());
    // Writes over the compressed clusters turn them into normal ones.
    let op = DiskOp::Write {
        offset: 4096,
        len: 512,
        pattern: 0x11,
    };
    let mut packed_model = snapshot.clone();
    qcow_io(&packed, &[op.command()]);
    packed_model.apply(&op);
    assert_qemu_check_clean(&packed, "written compressed extended L2");
    assert_qcow_reads(&packed, &packed_model, "written compressed extended L2");
}
