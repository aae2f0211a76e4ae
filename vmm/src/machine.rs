//! A running VM: its vCPU threads, its devices, and the VMM thread's event loop, which waits for
//! the guest to exit or fail and carries out control requests (pause, resume, snapshot, stats,
//! shutdown, live snapshot and fork — see `fork.rs` for the child processes).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cowvm_guest_abi::layout::progress_addr;
use kvm_ioctls::VcpuFd;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};

use crate::accounting::{self, AccountingError, MemoryUsage};
use crate::api::ApiRequest;
use crate::devices::serial::SerialDevice;
use crate::devices::Bus;
use crate::disk::freeze::{Frozen, OverlayPlace, PendingOverlays, Prepared};
use crate::disk::AttachedDisk;
use crate::fork::{
    self, ChildEvent, ForkError, LiveOps, LiveWriter, PausePhases, Phase, WriterJob,
};
use crate::snapshot::disks::DiskState;
use crate::snapshot::persist::Persist;
use crate::snapshot::staging::StagingDir;
use crate::snapshot::state::{MemoryState, ParentRef, SnapshotKind, SnapshotState, VmState};
use crate::snapshot::{self, MappedFile, MappedFileChanged, SnapshotError};
use crate::vcpu::{
    RunState, VcpuError, VcpuEvent, VcpuHandle, VcpuRequest, VcpuResponse, RESPONSE_TIMEOUT,
};
use crate::vm::{Vm, VmError};

/// How often the event loop checks that a mapped snapshot memory file is unchanged.
const MAPPED_FILE_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// What the VMM thread's event loop acts on.
#[derive(Debug)]
pub enum VmEvent {
    /// From a vCPU or a device.
    Vcpu(VcpuEvent),
    /// A control-socket request and where to send the reply.
    Api(ApiRequest, Sender<Value>),
    /// From the thread that watches a child process (a live snapshot's writer, a forked VM).
    Child(ChildEvent),
}

/// The VM stopped without the guest writing an exit status, or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("every vCPU halted without the guest writing the exit device; nothing can wake them (no interrupts are delivered)")]
    AllHalted,
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    MappedFile(#[from] MappedFileChanged),
    #[error("vCPU {index}: KVM_RUN failed: Bad address — guest RAM could not be read; it maps the snapshot memory file {path}: was that file changed while in use?")]
    GuestRamUnreadable { index: u32, path: String },
    /// Boxed: it is far larger than the other variants.
    #[error(transparent)]
    Freeze(Box<crate::disk::freeze::FreezeError>),
    #[error("refusing to publish a snapshot holding {saved} of the VM's {vcpus} vCPUs")]
    MissingVcpuState { saved: usize, vcpus: usize },
    #[error(transparent)]
    Fork(#[from] ForkError),
}

impl From<crate::disk::freeze::FreezeError> for MachineError {
    fn from(error: crate::disk::freeze::FreezeError) -> Self {
        Self::Freeze(Box::new(error))
    }
}

/// The devices and facts a machine needs beyond its vCPUs.
#[derive(Debug)]
pub struct MachineParts {
    pub vm: Vm,
    pub mem_size: u64,
    pub events: (Sender<VmEvent>, Receiver<VmEvent>),
    pub buses: (Arc<Bus>, Arc<Bus>),
    pub serial: Arc<Mutex<SerialDevice>>,
    pub created_at: Instant,
    /// The snapshot this VM was restored from (the parent of its first diff).
    pub parent: Option<ParentRef>,
    /// The snapshot memory file guest RAM maps, if it maps one.
    pub mapped: Option<MappedFile>,
    /// The KVM device the VM was created with (a forked child creates its VM there).
    pub kvm_device: PathBuf,
    /// The disks, disk `i` at virtio-mmio window `i`.
    pub disks: Vec<AttachedDisk>,
}

/// What a snapshot request produced.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    pub kind: SnapshotKind,
    pub id: String,
    pub pages_stored: u64,
    /// How long the guest was paused.
    pub paused: Duration,
    /// Request to published directory, fsyncs included.
    pub total: Duration,
    /// Of the pause, how long freezing the disks took (flush, chain record, new overlays).
    pub disk_freeze: Duration,
    /// Disk requests the guest had made available that the pause held back: the snapshot
    /// carries them, and the VM (and any VM restored from it) carries them out when it runs.
    pub disk_requests_held: u64,
}

