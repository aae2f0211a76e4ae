//! Clones of a warm template from a pool of ready VMs: every clone finishes with the oracle's
//! digest for its own generation id, slots are reused without a predecessor's pages showing
//! through, the template's memory file never changes, each clone pays only for what it writes,
//! a thousand start/finish cycles leak nothing, and bad input gets a clear error.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cowvm_tests::bin_path;
use cowvm_tests::vmm_harness::{
    assert_error, code, cowvm, expected_done_for, kvm_usable, stderr, stdout, wait_for_socket,
    write_file, RunningVm,
};

/// Boots `command` with a control socket in `dir`, lets it reach its waiting loop (the guest
/// prints `waiting for a generation id`; a hand-made guest gets 200 ms), takes a full snapshot
/// into `dir/template` and shuts the VM down.
fn template(dir: &Path, command: &[&str]) -> PathBuf {
    let vm_dir = dir.join("template-vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let vm = RunningVm::spawn(&vm_dir, command);
    if command.contains(&"--guest") {
        std::thread::sleep(Duration::from_millis(200));
    } else {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&vm.serial)
            .unwrap_or_default()
            .contains("waiting for a generation id")
        {
            assert!(
                Instant::now() < deadline,
                "the template never started waiting"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let template = dir.join("template");
    vm.snapshot(&template, false);
    let output = cowvm(&["shutdown", "--api-socket", vm.socket()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let (code, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    template
}

/// A template of the built-in guest waiting for its generation id.
fn guest_template(dir: &Path, args: &str) -> PathBuf {
    template(dir, &["run", "--mem", "64M", "--args", args])
}

/// `cowvm clone TEMPLATE EXTRA… --api-socket-dir DIR/sockets`, running; and the socket directory.
fn clones_with_sockets(dir: &Path, template: &Path, extra: &[&str]) -> (Child, PathBuf) {
    let sockets = dir.join("sockets");
    std::fs::create_dir(&sockets).unwrap();
    let clones = Command::new(bin_path("cowvm"))
        .arg("clone")
        .arg(template)
        .args(extra)
        .arg("--api-socket-dir")
        .arg(&sockets)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (clones, sockets)
}

fn clone_json(args: &[&str]) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let mut full = vec!["clone", "--json"];
    full.extend_from_slice(args);
    let output = cowvm(&full);
    let lines = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (output.status.code(), lines, stderr(&output))
}

#[test]
fn twenty_clones_in_three_waves_finish_with_their_own_digests() {
    if !kvm_usable("twenty_clones_in_three_waves_finish_with_their_own_digests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The template fills its pages in 2 rounds, then waits; each clone rewrites all of them
    // twice with keys of its own generation.
    let args = "pages=2000 rounds=2 seed=3 write=30 gen_rounds=2 gen_write=100 wait=1";
    let template = guest_template(dir.path(), args);
    let memory = template.join("memory");
    let before = std::fs::read(&memory).unwrap();
    let modified = std::fs::metadata(&memory).unwrap().modified().unwrap();

    let (code, lines, err) =
        clone_json(&[template.to_str().unwrap(), "--count", "20", "--slots", "7"]);
    assert_eq!(code, Some(0), "{err}");
    let (outcomes, summary) = lines.split_at(20);
    let mut seen: Vec<u64> = outcomes
        .iter()
        .map(|o| {
            let generation = o["generation"].as_u64().unwrap();
            assert_eq!(o["status"], 0, "{o}");
            assert_eq!(
                o["last_line"],
                expected_done_for(args, generation),
                "clone {generation}"
            );
            // Each clone wrote its own ~2000 pages: its private memory is its own.
            let private = o["memory"]["private_bytes"].as_u64().unwrap();
            assert!(private >= 2000 * 4096, "clone {generation}: {private}");
            generation
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=20).collect::<Vec<_>>());
    let digests: std::collections::HashSet<_> = outcomes
        .iter()
        .map(|o| o["last_line"].to_string())
        .collect();
    assert_eq!(digests.len(), 20, "every generation writes different data");
    let summary = &summary[0];
    assert_eq!(summary["clones"], 20);
    // 7 running at once in a pool of 14 VMs: at least 6 clones ran in a VM that had run one.
    assert_eq!(summary["pool"]["created"], 14, "{summary}");
    let reused = summary["pool"]["reused"].as_u64().unwrap();
    assert!(
        (6..=13).contains(&reused),
        "later waves ran in reused VMs: {summary}"
    );

    // The template is byte-identical: clones map it copy-on-write.
    assert!(
        std::fs::read(&memory).unwrap() == before,
        "the memory file changed"
    );
    assert_eq!(
        std::fs::metadata(&memory).unwrap().modified().unwrap(),
        modified
    );
}

#[test]
fn a_clone_is_controllable_and_its_diff_builds_on_the_template() {
    if !kvm_usable("a_clone_is_controllable_and_its_diff_builds_on_the_template") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = "pages=2000 rounds=1 seed=9 write=50 gen_rounds=3000 gen_write=10 wait=1";
    let template = guest_template(dir.path(), args);
    let (clones, sockets) = clones_with_sockets(dir.path(), &template, &["--count", "1"]);
    let socket = sockets.join("clone-1.sock");
    wait_for_socket(&socket);
    let socket = socket.to_str().unwrap();
    let paused = cowvm(&["pause", "--api-socket", socket]);
    assert_eq!(stdout(&paused).trim(), "paused", "{}", stderr(&paused));
    let stats: serde_json::Value =
        serde_json::from_slice(&cowvm(&["stats", "--api-socket", socket]).stdout).unwrap();
    assert_eq!(stats["state"], "paused");
    assert!(
        stats["memory"]["file_bytes"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert_eq!(
        stdout(&cowvm(&["resume", "--api-socket", socket])).trim(),
        "running"
    );
    std::thread::sleep(Duration::from_millis(30));
    let diff = dir.path().join("clone-diff");
    let output = cowvm(&[
        "snapshot",
        "create",
        "--api-socket",
        socket,
        "--diff",
        diff.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&cowvm(&["shutdown", "--api-socket", socket])).trim(),
        "shutting down"
    );
    let output = clones.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The diff holds the clone's generation id and its writes on top of the template.
    let inspect = cowvm(&["snapshot", "inspect", "--json", diff.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(report["chain_length"], 2);
    let restored = cowvm(&["restore", "--verify", diff.to_str().unwrap()]);
    assert_eq!(restored.status.code(), Some(0), "{}", stderr(&restored));
    assert_eq!(
        stdout(&restored).lines().last().unwrap(),
        expected_done_for(args, 1)
    );
}

#[test]
fn clones_pay_only_for_what_they_write() {
    if !kvm_usable("clones_pay_only_for_what_they_write") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A clone that writes K pages once: about K × 4 KiB of private memory.
    let writer = dir.path().join("writer");
    std::fs::create_dir(&writer).unwrap();
    let k = 1500u64;
    let template = guest_template(
        &writer,
        &format!("pages={k} rounds=0 gen_rounds=1 gen_write=100 wait=1"),
    );
    let (code, lines, err) = clone_json(&[template.to_str().unwrap(), "--count", "2"]);
    assert_eq!(code, Some(0), "{err}");
    for outcome in &lines[..2] {
        let private = outcome["memory"]["private_bytes"].as_u64().unwrap();
        // Slack: the stack, page-table pages the MMU marks accessed/dirty, boot info, progress.
        let (low, high) = (k * 4096, k * 4096 + (256 << 10));
        assert!(
            (low..=high).contains(&private),
            "{private} not in {low}..={high}: {outcome}"
        );
    }

    // Ten idle clones (they visit pages without writing them): each keeps at most 512 KiB of
    // private memory, and the file pages they all map are counted once across them (PSS).
    let idle = dir.path().join("idle");
    std::fs::create_dir(&idle).unwrap();
    let template = guest_template(
        &idle,
        "pages=2000 rounds=1 write=100 gen_rounds=1000000000 gen_write=0 wait=1",
    );
    let (clones, sockets) =
        clones_with_sockets(&idle, &template, &["--count", "10", "--slots", "10"]);
    let stats: Vec<serde_json::Value> = (1..=10)
        .map(|i| {
            let socket = sockets.join(format!("clone-{i}.sock"));
            wait_for_socket(&socket);
            // Let the clone settle into its loop.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let stats: serde_json::Value = serde_json::from_slice(
                    &cowvm(&["stats", "--api-socket", socket.to_str().unwrap()]).stdout,
                )
                .unwrap();
                if stats["guest_progress"][0].as_u64().unwrap() > 2000 || Instant::now() > deadline
                {
                    break stats;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .collect();
    let memory = |s: &serde_json::Value, key: &str| s["memory"][key].as_u64().unwrap();
    for s in &stats {
        assert!(
            memory(s, "private_bytes") <= 512 << 10,
            "an idle clone: {}",
            s["memory"]
        );
    }
    let pss: u64 = stats.iter().map(|s| memory(s, "pss_bytes")).sum();
    let private: u64 = stats.iter().map(|s| memory(s, "private_bytes")).sum();
    let file_each = stats.iter().map(|s| memory(s, "file_bytes")).max().unwrap();
    let file_all: u64 = stats.iter().map(|s| memory(s, "file_bytes")).sum();
    assert!(
        file_all >= 9 * file_each,
        "every clone maps the template's pages: {file_all}"
    );
    assert!(
        pss <= private + file_each + (64 << 10),
        "the shared file pages count once: pss {pss}, private {private}, one clone's file pages {file_each}"
    );
    for i in 1..=10 {
        let socket = sockets.join(format!("clone-{i}.sock"));
        cowvm(&["shutdown", "--api-socket", socket.to_str().unwrap()]);
    }
    let output = clones.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_thousand_clone_cycles_leak_nothing() {
    if !kvm_usable("a_thousand_clone_cycles_leak_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let template = guest_template(dir.path(), "pages=1 rounds=1 wait=1");
    let started = Instant::now();
    let output = cowvm(&[
        "clone",
        template.to_str().unwrap(),
        "--count",
        "1000",
        "--slots",
        "4",
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(summary["clones"], 1000);
    assert_eq!(summary["exited_zero"], 1000);
    assert_eq!(summary["pool"]["created"], 8, "{summary}");
    assert!(
        summary["pool"]["reused"].as_u64().unwrap() >= 992,
        "{summary}"
    );
    let fds = |key: &str| summary[key].as_u64().unwrap();
    assert_eq!(fds("fds_at_end"), fds("fds_after_first_wave"), "{summary}");
    assert!(
        fds("rss_at_end") <= fds("rss_after_first_wave") + (8 << 20),
        "RSS grew: {summary}"
    );
    println!("1000 clone cycles took {:?}", started.elapsed());
}

#[test]
fn bad_templates_counts_and_failing_clones_get_clear_errors() {
    if !kvm_usable("bad_templates_counts_and_failing_clones_get_clear_errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = write_file(dir.path(), "gen.bin", &code::fail_in_generation_3());
    let template = template(dir.path(), &["run", "--guest", &guest]);
    let template_arg = template.to_str().unwrap();

    assert_error(
        &cowvm(&["clone", template_arg, "--count", "0"]),
        "--count 0: nothing to clone; give at least 1",
    );
    // Clone 3 triple-faults: its line says why, the others finish, the worst status wins.
    let (code, lines, err) =
        clone_json(&[template_arg, "--count", "5", "--slots", "2", "--keep-going"]);
    assert_eq!(code, Some(1), "{err}");
    for outcome in &lines[..5] {
        let generation = outcome["generation"].as_u64().unwrap();
        if generation == 3 {
            assert_eq!(outcome["status"], 1);
            assert!(
                outcome["error"].as_str().unwrap().contains("triple fault"),
                "{outcome}"
            );
        } else {
            assert_eq!(outcome["status"], 0, "{outcome}");
        }
    }
    assert_eq!(lines[5]["clones"], 5);
    // Without --keep-going no clone starts after the failure.
    let (code, lines, _) = clone_json(&[template_arg, "--count", "5", "--slots", "1"]);
    assert_eq!(code, Some(1));
    assert_eq!(lines.last().unwrap()["clones"], 3);

    // More clones at once than the file limit allows.
    let output = Command::new("prlimit")
        .args(["--nofile=64:64"])
        .arg(bin_path("cowvm"))
        .args(["clone", template_arg, "--count", "100", "--slots", "100"])
        .output()
        .unwrap();
    assert_error(
        &output,
        "open files, more than this process may open (64, RLIMIT_NOFILE); lower --slots",
    );

    // A diff is not a template.
    let vm_dir = dir.path().join("restored");
    std::fs::create_dir(&vm_dir).unwrap();
    let vm = RunningVm::restore(&vm_dir, &template, &[]);
    let diff = dir.path().join("diff");
    vm.snapshot(&diff, true);
    vm.kill();
    assert_error(
        &cowvm(&["clone", diff.to_str().unwrap(), "--count", "2"]),
        "is a diff snapshot (a chain of 2); clones need a full snapshot: `cowvm snapshot merge",
    );
    // A template whose memory changed on disk is refused before any clone runs.
    let memory = template.join("memory");
    use std::os::unix::fs::{FileExt, PermissionsExt};
    std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap();
    file.write_all_at(b"x", 0x10_0000 + 5).unwrap();
    assert_error(
        &cowvm(&["clone", template_arg, "--count", "2"]),
        "is corrupted: the 2097152-byte chunk at offset 0x0",
    );
}
