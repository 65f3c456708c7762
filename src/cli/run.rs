//! `peftpipe run FILE`: run what is stale, restore the rest from the cache. Resolves the command
//! line into [`RunSettings`], installs the Ctrl-C handler, and hands events to the reporter.
//! Also holds the pipeline loading used by `status` and `gc` (one place to switch loaders).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;

use super::{GlobalArgs, PipelineArgs, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK};
use crate::config::{Pipeline, RawPipeline};
use crate::exec::{ExecError, RunSettings};
use crate::report;
use crate::report::run::{RunReporter, Style};
use crate::stages::RunOptions;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Run only this stage and the stages it needs (repeatable).
    #[arg(long = "stage", value_name = "NAME")]
    pub stages: Vec<String>,
    /// Rerun even when fresh: the `--stage` targets, or every stage.
    #[arg(long)]
    pub force: bool,
    /// Show what would run and why, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run at most N independent stages at once (default: cores, at most 4).
    #[arg(long, short, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: Option<u16>,
    /// Device for training and evaluation: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, value_parser = parse_device)]
    pub device: Option<String>,
    /// Let export stages write outside the project directory.
    #[arg(long)]
    pub allow_outside_project: bool,
}

fn parse_device(text: &str) -> Result<String, String> {
    let valid = text == "cpu"
        || text == "cuda"
        || text
            .strip_prefix("cuda:")
            .is_some_and(|index| !index.is_empty() && index.chars().all(|c| c.is_ascii_digit()));
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!("expected `cpu`, `cuda` or `cuda:N`, got `{text}`"))
    }
}

/// Load and validate a pipeline; on failure the problems are reported and the exit code
/// returned.
pub(crate) fn load_pipeline(args: &PipelineArgs) -> Result<Pipeline, u8> {
    load_pipeline_file(&args.pipeline, &args.overrides).map_err(|message| {
        report::error(&message);
        EXIT_INVALID
    })
}

/// Minimal loader used until `config::load::load_pipeline` lands: YAML → `--set` overrides →
/// [`RawPipeline`]. Semantic validation is the config loader's job.
pub(crate) fn load_pipeline_file(file: &Path, overrides: &[String]) -> Result<Pipeline, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|error| format!("cannot read `{}`: {error}", file.display()))?;
    let mut value: serde_norway::Value =
        serde_norway::from_str(&text).map_err(|error| format!("{}: {error}", file.display()))?;
    for assignment in overrides {
        apply_override(&mut value, assignment)?;
    }
    // Through JSON: serde_norway reads enums only from YAML tags, the pipeline format uses
    // single-key mappings (`ingest: {...}`).
    let json =
        serde_json::to_value(&value).map_err(|error| format!("{}: {error}", file.display()))?;
    let raw: RawPipeline =
        serde_json::from_value(json).map_err(|error| format!("{}: {error}", file.display()))?;
    let project_dir = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let project_dir = std::path::absolute(&project_dir).unwrap_or(project_dir);
    let name = raw.name.clone().unwrap_or_else(|| {
        file.file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".to_string())
    });
    Ok(Pipeline {
        name,
        file: file.to_path_buf(),
        project_dir,
        seed: raw.seed,
        stages: raw.stages,
        overrides: overrides.to_vec(),
    })
}

fn apply_override(root: &mut serde_norway::Value, assignment: &str) -> Result<(), String> {
    let Some((path, text)) = assignment.split_once('=') else {
        return Err(format!(
            "--set `{assignment}`: expected KEY=VALUE, e.g. stages.prompts.template.k=4"
        ));
    };
    let value: serde_norway::Value = serde_norway::from_str(text)
        .map_err(|error| format!("--set `{assignment}`: the value is not YAML: {error}"))?;
    let mut current = root;
    let keys: Vec<&str> = path.split('.').collect();
    for (position, key) in keys.iter().enumerate() {
        let serde_norway::Value::Mapping(map) = current else {
            return Err(format!(
                "--set `{assignment}`: `{}` is not a mapping",
                keys[..position].join(".")
            ));
        };
        let key_value = serde_norway::Value::String((*key).to_string());
        if position + 1 == keys.len() {
            map.insert(key_value, value);
            return Ok(());
        }
        if !map.contains_key(&key_value) {
            map.insert(
                key_value.clone(),
                serde_norway::Value::Mapping(serde_norway::Mapping::new()),
            );
        }
        current = map
            .get_mut(&key_value)
            .ok_or_else(|| format!("--set `{assignment}`: cannot set `{key}`"))?;
    }
    Ok(())
}

