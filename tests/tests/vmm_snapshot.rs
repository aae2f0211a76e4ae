//! Snapshots of running guests: full snapshots and diff chains taken at random moments restore
//! (lazily, eagerly, merged) to the digest of the uninterrupted run and the host oracle; diffs
//! hold exactly the pages the workload predicts; bad snapshots and misuse give named errors.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::{Path, PathBuf};
use std::time::Duration;

use cowvm_guest_abi::layout;
use cowvm_guest_abi::WorkloadArgs;
use cowvm_tests::diff_oracle::{assert_diff_is_exact, stored_pages};
use cowvm_tests::vmm_harness::{
    assert_error, cowvm, expected_done, kvm_usable, last_line, restore_done, stderr, stdout,
    RunningVm,
};

/// A small deterministic generator for the snapshot moments (seed printed for reruns).
fn sleeps(seed: u64, count: usize) -> Vec<Duration> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            Duration::from_millis(30 + (state >> 33) % 120)
        })
        .collect()
}

fn chain_restores_to_the_oracle(vcpus: &str) {
    // About 1.2 million page writes: a few seconds, well past the four snapshot moments.
    let args = "pages=2000 rounds=12000 seed=11 write=5";
    let expected = expected_done(args);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    println!("snapshot moments seed: {seed}");
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(dir.path(), vcpus, args);
    let snaps: Vec<PathBuf> = ["full", "diff1", "diff2", "diff3"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    for (i, (snap, pause)) in snaps.iter().zip(sleeps(seed, 4)).enumerate() {
        std::thread::sleep(pause);
        vm.snapshot(snap, i > 0);
    }
    vm.kill();

    for snap in &snaps {
        assert_eq!(
            restore_done(snap, &[]),
            expected,
            "lazy restore of {}",
            snap.display()
        );
    }
    assert_eq!(
        restore_done(&snaps[0], &["--eager"]),
        expected,
        "eager restore of the full snapshot"
    );
    assert_eq!(
        restore_done(&snaps[3], &["--eager"]),
        expected,
        "eager restore of a diff chain"
    );

    let merged = dir.path().join("merged");
    let output = cowvm(&[
        "snapshot",
        "merge",
        snaps[3].to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let inspect = cowvm(&["snapshot", "inspect", "--json", merged.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(report["kind"], "full");
    assert_eq!(report["chain_length"], 1);
    assert_eq!(report["parent"], serde_json::Value::Null);
    assert_eq!(
        restore_done(&merged, &[]),
        expected,
        "restore of the merged chain"
    );
    // The merged snapshot stands alone: the chain can go.
    for snap in &snaps {
        std::fs::remove_dir_all(snap).unwrap();
    }
    assert_eq!(
        restore_done(&merged, &[]),
        expected,
        "merged snapshot without its chain"
    );
}

#[test]
fn snapshots_of_one_vcpu_restore_to_the_oracle_digest() {
    if kvm_usable("snapshots_of_one_vcpu_restore_to_the_oracle_digest") {
        chain_restores_to_the_oracle("1");
    }
}

#[test]
fn snapshots_of_two_vcpus_restore_to_the_oracle_digest() {
    if kvm_usable("snapshots_of_two_vcpus_restore_to_the_oracle_digest") {
        chain_restores_to_the_oracle("2");
    }
}

#[test]
fn a_restored_vm_takes_diffs_on_the_snapshot_it_came_from() {
    if !kvm_usable("a_restored_vm_takes_diffs_on_the_snapshot_it_came_from") {
        return;
    }
    let args = "pages=2000 rounds=6000 seed=11 write=5";
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    std::fs::create_dir(&first).unwrap();
    let vm = RunningVm::start(&first, "2", args);
    std::thread::sleep(Duration::from_millis(150));
    let full = dir.path().join("full");
    vm.snapshot(&full, false);
    vm.kill();
    let second = dir.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let restored = RunningVm::restore(&second, &full, &[]);
    std::thread::sleep(Duration::from_millis(150));
    let diff = dir.path().join("diff-after-restore");
    restored.snapshot(&diff, true);
    restored.kill();
    let inspect = cowvm(&["snapshot", "inspect", "--json", diff.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(report["kind"], "diff");
    assert_eq!(report["chain_length"], 2);
    let stored = report["pages_stored"].as_u64().unwrap();
    assert!(
        stored > 0 && stored < 2000 + 8,
        "a diff, not a full copy: {stored} pages"
    );
    assert_eq!(restore_done(&diff, &[]), expected_done(args));
}

#[test]
fn uninterrupted_run_matches_the_oracle_too() {
    if !kvm_usable("uninterrupted_run_matches_the_oracle_too") {
        return;
    }
    let args = "pages=2000 rounds=6000 seed=11 write=5";
    let output = cowvm(&["run", "--args", args]);
    assert_eq!(last_line(&stdout(&output)), expected_done(args));
}

/// Allocated 4 KiB pages of a sparse file.
fn allocated_pages(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512 / 4096
}

/// A diff taken a moment after a full snapshot (1 vCPU, `write` percent): the workload pages it
/// stores must be exactly those the workload wrote between the two snapshots, as the oracle
/// computes from the guest's progress counter in each snapshot. The one page each snapshot may
/// have caught mid-write can go either way; every other page must match.
fn diff_matches_the_oracle(write: u32) -> (usize, usize) {
    let pages = 12_000;
    let args = format!("pages={pages} rounds=1000000 seed=3 write={write}");
    let workload = WorkloadArgs::parse(&args).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(dir.path(), "1", &args);
    std::thread::sleep(Duration::from_millis(100));
    let (full, diff) = (dir.path().join("full"), dir.path().join("diff"));
    let control = |command: &str| {
        let output = cowvm(&[command, "--api-socket", vm.socket()]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    };
    // Paused around each snapshot so that only a short, partial stretch of work lies between.
    control("pause");
    vm.snapshot(&full, false);
    control("resume");
    std::thread::sleep(Duration::from_millis(10));
    control("pause");
    vm.snapshot(&diff, true);
    vm.kill();

    let stored = stored_pages(&diff);
    let report = cowvm(&["snapshot", "inspect", "--json", diff.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(
        report["pages_stored"],
        stored.len() as u64,
        "state lists what it stores"
    );
    assert_eq!(
        report["pages_allocated_on_disk"],
        stored.len() as u64,
        "the sparse file's data extents are exactly the stored pages"
    );
    // st_blocks also counts the file system's extent-tree blocks for a scattered file.
    let on_disk = allocated_pages(&diff.join("memory"));
    assert!(
        (stored.len() as u64..stored.len() as u64 + 8).contains(&on_disk),
        "{on_disk} blocks allocated for {} stored pages",
        stored.len()
    );
    let progress_page = layout::PROGRESS_ADDR / layout::PAGE_SIZE;
    assert!(
        stored.contains(&progress_page),
        "the progress counter moved: {stored:?}"
    );

    assert_diff_is_exact(&workload, &full, &diff)
}

#[test]
fn a_diff_holds_exactly_the_pages_the_guest_wrote() {
    if !kvm_usable("a_diff_holds_exactly_the_pages_the_guest_wrote") {
        return;
    }
    // A partial pattern: 30 % of the pages visited between the snapshots.
    let (certain, stored) = diff_matches_the_oracle(30);
    assert!(
        certain > 0,
        "the workload wrote pages between the snapshots"
    );
    assert!(stored < 12_000, "a partial diff, not every page: {stored}");
    // write=0: the workload writes nothing, so the diff holds scratch pages only.
    let (certain, stored) = diff_matches_the_oracle(0);
    assert_eq!((certain, stored), (0, 0));
    // write=100: every page visited is written.
    let (certain, _) = diff_matches_the_oracle(100);
    assert!(certain > 0);
}

#[test]
fn bad_snapshots_are_refused_with_named_errors() {
    if !kvm_usable("bad_snapshots_are_refused_with_named_errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = "pages=500 rounds=1000000 write=10";
    let vm = RunningVm::start(dir.path(), "1", args);
    let (s1, s2, other) = (
        dir.path().join("s1"),
        dir.path().join("s2"),
        dir.path().join("other"),
    );

    // A diff needs a parent.
    let output = cowvm(&[
        "snapshot",
        "create",
        "--api-socket",
        vm.socket(),
        "--diff",
        s1.to_str().unwrap(),
    ]);
    assert_error(
        &output,
        "a diff snapshot needs an earlier snapshot of this VM to build on",
    );
    assert!(!s1.exists(), "nothing left behind");
    vm.snapshot(&s1, false);
    vm.snapshot(&s2, true);
    // A non-empty target directory is refused and left alone.
    let output = cowvm(&[
        "snapshot",
        "create",
        "--api-socket",
        vm.socket(),
        s1.to_str().unwrap(),
    ]);
    assert_error(&output, "exists and is not empty; choose a new path");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary directories left: {leftovers:?}"
    );
    // A second VM on the same socket.
    let second = cowvm(&["run", "--api-socket", vm.socket()]);
    assert_error(&second, "another VM is already serving the API socket");
    vm.snapshot(&other, false);
    vm.kill();

    let state = s1.join("state");
    let good = std::fs::read(&state).unwrap();
    for bit in (0..good.len() * 8).step_by(good.len() * 8 / 40 + 1) {
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        std::fs::write(&state, &bad).unwrap();
        let output = cowvm(&["restore", s1.to_str().unwrap()]);
        assert_eq!(
            output.status.code(),
            Some(1),
            "flipped bit {bit} was accepted"
        );
        let err = stderr(&output);
        assert!(
            err.contains("is corrupted") || err.contains("not a cowvm snapshot"),
            "bit {bit}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // Wrong format version, with a valid checksum.
    let mut versioned = good.clone();
    versioned[8] = 9;
    let body = versioned.len() - 4;
    let crc = crc32(&versioned[..body]);
    versioned[body..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&state, &versioned).unwrap();
    assert_error(
        &cowvm(&["restore", s1.to_str().unwrap()]),
        "has snapshot format version 9; this cowvm reads versions 1 to 3",
    );
    std::fs::write(&state, &good).unwrap();

    // Truncated and resized memory.
    let memory = s1.join("memory");
    let len = std::fs::metadata(&memory).unwrap().len();
    make_writable(&memory);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap();
    file.set_len(len - 4096).unwrap();
    assert_error(
        &cowvm(&["restore", s1.to_str().unwrap()]),
        "the file was truncated or resized",
    );
    file.set_len(len + 4096).unwrap();
    assert_error(
        &cowvm(&["restore", s1.to_str().unwrap()]),
        "the file was truncated or resized",
    );
    file.set_len(len).unwrap();

    // A parent replaced by another snapshot, then a missing parent.
    let moved = dir.path().join("s1-original");
    std::fs::rename(&s1, &moved).unwrap();
    std::fs::rename(&other, &s1).unwrap();
    assert_error(
        &cowvm(&["restore", s2.to_str().unwrap()]),
        "the parent was replaced",
    );
    std::fs::remove_dir_all(&s1).unwrap();
    assert_error(
        &cowvm(&["restore", s2.to_str().unwrap()]),
        "which is missing",
    );

    // The VM has exited: nothing serves the socket any more.
    let output = cowvm(&[
        "snapshot",
        "create",
        "--api-socket",
        dir.path().join("api.sock").to_str().unwrap(),
        dir.path().join("late").to_str().unwrap(),
    ]);
    assert_error(&output, "no VM is serving");
}

#[test]
fn control_socket_pause_resume_stats_shutdown() {
    if !kvm_usable("control_socket_pause_resume_stats_shutdown") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vm = RunningVm::start(dir.path(), "2", "pages=500 rounds=1000000 write=10");
    std::thread::sleep(Duration::from_millis(20));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&vm.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket is private");
    assert_eq!(
        stdout(&cowvm(&["pause", "--api-socket", vm.socket()])).trim(),
        "paused"
    );
    let stats = vm.stats();
    assert_eq!(stats["state"], "paused");
    assert_eq!(stats["vcpus"], 2);
    assert_eq!(stats["mem_size"], 64 << 20);
    // A paused guest makes no progress; a running one makes some within milliseconds (each
    // vCPU counts a step per page it visits, about a quarter million per second).
    let paused_at = vm.progress();
    assert!(paused_at > 0, "the guest ran before the pause");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.progress(), paused_at, "no step while paused");
    assert_eq!(
        stdout(&cowvm(&["resume", "--api-socket", vm.socket()])).trim(),
        "running"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(vm.progress() > paused_at, "steps again once resumed");
    assert_eq!(
        stdout(&cowvm(&["shutdown", "--api-socket", vm.socket()])).trim(),
        "shutting down"
    );
    let status = vm.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!vm.socket.exists(), "socket removed on exit");
    let mut err = String::new();
    use std::io::Read;
    vm.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
}

fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// CRC32 (IEEE), bitwise: the test's own, independent of the crate under test.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
