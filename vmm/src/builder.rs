//! Turns a [`VmConfig`] into a running [`Machine`]: open KVM, check the flags, create the VM and
//! its RAM, load the guest, write the boot structures, wire the devices, start the vCPUs.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cowvm_guest_abi::layout::{EXIT_PORT, SERIAL_PORT};
use cowvm_guest_abi::BootInfo;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

use crate::boot::{self, BootError};
use crate::config::{ConfigError, GuestImage, SerialOutput, VmConfig};
use crate::devices::bus::OverlapError;
use crate::devices::exit::ExitDevice;
use crate::devices::serial::SerialDevice;
use crate::devices::Bus;
use crate::kvm::{host_limits, open_kvm, KvmError};
use crate::loader::{self, LoadError};
use crate::machine::{Machine, MachineParts};
use crate::memory::{create_guest_memory, ram_end, MemoryError};
use crate::snapshot::persist::Persist;
use crate::snapshot::state::ParentRef;
use crate::snapshot::{self, SnapshotError};
use crate::vcpu::{RunState, Vcpu, VcpuError, VmEvent};
use crate::vm::{MemoryOrigin, Vm, VmError};

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
    #[error("cannot create the serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Boots the VM described by `config`; its vCPUs are running when this returns.
pub fn build(config: &VmConfig) -> Result<Machine, BuildError> {
    let kvm = open_kvm(&config.kvm_device)?;
    config.validate(&host_limits(&kvm))?;
    let serial_out = serial_output(&config.serial)?;

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
        },
    )?;
    let vm = Vm::new(&kvm, memory, MemoryOrigin::Boot)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_out)));
    let (events, buses) = wire_devices(&serial)?;

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    // Ordering: every vCPU is created and configured before any runs, so a fast guest vCPU 0
    // never waits on (or races with) the set-up of the others.
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let vcpu = create_vcpu(&vm, index, &buses, &events.0)?;
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
    };
    start(vcpus, parts)
}

/// How to restore a snapshot.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Copy the memory file instead of mapping it `MAP_PRIVATE`.
    pub eager: bool,
    pub serial: SerialOutput,
    pub kvm_device: PathBuf,
}

/// Restores the snapshot in `dir` (following its diff chain); the guest continues where it was.
pub fn restore(dir: &Path, options: &RestoreOptions) -> Result<Machine, BuildError> {
    let chain = snapshot::load_chain(dir)?;
    let Some(top) = chain.last() else {
        return Err(SnapshotError::NoParent.into());
    };
    let kvm = open_kvm(&options.kvm_device)?;
    let limits = host_limits(&kvm);
    let vcpu_count = top.state.vcpus.len() as u32;
    if vcpu_count == 0 || vcpu_count > limits.kvm_max_vcpus {
        return Err(BuildError::Config(ConfigError::TooManyVcpus {
            requested: vcpu_count,
            max: limits.kvm_max_vcpus,
            kvm: limits.kvm_max_vcpus,
            abi: cowvm_guest_abi::layout::MAX_VCPUS,
        }));
    }
    let serial_out = serial_output(&options.serial)?;
    let created_at = Instant::now();
    let memory = snapshot::load_memory(&chain, options.eager)?;
    let vm = Vm::new(&kvm, memory, MemoryOrigin::Restore)?;
    if let Some(clock) = &top.state.vm.clock {
        let clock = kvm_bindings::kvm_clock_data { flags: 0, ..*clock };
        if let Err(e) = vm.fd().set_clock(&clock) {
            tracing::debug!("KVM_SET_CLOCK: {e}");
        }
    }
    let serial = Arc::new(Mutex::new(SerialDevice::restore(
        serial_out,
        &top.state.serial,
    )?));
    let (events, buses) = wire_devices(&serial)?;
    let mut vcpus = Vec::with_capacity(vcpu_count as usize);
    for (index, state) in top.state.vcpus.iter().enumerate() {
        let vcpu = create_vcpu(&vm, index as u32, &buses, &events.0)?;
        vcpu.restore_state(state)?;
        vcpus.push(vcpu);
    }
    let path = std::fs::canonicalize(&top.dir).unwrap_or_else(|_| top.dir.clone());
    let parts = MachineParts {
        vm,
        mem_size: top.state.mem_size,
        events,
        buses,
        serial,
        created_at,
        parent: Some(ParentRef {
            path: path.display().to_string(),
            state_crc: top.crc,
        }),
    };
    start(vcpus, parts)
}

type Events = (mpsc::Sender<VmEvent>, mpsc::Receiver<VmEvent>);
/// The port-I/O bus and the MMIO bus.
type Buses = (Arc<Bus>, Arc<Bus>);

fn serial_output(serial: &SerialOutput) -> Result<Box<dyn Write + Send>, BuildError> {
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

/// The port bus with COM1 and the exit device, and an empty MMIO bus.
fn wire_devices(serial: &Arc<Mutex<SerialDevice>>) -> Result<(Events, Buses), BuildError> {
    let (events_tx, events_rx) = mpsc::channel();
    let mut pio = Bus::new("PIO");
    pio.insert(u64::from(SERIAL_PORT), 8, serial.clone())?;
    pio.insert(
        u64::from(EXIT_PORT),
        2,
        Arc::new(Mutex::new(ExitDevice::new(events_tx.clone()))),
    )?;
    let mmio = Bus::new("MMIO");
    Ok(((events_tx, events_rx), (Arc::new(pio), Arc::new(mmio))))
}

fn create_vcpu(
    vm: &Vm,
    index: u32,
    buses: &Buses,
    events: &mpsc::Sender<VmEvent>,
) -> Result<Vcpu, BuildError> {
    let fd = vm
        .fd()
        .create_vcpu(u64::from(index))
        .map_err(|source| VcpuError::Create { index, source })?;
    Ok(Vcpu::new(
        index,
        fd,
        buses.0.clone(),
        buses.1.clone(),
        events.clone(),
    ))
}

fn start(vcpus: Vec<Vcpu>, parts: MachineParts) -> Result<Machine, BuildError> {
    let handles = vcpus
        .into_iter()
        .map(|vcpu| vcpu.start(RunState::Running))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Machine::new(handles, parts))
}
