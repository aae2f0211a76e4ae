//! External data files (issue 12): images whose guest data lives in a `data_file` (optionally
//! `data_file_raw`). Random writes, zero-writes and discards through qcow on images qemu-img made,
//! and through qemu-io on images qcow made, judged by qemu-img (check clean, compare equal to a
//! raw model; a raw data file must itself be the model); and `info`, `map`, `check`, `resize`,
//! `amend`, `snapshot`, `compare` and `convert` of such images compared with qemu-img byte for
//! byte (output, exit status and the files left behind).
//!
//! QEMU opens a relative data file name from the working directory (not the image's), so every
//! tool runs inside the scratch directory here.

use std::path::Path;
use std::process::Command;

use cowvm_tests::dropin::{assert_table, qemu_img_in, qemu_io_in};
use cowvm_tests::qcow_harness::{
    random_ops, run_with_timeout, skip_without_qemu, DiskModel, Rng, RunOutput, TOOL_TIMEOUT,
};

/// Runs `program args…` inside `dir`.
fn run_in(dir: &Path, program: &Path, args: &[&str]) -> RunOutput {
    run_with_timeout(
        Command::new(program).args(args).current_dir(dir),
        TOOL_TIMEOUT,
    )
}

fn qemu_img(dir: &Path, args: &[&str]) -> RunOutput {
    run_in(dir, Path::new("qemu-img"), args)
}

fn qcow(dir: &Path, args: &[&str]) -> RunOutput {
    run_in(dir, &cowvm_tests::bin_path("qcow"), args)
}

/// Sets bits in the big-endian feature field at `offset` of a qcow2 header.
fn set_feature_bits(path: &Path, offset: usize, bits: u64) {
    let mut bytes = std::fs::read(path).expect("read image");
    let field: [u8; 8] = bytes[offset..offset + 8].try_into().expect("8 bytes");
    let value = u64::from_be_bytes(field) | bits;
    bytes[offset..offset + 8].copy_from_slice(&value.to_be_bytes());
    std::fs::write(path, bytes).expect("write image");
}

/// The images every table line starts from, made once by qemu-img and copied per twin.
fn template() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("scratch dir");
    let d = dir.path();
    let create = |args: &[&str]| qemu_img_in(d, &[&["create", "-q", "-f", "qcow2"], args].concat());
    // Data, zero clusters (allocated and plain) and a discard in an external data file.
    create(&["-o", "data_file=d.raw", "d.q", "2M"]);
    qemu_io_in(
        d,
        "qcow2",
        "d.q",
        &[
            "write -P 1 0 100k",
            "write -P 2 300k 4k",
            "write -z 192k 64k",
            "write -z 256k 64k",
            "discard 0 64k",
            "write -P 3 1M 512k",
            "write -z -u 1088k 64k",
        ],
    );
    // A raw data file (every cluster mapped at its offset), not a whole number of clusters.
    create(&["-o", "data_file=r.raw,data_file_raw=on", "r.q", "1000k"]);
    qemu_io_in(
        d,
        "qcow2",
        "r.q",
        &["write -P 4 0 200k", "write -z 64k 64k", "discard 128k 64k"],
    );
    // Extended L2 entries: subclusters in the data file.
    create(&[
        "-o",
        "data_file=x.raw,extended_l2=on,cluster_size=64k",
        "x.q",
        "1M",
    ]);
    qemu_io_in(
        d,
        "qcow2",
        "x.q",
        &["write -P 5 8k 2k", "write -z 64k 2k", "write -P 6 130k 70k"],
    );
    // A data file image over a backing file.
    create(&["base.q", "1M"]);
    qemu_io_in(d, "qcow2", "base.q", &["write -P 7 0 1M"]);
    create(&[
        "-b",
        "base.q",
        "-F",
        "qcow2",
        "-o",
        "data_file=b.raw",
        "b.q",
    ]);
    qemu_io_in(
        d,
        "qcow2",
        "b.q",
        &["write -P 8 100k 50k", "write -z 512k 64k"],
    );
    // The data file bit without a name, a data file that is gone, the raw bit alone.
    create(&["noname.q", "1M"]);
    set_feature_bits(&d.join("noname.q"), 72, 1 << 2);
    create(&["-o", "data_file=gone.raw", "gone.q", "1M"]);
    std::fs::remove_file(d.join("gone.raw")).expect("remove gone.raw");
    create(&["rawbit.q", "1M"]);
    set_feature_bits(&d.join("rawbit.q"), 88, 1 << 1);
    create(&["plain.q", "1M"]);
    std::fs::copy(d.join("d.raw"), d.join("alt.raw")).expect("copy data file");
    dir
}

