//! The words qemu-img uses for each error: the one place that turns the library's typed errors
//! into the text a script sees from qemu-img (for a failed open, the part after
//! `Could not open 'NAME': `).

use super::{strerror, Error, HeaderProblem, SnapshotTableProblem};

impl Error {
    /// What qemu-img prints for this error. Errors qemu-img has no wording for keep this crate's
    /// own message.
    pub fn qemu_text(&self) -> String {
        match self {
            Error::OpenFile { path, source } | Error::OpenDataFile { path, source } => {
                format!("Could not open '{}': {}", path.display(), strerror(source))
            }
            Error::OpenBacking { path, source } => backing_text(path, source),
            Error::DataFileRequired => "'data-file' is required for this image".into(),
            Error::DataFileNotExternal => {
                "'data-file' can only be set for images with an external data file".into()
            }
            Error::DataFileRawWithoutDataFile => "data-file-raw requires a data file".into(),
            Error::NotWithDataFile(_) => "Operation not supported".into(),
            Error::BadMagic(_) => "Image is not in qcow2 format".into(),
            Error::UnsupportedVersion(version) => format!("Unsupported qcow2 version {version}"),
            Error::InvalidClusterBits(bits) => format!("Unsupported cluster size: 2^{bits}"),
            Error::CorruptImage => "qcow2: Image is corrupt; cannot be opened read/write".into(),
            Error::InvalidRefcountOrder(_) => {
                "Reference count entry width too large; may not exceed 64 bits".into()
            }
            Error::RefcountTableTooLarge(_) => "Reference count table too large".into(),
            Error::L1TableTooLarge(_) => "Active L1 table too large".into(),
            Error::L1TableTooSmall { .. } => "L1 table is too small".into(),
            // QEMU checks alignment and range; a table past the end of the file is this crate's
            // own (stricter) refusal and keeps its explanation.
            Error::InvalidTableOffset { what, why, .. } if *why != "past the end of the file" => {
                match *what {
                    "refcount table" => "Reference count table offset invalid".into(),
                    "L1 table" => "Active L1 table offset invalid".into(),
                    "snapshot table" => "Snapshot table offset invalid".into(),
                    _ => self.to_string(),
                }
            }
            Error::TooManySnapshots(_) => "Snapshot table too large".into(),
            Error::BackingNameTooLong(_) => "Backing file name too long".into(),
            Error::HeaderExtensionTooLarge { .. } => "Header extension too large".into(),
            Error::InvalidHeader(problem) => header_problem_text(problem),
            Error::InvalidSnapshotTable(problem) => snapshot_problem_text(problem),
            Error::BackingChainTooDeep(_) => "Backing file chain is too deep (or loops)".into(),
            other => other.to_string(),
        }
    }
}

/// A backing file that failed to open: the file that failed is named once, however deep in the
/// chain it is.
fn backing_text(path: &std::path::Path, source: &Error) -> String {
    let (mut path, mut inner) = (path, source);
    while let Error::OpenBacking {
        path: deeper,
        source,
    } = inner
    {
        path = deeper;
        inner = source.as_ref();
    }
    match inner {
        Error::OpenFile { source: io, .. } => format!(
            "Could not open backing file: Could not open '{}': {}",
            path.display(),
            strerror(io)
        ),
        other => format!("Could not open backing file: {}", other.qemu_text()),
    }
}

fn header_problem_text(problem: &HeaderProblem) -> String {
    match problem {
        HeaderProblem::FileTooShort(_)
        | HeaderProblem::ShorterThanV2Header
        | HeaderProblem::ShorterThanV3Header
        | HeaderProblem::HeaderLengthTooShort(_) => "qcow2 header too short".into(),
        HeaderProblem::HeaderLengthExceedsCluster { .. } | HeaderProblem::HeaderLengthPastEnd => {
            "qcow2 header exceeds cluster size".into()
        }
        HeaderProblem::UnknownCompressionType(kind) => {
            format!("qcow2: unknown compression type: {kind}")
        }
        HeaderProblem::BackingOffsetOutsideCluster(_) | HeaderProblem::BackingNamePastEnd => {
            "Invalid backing file offset".into()
        }
        HeaderProblem::Encrypted(2) => {
            "LUKS-encrypted images are not supported by this tool (encryption is out of scope)"
                .into()
        }
        HeaderProblem::Encrypted(1) => {
            "AES-encrypted images are not supported by this tool (encryption is out of scope)"
                .into()
        }
        HeaderProblem::Encrypted(method) => format!("Unsupported encryption method {method}"),
        HeaderProblem::RefcountTableEmpty => {
            "Image does not contain a reference count table".into()
        }
        HeaderProblem::SizeTooBig { size, cluster_size } => {
            // QEMU rounds the size up to whole L2 ranges first (which can wrap), then refuses
            // more than INT_MAX L1 entries; below that the L1 table is simply too small.
            let l2_bits = cluster_size.trailing_zeros() * 2 - 3;
            match size.checked_add((1u64 << l2_bits) - 1) {
                None => "Could not refresh total sector count: File too large".into(),
                Some(end) if end >> l2_bits > i32::MAX as u64 => "Image is too big".into(),
                Some(_) => "L1 table is too small".into(),
            }
        }
        other => other.to_string(),
    }
}

fn snapshot_problem_text(problem: &SnapshotTableProblem) -> String {
    match problem {
        SnapshotTableProblem::TableTooLarge { .. } => "Snapshot table too large".into(),
        other => format!("Failed to read snapshot table: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn open_failures_read_like_qemu() {
        let missing = || std::io::Error::from_raw_os_error(2);
        let data = Error::OpenDataFile {
            path: PathBuf::from("d.raw"),
            source: missing(),
        };
        assert_eq!(
            data.qemu_text(),
            "Could not open 'd.raw': No such file or directory"
        );
        let nested = Error::OpenBacking {
            path: PathBuf::from("mid"),
            source: Box::new(Error::OpenBacking {
                path: PathBuf::from("base"),
                source: Box::new(Error::OpenFile {
                    path: PathBuf::from("base"),
                    source: missing(),
                }),
            }),
        };
        assert_eq!(
            nested.qemu_text(),
            "Could not open backing file: Could not open 'base': No such file or directory"
        );
        assert_eq!(
            Error::DataFileRequired.qemu_text(),
            "'data-file' is required for this image"
        );
        assert_eq!(
            Error::BadMagic(0).qemu_text(),
            "Image is not in qcow2 format"
        );
    }
}
