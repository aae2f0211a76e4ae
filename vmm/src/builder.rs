//! Turns a [`VmConfig`] into a running [`Machine`]: open KVM, check the flags, create the VM and
//! its RAM, load the guest, write the boot structures, wire the devices, start the vCPUs.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
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
use crate::machine::Machine;
use crate::memory::{create_guest_memory, ram_end, MemoryError};
use crate::vcpu::{RunState, Vcpu, VcpuError};
use crate::vm::{Vm, VmError};

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
    let serial_out: Box<dyn Write + Send> = match &config.serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(path) => {
            Box::new(File::create(path).map_err(|source| BuildError::SerialFile {
                path: path.clone(),
                source,
            })?)
        }
    };

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
    let vm = Vm::new(&kvm, memory)?;

    let (events_tx, events_rx) = mpsc::channel();
    let mut pio = Bus::new("PIO");
    pio.insert(
        u64::from(SERIAL_PORT),
        8,
        Arc::new(Mutex::new(SerialDevice::new(serial_out))),
    )?;
    pio.insert(
        u64::from(EXIT_PORT),
        2,
        Arc::new(Mutex::new(ExitDevice::new(events_tx.clone()))),
    )?;
    let pio = Arc::new(pio);
    let mmio = Arc::new(Bus::new("MMIO"));

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    // Ordering: every vCPU is created and configured before any runs, so a fast guest vCPU 0
    // never waits on (or races with) the set-up of the others.
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        let vcpu = Vcpu::new(index, fd, pio.clone(), mmio.clone(), events_tx.clone());
        vcpu.configure_boot(&cpuid, entry, cr3)?;
        vcpus.push(vcpu);
    }
    let handles = vcpus
        .into_iter()
        .map(|vcpu| vcpu.start(RunState::Running))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Machine::new(
        handles,
        vm,
        events_rx,
        (pio, mmio),
        created_at,
    ))
}
