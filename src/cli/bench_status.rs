//! `peftpipe bench status`: how long `status` takes on a pipeline whose inputs total ≥ 1 GB when
//! everything is fresh (goal < 50 ms, thanks to the size+mtime index). Generates JSONL shards in a
//! temporary directory, runs the pipeline once with cheap stand-in stages (the figure measured is
//! planning: hashing/indexing inputs and reading the lock file, not the stages), then times
//! `peftpipe status` as a separate process (median of `--runs`), plus the in-process plan and
//! the cold plan that has to hash everything.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clap::Args;

use super::{GlobalArgs, EXIT_FAILED, EXIT_OK};
use crate::cache::{Cache, FileIndex};
use crate::config::StageConfig;
use crate::exec::{IgnoreEvents, RunSettings};
use crate::report;
use crate::stages::{Stage, StageContext, StageError, StageOutcome};

#[derive(Debug, Args)]
pub struct BenchStatusArgs {
    /// Total size of the generated inputs, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub size_mib: u64,
    /// Number of input shards (one ingest stage each).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub shards: u32,
    /// Timed `status` runs (the median is reported).
    #[arg(long, default_value_t = 21, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Generate into this directory and keep it (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// A stage that writes one small file: the benchmark measures planning, not stage work.
struct TouchStage;

impl Stage for TouchStage {
    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        std::fs::write(ctx.out_dir.join("done.txt"), ctx.name)?;
        Ok(StageOutcome::default())
    }
}

fn touch_builder(_name: &str, _config: &StageConfig) -> Result<Box<dyn Stage>, StageError> {
    Ok(Box::new(TouchStage))
}

/// Write `bytes` of JSONL rows (`{"text": ..., "label": ...}`) to `path`.
fn write_shard(path: &Path, bytes: u64, shard: u32) -> std::io::Result<()> {
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut written = 0u64;
    let mut row = 0u64;
    while written < bytes {
        let line = format!(
            "{{\"text\": \"shard {shard} row {row}: once upon a time a small fox found a shiny \
             key under the old oak tree and wondered which door it would open\", \"label\": {}}}\n",
            row % 2
        );
        writer.write_all(line.as_bytes())?;
        written += line.len() as u64;
        row += 1;
    }
    writer.flush()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples
        .get(samples.len() / 2)
        .copied()
        .unwrap_or(Duration::ZERO)
}

fn milliseconds(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e5).round() / 100.0
}

pub fn run(global: &GlobalArgs, args: BenchStatusArgs) -> u8 {
    match bench(global, &args) {
        Ok(()) => EXIT_OK,
        Err(message) => {
            report::error(&message);
            EXIT_FAILED
        }
    }
}

fn bench(global: &GlobalArgs, args: &BenchStatusArgs) -> Result<(), String> {
    let temporary;
    let root = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            dir.clone()
        }
        None => {
            temporary = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
            temporary.path().to_path_buf()
        }
    };
    let shards = args.shards.max(1);
    let shard_bytes = args.size_mib * 1024 * 1024 / u64::from(shards);
    let data = root.join("data");
    std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let mut yaml = String::from("name: bench-status\nstages:\n");
    let generating = Instant::now();
    for shard in 0..shards {
        let path = data.join(format!("shard-{shard}.jsonl"));
        let current = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if current < shard_bytes {
            write_shard(&path, shard_bytes, shard)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        yaml.push_str(&format!(
            "  shard{shard}:\n    ingest:\n      path: data/shard-{shard}.jsonl\n"
        ));
    }
    let generate_time = generating.elapsed();
    let pipeline_file = root.join("bench-status.yaml");
    std::fs::write(&pipeline_file, &yaml)
        .map_err(|e| format!("{}: {e}", pipeline_file.display()))?;
    let total_bytes: u64 = (0..shards)
        .map(|shard| {
            std::fs::metadata(data.join(format!("shard-{shard}.jsonl")))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();

    let pipeline = super::run::load_pipeline_file(&pipeline_file, &[])?;
    let mut settings = RunSettings::for_pipeline(&pipeline);
    settings.cache_dir = root.join("cache");
    let cache = Cache::open(&settings.cache_dir).map_err(|e| e.to_string())?;

    // Cold: no index, every input hashed.
    let index_file = settings.cache_dir.join("index").join("files.json");
    let _ = std::fs::remove_file(&index_file);
    let cold_started = Instant::now();
    crate::exec::plan::plan_only(&pipeline, &settings).map_err(|e| e.to_string())?;
    let cold = cold_started.elapsed();

    // The index only trusts files older than its racy window: age the shards if just written.
    for shard in 0..shards {
        let path = data.join(format!("shard-{shard}.jsonl"));
        let file = std::fs::File::options()
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        file.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let _ = std::fs::remove_file(&index_file);
    crate::exec::plan::plan_only(&pipeline, &settings).map_err(|e| e.to_string())?;

    let summary = crate::exec::execute(
        &pipeline,
        &settings,
        &touch_builder,
        &IgnoreEvents,
        &AtomicBool::new(false),
    )
    .map_err(|e| e.to_string())?;
    if summary.failed() {
        return Err("the benchmark pipeline failed".into());
    }

    let mut in_process = Vec::new();
    let mut index_hits = 0;
    for _ in 0..args.runs.max(1) {
        let started = Instant::now();
        let plan = crate::exec::plan::plan_only(&pipeline, &settings).map_err(|e| e.to_string())?;
        in_process.push(started.elapsed());
        if !plan.all_fresh() {
            return Err("status after a run is not all fresh".into());
        }
    }
    {
        let mut index = FileIndex::load(&cache);
        for shard in 0..shards {
            index
                .digest(&data.join(format!("shard-{shard}.jsonl")))
                .map_err(|e| e.to_string())?;
        }
        index_hits += index.hits;
    }

    let executable = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
    let mut process = Vec::new();
    for _ in 0..args.runs.max(1) {
        let started = Instant::now();
        let output = Command::new(&executable)
            .arg("--cache-dir")
            .arg(&settings.cache_dir)
            .arg("status")
            .arg("--check")
            .arg(&pipeline_file)
            .output()
            .map_err(|e| format!("running {}: {e}", executable.display()))?;
        process.push(started.elapsed());
        if !output.status.success() {
            return Err(format!(
                "`peftpipe status --check` exited with {} after a complete run:\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }

    let result = serde_json::json!({
        "input_bytes": total_bytes,
        "input_files": shards,
        "generate_seconds": generate_time.as_secs_f64(),
        "cold_plan_ms": milliseconds(cold),
        "status_process_median_ms": milliseconds(median(process.clone())),
        "status_process_min_ms": milliseconds(process.iter().copied().min().unwrap_or_default()),
        "plan_in_process_median_ms": milliseconds(median(in_process)),
        "runs": args.runs.max(1),
        "index_hits": index_hits,
        "goal_ms": 50,
    });
    if global.json {
        report::json(&result);
    } else {
        report::write_stderr(&format!(
            "inputs: {} files, {:.2} GB\n\
             cold plan (hash everything):        {:>9.2} ms\n\
             status, fresh (process, median {}): {:>9.2} ms (goal < 50 ms)\n\
             plan, fresh (in-process, median):   {:>9.2} ms\n\
             index hits on the last check:       {index_hits}/{shards}",
            shards,
            total_bytes as f64 / 1e9,
            result["cold_plan_ms"].as_f64().unwrap_or(0.0),
            args.runs.max(1),
            result["status_process_median_ms"].as_f64().unwrap_or(0.0),
            result["plan_in_process_median_ms"].as_f64().unwrap_or(0.0),
        ));
    }
    Ok(())
}
