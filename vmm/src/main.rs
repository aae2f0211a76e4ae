//! The `cowvm` command line: a thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::time::Instant;
use vmm::config::{parse_size, GuestImage, SerialOutput, VmConfig, DEFAULT_MEM_SIZE};

use vmm::api::ApiRequest;
use vmm::builder::RestoreOptions;
use vmm::disk::DiskSpec;
use vmm::snapshot::state::SnapshotKind;

#[derive(Parser, Debug)]
#[command(
    name = "cowvm",
    version,
    about = "A small KVM VMM built around copy-on-write"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest (the built-in tiny guest by default) and exit with its status.
    Run(RunArgs),
    /// Restore a snapshot directory (following its diff chain) and run it to the end.
    Restore(RestoreArgs),
    /// Pause a running VM.
    Pause(SocketArg),
    /// Resume a paused VM.
    Resume(SocketArg),
    /// Print a running VM's statistics as JSON.
    Stats(SocketArg),
    /// Stop a running VM (it exits with status 0).
    Shutdown(SocketArg),
    /// Fork a running VM into more running VMs, each with its own generation id, serial output
    /// and control socket; the VM itself runs on.
    Fork(ForkArgs),
    /// Create, merge and inspect snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Run N clones of a full snapshot in this process, from a pool of ready VMs.
    Clone(CloneArgs),
}

#[derive(clap::Args, Debug)]
struct CloneArgs {
    /// A full snapshot (merge a diff chain first).
    dir: PathBuf,
    /// Clones to run; clone i gets generation id i.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Clones running at once (the pool's slots; default 8, at most --count).
    #[arg(long, default_value_t = vmm::clone::batch::DEFAULT_SLOTS)]
    slots: usize,
    /// Write clone i's serial output to DIR/clone-i.serial (kept in memory otherwise).
    #[arg(long, value_name = "DIR")]
    serial_dir: Option<PathBuf>,
    /// Serve clone i's control socket at DIR/clone-i.sock.
    #[arg(long, value_name = "DIR")]
    api_socket_dir: Option<PathBuf>,
    /// Keep starting clones after one fails (by default the running ones finish, no new ones
    /// start).
    #[arg(long)]
    keep_going: bool,
    /// Skip checking the template's memory checksums before cloning.
    #[arg(long)]
    no_verify: bool,
    /// Keep every clone's memory until the last one stops, then report their memory together
    /// (every clone gets its own slot).
    #[arg(long)]
    hold: bool,
    /// Print one JSON object per clone and a JSON summary instead of text.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    kvm_device: PathBuf,
}

#[derive(clap::Args, Debug)]
struct SocketArg {
    /// The VM's control socket (`--api-socket` of `cowvm run`/`restore`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ForkArgs {
    /// The VM's control socket (`--api-socket` of `cowvm run`/`restore`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// How many children to fork.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Where each child's serial output goes (`fork-GENERATION.serial`; default: the directory
    /// of --api-socket).
    #[arg(long, value_name = "DIR")]
    serial_dir: Option<PathBuf>,
    /// Where each child's control socket goes (`fork-GENERATION.sock`; default: the directory
    /// of --api-socket).
    #[arg(long, value_name = "DIR")]
    api_socket_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Snapshot a running VM into DIR (which must not exist or be empty).
    Create {
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        /// Store only the pages written since the VM's previous snapshot.
        #[arg(long)]
        diff: bool,
        /// Pause the guest only to capture its state and fork; a child process writes the
        /// snapshot from a copy-on-write view of RAM while the guest runs.
        #[arg(long)]
        live: bool,
        dir: PathBuf,
    },
    /// Squash a diff chain into one full snapshot (in place, or into --output).
    Merge {
        dir: PathBuf,
        #[arg(long, value_name = "DIR")]
        output: Option<PathBuf>,
    },
    /// Check a snapshot and print what it holds.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
        /// Also read every memory file of the chain and compare it with its recorded checksums.
        #[arg(long)]
        verify: bool,
    },
}

