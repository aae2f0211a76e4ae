//! Dirty-page harvesting: KVM's per-slot logs and the VMM's own record of the writes it makes
//! into guest RAM, merged into one bitmap in snapshot-file order, without ever losing a bit.
//!
//! Harvesting is transactional. Every slot's log is read before any is cleared; when a step
//! fails, the [`Harvest`] still carries every bit read so far, and the caller keeps those bits
//! for the next diff (bits KVM still holds are harmless to keep twice).

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::memory::GuestMemory;

/// Guest page size used by dirty logging.
const PAGE: u64 = 4096;

/// A source of per-slot dirty logs (KVM's; a fake in tests).
pub trait DirtyLog {
    type Error;
    /// Pages in each slot, slot 0 first; their concatenation is the snapshot-file order.
    fn slot_pages(&self) -> Vec<u64>;
    /// `KVM_GET_DIRTY_LOG` of one slot: one bit per page.
    fn get(&self, slot: u32, pages: u64) -> Result<Vec<u64>, Self::Error>;
    /// Whether `get` also clears the log (legacy mode) instead of leaving it to `clear`.
    fn clears_on_get(&self) -> bool;
    /// `KVM_CLEAR_DIRTY_LOG` of exactly the bits in `log`.
    fn clear(&self, slot: u32, pages: u64, log: &mut [u64]) -> Result<(), Self::Error>;
}

/// What a harvest collected: the dirty bits, and the error that cut it short, if any. On error
/// the bitmap still holds every bit that was read, some of which KVM may already have cleared.
#[derive(Debug)]
pub struct Harvest<E> {
    pub bitmap: Vec<u64>,
    pub error: Option<E>,
}

impl<E> Harvest<E> {
    /// The bitmap, or the error together with the bits to keep for the next harvest.
    pub fn into_result(self) -> Result<Vec<u64>, (E, Vec<u64>)> {
        match self.error {
            None => Ok(self.bitmap),
            Some(error) => Err((error, self.bitmap)),
        }
    }
}

/// An all-clear bitmap with one bit per page of `total_pages`.
pub fn empty_bitmap(total_pages: u64) -> Vec<u64> {
    vec![0; total_pages.div_ceil(64) as usize]
}

/// ORs `pages` bits of `src` into `dst` starting at bit `first_page`.
pub fn or_bits(dst: &mut [u64], first_page: u64, src: &[u64], pages: u64) {
    if first_page % 64 == 0 {
        let start = (first_page / 64) as usize;
        let words = pages.div_ceil(64) as usize;
        for (d, s) in dst[start..].iter_mut().zip(&src[..words]) {
            *d |= s;
        }
        return;
    }
    for page in 0..pages {
        if src[(page / 64) as usize] >> (page % 64) & 1 == 1 {
            let at = first_page + page;
            dst[(at / 64) as usize] |= 1 << (at % 64);
        }
    }
}

/// Reads every slot's log, then (in manual-protect mode) clears every slot.
///
/// Ordering: all GETs come before any CLEAR, so a failed GET leaves every bit in KVM; a failed
/// CLEAR leaves the bits of the slots cleared before it in the returned bitmap.
pub fn harvest<L: DirtyLog>(log: &L) -> Harvest<L::Error> {
    let slot_pages = log.slot_pages();
    let mut bitmap = empty_bitmap(slot_pages.iter().sum());
    let mut logs = Vec::with_capacity(slot_pages.len());
    let mut first_page = 0;
    for (slot, &pages) in slot_pages.iter().enumerate() {
        match log.get(slot as u32, pages) {
            Ok(slot_log) => {
                or_bits(&mut bitmap, first_page, &slot_log, pages);
                logs.push(slot_log);
            }
            Err(error) => {
                return Harvest {
                    bitmap,
                    error: Some(error),
                }
            }
        }
        first_page += pages;
    }
    if !log.clears_on_get() {
        for (slot, (&pages, slot_log)) in slot_pages.iter().zip(&mut logs).enumerate() {
            if let Err(error) = log.clear(slot as u32, pages, slot_log) {
                return Harvest {
                    bitmap,
                    error: Some(error),
                };
            }
        }
    }
    Harvest {
        bitmap,
        error: None,
    }
}

/// Takes (and resets) the record of writes the VMM made into guest RAM through vm-memory
/// (device emulation), in snapshot-file order.
pub fn take_vmm_writes(memory: &GuestMemory) -> Vec<u64> {
    let total: u64 = memory.iter().map(|r| r.len() / PAGE).sum();
    let mut bitmap = empty_bitmap(total);
    let mut first_page = 0;
    for region in memory.iter() {
        let pages = region.len() / PAGE;
        let written = MmapRegion::bitmap(region).get_and_reset();
        or_bits(&mut bitmap, first_page, &written, pages);
        first_page += pages;
    }
    bitmap
}

