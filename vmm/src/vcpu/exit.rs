//! Turning one KVM exit into bus accesses or an action for the run loop. Pure: unit tests call
//! [`handle_exit`] with synthetic exits.

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuExit;

use crate::devices::{Bus, VcpuAction};

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    Halt,
    Shutdown,
    Unexpected(String),
}

impl From<VcpuAction> for ExitAction {
    fn from(action: VcpuAction) -> Self {
        match action {
            VcpuAction::Continue => Self::Continue,
            VcpuAction::Park => Self::Halt,
        }
    }
}

/// Dispatches one KVM exit. Port and MMIO accesses go to the buses (which zero read buffers
/// and log unmapped addresses); everything else becomes an action for the run loop.
///
/// `io_size` is the size of one port access (`kvm_run.io.size`): a string instruction
/// (`rep outsb`, `rep insw` …) exits once with `count` items packed in `data`, and each item is
/// a separate access to the device, as on real hardware.
pub fn handle_exit(exit: VcpuExit<'_>, io_size: usize, pio: &Bus, mmio: &Bus) -> ExitAction {
    let item = io_size.max(1);
    match exit {
        VcpuExit::IoIn(port, data) => {
            for chunk in data.chunks_mut(item) {
                pio.read(u64::from(port), chunk);
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            for chunk in data.chunks(item) {
                let action = pio.write(u64::from(port), chunk);
                if action != VcpuAction::Continue {
                    return action.into();
                }
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            mmio.read(addr, data);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => mmio.write(addr, data).into(),
        VcpuExit::Hlt => ExitAction::Halt,
        VcpuExit::Shutdown => ExitAction::Shutdown,
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Unexpected(format!(
            "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x} on host cpu {cpu})"
        )),
        VcpuExit::InternalError => ExitAction::Unexpected("KVM_EXIT_INTERNAL_ERROR".into()),
        other => ExitAction::Unexpected(format!("{other:?}")),
    }
}

/// Formats the registers a user needs to see where a guest died.
pub fn format_registers(regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    format!(
        "  rip={:#018x} rsp={:#018x} rbp={:#018x} rflags={:#x}\n  \
         rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  \
         rsi={:#018x} rdi={:#018x} r8={:#018x} r9={:#018x}\n  \
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
        regs.rip,
        regs.rsp,
        regs.rbp,
        regs.rflags,
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        regs.r8,
        regs.r9,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.cs.selector
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::BusDevice;
    use std::sync::{Arc, Mutex};

    struct Echo(Vec<Vec<u8>>);

    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = offset as u8 + 1;
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
            self.0.push(data.to_vec());
            if offset == 7 {
                VcpuAction::Park
            } else {
                VcpuAction::Continue
            }
        }
    }

    fn buses() -> (Bus, Bus, Arc<Mutex<Echo>>) {
        let echo = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut pio = Bus::new("PIO");
        pio.insert(0x3f8, 8, echo.clone()).unwrap();
        let mut mmio = Bus::new("MMIO");
        mmio.insert(0xd000_0000, 0x1000, echo.clone()).unwrap();
        (pio, mmio, echo)
    }

    #[test]
    fn port_and_mmio_exits_reach_devices() {
        let (pio, mmio, echo) = buses();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"A"), 1, &pio, &mmio),
            ExitAction::Continue
        );
        let mut data = [0xee; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3fd, &mut data), 1, &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(data, [6]);
        handle_exit(VcpuExit::MmioWrite(0xd000_0010, b"BC"), 0, &pio, &mmio);
        let mut data = [0xee; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0002, &mut data), 0, &pio, &mmio);
        assert_eq!(data, [3, 0, 0, 0]);
        assert_eq!(echo.lock().unwrap().0, vec![b"A".to_vec(), b"BC".to_vec()]);
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3ff, b"P"), 1, &pio, &mmio),
            ExitAction::Halt
        );
    }

    #[test]
    fn string_port_io_is_one_access_per_item() {
        let (pio, mmio, echo) = buses();
        // `rep outsb` of three bytes: three one-byte writes, not one three-byte write.
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"xyz"), 1, &pio, &mmio),
            ExitAction::Continue
        );
        // `rep outsw` of two words.
        handle_exit(VcpuExit::IoOut(0x3f8, b"abcd"), 2, &pio, &mmio);
        assert_eq!(
            echo.lock().unwrap().0,
            vec![
                b"x".to_vec(),
                b"y".to_vec(),
                b"z".to_vec(),
                b"ab".to_vec(),
                b"cd".to_vec()
            ]
        );
        // `rep insb` of four bytes from offset 5: each item is read on its own.
        let mut data = [0xee; 4];
        handle_exit(VcpuExit::IoIn(0x3fd, &mut data), 1, &pio, &mmio);
        assert_eq!(data, [6, 6, 6, 6]);
    }

    #[test]
    fn unmapped_accesses_continue_and_read_zero() {
        let (pio, mmio, _) = buses();
        let mut data = [0xee; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x80, &mut data), 2, &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(data, [0, 0]);
        assert_eq!(
            handle_exit(VcpuExit::MmioWrite(0x1234, b"x"), 0, &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(pio.unmapped_accesses() + mmio.unmapped_accesses(), 2);
    }

    #[test]
    fn other_exits_stop_the_vcpu() {
        let (pio, mmio, _) = buses();
        assert_eq!(handle_exit(VcpuExit::Hlt, 0, &pio, &mmio), ExitAction::Halt);
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, 0, &pio, &mmio),
            ExitAction::Shutdown
        );
        assert_eq!(
            handle_exit(VcpuExit::FailEntry(0x21, 3), 0, &pio, &mmio),
            ExitAction::Unexpected(
                "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason 0x21 on host cpu 3)".into()
            )
        );
        assert_eq!(
            handle_exit(VcpuExit::InternalError, 0, &pio, &mmio),
            ExitAction::Unexpected("KVM_EXIT_INTERNAL_ERROR".into())
        );
        assert_eq!(
            handle_exit(VcpuExit::Nmi, 0, &pio, &mmio),
            ExitAction::Unexpected("Nmi".into())
        );
    }

    #[test]
    fn register_dump_names_rip_and_control_registers() {
        let regs = kvm_regs {
            rip: 0x10_0042,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            cr3: 0x9000,
            ..Default::default()
        };
        let dump = format_registers(&regs, &sregs);
        assert!(dump.contains("rip=0x0000000000100042"), "{dump}");
        assert!(dump.contains("cr3=0x9000"), "{dump}");
    }
}
