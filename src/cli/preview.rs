//! `peftpipe preview FILE --stage NAME [-n 3] [--split train]`: show the first rows of an ingest
//! or template stage's artifact, the prompt/completion boundary visible.
//!
//! Reads the artifact from the cache when the stage is fresh (nothing runs). When it is stale,
//! the stage and the stale stages it needs run first through the normal executor (progress on
//! stderr, outputs stored in the cache and materialized as `peftpipe run --stage NAME` would),
//! and the preview says so. Printing is the reporter's.

use clap::Args;

use super::run::{execute_reported, load_pipeline, report_exec_error, settings_for};
use super::{interrupt, Failure, GlobalArgs, PipelineArgs, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::cache::Cache;
use crate::config::StageConfig;
use crate::data::preview::{read_rows, PreviewSource};
use crate::exec::{Freshness, StageStatus};
use crate::report;
use crate::report::run::Style;

#[derive(Debug, Args)]
pub struct PreviewArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// The ingest or template stage to preview.
    #[arg(long)]
    pub stage: String,
    /// How many rows.
    #[arg(short = 'n', long = "rows", default_value_t = 3)]
    pub rows: usize,
    /// Which split: train, eval or test.
    #[arg(long, default_value = "train")]
    pub split: String,
}

pub fn run(global: &GlobalArgs, args: PreviewArgs) -> u8 {
    let pipeline = match load_pipeline(&args.pipeline, global.json) {
        Ok(pipeline) => pipeline,
        Err(code) => return code,
    };
    let subject = pipeline.file.display().to_string();
    let stage = args.stage.as_str();
    let kind = match pipeline.stages.get(stage) {
        Some(StageConfig::Ingest(_)) => "ingest",
        Some(StageConfig::Template(_)) => "template",
        Some(other) => {
            return Failure::new(
                EXIT_INVALID,
                "--stage",
                format!(
                    "preview shows ingest and template stages; `{stage}` is {} stage",
                    other.kind().with_article()
                ),
            )
            .report(global, &subject);
        }
        None => {
            let names: Vec<&str> = pipeline.stages.keys().map(String::as_str).collect();
            return Failure::new(
                EXIT_INVALID,
                "--stage",
                format!("no stage named `{stage}`; stages: {}", names.join(", ")),
            )
            .report(global, &subject);
        }
    };
    // The splits the stage writes are its ingest stage's: a split it does not write is a usage
    // error, said before anything runs.
    let mut root = stage;
    let splits = loop {
        match pipeline.stages.get(root) {
            Some(StageConfig::Ingest(ingest)) => break Some(ingest.split.split_names()),
            Some(StageConfig::Template(template)) => root = template.input.as_str(),
            _ => break None,
        }
    };
    if let Some(splits) = splits.filter(|splits| !splits.contains(&args.split.as_str())) {
        return Failure::new(
            EXIT_INVALID,
            "--split",
            format!(
                "stage `{stage}` writes no `{}` split; its splits: {}",
                args.split,
                splits.join(", ")
            ),
        )
        .report(global, &subject);
    }
    let mut settings = settings_for(global, &pipeline);
    settings.targets = vec![stage.to_string()];
    settings.options.allow_outside_project = args.pipeline.allow_outside_project;
    // A preview with `--set` shows a variant: what it runs goes to the cache only, and the lock
    // file and published copies stay those of the pipeline as written.
    settings.record = pipeline.overrides.is_empty();
    let plan = match crate::exec::plan::plan_only(&pipeline, &settings) {
        Ok(plan) => plan,
        Err(error) => return report_exec_error(global, &pipeline, &error),
    };
    let cache = match Cache::open(&settings.cache_dir) {
        Ok(cache) => cache,
        Err(error) => {
            return Failure::new(EXIT_FAILED, "--cache-dir", error.to_string())
                .report(global, &subject);
        }
    };
    let fresh_output = plan
        .stage(stage)
        .and_then(|planned| match &planned.freshness {
            Freshness::Fresh(cached) => Some(cached.output.clone()),
            Freshness::Dirty { .. } => None,
        });
    let (output, source) = match fresh_output {
        Some(output) => (output, PreviewSource::Cache),
        None => {
            let style = Style::detect();
            let summary = match execute_reported(&pipeline, &settings, style, global) {
                Ok(summary) => summary,
                Err(code) => return code,
            };
            if summary.interrupted || summary.failed() {
                report::run::print_summary(
                    &style,
                    &summary,
                    report::run::SummaryOptions {
                        verbose: global.verbose > 0,
                    },
                    None,
                );
                if global.json {
                    // The summary above said it on stderr; stdout gets the problem object.
                    let failed = summary
                        .stages
                        .iter()
                        .find(|report| report.status == StageStatus::Failed);
                    let message = match failed {
                        _ if summary.interrupted => "interrupted".to_string(),
                        Some(report) => format!(
                            "stage `{}` failed: {}",
                            report.name,
                            report.error.as_deref().unwrap_or("no error recorded")
                        ),
                        None => format!("stage `{stage}` did not run"),
                    };
                    Failure::new(EXIT_FAILED, "--stage", message).print_json(&subject);
                }
                return if summary.interrupted {
                    interrupt::exit_code()
                } else {
                    EXIT_FAILED
                };
            }
            let ran: Vec<String> = summary
                .stages
                .iter()
                .filter(|report| report.status == StageStatus::Ran)
                .map(|report| report.name.clone())
                .collect();
            let output = summary
                .stages
                .iter()
                .find(|report| report.name == stage)
                .and_then(|report| report.output.clone());
            let Some(output) = output else {
                return Failure::new(
                    EXIT_FAILED,
                    "--stage",
                    format!("stage `{stage}` produced no output"),
                )
                .report(global, &subject);
            };
            (output, PreviewSource::Ran { stages: ran })
        }
    };
    match read_rows(
        &cache.object_data(&output),
        stage,
        kind,
        &args.split,
        args.rows,
        source,
    ) {
        Ok(preview) => {
            report::preview::print_preview(&preview, global.json);
            EXIT_OK
        }
        Err(error) => {
            Failure::new(EXIT_FAILED, "--stage", error.to_string()).report(global, &subject)
        }
    }
}
