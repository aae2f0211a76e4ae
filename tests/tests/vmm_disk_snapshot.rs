//! Disks in snapshots: a snapshot freezes every disk at the instant it pauses the guest (the
//! image the VM wrote becomes read-only, the VM continues on a fresh overlay), restores and
//! merges give each VM its own overlay over the frozen chain, the guest's digest equals the
//! oracle's, every image qemu-img finds clean holds what the oracle predicts, and the frozen
//! images stay byte-identical while restored VMs run. Tampered or missing images are refused.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cowvm_guest_abi::WorkloadArgs;
use cowvm_tests::disk_harness::{
    assert_image_is, create_qcow2, expected_done, expected_image, patterned,
};
use cowvm_tests::qcow_harness::{qemu_img, skip_without_qemu};
use cowvm_tests::vmm_harness::{cowvm, kvm_usable, stderr, stdout, RunningVm};

const DISK_SIZE: usize = 8 << 20;
const ARGS: &str = "disk=1 pages=2000 rounds=300 write=30 disk_blocks=256";

fn inspect(dir: &Path) -> serde_json::Value {
    let output = cowvm(&["snapshot", "inspect", "--json", dir.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The frozen images a snapshot names, resolved.
fn frozen_images(snapshot: &Path) -> Vec<PathBuf> {
    inspect(snapshot)["disks"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| snapshot.join(p.as_str().unwrap()))
        .collect()
}

/// Every file's bytes, to prove nothing changed.
fn contents(paths: &[PathBuf]) -> BTreeMap<PathBuf, Vec<u8>> {
    paths
        .iter()
        .map(|p| (std::fs::canonicalize(p).unwrap(), std::fs::read(p).unwrap()))
        .collect()
}

fn overlays(snapshots: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(snapshots.join("cowvm-disks"))
        .map(|dir| dir.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Restores `snapshot` to the end; returns its last line and the overlay it wrote.
fn restore_to_end(snapshot: &Path) -> (String, PathBuf) {
    let parent = snapshot.parent().unwrap();
    let before = overlays(parent);
    let output = cowvm(&["restore", snapshot.to_str().unwrap()]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "restore: {}",
        stderr(&output)
    );
    let created: Vec<PathBuf> = overlays(parent)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(
        created.len(),
        1,
        "one fresh overlay per restore: {created:?}"
    );
    let last = stdout(&output).lines().last().unwrap().to_string();
    (last, created[0].clone())
}

/// Boots the workload on `disk`, takes a full and a diff snapshot while it runs, and checks
/// every restore, a merge and the original VM against the oracle.
fn snapshot_and_restore(dir: &Path, disk: &str, initial: &[u8], frozen_base: &Path) {
    let snaps = dir.join("snaps");
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let vm = RunningVm::spawn(
        &vm_dir,
        &["run", "--mem", "64M", "--disk", disk, "--args", ARGS],
    );
    std::thread::sleep(Duration::from_millis(400));
    let (full, diff) = (snaps.join("full"), snaps.join("diff"));
    vm.snapshot(&full, false);
    std::thread::sleep(Duration::from_millis(300));
    vm.snapshot(&diff, true);
    let live = vm.stats()["disks"][0]["path"].as_str().unwrap().to_string();
    let (code, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    let oracle = expected_done(ARGS, 0, initial);
    let serial = std::fs::read_to_string(vm_dir.join("serial.log")).unwrap();
    assert_eq!(
        serial.lines().last().unwrap(),
        oracle,
        "the VM that was snapshotted"
    );
    let expected = expected_image(&WorkloadArgs::parse(ARGS).unwrap(), 0, initial);
    let expected_path = dir.join("expected.raw");
    std::fs::write(&expected_path, &expected).unwrap();
    assert_image_is(
        Path::new(&live),
        "qcow2",
        &expected_path,
        "the live overlay after the run",
    );

    // The full snapshot froze the user's image itself; the diff froze the overlay after it.
    let full_images = frozen_images(&full);
    let diff_images = frozen_images(&diff);
    assert_eq!(full_images.len(), 1);
    assert_eq!(
        std::fs::canonicalize(&full_images[0]).unwrap(),
        std::fs::canonicalize(frozen_base).unwrap()
    );
    assert_eq!(
        diff_images.len(),
        2,
        "a diff adds one overlay: {diff_images:?}"
    );
    let frozen: Vec<PathBuf> = diff_images.clone();
    assert!(
        std::fs::metadata(&frozen[0])
            .unwrap()
            .permissions()
            .readonly(),
        "cowvm's frozen overlays are read-only"
    );
    let before = contents(&frozen);

    for snapshot in [&full, &diff] {
        let (last, overlay) = restore_to_end(snapshot);
        assert_eq!(last, oracle, "restore of {}", snapshot.display());
        assert_image_is(
            &overlay,
            "qcow2",
            &expected_path,
            &format!("{} restored", snapshot.display()),
        );
    }
    let merged = snaps.join("merged");
    let output = cowvm(&[
        "snapshot",
        "merge",
        diff.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let canonical = |images: Vec<PathBuf>| -> Vec<PathBuf> {
        images
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap())
            .collect()
    };
    assert_eq!(
        canonical(frozen_images(&merged)),
        canonical(frozen_images(&diff)),
        "merge keeps the disk chain"
    );
    let (last, _) = restore_to_end(&merged);
    assert_eq!(last, oracle, "restore of the merged snapshot");
    assert_eq!(
        contents(&frozen),
        before,
        "frozen images unchanged by the restored VMs"
    );
}

#[test]
fn full_and_diff_snapshots_freeze_a_qcow2_disk() {
    if !kvm_usable("full_and_diff_snapshots_freeze_a_qcow2_disk") || skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, "8M");
    snapshot_and_restore(
        dir.path(),
        image.to_str().unwrap(),
        &vec![0; DISK_SIZE],
        &image,
    );
    qemu_img(&["check", "-q", image.to_str().unwrap()]).ok();
}

#[test]
fn full_and_diff_snapshots_freeze_a_raw_disk() {
    if !kvm_usable("full_and_diff_snapshots_freeze_a_raw_disk") || skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initial = patterned(DISK_SIZE, 0x5a5);
    let image = dir.path().join("disk.img");
    std::fs::write(&image, &initial).unwrap();
    let flag = format!("{},format=raw", image.display());
    snapshot_and_restore(dir.path(), &flag, &initial, &image);
}

#[test]
fn a_snapshot_mid_batch_holds_the_rest_and_its_restore_carries_them_out() {
    if !kvm_usable("a_snapshot_mid_batch_holds_the_rest_and_its_restore_carries_them_out")
        || skip_without_qemu()
    {
        return;
    }
    // Disk-bound: every round writes all 1024 blocks in batches of 128 requests and reads them
    // back, so a pause nearly always finds vCPU 0 inside a batch.
    let args = "disk=1 pages=64 rounds=150 write=100 disk_blocks=1024 disk_batch=128";
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, "8M");
    let vm = run_with_disk(dir.path(), &image, args);
    std::thread::sleep(Duration::from_millis(100));
    let snaps = dir.path().join("snaps");
    let mut held = None;
    for attempt in 0..20 {
        let path = snaps.join(format!("s{attempt}"));
        let reply = request(
            &vm.socket,
            &format!(r#"{{"cmd":"snapshot","path":"{}"}}"#, path.display()),
        );
        assert_eq!(reply["ok"], true, "{reply}");
        let count = reply["disk_requests_held"].as_u64().unwrap();
        assert!(count <= 128, "at most one batch is held back: {reply}");
        if count > 0 {
            held = Some(path);
            break;
        }
    }
    let held = held.expect("one of 20 snapshots paused the guest inside a batch");
    let (code, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    let initial = vec![0; DISK_SIZE];
    let oracle = expected_done(args, 0, &initial);
    let serial = std::fs::read_to_string(dir.path().join("vm").join("serial.log")).unwrap();
    assert_eq!(
        serial.lines().last().unwrap(),
        oracle,
        "the VM that was paused"
    );
    let expected = expected_image(&WorkloadArgs::parse(args).unwrap(), 0, &initial);
    let expected_path = dir.path().join("expected.raw");
    std::fs::write(&expected_path, &expected).unwrap();
    let (last, overlay) = restore_to_end(&held);
    assert_eq!(
        last, oracle,
        "the restored VM carried out the held requests"
    );
    assert_image_is(
        &overlay,
        "qcow2",
        &expected_path,
        "the restored VM's overlay",
    );
}

/// Snapshots a VM whose disk is a 1 GiB image (so a write past 512 MiB needs a new L2 table,
/// which changes the L1 table) and returns the snapshot directory.
fn snapshot_of(dir: &Path, disk: &str, args: &str) -> PathBuf {
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let vm = RunningVm::spawn(
        &vm_dir,
        &["run", "--mem", "64M", "--disk", disk, "--args", args],
    );
    std::thread::sleep(Duration::from_millis(200));
    let snapshot = dir.join("snaps").join("s");
    vm.snapshot(&snapshot, false);
    vm.kill();
    snapshot
}

#[test]
fn restores_refuse_frozen_images_that_changed_or_went_missing() {
    if !kvm_usable("restores_refuse_frozen_images_that_changed_or_went_missing")
        || skip_without_qemu()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, "1G");
    let snapshot = snapshot_of(
        dir.path(),
        image.to_str().unwrap(),
        "disk=1 pages=100 rounds=100000 disk_blocks=64",
    );
    let restore = |expect: &str| {
        let output = cowvm(&["restore", snapshot.to_str().unwrap()]);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{err}");
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
        let inspected = cowvm(&["snapshot", "inspect", snapshot.to_str().unwrap()]);
        assert!(
            stderr(&inspected).contains(expect),
            "inspect runs the same checks"
        );
    };
    // A write that allocates a new L2 table in the frozen image.
    let saved = std::fs::read(&image).unwrap();
    let output = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 768M 4k"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(output.status.success());
    restore("frozen image");
    restore("was modified after the snapshot (its metadata checksum differs)");
    std::fs::write(&image, &saved).unwrap();
    // A backing file recorded where there was none.
    let mut opened = qcow::Image::open(&image, &qcow::OpenOptions::default()).unwrap();
    opened
        .set_backing_file(Some("elsewhere.qcow2"), Some("qcow2"))
        .unwrap();
    opened.close().unwrap();
    restore("disk 0");
    std::fs::remove_file(&image).unwrap();
    restore("disk 0's image");
    restore("is missing");
    std::fs::write(&image, &saved).unwrap();
    let output = cowvm(&["snapshot", "inspect", snapshot.to_str().unwrap()]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "restored as it was: {}",
        stderr(&output)
    );
}

#[test]
fn read_only_disks_are_recorded_and_reopened_without_an_overlay() {
    if !kvm_usable("read_only_disks_are_recorded_and_reopened_without_an_overlay")
        || skip_without_qemu()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ro.qcow2");
    create_qcow2(&image, "8M");
    let before = std::fs::read(&image).unwrap();
    let flag = format!("{},readonly", image.display());
    let snapshot = snapshot_of(dir.path(), &flag, "pages=100 rounds=1000000");
    assert!(
        overlays(snapshot.parent().unwrap()).is_empty(),
        "no overlay for a read-only disk"
    );
    let vm_dir = dir.path().join("restored");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let vm = RunningVm::restore(&vm_dir, &snapshot, &[]);
    let disk = &vm.stats()["disks"][0];
    assert_eq!(
        (
            disk["read_only"].as_bool(),
            disk["overlay"].as_bool(),
            disk["path"].as_str()
        ),
        (
            Some(true),
            Some(false),
            std::fs::canonicalize(&image).unwrap().to_str()
        )
    );
    vm.kill();
    assert!(overlays(snapshot.parent().unwrap()).is_empty());
    assert_eq!(std::fs::read(&image).unwrap(), before);
}

/// `cowvm run --mem 64M --disk IMAGE --args ARGS` with its socket and serial file in `dir/vm`.
fn run_with_disk(dir: &Path, image: &Path, args: &str) -> RunningVm {
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let disk = image.to_str().unwrap();
    RunningVm::spawn(
        &vm_dir,
        &["run", "--mem", "64M", "--disk", disk, "--args", args],
    )
}

/// One request on its own connection; the reply.
fn request(socket: &Path, json: &str) -> serde_json::Value {
    cowvm_tests::vmm_harness::ApiClient::connect(socket)
        .unwrap()
        .request(json)
        .expect("a reply")
}

/// Waits (up to two minutes) for a `DONE` line in a serial output file.
fn wait_for_done(serial: &Path) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if let Some(line) = text
            .split_inclusive('\n')
            .find(|l| l.starts_with("DONE ") && l.ends_with('\n'))
        {
            return line.trim_end().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no DONE in {}:\n{text}",
            serial.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The only overlay in `dir/cowvm-disks` whose name starts with `prefix`.
fn overlay_named(dir: &Path, prefix: &str) -> PathBuf {
    let found: Vec<PathBuf> = overlays(dir)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    assert_eq!(found.len(), 1, "{prefix} in {:?}", overlays(dir));
    found[0].clone()
}

#[test]
fn live_fork_children_write_their_own_overlays_and_live_snapshots_freeze_disks() {
    if !kvm_usable("live_fork_children_write_their_own_overlays_and_live_snapshots_freeze_disks")
        || skip_without_qemu()
    {
        return;
    }
    // Generation rounds make each forked child write its own data to memory and disk.
    let args = "disk=1 pages=2000 rounds=100 gen_rounds=100 write=50 disk_blocks=256";
    let parsed = WorkloadArgs::parse(args).unwrap();
    let zeros = vec![0u8; DISK_SIZE];
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, "8M");
    let vm = run_with_disk(dir.path(), &image, args);
    std::thread::sleep(Duration::from_millis(150));
    // A live snapshot first: the writer child records the disk frozen at its pause.
    let snapshot = dir.path().join("snaps").join("live");
    let reply = request(
        &vm.socket,
        &format!(
            r#"{{"cmd":"snapshot","path":"{}","live":true}}"#,
            snapshot.display()
        ),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let snapshot_images = frozen_images(&snapshot);
    assert_eq!(
        std::fs::canonicalize(&snapshot_images[0]).unwrap(),
        std::fs::canonicalize(&image).unwrap(),
        "the live snapshot froze the user's image"
    );
    // Then a fork into two, whose children put their own overlays on the image the parent
    // froze at the fork (its overlay from the live snapshot).
    let forks = dir.path().join("forks");
    std::fs::create_dir(&forks).unwrap();
    let reply = request(
        &vm.socket,
        &format!(
            r#"{{"cmd":"fork","count":2,"serial_dir":"{0}","socket_dir":"{0}"}}"#,
            forks.display()
        ),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let children = reply["children"].as_array().unwrap().clone();
    let frozen_at_fork = PathBuf::from(vm.stats()["disks"][0]["path"].as_str().unwrap());
    let disks_dir = dir.path().join("snaps");
    let frozen_chain = [
        overlay_named(&disks_dir, "live.disk0."),
        std::fs::canonicalize(&image).unwrap(),
    ];
    let frozen = contents(&frozen_chain);
    for child in &children {
        let generation = child["generation"].as_u64().unwrap();
        let serial = PathBuf::from(child["serial"].as_str().unwrap());
        assert_eq!(
            wait_for_done(&serial),
            expected_done(args, generation, &zeros),
            "child {child}"
        );
        let overlay = overlay_named(&disks_dir, &format!("fork-{generation:016x}.disk0."));
        let expected = dir.path().join(format!("expected-{generation:x}.raw"));
        std::fs::write(&expected, expected_image(&parsed, generation, &zeros)).unwrap();
        assert_image_is(
            &overlay,
            "qcow2",
            &expected,
            &format!("child {generation:#x}"),
        );
    }
    let serial_path = vm.serial.clone();
    let (code, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    let serial = std::fs::read_to_string(serial_path).unwrap();
    assert_eq!(
        serial.lines().last().unwrap(),
        expected_done(args, 0, &zeros),
        "the parent"
    );
    assert!(
        frozen_at_fork
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("fork.disk0."),
        "the parent moved on to its own overlay: {}",
        frozen_at_fork.display()
    );
    let expected = dir.path().join("expected-parent.raw");
    std::fs::write(&expected, expected_image(&parsed, 0, &zeros)).unwrap();
    assert_image_is(&frozen_at_fork, "qcow2", &expected, "the parent");
    assert_eq!(
        contents(&frozen_chain),
        frozen,
        "frozen images unchanged by the forked VMs"
    );
    // The live snapshot restores to the oracle too.
    let (last, _) = restore_to_end(&snapshot);
    assert_eq!(last, expected_done(args, 0, &zeros));
    assert_eq!(contents(&frozen_chain), frozen);
}

#[test]
fn clones_write_their_own_overlays_over_the_template_disk() {
    if !kvm_usable("clones_write_their_own_overlays_over_the_template_disk") || skip_without_qemu()
    {
        return;
    }
    // The template writes its disk in the base rounds, then waits; each clone writes memory and
    // disk with keys of its own generation.
    let args = "disk=1 pages=500 rounds=2 seed=3 write=40 gen_rounds=2 wait=1 disk_blocks=128";
    let parsed = WorkloadArgs::parse(args).unwrap();
    let zeros = vec![0u8; DISK_SIZE];
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, "8M");
    let vm = run_with_disk(dir.path(), &image, args);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&vm.serial)
        .unwrap_or_default()
        .contains("waiting for a generation id")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the template never waited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let template = dir.path().join("snaps").join("template");
    vm.snapshot(&template, false);
    vm.kill();
    let frozen = contents(&frozen_images(&template));
    let output = cowvm(&[
        "clone",
        "--json",
        template.to_str().unwrap(),
        "--count",
        "3",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let outcomes: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("generation").is_some())
        .collect();
    assert_eq!(outcomes.len(), 3, "{}", stdout(&output));
    for outcome in &outcomes {
        let generation = outcome["generation"].as_u64().unwrap();
        assert_eq!(
            outcome["last_line"],
            expected_done(args, generation, &zeros),
            "clone {generation}"
        );
        // The template froze the user's image; each clone's overlay sits beside it.
        let overlay = overlay_named(dir.path(), &format!("clone-{generation}.disk0."));
        let expected = dir.path().join(format!("expected-{generation}.raw"));
        std::fs::write(&expected, expected_image(&parsed, generation, &zeros)).unwrap();
        assert_image_is(&overlay, "qcow2", &expected, &format!("clone {generation}"));
    }
    assert_eq!(
        contents(&frozen_images(&template)),
        frozen,
        "the template's disk is unchanged by its clones"
    );
}
