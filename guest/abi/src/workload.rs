//! The deterministic memory workload and its digest.
//!
//! Every page evolves on its own: in round `r`, page `p` is written iff a hash of
//! `(seed, p, r)` falls below the write percentage, and a write mixes a key into every word of
//! the page's previous contents. So the final memory (and the digest) depends only on the
//! arguments, not on how pages are split across vCPUs or when the VM was paused, snapshotted
//! or restored — while a lost or stale page anywhere changes the digest.
//!
//! The `gen_rounds` rounds after the first `rounds` use a seed mixed with the VM's generation id
//! (read when a vCPU reaches them): clones and forked children, each with its own id, then write
//! different data into what was one memory, and each digest tells whether a VM saw only its own
//! writes.

use crate::args::WorkloadArgs;

/// 64-bit words in a page.
pub const WORDS_PER_PAGE: usize = 512;

/// The splitmix64 finalizer: a cheap bijective mixer with good avalanche.
pub const fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The key of page `page` in round `round`.
pub const fn page_key(seed: u64, page: u64, round: u64) -> u64 {
    mix64(seed ^ mix64(page.wrapping_add(0x9e37_79b9_7f4a_7c15) ^ mix64(round)))
}

/// Every round a complete run performs.
pub const fn total_rounds(args: &WorkloadArgs) -> u64 {
    args.rounds + args.gen_rounds
}

/// The seed of round `round` in a VM of generation `generation`: the plain seed for the first
/// `rounds`, then mixed with the generation id.
pub const fn round_seed(args: &WorkloadArgs, round: u64, generation: u64) -> u64 {
    if round < args.rounds {
        args.seed
    } else {
        args.seed ^ mix64(generation ^ 0x6765_6e65_7261_7469)
    }
}

/// The key page `page` is written with in round `round` of generation `generation`.
pub const fn round_key(args: &WorkloadArgs, page: u64, round: u64, generation: u64) -> u64 {
    page_key(round_seed(args, round, generation), page, round)
}

/// Whether page `page` is written in round `round` of generation `generation`.
pub const fn is_written_gen(args: &WorkloadArgs, page: u64, round: u64, generation: u64) -> bool {
    let percent = if round < args.rounds {
        args.write_percent
    } else {
        args.gen_write_percent
    };
    round_key(args, page, round, generation) % 100 < percent
}

/// Whether page `page` is written in round `round` (generation 0).
pub const fn is_written(args: &WorkloadArgs, page: u64, round: u64) -> bool {
    is_written_gen(args, page, round, 0)
}

/// Applies one write with `key` to a page.
pub fn write_page(words: &mut [u64; WORDS_PER_PAGE], key: u64) {
    for (i, word) in words.iter_mut().enumerate() {
        *word = mix64(*word ^ key.wrapping_add(i as u64));
    }
}

/// Digest of one page's contents.
pub fn page_digest(words: &[u64; WORDS_PER_PAGE]) -> u64 {
    words
        .iter()
        .fold(0x6a09_e667_f3bc_c908, |h, &w| mix64(h ^ w))
}

