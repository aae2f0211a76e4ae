//! The parent's bookkeeping of live snapshots and forks: the writer in flight, the fork request
//! waiting for its children to start, the forked children and how they ended, the replies sent
//! when they report, and what `stats` shows of it all.

use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{
    fork_generation, ChildEvent, ChildPlan, ChildStatus, ForkError, PausePhases, Phase,
    MAX_FORK_COUNT, MAX_SOCKET_PATH,
};
use crate::snapshot::staging::StagingDir;
use crate::snapshot::state::{ParentRef, SnapshotKind, SnapshotState};
use crate::snapshot::{format, STATE_FILE};

/// A live snapshot being written by a child process.
#[derive(Debug)]
pub struct LiveWriter {
    pub pid: i32,
    /// The parent's handle on the staging directory: dropped (removing what is left of it)
    /// only once the child is gone.
    pub staging: StagingDir,
    pub id: String,
    pub kind: SnapshotKind,
    /// The dirty bits harvested for this snapshot: back into the next diff if it fails.
    pub dirty: Vec<u64>,
    pub reply: Sender<Value>,
    pub started: Instant,
    pub phases: PausePhases,
    pub report: Option<Value>,
}

/// A finished live snapshot, for the machine to take in.
#[derive(Debug)]
pub struct Settled {
    /// What the next diff builds on, if the snapshot was published.
    pub published: Option<ParentRef>,
    pub dirty: Vec<u64>,
}

/// One forked VM child, as the parent tracks it.
#[derive(Debug)]
struct ForkedChild {
    pid: i32,
    plan: ChildPlan,
    /// `None` while it runs.
    status: Option<ChildStatus>,
}

/// A fork request waiting for its children to report that they run.
#[derive(Debug)]
struct PendingFork {
    reply: Sender<Value>,
    /// Pids still to report, and each child's outcome so far.
    waiting: Vec<i32>,
    failures: Vec<String>,
    phases: PausePhases,
    fork_times: Vec<Duration>,
    progress: Vec<u64>,
    pids: Vec<i32>,
}

/// The live snapshots and forks of one VM: what is in flight, the children, the last results.
#[derive(Debug, Default)]
pub struct LiveOps {
    writer: Option<LiveWriter>,
    fork: Option<PendingFork>,
    children: Vec<ForkedChild>,
    forks_made: u64,
    last_snapshot: Option<Value>,
}

impl LiveOps {
    /// Refuses to start a snapshot or fork while a live snapshot or fork is in flight.
    pub fn ensure_idle(&self) -> Result<(), ForkError> {
        if let Some(writer) = &self.writer {
            return Err(ForkError::SnapshotInFlight {
                path: writer.staging.target().to_owned(),
                pid: writer.pid,
            });
        }
        if self.fork.is_some() {
            return Err(ForkError::ForkInFlight);
        }
        Ok(())
    }

    /// Whether a request is waiting for a child.
    pub fn busy(&self) -> bool {
        self.writer.is_some() || self.fork.is_some()
    }

    pub fn start_writer(&mut self, writer: LiveWriter) {
        self.writer = Some(writer);
    }