/// The pages set in `bitmap`, in order.
pub fn set_pages(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(word_index, &word)| {
        (0..64)
            .filter(move |bit| word >> bit & 1 == 1)
            .map(move |bit| word_index as u64 * 64 + bit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use vm_memory::{Bytes, GuestAddress};

    /// Two slots of 100 and 70 pages; fails the given GET or CLEAR once.
    struct FakeKvm {
        logs: RefCell<Vec<Vec<u64>>>,
        fail_get: Option<u32>,
        fail_clear: Option<u32>,
        manual: bool,
    }

    impl FakeKvm {
        fn new(dirty: &[(usize, u64)]) -> Self {
            let mut logs = vec![empty_bitmap(100), empty_bitmap(70)];
            for &(slot, page) in dirty {
                logs[slot][(page / 64) as usize] |= 1 << (page % 64);
            }
            Self {
                logs: RefCell::new(logs),
                fail_get: None,
                fail_clear: None,
                manual: true,
            }
        }
    }

    impl DirtyLog for FakeKvm {
        type Error = String;
        fn slot_pages(&self) -> Vec<u64> {
            vec![100, 70]
        }
        fn get(&self, slot: u32, _: u64) -> Result<Vec<u64>, String> {
            if self.fail_get == Some(slot) {
                return Err(format!("get {slot}"));
            }
            let log = self.logs.borrow()[slot as usize].clone();
            if !self.manual {
                self.logs.borrow_mut()[slot as usize].fill(0);
            }
            Ok(log)
        }
        fn clears_on_get(&self) -> bool {
            !self.manual
        }
        fn clear(&self, slot: u32, _: u64, log: &mut [u64]) -> Result<(), String> {
            if self.fail_clear == Some(slot) {
                return Err(format!("clear {slot}"));
            }
            for (kept, cleared) in self.logs.borrow_mut()[slot as usize].iter_mut().zip(log) {
                *kept &= !*cleared;
            }
            Ok(())
        }
    }

    #[test]
    fn slots_are_concatenated_in_file_order() {
        let kvm = FakeKvm::new(&[(0, 0), (0, 99), (1, 0), (1, 69)]);
        let harvest = harvest(&kvm);
        assert!(harvest.error.is_none());
        assert_eq!(
            set_pages(&harvest.bitmap).collect::<Vec<_>>(),
            vec![0, 99, 100, 169]
        );
        assert!(
            kvm.logs.borrow().iter().flatten().all(|&w| w == 0),
            "cleared"
        );
    }

    #[test]
    fn a_failed_clear_on_slot_1_keeps_slot_0s_bits() {
        let mut kvm = FakeKvm::new(&[(0, 5), (1, 7)]);
        kvm.fail_clear = Some(1);
        let (error, kept) = harvest(&kvm).into_result().unwrap_err();
        assert_eq!(error, "clear 1");
        // Slot 0 was cleared in KVM: its bit must come back to the caller.
        assert_eq!(kvm.logs.borrow()[0], empty_bitmap(100));
        assert_eq!(set_pages(&kept).collect::<Vec<_>>(), vec![5, 107]);
    }

    #[test]
    fn a_failed_get_clears_nothing_in_manual_mode() {
        let mut kvm = FakeKvm::new(&[(0, 5), (1, 7)]);
        kvm.fail_get = Some(1);
        let (error, kept) = harvest(&kvm).into_result().unwrap_err();
        assert_eq!(error, "get 1");
        assert_eq!(set_pages(&kept).collect::<Vec<_>>(), vec![5]);
        assert_ne!(kvm.logs.borrow()[0], empty_bitmap(100), "still in KVM");
    }

    #[test]
    fn legacy_mode_failure_returns_the_slots_already_cleared_by_get() {
        let mut kvm = FakeKvm::new(&[(0, 64), (1, 1)]);
        kvm.manual = false;
        kvm.fail_get = Some(1);
        let (_, kept) = harvest(&kvm).into_result().unwrap_err();
        assert_eq!(set_pages(&kept).collect::<Vec<_>>(), vec![64]);
        assert_eq!(kvm.logs.borrow()[0], empty_bitmap(100), "GET cleared it");
    }

    #[test]
    fn vmm_writes_through_vm_memory_are_recorded_once() {
        let memory = crate::memory::create_guest_memory(8 << 20).unwrap();
        memory.write_obj(1u64, GuestAddress(0x3000)).unwrap();
        memory
            .write_slice(&[7; 5000], GuestAddress(0x10_0000 - 10))
            .unwrap();
        let _: u64 = memory.read_obj(GuestAddress(0x5000)).unwrap();
        let written = take_vmm_writes(&memory);
        assert_eq!(
            set_pages(&written).collect::<Vec<_>>(),
            vec![3, 0xff, 0x100, 0x101],
            "reads are not writes; a write across pages marks both"
        );
        assert!(set_pages(&take_vmm_writes(&memory)).next().is_none());
    }

    #[test]
    fn or_bits_handles_unaligned_offsets() {
        let mut dst = empty_bitmap(200);
        let mut src = empty_bitmap(70);
        src[0] = 1 | 1 << 63;
        src[1] = 1 << 5;
        or_bits(&mut dst, 3, &src, 70);
        assert_eq!(set_pages(&dst).collect::<Vec<_>>(), vec![3, 66, 72]);
    }
}