/// A `prepare` for [`assert_table`]: copies the template's files.
fn copier(template: &Path) -> impl Fn(&Path) + '_ {
    move |dir: &Path| {
        for entry in std::fs::read_dir(template).expect("template").flatten() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy template");
        }
    }
}

#[test]
fn info_map_and_check_match_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    let template = template();
    let other = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"d.q"},"data-file":{"driver":"file","filename":"alt.raw"}}"#;
    let node =
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"d.q"},"data-file":"n0"}"#;
    let not_external = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"plain.q"},"data-file":{"driver":"file","filename":"alt.raw"}}"#;
    let lines = [
        "info d.q".to_string(),
        "info --output=json d.q".into(),
        "info r.q".into(),
        "info --output=json x.q".into(),
        "info b.q".into(),
        "info noname.q".into(),
        "info --output=json gone.q".into(),
        "info rawbit.q".into(),
        format!("info {other}"),
        "map d.q".into(),
        "map --output=json d.q".into(),
        "map r.q".into(),
        "map --output=json r.q".into(),
        "map x.q".into(),
        "map --output=json x.q".into(),
        "map b.q".into(),
        "map --output=json b.q".into(),
        "map --output=json -s 100k -l 1M d.q".into(),
        "map noname.q".into(),
        "map gone.q".into(),
        "map --output=json rawbit.q".into(),
        format!("map --output=json {other}"),
        format!("map {node}"),
        "map --image-opts driver=qcow2,file.filename=x.q,data-file.filename=alt.raw".into(),
        "check d.q".into(),
        "check --output=json d.q".into(),
        "check r.q".into(),
        "check --output=json x.q".into(),
        "check b.q".into(),
        "check noname.q".into(),
        "check gone.q".into(),
        "check rawbit.q".into(),
        "check -r all d.q".into(),
        format!("check {not_external}"),
    ];
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    assert_table(&lines, copier(template.path()));
}

#[test]
fn other_commands_match_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    let template = template();
    assert_table(
        &[
            "snapshot -c s1 d.q",
            "snapshot -l d.q",
            "resize d.q 3M",
            "resize --shrink d.q 1M",
            "resize r.q 1536k",
            "resize --shrink r.q 100k",
            "amend -o data_file=alt.raw d.q",
            "amend -o data_file= d.q",
            "amend -o data_file_raw=on d.q",
            "amend -o data_file_raw=off r.q",
            "amend -o compat=0.10 d.q",
            "amend -o data_file=x.raw plain.q",
            "compare -f qcow2 -F raw r.q r.raw",
            "compare d.q b.q",
            "convert -O raw b.q out.raw",
            "convert -O raw x.q out.raw",
            "create -f qcow2 -o data_file=new.raw,preallocation=metadata new.q 100k",
            "create -f qcow2 -o data_file=new.raw,preallocation=full new.q 100k",
            "create -f qcow2 -o data_file=new.raw,data_file_raw=on new.q 100k",
        ],
        copier(template.path()),
    );
}

/// One random interop run: who made the image, what it is, and which tool writes first.
struct Scenario {
    name: &'static str,
    /// `-o` options of the image (its data file is `data.raw`).
    options: &'static str,
    size: u64,
    cluster_size: u64,
    /// A backing file `base.q` full of data under the image.
    backing: bool,
    /// qcow creates the image and qemu-io writes first (else the other way round).
    qcow_creates: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "data file, 4k clusters",
        options: "data_file=data.raw,cluster_size=4k",
        size: 3 << 20,
        cluster_size: 4096,
        backing: false,
        qcow_creates: false,
    },
    Scenario {
        name: "raw data file, 64k clusters",
        options: "data_file=data.raw,data_file_raw=on",
        size: 4 << 20,
        cluster_size: 65536,
        backing: false,
        qcow_creates: true,
    },
    Scenario {
        name: "raw data file, extended L2",
        options: "data_file=data.raw,data_file_raw=on,extended_l2=on,cluster_size=32k",
        size: 2 << 20,
        cluster_size: 32768,
        backing: false,
        qcow_creates: false,
    },
    Scenario {
        name: "data file over a backing file",
        options: "data_file=data.raw,cluster_size=16k",
        size: 2 << 20,
        cluster_size: 16384,
        backing: true,
        qcow_creates: true,
    },
];

/// Applies `ops` through qemu-io (`qemu: true`) or `qcow io`, inside `dir`.
fn apply(dir: &Path, qemu: bool, ops: &[String]) {
    let mut args: Vec<&str> = if qemu {
        vec!["-f", "qcow2"]
    } else {
        vec!["io"]
    };
    for op in ops {
        args.push("-c");
        args.push(op);
    }
    args.push("image.q");
    let program = if qemu {
        Path::new("qemu-io").to_path_buf()
    } else {
        cowvm_tests::bin_path("qcow")
    };
    let out = run_in(dir, &program, &args);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        out.success() && !text.contains("failed") && !text.contains("rror"),
        "{}",
        out.describe()
    );
}