    /// Names and generation ids for `count` children, after checking where they go.
    pub fn plan(
        &mut self,
        count: u32,
        serial_dir: &Path,
        socket_dir: &Path,
    ) -> Result<Vec<ChildPlan>, ForkError> {
        if count == 0 || count > MAX_FORK_COUNT {
            return Err(ForkError::BadCount(count));
        }
        for (what, dir) in [
            ("--serial-dir", serial_dir),
            ("--api-socket-dir", socket_dir),
        ] {
            if !dir.is_dir() {
                return Err(ForkError::NotADirectory {
                    what,
                    path: dir.to_owned(),
                });
            }
        }
        let pid = std::process::id();
        let mut plans = Vec::with_capacity(count as usize);
        for _ in 0..count {
            self.forks_made += 1;
            let generation = fork_generation(pid, self.forks_made);
            let socket = socket_dir.join(format!("fork-{generation:016x}.sock"));
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(ForkError::SocketPathTooLong(socket));
            }
            plans.push(ChildPlan {
                generation,
                serial: serial_dir.join(format!("fork-{generation:016x}.serial")),
                socket,
            });
        }
        Ok(plans)
    }

    /// Records children forked by one request; the reply goes out once each has reported.
    #[allow(clippy::too_many_arguments)]
    pub fn start_fork(
        &mut self,
        reply: Sender<Value>,
        forked: Vec<(i32, ChildPlan)>,
        failure: Option<String>,
        phases: PausePhases,
        fork_times: Vec<Duration>,
        progress: Vec<u64>,
    ) {
        let pids: Vec<i32> = forked.iter().map(|(pid, _)| *pid).collect();
        for (pid, plan) in forked {
            self.children.push(ForkedChild {
                pid,
                plan,
                status: None,
            });
        }
        let pending = PendingFork {
            reply,
            waiting: pids.clone(),
            failures: failure.into_iter().collect(),
            phases,
            fork_times,
            progress,
            pids,
        };
        self.fork = Some(pending);
        self.finish_fork_if_done();
    }

    /// Takes in a child's report or exit; returns a finished live snapshot for the machine to
    /// take in (the reply has been sent).
    pub fn on_event(&mut self, event: ChildEvent) -> Option<Settled> {
        match event {
            ChildEvent::Reported { pid, line } => {
                if let Some(writer) = self.writer.as_mut().filter(|w| w.pid == pid) {
                    writer.report = line.and_then(|l| serde_json::from_str(&l).ok());
                } else {
                    self.child_reported(pid, line);
                }
                None
            }
            ChildEvent::Exited { pid, status } => {
                if self.writer.as_ref().is_some_and(|w| w.pid == pid) {
                    return self.writer.take().map(|w| self.settle_writer(w, status));
                }
                if let Some(child) = self.children.iter_mut().find(|c| c.pid == pid) {
                    child.status = Some(status);
                }
                // A child that ends before reporting has failed to start.
                self.child_reported(pid, None);
                None
            }
        }
    }

    fn child_reported(&mut self, pid: i32, line: Option<String>) {
        let Some(fork) = self.fork.as_mut() else {
            return;
        };
        let Some(at) = fork.waiting.iter().position(|&p| p == pid) else {
            return;
        };
        fork.waiting.remove(at);
        let report: Option<Value> = line.as_deref().and_then(|l| serde_json::from_str(l).ok());
        match report {
            Some(report) if report["ok"] == Value::Bool(true) => {}
            Some(report) => fork.failures.push(format!(
                "child {pid}: {}",
                report["error"].as_str().unwrap_or("set-up failed")
            )),
            None => fork
                .failures
                .push(format!("child {pid} ended before it ran")),
        }
        self.finish_fork_if_done();
    }

    /// Replies to a fork request once every child has reported: all running, or (if any
    /// failed) none — the others are killed, so a request forks all its children or none.
    fn finish_fork_if_done(&mut self) {
        if self.fork.as_ref().is_none_or(|f| !f.waiting.is_empty()) {
            return;
        }
        let Some(fork) = self.fork.take() else {
            return;
        };
        let us = |d: Duration| d.as_micros() as u64;
        let reply = if fork.failures.is_empty() {
            let children: Vec<Value> = self
                .children
                .iter()
                .filter(|c| fork.pids.contains(&c.pid))
                .map(|c| {
                    json!({
                        "pid": c.pid,
                        "generation": c.plan.generation,
                        "api_socket": c.plan.socket,
                        "serial": c.plan.serial,
                    })
                })
                .collect();
            json!({
                "ok": true,
                "children": children,
                "paused_us": us(fork.phases.total()),
                "pause_phases_us": fork.phases.to_json(),
                "fork_us": fork.fork_times.iter().map(|&d| us(d)).collect::<Vec<_>>(),
                "guest_progress": fork.progress,
            })
        } else {
            for &pid in &fork.pids {
                if self
                    .children
                    .iter()
                    .any(|c| c.pid == pid && c.status.is_none())
                {
                    // SAFETY: kill of our own child, which its monitor thread reaps.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            json!({
                "ok": false,
                "error": format!(
                    "fork failed, no child was left running: {}",
                    fork.failures.join("; ")
                ),
            })
        };
        let _ = fork.reply.send(reply);
    }

    /// Replies to a live snapshot whose writer has ended and says what the machine keeps.
    fn settle_writer(&mut self, writer: LiveWriter, status: ChildStatus) -> Settled {
        let us = |d: Duration| d.as_micros() as u64;
        let target = writer.staging.target().to_owned();
        let report = writer.report.unwrap_or(Value::Null);
        let published = report["ok"] == Value::Bool(true) && report["id"] == writer.id.as_str();
        let reply = if published {
            let summary = json!({
                "path": target,
                "id": writer.id,
                "kind": writer.kind,
                "pages_stored": report["pages_stored"],
                "paused_us": us(writer.phases.total()),
                "pause_phases_us": writer.phases.to_json(),
                "fork_us": us(writer.phases.of(Phase::Fork)),
                "write_us": report["write_us"],
                "cow_bytes": report["cow_bytes"],
                "total_us": us(writer.started.elapsed()),
                "writer_pid": writer.pid,
            });
            self.last_snapshot = Some(summary.clone());
            let mut reply = json!({"ok": true, "live": true});
            merge(&mut reply, &summary);
            reply
        } else {
            // A writer killed after its rename may have published: take that back, so an error
            // reply always means nothing under the snapshot's name.
            let removed = remove_if_ours(&target, &writer.id);
            let why = match report["error"].as_str() {
                Some(error) => error.to_string(),
                None => format!(
                    "its writer process {} {status} before reporting",
                    writer.pid
                ),
            };
            json!({
                "ok": false,
                "error": format!(
                    "live snapshot {} not taken: {why}; {}nothing is published, and the pages written since the last snapshot go into the next diff",
                    target.display(),
                    if removed { "the directory it had renamed into place was removed; " } else { "" }
                ),
            })
        };
        // Ordering: whatever a failed child left under the staging name is removed before the
        // reply goes out, so a client that reads the reply finds nothing of the snapshot.
        drop(writer.staging);
        let _ = writer.reply.send(reply);
        let parent = published.then(|| ParentRef {
            path: std::fs::canonicalize(&target)
                .unwrap_or_else(|_| target.clone())
                .display()
                .to_string(),
            id: Some(writer.id.clone()),
            state_crc: None,
        });
        Settled {
            published: parent,
            dirty: writer.dirty,
        }
    }

    /// What `stats` shows of live snapshots and forks.
    pub fn stats(&self) -> Value {
        json!({
            "forks_made": self.forks_made,
            "forked_children": self.children.iter().map(|c| json!({
                "pid": c.pid,
                "generation": c.plan.generation,
                "api_socket": c.plan.socket,
                "state": c.status.map_or_else(|| "running".to_string(), |s| s.to_string()),
            })).collect::<Vec<_>>(),
            "live_snapshot_in_flight": self.writer.as_ref().map(|w| json!({
                "pid": w.pid,
                "path": w.staging.target(),
                "running_us": w.started.elapsed().as_micros() as u64,
            })),
            "last_live_snapshot": self.last_snapshot,
        })
    }
}

