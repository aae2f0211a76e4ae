//! The deterministic memory workload and its digest.
//!
//! Every page evolves on its own: in round `r`, page `p` is written iff a hash of
//! `(seed, p, r)` falls below the write percentage, and a write mixes a key into every word of
//! the page's previous contents. So the final memory (and the digest) depends only on the
//! arguments, not on how pages are split across vCPUs or when the VM was paused, snapshotted
//! or restored — while a lost or stale page anywhere changes the digest.

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

/// Whether page `page` is written in round `round`.
pub const fn is_written(args: &WorkloadArgs, page: u64, round: u64) -> bool {
    page_key(args.seed, page, round) % 100 < args.write_percent
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

/// The page that step `step` writes, if it writes one.
pub fn page_written_at_step(args: &WorkloadArgs, slice: (u64, u64), step: u64) -> Option<u64> {
    let (round, page) = step_target(slice, step);
    (slice.1 > slice.0 && round < args.rounds && is_written(args, page, round)).then_some(page)
}

/// The host-side oracle: the digest a complete, uninterrupted run prints.
pub fn expected_digest(args: &WorkloadArgs) -> u64 {
    let mut words = [0u64; WORDS_PER_PAGE];
    let mut digest = 0u64;
    for page in 0..args.pages {
        words.fill(0);
        for round in 0..args.rounds {
            if is_written(args, page, round) {
                write_page(&mut words, page_key(args.seed, page, round));
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
    fn write_percentage_is_respected() {
        let args = WorkloadArgs {
            pages: 10_000,
            rounds: 1,
            seed: 1,
            write_percent: 10,
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
        };
        assert_eq!(page_written_at_step(&args, (0, 3), 4), Some(1));
        assert_eq!(
            page_written_at_step(&args, (0, 3), 6),
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