/// qemu-img's verdicts on the image against `model`, and qcow's agreement on check and map.
fn judge(dir: &Path, model: &DiskModel, scenario: &Scenario, when: &str) {
    let context = format!("{} ({when})", scenario.name);
    let check = qemu_img(dir, &["check", "image.q"]);
    assert!(
        check.success() && check.stdout.contains("No errors were found"),
        "{context}: qemu-img check\n{}",
        check.describe()
    );
    std::fs::write(dir.join("model.raw"), &model.bytes).expect("write model");
    let compare = qemu_img(dir, &["compare", "-F", "raw", "image.q", "model.raw"]);
    assert!(
        compare.success() && compare.stdout.contains("Images are identical"),
        "{context}: qemu-img compare with the model\n{}",
        compare.describe()
    );
    if scenario.options.contains("data_file_raw=on") {
        let data = std::fs::read(dir.join("data.raw")).expect("read data file");
        assert!(
            data.len() >= model.bytes.len()
                && data[..model.bytes.len()] == model.bytes[..]
                && data[model.bytes.len()..].iter().all(|&b| b == 0),
            "{context}: the raw data file is not the disk's raw image"
        );
    }
    for args in [
        &["check", "--output=json", "image.q"][..],
        &["map", "--output=json", "image.q"],
        &["map", "image.q"],
    ] {
        let (want, got) = (qemu_img(dir, args), qcow(dir, args));
        assert!(
            want.code == got.code && want.stdout == got.stdout,
            "{context}: `{}` differs\n--- qemu-img\n{}\n--- qcow\n{}",
            args.join(" "),
            want.describe(),
            got.describe()
        );
    }
}

#[test]
fn random_writes_agree_with_qemu_both_ways() {
    if skip_without_qemu() {
        return;
    }
    let seed = std::env::var("QCOW_DATAFILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_da7a);
    println!("seed {seed} (rerun with QCOW_DATAFILE_SEED={seed})");
    let mut rng = Rng::new(seed);
    for scenario in SCENARIOS {
        let dir = tempfile::tempdir().expect("scratch dir");
        let d = dir.path();
        let size = scenario.size.to_string();
        let mut model = DiskModel::zeroed(scenario.size);
        let mut create: Vec<&str> = vec!["create", "-q", "-f", "qcow2", "-o", scenario.options];
        if scenario.backing {
            qemu_img_in(d, &["create", "-q", "-f", "qcow2", "base.q", &size]);
            qemu_io_in(d, "qcow2", "base.q", &["write -P 0x5a 0 1M"]);
            model.bytes[..1 << 20].fill(0x5a);
            create.extend(["-b", "base.q", "-F", "qcow2"]);
        }
        create.extend(["image.q", &size]);
        let made = if scenario.qcow_creates {
            qcow(d, &create)
        } else {
            qemu_img(d, &create)
        };
        assert!(made.success(), "{}", made.describe());
        // The first writer is the tool that did not create the image; then the other one.
        for (round, qemu) in [(1, scenario.qcow_creates), (2, !scenario.qcow_creates)] {
            let ops = random_ops(
                &mut rng,
                120,
                scenario.size,
                scenario.cluster_size,
                scenario.cluster_size * 3,
                true,
                true,
            );
            for op in &ops {
                model.apply(op);
            }
            let commands: Vec<String> = ops.iter().map(|op| op.command()).collect();
            apply(d, qemu, &commands);
            let writer = if qemu { "qemu-io" } else { "qcow io" };
            judge(
                d,
                &model,
                scenario,
                &format!("round {round}, {writer} wrote"),
            );
        }
        // Whatever wrote last, qcow reads every byte as the model says.
        apply(d, false, &model.read_commands(0, model.size()));
    }
}

#[test]
fn compressed_output_is_refused_before_anything_is_written() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("scratch dir");
    let d = dir.path();
    qemu_img_in(d, &["create", "-q", "-f", "qcow2", "src.q", "1M"]);
    qemu_io_in(d, "qcow2", "src.q", &["write -P 1 0 64k"]);
    let convert = [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "data_file=c.raw",
        "src.q",
        "c.q",
    ];
    let out = qcow(d, &convert);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert_eq!(
        out.stderr,
        "qcow: compressed writes: not supported with an external data file\n"
    );
    assert!(!d.join("c.q").exists() && !d.join("c.raw").exists());
    // qemu-img refuses too (at its first write, after creating the files).
    let qemu = qemu_img(d, &convert);
    assert!(
        !qemu.success() && qemu.stderr.contains("Operation not supported"),
        "{}",
        qemu.describe()
    );
}
