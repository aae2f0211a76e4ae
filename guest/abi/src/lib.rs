//! The contract between cowvm and its tiny guest: memory map, ports, boot-info layout, the guest's
//! argument string and its deterministic workload.
//!
//! Both the guest (built `no_std` for the host target) and the host compile this crate, so the
//! host can compute the digest an uninterrupted guest run prints without running a VM: that
//! digest is the oracle of every boot, snapshot, restore and clone test.
#![no_std]

pub mod args;
pub mod boot_info;
pub mod disk;
pub mod layout;
pub mod workload;

pub use args::{ArgError, WorkloadArgs};
pub use boot_info::BootInfo;
