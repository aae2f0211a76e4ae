//! Internal snapshots, qcow ↔ qemu-img: snapshots made by `qcow snapshot` are listed, read and
//! applied by qemu-img and the other way round; `qemu-img check` is clean after every step; every
//! snapshot keeps the bytes it was taken with (read back with `qemu-img convert -l`).

use std::path::Path;

use cowvm_tests::qcow_harness::{
    assert_qcow_check_clean, assert_qemu_check_clean, qcow, qcow_io, qemu_img, qemu_io,
    qemu_raw_bytes, random_ops, skip_without_qemu, DiskModel, DiskOp, ImageSpec, Rng, RunOutput,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn arg(path: &Path) -> String {
    path.display().to_string()
}

fn qcow_ok(args: &[&str], context: &str) -> RunOutput {
    let out = qcow(args);
    assert!(
        out.success() && !out.stderr.contains("panicked"),
        "{context}: qcow {args:?} failed\n{}",
        out.describe()
    );
    out
}

fn qemu_ok(args: &[&str], context: &str) -> RunOutput {
    let out = qemu_img(args);
    assert!(
        out.success(),
        "{context}: qemu-img {args:?} failed\n{}",
        out.describe()
    );
    out
}

/// Random writes and zero-writes through `qcow io` (or `qemu-io`), applied to `model` too.
fn write_some(image: &Path, model: &mut DiskModel, rng: &mut Rng, cluster: u64, by_qemu: bool) {
    let ops = random_ops(rng, 30, model.size(), cluster, 192 * KIB, true, true);
    let commands: Vec<String> = ops.iter().map(DiskOp::command).collect();
    if by_qemu {
        qemu_io(image, "qcow2", &commands);
    } else {
        for out in qcow_io(image, &commands) {
            assert!(out.success(), "qcow io failed\n{}", out.describe());
        }
    }
    for op in &ops {
        model.apply(op);
    }
}

/// The active disk as qemu-img reads it equals `model`.
fn assert_active(image: &Path, model: &DiskModel, context: &str) {
    let raw = qemu_raw_bytes(image, &image.with_extension("active.raw"));
    let at = model.first_difference(&raw);
    assert!(
        at.is_none(),
        "{context}: the active disk differs at byte {at:?}"
    );
}

/// The snapshot `name` as qemu-img reads it (`convert -l snapshot.name=NAME`) equals `model`.
fn assert_snapshot(image: &Path, name: &str, model: &DiskModel, context: &str) {
    let raw = image.with_extension("snapshot.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_ok(
        &[
            "convert",
            "-l",
            &format!("snapshot.name={name}"),
            "-O",
            "raw",
            &arg(image),
            &arg(&raw),
        ],
        context,
    );
    let bytes = std::fs::read(&raw).expect("read the converted snapshot");
    let at = model.first_difference(&bytes);
    assert!(
        at.is_none(),
        "{context}: snapshot '{name}' differs at byte {at:?}"
    );
    let _ = std::fs::remove_file(&raw);
}

fn both_checks_clean(image: &Path, context: &str) {
    assert_qemu_check_clean(image, context);
    assert_qcow_check_clean(image, context);
}

/// `qcow snapshot -l` prints exactly what `qemu-img snapshot -l` prints.
fn assert_lists_agree(image: &Path, context: &str) {
    let ours = qcow_ok(&["snapshot", "-l", &arg(image)], context);
    let theirs = qemu_ok(&["snapshot", "-l", &arg(image)], context);
    assert_eq!(
        ours.stdout, theirs.stdout,
        "{context}: qcow snapshot -l (left) differs from qemu-img snapshot -l (right)"
    );
}

fn create_image(image: &Path, spec: &ImageSpec, size: u64) {
    qcow_ok(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &spec.options(),
            &arg(image),
            &size.to_string(),
        ],
        "create",
    );
}

