//! Clones: many VMs started from one full snapshot (a template), each paying only for the pages
//! it writes.
//!
//! A clone runs in a [`pool::Pool`] slot: a VM whose RAM was registered once. Starting one maps
//! the template's memory file over the slot's RAM `MAP_PRIVATE` (clean pages stay shared through
//! the page cache), writes the clone's generation id into the boot-info page (clones must not share
//! ids or RNG state, the role VMGenID plays for Linux), loads the template's vCPU and device state
//! and resumes. Generation 0 is the VM the template was taken from; clones get 1, 2, … Only full
//! snapshots can be templates: a diff would have to be copied into every clone.

pub mod batch;
pub mod pool;
pub mod slot;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::boot;
use crate::builder::{from_state, BuildError, SavedMachine};
use crate::disk::chain::Layer;
use crate::disk::freeze::OverlayPlace;
use crate::machine::Machine;
use crate::memory::MemoryError;
use crate::snapshot::state::{ParentRef, SnapshotKind, SnapshotState};
use crate::snapshot::{self, MappedFile, MappedFileChanged, SnapshotError, MEMORY_FILE};
use crate::vcpu::RunState;
use crate::vm::VmError;
use pool::Pool;
use slot::{Arming, Shape, Slot};

/// A clone could not be set up or started.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{dir} is a diff snapshot (a chain of {chain}); clones need a full snapshot: `cowvm snapshot merge {dir} --output FULL_DIR` makes one")]
    NotFull { dir: PathBuf, chain: usize },
    #[error("cannot open the template's memory file {path}: {source}")]
    OpenMemory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Memory(MemoryError),
    #[error(transparent)]
    Vm(VmError),
    #[error("KVM_CREATE_VCPU {index} for a clone slot failed: {source}")]
    CreateVcpu {
        index: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot map the template's memory over a clone slot: {0}")]
    MapSnapshot(#[source] std::io::Error),
    #[error("cannot reset a clone slot: {0}")]
    Reset(#[source] std::io::Error),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot start a thread for clones: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    MemoryFileChanged(#[from] MappedFileChanged),
    #[error("{0}")]
    Limit(String),
}

/// A full snapshot loaded once and started many times.
#[derive(Debug)]
pub struct Template {
    pub dir: PathBuf,
    pub state: SnapshotState,
    file: Arc<File>,
    mapped: MappedFile,
    parent: ParentRef,
    /// Each disk's frozen chain, checked once.
    disk_chains: Vec<Vec<Layer>>,
    kvm_device: PathBuf,
}

impl Template {
    /// Loads and checks the snapshot in `dir` (with `verify`, its memory checksums too) and its
    /// disks' frozen chains.
    pub fn load(dir: &Path, verify: bool, kvm_device: &Path) -> Result<Self, CloneError> {
        let mut chain = snapshot::load_chain(dir)?;
        if chain.len() != 1 {
            return Err(CloneError::NotFull {
                dir: dir.to_owned(),
                chain: chain.len(),
            });
        }
        if verify {
            snapshot::verify_chain(&chain)?;
        }
        let top = chain.remove(0);
        if top.state.kind != SnapshotKind::Full {
            return Err(CloneError::NotFull {
                dir: dir.to_owned(),
                chain: 1,
            });
        }
        let path = top.dir.join(MEMORY_FILE);
        let open_err = |source| CloneError::OpenMemory {
            path: path.clone(),
            source,
        };
        let file = Arc::new(File::open(&path).map_err(open_err)?);
        let len = file.metadata().map_err(open_err)?.len();
        if len != top.state.mem_size {
            return Err(
                SnapshotError::from(snapshot::memory::SnapshotMemoryError::WrongSize {
                    path: path.display().to_string(),
                    expected: top.state.mem_size,
                    actual: len,
                })
                .into(),
            );
        }
        let mapped = MappedFile::new(&path, file.clone()).map_err(open_err)?;
        let disk_chains = top.verify_disks()?;
        Ok(Self {
            parent: top.as_parent(),
            dir: top.dir,
            state: top.state,
            file,
            mapped,
            disk_chains,
            kvm_device: kvm_device.to_owned(),
        })
    }

    /// The slot shape its clones need.
    pub fn shape(&self) -> Shape {
        Shape {
            mem_size: self.state.mem_size,
            vcpus: self.state.vcpus.len() as u32,
        }
    }

    /// The template's memory file, checked for changes since it was loaded.
    pub fn mapped(&self) -> &MappedFile {
        &self.mapped
    }

    /// How the pool arms slots for this template.
    pub fn arming(&self) -> Arming {
        Arming {
            id: self.parent.id.clone().unwrap_or_default(),
            file: self.file.clone(),
        }
    }
}

/// A clone running in a pool slot.
#[derive(Debug)]
pub struct CloneVm {
    pub generation: u64,
    /// When the start was requested.
    pub requested_at: Instant,
    machine: Machine,
    shape: Shape,
    runs: u64,
    /// The template, to arm the slot with again when this clone is done.
    arming: Option<Arming>,
}

/// Starts a clone of `template` with id `generation` in a slot from `pool`, its serial output
/// going to `serial`.
pub fn start(
    pool: &Pool,
    template: &Template,
    generation: u64,
    serial: Box<dyn Write + Send>,
) -> Result<CloneVm, CloneError> {
    let requested_at = Instant::now();
    let shape = template.shape();
    let arming = template.arming();
    let mut slot = pool.take(shape, &arming.id)?;
    // Recent kernels refuse KVM_SET_CPUID2 on a vCPU that has run unless the CPUID is
    // identical: a slot that ran another template's vCPUs may refuse, and is then recreated.
    if slot.runs > 0 && !slot.accepts_cpuid(&template.state) {
        pool.discard();
        slot = pool.create(shape)?;
    }
    template.mapped.check()?;
    // A slot armed for this template already maps it; any other is armed now, on the start path.
    if slot.armed_for.as_deref() != Some(arming.id.as_str()) {
        slot.arm(&arming)?;
    }
    tracing::debug!(
        "clone {generation}: slot armed after {:?}",
        requested_at.elapsed()
    );
    // The clone's own id, before any of its vCPUs runs (written through vm-memory, so the
    // clone's first diff holds the boot-info page).
    boot::write_generation(slot.vm.memory(), generation).map_err(BuildError::from)?;
    let Slot {
        vm, vcpus, runs, ..
    } = slot;
    let arming = Some(arming);
    let machine = from_state(SavedMachine {
        kvm: pool.kvm(),
        vm,
        vcpu_fds: Some(vcpus),
        state: &template.state,
        serial_out: serial,
        parent: Some(template.parent.clone()),
        mapped: Some(template.mapped.clone()),
        initial: RunState::Running,
        created_at: requested_at,
        kvm_device: template.kvm_device.clone(),
        // Each clone writes to its own fresh overlay over every frozen disk image.
        disk_chains: template.disk_chains.clone(),
        overlays: OverlayPlace::Image {
            prefix: format!("clone-{generation}"),
        },
    })?;
    tracing::debug!(
        "clone {generation}: vCPUs started after {:?}",
        requested_at.elapsed()
    );
    Ok(CloneVm {
        generation,
        requested_at,
        machine,
        shape,
        runs,
        arming,
    })
}

impl CloneVm {
    pub fn machine(&mut self) -> &mut Machine {
        &mut self.machine
    }

    /// Gives the slot back to `pool` once the clone has stopped; it is re-armed with the same
    /// template in the background (the next clone is most likely of it).
    pub fn retire(self, pool: &Pool) {
        let (vm, vcpus) = self.machine.into_vm();
        match vcpus {
            Some(vcpus) => pool.give_back(
                Slot {
                    vm,
                    vcpus,
                    shape: self.shape,
                    runs: self.runs,
                    armed_for: None,
                    // The clone ran over the template's mapping, its own writes on top.
                    mapped: self.arming.as_ref().map(|arming| arming.id.clone()),
                },
                self.arming,
            ),
            None => pool.discard(),
        }
    }
}
