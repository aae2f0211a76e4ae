//! Check classification and repair: damaged refcounts are reported as qemu-img does (too low =
//! corruption, too high = leak) and `Repair::All` / `Repair::Leaks` fix them; a dirty image is
//! repaired on read-write open.
#![allow(clippy::unwrap_used)]

use byteorder::{BigEndian, ByteOrder};
use qcow::{CreateOptions, Image, MemStorage, OpenOptions, Repair, Storage};

fn image_with_data() -> MemStorage {
    let mut storage = MemStorage::default();
    qcow::create_on(
        &mut storage,
        &CreateOptions {
            size: 16 << 20,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let mut image = Image::open_storage(storage, None, &OpenOptions::default()).unwrap();
    image.write_at(&vec![0x33; 256 << 10], 0).unwrap();
    image.write_at(&vec![0x44; 64 << 10], 4 << 20).unwrap();
    image.flush().unwrap();
    image.storage_mut().clone()
}

/// Sets the 16-bit refcount of `cluster` in the first refcount block (at 0x20000 for a fresh image).
fn set_refcount(storage: &mut MemStorage, cluster: usize, value: u16) {
    BigEndian::write_u16(&mut storage.data[0x20000 + cluster * 2..], value);
}

fn check(storage: &MemStorage, repair: Repair) -> (qcow::CheckReport, MemStorage) {
    let options = OpenOptions {
        read_only: repair == Repair::None,
        check_mode: true,
        ..OpenOptions::default()
    };
    let mut image = Image::open_storage(storage.clone(), None, &options).unwrap();
    let report = qcow::check(&mut image, repair).unwrap();
    let after = image.storage_mut().clone();
    (report, after)
}

#[test]
fn clean_image_checks_clean() {
    let storage = image_with_data();
    let (report, _) = check(&storage, Repair::None);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.allocated_clusters, 5);
    assert_eq!(report.total_clusters, 256);
    assert_eq!(report.image_end_offset, 10 * 65536);
}

#[test]
fn too_low_is_corruption_too_high_is_leak_and_repair_all_fixes_both() {
    let mut storage = image_with_data();
    set_refcount(&mut storage, 5, 0);
    set_refcount(&mut storage, 6, 2);
    let (report, _) = check(&storage, Repair::None);
    // Cluster 5: refcount too low, plus its COPIED flag no longer matches; cluster 6: a leak whose
    // COPIED flag also mismatches.
    assert_eq!(report.corruptions, 3, "{:?}", report.messages);
    assert_eq!(report.leaks, 1, "{:?}", report.messages);
    let (report, repaired) = check(&storage, Repair::All);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        report.corruptions_fixed, 1,
        "like qemu-img: the COPIED mismatches vanish with the refcount fix"
    );
    assert_eq!(report.leaks_fixed, 1);
    let mut image = Image::open_storage(repaired, None, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x33));
}

#[test]
fn repair_leaks_fixes_only_leaks() {
    let mut storage = image_with_data();
    set_refcount(&mut storage, 7, 3);
    set_refcount(&mut storage, 9, 2);
    let (report, _) = check(&storage, Repair::None);
    assert_eq!(
        (report.corruptions, report.leaks),
        (2, 2),
        "{:?}",
        report.messages
    );
    let (report, _) = check(&storage, Repair::Leaks);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.leaks_fixed, 2);
}

#[test]
fn dirty_image_is_repaired_on_read_write_open() {
    let mut storage = image_with_data();
    set_refcount(&mut storage, 5, 0);
    let mut incompatible = BigEndian::read_u64(&storage.data[72..]);
    incompatible |= 1;
    BigEndian::write_u64(&mut storage.data[72..], incompatible);
    let image = Image::open_storage(storage, None, &OpenOptions::default()).unwrap();
    assert_eq!(
        image.header().incompatible_features & 1,
        0,
        "dirty bit cleared"
    );
    let mut image = image;
    let on_disk = image.storage_mut().clone();
    let (report, _) = check(&on_disk, Repair::None);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(BigEndian::read_u64(&on_disk.data[72..]) & 1, 0);
}

#[test]
fn corrupt_bit_refuses_read_write_but_allows_reads() {
    let mut storage = image_with_data();
    storage.data[79] |= 2;
    let err = Image::open_storage(storage.clone(), None, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, qcow::Error::CorruptImage), "{err}");
    let options = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let mut image = Image::open_storage(storage, None, &options).unwrap();
    let mut buf = [0u8; 512];
    image.read_at(&mut buf, 4 << 20).unwrap();
    assert_eq!(buf, [0x44; 512]);
    assert!(matches!(
        image.write_at(&buf, 0),
        Err(qcow::Error::ReadOnly)
    ));
    let _ = image.storage_mut().len();
}
