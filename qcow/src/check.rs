//! Consistency check and repair, step for step like `qemu-img check` (QEMU's
//! `qcow2_check_refcounts`): references are counted from every table and compared with the stored
//! refcounts; `-r leaks` lowers leaked refcounts, `-r all` also fixes corruptions, rebuilding the
//! whole refcount structure when a referenced cluster has refcount 0; OFLAG_COPIED flags are
//! checked (and fixed) against the refcounts last. Every finding is reported in qemu-img's words,
//! in qemu-img's order.

use byteorder::{BigEndian, ByteOrder};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::header::{check_table_offset, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_SNAPSHOTS};
use crate::image::Image;
use crate::l2::{COPIED, OFFSET_MASK};
use crate::monitor::{checkpoint, Monitor, Quiet};
use crate::raw::Storage;

mod rebuild;
mod refs;
mod rewrite;
mod walk;

pub(crate) use rewrite::rebuild_refcounts;

use refs::{read_padded, Counted, Stored};
use walk::{has_data_file, kind, Kind, Walk};

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
    /// The lines qemu-img prints on stderr while checking, in order (those it prints with its
    /// program name start with [`PROGRAM`]).
    #[serde(skip)]
    pub messages: Vec<String>,
    /// The check itself failed (qemu-img's `Check failed: REASON`, the C library's text).
    #[serde(skip)]
    pub failed: Option<&'static str>,
    /// Something was repaired: qemu-img prints the repair summary and checks again (this report
    /// is the second check's, with the first one's fixed counts).
    #[serde(skip)]
    pub repaired: bool,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

/// QEMU's `BdrvCheckResult` counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
}

/// Counters plus the messages printed so far (which resets of the counters never touch).
#[derive(Debug, Default)]
pub(crate) struct Findings {
    tally: Tally,
    messages: Vec<String>,
}

impl Findings {
    fn message(&mut self, text: String) {
        self.messages.push(text);
    }

    fn corruption(&mut self, text: String) {
        self.tally.corruptions += 1;
        self.messages.push(text);
    }
}

/// A snapshot table pointer in the header that cannot be used (QEMU's `qcow2_validate_table`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SnapshotPointerProblem {
    /// More entries than QEMU's limit.
    TooMany(u32),
    /// Unaligned, zero or beyond the largest offset.
    OffsetInvalid,
}

/// Whether the header's snapshot table pointer is unusable.
pub(crate) fn snapshot_pointer_problem(header: &Header) -> Option<SnapshotPointerProblem> {
    if u64::from(header.nb_snapshots) > MAX_SNAPSHOTS {
        return Some(SnapshotPointerProblem::TooMany(header.nb_snapshots));
    }
    let bytes = u64::from(header.nb_snapshots) * 40;
    if header.nb_snapshots > 0
        && check_table_offset(
            "snapshot table",
            header.snapshots_offset,
            bytes,
            header.cluster_size(),
        )
        .is_err()
    {
        return Some(SnapshotPointerProblem::OffsetInvalid);
    }
    None
}

/// QEMU's `qcow2_check_read_snapshot_table` for a pointer it refuses: the messages and the
/// failure (`-r all` cannot repair these either; QEMU's attempt corrupts the image).
fn snapshot_pointer_failure(
    problem: SnapshotPointerProblem,
    findings: &mut Findings,
) -> &'static str {
    findings.tally.check_errors += 1;
    match problem {
        SnapshotPointerProblem::TooMany(count) => {
            findings.message(format!("{PROGRAM}ERROR snapshot table too large"));
            findings.message(format!(
                "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                u64::from(count) - MAX_SNAPSHOTS
            ));
            "File too large"
        }
        SnapshotPointerProblem::OffsetInvalid => {
            findings.message(format!("{PROGRAM}ERROR snapshot table offset invalid"));
            "Invalid argument"
        }
    }
}

