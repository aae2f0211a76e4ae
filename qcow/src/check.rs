//! Consistency check and repair, classified like `qemu-img check`: references are recomputed from
//! every table and compared with the stored refcounts; `-r` rebuilds the refcount structure.

use std::collections::BTreeMap;

use byteorder::{BigEndian, ByteOrder};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES};
use crate::image::Image;
use crate::l2::{Mapping, ALL_ALLOCATED, COMPRESSED, COPIED, L1_RESERVED_MASK, OFFSET_MASK};
use crate::monitor::{checkpoint, Monitor, Quiet};
use crate::raw::Storage;
use crate::refcount::{max_refcount, set_entry, REFTABLE_OFFSET_MASK};

/// Largest file (in clusters) `check` accepts: 1 GiB of reference counters.
const MAX_CHECK_CLUSTERS: u64 = 1 << 27;

/// What `check` may fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    None,
    Leaks,
    All,
}

/// Outcome of a check, with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// Corruptions a full repair addresses (internal; qemu-img's notion of "fixed").
    #[serde(skip)]
    pub fixable_corruptions: u64,
    /// One line per finding, in qemu-img's wording.
    #[serde(skip)]
    pub messages: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

/// An in-place metadata fix found while walking tables (`-r all`).
enum Fix {
    /// Write `value` at host byte `at` (an L1 or L2 entry).
    Entry { at: u64, value: u64 },
}

struct Walk {
    cluster_bits: u32,
    file_clusters: u64,
    refs: Vec<u64>,
    report: CheckReport,
    fixes: Vec<Fix>,
}

impl Walk {
    /// Counts `times` references to every cluster touched by `[offset, offset + len)`.
    fn reference(&mut self, offset: u64, len: u64, times: u64, what: &str) -> bool {
        if len == 0 {
            return true;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        if last >= self.file_clusters {
            self.report.corruptions += 1;
            self.report.messages.push(format!(
                "ERROR {what} at offset {offset:#x} is beyond the end of the image file"
            ));
            return false;
        }
        for cluster in first..=last {
            self.refs[cluster as usize] += times;
        }
        true
    }

    fn corruption(&mut self, message: String) {
        self.report.corruptions += 1;
        self.report.messages.push(message);
    }
}

/// Checks `image` and optionally repairs it. The image is flushed first.
pub fn check<S: Storage>(image: &mut Image<S>, repair: Repair) -> Result<CheckReport> {
    check_monitored(image, repair, &mut Quiet)
}

/// [`check`] reporting its progress to `monitor` (per L2 table and per block of refcounts); a
/// plain check (no repair) stops when the monitor asks to.
pub fn check_monitored<S: Storage>(
    image: &mut Image<S>,
    repair: Repair,
    monitor: &mut dyn Monitor,
) -> Result<CheckReport> {
    if repair != Repair::None && image.is_read_only() {
        return Err(Error::ReadOnly);
    }
    image.flush()?;
    let first = run(image, repair, monitor)?;
    if repair == Repair::None || first.is_clean() {
        return Ok(first);
    }
    let mut second = run(image, Repair::None, monitor)?;
    second.leaks_fixed = first.leaks.saturating_sub(second.leaks);
    // Like qemu-img: fixed corruptions are the ones the repair addressed (COPIED flags judged
    // against the repaired refcounts); `-r leaks` fixes no corruption.
    second.corruptions_fixed = match repair {
        Repair::All => first.fixable_corruptions.min(first.corruptions),
        _ => 0,
    };
    let mut messages = first.messages;
    messages.append(&mut second.messages);
    second.messages = messages;
    if second.corruptions == 0 && second.check_errors == 0 {
        let bits = image.header.incompatible_features;
        if bits & (INCOMPAT_CORRUPT | INCOMPAT_DIRTY) != 0 {
            image.set_incompatible(bits & !(INCOMPAT_CORRUPT | INCOMPAT_DIRTY))?;
        }
    }
    Ok(second)
}

fn read_table<S: Storage>(image: &mut Image<S>, offset: u64, entries: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; (entries * 8) as usize];
    image
        .file
        .read_at(&mut raw, offset)
        .map_err(|source| Error::ReadL2Table { offset, source })?;
    Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
}

