//! The VMM ⇄ vCPU protocol under stress: a vCPU stuck in a device write fails a snapshot with an
//! error naming it and leaves the VM controllable (late replies are not mistaken for answers),
//! and string port I/O reaches the device item by item, also when pauses interrupt it.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cowvm_tests::bin_path;
use cowvm_tests::vmm_harness::{
    code, cowvm, kvm_usable, stderr, stdout, thread_wchan, wait_for_socket, write_file, ApiClient,
};

fn control(socket: &str, command: &str) -> std::process::Output {
    cowvm(&[command, "--api-socket", socket])
}

#[test]
fn a_vcpu_stuck_in_a_device_write_fails_the_snapshot_and_the_vm_stays_controllable() {
    if !kvm_usable(
        "a_vcpu_stuck_in_a_device_write_fails_the_snapshot_and_the_vm_stays_controllable",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = write_file(dir.path(), "flood.bin", &code::serial_flood());
    let socket = dir.path().join("api.sock");
    let socket_arg = socket.to_str().unwrap();
    // Serial output goes to a pipe nobody reads yet: once it is full, the vCPU blocks in the
    // serial device's write.
    let mut child = Command::new(bin_path("cowvm"))
        .args(["run", "--guest", &guest, "--api-socket", socket_arg])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A one-page pipe fills after 4 KiB of output (this host takes a few thousand port exits a
    // second).
    rustix::pipe::fcntl_setpipe_size(child.stdout.as_ref().unwrap(), 4096).unwrap();
    wait_for_socket(&socket);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !thread_wchan(child.id(), "vcpu0").is_some_and(|w| w.contains("pipe_write")) {
        assert!(
            Instant::now() < deadline,
            "vCPU 0 never blocked on the full pipe"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let snapshot_dir = dir.path().join("snap");
    let started = Instant::now();
    let output = cowvm(&[
        "snapshot",
        "create",
        "--api-socket",
        socket_arg,
        snapshot_dir.to_str().unwrap(),
    ]);
    let waited = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let err = stderr(&output);
    assert!(
        err.contains("not taken: vCPU 0 did not answer Pause within"),
        "{err}"
    );
    assert!(
        waited < Duration::from_secs(15),
        "one timeout, not one per request: {waited:?}"
    );
    assert!(!snapshot_dir.exists(), "no snapshot directory");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The VMM thread still answers while the vCPU is stuck.
    let stats = control(socket_arg, "stats");
    assert_eq!(stats.status.code(), Some(0), "{}", stderr(&stats));
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(
        stats["state"], "running",
        "the failed pause was rolled back"
    );

    // Unblock the vCPU: its late replies to the old requests must not answer new ones.
    let mut out = child.stdout.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut sink = [0u8; 1 << 16];
        let mut total = 0u64;
        while let Ok(n) = out.read(&mut sink) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    assert_eq!(stdout(&control(socket_arg, "pause")).trim(), "paused");
    let stats: serde_json::Value =
        serde_json::from_slice(&control(socket_arg, "stats").stdout).unwrap();
    assert_eq!(stats["state"], "paused");
    assert_eq!(stdout(&control(socket_arg, "resume")).trim(), "running");
    let output = cowvm(&[
        "snapshot",
        "create",
        "--api-socket",
        socket_arg,
        snapshot_dir.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let inspect = cowvm(&[
        "snapshot",
        "inspect",
        "--json",
        snapshot_dir.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(report["vcpus"], 1);
    assert_eq!(
        stdout(&control(socket_arg, "shutdown")).trim(),
        "shutting down"
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        drain.join().unwrap() > 4096,
        "the flood went through once unblocked"
    );
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn string_port_io_is_item_by_item_across_pauses() {
    if !kvm_usable("string_port_io_is_item_by_item_across_pauses") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let count = 500;
    let guest = write_file(dir.path(), "rep.bin", &code::rep_insb_outsb(count, b'Q'));
    let socket = dir.path().join("api.sock");
    let serial = dir.path().join("serial.log");
    let mut child = Command::new(bin_path("cowvm"))
        .args(["run", "--guest", &guest, "--api-socket"])
        .arg(&socket)
        .arg("--serial")
        .arg(&serial)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&socket);
    // Pause and resume as fast as the socket allows while the guest runs: pauses land inside
    // and between string I/O exits.
    let mut api = ApiClient::connect(&socket).unwrap();
    let mut pauses = 0;
    while child.try_wait().unwrap().is_none() {
        let ok = |reply: Option<serde_json::Value>| reply.is_some_and(|r| r["ok"] == true);
        let paused = ok(api.request(r#"{"cmd":"pause"}"#));
        let resumed = ok(api.request(r#"{"cmd":"resume"}"#));
        pauses += u32::from(paused && resumed);
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(
        !err.contains("unmapped"),
        "string I/O split into items: {err}"
    );
    assert!(
        pauses > 10,
        "the guest ran long enough to be paused: {pauses}"
    );
    let written = std::fs::read(&serial).unwrap();
    assert_eq!(written.len(), 64 * count as usize, "bytes lost or repeated");
    assert!(
        written.iter().all(|&b| b == b'Q'),
        "every byte read back from the scratch register"
    );
}