/// Snapshots made by qcow, with writes between them, are listed by qemu-img exactly as qcow lists
/// them; each keeps its bytes; qemu-img applies them; deleting the middle one of three keeps the
/// others intact; qemu-img check is clean after every step.
#[test]
fn qcow_snapshots_are_read_and_applied_by_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let specs = [
        ImageSpec::new(64 * KIB, 16, "1.1"),
        ImageSpec::new(4 * KIB, 16, "0.10"),
        ImageSpec::new(512, 4, "1.1"),
    ];
    for (index, spec) in specs.iter().enumerate() {
        let seed = 0x5a_0001 + index as u64;
        let context = format!("qcow snapshots ({}, seed {seed:#x})", spec.label());
        let mut rng = Rng::new(seed);
        let size = 3 * MIB;
        let image = dir.path().join(format!("qcow-snap-{index}.qcow2"));
        create_image(&image, spec, size);
        let mut model = DiskModel::zeroed(size);
        let mut taken = Vec::new();
        for name in ["one", "two", "three"] {
            write_some(&image, &mut model, &mut rng, spec.cluster_size, false);
            qcow_ok(&["snapshot", "-c", name, &arg(&image)], &context);
            both_checks_clean(&image, &format!("{context}, after creating {name}"));
            taken.push((name, model.clone()));
        }
        write_some(&image, &mut model, &mut rng, spec.cluster_size, false);
        both_checks_clean(&image, &format!("{context}, after writing past three"));
        assert_lists_agree(&image, &context);
        let listed = qemu_ok(&["snapshot", "-l", &arg(&image)], &context).stdout;
        for (id, (name, _)) in taken.iter().enumerate() {
            assert!(
                listed.contains(&format!("\n{:<7} {name} ", id + 1)),
                "{context}: qemu-img does not list snapshot {} '{name}':\n{listed}",
                id + 1
            );
        }
        assert_active(&image, &model, &context);
        for (name, snapshot_model) in &taken {
            assert_snapshot(&image, name, snapshot_model, &context);
        }
        // Delete the middle one: the other two keep their bytes, the active disk is untouched.
        qcow_ok(&["snapshot", "-d", "two", &arg(&image)], &context);
        let after = format!("{context}, after deleting two");
        both_checks_clean(&image, &after);
        assert_lists_agree(&image, &after);
        assert_active(&image, &model, &after);
        assert_snapshot(&image, "one", &taken[0].1, &after);
        assert_snapshot(&image, "three", &taken[2].1, &after);
        // qemu-img applies a qcow snapshot, then qemu-io writes on top: still consistent.
        qemu_ok(&["snapshot", "-a", "one", &arg(&image)], &after);
        let mut applied = taken[0].1.clone();
        assert_active(&image, &applied, &format!("{after}, qemu-img applied one"));
        write_some(&image, &mut applied, &mut rng, spec.cluster_size, true);
        both_checks_clean(&image, &format!("{after}, qemu-io wrote after applying"));
        assert_snapshot(&image, "one", &taken[0].1, &after);
        assert_snapshot(&image, "three", &taken[2].1, &after);
    }
}

