//! `peftpipe report FILE [-o report.html]`: write the run report, one self-contained HTML page,
//! from what the last runs left (the plan, the lock file, each stage's materialized output:
//! metrics.jsonl, metrics.json, base_model.json) and print its path. `run` writes the same page
//! through [`write_report`] after every run.

use std::path::{Path, PathBuf};

use clap::Args;

use super::run::{load_pipeline, report_exec_error, settings_for};
use super::{GlobalArgs, PipelineArgs, EXIT_FAILED, EXIT_OK};
use crate::config::Pipeline;
use crate::exec::{Freshness, RunSettings, RunSummary, StageStatus};
use crate::report;
use crate::report::html::{ReportInput, StageRow, StepRow, TrainCurves};

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  peftpipe report pipelines/quickstart.yaml\n  \
    peftpipe report pipelines/quickstart.yaml -o /tmp/quickstart.html"
)]
pub struct ReportArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Where to write the page (default: `.peftpipe/out/<pipeline>/report.html`).
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Where `run` and `report` put the page by default.
pub fn default_report_path(settings: &RunSettings) -> PathBuf {
    settings.out_root.join("report.html")
}

pub fn run(global: &GlobalArgs, args: ReportArgs) -> u8 {
    let pipeline = match load_pipeline(&args.pipeline, global.json) {
        Ok(pipeline) => pipeline,
        Err(code) => return code,
    };
    let settings = settings_for(global, &pipeline);
    let path = args
        .output
        .clone()
        .unwrap_or_else(|| default_report_path(&settings));
    match write_report(&pipeline, &settings, None, &path) {
        Ok(()) => {
            if global.json {
                report::json(&serde_json::json!({"report": path.display().to_string()}));
            } else {
                report::write_stdout(&path.display().to_string());
            }
            EXIT_OK
        }
        Err(Failure::Exec(error)) => report_exec_error(global, &pipeline, &error),
        Err(Failure::Write(message)) => super::Failure::new(EXIT_FAILED, "--output", message)
            .report(global, &pipeline.file.display().to_string()),
    }
}

/// Why no page was written.
pub enum Failure {
    Exec(crate::exec::ExecError),
    Write(String),
}

/// Gather the page's data and write it to `path` atomically (parent folders created).
pub fn write_report(
    pipeline: &Pipeline,
    settings: &RunSettings,
    summary: Option<&RunSummary>,
    path: &Path,
) -> Result<(), Failure> {
    let input = gather(pipeline, settings, summary).map_err(Failure::Exec)?;
    let page = report::html::render(&input);
    let directory = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(directory).map_err(|error| {
        Failure::Write(format!("cannot create {}: {error}", directory.display()))
    })?;
    // A page to open and share: readable like any file the user writes (`files::file_builder`).
    crate::peft::write_atomic(path, page.as_bytes())
        .map_err(|error| Failure::Write(format!("cannot write {}: {error}", path.display())))?;
    Ok(())
}

/// What the page shows, from the plan, the lock file, the run (when there was one) and the
/// stages' materialized outputs.
pub fn gather(
    pipeline: &Pipeline,
    settings: &RunSettings,
    summary: Option<&RunSummary>,
) -> Result<ReportInput, crate::exec::ExecError> {
    // The whole pipeline, also after `run --stage X`.
    let whole = RunSettings {
        targets: Vec::new(),
        ..settings.clone()
    };
    let plan = crate::exec::plan::plan_only(pipeline, &whole)?;
    let cache = crate::cache::Cache::open_for_reading(&settings.cache_dir).ok();
    let lock = cache
        .as_ref()
        .and_then(|cache| cache.read_lock_file(&pipeline.name).ok());
    let mut input = ReportInput {
        pipeline: pipeline.name.clone(),
        file: pipeline.file.display().to_string(),
        ..ReportInput::default()
    };
    for planned in &plan.stages {
        let entry = lock
            .as_ref()
            .and_then(|lock| lock.stages.get(&planned.name));
        let ran = summary.and_then(|summary| {
            summary
                .stages
                .iter()
                .find(|stage| stage.name == planned.name)
        });
        let mut row = StageRow {
            name: planned.name.clone(),
            kind: planned.kind.clone(),
            needs: planned.upstream.clone(),
            fingerprint: entry.map(|entry| entry.fingerprint.clone()),
            outcome: entry.map(|entry| entry.outcome.clone()).unwrap_or_default(),
            seconds: entry.map(|entry| entry.wall_time_seconds),
            ..StageRow::default()
        };
        match ran {
            Some(stage) => {
                row.status = match stage.status {
                    StageStatus::Fresh => "fresh",
                    StageStatus::Ran => "ran",
                    StageStatus::Failed => "failed",
                    StageStatus::Cancelled => "cancelled",
                    StageStatus::Skipped => "skipped",
                }
                .into();
                row.cache = match stage.cache {
                    crate::exec::CacheUse::Hit => "hit",
                    crate::exec::CacheUse::Miss => "miss",
                    crate::exec::CacheUse::None => "-",
                }
                .into();
                match stage.status {
                    StageStatus::Fresh => {}
                    // It did not run: no time (not `0ms`, nor the last run's as this run's).
                    StageStatus::Skipped => row.seconds = None,
                    _ => row.seconds = Some(stage.wall_time.as_secs_f64()),
                }
                if !stage.outcome.is_empty() {
                    row.outcome = stage.outcome.clone();
                }
                if stage.status != StageStatus::Fresh && stage.status != StageStatus::Ran {
                    row.error = stage.error.clone();
                }
            }
            None => {
                let (status, cache) = match (&planned.freshness, entry) {
                    // In the cache, but `.peftpipe/out` or an export folder does not hold it
                    // (a fresh checkout after `pull`, a deleted or edited copy).
                    (Freshness::Fresh(cached), _) if !cached.republish.is_empty() => {
                        ("not published", "hit")
                    }
                    (Freshness::Fresh(_), _) => ("fresh", "hit"),
                    _ if planned.last_failure.is_some() => ("failed", "-"),
                    (Freshness::Dirty { .. }, Some(_)) => ("stale", "miss"),
                    (Freshness::Dirty { .. }, None) => ("never run", "-"),
                };
                row.status = status.into();
                row.cache = cache.into();
                if let Some(failure) = &planned.last_failure {
                    // The last run with these very inputs failed: show how, not "never run".
                    row.seconds = Some(failure.wall_time_seconds);
                    row.error = Some(failure.error.clone());
                }
            }
        }
        input.stages.push(row);

        // The figures come from the output itself: this run's, else the cached object the plan
        // restores, else the last run's object (stale), never from a published copy that may
        // be missing, edited or another cache's.
        let cached = planned
            .freshness
            .cached_output()
            .or(entry.map(|entry| entry.output.as_str()))
            .and_then(|digest| {
                let cache = cache.as_ref()?;
                cache.has_object(digest).then(|| cache.object_data(digest))
            });
        let this_run = ran.and_then(|stage| stage.output_dir.clone());
        // Neither this run's output nor one of the current inputs: the last successful run's
        // (a stale stage, or one that failed, was skipped or cancelled since), which the page
        // says.
        if let Some(row) = input.stages.last_mut() {
            row.old_figures = this_run.is_none()
                && planned.freshness.cached_output().is_none()
                && entry.is_some();
        }
        // No output of this cache (a stage never run on it, an object `gc` removed): no
        // figures, rather than a published copy another run (another cache) left.
        if let Some(out_dir) = this_run.or(cached) {
            read_outputs(&mut input, &planned.name, &out_dir);
        }
    }
    join_training(&mut input);
    input
        .environment
        .push(("peftpipe".into(), crate::TOOL_BUILD.into()));
    input.environment.push((
        "platform".into(),
        format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
    ));
    input
        .environment
        .push(("seed".into(), pipeline.seed.to_string()));
    if !pipeline.overrides.is_empty() {
        input
            .environment
            .push(("overrides".into(), pipeline.overrides.join(" ")));
    }
    Ok(input)
}