/// The prefix of messages qemu-img prints through `error_report` (with its program name); a front
/// end invoked under another name puts its own name in its place.
pub const PROGRAM: &str = "qemu-img: ";

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
    if repair != Repair::None {
        clear_unknown_autoclear(image)?;
    }
    let mut findings = Findings::default();
    if let Some(problem) = image.snapshot_pointer_problem {
        let failed = snapshot_pointer_failure(problem, &mut findings);
        return Ok(CheckReport {
            messages: findings.messages,
            failed: Some(failed),
            check_errors: findings.tally.check_errors,
            ..CheckReport::default()
        });
    }
    let incomplete = incomplete_snapshots(image, repair, &mut findings);
    let first = check_refcounts(image, repair, &mut findings, monitor)?;
    if first.failed.is_none() && !incomplete.is_empty() && repair == Repair::All {
        complete_snapshots(image, &incomplete)?;
    }
    if let Some(failed) = first.failed {
        return Ok(CheckReport {
            messages: findings.messages,
            failed: Some(failed),
            ..CheckReport::default()
        });
    }
    let tally = findings.tally;
    if repair != Repair::None && tally.check_errors == 0 && tally.corruptions == 0 {
        let bits = image.header.incompatible_features;
        if bits & (INCOMPAT_CORRUPT | INCOMPAT_DIRTY) != 0 {
            image.set_incompatible(bits & !(INCOMPAT_CORRUPT | INCOMPAT_DIRTY))?;
        }
    }
    if tally.leaks_fixed == 0 && tally.corruptions_fixed == 0 {
        return Ok(first.report(&findings));
    }
    // Like qemu-img: report what was fixed, then check the repaired image again.
    let mut again = Findings {
        tally: Tally::default(),
        messages: std::mem::take(&mut findings.messages),
    };
    let second = check_refcounts(image, Repair::None, &mut again, monitor)?;
    let mut report = second.report(&again);
    report.leaks_fixed = tally.leaks_fixed;
    report.corruptions_fixed = tally.corruptions_fixed;
    report.repaired = true;
    if second.failed.is_some() {
        report.failed = second.failed;
    }
    Ok(report)
}

/// v3 snapshot entries without the disk size (written by old QEMU versions): QEMU reports them
/// (as corruptions) or, with `-r all`, repairs them; returns their indexes.
fn incomplete_snapshots<S: Storage>(
    image: &Image<S>,
    repair: Repair,
    findings: &mut Findings,
) -> Vec<usize> {
    if image.header.version < 3 {
        return Vec::new();
    }
    let incomplete: Vec<usize> = (0..image.snapshots.len())
        .filter(|&i| image.snapshots[i].disk_size.is_none())
        .collect();
    for &index in &incomplete {
        if repair == Repair::All {
            findings.message(format!(
                "Repairing snapshot table entry {index} is incomplete"
            ));
            findings.tally.corruptions_fixed += 1;
        } else {
            findings.corruption(format!("ERROR snapshot table entry {index} is incomplete"));
        }
    }
    incomplete
}

/// Rewrites the snapshot table with the disk size in every incomplete entry (QEMU's
/// `qcow2_check_fix_snapshot_table`): a new table, the old one freed.
fn complete_snapshots<S: Storage>(image: &mut Image<S>, incomplete: &[usize]) -> Result<()> {
    let mut snapshots = image.snapshots.clone();
    for &index in incomplete {
        snapshots[index].disk_size = Some(image.header.size);
    }
    // QEMU keeps ids and names as C strings: a NUL ends them.
    for snapshot in &mut snapshots {
        for text in [&mut snapshot.id, &mut snapshot.name] {
            if let Some(end) = text.find('\0') {
                text.truncate(end);
            }
        }
    }
    let (old_offset, old_len) = (image.header.snapshots_offset, image.snapshot_table_len);
    let file_len = image.file.len().map_err(Error::ReadHeader)?;
    image.write_snapshot_table(snapshots)?;
    image.flush()?;
    // A table written past the old end ends the file where its bytes end (QEMU writes no
    // padding after it).
    let table_end = image.header.snapshots_offset + image.snapshot_table_len;
    if image.header.snapshots_offset >= file_len {
        image.file.set_len(table_end).map_err(Error::SetLen)?;
    }
    // QEMU discards the freed clusters of the old table.
    let cluster_size = image.cluster_size;
    let start = old_offset / cluster_size * cluster_size;
    let end = (old_offset + old_len).div_ceil(cluster_size) * cluster_size;
    if old_len > 0 {
        image
            .file
            .discard(start, end - start)
            .map_err(|source| Error::WriteData {
                offset: start,
                source,
            })?;
    }
    image.reload_refcounts()
}

