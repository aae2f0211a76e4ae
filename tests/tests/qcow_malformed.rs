//! Hostile-image corpus: a valid small image made by qemu-img, patched field by field (big-endian,
//! per the qcow2 header layout) into the classic malformed images. `qcow` must refuse each with a
//! clear message — non-zero exit, no panic, no hang, no huge allocation — or, where the damage is
//! only found on use, report it from `check` and refuse to make it worse.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cowvm_tests::dropin::normalise;
use cowvm_tests::qcow_harness::{
    get_be, put_be, qemu_img, qemu_io, run_with_timeout, skip_without_qemu, RunOutput,
};

const CLUSTER: u64 = 64 * 1024;
/// Address-space cap for every `qcow` run: a parser that trusts a size field and allocates it fails.
const ADDRESS_SPACE_LIMIT: u64 = 2 << 30;
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Header field offsets (qcow2 spec §header).
mod field {
    pub const VERSION: usize = 4;
    pub const BACKING_OFFSET: usize = 8;
    pub const BACKING_SIZE: usize = 16;
    pub const CLUSTER_BITS: usize = 20;
    pub const SIZE: usize = 24;
    pub const L1_SIZE: usize = 36;
    pub const L1_OFFSET: usize = 40;
    pub const REFTABLE_OFFSET: usize = 48;
    pub const REFTABLE_CLUSTERS: usize = 56;
    pub const NB_SNAPSHOTS: usize = 60;
    pub const SNAPSHOTS_OFFSET: usize = 64;
    pub const INCOMPATIBLE: usize = 72;
    pub const REFCOUNT_ORDER: usize = 96;
    pub const HEADER_LENGTH: usize = 100;
}

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

/// Runs `qcow ARGS… image` under the address-space cap and the time limit.
fn qcow_run(args: &[&str], image: &Path) -> RunOutput {
    let qcow = cowvm_tests::bin_path("qcow");
    let mut command = if Path::new("/usr/bin/prlimit").exists() {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--as={ADDRESS_SPACE_LIMIT}"))
            .arg("--")
            .arg(qcow);
        command
    } else {
        Command::new(qcow)
    };
    command.args(args).arg(image);
    run_with_timeout(&mut command, CASE_TIMEOUT)
}

/// No panic, no hang, no signal (an allocation failure aborts), no allocation-failure message.
fn assert_orderly(out: &RunOutput, case: &str) {
    assert!(
        !out.timed_out,
        "{case}: qcow did not finish within {CASE_TIMEOUT:?}\n{}",
        out.describe()
    );
    assert!(
        out.code.is_some(),
        "{case}: qcow was killed by a signal (abort on a huge allocation?)\n{}",
        out.describe()
    );
    for bad in [
        "panicked",
        "memory allocation of",
        "RUST_BACKTRACE",
        "stack overflow",
    ] {
        assert!(
            !out.stderr.contains(bad) && !out.stdout.contains(bad),
            "{case}: qcow output contains {bad:?}\n{}",
            out.describe()
        );
    }
}

/// Asserts `out` failed in an orderly way with every one of `needles` in its message (any case).
fn assert_refused(out: &RunOutput, case: &str, needles: &[&str]) {
    assert_orderly(out, case);
    assert!(
        !out.success(),
        "{case}: qcow accepted a malformed image\n{}",
        out.describe()
    );
    let message = format!("{}{}", out.stderr, out.stdout).to_lowercase();
    for needle in needles {
        assert!(
            message.contains(&needle.to_lowercase()),
            "{case}: the error does not mention {needle:?}\n{}",
            out.describe()
        );
    }
}

/// Asserts that qcow ended like qemu-img: same exit status, same output, same stderr with the
/// program name normalised (`check` opens some images `info` refuses, to report and repair them).
fn assert_same_outcome(qemu: &RunOutput, qcow: &RunOutput, case: &str) {
    assert_orderly(qcow, case);
    let want = normalise(&qemu.stderr, "qemu-img") + &qemu.stdout;
    let got = normalise(&qcow.stderr, "qcow") + &qcow.stdout;
    assert!(
        qemu.code == qcow.code && want == got,
        "{case}: qcow does not fail like qemu-img\n--- qemu-img (exit {:?})\n{want}--- qcow\n{}",
        qemu.code,
        qcow.describe()
    );
}

