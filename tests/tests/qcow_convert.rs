//! `qcow convert` and `qcow compare` against qemu-img: each conversion's result is
//! `qemu-img compare`-equal to qemu-img's own conversion of the same source and `qemu-img check`
//! clean; compare prints qemu-img's lines and exit codes; Ctrl-C leaves no partial output.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cowvm_tests::qcow_harness::{
    assert_qemu_check_clean, qcow, qemu_img, qemu_io, skip_without_qemu, RunOutput,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn arg(path: &Path) -> String {
    path.display().to_string()
}

fn ok(out: RunOutput, context: &str) -> RunOutput {
    assert!(
        out.success() && !out.stderr.contains("panicked"),
        "{context}: command failed\n{}",
        out.describe()
    );
    out
}

fn qemu_ok(args: &[&str], context: &str) -> RunOutput {
    ok(qemu_img(args), context)
}

/// Source images: a qcow2 with data, zero-flag clusters, data that is all zeros and holes; an
/// overlay on a qcow2 base; an overlay on a raw base; a raw file.
struct Sources {
    dir: tempfile::TempDir,
}

impl Sources {
    fn new() -> Sources {
        let dir = tempfile::tempdir().expect("temp dir");
        let sources = Sources { dir };
        let plain = sources.path("plain.qcow2");
        qemu_ok(
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=16k",
                &arg(&plain),
                "24M",
            ],
            "create plain",
        );
        qemu_io(
            &plain,
            "qcow2",
            &[
                "write -P 1 0 3M".into(),
                "write -P 0 4M 1M".into(),
                "write -z 6M 1M".into(),
                "write -P 7 9000 100000".into(),
                "write -P 9 23M 1M".into(),
                // Half zero, half data inside one 64 KiB cluster of a qcow2 target.
                "write -P 5 12320k 32k".into(),
            ],
        );
        let base = sources.path("base.qcow2");
        qemu_ok(
            &["create", "-q", "-f", "qcow2", &arg(&base), "24M"],
            "create base",
        );
        qemu_io(
            &base,
            "qcow2",
            &["write -P 3 0 8M".into(), "write -P 4 16M 2M".into()],
        );
        let overlay = sources.path("overlay.qcow2");
        qemu_ok(
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                &arg(&overlay),
            ],
            "create overlay",
        );
        qemu_io(
            &overlay,
            "qcow2",
            &[
                "write -P 6 1M 2M".into(),
                "write -z 5M 512k".into(),
                "write -P 8 17M 100k".into(),
            ],
        );
        let raw_base = sources.path("base.raw");
        let mut bytes = vec![0u8; 20 * MIB as usize];
        bytes[..MIB as usize].fill(0x21);
        bytes[10 * MIB as usize..11 * MIB as usize].fill(0x22);
        std::fs::write(&raw_base, &bytes).expect("write raw base");
        let raw_overlay = sources.path("raw-overlay.qcow2");
        qemu_ok(
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.raw",
                "-F",
                "raw",
                &arg(&raw_overlay),
                "24M",
            ],
            "create raw overlay",
        );
        qemu_io(&raw_overlay, "qcow2", &["write -P 2 512k 1M".into()]);
        sources
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Runs `convert ARGS SRC DST` with qcow and qemu-img; both results must be equal and clean.
fn convert_like_qemu(sources: &Sources, source: &str, args: &[&str], tag: &str) {
    let context = format!("convert {args:?} {source}");
    let src = sources.path(source);
    let ours = sources.path(&format!("{tag}.ours"));
    let theirs = sources.path(&format!("{tag}.theirs"));
    let mut full: Vec<String> = vec!["convert".into()];
    full.extend(args.iter().map(|s| s.to_string()));
    full.push(arg(&src));
    let mut ours_args = full.clone();
    ours_args.push(arg(&ours));
    let mut theirs_args = full;
    theirs_args.push(arg(&theirs));
    let out = ok(qcow(&ours_args), &context);
    assert_eq!(out.stdout, "", "{context}: convert prints nothing");
    ok(qemu_img(&theirs_args), &context);
    let compare = qemu_img(&["compare", &arg(&ours), &arg(&theirs)]);
    assert!(
        compare.success() && compare.stdout.contains("Images are identical."),
        "{context}: qemu-img compare of qcow's and qemu-img's results\n{}",
        compare.describe()
    );
    // Also against the source itself, through its whole backing chain.
    let compare = qemu_img(&["compare", &arg(&src), &arg(&ours)]);
    assert!(compare.success(), "{context}\n{}", compare.describe());
    let info = qemu_ok(&["info", "--output=json", &arg(&ours)], &context);
    let info: serde_json::Value = serde_json::from_str(&info.stdout).expect("info json");
    let theirs_info = qemu_ok(&["info", "--output=json", &arg(&theirs)], &context);
    let theirs_info: serde_json::Value =
        serde_json::from_str(&theirs_info.stdout).expect("info json");
    for key in [
        "format",
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
    ] {
        assert_eq!(info[key], theirs_info[key], "{context}: info {key}");
    }
    assert_eq!(
        info["format-specific"]["data"]["compat"], theirs_info["format-specific"]["data"]["compat"],
        "{context}: compat"
    );
    if info["format"] == "qcow2" {
        assert_qemu_check_clean(&ours, &context);
        let check = qemu_img(&["check", "--output=json", &arg(&ours)]);
        let check: serde_json::Value = serde_json::from_str(&check.stdout).expect("check json");
        let compressed = check["compressed-clusters"].as_u64().unwrap_or(0);
        if args.contains(&"-c") {
            assert!(compressed > 0, "{context}: no compressed clusters\n{check}");
        } else {
            assert_eq!(compressed, 0, "{context}: unexpected compressed clusters");
        }
    } else {
        // Sparse: the raw output occupies no more than qemu-img's (plus a little slack).
        let blocks = |path: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).expect("stat").blocks() * 512
        };
        assert!(
            blocks(&ours) <= blocks(&theirs) + 256 * KIB,
            "{context}: raw output allocates {} bytes, qemu-img's {}",
            blocks(&ours),
            blocks(&theirs)
        );
    }
    let _ = std::fs::remove_file(&ours);
    let _ = std::fs::remove_file(&theirs);
}

