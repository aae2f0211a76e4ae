//! `qcow map` against `qemu-img map`, byte for byte, on images whose maps are made of long runs:
//! `qcow` reads a run of like clusters at a time and merges runs as qemu-img merges its extents,
//! so these images put runs across L2-table boundaries, zero, discarded and compressed clusters
//! inside runs, holes under metadata-preallocated clusters, extended L2 subclusters, and runs of
//! an overlay falling through to a qcow2 and a raw backing file that end at different places.

use std::path::Path;

use cowvm_tests::dropin::{qemu_img_in, qemu_io_in, Twin};
use cowvm_tests::qcow_harness::skip_without_qemu;

/// The images (4 KiB clusters, so an L2 table maps 2 MiB, unless said otherwise):
/// - `runs.q`: L2 tables made first (zero writes), then 4 MiB of data written at 1 MiB lands
///   contiguously on the host across the tables at 2 and 4 MiB; a zero run; a data run with a
///   discarded and a zeroed part; two guest-adjacent clusters in reverse order on the host.
/// - `comp.q`: data, three adjacent compressed clusters, data, a lone compressed cluster.
/// - `pm.q`: `preallocation=metadata`, data written over the holes across a table boundary, a
///   zeroed and a discarded part.
/// - `base.raw` (sparse, data in places) ← `mid.q` (4 MiB, data and zeros) ← `top.q` (5 MiB,
///   64 KiB clusters with extended L2 entries: subcluster data and zeros, past the end of
///   `mid.q`).
fn prepare(dir: &Path) {
    create(dir, "cluster_size=4k", None, "runs.q", "8M");
    qemu_io_in(
        dir,
        "qcow2",
        "runs.q",
        &[
            "write -z 0 4k",
            "write -z 2M 4k",
            "write -z 4M 4k",
            "write -P 5 1M 4M",
            "write -z 6M 64k",
            "write -P 6 7M 256k",
            "discard 7405568 8k",
            "write -z -u 7471104 8k",
            "write -P 7 7868416 4k",
            "write -P 8 7864320 4k",
        ],
    );
    create(dir, "cluster_size=4k", None, "comp.q", "2M");
    qemu_io_in(
        dir,
        "qcow2",
        "comp.q",
        &[
            "write -P 1 0 64k",
            "write -c -P 2 64k 4k",
            "write -c -P 3 68k 4k",
            "write -c -P 4 72k 4k",
            "write -P 5 76k 4k",
            "write -c -P 6 1M 4k",
        ],
    );
    create(
        dir,
        "preallocation=metadata,cluster_size=4k",
        None,
        "pm.q",
        "8M",
    );
    qemu_io_in(
        dir,
        "qcow2",
        "pm.q",
        &[
            "write -P 3 1M 2M",
            "write -P 4 4092k 8k",
            "write -z 5M 16k",
            "discard 6M 8k",
        ],
    );
    let base = std::fs::File::create(dir.join("base.raw")).expect("create base.raw");
    base.set_len(3 << 20).expect("size base.raw");
    qemu_io_in(
        dir,
        "raw",
        "base.raw",
        &[
            "write -P 7 0 512k",
            "write -P 8 1M 4k",
            "write -P 9 2097664 1536",
        ],
    );
    create(
        dir,
        "cluster_size=4k",
        Some(("base.raw", "raw")),
        "mid.q",
        "4M",
    );
    qemu_io_in(
        dir,
        "qcow2",
        "mid.q",
        &[
            "write -P 10 256k 256k",
            "write -z 1M 8k",
            "write -P 11 2101248 1M",
        ],
    );
    create(
        dir,
        "extended_l2=on,cluster_size=64k",
        Some(("mid.q", "qcow2")),
        "top.q",
        "5M",
    );
    qemu_io_in(
        dir,
        "qcow2",
        "top.q",
        &[
            "write -P 12 0 6k",
            "write -z 10k 4k",
            "write -P 13 126k 4k",
            "write -P 14 1M 256k",
            "discard 1114112 64k",
            "write -z 3M 128k",
            "write -P 15 4196352 2k",
        ],
    );
}

/// `qemu-img create -f qcow2 -o OPTIONS [-b BACKING -F FORMAT] NAME SIZE` in `dir`.
fn create(dir: &Path, options: &str, backing: Option<(&str, &str)>, name: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", options];
    if let Some((file, format)) = backing {
        args.extend(["-b", file, "-F", format]);
    }
    args.extend([name, size]);
    qemu_img_in(dir, &args);
}

#[test]
fn long_runs_map_like_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    // `map` changes nothing, so one pair of directories serves every command line.
    let twin = Twin::new();
    twin.prepare(prepare);
    twin.assert_table_read_only(&[
        "map runs.q",
        "map --output=json runs.q",
        "map --output=json -s 3000 -l 5M runs.q",
        // Human output stops with an error at the first compressed extent.
        "map comp.q",
        "map --output=json comp.q",
        "map pm.q",
        "map --output=json pm.q",
        "map --output=json -s 1050000 -l 3000000 pm.q",
        "map mid.q",
        "map --output=json mid.q",
        "map top.q",
        "map --output=json top.q",
        "map -s 70000 -l 4000000 top.q",
        "map --output=json -s 2M -l 1M top.q",
    ]);
}
