//! `cowvm run` boots real KVM guests: the built-in guest's digest equals the host oracle's for
//! several vCPU counts and argument sets; exit statuses, serial files, ELF guests and
//! misbehaving guests behave as documented.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use cowvm_guest_abi::workload::expected_digest;
use cowvm_guest_abi::WorkloadArgs;
use cowvm_tests::vmm_harness::{
    assert_error, code, cowvm, elf_image, kvm_usable, stderr, stdout, write_file,
};

fn expected_done(args: &str) -> String {
    let parsed = WorkloadArgs::parse(args).expect("test arguments parse");
    format!("DONE {:016x}", expected_digest(&parsed))
}

#[test]
fn digest_matches_the_oracle_for_1_2_and_4_vcpus() {
    if !kvm_usable("digest_matches_the_oracle_for_1_2_and_4_vcpus") {
        return;
    }
    let arg_sets = [
        "",
        "pages=3000 rounds=5 seed=42 write=25",
        "pages=777 rounds=13 seed=7 write=100",
        "pages=10 rounds=0",
        "pages=20000 rounds=3 seed=123456789 write=1",
    ];
    for args in arg_sets {
        let expected = expected_done(args);
        for vcpus in ["1", "2", "4"] {
            let output = cowvm(&["run", "--mem", "128M", "--vcpus", vcpus, "--args", args]);
            let out = stdout(&output);
            assert_eq!(
                output.status.code(),
                Some(0),
                "{args} x{vcpus}: {}",
                stderr(&output)
            );
            let last = out.lines().last().unwrap_or_default();
            assert_eq!(last, expected, "args `{args}` with {vcpus} vCPUs");
        }
    }
}

#[test]
fn output_is_banner_progress_and_done() {
    if !kvm_usable("output_is_banner_progress_and_done") {
        return;
    }
    let args = "pages=16 rounds=3 seed=5 write=50";
    let output = cowvm(&["run", "--vcpus", "2", "--args", args]);
    assert_eq!(output.status.code(), Some(0));
    let expected = format!(
        "cowvm guest: vcpus=2 pages=16 rounds=3 seed=5 write=50% generation=0\n\
         round 1/3\nround 2/3\nround 3/3\n{}\n",
        expected_done(args)
    );
    assert_eq!(stdout(&output), expected);
}

#[test]
fn serial_output_can_go_to_a_file() {
    if !kvm_usable("serial_output_can_go_to_a_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serial.log");
    let output = cowvm(&["run", "--serial", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(stdout(&output), "");
    let log = std::fs::read_to_string(&path).unwrap();
    assert_eq!(log.lines().last(), Some(expected_done("").as_str()));
}

#[test]
fn exit_status_of_flat_and_elf_guests_propagates() {
    if !kvm_usable("exit_status_of_flat_and_elf_guests_propagates") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for status in [0u8, 7, 200] {
        let flat = write_file(dir.path(), "exit.bin", &code::exit(status));
        let output = cowvm(&["run", "--guest", &flat]);
        assert_eq!(
            output.status.code(),
            Some(i32::from(status)),
            "flat, status {status}"
        );
    }
    let elf = write_file(dir.path(), "exit.elf", &elf_image(&code::exit(42)));
    assert_eq!(cowvm(&["run", "--guest", &elf]).status.code(), Some(42));
}

#[test]
fn triple_fault_stops_the_vm_with_registers() {
    if !kvm_usable("triple_fault_stops_the_vm_with_registers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = write_file(dir.path(), "ud2.bin", &code::UD2);
    let output = cowvm(&["run", "--guest", &guest]);
    assert_error(&output, "vCPU 0: the guest shut down (triple fault");
    assert!(
        stderr(&output).contains("rip=0x0000000000100000"),
        "{}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("cr3=0x9000"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn unmapped_accesses_are_logged_and_read_zero() {
    if !kvm_usable("unmapped_accesses_are_logged_and_read_zero") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = write_file(dir.path(), "unmapped.bin", &code::unmapped_accesses());
    let output = cowvm(&["run", "--guest", &guest]);
    let err = stderr(&output);
    assert_eq!(
        output.status.code(),
        Some(5),
        "MMIO read of unmapped space returns 0: {err}"
    );
    assert!(
        err.contains("guest read of 1 bytes at unmapped PIO address 0x80"),
        "{err}"
    );
    assert!(
        err.contains("guest write of 1 bytes at unmapped PIO address 0x80"),
        "{err}"
    );
    assert!(
        err.contains("guest write of 1 bytes at unmapped MMIO address 0xd0000000"),
        "{err}"
    );
    assert!(
        err.contains("guest read of 1 bytes at unmapped MMIO address 0xd0000000"),
        "{err}"
    );
}

#[test]
fn a_guest_that_parks_every_vcpu_is_an_error() {
    if !kvm_usable("a_guest_that_parks_every_vcpu_is_an_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = write_file(dir.path(), "park.bin", &code::park());
    let output = cowvm(&["run", "--guest", &guest, "--vcpus", "2"]);
    assert_error(
        &output,
        "every vCPU halted without the guest writing the exit device",
    );
}
