//! `qcow`: a qemu-img–style command line over the `qcow` library (create, info, check, map, io,
//! bench). Exit codes follow qemu-img: 0 success, 1 error; `check` also 2 (corruptions) and 3 (leaks).

#![cfg_attr(test, allow(clippy::unwrap_used))]

#[path = "qcow/bench.rs"]
mod bench;
#[path = "qcow/check_cmd.rs"]
mod check_cmd;
#[path = "qcow/convert_cmd.rs"]
mod convert_cmd;
#[path = "qcow/create_cmd.rs"]
mod create_cmd;
#[path = "qcow/disk.rs"]
mod disk;
#[path = "qcow/dropin.rs"]
mod dropin;
#[path = "qcow/getopt.rs"]
mod getopt;
#[path = "qcow/image_arg.rs"]
mod image_arg;
#[path = "qcow/info.rs"]
mod info;
#[path = "qcow/io_cmd.rs"]
mod io_cmd;
#[path = "qcow/map_cmd.rs"]
mod map_cmd;
#[path = "qcow/ops_cmd.rs"]
mod ops_cmd;
#[path = "qcow/prog.rs"]
mod prog;
#[path = "qcow/progress.rs"]
mod progress;
#[path = "qcow/qemu_opts.rs"]
mod qemu_opts;
#[path = "qcow/snapshot_cmd.rs"]
mod snapshot_cmd;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use bench::BenchOptions;
use disk::open_disk;
use lib::OpenOptions;
use qcow as lib;

