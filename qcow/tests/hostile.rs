//! Hostile images: random corruptions of a valid image's metadata (header, refcount table and
//! block, L1 and L2 tables) must yield errors or clean behaviour — never a panic, a hang or a huge
//! allocation — across open, full read, map, check, repair and writes.
#![allow(clippy::unwrap_used)]

use qcow::{CreateOptions, Image, MemStorage, OpenOptions, Repair};

/// A small image with data, zero clusters and a 4 KiB cluster size; returns it and the offsets of
/// its metadata clusters.
fn seed_image() -> (MemStorage, Vec<u64>) {
    let mut storage = MemStorage::default();
    let options = CreateOptions {
        size: 1 << 20,
        cluster_size: 4096,
        ..CreateOptions::default()
    };
    qcow::create_on(&mut storage, &options).unwrap();
    let mut image = Image::open_storage(storage, None, &OpenOptions::default()).unwrap();
    image.write_at(&vec![0x11; 40_000], 3000).unwrap();
    image.write_zeroes(200_000, 8192).unwrap();
    image.write_at(&vec![0x22; 5000], 900_000).unwrap();
    image.flush().unwrap();
    let storage = image.storage_mut().clone();
    // Header, refcount table, refcount block, L1 table, first L2 table.
    (storage, vec![0, 4096, 8192, 12288, 16384])
}

fn exercise(storage: MemStorage) {
    let options = OpenOptions {
        l2_cache_bytes: 0,
        refcount_cache_bytes: 0,
        ..OpenOptions::default()
    };
    if let Ok(mut image) = Image::open_storage(storage.clone(), None, &options) {
        let mut buf = vec![0u8; 65536];
        let mut offset = 0;
        while offset < image.size().min(1 << 20) {
            let _ = image.read_at(&mut buf, offset);
            offset += 65536;
        }
        let _ = qcow::map(&mut image);
        let _ = image.write_at(&[0x5a; 5000], 7000);
        let _ = image.write_zeroes(100_000, 4096);
        let _ = image.discard(300_000, 16384);
        let _ = image.flush();
        let _ = qcow::check(&mut image, Repair::None);
    }
    let check_options = OpenOptions {
        check_mode: true,
        ..OpenOptions::default()
    };
    if let Ok(mut image) = Image::open_storage(storage, None, &check_options) {
        if qcow::check(&mut image, Repair::All).is_ok() {
            let _ = image.write_at(&[0x6b; 100], 0);
        }
    }
}

#[test]
fn random_metadata_corruption_never_panics() {
    let seed = std::env::var("QCOW_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("hostile test seed {seed} (rerun with QCOW_HOSTILE_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let (clean, metadata) = seed_image();
    let interesting: [u64; 8] = [
        0,
        1,
        0x200,
        0xfff,
        1 << 31,
        u64::MAX,
        0x8000_0000_0000_1000,
        0x00ff_ffff_ffff_fe00,
    ];
    for round in 0..4000 {
        let mut storage = clean.clone();
        for _ in 0..rng.usize(1..4) {
            let cluster = metadata[rng.usize(..metadata.len())];
            let at = (cluster + rng.u64(0..4096)) as usize & !7;
            let value = if rng.bool() {
                interesting[rng.usize(..interesting.len())]
            } else {
                rng.u64(..)
            };
            let width = [1usize, 2, 4, 8][rng.usize(..4)];
            let bytes = value.to_be_bytes();
            if at + width <= storage.data.len() {
                storage.data[at..at + width].copy_from_slice(&bytes[8 - width..]);
            }
        }
        let result = std::panic::catch_unwind(|| exercise(storage.clone()));
        assert!(
            result.is_ok(),
            "seed {seed} round {round}: panic on a corrupted image"
        );
    }
}
