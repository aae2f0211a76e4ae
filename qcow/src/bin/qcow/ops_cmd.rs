//! `qcow commit`, `rebase`, `resize`, `amend` and `measure`: qemu-img's flags, messages and exit
//! codes over the library's operations.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use qcow::amend::{amend, AmendOptions};
use qcow::commit::commit;
use qcow::measure::measure;
use qcow::rebase::{rebase, NewBacking};
use qcow::{CreateOptions, Disk, Error, Format, OpenOptions};
use serde::Serialize;

use crate::convert_cmd::apply_create_options;
use crate::disk::parse_format;
use crate::progress::{CliMonitor, INTERRUPTED_EXIT};
use crate::{to_json, Output};

pub fn commit_cmd(
    file: &Path,
    base: Option<&Path>,
    keep_top: bool,
    progress: bool,
    quiet: bool,
) -> Result<u8> {
    let mut monitor = CliMonitor::new(progress, quiet);
    let result = commit(file, base, keep_top, &mut monitor);
    monitor.finish();
    match result {
        Ok(()) => {
            if !quiet {
                println!("Image committed.");
            }
            Ok(0)
        }
        Err(Error::Interrupted) => {
            eprintln!(
                "qcow: commit interrupted: the base image holds part of the data and '{}' was \
                 left unchanged; both images are valid",
                file.display()
            );
            Ok(INTERRUPTED_EXIT)
        }
        Err(e @ Error::Commit(_)) => Err(e.into()),
        Err(e) => Err(anyhow!("Could not commit '{}': {e}", file.display())),
    }
}

/// `qcow rebase`'s arguments.
#[derive(Debug, Clone)]
pub struct RebaseArgs {
    pub file: PathBuf,
    pub backing: Option<String>,
    pub backing_format: Option<String>,
    pub unsafe_mode: bool,
    pub progress: bool,
    pub quiet: bool,
}

pub fn rebase_cmd(args: &RebaseArgs) -> Result<u8> {
    if args.backing.is_none() && !args.unsafe_mode {
        bail!(
            "Must specify backing file (-b) or use unsafe mode (-u)\nTry 'qcow rebase --help' for more info"
        );
    }
    let new = NewBacking {
        name: args.backing.clone(),
        format: parse_format(args.backing_format.as_deref())?,
    };
    let mut monitor = CliMonitor::new(args.progress, args.quiet);
    let result = rebase(&args.file, &new, args.unsafe_mode, &mut monitor);
    monitor.finish();
    match result {
        Ok(()) => Ok(0),
        Err(Error::Interrupted) => {
            eprintln!(
                "qcow: rebase interrupted: '{}' still uses its old backing file (clusters copied \
                 so far are harmless)",
                args.file.display()
            );
            Ok(INTERRUPTED_EXIT)
        }
        Err(e) => Err(e.into()),
    }
}

/// `resize [--shrink] FILE [+|-]SIZE`; `rest` is FILE and SIZE (SIZE may start with '-').
pub fn resize_cmd(rest: &[String], format: Option<&str>, shrink: bool, quiet: bool) -> Result<u8> {
    let words: Vec<&String> = rest.iter().filter(|w| w.as_str() != "--").collect();
    let [file, size] = words.as_slice() else {
        bail!("Expecting image file name and size\nTry 'qcow resize --help' for more info");
    };
    let file = Path::new(file.as_str());
    let (sign, number) = match size.as_bytes().first() {
        Some(b'+') => (1, &size[1..]),
        Some(b'-') => (-1, &size[1..]),
        _ => (0, size.as_str()),
    };
    let amount = qcow::parse_size(number).map_err(|_| {
        anyhow!(
            "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, \
             T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        )
    })?;
    let mut disk = Disk::open(file, parse_format(format)?, &OpenOptions::default())
        .map_err(|e| anyhow!("Could not open '{}': {}", file.display(), e.qemu_text()))?;
    let current = disk.size();
    let new_size = match sign {
        1 => current.checked_add(amount),
        -1 => current.checked_sub(amount),
        _ => Some(amount),
    };
    let new_size = match new_size {
        Some(size) if size > 0 => size,
        _ => bail!("New image size must be positive"),
    };
    if new_size < current && !shrink {
        eprintln!("qcow: Use the --shrink option to perform a shrink operation.");
        eprintln!(
            "qcow: warning: Shrinking an image will delete all data beyond the shrunken image's \
             end. Before performing such an operation, make sure there is no important data there."
        );
        return Ok(1);
    }
    disk.resize(new_size, shrink)?;
    disk.close()?;
    if !quiet {
        println!("Image resized.");
    }
    Ok(0)
}

pub fn amend_cmd(file: &Path, format: Option<&str>, options: &[String]) -> Result<u8> {
    if options.is_empty() {
        bail!("Must specify options (-o)\nTry 'qcow amend --help' for more info");
    }
    let mut amend_options = AmendOptions::default();
    for list in options {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, "on"));
            amend_options.set(key, value)?;
        }
    }
    let mut disk = Disk::open(file, parse_format(format)?, &OpenOptions::default())
        .map_err(|e| anyhow!("Could not open '{}': {}", file.display(), e.qemu_text()))?;
    let Some(image) = disk.as_qcow2() else {
        bail!("Format driver 'raw' does not support option amendment");
    };
    amend(image, &amend_options)?;
    disk.close()?;
    Ok(0)
}

/// `qcow measure`'s arguments.
#[derive(Debug, Clone)]
pub struct MeasureArgs {
    pub file: Option<PathBuf>,
    pub format: Option<String>,
    pub output_format: Option<String>,
    pub options: Vec<String>,
    pub size: Option<String>,
    pub output: Output,
}

/// Field order of qemu-img's JSON.
#[derive(Serialize)]
struct MeasureJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    bitmaps: Option<u64>,
    required: u64,
    #[serde(rename = "fully-allocated")]
    fully_allocated: u64,
}

pub fn measure_cmd(args: &MeasureArgs) -> Result<u8> {
    match (&args.file, &args.size) {
        (Some(_), Some(_)) => bail!("--size N cannot be used together with a filename."),
        (None, None) => bail!("Either --size N or one filename must be specified."),
        _ => {}
    }
    let format = match args.output_format.as_deref() {
        None => Format::Raw,
        Some(name) => name
            .parse::<Format>()
            .map_err(|_| anyhow!("Unknown file format '{name}'"))?,
    };
    let mut create = CreateOptions::default();
    apply_create_options(&mut create, &args.options)?;
    if let Some(size) = &args.size {
        create.size = qcow::parse_size(size).map_err(|_| {
            anyhow!("Invalid image size specified. Must be between 0 and 9223372036854775807.")
        })?;
    }
    let mut source = match &args.file {
        Some(file) => {
            let options = OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            };
            Some(
                Disk::open(file, parse_format(args.format.as_deref())?, &options).map_err(|e| {
                    anyhow!("Could not open '{}': {}", file.display(), e.qemu_text())
                })?,
            )
        }
        None => None,
    };
    let result = measure(source.as_mut(), format, &create)?;
    match args.output {
        Output::Human => {
            println!("required size: {}", result.required);
            println!("fully allocated size: {}", result.fully_allocated);
            if let Some(bitmaps) = result.bitmaps {
                println!("bitmaps size: {bitmaps}");
            }
        }
        Output::Json => {
            let json = MeasureJson {
                bitmaps: result.bitmaps,
                required: result.required,
                fully_allocated: result.fully_allocated,
            };
            println!("{}", to_json(&json)?);
        }
    }
    Ok(0)
}
