//! Benchmark reports. Every bench program describes its run as a [`BenchReport`] (table rows,
//! ratio checks, context, plots) and saves it: printed as a table, written to
//! `target/bench/<name>.md` and `<name>.json`, and each plot to `<name>-<n>.svg`. `bench_report`
//! gathers the saved runs into `target/bench/report.md`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::bench_util::{workspace_root, Row};

/// Where reports go.
pub fn out_dir() -> PathBuf {
    workspace_root().join("target").join("bench")
}

/// A plot: one or more series of `(x, y)` points.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub kind: PlotKind,
    pub series: Vec<Series>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlotKind {
    Line,
    Scatter,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One benchmark program's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    /// File stem: `bench_clone` → `target/bench/bench_clone.md`.
    pub name: String,
    pub title: String,
    /// How to run it again.
    pub command: String,
    pub context: String,
    pub rows: Vec<Row>,
    /// Ratios and target verdicts: `(what, value)`.
    pub checks: Vec<(String, String)>,
    pub plots: Vec<Plot>,
}

impl BenchReport {
    /// Prints the table and writes the markdown, JSON and SVG files.
    pub fn save(&self) -> Result<PathBuf> {
        print!("{}", self.text());
        let dir = out_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        for (index, plot) in self.all_plots().iter().enumerate() {
            let path = dir.join(format!("{}-{index}.svg", self.name));
            std::fs::write(&path, render(plot)?)
                .with_context(|| format!("write {}", path.display()))?;
        }
        let json = dir.join(format!("{}.json", self.name));
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", json.display()))?;
        let md = dir.join(format!("{}.md", self.name));
        std::fs::write(&md, self.markdown(2)).with_context(|| format!("write {}", md.display()))?;
        println!("\nwrote {}", md.display());
        Ok(md)
    }

    /// The program's own plots, then one bar chart of the medians per unit; only those with
    /// something to draw (poloto needs two distinct values on each axis).
    fn all_plots(&self) -> Vec<Plot> {
        let mut plots = self.candidate_plots();
        plots.retain(drawable);
        plots
    }

    fn candidate_plots(&self) -> Vec<Plot> {
        let mut plots = self.plots.clone();
        let mut units: Vec<&str> = self.rows.iter().map(|r| r.unit.as_str()).collect();
        units.dedup();
        units.sort_unstable();
        units.dedup();
        for unit in units {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.unit == unit).collect();
            plots.push(Plot {
                title: format!("{}: medians ({unit})", self.title),
                x_label: unit.to_string(),
                y_label: String::new(),
                kind: PlotKind::Line,
                series: vec![Series {
                    name: BARS.to_string(),
                    points: rows
                        .iter()
                        .enumerate()
                        .map(|(i, r)| (r.median(), i as f64))
                        .collect(),
                }],
            });
        }
        plots
    }

    fn text(&self) -> String {
        let mut out = format!("{}\n\n", self.title);
        let _ = writeln!(
            out,
            "{:<70} {:>12} {:>12} {:>12} {:>5}  unit",
            "measurement", "median", "min", "max", "runs"
        );
        for row in &self.rows {
            let _ = writeln!(
                out,
                "{:<70} {:>12} {:>12} {:>12} {:>5}  {}",
                row.what,
                value(row.median()),
                value(row.min()),
                value(row.max()),
                row.values.len(),
                row.unit
            );
            if !row.note.is_empty() {
                let _ = writeln!(out, "    {}", row.note);
            }
            let _ = writeln!(out, "    $ {}", row.command);
        }
        out.push('\n');
        for (what, check) in &self.checks {
            let _ = writeln!(out, "{what:<70} {check}");
        }
        let _ = writeln!(out, "\n{}", self.context);
        out
    }

    /// The markdown section, headed at `level`.
    pub fn markdown(&self, level: usize) -> String {
        let hashes = "#".repeat(level);
        let mut md = format!("{hashes} {}\n\n", self.title);
        let _ = writeln!(
            md,
            "Generated by `{}`. Medians.\n\n{}\n",
            self.command, self.context
        );
        md.push_str("| Measurement | Median | Min | Max | Unit | Runs | Notes | Command |\n");
        md.push_str("|---|---:|---:|---:|---|---:|---|---|\n");
        for row in &self.rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | `{}` |",
                row.what,
                value(row.median()),
                value(row.min()),
                value(row.max()),
                row.unit,
                row.values.len(),
                row.note,
                row.command
            );
        }
        if !self.checks.is_empty() {
            md.push_str("\n| Ratio / check | Value |\n|---|---|\n");
            for (what, check) in &self.checks {
                let _ = writeln!(md, "| {what} | {check} |");
            }
        }
        md.push('\n');
        for index in 0..self.all_plots().len() {
            let _ = writeln!(md, "![plot {index}]({}-{index}.svg)\n", self.name);
        }
        md
    }
}