#[derive(clap::Args, Debug)]
struct RestoreArgs {
    dir: PathBuf,
    /// Serve the control socket at PATH.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Copy guest memory from the snapshot instead of mapping it copy-on-write.
    #[arg(long)]
    eager: bool,
    /// Read every memory file of the chain and compare it with its recorded checksums before
    /// restoring (without it, the state files' checksums, parent ids and file sizes are
    /// checked, and memory contents are trusted).
    #[arg(long)]
    verify: bool,
    /// Leave the restored VM paused; `cowvm resume` starts it.
    #[arg(long, requires = "api_socket")]
    paused: bool,
    /// Give the restored VM this generation id (written into its boot-info page before it
    /// runs), so that it does not share its identity with the VM the snapshot came from.
    #[arg(long, value_name = "N")]
    generation: Option<u64>,
    /// Write the guest's serial output to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    serial: Option<PathBuf>,
    /// Print restore timings to stderr once the VM runs, and again when it stops.
    #[arg(long)]
    timings: bool,
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    kvm_device: PathBuf,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Guest RAM size (bytes, or with a K/M/G/T suffix).
    #[arg(long, default_value_t = DEFAULT_MEM_SIZE.to_string(), value_parser = parse_size_arg)]
    mem: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Argument string for the guest, e.g. "pages=4096 rounds=20 seed=7 write=10".
    #[arg(long, default_value = "")]
    args: String,
    /// Boot this 64-bit ELF or flat image (loaded at 1 MiB) instead of the built-in guest.
    #[arg(long, value_name = "ELF_OR_FLAT_FILE")]
    guest: Option<PathBuf>,
    /// Write the guest's serial output to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    serial: Option<PathBuf>,
    /// Print start-up timings to stderr when the VM stops.
    #[arg(long)]
    timings: bool,
    /// Serve the control socket (pause, resume, snapshot, stats, shutdown) at PATH.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Attach a disk image as a virtio-blk device (repeatable: disk i is device i). The
    /// format is probed when not given, as qemu-img does; backing files must have theirs
    /// recorded. A comma in PATH is written `,,`.
    #[arg(long, value_name = "PATH[,readonly][,format=qcow2|raw]", value_parser = parse_disk_arg)]
    disk: Vec<DiskSpec>,
    /// KVM device to open.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    kvm_device: PathBuf,
}

fn parse_disk_arg(text: &str) -> Result<DiskSpec, String> {
    DiskSpec::parse(text).map_err(|e| e.to_string())
}

fn parse_size_arg(text: &str) -> Result<String, String> {
    parse_size(text).map(|size| size.to_string())
}

/// `println!` that stops quietly when stdout is gone (`cowvm clone … | head`): a closed pipe is
/// not an error worth a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let started = Instant::now();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COWVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    vmm::memory::install_sigbus_handler();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args, started),
        Command::Restore(args) => restore(args, started),
        Command::Pause(s) => control(&s.api_socket, ApiRequest::Pause),
        Command::Resume(s) => control(&s.api_socket, ApiRequest::Resume),
        Command::Stats(s) => control(&s.api_socket, ApiRequest::Stats),
        Command::Shutdown(s) => control(&s.api_socket, ApiRequest::Shutdown),
        Command::Fork(args) => fork(args),
        Command::Snapshot(command) => snapshot(command),
        Command::Clone(args) => clone(args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            // Every error message already includes its cause.
            eprintln!("cowvm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn control(socket: &std::path::Path, request: ApiRequest) -> anyhow::Result<u8> {
    let reply = vmm::api::request(socket, &request)?;
    match request {
        ApiRequest::Stats => out!("{}", serde_json::to_string_pretty(&reply)?),
        _ => out!("{}", reply["state"].as_str().unwrap_or("ok")),
    }
    Ok(0)
}

fn snapshot(command: SnapshotCommand) -> anyhow::Result<u8> {
    match command {
        SnapshotCommand::Create {
            api_socket,
            diff,
            live,
            dir,
        } => {
            let path = std::path::absolute(&dir)?;
            let kind = if diff {
                SnapshotKind::Diff
            } else {
                SnapshotKind::Full
            };
            let request = ApiRequest::Snapshot {
                path: path.display().to_string(),
                kind,
                live,
            };
            let reply = vmm::api::request(&api_socket, &request)?;
            let ms = |key: &str| reply[key].as_f64().unwrap_or(0.0) / 1000.0;
            out!(
                "snapshot {}: {} pages stored, guest paused {:.3} ms, on disk after {:.3} ms",
                dir.display(),
                reply["pages_stored"],
                ms("paused_us"),
                ms("total_us")
            );
            if live {
                out!(
                    "live: written by process {} in {:.3} ms while the guest ran; copy-on-write {} bytes",
                    reply["writer_pid"],
                    ms("write_us"),
                    reply["cow_bytes"]
                );
            }
        }
        SnapshotCommand::Merge { dir, output } => {
            let merged = vmm::snapshot::merge(&dir, output.as_deref())?;
            out!(
                "merged into full snapshot {}: {} pages stored",
                merged.dir.display(),
                merged.state.memory.pages_stored
            );
        }
        SnapshotCommand::Inspect { dir, json, verify } => {
            let report = vmm::snapshot::inspect(&dir, verify)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                out!("snapshot:     {}", report.path);
                out!("id:           {}", report.id);
                out!("format:       version {}", report.format_version);
                out!("kind:         {:?}", report.kind);
                out!(
                    "parent:       {}",
                    report.parent.as_deref().unwrap_or("none")
                );
                out!("chain length: {}", report.chain_length);
                out!("RAM size:     {} bytes", report.mem_size);
                out!("vCPUs:        {}", report.vcpus);
                out!(
                    "pages stored: {} ({} allocated on disk)",
                    report.pages_stored,
                    report.pages_allocated_on_disk
                );
                out!("state crc32:  {}", report.state_crc32);
                for (index, layers) in report.disks.iter().enumerate() {
                    out!("disk {index}:       {}", layers.join(" over "));
                }
                out!("checks:       ok ({})", report.checks);
            }
        }
    }
    Ok(0)
}

