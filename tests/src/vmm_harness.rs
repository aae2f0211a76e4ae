//! Helpers for the `cowvm` end-to-end tests: running the binary, VMs with a control socket,
//! skipping without KVM, and hand-assembled guests for exit-status, fault and I/O tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::bin_path;

/// Whether `/dev/kvm` can be opened; prints the SKIP line the tests promise when it cannot.
///
/// With `COWVM_REQUIRE_KVM=1` (CI sets it where `/dev/kvm` exists) an unusable device fails the
/// test instead: a permission problem must not turn the whole KVM suite green.
pub fn kvm_usable(test: &str) -> bool {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    match opened {
        Ok(_) => true,
        Err(e) if std::env::var_os("COWVM_REQUIRE_KVM").is_some_and(|v| v == "1") => {
            panic!("{test}: COWVM_REQUIRE_KVM=1 but /dev/kvm is not usable: {e}")
        }
        Err(e) => {
            println!("SKIP: {test}: /dev/kvm is not usable on this machine: {e}");
            false
        }
    }
}

/// A `cowvm` process started with a control socket and its serial output in a file.
#[derive(Debug)]
pub struct RunningVm {
    pub child: Child,
    pub socket: PathBuf,
    pub serial: PathBuf,
}

impl RunningVm {
    /// `cowvm run --mem 64M --vcpus VCPUS --args ARGS` with a socket and serial file in `dir`.
    pub fn start(dir: &Path, vcpus: &str, args: &str) -> Self {
        Self::spawn(
            dir,
            &["run", "--mem", "64M", "--vcpus", vcpus, "--args", args],
        )
    }

    /// Restores `snapshot` with a control socket in `dir`, plus `extra` flags.
    pub fn restore(dir: &Path, snapshot: &Path, extra: &[&str]) -> Self {
        let mut command = vec!["restore", snapshot.to_str().expect("utf-8 path")];
        command.extend_from_slice(extra);
        Self::spawn(dir, &command)
    }

    /// Runs `cowvm COMMAND --api-socket DIR/api.sock --serial DIR/serial.log` and waits for the
    /// socket.
    pub fn spawn(dir: &Path, command: &[&str]) -> Self {
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
        wait_for_socket(&socket);
        Self {
            child,
            socket,
            serial,
        }
    }

