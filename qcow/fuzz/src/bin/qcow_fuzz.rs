//! Stable-Rust mutation fuzzer for the qcow library: mutates seed images (built in, plus any
//! `*.qcow2` in `--corpus`), runs each through open → read → map → check → write under
//! `catch_unwind` with a per-case time budget, and saves every input that panics or hangs.
//!
//! `qcow_fuzz [--seconds N] [--seed S] [--corpus DIR] [--out DIR] [--budget-ms MS]`
//! `qcow_fuzz --write-seeds DIR` writes the built-in seed images and exits.
//! Exit 0: no finding; 1: panics found (inputs in OUT/crash-*.qcow2); 3: a case ran over its
//! budget (input in OUT/timeout-*.qcow2). A process killed by an allocation failure leaves its input
//! in OUT/last-input.qcow2 (run.sh reports it).

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qcow_fuzz::mutate::{mutate, Rng};
use qcow_fuzz::target::{builtin_seeds, exercise};

struct Args {
    seconds: u64,
    seed: u64,
    corpus: Option<PathBuf>,
    out: PathBuf,
    budget: Duration,
    /// Write the built-in seeds into this directory and exit (a corpus for the libFuzzer engine).
    write_seeds: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 60,
        seed: 0x0c0f_fee5,
        corpus: None,
        out: PathBuf::from("fuzz-out"),
        budget: Duration::from_millis(5000),
        write_seeds: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => {
                args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--corpus" => args.corpus = Some(PathBuf::from(value()?)),
            "--out" => args.out = PathBuf::from(value()?),
            "--write-seeds" => args.write_seeds = Some(PathBuf::from(value()?)),
            "--budget-ms" => {
                args.budget = Duration::from_millis(
                    value()?.parse().map_err(|e| format!("--budget-ms: {e}"))?,
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn corpus_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter(|bytes| bytes.len() <= 4 << 20)
        .collect()
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("qcow_fuzz: {message}");
            std::process::exit(2);
        }
    };
    if let Some(dir) = &args.write_seeds {
        for (index, seed) in builtin_seeds().iter().enumerate() {
            let path = dir.join(format!("builtin-{index}.qcow2"));
            if let Err(err) = std::fs::write(&path, seed) {
                eprintln!("qcow_fuzz: cannot write {}: {err}", path.display());
                std::process::exit(2);
            }
        }
        return;
    }
    if let Err(err) = std::fs::create_dir_all(&args.out) {
        eprintln!("qcow_fuzz: cannot create {}: {err}", args.out.display());
        std::process::exit(2);
    }
    let mut seeds = builtin_seeds();
    if let Some(dir) = &args.corpus {
        seeds.extend(corpus_seeds(dir));
    }
    println!(
        "qcow_fuzz: {} seeds, seed {}, {} s, {} ms per case, findings in {}",
        seeds.len(),
        args.seed,
        args.seconds,
        args.budget.as_millis(),
        args.out.display()
    );
    // Unmutated seeds must pass: otherwise the target itself is broken.
    for (index, seed) in seeds.iter().enumerate() {
        if !exercise(seed).opened {
            eprintln!("qcow_fuzz: seed {index} does not open (expected for an overlay: backing files are not followed)");
        }
    }

    // Panics are recorded, not printed by the default hook for every case.
    let last_panic = Arc::new(Mutex::new(String::new()));
    let hook_panic = Arc::clone(&last_panic);
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut slot) = hook_panic.lock() {
            *slot = info.to_string();
        }
    }));

    let last_input = args.out.join("last-input.qcow2");
    let started = Instant::now();
    // Watchdog: the start time (ms since `started`, +1; 0 = idle) of the running case.
    let case_started = Arc::new(AtomicU64::new(0));
    let case_number = Arc::new(AtomicU64::new(0));
    {
        let case_started = Arc::clone(&case_started);
        let case_number = Arc::clone(&case_number);
        let out = args.out.clone();
        let last_input = last_input.clone();
        let budget = args.budget;
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            let begun = case_started.load(Ordering::SeqCst);
            if begun == 0 {
                continue;
            }
            let now = started.elapsed().as_millis() as u64 + 1;
            if now.saturating_sub(begun) > budget.as_millis() as u64 {
                let case = case_number.load(Ordering::SeqCst);
                let saved = out.join(format!("timeout-{case}.qcow2"));
                let _ = std::fs::copy(&last_input, &saved);
                eprintln!(
                    "qcow_fuzz: case {case} ran over {} ms; input saved as {}",
                    budget.as_millis(),
                    saved.display()
                );
                std::process::exit(3);
            }
        });
    }

    let mut rng = Rng::new(args.seed);
    let deadline = Duration::from_secs(args.seconds);
    let (mut cases, mut opened, mut crashes) = (0u64, 0u64, 0u64);
    while started.elapsed() < deadline {
        let seed = &seeds[rng.below(seeds.len() as u64) as usize];
        let input = mutate(seed, &mut rng);
        cases += 1;
        // Kept on disk while it runs, so an abort (allocation failure) leaves the input behind.
        if std::fs::write(&last_input, &input).is_err() {
            eprintln!("qcow_fuzz: cannot write {}", last_input.display());
            std::process::exit(2);
        }
        case_number.store(cases, Ordering::SeqCst);
        case_started.store(started.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| exercise(&input)));
        case_started.store(0, Ordering::SeqCst);
        match result {
            Ok(outcome) => opened += u64::from(outcome.opened),
            Err(_) => {
                crashes += 1;
                let message = last_panic.lock().map(|m| m.clone()).unwrap_or_default();
                let path = args.out.join(format!("crash-{cases}.qcow2"));
                let _ = std::fs::write(&path, &input);
                let _ = std::fs::write(path.with_extension("txt"), &message);
                eprintln!(
                    "qcow_fuzz: case {cases} panicked: {message}\n  input saved as {}",
                    path.display()
                );
            }
        }
    }
    let _ = std::fs::remove_file(&last_input);
    println!(
        "qcow_fuzz: {cases} cases in {:.0} s ({:.0}/s), {opened} opened, {crashes} panicked",
        started.elapsed().as_secs_f64(),
        cases as f64 / started.elapsed().as_secs_f64(),
    );
    if crashes > 0 {
        std::process::exit(1);
    }
}
