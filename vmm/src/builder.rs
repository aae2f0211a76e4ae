//! Turns a [`VmConfig`] (or a snapshot) into a running [`Machine`]: check the flags, create the
//! RAM and load the guest, open KVM, create the VM and register its RAM, wire the devices, start
//! the vCPUs.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cowvm_guest_abi::boot_info::{DeviceWindow, MAX_DEVICES};
use cowvm_guest_abi::disk::BLOCK_SIZE;
use cowvm_guest_abi::layout::{EXIT_PORT, SERIAL_PORT, VIRTIO_MMIO_SIZE};
use cowvm_guest_abi::BootInfo;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::{self, BootError};
use crate::config::{ConfigError, GuestImage, SerialOutput, VmConfig};
use crate::devices::bus::OverlapError;
use crate::devices::exit::ExitDevice;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::{MmioTransport, VirtioBlock};
use crate::devices::Bus;
use crate::disk::chain::Layer;
use crate::disk::freeze::OverlayPlace;
use crate::disk::{
    freeze, open_disk, AttachedDisk, DiskFormat, DiskSpec, OpenDiskError, OpenedDisk,
};
use crate::kvm::{host_limits, open_kvm, KvmError};
use crate::loader::{self, LoadError};
use crate::machine::{Machine, MachineParts, VmEvent};
use crate::memory::{create_guest_memory, host_ram_bytes, ram_end, MemoryError};
use crate::snapshot::disks::DiskState;
use crate::snapshot::persist::Persist;
use crate::snapshot::state::{ParentRef, SnapshotState};
use crate::snapshot::{self, MappedFile, SnapshotError};
use crate::vcpu::{EventSink, RunState, Vcpu, VcpuError};
use crate::vm::{EmptyVm, MemoryOrigin, Vm, VmError};

/// Booting failed; each variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot register a device: {0}")]
    Device(#[from] OverlapError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    SerialState(#[from] crate::devices::serial::SerialRestoreError),
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Disk(#[from] OpenDiskError),
    #[error(transparent)]
    DiskOverlay(#[from] freeze::FreezeError),
    #[error("restoring a disk's device state: {0}")]
    DiskDevice(#[from] crate::devices::virtio::mmio::MmioRestoreError),
    #[error("--disk {path}: {size} bytes is smaller than the guest's disk workload needs ({needed} bytes for disk_blocks={blocks}); lower disk_blocks or use a larger disk")]
    DiskTooSmallForWorkload {
        path: PathBuf,
        size: u64,
        needed: u64,
        blocks: u64,
    },
    #[error("cannot create the serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Boots the VM described by `config`; its vCPUs are running when this returns.
pub fn build(config: &VmConfig) -> Result<Machine, BuildError> {
    // Ordering: everything that needs no KVM (flags, RAM, the guest image) is checked first, so
    // a bad flag or file is reported as such on any host.
    let args = config.validate_flags(host_ram_bytes())?;
    let opened = open_disks(&config.disks)?;
    if let (Some(args), Some(first)) = (args.filter(|a| a.uses_disk()), opened.first()) {
        // The benchmark's random phases use a second region of disk_blocks blocks.
        let regions = if args.disk_bench > 0 { 2 } else { 1 };
        let needed = regions * args.disk_blocks * BLOCK_SIZE;
        if first.1.backend.size() < needed {
            return Err(BuildError::DiskTooSmallForWorkload {
                path: first.0.path.clone(),
                size: first.1.backend.size(),
                needed,
                blocks: args.disk_blocks,
            });
        }
    }
    let created_at = Instant::now();
    let memory = create_guest_memory(config.mem_size)?;
    let entry = match &config.guest {
        GuestImage::BuiltIn => loader::load_built_in(&memory)?,
        GuestImage::File(path) => loader::load_file(&memory, path)?,
    };
    boot::write_gdt(&memory)?;
    let cr3 = boot::write_page_tables(&memory, ram_end(config.mem_size))?;
    boot::write_boot_info(
        &memory,
        &BootInfo {
            vcpu_count: config.vcpus,
            ram_size: config.mem_size,
            clone_generation: 0,
            args: &config.args,
            devices: device_windows(opened.len()),
            device_count: opened.len() as u32,
        },
    )?;
    let kvm = open_kvm(&config.kvm_device)?;
    config.validate_kvm(host_limits(&kvm).kvm_max_vcpus)?;
    let serial_out = serial_output(&config.serial)?;

    let mut vm = EmptyVm::create(&kvm)?;
    vm.set_dirty_log_mode(MemoryOrigin::Boot)?;
    let vm = vm.register_memory(memory)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_out)));
    let disks: Vec<AttachedDisk> = opened
        .into_iter()
        .enumerate()
        .map(|(index, (spec, opened))| attach_disk(&vm, index, &spec, opened))
        .collect();
    let (events, buses) = wire_devices(&serial, &disks)?;

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    // Ordering: every vCPU is created and configured before any runs, so a fast guest vCPU 0
    // never waits on (or races with) the set-up of the others.
    let sink = event_sink(&events.0);
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let vcpu = create_vcpu(&vm, index, &buses, &sink)?;
        vcpu.configure_boot(&cpuid, entry, cr3)?;
        vcpus.push(vcpu);
    }
    let parts = MachineParts {
        vm,
        mem_size: config.mem_size,
        events,
        buses,
        serial,
        created_at,
        parent: None,
        mapped: None,
        kvm_device: config.kvm_device.clone(),
        disks,
    };
    start(vcpus, RunState::Running, parts)
}

