//! Every bad flag or guest file gives `cowvm run` a clear error, exit status 1 (2 for flags
//! clap cannot parse), and never a panic. Flags and guest files are checked before KVM is
//! opened, so these tests need no KVM: they point `--kvm-device` at a path that does not exist,
//! and the flag's own error must win.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use cowvm_tests::vmm_harness::{assert_error, cowvm, elf_image, stderr, write_file};

/// `cowvm run ARGS` with no KVM device at all.
fn run(args: &[&str]) -> std::process::Output {
    let mut full = vec!["run", "--kvm-device", "/nonexistent/kvm"];
    full.extend_from_slice(args);
    cowvm(&full)
}

#[test]
fn without_a_bad_flag_the_missing_kvm_device_is_the_error() {
    assert_error(&run(&[]), "/nonexistent/kvm: no such device");
}

#[test]
fn bad_memory_sizes() {
    assert_error(
        &run(&["--mem", "0"]),
        "--mem 0: guest RAM size must be positive",
    );
    assert_error(
        &run(&["--mem", "1000"]),
        "--mem 1000: guest RAM size must be a multiple of 4 KiB (the page size)",
    );
    assert_error(
        &run(&["--mem", "1M"]),
        "--mem 1048576: too small, the guest needs at least 4198400 bytes (4 MiB + 4 KiB)",
    );
    assert_error(
        &run(&["--mem", "64T"]),
        "bytes of RAM; choose a smaller size",
    );
    let output = run(&["--mem", "12Q"]);
    assert_eq!(output.status.code(), Some(2), "clap usage error");
    assert!(stderr(&output).contains("`12Q` is not a size (examples: 4096, 64M, 1G)"));
}

#[test]
fn bad_vcpu_counts() {
    assert_error(
        &run(&["--vcpus", "0"]),
        "--vcpus 0: a VM needs at least one vCPU",
    );
    assert_error(
        &run(&["--vcpus", "129"]),
        "--vcpus 129: at most 128 vCPUs (the guest memory map has stacks for 128)",
    );
}

#[test]
fn bad_guest_arguments() {
    assert_error(
        &run(&["--args", "color=red"]),
        "--args: unknown guest argument `color` (known: pages, rounds, seed, write, gen_rounds, gen_write, wait, disk, disk_blocks, disk_batch, disk_bench)",
    );
    assert_error(
        &run(&["--args", "write=150"]),
        "--args: guest argument write=150: expected a percentage 0-100",
    );
    assert_error(
        &run(&["--args", "pages"]),
        "--args: guest argument `pages` is not of the form key=value",
    );
    assert_error(
        &run(&["--mem", "8M", "--args", "pages=2000"]),
        "--args pages=2000: 8388608 bytes of RAM hold at most 1024 workload pages; raise --mem or lower pages",
    );
    let long = "seed=1 ".repeat(40);
    assert_error(
        &run(&["--args", &long]),
        "--args is 280 bytes long; the boot-info page holds at most 256",
    );
}

#[test]
fn bad_guest_files() {
    let dir = tempfile::tempdir().unwrap();
    assert_error(
        &run(&["--guest", "/nonexistent/guest.elf"]),
        "cannot read guest image /nonexistent/guest.elf: No such file or directory",
    );
    let empty = write_file(dir.path(), "empty.bin", b"");
    assert_error(
        &run(&["--guest", &empty]),
        &format!("guest image {empty} is empty"),
    );
    let big = write_file(dir.path(), "big.bin", &vec![0x90; (1 << 20) + 1]);
    assert_error(
        &run(&["--guest", &big]),
        &format!("guest image {big} is 1048577 bytes; a flat image loads at 1 MiB and may be at most 1048576 bytes"),
    );
    let truncated = write_file(dir.path(), "trunc.elf", b"\x7fELF\x02\x01\x01");
    assert_error(
        &run(&["--guest", &truncated]),
        &format!("guest image {truncated} is not a loadable 64-bit ELF: Unable to read elf header"),
    );
    let mut elf32 = elf_image(&[0xeb, 0xfe]);
    elf32[4] = 1; // ELFCLASS32
    let elf32 = write_file(dir.path(), "elf32.elf", &elf32);
    assert_error(
        &run(&["--guest", &elf32]),
        &format!(
            "guest image {elf32} is not a loadable 64-bit ELF: ELF class 1 is not ELFCLASS64 (2)"
        ),
    );
    let mut arm = elf_image(&[0xeb, 0xfe]);
    arm[18] = 0xb7; // EM_AARCH64
    let arm = write_file(dir.path(), "arm.elf", &arm);
    assert_error(
        &run(&["--guest", &arm]),
        &format!(
            "guest image {arm} is not a loadable 64-bit ELF: machine 0xb7 is not x86-64 (0x3e)"
        ),
    );
}

#[test]
fn missing_or_wrong_kvm_device() {
    // These do not need a usable /dev/kvm.
    assert_error(
        &cowvm(&["run", "--kvm-device", "/nonexistent/kvm"]),
        "/nonexistent/kvm: no such device — KVM is not available here: load the kvm_intel or kvm_amd module",
    );
    assert_error(
        &cowvm(&["run", "--kvm-device", "/dev/null"]),
        "/dev/null is not a KVM device (KVM_GET_API_VERSION returned -1, expected 12)",
    );
}

#[test]
fn kvm_permission_denied_says_how_to_fix_it() {
    // As root, drop to `nobody` to get EACCES on the root-only /dev/kvm.
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout);
    let is_root = uid.is_ok_and(|u| u.starts_with(b"0\n"));
    let kvm_mode = std::fs::metadata("/dev/kvm").map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o006
    });
    if !is_root || kvm_mode.ok() != Some(0) || which("setpriv").is_none() {
        println!("SKIP: kvm_permission_denied_says_how_to_fix_it: needs root, setpriv and a /dev/kvm closed to others");
        return;
    }
    let bin = cowvm_tests::bin_path("cowvm");
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("run")
        .output()
        .unwrap();
    if stderr(&output).contains("Permission denied") && !stderr(&output).contains("/dev/kvm") {
        println!(
            "SKIP: kvm_permission_denied_says_how_to_fix_it: nobody cannot execute {}",
            bin.display()
        );
        return;
    }
    assert_error(
        &output,
        "/dev/kvm: permission denied — add yourself to the kvm group (then log in again) or run as root",
    );
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|path| path.exists())
}