/// The valid starting point: 4 MiB, 64 KiB clusters, v3, data at guest 0..128 KiB (0xaa) and
/// 1 MiB..+64 KiB (0xbb). qemu-img lays it out as header 0, reftable 0x10000, refblock 0x20000,
/// L1 0x30000, L2 0x40000, data from 0x50000; the test reads the offsets from the header anyway.
struct Base {
    bytes: Vec<u8>,
    l1_offset: u64,
    l2_offset: u64,
    reftable_offset: u64,
}

fn make_base(dir: &Path) -> Base {
    let path = dir.join("base.qcow2");
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
        "4M".as_ref(),
    ])
    .ok();
    qemu_io(
        &path,
        "qcow2",
        &[
            "write -P 170 0 131072".into(),
            "write -P 187 1048576 65536".into(),
        ],
    );
    let bytes = std::fs::read(&path).expect("read base image");
    assert_eq!(
        get_be(&bytes, field::CLUSTER_BITS, 4),
        16,
        "base image cluster size"
    );
    let l1_offset = get_be(&bytes, field::L1_OFFSET, 8);
    let l2_offset = get_be(&bytes, l1_offset as usize, 8) & 0x00ff_ffff_ffff_fe00;
    let reftable_offset = get_be(&bytes, field::REFTABLE_OFFSET, 8);
    assert!(l2_offset != 0, "base image has an L2 table");
    Base {
        bytes,
        l1_offset,
        l2_offset,
        reftable_offset,
    }
}

/// Writes `bytes` as `dir/name.qcow2`.
fn write_case(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(format!("{name}.qcow2"));
    std::fs::write(&path, bytes).expect("write malformed image");
    path
}

