//! Builds the tiny guest (`guest/kernel`) for the host target as a flat binary and leaves it in
//! `OUT_DIR/guest.bin` for `include_bytes!`.
//!
//! The guest is `no_std` and linked with its own script, so it cannot share this workspace's
//! profiles: it is built by a nested cargo with its own target directory. No extra rustup target
//! is needed: it is the host's own `x86_64-unknown-linux-gnu` with `-nostdlib -static`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let guest_dir = manifest_dir.join("../guest");
    let kernel_dir = guest_dir.join("kernel");
    for watched in [
        "kernel/src",
        "kernel/link.ld",
        "kernel/Cargo.toml",
        "abi/src",
        "abi/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            guest_dir.join(watched).display()
        );
    }

    let target = "x86_64-unknown-linux-gnu";
    let link_script = kernel_dir.join("link.ld");
    let flags = [
        "-Cpanic=abort".to_string(),
        "-Crelocation-model=static".to_string(),
        "-Ctarget-cpu=x86-64".to_string(),
        // No SSE in the guest's own code: see the note at the top of guest/kernel/src/main.rs.
        // rustc warns that x86_64's float ABI wants SSE2; the guest uses no floating point.
        "-Ctarget-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2".to_string(),
        "-Clink-arg=-nostdlib".to_string(),
        "-Clink-arg=-static".to_string(),
        "-Clink-arg=-no-pie".to_string(),
        format!("-Clink-arg=-Wl,-T,{}", link_script.display()),
        "-Clink-arg=-Wl,--build-id=none".to_string(),
    ];
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(kernel_dir.join("Cargo.toml"))
        .arg("--target")
        .arg(target)
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    // The outer build's settings must not leak into the guest's.
    for var in [
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        command.env_remove(var);
    }
    for (key, _) in env::vars() {
        if key.starts_with("CARGO_PROFILE_") || key.starts_with("CARGO_CFG_") {
            command.env_remove(key);
        }
    }
    run(&mut command, "build the guest kernel");

    let elf = target_dir.join(target).join("release").join("cowvm-guest");
    let flat = out_dir.join("guest.bin");
    run(
        Command::new(env::var("OBJCOPY").unwrap_or_else(|_| "objcopy".to_string()))
            .arg("-O")
            .arg("binary")
            .arg(&elf)
            .arg(&flat),
        "convert the guest ELF to a flat image (objcopy from binutils)",
    );
    check_image(&flat);
}

fn run(command: &mut Command, what: &str) {
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot {what}: {command:?}: {e}"));
    assert!(
        status.success(),
        "failed to {what}: {command:?} exited with {status}"
    );
}

fn check_image(flat: &Path) {
    let len = std::fs::metadata(flat).map(|m| m.len()).unwrap_or(0);
    assert!(
        len > 0 && len <= 1 << 20,
        "guest image {} has unexpected size {len}",
        flat.display()
    );
}
