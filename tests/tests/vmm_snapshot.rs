//! Snapshots of running guests: full snapshots and diff chains taken at random moments restore
//! (lazily, eagerly, merged) to the digest of the uninterrupted run and the host oracle; diffs
//! hold exactly the pages the workload predicts; bad snapshots and misuse give named errors.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cowvm_guest_abi::layout;
use cowvm_guest_abi::workload::expected_digest;
use cowvm_guest_abi::WorkloadArgs;
use cowvm_tests::bin_path;
use cowvm_tests::vmm_harness::{assert_error, cowvm, kvm_usable, stderr, stdout};

/// A VM started with a control socket and its serial output in a file.
struct RunningVm {
    child: Child,
    socket: PathBuf,
    serial: PathBuf,
}

impl RunningVm {
    fn start(dir: &Path, vcpus: &str, args: &str) -> Self {
        Self::spawn(
            dir,
            &["run", "--mem", "64M", "--vcpus", vcpus, "--args", args],
        )
    }

    /// Restores `snapshot` with a control socket in `dir`.
    fn restore(dir: &Path, snapshot: &Path) -> Self {
        Self::spawn(dir, &["restore", snapshot.to_str().expect("utf-8 path")])
    }

    fn spawn(dir: &Path, command: &[&str]) -> Self {
        let socket = dir.join("api.sock");
        let serial = dir.join("serial.log");
        let child = Command::new(bin_path("cowvm"))
            .args(command)
            .arg("--api-socket")
            .arg(&socket)
            .arg("--serial")
            .arg(&serial)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cowvm");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the control socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Self {
            child,
            socket,
            serial,
        }
    }

    fn socket(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    fn snapshot(&self, dir: &Path, diff: bool) {
        let mut args = vec!["snapshot", "create", "--api-socket", self.socket()];
        if diff {
            args.push("--diff");
        }
        args.push(dir.to_str().expect("utf-8 path"));
        let output = cowvm(&args);
        assert_eq!(
            output.status.code(),
            Some(0),
            "snapshot failed: {}",
            stderr(&output)
        );
        assert!(
            stdout(&output).contains("pages stored, guest paused"),
            "{}",
            stdout(&output)
        );
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn last_line(text: &str) -> String {
    text.lines().last().unwrap_or_default().to_string()
}

fn expected_done(args: &str) -> String {
    format!(
        "DONE {:016x}",
        expected_digest(&WorkloadArgs::parse(args).expect("args parse"))
    )
}

fn restore(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec!["restore", dir.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let output = cowvm(&args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "restore {}: {}",
        dir.display(),
        stderr(&output)
    );
    last_line(&stdout(&output))
}

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
            restore(snap, &[]),
            expected,
            "lazy restore of {}",
            snap.display()
        );
    }
    assert_eq!(
        restore(&snaps[0], &["--eager"]),
        expected,
        "eager restore of the full snapshot"
    );
    assert_eq!(
        restore(&snaps[3], &["--eager"]),
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
        restore(&merged, &[]),
        expected,
        "restore of the merged chain"
    );
    // The merged snapshot stands alone: the chain can go.
    for snap in &snaps {
        std::fs::remove_dir_all(snap).unwrap();
    }
    assert_eq!(
        restore(&merged, &[]),
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
    let restored = RunningVm::restore(&second, &full);
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
    assert_eq!(restore(&diff, &[]), expected_done(args));
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

/// The page runs a diff stores, read from its `state` file (20-byte header, JSON, CRC32).
fn stored_pages(diff: &Path) -> Vec<u64> {
    let bytes = std::fs::read(diff.join("state")).unwrap();
    let state: serde_json::Value = serde_json::from_slice(&bytes[20..bytes.len() - 4]).unwrap();
    let mut pages = Vec::new();
    for run in state["memory"]["runs"].as_array().unwrap() {
        let (first, count) = (run[0].as_u64().unwrap(), run[1].as_u64().unwrap());
        pages.extend(first..first + count);
    }
    pages
}

/// Takes a full snapshot, waits several whole rounds, takes a diff; returns the diff's pages
/// split into (workload pages, other pages).
fn diff_pages(pages: u64, write: u32) -> (Vec<u64>, Vec<u64>) {
    let args = format!("pages={pages} rounds=1000000 seed=3 write={write}");
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(dir.path(), "1", &args);
    std::thread::sleep(Duration::from_millis(100));
    vm.snapshot(&dir.path().join("full"), false);
    std::thread::sleep(Duration::from_millis(300));
    let diff = dir.path().join("diff");
    vm.snapshot(&diff, true);
    vm.kill();
    let report = cowvm(&["snapshot", "inspect", "--json", diff.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let on_disk = allocated_pages(&diff.join("memory"));
    let stored = stored_pages(&diff);
    assert_eq!(
        report["pages_stored"],
        stored.len() as u64,
        "state lists what it stores"
    );
    assert_eq!(
        on_disk,
        stored.len() as u64,
        "the sparse file holds exactly the stored pages"
    );
    assert_eq!(report["pages_allocated_on_disk"], on_disk);
    let first_workload = layout::WORKLOAD_ADDR / layout::PAGE_SIZE;
    stored
        .into_iter()
        .partition(|&p| p >= first_workload && p < first_workload + pages)
}

/// Pages outside the workload that the guest (or its MMU, setting accessed/dirty bits) writes.
fn is_guest_scratch(page: u64) -> bool {
    let addr = page * layout::PAGE_SIZE;
    let stacks = layout::STACKS_START..layout::STACKS_END;
    let tables = layout::PAGE_TABLES_ADDR..layout::PAGE_TABLES_END;
    stacks.contains(&addr) || tables.contains(&addr) || addr == layout::BOOT_INFO_ADDR
}

#[test]
fn a_diff_holds_exactly_the_pages_the_guest_wrote() {
    if !kvm_usable("a_diff_holds_exactly_the_pages_the_guest_wrote") {
        return;
    }
    let first_workload = layout::WORKLOAD_ADDR / layout::PAGE_SIZE;
    // write=100: every workload page is written every round, so all 3000 are in the diff.
    let (workload, other) = diff_pages(3000, 100);
    assert_eq!(
        workload,
        (first_workload..first_workload + 3000).collect::<Vec<_>>()
    );
    assert!(
        !other.is_empty() && other.len() <= 4,
        "stack (and page-table) pages: {other:?}"
    );
    assert!(
        other.iter().all(|&p| is_guest_scratch(p)),
        "unexpected pages: {other:?}"
    );
    assert!(
        other.contains(&((layout::STACKS_END - layout::PAGE_SIZE) / layout::PAGE_SIZE)),
        "vCPU 0's stack page"
    );
    // write=0: the workload writes nothing.
    let (workload, other) = diff_pages(3000, 0);
    assert_eq!(workload, Vec::<u64>::new());
    assert!(
        other.iter().all(|&p| is_guest_scratch(p)),
        "unexpected pages: {other:?}"
    );
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
        "has snapshot format version 9; this cowvm reads version 1",
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
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&vm.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket is private");
    assert_eq!(
        stdout(&cowvm(&["pause", "--api-socket", vm.socket()])).trim(),
        "paused"
    );
    let stats = cowvm(&["stats", "--api-socket", vm.socket()]);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["state"], "paused");
    assert_eq!(stats["vcpus"], 2);
    assert_eq!(stats["mem_size"], 64 << 20);
    // A paused guest makes no progress.
    let before = std::fs::read(&vm.serial).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(std::fs::read(&vm.serial).unwrap(), before);
    assert_eq!(
        stdout(&cowvm(&["resume", "--api-socket", vm.socket()])).trim(),
        "running"
    );
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
