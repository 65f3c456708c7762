//! `peftpipe bench data --rows 1000000 [--python] [--large-rows N]`: generate a synthetic review
//! Parquet in a temp dir, run ingest + template over it in a child process (wall time, rows/s,
//! peak RSS), optionally the Python reference (benches/data_reference.py: pyarrow + jinja2) on the
//! same file, and a second run at `--large-rows` (default 4 × `--rows`; the Python reference too
//! with `--python`) to show whether memory stays flat. The interpreter is `$PEFTPIPE_PYTHON`, or
//! `python3` on the PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;

use super::{GlobalArgs, EXIT_FAILED, EXIT_OK};
use crate::data::bench::{self, BenchReport, LargeRun, PythonFigures, RunFigures};

#[derive(Debug, Args)]
pub struct BenchDataArgs {
    /// Rows of generated input (about 200 bytes of text each).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rows: u64,
    /// Also run the Python reference (needs python3 with pyarrow and jinja2).
    #[arg(long)]
    pub python: bool,
    /// Rows of a second, larger run for the peak-RSS comparison (default: 4 × --rows; 0: skip).
    #[arg(long)]
    pub large_rows: Option<u64>,
    /// Internal: run the measured work in DIR and write DIR/figures.json.
    #[arg(long, hide = true, value_name = "DIR")]
    pub child: Option<PathBuf>,
    /// Write the generated input to DIR/input.parquet and stop (to profile `--child DIR` by hand).
    #[arg(long, value_name = "DIR", conflicts_with = "child")]
    pub generate: Option<PathBuf>,
}

fn child_run(dir: &Path) -> Result<(), String> {
    let figures = bench::run_pipeline(dir).map_err(|e| e.to_string())?;
    let text = serde_json::to_string(&figures).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("figures.json"), text).map_err(|e| e.to_string())
}

fn measure(dir: &Path) -> Result<RunFigures, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let status = Command::new(exe)
        .args(["bench", "data", "--child"])
        .arg(dir)
        .status()
        .map_err(|e| format!("cannot start the measured run: {e}"))?;
    if !status.success() {
        return Err(format!("the measured run failed ({status})"));
    }
    let text = std::fs::read_to_string(dir.join("figures.json")).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// Environment variable naming the Python interpreter of the reference run.
pub const PYTHON_ENV: &str = "PEFTPIPE_PYTHON";

fn python_reference(dir: &Path) -> Result<PythonFigures, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/data_reference.py");
    let python = std::env::var_os(PYTHON_ENV).unwrap_or_else(|| "python3".into());
    let output = Command::new(&python)
        .arg(&script)
        .arg(dir.join("input.parquet"))
        .arg(dir.join("python-out"))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.to_string_lossy()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("unexpected output {line:?}: {e}"))
}

fn bench_all(args: &BenchDataArgs) -> Result<BenchReport, String> {
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = scratch.path().join("main");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    crate::report::write_stderr(&format!("generating {} rows …", args.rows));
    let input_bytes =
        bench::generate_input(&dir.join("input.parquet"), args.rows).map_err(|e| e.to_string())?;
    crate::report::write_stderr("running ingest + template (peftpipe) …");
    let ours = measure(&dir)?;
    let (python, python_skipped) = if args.python {
        crate::report::write_stderr("running the Python reference (pyarrow + jinja2) …");
        match python_reference(&dir) {
            Ok(figures) => (Some(figures), None),
            Err(reason) => (None, Some(reason)),
        }
    } else {
        (None, Some("not requested (--python)".to_string()))
    };
    let speedup = python.as_ref().map(|p| p.wall_s / ours.wall_s);
    std::fs::remove_dir_all(&dir).ok();
    let large_rows = args.large_rows.unwrap_or(args.rows.saturating_mul(4));
    let large = if large_rows > 0 {
        let large_dir = scratch.path().join("large");
        std::fs::create_dir_all(&large_dir).map_err(|e| e.to_string())?;
        crate::report::write_stderr(&format!(
            "generating {large_rows} rows for the memory check …"
        ));
        bench::generate_input(&large_dir.join("input.parquet"), large_rows)
            .map_err(|e| e.to_string())?;
        crate::report::write_stderr("running ingest + template (peftpipe) …");
        let ours = measure(&large_dir)?;
        let python = if python.is_some() {
            crate::report::write_stderr("running the Python reference (pyarrow + jinja2) …");
            python_reference(&large_dir).ok()
        } else {
            None
        };
        Some(LargeRun {
            rows: large_rows,
            ours,
            python,
        })
    } else {
        None
    };
    Ok(BenchReport {
        rows: args.rows,
        input_bytes,
        ours,
        python,
        speedup,
        python_skipped,
        large,
        command: format!(
            "peftpipe bench data --rows {}{} --large-rows {large_rows}",
            args.rows,
            if args.python { " --python" } else { "" },
        ),
    })
}

pub fn run(global: &GlobalArgs, args: BenchDataArgs) -> u8 {
    if let Some(dir) = &args.generate {
        let written = std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))
            .and_then(|()| {
                bench::generate_input(&dir.join("input.parquet"), args.rows)
                    .map_err(|e| e.to_string())
            });
        return match written {
            Ok(bytes) => {
                crate::report::write_stderr(&format!(
                    "wrote {} rows ({bytes} bytes) to {}",
                    args.rows,
                    dir.join("input.parquet").display()
                ));
                EXIT_OK
            }
            Err(message) => {
                crate::report::error(&message);
                EXIT_FAILED
            }
        };
    }
    if let Some(dir) = &args.child {
        return match child_run(dir) {
            Ok(()) => EXIT_OK,
            Err(message) => {
                crate::report::error(&message);
                EXIT_FAILED
            }
        };
    }
    match bench_all(&args) {
        Ok(report) => {
            crate::report::preview::print_bench_data(&report, global.json);
            EXIT_OK
        }
        Err(message) => {
            crate::report::error(&message);
            EXIT_FAILED
        }
    }
}