/// Snapshots made by qemu-img are applied and deleted by qcow; create → write → apply returns the
/// pre-write bytes; qcow writes after applying copy the shared clusters.
#[test]
fn qemu_snapshots_are_applied_and_deleted_by_qcow() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for (index, spec) in [
        ImageSpec::new(64 * KIB, 16, "1.1"),
        ImageSpec::new(2 * KIB, 64, "1.1"),
    ]
    .iter()
    .enumerate()
    {
        let seed = 0x5a_0100 + index as u64;
        let context = format!("qemu snapshots ({}, seed {seed:#x})", spec.label());
        let mut rng = Rng::new(seed);
        let size = 2 * MIB;
        let image = dir.path().join(format!("qemu-snap-{index}.qcow2"));
        qemu_ok(
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &spec.options(),
                &arg(&image),
                &size.to_string(),
            ],
            &context,
        );
        let mut model = DiskModel::zeroed(size);
        write_some(&image, &mut model, &mut rng, spec.cluster_size, true);
        qemu_ok(&["snapshot", "-c", "base", &arg(&image)], &context);
        let base = model.clone();
        write_some(&image, &mut model, &mut rng, spec.cluster_size, true);
        qemu_ok(&["snapshot", "-c", "later", &arg(&image)], &context);
        let later = model.clone();
        assert_lists_agree(&image, &context);
        // qcow applies qemu's first snapshot, writes over it, applies it again.
        qcow_ok(&["snapshot", "-a", "base", &arg(&image)], &context);
        both_checks_clean(&image, &format!("{context}, qcow applied base"));
        assert_active(&image, &base, &format!("{context}, qcow applied base"));
        let mut written = base.clone();
        write_some(&image, &mut written, &mut rng, spec.cluster_size, false);
        both_checks_clean(&image, &format!("{context}, qcow wrote after apply"));
        assert_active(&image, &written, &context);
        assert_snapshot(&image, "base", &base, &context);
        qcow_ok(&["snapshot", "-a", "1", &arg(&image)], &context);
        assert_active(&image, &base, &format!("{context}, applied by id"));
        // Deleting the applied snapshot leaves the active disk alone.
        qcow_ok(&["snapshot", "-d", "base", &arg(&image)], &context);
        both_checks_clean(&image, &format!("{context}, qcow deleted base"));
        assert_active(&image, &base, &format!("{context}, qcow deleted base"));
        assert_snapshot(&image, "later", &later, &context);
        qcow_ok(&["snapshot", "-d", "later", &arg(&image)], &context);
        both_checks_clean(&image, &format!("{context}, qcow deleted later"));
        let out = qemu_ok(&["snapshot", "-l", &arg(&image)], &context);
        assert_eq!(
            out.stdout, "",
            "{context}: snapshots left after deleting both"
        );
    }
}

/// qemu-img's messages and exit codes for the failing cases.
#[test]
fn snapshot_errors_match_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    for image in [&ours, &theirs] {
        qemu_ok(
            &["create", "-q", "-f", "qcow2", &arg(image), "1M"],
            "create",
        );
        qemu_ok(&["snapshot", "-c", "a", &arg(image)], "snapshot");
    }
    let cases: [&[&str]; 5] = [
        &["-d", "nope"],
        &["-a", "nope"],
        // -d matches names only; -a matches ids too.
        &["-d", "1"],
        &["-c", "x", "-d", "a"],
        &["-c", "a"],
    ];
    for case in cases {
        let run = |tool: &str, image: &Path| {
            let mut args: Vec<String> = vec!["snapshot".into()];
            args.extend(case.iter().map(|s| s.to_string()));
            args.push(arg(image));
            if tool == "qcow" {
                qcow(&args)
            } else {
                qemu_img(&args)
            }
        };
        let (a, b) = (run("qcow", &ours), run("qemu-img", &theirs));
        assert_eq!(
            a.code,
            b.code,
            "snapshot {case:?}: exit codes differ\nqcow:\n{}\nqemu-img:\n{}",
            a.describe(),
            b.describe()
        );
        let normalise = |text: &str| {
            text.replace("qemu-img", "qcow")
                .replace(&arg(&ours), "IMAGE")
                .replace(&arg(&theirs), "IMAGE")
        };
        assert_eq!(
            normalise(&a.stderr),
            normalise(&b.stderr),
            "snapshot {case:?}: messages differ"
        );
    }
    // Two snapshots with one name are allowed (qemu-img makes them too).
    assert_lists_agree(&ours, "duplicate names");
    qcow_ok(&["snapshot", "-a", "1", &arg(&ours)], "apply by id");
}

