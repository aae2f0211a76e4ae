//! The control socket: one JSON request per line on a Unix socket, one JSON reply per line.
//!
//! Requests (`cmd` tag): `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"stats"}`,
//! `{"cmd":"shutdown"}`, `{"cmd":"snapshot","path":"DIR","kind":"full"|"diff","live":false|true}`,
//! `{"cmd":"fork","count":N,"serial_dir":"DIR","socket_dir":"DIR"}`.
//! Replies: `{"ok":true, …}` or `{"ok":false,"error":"…"}`. The server thread only parses and
//! forwards: every request is carried out by the VMM thread's event loop.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::{renameat_with, RenameFlags, CWD};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::machine::VmEvent;
use crate::snapshot::state::SnapshotKind;

/// A control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum ApiRequest {
    Pause,
    Resume,
    Stats,
    Shutdown,
    Snapshot {
        path: String,
        #[serde(default = "full")]
        kind: SnapshotKind,
        /// Written by a forked child from its copy-on-write view while the guest runs on.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        live: bool,
    },
    /// Fork the running VM into `count` more running VMs (see `fork.rs`).
    Fork {
        #[serde(default = "one")]
        count: u32,
        /// Where each child's serial output file goes.
        serial_dir: String,
        /// Where each child's control socket goes.
        socket_dir: String,
    },
}

fn full() -> SnapshotKind {
    SnapshotKind::Full
}

fn one() -> u32 {
    1
}

/// The socket could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("another VM is already serving the API socket {0}; choose another path")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    #[error("cannot serve the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no VM is serving {path} (it has exited or was never started): {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM at {path} closed the connection without a reply (it may have exited)")]
    NoReply { path: PathBuf },
    #[error("talking to the VM at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM at {path} sent a reply that is not JSON: {source}")]
    BadReply {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Refused(String),
}

/// A bound socket; the file is removed when this is dropped.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// Requests forwarded to the VMM whose replies are not written back yet.
    in_flight: Arc<AtomicUsize>,
}

/// How long a closing server waits for replies still being written.
const REPLY_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // The VMM may exit right after answering (a shutdown); give the connection threads time
        // to write what it answered, so the client gets a reply rather than a closed socket.
        let deadline = Instant::now() + REPLY_DRAIN_TIMEOUT;
        while self.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Binds `path` (mode 0600) and serves it on a thread that forwards requests to `events`.
pub fn serve(path: &Path, events: Sender<VmEvent>) -> Result<ApiServer, ApiError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_owned()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_owned()));
        }
        // A socket nobody listens on: left by a VM that was killed.
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| ApiError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = bind_listening(path).map_err(bind_err)?;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let counter = in_flight.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let events = events.clone();
                let counter = counter.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || serve_connection(stream, &events, &counter));
            }
        })
        .map_err(bind_err)?;
    Ok(ApiServer {
        path: path.to_owned(),
        in_flight,
    })
}

/// A listening socket at `path`, mode 0600. Ordering: it is bound and set listening under a
/// temporary name beside `path`, given its mode, and only then renamed to `path` (refusing to
/// replace a socket another VMM put there meanwhile), so a client that sees `path` can connect at
/// once and nobody ever sees it with the default mode. A path too long to take the temporary
/// suffix (the 108-byte limit) is bound in place.
fn bind_listening(path: &Path) -> std::io::Result<UnixListener> {
    let mut staged = path.as_os_str().to_owned();
    staged.push(format!(".{}~", std::process::id()));
    let staged = PathBuf::from(staged);
    let listener = match UnixListener::bind(&staged) {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            let listener = UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            return Ok(listener);
        }
        Err(e) => return Err(e),
    };
    let published = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| {
            renameat_with(CWD, &staged, CWD, path, RenameFlags::NOREPLACE).map_err(Into::into)
        });
    if let Err(e) = published {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    Ok(listener)
}

fn serve_connection(stream: UnixStream, events: &Sender<VmEvent>, in_flight: &AtomicUsize) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else {
            return;
        };
        if line.trim().is_empty() {
            continue;
        }
        // Ordering: counted before the VMM can see the request, uncounted after the reply is
        // written, so a server dropped once the VMM answered waits for the write.
        in_flight.fetch_add(1, Ordering::AcqRel);
        let reply = match serde_json::from_str::<ApiRequest>(&line) {
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
            Ok(request) => {
                let (reply_tx, reply_rx) = mpsc::channel();
                if events.send(VmEvent::Api(request, reply_tx)).is_err() {
                    json!({"ok": false, "error": "the VM is shutting down"})
                } else {
                    reply_rx
                        .recv()
                        .unwrap_or_else(|_| json!({"ok": false, "error": "the VM stopped"}))
                }
            }
        };
        let written = writeln!(writer, "{reply}");
        in_flight.fetch_sub(1, Ordering::AcqRel);
        if written.is_err() {
            return;
        }
    }
}

