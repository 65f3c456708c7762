//! `peftpipe status FILE [--check] [--verify]`: per stage, fresh or dirty and why. Instant: plans
//! only (input files through the size+mtime index, the lock file, each cached object's manifest
//! against its files' presence and sizes, published copies against what was published); runs no
//! stage code and loads no weights. `--verify` also rehashes every cached object. Exit 3 with
//! `--check` when anything is stale (for CI).

use clap::Args;

use super::run::{load_pipeline, report_exec_error, settings_for};
use super::{GlobalArgs, PipelineArgs, EXIT_OK, EXIT_STALE};
use crate::report;
use crate::report::run::Style;

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  peftpipe status pipelines/quickstart.yaml\n  \
    peftpipe status pipelines/quickstart.yaml --check   # exit 3 when anything is stale (CI)\n  \
    peftpipe status pipelines/quickstart.yaml --json --verify"
)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Exit with code 3 when any stage is stale.
    #[arg(long)]
    pub check: bool,
    /// Also rehash every cached output against its manifest (reads all of them; without it
    /// only presence and sizes are checked).
    #[arg(long)]
    pub verify: bool,
}

pub fn run(global: &GlobalArgs, args: StatusArgs) -> u8 {
    let pipeline = match load_pipeline(&args.pipeline, global.json) {
        Ok(pipeline) => pipeline,
        Err(code) => return code,
    };
    let settings = settings_for(global, &pipeline);
    let objects = if args.verify {
        crate::exec::plan::ObjectCheck::Hash
    } else {
        crate::exec::plan::ObjectCheck::Sizes
    };
    let plan = match crate::exec::plan::plan_checked(&pipeline, &settings, objects) {
        Ok(plan) => plan,
        Err(error) => return report_exec_error(global, &pipeline, &error),
    };
    if global.json {
        report::json(&report::status::plan_json(&plan));
    } else if !global.quiet {
        let style = Style::detect();
        report::write_stdout(&report::status::plan_lines(&style, &plan, false));
    }
    if args.check && !plan.all_fresh() {
        EXIT_STALE
    } else {
        EXIT_OK
    }
}
