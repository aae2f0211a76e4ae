//! What a user asks for (`cowvm run` flags) and the checks that run before any KVM object exists.

use std::path::PathBuf;

use cowvm_guest_abi::layout::{
    max_workload_pages, DISK_AREA_PAGES, MAX_DEVICES, MAX_VCPUS, MIN_RAM, PAGE_SIZE,
};
use cowvm_guest_abi::WorkloadArgs;

use crate::disk::DiskSpec;

/// Default guest RAM.
pub const DEFAULT_MEM_SIZE: u64 = 64 << 20;

/// Which guest to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestImage {
    /// The tiny guest embedded in the `cowvm` binary.
    BuiltIn,
    /// A 64-bit ELF (PT_LOAD segments) or a flat image loaded at 1 MiB.
    File(PathBuf),
}

/// Where the guest's serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    Stdout,
    File(PathBuf),
}

/// A VM to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub mem_size: u64,
    pub vcpus: u32,
    pub args: String,
    pub guest: GuestImage,
    pub serial: SerialOutput,
    pub kvm_device: PathBuf,
    /// `--disk` flags, in order: disk `i` is virtio-mmio device `i`.
    pub disks: Vec<DiskSpec>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_size: DEFAULT_MEM_SIZE,
            vcpus: 1,
            args: String::new(),
            guest: GuestImage::BuiltIn,
            serial: SerialOutput::Stdout,
            kvm_device: PathBuf::from("/dev/kvm"),
            disks: Vec::new(),
        }
    }
}

/// What the host allows, read once at start.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    /// `KVM_CAP_MAX_VCPUS`.
    pub kvm_max_vcpus: u32,
    /// Physical RAM of the host in bytes.
    pub host_ram: u64,
}

/// A flag value that cannot work, found before anything is built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--mem 0: guest RAM size must be positive")]
    ZeroMemory,
    #[error("--mem {0}: guest RAM size must be a multiple of 4 KiB (the page size)")]
    UnalignedMemory(u64),
    #[error("--mem {size}: too small, the guest needs at least {min} bytes (4 MiB + 4 KiB)")]
    MemoryTooSmall { size: u64, min: u64 },
    #[error("--mem {size}: more than this host's {host} bytes of RAM; choose a smaller size")]
    MemoryTooLarge { size: u64, host: u64 },
    #[error("--vcpus 0: a VM needs at least one vCPU")]
    ZeroVcpus,
    #[error("--vcpus {requested}: at most {max} vCPUs (KVM allows {kvm}, the guest memory map has stacks for {abi})")]
    TooManyVcpus {
        requested: u32,
        max: u32,
        kvm: u32,
        abi: u32,
    },
    #[error(
        "--vcpus {requested}: at most {abi} vCPUs (the guest memory map has stacks for {abi})"
    )]
    TooManyVcpusForAbi { requested: u32, abi: u32 },
    #[error("--args: {0}")]
    BadGuestArgs(String),
    #[error("--args pages={pages}: {mem_size} bytes of RAM hold at most {max} workload pages; raise --mem or lower pages")]
    TooManyPages { pages: u64, max: u64, mem_size: u64 },
    #[error("--args is {len} bytes long; the boot-info page holds at most {max}")]
    ArgsTooLong { len: usize, max: usize },
    #[error("--disk given {count} times; the guest's boot-info page lists at most {max} devices")]
    TooManyDisks { count: usize, max: usize },
    #[error("--args {arg}: the guest's disk workload needs a disk; add --disk PATH")]
    DiskWorkloadWithoutDisk { arg: &'static str },
    #[error("--args pages={pages} with the disk workload: {mem_size} bytes of RAM hold at most {max} workload pages besides the disk driver's {DISK_AREA_PAGES}; raise --mem or lower pages")]
    NoRoomForDiskArea { pages: u64, max: u64, mem_size: u64 },
}

impl VmConfig {
    /// Checks every flag against the host and the guest ABI. Returns the built-in guest's
    /// parsed workload arguments (`None` for a user-supplied guest, whose arguments are its own).
    pub fn validate(&self, limits: &HostLimits) -> Result<Option<WorkloadArgs>, ConfigError> {
        let args = self.validate_flags(limits.host_ram)?;
        self.validate_kvm(limits.kvm_max_vcpus)?;
        Ok(args)
    }