/// Images every command must refuse at open, each with the words its message must contain.
fn open_failures(base: &Base) -> Vec<(&'static str, Vec<u8>, Vec<&'static str>, bool)> {
    let patched = |patches: &[(usize, usize, u64)]| {
        let mut bytes = base.bytes.clone();
        for &(offset, width, value) in patches {
            put_be(&mut bytes, offset, width, value);
        }
        bytes
    };
    // (name, image bytes, words the message must contain, qemu-img refuses it too)
    let mut cases = vec![
        (
            "huge-header-length",
            patched(&[(field::HEADER_LENGTH, 4, 0xffff_fff8)]),
            vec!["header_length"],
            true,
        ),
        (
            "header-length-below-104",
            patched(&[(field::HEADER_LENGTH, 4, 64)]),
            vec!["header_length"],
            true,
        ),
        (
            "huge-l1-size",
            patched(&[(field::L1_SIZE, 4, 0x1000_0000)]),
            vec!["L1 table too large"],
            true,
        ),
        (
            "l1-offset-unaligned",
            patched(&[(field::L1_OFFSET, 8, base.l1_offset + 0x200)]),
            vec!["L1 table offset", "not cluster aligned"],
            true,
        ),
        (
            "l1-offset-past-eof",
            patched(&[(field::L1_OFFSET, 8, 0x40_0000_0000)]),
            vec!["L1 table offset", "past the end of the file"],
            false,
        ),
        (
            "l1-offset-beyond-qcow2-limit",
            patched(&[(field::L1_OFFSET, 8, 0xffff_ffff_ffff_0000)]),
            vec!["L1 table offset"],
            true,
        ),
        (
            // qemu-img accepts this one (it only checks alignment) and maps the header as L1.
            "l1-offset-zero",
            patched(&[(field::L1_OFFSET, 8, 0)]),
            vec!["L1 table offset"],
            false,
        ),
        (
            "l1-too-small-for-size",
            patched(&[(field::SIZE, 8, 1 << 40)]),
            vec!["L1 table too small"],
            true,
        ),
        (
            "huge-virtual-size",
            patched(&[(field::SIZE, 8, u64::MAX - 511)]),
            vec!["too big"],
            true,
        ),
        (
            "refcount-table-past-eof",
            patched(&[(field::REFTABLE_OFFSET, 8, 0x40_0000_0000)]),
            vec!["refcount table offset", "past the end of the file"],
            false,
        ),
        (
            "refcount-table-unaligned",
            patched(&[(field::REFTABLE_OFFSET, 8, base.reftable_offset + 8)]),
            vec!["refcount table offset", "not cluster aligned"],
            true,
        ),
        (
            "huge-refcount-table",
            patched(&[(field::REFTABLE_CLUSTERS, 4, 0xffff_ffff)]),
            vec!["refcount table too large"],
            true,
        ),
        (
            "refcount-table-zero-clusters",
            patched(&[(field::REFTABLE_CLUSTERS, 4, 0)]),
            vec!["refcount table"],
            true,
        ),
        (
            "too-many-snapshots",
            patched(&[
                (field::NB_SNAPSHOTS, 4, 65537),
                (field::SNAPSHOTS_OFFSET, 8, 0x60000),
            ]),
            vec!["too many snapshots"],
            true,
        ),
        (
            "all-snapshots-count",
            patched(&[
                (field::NB_SNAPSHOTS, 4, u32::MAX as u64),
                (field::SNAPSHOTS_OFFSET, 8, 0x60000),
            ]),
            vec!["too many snapshots"],
            true,
        ),
        (
            "snapshot-table-past-eof",
            patched(&[
                (field::NB_SNAPSHOTS, 4, 1),
                (field::SNAPSHOTS_OFFSET, 8, 0x40_0000_0000),
            ]),
            vec!["snapshot table", "past the end of the file"],
            // qemu-img reads zeros past the end of the file, so it opens this one.
            false,
        ),
        (
            "snapshot-table-unaligned",
            patched(&[
                (field::NB_SNAPSHOTS, 4, 1),
                (field::SNAPSHOTS_OFFSET, 8, 0x30008),
            ]),
            vec!["snapshot table offset", "not cluster aligned"],
            true,
        ),
        (
            "cluster-bits-8",
            patched(&[(field::CLUSTER_BITS, 4, 8)]),
            vec!["cluster_bits 8"],
            true,
        ),
        (
            "cluster-bits-22",
            patched(&[(field::CLUSTER_BITS, 4, 22)]),
            vec!["cluster_bits 22"],
            true,
        ),
        (
            "cluster-bits-63",
            patched(&[(field::CLUSTER_BITS, 4, 63)]),
            vec!["cluster_bits 63"],
            true,
        ),
        (
            "refcount-order-7",
            patched(&[(field::REFCOUNT_ORDER, 4, 7)]),
            vec!["refcount_order 7"],
            true,
        ),
        (
            "backing-name-2000-bytes",
            patched(&[
                (field::BACKING_OFFSET, 8, 0x200),
                (field::BACKING_SIZE, 4, 2000),
            ]),
            vec!["backing file name too long"],
            true,
        ),
        (
            "backing-offset-past-header-cluster",
            patched(&[
                (field::BACKING_OFFSET, 8, 0x10_0000),
                (field::BACKING_SIZE, 4, 8),
            ]),
            vec!["backing file offset"],
            true,
        ),
        (
            "unknown-incompatible-bit-20",
            patched(&[(field::INCOMPATIBLE, 8, 1 << 20)]),
            vec![
                "Unsupported qcow2 feature(s)",
                "Unknown incompatible feature: 100000",
            ],
            true,
        ),
        (
            "version-4",
            patched(&[(field::VERSION, 4, 4)]),
            vec!["version 4"],
            true,
        ),
        (
            "version-1",
            patched(&[(field::VERSION, 4, 1)]),
            vec!["version 1"],
            true,
        ),
    ];
    // A header extension whose length runs past the header cluster.
    let mut extension = base.bytes.clone();
    let header_length = get_be(&extension, field::HEADER_LENGTH, 4) as usize;
    put_be(&mut extension, header_length, 4, 0x1234_5678);
    put_be(&mut extension, header_length + 4, 4, 0xffff_fff0);
    cases.push((
        "huge-header-extension",
        extension,
        vec!["header extension"],
        true,
    ));
    // Truncated files.
    for (name, len, needles) in [
        ("truncated-to-50", 50, vec!["header"]),
        ("truncated-to-100", 100, vec!["header"]),
        (
            "truncated-to-70000",
            70_000,
            vec!["past the end of the file"],
        ),
    ] {
        // qemu reads zeros past the end of the file, so it opens the last one.
        cases.push((name, base.bytes[..len].to_vec(), needles, len < 70_000));
    }
    cases
}