#[test]
fn convert_results_equal_qemu_imgs() {
    if skip_without_qemu() {
        return;
    }
    let sources = Sources::new();
    let raw = sources.path("plain.raw");
    qemu_ok(
        &[
            "convert",
            "-O",
            "raw",
            &arg(&sources.path("plain.qcow2")),
            &arg(&raw),
        ],
        "make raw source",
    );
    let cases: &[(&str, &[&str])] = &[
        ("plain.qcow2", &["-O", "qcow2"]),
        ("plain.qcow2", &["-O", "raw"]),
        ("plain.qcow2", &["-c", "-O", "qcow2"]),
        (
            "plain.qcow2",
            &["-c", "-O", "qcow2", "-o", "cluster_size=4096"],
        ),
        (
            "plain.qcow2",
            &["-O", "qcow2", "-o", "cluster_size=64k,compat=0.10"],
        ),
        ("plain.qcow2", &["-O", "raw", "-S", "0"]),
        ("plain.qcow2", &["-O", "qcow2", "-S", "64k"]),
        ("plain.raw", &["-f", "raw", "-O", "qcow2"]),
        ("plain.raw", &["-O", "qcow2", "-o", "cluster_size=2M"]),
        ("overlay.qcow2", &["-O", "qcow2"]),
        ("overlay.qcow2", &["-O", "raw"]),
        ("overlay.qcow2", &["-c", "-O", "qcow2"]),
        (
            "overlay.qcow2",
            &["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"],
        ),
        (
            "overlay.qcow2",
            &["-c", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"],
        ),
        ("raw-overlay.qcow2", &["-O", "qcow2"]),
        (
            "raw-overlay.qcow2",
            &["-O", "qcow2", "-B", "base.raw", "-F", "raw"],
        ),
    ];
    for (index, (source, args)) in cases.iter().enumerate() {
        convert_like_qemu(&sources, source, args, &format!("case{index}"));
    }
}

#[test]
fn convert_refusals_match_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    let sources = Sources::new();
    let src = arg(&sources.path("plain.qcow2"));
    let cases: &[&[&str]] = &[
        &["-c", "-O", "raw"],
        &["-O", "raw", "-B", "base.qcow2"],
        &["-O", "vmdk2"],
        &["-O", "qcow2", "-B", "base.qcow2"],
    ];
    for args in cases {
        let run = |tool: &str| {
            let mut full: Vec<String> = vec!["convert".into()];
            full.extend(args.iter().map(|s| s.to_string()));
            full.push(src.clone());
            full.push(arg(&sources.path("refused.out")));
            if tool == "qcow" {
                qcow(&full)
            } else {
                qemu_img(&full)
            }
        };
        let (ours, theirs) = (run("qcow"), run("qemu-img"));
        assert_eq!(ours.code, theirs.code, "{args:?}\n{}", ours.describe());
        assert_eq!(
            ours.stderr.replace("qcow:", "qemu-img:"),
            theirs.stderr,
            "{args:?}: messages differ"
        );
    }
    let missing = qcow(&["convert", "-O", "qcow2", "no-such-file", "x.qcow2"]);
    assert_eq!(missing.code, Some(1), "{}", missing.describe());
    assert!(missing.stderr.contains("Could not open 'no-such-file'"));
}