fn run<S: Storage>(
    image: &mut Image<S>,
    repair: Repair,
    monitor: &mut dyn Monitor,
) -> Result<CheckReport> {
    run_depth(image, repair, 0, monitor)
}

fn run_depth<S: Storage>(
    image: &mut Image<S>,
    repair: Repair,
    depth: u32,
    monitor: &mut dyn Monitor,
) -> Result<CheckReport> {
    let cluster_size = image.cluster_size;
    let cluster_bits = image.cluster_bits;
    let file_len = image.file.len().map_err(Error::ReadHeader)?;
    let file_clusters = file_len.div_ceil(cluster_size);
    // One 8-byte counter per cluster of the file: refuse absurd (typically sparse, hostile) files
    // instead of allocating gigabytes.
    if file_clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::CheckTooLarge {
            clusters: file_clusters,
            limit: MAX_CHECK_CLUSTERS,
        });
    }
    let mut walk = Walk {
        cluster_bits,
        file_clusters,
        refs: vec![0; file_clusters as usize],
        report: CheckReport::default(),
        fixes: Vec::new(),
    };
    walk.report.total_clusters = image.header.size.div_ceil(cluster_size);
    walk.reference(0, cluster_size, 1, "header");

    // Every L1 table: active first, then each snapshot's. Each distinct L2 table is walked once and
    // its data references counted once per L1 entry that points at it.
    // Snapshot L1 tables are read one at a time, each distinct one once (with its multiplicity), so
    // a hostile table of many snapshots sharing one huge L1 costs neither memory nor time.
    let mut snapshot_l1s: BTreeMap<(u64, u32), u64> = BTreeMap::new();
    for snapshot in &image.snapshots {
        *snapshot_l1s
            .entry((snapshot.l1_table_offset, snapshot.l1_size))
            .or_insert(0) += 1;
    }
    let mut l1_tables = vec![(image.header.l1_table_offset, 0u32, 1u64, true)];
    l1_tables.extend(
        snapshot_l1s
            .into_iter()
            .map(|((offset, size), times)| (offset, size, times, false)),
    );
    let mut l2_uses: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
    for &(l1_offset, l1_size, times, active) in &l1_tables {
        let table = if active {
            image.l1.clone()
        } else {
            if l1_offset + u64::from(l1_size) * 8 > file_len {
                walk.corruption(format!(
                    "ERROR snapshot L1 table at {l1_offset:#x} is beyond the end of the image file"
                ));
                continue;
            }
            read_table(image, l1_offset, u64::from(l1_size))?
        };
        let what = if active {
            "L1 table"
        } else {
            "snapshot L1 table"
        };
        if !table.is_empty() && !walk.reference(l1_offset, table.len() as u64 * 8, times, what) {
            continue;
        }
        for (index, &entry) in table.iter().enumerate() {
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            if l2_offset % cluster_size != 0 || entry & L1_RESERVED_MASK != 0 {
                walk.corruption(format!(
                    "ERROR l2_offset={l2_offset:#x}: L2 table is not cluster aligned; L1 entry corrupted"
                ));
                if active && repair == Repair::All {
                    walk.report.fixable_corruptions += 1;
                    walk.fixes.push(Fix::Entry {
                        at: l1_offset + index as u64 * 8,
                        value: 0,
                    });
                }
                continue;
            }
            if !walk.reference(l2_offset, cluster_size, times, "L2 table") {
                if active && repair == Repair::All {
                    walk.report.fixable_corruptions += 1;
                    walk.fixes.push(Fix::Entry {
                        at: l1_offset + index as u64 * 8,
                        value: 0,
                    });
                }
                continue;
            }
            let use_entry = l2_uses.entry(l2_offset).or_insert((0, false));
            use_entry.0 += times;
            use_entry.1 |= active;
        }
    }
    let entries_per_l2 = cluster_size / 8;
    // Extended L2 entries are two words: the mapping and the subcluster bitmap.
    let extended = image.header.extended_l2();
    let stride = if extended { 2 } else { 1 };
    let tables = l2_uses.len() as u64;
    monitor.start(tables + file_clusters);
    for (done, (&l2_offset, &(uses, _))) in l2_uses.iter().enumerate() {
        if repair == Repair::None {
            checkpoint(monitor)?;
        }
        monitor.advance(done as u64);
        let table = read_table(image, l2_offset, entries_per_l2)?;
        for (index, &entry) in table.iter().step_by(stride).enumerate() {
            let at = l2_offset + (index * stride) as u64 * 8;
            if extended {
                let bitmap = table[index * 2 + 1];
                if let Some(problem) = bitmap_problem(entry, bitmap, cluster_bits) {
                    walk.corruption(format!(
                        "ERROR {problem} in L2 table {l2_offset:#x}, entry {index} \
                         (l2_entry={entry:#x}, bitmap={bitmap:#x})"
                    ));
                }
            }
            let mapping = match Mapping::decode_cluster(entry, cluster_bits, extended) {
                Ok(mapping) => mapping,
                Err(_) => {
                    walk.corruption(format!(
                        "ERROR offset={:#x}: Cluster is not properly aligned; L2 entry corrupted",
                        entry & OFFSET_MASK
                    ));
                    if repair == Repair::All {
                        walk.report.fixable_corruptions += 1;
                        walk.fixes.push(Fix::Entry { at, value: 0 });
                    }
                    continue;
                }
            };
            if entry & COMPRESSED != 0 && entry & COPIED != 0 {
                walk.corruption(format!("ERROR: compressed cluster {index} in L2 table {l2_offset:#x} has OFLAG_COPIED set"));
                if repair == Repair::All {
                    walk.report.fixable_corruptions += 1;
                    walk.fixes.push(Fix::Entry {
                        at,
                        value: entry & !COPIED,
                    });
                }
            }
            if let Some((host, len)) = mapping.host_range(cluster_size) {
                if !walk.reference(host, len, uses, "data cluster") {
                    if repair == Repair::All {
                        walk.report.fixable_corruptions += 1;
                        walk.fixes.push(Fix::Entry { at, value: 0 });
                    }
                    continue;
                }
            }
        }
    }
    if image.snapshot_table_len > 0 {
        walk.reference(
            image.header.snapshots_offset,
            image.snapshot_table_len,
            1,
            "snapshot table",
        );
    }
    let reftable_offset = image.refcounts.table_offset;
    let reftable_bytes = u64::from(image.refcounts.table_clusters) * cluster_size;
    // The refcount structures themselves are counted separately so a rebuild can leave them out.
    let mut metadata_refs = Walk {
        cluster_bits,
        file_clusters,
        refs: vec![0; file_clusters as usize],
        report: CheckReport::default(),
        fixes: Vec::new(),
    };
    metadata_refs.reference(reftable_offset, reftable_bytes, 1, "refcount table");
    let mut refblocks_ok = true;
    let reftable = image.refcounts.table.clone();
    let entries_per_block = image.refcounts.entries_per_block();
    for (index, &entry) in reftable.iter().enumerate() {
        let offset = entry & REFTABLE_OFFSET_MASK;
        if offset == 0 {
            continue;
        }
        if offset % cluster_size != 0 || entry & !REFTABLE_OFFSET_MASK != 0 {
            walk.corruption(format!("ERROR refcount block {index} is not cluster aligned; refcount table entry corrupted"));
            refblocks_ok = false;
            continue;
        }
        if offset >= file_len {
            walk.corruption(format!("ERROR refcount block {index} is outside image"));
            refblocks_ok = false;
            continue;
        }
        metadata_refs.reference(offset, cluster_size, 1, "refcount block");
    }
    for (i, r) in metadata_refs.refs.iter().enumerate() {
        walk.refs[i] += r;
    }
    walk.report.corruptions += metadata_refs.report.corruptions;
    walk.report
        .messages
        .append(&mut metadata_refs.report.messages);

    // Compare against the stored refcounts of every cluster in the file (like qemu-img, refcounts
    // of clusters past the end of the file are not looked at).
    let stored_refcount = |image: &mut Image<S>, walk: &mut Walk, cluster: u64| -> u64 {
        if !refblocks_ok {
            let offset = reftable
                .get((cluster / entries_per_block) as usize)
                .copied()
                .unwrap_or(0);
            if offset % cluster_size != 0 || offset >= file_len {
                return 0;
            }
        }
        match image.refcounts.get(&mut image.file, cluster) {
            Ok(value) => value,
            Err(_) => {
                walk.report.check_errors += 1;
                0
            }
        }
    };
    let mut mismatched = Vec::new();
    let mut highest_used = 0u64;
    let max_refcount = max_refcount(image.refcounts.order());
    for cluster in 0..file_clusters {
        if cluster % 4096 == 0 {
            monitor.advance(tables + cluster);
        }
        let stored = stored_refcount(image, &mut walk, cluster);
        let computed = walk.refs.get(cluster as usize).copied().unwrap_or(0);
        if stored > 0 || computed > 0 {
            highest_used = highest_used.max(cluster + 1);
        }
        if computed > max_refcount {
            walk.corruption(format!(
                "ERROR cluster {cluster} refcount overflow: {computed} references exceed the {}-bit refcount width",
                1 << image.refcounts.order()
            ));
            continue;
        }
        if stored == computed {
            continue;
        }
        if stored > computed {
            walk.report.leaks += 1;
            walk.report.messages.push(format!(
                "Leaked cluster {cluster} refcount={stored} reference={computed}"
            ));
        } else {
            walk.corruption(format!(
                "ERROR cluster {cluster} refcount={stored} reference={computed}"
            ));
            walk.report.fixable_corruptions += 1;
        }
        mismatched.push((cluster, stored, computed));
    }
    walk.report.image_end_offset = highest_used * cluster_size;

    // OFLAG_COPIED must match "refcount == 1" in the active tables.
    let active_l1 = image.l1.clone();
    let l1_offset = image.header.l1_table_offset;
    for (index, &entry) in active_l1.iter().enumerate() {
        let l2_offset = entry & OFFSET_MASK;
        if l2_offset == 0 || l2_offset % cluster_size != 0 || l2_offset >= file_len {
            continue;
        }
        let refcount = stored_refcount(image, &mut walk, l2_offset >> cluster_bits);
        let fixed_refcount = walk.refs[(l2_offset >> cluster_bits) as usize];
        if (refcount == 1) != (entry & COPIED != 0) {
            walk.corruption(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} refcount={refcount}"
            ));
        }
        if repair == Repair::All && (fixed_refcount == 1) != (entry & COPIED != 0) {
            let value = if fixed_refcount == 1 {
                entry | COPIED
            } else {
                entry & !COPIED
            };
            walk.report.fixable_corruptions += 1;
            walk.fixes.push(Fix::Entry {
                at: l1_offset + index as u64 * 8,
                value,
            });
        }
        let table = read_table(image, l2_offset, entries_per_l2)?;
        // Like qemu-img, contiguity is judged within one L2 table.
        let mut next_contiguous = 0u64;
        for (l2_index, &l2_entry) in table.iter().step_by(stride).enumerate() {
            // Allocation statistics, in guest order like qemu-img (compressed clusters count as
            // fragmented by nature).
            let host = match Mapping::decode_cluster(l2_entry, cluster_bits, extended) {
                Ok(Mapping::Normal { host, .. }) | Ok(Mapping::ZeroAlloc { host }) => {
                    walk.report.allocated_clusters += 1;
                    if next_contiguous != 0 && host != next_contiguous {
                        walk.report.fragmented_clusters += 1;
                    }
                    next_contiguous = host + cluster_size;
                    host
                }
                Ok(Mapping::Compressed { .. }) => {
                    walk.report.allocated_clusters += 1;
                    walk.report.compressed_clusters += 1;
                    walk.report.fragmented_clusters += 1;
                    continue;
                }
                _ => continue,
            };
            if host >= file_len {
                continue;
            }
            let refcount = stored_refcount(image, &mut walk, host >> cluster_bits);
            let fixed_refcount = walk.refs[(host >> cluster_bits) as usize];
            if (refcount == 1) != (l2_entry & COPIED != 0) {
                walk.corruption(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}"
                ));
            }
            if repair == Repair::All && (fixed_refcount == 1) != (l2_entry & COPIED != 0) {
                let value = if fixed_refcount == 1 {
                    l2_entry | COPIED
                } else {
                    l2_entry & !COPIED
                };
                walk.report.fixable_corruptions += 1;
                walk.fixes.push(Fix::Entry {
                    at: l2_offset + (l2_index * stride) as u64 * 8,
                    value,
                });
            }
        }
    }

    match repair {
        Repair::None => {}
        Repair::Leaks => {
            if refblocks_ok {
                for &(cluster, stored, computed) in &mismatched {
                    if stored > computed {
                        image.refcounts.set(&mut image.file, cluster, computed)?;
                    }
                }
                image.refcounts.write_dirty(&mut image.file)?;
                image.file.flush().map_err(Error::Flush)?;
            }
        }
        Repair::All => {
            if !walk.fixes.is_empty() && depth < 3 {
                apply_fixes(image, &walk.fixes)?;
                // Entries changed: references may have changed too, so recount before rebuilding.
                return run_depth(image, Repair::All, depth + 1, monitor).map(|mut again| {
                    again.corruptions = again.corruptions.max(walk.report.corruptions);
                    again.leaks = again.leaks.max(walk.report.leaks);
                    again.fixable_corruptions = again
                        .fixable_corruptions
                        .max(walk.report.fixable_corruptions);
                    again.messages.splice(0..0, walk.report.messages.drain(..));
                    again
                });
            }
            if !mismatched.is_empty() || !refblocks_ok {
                let mut refs = walk.refs.clone();
                // The rebuilt structure replaces the old one: drop the old one's references.
                for (i, r) in metadata_refs_only(&refs, &walk, image, file_clusters)?
                    .iter()
                    .enumerate()
                {
                    refs[i] -= r;
                }
                rebuild_refcounts(image, refs)?;
            }
        }
    }
    Ok(walk.report)
}

