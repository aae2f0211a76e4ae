//! `--disk PATH[,readonly][,format=qcow2|raw]`: what a user asks for, parsed like QEMU's
//! `-drive` options (a comma inside PATH is written `,,`).

use std::path::PathBuf;

/// An image format the VMM opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

impl From<qcow::Format> for DiskFormat {
    fn from(format: qcow::Format) -> Self {
        match format {
            qcow::Format::Qcow2 => DiskFormat::Qcow2,
            qcow::Format::Raw => DiskFormat::Raw,
        }
    }
}

/// One `--disk` flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    /// `None`: probed from the file's first bytes, as qemu-img does.
    pub format: Option<DiskFormat>,
}

/// A `--disk` value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskSpecError {
    #[error("--disk needs a file path first (PATH[,readonly][,format=qcow2|raw])")]
    MissingPath,
    #[error("--disk {path}: unknown option `{option}` (known: readonly, format=qcow2|raw)")]
    UnknownOption { path: String, option: String },
    #[error("--disk {path}: format={format} is not supported (qcow2 or raw)")]
    UnknownFormat { path: String, format: String },
}

impl DiskSpec {
    /// Parses `PATH[,readonly][,format=qcow2|raw]`; `,,` stands for a comma in PATH.
    pub fn parse(text: &str) -> Result<Self, DiskSpecError> {
        let mut parts = split_options(text).into_iter();
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or(DiskSpecError::MissingPath)?;
        let mut spec = DiskSpec {
            path: PathBuf::from(&path),
            read_only: false,
            format: None,
        };
        for option in parts {
            match option.split_once('=') {
                None if option == "readonly" => spec.read_only = true,
                Some(("readonly", "on")) => spec.read_only = true,
                Some(("readonly", "off")) => spec.read_only = false,
                Some(("format", "qcow2")) => spec.format = Some(DiskFormat::Qcow2),
                Some(("format", "raw")) => spec.format = Some(DiskFormat::Raw),
                Some(("format", other)) => {
                    return Err(DiskSpecError::UnknownFormat {
                        path,
                        format: other.to_string(),
                    })
                }
                _ => return Err(DiskSpecError::UnknownOption { path, option }),
            }
        }
        Ok(spec)
    }
}

/// Splits on single commas; a doubled comma is a literal one.
fn split_options(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                current.push(',');
            }
            ',' => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_escaped_commas() {
        assert_eq!(
            DiskSpec::parse("/d/a.qcow2").unwrap(),
            DiskSpec {
                path: "/d/a.qcow2".into(),
                read_only: false,
                format: None
            }
        );
        let spec = DiskSpec::parse("x,,y.img,readonly,format=raw").unwrap();
        assert_eq!(spec.path, PathBuf::from("x,y.img"));
        assert!(spec.read_only);
        assert_eq!(spec.format, Some(DiskFormat::Raw));
        assert!(!DiskSpec::parse("a,readonly=off").unwrap().read_only);
    }

    #[test]
    fn bad_options_are_named() {
        assert_eq!(DiskSpec::parse(""), Err(DiskSpecError::MissingPath));
        assert_eq!(
            DiskSpec::parse(",readonly"),
            Err(DiskSpecError::MissingPath)
        );
        assert_eq!(
            DiskSpec::parse("a,cache=none").unwrap_err().to_string(),
            "--disk a: unknown option `cache=none` (known: readonly, format=qcow2|raw)"
        );
        assert_eq!(
            DiskSpec::parse("a,format=vmdk"),
            Err(DiskSpecError::UnknownFormat {
                path: "a".into(),
                format: "vmdk".into()
            })
        );
    }
}
