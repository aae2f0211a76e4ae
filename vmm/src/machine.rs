//! A running VM: its vCPU threads, its devices, and the VMM thread's event loop, which waits for
//! the guest to exit or fail and carries out control requests (pause, resume, snapshot, stats,
//! shutdown).

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::ApiRequest;
use crate::devices::serial::SerialDevice;
use crate::devices::Bus;
use crate::snapshot::persist::Persist;
use crate::snapshot::state::{MemoryState, ParentRef, SnapshotKind, SnapshotState, VmState};
use crate::snapshot::{self, SnapshotError};
use crate::vcpu::{VcpuError, VcpuHandle, VcpuRequest, VcpuResponse, VmEvent};
use crate::vm::{Vm, VmError};

/// The VM stopped without the guest writing an exit status.
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
}

/// What a snapshot request produced.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    pub kind: SnapshotKind,
    pub pages_stored: u64,
    pub paused: Duration,
}

/// A booted VM.
#[derive(Debug)]
pub struct Machine {
    // Field order matters: vCPU threads are stopped (handles dropped) before the VM goes away.
    vcpus: Vec<VcpuHandle>,
    vm: Vm,
    mem_size: u64,
    events: Receiver<VmEvent>,
    events_tx: Sender<VmEvent>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    paused: bool,
    halted: usize,
    /// The last snapshot written or restored from: what the next diff builds on.
    parent: Option<ParentRef>,
    /// Dirty pages taken from KVM whose snapshot failed: merged into the next diff.
    pending_dirty: Vec<u64>,
    snapshots_taken: u64,
    /// Time of each snapshot's dirty-bitmap harvest (get + clear), most recent last.
    harvest_times: Vec<Duration>,
    /// When KVM_CREATE_VM was called.
    pub created_at: Instant,
}

impl Machine {
    pub(crate) fn new(vcpus: Vec<VcpuHandle>, parts: MachineParts) -> Self {
        Self {
            vcpus,
            vm: parts.vm,
            mem_size: parts.mem_size,
            events: parts.events.1,
            events_tx: parts.events.0,
            pio: parts.buses.0,
            mmio: parts.buses.1,
            serial: parts.serial,
            paused: false,
            halted: 0,
            parent: parts.parent,
            pending_dirty: Vec::new(),
            snapshots_taken: 0,
            harvest_times: Vec::new(),
            created_at: parts.created_at,
        }
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// A sender into this machine's event loop (for the control socket).
    pub fn event_sender(&self) -> Sender<VmEvent> {
        self.events_tx.clone()
    }

    /// Unmapped guest accesses seen on (port I/O, MMIO).
    pub fn unmapped_accesses(&self) -> (u64, u64) {
        (self.pio.unmapped_accesses(), self.mmio.unmapped_accesses())
    }

    /// Sends `request` to every vCPU, then waits for all to answer, so they pause together.
    fn broadcast(&self, request: VcpuRequest) -> Result<Vec<VcpuResponse>, VcpuError> {
        for vcpu in &self.vcpus {
            vcpu.send(request)?;
        }
        self.vcpus
            .iter()
            .map(|vcpu| vcpu.wait_response(request))
            .collect()
    }

    /// Stops every vCPU outside KVM_RUN; returns once all are paused (or finished).
    pub fn pause(&mut self) -> Result<(), VcpuError> {
        self.broadcast(VcpuRequest::Pause)?;
        self.paused = true;
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) -> Result<(), VcpuError> {
        self.broadcast(VcpuRequest::Resume)?;
        self.paused = false;
        Ok(())
    }

    /// Snapshots the VM into `dir`. A running VM is paused while its state and memory are
    /// copied into the snapshot files, and runs again while they are synced to disk.
    pub fn snapshot(
        &mut self,
        dir: &std::path::Path,
        kind: SnapshotKind,
    ) -> Result<SnapshotReport, MachineError> {
        if kind == SnapshotKind::Diff && self.parent.is_none() {
            return Err(SnapshotError::NoParent.into());
        }
        let tmp = snapshot::begin_dir(dir)?;
        let started = Instant::now();
        let was_running = !self.paused;
        if was_running {
            if let Err(e) = self.pause() {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e.into());
            }
        }
        let (dirty, captured) = self.capture(&tmp, kind);
        let paused = started.elapsed();
        let resumed = if was_running { self.resume() } else { Ok(()) };
        // Ordering: the snapshot's contents were fixed while the guest was paused (they sit in
        // the page cache); the fsyncs and the rename that publishes the directory need no pause.
        let result = captured.and_then(|(crc, pages)| {
            snapshot::commit_dir(&tmp, dir)?;
            Ok((crc, pages))
        });
        match result {
            Ok((crc, pages_stored)) => {
                self.pending_dirty.clear();
                let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
                self.parent = Some(ParentRef {
                    path: path.display().to_string(),
                    state_crc: crc,
                });
                self.snapshots_taken += 1;
                resumed?;
                Ok(SnapshotReport {
                    kind,
                    pages_stored,
                    paused,
                })
            }
            Err(e) => {
                // Transactional: the bits KVM just cleared go to the next diff, so no written
                // page is ever left out of a chain.
                self.pending_dirty = dirty;
                let _ = std::fs::remove_dir_all(&tmp);
                resumed?;
                Err(e)
            }
        }
    }