fn fork(args: ForkArgs) -> anyhow::Result<u8> {
    // Relative directories mean the client's working directory, not the VM's.
    let socket = std::path::absolute(&args.api_socket)?;
    let beside_socket = socket
        .parent()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let dir = |given: Option<PathBuf>| -> anyhow::Result<String> {
        let dir = match given {
            Some(dir) => std::path::absolute(dir)?,
            None => beside_socket.clone(),
        };
        Ok(dir.display().to_string())
    };
    let request = ApiRequest::Fork {
        count: args.count,
        serial_dir: dir(args.serial_dir)?,
        socket_dir: dir(args.api_socket_dir)?,
    };
    let reply = vmm::api::request(&args.api_socket, &request)?;
    let children = reply["children"].as_array().cloned().unwrap_or_default();
    out!(
        "forked {} VM{}, guest paused {:.3} ms",
        children.len(),
        if children.len() == 1 { "" } else { "s" },
        reply["paused_us"].as_f64().unwrap_or(0.0) / 1000.0
    );
    for child in children {
        out!(
            "pid {} generation {:#x}: --api-socket {} serial {}",
            child["pid"],
            child["generation"].as_u64().unwrap_or(0),
            child["api_socket"].as_str().unwrap_or("?"),
            child["serial"].as_str().unwrap_or("?")
        );
    }
    Ok(0)
}