#[derive(Parser, Debug)]
#[command(
    name = "qcow",
    version,
    about = "qcow2 image tool with qemu-img's commands, flags and exit codes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Output {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum RepairArg {
    Leaks,
    All,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run qemu-io style commands: -c 'read [-P PAT] OFF LEN', 'write [-P PAT] [-z] OFF LEN',
    /// 'discard OFF LEN', 'flush'.
    Io {
        #[arg(short = 'c', long = "cmd")]
        commands: Vec<String>,
        #[arg(short = 'f')]
        format: Option<String>,
        /// Open read-only.
        #[arg(short = 'r', long = "read-only")]
        read_only: bool,
        file: PathBuf,
    },
    /// Convert an image: qcow convert [-p] [-q] [-c] [-f FMT] [-O qcow2|raw] [-o OPTS]
    /// [-B BACKING [-F FMT]] [-S SIZE] [-t CACHE] SRC DST
    Convert {
        /// Show progress (a bar on a terminal, qemu-img's lines otherwise).
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        /// Write compressed clusters (qcow2 output).
        #[arg(short = 'c')]
        compress: bool,
        /// Source format (probed if not given).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format (default raw).
        #[arg(short = 'O')]
        output_format: Option<String>,
        /// qcow2 creation options (cluster_size=.., compat=.., ...).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Make the output an overlay of this backing file; only what differs is copied.
        #[arg(short = 'B')]
        backing: Option<String>,
        /// Format of the -B backing file.
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Zero runs at least this long stay unallocated (default 4k; 0 allocates everything).
        #[arg(short = 'S')]
        sparse: Option<String>,
        /// Cache mode of the output (default unsafe, as in qemu-img: no flush at the end).
        #[arg(short = 't')]
        cache: Option<String>,
        /// Cache mode of the source (accepted; reads use the page cache).
        #[arg(short = 'T')]
        source_cache: Option<String>,
        /// Parallel requests (accepted; compression uses every core).
        #[arg(short = 'm')]
        coroutines: Option<u32>,
        /// Out-of-order writes (accepted, writes are in order).
        #[arg(short = 'W')]
        out_of_order: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        source: PathBuf,
        target: PathBuf,
    },
    /// Commit an overlay into its backing file: qcow commit [-q] [-p] [-d] [-b BASE] FILE
    Commit {
        #[arg(short = 'f')]
        format: Option<String>,
        /// Commit into this image of the backing chain (implies -d).
        #[arg(short = 'b')]
        base: Option<PathBuf>,
        /// Keep the overlay's data (do not empty it).
        #[arg(short = 'd')]
        keep: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 't')]
        cache: Option<String>,
        /// Rate limit (accepted, not applied).
        #[arg(short = 'r')]
        rate: Option<String>,
        file: PathBuf,
    },
    /// Change the backing file: qcow rebase [-u] -b NEW [-F FMT] [-p] [-q] FILE
    Rebase {
        #[arg(short = 'f')]
        format: Option<String>,
        /// The new backing file ("" detaches the image).
        #[arg(short = 'b')]
        backing: Option<String>,
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Unsafe: only rewrite the name, copy nothing.
        #[arg(short = 'u')]
        unsafe_mode: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 't')]
        cache: Option<String>,
        #[arg(short = 'T')]
        source_cache: Option<String>,
        /// Compress the copied clusters (accepted; they are written uncompressed).
        #[arg(short = 'c')]
        compress: bool,
        file: PathBuf,
    },
    /// Change the virtual size: qcow resize [--shrink] [-q] FILE [+|-]SIZE
    Resize {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(long = "shrink")]
        shrink: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(long = "preallocation")]
        preallocation: Option<String>,
        /// FILE and SIZE (SIZE may be +N or -N).
        #[arg(num_args = 0.., allow_hyphen_values = true, trailing_var_arg = true)]
        rest: Vec<String>,
    },
    /// Change image options: qcow amend -o compat=..,refcount_bits=..,lazy_refcounts=..,size=.. FILE
    Amend {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(short = 'o')]
        options: Vec<String>,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 't')]
        cache: Option<String>,
        #[arg(long = "force")]
        force: bool,
        file: PathBuf,
    },
    /// Space a new image needs: qcow measure [--output human|json] [-O FMT] [-o OPTS] (--size N | FILE)
    Measure {
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        #[arg(short = 'O')]
        output_format: Option<String>,
        #[arg(short = 'o')]
        options: Vec<String>,
        #[arg(long = "size")]
        size: Option<String>,
        #[arg(short = 'f')]
        format: Option<String>,
        file: Option<PathBuf>,
    },
    /// Compare two images: exit 0 identical, 1 different, 2 cannot open, 4 read error.
    Compare {
        #[arg(short = 'f')]
        first_format: Option<String>,
        #[arg(short = 'F')]
        second_format: Option<String>,
        /// Strict: sizes and allocation must match too.
        #[arg(short = 's')]
        strict: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'T')]
        cache: Option<String>,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        first: PathBuf,
        second: PathBuf,
    },
    /// List, create, apply or delete internal snapshots:
    /// qcow snapshot [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE
    Snapshot {
        /// List the snapshots (the default).
        #[arg(short = 'l')]
        list: bool,
        /// Apply (revert the disk to) the snapshot with this id or name.
        #[arg(short = 'a')]
        apply: Option<String>,
        /// Create a snapshot with this name.
        #[arg(short = 'c')]
        create: Option<String>,
        /// Delete the snapshot with this name.
        #[arg(short = 'd')]
        delete: Option<String>,
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        file: PathBuf,
    },
    /// Benchmark like qemu-img bench. Requests are issued sequentially on one thread; -d is accepted
    /// and echoed but does not add parallelism. -t none/directsync open the image with O_DIRECT
    /// (bypassing the page cache), writethrough/directsync flush after every write, unsafe never
    /// flushes.
    Bench {
        #[arg(short = 'c', long = "count", default_value_t = 75000)]
        count: u64,
        #[arg(short = 'd', long = "depth", default_value_t = 64)]
        depth: u64,
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(long = "flush-interval", default_value_t = 0)]
        flush_interval: u64,
        #[arg(short = 'i', long = "aio")]
        aio: Option<String>,
        #[arg(short = 'n', long = "native")]
        native: bool,
        #[arg(long = "no-drain")]
        no_drain: bool,
        #[arg(short = 'o', long = "offset", default_value = "0")]
        offset: String,
        #[arg(long = "pattern", default_value = "0")]
        pattern: String,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 's', long = "buffer-size", default_value = "4096")]
        buffer_size: String,
        #[arg(short = 'S', long = "step-size")]
        step: Option<String>,
        #[arg(short = 't', long = "cache", default_value = "writeback")]
        cache: String,
        #[arg(short = 'w', long = "write")]
        write: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    prog::init(args.first().map(String::as_str).unwrap_or("qcow"));
    if let Some(code) = dropin::dispatch(&args, |name| {
        <Cli as clap::CommandFactory>::command()
            .find_subcommand(name)
            .is_some()
    }) {
        return code;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("{}: {}", prog::name(), describe(&e));
            ExitCode::from(1)
        }
    }
}