/// A VM-state blob stored with a snapshot through the library: qemu-img sees its size, checks the
/// image clean and applies the snapshot; the library reads the blob back.
#[test]
fn vm_state_is_stored_like_qemus() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("vmstate.qcow2");
    create_image(&image, &ImageSpec::new(64 * KIB, 16, "1.1"), 8 * MIB);
    let mut disk = DiskModel::zeroed(8 * MIB);
    let op = DiskOp::Write {
        offset: 100 * KIB,
        len: 300 * KIB,
        pattern: 0x3c,
    };
    qcow_io(&image, &[op.command()]);
    disk.apply(&op);
    let state: Vec<u8> = (0..(5 * MIB + 1234)).map(|i| (i % 251) as u8).collect();
    {
        let mut opened = qcow::Image::open(&image, &qcow::OpenOptions::default()).expect("open");
        let new = qcow::NewSnapshot {
            name: "with-state".into(),
            vm_state: &state,
            vm_clock_nsec: 61_500_000_000,
            icount: None,
        };
        opened.create_snapshot(&new).expect("create snapshot");
        opened.close().expect("close");
    }
    both_checks_clean(&image, "vm state");
    let info = qemu_ok(&["info", "--output=json", &arg(&image)], "info");
    let json: serde_json::Value = serde_json::from_str(&info.stdout).expect("json");
    assert_eq!(json["snapshots"][0]["vm-state-size"], state.len() as u64);
    assert_eq!(json["snapshots"][0]["vm-clock-sec"], 61);
    assert_lists_agree(&image, "vm state");
    // The disk the snapshot holds is the disk, not the VM state.
    assert_snapshot(&image, "with-state", &disk, "vm state");
    let overwrite = DiskOp::Write {
        offset: 0,
        len: 8 * MIB,
        pattern: 0x77,
    };
    qcow_io(&image, &[overwrite.command()]);
    qemu_ok(&["snapshot", "-a", "with-state", &arg(&image)], "apply");
    assert_active(&image, &disk, "vm state, applied by qemu-img");
    let mut opened = qcow::Image::open(&image, &qcow::OpenOptions::default()).expect("open");
    let index = opened.find_snapshot("with-state").expect("snapshot listed");
    assert_eq!(opened.snapshot_vm_state(index).expect("read state"), state);
    opened.apply_snapshot(index).expect("apply");
    opened.close().expect("close");
    both_checks_clean(&image, "vm state, applied by qcow");
    assert_active(&image, &disk, "vm state, applied by qcow");
}

/// `check -r all` rebuilding the refcount structure counts every snapshot's references: after the
/// refcounts of an image with snapshots are wiped, the repaired image is clean for qemu-img and
/// every snapshot still holds its bytes.
#[test]
fn repair_rebuild_counts_snapshot_references() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("rebuild.qcow2");
    let spec = ImageSpec::new(64 * KIB, 16, "1.1");
    create_image(&image, &spec, 4 * MIB);
    let mut rng = Rng::new(0x5a_0200);
    let mut model = DiskModel::zeroed(4 * MIB);
    let mut taken = Vec::new();
    for name in ["first", "second"] {
        write_some(&image, &mut model, &mut rng, spec.cluster_size, false);
        qcow_ok(&["snapshot", "-c", name, &arg(&image)], name);
        taken.push((name, model.clone()));
    }
    write_some(&image, &mut model, &mut rng, spec.cluster_size, false);
    // The refcount block of a fresh 64 KiB-cluster image is cluster 2: keep the entries of the
    // header, refcount table, refcount block and L1 table, zero every other one.
    let mut bytes = std::fs::read(&image).expect("read image");
    bytes[0x20000 + 8..0x30000].fill(0);
    std::fs::write(&image, &bytes).expect("write image");
    let damaged = qemu_img(&["check", &arg(&image)]);
    assert_eq!(damaged.code, Some(2), "{}", damaged.describe());
    let repair = qcow(&["check", "-r", "all", &arg(&image)]);
    assert!(
        repair.success(),
        "qcow check -r all did not repair\n{}",
        repair.describe()
    );
    both_checks_clean(&image, "after the rebuild");
    assert_active(&image, &model, "after the rebuild");
    for (name, snapshot_model) in &taken {
        assert_snapshot(&image, name, snapshot_model, "after the rebuild");
    }
    // Writes after the rebuild must still copy the shared clusters.
    write_some(&image, &mut model, &mut rng, spec.cluster_size, false);
    both_checks_clean(&image, "written after the rebuild");
    for (name, snapshot_model) in &taken {
        assert_snapshot(&image, name, snapshot_model, "written after the rebuild");
    }
}
