//! Fuzz smoke test: a few hundred mutated images through the same mutator and target as
//! `qcow/fuzz` (open → read → map → check → write), in-process: none may panic or hang.
//! `QCOW_FUZZ_SEED=N` replays another sequence; `QCOW_FUZZ_CASES=N` runs more cases.

#[allow(dead_code)]
#[path = "../../qcow/fuzz/src/mutate.rs"]
mod mutate;
#[allow(dead_code)]
#[path = "../../qcow/fuzz/src/target.rs"]
mod target;

use std::sync::mpsc;
use std::time::Duration;

use cowvm_tests::qcow_harness::{qemu_img, qemu_io};

const CASE_BUDGET: Duration = Duration::from_secs(10);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(default)
}

/// Seeds from qemu-img when it is installed: what real images look like (snapshots, compression).
fn qemu_seeds() -> Vec<Vec<u8>> {
    if !cowvm_tests::have_qemu_img() {
        println!("qemu-img not installed: built-in seeds only");
        return Vec::new();
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = dir.path().join("snap.qcow2");
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        "cluster_size=4096".as_ref(),
        snap.as_os_str(),
        "512k".as_ref(),
    ])
    .ok();
    qemu_io(&snap, "qcow2", &["write -P 7 0 16k".into()]);
    qemu_img(&[
        "snapshot".as_ref(),
        "-c".as_ref(),
        "one".as_ref(),
        snap.as_os_str(),
    ])
    .ok();
    qemu_io(&snap, "qcow2", &["write -P 8 4k 4k".into()]);
    let raw = dir.path().join("source.raw");
    std::fs::write(&raw, vec![b'q'; 128 << 10]).expect("write raw source");
    let compressed = dir.path().join("compressed.qcow2");
    qemu_img(&[
        "convert".as_ref(),
        "-c".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        "cluster_size=4096,compression_type=zstd".as_ref(),
        raw.as_os_str(),
        compressed.as_os_str(),
    ])
    .ok();
    [snap, compressed]
        .iter()
        .map(|path| std::fs::read(path).expect("read seed"))
        .collect()
}

#[test]
fn mutated_images_never_panic_or_hang() {
    let seed = env_number("QCOW_FUZZ_SEED", 0x5eed_f022);
    let cases = env_number("QCOW_FUZZ_CASES", 1500);
    let mut seeds = target::builtin_seeds();
    assert!(seeds.len() >= 4, "the library builds the seed images");
    seeds.extend(qemu_seeds());
    // The unmutated seeds open: otherwise every mutated case would stop at open and test nothing.
    for (index, image) in seeds.iter().enumerate() {
        assert!(target::exercise(image).opened, "seed {index} does not open");
    }

    let mut rng = mutate::Rng::new(seed);
    let mut opened = 0;
    for case in 0..cases {
        let input = mutate::mutate(&seeds[rng.below(seeds.len() as u64) as usize], &mut rng);
        let (done, result) = mpsc::channel();
        let data = input.clone();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(|| target::exercise(&data));
            let _ = done.send(outcome.map_err(|panic| {
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            }));
        });
        let save = |why: &str| {
            let path = std::env::temp_dir().join(format!("qcow-fuzz-smoke-{seed}-{case}.qcow2"));
            let _ = std::fs::write(&path, &input);
            format!(
                "case {case} (QCOW_FUZZ_SEED={seed}) {why}; input saved as {}",
                path.display()
            )
        };
        match result.recv_timeout(CASE_BUDGET) {
            Ok(Ok(outcome)) => opened += u64::from(outcome.opened),
            Ok(Err(message)) => panic!("{}: {message}", save("panicked")),
            Err(_) => panic!("{}", save(&format!("ran over {CASE_BUDGET:?}"))),
        }
    }
    println!("{cases} mutated images, {opened} opened");
    // The mutations must leave many images openable, or the read/check/write paths go unfuzzed.
    assert!(
        opened * 4 >= cases,
        "only {opened} of {cases} mutated images opened"
    );
}
