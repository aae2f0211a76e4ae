//! cowvm's tiny guest: entered in 64-bit long mode on every vCPU, it reads the boot-info page,
//! runs its slice of the deterministic workload, and vCPU 0 prints the digest and exits.
//!
//! The guest is built without SSE and prints without `core::fmt` (whose prebuilt code uses SSE):
//! some hosts' KVM (PVM, used for nested virtualization here) emulate the instructions after a
//! port I/O exit in software, and that emulator stops the VM on SSE instructions.
#![no_std]
#![no_main]

mod disk;
mod io;
mod mem;
mod virtio;

use core::sync::atomic::{AtomicU64, Ordering};

use cowvm_guest_abi::boot_info::{self, BootInfo};
use cowvm_guest_abi::layout::{progress_addr, workload_page_addr, BOOT_INFO_ADDR};
use cowvm_guest_abi::workload::{self, WORDS_PER_PAGE};
use cowvm_guest_abi::WorkloadArgs;

use io::{exit, Serial};

/// Entry point of every vCPU: the VMM sets RDI = vCPU index, RSI = boot-info address and a
/// per-vCPU stack, with paging and a flat GDT, at CPL 3 with IOPL 3 (port I/O allowed).
#[no_mangle]
#[link_section = ".text.entry"]
pub extern "C" fn _start(cpu: u64, boot_info_addr: u64) -> ! {
    let out = Serial;
    // SAFETY: the VMM wrote the boot-info page at this address. Of its first ENCODED_LEN bytes
    // it later rewrites only the generation id (while the vCPUs are paused), which the guest
    // reads through `generation`, never through this reference.
    let page = unsafe { &*(boot_info_addr as *const [u8; boot_info::ENCODED_LEN]) };
    let info = match BootInfo::decode(page) {
        Ok(info) => info,
        Err(_) => fail(cpu, "bad boot-info page (magic, version or argument length)", ""),
    };
    let args = match WorkloadArgs::parse(info.args) {
        Ok(args) => args,
        Err(_) => fail(cpu, "bad argument string: ", info.args),
    };
    let count = u64::from(info.vcpu_count.max(1));
    if cpu == 0 {
        out.str("cowvm guest: vcpus=").dec(count).str(" pages=").dec(args.pages);
        out.str(" rounds=").dec(args.rounds).str(" seed=").dec(args.seed);
        out.str(" write=").dec(args.write_percent).str("% generation=");
        out.dec(info.clone_generation).str("\n");
    }
    // vCPU 0 runs the disk workload on the first disk, after its memory work of each round.
    let mut blk = None;
    if cpu == 0 && args.uses_disk() {
        blk = Some(disk::open(&info, &args).unwrap_or_else(|e| disk_fail(e)));
    }
    let (start, end) = workload::vcpu_slice(args.pages, cpu, count);
    // SAFETY: each vCPU's counter is an aligned u64 in the progress page, written only by it.
    let progress = unsafe { &*(progress_addr(cpu as u32) as *const AtomicU64) };
    let mut steps = 0u64;
    let mut last_tenth = 0;
    let rounds = workload::total_rounds(&args);
    let mut gen = 0;
    for round in 0..rounds {
        if round == args.rounds {
            if args.wait {
                wait_for_generation(cpu, boot_info_addr);
            }
            // From here on this VM's writes are its own: a clone or forked child has its id now.
            gen = generation(boot_info_addr);
        }
        for page in start..end {
            if workload::is_written_gen(&args, page, round, gen) {
                // SAFETY: workload pages lie in RAM (the VMM checked pages fit) and each page
                // belongs to exactly one vCPU's slice, so this is the only reference to it.
                let words = unsafe { page_words(page) };
                workload::write_page(words, workload::round_key(&args, page, round, gen));
            }
            steps += 1;
            progress.store(steps, Ordering::Relaxed);
        }
        if let (Some(blk), true) = (blk.as_mut(), args.disk) {
            disk::round(blk, &args, round, gen).unwrap_or_else(|e| disk_fail(e));
        }
        let tenth = (round + 1) * 10 / rounds;
        if cpu == 0 && tenth != last_tenth {
            last_tenth = tenth;
            out.str("round ").dec(round + 1).str("/").dec(rounds).str("\n");
        }
    }
    if args.wait && args.gen_rounds == 0 {
        wait_for_generation(cpu, boot_info_addr);
    }
    let mut digest = 0u64;
    for page in start..end {
        // SAFETY: as above; this vCPU is the only one touching its slice.
        let words = unsafe { page_words(page) };
        digest = digest.wrapping_add(workload::page_contribution(page, workload::page_digest(words)));
    }
    if let Some(blk) = blk.as_mut() {
        if args.disk {
            digest = digest.wrapping_add(disk::digest(blk, &args).unwrap_or_else(|e| disk_fail(e)));
        }
        if args.disk_bench > 0 {
            disk::bench(blk, &args).unwrap_or_else(|e| disk_fail(e));
        }
    }
    // SAFETY: the sync area lies inside the boot-info page, is 8-byte aligned and is only ever
    // accessed atomically by the guest.
    let (done, digests) = unsafe {
        (
            &*((BOOT_INFO_ADDR + boot_info::SYNC_DONE_OFFSET) as *const AtomicU64),
            (BOOT_INFO_ADDR + boot_info::SYNC_DIGESTS_OFFSET) as *const AtomicU64,
        )
    };
    // SAFETY: index `cpu` < vcpu_count <= MAX_VCPUS, the size of the digest array.
    unsafe { &*digests.add(cpu as usize) }.store(digest, Ordering::Relaxed);
    // Ordering: Release publishes this vCPU's digest before the count that vCPU 0 waits on.
    done.fetch_add(1, Ordering::Release);
    if cpu != 0 {
        io::halt_forever();
    }
    while done.load(Ordering::Acquire) < count {
        core::hint::spin_loop();
    }
    let total = (0..count).fold(0u64, |sum, i| {
        // SAFETY: i < vcpu_count, inside the digest array.
        sum.wrapping_add(unsafe { &*digests.add(i as usize) }.load(Ordering::Relaxed))
    });
    out.str("DONE ").hex16(total).str("\n");
    exit(0)
}

