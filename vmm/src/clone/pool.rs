//! A pool of ready slots, keyed by shape. Slots are registered once; a returned slot is re-armed
//! with its template (or reset) on a background thread, so starting the next clone neither waits
//! for the last one's teardown nor maps its template.

use std::collections::HashMap;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kvm_ioctls::Kvm;
use serde::Serialize;

use super::slot::{Arming, Shape, Slot};
use super::CloneError;

/// What the pool has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Slots created (VM, RAM registration, vCPUs).
    pub created: u64,
    /// Clones started in a slot that had run a clone before.
    pub reused: u64,
    /// Slots dropped because they could not be reset or a vCPU thread did not stop.
    pub discarded: u64,
}

#[derive(Debug, Default)]
struct Shared {
    free: HashMap<Shape, Vec<Slot>>,
    /// Slots on their way back from the reset thread.
    resetting: usize,
    stats: PoolStats,
}

/// Slots ready for clones.
#[derive(Debug)]
pub struct Pool {
    kvm: Kvm,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    resets: Option<Sender<(Slot, Option<Arming>)>>,
    reset_thread: Option<JoinHandle<()>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub fn new(kvm: Kvm) -> Result<Self, CloneError> {
        let shared: Arc<(Mutex<Shared>, Condvar)> = Arc::default();
        let (resets, returned) = mpsc::channel::<(Slot, Option<Arming>)>();
        let for_thread = shared.clone();
        let reset_thread = std::thread::Builder::new()
            .name("slot-reset".into())
            .spawn(move || {
                for (mut slot, arming) in returned {
                    let reset = match &arming {
                        Some(arming) => slot.arm(arming),
                        None => slot.reset(),
                    };
                    let (state, ready) = &*for_thread;
                    let mut shared = lock(state);
                    shared.resetting -= 1;
                    match reset {
                        Ok(()) => shared.free.entry(slot.shape).or_default().push(slot),
                        Err(e) => {
                            tracing::warn!("dropping a clone slot that could not be reset: {e}");
                            shared.stats.discarded += 1;
                        }
                    }
                    ready.notify_all();
                }
            })
            .map_err(CloneError::Thread)?;
        Ok(Self {
            kvm,
            shared,
            resets: Some(resets),
            reset_thread: Some(reset_thread),
        })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Creates `count` more slots of `shape` now, armed with `arming` if given, so that neither
    /// registering their RAM nor mapping the template is on any clone's start path.
    pub fn fill(
        &self,
        shape: Shape,
        count: usize,
        arming: Option<&Arming>,
    ) -> Result<(), CloneError> {
        for _ in 0..count {
            let mut slot = self.create(shape)?;
            if let Some(arming) = arming {
                slot.arm(arming)?;
            }
            lock(&self.shared.0)
                .free
                .entry(shape)
                .or_default()
                .push(slot);
        }
        Ok(())
    }

    /// A ready slot of `shape`, preferably one armed for the template `id`: a free one, else the
    /// next to come back from the background thread, else a new one.
    pub fn take(&self, shape: Shape, id: &str) -> Result<Slot, CloneError> {
        let (state, ready) = &*self.shared;
        let mut shared = lock(state);
        loop {
            let free = shared.free.entry(shape).or_default();
            let armed = free
                .iter()
                .position(|slot| slot.armed_for.as_deref() == Some(id));
            let slot = match armed {
                Some(index) => Some(free.swap_remove(index)),
                None => free.pop(),
            };
            if let Some(slot) = slot {
                if slot.runs > 0 {
                    shared.stats.reused += 1;
                }
                return Ok(slot);
            }
            if shared.resetting == 0 {
                break;
            }
            shared = ready.wait(shared).unwrap_or_else(|e| e.into_inner());
        }
        shared.stats.created += 1;
        drop(shared);
        Slot::create(&self.kvm, shape)
    }

    /// Takes a slot back after its clone ran; the background thread re-arms it with `arming`
    /// (the next clone's template) or resets it to a placeholder.
    pub fn give_back(&self, mut slot: Slot, arming: Option<Arming>) {
        slot.runs += 1;
        slot.armed_for = None;
        lock(&self.shared.0).resetting += 1;
        if let Some(resets) = &self.resets {
            if let Err(mpsc::SendError((slot, _))) = resets.send((slot, arming)) {
                drop(slot);
                let mut shared = lock(&self.shared.0);
                shared.resetting -= 1;
                shared.stats.discarded += 1;
            }
        }
    }

    /// A new slot of `shape`, counted as created.
    pub fn create(&self, shape: Shape) -> Result<Slot, CloneError> {
        let slot = Slot::create(&self.kvm, shape)?;
        lock(&self.shared.0).stats.created += 1;
        Ok(slot)
    }

    /// Counts a slot lost with its clone (a vCPU thread that did not stop).
    pub fn discard(&self) {
        lock(&self.shared.0).stats.discarded += 1;
    }

    /// Waits until no slot is being reset.
    pub fn wait_idle(&self) {
        let (state, ready) = &*self.shared;
        let mut shared = lock(state);
        while shared.resetting > 0 {
            shared = ready.wait(shared).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn stats(&self) -> PoolStats {
        lock(&self.shared.0).stats
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Ordering: closing the channel ends the reset thread after the slots already queued.
        drop(self.resets.take());
        if let Some(thread) = self.reset_thread.take() {
            let _ = thread.join();
        }
    }
}
