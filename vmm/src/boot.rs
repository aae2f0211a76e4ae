//! Direct 64-bit boot: the GDT, identity page tables, boot-info page and the initial register
//! state that put every vCPU straight into long mode at the guest's entry point.
//!
//! The guest starts at CPL 3 with IOPL 3 (port I/O allowed) and user-accessible page tables.
//! It needs no privileged instruction, and on hosts whose KVM is PVM (nested virtualization
//! without hardware support) CPL 0 code of a guest that is not PVM-aware is emulated one
//! instruction at a time: measured here, the same workload took 4.7 s at CPL 0 and 0.055 s at
//! CPL 3.

use cowvm_guest_abi::boot_info::{self, BootInfo};
use cowvm_guest_abi::layout::{
    stack_pointer, BOOT_INFO_ADDR, GDT_ADDR, MMIO_GAP_END, PAGE_TABLES_ADDR, PAGE_TABLES_END,
};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
const PTE_USER: u64 = 1 << 2;
const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;

/// GDT selectors: entry index × 8, plus the requested privilege level for user segments.
pub const CODE_SELECTOR: u16 = 1 << 3;
pub const DATA_SELECTOR: u16 = 2 << 3;
pub const TSS_SELECTOR: u16 = 3 << 3;
pub const USER_DATA_SELECTOR: u16 = (4 << 3) | 3;
pub const USER_CODE_SELECTOR: u16 = (5 << 3) | 3;

/// RFLAGS: bit 1 is always set; IOPL 3 lets CPL 3 code use `in`/`out`.
const RFLAGS_INITIAL: u64 = 0x2 | (3 << 12);

/// Writing the boot structures into guest RAM failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot write the {what} at guest address {addr:#x}: {source}")]
    WriteGuestMemory {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error(
        "guest RAM ending at {ram_end:#x} needs more identity page tables than fit below 1 MiB"
    )]
    TooMuchRamToMap { ram_end: u64 },
    #[error("cannot encode the boot-info page: {0}")]
    EncodeBootInfo(String),
}

/// A GDT entry from its flags, base and limit (Intel SDM vol. 3, 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Null, 64-bit kernel code, kernel data, a TSS (VMX entry wants a usable task register),
/// user data and 64-bit user code (the order `sysret` would expect).
pub const GDT: [u64; 6] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
    gdt_entry(0xc0f3, 0, 0xfffff),
    gdt_entry(0xa0fb, 0, 0xfffff),
];

/// The `kvm_segment` that KVM wants for GDT entry `entry` loaded through `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            // With 4 KiB granularity the limit counts pages.
            if (entry >> 55) & 1 == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write<T: vm_memory::ByteValued>(
    memory: &GuestMemory,
    what: &'static str,
    addr: u64,
    value: T,
) -> Result<(), BootError> {
    memory
        .write_obj(value, GuestAddress(addr))
        .map_err(|source| BootError::WriteGuestMemory { what, addr, source })
}

/// Writes the GDT at [`GDT_ADDR`].
pub fn write_gdt(memory: &GuestMemory) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        write(memory, "GDT", GDT_ADDR + 8 * i as u64, *entry)?;
    }
    Ok(())
}

/// Identity-maps `[0, max(ram_end, 4 GiB))` with 2 MiB pages: PML4 → one PDPT → one page
/// directory per GiB. The MMIO hole is mapped too so the guest can reach devices there.
/// Returns the address to load into CR3.
pub fn write_page_tables(memory: &GuestMemory, ram_end: u64) -> Result<u64, BootError> {
    let top = ram_end.max(MMIO_GAP_END);
    let directories = top.div_ceil(GIB);
    let pml4 = PAGE_TABLES_ADDR;
    let pdpt = pml4 + 0x1000;
    let first_pd = pdpt + 0x1000;
    if directories > 512 || first_pd + directories * 0x1000 > PAGE_TABLES_END {
        return Err(BootError::TooMuchRamToMap { ram_end });
    }
    write(
        memory,
        "PML4",
        pml4,
        pdpt | PTE_PRESENT | PTE_WRITABLE | PTE_USER,
    )?;
    for gib in 0..directories {
        let pd = first_pd + gib * 0x1000;
        write(
            memory,
            "PDPT",
            pdpt + gib * 8,
            pd | PTE_PRESENT | PTE_WRITABLE | PTE_USER,
        )?;
        let entries: [u64; 512] = std::array::from_fn(|i| {
            (gib * GIB + i as u64 * TWO_MIB) | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_HUGE
        });
        memory
            .write_slice(as_bytes(&entries), GuestAddress(pd))
            .map_err(|source| BootError::WriteGuestMemory {
                what: "page directory",
                addr: pd,
                source,
            })?;
    }
    Ok(pml4)
}