    /// With every vCPU paused: takes the dirty bitmap (merged with bits left by a failed
    /// snapshot) and writes state and memory into `tmp`. Returns the bitmap, and the state's CRC
    /// and the pages stored.
    fn capture(
        &mut self,
        tmp: &std::path::Path,
        kind: SnapshotKind,
    ) -> (Vec<u64>, Result<(u32, u64), MachineError>) {
        let harvest_started = Instant::now();
        let mut dirty = match self.vm.take_dirty_bitmap() {
            Ok(dirty) => dirty,
            Err(e) => return (self.pending_dirty.clone(), Err(e.into())),
        };
        self.harvest_times.push(harvest_started.elapsed());
        for (word, pending) in dirty.iter_mut().zip(&self.pending_dirty) {
            *word |= pending;
        }
        let result = self.write_snapshot(tmp, kind, &dirty);
        (dirty, result)
    }

    fn write_snapshot(
        &mut self,
        tmp: &std::path::Path,
        kind: SnapshotKind,
        dirty: &[u64],
    ) -> Result<(u32, u64), MachineError> {
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for response in self.broadcast(VcpuRequest::SaveState)? {
            if let VcpuResponse::Saved(saved) = response {
                vcpus.push((*saved)?);
            }
        }
        let clock = self.vm.fd().get_clock().ok();
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner()).save();
        let parent = match kind {
            SnapshotKind::Full => None,
            SnapshotKind::Diff => self.parent.clone(),
        };
        let mut state = SnapshotState {
            kind,
            parent,
            mem_size: self.mem_size,
            memory: MemoryState {
                runs: Vec::new(),
                pages_stored: 0,
            },
            vm: VmState { clock },
            vcpus,
            serial,
        };
        let dirty = (kind == SnapshotKind::Diff).then_some(dirty);
        let crc = snapshot::write_into(tmp, &mut state, self.vm.memory(), dirty)?;
        Ok((crc, state.memory.pages_stored))
    }

    fn stats(&self) -> Value {
        let (pio, mmio) = self.unmapped_accesses();
        json!({
            "ok": true,
            "state": if self.paused { "paused" } else { "running" },
            "vcpus": self.vcpus.len(),
            "halted_vcpus": self.halted,
            "mem_size": self.mem_size,
            "uptime_ms": self.created_at.elapsed().as_millis() as u64,
            "snapshots_taken": self.snapshots_taken,
            "dirty_log": if self.vm.manual_protect() { "manual-protect" } else { "get-dirty-log" },
            "register_memory_us": self.vm.register_time().as_micros() as u64,
            "dirty_harvest_us": self.harvest_times.iter().map(|d| d.as_micros() as u64).collect::<Vec<_>>(),
            "last_snapshot": self.parent.as_ref().map(|p| p.path.clone()),
            "unmapped_pio_accesses": pio,
            "unmapped_mmio_accesses": mmio,
        })
    }

    /// Carries out one control request; returns the reply and whether to shut down.
    fn handle_api(&mut self, request: ApiRequest) -> (Value, bool) {
        let error = |e: &dyn std::fmt::Display| json!({"ok": false, "error": e.to_string()});
        match request {
            ApiRequest::Pause => match self.pause() {
                Ok(()) => (json!({"ok": true, "state": "paused"}), false),
                Err(e) => (error(&e), false),
            },
            ApiRequest::Resume => match self.resume() {
                Ok(()) => (json!({"ok": true, "state": "running"}), false),
                Err(e) => (error(&e), false),
            },
            ApiRequest::Stats => (self.stats(), false),
            ApiRequest::Shutdown => (json!({"ok": true, "state": "shutting down"}), true),
            ApiRequest::Snapshot { path, kind } => {
                match self.snapshot(std::path::Path::new(&path), kind) {
                    Ok(report) => (
                        json!({
                            "ok": true,
                            "path": path,
                            "kind": report.kind,
                            "pages_stored": report.pages_stored,
                            "paused_us": report.paused.as_micros() as u64,
                        }),
                        false,
                    ),
                    Err(e) => (error(&e), false),
                }
            }
        }
    }

    /// Runs the event loop until the guest exits (its status), a shutdown request (0), or a
    /// failure.
    pub fn wait(&mut self) -> Result<u8, MachineError> {
        let result = loop {
            let Ok(event) = self.events.recv() else {
                break Err(MachineError::AllHalted);
            };
            match event {
                VmEvent::GuestExit(status) => break Ok(status),
                VmEvent::VcpuFailed(_, error) => break Err(error.into()),
                VmEvent::VcpuHalted(index) => {
                    tracing::debug!("vCPU {index} halted");
                    self.halted += 1;
                    if self.halted == self.vcpus.len() {
                        break Err(MachineError::AllHalted);
                    }
                }
                VmEvent::Api(request, reply) => {
                    let (value, shutdown) = self.handle_api(request);
                    let _ = reply.send(value);
                    if shutdown {
                        break Ok(0);
                    }
                }
            }
        };
        self.stop();
        result
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&mut self) {
        for vcpu in &mut self.vcpus {
            vcpu.stop();
        }
    }
}