/// Copies the fields of `from` (an object) into `into` (an object).
pub fn merge(into: &mut Value, from: &Value) {
    if let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) {
        for (key, value) in from {
            into.insert(key.clone(), value.clone());
        }
    }
}

/// Removes `dir` if it is a snapshot with id `id`; whether it did.
fn remove_if_ours(dir: &Path, id: &str) -> bool {
    let ours = format::read::<SnapshotState>(&dir.join(STATE_FILE))
        .is_ok_and(|decoded| decoded.value.id.as_deref() == Some(id));
    ours && std::fs::remove_dir_all(dir).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_check_directories_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut ops = LiveOps::default();
        assert!(matches!(
            ops.plan(0, dir.path(), dir.path()),
            Err(ForkError::BadCount(0))
        ));
        assert!(matches!(
            ops.plan(MAX_FORK_COUNT + 1, dir.path(), dir.path()),
            Err(ForkError::BadCount(_))
        ));
        let missing = dir.path().join("missing");
        let err = ops.plan(1, &missing, dir.path()).unwrap_err();
        assert!(err.to_string().contains("--serial-dir"), "{err}");
        let plans = ops.plan(3, dir.path(), dir.path()).unwrap();
        let generations: Vec<u64> = plans.iter().map(|p| p.generation).collect();
        assert_eq!(
            generations,
            (1..=3)
                .map(|n| fork_generation(std::process::id(), n))
                .collect::<Vec<_>>()
        );
        assert!(plans[0]
            .socket
            .ends_with(format!("fork-{:016x}.sock", generations[0])));
        let long = dir.path().join("x".repeat(120));
        std::fs::create_dir(&long).unwrap();
        assert!(matches!(
            ops.plan(1, dir.path(), &long),
            Err(ForkError::SocketPathTooLong(_))
        ));
    }
}