    /// The checks that need no KVM: they run before `/dev/kvm` is opened, so a bad flag is
    /// reported as such even on a host without KVM.
    pub fn validate_flags(&self, host_ram: u64) -> Result<Option<WorkloadArgs>, ConfigError> {
        let size = self.mem_size;
        if size == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        if size % PAGE_SIZE != 0 {
            return Err(ConfigError::UnalignedMemory(size));
        }
        if size < MIN_RAM {
            return Err(ConfigError::MemoryTooSmall { size, min: MIN_RAM });
        }
        if size > host_ram {
            return Err(ConfigError::MemoryTooLarge {
                size,
                host: host_ram,
            });
        }
        if self.vcpus == 0 {
            return Err(ConfigError::ZeroVcpus);
        }
        if self.vcpus > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpusForAbi {
                requested: self.vcpus,
                abi: MAX_VCPUS,
            });
        }
        if self.disks.len() > MAX_DEVICES {
            return Err(ConfigError::TooManyDisks {
                count: self.disks.len(),
                max: MAX_DEVICES,
            });
        }
        let max_len = cowvm_guest_abi::boot_info::MAX_ARGS_LEN;
        if self.args.len() > max_len {
            return Err(ConfigError::ArgsTooLong {
                len: self.args.len(),
                max: max_len,
            });
        }
        if self.guest != GuestImage::BuiltIn {
            return Ok(None);
        }
        let args = WorkloadArgs::parse(&self.args)
            .map_err(|e| ConfigError::BadGuestArgs(e.to_string()))?;
        let max = max_workload_pages(size);
        if args.pages > max {
            return Err(ConfigError::TooManyPages {
                pages: args.pages,
                max,
                mem_size: size,
            });
        }
        if args.uses_disk() {
            if self.disks.is_empty() {
                let arg = if args.disk { "disk=1" } else { "disk_bench" };
                return Err(ConfigError::DiskWorkloadWithoutDisk { arg });
            }
            if args.pages + DISK_AREA_PAGES > max {
                return Err(ConfigError::NoRoomForDiskArea {
                    pages: args.pages,
                    max: max.saturating_sub(DISK_AREA_PAGES),
                    mem_size: size,
                });
            }
        }
        Ok(Some(args))
    }

    /// The vCPU count against what this host's KVM allows.
    pub fn validate_kvm(&self, kvm_max_vcpus: u32) -> Result<(), ConfigError> {
        let max = kvm_max_vcpus.min(MAX_VCPUS);
        if self.vcpus > max {
            return Err(ConfigError::TooManyVcpus {
                requested: self.vcpus,
                max,
                kvm: kvm_max_vcpus,
                abi: MAX_VCPUS,
            });
        }
        Ok(())
    }
}

/// Parses a size the way qemu-img does (`4096`, `64M`, `1G`, `1.5G`; binary K/M/G/T/P/E
/// suffixes): one size syntax for every cowvm and qcow flag.
pub fn parse_size(text: &str) -> Result<u64, String> {
    qcow::parse_size(text)
        .map_err(|_| format!("`{}` is not a size (examples: 4096, 64M, 1G)", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HostLimits = HostLimits {
        kvm_max_vcpus: 255,
        host_ram: 16 << 30,
    };

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size("8k"), Ok(8192));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(
            parse_size("12Q"),
            Err("`12Q` is not a size (examples: 4096, 64M, 1G)".into())
        );
        assert!(parse_size("99999999999T").is_err(), "overflow");
    }

    #[test]
    fn memory_checks_name_the_problem() {
        let check = |mem_size| {
            VmConfig {
                mem_size,
                ..VmConfig::default()
            }
            .validate(&LIMITS)
        };
        assert_eq!(check(0), Err(ConfigError::ZeroMemory));
        assert_eq!(check(1000), Err(ConfigError::UnalignedMemory(1000)));
        assert_eq!(
            check(1 << 20),
            Err(ConfigError::MemoryTooSmall {
                size: 1 << 20,
                min: MIN_RAM
            })
        );
        assert_eq!(
            check(32 << 30),
            Err(ConfigError::MemoryTooLarge {
                size: 32 << 30,
                host: 16 << 30
            })
        );
        assert_eq!(check(64 << 20), Ok(Some(WorkloadArgs::default())));
    }

    #[test]
    fn vcpu_and_argument_checks() {
        let config = |vcpus, args: &str| VmConfig {
            vcpus,
            args: args.into(),
            ..VmConfig::default()
        };
        assert_eq!(config(0, "").validate(&LIMITS), Err(ConfigError::ZeroVcpus));
        assert_eq!(
            config(129, "").validate_flags(LIMITS.host_ram),
            Err(ConfigError::TooManyVcpusForAbi {
                requested: 129,
                abi: 128
            })
        );
        let small_kvm = HostLimits {
            kvm_max_vcpus: 8,
            ..LIMITS
        };
        assert!(matches!(
            config(9, "").validate(&small_kvm),
            Err(ConfigError::TooManyVcpus { max: 8, .. })
        ));
        assert_eq!(
            config(1, "color=red").validate(&LIMITS),
            Err(ConfigError::BadGuestArgs(
                "unknown guest argument `color` (known: pages, rounds, seed, write, gen_rounds, gen_write, wait, disk, disk_blocks, disk_batch, disk_bench)".into()
            ))
        );
        assert!(matches!(
            config(1, "pages=1000000").validate(&LIMITS),
            Err(ConfigError::TooManyPages {
                pages: 1_000_000,
                max: 15360,
                ..
            })
        ));
        let custom = VmConfig {
            guest: GuestImage::File("x".into()),
            ..config(1, "anything")
        };
        assert_eq!(custom.validate(&LIMITS), Ok(None));
        assert_eq!(
            config(1, "disk=1").validate(&LIMITS),
            Err(ConfigError::DiskWorkloadWithoutDisk { arg: "disk=1" })
        );
        let with_disk = |args: &str| VmConfig {
            disks: vec![DiskSpec::parse("d.qcow2").unwrap()],
            ..config(1, args)
        };
        assert!(with_disk("disk=1").validate(&LIMITS).is_ok());
        assert!(matches!(
            with_disk("disk=1 pages=15300").validate(&LIMITS),
            Err(ConfigError::NoRoomForDiskArea { max: 15224, .. })
        ));
        let nine = VmConfig {
            disks: vec![DiskSpec::parse("d").unwrap(); 9],
            ..config(1, "")
        };
        assert_eq!(
            nine.validate(&LIMITS),
            Err(ConfigError::TooManyDisks { count: 9, max: 8 })
        );
    }
}
