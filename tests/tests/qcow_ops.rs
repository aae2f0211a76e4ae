//! commit, rebase (safe and unsafe), resize (grow, shrink), amend and measure against qemu-img:
//! every operation runs on twin copies of one image set, once by `qcow` and once by `qemu-img`;
//! the results must be `qemu-img compare`-equal, `qemu-img check` clean, and the commands must
//! print the same lines with the same exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cowvm_tests::qcow_harness::{
    assert_qemu_check_clean, qcow, qemu_img, qemu_io, skip_without_qemu, RunOutput,
};

const MIB: u64 = 1024 * 1024;

fn arg(path: &Path) -> String {
    path.display().to_string()
}

fn qemu_ok(args: &[&str], context: &str) -> RunOutput {
    let out = qemu_img(args);
    assert!(
        out.success(),
        "{context}: qemu-img {args:?}\n{}",
        out.describe()
    );
    out
}

/// One image set, built by `build` in a directory, and a copy of it for the other tool.
struct Twins {
    _dir: tempfile::TempDir,
    ours: PathBuf,
    theirs: PathBuf,
}

impl Twins {
    fn new(build: impl Fn(&Path)) -> Twins {
        let dir = tempfile::tempdir().expect("temp dir");
        let ours = dir.path().join("ours");
        let theirs = dir.path().join("theirs");
        for path in [&ours, &theirs] {
            std::fs::create_dir(path).expect("mkdir");
            build(path);
        }
        Twins {
            _dir: dir,
            ours,
            theirs,
        }
    }

    /// Runs the same command through both tools (`{}` in an argument stands for the set's
    /// directory) and asserts the same exit code and stdout, and stderr up to the program name.
    fn run(&self, args: &[&str]) -> (RunOutput, RunOutput) {
        let with = |dir: &Path| -> Vec<String> {
            args.iter().map(|a| a.replace("{}", &arg(dir))).collect()
        };
        let ours = qcow(&with(&self.ours));
        let theirs = qemu_img(&with(&self.theirs));
        let normalise =
            |text: &str, dir: &Path| text.replace(&arg(dir), "DIR").replace("qemu-img", "qcow");
        assert_eq!(
            (ours.code, normalise(&ours.stdout, &self.ours)),
            (theirs.code, normalise(&theirs.stdout, &self.theirs)),
            "{args:?}: exit code or output differs\nqcow:\n{}\nqemu-img:\n{}",
            ours.describe(),
            theirs.describe()
        );
        assert_eq!(
            normalise(&ours.stderr, &self.ours),
            normalise(&theirs.stderr, &self.theirs),
            "{args:?}: messages differ"
        );
        (ours, theirs)
    }

    /// Both copies of `name` read the same (`qemu-img compare`, through their chains) and ours is
    /// clean; with `exact`, the allocation agrees too (`compare -s`).
    fn assert_same(&self, name: &str, context: &str) {
        let (ours, theirs) = (self.ours.join(name), self.theirs.join(name));
        let out = qemu_img(&["compare", &arg(&ours), &arg(&theirs)]);
        assert!(
            out.success(),
            "{context}: {name} differs from qemu-img's\n{}",
            out.describe()
        );
        let info = |path: &Path| -> serde_json::Value {
            let out = qemu_ok(&["info", "--output=json", &arg(path)], context);
            serde_json::from_str(&out.stdout).expect("info json")
        };
        let (a, b) = (info(&ours), info(&theirs));
        for key in [
            "virtual-size",
            "backing-filename",
            "backing-filename-format",
        ] {
            assert_eq!(a[key], b[key], "{context}: {name}: {key}");
        }
        for key in ["compat", "lazy-refcounts", "refcount-bits"] {
            assert_eq!(
                a["format-specific"]["data"][key], b["format-specific"]["data"][key],
                "{context}: {name}: {key}"
            );
        }
        if a["format"] == "qcow2" {
            assert_qemu_check_clean(&ours, &format!("{context}: {name}"));
        }
    }
}

/// base (4 MiB of data) ← mid (some writes, a zero cluster) ← top (8 MiB, larger than both).
fn chain(dir: &Path) {
    let run = |args: &[&str]| qemu_ok(args, "build the chain");
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &arg(&dir.join("base.qcow2")),
        "4M",
    ]);
    qemu_io(
        &dir.join("base.qcow2"),
        "qcow2",
        &["write -P 1 0 4M".into()],
    );
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &arg(&dir.join("mid.qcow2")),
    ]);
    qemu_io(
        &dir.join("mid.qcow2"),
        "qcow2",
        &["write -P 2 100k 300k".into(), "write -z 2M 512k".into()],
    );
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &arg(&dir.join("top.qcow2")),
        "8M",
    ]);
    qemu_io(
        &dir.join("top.qcow2"),
        "qcow2",
        &[
            "write -P 3 1M 1M".into(),
            "write -z 3M 64k".into(),
            "write -P 4 5M 1M".into(),
            "write -P 5 8000k 10k".into(),
        ],
    );
}

