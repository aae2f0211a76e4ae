//! `info`: qemu-img's ImageInfo as JSON, or its human-readable form, for one image or
//! (`--backing-chain`) the whole chain.

use std::collections::HashSet;
use std::path::PathBuf;

use qcow as lib;
use serde::Serialize;

use crate::getopt::{OptSpec, FORCE_SHARE, FORMAT, HELP, IMAGE_OPTS, OBJECT, OUTPUT};
use crate::image_arg::{self, ImageSpec};
use crate::map_cmd::{image_operand, parse_output};
use crate::prog::Fail;
use crate::{human_size, to_json};
use lib::{Format, Image, OpenOptions};

const SPECS: &[OptSpec] = &[
    HELP,
    FORMAT,
    OUTPUT,
    OptSpec::flag(Some('b'), &["backing-chain", "backing"], "backing-chain"),
    OBJECT,
    IMAGE_OPTS,
    FORCE_SHARE,
];

const USAGE: &str = "Usage: qemu-img info [-f FMT | --image-opts] [-b] [-U] [--object OBJDEF]
        [--output human|json] FILENAME";

#[derive(Serialize)]
struct BitmapJson {
    flags: Vec<&'static str>,
    name: String,
    granularity: u64,
}

#[derive(Serialize)]
struct FormatSpecificQcow2 {
    compat: &'static str,
    #[serde(rename = "compression-type")]
    compression_type: &'static str,
    #[serde(rename = "lazy-refcounts", skip_serializing_if = "Option::is_none")]
    lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bitmaps: Option<Vec<BitmapJson>>,
    #[serde(rename = "refcount-bits")]
    refcount_bits: u32,
    #[serde(rename = "data-file", skip_serializing_if = "Option::is_none")]
    data_file: Option<String>,
    #[serde(rename = "data-file-raw", skip_serializing_if = "Option::is_none")]
    data_file_raw: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt: Option<bool>,
    #[serde(rename = "extended-l2", skip_serializing_if = "Option::is_none")]
    extended_l2: Option<bool>,
}

#[derive(Serialize)]
struct FormatSpecific<T> {
    #[serde(rename = "type")]
    kind: &'static str,
    data: T,
}

#[derive(Serialize)]
struct ChildNode {
    name: &'static str,
    info: FileNodeInfo,
}

#[derive(Serialize)]
struct FileNodeInfo {
    children: Vec<ChildNode>,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    filename: String,
    format: &'static str,
    #[serde(rename = "actual-size", skip_serializing_if = "Option::is_none")]
    actual_size: Option<u64>,
    #[serde(rename = "format-specific")]
    format_specific: FormatSpecific<serde_json::Map<String, serde_json::Value>>,
    #[serde(rename = "dirty-flag")]
    dirty_flag: bool,
}

#[derive(Serialize)]
struct SnapshotInfo {
    id: String,
    name: String,
    #[serde(rename = "vm-state-size")]
    vm_state_size: u64,
    #[serde(rename = "date-sec")]
    date_sec: u32,
    #[serde(rename = "date-nsec")]
    date_nsec: u32,
    #[serde(rename = "vm-clock-sec")]
    vm_clock_sec: u64,
    #[serde(rename = "vm-clock-nsec")]
    vm_clock_nsec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    icount: Option<u64>,
}

#[derive(Serialize)]
struct ImageInfo {
    children: Vec<ChildNode>,
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    backing_filename_format: Option<String>,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    filename: String,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    format: &'static str,
    #[serde(rename = "actual-size", skip_serializing_if = "Option::is_none")]
    actual_size: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    snapshots: Vec<SnapshotInfo>,
    #[serde(rename = "format-specific", skip_serializing_if = "Option::is_none")]
    format_specific: Option<FormatSpecific<FormatSpecificQcow2>>,
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    #[serde(rename = "dirty-flag")]
    dirty_flag: bool,
    #[serde(skip)]
    file_length: u64,
}

/// Sizes as the block layer reports them: whole 512-byte sectors.
fn sectors(bytes: u64) -> u64 {
    bytes.div_ceil(512) * 512
}