/// A warm template: the first rounds filled memory; every vCPU waits here until the VMM starts a
/// clone with its id.
fn wait_for_generation(cpu: u64, boot_info_addr: u64) {
    if cpu == 0 {
        Serial.str("waiting for a generation id\n");
    }
    while generation(boot_info_addr) == 0 {
        core::hint::spin_loop();
    }
    if cpu == 0 {
        Serial.str("generation ").dec(generation(boot_info_addr)).str("\n");
    }
}

/// The generation id as the VMM last wrote it (it changes under the guest: read it volatile).
fn generation(boot_info_addr: u64) -> u64 {
    // SAFETY: the boot-info page is mapped and the field is an aligned u64.
    unsafe { ((boot_info_addr + boot_info::GENERATION_OFFSET) as *const u64).read_volatile() }
}

/// # Safety
/// `page` must be a workload page inside guest RAM that no other live reference covers.
unsafe fn page_words(page: u64) -> &'static mut [u64; WORDS_PER_PAGE] {
    // SAFETY: guaranteed by the caller; pages are 4 KiB aligned, so u64-aligned.
    unsafe { &mut *(workload_page_addr(page) as *mut [u64; WORDS_PER_PAGE]) }
}

fn disk_fail(error: disk::DiskError) -> ! {
    let out = Serial.str("guest error (vcpu 0): disk: ");
    match error {
        disk::DiskError::Setup(why) => out.str(why),
        disk::DiskError::NoDisk => out.str("no block device in the boot-info page (run with --disk)"),
        disk::DiskError::TooSmall { capacity } => {
            out.str("the disk has ").dec(capacity).str(" sectors, fewer than disk_blocks needs")
        }
        disk::DiskError::Request { block, status } => {
            out.str("request on block ").dec(block).str(" failed with status ").dec(u64::from(status))
        }
        disk::DiskError::Verify { block, round } => {
            out.str("block ").dec(block).str(" read back wrong in round ").dec(round)
        }
    };
    out.str("\n");
    exit(3)
}

fn fail(cpu: u64, message: &str, detail: &str) -> ! {
    Serial.str("guest error (vcpu ").dec(cpu).str("): ").str(message).str(detail).str("\n");
    exit(2)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let out = Serial.str("guest panic");
    if let Some(location) = info.location() {
        out.str(" at ").str(location.file()).str(":").dec(u64::from(location.line()));
    }
    out.str("\n");
    exit(101)
}

/// The prebuilt `core` references the unwinder's personality routine from its unwind tables;
/// with `panic = "abort"` it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
