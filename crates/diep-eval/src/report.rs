//! Retention tables (pruned relative to base) and SVG figures.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The metrics of one model, as `cargo xtask eval --json` writes them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Metrics {
    /// Perplexity per input file name.
    pub perplexity: BTreeMap<String, f64>,
    /// Multiple-choice scores per task name.
    pub tasks: BTreeMap<String, TaskMetric>,
}

/// A task's accuracies.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TaskMetric {
    /// Accuracy.
    pub acc: f64,
    /// Length-normalised accuracy.
    pub acc_norm: f64,
    /// Number of documents.
    pub n: usize,
}

/// One row of a retention table.
#[derive(Debug, Clone, Serialize)]
pub struct RetentionRow {
    /// `perplexity`, `acc` or `acc_norm`.
    pub metric: String,
    /// The file or task the metric is about.
    pub input: String,
    /// The base model's value.
    pub base: f64,
    /// The pruned model's value.
    pub pruned: f64,
    /// `pruned / base`.
    pub ratio: f64,
    /// The fraction of quality kept: `pruned / base` for accuracies, `base / pruned` for
    /// perplexity (lower is better), so 1 means no loss for every metric.
    pub retention: f64,
    /// Whether a higher value of the metric is better.
    pub higher_is_better: bool,
}

/// The retention table of every metric both models have, perplexities first.
pub fn retention_table(base: &Metrics, pruned: &Metrics) -> Vec<RetentionRow> {
    let mut rows = Vec::new();
    for (file, b) in &base.perplexity {
        if let Some(p) = pruned.perplexity.get(file) {
            rows.push(RetentionRow {
                metric: "perplexity".into(),
                input: file.clone(),
                base: *b,
                pruned: *p,
                ratio: p / b,
                retention: b / p,
                higher_is_better: false,
            });
        }
    }
    for (task, b) in &base.tasks {
        if let Some(p) = pruned.tasks.get(task) {
            for (metric, bv, pv) in [("acc", b.acc, p.acc), ("acc_norm", b.acc_norm, p.acc_norm)] {
                rows.push(RetentionRow {
                    metric: metric.into(),
                    input: task.clone(),
                    base: bv,
                    pruned: pv,
                    ratio: pv / bv,
                    retention: pv / bv,
                    higher_is_better: true,
                });
            }
        }
    }
    rows
}

/// The mean retention over all rows (NaN-free rows only), or `None` for an empty table.
pub fn mean_retention(rows: &[RetentionRow]) -> Option<f64> {
    let v: Vec<f64> = rows.iter().map(|r| r.retention).filter(|x| x.is_finite()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The retention table as Markdown.
pub fn retention_markdown(rows: &[RetentionRow]) -> String {
    let mut s =
        String::from("| metric | input | base | pruned | pruned/base | retention |\n|---|---|---:|---:|---:|---:|\n");
    for r in rows {
        let digits = if r.metric == "perplexity" { 3 } else { 4 };
        let _ = writeln!(
            s,
            "| {} | {} | {:.digits$} | {:.digits$} | {:.4} | {:.4} |",
            r.metric, r.input, r.base, r.pruned, r.ratio, r.retention
        );
    }
    if let Some(m) = mean_retention(rows) {
        let _ = writeln!(s, "| **mean** | | | | | **{m:.4}** |");
    }
    s.push_str(
        "\nretention = pruned/base for accuracies and base/pruned for perplexity (lower is better), \
         so 1 means nothing lost.\n",
    );
    s
}

/// Horizontal bars of each row's retention, with a reference line at 1.
pub fn retention_svg(rows: &[RetentionRow], title: &str) -> String {
    let (label_w, bar_w, row_h, top) = (230.0, 360.0, 22.0, 40.0);
    let max = rows.iter().map(|r| r.retention).filter(|x| x.is_finite()).fold(1.1f64, f64::max).min(3.0);
    let width = label_w + bar_w + 70.0;
    let height = top + rows.len() as f64 * row_h + 30.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="14" font-weight="bold">{}</text>"#,
        diep_common::xml::escape(title)
    );
    for (i, r) in rows.iter().enumerate() {
        let y = top + i as f64 * row_h;
        let v = if r.retention.is_finite() { r.retention.clamp(0.0, max) } else { 0.0 };
        let w = v / max * bar_w;
        let color = if r.metric == "perplexity" {
            "#4c78a8"
        } else if r.metric == "acc" {
            "#f58518"
        } else {
            "#54a24b"
        };
        let _ = write!(
            s,
            r#"<text x="{:.0}" y="{:.1}" text-anchor="end">{} {}</text><rect x="{label_w}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}">{:.3}</text>"#,
            label_w - 6.0,
            y + row_h * 0.7,
            diep_common::xml::escape(&r.metric),
            diep_common::xml::escape(&r.input),
            y + 3.0,
            row_h - 6.0,
            label_w + w + 4.0,
            y + row_h * 0.7,
            r.retention
        );
    }
    let x1 = label_w + bar_w / max;
    let _ = write!(
        s,
        r##"<line x1="{x1:.1}" y1="{:.0}" x2="{x1:.1}" y2="{:.0}" stroke="#333" stroke-dasharray="4 3"/><text x="{x1:.1}" y="{:.0}" text-anchor="middle">1.0</text></svg>"##,
        top - 4.0,
        height - 24.0,
        height - 10.0
    );
    s.push('\n');
    s
}

/// A layers × experts grid: kept experts dark, removed ones light, the kept count at the
/// right of each row. `layers` holds `(layer index, original expert count, kept ids)`.
pub fn kept_heatmap_svg(layers: &[(usize, usize, Vec<usize>)], title: &str) -> String {
    let max_e = layers.iter().map(|l| l.1).max().unwrap_or(1);
    let cell = (560.0 / max_e as f64).clamp(3.0, 28.0);
    let (left, top) = (70.0, 44.0);
    let width = left + cell * max_e as f64 + 90.0;
    let height = top + cell * layers.len() as f64 + 34.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="14" font-weight="bold">{}</text>"#,
        diep_common::xml::escape(title)
    );
    for (row, (layer, n, kept)) in layers.iter().enumerate() {
        let y = top + row as f64 * cell;
        let _ = write!(
            s,
            r#"<text x="{:.0}" y="{:.1}" text-anchor="end">layer {layer}</text>"#,
            left - 6.0,
            y + cell * 0.5 + 4.0
        );
        for e in 0..*n {
            let fill = if kept.contains(&e) { "#2a6f97" } else { "#e6e6e6" };
            let _ = write!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{fill}" stroke="white" stroke-width="1"><title>layer {layer} expert {e}: {}</title></rect>"#,
                left + e as f64 * cell,
                cell,
                cell,
                if kept.contains(&e) { "kept" } else { "removed" }
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}/{n}</text>"#,
            left + cell * max_e as f64 + 8.0,
            y + cell * 0.5 + 4.0,
            kept.len()
        );
    }
    let _ = write!(
        s,
        r#"<text x="{left}" y="{:.0}">expert id (dark = kept)</text></svg>"#,
        top + cell * layers.len() as f64 + 22.0
    );
    s.push('\n');
    s
}