/// What a stage's output folder holds that the page shows: per-step training metrics
/// (metrics.jsonl), evaluation metrics (metrics.json with `base`/`adapted`, and comparison.json
/// when the stage compared candidates) and the base model
/// record (device, dtype). A file that cannot be read becomes a note on the page.
fn read_outputs(input: &mut ReportInput, stage: &str, out_dir: &Path) {
    let steps_file = out_dir.join("metrics.jsonl");
    if steps_file.is_file() {
        match std::fs::read_to_string(&steps_file) {
            Ok(text) => {
                let steps: Vec<StepRow> = text
                    .lines()
                    .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                    .filter_map(|value| StepRow::from_json(&value))
                    .collect();
                input.trains.push(TrainCurves {
                    stage: stage.to_string(),
                    steps,
                });
            }
            Err(error) => input
                .notes
                .push(format!("{}: {error}", steps_file.display())),
        }
    }
    let metrics_file = out_dir.join("metrics.json");
    if metrics_file.is_file() {
        match read_json(&metrics_file) {
            Ok(mut value) if value.get("base").is_some() || value.get("adapted").is_some() => {
                // The comparison table of every candidate, beside the metrics.
                let comparison_file = out_dir.join("comparison.json");
                if comparison_file.is_file() {
                    match read_json(&comparison_file) {
                        Ok(comparison) => value["comparison"] = comparison,
                        Err(message) => input.notes.push(message),
                    }
                }
                input.evaluations.push((stage.to_string(), value));
            }
            Ok(_) => {}
            Err(message) => input.notes.push(message),
        }
    }
    let base_file = out_dir.join("base_model.json");
    if base_file.is_file() {
        match read_json(&base_file) {
            Ok(value) => {
                for key in ["model", "model_type", "device", "dtype", "config_digest"] {
                    if let Some(text) = value.get(key).and_then(|value| value.as_str()) {
                        input
                            .environment
                            .push((format!("{stage}: {}", key.replace('_', " ")), text.into()));
                    }
                }
            }
            Err(message) => input.notes.push(message),
        }
    }
}

/// Each comparison's trained candidates get the train time, tokens/s and peak memory their train
/// stage recorded (this run's figures, or the lock file's), which comparison.json, a cached
/// artifact, never holds.
fn join_training(input: &mut ReportInput) {
    let stages = &input.stages;
    for (_, value) in &mut input.evaluations {
        let Some(raw) = value.get("comparison") else {
            continue;
        };
        let Ok(mut comparison) =
            serde_json::from_value::<crate::stages::comparison::Comparison>(raw.clone())
        else {
            // The page says it cannot read it.
            continue;
        };
        comparison.join_training(|name| {
            stages
                .iter()
                .find(|stage| stage.name == name)
                .map(|stage| &stage.outcome)
        });
        if let Ok(joined) = serde_json::to_value(&comparison) {
            value["comparison"] = joined;
        }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    let text =
        std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
    serde_json::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))
}
