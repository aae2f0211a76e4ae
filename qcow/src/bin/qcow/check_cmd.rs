//! `check`: qemu-img check's counters, messages, JSON and exit codes.

use qcow as lib;
use serde::Serialize;

use crate::getopt::{OptSpec, FORCE_SHARE, FORMAT, HELP, IMAGE_OPTS, OBJECT, OUTPUT, QUIET};
use crate::image_arg::{self, ImageSpec};
use crate::map_cmd::{image_operand, parse_output};
use crate::prog::Fail;
use crate::progress::{catch_interrupts, CliMonitor};
use crate::to_json;
use lib::{CheckReport, Format, Image, OpenOptions, Repair};

const SPECS: &[OptSpec] = &[
    HELP,
    FORMAT,
    OUTPUT,
    OptSpec::value(Some('r'), &["repair"], "repair"),
    OptSpec::value(Some('T'), &["cache"], "cache"),
    OBJECT,
    IMAGE_OPTS,
    FORCE_SHARE,
    QUIET,
];

const USAGE: &str = "Usage: qemu-img check [-f FMT | --image-opts] [-T CACHE_MODE] [-r leaks|all]
        [--output human|json] [--object OBJDEF] [-q] [-U] FILENAME";

pub fn run(args: &[String]) -> Result<u8, Fail> {
    let Some(parsed) = crate::dropin::parse_args(args, SPECS, USAGE)? else {
        return Ok(0);
    };
    let json = parse_output(&parsed)?;
    let repair = match parsed.last("repair") {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(other) => {
            return Err(Fail::Usage(format!(
                "--repair (-r) expects 'leaks' or 'all' not '{other}'"
            )))
        }
    };
    if let Some(cache) = parsed.last("cache") {
        if crate::disk::CacheMode::parse(cache).is_err() {
            return Err(Fail::Report(format!(
                "Invalid source cache option: {cache}"
            )));
        }
    }
    let spec = image_operand(&parsed)?;
    if parsed.has("force-share") && repair != Repair::None {
        return Err(Fail::Report(format!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            spec.arg
        )));
    }
    check(&spec, repair, json, parsed.has("quiet"))
}

#[derive(Serialize)]
/// Field order follows qemu-img's output (its dictionary's hash order).
struct CheckJson<'a> {
    #[serde(rename = "image-end-offset", skip_serializing_if = "is_zero")]
    image_end_offset: u64,
    #[serde(rename = "compressed-clusters", skip_serializing_if = "is_zero")]
    compressed_clusters: u64,
    #[serde(rename = "total-clusters", skip_serializing_if = "is_zero")]
    total_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions: u64,
    #[serde(rename = "corruptions-fixed", skip_serializing_if = "is_zero")]
    corruptions_fixed: u64,
    #[serde(rename = "check-errors")]
    check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks: u64,
    #[serde(rename = "leaks-fixed", skip_serializing_if = "is_zero")]
    leaks_fixed: u64,
    #[serde(rename = "allocated-clusters", skip_serializing_if = "is_zero")]
    allocated_clusters: u64,
    filename: &'a str,
    format: &'a str,
    #[serde(rename = "fragmented-clusters", skip_serializing_if = "is_zero")]
    fragmented_clusters: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn check(spec: &ImageSpec, repair: Repair, json: bool, quiet: bool) -> Result<u8, Fail> {
    let name = spec.filename();
    if image_arg::resolve_format(spec)? != Format::Qcow2 {
        eprintln!(
            "{}: This image format does not support checks",
            crate::prog::name()
        );
        return Ok(63);
    }
    let options = OpenOptions {
        read_only: repair == Repair::None,
        check_mode: true,
        no_backing: true,
        data_file: spec.data_file.clone(),
        ..OpenOptions::default()
    };
    let mut image = Image::open(&spec.path, &options)
        .map_err(|e| Fail::Report(image_arg::open_error_text(&spec.arg, &e)))?;
    // A progress bar on a terminal (never with -q or JSON output); Ctrl-C stops a plain check,
    // while a repair runs to its end.
    let mut monitor = CliMonitor::new(false, quiet || json);
    if repair == Repair::None {
        catch_interrupts();
    }
    let result = lib::check_monitored(&mut image, repair, &mut monitor);
    monitor.finish();
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("{}: Check failed: {e}", crate::prog::name());
            return Ok(1);
        }
    };
    for message in &report.messages {
        match message.strip_prefix(lib::check::PROGRAM) {
            Some(text) => eprintln!("{}: {text}", crate::prog::name()),
            None => eprintln!("{message}"),
        }
    }
    if let Some(reason) = report.failed {
        // The check itself failed: no results, like qemu-img.
        eprintln!("{}: Check failed: {reason}", crate::prog::name());
        return Ok(1);
    }
    if report.repaired && !json && !quiet {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            report.leaks_fixed, report.corruptions_fixed
        );
    }
    match (json, quiet) {
        (_, true) => {}
        (true, false) => {
            let json = CheckJson {
                image_end_offset: report.image_end_offset,
                total_clusters: report.total_clusters,
                check_errors: report.check_errors,
                leaks: report.leaks,
                corruptions: report.corruptions,
                leaks_fixed: report.leaks_fixed,
                corruptions_fixed: report.corruptions_fixed,
                allocated_clusters: report.allocated_clusters,
                fragmented_clusters: report.fragmented_clusters,
                compressed_clusters: report.compressed_clusters,
                filename: &name,
                format: "qcow2",
            };
            println!(
                "{}",
                to_json(&json).map_err(|e| Fail::Report(e.to_string()))?
            );
        }
        (false, false) => print_human_check(&report),
    }
    if report.check_errors > 0 {
        eprintln!("{}: Check failed", crate::prog::name());
        return Ok(1);
    }
    Ok(check_exit_code(&report))
}

fn check_exit_code(report: &CheckReport) -> u8 {
    if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    }
}

fn print_human_check(report: &CheckReport) {
    if report.is_clean() {
        println!("No errors were found on the image.");
    } else {
        if report.corruptions > 0 {
            println!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                report.corruptions
            );
        }
        if report.leaks > 0 {
            println!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                report.leaks
            );
        }
        if report.check_errors > 0 {
            println!(
                "\n{} internal errors have occurred during the check.",
                report.check_errors
            );
        }
    }
    if report.total_clusters > 0 && report.allocated_clusters > 0 {
        let allocated = report.allocated_clusters as f64;
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            report.allocated_clusters,
            report.total_clusters,
            allocated * 100.0 / report.total_clusters as f64,
            report.fragmented_clusters as f64 * 100.0 / allocated,
            report.compressed_clusters as f64 * 100.0 / allocated
        );
    }
    if report.image_end_offset > 0 {
        println!("Image end offset: {}", report.image_end_offset);
    }
}
