//! cowvm: a small KVM virtual machine monitor built around copy-on-write.
//!
//! Data flows one way: CLI → [`config::VmConfig`] → [`builder::build`] → vCPU threads ⇄
//! [`devices::Bus`] ⇄ devices.

pub mod accounting;
pub mod api;
pub mod boot;
pub mod builder;
pub mod clone;
pub mod config;
pub mod devices;
pub mod dirty;
pub mod disk;
pub mod fork;
pub mod kvm;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
