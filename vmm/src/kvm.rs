//! The KVM system handle: opening `/dev/kvm` with errors that say how to fix access, and the
//! host limits KVM reports.

use std::path::{Path, PathBuf};

use kvm_ioctls::Kvm;

use crate::config::HostLimits;
use crate::memory::host_ram_bytes;

/// The only KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;

/// KVM could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("{0}: no such device — KVM is not available here: load the kvm_intel or kvm_amd module, enable virtualization in the firmware, or pass the device to this container")]
    NotFound(PathBuf),
    #[error(
        "{0}: permission denied — add yourself to the kvm group (then log in again) or run as root"
    )]
    PermissionDenied(PathBuf),
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a KVM device (KVM_GET_API_VERSION returned {version}, expected 12)")]
    NotKvm { path: PathBuf, version: i32 },
}

/// Opens the KVM device at `path` and checks that it speaks the KVM API.
pub fn open_kvm(path: &Path) -> Result<Kvm, KvmError> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| KvmError::NotFound(path.to_owned()))?;
    let kvm = Kvm::new_with_path(c_path).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => KvmError::NotFound(path.to_owned()),
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied(path.to_owned()),
        errno => KvmError::Open {
            path: path.to_owned(),
            source: std::io::Error::from_raw_os_error(errno),
        },
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(KvmError::NotKvm {
            path: path.to_owned(),
            version,
        });
    }
    Ok(kvm)
}

/// What this host and its KVM allow.
pub fn host_limits(kvm: &Kvm) -> HostLimits {
    HostLimits {
        kvm_max_vcpus: u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX),
        host_ram: host_ram_bytes(),
    }
}

/// For KVM tests: `/dev/kvm`, or `None` with a SKIP line when it cannot be used — unless
/// `COWVM_REQUIRE_KVM=1` (set by CI where `/dev/kvm` exists), which turns a skip into a failure.
#[cfg(test)]
pub(crate) fn kvm_for_test(test: &str) -> Option<Kvm> {
    match open_kvm(Path::new("/dev/kvm")) {
        Ok(kvm) => Some(kvm),
        Err(e) if std::env::var_os("COWVM_REQUIRE_KVM").is_some_and(|v| v == "1") => {
            panic!("{test}: COWVM_REQUIRE_KVM=1 but /dev/kvm is not usable: {e}")
        }
        Err(e) => {
            println!("SKIP: {test}: /dev/kvm is not usable: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_says_what_to_do() {
        let err = open_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, KvmError::NotFound(_)));
        assert!(err
            .to_string()
            .contains("load the kvm_intel or kvm_amd module"));
    }

    #[test]
    fn a_file_that_is_not_kvm_is_refused() {
        let err = open_kvm(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, KvmError::NotKvm { version: -1, .. }), "{err}");
    }
}