/// The error chain on one line, skipping causes whose text the message already contains (the
/// library's messages include their cause).
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Io {
            commands,
            format,
            read_only,
            file,
        } => io(&commands, format.as_deref(), read_only, &file),
        Command::Convert {
            progress,
            quiet,
            compress,
            format,
            output_format,
            options,
            backing,
            backing_format,
            sparse,
            cache,
            source,
            target,
            ..
        } => {
            progress::catch_interrupts();
            convert_cmd::convert_cmd(&convert_cmd::ConvertArgs {
                source,
                target,
                source_format: format,
                output_format,
                options,
                compress,
                backing,
                backing_format,
                sparse,
                cache,
                progress,
                quiet,
            })
        }
        Command::Commit {
            base,
            keep,
            progress,
            quiet,
            file,
            ..
        } => {
            progress::catch_interrupts();
            ops_cmd::commit_cmd(&file, base.as_deref(), keep, progress, quiet)
        }
        Command::Rebase {
            backing,
            backing_format,
            unsafe_mode,
            progress,
            quiet,
            file,
            ..
        } => {
            progress::catch_interrupts();
            ops_cmd::rebase_cmd(&ops_cmd::RebaseArgs {
                file,
                backing,
                backing_format,
                unsafe_mode,
                progress,
                quiet,
            })
        }
        Command::Resize {
            format,
            shrink,
            quiet,
            rest,
            ..
        } => ops_cmd::resize_cmd(&rest, format.as_deref(), shrink, quiet),
        Command::Amend {
            format,
            options,
            file,
            ..
        } => ops_cmd::amend_cmd(&file, format.as_deref(), &options),
        Command::Measure {
            output,
            output_format,
            options,
            size,
            format,
            file,
        } => ops_cmd::measure_cmd(&ops_cmd::MeasureArgs {
            file,
            format,
            output_format,
            options,
            size,
            output,
        }),
        Command::Compare {
            first_format,
            second_format,
            strict,
            progress,
            quiet,
            first,
            second,
            ..
        } => convert_cmd::compare_cmd(&convert_cmd::CompareArgs {
            first,
            second,
            first_format,
            second_format,
            strict,
            progress,
            quiet,
        }),
        Command::Snapshot {
            list,
            apply,
            create,
            delete,
            format,
            file,
            ..
        } => {
            let action = snapshot_cmd::Action::from_flags(list, create, apply, delete)?;
            snapshot_cmd::snapshot(action, format.as_deref(), &file)
        }
        Command::Bench {
            count,
            depth,
            format,
            flush_interval,
            offset,
            pattern,
            quiet,
            buffer_size,
            step,
            cache,
            write,
            no_drain,
            file,
            ..
        } => {
            let cache_mode = disk::CacheMode::parse(&cache)?;
            if flush_interval > 0 && !write {
                bail!("--flush-interval is only available in write tests");
            }
            if flush_interval > 0 && flush_interval < depth {
                bail!("Flush interval can't be smaller than depth");
            }
            let parse = |text: &str| lib::parse_size(text).map_err(anyhow::Error::msg);
            let pattern_value = parse(&pattern)?;
            let options = BenchOptions {
                count,
                depth,
                offset: parse(&offset)?,
                buffer_size: parse(&buffer_size)?,
                step: step.as_deref().map(parse).transpose()?,
                write,
                pattern: u8::try_from(pattern_value).context("--pattern must be a byte value")?,
                flush_interval,
                flush_each_write: cache_mode.flush_each_write,
                drain: !no_drain,
                quiet,
            };
            let mut disk = open_disk(&file, format.as_deref(), &cache_mode.open_options(!write))?;
            bench::run(&mut disk, &options).with_context(|| format!("{}", file.display()))?;
            let _ = options.drain;
            disk.close()
                .with_context(|| format!("{}", file.display()))?;
            Ok(0)
        }
    }
}