/// The library writes zstd-compressed clusters into an image whose header says zstd.
#[test]
fn library_writes_zstd_compressed_clusters() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("zstd.qcow2");
    qemu_ok(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            &arg(&image),
            "1M",
        ],
        "create",
    );
    let data: Vec<u8> = (0..(MIB as usize)).map(|i| (i / 300 % 5) as u8).collect();
    {
        let mut opened = qcow::Image::open(&image, &qcow::OpenOptions::default()).expect("open");
        for (index, cluster) in data.chunks(64 * KIB as usize).enumerate() {
            opened
                .write_compressed(index as u64 * 64 * KIB, cluster)
                .expect("compressed write");
        }
        opened.close().expect("close");
    }
    assert_qemu_check_clean(&image, "zstd");
    let check = qemu_img(&["check", "--output=json", &arg(&image)]);
    let check: serde_json::Value = serde_json::from_str(&check.stdout).expect("json");
    assert_eq!(check["compressed-clusters"], 16);
    let raw = dir.path().join("zstd.raw");
    std::fs::write(&raw, &data).expect("write raw");
    let compare = qemu_img(&["compare", "-F", "raw", &arg(&image), &arg(&raw)]);
    assert!(compare.success(), "{}", compare.describe());
}

/// `qcow compare` prints qemu-img's lines and exit codes.
#[test]
fn compare_matches_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    let sources = Sources::new();
    let dir = sources.dir.path();
    let make = |name: &str, size: &str, commands: &[&str]| {
        let path = dir.join(name);
        qemu_ok(
            &["create", "-q", "-f", "qcow2", &arg(&path), size],
            "create",
        );
        if !commands.is_empty() {
            qemu_io(
                &path,
                "qcow2",
                &commands.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            );
        }
        arg(&path)
    };
    let empty = make("empty.qcow2", "4M", &[]);
    let data = make("data.qcow2", "4M", &["write -P 1 70000 10"]);
    let zeros = make("zeros.qcow2", "4M", &["write -P 0 1M 64k"]);
    let longer = make("longer.qcow2", "5M", &[]);
    let longer_data = make("longer-data.qcow2", "5M", &["write -P 1 4M 1k"]);
    let copy = dir.join("copy.qcow2");
    qemu_ok(&["convert", "-O", "qcow2", &data, &arg(&copy)], "copy");
    let copy = arg(&copy);
    let overlay = arg(&sources.path("overlay.qcow2"));
    let flat = dir.join("flat.raw");
    qemu_ok(&["convert", "-O", "raw", &overlay, &arg(&flat)], "flatten");
    let flat = arg(&flat);
    let cases: Vec<Vec<&str>> = vec![
        vec![&empty, &empty],
        vec![&empty, &data],
        vec![&data, &copy],
        vec![&empty, &zeros],
        vec!["-s", &empty, &zeros],
        vec!["-s", &data, &copy],
        vec!["-s", &empty, &data],
        vec![&empty, &longer],
        vec![&longer, &empty],
        vec!["-s", &empty, &longer],
        vec![&empty, &longer_data],
        vec![&longer_data, &empty],
        vec!["-q", &empty, &data],
        vec![&overlay, &flat],
        vec!["-F", "raw", &overlay, &flat],
        vec![&overlay, &data],
        vec!["no-such-file", &data],
    ];
    for case in cases {
        let mut args = vec!["compare"];
        args.extend(case.iter().copied());
        let (ours, theirs) = (qcow(&args), qemu_img(&args));
        assert_eq!(
            (ours.code, &ours.stdout),
            (theirs.code, &theirs.stdout),
            "compare {case:?}\nqcow:\n{}\nqemu-img:\n{}",
            ours.describe(),
            theirs.describe()
        );
    }
}

/// Ctrl-C during a convert stops it and removes the incomplete output.
#[test]
fn interrupted_convert_removes_its_output() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("big.qcow2");
    qemu_ok(
        &["create", "-q", "-f", "qcow2", &arg(&source), "1536M"],
        "create",
    );
    qemu_io(&source, "qcow2", &["write -P 3 0 1536M".into()]);
    let target = dir.path().join("big-copy.qcow2");
    let mut child = Command::new(cowvm_tests::bin_path("qcow"))
        .args(["convert", "-O", "qcow2", &arg(&source), &arg(&target)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qcow convert");
    let started = Instant::now();
    // Wait until the copy is under way, then interrupt it.
    while std::fs::metadata(&target).map_or(0, |m| m.len()) < 64 * MIB {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "convert never got going"
        );
        if child.try_wait().expect("try_wait").is_some() {
            panic!("convert finished before it could be interrupted; make the source bigger");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let output = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!target.exists(), "the partial output is still there");
}