#[test]
fn malformed_headers_are_refused_with_clear_errors() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let base = make_base(dir.path());
    let mut failures = Vec::new();
    for (name, bytes, needles, qemu_refuses) in open_failures(&base) {
        let path = write_case(dir.path(), name, &bytes);
        if qemu_refuses {
            // The judge: qemu-img must refuse the same image, or the patch is not what it claims.
            let qemu = qemu_img(&[
                "info".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                path.as_os_str(),
            ]);
            assert!(
                !qemu.success(),
                "{name}: qemu-img opens this image, so the test patch is wrong\n{}",
                qemu.describe()
            );
        }
        for args in [
            &["info"][..],
            &["info", "--output", "json"][..],
            &["io", "-c", "read 0 65536"][..],
            &["map", "--output", "json"][..],
            &["check"][..],
        ] {
            let out = qcow_run(args, &path);
            let case = format!("{name} (qcow {})", args.join(" "));
            // The qemu-img commands must fail exactly as qemu-img does (same message, same exit
            // status); `io` (qemu-io's job) and images only qcow refuses keep the library's
            // explanation.
            let result = if qemu_refuses && args[0] != "io" {
                let mut qemu_args: Vec<&std::ffi::OsStr> = vec!["-f".as_ref(), "qcow2".as_ref()];
                qemu_args.splice(0..0, args.iter().map(|a| a.as_ref()));
                qemu_args.push(path.as_os_str());
                let qemu = qemu_img(&qemu_args);
                let mut qcow_args = args.to_vec();
                qcow_args.extend(["-f", "qcow2"]);
                let out = qcow_run(&qcow_args, &path);
                std::panic::catch_unwind(|| assert_same_outcome(&qemu, &out, &case))
            } else {
                std::panic::catch_unwind(|| assert_refused(&out, &case, &needles))
            };
            // Collect every failure so one run shows the whole picture.
            if let Err(panic) = result {
                failures.push(panic_text(panic));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} malformed-image failures:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Damage that is found on use: open succeeds, `check` reports corruption (exit 2, as
/// qemu-img check does), reads of the damaged range fail cleanly, and no write makes it worse.
#[test]
fn damaged_tables_are_reported_and_never_written_through() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let base = make_base(dir.path());
    let l1 = base.l1_offset as usize;
    let l2 = base.l2_offset as usize;
    let reftable = base.reftable_offset as usize;
    let patched = |offset: usize, value: u64| {
        let mut bytes = base.bytes.clone();
        put_be(&mut bytes, offset, 8, value);
        bytes
    };
    // (name, bytes, does reading guest 0..64 KiB fail, words in that read error)
    let cases: Vec<(&str, Vec<u8>, bool, Vec<&str>)> = vec![
        (
            "l2-offset-unaligned",
            patched(l1, COPIED | (base.l2_offset + 0x200)),
            true,
            vec!["unaligned"],
        ),
        (
            "l2-table-past-eof",
            patched(l1, COPIED | 0x40_0000_0000),
            true,
            vec!["past the end of the file"],
        ),
        (
            "l2-entry-at-refcount-table",
            patched(l2, COPIED | base.reftable_offset),
            false,
            vec![],
        ),
        (
            "l2-entry-at-l1-table",
            patched(l2, COPIED | base.l1_offset),
            false,
            vec![],
        ),
        (
            "l2-entry-compressed-at-header",
            patched(l2, COMPRESSED),
            true,
            vec!["decompress"],
        ),
        (
            "l2-entry-unaligned-data",
            patched(l2, COPIED | 0x50200),
            true,
            vec!["unaligned"],
        ),
        (
            "refcount-block-at-offset-0",
            patched(reftable, 0),
            false,
            vec![],
        ),
        (
            "refcount-block-unaligned",
            patched(reftable, 0x20100),
            false,
            vec![],
        ),
    ];
    let mut failures = Vec::new();
    for (name, bytes, read_fails, needles) in cases {
        let path = write_case(dir.path(), name, &bytes);
        let tables = (l1, l2, reftable);
        let outcome =
            std::panic::catch_unwind(|| damaged_case(name, &path, read_fails, &needles, tables));
        if let Err(panic) = outcome {
            failures.push(panic_text(panic));
        }
    }
    assert!(
        failures.is_empty(),
        "{} damaged-table failures:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
        .unwrap_or_else(|| "non-string panic".into())
}

/// One damaged-table case; `tables` holds the (L1, L2, refcount table) offsets.
fn damaged_case(
    name: &str,
    path: &Path,
    read_fails: bool,
    needles: &[&str],
    (l1, l2, reftable): (usize, usize, usize),
) {
    let qemu_check = qemu_img(&["check".as_ref(), path.as_os_str()]);
    assert_eq!(
        qemu_check.code,
        Some(2),
        "{name}: qemu-img check does not call this image corrupt, so the test patch is wrong\n{}",
        qemu_check.describe()
    );
    let check = qcow_run(&["check"], path);
    assert_orderly(&check, name);
    assert_eq!(
        check.code,
        Some(2),
        "{name}: qcow check must report corruption (exit 2) as qemu-img check does\n{}",
        check.describe()
    );
    let read = qcow_run(&["io", "-c", "read 0 65536"], path);
    if read_fails {
        assert_refused(
            &read,
            &format!("{name} (read of the damaged range)"),
            needles,
        );
    } else {
        assert_orderly(&read, name);
    }
    // Data elsewhere is still readable when the damage does not reach it.
    if name.starts_with("l2-entry") {
        let other = qcow_run(&["io", "-c", "read -P 170 65536 65536"], path);
        assert_orderly(&other, name);
        assert!(
            other.success(),
            "{name}: undamaged data must stay readable\n{}",
            other.describe()
        );
    }
    // Writes: into the damaged cluster and into fresh space. Whatever qcow answers, it must not
    // write over metadata (header, reftable, L1, L2) nor over other data.
    let before = std::fs::read(path).expect("read case");
    for write in ["write -P 9 0 512", "write -P 9 2097152 65536"] {
        let out = qcow_run(&["io", "-c", write], path);
        assert_orderly(&out, name);
        let after = std::fs::read(path).expect("read case");
        // Allowed to change: the incompatible-feature bits (qemu sets the corrupt bit when it
        // finds damage) and the L2 entry of guest 2 MiB (index 32), which the second write maps.
        let masked = |bytes: &[u8]| {
            let mut bytes = bytes.to_vec();
            bytes[field::INCOMPATIBLE..field::INCOMPATIBLE + 8].fill(0);
            bytes[l2 + 32 * 8..l2 + 33 * 8].fill(0);
            bytes
        };
        let (before_masked, after_masked) = (masked(&before), masked(&after));
        for (what, start) in [
            ("header", 0usize),
            ("refcount table", reftable),
            ("L1 table", l1),
            ("L2 table", l2),
            ("data", 0x60000),
        ] {
            let end = (start + CLUSTER as usize).min(before.len());
            assert!(
                after.len() >= end && before_masked[start..end] == after_masked[start..end],
                "{name}: `{write}` changed the {what} cluster at {start:#x}\n{}",
                out.describe()
            );
        }
        let through_metadata =
            name == "l2-entry-at-refcount-table" || name == "l2-entry-at-l1-table";
        if through_metadata && write.ends_with(" 0 512") {
            assert!(
                !out.success(),
                "{name}: `{write}` through an L2 entry that points at metadata must fail\n{}",
                out.describe()
            );
        }
    }
}

#[test]
fn corrupt_bit_opens_read_only() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let base = make_base(dir.path());
    let mut bytes = base.bytes.clone();
    put_be(&mut bytes, field::INCOMPATIBLE, 8, 1 << 1);
    let path = write_case(dir.path(), "corrupt-bit", &bytes);
    let qemu = qemu_img(&["info".as_ref(), "--output=json".as_ref(), path.as_os_str()]).ok();
    assert!(
        qemu.stdout.contains("\"corrupt\": true"),
        "qemu-img sees the corrupt bit\n{}",
        qemu.describe()
    );

    let read = qcow_run(
        &[
            "io",
            "-c",
            "read -P 170 0 131072",
            "-c",
            "read -P 187 1048576 65536",
        ],
        &path,
    );
    assert_orderly(&read, "corrupt bit, read");
    assert!(
        read.success(),
        "a corrupt-flagged image must still be readable\n{}",
        read.describe()
    );

    let write = qcow_run(&["io", "-c", "write -P 1 0 512"], &path);
    assert_refused(&write, "corrupt bit, write", &["corrupt"]);
    assert_eq!(
        std::fs::read(&path).expect("read image"),
        bytes,
        "the refused write changed the file"
    );

    let info = qcow_run(&["info", "--output", "json"], &path);
    assert_orderly(&info, "corrupt bit, info");
    assert!(
        info.success(),
        "qcow info must open a corrupt-flagged image\n{}",
        info.describe()
    );
    let json: serde_json::Value = serde_json::from_str(&info.stdout).expect("qcow info JSON");
    assert_eq!(
        json.pointer("/format-specific/data/corrupt"),
        Some(&serde_json::Value::Bool(true))
    );
}

#[test]
fn backing_file_loop_is_refused() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("loop.qcow2");
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-u".as_ref(),
        "-b".as_ref(),
        "loop.qcow2".as_ref(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
        "1M".as_ref(),
    ])
    .ok();
    // qemu-img info does not open backing files (so it shows this image); with --backing-chain
    // it refuses the loop, and qcow must say exactly the same.
    let qemu = qemu_img(&[
        "info".as_ref(),
        "--backing-chain".as_ref(),
        path.as_os_str(),
    ]);
    let out = qcow_run(&["info", "--backing-chain"], &path);
    assert_same_outcome(&qemu, &out, "self-backing image (info --backing-chain)");
    assert!(
        out.stderr.contains("creates an infinite loop"),
        "{}",
        out.describe()
    );
    // qemu-img map and qemu-io never return on such a chain; qcow refuses it.
    for args in [
        &["io", "-c", "read 0 512"][..],
        &["map", "--output", "json"][..],
    ] {
        let out = qcow_run(args, &path);
        assert_refused(
            &out,
            &format!("self-backing image (qcow {})", args.join(" ")),
            &["backing"],
        );
    }
}