fn as_bytes(entries: &[u64; 512]) -> &[u8] {
    // SAFETY: a [u64; 512] is 4096 initialized bytes with no padding; u8 has no alignment needs.
    unsafe { std::slice::from_raw_parts(entries.as_ptr().cast::<u8>(), 4096) }
}

/// Writes the boot-info page the guest reads first.
/// Rewrites the generation id in the boot-info page of a VM about to run (a restore or a clone
/// that must not share its identity; see `cowvm_guest_abi::boot_info::GENERATION_OFFSET`).
/// Written through vm-memory, so the next diff holds the page.
pub fn write_generation(memory: &GuestMemory, generation: u64) -> Result<(), BootError> {
    write(
        memory,
        "boot info generation id",
        BOOT_INFO_ADDR + cowvm_guest_abi::boot_info::GENERATION_OFFSET,
        generation,
    )
}

pub fn write_boot_info(memory: &GuestMemory, info: &BootInfo<'_>) -> Result<(), BootError> {
    let mut page = [0u8; boot_info::ENCODED_LEN];
    info.encode(&mut page)
        .map_err(|e| BootError::EncodeBootInfo(e.to_string()))?;
    memory
        .write_slice(&page, GuestAddress(BOOT_INFO_ADDR))
        .map_err(|source| BootError::WriteGuestMemory {
            what: "boot-info page",
            addr: BOOT_INFO_ADDR,
            source,
        })
}