/// Autoclear bits QEMU knows: bitmaps (0) and raw external data (1).
const KNOWN_AUTOCLEAR: u64 = 0b11;

/// Like QEMU's read-write open, a repair clears the autoclear bits no known program maintains.
fn clear_unknown_autoclear<S: Storage>(image: &mut Image<S>) -> Result<()> {
    let bits = image.header.autoclear_features;
    if image.header.version < 3 || bits & !KNOWN_AUTOCLEAR == 0 {
        return Ok(());
    }
    image.header.autoclear_features = bits & KNOWN_AUTOCLEAR;
    image
        .file
        .write_at(&image.header.autoclear_features.to_be_bytes(), 88)
        .map_err(Error::WriteHeader)?;
    image.file.flush().map_err(Error::Flush)
}

/// One run of QEMU's `qcow2_check_refcounts`.
struct Run {
    total_clusters: u64,
    image_end_offset: u64,
    failed: Option<&'static str>,
}

impl Run {
    fn report(&self, findings: &Findings) -> CheckReport {
        let t = findings.tally;
        CheckReport {
            corruptions: t.corruptions,
            leaks: t.leaks,
            check_errors: t.check_errors,
            corruptions_fixed: t.corruptions_fixed,
            leaks_fixed: t.leaks_fixed,
            image_end_offset: self.image_end_offset,
            total_clusters: self.total_clusters,
            allocated_clusters: t.allocated_clusters,
            fragmented_clusters: t.fragmented_clusters,
            compressed_clusters: t.compressed_clusters,
            messages: findings.messages.clone(),
            failed: self.failed,
            repaired: false,
        }
    }
}

/// Counts references (QEMU's `calculate_refcounts`); `rebuild` is set when the refcount
/// structure itself is broken.
fn calculate<S: Storage>(
    image: &mut Image<S>,
    findings: &mut Findings,
    fix_errors: bool,
    rebuild: &mut bool,
    monitor: &mut dyn Monitor,
) -> Result<Counted> {
    let file_len = image.file.len().map_err(Error::ReadHeader)?;
    let clusters = file_len.div_ceil(image.cluster_size);
    if clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::CheckTooLarge {
            clusters,
            limit: MAX_CHECK_CLUSTERS,
        });
    }
    let counted = Counted::new(clusters, image.cluster_bits, image.header.refcount_order);
    let mut walk = Walk {
        image,
        findings,
        counted,
        file_len,
        fix_errors,
        rebuild: false,
        monitor,
        tables_done: 0,
    };
    walk.run()?;
    *rebuild |= walk.rebuild;
    Ok(walk.counted)
}

fn load_stored<S: Storage>(image: &mut Image<S>) -> Result<Stored> {
    Stored::load(
        &mut image.file,
        image.header.refcount_table_offset,
        image.header.refcount_table_clusters,
        image.header.refcount_order,
        image.cluster_bits,
    )
}