    pub fn socket(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    /// `cowvm snapshot create` (with `--diff`), which must succeed.
    pub fn snapshot(&self, dir: &Path, diff: bool) {
        let output = self.try_snapshot(dir, diff);
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

    /// `cowvm snapshot create` (with `--diff`), whatever its outcome.
    pub fn try_snapshot(&self, dir: &Path, diff: bool) -> Output {
        let mut args = vec!["snapshot", "create", "--api-socket", self.socket()];
        if diff {
            args.push("--diff");
        }
        args.push(dir.to_str().expect("utf-8 path"));
        cowvm(&args)
    }

    /// `cowvm stats` as JSON.
    pub fn stats(&self) -> serde_json::Value {
        let output = cowvm(&["stats", "--api-socket", self.socket()]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        serde_json::from_slice(&output.stdout).expect("stats is JSON")
    }

    /// The guest's workload steps so far, summed over vCPUs (from `stats`).
    pub fn progress(&self) -> u64 {
        self.stats()["guest_progress"]
            .as_array()
            .expect("guest_progress")
            .iter()
            .map(|v| v.as_u64().expect("a count"))
            .sum()
    }

    /// Waits for the process; returns its exit code and stderr.
    pub fn finish(mut self) -> (Option<i32>, String) {
        use std::io::Read;
        let mut err = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut err);
        }
        let status = self.child.wait().expect("wait for cowvm");
        (status.code(), err)
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One connection to a VM's control socket, speaking its JSON lines directly.
#[derive(Debug)]
pub struct ApiClient {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl ApiClient {
    pub fn connect(socket: &Path) -> std::io::Result<Self> {
        let writer = std::os::unix::net::UnixStream::connect(socket)?;
        Ok(Self {
            reader: std::io::BufReader::new(writer.try_clone()?),
            writer,
        })
    }

    /// Sends one request (a JSON object) and returns the reply; `None` once the VM is gone.
    pub fn request(&mut self, request: &str) -> Option<serde_json::Value> {
        use std::io::{BufRead, Write};
        writeln!(self.writer, "{request}").ok()?;
        let mut line = String::new();
        self.reader.read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }
}

/// What the thread named `name` of process `pid` is blocked in (`/proc/PID/task/*/wchan`).
pub fn thread_wchan(pid: u32, name: &str) -> Option<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            return std::fs::read_to_string(task.path().join("wchan")).ok();
        }
    }
    None
}

/// Waits (up to 10 s) for a control socket to appear.
pub fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the control socket {} never appeared",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The `DONE` line the oracle predicts for the built-in guest with `args` in generation
/// `generation` (0: a VM that was never cloned or forked).
pub fn expected_done_for(args: &str, generation: u64) -> String {
    let args = cowvm_guest_abi::WorkloadArgs::parse(args).expect("guest arguments parse");
    format!(
        "DONE {:016x}",
        cowvm_guest_abi::workload::expected_digest_for(&args, generation)
    )
}

/// [`expected_done_for`] generation 0.
pub fn expected_done(args: &str) -> String {
    expected_done_for(args, 0)
}

/// The last line of `text`.
pub fn last_line(text: &str) -> String {
    text.lines().last().unwrap_or_default().to_string()
}

/// `cowvm restore DIR EXTRA…`, which must exit 0; returns its last output line (the `DONE`).
pub fn restore_done(dir: &Path, extra: &[&str]) -> String {
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

/// `cowvm snapshot inspect --json DIR`, which must succeed.
pub fn inspect(dir: &Path) -> serde_json::Value {
    let output = cowvm(&[
        "snapshot",
        "inspect",
        "--json",
        dir.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("inspect --json prints JSON")
}

/// Runs `cowvm` with `args` and returns its output.
pub fn cowvm(args: &[&str]) -> Output {
    Command::new(bin_path("cowvm"))
        .args(args)
        .output()
        .expect("spawn cowvm")
}

/// stdout as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts a failed run: exit status 1, `needle` in stderr, and no panic.
pub fn assert_error(output: &Output, needle: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains(needle),
        "expected `{needle}` in stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "cowvm panicked:\n{err}");
}

/// x86-64 machine code for the hand-made guests (they run at CPL 3 with IOPL 3, like the
/// built-in one, so port I/O is allowed).
pub mod code {
    /// `mov dx, port; mov al, value; out dx, al`
    pub fn out(port: u16, value: u8) -> Vec<u8> {
        let [lo, hi] = port.to_le_bytes();
        vec![0x66, 0xba, lo, hi, 0xb0, value, 0xee]
    }

    /// Writes `status` to the exit device, then spins (the VMM stops the VM first).
    pub fn exit(status: u8) -> Vec<u8> {
        let mut code = out(0x501, status);
        code.extend_from_slice(&[0xeb, 0xfe]);
        code
    }

    /// `ud2`: an invalid opcode, which with no IDT becomes a triple fault.
    pub const UD2: [u8; 2] = [0x0f, 0x0b];

    /// Reads and writes unmapped port 0x80 and unmapped MMIO at 0xd000_0000, then exits with
    /// `5 + the byte read from MMIO` (so 5 when unmapped reads return zero).
    pub fn unmapped_accesses() -> Vec<u8> {
        let mut code = vec![
            0x66, 0xba, 0x80, 0x00, // mov dx, 0x80
            0xec, // in al, dx
            0xee, // out dx, al
            0xb8, 0x00, 0x00, 0x00, 0xd0, // mov eax, 0xd0000000
            0xc6, 0x00, 0x01, // mov byte [rax], 1
            0x8a, 0x18, // mov bl, [rax]
            0x80, 0xc3, 0x05, // add bl, 5
            0x88, 0xd8, // mov al, bl
            0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
            0xee, // out dx, al
        ];
        code.extend_from_slice(&[0xeb, 0xfe]);
        code
    }

    /// Stores `fill` in COM1's scratch register, then `count` times: `rep insb` of 64 bytes
    /// from the scratch register into a buffer and `rep outsb` of the buffer to COM1; then exit
    /// status 0. The output is `fill` repeated 64 × `count` times when each string item is
    /// a separate device access.
    pub fn rep_insb_outsb(count: u32, fill: u8) -> Vec<u8> {
        let mut code = vec![
            0x66, 0xba, 0xff, 0x03, // mov dx, 0x3ff (scratch)
            0xb0, fill, // mov al, fill
            0xee, // out dx, al
            0xbb, // mov ebx, count
        ];
        code.extend_from_slice(&count.to_le_bytes());
        code.extend_from_slice(&[
            0x48, 0x8d, 0x3d, 0x2a, 0x00, 0x00, 0x00, // loop: lea rdi, [rip + buffer]
            0xb9, 0x40, 0x00, 0x00, 0x00, // mov ecx, 64
            0x66, 0xba, 0xff, 0x03, // mov dx, 0x3ff
            0xf3, 0x6c, // rep insb
            0x48, 0x8d, 0x35, 0x18, 0x00, 0x00, 0x00, // lea rsi, [rip + buffer]
            0xb9, 0x40, 0x00, 0x00, 0x00, // mov ecx, 64
            0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xf3, 0x6e, // rep outsb
            0xff, 0xcb, // dec ebx
            0x75, 0xd8, // jnz loop
        ]);
        code.extend_from_slice(&exit(0));
        assert_eq!(
            code.len(),
            0x3d,
            "the lea offsets above point just past the code"
        );
        code.extend_from_slice(&[0; 64]);
        code
    }

    /// Waits until the boot-info generation id is nonzero; generation 3 then executes `ud2` (a
    /// triple fault, there being no IDT), every other one exits with status 0.
    pub fn fail_in_generation_3() -> Vec<u8> {
        let mut code = vec![
            0x48, 0x8b, 0x04, 0x25, 0x18, 0x50, 0x00, 0x00, // wait: mov rax, [0x5018]
            0x48, 0x85, 0xc0, // test rax, rax
            0x74, 0xf3, // jz wait
            0x48, 0x83, 0xf8, 0x03, // cmp rax, 3
            0x75, 0x02, // jne ok
            0x0f, 0x0b, // ud2
        ];
        code.extend_from_slice(&exit(0)); // ok:
        code
    }

    /// Writes `x` to COM1 forever, without waiting for the transmitter.
    pub fn serial_flood() -> Vec<u8> {
        vec![
            0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb0, b'x', // mov al, 'x'
            0xee, // loop: out dx, al
            0xeb, 0xfd, // jmp loop
        ]
    }

    /// Parks the only vCPU without writing an exit status.
    pub fn park() -> Vec<u8> {
        let mut code = out(0x502, 0);
        code.extend_from_slice(&[0xeb, 0xfe]);
        code
    }
}

/// A minimal ELF64 executable with one PT_LOAD segment holding `code` at 1 MiB.
pub fn elf_image(code: &[u8]) -> Vec<u8> {
    const LOAD_ADDR: u64 = 0x10_0000;
    let code_offset = 64 + 56;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&(code_offset as u64).to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(elf.len(), code_offset);
    elf.extend_from_slice(code);
    elf
}

/// Writes `bytes` to `dir/name` and returns the path as a string.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write test file");
    path.to_string_lossy().into_owned()
}
