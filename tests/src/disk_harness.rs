//! Helpers for the disk tests: what the guest's disk workload leaves on a disk according to the
//! host oracle, the `DONE` line it predicts, and qemu-img's verdicts on the images.

use std::path::Path;

use cowvm_guest_abi::disk::{expected_digest_with_disk, fill_block, final_op, BlockOp, BLOCK_SIZE};
use cowvm_guest_abi::workload::WORDS_PER_PAGE;
use cowvm_guest_abi::WorkloadArgs;

use crate::qcow_harness::{assert_qemu_check_clean, qemu_img};

/// The disk's contents after a complete `disk=1` run of generation `generation` over a disk
/// that held `initial`.
pub fn expected_image(args: &WorkloadArgs, generation: u64, initial: &[u8]) -> Vec<u8> {
    let mut image = initial.to_vec();
    let mut words = [0u64; WORDS_PER_PAGE];
    for block in 0..args.disk_blocks {
        let at = (block * BLOCK_SIZE) as usize;
        let bytes = &mut image[at..at + BLOCK_SIZE as usize];
        match final_op(args, block, generation) {
            Some(BlockOp::Write(key)) => {
                fill_block(&mut words, key);
                for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
                    chunk.copy_from_slice(&word.to_le_bytes());
                }
            }
            Some(BlockOp::Zero) => bytes.fill(0),
            None => {}
        }
    }
    image
}

/// The `DONE` line of a run with guest arguments `args` over a disk that held `initial`.
pub fn expected_done(args: &str, generation: u64, initial: &[u8]) -> String {
    let parsed = WorkloadArgs::parse(args).expect("test arguments parse");
    let digest = expected_digest_with_disk(&parsed, generation, |block, words| {
        let at = (block * BLOCK_SIZE) as usize;
        for (word, chunk) in words.iter_mut().zip(initial[at..].chunks_exact(8)) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            *word = u64::from_le_bytes(bytes);
        }
    });
    format!("DONE {digest:016x}")
}

/// Asserts qemu-img finds `image` (of `format`) clean and identical to the raw file `expected`.
pub fn assert_image_is(image: &Path, format: &str, expected: &Path, context: &str) {
    if format == "qcow2" {
        assert_qemu_check_clean(image, context);
    }
    let compare = qemu_img(&[
        "compare".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        "-F".as_ref(),
        "raw".as_ref(),
        image.as_os_str(),
        expected.as_os_str(),
    ]);
    assert!(
        compare.success() && compare.stdout.contains("Images are identical"),
        "{context}: qemu-img compare of {} with the oracle's image\n{}",
        image.display(),
        compare.describe()
    );
}

/// `qemu-img create -f qcow2 PATH SIZE` (quiet), which must succeed.
pub fn create_qcow2(path: &Path, size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &path.display().to_string(),
        size,
    ])
    .ok();
}

/// `qemu-img create -f qcow2 -b BACKING -F qcow2 PATH`: an overlay whose backing file is named
/// `backing` (relative names resolve against PATH's directory).
pub fn create_qcow2_overlay(path: &Path, backing: &str) {
    let path = path.display().to_string();
    let args = [
        "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", &path,
    ];
    qemu_img(&args).ok();
}

/// A file of `len` bytes that are a deterministic function of `seed` (not zeros, not one
/// repeated byte: a block read from the wrong place shows).
pub fn patterned(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