/// The contribution of page `page` with digest `digest` to the workload digest. Contributions
/// are summed, so vCPUs can each add up their own slice.
pub const fn page_contribution(page: u64, digest: u64) -> u64 {
    mix64(digest ^ page.wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// The pages `[start, end)` that vCPU `index` of `count` works on.
pub const fn vcpu_slice(pages: u64, index: u64, count: u64) -> (u64, u64) {
    (pages * index / count, pages * (index + 1) / count)
}

/// The `(round, page)` that step `step` of a vCPU owning pages `[start, end)` visits: the vCPU
/// walks its slice page by page, round after round, and counts each visit as a step whether or
/// not the page is written in that round.
pub const fn step_target(slice: (u64, u64), step: u64) -> (u64, u64) {
    let len = slice.1 - slice.0;
    if len == 0 {
        return (0, slice.0);
    }
    (step / len, slice.0 + step % len)
}

/// The page that step `step` writes in a VM of generation `generation`, if it writes one.
pub fn page_written_at_step(
    args: &WorkloadArgs,
    slice: (u64, u64),
    step: u64,
    generation: u64,
) -> Option<u64> {
    let (round, page) = step_target(slice, step);
    let writes = slice.1 > slice.0
        && round < total_rounds(args)
        && is_written_gen(args, page, round, generation);
    writes.then_some(page)
}

/// The host-side oracle: the digest a complete, uninterrupted run of generation 0 prints.
pub fn expected_digest(args: &WorkloadArgs) -> u64 {
    expected_digest_for(args, 0)
}

/// The oracle for a VM whose generation rounds ran with id `generation` (a clone or a forked
/// child that took its id before reaching them). With `disk=1` the disk is taken to start out
/// as zeros (a fresh image); [`crate::disk::expected_digest_with_disk`] takes other contents.
pub fn expected_digest_for(args: &WorkloadArgs, generation: u64) -> u64 {
    let memory = expected_memory_digest(args, generation);
    if !args.disk {
        return memory;
    }
    memory.wrapping_add(crate::disk::expected_disk_digest(
        args,
        generation,
        |_, words| words.fill(0),
    ))
}

/// The memory workload's part of the digest.
pub fn expected_memory_digest(args: &WorkloadArgs, generation: u64) -> u64 {
    let mut words = [0u64; WORDS_PER_PAGE];
    let mut digest = 0u64;
    for page in 0..args.pages {
        words.fill(0);
        for round in 0..total_rounds(args) {
            if is_written_gen(args, page, round, generation) {
                write_page(&mut words, round_key(args, page, round, generation));
            }
        }
        digest = digest.wrapping_add(page_contribution(page, page_digest(&words)));
    }
    digest
}

/// Page writes a complete run performs (for throughput figures and dirty-page predictions).
pub fn expected_page_writes(args: &WorkloadArgs, rounds: core::ops::Range<u64>) -> u64 {
    let mut writes = 0;
    for page in 0..args.pages {
        for round in rounds.clone() {
            writes += is_written(args, page, round) as u64;
        }
    }
    writes
}

/// Pages written at least once in `rounds` (what a diff snapshot over those rounds holds).
pub fn pages_written_in(args: &WorkloadArgs, rounds: core::ops::Range<u64>) -> u64 {
    (0..args.pages)
        .filter(|&page| rounds.clone().any(|round| is_written(args, page, round)))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_every_argument() {
        let base = WorkloadArgs {
            pages: 16,
            rounds: 3,
            seed: 5,
            write_percent: 50,
            ..WorkloadArgs::default()
        };
        let d = expected_digest(&base);
        assert_ne!(d, expected_digest(&WorkloadArgs { pages: 17, ..base }));
        assert_ne!(d, expected_digest(&WorkloadArgs { rounds: 4, ..base }));
        assert_ne!(d, expected_digest(&WorkloadArgs { seed: 6, ..base }));
        assert_ne!(
            d,
            expected_digest(&WorkloadArgs {
                write_percent: 40,
                ..base
            })
        );
        assert_eq!(d, expected_digest(&base));
    }

    #[test]
    fn generation_rounds_differ_by_generation_only() {
        let base = WorkloadArgs {
            pages: 16,
            rounds: 3,
            seed: 5,
            write_percent: 60,
            gen_rounds: 2,
            gen_write_percent: 60,
            ..WorkloadArgs::default()
        };
        let (zero, one, two) = (
            expected_digest_for(&base, 0),
            expected_digest_for(&base, 1),
            expected_digest_for(&base, 2),
        );
        assert_eq!(zero, expected_digest(&base));
        assert!(zero != one && one != two && zero != two);
        // Without generation rounds the generation does not matter.
        let plain = WorkloadArgs {
            gen_rounds: 0,
            ..base
        };
        assert_eq!(expected_digest_for(&plain, 7), expected_digest(&plain));
        assert_eq!(round_seed(&base, 2, 9), 5, "base rounds use the plain seed");
        // Generation rounds write with their own percentage.
        let none = WorkloadArgs {
            gen_write_percent: 0,
            ..base
        };
        assert_eq!(
            expected_digest_for(&none, 1),
            expected_digest(&WorkloadArgs {
                gen_rounds: 0,
                ..base
            })
        );
    }

    #[test]
    fn write_percentage_is_respected() {
        let args = WorkloadArgs {
            pages: 10_000,
            rounds: 1,
            seed: 1,
            write_percent: 10,
            ..WorkloadArgs::default()
        };
        let writes = expected_page_writes(&args, 0..1);
        assert!((900..1100).contains(&writes), "{writes}");
        let none = WorkloadArgs {
            write_percent: 0,
            ..args
        };
        assert_eq!(expected_page_writes(&none, 0..1), 0);
        let all = WorkloadArgs {
            write_percent: 100,
            ..args
        };
        assert_eq!(pages_written_in(&all, 0..1), 10_000);
    }

    #[test]
    fn slices_cover_all_pages_once() {
        for count in 1..=7 {
            let mut next = 0;
            for index in 0..count {
                let (start, end) = vcpu_slice(100, index, count);
                assert_eq!(start, next);
                next = end;
            }
            assert_eq!(next, 100);
        }
    }

    #[test]
    fn steps_walk_the_slice_round_by_round() {
        assert_eq!(step_target((10, 13), 0), (0, 10));
        assert_eq!(step_target((10, 13), 2), (0, 12));
        assert_eq!(step_target((10, 13), 3), (1, 10));
        assert_eq!(step_target((5, 5), 7), (0, 5), "an empty slice");
        let args = WorkloadArgs {
            pages: 3,
            rounds: 2,
            seed: 1,
            write_percent: 100,
            ..WorkloadArgs::default()
        };
        assert_eq!(page_written_at_step(&args, (0, 3), 4, 0), Some(1));
        assert_eq!(
            page_written_at_step(&args, (0, 3), 6, 0),
            None,
            "past the last round"
        );
    }

    #[test]
    fn known_digest_is_stable() {
        // Pins the algorithm: change ABI_VERSION if this value changes.
        let args = WorkloadArgs {
            pages: 4,
            rounds: 2,
            seed: 1,
            write_percent: 100,
            ..WorkloadArgs::default()
        };
        let mut total = 0u64;
        for page in 0..4 {
            let mut words = [0u64; WORDS_PER_PAGE];
            write_page(&mut words, page_key(1, page, 0));
            write_page(&mut words, page_key(1, page, 1));
            total = total.wrapping_add(page_contribution(page, page_digest(&words)));
        }
        assert_eq!(expected_digest(&args), total);
    }
}
