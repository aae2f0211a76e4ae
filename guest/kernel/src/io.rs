//! Port I/O: the COM1 serial port and the exit device.

use core::arch::asm;

use cowvm_guest_abi::layout::{EXIT_PORT, PARK_PORT, SERIAL_PORT};

/// Line status register offset and its "transmit holding register empty" bit.
const LSR: u16 = 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

fn outb(port: u16, value: u8) {
    // SAFETY: port output has no memory effects; the VMM emulates every port we use.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack)) };
    value
}

/// Writes to COM1, waiting for the transmitter like a real 16550 driver.
#[derive(Clone, Copy)]
pub struct Serial;

impl Serial {
    pub fn byte(self, byte: u8) -> Self {
        while inb(SERIAL_PORT + LSR) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        outb(SERIAL_PORT, byte);
        self
    }

    pub fn str(self, text: &str) -> Self {
        for &byte in text.as_bytes() {
            self.byte(byte);
        }
        self
    }

    /// Decimal, without leading zeros.
    pub fn dec(self, mut value: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut len = 0;
        loop {
            digits[len] = b'0' + (value % 10) as u8;
            len += 1;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        for i in (0..len).rev() {
            self.byte(digits[i]);
        }
        self
    }

    /// Exactly 16 lowercase hex digits.
    pub fn hex16(self, value: u64) -> Self {
        for shift in (0..16).rev() {
            let nibble = ((value >> (shift * 4)) & 0xf) as u8;
            self.byte(if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 });
        }
        self
    }
}

/// Ends the VM with `status` through the exit device.
pub fn exit(status: u8) -> ! {
    outb(EXIT_PORT, status);
    halt_forever()
}

/// Parks this vCPU (the guest runs at CPL 3, where `hlt` is not allowed).
pub fn halt_forever() -> ! {
    loop {
        outb(PARK_PORT, 0);
    }
}
