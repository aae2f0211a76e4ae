//! `create`: qemu-img's option handling, checks and messages, in qemu-img's order — usage errors,
//! option-list errors, backing file checks, the `Formatting …` line, then the format's own checks.

use std::path::Path;

use qcow::create::{CreateOptions, CreateProblem, Preallocation};
use qcow::header::CompressionType;
use qcow::{Error as LibError, ParseSizeError};

use crate::getopt::{OptSpec, FORMAT, HELP, OBJECT, QUIET};
use crate::image_arg::{self, strip_file_prefix};
use crate::prog::Fail;
use crate::qemu_opts::{self, Desc, Opts};
use qcow::error::strerror;

const SPECS: &[OptSpec] = &[
    HELP,
    QUIET,
    OBJECT,
    FORMAT,
    OptSpec::value(Some('b'), &["backing"], "backing"),
    OptSpec::value(Some('F'), &["backing-format"], "backing-format"),
    OptSpec::flag(Some('u'), &["backing-unsafe"], "unsafe"),
    OptSpec::value(Some('o'), &["options"], "options"),
];

const USAGE: &str =
    "Usage: qemu-img create [-f FMT] [-o FMT_OPTS] [-b BACKING_FILENAME [-F BACKING_FMT]]
        [--object OBJDEF] [-u] FILENAME [SIZE[bkKMGTPE]]
Formats: qcow2, raw. Sizes take an optional k, M, G, T, P or E suffix (powers of 1024).";

/// Formats qemu-img knows but this tool does not write (refused with a plain explanation rather
/// than qemu-img's "Unknown file format").
const OTHER_QEMU_FORMATS: &[&str] = &[
    "bochs",
    "cloop",
    "dmg",
    "luks",
    "parallels",
    "qcow",
    "qed",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Drivers qemu-img accepts as a backing format (its `BlockdevDriver` names).
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

pub fn run(args: &[String]) -> Result<u8, Fail> {
    let Some(parsed) = crate::dropin::parse_args(args, SPECS, USAGE)? else {
        return Ok(0);
    };
    let mut option_lists = Vec::new();
    for list in parsed.all("options") {
        if !qemu_opts::is_valid_list(list) {
            return Err(Fail::Report(format!("Invalid option list: {list}")));
        }
        option_lists.push(list);
    }
    image_arg::check_objects(&parsed.all("object"))?;
    let format = parsed.last("format").unwrap_or("raw").to_string();
    let quiet = parsed.has("quiet");
    let options = option_lists.join(",");
    let filename = parsed.operands.first();
    if !options.is_empty() && qemu_opts::wants_help(&options) {
        return print_option_help(&format, filename.map(String::as_str));
    }
    let Some(filename) = filename else {
        return Err(Fail::Usage("Expecting image file name".into()));
    };
    let size = match parsed.operands.get(1) {
        Some(text) => Some(parse_image_size(text)?),
        None => None,
    };
    if let Some(extra) = parsed.operands.get(2) {
        return Err(Fail::Usage(format!("Unexpected argument: {extra}")));
    }
    let request = Request {
        filename,
        format: &format,
        backing: parsed.last("backing"),
        backing_format: parsed.last("backing-format"),
        options: &options,
        size,
        unsafe_backing: parsed.has("unsafe"),
        quiet,
    };
    request
        .create()
        .map_err(|message| Fail::Report(format!("{filename}: {message}")))?;
    Ok(0)
}

/// The size operand: qemu-img's two messages for a bad one.
fn parse_image_size(text: &str) -> Result<u64, Fail> {
    match qcow::parse_size(text) {
        Ok(size) if size <= i64::MAX as u64 => Ok(size),
        Err(ParseSizeError::Invalid(_)) => Err(Fail::Report(format!(
            "Invalid image size specified: '{text}'."
        ))),
        _ => Err(Fail::Report(
            "Invalid image size specified. Must be between 0 and 9223372036854775807.".into(),
        )),
    }
}

fn format_opts(format: &str) -> Option<(&'static [Desc], &'static str)> {
    match format {
        "qcow2" => Some((qemu_opts::QCOW2_OPTS, "qcow2")),
        "raw" => Some((qemu_opts::RAW_OPTS, "raw")),
        _ => None,
    }
}

fn unknown_format(format: &str) -> String {
    if OTHER_QEMU_FORMATS.contains(&format) {
        format!("Format '{format}' is not supported by this tool (it creates qcow2 and raw images)")
    } else {
        format!("Unknown file format '{format}'")
    }
}

fn print_option_help(format: &str, filename: Option<&str>) -> Result<u8, Fail> {
    let Some((list, name)) = format_opts(format) else {
        return Err(Fail::Report(unknown_format(format)));
    };
    let text = match filename {
        Some(_) => qemu_opts::help_text(
            "Supported options:",
            &qemu_opts::merged(list, qemu_opts::FILE_OPTS),
            false,
        ),
        None => qemu_opts::help_text(&format!("Supported {name} options:"), list, true),
    };
    print!("{text}");
    Ok(0)
}

/// One `create` invocation after argument parsing.
struct Request<'a> {
    filename: &'a str,
    format: &'a str,
    backing: Option<&'a str>,
    backing_format: Option<&'a str>,
    options: &'a str,
    size: Option<u64>,
    unsafe_backing: bool,
    quiet: bool,
}