/// Without `-f`, a file that is not qcow2 is raw (as qemu-img probes it); with `-f qcow2` it must be
/// refused for its magic.
#[test]
fn explicit_qcow2_format_on_a_non_qcow2_file_is_refused() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let base = make_base(dir.path());
    let mut bytes = base.bytes.clone();
    put_be(&mut bytes, 0, 4, 0x5146_49fa);
    let path = write_case(dir.path(), "bad-magic", &bytes);
    let out = qcow_run(&["io", "-f", "qcow2", "-c", "read 0 512"], &path);
    assert_refused(&out, "bad magic with -f qcow2", &["magic"]);
}

/// `qcow check` exit codes and repairs against qemu-img's verdicts: 3 for leaks only (`-r leaks`
/// fixes them), 2 for corruptions (`-r all` fixes them), and qemu-img finds the repaired image clean
/// with its data intact.
#[test]
fn check_exit_codes_and_repairs_match_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let base = make_base(dir.path());
    let refblock = get_be(&base.bytes, base.reftable_offset as usize, 8) as usize;
    let file_clusters = base.bytes.len() / CLUSTER as usize;
    let data = get_be(&base.bytes, base.l2_offset as usize, 8);

    // A leak: one more cluster at the end of the file with refcount 1 and no reference.
    let mut leaked = base.bytes.clone();
    leaked.extend(vec![0u8; CLUSTER as usize]);
    put_be(&mut leaked, refblock + 2 * file_clusters, 2, 1);
    // Corruptions: COPIED missing on a data cluster; a used cluster's refcount dropped to 0.
    let copied_missing = {
        let mut bytes = base.bytes.clone();
        put_be(&mut bytes, base.l2_offset as usize, 8, data & !COPIED);
        bytes
    };
    let refcount_zero = {
        let mut bytes = base.bytes.clone();
        let cluster = ((data & 0x00ff_ffff_ffff_fe00) / CLUSTER) as usize;
        put_be(&mut bytes, refblock + 2 * cluster, 2, 0);
        bytes
    };
    for (name, bytes, exit, repair) in [
        ("leaked-cluster", leaked, 3, "leaks"),
        ("copied-flag-missing", copied_missing, 2, "all"),
        ("refcount-zero", refcount_zero, 2, "all"),
    ] {
        let path = write_case(dir.path(), name, &bytes);
        let qemu = qemu_img(&["check".as_ref(), path.as_os_str()]);
        assert_eq!(
            qemu.code,
            Some(exit),
            "{name}: qemu-img check's verdict\n{}",
            qemu.describe()
        );
        let check = qcow_run(&["check"], &path);
        assert_orderly(&check, name);
        assert_eq!(
            check.code,
            Some(exit),
            "{name}: qcow check exit code\n{}",
            check.describe()
        );
        let json = qcow_run(&["check", "--output", "json"], &path);
        let parsed: serde_json::Value = serde_json::from_str(&json.stdout)
            .unwrap_or_else(|err| panic!("{name}: check JSON ({err})\n{}", json.describe()));
        let key = if exit == 3 { "leaks" } else { "corruptions" };
        assert!(
            parsed
                .get(key)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
                > 0,
            "{name}: qcow check --output json reports no {key}\n{}",
            json.stdout
        );

        let repaired = qcow_run(&["check", "-r", repair], &path);
        assert_orderly(&repaired, name);
        assert_eq!(
            repaired.code,
            Some(0),
            "{name}: qcow check -r {repair} must repair and exit 0\n{}",
            repaired.describe()
        );
        let after = qemu_img(&["check".as_ref(), path.as_os_str()]);
        assert_eq!(
            after.code,
            Some(0),
            "{name}: qemu-img check after qcow check -r {repair}\n{}",
            after.describe()
        );
        let read = qcow_run(
            &[
                "io",
                "-c",
                "read -P 170 0 131072",
                "-c",
                "read -P 187 1048576 65536",
            ],
            &path,
        );
        assert!(
            read.success(),
            "{name}: data after the repair\n{}",
            read.describe()
        );
    }
}

