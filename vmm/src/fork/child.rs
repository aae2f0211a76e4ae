//! What runs in a forked child: leaving the parent's descriptors and vCPU mappings behind, then
//! either writing and publishing a live snapshot from the frozen view of guest RAM (and measuring
//! what the parent copied meanwhile) or building and running a VM over it. Every path ends in
//! `_exit`; the rules for what a child may touch are in the parent module's docs.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::Instant;

use cowvm_guest_abi::boot_info::GENERATION_OFFSET;
use cowvm_guest_abi::layout::BOOT_INFO_ADDR;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{exit_now, spawn, ForkError};
use crate::api::{self, ApiServer};
use crate::builder::{self, SavedMachine};
use crate::disk::freeze::OverlayPlace;
use crate::kvm::open_kvm;
use crate::machine::{Machine, VmEvent};
use crate::memory::GuestMemory;
use crate::snapshot::staging::StagingDir;
use crate::snapshot::state::SnapshotState;
use crate::snapshot::{self, MappedFile};
use crate::vcpu::RunState;
use crate::vm::{EmptyVm, MemoryOrigin};

/// A child's first steps: close every inherited descriptor but stdin, stdout, stderr and
/// `keep`, and unmap the parent's vCPU `kvm_run` areas, so the child holds nothing of the
/// parent's VM, vCPUs, sockets or files open.
fn leave_parent_behind(keep: &[RawFd]) {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: the parent's objects that own these descriptors are never used or dropped
            // in the child (see the `fork` module docs); closing a closed one is harmless.
            unsafe { libc::close(fd) };
        }
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for line in maps.lines() {
        if !line.ends_with("anon_inode:kvm-vcpu") && !line.contains("anon_inode:kvm-vcpu:") {
            continue;
        }
        let Some((start, end)) = line
            .split_whitespace()
            .next()
            .and_then(|range| range.split_once('-'))
            .and_then(|(s, e)| {
                Some((
                    usize::from_str_radix(s, 16).ok()?,
                    usize::from_str_radix(e, 16).ok()?,
                ))
            })
        else {
            continue;
        };
        // SAFETY: a vCPU's kvm_run area, used only by the parent's vCPU threads, which do not
        // exist in the child.
        unsafe { libc::munmap(start as *mut libc::c_void, end - start) };
    }
}

/// Sends one line to the parent.
fn report(pipe: OwnedFd, value: &Value) {
    let mut file = File::from(pipe);
    // If the parent is gone nobody reads it; the child's work is done either way.
    let _ = file.write_all(format!("{value}\n").as_bytes());
}

/// Bytes of process `pid`'s guest RAM mappings that are private and dirty (`Private_Dirty` in
/// `/proc/PID/smaps`). Right after a `fork()` every page of guest RAM is shared with the child,
/// so in the parent this counts the pages its guest wrote since — each one copied (or, for a
/// page untouched before the fork, allocated) because the child was alive: Redis'
/// `rdb_last_cow_size`, measured on the side that pays it.
fn private_dirty(pid: u32, memory: &GuestMemory) -> std::io::Result<u64> {
    let ram: Vec<(u64, u64)> = memory
        .iter()
        .map(|r| (r.as_ptr() as u64, r.as_ptr() as u64 + r.len()))
        .collect();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(sum_private_dirty(&smaps, &ram))
}

fn sum_private_dirty(smaps: &str, ram: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut in_ram = false;
    for line in smaps.lines() {
        if let Some(value) = line.strip_prefix("Private_Dirty:") {
            if in_ram {
                let kib: u64 = value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                total += kib * 1024;
            }
            continue;
        }
        let range = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'));
        if let Some((start, end)) = range {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                in_ram = ram.iter().any(|&(s, e)| start < e && end > s);
            }
        }
    }
    total
}

/// What a live snapshot's writer child needs, all captured while the guest was paused.
#[derive(Debug)]
pub struct WriterJob<'a> {
    pub staging: &'a StagingDir,
    pub state: SnapshotState,
    pub memory: &'a GuestMemory,
    /// The pages to store, for a diff.
    pub diff: Option<&'a [u64]>,
    pub mapped: Option<&'a MappedFile>,
}

/// Forks a child that writes and publishes the snapshot from its copy-on-write view of guest
/// RAM, reports on its pipe and exits. Returns its pid.
pub fn spawn_writer(events: &Sender<VmEvent>, job: WriterJob<'_>) -> Result<i32, ForkError> {
    let parent = std::process::id();
    let paths = job.staging.paths();
    spawn(events, move |pipe| {
        let mut keep = vec![pipe.as_raw_fd()];
        keep.extend(job.mapped.map(MappedFile::raw_fd));
        leave_parent_behind(&keep);
        let started = Instant::now();
        let written = job
            .mapped
            .map_or(Ok(()), MappedFile::check)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let staging = StagingDir::adopt(paths);
                snapshot::write_memory(staging, job.state, job.memory, job.diff)
                    .and_then(snapshot::PendingSnapshot::publish)
                    .map_err(|e| e.to_string())
            });
        let write_us = started.elapsed().as_micros() as u64;
        let cow_bytes = private_dirty(parent, job.memory).ok();
        let (value, code) = match written {
            Ok(published) => (
                json!({
                    "ok": true,
                    "id": published.id,
                    "pages_stored": published.state.memory.pages_stored,
                    "write_us": write_us,
                    "cow_bytes": cow_bytes,
                }),
                0,
            ),
            Err(error) => (
                json!({"ok": false, "error": error, "write_us": write_us}),
                1,
            ),
        };
        report(pipe, &value);
        exit_now(code)
    })
}