/// Turns reset-state special registers into 64-bit long mode at CPL 3 with paging through `cr3`.
pub fn configure_long_mode(sregs: &mut kvm_sregs, cr3: u64) {
    let code = segment_from_gdt(GDT[5], USER_CODE_SELECTOR);
    let data = segment_from_gdt(GDT[4], USER_DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(GDT[3], TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    // No IDT: any exception becomes a triple fault, which the VMM reports with the registers.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// General registers at the first instruction of vCPU `index`: the entry point, its own stack,
/// and the System V argument registers carrying (vCPU index, boot-info address).
pub fn initial_regs(index: u32, entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_pointer(index),
        rbp: stack_pointer(index),
        rdi: u64::from(index),
        rsi: BOOT_INFO_ADDR,
        rflags: RFLAGS_INITIAL,
        ..Default::default()
    }
}

/// x87/SSE control words as after `FNINIT` and at reset.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn read_u64(memory: &GuestMemory, addr: u64) -> u64 {
        memory.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Walks the 4-level tables like the MMU does for a 2 MiB mapping.
    fn translate(memory: &GuestMemory, cr3: u64, virt: u64) -> Option<u64> {
        let pml4e = read_u64(memory, cr3 + ((virt >> 39) & 0x1ff) * 8);
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = read_u64(memory, (pml4e & !0xfff) + ((virt >> 30) & 0x1ff) * 8);
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        let pde = read_u64(memory, (pdpte & !0xfff) + ((virt >> 21) & 0x1ff) * 8);
        if pde & PTE_PRESENT == 0 || pde & PTE_HUGE == 0 {
            return None;
        }
        assert_eq!(
            pml4e & pdpte & pde & PTE_USER,
            PTE_USER,
            "user-accessible at every level"
        );
        Some((pde & !(TWO_MIB - 1) & 0x000f_ffff_ffff_f000) | (virt & (TWO_MIB - 1)))
    }

    #[test]
    fn gdt_entries_decode_to_long_mode_segments() {
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        let code = segment_from_gdt(GDT[1], CODE_SELECTOR);
        assert_eq!(
            (code.l, code.db, code.present, code.s, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(GDT[2], DATA_SELECTOR);
        assert_eq!((data.l, data.db, data.type_, data.unusable), (0, 1, 0x3, 0));
        let user_code = segment_from_gdt(GDT[5], USER_CODE_SELECTOR);
        assert_eq!((user_code.l, user_code.dpl, user_code.type_), (1, 3, 0xb));
        let user_data = segment_from_gdt(GDT[4], USER_DATA_SELECTOR);
        assert_eq!((user_data.dpl, user_data.type_), (3, 0x3));
        let null = segment_from_gdt(GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn gdt_lands_in_guest_memory() {
        let memory = create_guest_memory(8 << 20).unwrap();
        write_gdt(&memory).unwrap();
        assert_eq!(read_u64(&memory, GDT_ADDR + 8), GDT[1]);
        assert_eq!(read_u64(&memory, GDT_ADDR + 24), GDT[3]);
        assert_eq!(read_u64(&memory, GDT_ADDR + 40), 0x00af_fb00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_ram_and_the_mmio_hole() {
        let memory = create_guest_memory(8 << 20).unwrap();
        let cr3 = write_page_tables(&memory, 8 << 20).unwrap();
        assert_eq!(cr3, PAGE_TABLES_ADDR);
        for addr in [0, 0x10_0000, 0x40_1234, 0x7f_ffff, 0xd000_0000, 0xffff_ffff] {
            assert_eq!(translate(&memory, cr3, addr), Some(addr), "{addr:#x}");
        }
        assert_eq!(translate(&memory, cr3, 4 << 30), None);
    }

    #[test]
    fn page_tables_cover_ram_above_4_gib_and_refuse_too_much() {
        let memory = create_guest_memory(8 << 20).unwrap();
        let cr3 = write_page_tables(&memory, 6 << 30).unwrap();
        assert_eq!(translate(&memory, cr3, (6 << 30) - 8), Some((6 << 30) - 8));
        assert!(matches!(
            write_page_tables(&memory, 300 << 30),
            Err(BootError::TooMuchRamToMap { .. })
        ));
    }

    #[test]
    fn boot_info_page_decodes_in_guest_memory() {
        let memory = create_guest_memory(8 << 20).unwrap();
        let info = BootInfo {
            vcpu_count: 2,
            ram_size: 8 << 20,
            clone_generation: 0,
            args: "seed=3",
            devices: [boot_info::DeviceWindow::default(); boot_info::MAX_DEVICES],
            device_count: 0,
        };
        write_boot_info(&memory, &info).unwrap();
        let mut page = [0u8; boot_info::ENCODED_LEN];
        memory
            .read_slice(&mut page, GuestAddress(BOOT_INFO_ADDR))
            .unwrap();
        assert_eq!(BootInfo::decode(&page).unwrap(), info);
    }

    #[test]
    fn long_mode_registers() {
        let mut sregs = kvm_sregs::default();
        configure_long_mode(&mut sregs, 0x9000);
        assert_eq!(sregs.cr0 & X86_CR0_PG, X86_CR0_PG);
        assert_eq!(sregs.cr0 & (1 << 2), 0, "CR0.EM must be clear for SSE");
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.selector, USER_CODE_SELECTOR);
        assert_eq!(
            (sregs.cs.dpl, sregs.ss.dpl),
            (3, 3),
            "the guest runs at CPL 3"
        );
        assert_eq!(sregs.gdt.limit, 47);
        let regs = initial_regs(3, 0x10_0000);
        assert_eq!(
            (regs.rip, regs.rdi, regs.rsi),
            (0x10_0000, 3, BOOT_INFO_ADDR)
        );
        assert_eq!(regs.rsp, stack_pointer(3));
        assert_eq!((regs.rflags >> 12) & 3, 3, "IOPL 3 for port I/O at CPL 3");
    }
}