/// How to restore a snapshot.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Copy the memory file instead of mapping it `MAP_PRIVATE`.
    pub eager: bool,
    /// Check every memory file of the chain against its recorded checksums first.
    pub verify: bool,
    /// Leave the vCPUs paused (resume through the control socket).
    pub paused: bool,
    /// A new generation id for the restored VM (see `clone`).
    pub generation: Option<u64>,
    pub serial: SerialOutput,
    pub kvm_device: PathBuf,
}

/// Restores the snapshot in `dir` (following its diff chain); the guest continues where it was.
pub fn restore(dir: &Path, options: &RestoreOptions) -> Result<Machine, BuildError> {
    let chain = snapshot::load_chain(dir)?;
    let Some(top) = chain.last() else {
        return Err(SnapshotError::NoParent.into());
    };
    if options.verify {
        snapshot::verify_chain(&chain)?;
    }
    // Ordering: the disks' frozen chains are checked before KVM is touched, like the state.
    let disk_chains = top.verify_disks()?;
    let kvm = open_kvm(&options.kvm_device)?;
    check_vcpu_count(&kvm, &top.state)?;
    let serial_out = serial_output(&options.serial)?;
    let created_at = Instant::now();
    let mut vm = EmptyVm::create(&kvm)?;
    vm.set_dirty_log_mode(MemoryOrigin::Restore)?;
    let loaded = snapshot::load_memory(&chain, options.eager)?;
    if let Some(generation) = options.generation {
        boot::write_generation(&loaded.memory, generation)?;
    }
    let vm = vm.register_memory(loaded.memory)?;
    let initial = if options.paused {
        RunState::Paused
    } else {
        RunState::Running
    };
    let snapshot_dir =
        std::fs::canonicalize(&top.dir).map_err(|source| SnapshotError::WriteFile {
            path: top.dir.clone(),
            source,
        })?;
    from_state(SavedMachine {
        kvm: &kvm,
        vm,
        vcpu_fds: None,
        state: &top.state,
        serial_out,
        parent: Some(top.as_parent()),
        mapped: loaded.mapped,
        initial,
        created_at,
        kvm_device: options.kvm_device.clone(),
        disk_chains,
        overlays: OverlayPlace::Snapshot(snapshot_dir),
    })
}

/// The saved state's vCPU count, if this host's KVM can run that many.
fn check_vcpu_count(kvm: &Kvm, state: &SnapshotState) -> Result<u32, BuildError> {
    let vcpu_count = state.vcpus.len() as u32;
    let max = host_limits(kvm).kvm_max_vcpus;
    if vcpu_count == 0 || vcpu_count > max {
        return Err(BuildError::Config(ConfigError::TooManyVcpus {
            requested: vcpu_count,
            max,
            kvm: max,
            abi: cowvm_guest_abi::layout::MAX_VCPUS,
        }));
    }
    Ok(vcpu_count)
}