/// qemu's `size_to_str`: the value in the largest binary unit that keeps it below 1000, printed
/// like C's `%0.3g` (three significant digits, so 1023.5 KiB is `1e+03 KiB`).
pub fn human_size(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    // frexp's exponent of bytes * 1024 / 1000, minus one, divided by ten.
    let scaled = bytes as f64 / (1000.0 / 1024.0);
    let exponent = if scaled == 0.0 {
        0
    } else {
        // frexp: scaled = m * 2^exponent with 0.5 <= m < 1 (read off the IEEE exponent field).
        ((scaled.to_bits() >> 52) & 0x7ff) as i64 - 1022
    };
    let unit = (((exponent - 1).max(0)) / 10).min(6) as usize;
    let value = bytes as f64 / (1u64 << (unit * 10)) as f64;
    format!("{} {}", format_g3(value), units[unit])
}

/// C's `%0.3g`.
fn format_g3(value: f64) -> String {
    if value == 0.0 {
        return "0".into();
    }
    let scientific = format!("{value:.2e}");
    let (mantissa, exp) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let precision = (2 - exp).max(0) as usize;
    let text = format!("{value:.precision$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Result<String> {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    value.serialize(&mut serializer)?;
    let text = String::from_utf8(out)?;
    // qemu prints empty arrays and objects over two lines.
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let indent = &line[..line.len() - line.trim_start().len()];
            let (body, comma) = match line.strip_suffix(',') {
                Some(body) => (body, ","),
                None => (line, ""),
            };
            match body.strip_suffix("[]").or_else(|| body.strip_suffix("{}")) {
                Some(head) if !head.ends_with('"') => {
                    let close = if body.ends_with("[]") { ']' } else { '}' };
                    let open = if close == ']' { '[' } else { '{' };
                    format!("{head}{open}\n{indent}{close}{comma}")
                }
                _ => line.to_string(),
            }
        })
        .collect();
    Ok(lines.join("\n"))
}

fn io(commands: &[String], format: Option<&str>, read_only: bool, file: &Path) -> Result<u8> {
    let name = file.display().to_string();
    let parsed: Vec<io_cmd::Command> = commands
        .iter()
        .map(|c| io_cmd::parse(c).with_context(|| format!("{name}: '{c}'")))
        .collect::<Result<_>>()?;
    // Like qemu-io -r when nothing writes: a corrupt-flagged image can still be read.
    let writes = parsed.iter().any(|c| {
        matches!(
            c,
            io_cmd::Command::Write { .. } | io_cmd::Command::Discard { .. }
        )
    });
    let read_only = read_only || !writes;
    let mut disk = open_disk(
        file,
        format,
        &OpenOptions {
            read_only,
            ..OpenOptions::default()
        },
    )?;
    let mut failed = false;
    for (command, text) in parsed.iter().zip(commands) {
        if let Err(e) = io_cmd::run(&mut disk, command) {
            eprintln!("{}: {name}: '{text}': {}", prog::name(), describe(&e));
            failed = true;
        }
    }
    if !read_only {
        if let Err(e) = disk.close() {
            eprintln!(
                "{}: {name}: flush failed: {}",
                prog::name(),
                describe(&e.into())
            );
            failed = true;
        }
    }
    Ok(u8::from(failed))
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn human_sizes_match_qemu() {
        assert_eq!(human_size(331776), "324 KiB");
        assert_eq!(human_size(4194304), "4 MiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(200704), "196 KiB");
        assert_eq!(human_size(197120), "192 KiB");
        assert_eq!(human_size(1_023_488), "1e+03 KiB");
        assert_eq!(human_size(1_023_487), "999 KiB");
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1000), "0.977 KiB");
    }
}
