//! `peftpipe validate FILE...`: syntax, schema and semantic checks of every file, every problem
//! reported; exit 2 when any file is invalid. Nothing runs.

use std::path::PathBuf;

use clap::Args;

use super::GlobalArgs;
use crate::config::load::load_pipeline;
use crate::probe::StandardProbe;
use crate::report::problems::{print_validation, print_validation_json, FileValidation};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Pipeline files to check.
    #[arg(required = true, value_name = "FILE")]
    pub pipelines: Vec<PathBuf>,
    /// Override a value in every file: `--set stages.prompts.template.k=4` (VALUE is YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

pub fn run(global: &GlobalArgs, args: ValidateArgs) -> u8 {
    let outcomes: Vec<FileValidation> = args
        .pipelines
        .iter()
        .map(
            |file| match load_pipeline(file, &args.overrides, &StandardProbe) {
                Ok(pipeline) => FileValidation::valid(
                    file.display().to_string(),
                    pipeline.stages.keys().cloned().collect(),
                ),
                Err(problems) => FileValidation::invalid(problems),
            },
        )
        .collect();
    if global.json {
        print_validation_json(&outcomes);
    } else {
        print_validation(&outcomes, global.quiet);
    }
    if outcomes.iter().all(|outcome| outcome.valid) {
        super::EXIT_OK
    } else {
        super::EXIT_INVALID
    }
}