fn image_info(spec: &ImageSpec) -> Result<ImageInfo, Fail> {
    let name = spec.filename();
    let path = spec.path.as_path();
    let format = image_arg::resolve_format(spec)?;
    let could_not_open = |e: lib::Error| Fail::Report(image_arg::open_error_text(&spec.arg, &e));
    let metadata = std::fs::metadata(path).map_err(|source| {
        could_not_open(lib::Error::OpenFile {
            path: path.to_path_buf(),
            source,
        })
    })?;
    use std::os::unix::fs::MetadataExt;
    let actual_size = Some(metadata.blocks() * 512);
    let file_length = sectors(metadata.len());
    let file_node = FileNodeInfo {
        children: Vec::new(),
        virtual_size: file_length,
        filename: name.clone(),
        format: "file",
        actual_size,
        format_specific: FormatSpecific {
            kind: "file",
            data: serde_json::Map::new(),
        },
        dirty_flag: false,
    };
    let children = vec![ChildNode {
        name: "file",
        info: file_node,
    }];
    if format == Format::Raw {
        return Ok(ImageInfo {
            children,
            backing_filename_format: None,
            virtual_size: file_length,
            filename: name,
            cluster_size: None,
            format: "raw",
            actual_size,
            snapshots: Vec::new(),
            format_specific: None,
            full_backing_filename: None,
            backing_filename: None,
            dirty_flag: false,
            file_length,
        });
    }
    // Read-only, and without opening the backing file or the data file (qemu-img opens the
    // image without I/O): only their names are reported.
    let options = OpenOptions {
        read_only: true,
        no_backing: true,
        open_data_file: false,
        ..OpenOptions::default()
    };
    let mut image = Image::open(path, &options).map_err(could_not_open)?;
    let header = image.header().clone();
    let bitmaps = lib::bitmap::read_bitmaps(image.storage_mut(), &header)
        .map_err(|e| Fail::Report(format!("Could not open '{}': {e}", spec.arg)))?;
    let v3 = header.version >= 3;
    let full_backing = header.backing_file.as_deref().map(|b| {
        lib::image::resolve_backing_path(Some(path), b)
            .display()
            .to_string()
    });
    Ok(ImageInfo {
        children,
        backing_filename_format: header.backing_format.clone(),
        virtual_size: header.size,
        filename: name,
        cluster_size: Some(header.cluster_size()),
        format: "qcow2",
        actual_size,
        snapshots: image
            .snapshots()
            .iter()
            .map(|s| SnapshotInfo {
                id: s.id.clone(),
                name: s.name.clone(),
                vm_state_size: s.vm_state_size,
                date_sec: s.date_sec,
                date_nsec: s.date_nsec,
                vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
                vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
                icount: s.icount,
            })
            .collect(),
        format_specific: Some(FormatSpecific {
            kind: "qcow2",
            data: FormatSpecificQcow2 {
                compat: if v3 { "1.1" } else { "0.10" },
                compression_type: header.compression_type.name(),
                lazy_refcounts: v3.then(|| image.lazy_refcounts()),
                bitmaps: (!bitmaps.is_empty()).then(|| {
                    bitmaps
                        .iter()
                        .map(|b| BitmapJson {
                            flags: [(b.in_use, "in-use"), (b.auto, "auto")]
                                .iter()
                                .filter(|(set, _)| *set)
                                .map(|(_, flag)| *flag)
                                .collect(),
                            name: b.name.clone(),
                            granularity: b.granularity,
                        })
                        .collect()
                }),
                refcount_bits: header.refcount_bits(),
                data_file: header.data_file.clone(),
                // qemu-img prints it for every image with the data file bit, named or not.
                data_file_raw: header.has_data_file().then(|| header.data_file_raw()),
                corrupt: v3
                    .then_some(header.incompatible_features & lib::header::INCOMPAT_CORRUPT != 0),
                extended_l2: v3.then_some(header.extended_l2()),
            },
        }),
        full_backing_filename: full_backing,
        backing_filename: header.backing_file.clone(),
        dirty_flag: header.incompatible_features & lib::header::INCOMPAT_DIRTY != 0,
        file_length,
    })
}

