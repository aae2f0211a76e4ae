//! `map`: the allocation map of the whole backing chain, as `qemu-img map` prints it (human table
//! or JSON), optionally limited to `--start-offset`/`--max-length`.

use std::path::Path;

use qcow::{Format, Image, MapEntry, OpenOptions, Storage};

use crate::getopt::{OptSpec, Parsed, FORCE_SHARE, FORMAT, HELP, IMAGE_OPTS, OBJECT, OUTPUT};
use crate::image_arg::{self, ImageSpec};
use crate::prog::Fail;

const SPECS: &[OptSpec] = &[
    HELP,
    FORMAT,
    OUTPUT,
    OBJECT,
    IMAGE_OPTS,
    FORCE_SHARE,
    OptSpec::value(Some('s'), &["start-offset"], "start"),
    OptSpec::value(Some('l'), &["max-length"], "length"),
];

const USAGE: &str =
    "Usage: qemu-img map [-f FMT | --image-opts] [--object OBJDEF] [--output human|json]
        [--start-offset OFFSET] [--max-length LENGTH] [-U] FILENAME";

/// `--output`, shared by info, check and map.
pub fn parse_output(parsed: &Parsed) -> Result<bool, Fail> {
    match parsed.last("output") {
        None | Some("human") => Ok(false),
        Some("json") => Ok(true),
        Some(other) => Err(Fail::Usage(format!(
            "--output expects 'human' or 'json' not '{other}'"
        ))),
    }
}

/// The one image operand, as `-f`/`--image-opts` say to read it.
pub fn image_operand(parsed: &Parsed) -> Result<ImageSpec, Fail> {
    let [arg] = parsed.operands.as_slice() else {
        return Err(Fail::Usage("Expecting one image file name".into()));
    };
    image_arg::check_objects(&parsed.all("object"))?;
    let format = parsed.last("format");
    if parsed.has("image-opts") {
        if format.is_some() {
            return Err(Fail::Report(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        return image_arg::parse_image_opts(arg);
    }
    image_arg::parse(arg, format)
}

/// A byte offset or length argument (`cvtnum`), with qemu-img's two messages.
fn parse_offset(what: &str, text: &str) -> Result<u64, Fail> {
    match qcow::parse_size(text) {
        Ok(value) if value <= i64::MAX as u64 => Ok(value),
        Err(qcow::ParseSizeError::Invalid(_)) => {
            Err(Fail::Report(format!("Invalid {what} specified: '{text}'.")))
        }
        _ => Err(Fail::Report(format!(
            "Invalid {what} specified. Must be between 0 and 9223372036854775807."
        ))),
    }
}

pub fn run(args: &[String]) -> Result<u8, Fail> {
    let Some(parsed) = crate::dropin::parse_args(args, SPECS, USAGE)? else {
        return Ok(0);
    };
    let json = parse_output(&parsed)?;
    let start = match parsed.last("start") {
        Some(text) => parse_offset("start offset", text)?,
        None => 0,
    };
    let max_length = match parsed.last("length") {
        Some(text) => Some(parse_offset("max length", text)?),
        None => None,
    };
    let spec = image_operand(&parsed)?;
    let format = image_arg::resolve_format(&spec)?;
    let could_not_open = |e: qcow::Error| Fail::Report(image_arg::open_error_text(&spec.arg, &e));
    let entries = match format {
        Format::Raw => raw_map(&spec.path).map_err(could_not_open)?,
        Format::Qcow2 => {
            let options = OpenOptions {
                read_only: true,
                no_backing: spec.no_backing,
                data_file: spec.data_file.clone(),
                ..OpenOptions::default()
            };
            let mut image = Image::open(&spec.path, &options).map_err(could_not_open)?;
            qcow::map(&mut image).map_err(|e| Fail::Report(e.to_string()))?
        }
    };
    let size = entries.last().map_or(0, |e| e.start + e.length);
    let end = max_length.map_or(size, |len| start.saturating_add(len).min(size));
    let entries = clip(entries, start, end);
    if json {
        print_json(&entries, start, size);
    } else {
        print_human(&entries)?;
    }
    Ok(0)
}

/// The extents inside `[start, end)`, the first one cut to begin at `start`.
fn clip(entries: Vec<MapEntry>, start: u64, end: u64) -> Vec<MapEntry> {
    entries
        .into_iter()
        .filter(|e| e.start + e.length > start && e.start < end)
        .map(|mut e| {
            if e.start < start {
                let cut = start - e.start;
                e.length -= cut;
                e.offset = e.offset.map(|o| o + cut);
                e.start = start;
            }
            e.length = e.length.min(end - e.start);
            e
        })
        .collect()
}

fn raw_map(path: &Path) -> qcow::Result<Vec<MapEntry>> {
    let handle = std::fs::File::open(path).map_err(|source| qcow::Error::OpenFile {
        path: path.to_path_buf(),
        source,
    })?;
    let mut storage = qcow::FileStorage::new(handle);
    let file_len = storage.len().map_err(qcow::Error::ReadHeader)?;
    // The block layer counts whole sectors: the tail past the end of the file reads as zeros.
    let size = file_len.div_ceil(512) * 512;
    let mut entries: Vec<MapEntry> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let (is_data, run) = if offset < file_len {
            storage
                .extent_at(offset, file_len - offset)
                .map_err(qcow::Error::ReadHeader)?
        } else {
            (false, size - offset)
        };
        let entry = MapEntry {
            start: offset,
            length: run.max(1),
            depth: 0,
            present: true,
            zero: !is_data,
            data: is_data,
            compressed: false,
            offset: Some(offset),
            file: Some(path.to_path_buf()),
        };
        offset += entry.length;
        match entries.last_mut() {
            Some(last) if last.data == entry.data => last.length += entry.length,
            _ => entries.push(entry),
        }
    }
    Ok(entries)
}

fn print_json(entries: &[MapEntry], start: u64, size: u64) {
    if entries.is_empty() && start >= size {
        // qemu-img reports one empty extent at the start offset.
        println!(
            "[{{ \"start\": {start}, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}}]"
        );
        return;
    }
    let lines: Vec<String> = entries
        .iter()
        .map(|e| {
            let mut line = format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            );
            if let Some(offset) = e.offset {
                line += &format!(", \"offset\": {offset}");
            }
            line + "}"
        })
        .collect();
    println!("[{}]", lines.join(",\n"));
}

fn print_human(entries: &[MapEntry]) -> Result<(), Fail> {
    println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
    let hex = |v: u64| {
        if v == 0 {
            "0".to_string()
        } else {
            format!("{v:#x}")
        }
    };
    for e in entries.iter().filter(|e| e.data) {
        let Some(offset) = e.offset else {
            return Err(Fail::Report(
                "File contains external, encrypted or compressed clusters.".into(),
            ));
        };
        // Data that reads as zeros (a hole under a preallocated cluster) is not listed.
        if e.zero {
            continue;
        }
        let file = e
            .file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_default();
        println!(
            "{:<16}{:<16}{:<16}{}",
            hex(e.start),
            hex(e.length),
            hex(offset),
            file
        );
    }
    Ok(())
}
