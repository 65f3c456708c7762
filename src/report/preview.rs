//! Printing `peftpipe preview`: rendered rows with the prompt/completion boundary visible
//! (`⟦PROMPT⟧ … ⟦COMPLETION⟧ …`), or the columns of ingested rows; `--json` prints the data.
//! Also the `bench data` figures (the data benchmark belongs to the same owner). Output goes
//! through [`super::write_stdout_raw`] (never panics on a closed pipe).

use std::fmt::Write as _;

use crate::data::preview::{Preview, PreviewSource};

/// Print a preview (human form, or JSON on stdout with `json`).
pub fn print_preview(preview: &Preview, json: bool) {
    if json {
        super::json(preview);
        return;
    }
    let source = match &preview.source {
        PreviewSource::Cache => "fresh, read from the cache".to_string(),
        PreviewSource::Ran { stages } => format!(
            "ran {} first (stale), stored in the cache",
            stages.join(", ")
        ),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "stage {} ({}), split {}: {} of {} row(s) — {source}",
        preview.stage,
        preview.kind,
        preview.split,
        preview.rows.len(),
        preview.split_rows,
    );
    for row in &preview.rows {
        let _ = writeln!(out, "── row {} ──", row.index);
        if let (Some(prompt), Some(completion)) = (&row.prompt, &row.completion) {
            let _ = writeln!(out, "⟦PROMPT⟧{prompt}⟦COMPLETION⟧{completion}⟦END⟧");
        }
        for (name, value) in &row.columns {
            let _ = writeln!(out, "  {name}: {value}");
        }
    }
    super::write_stdout_raw(&out);
}

/// Print the `bench data` figures.
pub fn print_bench_data(report: &crate::data::bench::BenchReport, json: bool) {
    if json {
        super::json(report);
        return;
    }
    let mib = |kb: u64| kb as f64 / 1024.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bench data: {} rows, input {:.1} MB (snappy Parquet)",
        report.rows,
        report.input_bytes as f64 / 1e6
    );
    let ours = &report.ours;
    let _ = writeln!(
        out,
        "  peftpipe  ingest+template {:>8.2} s  {:.0} rows/s  (ingest {:.2} s, template {:.2} s)  peak RSS {:.0} MiB (after ingest {:.0} MiB)  kept {} of {} rows",
        ours.wall_s,
        ours.rows_per_second(),
        ours.ingest_s,
        ours.template_s,
        mib(ours.peak_rss_kb),
        mib(ours.ingest_peak_rss_kb),
        ours.rows_kept,
        ours.rows_read
    );
    match (&report.python, &report.python_skipped) {
        (Some(python), _) => {
            let _ = writeln!(
        out,
            "  python    pyarrow+jinja2  {:>8.2} s  {:.0} rows/s  peak RSS {:.0} MiB  kept {} rows",
            python.wall_s,
            report.rows as f64 / python.wall_s.max(f64::MIN_POSITIVE),
            mib(python.max_rss_kb),
            python.rows_kept
            );
        }
        (None, Some(reason)) => {
            let _ = writeln!(out, "  python    skipped: {reason}");
        }
        (None, None) => {}
    }
    if let Some(speedup) = report.speedup {
        let _ = writeln!(out, "  speedup   {speedup:.1}× (goal ≥ 5×)");
    }
    if let Some(large) = &report.large {
        let growth = if ours.peak_rss_kb > 0 {
            format!(
                " ({:+.0}%)",
                (large.ours.peak_rss_kb as f64 / ours.peak_rss_kb as f64 - 1.0) * 100.0
            )
        } else {
            String::new()
        };
        let _ = writeln!(
        out,
            "  memory    peftpipe peak RSS {:.0} MiB at {} rows vs {:.0} MiB at {} rows{growth} ({:.2} s, {:.0} rows/s)",
            mib(ours.peak_rss_kb),
            report.rows,
            mib(large.ours.peak_rss_kb),
            large.rows,
            large.ours.wall_s,
            large.ours.rows_per_second()
        );
        if let (Some(python), Some(large_python)) = (&report.python, &large.python) {
            let _ = writeln!(
        out,
                "            python peak RSS {:.0} MiB at {} rows vs {:.0} MiB at {} rows ({:.2} s)",
                mib(python.max_rss_kb),
                report.rows,
                mib(large_python.max_rss_kb),
                large.rows,
                large_python.wall_s
            );
        }
    }
    let _ = writeln!(out, "  command   {}", report.command);
    super::write_stdout_raw(&out);
}
