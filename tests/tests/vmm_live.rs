//! Live snapshots and live forks of running guests: snapshots written by a forked child while
//! the guest runs on restore to the oracle's digest, and so does the guest itself; copy-on-write
//! cost is reported; a killed writer publishes nothing and loses no dirty page; a busy VM refuses
//! a second snapshot or a fork; forked children each finish with the digest of their own
//! generation, as does the parent.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cowvm_guest_abi::WorkloadArgs;
use cowvm_tests::diff_oracle::assert_diff_is_exact;
use cowvm_tests::vmm_harness::{
    cowvm, expected_done_for, kvm_usable, restore_done, stderr, stdout, ApiClient, RunningVm,
};
use rustix::process::{kill_process, prlimit, Pid, Resource, Rlimit, Signal};
use serde_json::Value;

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// One request on its own connection; the reply.
fn request(socket: &Path, json: &str) -> Value {
    ApiClient::connect(socket)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (has the VM already finished? then its workload is too short for this host)",
                socket.display()
            )
        })
        .request(json)
        .expect("a reply")
}

fn live_request(dir: &Path, diff: bool) -> String {
    let kind = if diff { "diff" } else { "full" };
    format!(
        r#"{{"cmd":"snapshot","path":"{}","kind":"{kind}","live":true}}"#,
        path_str(dir)
    )
}

/// A live snapshot that must succeed; its reply.
fn live_snapshot(vm: &RunningVm, dir: &Path, diff: bool) -> Value {
    let reply = request(&vm.socket, &live_request(dir, diff));
    assert_eq!(
        reply["ok"],
        true,
        "live snapshot {}: {reply}",
        dir.display()
    );
    assert_eq!(reply["live"], true);
    reply
}