/// Sends one request to the VM at `path` and returns its reply (an `ok: false` reply becomes
/// [`ApiError::Refused`]).
pub fn request(path: &Path, request: &ApiRequest) -> Result<Value, ApiError> {
    let io_err = |source| ApiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let line = serde_json::to_string(request).map_err(|e| ApiError::Refused(e.to_string()))?;
    writeln!(stream, "{line}").map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io_err)?;
    if reply.is_empty() {
        return Err(ApiError::NoReply {
            path: path.to_owned(),
        });
    }
    let value: Value = serde_json::from_str(&reply).map_err(|source| ApiError::BadReply {
        path: path.to_owned(),
        source,
    })?;
    if value["ok"] == Value::Bool(true) {
        Ok(value)
    } else {
        Err(ApiError::Refused(
            value["error"]
                .as_str()
                .unwrap_or("request refused")
                .to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_appears_listening_with_mode_0600_and_never_replaces_another() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let _listener = bind_listening(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        UnixStream::connect(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary name left behind");
        // Another VMM that got there first keeps its socket.
        let error = bind_listening(&path).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        UnixStream::connect(&path).unwrap();
        // A path with no room for the temporary suffix is bound in place.
        let long = dir
            .path()
            .join("s".repeat(107 - dir.path().as_os_str().len() - 1));
        assert_eq!(
            long.as_os_str().len(),
            107,
            "the longest path a socket can have"
        );
        let _long = bind_listening(&long).unwrap();
        UnixStream::connect(&long).unwrap();
    }

    #[test]
    fn requests_use_the_documented_json() {
        let snapshot: ApiRequest =
            serde_json::from_str(r#"{"cmd":"snapshot","path":"/s"}"#).unwrap();
        assert_eq!(
            snapshot,
            ApiRequest::Snapshot {
                path: "/s".into(),
                kind: SnapshotKind::Full,
                live: false,
            }
        );
        let diff: ApiRequest =
            serde_json::from_str(r#"{"cmd":"snapshot","path":"/s","kind":"diff"}"#).unwrap();
        assert_eq!(
            diff,
            ApiRequest::Snapshot {
                path: "/s".into(),
                kind: SnapshotKind::Diff,
                live: false,
            }
        );
        let live: ApiRequest =
            serde_json::from_str(r#"{"cmd":"snapshot","path":"/s","kind":"diff","live":true}"#)
                .unwrap();
        assert_eq!(
            serde_json::to_string(&live).unwrap(),
            r#"{"cmd":"snapshot","path":"/s","kind":"diff","live":true}"#
        );
        assert_eq!(
            serde_json::to_string(&diff).unwrap(),
            r#"{"cmd":"snapshot","path":"/s","kind":"diff"}"#,
            "a stop-and-copy request reads as before"
        );
        let fork: ApiRequest =
            serde_json::from_str(r#"{"cmd":"fork","serial_dir":"/a","socket_dir":"/b"}"#).unwrap();
        assert_eq!(
            fork,
            ApiRequest::Fork {
                count: 1,
                serial_dir: "/a".into(),
                socket_dir: "/b".into()
            }
        );
        assert_eq!(
            serde_json::to_string(&ApiRequest::Pause).unwrap(),
            r#"{"cmd":"pause"}"#
        );
        assert!(serde_json::from_str::<ApiRequest>(r#"{"cmd":"reboot"}"#).is_err());
    }

    #[test]
    fn socket_round_trip_mode_and_second_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (tx, rx) = mpsc::channel();
        let server = serve(&path, tx.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(serve(&path, tx), Err(ApiError::InUse(_))));
        let vmm = std::thread::spawn(move || {
            if let Ok(VmEvent::Api(ApiRequest::Stats, reply)) = rx.recv() {
                let _ = reply.send(json!({"ok": true, "state": "running"}));
            }
        });
        let reply = request(&path, &ApiRequest::Stats).unwrap();
        assert_eq!(reply["state"], "running");
        vmm.join().unwrap();
        drop(server);
        assert!(!path.exists(), "socket removed on drop");
        assert!(matches!(
            request(&path, &ApiRequest::Stats),
            Err(ApiError::Connect { .. })
        ));
    }
}
