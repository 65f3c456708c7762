//! `peftpipe bench data`: generate a synthetic review Parquet of N rows, then run ingest +
//! template over it exactly as a pipeline would (not-null and length filters, dedup on text,
//! stratified 90/10 split, a prompt/completion template with the label carried). The measured run
//! happens in a child process (`peftpipe bench data --child DIR`) so its peak RSS (VmHWM) is its
//! own; the Python reference (benches/data_reference.py, pyarrow + jinja2) does the same work.
//! Returns figures; printing is the reporter's.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::artifact::ParquetSink;
use super::source::BATCH_ROWS;
use super::synthetic::{bench_batch, review_schema};
use crate::config::{IngestConfig, StageConfig, TemplateConfig};
use crate::stages::{self, NullSink, RunOptions, StageContext, StageError};

/// Seed of the generated benchmark data.
pub const BENCH_SEED: u64 = 99;

/// Write `rows` generated rows to `path`; returns the file size in bytes.
pub fn generate_input(path: &Path, rows: u64) -> Result<u64, StageError> {
    let mut sink = ParquetSink::create(path, review_schema(), true)?;
    let mut written = 0u64;
    let mut batch_index = 0u64;
    while written < rows {
        let count = (rows - written).min(BATCH_ROWS as u64) as usize;
        sink.write(&bench_batch(BENCH_SEED, batch_index, count)?)?;
        written += count as u64;
        batch_index += 1;
    }
    sink.finish()?;
    Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
}

/// What one measured run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunFigures {
    pub wall_s: f64,
    pub ingest_s: f64,
    pub template_s: f64,
    /// Peak resident set size of the process (VmHWM), KiB.
    pub peak_rss_kb: u64,
    /// Peak resident set size when ingest had finished (before template), KiB.
    pub ingest_peak_rss_kb: u64,
    pub rows_read: u64,
    pub rows_kept: u64,
}

fn ingest_config() -> Result<IngestConfig, StageError> {
    serde_json::from_value(serde_json::json!({
        "path": "input.parquet",
        "filters": [{"not_null": "text"}, {"length": {"column": "text", "min": 1}}],
        "drop_nulls": true,
        "dedup": ["text"],
        "split": {"fractions": {"train": 0.9, "eval": 0.1}, "stratify_by": "label"}
    }))
    .map_err(|e| StageError::Internal(e.to_string()))
}

fn template_config() -> Result<TemplateConfig, StageError> {
    serde_json::from_value(serde_json::json!({
        "input": "data",
        "prompt": "review: {{ text }}\nsentiment:",
        "completion": " {{ label }}",
        "label": "label"
    }))
    .map_err(|e| StageError::Internal(e.to_string()))
}

/// Peak RSS of this process (VmHWM from /proc/self/status), KiB; 0 where unavailable.
pub fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The measured work (run in the child): ingest + template on `dir/input.parquet`.
pub fn run_pipeline(dir: &Path) -> Result<RunFigures, StageError> {
    let cancel = AtomicBool::new(false);
    let options = RunOptions::default();
    let data_dir = dir.join("data");
    let prompts_dir = dir.join("prompts");
    for out in [&data_dir, &prompts_dir] {
        if out.exists() {
            std::fs::remove_dir_all(out)?;
        }
        std::fs::create_dir_all(out)?;
    }
    let start = Instant::now();
    let none = BTreeMap::new();
    let ingest = stages::build(&StageConfig::Ingest(ingest_config()?));
    let outcome = ingest.run(&StageContext {
        name: "data",
        project_dir: dir,
        out_dir: &data_dir,
        upstream: &none,
        seed: 1,
        progress: &NullSink,
        cancel: &cancel,
        options: &options,
        fingerprint: "",
        upstream_outcomes: &Default::default(),
        inputs: &Default::default(),
        checkpoint_dir: None,
        resume: true,
    })?;
    let ingest_s = start.elapsed().as_secs_f64();
    let ingest_peak_rss_kb = peak_rss_kb();
    let upstream = [("data".to_string(), data_dir.clone())].into();
    let template = stages::build(&StageConfig::Template(template_config()?));
    template.run(&StageContext {
        name: "prompts",
        project_dir: dir,
        out_dir: &prompts_dir,
        upstream: &upstream,
        seed: 1,
        progress: &NullSink,
        cancel: &cancel,
        options: &options,
        fingerprint: "",
        upstream_outcomes: &Default::default(),
        inputs: &Default::default(),
        checkpoint_dir: None,
        resume: true,
    })?;
    let wall_s = start.elapsed().as_secs_f64();
    let number = |key: &str| {
        outcome
            .summary
            .get(key)
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    };
    Ok(RunFigures {
        wall_s,
        ingest_s,
        template_s: wall_s - ingest_s,
        peak_rss_kb: peak_rss_kb(),
        ingest_peak_rss_kb,
        rows_read: number("rows_read"),
        rows_kept: number("rows_kept"),
    })
}

/// The Python reference's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PythonFigures {
    pub wall_s: f64,
    pub max_rss_kb: u64,
    pub rows_kept: u64,
}

/// The runs at the larger row count.
#[derive(Debug, Clone, Serialize)]
pub struct LargeRun {
    pub rows: u64,
    pub ours: RunFigures,
    /// The Python reference at this size (when requested and it succeeded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonFigures>,
}

impl RunFigures {
    /// Input rows per second of wall time.
    pub fn rows_per_second(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.rows_read as f64 / self.wall_s
        } else {
            0.0
        }
    }
}

/// Everything `bench data` reports.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub rows: u64,
    pub input_bytes: u64,
    pub ours: RunFigures,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonFigures>,
    /// Python wall time / ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speedup: Option<f64>,
    /// Why the Python reference did not run, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python_skipped: Option<String>,
    /// The runs at a larger row count, for the flat-memory check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub large: Option<LargeRun>,
    pub command: String,
}
