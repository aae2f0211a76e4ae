//! What makes a snapshot trustworthy: its files reach the disk before its name does, its memory
//! can be verified against recorded checksums, the memory file a restored VM maps cannot change
//! under it unnoticed, an in-place merge keeps dependent diffs valid, and snapshots written by
//! earlier format versions still restore.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cowvm_tests::bin_path;
use cowvm_tests::vmm_harness::{
    assert_error, cowvm, expected_done, inspect, kvm_usable, restore_done, stderr, stdout,
    RunningVm,
};

/// The workload of the committed fixtures (see `tests/fixtures/README.md`).
const FIXTURE_ARGS: &str = "pages=8 rounds=2000000 seed=5 write=5";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Copies a snapshot directory (so a test may change it).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn make_writable(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn no_staging_left(dir: &Path) {
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "staging directories left: {leftovers:?}"
    );
}

/// A full snapshot of a running `pages=2000` guest in `dir/full`.
fn full_snapshot(dir: &Path, args: &str) -> PathBuf {
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let vm = RunningVm::start(&vm_dir, "1", args);
    std::thread::sleep(Duration::from_millis(100));
    let full = dir.join("full");
    vm.snapshot(&full, false);
    vm.kill();
    full
}

/// The calls of an `strace -f` log, with `<unfinished ...>` / `resumed` halves joined.
fn strace_calls(log: &str) -> Vec<String> {
    let mut pending: HashMap<String, String> = HashMap::new();
    let mut calls = Vec::new();
    for line in log.lines() {
        let Some((tid, rest)) = line.split_once(' ') else {
            continue;
        };
        // strace pads short pids ("4989  openat(…"), so the call may follow several spaces.
        let rest = rest.trim_start();
        if let Some(start) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(tid.to_string(), start.to_string());
        } else if let Some((_, end)) = rest.split_once(" resumed>") {
            let start = pending.remove(tid).unwrap_or_default();
            calls.push(format!("{start}{end}"));
        } else if !rest.starts_with("---") && !rest.starts_with("+++") {
            calls.push(rest.to_string());
        }
    }
    calls
}

