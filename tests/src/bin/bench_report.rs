//! Gathers the runs the benchmark programs saved in `target/bench/` into one
//! `target/bench/report.md` (their tables, checks and SVG plots). `make bench` runs it last.

use anyhow::{ensure, Context, Result};
use cowvm_tests::report::{load_all, out_dir};

fn main() -> Result<()> {
    let reports = load_all()?;
    ensure!(
        !reports.is_empty(),
        "no saved benchmark runs in {}: run the bench_* programs first (make bench)",
        out_dir().display()
    );
    let mut md = String::from(
        "# cowvm benchmark report\n\nEach section was written by one benchmark program (its \
         command is given); every figure is measured against a peer in the same run, so the \
         ratios matter more than the absolute values on a shared machine.\n\n",
    );
    for report in &reports {
        md.push_str(&format!(
            "- [{}](#{})\n",
            report.title,
            anchor(&report.title)
        ));
    }
    md.push('\n');
    for report in &reports {
        md.push_str(&report.markdown(2));
    }
    let path = out_dir().join("report.md");
    std::fs::write(&path, md).with_context(|| format!("write {}", path.display()))?;
    println!(
        "wrote {} ({} benchmark programs)",
        path.display(),
        reports.len()
    );
    Ok(())
}

/// GitHub's heading anchor: lower case, spaces to dashes, most punctuation dropped.
fn anchor(title: &str) -> String {
    title
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}