/// A booted VM.
#[derive(Debug)]
pub struct Machine {
    // Field order matters: vCPU threads are stopped (handles dropped) before the VM goes away.
    vcpus: Vec<VcpuHandle>,
    /// What each vCPU last reported (or will be in once it reads its queued requests).
    vcpu_states: Vec<RunState>,
    vm: Vm,
    mem_size: u64,
    events: Receiver<VmEvent>,
    events_tx: Sender<VmEvent>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    mapped: Option<MappedFile>,
    disks: Vec<AttachedDisk>,
    /// Raised while the VM pauses and stays paused: devices stop between requests (see
    /// `devices::virtio`), so a pause never waits for a whole batch of guest I/O.
    device_hold: Arc<AtomicBool>,
    /// Every vCPU acknowledged a pause and none was resumed since.
    paused: bool,
    halted: usize,
    /// The last snapshot written or restored from: what the next diff builds on.
    parent: Option<ParentRef>,
    /// Dirty pages taken from KVM whose snapshot failed: merged into the next diff.
    pending_dirty: Vec<u64>,
    snapshots_taken: u64,
    /// Time of each snapshot's dirty-bitmap harvest (get + clear), most recent last.
    harvest_times: Vec<Duration>,
    /// How long the last snapshot's disk freeze took.
    disk_freeze_time: Duration,
    /// Disk requests the last snapshot's pause held back.
    disk_requests_held: u64,
    /// Images the last snapshot froze, closed once the guest runs again.
    frozen: Vec<Frozen>,
    /// Live snapshots and forks in flight, forked children, their last results.
    live: LiveOps,
    kvm_device: PathBuf,
    /// When KVM_CREATE_VM was called.
    pub created_at: Instant,
}

