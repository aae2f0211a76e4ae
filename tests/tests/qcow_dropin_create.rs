//! Drop-in point 1: `qcow create` against `qemu-img create` — the `Formatting` line (every option
//! in qemu-img's order, numbers as qemu-img prints them), every error with its wording and place
//! (before or after that line), exit codes, and the image files byte for byte.

use cowvm_tests::dropin::{assert_table, qemu_img_in};
use cowvm_tests::qcow_harness::skip_without_qemu;

/// Starting files in both scratch directories: a qcow2 image (`a.q`), one whose name has a comma,
/// and a raw file.
fn prepare(dir: &std::path::Path) {
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "a.q", "4M"]);
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "a,b.q", "2M"]);
    qemu_img_in(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
}

/// Options, option syntax (hex, suffixes, `,,`, `nokey`, repeats), sizes in every form, and the
/// order of qcow2's own checks.
const OPTIONS: &[&str] = &[
    "create -f qcow2 o.q 1M",
    "create -f qcow2 -o preallocation=metadata,cluster_size=0x10000 o.q 1M",
    "create -f qcow2 -o preallocation=full,compat=0.10 o.q 1M",
    "create -f qcow2 -o preallocation=falloc o.q 1M",
    "create -f qcow2 -o extended_l2=on,compression_type=zstd,lazy_refcounts=on o.q 1M",
    "create -f qcow2 -o data_file=d.raw,data_file_raw=on o.q 1M",
    "create -f qcow2 -o data_file=d.raw o.q 1M",
    "create -f qcow2 -o extent_size_hint=1M o.q 1M",
    "create -f qcow2 -o nocow=on,extent_size_hint=0,size=2M,cluster_size=4k o.q",
    "create -f qcow2 -o size=3M o.q 4M",
    "create -f qcow2 o.q 1.5M",
    "create -f qcow2 o.q 0x100000",
    "create -f qcow2 o.q 1000b",
    "create -f qcow2 o.q -5",
    "create -f qcow2 o.q 1e3",
    "create -f qcow2 -o cluster_size=3x o.q 1M",
    "create -f qcow2 -o cluster_size=18446744073709551616 o.q 1M",
    "create -f qcow2 -o refcount_bits=x o.q 1M",
    "create -f qcow2 -o refcount_bits=0x10 o.q 1M",
    "create -f qcow2 -o refcount_bits=3 o.q 1M",
    "create -f qcow2 -o lazy_refcounts=maybe o.q 1M",
    "create -f qcow2 -o compat=0.11 o.q 1M",
    "create -f qcow2 -o foo=bar o.q 1M",
    "create -f qcow2 -o preallocation=sparse o.q 1M",
    "create -f qcow2 -o compression_type=lz4 o.q 1M",
    "create -f qcow2 -o extended_l2=on,cluster_size=2k o.q 1M",
    "create -f qcow2 -o extended_l2=on,compat=0.10 o.q 1M",
    "create -f qcow2 -o compression_type=zstd,compat=0.10 o.q 1M",
    "create -f qcow2 -o cluster_size=256 o.q 1M",
    "create -f qcow2 -o refcount_bits=8,compat=0.10 o.q 1M",
    "create -f qcow2 -o lazy_refcounts=on,compat=0.10 o.q 1M",
    "create -f qcow2 -o data_file=dd.raw,compat=0.10 o.q 1M",
    "create -f qcow2 -o data_file_raw=on o.q 1M",
    "create -f qcow2 -o extent_size_hint=5G o.q 1M",
    "create -f qcow2 -o ,, o.q 1M",
    "create -f qcow2 -o a,,b o.q 1M",
    "create -f qcow2 -o cluster_size=4k,, o.q 1M",
    "create -f qcow2 -o cluster_size=512 o.q 16T",
    "create -f qcow2 o.q 64P",
    "create -f qcow2 -b nothere.qcow2 -F qcow2 o.q",
    "create -f qcow2 -b nothere.qcow2 o.q 1M",
    "create -f qcow2 -b a.q o.q",
    "create -f qcow2 -F qcow2 o.q 1M",
    "create -f qcow2 -b a.q -F raw o.q",
    "create -f qcow2 -b a.q -F qcow2 o.q",
    "create -f qcow2 -b a.q -F qcow2 -o preallocation=metadata o.q",
    "create -f qcow2 -b o.q -F qcow2 o.q 1M",
    "create -f qcow2 -u -b nothere -F qcow2 o.q",
    "create -f qcow2 -u -b nothere -F qcow2 o.q 1M",
    "create -f qcow2 o.q",
    "create -f foo o.q 1M",
    "create -f qcow2 -u -b nothere o.q 1M",
    "create -f qcow2 file:o.q 1M",
    "create -f qcow2 a,b.q 1M",
    "create -f qcow2 -o nolazy_refcounts o.q 1M",
    "create -f qcow2 -o id=5 o.q 1M",
    "create -f qcow2 -b a,b.q -F qcow2 o.q",
    "create -f qcow2 -o help=on o.q 1M",
    "create -f qcow2 -o backing_fmt=foo -b a.q o.q",
    "create -f qcow2 -F foo -b a.q o.q",
    "create -f qcow2 nodir/o.q 1M",
    "create -f raw -o preallocation=metadata o.q 1M",
    "create -f raw -b a.q o.q 1M",
    "create -f raw -o cluster_size=4k o.q 1M",
    "create -f qcow2 -o preallocation=full o.q 0",
    "create -f qcow2 o.q 1M extra",
    "create -f raw -o extent_size_hint=1M,nocow=on,preallocation=falloc o.raw 1M",
    "create -f raw -o preallocation=full,extent_size_hint=3 o.raw 1M",
    "create o.raw 1M",
    "create -f raw -f qcow2 o.q 1M",
    "create -q -f qcow2 o.q 1M",
    "create -f qcow2 -o refcount_bits=-1 o.q 1M",
    "create -f qcow2 -o size=15.99999999999999E o.q",
    "create -f qcow2 -o compat= o.q 1M",
    "create -f qcow2 -o backing_fmt= o.q 1M",
    "create -f qcow2 -o backing_file= o.q 1M",
    "create -f qcow2 -o size=1M,size=2M o.q",
    "create -f qcow2 -o lazy_refcounts=y o.q 1M",
    "create -f qcow2 -o refcount_bits=010 o.q 1M",
    "create -f qcow2 -o refcount_bits=99999999999999999999 o.q 1M",
    "create -f qcow2 -b r.raw -F raw -o size=5M o.q",
    "create -f qcow2 -o cluster_size=512,refcount_bits=64 o.q 64M",
    "create -f qcow2 -o cluster_size=4k,preallocation=full o.q 8M",
    "create -f qcow2 -o cluster_size=4k,preallocation=metadata o.q 8M",
    "create -f qcow2 -o cluster_size=2M o.q 100G",
    "create -f qcow2 -o compat=v2 o.q 100M",
];