/// Whether the plot has at least two distinct values on each axis.
fn drawable(plot: &Plot) -> bool {
    let points = || plot.series.iter().flat_map(|s| s.points.iter());
    let distinct = |values: Vec<f64>| {
        values
            .iter()
            .any(|v| v.is_finite() && values.iter().any(|w| w.is_finite() && w != v))
    };
    distinct(points().map(|p| p.0).collect()) && distinct(points().map(|p| p.1).collect())
}

/// The series name that makes a plot a horizontal bar chart (one bar per point, labelled with
/// the rows' names by the y coordinate).
const BARS: &str = "medians";

fn value(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// The SVG of `plot`.
pub fn render(plot: &Plot) -> Result<String> {
    let header = poloto::header().light_theme();
    let labels = (
        plot.title.as_str(),
        plot.x_label.as_str(),
        plot.y_label.as_str(),
    );
    if plot.series.len() == 1 && plot.series[0].name == BARS {
        // Medians as bars, each labelled by its index (the table's row order).
        let bars = plot.series[0]
            .points
            .iter()
            .map(|&(x, i)| (x, format!("row {}", i as usize + 1)));
        return poloto::build::bar::gen_simple("", bars, [0.0])
            .label(labels)
            .append_to(header)
            .render_string()
            .map_err(|e| anyhow::anyhow!("render {}: {e}", plot.title));
    }
    let plots: Vec<_> = plot
        .series
        .iter()
        .map(|series| {
            let builder = poloto::build::plot(series.name.clone());
            let points = series.points.iter().map(|&(x, y)| [x, y]);
            match plot.kind {
                PlotKind::Line => builder.line(points.collect::<Vec<_>>()),
                PlotKind::Scatter => builder.scatter(points.collect::<Vec<_>>()),
            }
        })
        .collect();
    poloto::frame_build()
        .data(plots)
        .build_and_label(labels)
        .append_to(header)
        .render_string()
        .map_err(|e| anyhow::anyhow!("render {}: {e}", plot.title))
}

/// Reads every saved report in [`out_dir`], in name order.
pub fn load_all() -> Result<Vec<BenchReport>> {
    let mut reports = Vec::new();
    let dir = out_dir();
    let entries = std::fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let bytes = std::fs::read(&path)?;
            reports.push(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not a bench report", path.display()))?,
            );
        }
    }
    reports.sort_by(|a: &BenchReport, b| a.name.cmp(&b.name));
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_render_as_svg() {
        let line = Plot {
            title: "latency".into(),
            x_label: "percentile".into(),
            y_label: "ms".into(),
            kind: PlotKind::Line,
            series: vec![
                Series {
                    name: "pool".into(),
                    points: vec![(0.0, 0.5), (50.0, 0.7), (99.0, 1.5)],
                },
                Series {
                    name: "restore".into(),
                    points: vec![(0.0, 3.0), (99.0, 9.0)],
                },
            ],
        };
        let svg = render(&line).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("restore"), "{svg}");
        let report = BenchReport {
            name: "t".into(),
            title: "T".into(),
            command: "cmd".into(),
            context: String::new(),
            rows: vec![
                Row::new("a", "ms", vec![1.0, 3.0], "x"),
                Row::new("b", "ms", vec![5.0], "y"),
                Row::new("c", "MiB", vec![5.0], "z"),
            ],
            checks: vec![],
            plots: vec![line],
        };
        // The line plot and the ms bars; one MiB row makes no chart.
        let bars = report.all_plots();
        assert_eq!(bars.len(), 2);
        assert!(render(&bars[1]).unwrap().contains("row 1"));
        assert!(report.markdown(2).contains("| a | 2 | 1 | 3 | ms | 2 |"));
    }
}