impl Machine {
    pub(crate) fn new(vcpus: Vec<VcpuHandle>, initial: RunState, parts: MachineParts) -> Self {
        let device_hold = Arc::new(AtomicBool::new(initial == RunState::Paused));
        for disk in &parts.disks {
            disk.lock().set_hold(device_hold.clone());
        }
        Self {
            vcpu_states: vec![initial; vcpus.len()],
            vcpus,
            vm: parts.vm,
            mem_size: parts.mem_size,
            events: parts.events.1,
            events_tx: parts.events.0,
            pio: parts.buses.0,
            mmio: parts.buses.1,
            serial: parts.serial,
            mapped: parts.mapped,
            disks: parts.disks,
            device_hold,
            paused: initial == RunState::Paused,
            halted: 0,
            parent: parts.parent,
            pending_dirty: Vec::new(),
            snapshots_taken: 0,
            harvest_times: Vec::new(),
            disk_freeze_time: Duration::ZERO,
            disk_requests_held: 0,
            frozen: Vec::new(),
            live: LiveOps::default(),
            kvm_device: parts.kvm_device,
            created_at: parts.created_at,
        }
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// When the guest first touched the serial port (its first exit after start or resume).
    pub fn first_serial_access(&self) -> Option<Instant> {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first_access()
    }

    /// A sender into this machine's event loop (for the control socket).
    pub fn event_sender(&self) -> Sender<VmEvent> {
        self.events_tx.clone()
    }

    /// Unmapped guest accesses seen on (port I/O, MMIO).
    pub fn unmapped_accesses(&self) -> (u64, u64) {
        (self.pio.unmapped_accesses(), self.mmio.unmapped_accesses())
    }

    /// Sends `request` to every vCPU, then waits for all answers against one deadline, so they
    /// pause together. Each vCPU's outcome is returned, in vCPU order.
    fn broadcast(&mut self, request: VcpuRequest) -> Vec<Result<VcpuResponse, VcpuError>> {
        let all: Vec<usize> = (0..self.vcpus.len()).collect();
        self.send_and_wait(request, &all, &all)
    }

    /// Sends `request` to the vCPUs in `to` and waits for the answers of those in `wait_for`.
    fn send_and_wait(
        &mut self,
        request: VcpuRequest,
        to: &[usize],
        wait_for: &[usize],
    ) -> Vec<Result<VcpuResponse, VcpuError>> {
        let tickets: Vec<_> = to
            .iter()
            .map(|&index| (index, self.vcpus[index].send(request)))
            .collect();
        let deadline = Instant::now() + RESPONSE_TIMEOUT;
        let mut outcomes = Vec::with_capacity(wait_for.len());
        for (index, ticket) in tickets {
            if !wait_for.contains(&index) {
                continue;
            }
            let outcome = ticket.and_then(|t| self.vcpus[index].wait(t, deadline));
            if let Ok(VcpuResponse::State(state)) = &outcome {
                self.vcpu_states[index] = *state;
            }
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Stops every vCPU outside KVM_RUN; returns once all are paused (or finished). If one does
    /// not answer, the others are resumed and the stuck one is told to resume once it reads its
    /// queue, so the VM keeps running as before and the error names the vCPU.
    pub fn pause(&mut self) -> Result<(), VcpuError> {
        // Ordering: the hold goes up before the request, so a vCPU busy with a batch of disk
        // requests stops after the one it is doing and sees the pause.
        self.device_hold.store(true, Ordering::Release);
        let outcomes = self.broadcast(VcpuRequest::Pause);
        let (answered, failed): (Vec<_>, Vec<_>) = outcomes
            .into_iter()
            .enumerate()
            .partition(|(_, outcome)| outcome.is_ok());
        let Some((_, Err(first))) = failed.into_iter().next() else {
            self.paused = true;
            return Ok(());
        };
        // Roll back: what paused runs again, and the stuck vCPU finds the resume queued behind
        // its pause when it gets back to its loop (its late replies are dropped by ticket).
        let all: Vec<usize> = (0..self.vcpus.len()).collect();
        let answered: Vec<usize> = answered.into_iter().map(|(index, _)| index).collect();
        self.device_hold.store(false, Ordering::Release);
        self.send_and_wait(VcpuRequest::Resume, &all, &answered);
        for index in all.iter().filter(|i| !answered.contains(i)) {
            self.vcpu_states[*index] = RunState::Running;
        }
        self.paused = false;
        Err(first)
    }

    /// Lets paused vCPUs run again; each resumed vCPU first finishes the device requests the
    /// pause held back (see `devices::virtio`).
    pub fn resume(&mut self) -> Result<(), VcpuError> {
        // Ordering: the hold comes down before any vCPU resumes and looks at the rings.
        self.device_hold.store(false, Ordering::Release);
        let outcomes = self.broadcast(VcpuRequest::Resume);
        // Whatever answered runs; a vCPU that did not will run once it reads its queue.
        self.paused = false;
        outcomes
            .into_iter()
            .find_map(Result::err)
            .map_or(Ok(()), Err)
    }

    /// Snapshots the VM into `dir`. A running VM is paused while its state and memory are
    /// copied into the snapshot files, and runs again while they are checksummed, fsynced and
    /// published.
    pub fn snapshot(
        &mut self,
        dir: &Path,
        kind: SnapshotKind,
    ) -> Result<SnapshotReport, MachineError> {
        let started = Instant::now();
        let SnapshotStart {
            staging,
            snapshot_dir,
            overlays,
        } = self.start_snapshot(dir, kind)?;
        // The guest is paused from here: what came before (staging, new overlays) ran beside it.
        let pause_started = Instant::now();
        let was_running = !self.paused;
        if was_running {
            self.pause()?;
        }
        let captured = self.capture(staging, kind, &snapshot_dir, overlays);
        let resumed = if was_running { self.resume() } else { Ok(()) };
        // The guest-visible pause ends when every vCPU has acknowledged the resume.
        let paused = pause_started.elapsed();
        self.close_frozen();
        // Ordering: the snapshot's contents were fixed while the guest was paused (they sit in
        // the page cache); checksums, fsyncs and the rename that publishes the directory need no
        // pause.
        let (dirty, result) = match captured {
            Ok((dirty, pending)) => (dirty, pending.publish().map_err(MachineError::from)),
            Err((dirty, e)) => (dirty, Err(e)),
        };
        match result {
            Ok(published) => {
                self.pending_dirty.clear();
                self.parent = Some(published.as_parent());
                self.snapshots_taken += 1;
                resumed?;
                Ok(SnapshotReport {
                    kind,
                    id: published.id,
                    pages_stored: published.state.memory.pages_stored,
                    paused,
                    total: started.elapsed(),
                    disk_freeze: self.disk_freeze_time,
                    disk_requests_held: self.disk_requests_held,
                })
            }
            Err(e) => {
                // Transactional: the bits KVM just cleared go to the next diff, so no written
                // page is ever left out of a chain.
                self.pending_dirty = dirty;
                resumed?;
                Err(e)
            }
        }
    }

    /// With every vCPU paused: captures state (see [`Machine::capture_state`]) and writes
    /// memory into the staging directory. Returns the bitmap to keep if the snapshot fails from
    /// here on, with the result.
    #[allow(clippy::type_complexity)]
    fn capture(
        &mut self,
        staging: StagingDir,
        kind: SnapshotKind,
        snapshot_dir: &Path,
        mut overlays: PendingOverlays,
    ) -> Result<(Vec<u64>, snapshot::PendingSnapshot), (Vec<u64>, MachineError)> {
        let (dirty, mut state) = self.capture_state(kind)?;
        // Ordering: the disks are frozen while the guest is paused, at the same instant as its
        // memory; they switch to their fresh overlays only once the memory is written, so a
        // failure leaves every disk on the image it was writing.
        self.disk_requests_held = self
            .disks
            .iter()
            .map(|disk| disk.lock().pending_requests())
            .sum();
        let freeze_started = Instant::now();
        let prepared = match self.prepare_disks(Some(snapshot_dir), &mut overlays) {
            Ok(prepared) => prepared,
            Err(e) => return Err((dirty, e)),
        };
        self.disk_freeze_time = freeze_started.elapsed();
        state.disks = prepared.iter().map(|p| p.state.clone()).collect();
        let diff = (kind == SnapshotKind::Diff).then_some(dirty.as_slice());
        let written = self
            .check_mapped_file()
            .map_err(MachineError::from)
            .and_then(|()| {
                snapshot::write_memory(staging, state, self.vm.memory(), diff)
                    .map_err(MachineError::from)
            });
        match written {
            Ok(pending) => {
                for (disk, prepared) in self.disks.iter_mut().zip(prepared) {
                    self.frozen
                        .extend(crate::disk::freeze::commit(disk, prepared));
                }
                Ok((dirty, pending))
            }
            Err(e) => {
                prepared.into_iter().for_each(Prepared::abandon);
                Err((dirty, e))
            }
        }
    }

    /// With every vCPU paused: takes the dirty bitmap (merged with bits left by a failed
    /// snapshot) and saves every vCPU and device. Returns the bitmap — to keep for the next diff
    /// if the snapshot fails from here on — with the state or the error.
    #[allow(clippy::type_complexity)]
    fn capture_state(
        &mut self,
        kind: SnapshotKind,
    ) -> Result<(Vec<u64>, SnapshotState), (Vec<u64>, MachineError)> {
        let harvest_started = Instant::now();
        let mut dirty = match self.vm.take_dirty_bitmap().into_result() {
            Ok(dirty) => dirty,
            Err((e, mut harvested)) => {
                merge_into(&mut harvested, &self.pending_dirty);
                return Err((harvested, e.into()));
            }
        };
        self.harvest_times.push(harvest_started.elapsed());
        merge_into(&mut dirty, &self.pending_dirty);
        match self.save_state(kind) {
            Ok(state) => Ok((dirty, state)),
            Err(e) => Err((dirty, e)),
        }
    }

    /// A live snapshot: the guest is paused only while its dirty bitmap and state are captured
    /// and the process forks; the child writes and publishes the snapshot from its copy-on-write
    /// view of RAM. The reply goes out when the child has ended ([`Machine::on_child_event`]).
    fn snapshot_live(
        &mut self,
        dir: &Path,
        kind: SnapshotKind,
        reply: &Sender<Value>,
    ) -> Result<(), MachineError> {
        let started = Instant::now();
        let SnapshotStart {
            staging,
            snapshot_dir,
            mut overlays,
        } = self.start_snapshot(dir, kind)?;
        // The guest is paused from here: what came before (staging, new overlays) ran beside it.
        let mut phases = PausePhases::start();
        let was_running = !self.paused;
        if was_running {
            self.pause()?;
        }
        phases.mark(Phase::Stop);
        let spawned = self.capture_state(kind).and_then(|(dirty, mut state)| {
            // Ordering: the disks are frozen at this pause, and the writer child records them.
            match self.freeze_disks_now(Some(&snapshot_dir), &mut overlays) {
                Ok(disks) => state.disks = disks,
                Err(e) => return Err((dirty, e)),
            }
            phases.mark(Phase::Capture);
            let id = state.id.clone().unwrap_or_default();
            let job = WriterJob {
                staging: &staging,
                state,
                memory: self.vm.memory(),
                diff: (kind == SnapshotKind::Diff).then_some(dirty.as_slice()),
                mapped: self.mapped.as_ref(),
            };
            let pid = fork::spawn_writer(&self.events_tx, job);
            phases.mark(Phase::Fork);
            match pid {
                Ok(pid) => Ok((dirty, id, pid)),
                Err(e) => Err((dirty, e.into())),
            }
        });
        // Ordering: the child has its frozen view of RAM once fork() returned; the guest may
        // run again now.
        if was_running {
            if let Err(e) = self.resume() {
                tracing::warn!("resuming after a live snapshot's fork: {e}");
            }
        }
        phases.mark(Phase::Resume);
        self.close_frozen();
        match spawned {
            Ok((dirty, id, pid)) => {
                self.live.start_writer(LiveWriter {
                    pid,
                    staging,
                    id,
                    kind,
                    dirty,
                    reply: reply.clone(),
                    started,
                    phases,
                    report: None,
                });
                Ok(())
            }
            Err((dirty, e)) => {
                self.pending_dirty = dirty;
                Err(e)
            }
        }
    }

    /// A live fork: paused while the state is captured and the process forks `count` times;
    /// each child runs the VM on as a new one (see `fork.rs`). The reply goes out once every
    /// child has reported that it runs.
    fn fork_vms(
        &mut self,
        count: u32,
        serial_dir: &Path,
        socket_dir: &Path,
        reply: &Sender<Value>,
    ) -> Result<(), MachineError> {
        self.live.ensure_idle()?;
        let plans = self.live.plan(count, serial_dir, socket_dir)?;
        let place = OverlayPlace::Image {
            prefix: "fork".into(),
        };
        let mut overlays = PendingOverlays::create(&self.disks, &place)?;
        // The guest is paused from here: the new overlays were made beside it.
        let mut phases = PausePhases::start();
        let was_running = !self.paused;
        if was_running {
            self.pause()?;
        }
        phases.mark(Phase::Stop);
        let mut forked = Vec::with_capacity(plans.len());
        let mut fork_times = Vec::with_capacity(plans.len());
        let mut failure = None;
        let captured = self.save_state(SnapshotKind::Full).and_then(|mut state| {
            // Ordering: the disks are frozen (this VM moves on to fresh overlays) before the
            // children fork; each child puts its own overlay on the frozen images.
            state.disks = self.freeze_disks_now(None, &mut overlays)?;
            Ok((state, self.guest_progress()?))
        });
        phases.mark(Phase::Capture);
        match &captured {
            Ok((state, _)) => {
                let from = fork::Captured {
                    state,
                    memory: self.vm.memory(),
                    mapped: self.mapped.as_ref(),
                    kvm_device: &self.kvm_device,
                };
                for plan in plans {
                    let forked_at = Instant::now();
                    match fork::spawn_vm(&self.events_tx, &plan, &from) {
                        Ok(pid) => forked.push((pid, plan)),
                        Err(e) => {
                            failure = Some(e.to_string());
                            break;
                        }
                    }
                    fork_times.push(forked_at.elapsed());
                }
            }
            Err(e) => failure = Some(e.to_string()),
        }
        phases.mark(Phase::Fork);
        if was_running {
            if let Err(e) = self.resume() {
                tracing::warn!("resuming after a fork: {e}");
            }
        }
        phases.mark(Phase::Resume);
        self.close_frozen();
        let progress = captured.map(|(_, progress)| progress).unwrap_or_default();
        self.live
            .start_fork(reply.clone(), forked, failure, phases, fork_times, progress);
        Ok(())
    }

    /// A child process reported or ended; a finished live snapshot becomes the parent of the
    /// next diff, or gives its dirty bits back.
    fn on_child_event(&mut self, event: ChildEvent) {
        let Some(settled) = self.live.on_event(event) else {
            return;
        };
        match settled.published {
            Some(parent) => {
                self.pending_dirty.clear();
                self.parent = Some(parent);
                self.snapshots_taken += 1;
            }
            // Transactional as a stop-and-copy snapshot: nothing written is left out.
            None => self.pending_dirty = settled.dirty,
        }
    }

    /// What every snapshot does before the guest is paused: checks it may be taken, stages its
    /// directory and creates the disks' overlays.
    fn start_snapshot(
        &self,
        dir: &Path,
        kind: SnapshotKind,
    ) -> Result<SnapshotStart, MachineError> {
        self.live.ensure_idle()?;
        if kind == SnapshotKind::Diff && self.parent.is_none() {
            return Err(SnapshotError::NoParent.into());
        }
        let staging = StagingDir::new(dir).map_err(SnapshotError::from)?;
        let snapshot_dir = snapshot_dir(staging.target())?;
        let place = OverlayPlace::Snapshot(snapshot_dir.clone());
        let overlays = PendingOverlays::create(&self.disks, &place)?;
        Ok(SnapshotStart {
            staging,
            snapshot_dir,
            overlays,
        })
    }

    /// Prepares every disk's freeze (see `disk::freeze::prepare`); all or none.
    fn prepare_disks(
        &self,
        snapshot_dir: Option<&Path>,
        overlays: &mut PendingOverlays,
    ) -> Result<Vec<Prepared>, MachineError> {
        let mut prepared = Vec::with_capacity(self.disks.len());
        for disk in &self.disks {
            match crate::disk::freeze::prepare(disk, snapshot_dir, overlays) {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    prepared.into_iter().for_each(Prepared::abandon);
                    return Err(e.into());
                }
            }
        }
        Ok(prepared)
    }

    /// Closes the images the last snapshot froze (see [`Frozen::close`]).
    fn close_frozen(&mut self) {
        for frozen in self.frozen.drain(..) {
            frozen.close();
        }
    }

    /// Freezes every disk and switches it to its fresh overlay at once, for a live snapshot or
    /// fork (whose state leaves this process with the `fork()` that follows).
    fn freeze_disks_now(
        &mut self,
        snapshot_dir: Option<&Path>,
        overlays: &mut PendingOverlays,
    ) -> Result<Vec<DiskState>, MachineError> {
        let prepared = self.prepare_disks(snapshot_dir, overlays)?;
        let states = prepared.iter().map(|p| p.state.clone()).collect();
        for (disk, prepared) in self.disks.iter_mut().zip(prepared) {
            self.frozen
                .extend(crate::disk::freeze::commit(disk, prepared));
        }
        Ok(states)
    }

    /// Saves every vCPU, the VM and the devices. Every vCPU must answer with its state: a
    /// snapshot with fewer vCPUs than the VM is never written.
    fn save_state(&mut self, kind: SnapshotKind) -> Result<SnapshotState, MachineError> {
        let vcpu_count = self.vcpus.len();
        let mut vcpus = Vec::with_capacity(vcpu_count);
        for outcome in self.broadcast(VcpuRequest::SaveState) {
            match outcome? {
                VcpuResponse::Saved(saved) => vcpus.push((*saved)?),
                VcpuResponse::State(_) => {}
            }
        }
        if vcpus.len() != vcpu_count {
            return Err(MachineError::MissingVcpuState {
                saved: vcpus.len(),
                vcpus: vcpu_count,
            });
        }
        let clock = self.vm.fd().get_clock().ok();
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner()).save();
        let parent = match kind {
            SnapshotKind::Full => None,
            SnapshotKind::Diff => self.parent.clone(),
        };
        Ok(SnapshotState {
            id: Some(snapshot::new_id()),
            kind,
            parent,
            mem_size: self.mem_size,
            memory: MemoryState::default(),
            vm: VmState { clock },
            vcpus,
            serial,
            disks: Vec::new(),
        })
    }

    /// Checks, before the VMM reads guest RAM itself, that a mapped snapshot memory file has
    /// not changed (reading a truncated mapping would kill the process with SIGBUS).
    fn check_mapped_file(&self) -> Result<(), MappedFileChanged> {
        self.mapped.as_ref().map_or(Ok(()), MappedFile::check)
    }

    /// The guest's progress counters (see `layout::PROGRESS_ADDR`).
    fn guest_progress(&self) -> Result<Vec<u64>, MappedFileChanged> {
        self.check_mapped_file()?;
        Ok((0..self.vcpus.len() as u32)
            .map(|index| {
                self.vm
                    .memory()
                    .read_obj::<u64>(GuestAddress(progress_addr(index)))
                    .unwrap_or(0)
            })
            .collect())
    }

    fn stats(&self) -> Result<Value, MappedFileChanged> {
        let (pio, mmio) = self.unmapped_accesses();
        let mut stats = json!({
            "ok": true,
            "state": if self.paused { "paused" } else { "running" },
            "vcpus": self.vcpus.len(),
            "halted_vcpus": self.halted,
            "mem_size": self.mem_size,
            "uptime_ms": self.created_at.elapsed().as_millis() as u64,
            "guest_progress": self.guest_progress()?,
            "memory": self.memory_usage().ok(),
            "snapshots_taken": self.snapshots_taken,
            "dirty_log": if self.vm.manual_protect() { "manual-protect" } else { "get-dirty-log" },
            "register_memory_us": self.vm.register_time().as_micros() as u64,
            "dirty_harvest_us": self.harvest_times.iter().map(|d| d.as_micros() as u64).collect::<Vec<_>>(),
            "last_snapshot": self.parent.as_ref().map(|p| p.path.clone()),
            "memory_file": self.mapped.as_ref().map(|m| m.path().display().to_string()),
            "unmapped_pio_accesses": pio,
            "unmapped_mmio_accesses": mmio,
            "disks": self.disks.iter().map(AttachedDisk::stats).collect::<Vec<_>>(),
        });
        fork::merge(&mut stats, &self.live.stats());
        Ok(stats)
    }

    /// Carries out one control request and sends its reply (a live snapshot's or a fork's once
    /// its children have reported); returns the error that must stop the VM (a changed memory
    /// file) or `Ok(true)` for a shutdown.
    fn handle_api(
        &mut self,
        request: ApiRequest,
        reply: &Sender<Value>,
    ) -> Result<bool, MachineError> {
        let (value, outcome) = match request {
            ApiRequest::Snapshot {
                path,
                kind,
                live: true,
            } => match self.snapshot_live(Path::new(&path), kind, reply) {
                Ok(()) => return Ok(false),
                Err(MachineError::MappedFile(e)) => (error_reply(&e), Err(e.into())),
                Err(e) => (
                    error_reply(&format!("live snapshot {path} not taken: {e}")),
                    Ok(false),
                ),
            },
            ApiRequest::Fork {
                count,
                serial_dir,
                socket_dir,
            } => {
                match self.fork_vms(count, Path::new(&serial_dir), Path::new(&socket_dir), reply) {
                    Ok(()) => return Ok(false),
                    Err(e) => (error_reply(&format!("fork failed: {e}")), Ok(false)),
                }
            }
            ApiRequest::Pause => match self.pause() {
                Ok(()) => (json!({"ok": true, "state": "paused"}), Ok(false)),
                Err(e) => (error_reply(&e), Ok(false)),
            },
            ApiRequest::Resume => match self.resume() {
                Ok(()) => (json!({"ok": true, "state": "running"}), Ok(false)),
                Err(e) => (error_reply(&e), Ok(false)),
            },
            ApiRequest::Stats => match self.stats() {
                Ok(stats) => (stats, Ok(false)),
                Err(e) => (error_reply(&e), Err(e.into())),
            },
            ApiRequest::Shutdown => (json!({"ok": true, "state": "shutting down"}), Ok(true)),
            ApiRequest::Snapshot { path, kind, .. } => {
                match self.snapshot(Path::new(&path), kind) {
                    Ok(report) => (
                        json!({
                            "ok": true,
                            "path": path,
                            "id": report.id,
                            "kind": report.kind,
                            "pages_stored": report.pages_stored,
                            "paused_us": report.paused.as_micros() as u64,
                            "total_us": report.total.as_micros() as u64,
                            "disk_freeze_us": report.disk_freeze.as_micros() as u64,
                            "disk_requests_held": report.disk_requests_held,
                        }),
                        Ok(false),
                    ),
                    Err(MachineError::MappedFile(e)) => (error_reply(&e), Err(e.into())),
                    Err(e) => (
                        error_reply(&format!("snapshot {path} not taken: {e}")),
                        Ok(false),
                    ),
                }
            }
        };
        let _ = reply.send(value);
        outcome
    }

    /// Runs the event loop until the guest exits (its status), a shutdown request (0), or a
    /// failure.
    pub fn wait(&mut self) -> Result<u8, MachineError> {
        let result = loop {
            let event = match self.events.recv_timeout(MAPPED_FILE_CHECK_INTERVAL) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => match self.check_mapped_file() {
                    Ok(()) => continue,
                    Err(e) => break Err(e.into()),
                },
                Err(RecvTimeoutError::Disconnected) => break Err(MachineError::AllHalted),
            };
            match event {
                VmEvent::Vcpu(VcpuEvent::GuestExit(status)) => break Ok(status),
                VmEvent::Vcpu(VcpuEvent::Failed(index, error)) => {
                    break Err(self.explain_failure(index, error))
                }
                VmEvent::Vcpu(VcpuEvent::Halted(index)) => {
                    tracing::debug!("vCPU {index} halted");
                    self.halted += 1;
                    if self.halted == self.vcpus.len() {
                        break Err(MachineError::AllHalted);
                    }
                }
                VmEvent::Api(request, reply) => match self.handle_api(request, &reply) {
                    Ok(false) => {}
                    Ok(true) => break Ok(0),
                    Err(e) => break Err(e),
                },
                VmEvent::Child(event) => self.on_child_event(event),
            }
        };
        self.finish_live_ops();
        self.stop();
        result
    }

