//! libFuzzer target: coverage-guided fuzzing of open → read → map → check → write, with the
//! qcow2-aware mutator mixed into libFuzzer's own mutations. Built by run.sh with
//! `--features libfuzzer` under `RUSTC_BOOTSTRAP=1` and AddressSanitizer.
#![no_main]

use libfuzzer_sys::{fuzz_mutator, fuzz_target, fuzzer_mutate};
use qcow_fuzz::mutate::{mutate, Rng};

fuzz_target!(|data: &[u8]| {
    qcow_fuzz::target::exercise(data);
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    // Half the time libFuzzer's generic mutations, half the time field-aware ones.
    if seed % 2 == 0 {
        return fuzzer_mutate(data, size, max_size);
    }
    let mut rng = Rng::new(u64::from(seed));
    let mutated = mutate(&data[..size], &mut rng);
    let len = mutated.len().min(max_size);
    data[..len].copy_from_slice(&mutated[..len]);
    len
});
