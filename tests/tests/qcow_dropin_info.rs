//! Drop-in point 5: `qcow info` and `qcow map` against qemu-img — human and JSON output, `file
//! length` and sizes rounded as qemu-img prints them, the `bitmaps:` section, `--backing-chain`
//! (and its loop refusal), and maps of preallocated images.

use std::path::Path;

use cowvm_tests::dropin::{assert_table, qemu_img_in, qemu_io_in};
use cowvm_tests::qcow_harness::skip_without_qemu;

/// Images for both tools: a plain image with data (`a.q`), a 3-deep chain (`c3.q` → `c2.q` →
/// `c1.q`), an image with persistent bitmaps (`bm.q`), raw files whose sizes need rounding, and
/// images preallocated each way.
fn prepare(dir: &Path) {
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "a.q", "4M"]);
    qemu_io_in(
        dir,
        "qcow2",
        "a.q",
        &["write -P 7 0 128k", "write -z 1M 64k", "write -P 9 3M 4k"],
    );
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "c1.q", "2M"]);
    qemu_io_in(dir, "qcow2", "c1.q", &["write -P 1 0 1M"]);
    qemu_img_in(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "c1.q", "-F", "qcow2", "c2.q",
        ],
    );
    qemu_io_in(dir, "qcow2", "c2.q", &["write -P 2 512k 64k"]);
    qemu_img_in(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "c2.q", "-F", "qcow2", "c3.q", "3M",
        ],
    );
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "bm.q", "1M"]);
    qemu_img_in(dir, &["bitmap", "--add", "bm.q", "b1"]);
    qemu_img_in(dir, &["bitmap", "--add", "-g", "128k", "bm.q", "b2"]);
    qemu_img_in(dir, &["bitmap", "--add", "--disable", "bm.q", "b3"]);
    std::fs::write(dir.join("r1000.raw"), vec![1u8; 1000]).expect("write raw");
    // 1023.5 KiB: qemu-img's three significant digits make it "1e+03 KiB".
    std::fs::write(dir.join("rk.raw"), vec![2u8; 1_048_064]).expect("write raw");
    for mode in ["metadata", "falloc", "full"] {
        let name = format!("p-{mode}.q");
        let option = format!("preallocation={mode},cluster_size=4k");
        qemu_img_in(
            dir,
            &["create", "-q", "-f", "qcow2", "-o", &option, &name, "3M"],
        );
    }
    // l1.q and l2.q back each other.
    qemu_img_in(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "l2.q", "-F", "qcow2", "l1.q", "1M",
        ],
    );
    qemu_img_in(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "l1.q", "-F", "qcow2", "l2.q", "1M",
        ],
    );
}

#[test]
fn info_matches_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    assert_table(
        &[
            "info a.q",
            "info --output=json a.q",
            "info -f qcow2 a.q",
            "info -f raw a.q",
            "info r1000.raw",
            "info --output json rk.raw",
            "info rk.raw",
            "info bm.q",
            "info --output=json bm.q",
            "info c3.q",
            "info --backing-chain c3.q",
            "info --backing-chain --output=json c3.q",
            "info -b c2.q",
            "info l1.q",
            "info --backing-chain l1.q",
            // (Not `info p-falloc.q`: how many blocks the file system gives a fallocated file
            // varies between two identical copies, so `disk size` does too.)
            "info p-metadata.q",
            "info -U a.q",
            "info --output=xml a.q",
        ],
        prepare,
    );
}

#[test]
fn map_matches_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    assert_table(
        &[
            "map a.q",
            "map --output=json a.q",
            "map --output=json c3.q",
            "map c3.q",
            "map --output=json -s 100 -l 70000 a.q",
            "map -s 64k -l 1M a.q",
            "map --start-offset=1M --max-length=4k a.q",
            "map --output=json -s 4M a.q",
            "map -s 1x a.q",
            "map -l -1 a.q",
            "map --output=json p-metadata.q",
            "map --output=json p-falloc.q",
            "map --output=json p-full.q",
            "map p-full.q",
            "map --output=json r1000.raw",
            "map bm.q",
        ],
        prepare,
    );
}