    /// Before the VMM exits: waits for a live snapshot being written (its request gets its
    /// reply, and nothing half-written is left) and for forked children still starting, and
    /// answers requests that came in meanwhile.
    fn finish_live_ops(&mut self) {
        loop {
            let event = if self.live.busy() {
                self.events.recv().ok()
            } else {
                self.events.try_recv().ok()
            };
            match event {
                Some(VmEvent::Child(event)) => self.on_child_event(event),
                Some(VmEvent::Api(_, reply)) => {
                    let _ = reply.send(error_reply(&"the VM is shutting down"));
                }
                Some(VmEvent::Vcpu(_)) => {}
                None => break,
            }
        }
    }

    /// `KVM_RUN` fails with EFAULT when guest RAM cannot be faulted in: for a VM that maps a
    /// snapshot memory file, that file was truncated (or otherwise broken) under it.
    fn explain_failure(&self, index: u32, error: VcpuError) -> MachineError {
        let efault = matches!(&error, VcpuError::Ioctl { op: "KVM_RUN", source, .. }
            if source.errno() == libc::EFAULT);
        match (&self.mapped, efault) {
            (Some(mapped), true) => match mapped.check() {
                Err(changed) => changed.into(),
                Ok(()) => MachineError::GuestRamUnreadable {
                    index,
                    path: mapped.path().display().to_string(),
                },
            },
            _ => error.into(),
        }
    }

