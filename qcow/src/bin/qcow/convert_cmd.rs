//! `qcow convert` and `qcow compare`: qemu-img's flags, messages and exit codes over the
//! library's `convert` and `compare`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use qcow::compare::{compare, Comparison};
use qcow::convert::{convert, ConvertOptions};
use qcow::{CreateOptions, Disk, Error, Format, OpenOptions};

use crate::disk::{parse_format, CacheMode};
use crate::progress::{CliMonitor, INTERRUPTED_EXIT};

/// `qcow convert`'s arguments.
#[derive(Debug, Clone)]
pub struct ConvertArgs {
    pub source: PathBuf,
    pub target: PathBuf,
    pub source_format: Option<String>,
    pub output_format: Option<String>,
    pub options: Vec<String>,
    pub compress: bool,
    pub backing: Option<String>,
    pub backing_format: Option<String>,
    pub sparse: Option<String>,
    pub cache: Option<String>,
    pub progress: bool,
    pub quiet: bool,
}

/// Applies `-o key=value,...` lists to qcow2 creation options (qemu-img's option syntax and
/// checks, shared with `create`).
pub fn apply_create_options(create: &mut CreateOptions, lists: &[String]) -> Result<()> {
    crate::create_cmd::apply_options(create, lists).map_err(anyhow::Error::msg)
}

pub fn convert_cmd(args: &ConvertArgs) -> Result<u8> {
    let output_format = match args.output_format.as_deref() {
        None => Format::Raw,
        Some(name) => name
            .parse::<Format>()
            .map_err(|_| anyhow!("Unknown file format '{name}'"))?,
    };
    let min_sparse = match args.sparse.as_deref() {
        None => 4096,
        Some(text) => {
            let bytes = qcow::parse_size(text).map_err(anyhow::Error::msg)?;
            if bytes % 512 != 0 || bytes > 2_147_483_136 {
                bail!("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 2147483136.");
            }
            bytes
        }
    };
    // Like qemu-img convert, the output's default cache mode is `unsafe`: no flush at the end.
    let cache = CacheMode::parse(args.cache.as_deref().unwrap_or("unsafe"))?;
    let mut create = CreateOptions {
        backing_file: args.backing.clone(),
        backing_format: args.backing_format.clone(),
        ..CreateOptions::default()
    };
    apply_create_options(&mut create, &args.options)?;
    if create.backing_file.is_some()
        && create.backing_format.is_none()
        && output_format == Format::Qcow2
    {
        bail!("Use of backing file requires explicit backing format");
    }
    let options = ConvertOptions {
        format: output_format,
        create,
        compress: args.compress,
        min_sparse,
        sync: cache.sync,
    };
    let source_options = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let source_format = parse_format(args.source_format.as_deref())?;
    let mut source = Disk::open(&args.source, source_format, &source_options).map_err(|e| {
        anyhow!(
            "Could not open '{}': {}",
            args.source.display(),
            e.qemu_text()
        )
    })?;
    let mut monitor = CliMonitor::new(args.progress, args.quiet);
    let result = convert(&mut source, &args.target, &options, &mut monitor);
    monitor.finish();
    match result {
        Ok(()) => Ok(0),
        Err(Error::Interrupted) => {
            remove_partial(&args.target);
            eprintln!(
                "qcow: convert interrupted; removed the incomplete output '{}'",
                args.target.display()
            );
            Ok(INTERRUPTED_EXIT)
        }
        Err(e @ (Error::Convert(_) | Error::NotWithDataFile(_))) => Err(e.into()),
        Err(e) => {
            remove_partial(&args.target);
            Err(anyhow!(
                "error while converting to '{}': {e} (the incomplete output was removed)",
                args.target.display()
            ))
        }
    }
}

fn remove_partial(target: &Path) {
    let _ = std::fs::remove_file(target);
}

/// `qcow compare`'s arguments.
#[derive(Debug, Clone)]
pub struct CompareArgs {
    pub first: PathBuf,
    pub second: PathBuf,
    pub first_format: Option<String>,
    pub second_format: Option<String>,
    pub strict: bool,
    pub progress: bool,
    pub quiet: bool,
}

/// Exit codes: 0 identical, 1 different, 2 an image cannot be opened, 4 a read failed.
pub fn compare_cmd(args: &CompareArgs) -> Result<u8> {
    let options = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let open = |path: &Path, format: Option<&str>| -> std::result::Result<Disk, String> {
        let format = parse_format(format).map_err(|e| e.to_string())?;
        Disk::open(path, format, &options)
            .map_err(|e| format!("Could not open '{}': {}", path.display(), e.qemu_text()))
    };
    let mut first = match open(&args.first, args.first_format.as_deref()) {
        Ok(disk) => disk,
        Err(message) => {
            eprintln!("qcow: {message}");
            return Ok(2);
        }
    };
    let mut second = match open(&args.second, args.second_format.as_deref()) {
        Ok(disk) => disk,
        Err(message) => {
            eprintln!("qcow: {message}");
            return Ok(2);
        }
    };
    let say = |text: &str| {
        if !args.quiet {
            println!("{text}");
        }
    };
    let common = first.size().min(second.size());
    let mut monitor = CliMonitor::new(args.progress, args.quiet);
    let result = compare(&mut first, &mut second, args.strict, &mut monitor);
    monitor.finish();
    let report = match result {
        Ok(report) => report,
        Err(Error::Interrupted) => return Ok(INTERRUPTED_EXIT),
        Err(e) => {
            eprintln!("qcow: Error while comparing the images: {e}");
            return Ok(4);
        }
    };
    // qemu-img warns about the sizes once the common part compared equal.
    let common_equal = match report.comparison {
        Comparison::Identical => true,
        Comparison::ContentMismatch(offset) => offset >= common,
        _ => false,
    };
    if report.sizes_differ && common_equal {
        say("Warning: Image size mismatch!");
    }
    Ok(match report.comparison {
        Comparison::Identical => {
            say("Images are identical.");
            0
        }
        Comparison::ContentMismatch(offset) => {
            say(&format!("Content mismatch at offset {offset}!"));
            1
        }
        Comparison::SizeMismatch => {
            say("Strict mode: Image size mismatch!");
            1
        }
        Comparison::StatusMismatch(offset) => {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            1
        }
    })
}
