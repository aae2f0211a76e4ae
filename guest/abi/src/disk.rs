//! The disk workload (`disk=1`): deterministic block writes and zeroings, flushed, read back and
//! verified by the guest, with the disk's final contents mixed into the `DONE` digest; and its
//! host-side oracle, which predicts that digest and every block's final contents.
//!
//! The workload covers the first `disk_blocks` 4 KiB blocks of the first disk. In round `r`
//! (the same rounds as the memory workload, generation rounds included), block `b` is written
//! with a pattern keyed by `(seed, b, r)` with probability `write`%, and one in sixteen of those
//! is zeroed with `VIRTIO_BLK_T_WRITE_ZEROES` instead. A block nobody wrote keeps what the disk
//! held before the run (zeros on a fresh image, the backing file's data under an overlay).

use crate::args::WorkloadArgs;
use crate::workload::{mix64, page_digest, round_seed, total_rounds, WORDS_PER_PAGE};

/// Bytes of a workload block.
pub const BLOCK_SIZE: u64 = 4096;
/// 512-byte sectors in a block.
pub const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE / 512;

/// What a round does to a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOp {
    /// Fill the block with the pattern of this key ([`fill_block`]).
    Write(u64),
    /// Make it read as zeros.
    Zero,
}

/// The key that decides what round `round` does to block `block`.
pub const fn block_key(args: &WorkloadArgs, block: u64, round: u64, generation: u64) -> u64 {
    let seed = round_seed(args, round, generation) ^ 0x6469_736b_776f_726b;
    mix64(seed ^ mix64(block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round))
}

/// What round `round` of generation `generation` does to block `block`, if anything.
pub const fn block_op(
    args: &WorkloadArgs,
    block: u64,
    round: u64,
    generation: u64,
) -> Option<BlockOp> {
    let key = block_key(args, block, round, generation);
    if key % 100 >= args.write_percent {
        None
    } else if (key >> 32) % 16 == 0 {
        Some(BlockOp::Zero)
    } else {
        Some(BlockOp::Write(key))
    }
}

/// The contents of a block written with `key`.
pub fn fill_block(words: &mut [u64; WORDS_PER_PAGE], key: u64) {
    for (i, word) in words.iter_mut().enumerate() {
        *word = mix64(key ^ (i as u64).wrapping_mul(0xa076_1d64_78bd_642f));
    }
}

/// The last thing a complete run does to block `block` (`None`: untouched, it keeps what the
/// disk held before).
pub fn final_op(args: &WorkloadArgs, block: u64, generation: u64) -> Option<BlockOp> {
    (0..total_rounds(args))
        .rev()
        .find_map(|round| block_op(args, block, round, generation))
}

/// The contribution of block `block` with digest `digest` (kept apart from the memory pages'
/// contributions by its own multiplier).
pub const fn block_contribution(block: u64, digest: u64) -> u64 {
    mix64(digest ^ block.wrapping_mul(0xe703_7ed1_a0b4_28db) ^ 0x6469_736b)
}

/// The disk's part of the digest, given what each block held before the run (`initial` fills
/// the words of block `b`).
pub fn expected_disk_digest(
    args: &WorkloadArgs,
    generation: u64,
    mut initial: impl FnMut(u64, &mut [u64; WORDS_PER_PAGE]),
) -> u64 {
    let mut words = [0u64; WORDS_PER_PAGE];
    let mut digest = 0u64;
    for block in 0..args.disk_blocks {
        match final_op(args, block, generation) {
            Some(BlockOp::Write(key)) => fill_block(&mut words, key),
            Some(BlockOp::Zero) => words.fill(0),
            None => initial(block, &mut words),
        }
        digest = digest.wrapping_add(block_contribution(block, page_digest(&words)));
    }
    digest
}

/// The `DONE` digest of a `disk=1` run over a disk whose blocks held `initial` before.
pub fn expected_digest_with_disk(
    args: &WorkloadArgs,
    generation: u64,
    initial: impl FnMut(u64, &mut [u64; WORDS_PER_PAGE]),
) -> u64 {
    crate::workload::expected_memory_digest(args, generation)
        .wrapping_add(expected_disk_digest(args, generation, initial))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::expected_digest_for;

    fn args() -> WorkloadArgs {
        WorkloadArgs {
            pages: 8,
            rounds: 4,
            disk: true,
            disk_blocks: 64,
            write_percent: 50,
            ..WorkloadArgs::default()
        }
    }

    #[test]
    fn ops_mix_writes_zeroes_and_untouched_blocks() {
        let args = args();
        let (mut writes, mut zeros, mut untouched) = (0, 0, 0);
        for block in 0..1000 {
            match final_op(
                &WorkloadArgs {
                    disk_blocks: 1000,
                    ..args
                },
                block,
                0,
            ) {
                Some(BlockOp::Write(_)) => writes += 1,
                Some(BlockOp::Zero) => zeros += 1,
                None => untouched += 1,
            }
        }
        assert!(
            writes > 800 && zeros > 20 && untouched > 30,
            "{writes} {zeros} {untouched}"
        );
    }

    #[test]
    fn the_disk_digest_depends_on_contents_and_generation() {
        let args = args();
        let zeros = expected_digest_for(&args, 0);
        let plain = expected_digest_for(
            &WorkloadArgs {
                disk: false,
                ..args
            },
            0,
        );
        assert_ne!(zeros, plain, "the disk is mixed in");
        let filled = expected_digest_with_disk(&args, 0, |_, w| w.fill(0xabab_abab_abab_abab));
        assert_ne!(zeros, filled, "initial contents of untouched blocks count");
        assert_eq!(
            zeros,
            expected_digest_with_disk(&args, 0, |_, w| w.fill(0)),
            "a fresh image reads zeros"
        );
        let gen = WorkloadArgs {
            gen_rounds: 2,
            ..args
        };
        assert_ne!(expected_digest_for(&gen, 1), expected_digest_for(&gen, 2));
    }

    #[test]
    fn block_patterns_are_stable() {
        // Pins the algorithm: change ABI_VERSION if these change.
        let mut words = [0u64; WORDS_PER_PAGE];
        fill_block(&mut words, 1);
        assert_eq!(words[0], mix64(1));
        assert_eq!(words[1], mix64(1 ^ 0xa076_1d64_78bd_642f));
        assert_eq!(block_op(&args(), 0, 0, 0), block_op(&args(), 0, 0, 0));
    }
}