/// Where one forked child goes.
#[derive(Clone, Debug)]
pub struct ChildPlan {
    pub generation: u64,
    pub serial: PathBuf,
    pub socket: PathBuf,
}

/// What a forked VM child starts from, captured while the guest was paused.
#[derive(Debug)]
pub struct Captured<'a> {
    pub state: &'a SnapshotState,
    pub memory: &'a GuestMemory,
    pub mapped: Option<&'a MappedFile>,
    pub kvm_device: &'a Path,
}

/// Forks a child that builds a new KVM VM over its copy-on-write view of guest RAM, restores
/// the captured state with its own generation id, serial file and control socket, and runs it
/// until its guest exits. Returns its pid.
pub fn spawn_vm(
    events: &Sender<VmEvent>,
    plan: &ChildPlan,
    captured: &Captured<'_>,
) -> Result<i32, ForkError> {
    spawn(events, |pipe| {
        let mut keep = vec![pipe.as_raw_fd()];
        keep.extend(captured.mapped.map(MappedFile::raw_fd));
        leave_parent_behind(&keep);
        match build_forked_vm(plan, captured) {
            Err(e) => {
                report(pipe, &json!({"ok": false, "error": e.to_string()}));
                exit_now(1)
            }
            Ok((mut machine, server)) => {
                report(pipe, &json!({"ok": true}));
                let status = match machine.wait() {
                    Ok(status) => i32::from(status),
                    Err(e) => {
                        eprintln!(
                            "cowvm: error: forked VM (pid {}, generation {:#x}): {e}",
                            std::process::id(),
                            plan.generation
                        );
                        1
                    }
                };
                // The child's own objects: its vCPU threads stopped, then its socket file
                // removed once the last replies are written.
                drop(machine);
                drop(server);
                exit_now(status)
            }
        }
    })
}

/// The same three steps as a restore, over the inherited memory, then the captured state.
fn build_forked_vm(
    plan: &ChildPlan,
    captured: &Captured<'_>,
) -> Result<(Machine, ApiServer), ForkError> {
    let kvm = open_kvm(captured.kvm_device)?;
    let serial = File::create(&plan.serial).map_err(|source| ForkError::SerialFile {
        path: plan.serial.clone(),
        source,
    })?;
    let created_at = Instant::now();
    let mut vm = EmptyVm::create(&kvm)?;
    // A new VM: its first snapshot is a full one (it has no snapshot to build a diff on).
    vm.set_dirty_log_mode(MemoryOrigin::Boot)?;
    let memory = captured.memory.clone();
    // Ordering: the id is in this child's copy of RAM before any of its vCPUs runs, and
    // written through vm-memory so that this VM's dirty bitmap records the page.
    memory
        .write_obj(
            plan.generation,
            GuestAddress(BOOT_INFO_ADDR + GENERATION_OFFSET),
        )
        .map_err(ForkError::Generation)?;
    let vm = vm.register_memory(memory)?;
    // The parent froze the disks at the pause and recorded their chains by absolute path.
    let disk_chains = captured
        .state
        .disks
        .iter()
        .map(|disk| disk.verify(Path::new("/")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ForkError::Build(Box::new(crate::snapshot::SnapshotError::from(e).into())))?;
    let machine = builder::from_state(SavedMachine {
        kvm: &kvm,
        vm,
        vcpu_fds: None,
        state: captured.state,
        serial_out: Box::new(serial),
        parent: None,
        mapped: captured.mapped.cloned(),
        initial: RunState::Running,
        created_at,
        kvm_device: captured.kvm_device.to_owned(),
        disk_chains,
        overlays: OverlayPlace::Image {
            prefix: format!("fork-{:016x}", plan.generation),
        },
    })?;
    let server = api::serve(&plan.socket, machine.event_sender())?;
    Ok((machine, server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dirty_counts_only_guest_ram_mappings() {
        let smaps = "\
00400000-00600000 r-xp 00000000 08:01 1 /usr/bin/cowvm
Private_Dirty:        12 kB
7f0000000000-7f0040000000 rw-p 00000000 00:00 0
Size:            1048576 kB
Private_Dirty:       256 kB
VmFlags: rd wr mr mw me ac hg
7f0040000000-7f0040021000 rw-p 00000000 00:00 0
Private_Dirty:        64 kB
7f0080000000-7f00c0000000 rw-p 00000000 00:00 0
Private_Dirty:         8 kB
";
        let ram = [
            (0x7f00_0000_0000, 0x7f00_4000_0000),
            (0x7f00_8000_0000, 0x7f00_c000_0000),
        ];
        assert_eq!(sum_private_dirty(smaps, &ram), (256 + 8) * 1024);
        assert_eq!(sum_private_dirty(smaps, &[]), 0);
    }
}