fn print_human_info(info: &ImageInfo) {
    println!("image: {}", info.filename);
    println!("file format: {}", info.format);
    println!(
        "virtual size: {} ({} bytes)",
        human_size(info.virtual_size),
        info.virtual_size
    );
    if let Some(actual) = info.actual_size {
        println!("disk size: {}", human_size(actual));
    }
    if let Some(cluster_size) = info.cluster_size {
        println!("cluster_size: {cluster_size}");
    }
    if let Some(backing) = &info.backing_filename {
        match &info.full_backing_filename {
            Some(full) if full != backing => {
                println!("backing file: {backing} (actual path: {full})")
            }
            _ => println!("backing file: {backing}"),
        }
    }
    if let Some(format) = &info.backing_filename_format {
        println!("backing file format: {format}");
    }
    if info.dirty_flag {
        println!("cleanly shut down: no");
    }
    if !info.snapshots.is_empty() {
        println!("Snapshot list:");
        println!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
        for s in &info.snapshots {
            let clock_nsec = s.vm_clock_sec * 1_000_000_000 + s.vm_clock_nsec;
            println!(
                "{}",
                crate::snapshot_cmd::format_row(
                    &s.id,
                    &s.name,
                    s.vm_state_size,
                    s.date_sec,
                    clock_nsec,
                    s.icount
                )
            );
        }
    }
    if let Some(specific) = &info.format_specific {
        let d = &specific.data;
        println!("Format specific information:");
        println!("    compat: {}", d.compat);
        println!("    compression type: {}", d.compression_type);
        if let Some(lazy) = d.lazy_refcounts {
            println!("    lazy refcounts: {lazy}");
        }
        if let Some(bitmaps) = &d.bitmaps {
            println!("    bitmaps:");
            for (i, bitmap) in bitmaps.iter().enumerate() {
                println!("        [{i}]:");
                println!("            flags:");
                for (j, flag) in bitmap.flags.iter().enumerate() {
                    println!("                [{j}]: {flag}");
                }
                println!("            name: {}", bitmap.name);
                println!("            granularity: {}", bitmap.granularity);
            }
        }
        println!("    refcount bits: {}", d.refcount_bits);
        if let Some(data_file) = &d.data_file {
            println!("    data file: {data_file}");
        }
        if let Some(raw) = d.data_file_raw {
            println!("    data file raw: {raw}");
        }
        if let Some(corrupt) = d.corrupt {
            println!("    corrupt: {corrupt}");
        }
        if let Some(ext) = d.extended_l2 {
            println!("    extended l2: {ext}");
        }
    }
    println!("Child node '/file':");
    println!("    filename: {}", info.filename);
    println!("    protocol type: file");
    println!(
        "    file length: {} ({} bytes)",
        human_size(info.file_length),
        info.file_length
    );
    if let Some(actual) = info.actual_size {
        println!("    disk size: {}", human_size(actual));
    }
}

pub fn run(args: &[String]) -> Result<u8, Fail> {
    let Some(parsed) = crate::dropin::parse_args(args, SPECS, USAGE)? else {
        return Ok(0);
    };
    let json = parse_output(&parsed)?;
    let spec = image_operand(&parsed)?;
    let chain = if parsed.has("backing-chain") {
        backing_chain(&spec)?
    } else {
        vec![image_info(&spec)?]
    };
    let json_failed = |e: anyhow::Error| Fail::Report(e.to_string());
    match (json, parsed.has("backing-chain")) {
        (true, true) => println!("{}", to_json(&chain).map_err(json_failed)?),
        (true, false) => println!("{}", to_json(&chain[0]).map_err(json_failed)?),
        (false, _) => {
            for (i, info) in chain.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_human_info(info);
            }
        }
    }
    Ok(0)
}

/// The image and every backing file below it; a chain that comes back to an image already in it
/// is refused before anything is printed, as qemu-img does.
fn backing_chain(spec: &ImageSpec) -> Result<Vec<ImageInfo>, Fail> {
    let mut chain = vec![image_info(spec)?];
    let mut seen: HashSet<PathBuf> = HashSet::new();
    if let Ok(canonical) = std::fs::canonicalize(&spec.path) {
        seen.insert(canonical);
    }
    while let Some(full) = chain.last().and_then(|i| i.full_backing_filename.clone()) {
        if spec.no_backing && chain.len() == 1 {
            break;
        }
        if let Ok(canonical) = std::fs::canonicalize(&full) {
            if !seen.insert(canonical) {
                return Err(Fail::Report(format!(
                    "Backing file '{full}' creates an infinite loop."
                )));
            }
        }
        let format = chain.last().and_then(|i| i.backing_filename_format.clone());
        let next = ImageSpec {
            arg: full.clone(),
            path: PathBuf::from(&full),
            format,
            no_backing: false,
            data_file: None,
        };
        chain.push(image_info(&next)?);
    }
    Ok(chain)
}

/// `YYYY-MM-DD HH:MM:SS` in UTC (qemu-img prints local time; these machines run in UTC).
pub(crate) fn utc_date(epoch_secs: u64) -> String {
    let days = (epoch_secs / 86_400) as i64;
    let secs = epoch_secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc_date;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_date(1_795_970_054), "2026-11-29 16:34:14");
    }
}