fn check_refcounts<S: Storage>(
    image: &mut Image<S>,
    repair: Repair,
    findings: &mut Findings,
    monitor: &mut dyn Monitor,
) -> Result<Run> {
    let mut run = Run {
        total_clusters: image.header.size.div_ceil(image.cluster_size),
        image_end_offset: 0,
        failed: None,
    };
    let mut rebuild = false;
    // Progress: one unit per L2 table walked (at most the active L1's entries) and per cluster
    // compared.
    let file_clusters = image
        .file
        .len()
        .map_err(Error::ReadHeader)?
        .div_ceil(image.cluster_size);
    monitor.start(u64::from(image.header.l1_size) + file_clusters);
    let mut counted = calculate(
        image,
        findings,
        repair == Repair::All,
        &mut rebuild,
        &mut *monitor,
    )?;
    let mut stored = load_stored(image)?;
    let pre_compare = findings.tally;
    let mut highest = compare(
        image,
        &mut stored,
        &counted,
        findings,
        Repair::None,
        &mut rebuild,
        &mut *monitor,
    )?;
    if rebuild && repair == Repair::All {
        let old = findings.tally;
        findings.message("Rebuilding refcount structure".into());
        rebuild::rebuild(image, &mut counted)?;
        findings.tally.corruptions = 0;
        findings.tally.leaks = 0;
        rebuild = false;
        let counted = calculate(image, findings, false, &mut rebuild, &mut Quiet)?;
        // The old structure is now leaked: fix that, keeping only leaks the rebuild itself made.
        let saved = findings.tally;
        findings.tally = Tally::default();
        let mut stored = load_stored(image)?;
        highest = compare(
            image,
            &mut stored,
            &counted,
            findings,
            Repair::Leaks,
            &mut rebuild,
            &mut Quiet,
        )?;
        if rebuild {
            findings.message("ERROR rebuilt refcount structure is still broken".into());
        }
        let fresh_leaks = findings.tally.leaks;
        findings.tally = saved;
        if findings.tally.corruptions < old.corruptions {
            findings.tally.corruptions_fixed += old.corruptions - findings.tally.corruptions;
        }
        if findings.tally.leaks < old.leaks {
            findings.tally.leaks_fixed += old.leaks - findings.tally.leaks;
        }
        findings.tally.leaks += fresh_leaks;
    } else if repair != Repair::None {
        if rebuild {
            findings.message("ERROR need to rebuild refcount structures".into());
            findings.tally.check_errors += 1;
            run.failed = Some("Input/output error");
            return Ok(run);
        }
        if findings.tally.leaks > 0 || findings.tally.corruptions > 0 {
            findings.tally = pre_compare;
            highest = compare(
                image,
                &mut stored,
                &counted,
                findings,
                repair,
                &mut rebuild,
                &mut Quiet,
            )?;
        }
    }
    let mut stored = load_stored(image)?;
    oflag_copied(image, &mut stored, findings, repair)?;
    run.image_end_offset = (highest + 1) * image.cluster_size;
    image.reload_refcounts()?;
    Ok(run)
}

/// QEMU's `compare_refcounts`: every cluster's stored refcount against its references; returns
/// the highest cluster in use.
fn compare<S: Storage>(
    image: &mut Image<S>,
    stored: &mut Stored,
    counted: &Counted,
    findings: &mut Findings,
    fix: Repair,
    rebuild: &mut bool,
    monitor: &mut dyn Monitor,
) -> Result<u64> {
    let mut highest = 0;
    let base = u64::from(image.header.l1_size);
    for cluster in 0..counted.len() {
        if cluster % 4096 == 0 {
            if fix == Repair::None {
                checkpoint(monitor)?;
            }
            monitor.advance(base + cluster);
        }
        let Ok(refcount) = stored.get(&mut image.file, cluster)? else {
            findings.message(format!(
                "Can't get refcount for cluster {cluster}: Input/output error"
            ));
            findings.tally.check_errors += 1;
            continue;
        };
        let reference = counted.get(cluster);
        if refcount > 0 || reference > 0 {
            highest = cluster;
        }
        if refcount == reference {
            continue;
        }
        let fixable = if refcount == 0 {
            *rebuild = true;
            false
        } else if refcount > reference {
            fix != Repair::None
        } else {
            fix == Repair::All
        };
        let verb = if fixable {
            "Repairing"
        } else if refcount < reference {
            "ERROR"
        } else {
            "Leaked"
        };
        findings.message(format!(
            "{verb} cluster {cluster} refcount={refcount} reference={reference}"
        ));
        if fixable && stored.set(&mut image.file, cluster, reference).is_ok() {
            if reference == 0 {
                // QEMU discards a cluster whose leaked refcount drops to zero.
                let cluster_size = image.cluster_size;
                let file_len = image.file.len().map_err(Error::ReadHeader)?;
                let start = cluster * cluster_size;
                if start < file_len {
                    let len = cluster_size.min(file_len - start);
                    image
                        .file
                        .discard(start, len)
                        .map_err(|source| Error::WriteData {
                            offset: start,
                            source,
                        })?;
                }
            }
            if refcount > reference {
                findings.tally.leaks_fixed += 1;
            } else {
                findings.tally.corruptions_fixed += 1;
            }
            continue;
        }
        if refcount < reference {
            findings.tally.corruptions += 1;
        } else {
            findings.tally.leaks += 1;
        }
    }
    stored.flush(&mut image.file)?;
    Ok(highest)
}

