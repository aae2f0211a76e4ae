//! The exact-diff oracle: which pages a diff snapshot of a 1-vCPU workload must hold, computed
//! from the guest's progress counter in the snapshot it builds on and in the diff itself.

use std::collections::BTreeSet;
use std::path::Path;

use cowvm_guest_abi::layout;
use cowvm_guest_abi::workload::{page_written_at_step, vcpu_slice};
use cowvm_guest_abi::WorkloadArgs;

/// The page runs a snapshot's `state` lists as stored (20-byte header, JSON, CRC32).
pub fn stored_pages(snapshot: &Path) -> Vec<u64> {
    let bytes = std::fs::read(snapshot.join("state")).expect("read state");
    let state: serde_json::Value =
        serde_json::from_slice(&bytes[20..bytes.len() - 4]).expect("state payload is JSON");
    let mut pages = Vec::new();
    for run in state["memory"]["runs"].as_array().expect("memory.runs") {
        let (first, count) = (
            run[0].as_u64().expect("first"),
            run[1].as_u64().expect("count"),
        );
        pages.extend(first..first + count);
    }
    pages
}

/// vCPU 0's progress counter as a snapshot's memory file holds it.
pub fn progress_in(snapshot: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut bytes = [0u8; 8];
    std::fs::File::open(snapshot.join("memory"))
        .expect("open memory")
        .read_exact_at(&mut bytes, layout::progress_addr(0))
        .expect("read the progress counter");
    u64::from_le_bytes(bytes)
}

/// Pages outside the workload that the guest (or its MMU, setting accessed/dirty bits) writes.
fn is_guest_scratch(page: u64) -> bool {
    let addr = page * layout::PAGE_SIZE;
    let stacks = layout::STACKS_START..layout::STACKS_END;
    let tables = layout::PAGE_TABLES_ADDR..layout::PAGE_TABLES_END;
    stacks.contains(&addr)
        || tables.contains(&addr)
        || addr == layout::BOOT_INFO_ADDR
        || addr == layout::PROGRESS_ADDR
}

/// Asserts that `diff` (built on `parent`, 1-vCPU `workload`) stores exactly the workload pages
/// written between the two snapshots — the step under way at each snapshot may go either way —
/// and otherwise only guest scratch pages. Returns (pages certainly written, workload pages
/// stored).
pub fn assert_diff_is_exact(workload: &WorkloadArgs, parent: &Path, diff: &Path) -> (usize, usize) {
    let (before, after) = (progress_in(parent), progress_in(diff));
    assert!(
        after > before,
        "the guest ran between the snapshots ({before} → {after})"
    );
    let slice = vcpu_slice(workload.pages, 0, 1);
    let first = layout::WORKLOAD_ADDR / layout::PAGE_SIZE;
    let written = |steps: std::ops::Range<u64>| -> BTreeSet<u64> {
        steps
            .filter_map(|step| page_written_at_step(workload, slice, step, 0))
            .map(|page| first + page)
            .collect()
    };
    // Step `before` was under way when the parent was taken, step `after` when the diff was.
    let certain = written(before + 1..after);
    let maybe: BTreeSet<u64> = written(before..before + 1)
        .union(&written(after..after + 1))
        .copied()
        .collect();
    let (in_workload, other): (BTreeSet<u64>, BTreeSet<u64>) = stored_pages(diff)
        .into_iter()
        .partition(|&p| p >= first && p < first + workload.pages);
    let missing: Vec<_> = certain.difference(&in_workload).collect();
    assert!(
        missing.is_empty(),
        "written pages missing from the diff: {missing:?}"
    );
    let extra: Vec<_> = in_workload
        .difference(&certain)
        .filter(|p| !maybe.contains(p))
        .collect();
    assert!(
        extra.is_empty(),
        "pages in the diff the workload did not write: {extra:?}"
    );
    let unexpected: Vec<_> = other.iter().filter(|&&p| !is_guest_scratch(p)).collect();
    assert!(
        unexpected.is_empty(),
        "pages outside the workload and the guest's scratch areas: {unexpected:?} (all stored \
         outside the workload: {other:?})"
    );
    (certain.len(), in_workload.len())
}
