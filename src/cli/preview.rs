//! `peftpipe preview FILE --stage NAME [-n 3] [--split train]`: render a few rows of an ingest
//! or template stage (running its ingest in a temporary directory) and hand them to the
//! reporter, which shows the prompt/completion boundary.

use clap::Args;

use super::{GlobalArgs, PipelineArgs, EXIT_FAILED, EXIT_OK};

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
    let pipeline = match super::run::load_pipeline(&args.pipeline) {
        Ok(pipeline) => pipeline,
        Err(code) => return code,
    };
    match crate::stages::template::preview(&pipeline, &args.stage, &args.split, args.rows) {
        Ok(preview) => {
            crate::report::preview::print_preview(&preview, global.json);
            EXIT_OK
        }
        Err(error) => {
            crate::report::error(&error.to_string());
            EXIT_FAILED
        }
    }
}