    /// The VM and its vCPU fds, for a clone-pool slot to run again; the vCPU threads are stopped
    /// first. `None` for the fds if a vCPU thread did not end (its slot cannot be reused).
    pub fn into_vm(self) -> (Vm, Option<Vec<VcpuFd>>) {
        let Machine { vcpus, vm, .. } = self;
        let fds: Option<Vec<VcpuFd>> = vcpus.into_iter().map(VcpuHandle::into_fd).collect();
        (vm, fds)
    }

    /// What the VM's RAM costs the host now (see `accounting`).
    pub fn memory_usage(&self) -> Result<MemoryUsage, AccountingError> {
        accounting::usage(self.vm.memory())
    }

    /// Stops and joins every vCPU thread, then flushes the disks (a failure is reported, not
    /// swallowed by a destructor).
    pub fn stop(&mut self) {
        for vcpu in &mut self.vcpus {
            vcpu.stop();
        }
        for disk in &self.disks {
            if let Err(e) = disk.lock().device_mut().close() {
                tracing::error!("disk {}: final flush failed: {e}", disk.index);
            }
        }
    }
}

fn error_reply(e: &dyn std::fmt::Display) -> Value {
    json!({"ok": false, "error": e.to_string()})
}

/// A snapshot staged, before the guest is paused.
struct SnapshotStart {
    staging: StagingDir,
    /// Its absolute final path, which disk records are relative to.
    snapshot_dir: PathBuf,
    overlays: PendingOverlays,
}

/// The absolute path a snapshot at `target` is recorded under (its parent resolved).
fn snapshot_dir(target: &Path) -> Result<PathBuf, MachineError> {
    crate::disk::chain::absolute_dir(target).map_err(|source| {
        SnapshotError::WriteFile {
            path: target.to_owned(),
            source,
        }
        .into()
    })
}

/// ORs `pending` into `bitmap` (same layout).
fn merge_into(bitmap: &mut [u64], pending: &[u64]) {
    for (word, pending) in bitmap.iter_mut().zip(pending) {
        *word |= pending;
    }
}
