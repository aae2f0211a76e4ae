//! Backing files: resolving their names and opening them (qcow2 or raw, read-only, bounded depth)
//! as a [`Disk`].

use std::path::{Path, PathBuf};

pub use crate::disk::Backing;
use crate::disk::{Disk, Format, RawDisk};
use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};

/// Deepest backing chain followed unless [`OpenOptions::max_backing_depth`] says otherwise.
pub const MAX_BACKING_DEPTH: usize = 16;

/// Resolves a backing file name against the directory of the image that names it.
pub fn resolve_backing_path(image_path: Option<&Path>, name: &str) -> PathBuf {
    let name_path = Path::new(name);
    if name_path.is_absolute() {
        return name_path.to_path_buf();
    }
    match image_path.and_then(|p| p.parent()) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name_path),
        _ => name_path.to_path_buf(),
    }
}

/// Opens a backing image read-only; `format` `None` probes the magic.
pub fn open_backing(path: &Path, format: Option<&str>, depth: usize) -> Result<Backing> {
    open_backing_with(path, format, depth, &OpenOptions::default())
}

/// Like [`open_backing`], with the cache mode (`sync`, `direct`) and cache sizes of the image
/// above it.
pub fn open_backing_with(
    path: &Path,
    format: Option<&str>,
    depth: usize,
    parent: &OpenOptions,
) -> Result<Backing> {
    let wrap = |source: Error| Error::OpenBacking {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    if depth >= parent.max_backing_depth {
        return Err(Error::BackingChainTooDeep(parent.max_backing_depth));
    }
    let options = OpenOptions {
        read_only: true,
        check_mode: false,
        no_backing: false,
        data_file: None,
        open_data_file: true,
        ..parent.clone()
    };
    let format = match format {
        Some(name) => Some(name.parse::<Format>().map_err(wrap)?),
        None => None,
    };
    let format = match format {
        Some(format) => format,
        None => Format::probe(path).map_err(wrap)?,
    };
    match format {
        Format::Raw => Ok(Disk::Raw(RawDisk::open(path, &options).map_err(wrap)?)),
        Format::Qcow2 => {
            let image = Image::open_depth(path, &options, depth + 1).map_err(wrap)?;
            Ok(Disk::Qcow2(Box::new(image)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create, CreateOptions};

    #[test]
    fn the_depth_limit_comes_from_the_open_options() {
        let dir = std::env::temp_dir().join(format!("qcow-depth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // base <- mid <- top: two images below the top.
        let mut below: Option<String> = None;
        for name in ["base", "mid", "top"] {
            let options = CreateOptions {
                size: 1 << 20,
                backing_file: below.clone(),
                backing_format: below.as_ref().map(|_| "qcow2".to_string()),
                ..CreateOptions::default()
            };
            create(&dir.join(name), &options).unwrap();
            below = Some(name.to_string());
        }
        let open = |max_backing_depth| {
            let options = OpenOptions {
                read_only: true,
                max_backing_depth,
                ..OpenOptions::default()
            };
            Image::open(dir.join("top"), &options).map(|_| ())
        };
        assert!(open(2).is_ok());
        let err = open(1).unwrap_err();
        assert!(
            err.to_string().contains("deeper than 1 images")
                || format!("{err:?}").contains("BackingChainTooDeep(1)"),
            "{err:?}"
        );
        assert!(open(MAX_BACKING_DEPTH).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
