//! The `cowvm` command line: a thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::config::{parse_size, GuestImage, SerialOutput, VmConfig, DEFAULT_MEM_SIZE};
use vmm::devices::serial::FIRST_ACCESS_AT;

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
    /// KVM device to open.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    kvm_device: PathBuf,
}

fn parse_size_arg(text: &str) -> Result<String, String> {
    parse_size(text).map(|size| size.to_string())
}

fn main() -> ExitCode {
    let started = std::time::Instant::now();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COWVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args, started),
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

fn run(args: RunArgs, started: std::time::Instant) -> anyhow::Result<u8> {
    let config = VmConfig {
        mem_size: args.mem.parse()?,
        vcpus: args.vcpus,
        args: args.args,
        guest: args.guest.map_or(GuestImage::BuiltIn, GuestImage::File),
        serial: args.serial.map_or(SerialOutput::Stdout, SerialOutput::File),
        kvm_device: args.kvm_device,
    };
    let mut machine = vmm::builder::build(&config)?;
    let status = machine.wait();
    if args.timings {
        let created = machine.created_at;
        let micros = |d: std::time::Duration| d.as_secs_f64() * 1e6;
        let first = FIRST_ACCESS_AT
            .get()
            .map(|t| micros(t.duration_since(created)));
        eprintln!(
            "timings: process_start_to_vm_create_us={:.0} vm_create_to_first_guest_exit_us={} total_us={:.0}",
            micros(created.duration_since(started)),
            first.map_or("none".to_string(), |us| format!("{us:.0}")),
            micros(started.elapsed()),
        );
    }
    Ok(status?)
}