/// QEMU's `check_oflag_copied`: the COPIED flag of active L1 and L2 entries must say whether the
/// stored refcount is exactly 1.
fn oflag_copied<S: Storage>(
    image: &mut Image<S>,
    stored: &mut Stored,
    findings: &mut Findings,
    fix: Repair,
) -> Result<()> {
    let repair = match fix {
        Repair::All => true,
        Repair::Leaks => {
            let t = findings.tally;
            t.check_errors == 0 && t.corruptions == 0 && t.leaks == 0
        }
        Repair::None => false,
    };
    let verb = if repair { "Repairing" } else { "ERROR" };
    let cluster_bits = image.cluster_bits;
    let cluster_size = image.cluster_size;
    let extended = image.header.incompatible_features & crate::header::INCOMPAT_EXTL2 != 0;
    let data_file = has_data_file(image);
    let words = if extended { 2 } else { 1 };
    let l1_offset = image.header.l1_table_offset;
    let mut l1 = vec![0u8; image.header.l1_size as usize * 8];
    read_padded(&mut image.file, &mut l1, l1_offset).map_err(Error::ReadL1Table)?;
    for index in 0..image.header.l1_size as usize {
        let l1_entry = BigEndian::read_u64(&l1[index * 8..]);
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        let Ok(refcount) = stored.get(&mut image.file, l2_offset >> cluster_bits)? else {
            continue;
        };
        if (refcount == 1) != (l1_entry & COPIED != 0) {
            findings.corruption(format!(
                "{verb} OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={l1_entry:x} \
                 refcount={refcount}"
            ));
            if repair {
                let value = if refcount == 1 {
                    l1_entry | COPIED
                } else {
                    l1_entry & !COPIED
                };
                let at = l1_offset + index as u64 * 8;
                image
                    .file
                    .write_at(&value.to_be_bytes(), at)
                    .map_err(Error::WriteL1Table)?;
                findings.tally.corruptions -= 1;
                findings.tally.corruptions_fixed += 1;
            }
        }
        let mut table = vec![0u8; cluster_size as usize];
        read_padded(&mut image.file, &mut table, l2_offset).map_err(|source| {
            Error::ReadL2Table {
                offset: l2_offset,
                source,
            }
        })?;
        let mut dirty = 0;
        for slot in 0..(cluster_size / (8 * words)) as usize {
            let at = slot * 8 * words as usize;
            let entry = BigEndian::read_u64(&table[at..]);
            if !matches!(
                kind(entry, extended, data_file),
                Kind::Normal | Kind::ZeroAlloc
            ) {
                continue;
            }
            let refcount = if data_file {
                1
            } else {
                match stored.get(&mut image.file, (entry & OFFSET_MASK) >> cluster_bits)? {
                    Ok(refcount) => refcount,
                    Err(_) => continue,
                }
            };
            if (refcount == 1) != (entry & COPIED != 0) {
                findings.corruption(format!(
                    "{verb} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"
                ));
                if repair {
                    let value = if refcount == 1 {
                        entry | COPIED
                    } else {
                        entry & !COPIED
                    };
                    BigEndian::write_u64(&mut table[at..], value);
                    dirty += 1;
                }
            }
        }
        if dirty > 0 {
            image
                .file
                .write_at(&table, l2_offset)
                .map_err(|source| Error::WriteL2Table {
                    offset: l2_offset,
                    source,
                })?;
            findings.tally.corruptions -= dirty;
            findings.tally.corruptions_fixed += dirty;
        }
    }
    image.file.flush().map_err(Error::Flush)?;
    // The active L1 table may have changed on disk.
    if repair {
        let mut fresh = vec![0u8; image.l1.len() * 8];
        read_padded(&mut image.file, &mut fresh, l1_offset).map_err(Error::ReadL1Table)?;
        for (index, entry) in image.l1.iter_mut().enumerate() {
            *entry = BigEndian::read_u64(&fresh[index * 8..]);
        }
    }
    Ok(())
}
