//! Disks end to end: the guest's disk workload (`disk=1`) on a fresh qcow2 image, on an overlay
//! over a filled backing file and on a raw file prints the oracle's digest, and afterwards
//! `qemu-img check` finds the image clean and `qemu-img compare` finds it identical to the
//! oracle's expected contents; flushes reach `fdatasync`; read-only disks refuse writes; bad
//! `--disk` flags and images are refused before KVM is touched.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::Path;

use cowvm_guest_abi::WorkloadArgs;
use cowvm_tests::disk_harness::{
    assert_image_is, create_qcow2, create_qcow2_overlay, expected_done, expected_image, patterned,
};
use cowvm_tests::qcow_harness::{qemu_img, skip_without_qemu};
use cowvm_tests::vmm_harness::{cowvm, kvm_usable, stderr, stdout};

const DISK_SIZE: usize = 8 << 20;

fn run_with_disk(disk: &str, vcpus: &str, args: &str) -> std::process::Output {
    cowvm(&[
        "run", "--mem", "128M", "--vcpus", vcpus, "--disk", disk, "--args", args,
    ])
}

/// Two runs of the workload on `image` (opened with `disk_flag`), the second over what the first
/// left: each prints the oracle's digest for a disk that held what it found, and leaves the
/// image qemu-img finds clean and identical to the oracle's contents.
fn check_workload(dir: &Path, image: &Path, disk_flag: &str, format: &str, initial: &[u8]) {
    let name = image.file_name().unwrap().to_string_lossy().into_owned();
    let mut before = initial.to_vec();
    for (run, (vcpus, args)) in [
        (
            "1",
            "disk=1 pages=512 rounds=6 seed=9 write=40 disk_blocks=512 disk_batch=32",
        ),
        (
            "2",
            "disk=1 pages=300 rounds=3 seed=77 write=70 disk_blocks=700",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let context = format!("run {run}: {disk_flag} {args}");
        let output = run_with_disk(disk_flag, vcpus, args);
        let out = stdout(&output);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{context}: {}{out}",
            stderr(&output)
        );
        let id_line = format!("disk0: {} sectors, id {name}\n", DISK_SIZE / 512);
        assert!(out.contains(&id_line), "{context}: {out}");
        assert_eq!(
            out.lines().last().unwrap(),
            expected_done(args, 0, &before),
            "{context}"
        );
        let expected = expected_image(&WorkloadArgs::parse(args).unwrap(), 0, &before);
        let expected_path = dir.join(format!("expected{run}.raw"));
        std::fs::write(&expected_path, &expected).unwrap();
        assert_image_is(image, format, &expected_path, &context);
        before = expected;
    }
}

#[test]
fn disk_workload_on_a_fresh_qcow2_image() {
    if !kvm_usable("disk_workload_on_a_fresh_qcow2_image") || skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fresh.qcow2");
    create_qcow2(&image, "8M");
    let flag = image.to_str().unwrap().to_string();
    check_workload(dir.path(), &image, &flag, "qcow2", &vec![0; DISK_SIZE]);
}

#[test]
fn disk_workload_on_an_overlay_over_a_filled_backing_file() {
    if !kvm_usable("disk_workload_on_an_overlay_over_a_filled_backing_file") || skip_without_qemu()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let filled = patterned(DISK_SIZE, 0xbac4);
    let base_raw = dir.path().join("base.raw");
    std::fs::write(&base_raw, &filled).unwrap();
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("overlay.qcow2");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "qcow2",
        &path(&base_raw),
        &path(&base),
    ])
    .ok();
    create_qcow2_overlay(&overlay, "base.qcow2");
    let flag = format!("{},format=qcow2", path(&overlay));
    check_workload(dir.path(), &overlay, &flag, "qcow2", &filled);
    assert_image_is(
        &base,
        "qcow2",
        &base_raw,
        "the backing file is never written",
    );
}

#[test]
fn disk_workload_on_a_raw_file() {
    if !kvm_usable("disk_workload_on_a_raw_file") || skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initial = patterned(DISK_SIZE, 0x4a3);
    let image = dir.path().join("disk.img");
    std::fs::write(&image, &initial).unwrap();
    let flag = format!("{},format=raw", image.to_str().unwrap());
    check_workload(dir.path(), &image, &flag, "raw", &initial);
}

