//! Opening disks for the commands: format names from the command line, probing, cache modes. The
//! raw-versus-qcow2 dispatch itself is the library's `qcow::Disk`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use qcow::{Disk, Format, OpenOptions};

/// qemu-img's `-t` cache modes, as open options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheMode {
    /// Flushes reach the disk (all but `unsafe`).
    pub sync: bool,
    /// `O_DIRECT` (`none` and `directsync`).
    pub direct: bool,
    /// Every write is followed by a flush (`writethrough` and `directsync`).
    pub flush_each_write: bool,
}

impl CacheMode {
    /// Parses `none`, `writeback`, `writethrough`, `directsync` or `unsafe`.
    pub fn parse(text: &str) -> Result<CacheMode> {
        let (sync, direct, flush_each_write) = match text {
            "none" | "off" => (true, true, false),
            "writeback" => (true, false, false),
            "writethrough" => (true, false, true),
            "directsync" => (true, true, true),
            "unsafe" => (false, false, false),
            other => bail!(
                "Invalid cache option: {other} (none, writeback, writethrough, directsync, unsafe)"
            ),
        };
        Ok(CacheMode {
            sync,
            direct,
            flush_each_write,
        })
    }

    /// Open options for this cache mode.
    pub fn open_options(self, read_only: bool) -> OpenOptions {
        OpenOptions {
            read_only,
            sync: self.sync,
            direct: self.direct,
            ..OpenOptions::default()
        }
    }
}

impl Default for CacheMode {
    fn default() -> Self {
        CacheMode {
            sync: true,
            direct: false,
            flush_each_write: false,
        }
    }
}

/// A `-f`/`-F`/`-O` argument as a format (`None` = probe).
pub fn parse_format(format: Option<&str>) -> Result<Option<Format>> {
    format
        .map(|name| name.parse::<Format>())
        .transpose()
        .map_err(anyhow::Error::from)
}

/// Opens `path` as `format` (`None` probes the qcow2 magic).
pub fn open_disk(path: &Path, format: Option<&str>, options: &OpenOptions) -> Result<Disk> {
    let format = parse_format(format).with_context(|| path.display().to_string())?;
    Disk::open(path, format, options).with_context(|| path.display().to_string())
}