/// Resolve the cache directory and output root for a pipeline.
pub(crate) fn settings_for(global: &GlobalArgs, pipeline: &Pipeline) -> RunSettings {
    let mut settings = RunSettings::for_pipeline(pipeline);
    if let Some(cache_dir) = &global.cache_dir {
        settings.cache_dir = cache_dir.clone();
    }
    settings
}

/// Map an error that kept a run from starting to an exit code (and report it).
pub(crate) fn report_exec_error(error: &ExecError) -> u8 {
    report::error(&error.to_string());
    match error {
        ExecError::Cache(_) => EXIT_FAILED,
        ExecError::UnknownStage { .. } | ExecError::Input { .. } | ExecError::Graph(_) => {
            EXIT_INVALID
        }
    }
}

pub fn run(global: &GlobalArgs, args: RunArgs) -> u8 {
    let pipeline = match load_pipeline(&args.pipeline) {
        Ok(pipeline) => pipeline,
        Err(code) => return code,
    };
    let mut settings = settings_for(global, &pipeline);
    settings.targets = args.stages.clone();
    settings.force = args.force;
    if let Some(jobs) = args.jobs {
        settings.jobs = usize::from(jobs);
    }
    settings.options = RunOptions {
        allow_outside_project: args.allow_outside_project,
        device: args.device.clone(),
    };
    let style = Style::detect();

    if args.dry_run {
        return match crate::exec::plan::plan_only(&pipeline, &settings) {
            Ok(plan) => {
                if global.json {
                    report::json(&report::status::plan_json(&plan));
                } else if !global.quiet {
                    report::write_stderr(&report::status::plan_lines(&style, &plan, true));
                }
                EXIT_OK
            }
            Err(error) => report_exec_error(&error),
        };
    }

    let cancel = Arc::new(AtomicBool::new(false));
    let handler_flag = Arc::clone(&cancel);
    if let Err(error) = ctrlc::set_handler(move || {
        // First Ctrl-C: stop after the running stages; second: exit now.
        if handler_flag.swap(true, Ordering::SeqCst) {
            std::process::exit(i32::from(EXIT_INTERRUPTED));
        }
    }) {
        report::warning(&format!("cannot install the Ctrl-C handler: {error}"));
    }

    let reporter = RunReporter::new(style, global.quiet);
    let summary = match crate::exec::execute(
        &pipeline,
        &settings,
        &crate::exec::default_builder,
        &reporter,
        &cancel,
    ) {
        Ok(summary) => summary,
        Err(error) => return report_exec_error(&error),
    };
    drop(reporter);
    if global.json {
        report::json(&summary);
    }
    if !global.quiet {
        report::run::print_summary(&style, &summary);
    }
    if summary.interrupted {
        EXIT_INTERRUPTED
    } else if summary.failed() {
        EXIT_FAILED
    } else {
        EXIT_OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_checked() {
        assert!(parse_device("cpu").is_ok());
        assert!(parse_device("cuda:1").is_ok());
        assert!(parse_device("cuda:").is_err());
        assert!(parse_device("gpu").is_err());
    }

    #[test]
    fn overrides_set_nested_values() {
        let mut value: serde_norway::Value =
            serde_norway::from_str("stages: {p: {template: {k: 3}}}").unwrap();
        apply_override(&mut value, "stages.p.template.k=4").unwrap();
        let k = &value["stages"]["p"]["template"]["k"];
        assert_eq!(k.as_u64(), Some(4));
        assert!(apply_override(&mut value, "stages.p.template.k.x=1").is_err());
        assert!(apply_override(&mut value, "novalue").is_err());
    }
}