#[test]
fn commit_like_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    // Into the backing file (the top is emptied), with -d (kept), and with -b into the base.
    for extra in [&[][..], &["-d"], &["-b", "{}/base.qcow2"]] {
        let twins = Twins::new(chain);
        let mut args = vec!["commit"];
        args.extend(extra.iter().copied());
        args.push("{}/top.qcow2");
        twins.run(&args);
        let context = format!("commit {extra:?}");
        for name in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
            twins.assert_same(name, &context);
        }
    }
    // A raw base file grows too.
    let twins = Twins::new(|dir| {
        std::fs::write(dir.join("base.raw"), vec![7u8; MIB as usize]).expect("raw base");
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
                &arg(&dir.join("over.qcow2")),
                "3M",
            ],
            "overlay",
        );
        qemu_io(
            &dir.join("over.qcow2"),
            "qcow2",
            &["write -P 8 512k 1M".into(), "write -z 2M 64k".into()],
        );
    });
    twins.run(&["commit", "{}/over.qcow2"]);
    twins.assert_same("over.qcow2", "commit into raw");
    twins.assert_same("base.raw", "commit into raw");
    // Refusals.
    let twins = Twins::new(chain);
    twins.run(&["commit", "{}/base.qcow2"]);
    twins.run(&["commit", "-b", "{}/nonexist.qcow2", "{}/top.qcow2"]);
    twins.run(&["commit", "-q", "{}/top.qcow2"]);
}

#[test]
fn rebase_like_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    let build = |dir: &Path| {
        chain(dir);
        qemu_ok(
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &arg(&dir.join("other.qcow2")),
                "6M",
            ],
            "other",
        );
        qemu_io(
            &dir.join("other.qcow2"),
            "qcow2",
            &["write -P 1 0 1M".into(), "write -P 9 3M 2M".into()],
        );
    };
    let cases: &[(&[&str], &[&str])] = &[
        (&["-b", "other.qcow2", "-F", "qcow2"], &["top.qcow2"]),
        (&["-b", "base.qcow2", "-F", "qcow2"], &["top.qcow2"]),
        (&["-b", ""], &["top.qcow2"]),
        (&["-u", "-b", "other.qcow2", "-F", "qcow2"], &["top.qcow2"]),
        (&["-u", "-b", "missing.qcow2", "-F", "qcow2"], &[]),
        (&["-b", "missing.qcow2", "-F", "qcow2"], &["top.qcow2"]),
        (&[], &["top.qcow2"]),
    ];
    for (flags, check) in cases {
        let twins = Twins::new(build);
        let mut args = vec!["rebase"];
        args.extend(flags.iter().copied());
        args.push("{}/top.qcow2");
        twins.run(&args);
        for name in *check {
            twins.assert_same(name, &format!("rebase {flags:?}"));
        }
    }
}

#[test]
fn resize_like_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    let build = |dir: &Path| {
        chain(dir);
        std::fs::write(dir.join("plain.raw"), vec![3u8; 1000]).expect("raw");
        qemu_ok(
            &["snapshot", "-c", "snap", &arg(&dir.join("top.qcow2"))],
            "snapshot",
        );
    };
    let cases: &[&[&str]] = &[
        &["{}/top.qcow2", "16M"],
        &["{}/top.qcow2", "+3M"],
        &["{}/top.qcow2", "1G"],
        &["--shrink", "{}/top.qcow2", "5M"],
        &["--shrink", "{}/top.qcow2", "--", "-6M"],
        &["{}/top.qcow2", "--", "-1M"],
        &["{}/top.qcow2", "5000"],
        &["{}/top.qcow2", "+1000"],
        &["{}/top.qcow2", "0"],
        &["{}/top.qcow2", "abc"],
        &["{}/top.qcow2"],
        &["-q", "{}/top.qcow2", "9M"],
        // A grown overlay must not show its longer backing file's data in the new area.
        &["{}/mid.qcow2", "2M"],
        &["-f", "raw", "{}/plain.raw", "3000"],
        &["-f", "raw", "--shrink", "{}/plain.raw", "100"],
    ];
    for case in cases {
        let twins = Twins::new(build);
        let mut args = vec!["resize"];
        args.extend(case.iter().copied());
        twins.run(&args);
        for name in ["top.qcow2", "mid.qcow2", "plain.raw"] {
            twins.assert_same(name, &format!("resize {case:?}"));
        }
    }
    // Growing a shrunk overlay must not bring back its backing file's data either.
    let twins = Twins::new(build);
    twins.run(&["resize", "--shrink", "{}/mid.qcow2", "1M"]);
    twins.run(&["resize", "{}/mid.qcow2", "4M"]);
    twins.assert_same("mid.qcow2", "shrink then grow");
}