/// What is wrong with an extended L2 entry's subcluster bitmap, if anything (QEMU's checks).
fn bitmap_problem(entry: u64, bitmap: u64, cluster_bits: u32) -> Option<&'static str> {
    match Mapping::decode_cluster(entry, cluster_bits, true) {
        Ok(Mapping::Compressed { .. }) if bitmap != 0 => {
            Some("compressed cluster with a non-zero subcluster bitmap")
        }
        Ok(Mapping::Unallocated) if bitmap & ALL_ALLOCATED != 0 => {
            Some("unallocated cluster with allocated subclusters")
        }
        Ok(Mapping::Normal { .. }) if (bitmap >> 32) & bitmap & ALL_ALLOCATED != 0 => {
            Some("subclusters both allocated and zero")
        }
        _ => None,
    }
}

/// References held by the current refcount table and blocks (subtracted before a rebuild).
fn metadata_refs_only<S: Storage>(
    refs: &[u64],
    _walk: &Walk,
    image: &mut Image<S>,
    file_clusters: u64,
) -> Result<Vec<u64>> {
    let cluster_size = image.cluster_size;
    let mut out = vec![0u64; refs.len()];
    let mut add = |offset: u64, len: u64| {
        let first = offset / cluster_size;
        let last = (offset + len - 1) / cluster_size;
        for c in first..=last {
            if c < file_clusters {
                out[c as usize] += 1;
            }
        }
    };
    add(
        image.refcounts.table_offset,
        u64::from(image.refcounts.table_clusters) * cluster_size,
    );
    let file_len = image.file.len().map_err(Error::ReadHeader)?;
    for &entry in &image.refcounts.table {
        let offset = entry & REFTABLE_OFFSET_MASK;
        if offset != 0
            && offset % cluster_size == 0
            && entry & !REFTABLE_OFFSET_MASK == 0
            && offset < file_len
        {
            add(offset, cluster_size);
        }
    }
    Ok(out)
}