#[test]
fn snapshot_files_are_fsynced_before_the_directory_is_published() {
    if !kvm_usable("snapshot_files_are_fsynced_before_the_directory_is_published") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let socket = dir.path().join("api.sock");
    let mut child = Command::new("strace")
        .args(["-f", "--seccomp-bpf", "-e"])
        .arg("trace=openat,fdatasync,fsync,rename,renameat2")
        .arg("-o")
        .arg(&log)
        .arg(bin_path("cowvm"))
        .args([
            "run",
            "--args",
            "pages=500 rounds=1000000 write=10",
            "--api-socket",
        ])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace is needed for this test (.ci/run installs it)");
    cowvm_tests::vmm_harness::wait_for_socket(&socket);
    let snap = dir.path().join("snap");
    let output = cowvm(&[
        "snapshot",
        "create",
        "--api-socket",
        socket.to_str().unwrap(),
        snap.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    cowvm(&["shutdown", "--api-socket", socket.to_str().unwrap()]);
    assert!(child.wait().unwrap().success());

    let calls = strace_calls(&std::fs::read_to_string(&log).unwrap());
    let final_name = snap.display().to_string();
    let parent = dir.path().display().to_string();
    let mut open_fds: HashMap<String, String> = HashMap::new();
    let mut synced: HashSet<String> = HashSet::new();
    let mut renamed_from = None;
    let mut parent_synced_after_rename = false;
    for call in &calls {
        if let Some(args) = call.strip_prefix("openat(AT_FDCWD, \"") {
            let (path, rest) = args.split_once('"').unwrap();
            if let Some((_, fd)) = rest.rsplit_once("= ") {
                open_fds.insert(fd.trim().to_string(), path.to_string());
            }
        } else if let Some(fd) = call
            .strip_prefix("fdatasync(")
            .or_else(|| call.strip_prefix("fsync("))
        {
            let fd = fd.split(')').next().unwrap();
            if let Some(path) = open_fds.get(fd) {
                if renamed_from.is_some() && *path == parent {
                    parent_synced_after_rename = true;
                }
                synced.insert(path.clone());
            }
        } else if call.starts_with("rename(") && call.contains(&format!("\"{final_name}\"")) {
            let tmp = call.split('"').nth(1).unwrap().to_string();
            for file in ["memory", "state"] {
                let path = format!("{tmp}/{file}");
                assert!(
                    synced.contains(&path),
                    "{path} was not fsynced before the rename"
                );
            }
            assert!(
                synced.contains(&tmp),
                "the staging directory was not fsynced"
            );
            renamed_from = Some(tmp);
        }
    }
    assert!(
        renamed_from.is_some(),
        "no rename to {final_name} in {calls:#?}"
    );
    assert!(
        parent_synced_after_rename,
        "the rename was not made durable"
    );
}

#[test]
fn verify_refuses_a_flipped_memory_byte_and_names_its_chunk() {
    if !kvm_usable("verify_refuses_a_flipped_memory_byte_and_names_its_chunk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let full = full_snapshot(dir.path(), "pages=2000 rounds=1000000 write=5");
    let output = cowvm(&["snapshot", "inspect", "--verify", full.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains(
            "ok (magic, version, state checksums, parent ids, memory sizes, memory checksums)"
        ),
        "{}",
        stdout(&output)
    );

    // One bit of a workload page, 3 MiB + 5 bytes into the file: chunk 1 (2 MiB .. 4 MiB).
    let memory = full.join("memory");
    make_writable(&memory);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&memory)
        .unwrap();
    let at = (3 << 20) + 5;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    let message = "is corrupted: the 2097152-byte chunk at offset 0x200000 has checksum";
    assert_error(
        &cowvm(&["snapshot", "inspect", "--verify", full.to_str().unwrap()]),
        message,
    );
    assert_error(
        &cowvm(&["restore", "--verify", full.to_str().unwrap()]),
        message,
    );
    // Without --verify the memory file is trusted: the state's checks still pass.
    assert_eq!(inspect(&full)["memory_verified"], false);

    // A version-1 snapshot recorded no checksums: --verify says so instead of passing.
    assert_error(
        &cowvm(&[
            "restore",
            "--verify",
            fixture("snapshot-v1").to_str().unwrap(),
        ]),
        "records no memory checksums (it was written by an older cowvm, format version 1)",
    );
}

/// Restores `full` paused with a control socket, lets `damage` change its memory file, resumes,
/// and returns the exit status and stderr.
fn restore_and_damage(
    dir: &Path,
    full: &Path,
    damage: impl FnOnce(&Path),
) -> (Option<i32>, String) {
    let vm_dir = dir.join("restored");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let vm = RunningVm::restore(&vm_dir, full, &["--paused"]);
    let memory = full.join("memory");
    make_writable(&memory);
    damage(&memory);
    let resumed = cowvm(&["resume", "--api-socket", vm.socket()]);
    assert!(!stderr(&resumed).contains("panicked"));
    vm.finish()
}

#[test]
fn changing_the_memory_file_under_a_restored_vm_stops_it_with_a_clear_error() {
    if !kvm_usable("changing_the_memory_file_under_a_restored_vm_stops_it_with_a_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = "pages=12000 rounds=1000000 write=50";
    let full = full_snapshot(dir.path(), args);
    let truncated = dir.path().join("truncated");
    copy_dir(&full, &truncated);
    let (code, err) = restore_and_damage(dir.path(), &truncated, |memory| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(memory)
            .unwrap();
        file.set_len(4 << 20).unwrap();
    });
    assert_eq!(
        code,
        Some(1),
        "an error exit, not a signal (no core dump): {err}"
    );
    assert!(
        err.contains(&format!(
            "snapshot memory file {} was truncated while in use",
            truncated.join("memory").display()
        )),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("Bad address"),
        "{err}"
    );

    let modified = dir.path().join("modified");
    copy_dir(&full, &modified);
    let (code, err) = restore_and_damage(dir.path(), &modified, |memory| {
        std::thread::sleep(Duration::from_millis(20));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(memory)
            .unwrap();
        file.write_all_at(&[0xff; 16], 5 << 20).unwrap();
    });
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("was modified while in use"), "{err}");
}

#[test]
fn merging_in_place_keeps_diffs_built_on_it_valid() {
    if !kvm_usable("merging_in_place_keeps_diffs_built_on_it_valid") {
        return;
    }
    let args = "pages=2000 rounds=6000 seed=11 write=5";
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(dir.path(), "1", args);
    let (full, d1, d2) = (
        dir.path().join("full"),
        dir.path().join("d1"),
        dir.path().join("d2"),
    );
    for (snap, diff) in [(&full, false), (&d1, true), (&d2, true)] {
        std::thread::sleep(Duration::from_millis(60));
        vm.snapshot(snap, diff);
    }
    vm.kill();
    let before = inspect(&d1);
    assert_eq!(before["kind"], "diff");
    let output = cowvm(&["snapshot", "merge", d1.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let after = inspect(&d1);
    assert_eq!(after["kind"], "full");
    assert_eq!(after["chain_length"], 1);
    assert_eq!(
        after["id"], before["id"],
        "the merged snapshot keeps its id"
    );
    no_staging_left(dir.path());
    // d2 names d1 by id: still valid, and restores to the oracle, also without `full`.
    std::fs::remove_dir_all(&full).unwrap();
    assert_eq!(inspect(&d2)["chain_length"], 2);
    assert_eq!(restore_done(&d2, &[]), expected_done(args));
}

#[test]
fn snapshots_of_earlier_format_versions_still_restore() {
    if !kvm_usable("snapshots_of_earlier_format_versions_still_restore") {
        return;
    }
    let expected = expected_done(FIXTURE_ARGS);
    for (name, version) in [("snapshot-v1", 1), ("snapshot-v2", 2)] {
        let report = inspect(&fixture(name));
        assert_eq!(report["format_version"], version, "{name}");
        assert_eq!(restore_done(&fixture(name), &[]), expected, "{name}");
    }

    // A version-2 diff on a version-1 parent, then the parent merged in place: the diff names
    // the parent by its CRC stand-in id, which the merge keeps.
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("v1");
    copy_dir(&fixture("snapshot-v1"), &v1);
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let vm = RunningVm::restore(&vm_dir, &v1, &[]);
    std::thread::sleep(Duration::from_millis(30));
    let diff = dir.path().join("diff");
    vm.snapshot(&diff, true);
    vm.kill();
    assert_eq!(inspect(&diff)["chain_length"], 2);
    assert_eq!(restore_done(&diff, &[]), expected);
    let crc_id = inspect(&v1)["id"].as_str().unwrap().to_string();
    assert!(crc_id.starts_with("crc32:"), "{crc_id}");
    let output = cowvm(&["snapshot", "merge", v1.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let merged = inspect(&v1);
    assert_eq!(
        (merged["format_version"].as_u64(), merged["id"].as_str()),
        (Some(3), Some(crc_id.as_str()))
    );
    assert_eq!(restore_done(&diff, &["--verify"]), expected);
}

/// The workload of the version-3 fixture (with a disk; see `tests/fixtures/README.md`).
const FIXTURE_V3_ARGS: &str = "pages=8 rounds=1000 seed=5 write=5 disk=1 disk_blocks=16";

#[test]
fn the_version_3_fixture_restores_with_its_disk() {
    if !kvm_usable("the_version_3_fixture_restores_with_its_disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("snapshot-v3");
    copy_dir(&fixture("snapshot-v3"), &snapshot);
    let disk = dir.path().join("snapshot-v3-disk.qcow2");
    std::fs::copy(fixture("snapshot-v3-disk.qcow2"), &disk).unwrap();
    let frozen = std::fs::read(&disk).unwrap();
    let report = inspect(&snapshot);
    assert_eq!(report["format_version"], 3);
    assert_eq!(report["disks"][0][0], "../snapshot-v3-disk.qcow2");
    let expected = expected_done(FIXTURE_V3_ARGS);
    assert_eq!(expected, "DONE 1eb827003d665eb6", "the README's digest");
    assert_eq!(restore_done(&snapshot, &["--verify"]), expected);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        frozen,
        "the frozen disk is unchanged"
    );
}