#[test]
fn amend_like_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    let build = |dir: &Path| {
        chain(dir);
        let image = dir.join("top.qcow2");
        qemu_ok(&["snapshot", "-c", "snap", &arg(&image)], "snapshot");
        qemu_io(
            &image,
            "qcow2",
            &["write -z 6M 128k".into(), "write -P 6 0 64k".into()],
        );
        let plain = dir.join("plain.qcow2");
        qemu_ok(
            &["create", "-q", "-f", "qcow2", &arg(&plain), "2M"],
            "plain",
        );
        qemu_io(
            &plain,
            "qcow2",
            &["write -P 1 0 1M".into(), "write -z 1M 128k".into()],
        );
    };
    let cases: &[&str] = &[
        "compat=0.10",
        "refcount_bits=64",
        "refcount_bits=1",
        "refcount_bits=8,lazy_refcounts=on",
        "lazy_refcounts=on",
        "size=16M",
        "compat=0.10,refcount_bits=8",
        "refcount_bits=3",
        "cluster_size=4096",
        "nonsense=1",
        "compat=2",
    ];
    for options in cases {
        for name in ["top.qcow2", "plain.qcow2"] {
            let twins = Twins::new(build);
            let target = format!("{{}}/{name}");
            twins.run(&["amend", "-o", options, &target]);
            twins.assert_same(name, &format!("amend -o {options} {name}"));
            if name == "top.qcow2" {
                // The snapshot kept its data.
                for dir in [&twins.ours, &twins.theirs] {
                    let out = qemu_ok(
                        &[
                            "convert",
                            "-l",
                            "snapshot.name=snap",
                            "-O",
                            "raw",
                            &arg(&dir.join(name)),
                            &arg(&dir.join("snap.raw")),
                        ],
                        "snapshot contents",
                    );
                    drop(out);
                }
                let compare = qemu_img(&[
                    "compare",
                    "-f",
                    "raw",
                    "-F",
                    "raw",
                    &arg(&twins.ours.join("snap.raw")),
                    &arg(&twins.theirs.join("snap.raw")),
                ]);
                assert!(compare.success(), "amend {options}: snapshot differs");
            }
        }
    }
    let twins = Twins::new(build);
    twins.run(&["amend", "{}/top.qcow2"]);
}

#[test]
fn measure_like_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    let twins = Twins::new(|dir| {
        chain(dir);
        std::fs::write(dir.join("plain.raw"), vec![3u8; 3 * MIB as usize]).expect("raw");
    });
    let cases: &[&[&str]] = &[
        &["--size", "1G", "-O", "qcow2"],
        &["--size", "1G", "-O", "raw"],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=1",
        ],
        &[
            "--size",
            "100G",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M,refcount_bits=64",
        ],
        &["--size", "1G", "-O", "qcow2", "--output", "json"],
        &["-O", "qcow2", "{}/top.qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=4096", "{}/top.qcow2"],
        &["-O", "qcow2", "-o", "compat=0.10", "{}/top.qcow2"],
        &["-O", "qcow2", "--output", "json", "{}/mid.qcow2"],
        &["-O", "raw", "{}/top.qcow2"],
        &["{}/top.qcow2"],
        &["-O", "qcow2", "-f", "raw", "{}/plain.raw"],
        &["-O", "qcow2", "-o", "backing_file=x", "{}/top.qcow2"],
        &["--size", "1G", "{}/top.qcow2"],
        &["-O", "qcow2"],
    ];
    for case in cases {
        let mut args = vec!["measure"];
        args.extend(case.iter().copied());
        // qemu-img spells the output flag --output=json; qcow takes both spellings.
        let args: Vec<&str> = args;
        twins.run(&args);
    }
}

/// Ctrl-C during a commit leaves both images valid, and the top image unchanged.
#[test]
fn interrupted_commit_leaves_both_images_valid() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_ok(
        &["create", "-q", "-f", "qcow2", &arg(&base), "1536M"],
        "base",
    );
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
            &arg(&top),
        ],
        "top",
    );
    qemu_io(&top, "qcow2", &["write -P 5 0 1536M".into()]);
    let before = dir.path().join("before.raw");
    qemu_ok(
        &["convert", "-O", "raw", &arg(&top), &arg(&before)],
        "snapshot the content",
    );
    let mut child = Command::new(cowvm_tests::bin_path("qcow"))
        .args(["commit", &arg(&top)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qcow commit");
    let started = Instant::now();
    while std::fs::metadata(&base).map_or(0, |m| m.len()) < 64 * MIB {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "commit never got going"
        );
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "commit finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    let output = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_qemu_check_clean(&base, "interrupted commit: base");
    assert_qemu_check_clean(&top, "interrupted commit: top");
    let compare = qemu_img(&["compare", "-F", "raw", &arg(&top), &arg(&before)]);
    assert!(
        compare.success(),
        "the top image changed\n{}",
        compare.describe()
    );
}