fn apply_fixes<S: Storage>(image: &mut Image<S>, fixes: &[Fix]) -> Result<()> {
    for fix in fixes {
        let Fix::Entry { at, value } = fix;
        let mut raw = [0u8; 8];
        BigEndian::write_u64(&mut raw, *value);
        image
            .file
            .write_at(&raw, *at)
            .map_err(|source| Error::WriteL2Table {
                offset: *at,
                source,
            })?;
        let l1_start = image.header.l1_table_offset;
        if *at >= l1_start && *at < l1_start + image.l1.len() as u64 * 8 {
            image.l1[((*at - l1_start) / 8) as usize] = *value;
        }
    }
    image.file.flush().map_err(Error::Flush)?;
    image.reload_refcounts()
}

/// Writes a brand-new refcount table and blocks describing `refs` (plus themselves) past the end of
/// everything in use, then switches the header to them.
pub(crate) fn rebuild_refcounts<S: Storage>(
    image: &mut Image<S>,
    mut refs: Vec<u64>,
) -> Result<()> {
    let cluster_size = image.cluster_size;
    let order = image.header.refcount_order;
    let entries_per_block = (cluster_size * 8) >> order;
    let used_end = refs
        .iter()
        .rposition(|&r| r > 0)
        .map_or(1, |i| i as u64 + 1);
    let file_clusters = image
        .file
        .len()
        .map_err(Error::ReadHeader)?
        .div_ceil(cluster_size);
    let area = used_end.max(file_clusters);
    let mut blocks = 1u64;
    let mut table_clusters = 1u64;
    loop {
        let end = area + blocks + table_clusters;
        let need_blocks = end.div_ceil(entries_per_block);
        let need_table = (need_blocks * 8).div_ceil(cluster_size);
        if need_blocks == blocks && need_table == table_clusters {
            break;
        }
        blocks = need_blocks.max(blocks);
        table_clusters = need_table.max(table_clusters);
    }
    if table_clusters * cluster_size > MAX_REFTABLE_BYTES {
        return Err(Error::RefcountTableTooLarge(table_clusters));
    }
    let end = area + blocks + table_clusters;
    refs.resize(end as usize, 0);
    for r in &mut refs[area as usize..end as usize] {
        *r = 1;
    }
    let max = max_refcount(order);
    if let Some(cluster) = refs.iter().position(|&r| r > max) {
        return Err(Error::RefcountOverflow {
            cluster: cluster as u64,
            bits: 1 << order,
        });
    }
    let mut table = vec![0u8; (table_clusters * cluster_size) as usize];
    for block_index in 0..blocks {
        let mut block = vec![0u8; cluster_size as usize];
        let start = block_index * entries_per_block;
        for i in 0..entries_per_block {
            if let Some(&r) = refs.get((start + i) as usize) {
                set_entry(&mut block, i as usize, order, r);
            }
        }
        let offset = (area + block_index) * cluster_size;
        image
            .file
            .write_at(&block, offset)
            .map_err(|source| Error::WriteRefcountBlock { offset, source })?;
        BigEndian::write_u64(&mut table[(block_index * 8) as usize..], offset);
    }
    let table_offset = (area + blocks) * cluster_size;
    image
        .file
        .write_at(&table, table_offset)
        .map_err(Error::WriteRefcountTable)?;
    // Ordering: the new structure is durable before the header points at it.
    image.file.flush().map_err(Error::Flush)?;
    // One write inside the first sector switches the table and (for `amend refcount_bits`)
    // the refcount width together.
    let mut fields = [0u8; 52];
    BigEndian::write_u64(&mut fields[0..], table_offset);
    BigEndian::write_u32(&mut fields[8..], table_clusters as u32);
    BigEndian::write_u32(&mut fields[12..], image.header.nb_snapshots);
    BigEndian::write_u64(&mut fields[16..], image.header.snapshots_offset);
    let v3 = image.header.version >= 3;
    let length = if v3 { 52 } else { 24 };
    if v3 {
        BigEndian::write_u64(&mut fields[24..], image.header.incompatible_features);
        BigEndian::write_u64(&mut fields[32..], image.header.compatible_features);
        BigEndian::write_u64(&mut fields[40..], image.header.autoclear_features);
        BigEndian::write_u32(&mut fields[48..], order);
    }
    image
        .file
        .write_at(&fields[..length], 48)
        .map_err(Error::WriteHeader)?;
    image.file.flush().map_err(Error::Flush)?;
    image.header.refcount_table_offset = table_offset;
    image.header.refcount_table_clusters = table_clusters as u32;
    image.reload_refcounts()
}
