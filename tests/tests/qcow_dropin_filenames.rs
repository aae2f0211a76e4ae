//! Drop-in point 2: the image names and options qemu-img takes — `json:{...}`, `file:` prefixes,
//! `--image-opts`, `--object`, `-U` — and its `Could not open '…'` messages when they fail, for
//! `info`, `check` and `map`. Also: error prefixes follow the name the tool was invoked as.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use cowvm_tests::dropin::{assert_table, qemu_img_in, qemu_io_in};
use cowvm_tests::qcow_harness::{run_with_timeout, skip_without_qemu, TOOL_TIMEOUT};

fn prepare(dir: &Path) {
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "a.q", "4M"]);
    qemu_io_in(dir, "qcow2", "a.q", &["write -P 5 0 64k"]);
    qemu_img_in(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.q", "-F", "qcow2", "top.q",
        ],
    );
    qemu_img_in(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    std::fs::create_dir(dir.join("sub")).expect("mkdir");
}

#[test]
fn json_and_file_names_match_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    assert_table(
        &[
            r#"info json:{"driver":"qcow2","file":{"driver":"file","filename":"a.q"}}"#,
            r#"info json:{"driver":"qcow2","file.filename":"a.q"}"#,
            r#"info json:{"file.filename":"a.q"}"#,
            r#"info json:{"driver":"raw","file.filename":"a.q"}"#,
            r#"info --output=json json:{"driver":"qcow2","file.filename":"top.q"}"#,
            r#"map --output=json json:{"driver":"qcow2","file.filename":"top.q","backing":null}"#,
            r#"map --output=json json:{"driver":"qcow2","file.filename":"top.q"}"#,
            r#"check json:{"driver":"qcow2","file.filename":"a.q"}"#,
            r#"info json:{"driver":"qcow2""#,
            r#"info json:{"driver":"qcow2","file.filename":"nothere"}"#,
            r#"info json:{"driver":"qcow2","file":"a.q"}"#,
            "info json:[]",
            r#"info json:{"driver":"qcow2","file.filename":"a.q","bogus":1}"#,
            r#"check json:{"driver":"qcow2","file.filename":"nothere"}"#,
            "info file:a.q",
            "map --output=json file:a.q",
            "check file:a.q",
            "info foo:bar",
            "map foo:bar",
        ],
        prepare,
    );
}

#[test]
fn image_opts_objects_and_force_share_match_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    assert_table(
        &[
            "info --image-opts driver=qcow2,file.filename=a.q",
            "info --image-opts file.filename=a.q",
            "map --output=json --image-opts driver=qcow2,file.filename=a.q",
            "check --image-opts driver=qcow2,file.filename=a.q",
            "info --image-opts a.q",
            "info --image-opts -f qcow2 a.q",
            "check --image-opts -f qcow2 a.q",
            "info --object secret,id=s0,data=x a.q",
            "info --object qom-type=secret,id=s1,data=x a.q",
            "info --object foo a.q",
            "info --object id=x a.q",
            "info --object secret a.q",
            "map --object secret,id=s0 a.q",
            "check --object secret,id=s0,data=x a.q",
            "info -U a.q",
            "map -U --output=json a.q",
            "check -U a.q",
            "check -U -r all a.q",
            "info --force-share a.q",
        ],
        prepare,
    );
}

#[test]
fn open_failures_match_qemu_img() {
    if skip_without_qemu() {
        return;
    }
    assert_table(
        &[
            "info nothere",
            "info -f qcow2 nothere",
            "check nothere",
            "map nothere",
            "info sub",
            "check sub",
            "info -f qcow2 r.raw",
            "check -f qcow2 r.raw",
            "map -f qcow2 r.raw",
            "check r.raw",
            "check -f raw a.q",
            "info -f vpcx a.q",
            "info a.q b.q",
            "check",
            "map --output=yaml a.q",
            "check -r some a.q",
            "check -T bogus a.q",
            "info --bogus a.q",
            "info --o json a.q",
            "map -s",
        ],
        prepare,
    );
}

/// Messages start with the name the tool was invoked as: installed or linked as `qemu-img`, qcow
/// prints exactly what qemu-img prints (nothing normalised), and under another name that name.
#[test]
fn error_prefix_is_the_invoked_name() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("scratch dir");
    prepare(dir.path());
    let run = |program: &Path, arg0: &str, args: &[&str]| {
        run_with_timeout(
            Command::new(program)
                .arg0(arg0)
                .args(args)
                .current_dir(dir.path()),
            TOOL_TIMEOUT,
        )
    };
    let qcow = cowvm_tests::bin_path("qcow");
    for args in [
        &["info", "nothere"][..],
        &["create", "-f", "qcow2", "x.q", "1e3"],
        &["info", "-z", "a.q"],
        &["frobnicate"],
        &["check", "-r", "some", "a.q"],
    ] {
        let qemu = run(Path::new("qemu-img"), "qemu-img", args);
        let same = run(&qcow, "qemu-img", args);
        assert_eq!(
            (qemu.code, &qemu.stdout, &qemu.stderr),
            (same.code, &same.stdout, &same.stderr),
            "qcow invoked as qemu-img differs for {args:?}"
        );
        let other = run(&qcow, "/opt/bin/img-tool", args);
        let first = other.stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("img-tool: ") || first.starts_with("/opt/bin/img-tool "),
            "{args:?}: {}",
            other.describe()
        );
    }
}