/// A VM whose RAM is registered and whose vCPUs, clock and devices come from saved state.
pub(crate) struct SavedMachine<'a> {
    pub kvm: &'a Kvm,
    pub vm: Vm,
    /// vCPUs of a clone-pool slot to load the state into; `None` creates them.
    pub vcpu_fds: Option<Vec<VcpuFd>>,
    pub state: &'a SnapshotState,
    pub serial_out: Box<dyn Write + Send>,
    /// What the VM's first diff builds on.
    pub parent: Option<ParentRef>,
    pub mapped: Option<MappedFile>,
    pub initial: RunState,
    pub created_at: Instant,
    pub kvm_device: PathBuf,
    /// Each disk's frozen chain, as checked (one per `state.disks`).
    pub disk_chains: Vec<Vec<Layer>>,
    /// Where the disks' fresh overlays go.
    pub overlays: OverlayPlace,
}

/// The second half of a restore, shared with a live fork's child: sets the clock, restores the
/// serial device, the disks (each on its own fresh overlay) and every vCPU from `state`, and
/// starts the vCPUs in `initial`.
pub(crate) fn from_state(saved: SavedMachine<'_>) -> Result<Machine, BuildError> {
    let SavedMachine {
        kvm,
        vm,
        vcpu_fds,
        state,
        serial_out,
        parent,
        mapped,
        initial,
        created_at,
        kvm_device,
        disk_chains,
        overlays,
    } = saved;
    let vcpu_count = check_vcpu_count(kvm, state)?;
    if let Some(clock) = &state.vm.clock {
        let clock = kvm_bindings::kvm_clock_data { flags: 0, ..*clock };
        if let Err(e) = vm.fd().set_clock(&clock) {
            tracing::debug!("KVM_SET_CLOCK: {e}");
        }
    }
    let serial = Arc::new(Mutex::new(SerialDevice::restore(
        serial_out,
        &state.serial,
    )?));
    let disks = state
        .disks
        .iter()
        .zip(&disk_chains)
        .map(|(disk, layers)| attach_restored(&vm, &overlays, disk, layers))
        .collect::<Result<Vec<_>, _>>()?;
    let (events, buses) = wire_devices(&serial, &disks)?;
    let sink = event_sink(&events.0);
    let mut fds = vcpu_fds.map(Vec::into_iter);
    let mut vcpus = Vec::with_capacity(vcpu_count as usize);
    for (index, vcpu_state) in state.vcpus.iter().enumerate() {
        let vcpu = match fds.as_mut().and_then(Iterator::next) {
            Some(fd) => Vcpu::new(
                index as u32,
                fd,
                buses.0.clone(),
                buses.1.clone(),
                sink.clone(),
            ),
            None => create_vcpu(&vm, index as u32, &buses, &sink)?,
        };
        vcpu.restore_state(vcpu_state)?;
        vcpus.push(vcpu);
    }
    let parts = MachineParts {
        vm,
        mem_size: state.mem_size,
        events,
        buses,
        serial,
        created_at,
        parent,
        mapped,
        kvm_device,
        disks,
    };
    start(vcpus, initial, parts)
}

type Events = (mpsc::Sender<VmEvent>, mpsc::Receiver<VmEvent>);
/// The port-I/O bus and the MMIO bus.
type Buses = (Arc<Bus>, Arc<Bus>);

pub(crate) fn serial_output(serial: &SerialOutput) -> Result<Box<dyn Write + Send>, BuildError> {
    Ok(match serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(path) => {
            Box::new(File::create(path).map_err(|source| BuildError::SerialFile {
                path: path.clone(),
                source,
            })?)
        }
    })
}

/// What vCPUs and devices report goes into the VMM thread's event channel.
fn event_sink(events: &mpsc::Sender<VmEvent>) -> EventSink {
    let events = events.clone();
    Arc::new(move |event| {
        // The receiver is gone only while the VMM is already shutting down.
        let _ = events.send(VmEvent::Vcpu(event));
    })
}