impl Request<'_> {
    /// QEMU's `bdrv_img_create` followed by the driver's create; errors come back without the
    /// `filename: ` prefix.
    fn create(&self) -> Result<(), String> {
        let Some((list, _)) = format_opts(self.format) else {
            return Err(unknown_format(self.format));
        };
        let path = strip_file_prefix(self.filename)?;
        let mut opts = Opts::new(qemu_opts::merged(list, qemu_opts::FILE_OPTS));
        if !self.options.is_empty() {
            opts.parse(self.options)?;
        }
        match (opts.get("size").is_some(), self.size) {
            (true, Some(_)) => return Err("The image size must be specified only once".into()),
            (false, Some(size)) => opts.set("size", &size.to_string())?,
            _ => {}
        }
        if let Some(backing) = self.backing {
            opts.set("backing_file", backing).map_err(|_| {
                format!(
                    "Backing file not supported for file format '{}'",
                    self.format
                )
            })?;
        }
        if let Some(backing_format) = self.backing_format {
            opts.set("backing_fmt", backing_format).map_err(|_| {
                format!(
                    "Backing file format not supported for file format '{}'",
                    self.format
                )
            })?;
        }
        let backing_file = opts.get_str("backing_file").map(str::to_string);
        if let Some(backing) = &backing_file {
            if backing == self.filename {
                return Err(
                    "Error: Trying to create an image with the same filename as the \
                            backing file"
                        .into(),
                );
            }
            if backing.is_empty() {
                return Err("Expected backing file name, got empty string".into());
            }
        }
        let backing_fmt = opts.get_str("backing_fmt").map(str::to_string);
        if let (Some(backing), false) = (&backing_file, self.unsafe_backing) {
            let backing_size = open_backing_for_create(&path, backing, backing_fmt.as_deref())?;
            if opts.get("size").is_none() {
                opts.set("size", &backing_size.to_string())?;
            }
        } else if backing_file.is_some() && backing_fmt.is_none() {
            return Err("Backing file specified without backing format".into());
        }
        if opts.get("size").is_none() {
            return Err(CreateProblem::SizeMissing.to_string());
        }
        if !self.quiet {
            println!(
                "Formatting '{}', fmt={} {}",
                self.filename,
                self.format,
                opts.print()
            );
        }
        match self.format {
            "raw" => create_raw(&path, &opts),
            _ => create_qcow2(&path, &opts),
        }
    }
}

