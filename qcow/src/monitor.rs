//! How long-running operations (convert, commit, rebase, check) report progress and learn that
//! they should stop: the caller's [`Monitor`] (the CLI's progress bar and Ctrl-C flag).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// Progress sink and stop flag of a long operation.
pub trait Monitor {
    /// The operation will process `total` units (bytes, usually).
    fn start(&mut self, total: u64) {
        let _ = total;
    }
    /// `done` of the `total` units are processed.
    fn advance(&mut self, done: u64) {
        let _ = done;
    }
    /// Whether the operation should stop as soon as its output is consistent.
    fn cancelled(&self) -> bool {
        false
    }
}

/// A monitor that shows nothing and never stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Monitor for Quiet {}

/// A monitor that never shows anything and stops once `flag` is set (by a signal handler, say).
#[derive(Debug)]
pub struct StopFlag<'a>(pub &'a AtomicBool);

impl Monitor for StopFlag<'_> {
    fn cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// `Err(Interrupted)` once the monitor asks to stop.
pub(crate) fn checkpoint(monitor: &dyn Monitor) -> Result<()> {
    if monitor.cancelled() {
        return Err(Error::Interrupted);
    }
    Ok(())
}