/// Opens every `--disk` (before KVM is touched, so a bad disk is reported on any host).
fn open_disks(specs: &[DiskSpec]) -> Result<Vec<(DiskSpec, OpenedDisk)>, BuildError> {
    specs
        .iter()
        .map(|spec| Ok((spec.clone(), open_disk(spec)?)))
        .collect()
}

/// The device table of the boot-info page: disk `i` at window `i`.
fn device_windows(count: usize) -> [DeviceWindow; MAX_DEVICES] {
    std::array::from_fn(|i| {
        if i < count {
            AttachedDisk::window(i)
        } else {
            DeviceWindow::default()
        }
    })
}

/// A virtio-blk device for an open disk, over the VM's RAM.
fn attach_disk(vm: &Vm, index: usize, spec: &DiskSpec, opened: OpenedDisk) -> AttachedDisk {
    let read_only = spec.read_only || opened.backend.read_only();
    let block = VirtioBlock::new(index, opened.backend, read_only);
    AttachedDisk {
        index,
        device: Arc::new(Mutex::new(MmioTransport::new(block, vm.memory().clone()))),
        top: spec.path.clone(),
        format: opened.format,
        read_only,
        overlay: false,
    }
}

/// A restored disk: its device as saved, over a fresh overlay on the frozen chain (a read-only
/// disk reads its frozen image directly).
fn attach_restored(
    vm: &Vm,
    overlays: &OverlayPlace,
    state: &DiskState,
    layers: &[Layer],
) -> Result<AttachedDisk, BuildError> {
    let Some(top) = layers.first() else {
        return Err(SnapshotError::NoParent.into());
    };
    let id = state.block.id.clone();
    let (path, backend, overlay) = if state.read_only {
        let backend = freeze::open_image(&top.path, top.format, true, id)?;
        (top.path.clone(), backend, false)
    } else {
        let (path, backend) =
            freeze::create_overlay(overlays, state.index, &top.path, top.format, top.size, id)?;
        (path, backend, true)
    };
    let block = VirtioBlock::restore(state.index, backend, &state.block);
    let mut transport = MmioTransport::new(block, vm.memory().clone());
    transport.restore(&state.transport)?;
    Ok(AttachedDisk {
        index: state.index,
        device: Arc::new(Mutex::new(transport)),
        top: path,
        format: if overlay {
            DiskFormat::Qcow2
        } else {
            top.format
        },
        read_only: state.read_only,
        overlay,
    })
}

/// The port bus with COM1 and the exit device, and the MMIO bus with the disks.
fn wire_devices(
    serial: &Arc<Mutex<SerialDevice>>,
    disks: &[AttachedDisk],
) -> Result<(Events, Buses), BuildError> {
    let (events_tx, events_rx) = mpsc::channel();
    let mut pio = Bus::new("PIO");
    pio.insert(u64::from(SERIAL_PORT), 8, serial.clone())?;
    pio.insert(
        u64::from(EXIT_PORT),
        2,
        Arc::new(Mutex::new(ExitDevice::new(event_sink(&events_tx)))),
    )?;
    let mut mmio = Bus::new("MMIO");
    for disk in disks {
        let window = AttachedDisk::window(disk.index);
        mmio.insert(window.base, VIRTIO_MMIO_SIZE, disk.device.clone())?;
    }
    Ok(((events_tx, events_rx), (Arc::new(pio), Arc::new(mmio))))
}

fn create_vcpu(vm: &Vm, index: u32, buses: &Buses, sink: &EventSink) -> Result<Vcpu, BuildError> {
    let fd = vm
        .fd()
        .create_vcpu(u64::from(index))
        .map_err(|source| VcpuError::Create { index, source })?;
    Ok(Vcpu::new(
        index,
        fd,
        buses.0.clone(),
        buses.1.clone(),
        sink.clone(),
    ))
}

fn start(vcpus: Vec<Vcpu>, initial: RunState, parts: MachineParts) -> Result<Machine, BuildError> {
    let handles = vcpus
        .into_iter()
        .map(|vcpu| vcpu.start(initial))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Machine::new(handles, initial, parts))
}