/// Waits (up to two minutes) for a `DONE` line in a serial output file.
fn wait_for_done(serial: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        // Complete lines only: the guest may be halfway through printing.
        let done = text
            .split_inclusive('\n')
            .find(|l| l.starts_with("DONE ") && l.ends_with('\n'));
        if let Some(line) = done {
            return line.trim_end().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no DONE line in {} after 120 s:\n{text}",
            serial.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The parent's run ends with exit status 0 and the oracle's digest on its serial output.
fn finishes_with(vm: RunningVm, expected: &str) {
    let serial = vm.serial.clone();
    let (code, err) = vm.finish();
    assert_eq!(code, Some(0), "the VM failed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let text = std::fs::read_to_string(&serial).unwrap();
    assert_eq!(
        text.lines().last(),
        Some(expected),
        "serial output:\n{text}"
    );
}

/// Forked VM processes (grandchildren of the test) killed when this drops, also on failure.
struct Children(Vec<i32>);

impl Drop for Children {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if let Some(pid) = Pid::from_raw(pid) {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
    }
}

fn pid_of(vm: &RunningVm) -> Pid {
    Pid::from_child(&vm.child)
}

fn live_snapshots_restore_to_the_oracle(vcpus: &str) {
    // 3.2 million page writes: about 2 s on a quiet host (the guest writes over a million pages
    // a second here), past both snapshot moments even when each snapshot's fsync takes a second
    // on a loaded machine. 800 000 writes once ran out before the diff under CI load.
    let args = "pages=4000 rounds=800 seed=5 write=100";
    let expected = expected_done_for(args, 0);
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(dir.path(), vcpus, args);
    std::thread::sleep(Duration::from_millis(200));
    let full = dir.path().join("live-full");
    let output = cowvm(&[
        "snapshot",
        "create",
        "--live",
        "--api-socket",
        vm.socket(),
        path_str(&full),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed = stdout(&output);
    assert!(
        printed.contains("pages stored, guest paused")
            && printed.contains("while the guest ran; copy-on-write"),
        "{printed}"
    );
    let full_reply = vm.stats()["last_live_snapshot"].clone();
    std::thread::sleep(Duration::from_millis(150));
    let diff = dir.path().join("live-diff");
    let diff_reply = live_snapshot(&vm, &diff, true);
    assert_eq!(diff_reply["kind"], "diff");
    let stats = vm.stats();
    assert_eq!(stats["last_live_snapshot"]["id"], diff_reply["id"]);
    assert_eq!(stats["last_snapshot"], path_str(&diff));
    assert_eq!(stats["snapshots_taken"], 2);
    assert_eq!(stats["live_snapshot_in_flight"], Value::Null);
    for reply in [&full_reply, &diff_reply] {
        assert!(reply["pages_stored"].as_u64().unwrap() > 0, "{reply}");
        assert!(reply["write_us"].as_u64().unwrap() > 0, "{reply}");
        let paused = reply["paused_us"].as_u64().unwrap();
        let total = reply["total_us"].as_u64().unwrap();
        assert!(paused > 0 && paused < total, "{reply}");
        // Every step writes a page: the guest wrote while the child was writing.
        assert!(reply["cow_bytes"].as_u64().unwrap() > 0, "{reply}");
    }
    // The guest ran on and finishes as if nothing happened; both snapshots restore to the same.
    finishes_with(vm, &expected);
    assert_eq!(
        restore_done(&full, &[]),
        expected,
        "restore of the live full snapshot"
    );
    assert_eq!(
        restore_done(&diff, &[]),
        expected,
        "restore of a live diff on a live full"
    );
}

#[test]
fn live_snapshots_of_one_vcpu_restore_to_the_oracle() {
    if kvm_usable("live_snapshots_of_one_vcpu_restore_to_the_oracle") {
        live_snapshots_restore_to_the_oracle("1");
    }
}

#[test]
fn live_snapshots_of_two_vcpus_restore_to_the_oracle() {
    if kvm_usable("live_snapshots_of_two_vcpus_restore_to_the_oracle") {
        live_snapshots_restore_to_the_oracle("2");
    }
}

#[test]
fn a_guest_that_writes_nothing_costs_no_copy_on_write() {
    if !kvm_usable("a_guest_that_writes_nothing_costs_no_copy_on_write") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // rounds=0 wait=1: the vCPUs go straight to spinning on the generation id, which stays 0,
    // and write nothing.
    let vm = RunningVm::start(dir.path(), "2", "pages=4000 rounds=0 wait=1");
    std::thread::sleep(Duration::from_millis(100));
    let reply = live_snapshot(&vm, &dir.path().join("spinning"), false);
    let cow = reply["cow_bytes"].as_u64().unwrap();
    assert!(cow <= 16 << 10, "copy-on-write {cow} bytes: {reply}");
    // A paused VM stays paused and writes nothing either.
    assert_eq!(request(&vm.socket, r#"{"cmd":"pause"}"#)["ok"], true);
    let reply = live_snapshot(&vm, &dir.path().join("paused"), true);
    assert_eq!(reply["cow_bytes"], 0, "{reply}");
    assert_eq!(vm.stats()["state"], "paused");
    vm.kill();
}

#[test]
fn a_busy_vm_refuses_a_second_live_snapshot_and_a_fork() {
    if !kvm_usable("a_busy_vm_refuses_a_second_live_snapshot_and_a_fork") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(dir.path(), "1", "pages=4000 rounds=1000000 write=100");
    std::thread::sleep(Duration::from_millis(100));
    live_snapshot(&vm, &dir.path().join("base"), false);
    // Catch a writer in flight and stop it, so that it stays in flight while we ask.
    let mut caught = None;
    for attempt in 0..20 {
        let target = dir.path().join(format!("held-{attempt}"));
        let socket = vm.socket.clone();
        let in_flight = std::thread::spawn(move || request(&socket, &live_request(&target, true)));
        let mut stats = ApiClient::connect(&vm.socket).unwrap();
        let mut writer = None;
        while writer.is_none() && !in_flight.is_finished() {
            let now = stats.request(r#"{"cmd":"stats"}"#).unwrap();
            writer = now["live_snapshot_in_flight"]["pid"].as_i64();
        }
        match writer {
            Some(pid) => {
                let pid = Pid::from_raw(pid as i32).unwrap();
                kill_process(pid, Signal::STOP).unwrap();
                caught = Some((pid, in_flight));
                break;
            }
            None => assert_eq!(in_flight.join().unwrap()["ok"], true),
        }
    }
    let (writer, in_flight) = caught.expect("a live snapshot writer seen in flight");
    let busy = format!("is being written by process {}", writer.as_raw_nonzero());
    let second = request(&vm.socket, &live_request(&dir.path().join("second"), true));
    assert_eq!(second["ok"], false);
    assert!(
        second["error"].as_str().unwrap().contains(&busy),
        "{second}"
    );
    let fork = format!(
        r#"{{"cmd":"fork","serial_dir":"{0}","socket_dir":"{0}"}}"#,
        path_str(dir.path())
    );
    let refused = request(&vm.socket, &fork);
    assert_eq!(refused["ok"], false);
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.starts_with("fork failed: a live snapshot into") && error.contains(&busy),
        "{refused}"
    );
    let plain = vm.try_snapshot(&dir.path().join("plain"), true);
    assert!(stderr(&plain).contains(&busy), "{}", stderr(&plain));
    assert!(!dir.path().join("second").exists() && !dir.path().join("plain").exists());
    kill_process(writer, Signal::CONT).unwrap();
    let reply = in_flight.join().unwrap();
    assert_eq!(reply["ok"], true, "the held snapshot completes: {reply}");
    assert_eq!(vm.stats()["live_snapshot_in_flight"], Value::Null);
    vm.kill();
}

#[test]
fn a_writer_killed_mid_write_publishes_nothing_and_loses_no_page() {
    if !kvm_usable("a_writer_killed_mid_write_publishes_nothing_and_loses_no_page") {
        return;
    }
    // About 2 s on a quiet host: the full, failed and diff snapshots all come before the end.
    let args = "pages=12000 rounds=200 seed=3 write=30";
    let workload = WorkloadArgs::parse(args).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(dir.path(), "1", args);
    let pid = pid_of(&vm);
    let unlimited = Rlimit {
        current: None,
        maximum: None,
    };
    // The killed writer must not leave a core file behind.
    let no_core = Rlimit {
        current: Some(0),
        maximum: None,
    };
    prlimit(Some(pid), Resource::Core, no_core).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let full = dir.path().join("full");
    live_snapshot(&vm, &full, false);
    std::thread::sleep(Duration::from_millis(30));

    // Files over 1 MiB are refused: the writer dies of SIGXFSZ at its first page beyond that.
    let one_mib = Rlimit {
        current: Some(1 << 20),
        maximum: None,
    };
    prlimit(Some(pid), Resource::Fsize, one_mib).unwrap();
    let lost = dir.path().join("lost");
    let reply = request(&vm.socket, &live_request(&lost, true));
    prlimit(Some(pid), Resource::Fsize, unlimited).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(
        error.contains("was killed by signal 25 (SIGXFSZ")
            && error.contains("nothing is published"),
        "{error}"
    );
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("lost"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    assert_eq!(vm.stats()["last_snapshot"], path_str(&full));

    std::thread::sleep(Duration::from_millis(30));
    let diff = dir.path().join("diff");
    live_snapshot(&vm, &diff, true);
    let expected = expected_done_for(args, 0);
    finishes_with(vm, &expected);
    assert_eq!(restore_done(&diff, &[]), expected);

    // The diff holds exactly the workload pages written between the full snapshot and itself:
    // the failed snapshot's dirty bits came back, and nothing else was added.
    let (certain, _) = assert_diff_is_exact(&workload, &full, &diff);
    assert!(certain > 0);
}

#[test]
fn a_fork_into_three_gives_four_vms_with_their_own_digests() {
    if !kvm_usable("a_fork_into_three_gives_four_vms_with_their_own_digests") {
        return;
    }
    // Each vCPU walks 2000 pages × 2000 rounds before its generation rounds (seconds); the VM is
    // paused after 100 ms, and forked while paused, so the fork's moment is the pause's.
    let args = "pages=4000 rounds=2000 gen_rounds=100 seed=9 write=20";
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(dir.path(), "2", args);
    std::thread::sleep(Duration::from_millis(100));
    // The parent stays paused through the fork: it sees its children end before it does.
    assert_eq!(request(&vm.socket, r#"{"cmd":"pause"}"#)["ok"], true);
    let forks = dir.path().join("forks");
    std::fs::create_dir(&forks).unwrap();
    let reply = request(
        &vm.socket,
        &format!(
            r#"{{"cmd":"fork","count":3,"serial_dir":"{0}","socket_dir":"{0}"}}"#,
            path_str(&forks)
        ),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let children = reply["children"].as_array().unwrap().clone();
    let _guard = Children(
        children
            .iter()
            .map(|c| c["pid"].as_i64().unwrap() as i32)
            .collect(),
    );
    for progress in reply["guest_progress"].as_array().unwrap() {
        assert!(
            progress.as_u64().unwrap() < 2000 * 2000,
            "the fork came before the generation rounds: {reply}"
        );
    }
    assert_eq!(vm.stats()["state"], "paused", "a paused VM stays paused");
    assert_eq!(children.len(), 3);
    let generations: BTreeSet<u64> = children
        .iter()
        .map(|c| c["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(generations.len(), 3, "distinct generation ids: {reply}");
    assert!(generations.iter().all(|g| g >> 63 == 1));
    for child in &children {
        let socket = PathBuf::from(child["api_socket"].as_str().unwrap());
        let stats = request(&socket, r#"{"cmd":"stats"}"#);
        assert_eq!(
            (stats["ok"].clone(), stats["vcpus"].clone()),
            (Value::Bool(true), 2.into())
        );
        assert_eq!(stats["last_snapshot"], Value::Null, "a new VM");
    }
    for child in &children {
        let serial = PathBuf::from(child["serial"].as_str().unwrap());
        let generation = child["generation"].as_u64().unwrap();
        assert_eq!(
            wait_for_done(&serial),
            expected_done_for(args, generation),
            "child {child}"
        );
    }
    // The parent reaps them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = vm.stats();
        let states: Vec<&str> = stats["forked_children"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["state"].as_str().unwrap())
            .collect();
        if states == ["exited with status 0"; 3] {
            assert_eq!(stats["forks_made"], 3);
            break;
        }
        assert!(Instant::now() < deadline, "children not reaped: {states:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(request(&vm.socket, r#"{"cmd":"resume"}"#)["ok"], true);
    finishes_with(vm, &expected_done_for(args, 0));
    for child in &children {
        assert!(
            !Path::new(child["api_socket"].as_str().unwrap()).exists(),
            "socket removed"
        );
    }
}

#[test]
fn cowvm_fork_forks_a_restored_vm_and_names_bad_flags() {
    if !kvm_usable("cowvm_fork_forks_a_restored_vm_and_names_bad_flags") {
        return;
    }
    let args = "pages=2000 rounds=300 gen_rounds=100 seed=4 write=50";
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    std::fs::create_dir(&first).unwrap();
    let vm = RunningVm::start(&first, "1", args);
    std::thread::sleep(Duration::from_millis(50));
    let snapshot = dir.path().join("snap");
    vm.snapshot(&snapshot, false);
    vm.kill();
    // The restored VM maps the snapshot's memory file: its child keeps that mapping. Paused, so
    // that the fork comes before the generation rounds whatever the timing.
    let second = dir.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let restored = RunningVm::restore(&second, &snapshot, &["--paused"]);

    let fork = |extra: &[&str]| {
        let mut argv = vec!["fork", "--api-socket", restored.socket()];
        argv.extend_from_slice(extra);
        cowvm(&argv)
    };
    let bad = fork(&["--count", "0"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("fork count 0 is out of range: 1 to 64 children per request"),
        "{}",
        stderr(&bad)
    );
    let missing = dir.path().join("missing");
    let bad = fork(&["--serial-dir", path_str(&missing)]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains(&format!(
            "--serial-dir {} is not a directory",
            missing.display()
        )),
        "{}",
        stderr(&bad)
    );

    let output = fork(&[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    let mut lines = text.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("forked 1 VM, guest paused "),
        "{text}"
    );
    // pid P generation 0xG: --api-socket S serial F
    let line = lines.next().unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        (words[0], words[2], words[4], words[6]),
        ("pid", "generation", "--api-socket", "serial"),
        "{line}"
    );
    let _guard = Children(vec![words[1].parse().unwrap()]);
    let generation =
        u64::from_str_radix(words[3].trim_start_matches("0x").trim_end_matches(':'), 16).unwrap();
    // By default the child's files go beside the parent's socket.
    assert_eq!(Path::new(words[5]).parent(), Some(second.as_path()));
    assert_eq!(
        wait_for_done(Path::new(words[7])),
        expected_done_for(args, generation)
    );
    assert_eq!(
        restored.stats()["state"],
        "paused",
        "a paused VM stays paused"
    );
    let resumed = cowvm(&["resume", "--api-socket", restored.socket()]);
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    finishes_with(restored, &expected_done_for(args, 0));
}