#[test]
fn guest_flushes_reach_fdatasync() {
    if !kvm_usable("guest_flushes_reach_fdatasync") || skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.qcow2");
    create_qcow2(&image, "8M");
    let trace = dir.path().join("trace");
    let count = |args: &str| {
        let status = std::process::Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=fdatasync,fsync", "-o"])
            .arg(&trace)
            .arg(cowvm_tests::bin_path("cowvm"))
            .args(["run", "--disk", image.to_str().unwrap(), "--args", args])
            .stdout(std::process::Stdio::null())
            .status();
        match status {
            Ok(status) => assert!(status.success(), "{args}"),
            Err(_) => return None,
        }
        let text = std::fs::read_to_string(&trace).unwrap();
        Some(
            text.lines()
                .filter(|l| l.contains("fdatasync(") || l.contains("fsync("))
                .count(),
        )
    };
    // Three rounds, each one batch of writes and one flush.
    let Some(with_disk) = count("disk=1 pages=16 rounds=3 write=100 disk_blocks=64") else {
        println!("SKIP: strace is not installed");
        return;
    };
    // Without guest flushes only the final flush when the VM stops syncs.
    let without = count("pages=16 rounds=3").unwrap();
    assert!(without <= 1, "{without} syncs without guest flushes");
    assert!(
        with_disk >= without + 3,
        "{with_disk} syncs for 3 guest flushes"
    );
}

#[test]
fn read_only_disks_fail_guest_writes_and_stay_unchanged() {
    if !kvm_usable("read_only_disks_fail_guest_writes_and_stay_unchanged") || skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ro.qcow2");
    create_qcow2(&image, "8M");
    let before = std::fs::read(&image).unwrap();
    let output = run_with_disk(
        &format!("{},readonly", image.display()),
        "1",
        "disk=1 pages=16 write=100",
    );
    assert_eq!(output.status.code(), Some(3), "{}", stdout(&output));
    assert!(
        stdout(&output)
            .contains("guest error (vcpu 0): disk: request on block 0 failed with status 1\n"),
        "{}",
        stdout(&output)
    );
    assert_eq!(std::fs::read(&image).unwrap(), before);
}

#[test]
fn bad_disks_are_refused_before_kvm_is_opened() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    create_qcow2(&dir.path().join("base.qcow2"), "1M");
    create_qcow2_overlay(&dir.path().join("ov.qcow2"), "base.qcow2");
    let mut image = qcow::Image::open(path("ov.qcow2"), &qcow::OpenOptions::default()).unwrap();
    image.set_backing_file(Some("base.qcow2"), None).unwrap();
    image.close().unwrap();
    std::fs::write(path("tiny.img"), [0u8; 100]).unwrap();
    let run = |disk: &str, args: &str| {
        cowvm(&[
            "run",
            "--kvm-device",
            &path("no-kvm"),
            "--disk",
            disk,
            "--args",
            args,
        ])
    };
    let cases = [
        (run(&path("missing.qcow2"), ""), "missing.qcow2: cannot read it to probe its format"),
        (
            run(&path("ov.qcow2"), ""),
            "names the backing file base.qcow2 without a backing format; cowvm never probes a backing file's format",
        ),
        (run(&path("tiny.img"), ""), "100 bytes is smaller than one 512-byte sector"),
        (
            run(&path("base.qcow2"), "disk=1 disk_blocks=512"),
            "1048576 bytes is smaller than the guest's disk workload needs (2097152 bytes for disk_blocks=512)",
        ),
        (
            run(&format!("{},format=raw", path("base.qcow2")), "disk=1 pages=16000"),
            "RAM hold at most",
        ),
    ];
    for (output, needle) in cases {
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{needle}: {err}");
        assert!(err.contains(needle), "expected `{needle}` in:\n{err}");
        assert!(
            !err.contains("/dev/kvm") && !err.contains("no-kvm"),
            "checked before KVM: {err}"
        );
    }
    let output = cowvm(&["run", "--kvm-device", &path("no-kvm"), "--args", "disk=1"]);
    assert!(stderr(&output)
        .contains("--args disk=1: the guest's disk workload needs a disk; add --disk PATH"));
    let output = cowvm(&[
        "run",
        "--disk",
        &format!("{},cache=none", path("base.qcow2")),
    ]);
    assert_eq!(output.status.code(), Some(2), "a usage error");
    assert!(
        stderr(&output).contains("unknown option `cache=none` (known: readonly, format=qcow2|raw)")
    );
}