fn clone(args: CloneArgs) -> anyhow::Result<u8> {
    let spec = vmm::clone::batch::CloneRun {
        template: args.dir,
        count: args.count,
        slots: args.slots,
        serial_dir: args.serial_dir,
        api_socket_dir: args.api_socket_dir,
        keep_going: args.keep_going,
        verify: !args.no_verify,
        hold: args.hold,
        kvm_device: args.kvm_device,
    };
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let json = args.json;
    let summary = vmm::clone::batch::run(&spec, |outcome| {
        if json {
            out!("{}", serde_json::to_string(outcome).unwrap_or_default());
            return;
        }
        let memory = outcome.memory.map_or(String::new(), |m| {
            format!(
                " [private {:.2} MiB, file {:.2} MiB, pss {:.2} MiB]",
                mib(m.private_bytes),
                mib(m.file_bytes),
                mib(m.pss_bytes)
            )
        });
        match &outcome.error {
            None => out!(
                "clone {}: exit {}: {}{memory}",
                outcome.generation,
                outcome.status,
                outcome.last_line
            ),
            Some(error) => out!(
                "clone {}: error: {}{memory}",
                outcome.generation,
                error.replace('\n', " / ")
            ),
        }
    })?;
    if json {
        out!("{}", serde_json::to_string(&summary)?);
    } else {
        let m = summary.memory;
        out!(
            "clones: {} run, {} exited 0, worst status {}; slots created {}, reused {} times, discarded {}",
            summary.clones,
            summary.exited_zero,
            summary.worst_status,
            summary.pool.created,
            summary.pool.reused,
            summary.pool.discarded
        );
        out!(
            "memory at exit, summed over clones: resident {:.1} MiB, file pages {:.1} MiB, private {:.1} MiB, pss {:.1} MiB",
            mib(m.resident_bytes),
            mib(m.file_bytes),
            mib(m.private_bytes),
            mib(m.pss_bytes)
        );
        if let Some(held) = summary.held {
            out!(
                "memory of all clones together when the last stopped: resident {:.1} MiB, file pages {:.1} MiB, private {:.1} MiB, pss {:.1} MiB",
                mib(held.resident_bytes),
                mib(held.file_bytes),
                mib(held.private_bytes),
                mib(held.pss_bytes)
            );
        }
        out!(
            "process: {} open fds and {:.1} MiB RSS after the first wave, {} and {:.1} MiB at the end",
            summary.fds_after_first_wave,
            mib(summary.rss_after_first_wave),
            summary.fds_at_end,
            mib(summary.rss_at_end)
        );
    }
    Ok(summary.worst_status)
}

fn run(args: RunArgs, started: Instant) -> anyhow::Result<u8> {
    let config = VmConfig {
        mem_size: args.mem.parse()?,
        vcpus: args.vcpus,
        args: args.args,
        guest: args.guest.map_or(GuestImage::BuiltIn, GuestImage::File),
        serial: args.serial.map_or(SerialOutput::Stdout, SerialOutput::File),
        kvm_device: args.kvm_device,
        disks: args.disk,
    };
    let mut machine = vmm::builder::build(&config)?;
    run_machine(
        &mut machine,
        args.api_socket.as_deref(),
        args.timings,
        started,
    )
}

fn restore(args: RestoreArgs, started: Instant) -> anyhow::Result<u8> {
    let options = RestoreOptions {
        eager: args.eager,
        verify: args.verify,
        paused: args.paused,
        generation: args.generation,
        serial: args.serial.map_or(SerialOutput::Stdout, SerialOutput::File),
        kvm_device: args.kvm_device,
    };
    let restore_started = Instant::now();
    let mut machine = vmm::builder::restore(&args.dir, &options)?;
    if args.timings {
        // VMM-side restore (read state, map memory, create the VM, load vCPUs, start them)
        // and process start → guest running.
        eprintln!(
            "timings: vmm_restore_us={:.0} process_start_to_running_us={:.0} register_memory_us={:.0}",
            restore_started.elapsed().as_secs_f64() * 1e6,
            started.elapsed().as_secs_f64() * 1e6,
            machine.vm().register_time().as_secs_f64() * 1e6
        );
    }
    run_machine(
        &mut machine,
        args.api_socket.as_deref(),
        args.timings,
        started,
    )
}

fn run_machine(
    machine: &mut vmm::machine::Machine,
    api_socket: Option<&std::path::Path>,
    timings: bool,
    started: Instant,
) -> anyhow::Result<u8> {
    let _server = match api_socket {
        Some(path) => Some(vmm::api::serve(path, machine.event_sender())?),
        None => None,
    };
    let status = machine.wait();
    if timings {
        let created = machine.created_at;
        let micros = |d: std::time::Duration| d.as_secs_f64() * 1e6;
        let first = machine
            .first_serial_access()
            .map(|t| micros(t.duration_since(created)));
        let from_start = machine
            .first_serial_access()
            .map(|t| micros(t.duration_since(started)));
        let or_none = |us: Option<f64>| us.map_or("none".to_string(), |us| format!("{us:.0}"));
        eprintln!(
            "timings: process_start_to_vm_create_us={:.0} vm_create_to_first_guest_exit_us={} process_start_to_first_guest_exit_us={} register_memory_us={:.0} total_us={:.0}",
            micros(created.duration_since(started)),
            or_none(first),
            or_none(from_start),
            micros(machine.vm().register_time()),
            micros(started.elapsed()),
        );
    }
    Ok(status?)
}
