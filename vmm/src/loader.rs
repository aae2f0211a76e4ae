//! Puts a guest image into RAM: the embedded tiny guest, a flat image at 1 MiB, or the PT_LOAD
//! segments of a 64-bit ELF.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use cowvm_guest_abi::layout::{GUEST_IMAGE_ADDR, GUEST_IMAGE_MAX, STACKS_START};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// The tiny guest, built by `build.rs` from `guest/kernel`.
pub static BUILT_IN_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// The guest image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read guest image {path}: {source}")]
    ReadImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest image {path} is empty")]
    EmptyImage { path: PathBuf },
    #[error("guest image {path} is {len} bytes; a flat image loads at 1 MiB and may be at most {max} bytes")]
    FlatImageTooLarge { path: PathBuf, len: usize, max: u64 },
    #[error("guest image {path} is not a loadable 64-bit ELF: {reason}")]
    MalformedElf { path: PathBuf, reason: String },
    #[error(
        "guest image {path}: its segments end at {end:#x}, past the image area ending at {max:#x}"
    )]
    ElfTooLarge { path: PathBuf, end: u64, max: u64 },
    #[error("cannot copy the guest image into RAM: {0}")]
    WriteGuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Where execution starts.
pub type EntryPoint = u64;

/// Loads the built-in guest.
pub fn load_built_in(memory: &GuestMemory) -> Result<EntryPoint, LoadError> {
    load_flat(memory, Path::new("<built-in>"), BUILT_IN_GUEST)
}

/// Loads a user-supplied guest file: ELF if it starts with the ELF magic, flat otherwise.
pub fn load_file(memory: &GuestMemory, path: &Path) -> Result<EntryPoint, LoadError> {
    let image = std::fs::read(path).map_err(|source| LoadError::ReadImage {
        path: path.to_owned(),
        source,
    })?;
    if image.starts_with(ELF_MAGIC) {
        load_elf(memory, path, &image)
    } else {
        load_flat(memory, path, &image)
    }
}

fn load_flat(memory: &GuestMemory, path: &Path, image: &[u8]) -> Result<EntryPoint, LoadError> {
    if image.is_empty() {
        return Err(LoadError::EmptyImage {
            path: path.to_owned(),
        });
    }
    if image.len() as u64 > GUEST_IMAGE_MAX {
        return Err(LoadError::FlatImageTooLarge {
            path: path.to_owned(),
            len: image.len(),
            max: GUEST_IMAGE_MAX,
        });
    }
    memory
        .write_slice(image, GuestAddress(GUEST_IMAGE_ADDR))
        .map_err(LoadError::WriteGuestMemory)?;
    Ok(GUEST_IMAGE_ADDR)
}

fn load_elf(memory: &GuestMemory, path: &Path, image: &[u8]) -> Result<EntryPoint, LoadError> {
    let malformed = |reason: String| LoadError::MalformedElf {
        path: path.to_owned(),
        reason,
    };
    // linux-loader checks the magic and byte order but not the class or machine.
    match (image.get(4), image.get(18..20)) {
        (Some(2), Some([0x3e, 0])) => {}
        (Some(2), Some(machine)) => {
            return Err(malformed(format!(
                "machine {:#x} is not x86-64 (0x3e)",
                u16::from_le_bytes([machine[0], machine[1]])
            )))
        }
        (Some(class), _) if *class != 2 => {
            return Err(malformed(format!(
                "ELF class {class} is not ELFCLASS64 (2)"
            )))
        }
        _ => return Err(malformed("Unable to read elf header".into())),
    }
    let loaded = Elf::load(
        memory,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(GUEST_IMAGE_ADDR)),
    )
    .map_err(|e| {
        // linux-loader nests "Kernel Loader: …: Kernel Loader: <cause>"; the cause is the news.
        let text = e.to_string();
        malformed(text.rsplit(": ").next().unwrap_or(&text).to_string())
    })?;
    if loaded.kernel_end > STACKS_START {
        return Err(LoadError::ElfTooLarge {
            path: path.to_owned(),
            end: loaded.kernel_end,
            max: STACKS_START,
        });
    }
    if loaded.kernel_end == 0 {
        return Err(malformed("it has no PT_LOAD segment with contents".into()));
    }
    Ok(loaded.kernel_load.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn built_in_guest_loads_at_1_mib() {
        let memory = create_guest_memory(8 << 20).unwrap();
        assert_eq!(load_built_in(&memory).unwrap(), GUEST_IMAGE_ADDR);
        let mut first = [0u8; 16];
        memory
            .read_slice(&mut first, GuestAddress(GUEST_IMAGE_ADDR))
            .unwrap();
        assert_eq!(&first[..], &BUILT_IN_GUEST[..16]);
    }

    #[test]
    fn bad_flat_images_are_refused() {
        let memory = create_guest_memory(8 << 20).unwrap();
        let path = Path::new("g");
        assert!(matches!(
            load_flat(&memory, path, &[]),
            Err(LoadError::EmptyImage { .. })
        ));
        let big = vec![0x90; GUEST_IMAGE_MAX as usize + 1];
        assert!(matches!(
            load_flat(&memory, path, &big),
            Err(LoadError::FlatImageTooLarge { .. })
        ));
    }

    #[test]
    fn truncated_elf_is_malformed() {
        let memory = create_guest_memory(8 << 20).unwrap();
        let err = load_elf(&memory, Path::new("g.elf"), b"\x7fELF\x02\x01").unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest image g.elf is not a loadable 64-bit ELF: Unable to read elf header"
        );
    }
}