/// Hostile internal-snapshot entries (qemu-iotests 080 territory): every command either refuses
/// the image with a message about the snapshot table, or opens it and `check` reports the damage;
/// none may panic, hang or allocate what a size field claims.
#[test]
fn malformed_snapshot_entries_are_handled() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("snap-base.qcow2");
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
        "4M".as_ref(),
    ])
    .ok();
    qemu_io(&path, "qcow2", &["write -P 170 0 131072".into()]);
    qemu_img(&[
        "snapshot".as_ref(),
        "-c".as_ref(),
        "first".as_ref(),
        path.as_os_str(),
    ])
    .ok();
    qemu_io(&path, "qcow2", &["write -P 187 1048576 65536".into()]);
    let bytes = std::fs::read(&path).expect("read base");
    let table = get_be(&bytes, field::SNAPSHOTS_OFFSET, 8) as usize;
    assert_eq!(get_be(&bytes, field::NB_SNAPSHOTS, 4), 1);
    // Snapshot entry fields: L1 offset (0, 8 B), L1 size (8, 4 B), id length (12, 2 B),
    // name length (14, 2 B), extra data size (36, 4 B).
    let cases: [(&str, usize, usize, u64); 7] = [
        ("snapshot-l1-unaligned", 0, 8, 0x30200),
        ("snapshot-l1-past-eof", 0, 8, 0x40_0000_0000),
        (
            "snapshot-l1-offset-beyond-limit",
            0,
            8,
            0xffff_ffff_ffff_0000,
        ),
        ("snapshot-l1-size-huge", 8, 4, 0x1000_0000),
        ("snapshot-id-length-huge", 12, 2, 0xffff),
        ("snapshot-name-length-huge", 14, 2, 0xffff),
        ("snapshot-extra-data-huge", 36, 4, 0xffff_fff0),
    ];
    let mut failures = Vec::new();
    for (name, offset, width, value) in cases {
        let mut patched = bytes.clone();
        put_be(&mut patched, table + offset, width, value);
        let case_path = write_case(dir.path(), name, &patched);
        let outcome = std::panic::catch_unwind(|| {
            let info = qcow_run(&["info", "--output", "json"], &case_path);
            assert_orderly(&info, name);
            if info.success() {
                // Opened: the damage must show in check, and the active data must be intact.
                let check = qcow_run(&["check"], &case_path);
                assert_orderly(&check, name);
                assert_eq!(
                    check.code,
                    Some(2),
                    "{name}: opened, so qcow check must report the damaged snapshot\n{}",
                    check.describe()
                );
            } else {
                assert_refused(&info, name, &["snapshot"]);
                for args in [&["io", "-c", "read 0 512"][..], &["check"][..]] {
                    let out = qcow_run(args, &case_path);
                    assert_refused(
                        &out,
                        &format!("{name} (qcow {})", args.join(" ")),
                        &["snapshot"],
                    );
                }
            }
        });
        if let Err(panic) = outcome {
            failures.push(panic_text(panic));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
