//! `peftpipe inspect MODEL`: describe a model directory (or a lone config.json): architecture,
//! parameter count, dtype, dimensions, tokenizer, and its linear layers. Resolves the arguments and
//! calls models::summary; the report renders.

use std::path::PathBuf;

use clap::Args;

use super::GlobalArgs;
use crate::models::summary::summarize;
use crate::report;
use crate::report::inspect::InspectReport;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A Hugging Face model directory (config.json + safetensors), or a config.json file.
    pub model: PathBuf,
}

pub fn run(global: &GlobalArgs, args: InspectArgs) -> u8 {
    let (model, _config) = match summarize(&args.model) {
        Ok(summary) => summary,
        Err(error) => {
            report::error(&error.to_string());
            return super::EXIT_FAILED;
        }
    };
    let inspect = InspectReport { model, lora: None };
    if global.json {
        report::json(&inspect);
    } else {
        report::write_stdout(&report::inspect::render(&inspect));
    }
    super::EXIT_OK
}