/// Opens the backing file as qemu-img does before printing anything: its size is the default
/// virtual size, and a missing backing format is an error naming the probed one.
fn open_backing_for_create(
    image: &Path,
    backing: &str,
    format: Option<&str>,
) -> Result<u64, String> {
    let full = qcow::image::resolve_backing_path(Some(image), backing);
    if let Some(format) = format {
        if !QEMU_DRIVERS.contains(&format) {
            return Err(format!(
                "Unknown driver '{format}'\nCould not open backing image."
            ));
        }
    }
    let disk = image_arg::open_chain_for_create(&full, format)
        .map_err(|e| format!("{}\nCould not open backing image.", e.qemu_text()))?;
    if format.is_none() {
        return Err(format!(
            "Backing file specified without backing format\nDetected format of {}.",
            disk.format().name()
        ));
    }
    // The block layer counts whole sectors (a raw backing file of 1000 bytes is 1024 bytes).
    Ok(disk.size().div_ceil(512) * 512)
}

fn create_raw(path: &Path, opts: &Opts) -> Result<(), String> {
    let size = opts.get_number("size").unwrap_or(0);
    if let Some(device_len) = device_length(path) {
        // qemu-img's file layer never resizes a device: it must already be big enough.
        if let Some(mode) = opts.get_str("preallocation").filter(|m| *m != "off") {
            return Err(format!("Unsupported preallocation mode '{mode}'"));
        }
        if size > device_len {
            return Err("Cannot grow device files".into());
        }
        return Ok(());
    }
    let preallocation = match opts.get_str("preallocation") {
        None | Some("off") => Preallocation::Off,
        Some("falloc") => Preallocation::Falloc,
        Some("full") => Preallocation::Full,
        Some("metadata") => {
            // qemu-img's file layer has created (and emptied) the file by the time the mode is
            // refused.
            qcow::create::create_raw(path, 0).map_err(|e| create_error_text(path, &e))?;
            return Err("Unsupported preallocation mode: metadata".into());
        }
        Some(other) => {
            return Err(format!(
                "Parameter 'preallocation' does not accept value '{other}'"
            ))
        }
    };
    if size > i64::MAX as u64 {
        return Err("The image size is too large for file format 'raw'".into());
    }
    check_extent_size_hint(opts)?;
    qcow::create::create_raw_with(path, size, preallocation)
        .map_err(|e| create_error_text(path, &e))
}

/// The size of `path` if it is a block or character device (which qemu-img never truncates).
fn device_length(path: &Path) -> Option<u64> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).ok()?;
    let kind = meta.file_type();
    if !(kind.is_block_device() || kind.is_char_device()) {
        return None;
    }
    let mut file = std::fs::File::open(path).ok()?;
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::End(0)).ok()
}

fn check_extent_size_hint(opts: &Opts) -> Result<(), String> {
    match opts.get_number("extent_size_hint") {
        Some(hint) if hint > u64::from(u32::MAX) => Err("Extent size hint is too large".into()),
        _ => Ok(()),
    }
}

/// Applies qcow2 `-o` lists (for commands that create qcow2 images, e.g. `convert`): the options
/// given replace the fields of `create`; the rest stay as they are.
pub fn apply_options(create: &mut CreateOptions, lists: &[String]) -> Result<(), String> {
    let mut opts = Opts::new(qemu_opts::merged(
        qemu_opts::QCOW2_OPTS,
        qemu_opts::FILE_OPTS,
    ));
    for list in lists {
        if !qemu_opts::is_valid_list(list) {
            return Err(format!("Invalid option list: {list}"));
        }
        opts.parse(list)?;
    }
    if opts.get("backing_file").is_none() {
        if let Some(backing) = &create.backing_file {
            opts.set("backing_file", backing)?;
        }
    }
    if opts.get("backing_fmt").is_none() {
        if let Some(format) = &create.backing_format {
            opts.set("backing_fmt", format)?;
        }
    }
    let size = create.size;
    *create = qcow2_options(&opts)?;
    if opts.get("size").is_none() {
        create.size = size;
    }
    Ok(())
}

