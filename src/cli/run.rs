//! `peftpipe run FILE`: run what is stale, restore the rest from the cache. Resolves the command
//! line into [`RunSettings`], arms the interrupt flag (Ctrl-C, SIGTERM: see [`super::interrupt`]),
//! and hands events to the reporter.
//! Also holds the pipeline loading used by `status` and `gc` (one place to switch loaders).

use std::path::Path;

use clap::Args;

use super::{interrupt, Failure, GlobalArgs, PipelineArgs, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::config::Pipeline;
use crate::exec::{ExecError, RunSettings, RunSummary};
use crate::probe::StandardProbe;
use crate::report;
use crate::report::run::{RunReporter, Style};
use crate::stages::RunOptions;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  peftpipe run pipelines/quickstart.yaml\n  \
    peftpipe run pipelines/quickstart.yaml --set stages.train.train.method.lora.r=4\n  \
    peftpipe run pipelines/quickstart.yaml --stage train --force --device cuda\n  \
    peftpipe run pipelines/lora-stories.yaml --devices 2   # data-parallel on GPUs 0 and 1\n  \
    peftpipe run pipelines/quickstart.yaml --dry-run")]
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
    /// Train data-parallel on the first N GPUs, one process each (overrides a train stage's
    /// `devices`; more than one GPU needs a build with `--features nccl`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub devices: Option<u16>,
    /// Do not write the HTML run report (`.peftpipe/out/<pipeline>/report.html`).
    #[arg(long)]
    pub no_report: bool,
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
/// With `json`, the problems go to stdout as `validate --json` prints them.
pub(crate) fn load_pipeline(args: &PipelineArgs, json: bool) -> Result<Pipeline, u8> {
    let options = crate::config::LoadOptions {
        allow_outside_project: args.allow_outside_project,
    };
    crate::config::load::load_pipeline_with(
        &args.pipeline,
        &args.overrides,
        &StandardProbe,
        &options,
    )
    .map_err(|problems| {
        if json {
            report::problems::print_validation_json(&[report::problems::FileValidation::invalid(
                problems,
            )]);
        } else {
            report::problems::print_problems(&problems);
        }
        EXIT_INVALID
    })
}

/// Load and validate a pipeline; the problems, rendered, as the error.
pub(crate) fn load_pipeline_file(file: &Path, overrides: &[String]) -> Result<Pipeline, String> {
    crate::config::load::load_pipeline(file, overrides, &StandardProbe)
        .map_err(|problems| report::problems::render_problems(&problems, false))
}

/// Resolve the cache directory and output root for a pipeline.
pub(crate) fn settings_for(global: &GlobalArgs, pipeline: &Pipeline) -> RunSettings {
    let mut settings = RunSettings::for_pipeline(pipeline);
    if let Some(cache_dir) = &global.cache_dir {
        settings.cache_dir = cache_dir.clone();
    }
    settings
}

/// Run the executor with the terminal reporter, the interrupt flag armed (first Ctrl-C or
/// SIGTERM: stop at the running stages' next safe point; second: exit now). An executor error is
/// reported (with `--json`, also as the problem object on stdout) and becomes its exit code.
pub(crate) fn execute_reported(
    pipeline: &Pipeline,
    settings: &RunSettings,
    style: Style,
    global: &GlobalArgs,
) -> Result<RunSummary, u8> {
    let cancel = interrupt::arm();
    let reporter = RunReporter::new(style, global.quiet);
    crate::exec::execute(
        pipeline,
        settings,
        &crate::stages::default_builder,
        &reporter,
        &cancel,
    )
    .map_err(|error| report_exec_error(global, pipeline, &error))
}

/// Report an error that kept a run or a plan of `pipeline` from starting (with `--json`, also
/// the problem object on stdout) and return its exit code.
pub(crate) fn report_exec_error(global: &GlobalArgs, pipeline: &Pipeline, error: &ExecError) -> u8 {
    Failure::exec(error).report(global, &pipeline.file.display().to_string())
}

pub fn run(global: &GlobalArgs, args: RunArgs) -> u8 {
    // Under an outside launcher with several ranks (torchrun's variables): rank 0 runs the
    // pipeline and hands each train stage to the others, which follow it until it is done.
    let world = match crate::train::distributed::World::from_launcher_env() {
        Ok(world) => world,
        Err(error) => {
            return Failure::new(EXIT_INVALID, "", error.to_string())
                .report(global, &args.pipeline.pipeline.display().to_string());
        }
    };
    if world.world_size == 1 || args.dry_run {
        return run_pipeline(global, args);
    }
    if !world.is_main() {
        let mut on_failure = |message: &str| report::error(message);
        return match crate::stages::train::ranks::follow(&world, &mut on_failure) {
            Ok(()) => EXIT_OK,
            Err(message) => {
                report::error(&message);
                EXIT_FAILED
            }
        };
    }
    let code = run_pipeline(global, args);
    if let Err(message) = crate::stages::train::ranks::dismiss(&world) {
        report::warning(&format!("ending the other ranks: {message}"));
    }
    code
}

/// `run` in this process alone (or as rank 0 of an outside launcher's world).
fn run_pipeline(global: &GlobalArgs, args: RunArgs) -> u8 {
    let pipeline = match load_pipeline(&args.pipeline, global.json) {
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
        allow_outside_project: args.pipeline.allow_outside_project,
        device: args.device.clone(),
        devices: args.devices.map(usize::from),
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
            Err(error) => report_exec_error(global, &pipeline, &error),
        };
    }

    let summary = match execute_reported(&pipeline, &settings, style, global) {
        Ok(summary) => summary,
        Err(code) => return code,
    };
    // The report page, after every run that got to run stages (a failure to write it is a
    // warning: the run itself succeeded or failed on its own).
    let report_path = (!args.no_report).then(|| super::report::default_report_path(&settings));
    let report_path = report_path.filter(|path| {
        match super::report::write_report(&pipeline, &settings, Some(&summary), path) {
            Ok(()) => true,
            Err(super::report::Failure::Write(message)) => {
                report::warning(&format!("no run report: {message}"));
                false
            }
            Err(super::report::Failure::Exec(error)) => {
                report::warning(&format!("no run report: {error}"));
                false
            }
        }
    });
    if global.json {
        let mut value = serde_json::to_value(&summary).unwrap_or_default();
        if let (Some(object), Some(path)) = (value.as_object_mut(), &report_path) {
            object.insert("report".into(), path.display().to_string().into());
        }
        report::json(&value);
    }
    if !global.quiet {
        report::run::print_summary(
            &style,
            &summary,
            report::run::SummaryOptions {
                verbose: global.verbose > 0,
            },
            report_path.as_deref(),
        );
    }
    if summary.interrupted {
        interrupt::exit_code()
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
}