#[test]
fn create_lines_errors_and_images_match_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    assert_table(OPTIONS, prepare);
}

/// `-o help` / `-o ?`, with and without a file name (which adds the protocol's options), and for
/// raw.
#[test]
fn option_help_matches_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    assert_table(
        &[
            "create -f qcow2 -o help",
            "create -f qcow2 -o ? x.q",
            "create -o help",
            "create -f raw -o help x.q",
            "create -f qcow2 -o cluster_size=1k,help",
            "create -f qcow2 -o help,cluster_size=1k x.q 1M",
        ],
        prepare,
    );
}

/// Command-line errors: getopt's messages (with the invoked name), missing operands, repeated
/// options.
#[test]
fn usage_errors_match_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    assert_table(
        &[
            "create",
            "create -f qcow2",
            "create -f",
            "create -z o.q 1M",
            "create --bogus o.q 1M",
            "create --b a.q o.q 1M",
            "create --o help o.q 1M",
            "create --backing-unsafe=1 o.q 1M",
            "create -f qcow2 --options=cluster_size=4k --format=raw o.q 1M",
            "create -qf qcow2 o.q 1M",
            "create -fqcow2 -- o.q 1M",
            "create o.q -f qcow2 1M",
            "",
            "frobnicate",
        ],
        prepare,
    );
}

/// A write or flush that fails at the end (a full device), devices that cannot be resized, and a
/// device that swallows the image (`/dev/null`, judged by reopening it): qemu-img's messages and
/// exit codes.
#[test]
fn final_write_and_flush_failures_match_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    assert_table(
        &[
            "create -f qcow2 /dev/full 1M",
            "create -f qcow2 -o preallocation=full /dev/full 1M",
            "create -f qcow2 -o preallocation=metadata /dev/full 1M",
            "create -f raw -o preallocation=full /dev/full 1M",
            "create -f raw /dev/full 0",
            "create -f qcow2 /dev/null 1M",
            "create -f raw /dev/null 1M",
        ],
        prepare,
    );
}

/// The documented differences (README, "What still differs"): encryption and network protocols are
/// refused with these exact messages.
#[test]
fn out_of_scope_features_are_refused_with_the_documented_messages() {
    if skip_without_qemu() {
        return;
    }
    let twin = cowvm_tests::dropin::Twin::new();
    twin.prepare(prepare);
    let (_, out) = twin.run(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks",
        "e.q",
        "1M",
    ]);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr,
        "qcow: e.q: Encrypted images are not supported by this tool (LUKS and AES encryption are \
         out of scope)\n"
    );
    assert!(!twin.qcow_dir().join("e.q").exists());
    let (_, out) = twin.run(&["info", "nbd://localhost:10809/export"]);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr,
        "qcow: Could not open 'nbd://localhost:10809/export': Protocol 'nbd' is not supported by \
         this tool (local files only)\n"
    );
    // A LUKS image made by qemu-img.
    qemu_img_in(
        twin.qcow_dir(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=123456",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            "luks.q",
            "1M",
        ],
    );
    let (_, out) = twin.run(&["info", "luks.q"]);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr,
        "qcow: Could not open 'luks.q': LUKS-encrypted images are not supported by this tool \
         (encryption is out of scope)\n"
    );
}
