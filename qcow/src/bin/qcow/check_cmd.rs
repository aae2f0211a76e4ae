//! `qcow check`: qemu-img check's counters, messages, JSON and exit codes.

use std::path::Path;

use anyhow::Result;
use qcow as lib;
use serde::Serialize;

use crate::disk::probe;
use crate::progress::{catch_interrupts, CliMonitor};
use crate::{to_json, Output, RepairArg};
use lib::{CheckReport, Image, OpenOptions, Repair};

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

pub fn check(
    format: Option<&str>,
    repair: Option<RepairArg>,
    output: Output,
    quiet: bool,
    file: &Path,
) -> Result<u8> {
    let name = file.display().to_string();
    let format = match format {
        Some(f) => f.to_string(),
        None => probe(file)?,
    };
    if format != "qcow2" {
        println!("This image format does not support checks");
        return Ok(63);
    }
    let repair = match repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    let options = OpenOptions {
        read_only: repair == Repair::None,
        check_mode: true,
        no_backing: true,
        ..OpenOptions::default()
    };
    let report = match Image::open(file, &options).and_then(|mut image| {
        // A progress bar on a terminal (never with -q or JSON output); Ctrl-C stops a
        // plain check, while a repair runs to its end.
        let mut monitor = CliMonitor::new(false, quiet || output == Output::Json);
        if repair == Repair::None {
            catch_interrupts();
        }
        let report = lib::check_monitored(&mut image, repair, &mut monitor);
        monitor.finish();
        report
    }) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("qcow: {name}: Check failed: {e}");
            return Ok(1);
        }
    };
    for message in &report.messages {
        eprintln!("{message}");
    }
    if (report.leaks_fixed > 0 || report.corruptions_fixed > 0) && output == Output::Human && !quiet
    {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            report.leaks_fixed, report.corruptions_fixed
        );
    }
    match output {
        Output::Json => {
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
            println!("{}", to_json(&json)?);
        }
        Output::Human if !quiet => print_human_check(&report),
        Output::Human => {}
    }
    Ok(check_exit_code(&report))
}

fn check_exit_code(report: &CheckReport) -> u8 {
    if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else if report.check_errors > 0 {
        1
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