/// The library's create options from a parsed qcow2 option list (QAPI's value checks).
fn qcow2_options(opts: &Opts) -> Result<CreateOptions, String> {
    let rejects =
        |param: &str, value: &str| format!("Parameter '{param}' does not accept value '{value}'");
    let encryption = opts
        .get_str("encryption")
        .is_some_and(|v| opts.get_bool("encryption") && !v.is_empty())
        || opts
            .list
            .iter()
            .any(|d| d.name.starts_with("encrypt.") && opts.get(d.name).is_some());
    let version = match opts.get_str("compat") {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(other) => return Err(rejects("version", other)),
    };
    if let Some(format) = opts.get_str("backing_fmt") {
        if !QEMU_DRIVERS.contains(&format) {
            return Err(rejects("backing-fmt", format));
        }
    }
    let preallocation = match opts.get_str("preallocation") {
        None | Some("off") => Preallocation::Off,
        Some("metadata") => Preallocation::Metadata,
        Some("falloc") => Preallocation::Falloc,
        Some("full") => Preallocation::Full,
        Some(other) => return Err(rejects("preallocation", other)),
    };
    let compression_type = match opts.get_str("compression_type") {
        None | Some("zlib") => CompressionType::Deflate,
        Some("zstd") => CompressionType::Zstd,
        Some(other) => return Err(rejects("compression-type", other)),
    };
    if encryption {
        return Err(
            "Encrypted images are not supported by this tool (LUKS and AES encryption are out \
             of scope)"
                .into(),
        );
    }
    Ok(CreateOptions {
        size: opts.get_number("size").unwrap_or(0),
        cluster_size: opts.get_number("cluster_size").unwrap_or(65536),
        // Out-of-range widths stay invalid (u32::MAX is not a power of two).
        refcount_bits: u32::try_from(opts.get_number("refcount_bits").unwrap_or(16))
            .unwrap_or(u32::MAX),
        version,
        lazy_refcounts: opts.get_bool("lazy_refcounts"),
        preallocation,
        backing_file: opts.get_str("backing_file").map(str::to_string),
        backing_format: opts.get_str("backing_fmt").map(str::to_string),
        extended_l2: opts.get_bool("extended_l2"),
        compression_type,
        data_file: opts.get_str("data_file").map(str::to_string),
        data_file_raw: opts.get_bool("data_file_raw"),
    })
}

/// qcow2's own checks (QEMU's `qcow2_co_create_opts` and `qcow2_co_create`), then the image.
fn create_qcow2(path: &Path, opts: &Opts) -> Result<(), String> {
    let options = qcow2_options(opts)?;
    if options.size > i64::MAX as u64 {
        return Err("Could not resize image: Image size cannot be negative".into());
    }
    options.validate().map_err(|e| e.to_string())?;
    check_extent_size_hint(opts)?;
    // The backing file was opened (or deliberately not) before the Formatting line.
    qcow::create::create_with(path, &options, false).map_err(|e| create_error_text(path, &e))?;
    if device_length(path).is_none() {
        return Ok(());
    }
    // Like qemu-img, open what was written to a device: one that swallowed the writes
    // (/dev/null) holds no image.
    let reopen = qcow::OpenOptions {
        read_only: true,
        no_backing: true,
        ..qcow::OpenOptions::default()
    };
    qcow::Image::open(path, &reopen).map_err(|e| e.qemu_text())?;
    Ok(())
}

/// qemu-img's wording for a failure to write the new image.
fn create_error_text(path: &Path, error: &LibError) -> String {
    match error {
        LibError::CreateFile { path: file, source } => format!(
            "Could not create '{}': {}",
            file.display(),
            strerror(source)
        ),
        LibError::InvalidOption(problem) => problem.to_string(),
        LibError::WriteHeader(source) | LibError::Flush(source) => {
            format!("Could not write qcow2 header: {}", strerror(source))
        }
        other => format!("Could not create '{}': {other}", path.display()),
    }
}
